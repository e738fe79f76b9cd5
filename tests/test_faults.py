"""Redis down, killed, restarted or stalled: reads never fail, invalidations fail loudly."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from swr_cache import Cache, InvalidationError, cached_item
from swr_cache.testing import RecordingOrigin

pytestmark = pytest.mark.redis


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def users(cache: Cache, origin: RecordingOrigin) -> Any:
    @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
    async def get_user(user_id: str) -> dict[str, Any] | None:
        return await origin.get(user_id)

    return get_user


@pytest.fixture
def origin() -> RecordingOrigin:
    return RecordingOrigin({"u1": {"pk": "u1", "name": "Ada"}})


async def until(predicate: Any, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


async def test_unreachable_redis_answers_from_origin_in_bounded_time(
    origin: RecordingOrigin,
) -> None:
    """With nothing listening, every call is answered by the origin, fast, and the breaker opens."""
    cache = Cache.from_url(f"redis://127.0.0.1:{closed_port()}/0", socket_connect_timeout=0.2)
    async with cache:
        get_user = users(cache, origin)
        t0 = time.monotonic()
        for _ in range(50):
            assert (await get_user("u1"))["name"] == "Ada"
        elapsed = time.monotonic() - t0
        results = await asyncio.gather(*(get_user("u1") for _ in range(200)))
        assert all(r["name"] == "Ada" for r in results)
    stats = cache.stats()
    assert stats[get_user.name]["bypasses"] > 0
    assert stats[get_user.name]["redis_errors"] >= 3
    assert stats["swr_cache"]["breaker_opened"] >= 1
    # Bounded: the breaker stops paying the connect attempt on every call.
    assert elapsed < 5.0


async def test_invalidation_fails_loudly_when_redis_is_down(origin: RecordingOrigin) -> None:
    """Invalidations never go through the breaker: they raise InvalidationError."""
    cache = Cache.from_url(f"redis://127.0.0.1:{closed_port()}/0", socket_connect_timeout=0.2)
    async with cache:
        with pytest.raises(InvalidationError):
            await cache.invalidate_item("Users", {"pk": "u1"})
        with pytest.raises(InvalidationError):
            await cache.purge_tags(["t"])


async def test_killed_and_restarted_redis_recovers(
    restartable_redis: Any, origin: RecordingOrigin
) -> None:
    """Redis killed mid-traffic: calls keep succeeding from the origin; after a restart the cache fills and hits again."""
    cache = Cache.from_url(restartable_redis.url, breaker_cooldown=0.1)
    async with cache:
        get_user = users(cache, origin)
        await get_user("u1")
        await get_user("u1")
        assert origin.count == 1
        restartable_redis.kill()
        for _ in range(20):
            assert (await get_user("u1"))["name"] == "Ada"
        assert (
            cache.stats()[get_user.name]["bypasses"] + cache.stats()[get_user.name]["redis_errors"]
            > 0
        )
        await restartable_redis.start_async()  # the cache's tasks keep running meanwhile

        async def hits_again() -> bool:
            before = cache.stats()[get_user.name]["hits"]
            await get_user("u1")
            return bool(cache.stats()[get_user.name]["hits"] > before)

        await until(hits_again)
        assert not cache.breaker.is_open


async def test_stalled_redis_times_out_and_bypasses(
    restartable_redis: Any, origin: RecordingOrigin
) -> None:
    """A paused (stalled) Redis costs at most the socket timeout, then the breaker bypasses it."""
    cache = Cache.from_url(restartable_redis.url, socket_timeout=0.1, breaker_cooldown=0.2)
    async with cache:
        get_user = users(cache, origin)
        await get_user("u1")
        restartable_redis.pause()
        try:
            t0 = time.monotonic()
            results = await asyncio.gather(*(get_user("u1") for _ in range(100)))
            assert all(r["name"] == "Ada" for r in results)
            for _ in range(20):
                assert (await get_user("u1"))["name"] == "Ada"
            assert time.monotonic() - t0 < 3.0
            assert cache.breaker.is_open
        finally:
            restartable_redis.resume()

        async def healthy() -> bool:
            await get_user("u1")
            return not cache.breaker.is_open

        await until(healthy)


async def test_pool_exhausted_by_the_app_bypasses_without_tripping_breaker(
    redis_url: str, origin: RecordingOrigin
) -> None:
    """When the app holds every connection of a shared plain pool, reads go to the origin and the breaker stays closed."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, max_connections=2, socket_timeout=0.5)
    cache = Cache(client, namespace="px")
    try:
        async with cache:
            get_user = users(cache, origin)
            await get_user("u1")
            held = [await client.connection_pool.get_connection() for _ in range(2)]  # type: ignore[no-untyped-call]
            try:
                for _ in range(10):
                    assert (await get_user("u1"))["name"] == "Ada"
                stats = cache.stats()[get_user.name]
                assert stats["pool_waits_timed_out"] >= 10
                assert stats["redis_errors"] == 0
                assert not cache.breaker.is_open
            finally:
                for conn in held:
                    await client.connection_pool.release(conn)
            hits = cache.stats()[get_user.name]["hits"]
            await get_user("u1")
            assert cache.stats()[get_user.name]["hits"] == hits + 1
    finally:
        await client.aclose()
