"""One 'process' of the cross-process stampede test: N concurrent cold callers of one key.

Run as ``python stampede.py REDIS_URL NAMESPACE CALLERS TOTAL``. The origin counts
its calls in Redis and holds each call until every caller of every process has
started, so the callers really overlap (a counter, not a sleep, decides).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import redis.asyncio as aioredis

from swr_cache import Cache, cached_item


async def main(url: str, namespace: str, callers: int, total: int) -> None:
    client = aioredis.Redis.from_url(url)
    cache = Cache(client, namespace=namespace)
    async with cache:

        @cached_item(cache, table="Hot", key=lambda k: {"pk": k})
        async def get(k: str) -> dict[str, Any] | None:
            await client.incr("test:origin_calls")
            deadline = time.monotonic() + 20
            while int(await client.get("test:started") or 0) < total:
                if time.monotonic() > deadline:
                    raise RuntimeError("callers never all started")
                await asyncio.sleep(0.005)
            return {"pk": k, "value": "loaded once"}

        async def one() -> dict[str, Any] | None:
            await client.incr("test:started")
            return await get("hot")

        results = await asyncio.gather(*(one() for _ in range(callers)))
        stats = cache.stats()[get.name]
    await client.aclose()
    print(
        json.dumps(
            {
                "ok": sum(1 for r in results if r and r["value"] == "loaded once"),
                "lease_waits": stats["lease_waits"],
                "loads": stats["loads"],
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
