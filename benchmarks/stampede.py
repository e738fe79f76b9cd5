"""Cold stampede: 1000 concurrent callers of one uncached key, origin calls counted per library.

Every contender caches the same ~1 KB item on the same Redis; the origin takes
``--origin-ms`` (50 ms) and counts its calls. Each round gives every contender
a fresh key, in rotating order, and the table reports medians over rounds.
Run twice: all callers in one process, then split over ``--processes`` (4) OS
processes started together, where only a lock or lease *in Redis* can keep the
origin calls at one. Besides origin calls it reports how long callers waited
(p50/p99/max from the burst's start) and how many Redis commands the burst
cost (``INFO stats``: a polling lock shows up there).

Contenders (with a 64-connection blocking pool unless said otherwise):

* swr_cache ``@cached_item`` — in-process single flight plus a lease in Redis;
* aiocache ``cached`` — no stampede protection;
* aiocache ``cached_stampede`` — a Redis lock (``lease=2`` s, its default);
* aiocache ``cached`` on its default connection pool (which raises when exhausted);
* cashews ``@cache`` — defaults (in-process coalescing, ``protected=True``);
* cashews ``@cache(lock=True)`` — plus a Redis lock (waiters re-try it in a loop);
* cashews ``@cache.early`` — early recomputation (helps hot keys, not cold ones).

    python benchmarks/stampede.py [--quick] [--rounds 7] [--callers 1000] [--processes 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from multiprocessing.connection import Connection
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis.asyncio as aioredis
from _common import (
    aiocache_kwargs,
    finish,
    make_item,
    median,
    median_count,
    percentile,
    say,
    start_redis,
    table,
    total_commands,
)

from swr_cache import Cache, cached_item

Fn = Callable[[str], Awaitable[Any]]

CONFIG = {
    "swr_cache": "@cached_item on Cache.from_url (lease_ttl 5 s, lease_wait = lease_ttl), msgpack",
    "aiocache cached": "aiocache.cached(RedisCache, ttl=3600), msgpack serializer on the same codec",
    "aiocache cached_stampede": "aiocache.cached_stampede(RedisCache, ttl=3600, lease=2), msgpack serializer",
    "aiocache cached (default pool)": (
        "aiocache.cached(RedisCache, ttl=3600) on its default pool: redis-py's ConnectionPool, which"
        " raises when its 100 connections are busy; aiocache logs and swallows that (read as a miss)"
    ),
    "cashews cache": "cashews @cache(ttl='1h') defaults (protected=True), pickle (its default)",
    "cashews cache(lock=True)": "cashews @cache(ttl='1h', lock=True): Redis lock, waiters retry with check_interval=0",
    "cashews early": "cashews @cache.early(ttl='1h') (early_ttl = 0.33 ttl), pickle",
}
POOL = 64
BURST_LIMIT_S = 60.0


class Origin:
    """A slow origin that counts its calls."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0

    async def load(self, key: str) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return make_item(key)


async def build(url: str, origin: Origin, stack: contextlib.AsyncExitStack) -> dict[str, Fn]:
    """Every contender over one origin, each with its own key space on the same Redis."""
    contenders: dict[str, Fn] = {}
    cache = await stack.enter_async_context(
        Cache.from_url(
            url, namespace="bench-stampede", max_connections=POOL, soft_ttl=3600, hard_ttl=7200
        )
    )

    @cached_item(cache, table="Users", key=lambda key: {"pk": key}, name="stampede")
    async def swr(key: str) -> dict[str, Any] | None:
        return await origin.load(key)

    contenders["swr_cache"] = swr
    try:
        import aiocache  # type: ignore[import-untyped]
        from redis.asyncio import BlockingConnectionPool
    except ImportError:
        say("  aiocache is not installed: skipped")
    else:
        kw = aiocache_kwargs(url)
        kw.update(pool_max_size=POOL, connection_pool_class=BlockingConnectionPool)

        @aiocache.cached(ttl=3600, key_builder=lambda f, key: f"aio:{key}", **kw)  # type: ignore[untyped-decorator]
        async def aio_plain(key: str) -> dict[str, Any]:
            return await origin.load(key)

        @aiocache.cached_stampede(ttl=3600, lease=2, key_builder=lambda f, key: f"aios:{key}", **kw)  # type: ignore[untyped-decorator]
        async def aio_stampede(key: str) -> dict[str, Any]:
            return await origin.load(key)

        default_pool = aiocache_kwargs(url)

        @aiocache.cached(ttl=3600, key_builder=lambda f, key: f"aiod:{key}", **default_pool)  # type: ignore[untyped-decorator]
        async def aio_default(key: str) -> dict[str, Any]:
            return await origin.load(key)

        # aiocache logs every swallowed Redis error with a traceback: thousands of lines here.
        logging.getLogger("aiocache").setLevel(logging.CRITICAL)
        contenders["aiocache cached"] = aio_plain
        contenders["aiocache cached_stampede"] = aio_stampede
        contenders["aiocache cached (default pool)"] = aio_default
        for fn in (aio_plain, aio_stampede, aio_default):
            stack.push_async_callback(fn.cache.close)
    try:
        from cashews import Cache as CashewsCache
    except ImportError:
        say("  cashews is not installed: skipped")
    else:
        cashews = CashewsCache()
        cashews.setup(url, client_side=False, max_connections=POOL)

        @cashews(ttl="1h", key="cw:{key}")
        async def cw_plain(key: str) -> dict[str, Any]:
            return await origin.load(key)

        @cashews(ttl="1h", key="cwl:{key}", lock=True)
        async def cw_lock(key: str) -> dict[str, Any]:
            return await origin.load(key)

        @cashews.early(ttl="1h", key="cwe:{key}")
        async def cw_early(key: str) -> dict[str, Any]:
            return await origin.load(key)

        contenders["cashews cache"] = cw_plain
        contenders["cashews cache(lock=True)"] = cw_lock
        contenders["cashews early"] = cw_early
        stack.push_async_callback(cashews.close)
    return contenders


async def burst(fn: Fn, origin: Origin, key: str, callers: int) -> dict[str, Any]:
    """``callers`` concurrent calls of ``fn(key)``; latencies from the burst's start."""
    latencies: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}
    before = origin.calls
    t0 = time.perf_counter()

    async def one() -> None:
        nonlocal errors
        try:
            got = await fn(key)
            if not isinstance(got, dict) or got.get("pk") != key:
                errors += 1
                kinds["wrong value"] = kinds.get("wrong value", 0) + 1
        except Exception as exc:
            errors += 1
            kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
        latencies.append((time.perf_counter() - t0) * 1000.0)

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(callers))), BURST_LIMIT_S)
    return {
        "origin_calls": origin.calls - before,
        "latencies_ms": latencies,
        "errors": errors,
        "error_kinds": kinds,
    }


# -- across processes -------------------------------------------------------------


def worker(conn: Connection, url: str, origin_ms: float) -> None:
    """One OS process of the multi-process run: bursts on command, results back through ``conn``."""
    asyncio.run(_worker(conn, url, origin_ms))


async def _worker(conn: Connection, url: str, origin_ms: float) -> None:
    origin = Origin(origin_ms / 1000.0)
    async with contextlib.AsyncExitStack() as stack:
        contenders = await build(url, origin, stack)
        conn.send(sorted(contenders))
        while True:
            command = await asyncio.to_thread(conn.recv)
            if command is None:
                break
            name, key, callers, start_at = command
            # Every process starts its burst at the same wall-clock instant.
            await asyncio.sleep(max(0.0, start_at - time.time()))
            try:
                result = await burst(contenders[name], origin, key, callers)
            except TimeoutError:
                result = {
                    "origin_calls": 0,
                    "latencies_ms": [],
                    "errors": callers,
                    "error_kinds": {"timeout": callers},
                }
            conn.send(result)
    conn.close()


class Workers:
    """``n`` spawned processes, each with every contender built once."""

    def __init__(self, n: int, url: str, origin_ms: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(child, url, origin_ms), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        ready = [conn.recv() for conn in self.conns]  # every worker built its contenders
        self.names = ready[0]

    def burst(self, name: str, key: str, callers: int) -> dict[str, Any]:
        share = [
            callers // len(self.conns) + (1 if i < callers % len(self.conns) else 0)
            for i in range(len(self.conns))
        ]
        start_at = time.time() + 0.2
        for conn, n in zip(self.conns, share, strict=True):
            conn.send((name, key, n, start_at))
        parts = [conn.recv() for conn in self.conns]
        return {
            "origin_calls": sum(p["origin_calls"] for p in parts),
            "latencies_ms": [x for p in parts for x in p["latencies_ms"]],
            "errors": sum(p["errors"] for p in parts),
            "error_kinds": merge_kinds(p["error_kinds"] for p in parts),
        }

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()


# -- the run ------------------------------------------------------------------------


def merge_kinds(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for kind, n in part.items():
            out[kind] = out.get(kind, 0) + n
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    calls = [r["origin_calls"] for r in runs]
    return {
        "origin_calls_median": median_count(calls),
        "origin_calls_min": min(calls),
        "origin_calls_max": max(calls),
        "p50_ms": median([percentile(r["latencies_ms"], 50) for r in runs]),
        "p99_ms": median([percentile(r["latencies_ms"], 99) for r in runs]),
        "max_ms": median([max(r["latencies_ms"], default=float("nan")) for r in runs]),
        "redis_commands_median": median_count([r["redis_commands"] for r in runs]),
        "errors": sum(r["errors"] for r in runs),
        "error_kinds": merge_kinds(r["error_kinds"] for r in runs),
        "rounds": len(runs),
    }


async def single_process(url: str, args: argparse.Namespace) -> dict[str, Any]:
    origin = Origin(args.origin_ms / 1000.0)
    probe = aioredis.Redis.from_url(url)
    runs: dict[str, list[dict[str, Any]]] = {}
    async with contextlib.AsyncExitStack() as stack:
        contenders = await build(url, origin, stack)
        names = list(contenders)
        for r in range(args.rounds):
            say(f"  1 process: round {r + 1}/{args.rounds}")
            for name in names[r % len(names) :] + names[: r % len(names)]:
                key = f"cold-{uuid.uuid4().hex[:12]}"
                before = await total_commands(probe)
                result = await burst(contenders[name], origin, key, args.callers)
                result["redis_commands"] = await total_commands(probe) - before - 1
                runs.setdefault(name, []).append(result)
    await probe.aclose()
    return {name: summarize(rs) for name, rs in runs.items()}


def multi_process(url: str, args: argparse.Namespace) -> dict[str, Any]:
    say(f"  starting {args.processes} worker processes")
    workers = Workers(args.processes, url, args.origin_ms)
    runs: dict[str, list[dict[str, Any]]] = {}

    async def commands() -> int:
        client = aioredis.Redis.from_url(url)
        try:
            return await total_commands(client)
        finally:
            await client.aclose()

    try:
        names = [n for n in CONFIG if n in workers.names]
        for r in range(args.rounds):
            say(f"  {args.processes} processes: round {r + 1}/{args.rounds}")
            for name in names[r % len(names) :] + names[: r % len(names)]:
                key = f"cold-{uuid.uuid4().hex[:12]}"
                before = asyncio.run(commands())
                result = workers.burst(name, key, args.callers)
                result["redis_commands"] = asyncio.run(commands()) - before - 1
                runs.setdefault(name, []).append(result)
    finally:
        workers.close()
    return {name: summarize(rs) for name, rs in runs.items()}


def render(results: dict[str, Any], args: argparse.Namespace) -> None:
    modes = [("one_process", f"one process, {args.callers} callers")]
    if "processes" in results:
        modes.append(
            ("processes", f"{args.processes} processes x {args.callers // args.processes} callers")
        )
    tables = []
    for mode, label in modes:
        rows = []
        for name, s in results[mode].items():
            rows.append(
                [
                    name,
                    s["origin_calls_median"],
                    f"{s['origin_calls_min']}-{s['origin_calls_max']}",
                    s["p50_ms"],
                    s["p99_ms"],
                    s["max_ms"],
                    s["redis_commands_median"],
                    s["errors"],
                ]
            )
        notes = [f"{k}: {v}" for k, v in CONFIG.items()] if mode == "one_process" else []
        for name, s in results[mode].items():
            if s["error_kinds"]:
                kinds = ", ".join(f"{n} x {k}" for k, n in sorted(s["error_kinds"].items()))
                notes.append(f"errors of {name}: {kinds}")
        tables.append(
            table(
                f"Cold stampede, {label}, origin {args.origin_ms:.0f} ms (medians of {args.rounds} rounds;"
                " counts: the lower median, a value some round had)",
                [
                    "library",
                    "origin calls",
                    "range",
                    "p50 ms",
                    "p99 ms",
                    "max ms",
                    "Redis cmds",
                    "errors",
                ],
                rows,
                notes=notes,
            )
        )
    results["tables"] = tables
    names = list(results["one_process"])
    series_calls = {
        label: [results[mode][n]["origin_calls_median"] for n in names] for mode, label in modes
    }
    latency: dict[str, list[float]] = {}
    for mode, _ in modes:
        short = "1 proc" if mode == "one_process" else f"{args.processes} procs"
        latency[f"p50 ({short})"] = [results[mode][n]["p50_ms"] for n in names]
        latency[f"p99 ({short})"] = [results[mode][n]["p99_ms"] for n in names]
    results["charts"] = [
        {
            "file": "stampede_origin_calls.png",
            "title": f"Cold stampede: origin calls for {args.callers} concurrent callers of one key",
            "kind": "bar",
            "categories": names,
            "series": series_calls,
            "ylabel": "origin calls (median of rounds, log scale)",
            "log": True,
        },
        {
            "file": "stampede_latency.png",
            "title": f"Cold stampede: time until callers had the value (origin {args.origin_ms:.0f} ms)",
            "kind": "bar",
            "categories": names,
            "series": latency,
            "ylabel": "ms from the burst's start (log scale)",
            "log": True,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--callers", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4, help="0 skips the multi-process run")
    parser.add_argument("--origin-ms", type=float, default=50.0)
    parser.add_argument("--quick", action="store_true", help="2 rounds (for CI and a first look)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 2)
    url, server = start_redis(args.redis_url)
    results: dict[str, Any] = {
        "benchmark": "stampede",
        "config": {
            "callers": args.callers,
            "processes": args.processes,
            "origin_ms": args.origin_ms,
            "rounds": args.rounds,
            "pool": POOL,
            "contenders": CONFIG,
        },
    }
    try:
        say(
            f"stampede: {args.callers} cold callers, origin {args.origin_ms:.0f} ms, {args.rounds} rounds"
        )
        results["one_process"] = asyncio.run(single_process(url, args))
        if args.processes > 1:
            results["processes"] = multi_process(url, args)
    finally:
        if server is not None:
            server.stop()
    render(results, args)
    finish(results, args.json)


if __name__ == "__main__":
    main()
