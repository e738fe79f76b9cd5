"""``make demo`` keeps working: the demo runs end to end on its own servers."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_and_reports() -> None:
    """``python -m swr_cache demo`` says what it starts, shows progress, and reports 0 stale reads."""
    proc = subprocess.run(
        [sys.executable, "-m", "swr_cache", "demo", "--seconds", "2", "--readers", "10", "--keys", "50"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # It says what it starts, then shows progress while the load runs, then reports.
    for step in ("starting redis-server", "starting moto's DynamoDB server", "seeded in", "running 10 concurrent readers"):
        assert step in out, step
    progress = [line for line in out.splitlines() if " reads (" in line and "from cache" in line]
    assert progress, out
    assert out.index("seeded in") < out.index(progress[0]) < out.index("swr_cache demo report")
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
