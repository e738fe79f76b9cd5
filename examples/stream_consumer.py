"""Keep the cache true to a table without Lambda: a stream consumer beside your API.

    python examples/stream_consumer.py --table Users --redis-url redis://localhost:6379/0

reads the table's stream until SIGINT or SIGTERM and invalidates what changed
(``swr-cache consume-stream`` does the same). Run several: they split the
stream's shards through leases in Redis, and each shard's checkpoint lives in
Redis too, so a restarted consumer carries on where the last one stopped.

With no arguments it runs a self-contained demo: it starts a redis-server and
moto's DynamoDB, caches an item, changes the item behind the cache's back, and
shows one poll of the consumer bringing the cache back in line.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from swr_cache import Cache, StreamConsumer, StreamInvalidator, cached_item


async def latest_stream_arn(session: Any, table: str, **client_kwargs: Any) -> str:
    """The ARN of the table's current stream."""
    async with session.create_client("dynamodb", **client_kwargs) as dynamodb:
        reply = await dynamodb.describe_table(TableName=table)
    arn = reply["Table"].get("LatestStreamArn")
    if not isinstance(arn, str):
        raise SystemExit(f"table {table!r} has no stream: enable one (NEW_AND_OLD_IMAGES)")
    return arn


async def consume(table: str, redis_url: str, namespace: str, **client_kwargs: Any) -> None:
    """Run a consumer until SIGINT/SIGTERM, which stop it after the batch in hand."""
    from aiobotocore.session import get_session

    session = get_session()
    arn = await latest_stream_arn(session, table, **client_kwargs)
    cache = Cache.from_url(redis_url, namespace=namespace)
    async with cache, session.create_client("dynamodbstreams", **client_kwargs) as streams:
        consumer = StreamConsumer(StreamInvalidator(cache), streams, arn)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, consumer.stop)
        print(f"consuming {arn}; Ctrl-C to stop")
        await consumer.run()  # releases its shard leases when it returns


async def demo(redis_url: str, endpoint_url: str) -> None:
    """Cache an item, change it behind the cache's back, let the consumer fix the cache."""
    from aiobotocore.session import get_session
    from boto3.dynamodb.types import TypeDeserializer

    deserializer = TypeDeserializer()
    session = get_session()
    aws: dict[str, Any] = {"endpoint_url": endpoint_url, "region_name": "us-east-1"}
    async with session.create_client("dynamodb", **aws) as dynamodb:
        await dynamodb.create_table(
            TableName="Users",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
            StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
        )
        arn = await latest_stream_arn(session, "Users", **aws)
        await dynamodb.put_item(TableName="Users", Item={"pk": {"S": "u1"}, "name": {"S": "v1"}})

        cache = Cache.from_url(redis_url, namespace="example")

        @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
        async def get_user(
            user_id: str, *, attributes: list[str] | None = None
        ) -> dict[str, Any] | None:
            reply = await dynamodb.get_item(
                TableName="Users", Key={"pk": {"S": user_id}}, ConsistentRead=True
            )
            item = reply.get("Item")
            return (
                None if item is None else {k: deserializer.deserialize(v) for k, v in item.items()}
            )

        async def name() -> object:
            user = await get_user("u1")
            return None if user is None else user["name"]

        async with cache, session.create_client("dynamodbstreams", **aws) as streams:
            print(f"cached: {await name()}")
            # Another service writes without touching the cache.
            await dynamodb.put_item(
                TableName="Users", Item={"pk": {"S": "u1"}, "name": {"S": "v2"}}
            )
            print(f"after a write behind the cache's back: {await name()}")
            consumer = StreamConsumer(StreamInvalidator(cache), streams, arn)
            try:
                print(f"consumer applied {await consumer.poll_once()} records")
            finally:
                await consumer.release()
            print(f"after the stream: {await name()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--table", help="table whose stream to consume (no argument: run the demo)")
    parser.add_argument("--redis-url", default="redis://localhost:6379/0")
    parser.add_argument("--namespace", default="swr")
    parser.add_argument("--endpoint-url", help="DynamoDB endpoint, e.g. a local DynamoDB")
    args = parser.parse_args()
    if args.table:
        aws = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}
        asyncio.run(consume(args.table, args.redis_url, args.namespace, **aws))
        return
    from devtools.devservers import MotoServer, RedisServer

    with RedisServer() as redis_server, MotoServer() as moto:
        asyncio.run(demo(redis_server.url, moto.endpoint_url))


if __name__ == "__main__":
    main()
