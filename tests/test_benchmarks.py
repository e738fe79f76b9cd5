"""The benchmark harness keeps working: run_all.py runs a benchmark and writes its report and charts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.redis
def test_run_all_quick_stampede_writes_report(tmp_path: Path) -> None:
    """`run_all.py --quick --only stampede` reports the machine, a table and charts; swr_cache loads once."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--only", "stampede", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/1] stampede" in proc.stdout  # progress is shown
    report = (tmp_path / "RESULTS.md").read_text()
    for expected in ("## Machine", "| CPU |", "| redis-server |", "| Python |", "Cold stampede", "| swr_cache |"):
        assert expected in report
    data = json.loads((tmp_path / "results" / "stampede.json").read_text())
    # Behaviour, not speed: 1000 cold callers cost one origin call, in one process and across four.
    assert data["one_process"]["swr_cache"]["origin_calls_max"] == 1
    assert data["processes"]["swr_cache"]["origin_calls_max"] == 1
    assert data["one_process"]["swr_cache"]["errors"] == 0
    if importlib.util.find_spec("matplotlib") is not None:
        for chart in ("stampede_origin_calls.png", "stampede_latency.png"):
            assert (tmp_path / "results" / chart).stat().st_size > 0
            assert f"(results/{chart})" in report


def test_run_all_rejects_unknown_benchmarks(tmp_path: Path) -> None:
    """Asking for a benchmark that does not exist fails with the list of those that do."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--only", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "no benchmark named nope" in proc.stderr and "stampede" in proc.stderr
