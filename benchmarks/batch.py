"""A batch of 100 cached keys: swr_cache against one MGET (the floor) and the peers, side by side.

The floor is the least any cache must do for 100 items: one ``MGET`` of 100
msgpack blobs (the same ~1 KB item each) and 100 ``msgpack.unpackb`` calls. A
second floor is what a hash with a field per attribute (swr_cache's format 1
layout) costs at least: a redis-py pipeline of 100 HGETALL. A second table
gives the cost of decoding swr_cache's replies alone (no I/O), per item, and
its Python calls per item.
Contenders read the same 100 items, all cached beforehand:

* swr_cache ``DynamoTable.cached(...).batch_get_item`` (one MGET of the 100
  whole entries on a single node; filled once from moto's DynamoDB server),
  when ``swr_cache.dynamodb`` exists;
* swr_cache: 100 concurrent ``@cached_item`` hits (``asyncio.gather``), which
  auto-batching sends as one pipeline;
* swr_cache ``get_user.many(keys, load=...)``, the batch accessor of the same
  ``@cached_item`` function (one MGET; a request object only for what a fresh
  hit does not answer);
* aiocache ``multi_cached`` (one MGET, msgpack serializer on the same codec);
* cashews ``get_many`` (one MGET; cashews has no batch decorator) and 100
  concurrent ``@cache`` hits (pickle, its default).

Rounds are interleaved (floor, swr_cache, peers, floor, ...) and the table
reports the median time per batch and its ratio to the floor.

    python benchmarks/batch.py [--quick] [--rounds 15] [--batches 50] [--json FILE]
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

import msgpack
import redis.asyncio as aioredis
from _common import (
    MotoProcess,
    aiocache_kwargs,
    finish,
    make_item,
    median,
    say,
    start_redis,
    table,
)

from swr_cache import Cache, _codec, cached_item

Batch = Callable[[], Awaitable[Any]]
TABLE = "BenchBatch"
N = 100

CONFIG = {
    "floor (MGET + unpackb)": "one MGET of 100 msgpack blobs, then msgpack.unpackb with the codec's ext hook",
    "floor (pipeline of HGETALL)": "a redis-py pipeline of 100 HGETALL (format 1's field per attribute), msgpack.unpackb per field",
    "swr_cache DynamoTable.batch_get_item": "DynamoTable(...).cached(cache).batch_get_item(100 keys): one MGET of the whole entries",
    "swr_cache 100x @cached_item": "asyncio.gather of 100 @cached_item hits (Cache.from_url defaults; auto-batched into one pipeline)",
    "swr_cache get_user.many": "@cached_item's get_user.many(100 keys, load=...): one MGET of the whole entries",
    "aiocache multi_cached": "aiocache.multi_cached(keys_from_attr='keys', RedisCache), msgpack serializer",
    "cashews get_many": "cashews Cache.get_many(100 keys) (raw API), pickle",
    "cashews 100x @cache": "asyncio.gather of 100 @cache(ttl='1h') hits, pickle",
}


async def dynamo_table(
    endpoint: str, cache: Cache, stack: contextlib.AsyncExitStack, items: list[dict[str, Any]]
) -> Any:
    """A cached DynamoTable over moto, seeded with the items and filled once."""
    from aiobotocore.session import get_session
    from boto3.dynamodb.types import TypeSerializer

    from swr_cache.dynamodb import DynamoTable

    client = await stack.enter_async_context(
        get_session().create_client(
            "dynamodb",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
    )
    await client.create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    serializer = TypeSerializer()
    for i in range(0, len(items), 25):
        await client.batch_write_item(
            RequestItems={
                TABLE: [
                    {"PutRequest": {"Item": {k: serializer.serialize(v) for k, v in item.items()}}}
                    for item in items[i : i + 25]
                ]
            }
        )
    view = DynamoTable(client, TABLE, key_schema=["pk"]).cached(cache, soft_ttl=3600, hard_ttl=7200)
    keys = [{"pk": item["pk"]} for item in items]
    got = await view.batch_get_item(keys)
    if [g and g["pk"] for g in got] != [k["pk"] for k in keys]:
        raise RuntimeError("DynamoTable.batch_get_item did not return the seeded items")
    return view, keys


async def contenders(
    url: str, args: argparse.Namespace, stack: contextlib.AsyncExitStack
) -> dict[str, Batch]:
    items = [make_item(f"user#{i:04d}") for i in range(N)]
    by_pk = {item["pk"]: item for item in items}
    pks = list(by_pk)
    out: dict[str, Batch] = {}

    client = aioredis.Redis.from_url(url)
    stack.push_async_callback(client.aclose)
    floor_keys = [f"floor:{pk}" for pk in pks]
    await client.mset({k: _codec.encode(by_pk[pk]) for k, pk in zip(floor_keys, pks, strict=True)})
    ext_hook = _codec._ext_hook

    async def floor() -> Any:
        return [
            msgpack.unpackb(raw, raw=False, strict_map_key=False, ext_hook=ext_hook)
            for raw in await client.mget(floor_keys)
        ]

    out["floor (MGET + unpackb)"] = floor
    # The floor of a field per attribute (swr_cache's format 1): a pipeline of HGETALLs, one unpackb per field.
    hash_keys = [f"floorh:{pk}" for pk in pks]
    pipe = client.pipeline(transaction=False)
    for k, pk in zip(hash_keys, pks, strict=True):
        pipe.hset(k, mapping={name: _codec.encode(v) for name, v in by_pk[pk].items()})
    await pipe.execute()

    async def floor_hashes() -> Any:
        pipe = client.pipeline(transaction=False)
        for k in hash_keys:
            pipe.hgetall(k)
        return [
            {
                name.decode(): msgpack.unpackb(
                    raw, raw=False, strict_map_key=False, ext_hook=ext_hook
                )
                for name, raw in fields.items()
            }
            for fields in await pipe.execute()
        ]

    out["floor (pipeline of HGETALL)"] = floor_hashes
    cache = await stack.enter_async_context(
        Cache.from_url(url, namespace="bench-batch", soft_ttl=3600, hard_ttl=7200)
    )
    if args.endpoint_url or args.dynamodb:
        try:
            import swr_cache.dynamodb  # noqa: F401
        except ImportError:
            say("  swr_cache.dynamodb is missing: DynamoTable skipped")
        else:
            endpoint = args.endpoint_url
            if endpoint is None:
                say("  starting moto's DynamoDB server")
                moto = await MotoProcess().start_async()
                stack.callback(moto.stop)
                endpoint = moto.endpoint_url
            view, keys = await dynamo_table(endpoint, cache, stack, items)

            async def swr_batch() -> Any:
                return await view.batch_get_item(keys)

            out["swr_cache DynamoTable.batch_get_item"] = swr_batch

    @cached_item(cache, table="BatchUsers", key=lambda pk: {"pk": pk}, name="batch")
    async def get_user(pk: str) -> dict[str, Any] | None:
        return dict(by_pk[pk])

    for pk in pks:
        await get_user(pk)
    DECODE.update(await decode_cost(cache, pks, args.rounds))

    async def swr_gather() -> Any:
        return await asyncio.gather(*(get_user(pk) for pk in pks))

    out["swr_cache 100x @cached_item"] = swr_gather

    if hasattr(get_user, "many"):  # (absent before the batch accessor existed)

        async def load_users(ids: list[str]) -> dict[str, dict[str, Any] | None]:
            return {pk: dict(by_pk[pk]) for pk in ids}

        async def swr_many() -> Any:
            return await get_user.many(pks, load=load_users)

        out["swr_cache get_user.many"] = swr_many
    try:
        import aiocache  # type: ignore[import-untyped]
    except ImportError:
        say("  aiocache is not installed: skipped")
    else:
        # No key_builder: multi_cached hands the built keys to the function. A namespace prefixes them.
        kw = {**aiocache_kwargs(url), "namespace": "am"}

        @aiocache.multi_cached(keys_from_attr="keys", ttl=3600, **kw)  # type: ignore[untyped-decorator]
        async def get_many(keys: list[str]) -> dict[str, Any]:
            return {pk: dict(by_pk[pk]) for pk in keys}

        stack.push_async_callback(get_many.cache.close)
        await get_many(pks)

        async def aio_batch() -> Any:
            return await get_many(pks)

        out["aiocache multi_cached"] = aio_batch
    try:
        from cashews import Cache as CashewsCache
    except ImportError:
        say("  cashews is not installed: skipped")
    else:
        cashews = CashewsCache()
        cashews.setup(url, client_side=False)
        stack.push_async_callback(cashews.close)

        @cashews(ttl="1h", key="cb:{pk}")
        async def cw_get(pk: str) -> dict[str, Any]:
            return dict(by_pk[pk])

        for pk in pks:
            await cw_get(pk)
        cw_keys = [f"cb:{pk}" for pk in pks]

        async def cw_many() -> Any:
            return await cashews.get_many(*cw_keys)

        async def cw_gather() -> Any:
            return await asyncio.gather(*(cw_get(pk) for pk in pks))

        out["cashews get_many"] = cw_many
        out["cashews 100x @cache"] = cw_gather
    # Every contender returns the 100 items before anything is timed.
    for name, fn in out.items():
        got = await fn()
        values = list(got.values()) if isinstance(got, dict) else list(got)
        if len(values) != N or not all(v is not None and v["pk"] in by_pk for v in values):
            raise RuntimeError(f"{name} did not return the {N} items")
    return out


#: The decode cost of swr_cache's batch replies, measured once the entries are filled.
DECODE: dict[str, Any] = {}


async def decode_cost(cache: Any, pks: list[str], rounds: int) -> dict[str, Any]:
    """What turning one entry's reply into its item costs, without I/O.

    The replies of the 100 ``@cached_item`` entries are read once as the engine
    reads them (``EntryRequest.fields``), then snapshot and judged (what
    ``get_many`` and every hit do after the round trip) again and again:
    median microseconds per item over rounds, and Python function calls per
    item under cProfile (deterministic, unlike the timing). Uses only names
    that exist before and after the entry format 2 change, so a run from an
    older tree (``PYTHONPATH``) compares the two.
    """
    import cProfile
    import pstats

    from swr_cache._engine_api import engine_of
    from swr_cache._entry import judge
    from swr_cache._keys import item_identity
    from swr_cache._policy import Policy

    engine = engine_of(cache)
    metrics = engine.metrics.get("decode-cost")
    policy = Policy(soft_ttl=3600, hard_ttl=7200)

    async def never(attrs: Any) -> Any:
        raise AssertionError("decode_cost does not load")

    pairs = []
    for pk in pks:
        req = engine.request(
            metrics=metrics,
            policy=policy,
            identity=item_identity("BatchUsers", {"pk": pk}),
            is_item=True,
            attrs=None,
            loader=never,
        )
        pairs.append((req, await engine.store.read_entry(req.entry, req.fields)))
    now = engine.now_ms()

    def decode_all() -> None:
        for req, raw in pairs:
            snap = engine.snap(req, dict(raw) if type(raw) is dict else raw, req.fields)
            verdict = judge(req, snap, now)
            if type(verdict) is not tuple or verdict[1] is None:
                raise RuntimeError("an entry did not decode as a hit")

    decode_all()
    per_round = []
    for _ in range(max(rounds, 5)):
        t0 = time.perf_counter()
        for _ in range(20):
            decode_all()
        per_round.append((time.perf_counter() - t0) / (20 * len(pairs)) * 1e6)
    profile = cProfile.Profile()
    profile.runcall(decode_all)
    calls = pstats.Stats(profile).total_calls / len(pairs)  # type: ignore[attr-defined]
    return {"us_per_item": median(per_round), "rounds": per_round, "calls_per_item": calls}


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        batch = await contenders(url, args, stack)
        for fn in batch.values():  # warm up
            for _ in range(20):
                await fn()
        times: dict[str, list[float]] = {name: [] for name in batch}
        for r in range(args.rounds):
            say(f"  round {r + 1}/{args.rounds}")
            for name, fn in batch.items():
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    await fn()
                times[name].append((time.perf_counter() - t0) / args.batches * 1e6)
    return {name: {"us_per_batch": median(v), "rounds": v} for name, v in times.items()}


def decode_table(decode: dict[str, Any]) -> dict[str, Any]:
    rounds = decode["rounds"]
    return table(
        "Decoding swr_cache's batch replies (no I/O): snapshot + judge per entry",
        ["us per item (median)", "min", "max", "Python calls per item"],
        [[decode["us_per_item"], min(rounds), max(rounds), decode["calls_per_item"]]],
        notes=[
            "the replies of the 100 entries read once as the engine reads them, then decoded "
            "20 times a round; calls counted under cProfile for one pass"
        ],
    )


def render(results: dict[str, Any], args: argparse.Namespace) -> None:
    per = results["libraries"]
    floor = per["floor (MGET + unpackb)"]["us_per_batch"]
    rows = [
        [name, s["us_per_batch"], s["us_per_batch"] / N, s["us_per_batch"] / floor]
        for name, s in per.items()
    ]
    results["tables"] = [
        table(
            f"A batch of {N} cached ~1 KB items (medians of {args.rounds} interleaved rounds of {args.batches} batches)",
            ["contender", "us per batch", "us per item", "x floor"],
            rows,
            notes=[f"{k}: {v}" for k, v in CONFIG.items() if k in per],
        )
    ]
    if results.get("decode"):
        results["tables"].append(decode_table(results["decode"]))
    names = list(per)
    results["charts"] = [
        {
            "file": "batch.png",
            "title": f"A batch of {N} cached items: time per batch",
            "kind": "barh",
            "categories": names,
            "series": {"us per batch (median)": [per[n]["us_per_batch"] for n in names]},
            "ylabel": "microseconds per batch",
            "log": False,
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument(
        "--endpoint-url",
        help="DynamoDB endpoint for the DynamoTable contender (else moto is started)",
    )
    parser.add_argument(
        "--no-dynamodb", dest="dynamodb", action="store_false", help="skip DynamoTable (no moto)"
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", type=int, default=50, help="batches per contender and round")
    parser.add_argument("--quick", action="store_true", help="4 rounds of 20 batches")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batches = min(args.rounds, 4), min(args.batches, 20)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    url, server = start_redis(args.redis_url)
    say(f"batch: {N} keys, {args.rounds} rounds of {args.batches} batches")
    try:
        libraries = asyncio.run(run(url, args))
    finally:
        if server is not None:
            server.stop()
    results: dict[str, Any] = {
        "benchmark": "batch",
        "config": {"keys": N, "rounds": args.rounds, "batches": args.batches, "contenders": CONFIG},
        "libraries": libraries,
        "decode": DECODE,
    }
    render(results, args)
    finish(results, args.json)


if __name__ == "__main__":
    main()
