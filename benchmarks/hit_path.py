"""Hit-path cost of ``@cached_item`` against the raw Redis floor, side by side.

The floor is what any cache must do at least: one ``redis.asyncio`` GET of the
same ~1 KB item plus ``msgpack.unpackb``. Rounds are interleaved (floor, ours,
floor, ours, ...) and medians reported, because this VM adds ~100 us whenever
the process is woken on the other vCPU; run it under ``taskset -c 0`` too.

    python benchmarks/hit_path.py [--redis-url URL] [--rounds 15] [--calls 2000]

With no URL it starts its own redis-server on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import msgpack
import redis.asyncio as aioredis

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from swr_cache import Cache, _codec, cached_item
from swr_cache.devservers import RedisServer


def make_item() -> dict[str, Any]:
    """A ~1 KB user item of the usual DynamoDB shapes."""
    return {
        "pk": "user#000123",
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "age": Decimal("36"),
        "balance": Decimal("1024.50"),
        "active": True,
        "roles": {"admin", "editor", "viewer"},
        "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
        "bio": "x" * 600,
        "tags": ["math", "poetry", "engines"],
    }


async def timed_sequential(fn: Callable[[], Awaitable[Any]], calls: int) -> float:
    """Microseconds per call, one call at a time."""
    t0 = time.perf_counter()
    for _ in range(calls):
        await fn()
    return (time.perf_counter() - t0) / calls * 1e6


async def timed_concurrent(fn: Callable[[], Awaitable[Any]], calls: int, width: int) -> float:
    """Calls per second with ``width`` concurrent callers."""
    t0 = time.perf_counter()
    for _ in range(calls // width):
        await asyncio.gather(*(fn() for _ in range(width)))
    return (calls // width) * width / (time.perf_counter() - t0)


async def run(url: str, rounds: int, calls: int) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url, max_connections=200)
    item = make_item()
    # The floor stores the same item as one msgpack blob. Decimal and set need
    # msgpack extension types to round-trip exactly, so it unpacks with the
    # same ext_hook; nothing else of swr_cache is on its path.
    await client.set("floor:item", _codec.encode(item))
    ext_hook = _codec._ext_hook

    async def floor() -> Any:
        return msgpack.unpackb(
            await client.get("floor:item"), raw=False, strict_map_key=False, ext_hook=ext_hook
        )

    cache = Cache(client, namespace="bench", soft_ttl=3600, hard_ttl=7200)
    async with cache:

        @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
        async def get_user(user_id: str) -> dict[str, Any] | None:
            return dict(item)

        assert await get_user("user#000123") == item

        async def ours() -> Any:
            return await get_user("user#000123")

        for fn in (floor, ours):  # warm up
            await timed_sequential(fn, 200)
        seq: dict[str, list[float]] = {"floor": [], "swr_cache": []}
        conc: dict[str, list[float]] = {"floor": [], "swr_cache": []}
        for _ in range(rounds):
            seq["floor"].append(await timed_sequential(floor, calls))
            seq["swr_cache"].append(await timed_sequential(ours, calls))
            conc["floor"].append(await timed_concurrent(floor, calls, 100))
            conc["swr_cache"].append(await timed_concurrent(ours, calls, 100))
        stats = cache.stats()[get_user.name]
    await client.aclose()
    floor_us = statistics.median(seq["floor"])
    ours_us = statistics.median(seq["swr_cache"])
    floor_tp = statistics.median(conc["floor"])
    ours_tp = statistics.median(conc["swr_cache"])
    return {
        "floor_us": floor_us,
        "ours_us": ours_us,
        "seq_ratio": ours_us / floor_us,
        "floor_tp": floor_tp,
        "ours_tp": ours_tp,
        "tp_ratio": ours_tp / floor_tp,
        "origin_loads": stats["loads"],
    }


def report(r: dict[str, Any], label: str) -> None:
    print(f"\n{label}")
    print(f"{'':24} {'floor (GET+unpackb)':>20} {'swr_cache hit':>16} {'ratio':>8}")
    print(f"{'sequential, us/call':24} {r['floor_us']:>20.1f} {r['ours_us']:>16.1f} {r['seq_ratio']:>7.2f}x")
    print(f"{'100 concurrent, calls/s':24} {r['floor_tp']:>20.0f} {r['ours_tp']:>16.0f} {r['tp_ratio']:>7.2f}x")
    print(f"origin loads during the run: {r['origin_loads']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    if args.redis_url:
        r = asyncio.run(run(args.redis_url, args.rounds, args.calls))
    else:
        with RedisServer() as server:
            r = asyncio.run(run(server.url, args.rounds, args.calls))
    pinned = ""
    if hasattr(os, "sched_getaffinity"):
        pinned = f" (CPUs allowed: {sorted(os.sched_getaffinity(0))})"
    report(r, f"@cached_item hit vs raw Redis floor, ~1 KB item, medians of {args.rounds} interleaved rounds{pinned}")


if __name__ == "__main__":
    main()
