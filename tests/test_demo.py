"""``make demo`` keeps working: the demo runs end to end on its own servers, the example API included;
``swr-cache demo`` runs it from a clone and says where it is from an installed package."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import demo as _demo
from swr_cache import _cli


def _number(out: str, row: str) -> int:
    """The value of a report row (the last field of the line that starts with ``row``)."""
    line = next(line for line in out.splitlines() if line.startswith(row))
    return int(line.split()[-1])


@pytest.mark.slow
def test_demo_runs_and_reports() -> None:
    """``python -m devtools.demo`` (``make demo``): both loads show progress and report, 0 stale reads after writes."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "devtools.demo",
            "--seconds", "2", "--readers", "10", "--keys", "50", "--clients", "4",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # It says what it starts, shows progress while each load runs, then reports on both.
    steps = [
        "starting redis-server",
        "starting moto's DynamoDB server",
        "seeded in",
        "running 10 concurrent readers",
        "starting examples/app.py under uvicorn",
        "running 4 HTTP clients",
        "stopping the servers it started",
        "swr_cache demo report",
        "HTTP: examples/app.py under uvicorn",
    ]
    positions = [out.find(step) for step in steps]
    assert -1 not in positions, [s for s, p in zip(steps, positions, strict=True) if p == -1]
    assert positions == sorted(positions), out
    lines = out.splitlines()
    reads_progress = [
        i for i, line in enumerate(lines) if " reads (" in line and "from cache" in line
    ]
    http_progress = [
        i for i, line in enumerate(lines) if " requests (" in line and "from cache" in line
    ]
    assert reads_progress and http_progress, out
    assert max(reads_progress) < min(http_progress)
    assert all("DynamoDB calls" in lines[i] for i in http_progress)

    # The accessor load: most reads from cache, none stale after a completed write.
    assert _number(out, "stale reads after a completed write") == 0
    assert 0 < _number(out, "DynamoDB GetItem calls") < _number(out, "reads served")

    # The HTTP load: answers from the response cache, every write read back, none stale.
    http = out[out.index("HTTP: examples/app.py under uvicorn") :]
    assert _number(http, "HTTP requests") > 0
    assert _number(http, "  GET fresh hits") > 0
    assert _number(http, "  errors") == 0
    assert _number(http, "writes") > 0
    assert _number(http, "reads checked against a completed write") >= _number(http, "writes")
    assert _number(http, "stale responses after a completed write") == 0
    assert 0 < _number(http, "DynamoDB reads by the app") < _number(http, "HTTP requests")

    # uvicorn was stopped: nothing listens on its port any more.
    ready = re.search(r"uvicorn .*\n  ready at http://127\.0\.0\.1:(\d+)", out)
    assert ready is not None, out
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(ready[1])), timeout=1).close()


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.dynamodb
def test_demo_without_the_examples_skips_the_http_load(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    redis_url: str,
    dynamodb_endpoint: str,
) -> None:
    """An installed package without the repository's examples/ runs the accessor load and says why not the API."""
    monkeypatch.setattr(_demo, "EXAMPLE_APP", tmp_path / "examples" / "app.py")
    argv = ["--redis-url", redis_url, "--endpoint-url", dynamodb_endpoint]
    assert _demo.main([*argv, "--seconds", "0.5", "--readers", "2", "--keys", "10"]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("skipping the HTTP phase")]
    assert len(skipped) == 1 and "examples" in skipped[0]
    assert "swr_cache demo report" in out
    assert "uvicorn" not in out and "HTTP requests" not in out


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        (b"swr-cache; hit; ttl=3", "fresh"),
        (b"swr-cache; hit; ttl=0", "fresh"),
        (b"swr-cache; hit; ttl=-2", "stale"),
        (b"swr-cache; fwd=uri-miss; collapsed", "collapsed"),
        (b"swr-cache; fwd=uri-miss; stored", "miss"),
        (b"upstream; hit, swr-cache; fwd=uri-miss; stored", "miss"),
        (b"", "miss"),
    ],
)
def test_cache_status_is_sorted_by_our_member(header: bytes, kind: str) -> None:
    """The HTTP load counts a response as fresh, stale, collapsed or a miss by the last Cache-Status member."""
    assert _demo._cache_status({b"cache-status": header}) == kind


def test_cli_demo_help_is_plain_text() -> None:
    """``swr-cache demo --help`` in a checkout: the demo's options under its CLI name, no reST markup."""
    proc = subprocess.run(
        [sys.executable, "-m", "swr_cache", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: swr-cache demo ")
    assert "--redis-url" in proc.stdout and "--seconds" in proc.stdout
    assert "``" not in proc.stdout and ":func:" not in proc.stdout
    # The numbered list is laid out as written, not re-wrapped into one paragraph.
    assert "\n  1. accessor:" in proc.stdout and "\n  2. HTTP:" in proc.stdout


def test_cli_demo_outside_a_checkout_points_at_make_demo(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the repository's devtools/ beside the package, ``swr-cache demo`` explains instead of failing."""
    monkeypatch.setattr(_cli, "_checkout", lambda: None)
    assert _cli.main(["demo"]) == _cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "make demo" in err and "clone" in err and "Traceback" not in err


def test_cli_rejects_unknown_commands() -> None:
    """An unknown subcommand exits non-zero with a message."""
    proc = subprocess.run(
        [sys.executable, "-m", "swr_cache", "nope"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "unknown command" in proc.stderr
