"""A read that starts after a write and its invalidation completed never returns older data.

The origin below reads its value when a call *starts* and returns it when
released, as a DynamoDB read that straddles a write does. Each test begins a
load, completes a write + invalidation while it is blocked, then starts a new
caller: that caller must see the write.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from swr_cache import Cache, cached, cached_item, item_tag
from swr_cache._keys import item_identity
from swr_cache.testing import CacheHost

pytestmark = pytest.mark.redis


class SnapshotOrigin:
    """Reads ``version`` when a call starts; the first ``held`` calls wait for ``release``."""

    def __init__(self, held: int = 1) -> None:
        self.version = 1
        self.calls = 0
        self.held = held
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def get(self, pk: str) -> dict[str, Any]:
        seen = self.version
        self.calls += 1
        if self.calls <= self.held:
            self.entered.set()
            await self.gate.wait()
        return {"pk": pk, "v": seen}


def accessor(cache: Cache, origin: SnapshotOrigin) -> Any:
    @cached_item(cache, table="T", key=lambda pk: {"pk": pk})
    async def get(pk: str) -> dict[str, Any]:
        return await origin.get(pk)

    return get


@pytest.fixture
async def caches(redis_client: aioredis.Redis) -> AsyncIterator[tuple[Cache, Cache]]:
    """Two caches on one Redis and namespace: two processes of one service."""
    # No fence: these tests count loads, and a fence (for eventually consistent
    # origins) would only keep the first fills after a write from being stored.
    kw: dict[str, Any] = {"soft_ttl": 60, "hard_ttl": 600, "early_refresh": 0, "fence_ttl": 0}
    a = Cache(redis_client, namespace="race", **kw)
    b = Cache(redis_client, namespace="race", **kw)
    async with CacheHost(a) as ea, CacheHost(b) as eb:
        yield ea, eb


async def test_local_invalidation_detaches_the_flight(caches: tuple[Cache, Cache]) -> None:
    """A caller after a local invalidation starts its own load instead of joining the old one."""
    cache, _ = caches
    origin = SnapshotOrigin()
    get = accessor(cache, origin)
    early = asyncio.create_task(get("k"))
    await origin.entered.wait()  # loading version 1
    origin.version = 2
    await cache.invalidate_item("T", {"pk": "k"})  # the write has completed
    late = await get("k")  # started after: its own flight, not blocked by the old one
    assert late["v"] == 2
    origin.gate.set()
    assert (await early)["v"] == 2  # the old load could not store and reloaded
    stats = cache.stats()[get.name]
    assert stats["reloads_after_invalidation"] == 1
    assert (await get("k"))["v"] == 2  # and what is cached is the new version
    assert origin.calls == 2  # the old flight's second try found the new entry


async def test_invalidation_by_another_process_makes_the_flight_reload(
    caches: tuple[Cache, Cache],
) -> None:
    """Joining a load begun before another process's invalidation still yields the write."""
    cache, other = caches
    origin = SnapshotOrigin()
    get = accessor(cache, origin)
    early = asyncio.create_task(get("k"))
    await origin.entered.wait()
    origin.version = 2
    await other.invalidate_item("T", {"pk": "k"})  # this process is not told
    late = asyncio.create_task(get("k"))  # reads an absent entry, joins the flight
    await asyncio.sleep(0)
    origin.gate.set()
    assert (await late)["v"] == 2
    assert (await early)["v"] == 2
    assert cache.stats()[get.name]["reloads_after_invalidation"] == 1
    assert origin.calls == 2


async def test_flight_that_already_stored_is_not_joined_after_an_invalidation(
    caches: tuple[Cache, Cache], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flight between its fill and its end is not joined by a reader that found the entry gone."""
    cache, other = caches
    origin = SnapshotOrigin(held=0)
    landed = asyncio.Event()
    gate = asyncio.Event()
    loads = cache._engine.fills
    fill = loads.fill

    async def slow_fill(*args: Any, **kwargs: Any) -> Any:
        out = await fill(*args, **kwargs)
        landed.set()
        await gate.wait()  # the fill has landed; the flight is still running
        return out

    monkeypatch.setattr(loads, "fill", slow_fill)
    get = accessor(cache, origin)
    early = asyncio.create_task(get("k"))
    await landed.wait()  # version 1 is stored
    origin.version = 2
    await other.invalidate_item("T", {"pk": "k"})  # another process: this one is not told
    monkeypatch.setattr(loads, "fill", fill)
    late = await get("k")  # finds the entry gone: must not take the landed flight's value
    assert late["v"] == 2
    gate.set()
    assert (await early)["v"] == 1  # began before the write: the old value is a fair answer
    assert origin.calls == 2


async def test_tag_purge_during_a_load_makes_its_waiters_reload(
    caches: tuple[Cache, Cache],
) -> None:
    """A result whose tag is purged while it loads is taken back and its waiters get a new load."""
    cache, _ = caches
    origin = SnapshotOrigin()

    @cached(cache, key="list:{pk}", tags=lambda pk: [item_tag("T", {"pk": pk})])
    async def listing(pk: str) -> dict[str, Any]:
        return await origin.get(pk)

    early = asyncio.create_task(listing("k"))
    await origin.entered.wait()
    origin.version = 2
    await cache.purge_tags([item_tag("T", {"pk": "k"})])
    origin.gate.set()
    assert (await early)["v"] == 2
    stats = cache.stats()[listing.name]
    assert stats["tag_races"] == 1 and stats["reloads_after_invalidation"] == 1
    assert (await listing("k"))["v"] == 2


async def test_flight_answered_from_redis_is_not_joined_after_another_process_invalidates(
    caches: tuple[Cache, Cache], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flight that waited on another process's lease and then read the entry is not joined later.

    Process B's flight reads the entry A stored (version 1). Before its caller
    is answered, A writes version 2 and invalidates; a B caller starting then
    finds no entry and must load, not take the flight's version 1.
    """
    a, b = caches
    table = {"pk": "k", "v": 1}
    gate = asyncio.Event()

    @cached_item(a, table="T", key=lambda pk: {"pk": pk}, name="in_a")
    async def get_a(pk: str) -> dict[str, Any]:
        await gate.wait()
        return dict(table)

    @cached_item(b, table="T", key=lambda pk: {"pk": pk}, name="in_b")
    async def get_b(pk: str) -> dict[str, Any]:
        return dict(table)

    lease = a._keys.lease(item_identity("T", {"pk": "k"}))
    first = asyncio.create_task(get_a("k"))  # A loads under the lease, held at the gate
    while not await a.client.exists(lease):
        await asyncio.sleep(0.001)  # polling Redis state the code under test drives
    flight = asyncio.create_task(get_b("k"))  # B's flight waits on A's lease
    while b.stats()["in_b"]["lease_waits"] == 0:
        await asyncio.sleep(0.001)

    late: list[asyncio.Task[dict[str, Any]]] = []
    joined = asyncio.Event()
    real_flight, real_release = b._engine.flight, b._engine.loads.release

    async def spy_flight(req: Any, **kw: Any) -> Any:
        joined.set()
        return await real_flight(req, **kw)

    async def release_then_write(lease_key: str, token: str) -> None:
        # B's flight has read version 1 under its own lease; before it answers,
        # A writes and invalidates, then a new B caller starts and reaches _flight.
        await real_release(lease_key, token)
        if not late:
            table["v"] = 2
            await a.invalidate_item("T", {"pk": "k"})
            late.append(asyncio.create_task(get_b("k")))
            await joined.wait()

    monkeypatch.setattr(b._engine, "flight", spy_flight)
    monkeypatch.setattr(b._engine.loads, "release", release_then_write)
    gate.set()
    assert (await first)["v"] == 1
    assert (await flight)["v"] == 1  # began before the write
    while not late:
        await asyncio.sleep(0.001)
    assert (await late[0])["v"] == 2
