"""``CachedItemFunction.many``: one pipelined read, one batch-loader call for the misses."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from swr_cache import Cache, ConfigError, cached_item
from swr_cache.testing import CacheHost, FakeClock, RecordingOrigin

pytestmark = [pytest.mark.redis, pytest.mark.on_cluster]

KEYS = [f"u{i}" for i in range(10)]


@pytest.fixture
def origin() -> RecordingOrigin:
    return RecordingOrigin({k: {"pk": k, "name": k.upper()} for k in KEYS})


class BatchOrigin:
    """A batch loader over ``origin.items`` that records each call's keys and can be held."""

    def __init__(self, origin: RecordingOrigin) -> None:
        self.origin = origin
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def __call__(self, keys: list[str]) -> dict[str, dict[str, Any] | None]:
        self.calls.append(list(keys))
        self.entered.set()
        await self.gate.wait()
        return {k: dict(self.origin.items[k]) for k in keys if k in self.origin.items}

    def loaded(self) -> list[str]:
        return [k for call in self.calls for k in call]


def accessor(cache: Cache, origin: RecordingOrigin) -> Any:
    @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
    async def get_user(user_id: str) -> dict[str, Any] | None:
        return await origin.get(user_id)

    return get_user


async def test_one_loader_call_for_the_misses_hits_not_reloaded(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """Cached keys are served from Redis; the batch loader is called once, with the misses only."""
    get_user = accessor(cache, origin)
    for k in KEYS[:4]:
        await get_user(k)
    load = BatchOrigin(origin)
    got = await get_user.many(KEYS, load=load)
    assert got == {k: origin.items[k] for k in KEYS}
    assert list(got) == KEYS
    assert len(load.calls) == 1 and sorted(load.calls[0]) == sorted(KEYS[4:])
    assert origin.count == 4  # the single calls above, nothing more
    again = await get_user.many(KEYS, load=load)
    assert again == got and len(load.calls) == 1
    # What many() stored, single calls read (and vice versa).
    assert await get_user("u9") == origin.items["u9"] and origin.count == 4
    stats = cache.stats()[get_user.name]
    assert stats["fills"] == 10 and stats["loads"] == 10


async def test_missing_items_become_negative_entries(cache: Cache, origin: RecordingOrigin) -> None:
    """A key the loader leaves out is ``None`` and cached as not found."""
    get_user = accessor(cache, origin)
    load = BatchOrigin(origin)
    got = await get_user.many(["u1", "ghost", "u1"], load=load)
    assert got == {"u1": origin.items["u1"], "ghost": None}
    assert load.calls == [["u1", "ghost"]]
    assert await get_user.many(["ghost"], load=load) == {"ghost": None}
    assert await get_user("ghost") is None
    assert len(load.calls) == 1 and origin.count == 0


async def test_two_caches_batch_loading_overlapping_keys_load_each_key_once(
    redis_client: Any, clock: FakeClock, origin: RecordingOrigin
) -> None:
    """Leases hold across processes: overlapping batches never load a key twice."""
    a = Cache(redis_client, namespace="t", clock=clock, early_refresh=0)
    b = Cache(redis_client, namespace="t", clock=clock, early_refresh=0)
    async with CacheHost(a), CacheHost(b):
        get_a, get_b = accessor(a, origin), accessor(b, origin)
        load_a, load_b = BatchOrigin(origin), BatchOrigin(origin)
        load_a.gate.clear()
        first = asyncio.create_task(get_a.many(KEYS[:6], load=load_a))
        await load_a.entered.wait()  # a holds the leases of u0..u5
        second = asyncio.create_task(get_b.many(KEYS[3:], load=load_b))
        await load_b.entered.wait()  # b loads only what nobody holds
        load_a.gate.set()
        got_a, got_b = await first, await second
        assert got_a == {k: origin.items[k] for k in KEYS[:6]}
        assert got_b == {k: origin.items[k] for k in KEYS[3:]}
        assert sorted(load_b.loaded()) == sorted(KEYS[6:])
        every = load_a.loaded() + load_b.loaded() + [k for k, _ in origin.calls]
        assert sorted(every) == sorted(KEYS)


async def test_stale_items_are_served_and_refreshed_by_the_accessor(
    cache: Cache, origin: RecordingOrigin, clock: FakeClock
) -> None:
    """Stale entries answer at once; their refresh runs in the background through the single accessor."""
    get_user = accessor(cache, origin)
    load = BatchOrigin(origin)
    await get_user.many(KEYS[:3], load=load)
    origin.items["u0"]["name"] = "changed"
    clock.advance(11)  # past soft_ttl (10 s), before hard_ttl
    got = await get_user.many(KEYS[:3], load=load)
    assert got["u0"] == {"pk": "u0", "name": "U0"}  # the stale value
    assert len(load.calls) == 1
    for _ in range(500):
        if origin.count >= 3:
            break
        await asyncio.sleep(0.01)
    assert sorted(k for k, _ in origin.calls) == ["u0", "u1", "u2"]
    assert cache.stats()[get_user.name]["stale_hits"] == 3


@dataclass
class User:
    pk: str
    name: str


async def test_typed_accessor_rebuilds_models(cache: Cache, origin: RecordingOrigin) -> None:
    """An accessor returning a dataclass gets dataclasses from many(), hits and loads alike."""

    @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
    async def get_user(user_id: str) -> User | None:
        item = await origin.get(user_id)
        return None if item is None else User(**item)

    async def load(ids: list[str]) -> dict[str, User | None]:
        return {i: User(**origin.items[i]) for i in ids if i in origin.items}

    await get_user("u0")
    got = await get_user.many(["u0", "u1", "nope"], load=load)
    assert got == {"u0": User("u0", "U0"), "u1": User("u1", "U1"), "nope": None}
    assert await get_user.many(["u1"], load=load) == {"u1": User("u1", "U1")}


async def test_many_needs_one_key_argument(cache: Cache) -> None:
    @cached_item(cache, table="Users", key=lambda tenant, user_id: {"pk": f"{tenant}#{user_id}"})
    async def get_user(tenant: str, user_id: str) -> dict[str, Any] | None:
        return None

    async def load(keys: list[str]) -> dict[str, dict[str, Any] | None]:
        return {}

    with pytest.raises(ConfigError, match="one key argument"):
        await get_user.many(["a"], load=load)


class RequestCounter:
    """Counts the requests an accessor builds (``_request``): many() builds them only where needed."""

    def __init__(self, fn: Any) -> None:
        self.count = 0
        self._request = fn._request
        fn._request = self

    def __call__(self, *args: Any) -> Any:
        self.count += 1
        return self._request(*args)


async def test_fresh_items_build_no_request(cache: Cache, origin: RecordingOrigin) -> None:
    """Fresh whole entries are answered from the pipeline's replies alone; misses still load once."""
    get_user = accessor(cache, origin)
    load = BatchOrigin(origin)
    await get_user.many(KEYS[:6], load=load)
    requests = RequestCounter(get_user)
    got = await get_user.many(KEYS, load=load)
    assert got == {k: origin.items[k] for k in KEYS}
    assert requests.count == 4  # u6..u9, the misses
    assert load.calls[1] == KEYS[6:]
    stats = cache.stats()[get_user.name]
    assert stats["hits"] == 6 and stats["misses"] == 10
    requests.count = 0
    assert await get_user.many(KEYS, load=load) == got
    assert requests.count == 0 and len(load.calls) == 2
    assert cache.stats()[get_user.name]["hits"] == 16


async def test_unusual_entries_take_the_full_steps(
    cache: Cache, origin: RecordingOrigin, redis_client: Any
) -> None:
    """Negative, partial and corrupt entries are judged and counted, loaded and replaced by whole ones."""
    from swr_cache._engine_api import engine_of

    get_user = accessor(cache, origin)
    load = BatchOrigin(origin)
    await get_user.many(["u0", "u1", "u2", "ghost"], load=load)
    keys = engine_of(cache).keys
    u1 = keys.entry("Users|pk=S:u1")
    u2 = keys.entry("Users|pk=S:u2")
    await redis_client.set(u1, b"3|garbage")  # a header that does not parse
    await redis_client.delete(u2)
    await redis_client.hset(u2, mapping={b"\xfff": b"3", b"name": b"\xa2U2"})  # a partial entry
    requests = RequestCounter(get_user)
    got = await get_user.many(["u0", "u1", "u2", "ghost"], load=load)
    assert got == {
        "u0": origin.items["u0"],
        "u1": origin.items["u1"],
        "u2": origin.items["u2"],
        "ghost": None,
    }
    assert requests.count == 3  # u1, u2 and ghost: u0 is a fresh hit
    assert sorted(load.calls[1]) == ["u1", "u2"]
    stats = cache.stats()[get_user.name]
    assert stats["decode_errors"] == 1 and stats["negative_hits"] == 1
    # (On one node the batch reads with MGET, where a hash reads as absent: a miss.)
    assert stats["partial_misses"] + stats["misses"] == 4 + 2
    for key in (u1, u2):
        assert await redis_client.type(key) == b"string"  # replaced by whole entries


async def test_early_refresh_from_a_batch(redis_client: Any, origin: RecordingOrigin) -> None:
    """XFetch runs for fresh batch hits too: a due entry is refreshed once, by the single accessor."""
    cache = Cache(redis_client, namespace="t", soft_ttl=10, hard_ttl=100, early_refresh=1e9)
    async with CacheHost(cache):
        get_user = accessor(cache, origin)
        load = BatchOrigin(origin)
        load.gate.clear()
        first = asyncio.create_task(get_user.many(["u0"], load=load))
        await load.entered.wait()
        await asyncio.sleep(0.02)  # a load time of 20 ms or more: the entry's delta
        load.gate.set()
        await first
        got = await get_user.many(["u0"], load=load)
        assert got == {"u0": origin.items["u0"]}
        stats = cache.stats()[get_user.name]
        assert stats["hits"] == 1 and stats["early_refreshes"] == 1
        for _ in range(500):
            if origin.count >= 1 and not cache._engine.refresher.refreshing:
                break
            await asyncio.sleep(0.01)
        assert origin.count == 1 and len(load.calls) == 1
