"""A DynamoDB Streams Lambda that keeps an swr_cache cache true to its table.

Deploy this module with the package and set the function's handler to
``lambda_stream_handler.handler``. Give the event source mapping
``FunctionResponseTypes: ["ReportBatchItemFailures"]``: a record that could not
be applied (Redis unreachable) is then retried from that record on, while a
malformed record is skipped and logged instead of blocking the shard.

Configuration comes from the environment, as for the API that reads through
the cache: ``SWR_CACHE_REDIS_URL`` (or ``REDIS_URL``), ``SWR_CACHE_NAMESPACE``,
and ``SWR_CACHE_STREAM_MODE`` (``invalidate``, the default, or ``refresh``).

Run it locally with ``python examples/lambda_stream_handler.py``: it starts a
redis-server of its own, caches an item, and invokes the handler twice (two
warm invocations of one container) with AWS's sample stream event.
"""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal
from typing import Any, Literal

from swr_cache import Cache, StreamInvalidator, cached_item


def stream_mode() -> Literal["invalidate", "refresh"]:
    """The mode named by ``SWR_CACHE_STREAM_MODE``."""
    return "refresh" if os.environ.get("SWR_CACHE_STREAM_MODE") == "refresh" else "invalidate"


# Module scope runs once per container. Building the cache does no I/O: the
# handler connects on its first invocation and keeps the connections (and
# its event loop) for the invocations that follow.
cache = Cache.from_env()
invalidator = StreamInvalidator(cache, mode=stream_mode())
handler = invalidator.lambda_handler


# --- local demo ---------------------------------------------------------------------

TABLE = "ExampleTableWithStream"
_ARN = f"arn:aws:dynamodb:us-west-2:123456789012:table/{TABLE}/stream/2015-06-27T00:48:05.899"


def _record(
    number: int, name: str, key: str, seq: str, new: str | None, old: str | None
) -> dict[str, Any]:
    change: dict[str, Any] = {
        "Keys": {"Id": {"N": key}},
        "SequenceNumber": seq,
        "SizeBytes": 26,
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    if new is not None:
        change["NewImage"] = {"Message": {"S": new}, "Id": {"N": key}}
    if old is not None:
        change["OldImage"] = {"Message": {"S": old}, "Id": {"N": key}}
    return {
        "eventID": str(number),
        "eventVersion": "1.0",
        "dynamodb": change,
        "awsRegion": "us-west-2",
        "eventName": name,
        "eventSourceARN": _ARN,
        "eventSource": "aws:dynamodb",
    }


# The shape of AWS's sample DynamoDB stream event: INSERT, MODIFY, REMOVE of item 101.
SAMPLE_EVENT: dict[str, Any] = {
    "Records": [
        _record(1, "INSERT", "101", "111", "New item!", None),
        _record(2, "MODIFY", "101", "222", "This item has changed", "New item!"),
        _record(3, "REMOVE", "101", "333", None, "This item has changed"),
    ]
}


async def _read_through_cache(redis_url: str, *, fill: bool) -> bool:
    """What an API process does: read item 101 through the cache. Returns whether it is cached."""
    reader_cache = Cache.from_url(redis_url, namespace="example")

    @cached_item(
        reader_cache, table=TABLE, key=lambda item_id: {"Id": item_id}, consistent_reads=True
    )
    async def get_item(
        item_id: int, *, attributes: list[str] | None = None
    ) -> dict[str, Any] | None:
        # Stands in for GetItem with ConsistentRead=True, which may fill the
        # cache at once after an invalidation (no fence to wait out).
        return {"Id": Decimal(item_id), "Message": "New item!"}

    async with reader_cache:
        if fill:
            await get_item(101)
        return await get_item.peek(101) is not None


def _demo() -> None:
    from devtools.devservers import RedisServer

    with RedisServer() as server:
        demo = StreamInvalidator(Cache.from_url(server.url, namespace="example"))
        try:
            for invocation in (1, 2):
                before = asyncio.run(_read_through_cache(server.url, fill=True))
                reply = demo.lambda_handler(SAMPLE_EVENT, None)
                after = asyncio.run(_read_through_cache(server.url, fill=False))
                print(f"invocation {invocation}: batchItemFailures: {reply['batchItemFailures']}")
                print(f"  item 101 cached before: {before}, after: {after}")
        finally:
            demo.close()


if __name__ == "__main__":
    _demo()
