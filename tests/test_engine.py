"""The engine against a real redis-server: states, single flight, leases, fences, faults."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis
from helpers import entry_field, users

from swr_cache import Cache, CacheNotEnteredError, ConfigError, cached, cached_item, item_tag
from swr_cache._store import M_ENTRY
from swr_cache.testing import FakeClock, RecordingOrigin

pytestmark = [pytest.mark.redis, pytest.mark.on_cluster]


@pytest.fixture
def origin() -> RecordingOrigin:
    return RecordingOrigin(
        {
            "u1": {"pk": "u1", "name": "Ada", "age": Decimal("36"), "tags": {"a", "b"}},
            "u2": {"pk": "u2", "name": "Bob"},
        }
    )


async def wait_until(predicate: Any, limit: float = 5.0) -> None:
    """Poll a condition the code under test drives (never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.002)


async def test_miss_then_hit(cache: Cache, origin: RecordingOrigin) -> None:
    """A second read is served from Redis without calling the origin."""
    get_user = users(cache, origin)
    first = await get_user("u1")
    second = await get_user("u1")
    assert first == second == origin.items["u1"]
    assert origin.count == 1
    stats = cache.stats()[get_user.name]
    assert stats["misses"] == 1 and stats["hits"] == 1 and stats["fills"] == 1


async def test_each_caller_gets_its_own_object(cache: Cache, origin: RecordingOrigin) -> None:
    """Mutating a returned item never changes what the next caller sees."""
    get_user = users(cache, origin)
    origin.hold()
    a, b = asyncio.create_task(get_user("u1")), asyncio.create_task(get_user("u1"))
    await origin.entered.wait()
    origin.release()
    ra, rb = await a, await b
    assert ra == rb and ra is not rb
    ra["name"] = "changed"
    hit1, hit2 = await asyncio.gather(get_user("u1"), get_user("u1"))
    assert hit1 is not hit2 and hit1["name"] == "Ada"


async def test_500_concurrent_cold_callers_one_origin_call(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """500 concurrent misses of one key share one load."""
    get_user = users(cache, origin)
    origin.hold()
    tasks = [asyncio.create_task(get_user("u1")) for _ in range(500)]
    await origin.entered.wait()
    origin.release()
    results = await asyncio.gather(*tasks)
    assert origin.count == 1
    assert all(r == origin.items["u1"] for r in results)


async def test_stale_served_while_origin_blocked_one_refresh(
    cache: Cache, origin: RecordingOrigin, clock: FakeClock
) -> None:
    """Past the soft TTL the old value is served at once and exactly one refresh runs."""
    get_user = users(cache, origin)
    await get_user("u1")
    origin.items["u1"]["name"] = "Ada v2"
    clock.advance(11)  # stale: soft 10 < age < hard 100
    origin.hold()
    results = await asyncio.gather(*(get_user("u1") for _ in range(50)))
    assert all(r["name"] == "Ada" for r in results)  # served stale, not blocked
    await origin.entered.wait()
    assert origin.count == 2  # one refresh for 50 stale hits
    peeked = await get_user.peek("u1")
    assert peeked is not None and peeked[1] == "stale"
    origin.release()
    await wait_until(lambda: cache.stats()[get_user.name]["fills"] == 2)
    assert (await get_user("u1"))["name"] == "Ada v2"
    assert origin.count == 2
    assert cache.stats()[get_user.name]["stale_hits"] == 50


async def test_hard_expired_loads_in_foreground(
    cache: Cache, origin: RecordingOrigin, clock: FakeClock
) -> None:
    """Past the hard TTL the entry is absent: the caller waits for a fresh load."""
    get_user = users(cache, origin)
    await get_user("u1")
    origin.items["u1"]["name"] = "Ada v2"
    clock.advance(101)
    assert (await get_user("u1"))["name"] == "Ada v2"
    assert origin.count == 2
    assert cache.stats()[get_user.name]["misses"] == 2


async def test_invalidate_during_load_never_stores_old_value(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """A load that read the old item before a write cannot write it back after the invalidation."""
    get_user = users(cache, origin)
    origin.hold()
    task = asyncio.create_task(get_user("u1"))
    await origin.entered.wait()  # the load has read... (it returns the old item below)
    old = dict(origin.items["u1"])
    origin.items["u1"]["name"] = "written"  # the write lands in the table
    await cache.invalidate_item("Users", {"pk": "u1"})  # and invalidates
    origin.items["u1"] = old  # the in-flight load still returns what it read before the write
    origin.release()
    # Its lease was taken: the caller gets a second load, begun after the
    # invalidation (which this origin still answers with the old item).
    assert (await task)["name"] == "Ada"
    assert await get_user.peek("u1") is None  # neither was stored (the second is fenced)
    stats = cache.stats()[get_user.name]
    assert stats["fills_rejected"] == 2 and stats["reloads_after_invalidation"] == 1
    assert origin.count == 2
    origin.items["u1"]["name"] = "written"
    assert (await get_user("u1"))["name"] == "written"


async def test_fence_refuses_fills_just_after_invalidation(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """A load started just after an invalidation (maybe an eventually consistent read) is served, not stored."""
    get_user = users(cache, origin)
    await cache.invalidate_item("Users", {"pk": "u1"})
    assert (await get_user("u1"))["name"] == "Ada"
    assert await get_user.peek("u1") is None
    assert cache.stats()[get_user.name]["fills_rejected"] == 1


async def test_consistent_reads_skip_the_fence(cache: Cache, origin: RecordingOrigin) -> None:
    """A strongly consistent accessor's load after an invalidation is stored at once; an in-flight one is still refused."""
    get_user = users(cache, origin, consistent_reads=True)
    await cache.invalidate_item("Users", {"pk": "u1"})
    assert (await get_user("u1"))["name"] == "Ada"
    assert await get_user.peek("u1") is not None
    origin.hold()
    task = asyncio.create_task(get_user.refresh("u1"))
    await origin.entered.wait()
    await cache.invalidate_item("Users", {"pk": "u1"})  # the lease goes with it
    origin.release()
    await task
    stats = cache.stats()[get_user.name]
    # The overtaken load was refused; the one after the invalidation, a
    # consistent read, was stored.
    assert stats["fills_rejected"] == 1 and stats["reloads_after_invalidation"] == 1
    assert await get_user.peek("u1") is not None


async def test_cancelled_caller_does_not_cancel_the_load(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """Cancelling the caller that started a load leaves the others their value."""
    get_user = users(cache, origin)
    origin.hold()
    first = asyncio.create_task(get_user("u1"))
    await origin.entered.wait()
    others = [asyncio.create_task(get_user("u1")) for _ in range(10)]
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    origin.release()
    assert all(r["name"] == "Ada" for r in await asyncio.gather(*others))
    assert origin.count == 1
    assert await get_user.peek("u1") is not None


async def test_partial_fill_loads_the_union_and_remembers_absent_ones(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """A projection missing attributes loads them with the cached ones (one version), and remembers absent ones."""
    get_user = users(cache, origin)
    assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
    assert origin.calls[-1] == ("u1", ["name"])
    assert await get_user("u1", attributes=["name", "age", "nickname"]) == {
        "name": "Ada",
        "age": Decimal("36"),
    }
    assert origin.calls[-1] == ("u1", ["age", "name", "nickname"])
    # Everything asked is now cached or known absent.
    assert await get_user("u1", attributes=["nickname", "age"]) == {"age": Decimal("36")}
    assert await get_user("u1", attributes=["nickname"]) == {}
    assert origin.count == 2
    # A whole read after partial ones loads the whole item once.
    assert await get_user("u1") == origin.items["u1"]
    assert origin.calls[-1] == ("u1", None)
    assert await get_user("u1", attributes=["tags"]) == {"tags": {"a", "b"}}
    assert origin.count == 3


async def test_partial_fill_with_a_version_attribute_loads_only_missing_attributes(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """With a version attribute, a projection loads only the attributes not yet cached (and the version), and merges them."""
    origin.items["u1"]["version"] = Decimal(1)
    get_user = users(cache, origin, version_attribute="version")
    assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
    assert await get_user("u1", attributes=["name", "age", "nickname"]) == {
        "name": "Ada",
        "age": Decimal("36"),
    }
    assert origin.calls[-1] == ("u1", ["age", "nickname", "version"])
    assert await get_user("u1", attributes=["nickname", "age", "name"]) == {
        "name": "Ada",
        "age": Decimal("36"),
    }
    assert origin.count == 2


async def test_projection_of_whole_entry_makes_no_call(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """A projection read of a whole cached item is answered by HMGET alone; nested paths use their top-level attribute."""
    get_user = users(cache, origin)
    await get_user("u1")
    assert await get_user("u1", attributes=["name", "missing"]) == {"name": "Ada"}
    assert await get_user("u1", attributes=["tags[0]"]) == {"tags": {"a", "b"}}
    assert origin.count == 1


async def test_stale_partial_entry_reloads_union(
    cache: Cache, origin: RecordingOrigin, clock: FakeClock
) -> None:
    """A stale partial entry missing an attribute loads cached + requested attributes and replaces the hash."""
    get_user = users(cache, origin)
    await get_user("u1", attributes=["name"])
    clock.advance(11)
    origin.items["u1"]["name"] = "Ada v2"
    assert await get_user("u1", attributes=["age"]) == {"age": Decimal("36")}
    assert origin.calls[-1] == ("u1", ["age", "name"])
    # No mixed versions: the name was reloaded with the age.
    assert await get_user("u1", attributes=["name", "age"]) == {
        "name": "Ada v2",
        "age": Decimal("36"),
    }
    assert origin.count == 2


async def test_not_found_is_cached_for_negative_ttl(
    cache: Cache, origin: RecordingOrigin, clock: FakeClock
) -> None:
    """``None`` from the origin is cached (negative hit) until the negative TTL ends."""
    get_user = users(cache, origin, negative_ttl=5)
    assert await get_user("nobody") is None
    assert await get_user("nobody") is None
    assert await get_user("nobody", attributes=["name"]) is None
    assert origin.count == 1
    assert cache.stats()[get_user.name]["negative_hits"] == 2
    origin.items["nobody"] = {"pk": "nobody", "name": "Now here"}
    clock.advance(6)
    assert (await get_user("nobody"))["name"] == "Now here"


async def test_dynamodb_types_round_trip(cache: Cache) -> None:
    """Every DynamoDB type comes back exactly as it went in."""
    import datetime as dt
    import uuid

    item = {
        "pk": "x",
        "n": Decimal("1.10"),
        "big": Decimal("123456789012345678901234567890.123"),
        "b": b"\x00\xff",
        "ss": {"a", "b"},
        "ns": {Decimal("1"), Decimal("2.5")},
        "bs": {b"x", b"y"},
        "m": {"nested": [Decimal("1"), None, True, {"deep": "yes"}]},
        "l": [],
        "bool": False,
        "null": None,
        "when": dt.datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=dt.UTC),
        "day": dt.date(2026, 11, 22),
        "id": uuid.UUID(int=7),
    }

    @cached_item(cache, table="T", key=lambda k: {"pk": k})
    async def get(k: str) -> dict[str, Any] | None:
        return dict(item)

    await get("x")
    assert await get("x") == item
    assert (await get.peek("x")) == (item, "fresh")


async def test_corrupt_field_is_a_counted_miss(
    cache: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    """Undecodable bytes in an entry are a counted miss, reloaded and overwritten."""
    get_user = users(cache, origin)
    await get_user("u1")
    entry = cache._keys.entry("Users|pk=S:u1")
    raw = await entry_field(redis_client, entry, M_ENTRY)
    assert raw is not None
    header = raw.split(b"|", 7)[:7]
    await redis_client.set(entry, b"|".join([*header, b"\xc1\xc1garbage"]))
    assert (await get_user("u1"))["name"] == "Ada"
    assert cache.stats()[get_user.name]["decode_errors"] == 1
    assert origin.count == 2
    assert (await get_user("u1"))["name"] == "Ada"  # overwritten: a plain hit now
    assert origin.count == 2


async def test_wrongtype_key_is_a_counted_miss(
    cache: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    """A key of ours holding another Redis type is a counted miss, then overwritten."""
    get_user = users(cache, origin)
    entry = cache._keys.entry("Users|pk=S:u1")
    await redis_client.rpush(entry, b"not a string or a hash")
    assert (await get_user("u1"))["name"] == "Ada"
    assert (await get_user("u1", attributes=["name"])) == {"name": "Ada"}
    assert await redis_client.type(entry) == b"string"  # a whole entry replaced it
    assert cache.stats()[get_user.name]["decode_errors"] >= 1
    # A string that is no entry (no header) is a counted miss too (unsigned, where signed).
    await redis_client.set(entry, b"not an entry")
    assert (await get_user("u1"))["name"] == "Ada"
    stats = cache.stats()[get_user.name]
    assert stats["decode_errors"] + stats["bad_signatures"] >= 2
    assert (await redis_client.get(entry) or b"").startswith(b"3|")


async def test_other_format_version_is_a_miss(
    cache: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    """An entry written in another format version is not decoded."""
    get_user = users(cache, origin)
    await get_user("u1")
    entry = cache._keys.entry("Users|pk=S:u1")
    raw = await entry_field(redis_client, entry, M_ENTRY)
    assert raw is not None and raw.startswith(b"3|")
    await redis_client.set(entry, b"999" + raw[1:])
    await get_user("u1")
    assert origin.count == 2


async def test_namespaces_are_isolated(
    redis_client: aioredis.Redis, origin: RecordingOrigin
) -> None:
    """Two namespaces on one Redis never see each other's entries."""
    a, b = Cache(redis_client, namespace="a"), Cache(redis_client, namespace="a:b")
    async with a, b:
        get_a, get_b = users(a, origin), users(b, origin)
        await get_a("u1")
        await get_b("u1")
        assert origin.count == 2
        await get_a.invalidate("u1")
        assert await get_b.peek("u1") is not None


async def test_invalidate_refresh_peek(cache: Cache, origin: RecordingOrigin) -> None:
    """``invalidate`` drops the entry, ``refresh`` reloads and stores it, ``peek`` never loads."""
    get_user = users(cache, origin)
    assert await get_user.peek("u1") is None
    await get_user("u1")
    assert await get_user.peek("u1") == (origin.items["u1"], "fresh")
    await get_user.invalidate("u1")
    assert await get_user.peek("u1") is None
    origin.items["u1"]["name"] = "Refreshed"
    assert (await get_user.refresh("u1"))["name"] == "Refreshed"
    peeked = await get_user.peek("u1")
    assert peeked is not None and peeked[0]["name"] == "Refreshed"
    assert origin.count == 2


async def test_number_keys_are_normalised(cache: Cache) -> None:
    """``10``, ``Decimal("10.0")`` and ``Decimal("1E+1")`` name one item; ``"10"`` another."""
    calls: list[object] = []

    @cached_item(cache, table="Nums", key=lambda n: {"id": n})
    async def get(n: object) -> dict[str, Any] | None:
        calls.append(n)
        return {"id": n}

    await get(10)
    await get(Decimal("10.0"))
    await get(Decimal("1E+1"))
    assert len(calls) == 1
    await get("10")
    assert len(calls) == 2


async def test_origin_error_in_foreground_propagates(cache: Cache, origin: RecordingOrigin) -> None:
    """An origin error on a miss reaches the caller unchanged and is counted."""
    get_user = users(cache, origin)
    origin.error = RuntimeError("throttled")
    with pytest.raises(RuntimeError, match="throttled"):
        await get_user("u1")
    assert cache.stats()[get_user.name]["load_errors"] == 1
    origin.error = None
    assert (await get_user("u1"))["name"] == "Ada"


async def test_refresh_error_keeps_stale_and_backs_off(
    cache: Cache, origin: RecordingOrigin, clock: FakeClock
) -> None:
    """A failing background refresh keeps serving the stale value and does not retry at once."""
    get_user = users(cache, origin)
    await get_user("u1")
    clock.advance(11)
    origin.error = RuntimeError("origin down")
    assert (await get_user("u1"))["name"] == "Ada"
    await wait_until(lambda: cache.stats()[get_user.name]["refresh_errors"] == 1)
    for _ in range(20):
        assert (await get_user("u1"))["name"] == "Ada"
    assert origin.count == 2  # backed off: no retry storm
    assert cache.stats()[get_user.name]["refresh_errors"] == 1


async def test_lease_holder_elsewhere_waiter_gets_fill(
    redis_client: aioredis.Redis, origin: RecordingOrigin
) -> None:
    """Two caches (two 'processes') on one Redis: the second waits for the first's fill."""
    a = Cache(redis_client, namespace="s")
    b = Cache(redis_client, namespace="s")
    async with a, b:
        get_a, get_b = users(a, origin), users(b, origin)
        origin.hold()
        ta = asyncio.create_task(get_a("u1"))
        await origin.entered.wait()
        tb = asyncio.create_task(get_b("u1"))
        await wait_until(lambda: b.stats()[get_b.name]["lease_waits"] == 1)
        origin.release()
        assert (await ta) == (await tb)
        assert origin.count == 1


async def test_dead_lease_holder_is_taken_over(
    redis_client: aioredis.Redis, origin: RecordingOrigin
) -> None:
    """A lease left by a crashed process expires and a waiter loads."""
    c = Cache(redis_client, namespace="d", lease_ttl=0.2)
    async with c:
        get_user = users(c, origin)
        await redis_client.set(c._keys.lease("Users|pk=S:u1"), b"dead-process", px=200)
        assert (await get_user("u1"))["name"] == "Ada"
        s = c.stats()[get_user.name]
        assert s["lease_waits"] == 1 and s["lease_takeovers"] == 1
        assert await get_user.peek("u1") is not None


async def test_lease_is_renewed_during_long_load(
    redis_client: aioredis.Redis, origin: RecordingOrigin
) -> None:
    """A load longer than the lease TTL keeps its lease (renewed) and still fills."""
    # (Renewed every third of the TTL: 0.6 s leaves room for a loaded machine,
    # where 0.15 s let a late renewal lose the lease now and then.)
    c = Cache(redis_client, namespace="r", lease_ttl=0.6)
    async with c:
        get_user = users(c, origin)
        origin.hold()
        task = asyncio.create_task(get_user("u1"))
        await origin.entered.wait()
        lease = c._keys.lease("Users|pk=S:u1")
        deadline = time.monotonic() + 1.8
        while time.monotonic() < deadline:  # the lease would have expired three times over
            assert await redis_client.exists(lease)
            await asyncio.sleep(0.05)
        origin.release()
        await task
        assert c.stats()[get_user.name]["fills"] == 1
        assert not await redis_client.exists(lease)


async def test_not_entered_raises_clear_error(
    redis_client: aioredis.Redis, origin: RecordingOrigin
) -> None:
    """Using a decorated function before ``async with cache`` says what to do."""
    c = Cache(redis_client)
    get_user = users(c, origin)
    with pytest.raises(CacheNotEnteredError, match="async with cache"):
        await get_user("u1")


def test_config_is_validated(redis_client: aioredis.Redis) -> None:
    """Nonsense TTLs and decoding clients are refused with ConfigError."""
    with pytest.raises(ConfigError):
        Cache(redis_client, soft_ttl=10, hard_ttl=5)
    with pytest.raises(ConfigError):
        Cache(redis_client, soft_ttl=0)
    with pytest.raises(ConfigError):
        Cache(redis_client, jitter=1.5)
    with pytest.raises(ConfigError, match="decode_responses"):
        Cache(aioredis.Redis(decode_responses=True))


async def test_cached_results_and_tags(cache: Cache) -> None:
    """``@cached`` stores any result under an escaped template key; a tag purge drops it."""
    calls: list[str] = []

    @cached(
        cache,
        key="orders:{customer_id}",
        tags=lambda customer_id: [item_tag("Orders", {"customer_id": customer_id})],
    )
    async def list_orders(customer_id: str) -> list[dict[str, Any]]:
        calls.append(customer_id)
        return [{"id": Decimal(len(calls))}]

    assert await list_orders("c:1") == [{"id": Decimal(1)}]
    assert await list_orders("c:1") == [{"id": Decimal(1)}]
    assert await list_orders("c{2}") == [{"id": Decimal(2)}]
    assert calls == ["c:1", "c{2}"]
    await cache.purge_tags([item_tag("Orders", {"customer_id": "c:1"})])
    assert await list_orders.peek("c:1") is None
    assert await list_orders.peek("c{2}") is not None
    assert await list_orders("c:1") == [{"id": Decimal(3)}]


async def test_item_invalidation_purges_tagged_results(cache: Cache) -> None:
    """Invalidating an item also drops results tagged with that item."""
    n = 0

    @cached(cache, tags=lambda order_id: [item_tag("Orders", {"id": order_id})])
    async def summary(order_id: str) -> str:
        nonlocal n
        n += 1
        return f"summary {n}"

    assert await summary("o1") == "summary 1"
    await cache.invalidate_item("Orders", {"id": "o1"})
    assert await summary("o1") == "summary 2"


async def test_purge_during_load_removes_the_fill(cache: Cache) -> None:
    """A tag purged while a tagged result loads never leaves that result behind."""
    gate = asyncio.Event()
    entered = asyncio.Event()
    n = 0

    @cached(cache, key="r:{x}", tags=["T"])
    async def slow(x: str) -> int:
        nonlocal n
        n += 1
        entered.set()
        await gate.wait()
        return n

    task = asyncio.create_task(slow("a"))
    await entered.wait()
    await cache.purge_tags(["T"])
    gate.set()
    # The first fill is taken back. The caller may have started after the
    # change the purge announced: it gets a load begun after the purge, and
    # that one is stored.
    assert await task == 2
    assert await slow.peek("a") == (2, "fresh")
    stats = cache.stats()[slow.name]
    assert stats["tag_races"] + stats["fills_rejected"] == 1
    assert stats["reloads_after_invalidation"] == 1


async def test_methods_bind_without_self(cache: Cache, origin: RecordingOrigin) -> None:
    """A decorated method's key is built without ``self``; instances share entries."""

    class Repo:
        def __init__(self, o: RecordingOrigin) -> None:
            self.o = o

        @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
        async def get(
            self, user_id: str, *, attributes: list[str] | None = None
        ) -> dict[str, Any] | None:
            return await self.o.get(user_id, attributes)

    r1, r2 = Repo(origin), Repo(origin)
    assert (await r1.get("u1"))["name"] == "Ada"
    assert (await r2.get("u1"))["name"] == "Ada"
    assert (await r2.get("u1", attributes=["name"])) == {"name": "Ada"}
    assert origin.count == 1
    await r1.get.invalidate("u1")
    assert await r2.get.peek("u1") is None


async def test_keyword_and_default_arguments_share_a_key(cache: Cache) -> None:
    """``f("a")``, ``f(user_id="a")`` and ``f("a", "eu")`` (the default) are one entry."""
    calls = 0

    @cached_item(cache, table="Users", key=lambda user_id, region: {"pk": f"{region}#{user_id}"})
    async def get(user_id: str, region: str = "eu") -> dict[str, Any] | None:
        nonlocal calls
        calls += 1
        return {"pk": user_id}

    await get("a")
    await get(user_id="a")
    await get("a", "eu")
    await get("a", region="eu")
    assert calls == 1
    await get("a", "us")
    assert calls == 2


async def test_early_refresh_runs_before_soft_ttl(
    redis_client: aioredis.Redis, origin: RecordingOrigin
) -> None:
    """XFetch: a hit just before the soft deadline refreshes in the background."""
    clock = FakeClock()
    c = Cache(
        redis_client, namespace="x", soft_ttl=10, hard_ttl=100, clock=clock, early_refresh=1e9
    )
    async with c:
        get_user = users(c, origin)
        await get_user("u1")
        clock.advance(9.9)  # still fresh, but with a huge beta the refresh is certain
        assert (await get_user("u1"))["name"] == "Ada"
        await wait_until(lambda: c.stats()[get_user.name]["fills"] == 2)
        assert c.stats()[get_user.name]["early_refreshes"] >= 1


async def test_refresh_queue_bound_drops_refreshes(
    redis_client: aioredis.Redis, origin: RecordingOrigin
) -> None:
    """With the refresh queue full, stale hits still answer and the extra refreshes are counted as dropped."""
    clock = FakeClock()
    c = Cache(
        redis_client,
        namespace="q",
        soft_ttl=1,
        hard_ttl=100,
        clock=clock,
        max_pending_refreshes=1,
        early_refresh=0,
    )
    async with c:
        get_user = users(c, origin)
        await get_user("u1")
        await get_user("u2")
        clock.advance(2)
        origin.hold()
        assert (await get_user("u1"))["name"] == "Ada"
        assert (await get_user("u2"))["name"] == "Bob"
        assert c.stats()[get_user.name]["refreshes_dropped"] == 1
        origin.release()


async def test_thousand_concurrent_distinct_keys_on_small_pool(redis_url: str) -> None:
    """1000 concurrent callers of distinct keys never fail on pool size, even on a 10-connection client."""
    client = aioredis.Redis.from_url(redis_url, max_connections=10)
    c = Cache(client, namespace="p")
    try:
        async with c:

            @cached_item(c, table="T", key=lambda k: {"pk": k})
            async def get(k: str) -> dict[str, Any] | None:
                return {"pk": k}

            results = await asyncio.gather(*(get(f"k{i}") for i in range(1000)))
            assert [r["pk"] for r in results] == [f"k{i}" for i in range(1000)]
            results = await asyncio.gather(*(get(f"k{i}") for i in range(1000)))
            assert len(results) == 1000
    finally:
        await client.aclose()


async def test_from_url_and_from_env(redis_url: str) -> None:
    """``from_url``/``from_env`` build an owned client with a waiting pool, closed on exit."""
    c = Cache.from_env(
        {"SWR_CACHE_REDIS_URL": redis_url, "SWR_CACHE_NAMESPACE": "env", "SWR_CACHE_SOFT_TTL": "3"}
    )
    assert c.namespace == "env" and c.policy.soft_ttl == 3
    async with c:

        @cached(c, key="k")
        async def f() -> int:
            return 1

        assert await asyncio.gather(*(f() for _ in range(300))) == [1] * 300
    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    c2 = Cache.from_env({"REDIS_HOST": host, "REDIS_PORT": port, "REDIS_DB": "1"})
    async with c2:
        assert await c2.client.ping()
    with pytest.raises(ConfigError):
        Cache.from_env({"REDIS_PORT": "x"})


async def test_four_processes_one_origin_call(redis_url: str, redis_client: aioredis.Redis) -> None:
    """4 OS processes x 50 concurrent cold callers of one key make exactly one origin call."""
    import json
    import pathlib
    import sys

    worker = pathlib.Path(__file__).parent / "workers" / "stampede.py"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(worker),
            redis_url,
            "mp",
            "50",
            "200",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(4)
    ]
    outputs = [await p.communicate() for p in procs]
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err.decode()
    reports = [json.loads(out) for out, _ in outputs]
    assert sum(r["ok"] for r in reports) == 200
    assert int(await redis_client.get("test:origin_calls")) == 1
    assert sum(r["loads"] for r in reports) == 1


async def test_hostile_keys_stay_apart(cache: Cache) -> None:
    """Keys full of separators, braces, percent signs, unicode, empties and 2 KB strings never collide."""
    hostile = ["a:b", "a%3Ab", "{x}", "}{", "a|b=c,d", "", " ", "é", "\n", "k" * 2048, "%", "%25"]
    seen: list[str] = []

    @cached_item(cache, table="T{1}", key=lambda k: {"pk": k})
    async def get(k: str) -> dict[str, Any] | None:
        seen.append(k)
        return {"pk": k}

    for k in hostile:
        assert (await get(k))["pk"] == k
    for k in hostile:
        assert (await get(k))["pk"] == k
    assert seen == hostile


async def test_callable_key_may_hold_braces(cache: Cache) -> None:
    """A ``key=`` callable's string is escaped: braces cannot split an entry from its lease."""
    n = 0

    @cached(cache, key=lambda a: f"{{{a}}}:x")
    async def f(a: str) -> int:
        nonlocal n
        n += 1
        return n

    assert await f("p") == 1
    assert await f("p") == 1
    assert await f("q") == 2


async def test_oversized_entries_are_served_not_stored(redis_client: aioredis.Redis) -> None:
    """A value above ``max_entry_bytes`` is returned but not stored, and counted."""
    c = Cache(redis_client, namespace="big", max_entry_bytes=1000)
    async with c:
        calls = 0

        @cached_item(c, table="T", key=lambda k: {"pk": k})
        async def get(k: str) -> dict[str, Any] | None:
            nonlocal calls
            calls += 1
            return {"pk": k, "blob": "x" * 5000}

        assert len((await get("a"))["blob"]) == 5000
        await get("a")
        assert calls == 2
        assert c.stats()[get.name]["fills_skipped_too_large"] == 2


async def test_fill_wrapper_controls_storing_ttl_and_tags(cache: Cache, clock: FakeClock) -> None:
    """A loader returning ``Fill`` can skip storing, set per-fill TTLs and add tags known after loading."""
    from swr_cache._engine import Fill
    from swr_cache._policy import Policy

    calls = 0

    @cached(cache, key="f:{mode}")
    async def f(mode: str) -> Any:
        nonlocal calls
        calls += 1
        if mode == "nostore":
            return Fill("v", store=False)
        return Fill("v", policy=Policy(soft_ttl=1, hard_ttl=2), tags=["late-tag"])

    assert await f("nostore") == "v"
    assert await f("nostore") == "v"
    assert calls == 2
    assert await f("short") == "v"
    assert await f("tagged") == "v"
    assert await f.peek("short") == ("v", "fresh")
    clock.advance(1.5)
    assert await f.peek("short") == ("v", "stale")
    clock.advance(1)
    assert await f.peek("short") is None
    assert await f.peek("tagged") is None  # hard TTL 2 s from the Fill's policy
    await f("tagged")
    await cache.purge_tags(["late-tag"])
    assert await f.peek("tagged") is None


async def test_jitter_shortens_soft_ttl_within_bounds(redis_client: aioredis.Redis) -> None:
    """With jitter, each fill's soft deadline lies between (1 - jitter) x soft_ttl and soft_ttl."""
    clock = FakeClock()
    c = Cache(
        redis_client,
        namespace="j",
        soft_ttl=100,
        hard_ttl=1000,
        jitter=0.5,
        clock=clock,
        early_refresh=0,
    )
    async with c:

        @cached(c, key="k:{i}")
        async def f(i: int) -> int:
            return i

        for i in range(20):
            await f(i)
        clock.advance(49)
        assert [await f.peek(i) for i in range(20)] == [(i, "fresh") for i in range(20)]
        clock.advance(52)
        assert [await f.peek(i) for i in range(20)] == [(i, "stale") for i in range(20)]


async def test_exit_releases_held_leases(
    redis_client: aioredis.Redis, origin: RecordingOrigin
) -> None:
    """Leaving the cache while a load holds a lease releases the lease (no one waits for a dead holder)."""
    c = Cache(redis_client, namespace="x1", drain_timeout=0.05)
    get_user = users(c, origin)
    origin.hold()
    async with c:
        task = asyncio.create_task(get_user("u1"))
        await origin.entered.wait()
        assert await redis_client.exists(c._keys.lease("Users|pk=S:u1"))
    # The caller was not cancelled itself: it is told the cache closed under its load.
    with pytest.raises(CacheNotEnteredError, match="closed"):
        await task
    assert not await redis_client.exists(c._keys.lease("Users|pk=S:u1"))
    origin.release()


async def test_unusual_signatures_bind_like_inspect(cache: Cache) -> None:
    """Keyword-only, positional-only, *args and **kwargs parameters bind as ``signature.bind`` would."""
    seen: list[tuple[Any, ...]] = []

    @cached(cache)
    async def f(a: str, /, b: int = 1, *rest: int, c: str = "x", **extra: str) -> str:
        seen.append((a, b, rest, c, extra))
        return f"{a}{b}{rest}{c}{extra}"

    first = await f("a")
    assert await f("a", 1) == first
    assert await f("a", b=1, c="x") == first
    assert len(seen) == 1
    await f("a", 1, 2, 3)
    await f("a", 1, 2, 3, c="y", z="q")
    assert await f("a", 1, 2, 3, z="q", c="y") == "a1(2, 3)y{'z': 'q'}"
    assert len(seen) == 3

    @cached_item(cache, table="K", key=lambda pk, *, region: {"pk": f"{region}#{pk}"})
    async def g(
        pk: str, *, region: str, attributes: list[str] | None = None
    ) -> dict[str, Any] | None:
        return {"pk": pk, "region": region}

    assert (await g("p", region="eu"))["region"] == "eu"
    assert await g("p", region="eu", attributes=["region"]) == {"region": "eu"}
    assert (await g("p", region="us"))["region"] == "us"


async def test_default_key_refuses_unencodable_arguments(cache: Cache) -> None:
    """Without ``key=``, an argument that has no stable encoding raises KeyEncodingError."""
    from swr_cache import KeyEncodingError

    @cached(cache)
    async def f(x: object) -> int:
        return 1

    with pytest.raises(KeyEncodingError):
        await f(object())
    assert await f(("a", 1, None, True)) == 1


async def test_compression_above_threshold_round_trips(redis_client: aioredis.Redis) -> None:
    """Values over ``compress_threshold`` are stored compressed and read back exactly; a corrupt one is a counted miss."""
    c = Cache(redis_client, namespace="z", compress_threshold=100)
    async with c:
        calls = 0

        @cached_item(c, table="T", key=lambda k: {"pk": k})
        async def get(k: str, *, attributes: list[str] | None = None) -> dict[str, Any] | None:
            nonlocal calls
            calls += 1
            item = {"pk": k, "text": "abc" * 1000, "n": Decimal("1.5")}
            return item if attributes is None else {a: item[a] for a in attributes if a in item}

        first = await get("a")
        assert await get("a") == first
        assert await get("a", attributes=["text"]) == {"text": "abc" * 1000}
        assert calls == 1
        entry = c._keys.entry("T|pk=S:a")
        stored = await entry_field(redis_client, entry, M_ENTRY)  # header, compressed blob
        assert stored is not None and len(stored) < 200
        await redis_client.set(entry, stored[:-5])  # truncated compressed bytes
        assert (await get("a"))["text"] == "abc" * 1000
        assert c.stats()[get.name]["decode_errors"] == 1
        assert calls == 2


async def test_invalidate_item_purges_partition_and_table_results(cache: Cache) -> None:
    """A hand-written writer's invalidate_item reaches results tagged with the item's partition or table."""
    from swr_cache.dynamodb import table_tag

    loads: list[str] = []

    @cached(
        cache, key="orders:{customer}", tags=lambda customer: [item_tag("Orders", {"c": customer})]
    )
    async def orders(customer: str) -> list[str]:
        loads.append("orders:" + customer)
        return [customer]

    @cached(cache, key="all-orders", tags=[table_tag("Orders")])
    async def all_orders() -> int:
        loads.append("all")
        return len(loads)

    @cached(cache, key="other", tags=[table_tag("Other")])
    async def other() -> int:
        loads.append("other")
        return 0

    for _ in range(2):
        await orders("c1"), await orders("c2"), await all_orders(), await other()
    assert len(loads) == 4
    await cache.invalidate_item("Orders", {"c": "c1", "id": 7})
    await orders("c1"), await orders("c2"), await all_orders(), await other()
    assert loads[4:] == ["orders:c1", "all"]  # c2's partition and the other table stay cached


async def _projected_then_changed(
    cache: Cache, origin: RecordingOrigin, **kw: Any
) -> tuple[Any, Any]:
    """Cache {name, version} of u1, then change the item in the table without telling the cache."""
    origin.items["u1"]["version"] = Decimal(1)
    get_user = users(cache, origin, **kw)
    await get_user("u1", attributes=["name"])
    origin.items["u1"].update(name="Ada v2", age=Decimal(37), version=Decimal(2))
    got = await get_user("u1", attributes=["name", "age"])  # merges "age" into a fresh entry
    return get_user, got


async def test_without_a_version_attribute_partial_entries_are_replaced_not_merged(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """Nothing proves a cached attribute is of the version a merge would load: the union is loaded at once, so an answer never joins two versions."""
    _get_user, got = await _projected_then_changed(cache, origin)
    assert got == {"name": "Ada v2", "age": Decimal(37)}
    assert [attrs for _key, attrs in origin.calls] == [["name"], ["age", "name"]]


async def test_version_attribute_refuses_to_merge_into_another_version(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """With version_attribute, a merge finding another version drops the entry and answers from one load."""
    get_user, got = await _projected_then_changed(cache, origin, version_attribute="version")
    assert got == {"name": "Ada v2", "age": Decimal(37)}
    assert [attrs for _key, attrs in origin.calls] == [
        ["name", "version"],  # the first projection carries the version
        ["age", "version"],  # the merge loads only what is missing (and the version)
        ["age", "name", "version"],  # versions differ: one consistent load
    ]
    stats = cache.stats()[get_user.name]
    assert stats["merges_outdated"] == 1 and stats["reloads_after_invalidation"] == 1
    assert await get_user("u1", attributes=["age", "name"]) == {
        "name": "Ada v2",
        "age": Decimal(37),
    }
    assert origin.count == 3  # the replacement was stored


async def test_version_attribute_still_merges_the_same_version(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """An unchanged item merges as before: one load of the missing attribute."""
    origin.items["u1"]["version"] = Decimal(1)
    get_user = users(cache, origin, version_attribute="version")
    await get_user("u1", attributes=["name"])
    assert await get_user("u1", attributes=["name", "age"]) == {"name": "Ada", "age": Decimal(36)}
    assert await get_user("u1", attributes=["age", "name"]) == {"name": "Ada", "age": Decimal(36)}
    assert origin.count == 2
    assert cache.stats()[get_user.name]["merges_outdated"] == 0
