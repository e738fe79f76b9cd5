"""Readiness: ``cache.ping()``, the startup log line, and ``from_env`` without settings."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from swr_cache import Cache, CacheUnavailableError, SwrCacheError
from swr_cache._readiness import describe_client

pytestmark = pytest.mark.on_cluster


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung Redis)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


async def test_ping_returns_round_trip_seconds(cache: Cache) -> None:
    """On a live Redis (standalone and cluster), ping answers with a float of seconds."""
    rtt = await cache.ping()
    assert isinstance(rtt, float)
    assert 0 < rtt < cache.call_timeout


async def test_ping_works_before_the_cache_is_entered(redis_url: str) -> None:
    """A readiness check may run before (or without) ``async with cache``."""
    cache = Cache.from_url(redis_url)
    try:
        assert await cache.ping() > 0
    finally:
        await cache.client.aclose()


async def test_ping_raises_on_a_port_nobody_listens_on() -> None:
    """A wrong port is an error naming host and port, not a quiet fallback."""
    port = _closed_port()
    cache = Cache.from_url(f"redis://:hunter2-secret@127.0.0.1:{port}/3", namespace="shop")
    async with cache:  # reads fail open; entering does not raise either
        with pytest.raises(CacheUnavailableError) as info:
            await cache.ping()
    assert isinstance(info.value, SwrCacheError)
    message = str(info.value)
    assert f"127.0.0.1:{port}/3" in message
    assert "hunter2" not in message


async def test_ping_raises_within_its_limit_on_a_hung_server(silent_server: int) -> None:
    """A server that accepts but never answers fails the ping at the limit."""
    cache = Cache.from_url(
        f"redis://127.0.0.1:{silent_server}/0", socket_timeout=30, socket_connect_timeout=30
    )
    try:
        with pytest.raises(CacheUnavailableError, match=r"within 0\.2 s"):
            await cache.ping(0.2)
    finally:
        await cache.client.aclose()


async def test_entering_logs_which_redis_and_namespace_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``async with cache`` logs one line with the server and namespace."""
    cache = Cache.from_url(redis_url, namespace="shop")
    with caplog.at_level(logging.INFO, logger="swr_cache"):
        async with cache:
            pass
    lines = [r.getMessage() for r in caplog.records if "namespace" in r.getMessage()]
    host_port = redis_url.removeprefix("redis://").split("/")[0]
    assert len(lines) == 1
    assert host_port in lines[0]
    assert "'shop'" in lines[0]


def test_client_descriptions_never_show_a_password() -> None:
    """Standalone, TLS, unix-socket and cluster clients are described without credentials."""
    plain = aioredis.Redis.from_url("redis://alice:s3cret@cache.internal:6380/2")
    tls = aioredis.Redis.from_url("rediss://:s3cret@cache.internal:6380/0")
    unix = aioredis.Redis.from_url("unix:///run/redis.sock?db=4&password=s3cret")
    assert describe_client(plain) == "redis://cache.internal:6380/2"
    assert describe_client(tls) == "rediss://cache.internal:6380/0"
    assert describe_client(unix) == "unix:///run/redis.sock?db=4"
    from redis.asyncio.cluster import RedisCluster

    cluster = RedisCluster.from_url("redis://:s3cret@node-1:7000")
    assert describe_client(cluster) == "Redis Cluster node-1:7000"
    for client in (plain, tls, unix, cluster):
        assert "s3cret" not in describe_client(client)


def test_from_env_with_nothing_set_warns(caplog: pytest.LogCaptureFixture) -> None:
    """No Redis variable set: a warning names the variables before localhost is used."""
    with caplog.at_level(logging.WARNING, logger="swr_cache"):
        cache = Cache.from_env({})
    assert describe_client(cache.client) == "redis://localhost:6379/0"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "SWR_CACHE_REDIS_URL" in warnings[0]


@pytest.mark.parametrize(
    "environ",
    [
        {"SWR_CACHE_REDIS_URL": "redis://cache.internal:6379/1"},
        {"REDIS_URL": "redis://cache.internal:6379/1"},
        {"REDIS_HOST": "cache.internal", "REDIS_DB": "1"},
    ],
)
def test_from_env_with_a_setting_is_quiet(
    environ: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Any of the documented variables counts as configured."""
    with caplog.at_level(logging.WARNING, logger="swr_cache"):
        cache = Cache.from_env(environ)
    assert describe_client(cache.client) == "redis://cache.internal:6379/1"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
