"""More faults: Redis stopped mid-load or put to sleep, slow/failing/throttled origins, a
lease holder killed, and cancellation at every await of the load path.

(``test_faults.py`` has Redis unreachable, killed mid-traffic, paused, and a pool
exhausted by the application.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from helpers import users

from devtools.devservers import RedisServer
from swr_cache import Cache, CacheNotEnteredError, cached, cached_item
from swr_cache._entry import expand
from swr_cache._store import M_FORMAT, M_HARD, M_SOFT, M_VERSION, M_WHOLE, Store
from swr_cache.testing import CacheHost, FakeClock, RecordingOrigin

pytestmark = pytest.mark.redis

ITEM = {"pk": "u1", "name": "Ada", "age": Decimal(36)}


@pytest.fixture
def origin() -> RecordingOrigin:
    return RecordingOrigin(
        {f"u{i}": {"pk": f"u{i}", "name": f"user {i}"} for i in range(20)} | {"u1": ITEM}
    )


async def until(predicate: Callable[[], Awaitable[bool]], limit: float = 10.0) -> None:
    """Poll a condition the code under test drives (never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + limit
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def timed(call: Awaitable[Any], latencies: list[float]) -> Any:
    t0 = time.monotonic()
    try:
        return await call
    finally:
        latencies.append(time.monotonic() - t0)


# --- Redis stopped or asleep ------------------------------------------------------------


async def test_redis_stopped_mid_load(
    restartable_redis: RedisServer, origin: RecordingOrigin
) -> None:
    """Redis stops while a load holds its lease: no call fails, few calls pay a timeout, and it recovers after a restart."""
    cache = Cache.from_url(
        restartable_redis.url, socket_timeout=0.2, socket_connect_timeout=0.2, breaker_cooldown=0.2
    )
    async with cache:
        get_user = users(cache, origin)
        origin.hold()
        first = [asyncio.create_task(get_user("u1")) for _ in range(50)]
        await origin.entered.wait()  # the load holds the lease and is reading the origin
        restartable_redis.stop()
        origin.release()
        assert all(r == ITEM for r in await asyncio.gather(*first))
        latencies: list[float] = []
        for _ in range(5):
            results = await asyncio.gather(
                *(timed(get_user(f"u{i}"), latencies) for i in range(20))
            )
            assert results == [origin.items[f"u{i}"] for i in range(20)]
        stats = cache.stats()[get_user.name]
        # The breaker bounds how many calls wait for a dead Redis: the reads in flight
        # when it opened and a probe per cool-down, not one per call (150 here).
        assert stats["redis_errors"] <= 20 + 10
        assert stats["redis_errors"] + stats["bypasses"] >= 100
        assert max(latencies) < 5.0  # no call hangs on the dead server
        await restartable_redis.start_async()

        async def hits_again() -> bool:
            before = cache.stats()[get_user.name]["hits"]
            await get_user("u1")
            return bool(cache.stats()[get_user.name]["hits"] > before)

        await until(hits_again)
        assert not cache.breaker.is_open


def connections_received(server: RedisServer) -> int:
    info = server.command("INFO", "stats")
    assert isinstance(info, bytes)
    return int(info.split(b"total_connections_received:")[1].split(b"\r\n")[0])


@pytest.fixture
def debug_redis() -> Iterator[RedisServer]:
    """A private server that accepts DEBUG (to make it sleep)."""
    with RedisServer(extra_args=["--enable-debug-command", "yes"]) as server:
        yield server


async def test_redis_asleep_times_out_bypasses_without_pile_up(
    debug_redis: RedisServer, origin: RecordingOrigin
) -> None:
    """While Redis is blocked in DEBUG SLEEP, reads time out and bypass; loads stay coalesced and few calls touch Redis."""
    cache = Cache.from_url(
        debug_redis.url, socket_timeout=0.1, breaker_cooldown=0.2, max_connections=16
    )
    async with cache:
        get_user = users(cache, origin)
        for i in range(10):
            await get_user(f"u{i}")
        connections_before = connections_received(debug_redis)
        sleeper = asyncio.create_task(
            asyncio.to_thread(debug_redis.command, "DEBUG", "SLEEP", "5", timeout=15)
        )

        async def asleep() -> bool:
            return not await asyncio.to_thread(debug_redis.ping, 0.05)

        await until(asleep)
        before = origin.count
        waves = 0
        # Waves of 100 callers while Redis sleeps (a loaded machine may fit fewer in).
        while waves < 10 and not sleeper.done():
            results = await asyncio.gather(*(get_user(f"u{i % 10}") for i in range(100)))
            assert results == [origin.items[f"u{i % 10}"] for i in range(100)]
            waves += 1
        assert waves >= 3, "Redis woke up before three waves ended: the test proved nothing"
        # Coalesced: about one origin call per key per wave, never one per caller (100
        # a wave). One extra call in a run was seen once on a loaded machine (a
        # caller reaching the origin after its wave's load had finished), so each
        # key may have one more over the whole run.
        assert origin.count - before <= 10 * waves + 10
        stats = cache.stats()[get_user.name]
        assert stats["bypasses"] >= 90 * (waves - 1)
        # One read per key (coalesced) timed out before the breaker opened, then a probe per cool-down.
        assert stats["redis_errors"] <= 10 + 10
        await sleeper
        # No pile-up of connections either: the pool is bounded and the breaker kept calls away.
        assert connections_received(debug_redis) - connections_before <= 16 + 10

        async def hits_again() -> bool:
            before = cache.stats()[get_user.name]["hits"]
            await get_user("u1")
            return bool(cache.stats()[get_user.name]["hits"] > before)

        await until(hits_again)


# --- the origin: slow, failing, throttled -------------------------------------------------


async def test_slow_origin_one_call_per_process(
    redis_client: aioredis.Redis, origin: RecordingOrigin
) -> None:
    """A slow origin: 100 callers in each of two 'processes' make one call per process, never one per caller."""
    a = Cache(redis_client, namespace="slow", lease_ttl=0.3, lease_wait=0.1)
    b = Cache(redis_client, namespace="slow", lease_ttl=0.3, lease_wait=0.1)
    async with a, b:
        get_a, get_b = users(a, origin), users(b, origin)
        origin.hold()
        in_a = [asyncio.create_task(get_a("u1")) for _ in range(100)]
        await origin.entered.wait()
        origin.entered.clear()
        in_b = [asyncio.create_task(get_b("u1")) for _ in range(100)]
        await origin.entered.wait()  # b stopped waiting for a's lease and called the origin itself
        assert origin.count == 2
        assert await redis_client.exists(a._keys.lease("Users|pk=S:u1"))  # renewed past its TTL
        origin.release()
        assert all(r == ITEM for r in await asyncio.gather(*in_a, *in_b))
        assert b.stats()[get_b.name]["lease_waits"] == 1
        assert await get_b.peek("u1") == (
            ITEM,
            "fresh",
        )  # a's fill landed; b's answer was not stored
        assert origin.count == 2


class Throttled(Exception):
    """Stands in for botocore's ProvisionedThroughputExceededException."""


async def test_failing_and_throttled_origin(
    redis_client: aioredis.Redis, origin: RecordingOrigin
) -> None:
    """Foreground: one origin call per key raises to every coalesced caller. Background: stale keeps serving, backed off in every process."""
    clock = FakeClock()
    a = Cache(redis_client, namespace="thr", soft_ttl=1, hard_ttl=100, clock=clock, early_refresh=0)
    b = Cache(redis_client, namespace="thr", soft_ttl=1, hard_ttl=100, clock=clock, early_refresh=0)
    async with a, b:
        get_a, get_b = users(a, origin), users(b, origin)
        origin.error = Throttled("rate exceeded")
        origin.hold()
        callers = [asyncio.create_task(get_a("u1")) for _ in range(100)]
        await origin.entered.wait()
        origin.release()
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
        assert all(isinstance(o, Throttled) for o in outcomes)
        assert origin.count == 1
        assert not await redis_client.exists(
            a._keys.lease("Users|pk=S:u1")
        )  # released: the next call may retry
        origin.error = None
        assert await get_a("u1") == ITEM
        clock.advance(2)  # stale
        origin.error = Throttled("rate exceeded")
        calls = origin.count
        for _ in range(50):
            assert await get_a("u1") == ITEM

        async def refresh_failed() -> bool:
            return bool(a.stats()[get_a.name]["refresh_errors"] == 1)

        await until(refresh_failed)
        # The failed refresh holds the lease for its back-off: process b does not retry either.
        for _ in range(50):
            assert await get_b("u1") == ITEM
        assert origin.count == calls + 1
        assert b.stats()[get_b.name]["stale_hits"] == 50 and b.stats()[get_b.name]["loads"] == 0


# --- a lease holder killed ---------------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from swr_cache import Cache, cached_item

    async def main() -> None:
        cache = Cache.from_url(sys.argv[1], namespace="killed", lease_ttl=float(sys.argv[2]))
        async with cache:
            @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
            async def get_user(user_id):
                print("loading", flush=True)
                await asyncio.Event().wait()  # the origin never answers

            await get_user("u1")

    asyncio.run(main())
    """
)


async def test_process_killed_holding_a_lease(
    redis_url: str, redis_client: aioredis.Redis, origin: RecordingOrigin, tmp_path: Path
) -> None:
    """A process SIGKILLed while loading leaves its lease; another process waits for it to expire, then loads and fills."""
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), redis_url, "0.5",
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"loading\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    cache = Cache(redis_client, namespace="killed", lease_ttl=0.5, lease_wait=5.0)
    lease = cache._keys.lease("Users|pk=S:u1")
    assert await redis_client.exists(lease)  # the dead process's lease is still there
    async with cache:
        get_user = users(cache, origin)
        assert await get_user("u1") == ITEM
        stats = cache.stats()[get_user.name]
        assert stats["lease_waits"] == 1 and stats["lease_takeovers"] == 1
        assert origin.count == 1
        assert await get_user.peek("u1") == (ITEM, "fresh")


# --- cancellation at every await of the load path ------------------------------------------------


class GateStore(Store):
    """A Store whose calls pass a numbered gate before and after each Redis call.

    The gate numbered ``stop_at`` blocks until the test has cancelled something
    and opened it again: every await of the load path can be the one a
    cancellation lands on.
    """

    def __init__(self, client: Any, stop_at: int) -> None:
        super().__init__(client)
        self.points: list[str] = []
        self.stop_at = stop_at
        self.reached = asyncio.Event()
        self.go = asyncio.Event()

    async def gate(self, name: str) -> None:
        self.points.append(name)
        if len(self.points) - 1 == self.stop_at:
            self.reached.set()
            await self.go.wait()

    def _gated(name: str) -> Any:  # type: ignore[misc]
        async def call(self: GateStore, *args: Any, **kwargs: Any) -> Any:
            await self.gate(f"{name}:before")
            result = await getattr(Store, name)(self, *args, **kwargs)
            await self.gate(f"{name}:after")
            return result

        return call

    read_entry = _gated("read_entry")
    acquire_and_read = _gated("acquire_and_read")
    renew_lease = _gated("renew_lease")
    release_lease = _gated("release_lease")
    fill = _gated("fill")
    merge = _gated("merge")
    add_tag_members = _gated("add_tag_members")
    tag_generations = _gated("tag_generations")
    delete = _gated("delete")


def gated_origin(
    store_ref: list[GateStore], origin: RecordingOrigin
) -> Callable[..., Awaitable[Any]]:
    async def load(user_id: str, attributes: list[str] | None = None) -> Any:
        await store_ref[0].gate("origin:before")
        value = await origin.get(user_id, attributes)
        await store_ref[0].gate("origin:after")
        return value

    return load


Scenario = Callable[[Cache, list[GateStore], RecordingOrigin], Awaitable[Any]]


async def whole_item(cache: Cache, ref: list[GateStore], origin: RecordingOrigin) -> Any:
    load = gated_origin(ref, origin)

    @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id}, name="whole")
    async def get_user(user_id: str, *, attributes: list[str] | None = None) -> Any:
        return await load(user_id, attributes)

    return await get_user("u1")


async def merged_projection(cache: Cache, ref: list[GateStore], origin: RecordingOrigin) -> Any:
    load = gated_origin(ref, origin)

    @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id}, name="proj")
    async def get_user(user_id: str, *, attributes: list[str] | None = None) -> Any:
        return await load(user_id, attributes)

    stop_at, ref[0].stop_at = ref[0].stop_at, -1
    await get_user("u1", attributes=["name"])  # an entry to merge into, not under test
    ref[0].points.clear()
    ref[0].stop_at = stop_at
    return await get_user("u1", attributes=["name", "age"])


async def tagged_result(cache: Cache, ref: list[GateStore], origin: RecordingOrigin) -> Any:
    load = gated_origin(ref, origin)

    @cached(cache, key="r:{x}", tags=lambda x: ["t1", f"t-{x}"], name="tagged")
    async def result(x: str) -> Any:
        return await load(x)

    return await result("u1")


SCENARIOS: dict[str, tuple[Scenario, Any]] = {
    "whole": (whole_item, ITEM),
    "merge": (merged_projection, {"name": "Ada", "age": Decimal(36)}),
    "tagged": (tagged_result, ITEM),
}


async def entry_is_whole_or_absent(redis_client: aioredis.Redis, cache: Cache) -> None:
    """No half-written hash: every entry holds all its metadata (and all attributes of a whole item)."""
    async for key in redis_client.scan_iter(match=f"{cache.namespace}:e:*"):
        # A whole entry is a string (format 3), a partial one or a result a hash.
        if await redis_client.type(key) == b"string":
            stored = await redis_client.get(key)
            assert stored is not None
            raw = expand(stored)
        else:
            raw = expand(await redis_client.hgetall(key))
        for field in (M_SOFT, M_HARD, M_FORMAT, M_VERSION):
            assert field in raw, (key, raw)
        if M_WHOLE in raw:
            assert {k for k in raw if not k.startswith(b"\xff")} == {b"pk", b"name", b"age"}


async def tag_reaches_every_entry(redis_client: aioredis.Redis, cache: Cache, tag: str) -> None:
    """Every stored tagged entry is a member of its tag: a purge leaves none behind."""
    await cache.purge_tags([tag])
    left = [k async for k in redis_client.scan_iter(match=f"{cache.namespace}:e:*")]
    assert not left, "an entry survived the purge of its tag"


async def no_lease_outlives_its_ttl(redis_client: aioredis.Redis, cache: Cache) -> None:
    """Every lease left behind expires on its own (nothing renews it) within its TTL."""
    keys = [k async for k in redis_client.scan_iter(match=f"{cache.namespace}:l:*")]
    for key in keys:
        assert 0 < await redis_client.pttl(key) <= cache.lease_ms

    async def gone() -> bool:
        return not any([await redis_client.exists(k) for k in keys])

    await until(gone, limit=cache.lease_ms / 1000 + 2)


async def count_points(redis_client: aioredis.Redis, name: str) -> list[str]:
    """The gates one uncancelled run of a scenario passes, in order."""
    cache = Cache(redis_client, namespace=f"count-{name}", fence_ttl=0)
    store = GateStore(redis_client, stop_at=-1)
    cache._engine.use_store(store)
    async with cache:
        scenario, expected = SCENARIOS[name]
        assert await scenario(cache, [store], RecordingOrigin({"u1": ITEM})) == expected
    return list(store.points)


@pytest.mark.parametrize("how", ["caller", "shutdown"])
@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_cancellation_at_every_await_of_the_load_path(
    redis_client: aioredis.Redis, name: str, how: str
) -> None:
    """Cancelling the caller (or shutting the cache down) at each await leaves no stuck lease, no half-written hash, and a cache that still works."""
    points = await count_points(redis_client, name)
    assert "origin:before" in points and ("fill:after" in points or "merge:after" in points)
    scenario, expected = SCENARIOS[name]
    for n, point in enumerate(points):
        namespace = f"c-{name}-{how}-{n}"
        # "caller": the load must outlive its cancelled caller, so the exit drains it.
        drain = 5.0 if how == "caller" else 0.0
        cache = Cache(
            redis_client, namespace=namespace, fence_ttl=0, lease_ttl=0.3, drain_timeout=drain
        )
        store = GateStore(redis_client, stop_at=n)
        cache._engine.use_store(store)
        origin = RecordingOrigin({"u1": ITEM})
        async with cache:
            task = asyncio.create_task(scenario(cache, [store], origin))
            await store.reached.wait()
            if how == "caller":
                task.cancel()
                store.go.set()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                # Open the gate once the exit has begun: a step the engine shields
                # from cancellation (the fill and its tags) must be able to finish.
                asyncio.get_running_loop().call_soon(store.go.set)
        if how == "shutdown":
            # Leaving the cache cancelled the load (drain_timeout=0); the application,
            # shutting down too, cancels its caller.
            task.cancel()
            (outcome,) = await asyncio.gather(task, return_exceptions=True)
            assert outcome == expected or isinstance(
                outcome, (asyncio.CancelledError, CacheNotEnteredError)
            ), (point, outcome)
        await entry_is_whole_or_absent(redis_client, cache)
        await no_lease_outlives_its_ttl(redis_client, cache)
        if name == "tagged":
            await tag_reaches_every_entry(redis_client, cache, "t1")
        # A fresh process over the same keys gets the right value, at most one origin call away.
        after = Cache(redis_client, namespace=namespace, fence_ttl=0, lease_wait=0.5)
        fresh_store = GateStore(redis_client, stop_at=-1)
        after._engine.use_store(fresh_store)
        async with after:
            calls = origin.count
            assert await scenario(after, [fresh_store], origin) == expected, (point, how)
            assert origin.count - calls <= 2, point


@pytest.mark.parametrize("stage", ["acquire_and_read", "fill"])
async def test_shutdown_while_a_command_waits_at_the_server(
    redis_url: str, redis_client: aioredis.Redis, stage: str
) -> None:
    """Shutting down while the lease SET or the fill script waits at a paused server leaves no half-written hash and no lasting lease."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=0.3)
    cache = Cache(
        client, namespace=f"inflight-{stage}", fence_ttl=0, lease_ttl=0.5, drain_timeout=0
    )
    origin = RecordingOrigin({"u1": ITEM})
    store = GateStore(client, stop_at=-1)
    cache._engine.use_store(store)
    paused = False
    try:
        async with cache:
            get_user = users(cache, origin)
            if stage == "fill":
                origin.hold()
            task = asyncio.create_task(get_user("u1"))
            if stage == "fill":
                await origin.entered.wait()
            # Writes (SET, EVALSHA) now wait at the server; reads still answer.
            await redis_client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
            paused = True
            origin.release()

            async def sent() -> bool:
                return f"{stage}:before" in store.points

            await until(sent)
        # The exit cancelled the load; the fill, shielded, gave up at the socket timeout.
        (outcome,) = await asyncio.gather(task, return_exceptions=True)
        # Or, when the exit came first, the caller of the cancelled load hears so.
        assert outcome == ITEM or isinstance(
            outcome, (asyncio.CancelledError, CacheNotEnteredError)
        ), outcome
    finally:
        if paused:
            await redis_client.execute_command("CLIENT", "UNPAUSE")
        await client.aclose()
    await entry_is_whole_or_absent(redis_client, cache)
    await no_lease_outlives_its_ttl(redis_client, cache)


async def test_callers_of_one_failed_read_share_one_origin_load(
    redis_client: aioredis.Redis,
) -> None:
    """Every caller that shared a read Redis failed joins one origin load, even one already finished."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    origin = RecordingOrigin({"u1": ITEM})
    cache = Cache(redis_client, namespace="shared-bypass", early_refresh=0)
    async with CacheHost(cache):
        get_user = users(cache, origin)
        gate = asyncio.Event()

        class FailingReads(Store):
            async def read_entry(self, key: str, fields: Any) -> Any:
                await gate.wait()
                raise RedisConnectionError("gone")

        cache._engine.use_store(FailingReads(redis_client, batch_reads=False))
        callers = [asyncio.create_task(get_user("u1")) for _ in range(20)]
        for _ in range(5):
            await asyncio.sleep(0)  # every caller is waiting on the one read
        gate.set()
        assert await asyncio.gather(*callers) == [ITEM] * 20
        assert origin.count == 1
        assert cache.stats()[get_user.name]["redis_errors"] >= 1
