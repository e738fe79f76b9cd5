"""Near cache: a hit from process memory against the Redis hit and the raw round-trip floor.

Three contenders read the same ~1 KB item one call at a time, in interleaved
rounds: the floor (one ``redis.asyncio`` GET + ``msgpack.unpackb``),
``@cached_item`` served from Redis (one GET), and the same accessor on a
cache with a ``NearCache`` (a dict lookup and a decode; no round trip). The
table gives p50/p99 of every call pooled and the median of the rounds' means.

It also counts the Redis commands that 1,000 hot reads send (``INFO``'s
``total_commands_processed`` before and after, less the ``INFO`` itself), and
measures the cross-process window: another OS process runs
``invalidate_item`` on the entry this process holds; the delay is from that
call returning there (``time.monotonic_ns()``, system-wide on Linux) to the
copy being gone here (this process spins on the event loop meanwhile).

Runs unpinned, then (unless ``--no-pin``) with this process on the first CPU
and the redis-server it started on the second.

    python benchmarks/near_cache.py [--quick] [--redis-url URL] [--rounds 15] [--calls 2000]
        [--invalidations 300] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis.asyncio as aioredis
from _common import (
    finish,
    floor_reader,
    make_item,
    percentile,
    pin,
    pin_modes,
    say,
    start_redis,
    table,
    total_commands,
)
from hit_path import Fn, timed_sequential

from swr_cache import Cache, NearCache, _codec, cached_item
from swr_cache._store import WHOLE_FIELDS

KEY = "user#000123"
NS = "nearbench"
GO, DONE = "nearbench:go", "nearbench:done"
SELF = os.path.abspath(__file__)


def accessor(cache: Cache, item: dict[str, Any]) -> Any:
    @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
    async def get_user(user_id: str) -> dict[str, Any] | None:
        return dict(item)

    return get_user


async def commands_per_1000(client: Any, fn: Fn) -> int:
    """Redis commands that 1,000 calls of ``fn`` send (the INFO that reads the count excluded)."""
    await fn()
    before = await total_commands(client)
    for _ in range(1000):
        await fn()
    return await total_commands(client) - before - 1


async def peer(url: str, rounds: int) -> None:
    """The other OS process: on each GO, invalidate the entry and report when that returned."""
    client = aioredis.Redis.from_url(url, socket_timeout=5)
    cache = Cache(client, namespace=NS, fence_ttl=0)
    async with cache:
        await client.rpush(DONE, b"ready")
        for _ in range(rounds):
            await client.blpop([GO], timeout=30)
            await cache.invalidate_item("Users", {"pk": KEY})
            await client.rpush(DONE, str(time.monotonic_ns()).encode())
    await client.aclose()


async def invalidation_delays(
    url: str, cache: Cache, near: NearCache, get_user: Any, rounds: int
) -> list[float]:
    """Microseconds from another process's ``invalidate_item`` returning to our copy being gone."""
    # BLPOP waits longer than the cache client's socket timeout allows.
    client = aioredis.Redis.from_url(url, socket_timeout=60)
    await client.delete(GO, DONE)
    proc = await asyncio.create_subprocess_exec(sys.executable, SELF, "--peer", url, str(rounds))
    entry = cache._keys.entry(f"Users|pk=S:{KEY}")
    delays: list[float] = []
    try:
        await client.blpop([DONE], timeout=30)  # the peer is up
        for _ in range(rounds):
            while near.lookup(entry, WHOLE_FIELDS) is None:  # fill (no fence here), then install
                await get_user(KEY)
            await client.rpush(GO, b"1")
            # Spinning on the loop is the measurement: the tracker runs between spins.
            while near.lookup(entry, WHOLE_FIELDS) is not None:  # noqa: ASYNC110
                await asyncio.sleep(0)
            gone = time.monotonic_ns()
            reply = await client.blpop([DONE], timeout=30)
            if reply is None:
                raise RuntimeError("the peer process stopped answering")
            delays.append((gone - int(reply[1])) / 1000.0)
    finally:
        await proc.wait()
        await client.aclose()
    return delays


async def run(url: str, rounds: int, calls: int, invalidations: int, mode: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url, max_connections=50, socket_timeout=1)
    item = make_item(KEY)
    await client.set("floor:item", _codec.encode(item))
    floor = floor_reader(client, "floor:item")

    near = NearCache(max_items=10_000, max_age=3600)
    plain = Cache(client, namespace=NS + "-plain", soft_ttl=3600, hard_ttl=7200, early_refresh=0)
    cached = Cache(
        client,
        namespace=NS,
        soft_ttl=3600,
        hard_ttl=7200,
        early_refresh=0,
        fence_ttl=0,
        near_cache=near,
    )
    async with plain, cached:
        await asyncio.wait_for(near.wait_ready(), 10)
        from_redis, from_memory = accessor(plain, item), accessor(cached, item)

        async def redis_hit() -> Any:
            return await from_redis(KEY)

        async def near_hit() -> Any:
            return await from_memory(KEY)

        contenders: dict[str, Fn] = {
            "floor": floor,
            "swr_cache (Redis hit)": redis_hit,
            "swr_cache + NearCache": near_hit,
        }
        for name, fn in contenders.items():
            await fn()
            if await fn() != item:
                raise RuntimeError(f"{name} returned another item")
            await timed_sequential(fn, 200)
        means: dict[str, list[float]] = {k: [] for k in contenders}
        each: dict[str, list[float]] = {k: [] for k in contenders}
        for i in range(rounds):
            say(f"  {mode}: round {i + 1}/{rounds}")
            for name, fn in contenders.items():
                means[name].append(await timed_sequential(fn, calls, each[name]))
        commands = {name: await commands_per_1000(client, fn) for name, fn in contenders.items()}
        say(f"  {mode}: {invalidations} cross-process invalidations")
        delays = await invalidation_delays(url, cached, near, from_memory, invalidations)
        stats = cached.stats()
    await client.aclose()
    p50 = {k: percentile(v, 50) for k, v in each.items()}
    return {
        "us_per_call": {k: statistics.median(v) for k, v in means.items()},
        "p50_us": p50,
        "p99_us": {k: percentile(v, 99) for k, v in each.items()},
        "x_faster_than_floor": p50["floor"] / p50["swr_cache + NearCache"],
        "commands_per_1000_reads": commands,
        # Negative: the copy was gone before the invalidating call returned
        # there (Redis announces a change as it applies it); counted as 0.
        "invalidation_delay_us": {
            "p50": percentile([max(0.0, d) for d in delays], 50),
            "p99": percentile([max(0.0, d) for d in delays], 99),
            "max": max(0.0, *delays),
            "n": len(delays),
            "gone_before_return": sum(1 for d in delays if d <= 0) / len(delays),
        },
        "near_hits": stats[from_memory.name]["near_hits"],
        "near_install_refusals": stats[from_memory.name]["near_install_refusals"],
        "near_invalidations": stats["swr_cache"]["near_invalidations"],
    }


def render(results: dict[str, Any], modes: dict[str, str], args: argparse.Namespace) -> None:
    tables = []
    for mode, where in modes.items():
        r = results[mode]
        d = r["invalidation_delay_us"]
        rows = [
            [
                name,
                r["p50_us"][name],
                r["p99_us"][name],
                r["us_per_call"][name],
                r["p50_us"]["floor"] / r["p50_us"][name],
                r["commands_per_1000_reads"][name],
            ]
            for name in r["p50_us"]
        ]
        tables.append(
            table(
                f"Near cache hit, ~1 KB item ({mode})",
                [
                    "contender",
                    "p50 us",
                    "p99 us",
                    "us/call",
                    "x faster than floor (p50)",
                    "Redis commands / 1,000 reads",
                ],
                rows,
                notes=[
                    f"{where}; {args.rounds} rounds of {args.calls} calls per contender",
                    f"cross-process window: another OS process's invalidate_item returning -> the copy gone here:"
                    f" p50 {d['p50']:.0f} us, p99 {d['p99']:.0f} us, max {d['max']:.0f} us over {d['n']} invalidations"
                    f" ({d['gone_before_return']:.0%} gone before the call returned there)",
                ],
            )
        )
    results["tables"] = tables


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--invalidations", type=int, default=300)
    parser.add_argument("--no-pin", action="store_true", help="skip the pinned run")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 500 calls, no pinned run")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--peer", nargs=2, metavar=("URL", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        asyncio.run(peer(args.peer[0], int(args.peer[1])))
        return
    if args.quick:
        args.rounds, args.calls, args.no_pin = min(args.rounds, 3), min(args.calls, 500), True
        args.invalidations = min(args.invalidations, 50)
    url, server = start_redis(args.redis_url)
    modes = pin_modes(server, args.no_pin)
    results: dict[str, Any] = {
        "benchmark": "near_cache",
        "config": {"rounds": args.rounds, "calls": args.calls, "invalidations": args.invalidations},
    }
    say(
        f"near cache: {args.rounds} interleaved rounds of {args.calls} calls, modes: {', '.join(modes)}"
    )
    try:
        for mode in modes:
            if mode == "pinned":
                pin(server)
            results[mode] = asyncio.run(run(url, args.rounds, args.calls, args.invalidations, mode))
    finally:
        if server is not None:
            server.stop()
    render(results, modes, args)
    print(json.dumps({m: results[m]["invalidation_delay_us"] for m in modes}), file=sys.stderr)
    finish(results, args.json)


if __name__ == "__main__":
    main()
