"""A DynamoDB item accessor written by hand and cached with ``@cached_item``.

The accessor is your own aiobotocore code; the decorator puts Redis in front
of it (one hash per item, soft/hard TTLs, single flight, partial reads). After
a write, you invalidate the item yourself. ``examples/dynamo_table.py`` does
the same with ``DynamoTable``, which also writes and invalidates for you.

    python examples/hand_written_accessor.py --endpoint-url http://127.0.0.1:8000 \\
        --redis-url redis://127.0.0.1:6379/0

AWS credentials come from the environment (any values do for a local
endpoint such as moto or DynamoDB Local). The script creates the ``Users``
table if it is missing, and exits non-zero if the cache misbehaves.
"""

from __future__ import annotations

from typing import Any

from _setup import TABLE, count_calls, ensure_table, main
from aiobotocore.session import get_session
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

from swr_cache import Cache, cached_item

serializer = TypeSerializer()


class _Deserializer(TypeDeserializer):  # type: ignore[misc]
    """boto3's deserializer, but binary attributes come back as ``bytes``."""

    def _deserialize_b(self, value: Any) -> bytes:
        return bytes(value)


deserializer = _Deserializer()


async def run(endpoint_url: str, redis_url: str, region: str) -> int:
    session = get_session()
    async with (
        session.create_client(
            "dynamodb", endpoint_url=endpoint_url, region_name=region
        ) as dynamodb,
        Cache.from_url(redis_url, namespace="example-hand", soft_ttl=30, hard_ttl=600) as cache,
    ):
        await ensure_table(dynamodb)
        user = {"pk": "u1", "name": "Ada", "email": "ada@example.com", "logins": 3}
        await dynamodb.put_item(
            TableName=TABLE, Item={k: serializer.serialize(v) for k, v in user.items()}
        )
        # A rerun starts clean.
        await cache.invalidate_items([(TABLE, {"pk": "u1"}), (TABLE, {"pk": "nobody"})])
        calls = count_calls(dynamodb)

        # key= maps the function's arguments (without `attributes`) to the primary key.
        # The same table and key give the same Redis entry DynamoTable and the stream
        # invalidator use. The accessor reads consistently, so say so: its fills
        # need not wait out the fence that follows an invalidation.
        @cached_item(cache, table=TABLE, key=lambda user_id: {"pk": user_id}, consistent_reads=True)
        async def get_user(
            user_id: str, *, attributes: list[str] | None = None
        ) -> dict[str, Any] | None:
            kwargs: dict[str, Any] = {}
            if attributes:
                # Placeholders for every name: reserved words ("name") and odd
                # characters are safe. Keys ride along so an item without the
                # attributes still comes back (as {}) rather than as "no item".
                names = [*attributes, "pk"]
                kwargs["ProjectionExpression"] = ", ".join(f"#a{i}" for i in range(len(names)))
                kwargs["ExpressionAttributeNames"] = {f"#a{i}": n for i, n in enumerate(names)}
            reply = await dynamodb.get_item(
                TableName=TABLE, Key={"pk": {"S": user_id}}, ConsistentRead=True, **kwargs
            )
            raw = reply.get("Item")
            if raw is None:
                return None
            item = {k: deserializer.deserialize(v) for k, v in raw.items()}
            if attributes:
                item = {k: v for k, v in item.items() if k in attributes}
            return item

        first = await get_user("u1")
        second = await get_user("u1")
        name_only = await get_user("u1", attributes=["name"])
        print(f"first read (DynamoDB): {first}")
        print(f"second read (Redis):   {second}")
        print(f"projection (Redis):    {name_only}")
        print(f"GetItem calls so far:  {calls['GetItem']}")
        ok = first == second and name_only == {"name": "Ada"} and calls["GetItem"] == 1

        # Write, then invalidate: the next read loads the new item.
        await dynamodb.update_item(
            TableName=TABLE,
            Key={"pk": {"S": "u1"}},
            UpdateExpression="SET #n = :n",
            ExpressionAttributeNames={"#n": "name"},
            ExpressionAttributeValues={":n": {"S": "Ada Lovelace"}},
        )
        await get_user.invalidate("u1")
        after = await get_user("u1")
        print(f"after write+invalidate: {after}")
        ok = ok and after is not None and after["name"] == "Ada Lovelace"

        missing = await get_user("nobody")
        again = await get_user("nobody")  # cached as not found
        ok = ok and missing is None and again is None and calls["GetItem"] == 3
        stats = cache.stats()[get_user.name]
        print(
            f"stats: hits={stats['hits']} misses={stats['misses']} negative_hits={stats['negative_hits']}"
        )
        print("OK" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    main(__doc__, run)
