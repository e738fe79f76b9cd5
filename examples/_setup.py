"""What the two DynamoDB examples share that is not about caching: the table, call
counting and the command line.

``hand_written_accessor.py`` and ``dynamo_table.py`` import it as ``_setup``
(``python examples/<name>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

TABLE = "Users"


async def ensure_table(dynamodb: Any) -> None:
    """Create the ``Users`` table (partition key ``pk``, a string) if it does not exist yet."""
    try:
        await dynamodb.describe_table(TableName=TABLE)
    except dynamodb.exceptions.ResourceNotFoundException:
        await dynamodb.create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        await dynamodb.get_waiter("table_exists").wait(TableName=TABLE)


def count_calls(dynamodb: Any) -> Counter[str]:
    """Count the client's DynamoDB calls from now on, by operation (``calls["GetItem"]``)."""
    calls: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    dynamodb.meta.events.register("before-call.dynamodb", count)
    return calls


def main(doc: str, run: Callable[[str, str, str], Coroutine[Any, Any, int]]) -> None:
    """Run an example from the command line and exit with its status.

    Args:
        doc: The example's docstring (its first line describes the command).
        run: ``run(endpoint_url, redis_url, region)``, returning 0 when the
            cache behaved.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--endpoint-url", required=True, help="DynamoDB endpoint (moto, DynamoDB Local)"
    )
    parser.add_argument("--redis-url", required=True, help="redis://host:port/db")
    parser.add_argument("--region", default="us-east-1")
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args.endpoint_url, args.redis_url, args.region)))
