"""``make demo`` keeps working: the demo runs end to end on its own servers."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_and_reports() -> None:
    """``python -m swr_cache demo`` starts Redis and moto, runs the load and prints a report with 0 stale reads."""
    proc = subprocess.run(
        [sys.executable, "-m", "swr_cache", "demo", "--seconds", "2", "--readers", "10", "--keys", "50"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "swr_cache demo report" in out
    stale_line = next(line for line in out.splitlines() if line.startswith("stale reads after a completed write"))
    assert stale_line.split()[-1] == "0"
    calls = int(next(line for line in out.splitlines() if line.startswith("DynamoDB GetItem calls")).split()[-1])
    reads = int(next(line for line in out.splitlines() if line.startswith("reads served")).split()[-1])
    assert 0 < calls < reads


def test_cli_rejects_unknown_commands() -> None:
    """An unknown subcommand exits non-zero with a message."""
    proc = subprocess.run([sys.executable, "-m", "swr_cache", "nope"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "unknown command" in proc.stderr
