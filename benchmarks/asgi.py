"""CacheMiddleware under uvicorn: cached hits against the uncached DynamoDB endpoint and a trivial one.

Starts a redis-server, moto's DynamoDB server (its own process) and the
example app (``examples/app.py``) under uvicorn in a subprocess, seeds
``--users`` items, then drives it with a load client at a fixed concurrency, one
endpoint at a time (a lean HTTP/1.1 keep-alive client over asyncio streams by
default; ``--client httpx`` uses ``httpx.AsyncClient``, which costs more CPU
per request than the server does on a hit):

* ``trivial``: ``GET /ping``, a plain-text response marked ``no-store`` (it
  passes through the middleware untouched): the cost of the HTTP stack alone.
* ``uncached``: ``GET /raw/users/{id}``: a DynamoDB ``GetItem`` per request,
  never cached.
* ``cached``: ``GET /users/{id}``: the same item, served from Redis by the
  middleware (every key warmed first; ``Cache-Status`` is checked, so a run
  that missed is reported as such).

Throughput is requests per second over the timed window; latency is per
request as the client saw it (it includes the client's own overhead, and
the client, server, Redis and moto share this machine's cores). Target:
cached ≥ 5x uncached.

    python benchmarks/asgi.py [--quick] [--seconds 5] [--concurrency 16] [--users 100]
                              [--client raw|httpx] [--json FILE]

``--in-process`` measures the middleware alone, without uvicorn or a client:
microseconds per call of a ``redis.asyncio`` GET of a ~250-byte value (the
floor), a middleware hit of a ~250-byte response, and a ``no-store`` ``/ping``
through the middleware (Starlette routes behind it), in interleaved rounds;
then Python calls per operation under cProfile (deterministic, unlike the
timings on a shared machine).

    python benchmarks/asgi.py --in-process [--rounds 15] [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from typing import Any

import httpx
from _common import MotoProcess, finish, median, percentile, say, start_redis, table

from devtools.demo import example_app
from devtools.devservers import HttpConnection, UvicornServer, set_dummy_aws_env


async def drive_raw(
    base_url: str, paths: list[str], seconds: float, concurrency: int
) -> dict[str, Any]:
    """Like :func:`drive`, over :class:`HttpConnection` (one keep-alive connection per worker)."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    connections = [await HttpConnection.open(base_url) for _ in range(concurrency)]
    stop = time.perf_counter() + seconds

    async def worker(seed: int, conn: HttpConnection) -> None:
        nonlocal errors
        rng = random.Random(seed)
        while time.perf_counter() < stop:
            path = paths[rng.randrange(len(paths))]
            t0 = time.perf_counter()
            status, headers, _ = await conn.get(path)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors += 1
            kind = _status_kind(headers.get(b"cache-status", b"").decode())
            statuses[kind] = statuses.get(kind, 0) + 1

    began = time.perf_counter()
    try:
        await asyncio.gather(*(worker(i, c) for i, c in enumerate(connections)))
    finally:
        for conn in connections:
            await conn.aclose()
    elapsed = time.perf_counter() - began
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": median(latencies) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "errors": errors,
        "cache_status": statuses,
    }


def _status_kind(cache_status: str) -> str:
    """``hit`` or ``fwd=...`` from ``Cache-Status: swr-cache; hit; ttl=3``."""
    parts = [p.strip() for p in cache_status.split(";")]
    return parts[1] if len(parts) > 1 else "-"


async def drive(
    client: httpx.AsyncClient, paths: list[str], seconds: float, concurrency: int
) -> dict[str, Any]:
    """``concurrency`` workers request random ``paths`` for ``seconds``; what they saw."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    stop = time.perf_counter() + seconds

    async def worker(seed: int) -> None:
        nonlocal errors
        rng = random.Random(seed)
        while time.perf_counter() < stop:
            path = paths[rng.randrange(len(paths))]
            t0 = time.perf_counter()
            try:
                response = await client.get(path)
            except httpx.HTTPError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            if response.status_code != 200:
                errors += 1
            kind = _status_kind(response.headers.get("cache-status", ""))
            statuses[kind] = statuses.get(kind, 0) + 1

    began = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": median(latencies) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "errors": errors,
        "cache_status": statuses,
    }


async def run(
    base_url: str, users: int, seconds: float, concurrency: int, client_kind: str
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30.0) as client:
        ids = [f"u{i}" for i in range(users)]
        scenarios = {
            "trivial": ["/ping"],
            "uncached": [f"/raw/users/{u}" for u in ids],
            "cached": [f"/users/{u}" for u in ids],
        }
        say(f"warming {users} cached responses")
        for path in scenarios["cached"]:
            await client.get(path)
        out: dict[str, Any] = {}
        for name, paths in scenarios.items():
            say(f"{name}: {seconds:.1f}s at concurrency {concurrency} ({client_kind} client)")
            if client_kind == "raw":
                await drive_raw(base_url, paths, min(1.0, seconds / 4), concurrency)  # warm-up
                out[name] = await drive_raw(base_url, paths, seconds, concurrency)
            else:
                await drive(client, paths, min(1.0, seconds / 4), concurrency)  # warm-up
                out[name] = await drive(client, paths, seconds, concurrency)
            say(
                f"  {out[name]['rps']:,.0f} req/s, p50 {out[name]['p50_ms']:.2f} ms, {out[name]['cache_status']}"
            )
        stats = (await client.get("/stats")).json()
    out["server_stats"] = {k: v for k, v in stats.get("http", {}).items() if isinstance(v, int)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="timed window per endpoint")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="load client: a lean HTTP/1.1 keep-alive client (default) or httpx.AsyncClient",
    )
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--quick", action="store_true", help="1.5 s per endpoint, 20 users")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--in-process", action="store_true", help="the middleware alone: µs and calls per hit"
    )
    parser.add_argument("--rounds", type=int, default=15, help="--in-process: timed rounds")
    parser.add_argument("--calls", type=int, default=2000, help="--in-process: calls per round")
    args = parser.parse_args(argv)
    if args.in_process:
        return in_process(args.rounds, args.calls, args.json)
    if args.quick:
        args.seconds, args.users = 1.5, 20

    say("starting redis-server, moto and the example app under uvicorn")
    set_dummy_aws_env()  # moto accepts any credentials
    redis_url, redis_server = start_redis(args.redis_url)
    moto = MotoProcess().start()
    app: UvicornServer | None = None
    try:
        app = example_app(
            redis_url, moto.endpoint_url, users=args.users, namespace=f"bench{os.getpid()}"
        )
        app.start()
        results = asyncio.run(
            run(app.base_url, args.users, args.seconds, args.concurrency, args.client)
        )
    finally:
        if app is not None:
            app.stop()
        moto.stop()
        if redis_server is not None:
            redis_server.stop()

    trivial, uncached, cached = results["trivial"], results["uncached"], results["cached"]
    hit_share = cached["cache_status"].get("hit", 0) / max(1, cached["requests"])
    rows = [
        [name, r["rps"], r["p50_ms"], r["p99_ms"], r["requests"], r["errors"]]
        for name, r in (
            ("trivial /ping (no cache)", trivial),
            ("uncached /raw/users (DynamoDB)", uncached),
            ("cached /users (middleware hit)", cached),
        )
    ]
    ratio = cached["rps"] / uncached["rps"] if uncached["rps"] else float("nan")
    overhead_ms = cached["p50_ms"] - trivial["p50_ms"]
    results["ratios"] = {
        "cached_vs_uncached": ratio,
        "cached_vs_trivial": cached["rps"] / trivial["rps"] if trivial["rps"] else float("nan"),
        "hit_overhead_p50_ms": overhead_ms,
        "hit_share": hit_share,
    }
    results["tables"] = [
        table(
            f"HTTP through uvicorn, concurrency {args.concurrency}, {args.seconds:.1f} s per endpoint",
            ["endpoint", "req/s", "p50 ms", "p99 ms", "requests", "errors"],
            rows,
            [
                f"cached / uncached throughput: {ratio:.1f}x (target >= 5x) {'MET' if ratio >= 5 else 'NOT MET'}",
                f"cached / trivial throughput: {results['ratios']['cached_vs_trivial']:.2f}x; "
                f"hit overhead over a trivial endpoint: {overhead_ms:+.2f} ms at p50",
                f"share of cached requests answered as hits: {hit_share:.1%}",
                f"one {args.client} client process drives the load; it, uvicorn (one worker, h11), "
                "redis-server and moto share this machine's cores",
            ],
        )
    ]
    results["charts"] = [
        {
            "file": "asgi_rps.png",
            "title": "Requests per second through uvicorn",
            "kind": "barh",
            "categories": [r[0] for r in rows],
            "series": {"req/s": [r[1] for r in rows]},
            "ylabel": "requests per second",
        },
        {
            "file": "asgi_latency.png",
            "title": f"Latency per request as the client saw it (concurrency {args.concurrency})",
            "kind": "barh",
            "categories": [r[0] for r in rows],
            "series": {"p50": [r[2] for r in rows], "p99": [r[3] for r in rows]},
            "ylabel": "milliseconds (log scale)",
            "log": True,
        },
    ]
    finish(results, args.json)
    return 0 if ratio >= 5 and hit_share > 0.99 else 1


# --- the middleware alone ----------------------------------------------------------


_USER_BODY = (
    b'{"pk": "u1", "name": "User 1", "visits": 0, "roles": ["reader"], "bio": "'
    + (b"x" * 160)
    + b'"}'
)
_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/users/u1",
    "raw_path": b"/users/u1",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"), (b"accept", b"*/*")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


def _starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    async def ping(request: Request) -> Response:
        return PlainTextResponse("pong", headers={"cache-control": "no-store"})

    async def user(request: Request) -> Response:
        return Response(
            _USER_BODY,
            media_type="application/json",
            headers={"cache-control": "max-age=3600", "surrogate-key": "users:u1"},
        )

    return Starlette(routes=[Route("/ping", ping), Route("/users/{user_id}", user)])


async def _in_process(redis_url: str, rounds: int, calls: int) -> dict[str, Any]:
    import cProfile
    import pstats
    import statistics

    import redis.asyncio as aioredis

    from swr_cache import Cache, CacheMiddleware

    client = aioredis.Redis.from_url(redis_url, socket_timeout=0.5)
    await client.set("floor", _USER_BODY)
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    async with Cache(client, namespace=f"inproc{os.getpid()}") as cache:
        middleware = CacheMiddleware(_starlette_app(), cache=cache)
        ping_scope = {**_SCOPE, "path": "/ping", "raw_path": b"/ping"}

        async def hit() -> None:
            sent.clear()
            await middleware(dict(_SCOPE), receive, send)

        async def ping() -> None:
            sent.clear()
            await middleware(dict(ping_scope), receive, send)

        async def floor() -> None:
            await client.get("floor")

        for op, member in ((hit, b"hit"), (ping, b"uncacheable")):
            await op()
            await op()
            status = dict(sent[0]["headers"]).get(b"cache-status", b"")
            if member not in status:
                raise RuntimeError(f"expected {member!r} in Cache-Status, got {status!r}")
        ops = {"floor": floor, "hit": hit, "ping": ping}
        timings: dict[str, list[float]] = {name: [] for name in ops}
        for _ in range(rounds):
            for name, op in ops.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    await op()
                timings[name].append((time.perf_counter() - t0) / calls * 1e6)
        counted: dict[str, float] = {}
        for name, op in ops.items():
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(1000):
                await op()
            profile.disable()
            counted[name] = pstats.Stats(profile).total_calls / 1000
    await client.aclose()
    return {
        name: {
            "us_median": statistics.median(values),
            "us_min": min(values),
            "us_max": max(values),
            "python_calls": counted[name],
        }
        for name, values in timings.items()
    }


def in_process(rounds: int, calls: int, json_path: str | None) -> int:
    """``--in-process``: the middleware's own cost per hit, beside a bare Redis GET."""
    say("starting redis-server; timing the middleware in this process")
    redis_url, redis_server = start_redis(None)
    try:
        results = asyncio.run(_in_process(redis_url, rounds, calls))
    finally:
        if redis_server is not None:
            redis_server.stop()
    labels = {
        "floor": "redis.asyncio GET (the floor)",
        "hit": "CacheMiddleware hit",
        "ping": "no-store /ping through it",
    }
    rows = [
        [labels[name], r["us_median"], r["us_min"], r["us_max"], r["python_calls"]]
        for name, r in results.items()
    ]
    hit, floor = results["hit"], results["floor"]
    notes = [
        f"a hit costs {hit['us_median'] - floor['us_median']:+.1f} µs and "
        f"{hit['python_calls'] - floor['python_calls']:+.0f} Python calls beyond the floor "
        f"(medians over {rounds} rounds of {calls} calls; calls counted under cProfile)",
        "the timings include redis-server on the same machine; other work on it moves them",
    ]
    out = {
        "in_process": results,
        "tables": [
            table(
                "CacheMiddleware in process (no HTTP server)",
                ["operation", "µs median", "min", "max", "Python calls"],
                rows,
                notes,
            )
        ],
    }
    finish(out, json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
