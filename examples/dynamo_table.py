"""The same accessor as ``hand_written_accessor.py``, with ``DynamoTable``.

``DynamoTable`` converts values to plain Python, reads through the cache
(single items, projections, batches of any size) and invalidates on every
write it makes, so there is no accessor to write and no invalidation to
forget. Items live in the same Redis entries as ``@cached_item`` readers of
the same table.

    python examples/dynamo_table.py --endpoint-url http://127.0.0.1:8000 \\
        --redis-url redis://127.0.0.1:6379/0

AWS credentials come from the environment (any values do for a local
endpoint such as moto or DynamoDB Local). The script creates the ``Users``
table if it is missing, and exits non-zero if the cache misbehaves.
"""

from __future__ import annotations

from decimal import Decimal

from _setup import TABLE, count_calls, ensure_table, main
from aiobotocore.session import get_session

from swr_cache import Cache, DynamoTable


async def run(endpoint_url: str, redis_url: str, region: str) -> int:
    session = get_session()
    async with (
        session.create_client(
            "dynamodb", endpoint_url=endpoint_url, region_name=region
        ) as dynamodb,
        Cache.from_url(redis_url, namespace="example-table", soft_ttl=30, hard_ttl=600) as cache,
    ):
        await ensure_table(dynamodb)
        users = DynamoTable(dynamodb, TABLE).cached(cache)  # key schema from DescribeTable, once
        # Writes through the view invalidate what they change (a rerun starts clean).
        await users.batch_write_item(
            puts=[
                {"pk": "u1", "name": "Ada", "email": "ada@example.com", "logins": 3},
                {"pk": "u2", "name": "Bob", "roles": {"admin", "dev"}},
            ]
        )
        calls = count_calls(dynamodb)

        first = await users.get_item({"pk": "u1"})
        second = await users.get_item({"pk": "u1"})
        name_only = await users.get_item({"pk": "u1"}, attributes=["name"])
        print(f"first read (DynamoDB): {first}")
        print(f"second read (Redis):   {second}")
        print(f"projection (Redis):    {name_only}")
        ok = first == second and name_only == {"name": "Ada"} and calls.get("GetItem") == 1

        batch = await users.batch_get_item([{"pk": "u1"}, {"pk": "u2"}, {"pk": "nobody"}])
        print(f"batch (u1 from Redis, u2 and nobody in one BatchGetItem): {batch}")
        ok = ok and batch[0] == first and batch[2] is None and calls.get("BatchGetItem") == 1

        # Write through the view: DynamoDB first, then the entry goes.
        await users.update_item(
            {"pk": "u1"},
            "SET #n = :n ADD logins :one",
            expression_names={"#n": "name"},
            expression_values={":n": "Ada Lovelace", ":one": 1},
        )
        after = await users.get_item({"pk": "u1"})
        print(f"after update_item:     {after}")
        ok = (
            ok
            and after is not None
            and after["name"] == "Ada Lovelace"
            and after["logins"] == Decimal(4)
        )

        await users.delete_item({"pk": "u2"})
        gone = await users.get_item({"pk": "u2"})
        print(f"after delete_item:     {gone}")
        ok = ok and gone is None

        stats = cache.stats()[users.name]
        print(
            f"stats: hits={stats['hits']} misses={stats['misses']} "
            f"negative_hits={stats['negative_hits']} invalidations={stats['invalidations']}"
        )
        print(f"DynamoDB calls: {dict(sorted(calls.items()))}")
        print("OK" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    main(__doc__, run)
