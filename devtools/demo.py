"""``make demo`` (``python -m devtools.demo``): the main job on embedded defaults, with a printed report.

Starts its own redis-server and moto's DynamoDB server on free loopback ports,
then runs two short loads and reports on both:

1. Accessor: seeds a table and drives a cached accessor (``@cached_item`` over
   aiobotocore's GetItem) with concurrent readers on a skewed key distribution
   while a writer updates items and invalidates them. Items expire from fresh
   to stale during the run, so stale-while-revalidate shows up in the numbers.
2. HTTP: starts the example API (``examples/app.py``: Starlette behind
   ``CacheMiddleware``, ``@cached_item`` and ``@cached``) under uvicorn against
   the same servers, and drives it with keep-alive clients: ``GET /users/{id}``
   on a skewed distribution, some ``GET /orders?customer=...``, and a writer
   whose ``PUT``/``POST`` invalidate; after every write it reads the data back.
   A checkout without ``examples/`` skips this phase.

It lives in the repository, not in the package: ``swr-cache demo`` runs it from
a checkout (see :func:`swr_cache._cli.main`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swr_cache import Cache, cached_item

if TYPE_CHECKING:
    from .devservers import HttpConnection, UvicornServer

TABLE = "DemoUsers"
#: The example API; it ships with the repository, not with the package.
EXAMPLE_APP = Path(__file__).resolve().parents[1] / "examples" / "app.py"


def _say(message: str) -> None:
    print(message, flush=True)


class _Progress:
    """One status line per second: rewritten in place on a terminal, a new line otherwise."""

    def __init__(self) -> None:
        self.live = sys.stdout.isatty()
        self.width = 0

    def show(self, line: str) -> None:
        if self.live:
            pad = max(0, self.width - len(line))
            sys.stdout.write("\r" + line + " " * pad)
            sys.stdout.flush()
            self.width = len(line)
        else:
            _say(line)

    def done(self) -> None:
        if self.live and self.width:
            sys.stdout.write("\n")
            sys.stdout.flush()
        self.width = 0


def _zipf(population: Sequence[str], exponent: float = 1.1) -> Callable[[random.Random], str]:
    """Draw from ``population`` with frequency ~ 1 / rank**exponent (the first is the hottest)."""
    cum_weights = list(
        itertools.accumulate(1.0 / (rank + 1) ** exponent for rank in range(len(population)))
    )
    return lambda rng: rng.choices(population, cum_weights=cum_weights)[0]


def _percentile_ms(latencies: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of ``latencies`` in seconds, as milliseconds."""
    if not latencies:
        return 0.0
    ordered = sorted(latencies)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000


async def _run(
    redis_url: str, endpoint_url: str, *, keys: int, readers: int, seconds: float
) -> dict[str, Any]:
    from aiobotocore.session import get_session
    from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

    serializer, deserializer = TypeSerializer(), TypeDeserializer()
    session = get_session()
    origin_calls = 0
    async with session.create_client(
        "dynamodb",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="demo",
        aws_secret_access_key="demo",
    ) as ddb:
        t0 = time.monotonic()
        _say(f"creating table {TABLE} and seeding {keys} items (PutItem, 16 at a time) ...")
        await ddb.create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        seeding = asyncio.Semaphore(16)

        async def put(i: int) -> None:
            item = {
                "pk": f"user#{i}",
                "name": f"User {i}",
                "visits": Decimal(0),
                "roles": {"reader"},
            }
            async with seeding:
                await ddb.put_item(
                    TableName=TABLE, Item={k: serializer.serialize(v) for k, v in item.items()}
                )

        await asyncio.gather(*(put(i) for i in range(keys)))
        _say(f"  seeded in {time.monotonic() - t0:.1f} s")

        cache = Cache.from_url(redis_url, namespace="demo", soft_ttl=1.0, hard_ttl=30.0)
        async with cache:

            @cached_item(
                cache, table=TABLE, key=lambda user_id: {"pk": user_id}, consistent_reads=True
            )
            async def get_user(
                user_id: str, *, attributes: list[str] | None = None
            ) -> dict[str, Any] | None:
                nonlocal origin_calls
                origin_calls += 1
                kwargs: dict[str, Any] = {}
                if attributes:
                    kwargs["ProjectionExpression"] = ", ".join(
                        f"#a{i}" for i in range(len(attributes))
                    )
                    kwargs["ExpressionAttributeNames"] = {
                        f"#a{i}": a for i, a in enumerate(attributes)
                    }
                reply = await ddb.get_item(
                    TableName=TABLE, Key={"pk": {"S": user_id}}, ConsistentRead=True, **kwargs
                )
                raw = reply.get("Item")
                return (
                    None
                    if raw is None
                    else {k: deserializer.deserialize(v) for k, v in raw.items()}
                )

            pick = _zipf([f"user#{i}" for i in range(keys)])
            latencies: list[float] = []
            reads = 0
            stale_after_write = 0
            written: dict[str, int] = {}
            stop = time.monotonic() + seconds

            async def reader(seed: int) -> None:
                nonlocal reads, stale_after_write
                rng = random.Random(seed)
                while time.monotonic() < stop:
                    user = pick(rng)
                    floor = written.get(user, 0)  # a write that completed before this read began
                    t0 = time.perf_counter()
                    if rng.random() < 0.2:
                        item = await get_user(user, attributes=["name"])
                    else:
                        item = await get_user(user)
                        if item is not None and int(item["visits"]) < floor:
                            stale_after_write += 1
                    latencies.append(time.perf_counter() - t0)
                    reads += 1

            async def writer() -> None:
                rng = random.Random(7)
                while time.monotonic() < stop:
                    user = pick(rng)
                    visits = written.get(user, 0) + 1
                    await ddb.update_item(
                        TableName=TABLE,
                        Key={"pk": {"S": user}},
                        UpdateExpression="SET visits = :v",
                        ExpressionAttributeValues={":v": {"N": str(visits)}},
                    )
                    await get_user.invalidate(user)  # write, then invalidate
                    written[user] = visits
                    await asyncio.sleep(0.02)

            line = _Progress()

            async def progress() -> None:
                last_reads, last_at = 0, time.monotonic()
                while time.monotonic() < stop:
                    await asyncio.sleep(min(1.0, max(0.05, stop - time.monotonic())))
                    now = time.monotonic()
                    s = cache.stats()[get_user.name]
                    served = s["hits"] + s["stale_hits"] + s["negative_hits"]
                    share = served / reads if reads else 0.0
                    rate = (reads - last_reads) / (now - last_at) if now > last_at else 0.0
                    last_reads, last_at = reads, now
                    line.show(
                        f"  {now - began:4.1f}/{seconds:.0f} s  {reads:>7,} reads ({rate:,.0f}/s)"
                        f"  from cache {share:.1%}  stale hits {s['stale_hits']:,}"
                        f"  DynamoDB calls {origin_calls:,}  writes {sum(written.values()):,}"
                    )
                line.done()

            _say(
                f"running {readers} concurrent readers (Zipf over {keys} keys, 20% projections)"
                f" and 1 writer (update, then invalidate) for {seconds:.0f} s; soft TTL 1 s, hard TTL 30 s"
            )
            began = time.monotonic()
            await asyncio.gather(*(reader(i) for i in range(readers)), writer(), progress())
            elapsed = time.monotonic() - began
            _say("load finished; waiting for background refreshes and closing the cache")
            stats = cache.stats()[get_user.name]
    return {
        "reads": reads,
        "reads_per_s": reads / elapsed if elapsed else 0.0,
        "origin_calls": origin_calls,
        "writes": sum(written.values()),
        "stale_after_write": stale_after_write,
        "p50_ms": _percentile_ms(latencies, 0.5),
        "p99_ms": _percentile_ms(latencies, 0.99),
        "stats": stats,
    }


def _print_rows(title: str, rows: Sequence[tuple[str, Any]]) -> None:
    width = max(len(name) for name, _ in rows)
    _say(f"\n{title}")
    _say("-" * max(width + 14, len(title)))
    for name, value in rows:
        _say(f"{name:<{width}}  {value:>11}")


def _report(r: dict[str, Any]) -> None:
    s = r["stats"]
    saved = 1.0 - r["origin_calls"] / r["reads"] if r["reads"] else 0.0
    _print_rows("swr_cache demo report: accessor (@cached_item over GetItem, in this process)", [
        ("reads served", r["reads"]),
        ("  per second (one process, one core)", f"{r['reads_per_s']:.0f}"),
        ("  fresh hits", s["hits"]),
        ("  stale hits (served while one refresh ran)", s["stale_hits"]),
        ("  negative hits", s["negative_hits"]),
        ("  misses (foreground loads)", s["misses"] + s["partial_misses"]),
        ("background refreshes", s["refreshes"]),
        ("DynamoDB GetItem calls", r["origin_calls"]),
        ("DynamoDB reads saved", f"{saved:.1%}"),
        ("writes (each followed by an invalidation)", r["writes"]),
        ("fills refused (fenced or lease lost)", s["fills_rejected"]),
        ("stale reads after a completed write", r["stale_after_write"]),
        ("latency p50 (closed loop, readers queue on one event loop)", f"{r['p50_ms']:.2f} ms"),
        ("latency p99", f"{r['p99_ms']:.2f} ms"),
    ])  # fmt: skip


# --- the example API under uvicorn ---------------------------------------------------


def example_app(redis_url: str, endpoint_url: str, *, users: int, namespace: str) -> UvicornServer:
    """``examples/app.py`` under uvicorn (not started): it creates its tables and seeds ``users``.

    The benchmarks run the same server. AWS credentials come from the
    environment (moto accepts any).

    Raises:
        FileNotFoundError: The repository's ``examples/`` is not next to this package.
    """
    from .devservers import UvicornServer

    if not EXAMPLE_APP.is_file():
        raise FileNotFoundError(f"{EXAMPLE_APP} is not there (it ships with the repository)")
    return UvicornServer(
        "examples.app:create_app",
        factory=True,
        app_dir=EXAMPLE_APP.parents[1],
        env={
            "SWR_CACHE_REDIS_URL": redis_url,
            "SWR_CACHE_NAMESPACE": namespace,
            "DYNAMODB_ENDPOINT_URL": endpoint_url,
            "APP_CREATE_TABLES": "1",
            "APP_SEED_USERS": str(users),
        },
        extra_args=["--no-date-header"],  # the middleware dates the responses itself
        ready_path="/ping",
    )


def _cache_status(headers: dict[bytes, bytes]) -> str:
    """``fresh``, ``stale``, ``collapsed`` or ``miss`` from our member of ``Cache-Status``."""
    member = headers.get(b"cache-status", b"").decode("latin-1").split(",")[-1]
    params = [p.strip() for p in member.split(";")]
    if "hit" in params:
        ttl = next((p[4:] for p in params if p.startswith("ttl=")), "0")
        return "stale" if ttl.startswith("-") else "fresh"
    return "collapsed" if "collapsed" in params else "miss"


def _dynamodb_loads(stats: dict[str, Any]) -> int:
    """The app's DynamoDB reads: loads of its cached functions (not of the middleware or engine)."""
    return sum(
        int(m.get("loads", 0)) for name, m in stats.items() if name not in ("http", "swr_cache")
    )


async def _run_http(base_url: str, *, users: int, clients: int, seconds: float) -> dict[str, Any]:
    from .devservers import HttpConnection

    pick_user = _zipf([f"u{i}" for i in range(users)])
    pick_customer = _zipf([f"c{i}" for i in range(max(1, users // 10))])
    statuses: Counter[str] = Counter()  # Cache-Status of every GET
    latencies: list[float] = []
    visits: dict[str, int] = {}  # per user, the visits of the last PUT that returned
    orders: dict[str, int] = {}  # per customer, the orders whose POST returned
    counts = Counter[str]()  # errors, writes, checks, stale

    async def call(conn: HttpConnection, method: str, path: str, body: Any = None) -> Any:
        """One request; its JSON body, or None (counted as an error) unless it succeeded."""
        payload = None if body is None else json.dumps(body).encode()
        headers = [] if body is None else [("Content-Type", "application/json")]
        t0 = time.perf_counter()
        status, fields, raw = await conn.request(method, path, payload, headers)
        latencies.append(time.perf_counter() - t0)
        if method == "GET":
            statuses[_cache_status(fields)] += 1
        if status not in (200, 201):
            counts["errors"] += 1
            return None
        return json.loads(raw)

    def check(seen: int | None, floor: int) -> None:
        """A read that began after a write completed must show at least that write."""
        if floor and seen is not None:
            counts["checks"] += 1
            counts["stale"] += seen < floor

    async def get_user(conn: HttpConnection, user: str) -> int | None:
        item = await call(conn, "GET", f"/users/{user}")
        return None if item is None else int(item["visits"])

    async def get_orders(conn: HttpConnection, customer: str) -> int | None:
        rows = await call(conn, "GET", f"/orders?customer={customer}")
        return None if rows is None else len(rows)

    stop = time.monotonic() + seconds

    async def reader(conn: HttpConnection, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            if rng.random() < 0.1:
                customer = pick_customer(rng)
                floor = orders.get(customer, 0)
                check(await get_orders(conn, customer), floor)
            else:
                user = pick_user(rng)
                floor = visits.get(user, 0)
                check(await get_user(conn, user), floor)

    async def writer(conn: HttpConnection) -> None:
        rng = random.Random(7)
        while time.monotonic() < stop:
            if rng.random() < 0.75:
                user = pick_user(rng)
                n = visits.get(user, 0) + 1
                body = {"name": f"User {user[1:]}", "visits": n, "roles": ["reader"]}
                if await call(conn, "PUT", f"/users/{user}", body) is not None:
                    visits[user] = n
                    check(await get_user(conn, user), n)  # read your write, at once
            else:
                customer = pick_customer(rng)
                order = {
                    "customer_id": customer,
                    "order_id": f"o{counts['writes']:06d}",
                    "total": 10,
                }
                if await call(conn, "POST", "/orders", order) is not None:
                    orders[customer] = orders.get(customer, 0) + 1
                    check(await get_orders(conn, customer), orders[customer])
            counts["writes"] += 1
            await asyncio.sleep(0.05)

    line = _Progress()

    stats: dict[str, Any] = {}  # the app's cache.stats(), polled once a second

    async def progress(conn: HttpConnection) -> None:
        last, last_at = 0, time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, max(0.05, stop - time.monotonic())))
            stats.update(json.loads((await conn.get("/stats"))[2]))
            now, done = time.monotonic(), len(latencies)
            gets = sum(statuses.values())
            share = (statuses["fresh"] + statuses["stale"]) / gets if gets else 0.0
            line.show(
                f"  {now - began:4.1f}/{seconds:.0f} s  {done:>7,} requests"
                f" ({(done - last) / (now - last_at):,.0f}/s)  from cache {share:.1%}"
                f"  stale hits {statuses['stale']:,}  DynamoDB calls {_dynamodb_loads(stats):,}"
                f"  writes {counts['writes']:,}"
            )
            last, last_at = done, now
            if now >= stop:
                line.done()
                return

    _say(
        f"running {clients} HTTP clients (GET /users/{{id}}, Zipf over {users} users; 10% GET"
        f" /orders?customer=...) and 1 writer (PUT /users, POST /orders, each read back) for"
        f" {seconds:.0f} s"
    )
    conns = [await HttpConnection.open(base_url) for _ in range(clients + 2)]
    try:
        began = time.monotonic()
        await asyncio.gather(
            *(reader(conn, i) for i, conn in enumerate(conns[:clients])),
            writer(conns[-2]),
            progress(conns[-1]),
        )
        elapsed = time.monotonic() - began
    finally:
        for conn in conns:
            await conn.aclose()
    return {
        "clients": clients,
        "requests": len(latencies),
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "statuses": statuses,
        "dynamodb_calls": _dynamodb_loads(stats),
        "p50_ms": _percentile_ms(latencies, 0.5),
        "p99_ms": _percentile_ms(latencies, 0.99),
        **counts,
    }


def _http_report(r: dict[str, Any]) -> None:
    s = r["statuses"]
    gets = sum(s.values())
    saved = 1.0 - r["dynamodb_calls"] / gets if gets else 0.0
    _print_rows("HTTP: examples/app.py under uvicorn (CacheMiddleware, @cached_item, @cached)", [
        ("HTTP requests", r["requests"]),
        ("  per second (client, uvicorn, Redis and moto share the cores)", f"{r['rps']:.0f}"),
        ("  GET fresh hits (Cache-Status: hit)", s["fresh"]),
        ("  GET stale hits (hit, ttl < 0; revalidated in the background)", s["stale"]),
        ("  GET collapsed onto a concurrent request's response", s["collapsed"]),
        ("  GET misses (forwarded to the app)", s["miss"]),
        ("  errors (not 200/201)", r.get("errors", 0)),
        ("DynamoDB reads by the app (GetItem, Query)", r["dynamodb_calls"]),
        ("DynamoDB reads saved (one per GET without a cache)", f"{saved:.1%}"),
        ("writes (PUT /users, POST /orders; each invalidates)", r.get("writes", 0)),
        ("reads checked against a completed write", r.get("checks", 0)),
        ("stale responses after a completed write", r.get("stale", 0)),
        (f"latency p50 ({r['clients']} keep-alive clients, one process)", f"{r['p50_ms']:.2f} ms"),
        ("latency p99", f"{r['p99_ms']:.2f} ms"),
    ])  # fmt: skip


#: ``--help``'s text: plain words for a terminal (the module docstring is reST for the docs).
DESCRIPTION = """\
Run a short workload against embedded servers and print a report.

Starts its own redis-server and moto's DynamoDB server on free loopback ports
(or uses the ones --redis-url and --endpoint-url name), then runs two loads:

  1. accessor: concurrent readers of a cached GetItem accessor on a skewed key
     distribution, while a writer updates and invalidates items;
  2. HTTP: the example API (examples/app.py, Starlette behind CacheMiddleware)
     under uvicorn, driven by keep-alive clients, every write read back.

For each load the report counts fresh and stale hits, misses, DynamoDB calls
(and the share saved), writes, stale reads after a completed write (there should
be none) and latency percentiles.
"""


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m devtools.demo") -> int:
    """Run the demo; ``--redis-url``/``--endpoint-url`` use running servers instead.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        prog: the command name ``--help`` and errors show.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument(
        "--endpoint-url", help="use this DynamoDB endpoint instead of starting moto"
    )
    parser.add_argument("--keys", type=int, default=200, help="items (and the example API's users)")
    parser.add_argument(
        "--readers", type=int, default=50, help="concurrent readers of the accessor"
    )
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="length of each of the two loads"
    )
    args = parser.parse_args(argv)
    try:
        from .devservers import MotoProcess, RedisServer
    except ImportError as exc:  # pragma: no cover - the test extra is missing
        print(
            f"{prog} needs the test extra (make venv, or pip install -e '.[test]'): {exc}",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    redis_server: RedisServer | None = None
    moto_server: MotoProcess | None = None
    app: UvicornServer | None = None
    http: dict[str, Any] | None = None
    grace = 10.0  # seconds each server gets to stop before SIGKILL
    try:
        redis_url = args.redis_url
        if redis_url is None:
            t0 = time.monotonic()
            redis_server = RedisServer()
            _say(f"starting redis-server ({redis_server.binary}) on a free loopback port ...")
            redis_server.start()
            redis_url = redis_server.url
            _say(f"  ready at {redis_url} in {time.monotonic() - t0:.1f} s")
        else:
            _say(f"using Redis at {redis_url}")
        endpoint = args.endpoint_url
        if endpoint is None:
            t0 = time.monotonic()
            _say("starting moto's DynamoDB server in a process of its own ...")
            moto_server = MotoProcess()
            moto_server.start()
            endpoint = moto_server.endpoint_url
            _say(f"  ready at {endpoint} in {time.monotonic() - t0:.1f} s")
        else:
            _say(f"using DynamoDB at {endpoint}")
        result = asyncio.run(
            _run(redis_url, endpoint, keys=args.keys, readers=args.readers, seconds=args.seconds)
        )
        try:
            app = example_app(redis_url, endpoint, users=args.keys, namespace="demo-http")
        except FileNotFoundError as exc:
            _say(f"skipping the HTTP phase: {exc}")
        else:
            t0 = time.monotonic()
            _say(
                f"starting examples/app.py under uvicorn (tables Users and Orders, {args.keys} users) ..."
            )
            app.start()
            _say(f"  ready at {app.base_url} in {time.monotonic() - t0:.1f} s")
            http = asyncio.run(
                _run_http(app.base_url, users=args.keys, clients=args.clients, seconds=args.seconds)
            )
    except KeyboardInterrupt:
        _say("\ninterrupted")
        # The app may be waiting on requests to servers the Ctrl-C already stopped.
        grace = 2.0
        return 130
    finally:
        if app is not None or moto_server is not None or redis_server is not None:
            _say("stopping the servers it started")
        for server in (app, moto_server, redis_server):
            if server is not None:
                server.stop(timeout=grace)
    _report(result)
    if http is not None:
        _http_report(http)
    return 0


if __name__ == "__main__":
    sys.exit(main())
