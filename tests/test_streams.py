"""StreamInvalidator against a real redis-server: record shapes, invalidation, refresh mode, Lambda."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from devtools.devservers import RedisServer, free_port
from swr_cache import (
    Cache,
    CacheNotEnteredError,
    ConfigError,
    StreamInvalidator,
    StreamRecordError,
    cached,
    cached_item,
    item_tag,
)
from swr_cache._entry import expand
from swr_cache._keys import KeySpace, item_identity
from swr_cache.streams import StreamRecord, parse_record, table_from_arn
from swr_cache.testing import FakeClock, RecordingOrigin

pytestmark = [pytest.mark.redis, pytest.mark.on_cluster]

ARN = (
    "arn:aws:dynamodb:us-west-2:account-id:table/ExampleTableWithStream/stream/"
    "2015-06-27T00:48:05.899"
)

# The sample event of AWS's "Using AWS Lambda with Amazon DynamoDB" guide: a
# table with an N key `Id` and a `Message` attribute, one INSERT, MODIFY and
# REMOVE.
AWS_SAMPLE_EVENT: dict[str, Any] = {
    "Records": [
        {
            "eventID": "1",
            "eventVersion": "1.0",
            "dynamodb": {
                "Keys": {"Id": {"N": "101"}},
                "NewImage": {"Message": {"S": "New item!"}, "Id": {"N": "101"}},
                "StreamViewType": "NEW_AND_OLD_IMAGES",
                "SequenceNumber": "111",
                "SizeBytes": 26,
            },
            "awsRegion": "us-west-2",
            "eventName": "INSERT",
            "eventSourceARN": ARN,
            "eventSource": "aws:dynamodb",
        },
        {
            "eventID": "2",
            "eventVersion": "1.0",
            "dynamodb": {
                "OldImage": {"Message": {"S": "New item!"}, "Id": {"N": "101"}},
                "SequenceNumber": "222",
                "Keys": {"Id": {"N": "101"}},
                "SizeBytes": 59,
                "NewImage": {"Message": {"S": "This item has changed"}, "Id": {"N": "101"}},
                "StreamViewType": "NEW_AND_OLD_IMAGES",
            },
            "awsRegion": "us-west-2",
            "eventName": "MODIFY",
            "eventSourceARN": ARN,
            "eventSource": "aws:dynamodb",
        },
        {
            "eventID": "3",
            "eventVersion": "1.0",
            "dynamodb": {
                "Keys": {"Id": {"N": "101"}},
                "SizeBytes": 38,
                "SequenceNumber": "333",
                "OldImage": {"Message": {"S": "This item has changed"}, "Id": {"N": "101"}},
                "StreamViewType": "NEW_AND_OLD_IMAGES",
            },
            "awsRegion": "us-west-2",
            "eventName": "REMOVE",
            "eventSourceARN": ARN,
            "eventSource": "aws:dynamodb",
        },
    ]
}
TABLE = "ExampleTableWithStream"


def sample(index: int) -> dict[str, Any]:
    """A deep copy of one record of the AWS sample event."""
    return copy.deepcopy(AWS_SAMPLE_EVENT["Records"][index])


def record(
    key: dict[str, Any],
    *,
    event: str = "MODIFY",
    seq: str = "100",
    table: str = TABLE,
    image: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Lambda-shaped DynamoDB stream record."""
    dynamodb: dict[str, Any] = {
        "Keys": key,
        "SequenceNumber": seq,
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    if image is not None:
        dynamodb["NewImage"] = image
    return {
        "eventID": f"e{seq}",
        "eventName": event,
        "eventSource": "aws:dynamodb",
        "eventSourceARN": f"arn:aws:dynamodb:us-east-1:123456789012:table/{table}/stream/2024-01-01T00:00:00.000",
        "dynamodb": dynamodb,
    }


def kinesis_record(inner: dict[str, Any], table: str, kinesis_seq: str) -> dict[str, Any]:
    """``inner`` wrapped as Kinesis Data Streams for DynamoDB delivers it to Lambda."""
    payload = dict(inner, tableName=table, recordFormat="application/json")
    payload.pop("eventSourceARN", None)
    payload["dynamodb"] = {k: v for k, v in inner["dynamodb"].items() if k != "SequenceNumber"}
    return {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": "ABCDEF",
            "sequenceNumber": kinesis_seq,
            "data": base64.b64encode(json.dumps(payload).encode()).decode(),
        },
        "eventSource": "aws:kinesis",
        "eventName": "aws:kinesis:record",
        "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/cache-changes",
    }


@pytest.fixture
def origin() -> RecordingOrigin:
    return RecordingOrigin(
        {
            Decimal(101): {"Id": Decimal(101), "Message": "New item!"},
            Decimal(10): {"Id": Decimal(10), "Message": "ten"},
        }
    )


def example_table(cache: Cache, origin: RecordingOrigin, table: str = TABLE) -> Any:
    """A reader of ``table`` keyed by a numeric ``Id``."""

    @cached_item(cache, table=table, key=lambda item_id: {"Id": item_id}, name=f"get_{table}")
    async def get_item(
        item_id: Any, *, attributes: list[str] | None = None
    ) -> dict[str, Any] | None:
        return await origin.get(Decimal(item_id), attributes)

    return get_item


# --- parsing ----------------------------------------------------------------------


def test_table_from_arn() -> None:
    """The table name comes from the stream ARN; anything else is malformed."""
    assert table_from_arn(ARN) == TABLE
    assert table_from_arn("arn:aws-cn:dynamodb:cn-north-1:1:table/a.b-c_d/stream/x") == "a.b-c_d"
    for bad in (
        "",
        "arn:aws:kinesis:us-east-1:1:stream/s",
        "arn:aws:dynamodb:r:1:table/T",
        None,
        7,
    ):
        with pytest.raises(StreamRecordError):
            table_from_arn(bad)


def test_parse_sample_record() -> None:
    """A Lambda record maps to the readers' identity, item tags and its sequence number."""
    parsed = parse_record(sample(1))
    assert isinstance(parsed, StreamRecord)
    assert parsed.event_name == "MODIFY" and parsed.table == TABLE
    assert parsed.key == {"Id": Decimal(101)}
    assert parsed.identity == item_identity(TABLE, {"Id": 101})
    assert parsed.tags == (item_tag(TABLE, {"Id": 101}),)
    assert parsed.sequence == "222" and parsed.item_identifier == "222"


def test_parse_composite_key_tags_every_subset() -> None:
    """A two-attribute key yields the item tag of the full key and of each attribute alone."""
    parsed = parse_record(record({"pk": {"S": "c1"}, "sk": {"N": "10.0"}}, table="Orders"))
    assert set(parsed.tags) == {
        item_tag("Orders", {"pk": "c1", "sk": 10}),
        item_tag("Orders", {"pk": "c1"}),
        item_tag("Orders", {"sk": 10}),
    }


def test_parse_binary_key_from_json_and_from_api() -> None:
    """B keys: base64 text in Lambda JSON and bytes from the API name the same item."""
    from_json = parse_record(record({"k": {"B": base64.b64encode(b"\x00\xff").decode()}}))
    from_api = parse_record(
        {
            "eventName": "REMOVE",
            "dynamodb": {"Keys": {"k": {"B": b"\x00\xff"}}, "SequenceNumber": "5"},
        },
        table=TABLE,
    )
    assert from_json.identity == from_api.identity == item_identity(TABLE, {"k": b"\x00\xff"})


def test_parse_kinesis_wrapped_record() -> None:
    """A Kinesis-wrapped record takes its table from tableName and reports the Kinesis sequence."""
    parsed = parse_record(
        kinesis_record(
            sample(0), "Music", "49590338271490256608559692538361571095921575989136588898"
        )
    )
    assert parsed.table == "Music" and parsed.identity == item_identity("Music", {"Id": 101})
    assert parsed.sequence is None  # never orders a refresh
    assert parsed.item_identifier == "49590338271490256608559692538361571095921575989136588898"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("not a record", "must be an object"),
        (
            {"eventName": "INSERT", "eventSourceARN": ARN, "dynamodb": {"SequenceNumber": "1"}},
            "no Keys",
        ),
        ({"eventName": "INSERT", "eventSourceARN": ARN, "dynamodb": {"Keys": {}}}, "no Keys"),
        (
            {
                "eventName": "INSERT",
                "eventSourceARN": ARN,
                "dynamodb": {"Keys": {"Id": {"X": "1"}}},
            },
            "Id",
        ),
        (
            {
                "eventName": "INSERT",
                "eventSourceARN": ARN,
                "dynamodb": {"Keys": {"Id": {"N": "x"}}},
            },
            "Id",
        ),
        (
            {
                "eventName": "INSERT",
                "eventSourceARN": ARN,
                "dynamodb": {"Keys": {"Id": {"N": "NaN"}}},
            },
            "Id",
        ),
        (
            {
                "eventName": "INSERT",
                "eventSourceARN": ARN,
                "dynamodb": {"Keys": {"k": {"B": "%%%"}}},
            },
            "k",
        ),
        (
            {
                "eventName": "INSERT",
                "eventSourceARN": "arn:aws:s3:::bucket",
                "dynamodb": {"Keys": {"Id": {"N": "1"}}},
            },
            "ARN",
        ),
        (
            {
                "eventName": "UPSERT",
                "eventSourceARN": ARN,
                "dynamodb": {"Keys": {"Id": {"N": "1"}}},
            },
            "eventName",
        ),
        ({"eventName": "INSERT", "dynamodb": {"Keys": {"Id": {"N": "1"}}}}, "no table"),
        ({"eventName": "INSERT", "eventSourceARN": ARN, "dynamodb": []}, "dynamodb"),
        ({"kinesis": {"data": "not base64!"}}, "Kinesis"),
        ({"kinesis": {"data": base64.b64encode(b'{"eventName": "INSERT"}').decode()}}, "tableName"),
    ],
)
def test_malformed_records_raise_stream_record_error(raw: Any, message: str) -> None:
    """Each kind of malformed record is a StreamRecordError that says what is wrong."""
    with pytest.raises(StreamRecordError, match=message):
        parse_record(raw)


def test_options_are_validated(redis_client: aioredis.Redis) -> None:
    """An unknown mode or a non-positive setting is a ConfigError."""
    c = Cache(redis_client, namespace="t")
    with pytest.raises(ConfigError):
        StreamInvalidator(c, mode="upsert")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        StreamInvalidator(c, batch_size=0)


# --- invalidate mode -----------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
async def test_aws_sample_records_invalidate(
    cache: Cache, origin: RecordingOrigin, index: int
) -> None:
    """Each record of AWS's sample event (INSERT, MODIFY, REMOVE) removes the cached item."""
    get_item = example_table(cache, origin)
    await get_item(101)
    assert await get_item.peek(101) is not None
    report = await StreamInvalidator(cache).handle({"Records": [sample(index)]})
    assert (report.applied, report.skipped, report.failed) == (1, 0, [])
    assert await get_item.peek(101) is None
    await get_item(101)
    assert origin.count == 2


async def test_aws_sample_event_whole_batch(cache: Cache, origin: RecordingOrigin) -> None:
    """The whole sample event applies three records and reports no failures."""
    get_item = example_table(cache, origin)
    await get_item(101)
    inv = StreamInvalidator(cache)
    report = await inv.handle(AWS_SAMPLE_EVENT)
    assert report.applied == 3 and report.batch_item_failures() == {"batchItemFailures": []}
    assert await get_item.peek(101) is None
    assert cache.stats()["swr_cache.streams"]["stream_records_applied"] == 3


async def test_number_key_text_invalidates_entry_read_with_int(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """A record with N key "10" invalidates the entry read with 10 (and Decimal("10.0") is the same)."""
    get_item = example_table(cache, origin)
    await get_item(10)
    assert await get_item.peek(Decimal("10.0")) is not None
    await StreamInvalidator(cache).handle({"Records": [record({"Id": {"N": "10"}})]})
    assert await get_item.peek(10) is None


async def test_string_key_does_not_invalidate_number_key(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """S "10" and N 10 are different items: the record for one leaves the other alone."""
    get_item = example_table(cache, origin)
    await get_item(10)
    await StreamInvalidator(cache).handle({"Records": [record({"Id": {"S": "10"}})]})
    assert await get_item.peek(10) is not None


async def test_record_for_another_table_leaves_entries_alone(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """A record of table Other with the same key does not touch this table's entry."""
    get_item = example_table(cache, origin)
    await get_item(101)
    report = await StreamInvalidator(cache).handle(
        {"Records": [record({"Id": {"N": "101"}}, table="Other")]}
    )
    assert report.applied == 1
    assert await get_item.peek(101) is not None


async def test_insert_clears_negative_entry(cache: Cache, origin: RecordingOrigin) -> None:
    """A cached not-found answer goes when the stream says the item was inserted."""
    get_item = example_table(cache, origin)
    assert await get_item(7) is None
    assert await get_item.peek(7) == (None, "fresh")
    origin.items[Decimal(7)] = {"Id": Decimal(7), "Message": "born"}
    await StreamInvalidator(cache).handle({"Records": [record({"Id": {"N": "7"}}, event="INSERT")]})
    assert await get_item(7) == {"Id": Decimal(7), "Message": "born"}


async def test_binary_key_record_invalidates_bytes_reader(cache: Cache) -> None:
    """A B key in a Lambda event (base64) invalidates the entry read with the bytes."""
    origin = RecordingOrigin({b"\x01\x02": {"k": b"\x01\x02", "v": 1}})

    @cached_item(cache, table="Blobs", key=lambda k: {"k": k})
    async def get_blob(k: bytes, *, attributes: list[str] | None = None) -> dict[str, Any] | None:
        return await origin.get(k, attributes)

    await get_blob(b"\x01\x02")
    event = {
        "Records": [record({"k": {"B": base64.b64encode(b"\x01\x02").decode()}}, table="Blobs")]
    }
    await StreamInvalidator(cache).handle(event)
    assert await get_blob.peek(b"\x01\x02") is None


async def test_malformed_records_are_skipped_and_good_ones_applied(
    cache: Cache, origin: RecordingOrigin, caplog: pytest.LogCaptureFixture
) -> None:
    """Malformed records in a batch are skipped, counted and logged; the good ones still apply."""
    get_item = example_table(cache, origin)
    await get_item(101)
    await get_item(10)
    batch = [
        "garbage",
        sample(1),
        {"eventName": "MODIFY", "eventSourceARN": ARN, "dynamodb": {"SequenceNumber": "1"}},
        {"eventName": "MODIFY", "eventSourceARN": ARN, "dynamodb": {"Keys": {"Id": {"SS": ["x"]}}}},
        {
            "eventName": "MODIFY",
            "eventSourceARN": "arn:nope",
            "dynamodb": {"Keys": {"Id": {"N": "1"}}},
        },
        record({"Id": {"N": "10"}}, seq="400"),
    ]
    inv = StreamInvalidator(cache)
    with caplog.at_level(logging.WARNING, logger="swr_cache.streams"):
        report = await inv.handle({"Records": batch})
    assert (report.applied, report.skipped, report.failed) == (2, 4, [])
    assert report.batch_item_failures() == {"batchItemFailures": []}  # never retried
    assert await get_item.peek(101) is None and await get_item.peek(10) is None
    assert cache.stats()["swr_cache.streams"]["stream_records_malformed"] == 4
    assert sum("malformed stream record" in r.getMessage() for r in caplog.records) == 4


async def test_event_without_records_is_an_error(cache: Cache) -> None:
    """An event that is not a stream event at all raises instead of pretending success."""
    with pytest.raises(StreamRecordError):
        await StreamInvalidator(cache).handle({"Records": "nope"})


async def test_tags_of_the_item_and_its_partition_are_purged(cache: Cache) -> None:
    """Results tagged with the item, or with its partition key alone, go with the record."""
    calls = {"by_customer": 0, "by_order": 0}

    @cached(
        cache, key="orders:{customer}", tags=lambda customer: [item_tag("Orders", {"pk": customer})]
    )
    async def by_customer(customer: str) -> list[str]:
        calls["by_customer"] += 1
        return ["o1"]

    @cached(
        cache,
        key="order:{customer}:{order}",
        tags=lambda customer, order: [item_tag("Orders", {"pk": customer, "sk": order})],
    )
    async def by_order(customer: str, order: int) -> str:
        calls["by_order"] += 1
        return "o1"

    await by_customer("c1")
    await by_order("c1", 1)
    await StreamInvalidator(cache).handle(
        {"Records": [record({"pk": {"S": "c1"}, "sk": {"N": "1"}}, table="Orders")]}
    )
    assert await by_customer.peek("c1") is None
    assert await by_order.peek("c1", 1) is None


async def test_kinesis_wrapped_event_invalidates(cache: Cache, origin: RecordingOrigin) -> None:
    """Kinesis Data Streams for DynamoDB records invalidate like stream records."""
    get_item = example_table(cache, origin)
    await get_item(101)
    report = await StreamInvalidator(cache).handle(
        {"Records": [kinesis_record(sample(1), TABLE, "4959")]}
    )
    assert report.applied == 1
    assert await get_item.peek(101) is None


@pytest.mark.parametrize("mode", ["invalidate", "refresh"])
async def test_batch_goes_to_redis_in_a_few_pipelines(
    cache: Cache, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, mode: Any
) -> None:
    """200 records cost a handful of pipelines, not a round trip each (even after a restart)."""
    await redis_client.script_flush()  # as after a restart: every script answers NOSCRIPT once
    executed = []
    real_pipeline = redis_client.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        async def execute(*a: Any, **kw: Any) -> Any:
            executed.append(len(pipe))
            return await real_execute(*a, **kw)

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe

    commands = []
    real_command: Any = redis_client.execute_command  # redis-py leaves it unannotated

    async def counting_command(*args: Any, **kwargs: Any) -> Any:
        commands.append(args[0])
        return await real_command(*args, **kwargs)

    monkeypatch.setattr(redis_client, "pipeline", counting_pipeline)
    monkeypatch.setattr(redis_client, "execute_command", counting_command)
    batch = [
        record({"Id": {"N": str(i)}}, seq=str(1000 + i), image=image(i, "m")) for i in range(200)
    ]
    report = await StreamInvalidator(cache, mode=mode).handle({"Records": batch})
    assert report.applied == 200
    # invalidate: entries, purge stamps (+ their NOSCRIPT retry), tag members;
    # refresh: one script per record (+ retry), purge stamps (+ retry), tag members.
    assert len(executed) <= (4 if mode == "invalidate" else 5) and not commands, (
        executed,
        commands,
    )
    assert sum(executed) >= 400


async def test_failed_pipeline_reports_its_records_and_the_rest(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When one pipeline fails, its records and every later one are failed; earlier ones applied."""
    inv = StreamInvalidator(cache, batch_size=2)
    real = cache.invalidate_identities
    calls = 0

    async def flaky(identities: Any, tags: Any = ()) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise redis.exceptions.ConnectionError("connection reset")
        await real(identities, tags)

    monkeypatch.setattr(cache, "invalidate_identities", flaky)
    batch = [record({"Id": {"N": str(i)}}, seq=str(100 + i)) for i in range(5)]
    report = await inv.handle({"Records": batch})
    assert report.applied == 2
    assert report.failed == ["102", "103", "104"]
    assert report.batch_item_failures()["batchItemFailures"][0] == {"itemIdentifier": "102"}
    assert calls == 2  # stopped at the failure instead of waiting out each chunk


# --- refresh mode ------------------------------------------------------------------


def image(item_id: int, message: str) -> dict[str, Any]:
    return {"Id": {"N": str(item_id)}, "Message": {"S": message}}


async def test_refresh_writes_new_image_served_without_origin(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """Refresh mode stores NewImage as a fresh whole item: the next read never calls the origin."""
    get_item = example_table(cache, origin)
    inv = StreamInvalidator(cache, mode="refresh")
    report = await inv.handle({"Records": [sample(1)]})
    assert report.applied == 1 and report.superseded == 0
    assert await get_item(101) == {"Id": Decimal(101), "Message": "This item has changed"}
    assert await get_item(101, attributes=["Message"]) == {"Message": "This item has changed"}
    assert origin.count == 0
    assert await get_item.peek(101) == (
        {"Id": Decimal(101), "Message": "This item has changed"},
        "fresh",
    )


async def test_refresh_entry_ages_with_cache_ttls(
    cache: Cache, origin: RecordingOrigin, clock: FakeClock
) -> None:
    """A refreshed entry uses the cache's soft and hard TTLs like any fill."""
    get_item = example_table(cache, origin)
    await StreamInvalidator(cache, mode="refresh").handle({"Records": [sample(0)]})
    clock.advance(11)
    peeked = await get_item.peek(101)
    assert peeked is not None and peeked[1] == "stale"
    clock.advance(90)
    assert await get_item.peek(101) is None


async def test_refresh_remove_writes_negative_entry(cache: Cache, origin: RecordingOrigin) -> None:
    """REMOVE in refresh mode caches the item as not found."""
    get_item = example_table(cache, origin)
    await get_item(101)
    await StreamInvalidator(cache, mode="refresh").handle({"Records": [sample(2)]})
    assert await get_item(101) is None
    assert origin.count == 1


async def test_refresh_ignores_older_and_repeated_sequence_numbers(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """A late or duplicated record never regresses the entry."""
    get_item = example_table(cache, origin)
    inv = StreamInvalidator(cache, mode="refresh")
    newer = record({"Id": {"N": "101"}}, seq="200", image=image(101, "v2"))
    older = record({"Id": {"N": "101"}}, seq="100", image=image(101, "v1"))
    assert (await inv.handle({"Records": [newer]})).superseded == 0
    report = await inv.handle({"Records": [older, newer]})
    assert report.applied == 2 and report.superseded == 2
    assert (await get_item(101))["Message"] == "v2"
    removed_late = record({"Id": {"N": "101"}}, event="REMOVE", seq="150")
    assert (await inv.handle({"Records": [removed_late]})).superseded == 1
    assert (await get_item(101))["Message"] == "v2"
    assert origin.count == 0


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("9", "10"),
        ("100000000000000000000", "100000000000000000001"),  # equal as doubles
        (
            "49590338271490256608559692538361571095921575989136588898",
            "49590338271490256608559692540925702759324208523137515618",
        ),
    ],
)
async def test_refresh_compares_sequence_numbers_as_big_integers(
    cache: Cache, origin: RecordingOrigin, low: str, high: str
) -> None:
    """Sequence numbers compare by length then digits, whatever their size."""
    get_item = example_table(cache, origin)
    inv = StreamInvalidator(cache, mode="refresh")
    for first, second, expected in ((low, high, "high"), (high, low, "high")):
        await cache.invalidate_item(TABLE, {"Id": 5})
        await cache.client.delete(cache._keys.seq(item_identity(TABLE, {"Id": 5})))
        batch = [
            record(
                {"Id": {"N": "5"}}, seq=first, image=image(5, "high" if first == high else "low")
            ),
            record(
                {"Id": {"N": "5"}}, seq=second, image=image(5, "high" if second == high else "low")
            ),
        ]
        await cache.client.delete(cache._keys.fence(item_identity(TABLE, {"Id": 5})))
        await inv.handle({"Records": batch})
        assert (await get_item(5))["Message"] == expected


async def test_refresh_deletes_lease_so_a_load_in_flight_cannot_fill(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """A load that read the old item before the record cannot write it over the new image."""
    get_item = example_table(cache, origin)
    origin.hold()
    load = asyncio.create_task(get_item(101))
    await origin.entered.wait()
    await StreamInvalidator(cache, mode="refresh").handle({"Records": [sample(1)]})
    origin.release()
    # Its lease was taken: the load is not stored, and its second try finds
    # the record's image in Redis and answers with it.
    assert (await load)["Message"] == "This item has changed"
    assert (await get_item(101))["Message"] == "This item has changed"
    stats = cache.stats()[get_item.name]
    assert stats["fills_rejected"] == 1 and stats["reloads_after_invalidation"] == 1
    assert origin.count == 1


async def test_refresh_under_a_fence_invalidates_instead(
    cache: Cache, origin: RecordingOrigin
) -> None:
    """Just after an invalidation (fence up) a record deletes the entry rather than writing its image."""
    get_item = example_table(cache, origin)
    await cache.invalidate_item(TABLE, {"Id": 101})
    report = await StreamInvalidator(cache, mode="refresh").handle({"Records": [sample(1)]})
    assert report.applied == 1
    assert await get_item.peek(101) is None


async def test_refresh_binary_and_nested_images(cache: Cache) -> None:
    """Lambda's base64 B and BS values, nested in maps and lists, come back as ``bytes``.

    The same type DynamoTable's reads store, so readers never see two types for B.
    """
    origin = RecordingOrigin()

    @cached_item(cache, table="Blobs", key=lambda k: {"k": k})
    async def get_blob(k: str, *, attributes: list[str] | None = None) -> dict[str, Any] | None:
        return await origin.get(k, attributes)

    b64 = base64.b64encode
    new_image = {
        "k": {"S": "x"},
        "raw": {"B": b64(b"\x00\x01").decode()},
        "many": {"BS": [b64(b"a").decode(), b64(b"b").decode()]},
        "nested": {"M": {"list": {"L": [{"B": b64(b"\xff").decode()}, {"N": "1.50"}]}}},
        "flags": {"SS": ["p", "q"]},
    }
    rec = record({"k": {"S": "x"}}, table="Blobs", image=new_image)
    await StreamInvalidator(cache, mode="refresh").handle({"Records": [rec]})
    item = await get_blob("x")
    assert item == {
        "k": "x",
        "raw": b"\x00\x01",
        "many": {b"a", b"b"},
        "nested": {"list": [b"\xff", Decimal("1.50")]},
        "flags": {"p", "q"},
    }
    assert type(item["raw"]) is bytes and {type(b) for b in item["many"]} == {bytes}
    assert type(item["nested"]["list"][0]) is bytes
    assert origin.count == 0


async def test_refresh_without_new_image_invalidates(cache: Cache, origin: RecordingOrigin) -> None:
    """A KEYS_ONLY record in refresh mode still removes the old entry."""
    get_item = example_table(cache, origin)
    await get_item(101)
    await StreamInvalidator(cache, mode="refresh").handle(
        {"Records": [record({"Id": {"N": "101"}}, seq="500")]}
    )
    assert await get_item.peek(101) is None


async def test_refresh_kinesis_records_invalidate(cache: Cache, origin: RecordingOrigin) -> None:
    """Kinesis-wrapped records cannot be ordered, so refresh mode invalidates them."""
    get_item = example_table(cache, origin)
    await get_item(101)
    report = await StreamInvalidator(cache, mode="refresh").handle(
        {"Records": [kinesis_record(sample(1), TABLE, "77")]}
    )
    assert report.applied == 1
    assert await get_item.peek(101) is None


async def test_refresh_purges_item_tags(cache: Cache) -> None:
    """Refresh mode still purges results tagged with the item."""

    @cached(cache, key="msg:{item_id}", tags=lambda item_id: [item_tag(TABLE, {"Id": item_id})])
    async def message(item_id: int) -> str:
        return "cached"

    await message(101)
    await StreamInvalidator(cache, mode="refresh").handle({"Records": [sample(1)]})
    assert await message.peek(101) is None


async def test_refresh_per_table_policy(
    cache: Cache, origin: RecordingOrigin, clock: FakeClock
) -> None:
    """A policy given per table sets the TTLs of that table's refreshed entries."""
    from swr_cache import Policy

    get_item = example_table(cache, origin)
    inv = StreamInvalidator(cache, mode="refresh", policy={TABLE: Policy(soft_ttl=1, hard_ttl=2)})
    await inv.handle({"Records": [sample(1)]})
    clock.advance(1.5)
    peeked = await get_item.peek(101)
    assert peeked is not None and peeked[1] == "stale"


async def test_refresh_mode_needs_an_entered_cache(redis_client: aioredis.Redis) -> None:
    """Refresh deadlines are in Redis time, measured on entry: a cache never entered says so."""
    inv = StreamInvalidator(Cache(redis_client, namespace="t"), mode="refresh")
    with pytest.raises(CacheNotEnteredError):
        await inv.handle({"Records": [sample(1)]})


async def test_refresh_first_batch_after_script_flush(
    cache: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    """A server that lost its script cache (restart) still applies every record, in order."""
    get_item = example_table(cache, origin)
    await redis_client.script_flush()
    batch = [record({"Id": {"N": "101"}}, seq=str(s), image=image(101, f"v{s}")) for s in (1, 3, 2)]
    report = await StreamInvalidator(cache, mode="refresh").handle({"Records": batch})
    assert report.applied == 3 and report.superseded == 1
    assert (await get_item(101))["Message"] == "v3"


# --- Lambda handler -------------------------------------------------------------------


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def seed(client: redis.Redis, namespace: str, item_id: int) -> list[str]:
    """Put something at an item's entry and lease keys, as readers would."""
    ks = KeySpace(namespace)
    ident = item_identity(TABLE, {"Id": item_id})
    keys = [ks.entry(ident), ks.lease(ident)]
    client.hset(keys[0], "x", "1")
    client.set(keys[1], "token")
    return keys


def test_lambda_handler_across_warm_invocations(redis_url: str, sync_redis: redis.Redis) -> None:
    """The sync handler keeps one loop and one entered cache across invocations of a container."""
    inv = StreamInvalidator(Cache.from_url(redis_url, namespace="lam"))
    try:
        keys = seed(sync_redis, "lam", 101)
        assert inv.lambda_handler(AWS_SAMPLE_EVENT, None) == {"batchItemFailures": []}
        assert sync_redis.exists(*keys) == 0
        loop, host = inv._loop, inv._host
        keys = seed(sync_redis, "lam", 101)
        assert inv.lambda_handler({"Records": [sample(1)]}, object()) == {"batchItemFailures": []}
        assert sync_redis.exists(*keys) == 0
        assert inv._loop is loop and inv._host is host and inv.cache._engine.entered
    finally:
        inv.close()
    assert not inv.cache._engine.entered


def test_lambda_handler_reports_failed_sequence_numbers_when_redis_is_unreachable() -> None:
    """With Redis down every record is reported in batchItemFailures by its SequenceNumber."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    cache = Cache.from_url(url, namespace="lam", socket_timeout=0.2, socket_connect_timeout=0.2)
    inv = StreamInvalidator(cache)
    try:
        event = copy.deepcopy(AWS_SAMPLE_EVENT)
        event["Records"].insert(1, "malformed")
        reply = inv.lambda_handler(event, None)
    finally:
        inv.close()
    assert reply == {
        "batchItemFailures": [
            {"itemIdentifier": "111"},
            {"itemIdentifier": "222"},
            {"itemIdentifier": "333"},
        ]
    }
    counts = cache.stats()["swr_cache.streams"]
    assert counts["stream_records_failed"] == 3 and counts["stream_records_malformed"] == 1


def test_lambda_handler_reconnects_after_redis_restart(restartable_redis: RedisServer) -> None:
    """A warm container whose pooled connections died (thaw, restart) applies the next batch."""
    inv = StreamInvalidator(Cache.from_url(restartable_redis.url, namespace="lam"))
    try:
        assert inv.lambda_handler({"Records": [sample(0)]}, None) == {"batchItemFailures": []}
        restartable_redis.stop()
        restartable_redis.start()
        client = redis.Redis.from_url(restartable_redis.url)
        try:
            keys = seed(client, "lam", 101)
            assert inv.lambda_handler({"Records": [sample(1)]}, None) == {"batchItemFailures": []}
            assert client.exists(*keys) == 0
        finally:
            client.close()
    finally:
        inv.close()


def test_lambda_handler_refresh_mode(redis_url: str, sync_redis: redis.Redis) -> None:
    """In refresh mode the handler writes the new image (the cache is entered lazily)."""
    inv = StreamInvalidator(Cache.from_url(redis_url, namespace="lam"), mode="refresh")
    try:
        assert inv.lambda_handler({"Records": [sample(1)]}, None) == {"batchItemFailures": []}
    finally:
        inv.close()
    entry = KeySpace("lam").entry(item_identity(TABLE, {"Id": 101}))
    assert sync_redis.type(entry) == b"string"  # a whole entry
    stored = sync_redis.get(entry)
    assert isinstance(stored, bytes)
    assert b"Message" in expand(stored)


def test_lambda_handler_rejects_non_stream_events(redis_url: str) -> None:
    """An event with no Records is an error, not a silent success."""
    inv = StreamInvalidator(Cache.from_url(redis_url, namespace="lam"))
    try:
        with pytest.raises(StreamRecordError):
            inv.lambda_handler({"hello": "world"}, None)
    finally:
        inv.close()


# --- what a record purges: as much as a write through DynamoTable's view ---------------


@pytest.mark.parametrize("mode", ["invalidate", "refresh"])
async def test_record_purges_results_tagged_with_its_table(cache: Cache, mode: Any) -> None:
    """A record purges its table's tag (cached scans, global index queries), not other tables'."""
    from swr_cache.dynamodb import table_tag

    calls = {"mine": 0, "other": 0}

    @cached(cache, key="scan", tags=lambda: [table_tag(TABLE)])
    async def whole_table() -> list[str]:
        calls["mine"] += 1
        return ["every item"]

    @cached(cache, key="other", tags=lambda: [table_tag("Other")])
    async def other_table() -> list[str]:
        calls["other"] += 1
        return ["every item"]

    await whole_table()
    await other_table()
    report = await StreamInvalidator(cache, mode=mode).handle({"Records": [sample(1)]})
    assert report.applied == 1
    assert await whole_table.peek() is None
    assert await other_table.peek() == (["every item"], "fresh")
    assert calls == {"mine": 1, "other": 1}


async def test_record_purges_what_a_cached_view_write_purges(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For one item, a record (either mode) and a write through the cached view purge the same tags."""
    from swr_cache import DynamoTable
    from swr_cache.dynamodb import change_tags

    seen: list[tuple[list[str], list[str]]] = []
    real = cache.invalidate_identities

    async def recording(identities: Any, tags: Any = ()) -> None:
        seen.append((list(identities), list(tags)))
        await real(identities, tags)

    monkeypatch.setattr(cache, "invalidate_identities", recording)
    key = {"pk": "c1", "sk": Decimal(7)}
    # The key schema is given, so invalidating never calls DynamoDB.
    view = DynamoTable(None, "Orders", key_schema=["pk", "sk"]).cached(cache)
    await view.invalidate(key)  # what put_item, update_item and delete_item end with
    typed_key = {"pk": {"S": "c1"}, "sk": {"N": "7.0"}}
    for mode in ("invalidate", "refresh"):
        inv = StreamInvalidator(cache, mode=mode)
        report = await inv.handle({"Records": [record(typed_key, table="Orders")]})
        assert report.applied == 1
    (view_ids, view_tags), (inv_ids, inv_tags), (_, refresh_tags) = seen
    assert view_ids == inv_ids == [item_identity("Orders", key)]
    expected = set(change_tags("Orders", key))
    assert set(view_tags) == set(inv_tags) == set(refresh_tags) == expected
    assert len(expected) == 4  # the item, each key attribute alone, the table
