"""The DynamoDB examples and the DynamoDB benchmark run as scripts against moto's server and redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.redis, pytest.mark.dynamodb]

ROOT = Path(__file__).resolve().parent.parent


def run_script(path: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.parametrize(
    "script", ["examples/hand_written_accessor.py", "examples/dynamo_table.py"]
)
def test_example_runs_and_checks_itself(
    script: str, dynamodb_endpoint: str, redis_url: str
) -> None:
    """Each example creates its table, reads through the cache, writes, and reports OK (twice: reruns work)."""
    for _ in range(2):
        done = run_script(script, "--endpoint-url", dynamodb_endpoint, "--redis-url", redis_url)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.rstrip().endswith("OK"), done.stdout
        assert "second read (Redis)" in done.stdout


@pytest.mark.slow
def test_benchmark_quick_run(dynamodb_endpoint: str, redis_url: str, tmp_path: Path) -> None:
    """``benchmarks/dynamodb.py --quick`` runs and reports its figures (0 stale reads after writes)."""
    out = tmp_path / "bench.json"
    done = run_script(
        "benchmarks/dynamodb.py",
        "--quick",
        "--endpoint-url",
        dynamodb_endpoint,
        "--redis-url",
        redis_url,
        "--json",
        str(out),
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert {row["operation"] for row in results["latency"]} == {
        "GetItem (1 KB item)",
        "BatchGetItem (100 keys)",
    }
    for row in results["workload"]:
        assert row["reads"] > 0 and row["writes"] > 0
        assert row["stale_reads_after_completed_writes"] == 0
        assert 0.0 < row["reads_saved"] <= 1.0
