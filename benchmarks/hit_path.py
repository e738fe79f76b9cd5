"""Hit-path cost of ``@cached_item`` against the raw Redis floor and the peers, side by side.

The floor is what any cache must do at least: one ``redis.asyncio`` GET of the
same ~1 KB item plus one ``msgpack.unpackb`` (with the extension types that
keep ``Decimal`` and ``set`` exact). The peers, where installed (``make bench``
installs them), cache the same item on the same Redis through their decorators:
aiocache with a msgpack serializer built on the same codec, and cashews with
its defaults.

Rounds are interleaved (floor, swr_cache, peers, floor, ...). Sequential
calls are timed one by one: the table gives the median over rounds of each
round's mean, and p50/p99 of every call pooled. The concurrent columns are 100
callers at once (``asyncio.gather``), of the same key and of 100 distinct
keys, median calls per second over rounds. A process woken on the other CPU of a small VM pays for the
wake-up on every round trip, so the run is repeated with this process pinned
to the first CPU and the redis-server it started pinned to the second
(``--no-pin`` skips that).

    python benchmarks/hit_path.py [--quick] [--redis-url URL] [--rounds 15] [--calls 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import msgpack
import redis.asyncio as aioredis
from _common import (
    aiocache_kwargs,
    finish,
    floor_reader,
    make_item,
    percentile,
    say,
    start_redis,
    table,
)

from swr_cache import Cache, _codec, cached_item

KEY = "user#000123"
WIDTH = 100
KEYS = [f"user#{i:06d}" for i in range(WIDTH)]
Fn = Callable[[], Awaitable[Any]]
KeyFn = Callable[[str], Awaitable[Any]]

CONFIG = {
    "floor": "redis.asyncio GET of the msgpack blob + msgpack.unpackb with the codec's ext hook",
    "swr_cache": "@cached_item (format 3: one GET of the entry's string, header + msgpack blob), soft_ttl 3600 s",
    "aiocache": "aiocache.cached(RedisCache, ttl=3600), a msgpack serializer on the same codec",
    "cashews": "cashews @cache(ttl='1h') defaults (protected=True), pickle (its default)",
}


async def timed_sequential(fn: Fn, calls: int, sink: list[float] | None = None) -> float:
    """Microseconds per call, one call at a time; each call's time goes to ``sink``."""
    clock = time.perf_counter
    t0 = clock()
    for _ in range(calls):
        t = clock()
        await fn()
        if sink is not None:
            sink.append((clock() - t) * 1e6)
    return (clock() - t0) / calls * 1e6


async def timed_concurrent(fn: Fn, calls: int, width: int) -> float:
    """Calls per second with ``width`` concurrent callers of the same key."""
    rounds = max(1, calls // width)
    t0 = time.perf_counter()
    for _ in range(rounds):
        await asyncio.gather(*(fn() for _ in range(width)))
    return rounds * width / (time.perf_counter() - t0)


async def timed_distinct(fn: KeyFn, calls: int) -> float:
    """Calls per second with ``WIDTH`` concurrent callers of ``WIDTH`` distinct keys."""
    rounds = max(1, calls // WIDTH)
    t0 = time.perf_counter()
    for _ in range(rounds):
        await asyncio.gather(*(fn(k) for k in KEYS))
    return rounds * WIDTH / (time.perf_counter() - t0)


async def peer_aiocache(url: str, item: dict[str, Any]) -> tuple[Fn, Any, KeyFn] | None:
    try:
        import aiocache  # type: ignore[import-untyped]
    except ImportError:
        return None

    @aiocache.cached(
        ttl=3600, key_builder=lambda f, user_id: f"aiocache:{user_id}", **aiocache_kwargs(url)
    )  # type: ignore[untyped-decorator]
    async def get_user(user_id: str) -> dict[str, Any]:
        return dict(item)

    await get_user(KEY)
    for k in KEYS:
        await get_user(k)

    async def call() -> Any:
        return await get_user(KEY)

    return call, get_user.cache, get_user


async def peer_cashews(url: str, item: dict[str, Any]) -> tuple[Fn, Any, KeyFn] | None:
    try:
        from cashews import Cache as CashewsCache
    except ImportError:
        return None
    cache = CashewsCache()
    cache.setup(url, client_side=False)

    @cache(ttl="1h", key="cashews:{user_id}")
    async def get_user(user_id: str) -> dict[str, Any]:
        return dict(item)

    await get_user(KEY)
    for k in KEYS:
        await get_user(k)

    async def call() -> Any:
        return await get_user(KEY)

    return call, cache, get_user


async def run(url: str, rounds: int, calls: int, mode: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url, max_connections=200, socket_timeout=0.5)
    item = make_item(KEY)
    await client.set("floor:item", _codec.encode(item))
    floor = floor_reader(client, "floor:item")
    await client.mset({f"floor:{k}": _codec.encode(item) for k in KEYS})
    ext_hook = _codec._ext_hook

    async def floor_key(key: str) -> Any:
        return msgpack.unpackb(
            await client.get(f"floor:{key}"), raw=False, strict_map_key=False, ext_hook=ext_hook
        )

    cache = Cache(client, namespace="bench", soft_ttl=3600, hard_ttl=7200)
    async with cache:

        @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
        async def get_user(user_id: str) -> dict[str, Any] | None:
            return dict(item)

        if await get_user(KEY) != item:
            raise RuntimeError("swr_cache returned another item")
        for k in KEYS:
            await get_user(k)

        async def ours() -> Any:
            return await get_user(KEY)

        contenders: dict[str, Fn] = {"floor": floor, "swr_cache": ours}
        by_key: dict[str, KeyFn] = {"floor": floor_key, "swr_cache": get_user}
        closers = []
        for name, make in (("aiocache", peer_aiocache), ("cashews", peer_cashews)):
            got = await make(url, item)
            if got is None:
                say(f"  {name} is not installed: skipped")
                continue
            contenders[name], closer, by_key[name] = got
            closers.append(closer)
        for name, fn in contenders.items():
            if await fn() != item:
                raise RuntimeError(f"{name} returned another item")
            await timed_sequential(fn, 200)  # warm up
        means: dict[str, list[float]] = {k: [] for k in contenders}
        each: dict[str, list[float]] = {k: [] for k in contenders}
        conc: dict[str, list[float]] = {k: [] for k in contenders}
        distinct: dict[str, list[float]] = {k: [] for k in contenders}
        for i in range(rounds):
            say(f"  {mode}: round {i + 1}/{rounds}")
            for name, fn in contenders.items():
                means[name].append(await timed_sequential(fn, calls, each[name]))
                conc[name].append(await timed_concurrent(fn, calls, WIDTH))
                distinct[name].append(await timed_distinct(by_key[name], calls))
        loads = cache.stats()[get_user.name]["loads"]
        for closer in closers:
            close = getattr(closer, "close", None)
            if close is not None:
                await close()
    await client.aclose()
    return {
        "us_per_call": {k: statistics.median(v) for k, v in means.items()},
        "p50_us": {k: percentile(v, 50) for k, v in each.items()},
        "p90_us": {k: percentile(v, 90) for k, v in each.items()},
        "p99_us": {k: percentile(v, 99) for k, v in each.items()},
        "calls_per_s_100": {k: statistics.median(v) for k, v in conc.items()},
        "calls_per_s_100_distinct": {k: statistics.median(v) for k, v in distinct.items()},
        "spread_distinct": {k: (min(v), max(v)) for k, v in distinct.items()},
        "spread_us": {k: (min(v), max(v)) for k, v in means.items()},
        "origin_loads": loads,
    }


def render(results: dict[str, Any], modes: dict[str, str], args: argparse.Namespace) -> None:
    tables = []
    names: list[str] = []
    for mode, where in modes.items():
        r = results[mode]
        seq, conc = r["us_per_call"], r["calls_per_s_100"]
        dist = r["calls_per_s_100_distinct"]
        names = list(seq)
        rows = [
            [
                name,
                seq[name],
                seq[name] / seq["floor"],
                r["p50_us"][name],
                r["p99_us"][name],
                conc[name],
                conc[name] / conc["floor"],
                dist[name],
                dist[name] / dist["floor"],
            ]
            for name in names
        ]
        notes = [f"{where}; {args.rounds} rounds of {args.calls} calls per contender"]
        if mode == next(iter(modes)):
            notes += [f"{k}: {v}" for k, v in CONFIG.items() if k in seq]
            notes.append(
                f"{WIDTH} same-key callers: swr_cache shares one Redis read among concurrent hits of a key"
                " (each caller decodes its own copy); cashews' protected=True shares one call (every caller"
                " gets the same object); the floor and aiocache send one GET per caller"
            )
            notes.append(
                f"{WIDTH} distinct-key callers: swr_cache sends the reads made while one is under way"
                " as one pipeline on one connection (Cache(batch_reads=True), the default); the floor"
                " and the peers send one command per caller"
            )
        notes.append(
            f"swr_cache origin loads during the run: {r['origin_loads']} (the warm-up fill)"
        )
        tables.append(
            table(
                f"Hit path, ~1 KB item ({mode})",
                [
                    "contender",
                    "us/call",
                    "x floor",
                    "p50 us",
                    "p99 us",
                    f"{WIDTH} same-key calls/s",
                    "x floor",
                    f"{WIDTH} distinct-key calls/s",
                    "x floor",
                ],
                rows,
                notes=notes,
            )
        )
    results["tables"] = tables
    percentiles: dict[str, list[float]] = {}
    rates: dict[str, list[float]] = {}
    for mode in modes:
        r = results[mode]
        for q in ("p50", "p99"):
            percentiles[f"{q} ({mode})"] = [r[f"{q}_us"][n] for n in names]
        rates[mode] = [r["calls_per_s_100"][n] for n in names]
    results["charts"] = [
        {
            "file": "hit_path.png",
            "title": "Hit path: latency of one cached ~1 KB item, per call (lower is better)",
            "kind": "bar",
            "categories": names,
            "series": percentiles,
            "ylabel": "microseconds per call (log scale)",
            "log": True,
        },
        {
            "file": "hit_path_concurrent.png",
            "title": f"Hit path: {WIDTH} concurrent callers of one key, calls per second (higher is better)",
            "kind": "bar",
            "categories": names,
            "series": rates,
            "ylabel": "calls per second",
            "log": False,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--no-pin", action="store_true", help="skip the pinned run")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 500 calls, no pinned run")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.calls, args.no_pin = min(args.rounds, 3), min(args.calls, 500), True
    url, server = start_redis(args.redis_url)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    modes = {"unpinned": "unpinned: the scheduler places both processes"}
    if not args.no_pin and len(cpus) >= 2 and server is not None and server.pid:
        modes["pinned"] = f"pinned: this process on CPU {cpus[0]}, redis-server on CPU {cpus[1]}"
    results: dict[str, Any] = {
        "benchmark": "hit_path",
        "config": {
            "rounds": args.rounds,
            "calls": args.calls,
            "width": WIDTH,
            "contenders": CONFIG,
        },
    }
    say(
        f"hit path: {args.rounds} interleaved rounds of {args.calls} calls, modes: {', '.join(modes)}"
    )
    try:
        for mode in modes:
            if mode == "pinned":
                os.sched_setaffinity(0, {cpus[0]})
                os.sched_setaffinity(server.pid, {cpus[1]})
            results[mode] = asyncio.run(run(url, args.rounds, args.calls, mode))
    finally:
        if server is not None:
            server.stop()
    render(results, modes, args)
    finish(results, args.json)


if __name__ == "__main__":
    main()
