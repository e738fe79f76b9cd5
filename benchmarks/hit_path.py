"""Hit-path cost of ``@cached_item`` against the raw Redis floor and the peers, side by side.

The floor is what any cache must do at least: one ``redis.asyncio`` GET of the
same ~1 KB item plus one ``msgpack.unpackb`` (with the extension types that
keep ``Decimal`` and ``set`` exact). The peers, where installed (``make bench``
installs them), cache the same item on the same Redis through their decorators:
aiocache with a msgpack serializer built on the same codec, and cashews with
its defaults.

Rounds are interleaved (floor, swr_cache, peers, floor, ...) and medians
reported. This VM adds ~100 us whenever a process is woken on the other vCPU,
so the run is repeated with this process pinned to CPU 0 and the redis-server
it started pinned to CPU 1 (``--no-pin`` skips that).

    python benchmarks/hit_path.py [--redis-url URL] [--rounds 15] [--calls 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

KEY = "user#000123"
Fn = Callable[[], Awaitable[Any]]


def make_item() -> dict[str, Any]:
    """A ~1 KB user item of the usual DynamoDB shapes."""
    return {
        "pk": KEY,
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


async def timed_sequential(fn: Fn, calls: int) -> float:
    """Microseconds per call, one call at a time."""
    t0 = time.perf_counter()
    for _ in range(calls):
        await fn()
    return (time.perf_counter() - t0) / calls * 1e6


async def timed_concurrent(fn: Fn, calls: int, width: int) -> float:
    """Calls per second with ``width`` concurrent callers of the same key."""
    rounds = max(1, calls // width)
    t0 = time.perf_counter()
    for _ in range(rounds):
        await asyncio.gather(*(fn() for _ in range(width)))
    return rounds * width / (time.perf_counter() - t0)


async def peer_aiocache(url: str, item: dict[str, Any]) -> tuple[Fn, Any] | None:
    try:
        import aiocache
        from aiocache.serializers import BaseSerializer
    except ImportError:
        return None

    class CodecSerializer(BaseSerializer):  # type: ignore[misc]
        DEFAULT_ENCODING = None

        def dumps(self, value: Any) -> bytes:
            return _codec.encode(value)

        def loads(self, value: bytes | None) -> Any:
            return None if value is None else _codec.decode(value)

    host, port = url.split("//")[1].split("/")[0].split(":")

    @aiocache.cached(
        cache=aiocache.RedisCache, endpoint=host, port=int(port), serializer=CodecSerializer(),
        ttl=3600, key_builder=lambda f, user_id: f"aiocache:{user_id}", namespace="",
    )
    async def get_user(user_id: str) -> dict[str, Any]:
        return dict(item)

    await get_user(KEY)

    async def call() -> Any:
        return await get_user(KEY)

    return call, get_user.cache


async def peer_cashews(url: str, item: dict[str, Any]) -> tuple[Fn, Any] | None:
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

    async def call() -> Any:
        return await get_user(KEY)

    return call, cache


async def run(url: str, rounds: int, calls: int) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url, max_connections=200)
    item = make_item()
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

        assert await get_user(KEY) == item

        async def ours() -> Any:
            return await get_user(KEY)

        contenders: dict[str, Fn] = {"floor": floor, "swr_cache": ours}
        closers = []
        for name, make in (("aiocache", peer_aiocache), ("cashews", peer_cashews)):
            got = await make(url, item)
            if got is not None:
                contenders[name], closer = got
                closers.append(closer)
        for fn in contenders.values():  # warm up
            await timed_sequential(fn, 200)
        seq: dict[str, list[float]] = {k: [] for k in contenders}
        conc: dict[str, list[float]] = {k: [] for k in contenders}
        for i in range(rounds):
            print(f"  round {i + 1}/{rounds}", end="\r", file=sys.stderr, flush=True)
            for name, fn in contenders.items():
                seq[name].append(await timed_sequential(fn, calls))
                conc[name].append(await timed_concurrent(fn, calls, 100))
        print(file=sys.stderr)
        loads = cache.stats()[get_user.name]["loads"]
        for closer in closers:
            close = getattr(closer, "close", None)
            if close is not None:
                await close()
    await client.aclose()
    return {
        "us_per_call": {k: statistics.median(v) for k, v in seq.items()},
        "calls_per_s_100": {k: statistics.median(v) for k, v in conc.items()},
        "origin_loads": loads,
    }


def report(r: dict[str, Any], label: str) -> None:
    seq, conc = r["us_per_call"], r["calls_per_s_100"]
    print(f"\n{label}")
    print(f"{'':12} {'sequential us/call':>19} {'x floor':>8} {'100 same-key calls/s':>21} {'x floor':>8}")
    for name in seq:
        print(
            f"{name:12} {seq[name]:>19.1f} {seq[name] / seq['floor']:>7.2f}x"
            f" {conc[name]:>21.0f} {conc[name] / conc['floor']:>7.2f}x"
        )
    print(f"swr_cache origin loads during the run: {r['origin_loads']} (the warm-up fill)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--no-pin", action="store_true", help="skip the pinned run")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    server = None if args.redis_url else RedisServer().start()
    try:
        url = args.redis_url or server.url  # type: ignore[union-attr]
        modes = ["unpinned"] if args.no_pin or not hasattr(os, "sched_setaffinity") else ["unpinned", "pinned"]
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        for mode in modes:
            if mode == "pinned":
                if len(cpus) < 2:
                    break
                os.sched_setaffinity(0, {cpus[0]})
                if server is not None and server.pid:
                    os.sched_setaffinity(server.pid, {cpus[1]})
            print(f"{mode} run: {args.rounds} interleaved rounds of {args.calls} calls", file=sys.stderr)
            results[mode] = asyncio.run(run(url, args.rounds, args.calls))
            where = (
                f"this process on CPU {cpus[0]}, redis-server on CPU {cpus[1]}" if mode == "pinned" else "unpinned"
            )
            report(results[mode], f"@cached_item hit vs raw Redis floor and peers, ~1 KB item, medians ({where})")
    finally:
        if server is not None:
            server.stop()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
