"""The swr-cache command line's output as a shell sees it: closed pipes and JSON lines (subprocesses)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import redis

pytestmark = pytest.mark.redis

CLI = [sys.executable, "-m", "swr_cache"]


def _fill_namespace(redis_url: str, n: int = 200) -> None:
    """Keys in several groups, so ``stats`` prints many lines."""
    client = redis.Redis.from_url(redis_url)
    try:
        with client.pipeline(transaction=False) as pipe:
            for i in range(n):
                pipe.hset(f"ns:e:{{T{i}|pk=S:u{i}}}", mapping={"x": b"1"})
            pipe.execute()
    finally:
        client.close()


def _run_into_closed_pipe(*argv: str) -> tuple[int, str]:
    """Run the CLI with a stdout pipe whose reader is gone before the first byte."""
    with subprocess.Popen([*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=60)
    return code, err


def test_stats_into_a_closed_pipe_exits_quietly(redis_url: str) -> None:
    """stdout closed before anything is written: no traceback, no blame on Redis, exit 141."""
    _fill_namespace(redis_url)
    code, err = _run_into_closed_pipe("stats", "--redis-url", redis_url, "--namespace", "ns")
    assert code == 141, err
    assert err == ""


def test_stats_piped_into_head_prints_one_line_and_nothing_else(redis_url: str) -> None:
    """``swr-cache stats | head -1`` in a shell: one line out, nothing on stderr."""
    _fill_namespace(redis_url)
    command = " ".join([*CLI, "stats", "--redis-url", redis_url, "--namespace", "ns"])
    proc = subprocess.run(
        ["bash", "-c", f'{command} | head -1; echo "status=${{PIPESTATUS[0]}}" >&2'],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert len(proc.stdout.splitlines()) == 1 and "namespace 'ns'" in proc.stdout
    # Whether the pipe closed before swr-cache finished writing is up to the
    # scheduler: either way it exits 0 or 141 and says nothing.
    status = proc.stderr.strip().splitlines()[-1]
    assert status in ("status=0", "status=141"), proc.stderr
    assert proc.stderr.strip().splitlines()[:-1] == []


def test_json_stats_into_a_closed_pipe_is_quiet(redis_url: str) -> None:
    """The same for ``--json`` output, written in one piece at the end."""
    code, err = _run_into_closed_pipe("stats", "--redis-url", redis_url, "--json")
    assert code == 141 and err == ""


@pytest.mark.dynamodb
async def test_consume_stream_json_lines(
    redis_url: str, dynamodb_client: Any, dynamodb_endpoint: str
) -> None:
    """``consume-stream --once --json`` prints one JSON object per event on stdout."""
    reply = await dynamodb_client.create_table(
        TableName="Users",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "KEYS_ONLY"},
    )
    arn = reply["TableDescription"]["LatestStreamArn"]
    for i in range(3):
        await dynamodb_client.put_item(TableName="Users", Item={"pk": {"S": f"u{i}"}})
    proc = await asyncio.to_thread(
        subprocess.run,
        [
            *CLI,
            "consume-stream",
            "--table",
            "Users",
            "--endpoint-url",
            dynamodb_endpoint,
            "--region",
            "us-east-1",
            "--redis-url",
            redis_url,
            "--namespace",
            "shop",
            "--once",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events == [
        {"event": "started", "stream_arn": arn, "namespace": "shop", "mode": "invalidate"},
        {"event": "applied", "applied": 3, "malformed": 0},
    ]
