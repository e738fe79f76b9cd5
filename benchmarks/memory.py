"""Redis memory per cached item: swr_cache's entries against the same item as one msgpack blob.

For 1,000 items of the usual ~1 KB shape (``make_item``, the item hit_path.py
and batch.py read) this fills, on one redis-server with its default config:

* the floor: ``SET`` of each item's msgpack blob (the codec's encoding) under
  a key of the same length as swr_cache's entry key;
* swr_cache whole entries: one ``@cached_item`` call per item;
* swr_cache projection entries: ``attributes=["name", "email", "bio"]`` per
  item, against the floor of that projection's blob;

and sums ``MEMORY USAGE key SAMPLES 0`` (every field counted) per kind. The
ratio to the floor is the number to watch: a hash whose values exceed
``hash-max-listpack-value`` (64 bytes by default) is a hashtable, which costs
a node per field: format 1's field per attribute cost 1.78x, format 2's
whole entry (one field: header and blob) 1.12x. Format 3 keeps a whole entry
as a string (header and blob), whatever that setting: 1.00x by default.
``--listpack-value 1024`` raises that limit first: hashes become listpacks
(format 1 1.13x, format 2 1.00x) and projections stop paying a node per
attribute.

Deterministic: no timing, so no pinning and no rounds. Runs against an older
tree too (``PYTHONPATH=/path/to/tree``): it uses only the public API.

    python benchmarks/memory.py [--items 1000] [--listpack-value N] [--redis-url URL] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis.asyncio as aioredis
from _common import finish, make_item, say, start_redis, table

from swr_cache import Cache, _codec, cached_item

PROJECTION = ["bio", "email", "name"]
CONFIG = {
    "floor": "SET of the item's msgpack blob (the codec's encoding), a key as long as the entry's",
    "whole": "@cached_item fill of the whole item",
    "projection": f"@cached_item fill of attributes={PROJECTION}",
    "measure": "MEMORY USAGE key SAMPLES 0, summed over the items",
}


async def usage(client: aioredis.Redis, keys: list[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    return sum(int(n) for n in await pipe.execute())


async def measure(url: str, n: int, listpack_value: int | None = None) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    if listpack_value is not None:
        await client.config_set("hash-max-listpack-value", listpack_value)
    items = {f"user#{i:06d}": make_item(f"user#{i:06d}") for i in range(n)}
    cache = Cache.from_url(url, namespace="mem", soft_ttl=3600, hard_ttl=7200)
    out: dict[str, Any] = {}
    async with cache:

        @cached_item(cache, table="Users", key=lambda pk: {"pk": pk}, name="memory")
        async def get_user(pk: str, *, attributes: list[str] | None = None) -> Any:
            item = items[pk]
            return item if attributes is None else {a: item[a] for a in attributes if a in item}

        for pk in items:
            await get_user(pk)
        whole_keys = [k.decode() async for k in client.scan_iter(match="mem:e:*", count=1000)]
        out["whole"] = await usage(client, whole_keys)
        # Format 3 keeps a whole entry as a string; formats 1 and 2 as a hash.
        kind = (await client.type(whole_keys[0])).decode()
        out["whole_type"] = kind
        out["whole_fields"] = int(await client.hlen(whole_keys[0])) if kind == "hash" else 1
        out["whole_encoding"] = (await client.object("encoding", whole_keys[0])).decode()
        key_len = len(whole_keys[0])
        await client.delete(*whole_keys)
        for pk in items:
            await get_user(pk, attributes=PROJECTION)
        proj_keys = [k.decode() async for k in client.scan_iter(match="mem:e:*", count=1000)]
        out["projection"] = await usage(client, proj_keys)
        out["projection_fields"] = int(await client.hlen(proj_keys[0]))
        await client.delete(*proj_keys)
    floor_whole = {f"f:{pk}".ljust(key_len, "_"): _codec.encode(item) for pk, item in items.items()}
    floor_proj = {
        f"p:{pk}".ljust(key_len, "_"): _codec.encode({a: item[a] for a in PROJECTION})
        for pk, item in items.items()
    }
    await client.mset(floor_whole)
    await client.mset(floor_proj)
    out["floor_whole"] = await usage(client, list(floor_whole))
    out["floor_projection"] = await usage(client, list(floor_proj))
    out["blob_bytes"] = sum(len(v) for v in floor_whole.values()) / n
    out["max_listpack_value"] = (await client.config_get("hash-max-listpack-value")).get(
        "hash-max-listpack-value"
    )
    await client.flushdb()
    await client.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="200 items")
    parser.add_argument(
        "--listpack-value",
        type=int,
        help="CONFIG SET hash-max-listpack-value first (only on a server this script started)",
    )
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    n = 200 if args.quick else args.items
    url, server = start_redis(args.redis_url)
    say(f"memory: {n} items")
    try:
        if args.listpack_value is not None and server is None:
            parser.error("--listpack-value changes the server's config: not with --redis-url")
        got = asyncio.run(measure(url, n, args.listpack_value))
    finally:
        if server is not None:
            server.stop()
    rows = [
        ["floor: msgpack blob (SET)", got["floor_whole"] / n, 1.0, 1],
        [
            "swr_cache whole entry",
            got["whole"] / n,
            got["whole"] / got["floor_whole"],
            got["whole_fields"],
        ],
        ["floor: projection blob (SET)", got["floor_projection"] / n, 1.0, 1],
        [
            "swr_cache projection entry",
            got["projection"] / n,
            got["projection"] / got["floor_projection"],
            got["projection_fields"],
        ],
    ]
    notes = [
        f"{n} items of ~{got['blob_bytes']:.0f} bytes as msgpack; "
        f"hash-max-listpack-value {got['max_listpack_value']}; "
        f"a whole entry is a {got.get('whole_type', 'hash')} ({got['whole_encoding']})",
    ]
    results: dict[str, Any] = {
        "benchmark": "memory",
        "config": {"items": n, "contenders": CONFIG},
        "raw": got,
        "tables": [
            table(
                "Redis memory per item (MEMORY USAGE)",
                ["layout", "bytes per item", "x floor", "fields"],
                rows,
                notes,
            )
        ],
    }
    finish(results, args.json)


if __name__ == "__main__":
    main()
