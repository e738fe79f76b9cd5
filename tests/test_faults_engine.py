"""Engine faults that must heal themselves: cancelled reads, failed refreshes, foreign
leases and fences, poisoned tag member sets, tag keys of the wrong type.

Each test injects one fault against a real redis-server (and, where marked
``on_cluster``, the 3-master cluster too) and checks that the key keeps
answering and that the repair is counted.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from helpers import users

from devtools.devservers import RedisServer
from swr_cache import Cache, StreamInvalidator, _autobatch, cached, item_tag
from swr_cache._keys import table_tag
from swr_cache._store import Store
from swr_cache.testing import CacheHost, FakeClock, RecordingOrigin

pytestmark = [pytest.mark.redis, pytest.mark.on_cluster]


@pytest.fixture
def origin() -> RecordingOrigin:
    return RecordingOrigin({f"u{i}": {"pk": f"u{i}", "name": f"user {i}"} for i in range(16)})


def assert_quiet(cache: Cache, slots: int) -> None:
    """Nothing is left registered in the engine once every caller is done."""
    assert cache._engine.reads == {}
    assert cache._engine.flights == {}
    assert cache._slots.free == slots
    assert not any(not f.done() for f in cache._slots.waiters)


# --- 1. a read cancelled while it waits for a Redis slot ------------------------------


async def test_read_cancelled_waiting_for_a_slot_does_not_wedge_its_key(
    redis_client: aioredis.Redis, clock: FakeClock, origin: RecordingOrigin
) -> None:
    """A first reader cancelled while every slot is busy hands the key on: its followers and later reads answer."""
    cache = Cache(redis_client, namespace="t", clock=clock, max_in_flight=1, early_refresh=0)
    async with CacheHost(cache):
        get_user = users(cache, origin)
        assert await get_user("u1") == origin.items["u1"]
        async with cache._slots.hold(1.0):  # every slot busy, as under a slow Redis
            leader = asyncio.create_task(get_user("u1"))
            await asyncio.sleep(0)  # the leader registers the read and waits for a slot
            followers = [asyncio.create_task(get_user("u1")) for _ in range(3)]
            await asyncio.sleep(0)
            leader.cancel()
            await asyncio.sleep(0)
        assert leader.cancelled()
        assert await asyncio.wait_for(asyncio.gather(*followers), 5) == [origin.items["u1"]] * 3
        assert await asyncio.wait_for(get_user("u1"), 5) == origin.items["u1"]
        assert_quiet(cache, 1)


@pytest.fixture
def debug_redis() -> Iterator[RedisServer]:
    """A private server that accepts DEBUG (to make it sleep)."""
    with RedisServer(extra_args=["--enable-debug-command", "yes"]) as server:
        yield server


@pytest.mark.standalone_only(reason="DEBUG SLEEP on a private server")
async def test_wait_for_timeout_during_debug_sleep_leaves_key_readable(
    debug_redis: RedisServer, origin: RecordingOrigin
) -> None:
    """The issue's reproduction: a pool of one, Redis asleep, the waiting reader times out; the key reads again."""
    cache = Cache.from_url(debug_redis.url, max_connections=1, socket_timeout=3.0)
    async with cache:
        get_user = users(cache, origin)
        assert await get_user("u1") == origin.items["u1"]
        sleeper = asyncio.create_task(
            asyncio.to_thread(debug_redis.command, "DEBUG", "SLEEP", "1", timeout=10)
        )
        await asyncio.sleep(0.1)
        blocked = asyncio.create_task(get_user("u2"))  # holds the only slot while Redis sleeps
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(get_user("u1"), 0.1)  # waiting for the slot
        await sleeper
        assert await blocked == origin.items["u2"]
        assert await asyncio.wait_for(get_user("u1"), 5) == origin.items["u1"]
        assert_quiet(cache, 1)


@pytest.mark.standalone_only(reason="a pool of 4 built by from_url on the standalone server")
async def test_cancellation_storm_leaves_every_key_answering(
    redis_url: str, origin: RecordingOrigin
) -> None:
    """1,200 random cancellations over 16 keys and a pool of 4: no wrong reply, every key answers, nothing left over."""
    await _storm(Cache.from_url(redis_url, max_connections=4), origin, slots=4)


async def test_cancellation_storm_on_any_backend(
    redis_client: aioredis.Redis, origin: RecordingOrigin
) -> None:
    """The storm again on the test's client (the cluster in its [cluster] run), four slots."""
    await _storm(Cache(redis_client, namespace="t", max_in_flight=4), origin, slots=4)


async def _storm(cache: Cache, origin: RecordingOrigin, slots: int) -> None:
    rng = random.Random(11)
    wrong: list[tuple[str, Any]] = []

    async with cache:
        get_user = users(cache, origin, soft_ttl=0.05, hard_ttl=0.2)

        async def one(key: str) -> None:
            got = await get_user(key)
            if got != origin.items[key]:
                wrong.append((key, got))

        for round_ in range(12):
            tasks = [asyncio.create_task(one(f"u{rng.randrange(16)}")) for _ in range(100 + round_)]
            for _ in range(rng.randrange(1, 4)):
                await asyncio.sleep(0)
            await asyncio.sleep(rng.random() * 0.003)
            for t in tasks:
                if rng.random() < 0.9:
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if round_ % 4 == 0:
                await cache.invalidate_item("Users", {"pk": f"u{rng.randrange(16)}"})
        answers = await asyncio.wait_for(
            asyncio.gather(*(get_user(f"u{i}") for i in range(16))), 10
        )
        assert answers == [origin.items[f"u{i}"] for i in range(16)]
        assert wrong == []
        assert cache._engine.reads == {}
        # Background refreshes (soft_ttl is 0.05 s) may still hold slots: let them end.
        for _ in range(500):
            if cache._slots.free == slots and not cache._engine.refresher.refreshing:
                break
            await asyncio.sleep(0.01)
        assert cache._slots.free == slots
        pool = getattr(cache.client, "connection_pool", None)
        if pool is not None and hasattr(pool, "_in_use_connections"):
            batcher = cache._engine.store.batcher
            kept = [] if batcher is None else batcher.standalone.idle
            assert len(pool._in_use_connections) == len(kept)  # the kept ones are clean:
            assert all(_autobatch._clean(conn) for conn in kept)
    if pool is not None and hasattr(pool, "_in_use_connections"):
        assert len(pool._in_use_connections) == 0  # given back when the cache closed


async def test_cache_closed_under_a_load_answers_its_callers(
    redis_client: aioredis.Redis, origin: RecordingOrigin
) -> None:
    """Callers of a load that the closing cache cut short get an error, never a hang."""
    cache = Cache(redis_client, namespace="t", drain_timeout=0.05)
    get_user = users(cache, origin)
    origin.hold()
    waiting: asyncio.Task[Any] | None = None
    async with cache:
        waiting = asyncio.create_task(get_user("u3"))
        await origin.entered.wait()
    origin.release()
    with pytest.raises(Exception, match="closed"):
        await asyncio.wait_for(waiting, 5)
    assert cache._engine.flights == {}


# --- 2. a failed background refresh -----------------------------------------------------


class FlakyOrigin(RecordingOrigin):
    """An origin that fails while ``failing`` is set."""

    failing = False

    async def get(self, key: Any, attributes: list[str] | None = None) -> dict[str, Any] | None:
        if self.failing:
            self.calls.append((key, attributes))
            raise RuntimeError("origin down")
        return await super().get(key, attributes)


async def refreshes_done(cache: Cache) -> None:
    while cache._engine.refresher.refreshing:
        await asyncio.sleep(0.005)


async def test_failed_refresh_backs_off_refreshes_only(
    redis_client: aioredis.Redis, clock: FakeClock
) -> None:
    """After a failed refresh, a foreground miss loads at once and stores; the first success ends the back-off."""
    origin = FlakyOrigin({"u1": {"pk": "u1", "name": "Ada"}})
    cache = Cache(
        redis_client, namespace="t", clock=clock, early_refresh=0, refresh_backoff=30, lease_ttl=2
    )
    async with CacheHost(cache):
        get_user = users(cache, origin, soft_ttl=1, hard_ttl=5)
        assert await get_user("u1") == {"pk": "u1", "name": "Ada"}
        origin.failing = True
        clock.advance(2)  # stale: the refresh fails and backs off
        assert await get_user("u1") == {"pk": "u1", "name": "Ada"}
        await refreshes_done(cache)
        stats = cache.stats()[get_user.name]
        assert stats["refresh_errors"] == 1
        assert not await redis_client.exists(cache._keys.lease("Users|pk=S:u1"))
        # Backed off: more stale hits start no refresh.
        calls = origin.count
        for _ in range(5):
            await get_user("u1")
        await refreshes_done(cache)
        assert origin.count == calls
        # Past the hard deadline the origin is back: a foreground miss loads at once
        # (no lease to wait for) and its fill is stored and ends the back-off.
        origin.failing = False
        clock.advance(5)
        assert await get_user("u1") == {"pk": "u1", "name": "Ada"}
        stats = cache.stats()[get_user.name]
        assert stats["lease_waits"] == 0
        calls = origin.count
        assert await get_user("u1") == {"pk": "u1", "name": "Ada"}
        assert origin.count == calls  # stored: a hit
        assert not await redis_client.exists(cache._keys.backoff("Users|pk=S:u1"))
        # The back-off is over: the next stale hit refreshes again.
        clock.advance(2)
        await get_user("u1")
        await refreshes_done(cache)
        assert origin.count == calls + 1
        assert cache.stats()[get_user.name]["refreshes"] == 2


async def test_back_off_is_shared_across_processes(
    redis_client: aioredis.Redis, clock: FakeClock
) -> None:
    """A refresh that failed in one process backs off the other's refreshes, not its reads."""
    origin = FlakyOrigin({"u1": {"pk": "u1", "name": "Ada"}})
    kw: dict[str, Any] = {"namespace": "t", "clock": clock, "early_refresh": 0}
    one = Cache(redis_client, refresh_backoff=30, **kw)
    two = Cache(redis_client, refresh_backoff=30, **kw)
    async with CacheHost(one), CacheHost(two):
        get_one = users(one, origin, soft_ttl=1, hard_ttl=50)
        get_two = users(two, origin, soft_ttl=1, hard_ttl=50)
        await get_one("u1")
        origin.failing = True
        clock.advance(2)
        await get_one("u1")
        await refreshes_done(one)
        calls = origin.count
        await get_two("u1")  # stale in the other process too: its refresh is skipped
        await refreshes_done(two)
        assert origin.count == calls
        assert two.stats()[get_two.name]["refresh_errors"] == 0
        # It remembers the back-off for a while: more stale hits do not ask Redis again.
        assert "Users|pk=S:u1" in next(iter(two._engine.refresher.backoff))
        refreshes = two.stats()[get_two.name]["refreshes"]
        for _ in range(3):
            await get_two("u1")
        await refreshes_done(two)
        assert two.stats()[get_two.name]["refreshes"] == refreshes


# --- 3. lease and fence keys nobody holds ------------------------------------------------

LEASE = "Users|pk=S:u1"


async def plant_lease(client: aioredis.Redis, key: str, kind: str) -> None:
    if kind == "no_ttl":
        await client.set(key, b"someone")
    elif kind == "too_long":
        await client.set(key, b"someone", px=3_600_000)
    elif kind == "hash":
        await client.hset(key, mapping={b"x": b"1"})
    else:
        await client.rpush(key, b"x")


@pytest.mark.parametrize("kind", ["no_ttl", "too_long", "hash", "list"])
async def test_lease_nobody_holds_is_replaced(
    redis_client: aioredis.Redis, clock: FakeClock, origin: RecordingOrigin, kind: str
) -> None:
    """A lease key without a TTL, longer than any lease, or of another type is taken over (counted): the item is cached again at once."""
    cache = Cache(redis_client, namespace="t", clock=clock, early_refresh=0, lease_wait=5)
    async with CacheHost(cache):
        get_user = users(cache, origin)
        await plant_lease(redis_client, cache._keys.lease(LEASE), kind)
        assert await asyncio.wait_for(get_user("u1"), 2) == origin.items["u1"]
        assert await get_user("u1") == origin.items["u1"]
        assert origin.count == 1  # stored, then a hit
        stats = cache.stats()[get_user.name]
        assert stats["leases_repaired"] == 1
        assert stats["lease_waits"] == 0
        assert not await redis_client.exists(cache._keys.lease(LEASE))


async def test_lease_held_by_a_live_holder_is_respected(
    redis_client: aioredis.Redis, clock: FakeClock, origin: RecordingOrigin
) -> None:
    """A lease with a TTL within the lease time is someone's load: it is waited for, not taken."""
    cache = Cache(redis_client, namespace="t", clock=clock, lease_ttl=5, lease_wait=0.2)
    async with CacheHost(cache):
        get_user = users(cache, origin)
        await redis_client.set(cache._keys.lease(LEASE), b"someone", px=4000)
        assert await get_user("u1") == origin.items["u1"]
        stats = cache.stats()[get_user.name]
        assert stats["leases_repaired"] == 0
        assert stats["lease_waits"] == 1
        assert await redis_client.get(cache._keys.lease(LEASE)) == b"someone"


async def test_fence_without_ttl_is_removed_and_the_fill_stored(
    redis_client: aioredis.Redis, clock: FakeClock, origin: RecordingOrigin
) -> None:
    """A fence key with no TTL would refuse every fill for good: it is deleted (counted) and the fill lands."""
    cache = Cache(redis_client, namespace="t", clock=clock, early_refresh=0)
    async with CacheHost(cache):
        get_user = users(cache, origin)
        await redis_client.set(cache._keys.fence(LEASE), b"1")
        assert await get_user("u1") == origin.items["u1"]
        assert await get_user("u1") == origin.items["u1"]
        assert origin.count == 1
        assert cache.stats()[get_user.name]["fences_repaired"] == 1
        assert not await redis_client.exists(cache._keys.fence(LEASE))
        # A real fence (with its TTL) still refuses fills.
        await cache.invalidate_item("Users", {"pk": "u1"})
        await get_user("u1")
        await get_user("u1")
        assert origin.count == 3


# --- 4. poisoned tag member sets, 5. tag keys of the wrong type -----------------------


def orders(cache: Cache, origin: RecordingOrigin) -> Any:
    @cached(
        cache,
        key="orders:{customer}",
        tags=lambda customer: [item_tag("Orders", {"customer": customer}), "all-orders"],
    )
    async def list_orders(customer: str) -> list[str]:
        origin.calls.append((customer, None))
        return [f"{customer}-{len(origin.calls)}"]

    return list_orders


POISON = [b"\xff\xfe not utf-8", b"other:e:{Users|pk=S:u1}", b"t:e:{no-closing-brace", b""]


async def test_poisoned_tag_members_are_dropped_and_valid_ones_purged(
    redis_client: aioredis.Redis, clock: FakeClock, origin: RecordingOrigin
) -> None:
    """Undecodable or foreign members of a tag's set are skipped and removed (counted); every valid member is purged."""
    cache = Cache(redis_client, namespace="t", clock=clock, early_refresh=0)
    async with CacheHost(cache):
        list_orders = orders(cache, origin)
        first = {c: await list_orders(c) for c in ("a", "b")}
        members = cache._keys.tag_members("all-orders")
        await redis_client.sadd(members, *[p for p in POISON if p])
        await cache.purge_tags(["all-orders"])
        assert {c: await list_orders(c) for c in ("a", "b")} != first  # both reloaded
        assert cache.stats()["swr_cache"]["tag_members_dropped"] == len([p for p in POISON if p])
        assert not set(await redis_client.smembers(members)) & set(POISON)
        # invalidate_item purges the item's tags the same way.
        await redis_client.sadd(
            cache._keys.tag_members(item_tag("Orders", {"customer": "a"})), POISON[0]
        )
        before = await list_orders("a")
        await cache.invalidate_item("Orders", {"customer": "a"})
        assert await list_orders("a") != before


async def test_tag_keys_of_the_wrong_type_are_repaired(
    redis_client: aioredis.Redis, clock: FakeClock, origin: RecordingOrigin
) -> None:
    """A tag's stamp or member key of another type is replaced (counted) instead of failing every purge and fill."""
    cache = Cache(redis_client, namespace="t", clock=clock, early_refresh=0)
    async with CacheHost(cache):
        list_orders = orders(cache, origin)
        gen = cache._keys.tag_gen("all-orders")
        members = cache._keys.tag_members("all-orders")
        await redis_client.hset(gen, mapping={b"x": b"1"})
        await redis_client.rpush(members, b"x")
        # A fill with the tag: repairs both keys; raced once (the stamp is unknown), then stored.
        await list_orders("a")
        clock.advance(1)
        first = await list_orders("a")
        assert await list_orders("a") == first
        assert cache.stats()["swr_cache"]["tag_keys_repaired"] == 2
        # Purges work again, however often the keys break.
        for broken in ("hash", "junk"):
            await redis_client.delete(gen)
            if broken == "hash":
                await redis_client.hset(gen, mapping={b"x": b"1"})
            else:
                await redis_client.set(gen, b"junk")
            await redis_client.delete(members)
            await redis_client.rpush(members, b"x")
            await cache.purge_tags(["all-orders"])
        assert cache.stats()["swr_cache"]["tag_keys_repaired"] == 6
        before = await list_orders("b")
        await cache.purge_tags(["all-orders"])
        assert await list_orders("b") != before


async def test_stream_record_with_a_poisoned_tag_is_not_retried(
    redis_client: aioredis.Redis, clock: FakeClock
) -> None:
    """A stream record whose item's tags hold poisoned members applies (no batchItemFailures, so no endless Lambda retries)."""
    cache = Cache(redis_client, namespace="t", clock=clock, early_refresh=0)
    async with CacheHost(cache):
        for tag in (table_tag("Users"), item_tag("Users", {"pk": "u1"})):
            await redis_client.sadd(cache._keys.tag_members(tag), POISON[0], POISON[1])
        await redis_client.hset(cache._keys.tag_gen(table_tag("Users")), mapping={b"x": b"1"})
        event = {
            "Records": [
                {
                    "eventID": "e1",
                    "eventName": "MODIFY",
                    "eventSource": "aws:dynamodb",
                    "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/Users/stream/2024-01-01T00:00:00.000",
                    "dynamodb": {"Keys": {"pk": {"S": "u1"}}, "SequenceNumber": "100"},
                }
            ]
        }
        report = await StreamInvalidator(cache).handle(event)
        assert report.batch_item_failures() == {"batchItemFailures": []}
        assert report.applied == 1
        assert cache.stats()["swr_cache"]["tag_members_dropped"] == 4


# --- cancellation at each await of the read path ------------------------------------------


@pytest.mark.parametrize("who", ["leader", "follower"])
@pytest.mark.parametrize("where", ["redis_read", "load"])
async def test_cancellation_at_each_await_of_the_read_path(
    redis_client: aioredis.Redis,
    clock: FakeClock,
    origin: RecordingOrigin,
    monkeypatch: pytest.MonkeyPatch,
    who: str,
    where: str,
) -> None:
    """Cancelling the first or a later caller mid Redis read or mid load leaves the others answered and nothing registered."""
    cache = Cache(redis_client, namespace="t", clock=clock, early_refresh=0)
    async with CacheHost(cache):
        get_user = users(cache, origin)
        if where == "redis_read":
            await get_user("u1")  # cached: the read path ends at the Redis read
            entered, gate = asyncio.Event(), asyncio.Event()
            real = Store.read_entry

            async def held_read(self: Store, key: str, fields: Any) -> Any:
                entered.set()
                await gate.wait()
                return await real(self, key, fields)

            monkeypatch.setattr(Store, "read_entry", held_read)
        else:
            origin.hold()
            entered = origin.entered
        tasks = [asyncio.create_task(get_user("u1")) for _ in range(4)]
        await entered.wait()
        victim = tasks[0] if who == "leader" else tasks[2]
        victim.cancel()
        await asyncio.sleep(0)
        if where == "redis_read":
            monkeypatch.setattr(Store, "read_entry", real)
            gate.set()
        else:
            origin.release()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        assert victim.cancelled()
        assert [r for t, r in zip(tasks, results, strict=True) if t is not victim] == [
            origin.items["u1"]
        ] * 3
        assert await get_user("u1") == origin.items["u1"]
        assert_quiet(cache, cache._slots.free)
        assert origin.count == 1
