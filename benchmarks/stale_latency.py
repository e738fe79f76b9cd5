"""Reads at the moment an entry turns stale, while a 50 ms origin refreshes it, vs fresh hits.

For each contender and round: one key is filled, ``--readers`` concurrent
readers take fresh-hit latencies, the entry is left to pass its soft deadline
(``--soft-ms``), then the readers read in a loop until each has seen the
refreshed value. Every read in that window is timed; reads that returned the
old value were served stale. Libraries with stale-while-revalidate answer the
window from Redis at hit latency; without it, readers wait for the origin.

Contenders, same ~1 KB item, same Redis:

* swr_cache ``@cached_item`` — soft TTL, stale served while one refresh runs
  (``early_refresh=0``: the probabilistic early refresh is off, so the entry
  really goes stale);
* cashews ``@cache.early`` — serves the old value while a background task
  recomputes once ``early_ttl`` passed;
* without stale-while-revalidate, for contrast: aiocache ``cached`` and cashews
  ``@cache`` whose TTL expires, and cashews ``@cache.soft`` (serves the old
  value only when the origin fails; otherwise reloads in the foreground).

    python benchmarks/stale_latency.py [--quick] [--rounds 10] [--readers 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    aiocache_kwargs,
    finish,
    make_item,
    percentile,
    say,
    start_redis,
    table,
)

from swr_cache import Cache, cached_item

Fn = Callable[[str], Awaitable[Any]]
WINDOW_LIMIT_S = 5.0

CONFIG = {
    "swr_cache": "@cached_item, soft_ttl={soft} s, hard_ttl=3600 s, early_refresh=0, msgpack",
    "cashews early": "@cache.early(ttl='1h', early_ttl={soft} s), pickle",
    "aiocache cached (expiry)": "aiocache.cached(RedisCache, ttl={soft} s), msgpack serializer",
    "cashews cache (expiry)": "@cache(ttl={soft} s) defaults (protected=True), pickle",
    "cashews soft": "@cache.soft(ttl='1h', soft_ttl={soft} s), pickle",
}
SWR = ("swr_cache", "cashews early")


class Origin:
    """A 50 ms origin whose values carry a version that rises with each call."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0

    async def load(self, key: str) -> dict[str, Any]:
        self.calls += 1
        version = self.calls
        await asyncio.sleep(self.delay)
        item = make_item(key)
        item["version"] = version
        return item


async def build(
    url: str, soft: float, origins: dict[str, Origin], stack: contextlib.AsyncExitStack
) -> dict[str, Fn]:
    contenders: dict[str, Fn] = {}
    cache = await stack.enter_async_context(
        Cache.from_url(url, namespace="bench-stale", soft_ttl=soft, hard_ttl=3600, early_refresh=0)
    )

    @cached_item(cache, table="Users", key=lambda key: {"pk": key}, name="stale")
    async def swr(key: str) -> dict[str, Any] | None:
        return await origins["swr_cache"].load(key)

    contenders["swr_cache"] = swr
    try:
        from cashews import Cache as CashewsCache
    except ImportError:
        say("  cashews is not installed: skipped")
        cashews = None
    else:
        cashews = CashewsCache()
        cashews.setup(url, client_side=False)
        stack.push_async_callback(cashews.close)

        @cashews.early(ttl="1h", early_ttl=soft, key="se:{key}")
        async def cw_early(key: str) -> dict[str, Any]:
            return await origins["cashews early"].load(key)

        contenders["cashews early"] = cw_early
    try:
        import aiocache  # type: ignore[import-untyped]
    except ImportError:
        say("  aiocache is not installed: skipped")
    else:

        @aiocache.cached(
            ttl=float(soft), key_builder=lambda f, key: f"sa:{key}", **aiocache_kwargs(url)
        )  # type: ignore[untyped-decorator]
        async def aio(key: str) -> dict[str, Any]:
            return await origins["aiocache cached (expiry)"].load(key)

        contenders["aiocache cached (expiry)"] = aio
        stack.push_async_callback(aio.cache.close)
    if cashews is not None:

        @cashews(ttl=soft, key="sc:{key}")
        async def cw_plain(key: str) -> dict[str, Any]:
            return await origins["cashews cache (expiry)"].load(key)

        @cashews.soft(ttl="1h", soft_ttl=soft, key="ss:{key}")
        async def cw_soft(key: str) -> dict[str, Any]:
            return await origins["cashews soft"].load(key)

        contenders["cashews cache (expiry)"] = cw_plain
        contenders["cashews soft"] = cw_soft
    return contenders


async def one_round(fn: Fn, key: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fill, time fresh hits, wait past the soft deadline, time reads until the new value shows."""
    first = await fn(key)
    filled_at = time.monotonic()
    v0 = first["version"]
    fresh: list[float] = []

    async def fresh_reader() -> None:
        for _ in range(args.reads):
            t0 = time.perf_counter()
            got = await fn(key)
            fresh.append((time.perf_counter() - t0) * 1e6)
            assert got["version"] == v0

    await asyncio.gather(*(fresh_reader() for _ in range(args.readers)))
    # The benchmark waits for real time to pass the soft deadline (this is
    # what is being measured, not a synchronisation between tasks).
    await asyncio.sleep(max(0.0, filled_at + args.soft_ms / 1000.0 + 0.01 - time.monotonic()))
    window: list[float] = []
    served_stale = 0
    blocked = 0

    async def window_reader() -> None:
        nonlocal served_stale, blocked
        deadline = time.monotonic() + WINDOW_LIMIT_S
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            got = await fn(key)
            took = (time.perf_counter() - t0) * 1e6
            window.append(took)
            if got["version"] == v0:
                served_stale += 1
            else:
                blocked += took >= args.origin_ms * 1000 * 0.8
                return

    await asyncio.gather(*(window_reader() for _ in range(args.readers)))
    return {
        "fresh_us": fresh,
        "window_us": window,
        "served_stale": served_stale,
        "waited_for_origin": blocked,
    }


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    soft = args.soft_ms / 1000.0
    names = list(CONFIG)
    origins = {name: Origin(args.origin_ms / 1000.0) for name in names}
    collected: dict[str, dict[str, Any]] = {}
    async with contextlib.AsyncExitStack() as stack:
        contenders = await build(url, soft, origins, stack)
        order = [n for n in names if n in contenders]
        for r in range(args.rounds):
            say(f"  round {r + 1}/{args.rounds}")
            for name in order[r % len(order) :] + order[: r % len(order)]:
                got = await one_round(contenders[name], f"stale-{r}", args)
                acc = collected.setdefault(
                    name,
                    {"fresh_us": [], "window_us": [], "served_stale": 0, "waited_for_origin": 0},
                )
                acc["fresh_us"] += got["fresh_us"]
                acc["window_us"] += got["window_us"]
                acc["served_stale"] += got["served_stale"]
                acc["waited_for_origin"] += got["waited_for_origin"]
    out: dict[str, Any] = {}
    for name, acc in collected.items():
        out[name] = {
            "fresh_p50_us": percentile(acc["fresh_us"], 50),
            "fresh_p99_us": percentile(acc["fresh_us"], 99),
            "window_p50_us": percentile(acc["window_us"], 50),
            "window_p99_us": percentile(acc["window_us"], 99),
            "window_max_us": max(acc["window_us"], default=float("nan")),
            "window_reads": len(acc["window_us"]),
            "served_stale": acc["served_stale"],
            "waited_for_origin": acc["waited_for_origin"],
            "origin_calls": origins[name].calls,
            "stale_while_revalidate": name in SWR,
        }
    return out


def render(results: dict[str, Any], args: argparse.Namespace) -> None:
    per = results["libraries"]
    rows = []
    for name, s in per.items():
        ratio = s["window_p99_us"] / s["fresh_p99_us"] if s["fresh_p99_us"] else float("nan")
        rows.append(
            [
                name,
                s["fresh_p50_us"],
                s["fresh_p99_us"],
                s["window_p50_us"],
                s["window_p99_us"],
                ratio,
                s["window_reads"],
                s["served_stale"],
                s["waited_for_origin"],
            ]
        )
    soft = args.soft_ms / 1000.0
    results["tables"] = [
        table(
            f"Reads when the entry turns stale, origin {args.origin_ms:.0f} ms, {args.readers} concurrent readers,"
            f" {args.rounds} rounds (all samples pooled)",
            [
                "library",
                "fresh p50 us",
                "fresh p99 us",
                "stale-window p50 us",
                "stale-window p99 us",
                "p99 x fresh",
                "window reads",
                "served stale",
                "waited for origin",
            ],
            rows,
            notes=[
                "stale window: from the soft deadline (or TTL) until each reader saw the refreshed value",
                *(f"{k}: {v.format(soft=soft)}" for k, v in CONFIG.items()),
            ],
        )
    ]
    names = list(per)
    results["charts"] = [
        {
            "file": "stale_latency.png",
            "title": f"Read latency: fresh hits vs reads while a {args.origin_ms:.0f} ms origin refreshes",
            "kind": "bar",
            "categories": names,
            "series": {
                "fresh p50": [per[n]["fresh_p50_us"] for n in names],
                "fresh p99": [per[n]["fresh_p99_us"] for n in names],
                "stale-window p50": [per[n]["window_p50_us"] for n in names],
                "stale-window p99": [per[n]["window_p99_us"] for n in names],
            },
            "ylabel": "microseconds (log scale)",
            "log": True,
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--reads", type=int, default=100, help="fresh reads per reader and round")
    parser.add_argument("--origin-ms", type=float, default=50.0)
    parser.add_argument("--soft-ms", type=float, default=300.0, help="soft TTL / early TTL / TTL")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 3)
    url, server = start_redis(args.redis_url)
    say(
        f"stale latency: origin {args.origin_ms:.0f} ms, soft {args.soft_ms:.0f} ms, {args.rounds} rounds"
    )
    try:
        libraries = asyncio.run(run(url, args))
    finally:
        if server is not None:
            server.stop()
    results: dict[str, Any] = {
        "benchmark": "stale_latency",
        "config": {
            k: getattr(args, k) for k in ("rounds", "readers", "reads", "origin_ms", "soft_ms")
        },
        "libraries": libraries,
    }
    render(results, args)
    finish(results, args.json)


if __name__ == "__main__":
    main()
