"""``swr-cache demo``: the main job on embedded defaults, with a printed report.

Starts its own redis-server and moto's DynamoDB server on free loopback ports,
seeds a table, then drives a cached accessor (``@cached_item`` over
aiobotocore's GetItem) with concurrent readers on a skewed key distribution
while a writer updates items and invalidates them. Items expire from fresh to
stale during the run, so stale-while-revalidate shows up in the numbers.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from . import Cache, cached_item

TABLE = "DemoUsers"


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


async def _run(redis_url: str, endpoint_url: str, *, keys: int, readers: int, seconds: float) -> dict[str, Any]:
    from aiobotocore.session import get_session
    from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

    serializer, deserializer = TypeSerializer(), TypeDeserializer()
    session = get_session()
    origin_calls = 0
    async with session.create_client(
        "dynamodb", endpoint_url=endpoint_url, region_name="us-east-1",
        aws_access_key_id="demo", aws_secret_access_key="demo",
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
            item = {"pk": f"user#{i}", "name": f"User {i}", "visits": Decimal(0), "roles": {"reader"}}
            async with seeding:
                await ddb.put_item(TableName=TABLE, Item={k: serializer.serialize(v) for k, v in item.items()})

        await asyncio.gather(*(put(i) for i in range(keys)))
        _say(f"  seeded in {time.monotonic() - t0:.1f} s")

        cache = Cache.from_url(redis_url, namespace="demo", soft_ttl=1.0, hard_ttl=30.0)
        async with cache:

            @cached_item(cache, table=TABLE, key=lambda user_id: {"pk": user_id}, consistent_reads=True)
            async def get_user(user_id: str, *, attributes: list[str] | None = None) -> dict[str, Any] | None:
                nonlocal origin_calls
                origin_calls += 1
                kwargs: dict[str, Any] = {}
                if attributes:
                    kwargs["ProjectionExpression"] = ", ".join(f"#a{i}" for i in range(len(attributes)))
                    kwargs["ExpressionAttributeNames"] = {f"#a{i}": a for i, a in enumerate(attributes)}
                reply = await ddb.get_item(
                    TableName=TABLE, Key={"pk": {"S": user_id}}, ConsistentRead=True, **kwargs
                )
                raw = reply.get("Item")
                return None if raw is None else {k: deserializer.deserialize(v) for k, v in raw.items()}

            weights = [1.0 / (rank + 1) ** 1.1 for rank in range(keys)]  # Zipf(1.1)
            cum_weights = list(itertools.accumulate(weights))
            population = [f"user#{i}" for i in range(keys)]
            latencies: list[float] = []
            reads = 0
            stale_after_write = 0
            written: dict[str, int] = {}
            stop = time.monotonic() + seconds

            async def reader(seed: int) -> None:
                nonlocal reads, stale_after_write
                rng = random.Random(seed)
                while time.monotonic() < stop:
                    user = rng.choices(population, cum_weights=cum_weights)[0]
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
                    user = rng.choices(population, cum_weights=cum_weights)[0]
                    visits = written.get(user, 0) + 1
                    await ddb.update_item(
                        TableName=TABLE, Key={"pk": {"S": user}},
                        UpdateExpression="SET visits = :v", ExpressionAttributeValues={":v": {"N": str(visits)}},
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
    latencies.sort()
    return {
        "reads": reads,
        "reads_per_s": reads / elapsed if elapsed else 0.0,
        "origin_calls": origin_calls,
        "writes": sum(written.values()),
        "stale_after_write": stale_after_write,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else 0.0,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0.0,
        "stats": stats,
    }


def _report(r: dict[str, Any]) -> None:
    s = r["stats"]
    saved = 1.0 - r["origin_calls"] / r["reads"] if r["reads"] else 0.0
    rows = [
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
    ]
    width = max(len(name) for name, _ in rows)
    _say("\nswr_cache demo report")
    _say("-" * (width + 14))
    for name, value in rows:
        _say(f"{name:<{width}}  {value:>11}")


class _MotoProcess:
    """moto's DynamoDB server in a process of its own, so it does not share our GIL."""

    def __init__(self) -> None:
        from .devservers import free_port

        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; ``--redis-url``/``--endpoint-url`` use running servers instead."""
    import argparse

    parser = argparse.ArgumentParser(prog="swr-cache demo", description=__doc__)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--endpoint-url", help="use this DynamoDB endpoint instead of starting moto")
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    try:
        from .devservers import RedisServer
    except ImportError as exc:  # pragma: no cover - the test extra is missing
        print(f"swr-cache demo needs the test extra (pip install 'swr-cache[test]'): {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "demo")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "demo")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    redis_server = moto_server = None
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
            moto_server = _MotoProcess()
            moto_server.start()
            endpoint = moto_server.endpoint_url
            _say(f"  ready at {endpoint} in {time.monotonic() - t0:.1f} s")
        else:
            _say(f"using DynamoDB at {endpoint}")
        result = asyncio.run(
            _run(redis_url, endpoint, keys=args.keys, readers=args.readers, seconds=args.seconds)
        )
    finally:
        if moto_server is not None or redis_server is not None:
            _say("stopping the servers it started")
        if moto_server is not None:
            moto_server.stop()
        if redis_server is not None:
            redis_server.stop()
    _report(result)
    return 0
