"""DynamoTable in front of DynamoDB (moto's server over HTTP): latency, and reads saved on a skewed workload.

Part 1, latency: one ~1 KB item by GetItem and 100 items by BatchGetItem,
uncached (``DynamoTable``) against cached hits (``DynamoTable.cached``), medians
of interleaved rounds and their ratio. moto answers faster than DynamoDB over
a network would (no TLS, no cross-AZ hop), so the ratios here understate what
a cache saves in production.

Part 2, a workload: Zipf(1.1) over a key space of 100,000 keys, the most
popular of them seeded as items (the rest absent: negative caching), with 5%
of operations writes through the view, run by concurrent clients in two
modes: invalidate on write (the default) and guarded write-through (a version
attribute). The cache is first warmed with ``warm()`` over the whole key space
(its cost is reported), so the figures are the steady state: under Zipf(1.1)
a tenth of the probability mass lies beyond the 10,000 most popular keys, and
a cold cache would keep meeting keys for the first time for millions of
operations. TTLs outlast the run, so every DynamoDB read counted is caused by
a write. Reported: the fraction of reads that never reached DynamoDB, and
stale reads: reads that began after a write to their key had returned and
still got an older version.

    python benchmarks/dynamodb.py [--quick] [--endpoint-url URL --redis-url URL] [--json FILE]

Without URLs it starts its own redis-server, and moto's server in a process
of its own (so its CPU time does not compete with the client for the GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextlib import ExitStack, suppress
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import finish, say, table

from devtools.devservers import MotoProcess, MotoServer, RedisServer, set_dummy_aws_env
from swr_cache import Cache, DynamoTable

TABLE = "BenchUsers"
Fn = Callable[[], Awaitable[Any]]


def key_of(rank: int) -> str:
    return f"user#{rank:06d}"


def make_item(pk: str, version: int) -> dict[str, Any]:
    """A ~1 KB user item; ``v`` is its version."""
    return {
        "pk": pk,
        "v": version,
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "roles": {"admin", "editor"},
        "address": {"street": "12 St James's Square", "city": "London"},
        "bio": "x" * 800,
    }


async def create_table(client: Any) -> None:
    with suppress(client.exceptions.ResourceNotFoundException):
        await client.delete_table(TableName=TABLE)
    await client.create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )


async def seed(client: Any, ranks: range) -> float:
    """Write items for ``ranks`` straight to DynamoDB (25 per BatchWriteItem, 8 in flight)."""
    from boto3.dynamodb.types import TypeSerializer

    ser = TypeSerializer()
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(8)

    async def chunk(part: list[int]) -> None:
        requests = [
            {
                "PutRequest": {
                    "Item": {k: ser.serialize(v) for k, v in make_item(key_of(r), 0).items()}
                }
            }
            for r in part
        ]
        async with sem:
            pending: dict[str, Any] = {TABLE: requests}
            while pending:
                reply = await client.batch_write_item(RequestItems=pending)
                pending = reply.get("UnprocessedItems") or {}

    parts = [list(ranks[i : i + 25]) for i in range(0, len(ranks), 25)]
    await asyncio.gather(*(chunk(p) for p in parts))
    return time.perf_counter() - t0


async def per_call_us(fn: Fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        await fn()
    return (time.perf_counter() - t0) / calls * 1e6


async def latency(
    client: Any, cache: Cache, rounds: int, calls: int, batch_calls: int
) -> list[dict[str, Any]]:
    table = DynamoTable(client, TABLE, key_schema=["pk"])
    view = table.cached(cache, soft_ttl=3600, hard_ttl=7200, negative_ttl=3600, name="latency")
    one = {"pk": key_of(0)}
    hundred = [{"pk": key_of(r)} for r in range(100)]
    await view.get_item(one)
    await view.batch_get_item(hundred)
    cases: list[tuple[str, Fn, Fn, int]] = [
        ("GetItem (1 KB item)", lambda: table.get_item(one), lambda: view.get_item(one), calls),
        (
            "BatchGetItem (100 keys)",
            lambda: table.batch_get_item(hundred),
            lambda: view.batch_get_item(hundred),
            batch_calls,
        ),
    ]
    rows = []
    for name, uncached, cached, n in cases:
        plain: list[float] = []
        hit: list[float] = []
        for _ in range(rounds):  # interleaved, so drift hits both alike
            plain.append(await per_call_us(uncached, n))
            hit.append(await per_call_us(cached, n))
        u, c = statistics.median(plain), statistics.median(hit)
        rows.append({"operation": name, "uncached_us": u, "cached_us": c, "ratio": u / c})
    return rows


def zipf_cum_weights(n: int, s: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (k**s) for k in range(1, n + 1)))


async def warm_all(client: Any, cache: Cache, keyspace: int) -> dict[str, Any]:
    """Load every key of the key space into the cache with batch reads."""
    calls = 0

    def count(**_: Any) -> None:
        nonlocal calls
        calls += 1

    client.meta.events.register("before-call.dynamodb.BatchGetItem", count, unique_id="bench-warm")
    view = DynamoTable(client, TABLE, key_schema=["pk"]).cached(
        cache, soft_ttl=3600, hard_ttl=7200, negative_ttl=3600, name="warm"
    )
    t0 = time.perf_counter()
    loaded = 0
    step = 5_000
    for start in range(0, keyspace, step):
        keys = [{"pk": key_of(r)} for r in range(start, min(start + step, keyspace))]
        loaded += await view.warm(keys)
    seconds = time.perf_counter() - t0
    client.meta.events.unregister(
        "before-call.dynamodb.BatchGetItem", count, unique_id="bench-warm"
    )
    return {"keys": keyspace, "loaded": loaded, "batch_get_calls": calls, "seconds": seconds}


async def workload(
    client: Any,
    cache: Cache,
    *,
    mode: str,
    keyspace: int,
    ops: int,
    write_fraction: float,
    concurrency: int,
    cum: list[float],
    rng: random.Random,
    versions: dict[int, int],
) -> dict[str, Any]:
    """Run the mixed workload through one view; count DynamoDB reads and stale reads."""
    table = DynamoTable(client, TABLE, key_schema=["pk"])
    if mode == "write-through":
        view = table.cached(
            cache,
            soft_ttl=3600,
            hard_ttl=7200,
            negative_ttl=3600,
            write_through=True,
            version_attribute="v",
            name=mode,
        )
    else:
        view = table.cached(cache, soft_ttl=3600, hard_ttl=7200, negative_ttl=3600, name=mode)
    dynamo_reads = 0

    def count(**_: Any) -> None:
        nonlocal dynamo_reads
        dynamo_reads += 1

    client.meta.events.register("before-call.dynamodb.GetItem", count, unique_id=f"bench-{mode}")
    ranks = rng.choices(range(keyspace), cum_weights=cum, k=ops)
    is_write = [rng.random() < write_fraction for _ in range(ops)]
    completed: dict[int, int] = {}  # rank -> highest version whose write has returned
    locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
    reads = stale = writes = 0
    cursor = iter(range(ops))
    t0 = time.perf_counter()

    step = max(1, ops // 5)

    async def client_loop() -> None:
        nonlocal reads, stale, writes
        for i in cursor:
            if i and i % step == 0:
                say(f"  {mode}: {i:,}/{ops:,} operations")
            rank = ranks[i]
            if is_write[i]:
                async with locks[rank]:  # one writer per key at a time: versions land in order
                    version = versions[rank] = versions[rank] + 1
                    await view.put_item(make_item(key_of(rank), version))
                    completed[rank] = version
                    writes += 1
            else:
                required = completed.get(rank, -1)
                item = await view.get_item({"pk": key_of(rank)})
                got = -1 if item is None else int(item["v"])
                reads += 1
                if got < required:
                    stale += 1

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    client.meta.events.unregister("before-call.dynamodb.GetItem", count, unique_id=f"bench-{mode}")
    stats = cache.stats()[view.name]
    return {
        "mode": mode,
        "reads": reads,
        "writes": writes,
        "dynamodb_reads": dynamo_reads,
        "reads_saved": 1.0 - dynamo_reads / reads if reads else 0.0,
        "stale_reads_after_completed_writes": stale,
        "seconds": elapsed,
        "ops_per_s": ops / elapsed,
        "hits": stats["hits"],
        "negative_hits": stats["negative_hits"],
        "misses": stats["misses"],
        "write_throughs": stats["write_throughs"],
        "fills_rejected": stats["fills_rejected"],
    }


async def run(args: argparse.Namespace, endpoint_url: str, redis_url: str) -> dict[str, Any]:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(max_pool_connections=64, retries={"max_attempts": 3, "mode": "standard"})
    redis_client = aioredis.Redis.from_url(redis_url, socket_timeout=2.0, max_connections=64)
    out: dict[str, Any] = {"config": vars(args)}
    try:
        async with get_session().create_client(
            "dynamodb", endpoint_url=endpoint_url, region_name="us-east-1", config=config
        ) as client:
            await create_table(client)
            say(f"seeding {args.seeded:,} items")
            seconds = await seed(client, range(args.seeded))
            out["seed"] = {"items": args.seeded, "seconds": seconds}
            say(f"  seeded in {seconds:.1f} s ({args.seeded / seconds:,.0f} items/s)")
            await redis_client.flushdb()
            cache = Cache(redis_client, namespace="bench-ddb", early_refresh=0)
            async with cache:
                say(f"latency: {args.rounds} interleaved rounds, uncached vs cached")
                out["latency"] = await latency(
                    client, cache, args.rounds, args.calls, args.batch_calls
                )
            cum = zipf_cum_weights(args.keyspace, args.zipf)
            versions: dict[int, int] = defaultdict(int)
            out["workload"] = []
            await redis_client.flushdb()
            cache = Cache(redis_client, namespace="bench-ddb-zipf", early_refresh=0)
            async with cache:
                say(f"warming the cache over {args.keyspace:,} keys")
                out["warm"] = warm = await warm_all(client, cache, args.keyspace)
                say(
                    f"  {warm['loaded']:,} loaded with {warm['batch_get_calls']:,} BatchGetItem calls"
                    f" in {warm['seconds']:.1f} s"
                )
                # Both modes run on the warmed entries, one after the other.
                for mode in ("invalidate", "write-through"):
                    say(f"workload ({mode}): {args.ops:,} operations, {args.concurrency} clients")
                    out["workload"].append(
                        await workload(
                            client,
                            cache,
                            mode=mode,
                            keyspace=args.keyspace,
                            ops=args.ops,
                            write_fraction=args.write_fraction,
                            concurrency=args.concurrency,
                            cum=cum,
                            rng=random.Random(args.seed + len(out["workload"])),
                            versions=versions,
                        )
                    )
    finally:
        await redis_client.aclose()
    return out


def render(results: dict[str, Any], args: argparse.Namespace) -> None:
    """The tables and charts of a run (``run_all.py`` draws the charts)."""
    lat = results["latency"]
    work = results["workload"]
    warm = results["warm"]
    results["tables"] = [
        table(
            f"DynamoTable against moto over HTTP: uncached vs cached hit (medians of {args.rounds} interleaved rounds)",
            ["operation", "uncached us", "cached us", "uncached / cached"],
            [[r["operation"], r["uncached_us"], r["cached_us"], r["ratio"]] for r in lat],
            notes=[
                "moto on loopback answers faster than DynamoDB over a network, so these ratios"
                " understate what a hit saves in production",
            ],
        ),
        table(
            f"Zipf({args.zipf}) over {args.keyspace:,} keys ({args.seeded:,} seeded, the rest absent),"
            f" {args.ops:,} operations, {args.write_fraction:.0%} writes, {args.concurrency} clients",
            [
                "mode",
                "reads",
                "writes",
                "DynamoDB reads",
                "reads saved %",
                "stale reads after a write",
                "ops/s",
            ],
            [
                [
                    r["mode"],
                    r["reads"],
                    r["writes"],
                    r["dynamodb_reads"],
                    100.0 * r["reads_saved"],
                    r["stale_reads_after_completed_writes"],
                    r["ops_per_s"],
                ]
                for r in work
            ],
            notes=[
                f"warmed first with warm(): {warm['loaded']:,} of {warm['keys']:,} keys loaded by"
                f" {warm['batch_get_calls']:,} BatchGetItem calls in {warm['seconds']:.1f} s",
                "TTLs outlast the run: every DynamoDB read counted follows a write",
                "stale read: began after a write to its key had returned, and got an older version",
                "target: >= 95% of reads saved, 0 stale reads after a completed write",
            ],
        ),
    ]
    results["charts"] = [
        {
            "file": "dynamodb_latency.png",
            "title": "DynamoTable: uncached call vs cached hit (moto over HTTP)",
            "kind": "bar",
            "categories": [r["operation"] for r in lat],
            "series": {
                "uncached (DynamoDB)": [r["uncached_us"] for r in lat],
                "cached hit (Redis)": [r["cached_us"] for r in lat],
            },
            "ylabel": "microseconds per call (log scale)",
            "log": True,
        },
        {
            "file": "dynamodb_reads.png",
            "title": (
                f"Zipf workload, {args.write_fraction:.0%} writes: reads served vs reads that reached DynamoDB"
                f" (stale reads after a write: {sum(r['stale_reads_after_completed_writes'] for r in work)})"
            ),
            "kind": "bar",
            "categories": [r["mode"] for r in work],
            "series": {
                "reads served": [r["reads"] for r in work],
                "DynamoDB reads": [r["dynamodb_reads"] for r in work],
            },
            "ylabel": "reads",
            "log": False,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--endpoint-url", help="DynamoDB endpoint (default: start moto's server)")
    parser.add_argument(
        "--redis-url", help="Redis URL (default: start a redis-server); its db is flushed"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (CI)")
    parser.add_argument("--keyspace", type=int, default=100_000)
    parser.add_argument(
        "--seeded", type=int, default=None, help="items seeded (most popular first)"
    )
    parser.add_argument("--ops", type=int, default=None)
    parser.add_argument("--write-fraction", type=float, default=0.05)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--calls", type=int, default=None, help="GetItem calls per round")
    parser.add_argument(
        "--batch-calls", type=int, default=None, help="BatchGetItem calls per round"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    quick = args.quick
    defaults = {
        "seeded": 1_000 if quick else 10_000,
        "ops": 3_000 if quick else 30_000,
        "rounds": 3 if quick else 7,
        "calls": 20 if quick else 200,
        "batch_calls": 3 if quick else 20,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if quick and args.keyspace == 100_000:
        args.keyspace = 10_000
    with ExitStack() as stack:
        endpoint_url = args.endpoint_url
        redis_url = args.redis_url
        set_dummy_aws_env()
        if endpoint_url is None:
            try:
                moto = MotoProcess().start()
            except (OSError, RuntimeError):
                endpoint_url = stack.enter_context(MotoServer()).endpoint_url
            else:
                stack.callback(moto.stop)
                endpoint_url = moto.endpoint_url
        if redis_url is None:
            redis_url = stack.enter_context(RedisServer()).url
        results = asyncio.run(run(args, endpoint_url, redis_url))
    render(results, args)
    finish(results, args.json)


if __name__ == "__main__":
    main()
