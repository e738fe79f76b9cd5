"""Cluster-specific behaviour against a real 3-master Redis Cluster.

The engine, decorator, DynamoTable and stream suites run on the cluster too: their
modules are marked ``on_cluster``, so conftest gives each of their tests that takes
``redis_client`` a ``[cluster]`` run. This module holds what only a cluster has:
slot placement, node-grouped pipelines, per-node scripts, failover, replica reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest
import test_streams
from helpers import users

from swr_cache import Cache, _store, cached, cached_item
from swr_cache._store import Script
from swr_cache.testing import CacheHost, FakeClock, RecordingOrigin

pytestmark = pytest.mark.cluster


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def cache(cluster_client: Any, clock: FakeClock) -> AsyncIterator[Cache]:
    c = Cache(
        cluster_client, namespace="t", soft_ttl=10, hard_ttl=100, clock=clock, early_refresh=0
    )
    async with CacheHost(c) as entered:
        yield entered


# --- cluster-specific ------------------------------------------------------------------


def many_users(n: int) -> RecordingOrigin:
    return RecordingOrigin({f"u{i}": {"pk": f"u{i}", "n": Decimal(i)} for i in range(n)})


async def keys_per_master(client: Any) -> list[int]:
    """DBSIZE of each primary (``target_nodes=PRIMARIES`` would sum them)."""
    await client.initialize()  # learns the nodes (a no-op once done)
    return [await client.dbsize(target_nodes=node) for node in client.get_primaries()]


async def flush_scripts(client: Any) -> None:
    """SCRIPT FLUSH on every node, as a restart of each would leave them."""
    await client.execute_command("SCRIPT FLUSH", target_nodes=client.ALL_NODES)
    for node in client.get_nodes():
        exists = await client.execute_command(
            "SCRIPT EXISTS", Script(_store._FILL).sha, target_nodes=node
        )
        assert not any(exists), exists


class CountingPipelines:
    """Wraps ``client.pipeline`` to count executed pipelines and their commands."""

    def __init__(self, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        real = client.pipeline

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = real(*args, **kwargs)
            real_execute = pipe.execute

            async def execute(*a: Any, **kw: Any) -> Any:
                self.sizes.append(len(pipe))
                return await real_execute(*a, **kw)

            pipe.execute = execute
            return pipe

        monkeypatch.setattr(client, "pipeline", pipeline)


async def test_item_keys_share_a_slot_and_items_spread_over_masters(
    cache: Cache, cluster_client: Any
) -> None:
    """An item's entry, lease and fence hash to one slot, while 60 items spread over all 3 masters."""
    from redis.crc import key_slot

    origin = many_users(60)
    get_user = users(cache, origin)
    for i in range(60):
        await get_user(f"u{i}")
        ident = f"Users|pk=S:u{i}"
        ks = cache._keys
        slots = {
            key_slot(k.encode())
            for k in (ks.entry(ident), ks.lease(ident), ks.fence(ident), ks.seq(ident))
        }
        assert len(slots) == 1
    assert all(n > 0 for n in await keys_per_master(cluster_client))
    assert [await get_user(f"u{i}") for i in range(60)] == [
        origin.items[f"u{i}"] for i in range(60)
    ]
    assert origin.count == 60


async def test_invalidating_items_on_every_master_takes_one_pipeline(
    cache: Cache, cluster_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``invalidate_items`` over keys in every slot range is one (node-grouped) pipeline for the entries."""
    origin = many_users(60)
    get_user = users(cache, origin)
    for i in range(60):
        await get_user(f"u{i}")
    counting = CountingPipelines(cluster_client, monkeypatch)
    await cache.invalidate_items([("Users", {"pk": f"u{i}"}) for i in range(60)])
    assert counting.sizes[0] == 60 * 3  # fence, lease, entry per item, in one pipeline
    assert all([await get_user.peek(f"u{i}") is None for i in range(60)])
    # Only the fences and purge stamps remain: one per item tag, one for the table tag.
    assert sum(await keys_per_master(cluster_client)) == 60 + 60 + 1


async def test_tag_members_on_every_master_are_purged(cache: Cache, cluster_client: Any) -> None:
    """One tag's members live in every slot range; a purge removes each of them."""
    from redis.crc import key_slot

    calls = 0

    @cached(cache, key="report:{n}", tags=["daily"])
    async def report(n: int) -> int:
        nonlocal calls
        calls += 1
        return n

    for n in range(40):
        assert await report(n) == n
    members = await cluster_client.smembers(cache._keys.tag_members("daily"))
    assert len(members) == 40
    assert len({key_slot(m) * 3 // 16384 for m in members}) == 3  # members on all 3 masters
    await cache.purge_tags(["daily"])
    assert all([await report.peek(n) is None for n in range(40)])
    assert not await cluster_client.exists(cache._keys.tag_members("daily"))
    assert await report(7) == 7
    assert calls == 41


async def test_scripts_reload_on_each_node_after_script_flush(
    cache: Cache, cluster_client: Any
) -> None:
    """After SCRIPT FLUSH on every node (a restart), fills, merges, multi-tag fills and purges still work."""
    origin = many_users(30)
    get_user = users(cache, origin)

    @cached(cache, key="q:{n}", tags=lambda n: ["a", "b", f"n{n}"])
    async def q(n: int) -> int:
        return n

    await flush_scripts(cluster_client)
    for i in range(30):
        assert await get_user(f"u{i}", attributes=["pk"]) == {"pk": f"u{i}"}
        assert await get_user(f"u{i}", attributes=["pk", "n"]) == {"pk": f"u{i}", "n": Decimal(i)}
        assert await q(i) == i
    stats = cache.stats()
    assert stats[get_user.name]["fills"] == 60 and stats[get_user.name]["redis_errors"] == 0
    assert stats[q.name]["fills"] == 30 and stats[q.name]["tag_races"] == 0
    await flush_scripts(cluster_client)
    await cache.purge_tags(["a", "b"])
    assert all([await q.peek(i) is None for i in range(30)])


async def test_stream_batch_on_cluster_in_a_few_pipelines(
    cache: Cache, cluster_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 stream records touching every master cost a handful of pipelines, in both modes."""
    from swr_cache import StreamInvalidator

    origin = RecordingOrigin({Decimal(i): {"Id": Decimal(i), "Message": "m"} for i in range(200)})
    get_item = test_streams.example_table(cache, origin)
    for i in range(200):
        await get_item(i)
    assert all(n > 0 for n in await keys_per_master(cluster_client))
    # Refresh first: an invalidation's fence would turn the refreshes into deletes.
    for mode in ("refresh", "invalidate"):
        await flush_scripts(cluster_client)
        counting = CountingPipelines(cluster_client, monkeypatch)
        batch = [
            test_streams.record(
                {"Id": {"N": str(i)}}, seq=str(2000 + i), image=test_streams.image(i, mode)
            )
            for i in range(200)
        ]
        report = await StreamInvalidator(cache, mode=mode).handle({"Records": batch})
        assert report.applied == 200 and not report.failed
        assert len(counting.sizes) <= 5 and sum(counting.sizes) >= 400, counting.sizes
        monkeypatch.undo()
        if mode == "refresh":
            calls = origin.count
            assert [await get_item(i) for i in range(200)] == [
                {"Id": Decimal(i), "Message": "refresh"} for i in range(200)
            ]
            assert origin.count == calls
    assert all([await get_item.peek(i) is None for i in range(200)])


async def test_many_keys_at_once_on_a_small_cluster_pool(
    cluster_client: Any, redis_cluster: Any
) -> None:
    """1000 concurrent distinct keys through a cluster client with 4 connections per node never fail."""
    from redis.asyncio.cluster import ClusterNode
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    client = AsyncRedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes], max_connections=4
    )
    try:
        # 1000 reads queue for 4 slots: on a slow machine (shared CPUs, a run under
        # coverage) the default 0.5 s slot wait runs out and reads bypass Redis, so
        # fills go missing. Waiting as long as needed keeps the test about failures.
        c = Cache(client, namespace="small", call_timeout=30)
        async with c:

            @cached_item(c, table="T", key=lambda k: {"pk": k})
            async def get(k: str) -> dict[str, Any] | None:
                return {"pk": k}

            for _ in range(2):
                results = await asyncio.gather(*(get(f"k{i}") for i in range(1000)))
                assert [r["pk"] for r in results] == [f"k{i}" for i in range(1000)]
            stats = c.stats()[get.name]
            # Every read waits for one of the 4 slots; none fails.
            assert stats["fills"] == 1000 and stats["hits"] + stats["bypasses"] == 1000
            assert stats["redis_errors"] == 0 and not c.breaker.is_open
    finally:
        await client.aclose()


# --- failures and replicas (private clusters: these kill nodes) ------------------------


@contextlib.asynccontextmanager
async def private_cluster(
    client_kwargs: dict[str, Any] | None = None, **kwargs: Any
) -> AsyncIterator[tuple[Any, Any]]:
    """A cluster of our own (started off the event loop) and a client with short timeouts."""
    from redis.asyncio.cluster import ClusterNode
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    from devtools.devservers import RedisCluster

    cluster = RedisCluster(**kwargs)
    await asyncio.to_thread(cluster.start)
    if cluster.replicas:
        await asyncio.to_thread(replicas_known, cluster)
    client = AsyncRedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes],
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        **(client_kwargs or {}),
    )
    try:
        yield cluster, client
    finally:
        await client.aclose()
        await asyncio.to_thread(cluster.close)


def replicas_known(cluster: Any, limit: float = 30.0) -> None:
    """Wait until every node's CLUSTER SLOTS lists each range's replicas.

    Redis lists a replica in CLUSTER SLOTS only once its replication offset is
    non-zero, which without writes takes until the master's first replication
    PING (``repl-ping-replica-period``, 10 s). One write per master makes it
    seconds shorter; the other nodes then learn it by gossip. A client that
    reads the slot map before then never sends a read to a replica.
    """
    from redis.crc import key_slot

    first_view = cluster.nodes[0].command("CLUSTER", "SLOTS")
    for first, last, primary, *_ in first_view:
        i = 0
        while not first <= key_slot(b"warm-%d" % i) <= last:
            i += 1
        node = next(n for n in cluster.nodes if n.port == primary[1])
        node.command("SET", b"warm-%d" % i, "1")
    deadline = time.monotonic() + limit
    while True:
        views = [node.command("CLUSTER", "SLOTS") for node in cluster.nodes]
        if all(
            isinstance(view, list) and all(len(r) == 3 + cluster.replicas for r in view)
            for view in views
        ):
            return
        assert time.monotonic() < deadline, views
        time.sleep(0.02)


def owner_index(cluster: Any, client: Any, key: str) -> int:
    """Index in ``cluster.nodes`` of the master serving ``key`` now."""
    node = client.get_node_from_key(key)
    return next(i for i, n in enumerate(cluster.nodes) if n.port == node.port)


async def serve_until(
    get_user: Any,
    origin: RecordingOrigin,
    keys: list[str],
    done: Callable[[], bool],
    limit: float = 60.0,
) -> int:
    """Read every key in passes until ``done()``; every read must succeed. Returns the passes made."""
    deadline = time.monotonic() + limit
    passes = 0
    while True:
        for k in keys:
            assert await get_user(k) == origin.items[k]
        passes += 1
        if done():
            return passes
        assert time.monotonic() < deadline, "cluster did not recover in time"
        await asyncio.sleep(0.02)


def no_new_loads(origin: RecordingOrigin) -> Callable[[], bool]:
    """A ``done`` for :func:`serve_until`: true after a whole pass that called no origin."""
    last = [-1]

    def done() -> bool:
        quiet = origin.count == last[0]
        last[0] = origin.count
        return quiet

    return done


@pytest.mark.slow
async def test_master_failover_with_replicas_never_fails_a_request() -> None:
    """A master is killed: its keys are served by the origin until its replica takes over, then cached again."""
    async with private_cluster(masters=3, replicas=1, node_timeout_ms=1000) as (cluster, client):
        origin = many_users(30)
        keys = list(origin.items)
        cache = Cache(client, namespace="fo", breaker_cooldown=0.1)
        async with cache:
            get_user = users(cache, origin)
            for k in keys:
                await get_user(k)
            assert origin.count == 30
            victim = owner_index(cluster, client, cache._keys.entry("Users|pk=S:u0"))
            cluster.kill_node(victim)
            failover = asyncio.create_task(asyncio.to_thread(cluster.wait_ok, 60))
            await serve_until(get_user, origin, keys, failover.done)
            await failover
            during = origin.count
            assert during > 30  # the dead master's keys went to the origin meanwhile
            # The promoted replica serves what the old master held; nothing is reloaded.
            await serve_until(get_user, origin, keys, lambda: True)
            stats = cache.stats()[get_user.name]
            assert origin.count == during and stats["hits"] >= 30
            assert stats["redis_errors"] + stats["bypasses"] > 0


@pytest.mark.slow
async def test_master_killed_without_replicas_errors_then_recovers() -> None:
    """Without replicas, a dead master's slots fail over to the origin until it restarts, then cache again."""
    async with private_cluster(masters=3, node_timeout_ms=1000) as (cluster, client):
        origin = many_users(30)
        keys = list(origin.items)
        cache = Cache(client, namespace="kr", breaker_cooldown=0.1)
        async with cache:
            get_user = users(cache, origin)
            for k in keys:
                await get_user(k)
            victim = owner_index(cluster, client, cache._keys.entry("Users|pk=S:u0"))
            cluster.kill_node(victim)
            await serve_until(get_user, origin, keys, lambda: True)
            assert cache.stats()[get_user.name]["redis_errors"] > 0
            await asyncio.to_thread(cluster.nodes[victim].start)
            await asyncio.to_thread(cluster.wait_ok, 60)

            await serve_until(get_user, origin, keys, no_new_loads(origin))
            assert not cache.breaker.is_open


async def replicated(client: Any, key: str, limit: float = 10.0) -> None:
    """Wait until the replica of ``key``'s master has applied every write the master has taken.

    Compares replication offsets: the master's ``master_repl_offset``, read after
    our writes, against the replica's ``slave_repl_offset`` (what it has applied).
    Not WAIT: WAIT covers only the writes made on the connection it runs on, and
    a cluster client spreads one node's commands over a pool of connections.
    """
    master = client.get_node_from_key(key)
    info = await client.execute_command("INFO", "replication", target_nodes=master)
    target = int(info["master_repl_offset"])
    replica = client.get_node(host=info["slave0"]["ip"], port=int(info["slave0"]["port"]))
    assert replica is not None and replica.server_type == "replica", client.get_nodes()
    deadline = time.monotonic() + limit
    while True:
        seen = await client.execute_command("INFO", "replication", target_nodes=replica)
        if int(seen["slave_repl_offset"]) >= target:
            return
        assert time.monotonic() < deadline, (target, seen)
        await asyncio.sleep(0.002)


@pytest.mark.slow
async def test_reads_from_replicas_lag_only_until_replicated() -> None:
    """With replica reads, hits come from replicas; right after an invalidation a read
    may still see the old entry, but once the master's writes are replicated, never."""
    from redis.cluster import LoadBalancingStrategy

    async with private_cluster(
        masters=3,
        replicas=1,
        client_kwargs={"load_balancing_strategy": LoadBalancingStrategy.RANDOM_REPLICA},
    ) as (cluster, client):
        origin = many_users(40)
        keys = list(origin.items)
        # No fence, no early refresh: only replication decides what a read sees.
        cache = Cache(client, namespace="rr", fence_ttl=0, early_refresh=0)
        async with cache:
            get_user = users(cache, origin)
            for k in keys:
                await get_user(k)
                await replicated(client, cache._keys.entry(f"Users|pk=S:{k}"))
            loads = origin.count
            assert [await get_user(k) for k in keys] == [origin.items[k] for k in keys]
            assert origin.count == loads  # hits, read from the replicas
            for k in keys:
                old = origin.items[k]
                new = origin.items[k] = {"pk": k, "n": Decimal(-1)}
                await cache.invalidate_item("Users", {"pk": k})
                # Right after the invalidation a replica may still hold the old entry.
                assert await get_user(k) in (old, new)
                # Once the master's writes are replicated, no read is stale.
                await replicated(client, cache._keys.entry(f"Users|pk=S:{k}"))
                await get_user.invalidate(k)
                await replicated(client, cache._keys.entry(f"Users|pk=S:{k}"))
                assert await get_user(k) == new
        replica_reads = 0
        for node in cluster.nodes:
            info = node.command("INFO", "commandstats")
            role = node.command("ROLE")
            if isinstance(role, list) and role[0] == b"slave" and isinstance(info, bytes):
                for line in info.decode().splitlines():
                    if line.startswith(("cmdstat_get:", "cmdstat_hgetall:", "cmdstat_hmget:")):
                        replica_reads += int(line.split("calls=")[1].split(",")[0])
        assert replica_reads >= len(keys)
