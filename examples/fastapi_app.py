"""A FastAPI service on DynamoDB with all three swr_cache layers and a readiness probe.

* Items: ``GET /users/{user_id}`` reads through ``DynamoTable(...).cached()`` (a
  ``CachedTable``: one Redis entry per item); ``PUT /users/{user_id}`` writes
  through it, which invalidates the entry and everything tagged with the item.
* Results: ``GET /customers/{customer_id}/orders`` is a ``@cached`` function
  returning ``list[Order]`` (Pydantic models, stored as their fields and rebuilt
  on hits), tagged with the customer's partition; ``POST /orders`` writes
  through the Orders view, which purges that tag.
* Responses: ``CacheMiddleware`` stores whole GET responses; each names the
  items it shows in ``Surrogate-Key``, so the same writes (and a stream
  consumer or the Lambda stream handler) remove them too.
* Health: ``GET /health/live`` (the process runs) and ``GET /health/ready``
  (``await cache.ping()``: 200 with the Redis round trip, 503 when Redis does
  not answer within the call timeout). Neither is ever cached. Reads still
  work while Redis is down (they go to DynamoDB), so an orchestrator may keep
  sending traffic; what to do on 503 is a deployment's choice.

The lifespan creates the aiobotocore client and enters the cache (the
middleware never opens Redis). Configuration: ``SWR_CACHE_REDIS_URL`` (see
``Cache.from_env``), ``SWR_CACHE_NAMESPACE`` (default ``fastapi``),
``DYNAMODB_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` (DynamoDB Local or moto;
unset on AWS), ``AWS_REGION`` (default ``us-east-1``), ``APP_CREATE_TABLES=1``
(create the ``Users`` and ``Orders`` tables if missing).

Run it::

    uvicorn --factory examples.fastapi_app:create_app --no-date-header
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

from fastapi import FastAPI, HTTPException, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from swr_cache import (
    Cache,
    CachedTable,
    CacheMiddleware,
    CacheUnavailableError,
    DynamoTable,
    cached,
    item_tag,
)

__all__ = ["Order", "User", "create_app"]

NO_STORE = {"Cache-Control": "no-store"}
FRESHNESS = "max-age=5, stale-while-revalidate=55"


class User(BaseModel):
    pk: str
    name: str
    visits: int = 0


class Order(BaseModel):
    customer_id: str
    order_id: int
    total: Decimal


async def create_tables(dynamodb: Any) -> None:
    """Users (pk) and Orders (customer_id, order_id), with streams, if missing."""
    specs = {
        "Users": ([("pk", "HASH", "S")]),
        "Orders": ([("customer_id", "HASH", "S"), ("order_id", "RANGE", "N")]),
    }
    existing = (await dynamodb.list_tables())["TableNames"]
    for name, keys in specs.items():
        if name in existing:
            continue
        with contextlib.suppress(dynamodb.exceptions.ResourceInUseException):
            await dynamodb.create_table(
                TableName=name,
                KeySchema=[{"AttributeName": n, "KeyType": k} for n, k, _ in keys],
                AttributeDefinitions=[{"AttributeName": n, "AttributeType": t} for n, _, t in keys],
                BillingMode="PAY_PER_REQUEST",
                StreamSpecification={"StreamEnabled": True, "StreamViewType": "KEYS_ONLY"},
            )


def create_app() -> FastAPI:
    """The app; nothing connects until its lifespan runs (use it as a uvicorn factory)."""
    cache = Cache.from_env(namespace=os.environ.get("SWR_CACHE_NAMESPACE", "fastapi"))
    views: dict[str, CachedTable] = {}  # made by the lifespan, once the client exists

    @cached(
        cache,
        key="orders:{customer_id}",
        tags=lambda customer_id: [item_tag("Orders", {"customer_id": customer_id})],
    )
    async def list_orders(customer_id: str) -> list[Order]:
        items = await views["orders"].table.query({"customer_id": customer_id})
        return [Order.model_validate(item) for item in items]

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        from aiobotocore.session import get_session

        endpoint = os.environ.get("DYNAMODB_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION", "us-east-1")
        async with get_session().create_client(
            "dynamodb", endpoint_url=endpoint, region_name=region
        ) as dynamodb:
            if os.environ.get("APP_CREATE_TABLES") == "1":
                await create_tables(dynamodb)
            views["users"] = DynamoTable(dynamodb, "Users", ["pk"]).cached(cache)
            views["orders"] = DynamoTable(dynamodb, "Orders", ["customer_id", "order_id"]).cached(
                cache
            )
            async with cache:  # logs which Redis and namespace it uses
                yield

    app = FastAPI(title="swr_cache on FastAPI", lifespan=lifespan)

    @app.get("/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"status": "ok"}, headers=NO_STORE)

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        try:
            seconds = await cache.ping()
        except CacheUnavailableError as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, 503, NO_STORE)
        return JSONResponse({"status": "ok", "redis_seconds": seconds}, headers=NO_STORE)

    @app.get("/users/{user_id}")
    async def get_user(user_id: str, response: Response) -> User:
        item = await views["users"].get_item({"pk": user_id})
        if item is None:
            raise HTTPException(404, "no such user")
        response.headers["Cache-Control"] = FRESHNESS
        response.headers["Surrogate-Key"] = item_tag("Users", {"pk": user_id})
        return User.model_validate(item)

    @app.put("/users/{user_id}")
    async def put_user(user_id: str, user: User) -> User:
        user = user.model_copy(update={"pk": user_id})
        await views["users"].put_item(user.model_dump())  # then invalidates, tags included
        return user

    @app.get("/customers/{customer_id}/orders")
    async def orders(customer_id: str, response: Response) -> list[Order]:
        response.headers["Cache-Control"] = FRESHNESS
        response.headers["Surrogate-Key"] = item_tag("Orders", {"customer_id": customer_id})
        return await list_orders(customer_id)

    @app.post("/orders", status_code=201)
    async def add_order(order: Order) -> Order:
        # The write purges the item, its partition's tag (the cached list and
        # the responses that carry it) and the table's cached scans.
        await views["orders"].put_item(order.model_dump())
        return order

    @app.get("/stats")
    async def stats() -> JSONResponse:
        counts = {name: dict(s) for name, s in cache.stats().items()}
        plain = {n: {k: v for k, v in c.items() if isinstance(v, int)} for n, c in counts.items()}
        return JSONResponse(plain, headers=NO_STORE)

    app.add_middleware(CacheMiddleware, cache=cache, soft_ttl=5, hard_ttl=60, add_date=True)
    return app
