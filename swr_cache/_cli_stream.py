"""``swr-cache consume-stream``: a standalone DynamoDB Streams consumer.

Reads a table's stream with aiobotocore's ``dynamodbstreams`` client and
applies it to the cache (see :class:`swr_cache.StreamConsumer`). SIGINT and
SIGTERM stop it after the batch in hand; it then releases its shard leases so
another consumer can take over at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ._cache import Cache
from .streams import StreamConsumer, StreamInvalidator

__all__ = ["main"]

log = logging.getLogger("swr_cache.streams")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swr-cache consume-stream",
        description="Apply a DynamoDB table's stream to the cache (invalidate or refresh entries).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--table", help="table whose latest stream to read")
    source.add_argument("--stream-arn", help="stream to read")
    parser.add_argument(
        "--redis-url",
        help="Redis URL (default: SWR_CACHE_REDIS_URL, REDIS_URL or REDIS_HOST/PORT/DB)",
    )
    parser.add_argument(
        "--namespace", help="cache namespace (default: SWR_CACHE_NAMESPACE or 'swr')"
    )
    parser.add_argument("--endpoint-url", help="DynamoDB endpoint (e.g. a local DynamoDB or moto)")
    parser.add_argument("--region", help="AWS region (default: from the AWS configuration)")
    parser.add_argument(
        "--mode",
        choices=("invalidate", "refresh"),
        default="invalidate",
        help="invalidate entries (default) or rewrite them from NewImage",
    )
    parser.add_argument("--once", action="store_true", help="read every shard once, then exit")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print progress as JSON lines (started, applied, stopped) instead of text",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


async def _stream_arn(session: Any, table: str, client_kwargs: dict[str, Any]) -> str | None:
    async with session.create_client("dynamodb", **client_kwargs) as dynamodb:
        reply = await dynamodb.describe_table(TableName=table)
    arn = reply["Table"].get("LatestStreamArn")
    return arn if isinstance(arn, str) else None


def _report(args: argparse.Namespace, event: str, text: str, **fields: Any) -> None:
    """One progress line on stdout: ``text``, or with ``--json`` one JSON object."""
    if args.json:
        print(json.dumps({"event": event, **fields}, sort_keys=True), flush=True)
    else:
        print(text, flush=True)


async def _consume(args: argparse.Namespace) -> int:
    from aiobotocore.session import get_session

    cache_kwargs: dict[str, Any] = {}
    if args.namespace:
        cache_kwargs["namespace"] = args.namespace
    if args.redis_url:
        cache = Cache.from_url(args.redis_url, **cache_kwargs)
    else:
        cache = Cache.from_env(**cache_kwargs)
    session = get_session()
    client_kwargs: dict[str, Any] = {}
    if args.endpoint_url:
        client_kwargs["endpoint_url"] = args.endpoint_url
    if args.region:
        client_kwargs["region_name"] = args.region
    arn = args.stream_arn
    if arn is None:
        arn = await _stream_arn(session, args.table, client_kwargs)
        if arn is None:
            print(f"swr-cache: table {args.table!r} has no stream enabled", file=sys.stderr)
            return 2
    async with cache, session.create_client("dynamodbstreams", **client_kwargs) as streams:
        invalidator = StreamInvalidator(cache, mode=args.mode)
        consumer = StreamConsumer(invalidator, streams, arn)
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, consumer.stop)
        try:
            _report(
                args,
                "started",
                f"consuming {arn} into namespace {cache.namespace!r} ({args.mode})",
                stream_arn=arn,
                namespace=cache.namespace,
                mode=args.mode,
            )
            if args.once:
                try:
                    applied = await consumer.poll_once()
                finally:
                    await consumer.release()
                counts = invalidator.metrics.counts
                _report(
                    args,
                    "applied",
                    f"applied {applied} records",
                    applied=applied,
                    malformed=counts["stream_records_malformed"],
                )
            else:
                await consumer.run()
                counts = invalidator.metrics.counts
                _report(
                    args,
                    "stopped",
                    f"stopped: applied {counts['stream_records_applied']} records, "
                    f"skipped {counts['stream_records_malformed']} malformed",
                    applied=counts["stream_records_applied"],
                    malformed=counts["stream_records_malformed"],
                )
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
    return 0


def main(argv: Sequence[str]) -> int:
    """Run ``swr-cache consume-stream``; returns the exit code."""
    args = _parser().parse_args(list(argv))
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_consume(args))
