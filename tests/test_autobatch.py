"""Auto-batched entry reads: concurrent reads of distinct keys share one pipeline per node."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from helpers import users, wait_until
from redis.exceptions import ConnectionError as RedisConnectionError

from swr_cache import Cache, _autobatch
from swr_cache.testing import CacheHost, FakeClock, RecordingOrigin

pytestmark = [pytest.mark.redis, pytest.mark.on_cluster]

N = 40


@pytest.fixture
def origin() -> RecordingOrigin:
    return RecordingOrigin({f"u{i}": {"pk": f"u{i}", "n": i} for i in range(N)})


KEYS = [f"u{i}" for i in range(N)]


class Writes:
    """Counts the pipelines ``_autobatch`` writes: ``(connection id, commands)`` per write."""

    def __init__(self) -> None:
        self.log: list[tuple[int, int]] = []

    def connections(self) -> set[int]:
        return {conn for conn, _ in self.log}


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Writes:
    seen = Writes()
    real = _autobatch._write

    def counting(conn: Any, data: bytes) -> None:
        # Entry reads: GET (whole entries, format 3), HGETALL (signed projections)
        # or HMGET (projections and results; a projection pairs its HMGET with a GET).
        # A batch of whole reads on one node is one MGET: a read per key.
        reads = (
            data.count(b"\r\n$3\r\nGET\r\n")
            + data.count(b"\r\n$7\r\nHGETALL\r\n")
            + data.count(b"\r\n$5\r\nHMGET\r\n")
            + sum(int(n) - 1 for n in re.findall(rb"\*(\d+)\r\n\$4\r\nMGET\r\n", data))
        )
        seen.log.append((id(conn), reads))
        real(conn, data)

    monkeypatch.setattr(_autobatch, "_write", counting)
    return seen


def in_use(client: Any, cache: Cache | None = None) -> int:
    """Connections taken from the client's pool(s) and not given back.

    Those the cache keeps between reads (clean: open, nothing unread) are not counted.
    """
    if hasattr(client, "get_nodes"):
        return sum(len(n._connections) - len(n._free) for n in client.get_nodes())
    kept: list[Any] = []
    if cache is not None and cache._engine.store.batcher is not None:
        kept = cache._engine.store.batcher.standalone.idle
    assert all(_autobatch._clean(conn) for conn in kept)
    return len(client.connection_pool._in_use_connections) - len(kept)


async def warm(get_user: Callable[[str], Awaitable[Any]]) -> None:
    for k in KEYS:
        await get_user(k)


def is_cluster(client: Any) -> bool:
    return hasattr(client, "get_nodes")


async def test_distinct_keys_in_one_tick_go_as_one_pipeline_per_node(
    cache: Cache, redis_client: Any, origin: RecordingOrigin, writes: Writes
) -> None:
    """N concurrent hits of distinct keys: one connection per node, at most two writes each, N commands."""
    get_user = users(cache, origin)
    await warm(get_user)
    writes.log.clear()
    before = cache.stats()["swr_cache"]
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        got = await asyncio.gather(*(get_user(k) for k in KEYS))
    finally:
        loop.set_exception_handler(None)
    assert errors == []  # no callback failed (the client has no socket_timeout)
    assert got == [origin.items[k] for k in KEYS]
    assert origin.count == N  # the warm-up fills only
    nodes = 3 if is_cluster(redis_client) else 1
    assert len(writes.connections()) <= nodes
    # The first read goes at once, the rest of the tick's reads in one write after it.
    assert len(writes.log) <= 2 * nodes
    assert sum(n for _, n in writes.log) == N
    after = cache.stats()["swr_cache"]
    batches = after["read_batches"] - before["read_batches"]
    assert 1 <= batches <= nodes
    assert after["batched_reads"] - before["batched_reads"] == N
    assert in_use(redis_client, cache) == 0


async def test_sequential_reads_are_not_batched(
    cache: Cache, redis_client: Any, origin: RecordingOrigin, writes: Writes
) -> None:
    """A lone read in a tick is one command written at once; no batch is counted."""
    get_user = users(cache, origin)
    await warm(get_user)
    writes.log.clear()
    for k in KEYS[:5]:
        await get_user(k)
    assert [n for _, n in writes.log] == [1] * 5
    assert cache.stats()["swr_cache"]["read_batches"] == 0


async def test_batch_reads_off_sends_one_command_per_read(
    redis_client: Any, clock: FakeClock, origin: RecordingOrigin, writes: Writes
) -> None:
    """``batch_reads=False``: no pipeline is shared."""
    cache = Cache(redis_client, namespace="t", clock=clock, batch_reads=False)
    async with CacheHost(cache):
        get_user = users(cache, origin)
        await warm(get_user)
        got = await asyncio.gather(*(get_user(k) for k in KEYS))
        assert got == [origin.items[k] for k in KEYS]
        assert writes.log == []
        assert cache.stats()["swr_cache"]["read_batches"] == 0


class HeldReplies:
    """Holds the first pipelined reply read until ``release``; can fail the next read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.fail: BaseException | None = None
        self.real = _autobatch._reply_reader
        monkeypatch.setattr(_autobatch, "_reply_reader", self.reader)

    def reader(self, conn: Any) -> Callable[[], Awaitable[Any]]:
        real = self.real(conn)

        async def read() -> Any:
            if not self.gate.is_set():
                self.entered.set()
                await self.gate.wait()
            if self.fail is not None:
                fail, self.fail = self.fail, None
                raise fail
            return await real()

        return read


@pytest.mark.parametrize("victim", [0, 7])
async def test_cancelling_one_waiter_mid_batch_leaves_the_others_answered(
    cache: Cache,
    redis_client: Any,
    origin: RecordingOrigin,
    monkeypatch: pytest.MonkeyPatch,
    victim: int,
) -> None:
    """The pipeline's reader (0) or a follower (7) is cancelled: the rest get their hits, the pool is whole."""
    get_user = users(cache, origin)
    await warm(get_user)
    held = HeldReplies(monkeypatch)
    tasks = [asyncio.create_task(get_user(k)) for k in KEYS]
    await held.entered.wait()
    await asyncio.sleep(0)  # the tick's reads join
    tasks[victim].cancel()
    await asyncio.sleep(0)
    held.gate.set()
    for i, task in enumerate(tasks):
        if i == victim:
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            assert await task == origin.items[KEYS[i]]
    assert origin.count == N  # every answer was a hit
    assert in_use(redis_client, cache) == 0
    # The connections are clean: the next batch reads the right replies.
    got = await asyncio.gather(*(get_user(k) for k in KEYS))
    assert got == [origin.items[k] for k in KEYS]
    assert origin.count == N


async def test_connection_lost_mid_batch_bypasses_every_waiter_and_opens_the_breaker(
    cache: Cache, redis_client: Any, origin: RecordingOrigin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection error fails the whole batch: every waiter is answered by the origin, and the failed reads count as the breaker's failures (as on connections of their own)."""
    get_user = users(cache, origin)
    await warm(get_user)
    held = HeldReplies(monkeypatch)
    held.fail = RedisConnectionError("connection lost mid-batch")
    tasks = [asyncio.create_task(get_user(k)) for k in KEYS]
    await held.entered.wait()
    await asyncio.sleep(0)
    held.gate.set()
    got = await asyncio.gather(*tasks)
    assert got == [origin.items[k] for k in KEYS]
    nodes = 3 if is_cluster(redis_client) else 1
    stats = cache.stats()[get_user.name]
    assert stats["redis_errors"] >= 1
    # Bypassed reads were answered by the origin (one batch failed, the others, if any, hit).
    assert origin.count > N
    # Breaker threshold is 3: each read of the failed pipeline is a failure, so
    # one failed wave of N > 3 reads opens it at once (no second wave pays the
    # timeout). (On a cluster only one node's pipeline may fail while the other
    # nodes' succeed, which resets the count.)
    if not is_cluster(redis_client):
        assert stats["redis_errors"] >= 3
        assert cache.breaker.is_open
    assert in_use(redis_client, cache) == 0
    assert nodes >= 1
    # After its cool-down a probe read closes the breaker; reads work again, from the cache.
    while cache.breaker.is_open:
        await get_user(KEYS[0])
        await asyncio.sleep(0.05)
    count = origin.count
    got = await asyncio.gather(*(get_user(k) for k in KEYS))
    assert got == [origin.items[k] for k in KEYS]
    assert origin.count == count


async def test_wrongtype_on_one_key_is_a_corrupt_miss_of_that_key_only(
    cache: Cache, redis_client: Any, origin: RecordingOrigin
) -> None:
    """One entry key of another type: that read alone is a counted miss and reloads; the batch's others hit."""
    get_user = users(cache, origin)
    await warm(get_user)
    broken = cache._keys.entry("Users|pk=S:u5")
    await redis_client.delete(broken)
    await redis_client.set(broken, b"not a hash")
    got = await asyncio.gather(*(get_user(k) for k in KEYS))
    assert got == [origin.items[k] for k in KEYS]
    stats = cache.stats()[get_user.name]
    assert stats["decode_errors"] == 1
    assert origin.count == N + 1
    assert [c[0] for c in origin.calls[N:]] == ["u5"]
    assert not cache.breaker.is_open and stats["redis_errors"] == 0


async def test_many_reads_in_one_hand_packed_pipeline_per_node(
    cache: Cache, redis_client: Any, origin: RecordingOrigin, writes: Writes
) -> None:
    """``many()`` (``get_many``): one write per node for the reads, one per node for the misses' leases."""
    get_user = users(cache, origin)
    for k in KEYS[:10]:
        await get_user(k)
    writes.log.clear()
    loaded: list[list[str]] = []

    async def load(ids: list[str]) -> dict[str, dict[str, Any] | None]:
        loaded.append(ids)
        return {i: origin.items[i] for i in ids}

    got = await get_user.many(KEYS, load=load)
    assert got == {k: origin.items[k] for k in KEYS}
    assert len(loaded) == 1 and sorted(loaded[0]) == sorted(KEYS[10:])
    nodes = 3 if is_cluster(redis_client) else 1
    # Reads (all keys), then leases with re-reads (the misses): at most one write per node each.
    assert len(writes.log) <= 2 * nodes
    assert sum(n for _, n in writes.log) == N + (N - 10)
    assert in_use(redis_client, cache) == 0
    writes.log.clear()
    assert await get_user.many(KEYS, load=load) == got
    assert len(writes.log) <= nodes and len(loaded) == 1


async def test_batches_on_a_client_with_a_socket_timeout(
    redis_url: str, origin: RecordingOrigin, writes: Writes
) -> None:
    """``Cache.from_url`` (socket_timeout set): the pipeline's timer is pushed back by each write, no callback fails."""
    cache = Cache.from_url(redis_url, namespace="tt", socket_timeout=0.5)
    async with cache:
        get_user = users(cache, origin)
        await warm(get_user)
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        try:
            for _ in range(3):
                got = await asyncio.gather(*(get_user(k) for k in KEYS))
                assert got == [origin.items[k] for k in KEYS]
        finally:
            loop.set_exception_handler(None)
        assert errors == []
        assert cache.stats()["swr_cache"]["read_batches"] == 3
        assert origin.count == N


@pytest.mark.parametrize(
    ("protocol", "parser"),
    [(2, None), (3, None), (2, "_AsyncRESP2Parser"), (3, "_AsyncRESP3Parser")],
    ids=["resp2-hiredis", "resp3-hiredis", "resp2-python", "resp3-python"],
)
async def test_pipelines_read_replies_with_every_parser(
    redis_url: str, origin: RecordingOrigin, protocol: int, parser: str | None
) -> None:
    """A hand-packed pipeline reads its replies right with hiredis (taken directly) and redis-py's own parsers.

    An error reply (WRONGTYPE at one key) answers only its own read.
    """
    import redis._parsers
    import redis.asyncio as aioredis

    kwargs: dict[str, Any] = {"protocol": protocol, "socket_timeout": 5}
    if parser is not None:
        kwargs["parser_class"] = getattr(redis._parsers, parser)
    client = aioredis.Redis.from_url(redis_url, **kwargs)
    cache = Cache(client, namespace=f"p{protocol}{parser}", early_refresh=0)
    try:
        async with CacheHost(cache):
            get_user = users(cache, origin)
            await warm(get_user)

            async def load(ids: list[str]) -> dict[str, dict[str, Any] | None]:
                return {i: origin.items[i] for i in ids}

            got = await get_user.many(KEYS, load=load)
            assert got == {k: origin.items[k] for k in KEYS}
            assert origin.count == N
            entry = cache._engine.keys.entry("Users|pk=S:u3")
            await client.delete(entry)
            await client.set(entry, b"not a hash")
            again = await get_user.many(KEYS, load=load)
            assert again == got
            stats = cache.stats()[get_user.name]
            assert stats["decode_errors"] == 1 and stats["hits"] == 2 * N - 1
    finally:
        await client.aclose()


@pytest.mark.standalone_only(reason="kept connections are the standalone pool's")
async def test_kept_connections_are_checked_bounded_and_given_back(
    redis_url: str, origin: RecordingOrigin
) -> None:
    """Reads keep a few clean connections between them; one the server closed is not reused; all go back on close."""
    client = aioredis_from_url(redis_url)
    admin = aioredis_from_url(redis_url)
    cache = Cache(client, namespace="kept", early_refresh=0)
    try:
        async with CacheHost(cache):
            get_user = users(cache, origin)
            await warm(get_user)
            kept = cache._engine.store.batcher.standalone.idle  # type: ignore[union-attr]
            assert len(kept) == 1  # sequential reads use one connection

            async def load(ids: list[str]) -> dict[str, dict[str, Any] | None]:
                return {i: origin.items[i] for i in ids}

            # Concurrent pipelines take several connections; at most IDLE_KEPT stay.
            await asyncio.gather(*(get_user.many(KEYS, load=load) for _ in range(8)))
            assert 1 <= len(kept) <= _autobatch.IDLE_KEPT
            assert in_use(client, cache) == 0
            # The server closes every connection: none is reused, no read fails.
            await admin.client_kill_filter(_type="normal", skipme=True)
            await wait_until(lambda: not any(_autobatch._clean(c) for c in kept))
            assert await get_user("u1") == origin.items["u1"]
            stats = cache.stats()["swr_cache"]
            assert stats["redis_errors"] == 0 and stats["bypasses"] == 0
        assert len(client.connection_pool._in_use_connections) == 0
    finally:
        await client.aclose()
        await admin.aclose()


def aioredis_from_url(url: str) -> Any:
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url, socket_timeout=5)
