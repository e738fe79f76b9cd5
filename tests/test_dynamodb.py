"""DynamoTable and its cached view against moto's server (over HTTP) and a real redis-server.

DynamoDB calls are counted with botocore's event hooks on the client, and
throttling or unknown write outcomes are injected the same way: moto itself
never throttles.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis
from botocore.exceptions import ClientError

from devtools.devservers import RedisServer
from swr_cache import (
    Cache,
    CacheNotEnteredError,
    ConfigError,
    DynamoTable,
    InvalidationError,
    KeyEncodingError,
    _codec,
    cached_item,
    item_tag,
)
from swr_cache.dynamodb import CachedTable, table_tag
from swr_cache.testing import CacheHost, FakeClock

pytestmark = [pytest.mark.redis, pytest.mark.dynamodb, pytest.mark.on_cluster]


# --- helpers ------------------------------------------------------------------------


class Calls:
    """Records each DynamoDB API call's parameters, per operation, via ``before-parameter-build``."""

    def __init__(self, client: Any) -> None:
        self.params: dict[str, list[dict[str, Any]]] = defaultdict(list)
        client.meta.events.register("before-parameter-build.dynamodb", self._record)

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.params[model.name].append(dict(params))

    def __getitem__(self, op: str) -> int:
        return len(self.params[op])

    def reset(self) -> None:
        self.params.clear()


def client_error(code: str, op: str, status: int = 400, retries: int = 0) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"injected {code}"},
            "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": retries},
        },
        op,
    )


class Fault:
    """Raise an injected error from a botocore hook while ``error`` is set."""

    def __init__(self, client: Any, event: str) -> None:
        self.error: BaseException | None = None
        self.raised = 0
        client.meta.events.register(event, self._hook)

    def _hook(self, **_: Any) -> None:
        if self.error is not None:
            self.raised += 1
            raise self.error


async def wait_until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll a condition the code under test drives (never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.002)


async def create_users(client: Any) -> None:
    await client.create_table(
        TableName="Users",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )


async def create_orders(client: Any) -> None:
    await client.create_table(
        TableName="Orders",
        KeySchema=[
            {"AttributeName": "customer_id", "KeyType": "HASH"},
            {"AttributeName": "order_id", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[
            {"AttributeName": "customer_id", "AttributeType": "S"},
            {"AttributeName": "order_id", "AttributeType": "N"},
            {"AttributeName": "total", "AttributeType": "N"},
            {"AttributeName": "status", "AttributeType": "S"},
        ],
        LocalSecondaryIndexes=[
            {
                "IndexName": "by_total",
                "KeySchema": [
                    {"AttributeName": "customer_id", "KeyType": "HASH"},
                    {"AttributeName": "total", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
        ],
        GlobalSecondaryIndexes=[
            {
                "IndexName": "by_status",
                "KeySchema": [{"AttributeName": "status", "KeyType": "HASH"}],
                "Projection": {"ProjectionType": "ALL"},
            }
        ],
        BillingMode="PAY_PER_REQUEST",
    )


async def raw_put(client: Any, table: str, item: dict[str, Any]) -> None:
    """A write that bypasses every cached view."""
    from boto3.dynamodb.types import TypeSerializer

    ser = TypeSerializer()
    await client.put_item(TableName=table, Item={k: ser.serialize(v) for k, v in item.items()})


ADA = {
    "pk": "u1",
    "name": "Ada",
    "status": "active",
    "size": Decimal("3"),
    "my-attr": "dash",
    "address": {"city": "London", "zip": "SW1"},
    "version": Decimal("1"),
}


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture
def qclock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def rcache(redis_client: aioredis.Redis, qclock: FakeClock) -> AsyncIterator[Cache]:
    """A cache for tagged results (long TTLs; see ``settle``)."""
    c = Cache(
        redis_client, namespace="r", soft_ttl=1000, hard_ttl=10_000, clock=qclock, early_refresh=0
    )
    async with CacheHost(c) as entered:
        yield entered


def settle(clock: FakeClock) -> None:
    """Move the cache's clock past the purge stamps of the writes just made.

    A tagged fill whose load began within a small margin of a purge of its
    tags is not stored (it may predate the write); purge stamps are Redis
    server time, which a FakeClock does not follow by itself.
    """
    clock.advance(60)


@pytest.fixture
async def users(dynamodb_client: Any) -> DynamoTable:
    await create_users(dynamodb_client)
    await raw_put(dynamodb_client, "Users", ADA)
    await raw_put(dynamodb_client, "Users", {"pk": "u2", "name": "Bob", "version": Decimal("1")})
    return DynamoTable(dynamodb_client, "Users", backoff_base=0.001, backoff_cap=0.01)


@pytest.fixture
def calls(dynamodb_client: Any) -> Calls:
    return Calls(dynamodb_client)


@pytest.fixture
def view(users: DynamoTable, cache: Cache) -> CachedTable:
    return users.cached(cache)


# --- reads ---------------------------------------------------------------------------------


async def test_second_read_makes_no_getitem_call(view: CachedTable, calls: Calls) -> None:
    """A second read of an item is served from Redis: one GetItem in all."""
    first = await view.get_item({"pk": "u1"})
    second = await view.get_item({"pk": "u1"})
    assert first == second == ADA
    assert calls["GetItem"] == 1
    stats = view.cache.stats()[view.name]
    assert stats["misses"] == 1 and stats["hits"] == 1 and stats["fills"] == 1


async def test_projection_of_full_entry_makes_no_call(view: CachedTable, calls: Calls) -> None:
    """A projection read of an entry holding the whole item is answered from Redis."""
    await view.get_item({"pk": "u1"})
    got = await view.get_item({"pk": "u1"}, attributes=["name", "status"])
    assert got == {"name": "Ada", "status": "active"}
    assert calls["GetItem"] == 1


async def test_projection_uses_placeholders_for_reserved_and_odd_names(
    view: CachedTable, calls: Calls
) -> None:
    """Reserved words, dashes and nested paths project through ExpressionAttributeNames."""
    got = await view.get_item({"pk": "u1"}, attributes=["name", "status", "size", "my-attr"])
    assert got == {"name": "Ada", "status": "active", "size": Decimal("3"), "my-attr": "dash"}
    params = calls.params["GetItem"][0]
    assert set(params["ExpressionAttributeNames"].values()) == {
        "name",
        "status",
        "size",
        "my-attr",
        "pk",
    }
    assert "name" not in params["ProjectionExpression"]
    nested = await view.get_item({"pk": "u1"}, attributes=["address.city"])
    assert nested == {"address": {"city": "London", "zip": "SW1"}}  # the top-level attribute
    with_key = await view.get_item({"pk": "u2"}, attributes=["pk", "name"])
    assert with_key == {"pk": "u2", "name": "Bob"}
    batch = await view.batch_get_item([{"pk": "u2"}, {"pk": "zz"}], attributes=["name", "pk"])
    assert batch == [{"pk": "u2", "name": "Bob"}, None]
    missing = await view.get_item({"pk": "u1"}, attributes=["nope"])
    assert missing == {}  # the item exists without it
    assert await view.get_item({"pk": "nobody"}, attributes=["name"]) is None


async def test_partial_entries_load_only_missing_attributes(
    users: DynamoTable, cache: Cache, calls: Calls
) -> None:
    """With a version attribute, a fresh partial entry gets the missing attributes merged; then both are hits."""
    view = users.cached(cache, version_attribute="version")
    assert await view.get_item({"pk": "u1"}, attributes=["name"]) == {"name": "Ada"}
    assert await view.get_item({"pk": "u1"}, attributes=["name", "size"]) == {
        "name": "Ada",
        "size": 3,
    }
    names = set(calls.params["GetItem"][1]["ExpressionAttributeNames"].values())
    assert names == {"size", "version", "pk"}  # only what was missing (the version and the key)
    assert await view.get_item({"pk": "u1"}, attributes=["size", "name"]) == {
        "name": "Ada",
        "size": 3,
    }
    assert calls["GetItem"] == 2


async def test_partial_entries_without_a_version_attribute_are_replaced(
    view: CachedTable, calls: Calls
) -> None:
    """Without a version attribute, a partial entry missing an attribute is replaced from one load of the union."""
    assert await view.get_item({"pk": "u1"}, attributes=["name"]) == {"name": "Ada"}
    assert await view.get_item({"pk": "u1"}, attributes=["size"]) == {"size": 3}
    names = set(calls.params["GetItem"][1]["ExpressionAttributeNames"].values())
    assert names == {"name", "size", "pk"}  # the cached name is loaded again with the size
    assert await view.get_item({"pk": "u1"}, attributes=["size", "name"]) == {
        "name": "Ada",
        "size": 3,
    }
    assert calls["GetItem"] == 2


async def test_values_round_trip_as_plain_python(view: CachedTable, dynamodb_client: Any) -> None:
    """Decimal, sets, bytes (not boto3 Binary), nested maps and lists come back exactly, cached or not."""
    item = {
        "pk": "t1",
        "n": Decimal("1.10"),
        "big": Decimal("123456789012345678901234567890"),
        "ss": {"a", "b"},
        "ns": {Decimal("1"), Decimal("2.5")},
        "b": b"\x00\xff",
        "bs": {b"x", b"y"},
        "m": {"l": [Decimal("1"), "two", None, True, {"deep": b"z"}]},
        "flag": False,
        "nothing": None,
    }
    await view.put_item(item)
    loaded = await view.get_item({"pk": "t1"})
    cached = await view.get_item({"pk": "t1"})
    assert loaded == cached == item
    assert cached is not None and type(cached["b"]) is bytes
    assert all(type(x) is bytes for x in cached["bs"])


async def test_absent_item_is_negatively_cached(view: CachedTable, calls: Calls) -> None:
    """``None`` is cached: a second read of a missing item makes no call."""
    assert await view.get_item({"pk": "ghost"}) is None
    assert await view.get_item({"pk": "ghost"}) is None
    assert calls["GetItem"] == 1
    assert view.cache.stats()[view.name]["negative_hits"] == 1


async def test_key_must_match_the_schema(view: CachedTable) -> None:
    """A key with missing or extra attributes is refused before any call."""
    with pytest.raises(KeyEncodingError, match="exactly the attributes"):
        await view.get_item({"pk": "u1", "extra": 1})
    with pytest.raises(KeyEncodingError):
        await view.get_item({"id": "u1"})


async def test_batch_keys_are_checked_when_remembered_too(view: CachedTable, calls: Calls) -> None:
    """Batches remember text keys' identities; a key that does not match the schema is still refused."""
    first = await view.batch_get_item([{"pk": "u1"}, {"pk": "u2"}])
    again = await view.batch_get_item([{"pk": "u1"}, {"pk": "u2"}])
    assert again == first and calls["BatchGetItem"] == 1
    assert view._idents  # remembered
    with pytest.raises(KeyEncodingError, match="exactly the attributes"):
        await view.batch_get_item([{"pk": "u1"}, {"pk": "u1", "extra": "x"}])
    with pytest.raises(KeyEncodingError):
        await view.batch_get_item([{"id": "u1"}])
    with pytest.raises(KeyEncodingError):
        await view.batch_get_item([{"pk": ["u1"]}])
    # Numbers are not remembered, and read as single reads would.
    assert await view.batch_get_item([{"pk": 7}]) == [await view.get_item({"pk": 7})]


async def test_unentered_cache_raises_clearly(
    users: DynamoTable, redis_client: aioredis.Redis
) -> None:
    """Reading through a view whose cache was never entered says so."""
    view = users.cached(Cache(redis_client, namespace="t"))
    with pytest.raises(CacheNotEnteredError):
        await view.get_item({"pk": "u1"})
    with pytest.raises(CacheNotEnteredError):
        await view.batch_get_item([{"pk": "u1"}])


async def test_fills_read_consistently_by_default(
    users: DynamoTable, cache: Cache, calls: Calls
) -> None:
    """Fills use ConsistentRead=True unless the view says otherwise."""
    await users.cached(cache).get_item({"pk": "u1"})
    await users.cached(cache, consistent_fills=False, name="ec").get_item({"pk": "u2"})
    first, second = calls.params["GetItem"]
    assert first.get("ConsistentRead") is True
    assert "ConsistentRead" not in second


async def test_consistent_read_always_calls_dynamodb_and_refreshes(
    view: CachedTable, calls: Calls, dynamodb_client: Any
) -> None:
    """consistent_read=True reads DynamoDB every time and stores what it read."""
    await view.get_item({"pk": "u1"})
    await raw_put(dynamodb_client, "Users", {**ADA, "name": "Ada v2"})
    for _ in range(3):
        got = await view.get_item({"pk": "u1"}, consistent_read=True)
        assert got is not None and got["name"] == "Ada v2"
    assert calls["GetItem"] == 4
    assert all(p["ConsistentRead"] is True for p in calls.params["GetItem"])
    plain = await view.get_item({"pk": "u1"})  # the cache was refreshed by those reads
    assert plain is not None and plain["name"] == "Ada v2"
    assert calls["GetItem"] == 4


async def test_key_schema_described_once_for_concurrent_first_calls(
    dynamodb_client: Any, cache: Cache, calls: Calls
) -> None:
    """Twenty concurrent first reads share one DescribeTable; a given schema needs none."""
    await create_users(dynamodb_client)
    view = DynamoTable(dynamodb_client, "Users").cached(cache)
    await asyncio.gather(*(view.get_item({"pk": f"k{i}"}) for i in range(20)))
    assert calls["DescribeTable"] == 1
    given = DynamoTable(dynamodb_client, "Users", key_schema=["pk"]).cached(cache, name="given")
    await given.get_item({"pk": "k0"})
    assert calls["DescribeTable"] == 1


def test_key_schema_forms() -> None:
    """Names or DescribeTable's KeySchema (any order) give the partition key first."""
    assert DynamoTable(None, "T", ["pk", "sk"])._names == ("pk", "sk")
    schema = [
        {"AttributeName": "sk", "KeyType": "RANGE"},
        {"AttributeName": "pk", "KeyType": "HASH"},
    ]
    assert DynamoTable(None, "T", schema)._names == ("pk", "sk")
    for bad in ([], ["a", "b", "c"], ["a", "a"], "pk"):
        with pytest.raises(ConfigError):
            DynamoTable(None, "T", bad)


async def test_hand_written_accessor_shares_the_entry(view: CachedTable, cache: Cache) -> None:
    """An item read through the view is a hit for ``@cached_item`` on the same table and key."""
    origin_calls = 0

    @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
    async def get_user(
        user_id: str, *, attributes: list[str] | None = None
    ) -> dict[str, Any] | None:
        nonlocal origin_calls
        origin_calls += 1
        return None

    await view.get_item({"pk": "u1"})
    assert await get_user("u1") == ADA
    assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
    assert origin_calls == 0


# --- batch reads ------------------------------------------------------------------------------


async def test_150_keys_two_batch_calls_then_none(
    view: CachedTable, calls: Calls, dynamodb_client: Any
) -> None:
    """150 keys load in 2 BatchGetItem calls, in the keys' order, None where absent; then 0 calls."""
    await view.batch_write_item(
        puts=[{"pk": f"b{i:03}", "n": Decimal(i)} for i in range(0, 150, 2)]
    )
    keys = [{"pk": f"b{i:03}"} for i in range(150)]
    first = await view.batch_get_item(keys)
    assert calls["BatchGetItem"] == 2
    assert first == [
        {"pk": f"b{i:03}", "n": Decimal(i)} if i % 2 == 0 else None for i in range(150)
    ]
    second = await view.batch_get_item(keys)
    assert second == first
    assert calls["BatchGetItem"] == 2 and calls["GetItem"] == 0
    stats = view.cache.stats()[view.name]
    assert stats["hits"] == 75 and stats["negative_hits"] == 75
    assert all(len(p["RequestItems"]["Users"]["Keys"]) <= 100 for p in calls.params["BatchGetItem"])
    assert all(p["RequestItems"]["Users"]["ConsistentRead"] for p in calls.params["BatchGetItem"])


async def test_batch_mixes_hits_misses_and_duplicates(view: CachedTable, calls: Calls) -> None:
    """Cached keys are not reloaded; repeated keys get equal but separate objects."""
    await view.get_item({"pk": "u1"})
    got = await view.batch_get_item([{"pk": "u1"}, {"pk": "u2"}, {"pk": "u1"}, {"pk": "zz"}])
    assert got[0] == got[2] == ADA and got[0] is not got[2]
    assert got[1] is not None and got[1]["name"] == "Bob" and got[3] is None
    keys = calls.params["BatchGetItem"][0]["RequestItems"]["Users"]["Keys"]
    assert len(keys) == 2  # u2 and zz only
    assert await view.get_item({"pk": "u2"}) == got[1]
    assert calls["GetItem"] == 1


async def test_batch_projection_merges_into_fresh_partial_entries(
    view: CachedTable, calls: Calls
) -> None:
    """A batch projection loads only what partial entries lack, and the union is then cached."""
    await view.get_item({"pk": "u1"}, attributes=["name"])
    got = await view.batch_get_item([{"pk": "u1"}, {"pk": "u2"}], attributes=["name", "status"])
    assert got == [{"name": "Ada", "status": "active"}, {"name": "Bob"}]
    assert calls["BatchGetItem"] == 1
    again = await view.batch_get_item([{"pk": "u1"}, {"pk": "u2"}], attributes=["status", "name"])
    assert again == got
    assert calls["BatchGetItem"] == 1 and calls["GetItem"] == 1


async def test_batch_serves_stale_and_refreshes_in_background(
    view: CachedTable, calls: Calls, clock: FakeClock, dynamodb_client: Any
) -> None:
    """Stale entries in a batch are served at once; each is refreshed once in the background."""
    keys = [{"pk": "u1"}, {"pk": "u2"}]
    await view.batch_get_item(keys)
    await raw_put(dynamodb_client, "Users", {**ADA, "name": "Ada v2"})
    clock.advance(11)
    got = await view.batch_get_item(keys)
    assert got[0] is not None and got[0]["name"] == "Ada"  # stale, served at once
    await wait_until(lambda: view.cache.stats()[view.name]["fills"] == 4)
    assert calls["BatchGetItem"] == 1 and calls["GetItem"] == 2
    fresh = await view.batch_get_item(keys)
    assert fresh[0] is not None and fresh[0]["name"] == "Ada v2"


async def test_concurrent_batches_share_one_load(
    view: CachedTable, calls: Calls, dynamodb_client: Any
) -> None:
    """A batch whose keys another batch is loading waits for that fill instead of loading again."""
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def hold(**_: Any) -> None:
        entered.set()
        await gate.wait()

    dynamodb_client.meta.events.register("before-call.dynamodb.BatchGetItem", hold)
    keys = [{"pk": "u1"}, {"pk": "u2"}, {"pk": "u3"}]
    first = asyncio.create_task(view.batch_get_item(keys))
    await entered.wait()
    second = asyncio.create_task(view.batch_get_item(keys))
    await wait_until(lambda: view.cache.stats()[view.name]["lease_waits"] == 3)
    gate.set()
    assert await first == await second
    assert calls["BatchGetItem"] == 1 and calls["GetItem"] == 0


async def test_unprocessed_keys_are_retried(
    view: CachedTable, calls: Calls, dynamodb_client: Any
) -> None:
    """UnprocessedKeys go back in another BatchGetItem after a back-off."""
    rounds = 0

    def drop_one(parsed: dict[str, Any], **_: Any) -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            moved = parsed["Responses"]["Users"].pop()
            parsed["UnprocessedKeys"] = {
                "Users": {"Keys": [{"pk": moved["pk"]}], "ConsistentRead": True}
            }

    dynamodb_client.meta.events.register("after-call.dynamodb.BatchGetItem", drop_one)
    got = await view.batch_get_item([{"pk": "u1"}, {"pk": "u2"}])
    assert [g["name"] if g else None for g in got] == ["Ada", "Bob"]
    assert calls["BatchGetItem"] == 2
    assert view.cache.stats()[view.name]["unprocessed_retries"] == 1


async def test_unprocessed_keys_fall_back_to_single_reads(
    dynamodb_client: Any, users: DynamoTable, cache: Cache, calls: Calls
) -> None:
    """Keys still unprocessed after the retries are read one by one with GetItem."""

    def never(parsed: dict[str, Any], **_: Any) -> None:
        items = parsed["Responses"]["Users"]
        if items:
            moved = items.pop()
            parsed["UnprocessedKeys"] = {"Users": {"Keys": [{"pk": moved["pk"]}]}}

    dynamodb_client.meta.events.register("after-call.dynamodb.BatchGetItem", never)
    table = DynamoTable(dynamodb_client, "Users", unprocessed_retries=2, backoff_base=0.001)
    got = await table.cached(cache).batch_get_item([{"pk": "u1"}])
    assert got == [ADA]
    assert calls["BatchGetItem"] == 3 and calls["GetItem"] == 1


async def test_warm_preloads_entries(view: CachedTable, calls: Calls) -> None:
    """warm() loads what is not cached with batch reads; later reads make no call."""
    assert await view.warm([{"pk": "u1"}, {"pk": "u2"}]) == 2
    assert await view.warm([{"pk": "u1"}, {"pk": "u2"}]) == 0
    await view.get_item({"pk": "u1"})
    await view.get_item({"pk": "u2"})
    assert calls["BatchGetItem"] == 1 and calls["GetItem"] == 0


@pytest.mark.cluster
async def test_batch_on_redis_cluster(
    cluster_client: Any, users: DynamoTable, calls: Calls, dynamodb_client: Any
) -> None:
    """Entries spread over a cluster's slots are read and leased in grouped pipelines."""
    cache = Cache(cluster_client, namespace="c", soft_ttl=10, hard_ttl=100, early_refresh=0)
    async with CacheHost(cache):
        view = users.cached(cache)
        keys = [{"pk": f"k{i}"} for i in range(40)] + [{"pk": "u1"}]
        first = await view.batch_get_item(keys)
        second = await view.batch_get_item(keys)
        assert first == second and first[-1] == ADA and first[0] is None
        assert calls["BatchGetItem"] == 1


# --- throttling -----------------------------------------------------------------------------


async def test_throttled_refresh_keeps_serving_stale(
    view: CachedTable, dynamodb_client: Any, clock: FakeClock
) -> None:
    """A throttled background refresh keeps the stale value, backs off and is counted."""
    fault = Fault(dynamodb_client, "before-call.dynamodb.GetItem")
    await view.get_item({"pk": "u1"})
    clock.advance(11)
    fault.error = client_error("ProvisionedThroughputExceededException", "GetItem")
    got = await view.get_item({"pk": "u1"})
    assert got == ADA
    await wait_until(lambda: view.cache.stats()[view.name]["refresh_errors"] == 1)
    for _ in range(5):  # backing off: served stale, no new refresh
        assert await view.get_item({"pk": "u1"}) == ADA
    stats = view.cache.stats()[view.name]
    assert stats["throttles"] == 1 and fault.raised == 1
    peeked = await view.peek({"pk": "u1"})
    assert peeked is not None and peeked[1] == "stale"


@pytest.mark.parametrize(
    ("code", "status"),
    [("ThrottlingException", 400), ("RequestLimitExceeded", 400), ("InternalServerError", 500)],
)
async def test_foreground_throttle_raises_botocore_error_unchanged(
    view: CachedTable, dynamodb_client: Any, code: str, status: int
) -> None:
    """On a miss the caller gets DynamoDB's own error object, and it is counted."""
    fault = Fault(dynamodb_client, "before-call.dynamodb.GetItem")
    fault.error = client_error(code, "GetItem", status)
    with pytest.raises(ClientError) as info:
        await view.get_item({"pk": "u1"})
    assert info.value is fault.error
    fault.error = client_error(code, "BatchGetItem", status)
    batch_fault = Fault(dynamodb_client, "before-call.dynamodb.BatchGetItem")
    batch_fault.error = fault.error
    with pytest.raises(ClientError) as info:
        await view.batch_get_item([{"pk": "u1"}, {"pk": "u2"}])
    assert info.value is fault.error
    assert view.cache.stats()[view.name]["throttles"] == 2
    fault.error = batch_fault.error = None
    assert await view.batch_get_item([{"pk": "u1"}]) == [ADA]  # leases were released


# --- writes ---------------------------------------------------------------------------------------


async def test_writes_through_the_view_are_read_back(view: CachedTable, calls: Calls) -> None:
    """put, update and delete through the view make the next read return the new state."""
    await view.get_item({"pk": "u1"})
    await view.put_item({**ADA, "name": "Ada v2"})
    got = await view.get_item({"pk": "u1"})
    assert got is not None and got["name"] == "Ada v2"
    await view.update_item(
        {"pk": "u1"},
        "SET #n = :n ADD #v :one",
        expression_names={"#n": "name", "#v": "version"},
        expression_values={":n": "Ada v3", ":one": 1},
    )
    got = await view.get_item({"pk": "u1"}, attributes=["name", "version"])
    assert got == {"name": "Ada v3", "version": Decimal("2")}
    old = await view.delete_item({"pk": "u1"}, return_values="ALL_OLD")
    assert old is not None and old["name"] == "Ada v3"
    assert await view.get_item({"pk": "u1"}) is None
    assert calls["GetItem"] == 4


async def test_write_bypassing_the_view_is_invisible_until_invalidated(
    view: CachedTable, dynamodb_client: Any
) -> None:
    """A write made straight to DynamoDB is not seen until something invalidates (streams do)."""
    await view.get_item({"pk": "u1"})
    await raw_put(dynamodb_client, "Users", {**ADA, "name": "behind your back"})
    got = await view.get_item({"pk": "u1"})
    assert got is not None and got["name"] == "Ada"
    await view.cache.invalidate_item("Users", {"pk": "u1"})
    got = await view.get_item({"pk": "u1"})
    assert got is not None and got["name"] == "behind your back"


async def test_rejected_write_leaves_the_cache_alone(view: CachedTable) -> None:
    """A failed condition raises DynamoDB's error and invalidates nothing."""
    await view.get_item({"pk": "u1"})
    with pytest.raises(ClientError) as info:
        await view.put_item(ADA, condition_expression="attribute_not_exists(pk)")
    assert info.value.response["Error"]["Code"] == "ConditionalCheckFailedException"
    with pytest.raises(ClientError):
        await view.update_item(
            {"pk": "u1"},
            "SET #n = :n",
            condition_expression="#v = :old",
            expression_names={"#n": "name", "#v": "version"},
            expression_values={":n": "x", ":old": 99},
        )
    peeked = await view.peek({"pk": "u1"})
    assert peeked is not None and peeked[1] == "fresh"
    assert view.cache.stats()["swr_cache"]["invalidations"] == 0


async def test_write_with_unknown_outcome_still_invalidates(
    view: CachedTable, dynamodb_client: Any
) -> None:
    """A write whose reply is a 5xx (it may have been applied) invalidates before raising."""
    await view.get_item({"pk": "u1"})
    fault = Fault(dynamodb_client, "after-call.dynamodb.PutItem")  # applied, then the reply fails
    fault.error = client_error("InternalServerError", "PutItem", 500)
    with pytest.raises(ClientError) as info:
        await view.put_item({**ADA, "name": "Ada v2"})
    assert info.value is fault.error
    assert await view.peek({"pk": "u1"}) is None
    fault.error = None
    got = await view.get_item({"pk": "u1"})
    assert got is not None and got["name"] == "Ada v2"


async def test_condition_failure_after_a_retry_counts_as_unknown(
    view: CachedTable, dynamodb_client: Any
) -> None:
    """A condition that fails on a retried attempt may be our own earlier write: invalidate."""
    await view.get_item({"pk": "u1"})
    fault = Fault(dynamodb_client, "before-call.dynamodb.PutItem")
    fault.error = client_error("ConditionalCheckFailedException", "PutItem", 400, retries=1)
    with pytest.raises(ClientError):
        await view.put_item(ADA, condition_expression="attribute_not_exists(pk)")
    assert await view.peek({"pk": "u1"}) is None


async def test_write_with_redis_down_raises_invalidation_error(
    restartable_redis: RedisServer, users: DynamoTable, calls: Calls
) -> None:
    """Reads fail open when Redis is down; a write that cannot invalidate fails loudly."""
    client = aioredis.Redis.from_url(
        restartable_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    cache = Cache(client, namespace="t", early_refresh=0)
    try:
        async with CacheHost(cache):
            view = users.cached(cache)
            await view.get_item({"pk": "u1"})
            restartable_redis.stop()
            assert await view.get_item({"pk": "u1"}) == ADA
            got = await view.batch_get_item([{"pk": "u1"}, {"pk": "u2"}, {"pk": "zz"}])
            assert got[0] == ADA and got[2] is None
            assert calls["GetItem"] == 2 and calls["BatchGetItem"] == 1
            with pytest.raises(InvalidationError):
                await view.put_item({**ADA, "name": "written"})
            assert (await users.get_item({"pk": "u1"}) or {})["name"] == "written"
            assert cache.stats()[view.name]["bypasses"] >= 2
    finally:
        await client.aclose()


async def test_batch_write_invalidates_every_key(view: CachedTable, calls: Calls) -> None:
    """batch_write_item invalidates each key it puts or deletes."""
    await view.batch_get_item([{"pk": "u1"}, {"pk": "u2"}, {"pk": "u3"}])
    await view.batch_write_item(
        puts=[{**ADA, "name": "Ada v2"}, {"pk": "u3", "name": "Cy"}], deletes=[{"pk": "u2"}]
    )
    got = await view.batch_get_item([{"pk": "u1"}, {"pk": "u2"}, {"pk": "u3"}])
    assert [g["name"] if g else None for g in got] == ["Ada v2", None, "Cy"]
    assert calls["BatchGetItem"] == 2


async def test_batch_write_retries_unprocessed_items(
    view: CachedTable, dynamodb_client: Any, calls: Calls
) -> None:
    """UnprocessedItems are sent again, and every key is invalidated."""
    rounds = 0

    def unprocess(parsed: dict[str, Any], **_: Any) -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 1:  # DynamoDB says it skipped the put (it is idempotent to redo)
            parsed["UnprocessedItems"] = {
                "Users": [{"PutRequest": {"Item": {"pk": {"S": "u9"}, "n": {"N": "9"}}}}]
            }

    dynamodb_client.meta.events.register("after-call.dynamodb.BatchWriteItem", unprocess)
    await view.batch_write_item(puts=[{"pk": "u9", "n": Decimal(9)}])
    assert calls["BatchWriteItem"] == 2
    assert await view.get_item({"pk": "u9"}) == {"pk": "u9", "n": Decimal(9)}


async def test_transaction_invalidates_written_keys_only(
    view: CachedTable, dynamodb_client: Any
) -> None:
    """transact_write_items invalidates Put/Update/Delete keys, not ConditionCheck ones."""
    await raw_put(dynamodb_client, "Users", {"pk": "u3", "name": "Cy"})
    await view.batch_get_item([{"pk": "u1"}, {"pk": "u2"}, {"pk": "u3"}])
    await view.transact_write_items(
        [
            {"Put": {"Item": {**ADA, "name": "Ada v2"}}},
            {
                "Update": {
                    "Key": {"pk": "u2"},
                    "UpdateExpression": "SET #n = :n",
                    "ExpressionAttributeNames": {"#n": "name"},
                    "ExpressionAttributeValues": {":n": "Bob v2"},
                }
            },
            {
                "ConditionCheck": {
                    "Key": {"pk": "u3"},
                    "ConditionExpression": "attribute_exists(pk)",
                }
            },
        ]
    )
    assert await view.peek({"pk": "u1"}) is None
    assert await view.peek({"pk": "u2"}) is None
    assert await view.peek({"pk": "u3"}) is not None
    got = await view.batch_get_item([{"pk": "u1"}, {"pk": "u2"}])
    assert [g["name"] if g else None for g in got] == ["Ada v2", "Bob v2"]


async def test_cancelled_transaction_changes_nothing(view: CachedTable) -> None:
    """A transaction DynamoDB cancels (a condition failed) leaves every entry in place."""
    await view.get_item({"pk": "u1"})
    with pytest.raises(ClientError) as info:
        await view.transact_write_items(
            [
                {"Put": {"Item": {**ADA, "name": "never"}}},
                {
                    "ConditionCheck": {
                        "Key": {"pk": "u2"},
                        "ConditionExpression": "attribute_not_exists(pk)",
                    }
                },
            ]
        )
    assert info.value.response["Error"]["Code"] == "TransactionCanceledException"
    assert await view.peek({"pk": "u1"}) is not None


# --- write-through ----------------------------------------------------------------------------------


async def test_write_through_stores_only_newer_versions(
    users: DynamoTable, cache: Cache, calls: Calls
) -> None:
    """With write-through a newer version replaces the cached item; an older one invalidates."""
    view = users.cached(cache, write_through=True, version_attribute="version")
    await view.get_item({"pk": "u1"})  # cached at version 1
    new = await view.update_item(
        {"pk": "u1"},
        "SET #n = :n ADD #v :one",
        expression_names={"#n": "name", "#v": "version"},
        expression_values={":n": "Ada v2", ":one": 1},
        return_values="ALL_NEW",
    )
    assert new is not None and new["version"] == 2
    assert await view.get_item({"pk": "u1"}) == new  # stored by the write: no GetItem
    assert calls["GetItem"] == 1
    await view.put_item({**ADA, "name": "Ada v3", "version": Decimal(3)})
    got = await view.get_item({"pk": "u1"})
    assert got is not None and got["name"] == "Ada v3" and calls["GetItem"] == 1
    await view.put_item({**ADA, "name": "older", "version": Decimal(2)})  # not newer: invalidate
    assert await view.peek({"pk": "u1"}) is None
    stats = cache.stats()[view.name]
    assert stats["write_throughs"] == 2 and stats["write_throughs_skipped"] == 1


async def test_write_through_never_creates_an_entry(users: DynamoTable, cache: Cache) -> None:
    """With nothing cached the write invalidates (a concurrent older write could otherwise land)."""
    view = users.cached(cache, write_through=True, version_attribute="version")
    await view.put_item({**ADA, "version": Decimal(5)})
    assert await view.peek({"pk": "u1"}) is None
    assert cache.stats()[view.name]["write_throughs_skipped"] == 1


async def test_write_through_purges_query_results(
    dynamodb_client: Any, rcache: Cache, qclock: FakeClock, calls: Calls
) -> None:
    """A write-through still purges the partition's cached queries."""
    cache = rcache
    await create_orders(dynamodb_client)
    orders = DynamoTable(dynamodb_client, "Orders").cached(
        cache, write_through=True, version_attribute="v"
    )
    item = {"customer_id": "c1", "order_id": 1, "total": 5, "status": "new", "v": 1}
    await orders.put_item(item)
    await orders.get_item({"customer_id": "c1", "order_id": 1})
    settle(qclock)
    assert len(await orders.query({"customer_id": "c1"})) == 1
    await orders.put_item({**item, "v": 2, "total": 6})
    settle(qclock)
    assert cache.stats()[orders.name]["write_throughs"] == 1
    assert (await orders.query({"customer_id": "c1"}))[0]["total"] == 6
    assert (await orders.query({"customer_id": "c1"}))[0]["total"] == 6
    assert calls["Query"] == 2 and cache.stats()[orders.name + ".query"]["fills"] == 2


async def test_write_through_lua_compares_big_integers(
    redis_client: aioredis.Redis, cache: Cache
) -> None:
    """Versions compare as big integers (length, then digits), never as doubles."""
    store = cache._store
    big = "1" + "0" * 30

    # One hash tag: on a cluster, both of a script's keys must be in one slot.
    async def attempt(cached: bytes, new: str) -> bool:
        await redis_client.delete("{w}e")
        await redis_client.hset("{w}e", b"version", cached)
        return await store.write_through(
            "{w}e", "{w}l", b"version", new, 10_000, {b"version": b"x"}
        )

    assert not await attempt(_codec.encode(Decimal(big)), "9" * 30)
    assert await attempt(_codec.encode(Decimal(big)), "1" + "0" * 29 + "1")
    assert not await attempt(_codec.encode(Decimal(big)), big)
    assert await attempt(_codec.encode(Decimal("7")), "8")
    assert await attempt(_codec.encode(7), "8")  # a plain msgpack int
    assert not await attempt(_codec.encode(Decimal("1E+1")), "11")  # not plain digits: refuse
    assert not await attempt(_codec.encode("9"), "10")  # a string is no version
    await redis_client.set("{w}l", b"token")
    assert await attempt(_codec.encode(Decimal(12345)), "12346")
    assert await redis_client.exists("{w}l") == 0  # the lease went with it


def test_write_through_needs_a_version_attribute(
    users: DynamoTable, redis_client: aioredis.Redis
) -> None:
    """write_through=True without version_attribute is refused."""
    with pytest.raises(ConfigError):
        users.cached(Cache(redis_client), write_through=True)


# --- query / scan ------------------------------------------------------------------------------------


@pytest.fixture
async def orders(dynamodb_client: Any, rcache: Cache, qclock: FakeClock) -> CachedTable:
    await create_orders(dynamodb_client)
    view = DynamoTable(dynamodb_client, "Orders").cached(rcache)
    await view.batch_write_item(
        puts=[
            {
                "customer_id": c,
                "order_id": i,
                "total": Decimal(10 * i),
                "status": "new" if i % 2 else "paid",
            }
            for c in ("c1", "c2")
            for i in range(1, 5)
        ]
    )
    settle(qclock)
    return view


async def test_query_is_cached_and_purged_by_writes_to_its_partition(
    orders: CachedTable, calls: Calls, qclock: FakeClock
) -> None:
    """A cached query is purged by a write to its partition, and only by those (and table-wide tags)."""
    first = await orders.query({"customer_id": "c1"})
    assert [o["order_id"] for o in first] == [1, 2, 3, 4]
    assert await orders.query({"customer_id": "c1"}) == first
    c2 = await orders.query({"customer_id": "c2"})
    assert calls["Query"] == 2
    await orders.put_item({"customer_id": "c1", "order_id": 5, "total": 50, "status": "new"})
    settle(qclock)
    assert [o["order_id"] for o in await orders.query({"customer_id": "c1"})] == [1, 2, 3, 4, 5]
    assert await orders.query({"customer_id": "c2"}) == c2
    assert calls["Query"] == 3


async def test_query_arguments_are_part_of_the_key(orders: CachedTable, calls: Calls) -> None:
    """Sort conditions, order, limits, filters and projections each have their own entry."""
    between = await orders.query({"customer_id": "c1"}, sort=("order_id", "between", 2, 3))
    assert [o["order_id"] for o in between] == [2, 3]
    desc = await orders.query({"customer_id": "c1"}, scan_forward=False, limit=2)
    assert [o["order_id"] for o in desc] == [4, 3]
    filtered = await orders.query(
        {"customer_id": "c1"},
        filter_expression="#s = :s",
        expression_names={"#s": "status"},
        expression_values={":s": "paid"},
        attributes=["order_id", "status"],
    )
    assert filtered == [{"order_id": 2, "status": "paid"}, {"order_id": 4, "status": "paid"}]
    assert calls["Query"] == 3
    await orders.query({"customer_id": "c1"}, sort=("order_id", "between", 2, 3))
    assert calls["Query"] == 3
    with pytest.raises(ConfigError):
        await orders.query({"customer_id": "c1"}, sort=("order_id", "like", 2))
    with pytest.raises(ConfigError):
        await orders.query({"customer_id": "c1"}, expression_values={":swr_x": 1})


async def test_index_queries_are_tagged_to_what_writes_purge(
    orders: CachedTable, calls: Calls, qclock: FakeClock
) -> None:
    """A local index query is purged with its partition; a global one by any write to the table."""
    by_total = await orders.query({"customer_id": "c1"}, index_name="by_total", scan_forward=False)
    assert [o["total"] for o in by_total] == [40, 30, 20, 10]
    paid = await orders.query({"status": "paid"}, index_name="by_status")
    assert len(paid) == 4
    assert calls.params["Query"][0].get("ConsistentRead") is True  # a local index can
    assert "ConsistentRead" not in calls.params["Query"][1]  # a global one cannot
    await orders.update_item(
        {"customer_id": "c2", "order_id": 1},
        "SET #s = :s",
        expression_names={"#s": "status"},
        expression_values={":s": "paid"},
    )
    settle(qclock)
    assert len(await orders.query({"status": "paid"}, index_name="by_status")) == 5
    await orders.query({"customer_id": "c1"}, index_name="by_total", scan_forward=False)
    assert calls["Query"] == 3


async def test_scan_is_cached_and_purged_by_any_write(
    orders: CachedTable, calls: Calls, qclock: FakeClock
) -> None:
    """A cached scan is purged by a write to any item of the table."""
    assert len(await orders.scan()) == 8
    assert len(await orders.scan()) == 8
    assert calls["Scan"] == 1
    await orders.delete_item({"customer_id": "c2", "order_id": 4})
    settle(qclock)
    assert len(await orders.scan()) == 7
    assert len(await orders.scan()) == 7
    assert calls["Scan"] == 2


async def test_stream_style_invalidation_purges_partition_queries(
    orders: CachedTable, calls: Calls, qclock: FakeClock
) -> None:
    """Purging an item's partition tag (what the stream hook does) drops the cached query."""
    cache = orders.cache
    await orders.query({"customer_id": "c1"})
    await orders.scan()
    await cache.purge_tags([item_tag("Orders", {"customer_id": "c1"})])
    await orders.query({"customer_id": "c1"})
    await orders.scan()
    assert calls["Query"] == 2 and calls["Scan"] == 1
    await cache.purge_tags([table_tag("Orders")])
    settle(qclock)
    await orders.scan()
    await orders.scan()
    assert calls["Scan"] == 2


async def test_uncached_table_reads(users: DynamoTable, calls: Calls) -> None:
    """DynamoTable's own reads go to DynamoDB every time, in plain Python values."""
    assert await users.get_item({"pk": "u1"}, attributes=["address.city"]) == {
        "address": {"city": "London"}
    }
    got = await users.batch_get_item(
        [{"pk": "u2"}, {"pk": "zz"}, {"pk": "u2"}], attributes=["name"]
    )
    assert got == [{"name": "Bob"}, None, {"name": "Bob"}] and got[0] is not got[2]
    assert len(await users.scan(limit=1)) == 1
    assert calls["GetItem"] == 1 and calls["BatchGetItem"] == 1


async def test_read_after_write_never_joins_a_load_begun_before_it(
    view: CachedTable, dynamodb_client: Any
) -> None:
    """A read that starts after a write returned does not share a load that read the old item."""
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def hold(**_: Any) -> None:
        entered.set()
        await gate.wait()

    dynamodb_client.meta.events.register("after-call.dynamodb.GetItem", hold)
    before = asyncio.create_task(view.get_item({"pk": "u1"}))
    await entered.wait()  # that load has read the old item and is on its way back
    await view.put_item({**ADA, "name": "written"})
    dynamodb_client.meta.events.unregister("after-call.dynamodb.GetItem", hold)
    after = asyncio.create_task(view.get_item({"pk": "u1"}))
    gate.set()
    # Begun before the write, either answer is fair (its load cannot store, and
    # reloads because the write's invalidation took its lease).
    assert (await before)["name"] in ("Ada", "written")  # type: ignore[index]
    assert (await after)["name"] == "written"  # type: ignore[index]


async def test_signed_cache_batches_and_write_through(
    users: DynamoTable, redis_client: aioredis.Redis, calls: Calls
) -> None:
    """With a signing key, batch fills and write-throughs are signed and read back as hits."""
    cache = Cache(redis_client, namespace="s", signing_key=b"k" * 32, early_refresh=0)
    async with CacheHost(cache):
        view = users.cached(cache, write_through=True, version_attribute="version")
        keys = [{"pk": "u1"}, {"pk": "u2"}, {"pk": "zz"}]
        first = await view.batch_get_item(keys)
        assert await view.batch_get_item(keys) == first
        await view.put_item({**ADA, "name": "signed", "version": Decimal(2)})
        got = await view.get_item({"pk": "u1"}, attributes=["name"])
        assert got == {"name": "signed"}
        stats = cache.stats()[view.name]
        assert stats["bad_signatures"] == 0 and stats["write_throughs"] == 1
        assert calls["BatchGetItem"] == 1 and calls["GetItem"] == 0


@pytest.mark.parametrize("mode", ["invalidate", "refresh"])
async def test_stream_record_keeps_cached_scans_and_index_queries_true(
    orders: CachedTable, dynamodb_client: Any, calls: Calls, qclock: FakeClock, mode: Any
) -> None:
    """A write that bypasses the view reaches its cached scans and global-index queries through the stream."""
    from boto3.dynamodb.types import TypeSerializer

    from swr_cache import StreamInvalidator

    assert len(await orders.query({"status": "paid"}, index_name="by_status")) == 4
    assert sum(o["status"] == "paid" for o in await orders.scan()) == 4
    other_partition = await orders.query({"customer_id": "c1"})
    changed = {"customer_id": "c2", "order_id": Decimal(1), "total": Decimal(10), "status": "paid"}
    await raw_put(dynamodb_client, "Orders", changed)  # another writer: the view never sees it
    assert len(await orders.query({"status": "paid"}, index_name="by_status")) == 4  # stale

    serialize = TypeSerializer().serialize
    stream_record = {
        "eventName": "MODIFY",
        "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/Orders/stream/2024-01-01",
        "dynamodb": {
            "Keys": {"customer_id": {"S": "c2"}, "order_id": {"N": "1"}},
            "NewImage": {name: serialize(value) for name, value in changed.items()},
            "SequenceNumber": "1000",
        },
    }
    report = await StreamInvalidator(orders.cache, mode=mode).handle({"Records": [stream_record]})
    assert report.applied == 1 and not report.failed
    settle(qclock)
    assert len(await orders.query({"status": "paid"}, index_name="by_status")) == 5
    assert sum(o["status"] == "paid" for o in await orders.scan()) == 5
    assert await orders.query({"customer_id": "c1"}) == other_partition  # not its partition
    assert calls["Query"] == 3 and calls["Scan"] == 2


async def test_unprocessed_items_fall_back_to_single_writes(
    dynamodb_client: Any, users: DynamoTable, cache: Cache, calls: Calls
) -> None:
    """Writes still unprocessed after the retries go one by one (PutItem, DeleteItem), then invalidate."""
    view = DynamoTable(dynamodb_client, "Users", unprocessed_retries=1, backoff_base=0.001).cached(
        cache
    )
    assert await view.get_item({"pk": "u2"}) is not None

    def never(parsed: dict[str, Any], **_: Any) -> None:
        parsed["UnprocessedItems"] = {
            "Users": [
                {"PutRequest": {"Item": {"pk": {"S": "u9"}, "n": {"N": "9"}}}},
                {"DeleteRequest": {"Key": {"pk": {"S": "u2"}}}},
            ]
        }

    dynamodb_client.meta.events.register("after-call.dynamodb.BatchWriteItem", never)
    await view.batch_write_item(puts=[{"pk": "u9", "n": Decimal(9)}], deletes=[{"pk": "u2"}])
    assert calls["BatchWriteItem"] == 2 and calls["PutItem"] == 1 and calls["DeleteItem"] == 1
    assert view.cache.stats()[view.name]["unprocessed_retries"] == 1
    assert await view.get_item({"pk": "u9"}) == {"pk": "u9", "n": Decimal(9)}
    assert await view.get_item({"pk": "u2"}) is None


@pytest.mark.parametrize("versioned", [False, True])
async def test_batch_merge_overtaken_by_a_write_is_answered_from_one_load(
    users: DynamoTable, cache: Cache, dynamodb_client: Any, versioned: bool
) -> None:
    """A batch projection completing a fresh partial entry that a write invalidates meanwhile never mixes versions."""
    view = users.cached(cache, version_attribute="version" if versioned else None)
    await view.get_item({"pk": "u1"}, attributes=["name"])  # a fresh entry holding only "name"
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def hold(**_: Any) -> None:
        entered.set()
        await gate.wait()

    dynamodb_client.meta.events.register("before-call.dynamodb.BatchGetItem", hold)
    batch = asyncio.create_task(view.batch_get_item([{"pk": "u1"}], attributes=["name", "status"]))
    await entered.wait()  # under its leases, about to load
    dynamodb_client.meta.events.unregister("before-call.dynamodb.BatchGetItem", hold)
    await view.update_item(
        {"pk": "u1"},
        update_expression="SET #n = :n, #s = :s",
        expression_names={"#n": "name", "#s": "status"},
        expression_values={":n": "Ada 2", ":s": "retired"},
    )
    gate.set()
    got = await batch
    assert got == [{"name": "Ada 2", "status": "retired"}]
    # With a version attribute it merges the new "status"; with the cached old
    # "name" that would be half of each version, but the merge finds its lease
    # gone and the batch answers anew. Without one, it loads both in one load.
    reloads = cache.stats()[view.name]["reloads_after_invalidation"]
    assert reloads == (1 if versioned else 0)


@pytest.mark.parametrize("batch", [False, True])
async def test_view_with_a_version_attribute_never_merges_two_versions(
    users: DynamoTable, cache: Cache, dynamodb_client: Any, batch: bool
) -> None:
    """A write that bypasses the view (its invalidation still to come) is not mixed into a cached projection."""
    view = users.cached(cache, version_attribute="version")
    assert await view.get_item({"pk": "u1"}, attributes=["name"]) == {"name": "Ada"}
    await raw_put(
        dynamodb_client,
        "Users",
        {**ADA, "name": "Ada 2", "status": "retired", "version": Decimal(2)},
    )
    if batch:
        got = (await view.batch_get_item([{"pk": "u1"}], attributes=["name", "status"]))[0]
    else:
        got = await view.get_item({"pk": "u1"}, attributes=["name", "status"])
    assert got == {"name": "Ada 2", "status": "retired"}  # never "Ada" with "retired"
    assert cache.stats()[view.name]["merges_outdated"] == 1


async def test_batch_cancelled_during_its_load_gives_back_its_leases(
    view: CachedTable, users: DynamoTable, redis_client: aioredis.Redis, monkeypatch: Any
) -> None:
    """A batch cancelled while BatchGetItem runs releases the leases it took: later reads never wait for them."""
    entered = asyncio.Event()
    real = users._batch_get

    async def stuck(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await asyncio.Event().wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(users, "_batch_get", stuck)
    batch = asyncio.create_task(view.batch_get_item([{"pk": "u1"}, {"pk": "u2"}]))
    await entered.wait()
    leases = [view.cache._keys.lease(f"Users|pk=S:{pk}") for pk in ("u1", "u2")]
    assert await redis_client.exists(*leases) == 2
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch
    assert await redis_client.exists(*leases) == 0
    monkeypatch.setattr(users, "_batch_get", real)
    assert await view.get_item({"pk": "u1"}) == ADA
    assert view.cache.stats()[view.name]["lease_waits"] == 0


async def test_batch_and_consistent_reads_replace_leases_nobody_holds(
    view: CachedTable, redis_client: aioredis.Redis, calls: Calls
) -> None:
    """A lease key without a TTL is taken over by the batch path and by consistent reads (counted)."""
    lease = view.cache._keys.lease("Users|pk=S:u1")
    await redis_client.set(lease, b"someone")
    assert await view.batch_get_item([{"pk": "u1"}]) == [ADA]
    await view.batch_get_item([{"pk": "u1"}])
    assert calls["BatchGetItem"] == 1  # stored by the batch, then a hit
    await redis_client.hset(lease, mapping={b"x": b"1"})
    assert await view.get_item({"pk": "u1"}, consistent_read=True) == ADA
    assert view.cache.stats()[view.name]["leases_repaired"] == 2
    assert not await redis_client.exists(lease)


async def test_write_purges_despite_a_poisoned_tag_member(
    orders: CachedTable, calls: Calls, qclock: FakeClock, redis_client: aioredis.Redis
) -> None:
    """A write through the view purges a cached scan although the table tag's set holds an undecodable member."""
    assert len(await orders.scan()) == 8
    await redis_client.sadd(orders.cache._keys.tag_members(table_tag("Orders")), b"\xff\xfe")
    await orders.delete_item({"customer_id": "c2", "order_id": 4})
    settle(qclock)
    assert len(await orders.scan()) == 7
    assert calls["Scan"] == 2
    assert orders.cache.stats()["swr_cache"]["tag_members_dropped"] == 1
