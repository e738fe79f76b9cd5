"""How long a replica read can still see an entry after ``invalidate_item`` returned.

``invalidate_item`` deletes on the masters; replicas apply the deletes when
asynchronous replication reaches them. A client reading from replicas
(redis-py's ``load_balancing_strategy``) may meanwhile still get the old entry.
This script starts its own Redis Cluster (3 masters, 1 replica each, on
127.0.0.1) and measures that window, per trial on a fresh item:

1. fill the entry through ``@cached_item`` and wait until its replica holds it;
2. ``await cache.invalidate_item(...)``; the window starts when it returns;
3. poll the replica (``EXISTS`` on a READONLY connection, one command in flight)
   until it no longer has the entry. The window is the send time of that first
   poll, less the start; ``0`` when the very first poll already missed it. The
   resolution is one poll round trip.

A second measurement reads through the cache itself: a
``Cache(RedisCluster(load_balancing_strategy=RANDOM_REPLICA))`` calls the item
right after ``invalidate_item`` returned, and counts how often it got the old
value.

Each runs idle and under two write loads (``--writers`` tasks in a child
process SETting 1 KB, then 64 KB, values on the masters back to back:
replication has more to ship, and every process shares the CPUs).

    python benchmarks/replica_lag.py [--quick] [--trials 500] [--writers 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis.asyncio as aioredis
from _common import finish, percentile, say, table
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import LoadBalancingStrategy

from devtools.devservers import RedisCluster
from swr_cache import Cache, cached_item

POLL_LIMIT_S = 5.0


def wait_replicas_listed(cluster: RedisCluster, limit: float = 30.0) -> None:
    """Write once per master, then wait until CLUSTER SLOTS lists every replica.

    Redis lists a replica there only once its replication offset is non-zero; a
    client that reads the slot map earlier never sends a read to a replica.
    """
    from redis.crc import key_slot

    slots: Any = cluster.nodes[0].command("CLUSTER", "SLOTS")
    for first, last, primary, *_ in slots:
        i = 0
        while not first <= key_slot(b"warm-%d" % i) <= last:
            i += 1
        next(n for n in cluster.nodes if n.port == primary[1]).command("SET", b"warm-%d" % i, "1")
    deadline = time.monotonic() + limit
    while True:
        views: list[Any] = [node.command("CLUSTER", "SLOTS") for node in cluster.nodes]
        if all(
            isinstance(v, list) and all(len(r) == 3 + cluster.replicas for r in v) for v in views
        ):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"replicas not listed in CLUSTER SLOTS: {views!r}")
        time.sleep(0.02)


class Replicas:
    """A READONLY single-connection client on each master's replica, found by key."""

    def __init__(self, client: AsyncRedisCluster) -> None:
        self.client = client
        self.by_master: dict[str, aioredis.Redis] = {}

    async def for_key(self, key: str) -> aioredis.Redis:
        master = self.client.get_node_from_key(key)
        assert master is not None
        replica = self.by_master.get(master.name)
        if replica is None:
            info: Any = await self.client.execute_command(
                "INFO", "replication", target_nodes=master
            )
            replica = aioredis.Redis(
                host=info["slave0"]["ip"],
                port=int(info["slave0"]["port"]),
                single_connection_client=True,
            )
            await replica.execute_command("READONLY")  # type: ignore[no-untyped-call]
            self.by_master[master.name] = replica
        return replica

    async def aclose(self) -> None:
        for replica in self.by_master.values():
            await replica.aclose()


async def until(replica: aioredis.Redis, key: str, present: bool) -> tuple[float, int]:
    """Poll ``EXISTS key`` until it is ``present``: (send time of the deciding poll, polls made)."""
    deadline = time.perf_counter() + POLL_LIMIT_S
    polls = 0
    while True:
        sent = time.perf_counter()
        polls += 1
        if bool(await replica.exists(key)) is present:
            return sent, polls
        if sent > deadline:
            raise RuntimeError(
                f"replica did not {'get' if present else 'drop'} {key} in {POLL_LIMIT_S} s"
            )


def _writer_process(
    startup_nodes: list[tuple[str, int]], writers: int, size: int, stop: Any, count: Any
) -> None:
    """Child process: ``writers`` tasks SETting ``size``-byte values on the masters back to back."""

    async def main() -> None:
        client = AsyncRedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in startup_nodes])
        await client.initialize()  # once, before the writers race to connect
        payload = b"x" * size

        async def writer(w: int) -> None:
            i = 0
            while not stop.is_set():
                await client.set(f"load:{w}:{i % 1000}", payload)
                i += 1
                with count.get_lock():
                    count.value += 1

        await asyncio.gather(*(writer(w) for w in range(writers)))
        await client.aclose()

    asyncio.run(main())


@contextlib.contextmanager
def write_load(cluster: RedisCluster, writers: int, size: int) -> Iterator[Any]:
    """The write load, in its own process so it does not delay this one's polls; yields its counter."""
    ctx = multiprocessing.get_context("spawn")
    stop, count = ctx.Event(), ctx.Value("q", 0)
    proc = None
    if writers:
        proc = ctx.Process(
            target=_writer_process, args=(list(cluster.startup_nodes), writers, size, stop, count)
        )
        proc.start()
        deadline = time.monotonic() + 30
        while count.value < 100 * writers:  # wait until it is writing
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the write load did not start")
            time.sleep(0.01)
    try:
        yield count
    finally:
        stop.set()
        if proc is not None:
            proc.join(30)


async def poll_rtt_us(replica: aioredis.Redis, n: int = 200) -> float:
    """Median round trip of one ``EXISTS`` on the replica: the window's resolution."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await replica.exists("nothing-here")
        times.append((time.perf_counter() - t0) * 1e6)
    return percentile(times, 50)


async def measure(
    cluster: RedisCluster, trials: int, writers: int, size: int, label: str
) -> dict[str, Any]:
    nodes = [ClusterNode(h, p) for h, p in cluster.startup_nodes]
    masters_client = AsyncRedisCluster(startup_nodes=nodes)
    replica_client = AsyncRedisCluster(
        startup_nodes=nodes, load_balancing_strategy=LoadBalancingStrategy.RANDOM_REPLICA
    )
    replicas = Replicas(masters_client)
    windows_us: list[float] = []
    first_poll_stale = 0
    polls_total = 0
    stale_cache_reads = 0
    versions: dict[str, int] = {}

    async def origin(pk: str) -> dict[str, Any]:
        return {"pk": pk, "v": versions.setdefault(pk, 0)}

    try:
        with write_load(cluster, writers, size) as writes:
            async with (
                Cache(masters_client, namespace=f"lag{label}") as cache,
                Cache(replica_client, namespace=f"lag{label}") as reading,
            ):

                @cached_item(cache, table="Users", key=lambda pk: {"pk": pk})
                async def fill(pk: str) -> dict[str, Any]:
                    return await origin(pk)

                @cached_item(reading, table="Users", key=lambda pk: {"pk": pk})
                async def read(pk: str) -> dict[str, Any]:
                    return await origin(pk)

                rtt_us = await poll_rtt_us(
                    await replicas.for_key(cache._keys.entry("Users|pk=S:probe"))
                )
                started = time.perf_counter()
                writes_before = writes.value
                for t in range(trials):
                    # (1) the window, polled on the replica
                    pk = f"{label}-p{t}"
                    entry = cache._keys.entry(f"Users|pk=S:{pk}")
                    replica = await replicas.for_key(entry)
                    await fill(pk)
                    await until(replica, entry, present=True)
                    await cache.invalidate_item("Users", {"pk": pk})
                    done = time.perf_counter()
                    gone_at, polls = await until(replica, entry, present=False)
                    polls_total += polls
                    if polls > 1:
                        first_poll_stale += 1
                    windows_us.append(max(0.0, gone_at - done) * 1e6 if polls > 1 else 0.0)
                    # (2) a read through a replica-reading cache right after the invalidation
                    pk = f"{label}-c{t}"
                    entry = cache._keys.entry(f"Users|pk=S:{pk}")
                    await fill(pk)
                    await until(await replicas.for_key(entry), entry, present=True)
                    versions[pk] = 1
                    await cache.invalidate_item("Users", {"pk": pk})
                    if (await read(pk))["v"] == 0:
                        stale_cache_reads += 1
                elapsed = time.perf_counter() - started
                write_rate = (writes.value - writes_before) / elapsed
    finally:
        await replicas.aclose()
        for c in (masters_client, replica_client):
            await c.aclose()
    return {
        "writers": writers,
        "value_bytes": size,
        "trials": trials,
        "poll_rtt_us_p50": rtt_us,
        "background_writes_per_s": round(write_rate),
        "window_us": {
            "p50": percentile(windows_us, 50),
            "p99": percentile(windows_us, 99),
            "max": max(windows_us),
            "nonzero": sorted(round(w) for w in windows_us if w > 0),
        },
        "first_poll_stale": first_poll_stale,
        "polls_per_trial": polls_total / trials,
        "stale_cache_reads": stale_cache_reads,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    say("starting a Redis Cluster: 3 masters x 1 replica")
    cluster = await asyncio.to_thread(RedisCluster(masters=3, replicas=1).start)
    try:
        await asyncio.to_thread(wait_replicas_listed, cluster)
        out = {}
        conditions = [("idle", 0, 0), ("1KB", args.writers, 1024), ("64KB", args.writers, 65536)]
        for label, writers, size in conditions:
            say(f"{label}: {args.trials} trials, {writers} background writers of {size} B values")
            out[label] = await measure(cluster, args.trials, writers, size, label)
        return out
    finally:
        await asyncio.to_thread(cluster.close)


def render(results: dict[str, Any]) -> None:
    rows = []
    for r in results["conditions"].values():
        w = r["window_us"]
        rows.append(
            [
                "idle"
                if not r["writers"]
                else f"{r['writers']} writers x {r['value_bytes'] // 1024} KB, {r['background_writes_per_s']} SET/s",
                r["trials"],
                w["p50"],
                w["p99"],
                w["max"],
                r["poll_rtt_us_p50"],
                f"{r['first_poll_stale']}/{r['trials']}",
                f"{r['stale_cache_reads']}/{r['trials']}",
            ]
        )
    results["tables"] = [
        table(
            "Replica staleness after invalidate_item returned (3 masters x 1 replica, 127.0.0.1)",
            [
                "condition",
                "trials",
                "window p50 µs",
                "window p99 µs",
                "window max µs",
                "poll RTT p50 µs",
                "first replica poll stale",
                "cache read right after stale",
            ],
            rows,
            [
                "window: time after invalidate_item returned until the replica no longer had the entry "
                "(send time of the first poll that missed it; 0 when the first poll already missed it). "
                "Resolution: one poll round trip (poll RTT).",
                "cache read: Cache(RedisCluster(load_balancing_strategy=RANDOM_REPLICA)) calling the item "
                "right after the invalidation, counted when it returned the old value.",
            ],
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=500, help="trials per condition")
    parser.add_argument(
        "--writers", type=int, default=16, help="background writer tasks in the loaded condition"
    )
    parser.add_argument("--quick", action="store_true", help="100 trials per condition")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.trials = 100
    results: dict[str, Any] = {"conditions": asyncio.run(run(args))}
    render(results)
    finish(results, args.json)


if __name__ == "__main__":
    main()
