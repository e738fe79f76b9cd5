"""A Starlette service on DynamoDB, cached by swr_cache at two levels.

* Data: ``GET /users/{user_id}`` reads through ``@cached_item`` (one Redis hash
  per item), ``GET /orders?customer=...`` through ``@cached`` tagged with the
  customer's partition (``item_tag``), so any write to or stream record of an
  order of that customer drops the cached list.
* Responses: ``CacheMiddleware`` in front of the app stores whole responses.
  Each carries ``Surrogate-Key`` naming the items it shows, so the same
  invalidations (a write here, ``cache.purge_tags``, or ``swr-cache
  consume-stream`` reading the tables' streams) remove the responses too.
  Writes (``PUT``/``POST``) also purge their own URL.

The lifespan creates the aiobotocore client and enters the cache; the
middleware never opens Redis itself. Configuration comes from the environment:

``SWR_CACHE_REDIS_URL`` (else ``REDIS_URL``, else ``REDIS_HOST``/``REDIS_PORT``),
``SWR_CACHE_NAMESPACE`` (default ``app``), ``DYNAMODB_ENDPOINT_URL`` (moto or
DynamoDB Local; unset for AWS), ``AWS_REGION`` (default ``us-east-1``),
``APP_USERS_TABLE`` / ``APP_ORDERS_TABLE`` (``Users`` / ``Orders``),
``APP_CREATE_TABLES=1`` (create missing tables, streams on),
``APP_SEED_USERS=N`` (put users ``u0`` ... ``u{N-1}`` at startup),
``APP_MAX_AGE`` / ``APP_STALE_WHILE_REVALIDATE`` (seconds a response is fresh,
then may be served stale; 5 and 55).

Run it (uvicorn adds a ``Date`` of its own to every response unless told not
to; the middleware adds one where the app sent none)::

    uvicorn --factory examples.app:create_app --no-date-header

Routes: ``GET /users/{id}``, ``PUT /users/{id}`` (JSON body), ``GET
/orders?customer=c``, ``POST /orders`` (JSON with ``customer_id`` and
``order_id``), ``GET /raw/users/{id}`` (straight to DynamoDB, never cached:
the benchmark's baseline), ``GET /ping`` (trivial, never cached) and
``GET /stats`` (``cache.stats()``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from swr_cache import Cache, CacheMiddleware, cached, cached_item, item_tag

__all__ = ["Settings", "create_app"]

NO_STORE = {"cache-control": "no-store"}


@dataclass(frozen=True)
class Settings:
    """Where the service finds Redis and DynamoDB, and what it sets up."""

    redis_url: str | None = None
    namespace: str = "app"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    users_table: str = "Users"
    orders_table: str = "Orders"
    create_tables: bool = False
    seed_users: int = 0
    # HTTP freshness of user and order responses, and how long they may be served stale.
    max_age: int = 5
    stale_while_revalidate: int = 55

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from the environment (see the module docstring)."""
        env = os.environ if environ is None else environ
        return cls(
            redis_url=env.get("SWR_CACHE_REDIS_URL") or env.get("REDIS_URL"),
            namespace=env.get("SWR_CACHE_NAMESPACE", "app"),
            endpoint_url=env.get("DYNAMODB_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION", "us-east-1"),
            users_table=env.get("APP_USERS_TABLE", "Users"),
            orders_table=env.get("APP_ORDERS_TABLE", "Orders"),
            create_tables=env.get("APP_CREATE_TABLES", "") == "1",
            seed_users=int(env.get("APP_SEED_USERS", "0")),
            max_age=int(env.get("APP_MAX_AGE", "5")),
            stale_while_revalidate=int(env.get("APP_STALE_WHILE_REVALIDATE", "55")),
        )


def _plain(value: Any) -> Any:
    """DynamoDB values as JSON: Decimals as int or float, sets as sorted lists."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def _json(value: Any, *, headers: Mapping[str, str] | None = None, status: int = 200) -> Response:
    body = json.dumps(_plain(value), separators=(",", ":"), sort_keys=True)
    return Response(
        body, status_code=status, media_type="application/json", headers=dict(headers or {})
    )


async def ensure_tables(dynamodb: Any, settings: Settings) -> None:
    """Create the two tables (with streams) if they are missing."""
    specs = {
        settings.users_table: ([("pk", "HASH")], [("pk", "S")]),
        settings.orders_table: (
            [("customer_id", "HASH"), ("order_id", "RANGE")],
            [("customer_id", "S"), ("order_id", "S")],
        ),
    }
    for table, (schema, attributes) in specs.items():
        try:
            await dynamodb.describe_table(TableName=table)
            continue
        except dynamodb.exceptions.ResourceNotFoundException:
            pass
        with contextlib.suppress(
            dynamodb.exceptions.ResourceInUseException
        ):  # created concurrently
            await dynamodb.create_table(
                TableName=table,
                KeySchema=[{"AttributeName": n, "KeyType": t} for n, t in schema],
                AttributeDefinitions=[
                    {"AttributeName": n, "AttributeType": t} for n, t in attributes
                ],
                BillingMode="PAY_PER_REQUEST",
                StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
            )


def create_app(settings: Settings | None = None) -> CacheMiddleware:
    """Build the ASGI app: Starlette routes behind ``CacheMiddleware``.

    Nothing connects here; the lifespan does. Use it as a uvicorn factory.
    """
    from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

    settings = settings or Settings.from_env()
    serializer, deserializer = TypeSerializer(), TypeDeserializer()
    users_table, orders_table = settings.users_table, settings.orders_table
    if settings.redis_url:
        cache = Cache.from_url(
            settings.redis_url, namespace=settings.namespace, soft_ttl=30, hard_ttl=600
        )
    else:
        cache = Cache.from_env(namespace=settings.namespace, soft_ttl=30, hard_ttl=600)
    resources: dict[str, Any] = {}  # the DynamoDB client, made by the lifespan
    http_freshness = (
        f"max-age={settings.max_age}, stale-while-revalidate={settings.stale_while_revalidate}"
    )

    def to_item(raw: Mapping[str, Any]) -> dict[str, Any]:
        return {k: deserializer.deserialize(v) for k, v in raw.items()}

    @cached_item(
        cache, table=users_table, key=lambda user_id: {"pk": user_id}, consistent_reads=True
    )
    async def get_user(
        user_id: str, *, attributes: list[str] | None = None
    ) -> dict[str, Any] | None:
        kwargs: dict[str, Any] = {}
        if attributes:
            kwargs["ProjectionExpression"] = ", ".join(f"#a{i}" for i in range(len(attributes)))
            kwargs["ExpressionAttributeNames"] = {f"#a{i}": a for i, a in enumerate(attributes)}
        reply = await resources["dynamodb"].get_item(
            TableName=users_table, Key={"pk": {"S": user_id}}, ConsistentRead=True, **kwargs
        )
        raw = reply.get("Item")
        return None if raw is None else to_item(raw)

    @cached(
        cache,
        key="orders:{customer_id}",
        tags=lambda customer_id: [item_tag(orders_table, {"customer_id": customer_id})],
    )
    async def list_orders(customer_id: str) -> list[dict[str, Any]]:
        reply = await resources["dynamodb"].query(
            TableName=orders_table,
            KeyConditionExpression="customer_id = :c",
            ExpressionAttributeValues={":c": {"S": customer_id}},
            ConsistentRead=True,
        )
        return [to_item(raw) for raw in reply.get("Items", [])]

    async def user(request: Request) -> Response:
        user_id = request.path_params["user_id"]
        fields = request.query_params.get("fields")
        item = await get_user(user_id, attributes=fields.split(",") if fields else None)
        headers = {
            "cache-control": http_freshness,
            "surrogate-key": item_tag(users_table, {"pk": user_id}),
        }
        if item is None:
            return _json({"error": "not found"}, headers=headers, status=404)
        return _json(item, headers=headers)

    async def put_user(request: Request) -> Response:
        user_id = request.path_params["user_id"]
        body = await request.json()
        item = {**body, "pk": user_id}
        await resources["dynamodb"].put_item(
            TableName=users_table,
            Item={k: serializer.serialize(v) for k, v in _decimals(item).items()},
        )
        # Write, then invalidate: the item's hash, and every response tagged with it.
        await cache.invalidate_item(users_table, {"pk": user_id})
        return _json(item)

    async def orders(request: Request) -> Response:
        customer_id = request.query_params.get("customer")
        if not customer_id:
            return _json({"error": "customer is required"}, status=400, headers=NO_STORE)
        rows = await list_orders(customer_id)
        return _json(
            rows,
            headers={
                "cache-control": http_freshness,
                "surrogate-key": item_tag(orders_table, {"customer_id": customer_id}),
            },
        )

    async def add_order(request: Request) -> Response:
        body = await request.json()
        key = {"customer_id": str(body["customer_id"]), "order_id": str(body["order_id"])}
        item = {**body, **key}
        await resources["dynamodb"].put_item(
            TableName=orders_table,
            Item={k: serializer.serialize(v) for k, v in _decimals(item).items()},
        )
        await cache.invalidate_item(orders_table, key)
        # The cached lists (and responses) are tagged with the partition.
        await cache.purge_tags([item_tag(orders_table, {"customer_id": key["customer_id"]})])
        return _json(item, status=201)

    async def raw_user(request: Request) -> Response:
        reply = await resources["dynamodb"].get_item(
            TableName=users_table,
            Key={"pk": {"S": request.path_params["user_id"]}},
            ConsistentRead=True,
        )
        raw = reply.get("Item")
        if raw is None:
            return _json({"error": "not found"}, status=404, headers=NO_STORE)
        return _json(to_item(raw), headers=NO_STORE)

    async def ping(request: Request) -> Response:
        return PlainTextResponse("pong", headers=NO_STORE)

    async def stats(request: Request) -> Response:
        return JSONResponse(_finite(cache.stats()), headers=NO_STORE)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        from aiobotocore.session import get_session

        async with contextlib.AsyncExitStack() as stack:
            dynamodb = await stack.enter_async_context(
                get_session().create_client(
                    "dynamodb", endpoint_url=settings.endpoint_url, region_name=settings.region
                )
            )
            resources["dynamodb"] = dynamodb
            if settings.create_tables:
                await ensure_tables(dynamodb, settings)
            for i in range(settings.seed_users):
                item = {
                    "pk": f"u{i}",
                    "name": f"User {i}",
                    "visits": Decimal(0),
                    "roles": {"reader"},
                }
                await dynamodb.put_item(
                    TableName=users_table,
                    Item={k: serializer.serialize(v) for k, v in item.items()},
                )
            await stack.enter_async_context(cache)
            yield

    starlette = Starlette(
        routes=[
            Route("/users/{user_id}", user, methods=["GET", "HEAD"]),
            Route("/users/{user_id}", put_user, methods=["PUT"]),
            Route("/orders", orders, methods=["GET", "HEAD"]),
            Route("/orders", add_order, methods=["POST"]),
            Route("/raw/users/{user_id}", raw_user),
            Route("/ping", ping),
            Route("/stats", stats),
        ],
        lifespan=lifespan,
    )
    return CacheMiddleware(starlette, cache=cache, soft_ttl=5, hard_ttl=60, add_date=True)


def _finite(value: Any) -> Any:
    """Stats as strict JSON: an infinite histogram bound becomes the string "inf"."""
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    return value


def _decimals(value: Any) -> Any:
    """JSON numbers as Decimals, which DynamoDB's serializer requires."""
    if isinstance(value, float):
        return Decimal(str(value))
    if isinstance(value, dict):
        return {k: _decimals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decimals(v) for v in value]
    return value
