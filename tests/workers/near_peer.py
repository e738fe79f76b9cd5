"""Another OS process that changes entries a near cache holds.

Run as ``python near_peer.py REDIS_URL NAMESPACE ACTION [PK ...]`` with ACTION:

* ``invalidate``: ``Cache.invalidate_item("Users", {"pk": PK})`` for each PK;
* ``flushall``: FLUSHALL.

It prints one JSON line: ``{"done_ns": time.monotonic_ns() when the action returned}``
(the monotonic clock is system-wide on Linux, so the parent can compare).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import redis.asyncio as aioredis

from swr_cache import Cache


async def main(url: str, namespace: str, action: str, pks: list[str]) -> None:
    client = aioredis.Redis.from_url(url, socket_timeout=5)
    cache = Cache(client, namespace=namespace, soft_ttl=10, hard_ttl=100, early_refresh=0)
    async with cache:
        if action == "invalidate":
            for pk in pks:
                await cache.invalidate_item("Users", {"pk": pk})
        elif action == "flushall":
            await client.flushall()
        else:
            raise SystemExit(f"unknown action {action!r}")
        done = time.monotonic_ns()
    await client.aclose()
    print(json.dumps({"done_ns": done}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
