"""The near cache against real Redis servers: hits from memory, invalidation by tracking, health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from helpers import users, wait_until

from devtools.devservers import RedisServer
from swr_cache import Cache, ConfigError, NearCache, cached, item_tag
from swr_cache._engine_api import EntryRequest
from swr_cache._entry import _Snap
from swr_cache.testing import CacheHost, FakeClock, RecordingOrigin

pytestmark = [pytest.mark.redis, pytest.mark.on_cluster]

WORKER = pathlib.Path(__file__).parent / "workers" / "near_peer.py"
Reader = Callable[[EntryRequest], Awaitable[_Snap | None]]
_T = TypeVar("_T")


@pytest.fixture
def origin() -> RecordingOrigin:
    return RecordingOrigin(
        {
            "u1": {"pk": "u1", "name": "Ada", "age": Decimal("36"), "tags": {"a", "b"}},
            "u2": {"pk": "u2", "name": "Bob", "age": Decimal("40")},
            "u3": {"pk": "u3", "name": "Cy"},
            "u4": {"pk": "u4", "name": "Di"},
            "u5": {"pk": "u5", "name": "Ed"},
        }
    )


@contextlib.asynccontextmanager
async def tracking(client: Any, near: NearCache, **kwargs: Any) -> AsyncIterator[Cache]:
    """An entered cache on ``client`` with ``near``, once tracking is up (namespace ``t``, no XFetch)."""
    kwargs.setdefault("namespace", "t")
    kwargs.setdefault("early_refresh", 0)
    async with CacheHost(Cache(client, near_cache=near, **kwargs)) as cache:
        await asyncio.wait_for(near.wait_ready(), 30)
        yield cache


@pytest.fixture
def near() -> NearCache:
    return NearCache(max_items=100, max_age=30.0)


@pytest.fixture
async def cache(redis_client: Any, clock: FakeClock, near: NearCache) -> AsyncIterator[Cache]:
    """An entered cache with a near cache whose tracking is up (namespace ``t``)."""
    async with tracking(redis_client, near, soft_ttl=10, hard_ttl=100, clock=clock) as entered:
        yield entered


@pytest.fixture
async def peer(redis_client: Any) -> AsyncIterator[Cache]:
    """Another cache on the same Redis (other connections, no near cache): a stand-in writer."""
    c = Cache(redis_client, namespace="t", soft_ttl=10, hard_ttl=100, early_refresh=0)
    async with CacheHost(c) as entered:
        yield entered


class ReadCounter:
    """Counts the engine's Redis entry reads (installed over the engine's ``read``)."""

    def __init__(self, cache: Cache) -> None:
        self.count = 0
        self._read: Reader = cache._engine.read
        cache._engine.read = self  # type: ignore[method-assign]

    async def __call__(self, req: EntryRequest) -> _Snap | None:
        self.count += 1
        return await self._read(req)


class HeldRead:
    """Holds the engine's Redis entry reads after Redis answered, until released."""

    def __init__(self, cache: Cache) -> None:
        self.answered = asyncio.Event()
        self.gate = asyncio.Event()
        self._read: Reader = cache._engine.read
        cache._engine.read = self  # type: ignore[method-assign]

    async def __call__(self, req: EntryRequest) -> _Snap | None:
        snap = await self._read(req)
        self.answered.set()
        await self.gate.wait()
        return snap


async def held_read(
    cache: Cache, origin: RecordingOrigin
) -> tuple[Any, HeldRead, asyncio.Task[Any]]:
    """``u1`` filled, then a read of it that Redis answered, held before it installs its copy."""
    get_user = users(cache, origin)
    await get_user("u1")
    held = HeldRead(cache)
    reader = asyncio.create_task(get_user("u1"))
    await held.answered.wait()
    return get_user, held, reader


def engine(cache: Cache) -> dict[str, Any]:
    return cache.stats()["swr_cache"]


async def settled(cache: Cache, call: Awaitable[_T]) -> _T:
    """Await a call that fills entries, then until this cache has heard Redis announce the fills.

    A fill's announcement may arrive after the next read installed a copy
    (and drop it): tests that count Redis reads wait for it first.
    """
    heard = engine(cache)["near_invalidations"]
    fills = sum(m["fills"] for m in cache.stats().values())
    result = await call
    filled = sum(m["fills"] for m in cache.stats().values()) - fills
    await wait_until(lambda: engine(cache)["near_invalidations"] >= heard + filled)
    return result


async def run_peer(url: str, action: str, *pks: str) -> int:
    """Run ``tests/workers/near_peer.py`` in another OS process; its ``done_ns``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        url,
        "t",
        action,
        *pks,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    done: int = json.loads(out)["done_ns"]
    return done


# -- configuration --------------------------------------------------------------------


def test_rejects_nonsense() -> None:
    """Sizes and durations must be positive."""
    for kwargs in ({"max_items": 0}, {"max_age": 0.0}, {"max_age": float("inf")}):
        with pytest.raises(ConfigError):
            NearCache(**kwargs)
    with pytest.raises(ConfigError):
        NearCache(health_check_interval=0)


@pytest.mark.standalone_only(reason="construction only")
async def test_one_near_cache_per_cache(redis_client: aioredis.Redis) -> None:
    """A near cache serves one Cache: a second one is refused at construction."""
    nc = NearCache()
    Cache(redis_client, namespace="a", near_cache=nc)
    with pytest.raises(ConfigError):
        Cache(redis_client, namespace="b", near_cache=nc)
    assert len(nc) == 0 and not nc.usable and "bypassed" in repr(nc)


# -- hits -------------------------------------------------------------------------------


async def test_hot_reads_skip_redis(cache: Cache, near: NearCache, origin: RecordingOrigin) -> None:
    """After one Redis read installs the copy, hits come from memory: no Redis read, counted."""
    get_user = users(cache, origin)
    assert await settled(cache, get_user("u1")) == origin.items["u1"]  # miss, load, fill
    reads = ReadCounter(cache)
    for _ in range(10):
        assert await get_user("u1") == origin.items["u1"]
    assert reads.count == 1 and len(near) == 1
    stats = cache.stats()[get_user.name]
    assert stats["near_hits"] == 9 and stats["hits"] == 10 and origin.count == 1


async def test_each_caller_gets_its_own_object(
    cache: Cache, near: NearCache, origin: RecordingOrigin
) -> None:
    """A value served from memory is decoded per call: mutating it changes nothing for others."""
    get_user = users(cache, origin)
    await settled(cache, get_user("u1"))
    await get_user("u1")
    a = await get_user("u1")
    assert a is not None
    a["name"] = "changed"
    a["tags"].add("c")
    b = await get_user("u1")
    assert b == origin.items["u1"] and b is not a
    assert cache.stats()[get_user.name]["near_hits"] == 2


class GetCounter:
    """Counts calls that reach the engine's ``get`` (the near fast path does not)."""

    def __init__(self, cache: Cache) -> None:
        self.count = 0
        self._get = cache._engine.get
        cache._engine.get = self  # type: ignore[method-assign]

    async def __call__(self, req: EntryRequest) -> Any:
        self.count += 1
        return await self._get(req)


async def test_fresh_copies_skip_the_request(
    cache: Cache, near: NearCache, origin: RecordingOrigin
) -> None:
    """A fresh held item (or not-found) is answered before any request is built; counted as usual."""
    get_user = users(cache, origin)
    await settled(cache, get_user("u1"))
    await settled(cache, get_user("nobody"))
    await get_user("u1")  # installs the copies (a Redis read each)
    await get_user("nobody")
    gets = GetCounter(cache)
    for _ in range(5):
        assert await get_user("u1") == origin.items["u1"]
        assert await get_user("nobody") is None
    assert gets.count == 0
    stats = cache.stats()[get_user.name]
    assert stats["near_hits"] == 10 and stats["hits"] == 6 and stats["negative_hits"] == 6
    # A projection, a keyword call and a stale copy go the usual way.
    assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
    assert await get_user(user_id="u1") == origin.items["u1"]
    assert gets.count == 2


async def test_early_refresh_from_a_fresh_copy(
    redis_client: Any, clock: FakeClock, origin: RecordingOrigin
) -> None:
    """XFetch still runs for copies answered before any request: its refresh is scheduled once."""
    near = NearCache()
    # A huge beta: every fresh hit of an entry with a load time is due early.
    async with tracking(
        redis_client, near, soft_ttl=10, hard_ttl=100, clock=clock, early_refresh=1e9
    ) as cache:
        get_user = users(cache, origin)
        origin.hold()
        first = asyncio.create_task(settled(cache, get_user("u1")))
        await origin.entered.wait()
        await asyncio.sleep(0.02)  # a load time of 20 ms or more: the entry's delta
        origin.release()
        await first
        origin.hold()
        gets = GetCounter(cache)
        stats_before = cache.stats()[get_user.name]["near_hits"]
        for _ in range(5):
            assert await get_user("u1") == origin.items["u1"]
        await origin.entered.wait()
        stats = cache.stats()[get_user.name]
        assert stats["early_refreshes"] >= 1
        assert stats["near_hits"] - stats_before >= 4 and gets.count <= 1
        origin.release()
        await wait_until(lambda: not cache._engine.refresher.refreshing)
        assert cache.stats()[get_user.name]["refreshes"] == 1 and origin.count == 2


async def test_projections_are_held_apart(
    cache: Cache, near: NearCache, origin: RecordingOrigin
) -> None:
    """A projection's copy answers only that projection; invalidating the item drops them all."""
    get_user = users(cache, origin)
    await settled(cache, get_user("u1"))
    for _ in range(3):
        assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
        assert await get_user("u1", attributes=["age"]) == {"age": Decimal("36")}
        assert await get_user("u1") == origin.items["u1"]
    assert len(near) == 3
    assert cache.stats()[get_user.name]["near_hits"] == 6
    await cache.invalidate_item("Users", {"pk": "u1"})
    assert len(near) == 0


async def test_cached_results(cache: Cache, near: NearCache) -> None:
    """``@cached`` results are held too, and ``purge_tags`` drops them before it returns."""
    calls: list[str] = []

    @cached(cache, key="orders:{customer}", tags=lambda customer: [item_tag("C", {"pk": customer})])
    async def orders(customer: str) -> list[dict[str, Any]]:
        calls.append(customer)
        return [{"id": len(calls)}]

    assert await settled(cache, orders("c1")) == [{"id": 1}]
    for _ in range(3):
        assert await orders("c1") == [{"id": 1}]
    assert cache.stats()[orders.name]["near_hits"] == 2 and len(near) == 1
    await cache.purge_tags([item_tag("C", {"pk": "c1"})])
    assert len(near) == 0
    cache._engine.clock.clock.advance(2)  # type: ignore[attr-defined]  # past the purge fence
    assert await orders("c1") == [{"id": 2}]


async def test_bounded_least_recently_used_go_first(
    redis_client: Any, clock: FakeClock, origin: RecordingOrigin
) -> None:
    """At most ``max_items`` copies; the least recently used one is dropped first."""
    near = NearCache(max_items=3)
    async with tracking(redis_client, near, clock=clock) as cache:
        get_user = users(cache, origin)
        for pk in ("u1", "u2", "u3"):
            await settled(cache, get_user(pk))
        for pk in ("u1", "u2", "u3"):
            await get_user(pk)
        assert len(near) == 3
        await get_user("u1")  # u1 is now the most recently used: u2 goes next
        await settled(cache, get_user("u4"))
        await get_user("u4")
        assert len(near) == 3
        reads = ReadCounter(cache)
        await get_user("u1")
        await get_user("u3")
        assert reads.count == 0
        await get_user("u2")
        assert reads.count == 1 and len(near) == 3


# -- TTLs -----------------------------------------------------------------------------------


async def test_soft_ttl_serves_stale_and_refreshes_once(
    cache: Cache, near: NearCache, origin: RecordingOrigin, clock: FakeClock
) -> None:
    """Past soft, a copy is served stale and triggers the one refresh; the refresh replaces it."""
    get_user = users(cache, origin)
    await settled(cache, get_user("u1"))
    await get_user("u1")
    origin.items["u1"]["name"] = "Ada v2"
    clock.advance(11)
    origin.hold()
    stale = [await get_user("u1") for _ in range(5)]
    assert all(s is not None and s["name"] == "Ada" for s in stale)
    stats = cache.stats()[get_user.name]
    assert stats["stale_hits"] == 5 and stats["near_hits"] == 5
    await origin.entered.wait()
    origin.release()
    await wait_until(
        lambda: (
            cache.stats()[get_user.name]["refreshes"] == 1
            and not cache._engine.refresher.refreshing
        )
    )
    assert origin.count == 2
    await wait_until(lambda: len(near) == 0)  # the refresh's fill dropped the old copy
    fresh = await get_user("u1")
    assert fresh is not None and fresh["name"] == "Ada v2"


async def test_hard_ttl_and_max_age_bound_copies(
    redis_client: Any, clock: FakeClock, origin: RecordingOrigin
) -> None:
    """A copy is never served past its entry's hard deadline, nor older than ``max_age``."""
    near = NearCache(max_age=5.0)
    async with tracking(redis_client, near, soft_ttl=2, hard_ttl=3, clock=clock) as cache:
        get_user = users(cache, origin)
        await settled(cache, get_user("u1"))
        await get_user("u1")
        reads = ReadCounter(cache)
        clock.advance(3.5)  # past hard (Redis still holds the key: PEXPIRE runs on its own clock)
        origin.items["u1"]["name"] = "new"
        got = await get_user("u1")
        assert got is not None and got["name"] == "new"
        assert reads.count == 1 and origin.count == 2
        assert cache.stats()[get_user.name]["near_hits"] == 0

    near = NearCache(max_age=1.0)
    async with tracking(redis_client, near, namespace="t2", clock=clock) as cache:
        get_user = users(cache, origin)
        await settled(cache, get_user("u2"))
        await get_user("u2")
        reads = ReadCounter(cache)
        await get_user("u2")
        assert reads.count == 0
        clock.advance(1.5)
        await get_user("u2")
        assert reads.count == 1  # too old to serve: read again (and installed again)
        await get_user("u2")
        assert reads.count == 1


# -- invalidation ---------------------------------------------------------------------------


async def test_own_invalidation_is_immediate(
    cache: Cache, near: NearCache, origin: RecordingOrigin
) -> None:
    """``invalidate_item`` drops this process's copy before it returns (no announcement awaited)."""
    get_user = users(cache, origin)
    await get_user("u1")
    await get_user("u1")
    assert len(near) == 1
    await cache.invalidate_item("Users", {"pk": "u1"})
    assert len(near) == 0


async def test_another_clients_invalidation_reaches_us(
    cache: Cache, peer: Cache, near: NearCache, origin: RecordingOrigin, clock: FakeClock
) -> None:
    """Another client's invalidation arrives by tracking and drops the copy; the next read is new."""
    get_user = users(cache, origin)
    await get_user("u1")
    await get_user("u1")
    assert len(near) == 1
    origin.items["u1"]["name"] = "Ada v2"
    await peer.invalidate_item("Users", {"pk": "u1"})
    await wait_until(lambda: len(near) == 0)
    assert engine(cache)["near_invalidations"] >= 1
    clock.advance(2)  # past the fence
    got = await get_user("u1")
    assert got is not None and got["name"] == "Ada v2"


async def test_another_process_invalidation_reaches_us(
    cache: Cache, near: NearCache, origin: RecordingOrigin, redis_url: str, clock: FakeClock
) -> None:
    """An ``invalidate_item`` in another OS process drops this process's copy."""
    get_user = users(cache, origin)
    for pk in ("u1", "u1", "u2", "u2"):
        await get_user(pk)
    assert len(near) == 2
    origin.items["u1"]["name"] = "Ada v2"
    await run_peer(redis_url, "invalidate", "u1")
    await wait_until(lambda: len(near) == 1)  # u2 stays
    clock.advance(2)
    got = await get_user("u1")
    assert got is not None and got["name"] == "Ada v2"


async def test_flushall_flushes(
    cache: Cache, near: NearCache, origin: RecordingOrigin, redis_url: str
) -> None:
    """A FLUSHALL (from another process) empties the near cache."""
    get_user = users(cache, origin)
    for pk in ("u1", "u1", "u2", "u2"):
        await get_user(pk)
    assert len(near) == 2
    await run_peer(redis_url, "flushall")
    await wait_until(lambda: len(near) == 0)
    reads = ReadCounter(cache)
    await get_user("u1")
    assert reads.count == 1 and origin.count == 3


async def test_expiry_and_eviction_drop_copies(
    cache: Cache, near: NearCache, origin: RecordingOrigin, redis_client: Any
) -> None:
    """Redis expiring or deleting the key behind our back drops the copy."""
    get_user = users(cache, origin)
    for pk in ("u1", "u1", "u2", "u2"):
        await get_user(pk)
    await redis_client.pexpire(cache._keys.entry("Users|pk=S:u1"), 1)
    await wait_until(lambda: len(near) == 1)
    await redis_client.delete(cache._keys.entry("Users|pk=S:u2"))
    await wait_until(lambda: len(near) == 0)


async def test_other_namespaces_and_key_kinds_are_not_tracked(
    cache: Cache, near: NearCache, origin: RecordingOrigin, redis_client: Any
) -> None:
    """Leases, fences and other namespaces' keys never drop our copies."""
    get_user = users(cache, origin)
    await get_user("u1")
    await get_user("u1")
    before = engine(cache)["near_invalidations"]
    await redis_client.set(cache._keys.lease("Users|pk=S:u1"), b"x", px=1000)
    await redis_client.set("other:e:{Users|pk=S:u1}", b"x")
    await redis_client.hset(cache._keys.entry("Users|pk=S:zz"), "f", "v")
    await wait_until(lambda: engine(cache)["near_invalidations"] > before)
    assert engine(cache)["near_invalidations"] == before + 1  # only the entry key
    assert len(near) == 1


# -- the install race --------------------------------------------------------------------------


async def test_announcement_during_read_refuses_install(
    cache: Cache, peer: Cache, near: NearCache, origin: RecordingOrigin, clock: FakeClock
) -> None:
    """A read whose entry is invalidated (by another client) while in flight is not installed."""
    get_user, held, reader = await held_read(cache, origin)  # Redis answered: old entry
    heard = engine(cache)["near_invalidations"]
    await peer.invalidate_item("Users", {"pk": "u1"})
    await wait_until(lambda: engine(cache)["near_invalidations"] > heard)
    held.gate.set()
    old = await reader
    assert old is not None and old["name"] == "Ada"  # began before the write: may be old
    assert len(near) == 0
    assert cache.stats()[get_user.name]["near_install_refusals"] == 1
    origin.items["u1"]["name"] = "Ada v2"
    clock.advance(2)
    got = await get_user("u1")
    assert got is not None and got["name"] == "Ada v2"


@pytest.mark.parametrize("invalidate", [True, False], ids=["invalidated", "untouched"])
async def test_own_invalidation_during_read_refuses_install(
    cache: Cache, near: NearCache, origin: RecordingOrigin, invalidate: bool
) -> None:
    """Our own invalidation during a read spoils its install; with none, the read installs its copy."""
    get_user, held, reader = await held_read(cache, origin)
    if invalidate:
        await cache.invalidate_item("Users", {"pk": "u1"})
    held.gate.set()
    await reader
    assert len(near) == (0 if invalidate else 1)
    assert cache.stats()[get_user.name]["near_install_refusals"] == (1 if invalidate else 0)


async def test_cancelled_read_leaves_no_ticket(
    cache: Cache, near: NearCache, origin: RecordingOrigin
) -> None:
    """A read cancelled in flight unregisters itself: nothing is left pending."""
    _, _, reader = await held_read(cache, origin)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert near._inflight == {} and near._spoiled == {} and len(near) == 0


# -- listener health ---------------------------------------------------------------------------


async def kill_tracking(client: Any) -> int:
    """CLIENT KILL the near cache's tracking connection(s); how many were killed."""
    killed = 0
    for entry in await client.client_list():
        if entry.get("name") == "swr_cache-near":
            await client.client_kill_filter(_id=entry["id"])
            killed += 1
    return killed


@pytest.mark.standalone_only(reason="CLIENT LIST/KILL of one server")
async def test_killed_tracking_connection_flushes_and_bypasses(
    cache: Cache, near: NearCache, origin: RecordingOrigin, redis_client: Any
) -> None:
    """Killing the tracking connection flushes and bypasses the near cache until tracking is back."""
    get_user = users(cache, origin)
    await get_user("u1")
    await get_user("u1")
    assert len(near) == 1
    assert await kill_tracking(redis_client) == 1
    await wait_until(lambda: not near.usable)
    assert len(near) == 0 and engine(cache)["near_flushes"] == 1
    await asyncio.wait_for(near.wait_ready(), 10)  # re-established with back-off
    hits = cache.stats()[get_user.name]["near_hits"]
    await get_user("u1")
    await get_user("u1")
    assert cache.stats()[get_user.name]["near_hits"] == hits + 1


async def test_restarted_redis_flushes_then_resumes(
    restartable_redis: RedisServer, origin: RecordingOrigin
) -> None:
    """While Redis is down, reads bypass memory (and fail open); tracking resumes after restart."""
    client = aioredis.Redis.from_url(restartable_redis.url, socket_timeout=0.5)
    near = NearCache(health_check_interval=0.2, max_reconnect_delay=0.2)
    try:
        async with tracking(client, near, breaker_cooldown=0.05) as cache:
            get_user = users(cache, origin)
            await get_user("u1")
            await get_user("u1")
            assert len(near) == 1
            restartable_redis.stop()
            await wait_until(lambda: not near.usable)
            assert len(near) == 0
            assert await get_user("u1") == origin.items["u1"]  # from the origin
            await restartable_redis.start_async()
            await asyncio.wait_for(near.wait_ready(), 10)
            assert engine(cache)["near_flushes"] == 1
    finally:
        await client.aclose()


# -- writes through DynamoTable and streams are covered by the _detach hook -------------------


async def test_stream_handler_drops_copies(
    cache: Cache, near: NearCache, origin: RecordingOrigin
) -> None:
    """A stream record handled in this process drops the copy before ``handle`` returns."""
    from swr_cache import StreamInvalidator

    get_user = users(cache, origin)
    await get_user("u1")
    await get_user("u1")
    assert len(near) == 1
    record = {
        "eventID": "e1",
        "eventName": "MODIFY",
        "eventSource": "aws:dynamodb",
        "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/Users/stream/2024-01-01T00:00:00.000",
        "dynamodb": {"Keys": {"pk": {"S": "u1"}}, "SequenceNumber": "100"},
    }
    await StreamInvalidator(cache).handle({"Records": [record]})
    assert len(near) == 0


# -- Redis Cluster ---------------------------------------------------------------------------


@pytest.mark.cluster
async def test_cluster_tracks_every_master(cluster_client: Any, origin: RecordingOrigin) -> None:
    """On a cluster, one tracking connection per master; keys on every master are invalidated."""
    near = NearCache()
    async with tracking(cluster_client, near) as cache:
        assert len(near._up) == 3
        get_user = users(cache, origin)
        pks = ["u1", "u2", "u3", "u4", "u5"]
        for pk in pks * 2:
            await get_user(pk)
        masters = {
            cluster_client.get_node_from_key(cache._keys.entry(f"Users|pk=S:{pk}")).port
            for pk in pks
        }
        assert len(masters) > 1 and len(near) == 5
        for pk in pks:  # raw deletes: only tracking can tell us
            await cluster_client.delete(cache._keys.entry(f"Users|pk=S:{pk}"))
        await wait_until(lambda: len(near) == 0)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.standalone_only(reason="a private cluster with replicas")
async def test_cluster_failover_retracks(origin: RecordingOrigin) -> None:
    """A master dies: the near cache is flushed and bypassed, then tracks the promoted replica."""
    from test_cluster import owner_index, private_cluster

    async with private_cluster(masters=3, replicas=1, node_timeout_ms=1000) as (cluster, client):
        near = NearCache(health_check_interval=0.2, topology_interval=0.2, max_reconnect_delay=0.2)
        async with tracking(client, near, namespace="fo", breaker_cooldown=0.1) as cache:
            get_user = users(cache, origin)
            await get_user("u1")
            await get_user("u1")
            assert len(near) == 1
            entry = cache._keys.entry("Users|pk=S:u1")
            victim = owner_index(cluster, client, entry)
            before = {(n.host, n.port) for n in client.get_primaries()}
            cluster.kill_node(victim)
            await wait_until(lambda: not near.usable)
            assert len(near) == 0 and engine(cache)["near_flushes"] >= 1
            await asyncio.to_thread(cluster.wait_ok, 60)
            await asyncio.wait_for(near.wait_ready(), 30)
            after = {(n.host, n.port) for n in client.get_primaries()}
            assert after != before and set(near._up) == after
            # Tracking works on the new master: a raw delete there drops the copy.
            await get_user("u1")
            await get_user("u1")
            await wait_until(lambda: len(near) == 1)
            await client.delete(entry)
            await wait_until(lambda: len(near) == 0)


# -- DynamoTable ---------------------------------------------------------------------------------


@pytest.mark.dynamodb
async def test_dynamo_table_reads_batches_and_writes(
    cache: Cache, near: NearCache, dynamodb_client: Any
) -> None:
    """``DynamoTable.cached()`` reads and batches hit memory; a write drops the copy before returning."""
    from test_dynamodb import create_users, raw_put

    from swr_cache import DynamoTable

    await create_users(dynamodb_client)
    await raw_put(dynamodb_client, "Users", {"pk": "u1", "name": "Ada"})
    await raw_put(dynamodb_client, "Users", {"pk": "u2", "name": "Bob"})
    view = DynamoTable(dynamodb_client, "Users").cached(cache)
    keys = [{"pk": "u1"}, {"pk": "u2"}]
    await settled(cache, view.get_item({"pk": "u1"}))  # filled
    await settled(cache, view.batch_get_item(keys))  # u1 read and installed, u2 filled
    await view.batch_get_item(keys)  # u1 from memory, u2 read and installed
    got = await view.batch_get_item(keys)  # both from memory
    assert got == [{"pk": "u1", "name": "Ada"}, {"pk": "u2", "name": "Bob"}]
    assert cache.stats()[view.name]["near_hits"] == 3 and len(near) == 2
    item = await view.get_item({"pk": "u1"})
    assert item == {"pk": "u1", "name": "Ada"} and cache.stats()[view.name]["near_hits"] == 4
    await view.put_item({"pk": "u1", "name": "Ada v2"})
    assert len(near) == 1  # dropped before put_item returned
    cache._engine.clock.clock.advance(2)  # type: ignore[attr-defined]  # past the write's fence
    again = await view.get_item({"pk": "u1"})
    assert again == {"pk": "u1", "name": "Ada v2"}


@pytest.mark.standalone_only(reason="fakeredis")
async def test_without_tracking_support_reads_still_work(
    origin: RecordingOrigin, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that refuses CLIENT TRACKING leaves the near cache bypassed; nothing fails."""
    import fakeredis

    client = fakeredis.FakeAsyncRedis()
    near = NearCache(max_reconnect_delay=0.05)
    c = Cache(client, namespace="t", early_refresh=0, near_cache=near)
    async with CacheHost(c) as cache:
        get_user = users(cache, origin)
        for _ in range(3):
            assert await get_user("u1") == origin.items["u1"]
        await wait_until(lambda: "near cache tracking" in caplog.text)  # tried, and said so
        assert not near.usable and len(near) == 0
        assert cache.stats()[get_user.name]["hits"] == 2 and origin.count == 1
    await client.aclose()


async def test_from_url_takes_a_near_cache(redis_url: str, origin: RecordingOrigin) -> None:
    """``Cache.from_url(..., near_cache=...)`` tracks on the client it builds (from_env passes it on)."""
    near = NearCache()
    async with CacheHost(Cache.from_url(redis_url, namespace="t", near_cache=near)) as cache:
        await asyncio.wait_for(near.wait_ready(), 10)
        get_user = users(cache, origin)
        await settled(cache, get_user("u1"))
        for _ in range(2):
            await get_user("u1")
        assert cache.stats()[get_user.name]["near_hits"] == 1 and len(near) == 1
    assert not near.usable and len(near) == 0  # emptied on exit


class _Req:
    """What the near cache reads of a request: its entry, fields and metrics."""

    def __init__(self, cache: Cache, entry: str) -> None:
        self.entry = entry
        self.fields: tuple[bytes, ...] | None = None
        self.metrics = cache.metrics.get("batch")


def _snap(hard_ms: float) -> _Snap:
    snap = _Snap()
    snap.hard = str(hard_ms).encode()
    return snap


async def test_batch_reads_keep_only_what_no_invalidation_overtook(
    cache: Cache, near: NearCache
) -> None:
    """A batch read installs each snapshot unless its entry was invalidated while the batch was in flight."""
    reqs = [_Req(cache, "t:e:{a}"), _Req(cache, "t:e:{b}"), _Req(cache, "t:e:{c}")]
    far = cache._engine.now_ms() + 60_000
    answered, gate = asyncio.Event(), asyncio.Event()

    async def read_many(asked: Any) -> list[Any]:
        answered.set()
        await gate.wait()
        return [_snap(far) for _ in asked]

    metrics = cache.metrics.get("batch")
    task = asyncio.create_task(near.read_many(read_many, reqs, metrics))
    await answered.wait()
    near.drop(["t:e:{b}"])  # b changes while the batch is in flight
    gate.set()
    got = await task
    assert got is not None and all(type(s) is _Snap for s in got)
    assert near.lookup("t:e:{a}", None) is got[0] and near.lookup("t:e:{c}", None) is got[2]
    assert near.lookup("t:e:{b}", None) is None
    assert metrics.counts["near_install_refusals"] == 1
    again = await near.read_many(read_many, reqs[:1] + reqs[2:], metrics)
    assert again == [got[0], got[2]] and metrics.counts["near_hits"] == 2
    assert near._inflight == {} and near._spoiled == {}


@pytest.mark.parametrize("protocol", [2, 3])
async def test_tracking_copies_the_clients_settings(
    redis_url: str, redis_client: Any, origin: RecordingOrigin, protocol: int
) -> None:
    """An ACL user's RESP2 or RESP3 client: the tracking connection logs in as that user, in RESP2."""
    await redis_client.acl_setuser(
        "near-user",
        enabled=True,
        passwords=["+s3cret"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    try:
        url = redis_url.replace("redis://", "redis://near-user:s3cret@")
        client = aioredis.Redis.from_url(url, protocol=protocol, socket_timeout=2)
        near = NearCache()
        async with tracking(client, near) as cache:
            trackers = [
                e for e in await redis_client.client_list() if e["name"] == "swr_cache-near"
            ]
            assert [(e["user"], e["resp"]) for e in trackers] == [("near-user", "2")]
            get_user = users(cache, origin)
            await get_user("u1")
            await get_user("u1")
            assert len(near) == 1
            await redis_client.delete(cache._keys.entry("Users|pk=S:u1"))
            await wait_until(lambda: len(near) == 0)
        await client.aclose()
    finally:
        await redis_client.acl_deluser("near-user")


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.standalone_only(reason="a private cluster with replicas")
async def test_cluster_replica_reads_track_replicas_too(origin: RecordingOrigin) -> None:
    """A client that reads from replicas: every replica is tracked as well as every master."""
    from redis.cluster import LoadBalancingStrategy
    from test_cluster import private_cluster

    async with private_cluster(
        {"load_balancing_strategy": LoadBalancingStrategy.RANDOM_REPLICA},
        masters=3,
        replicas=1,
    ) as (_, client):
        near = NearCache()
        async with tracking(client, near, namespace="rr") as cache:
            assert len(near._up) == 6
            get_user = users(cache, origin)
            await get_user("u1")  # filled on its master
            for _ in range(50):  # replicas may lag the fill: read until a copy is held
                await get_user("u1")
                if len(near):
                    break
            assert len(near) == 1
            await client.delete(cache._keys.entry("Users|pk=S:u1"))
            await wait_until(lambda: len(near) == 0)


async def test_stale_copies_in_two_caches_refresh_once(
    cache: Cache, near: NearCache, redis_client: Any, clock: FakeClock, origin: RecordingOrigin
) -> None:
    """Stale copies held by two caches (two processes' worth) still make one origin call: the lease."""
    near_b = NearCache(max_age=30.0)
    async with tracking(redis_client, near_b, soft_ttl=10, hard_ttl=100, clock=clock) as other:
        get_a, get_b = users(cache, origin), users(other, origin)
        await get_a("u1")  # filled; both hear of the fill, then install copies
        await wait_until(
            lambda: engine(cache)["near_invalidations"] == 1 == engine(other)["near_invalidations"]
        )
        for get in (get_a, get_b, get_a, get_b):
            await get("u1")
        assert len(near) == len(near_b) == 1 and origin.count == 1
        hits_before = [
            cache.stats()[get_a.name]["near_hits"],
            other.stats()[get_b.name]["near_hits"],
        ]
        clock.advance(11)
        origin.hold()
        stale_a = await get_a("u1")  # from memory, stale: A's refresh takes the lease
        await origin.entered.wait()
        stale_b = await get_b("u1")  # from memory, stale: B's refresh finds the lease taken
        await wait_until(lambda: not other._engine.refresher.refreshing)
        origin.release()
        await wait_until(lambda: not cache._engine.refresher.refreshing)
        assert stale_a == stale_b == origin.items["u1"]
        assert origin.count == 2
        for cc, get, before in ((cache, get_a, hits_before[0]), (other, get_b, hits_before[1])):
            stats = cc.stats()[get.name]
            assert stats["stale_hits"] == 1 and stats["near_hits"] == before + 1
