"""Property and fuzz tests (hypothesis): values, keys, stream records, HTTP caching headers.

* DynamoDB values of every type, nested, round-trip exactly through the codec,
  through boto3's serializer as ``DynamoTable`` uses it, through the JSON a
  Lambda stream event carries, and through a stream refresh into Redis.
* A stream record's key meets the readers' key, whatever form its number takes.
* The stream parser and ``StreamInvalidator`` take any JSON: every record is
  applied or counted as a malformed skip, never an exception.
* ``Cache-Control`` parsing never raises and is consistent (names
  case-insensitive, quoted values, duplicates, line splits); so do the other
  header parsers and the middleware fed arbitrary header values.

Example counts are kept small enough for the file to run in seconds.
"""

from __future__ import annotations

import base64
import itertools
import json
import string
from collections.abc import AsyncIterator, MutableMapping
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from swr_cache import Cache, CacheMiddleware, StreamInvalidator, _codec, _http, cached_item
from swr_cache._errors import StreamRecordError
from swr_cache._keys import item_identity, typed_key_part
from swr_cache.dynamodb import _from_dynamo, _to_dynamo, change_tags, item_tags, table_tag
from swr_cache.streams import _deserialize_image, parse_record
from swr_cache.testing import CacheHost, FakeClock

# Pure properties: many examples. Ones that talk to Redis: fewer, no deadline
# (a shared machine's latency is not what they test).
PURE = settings(max_examples=100, deadline=None)
WITH_REDIS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# --------------------------------------------------------------------------- values


@st.composite
def dynamo_numbers(draw: st.DrawFn) -> Decimal:
    """A DynamoDB number: up to 38 significant digits, magnitude 1E-130 to 9.99...E+125."""
    coefficient = draw(st.integers(0, 10**38 - 1))
    digits = len(str(coefficient))
    adjusted = draw(st.integers(-130, 125))
    exponent = adjusted - digits + 1
    # boto3 refuses a value it would have to round below 1E-165 (Etiny of its context).
    assume(exponent >= -165)
    return Decimal((draw(st.integers(0, 1)), tuple(map(int, str(coefficient))), exponent))


EDGE_NUMBERS = [
    Decimal("1.10"),  # trailing zero kept: "1.10" must not come back as "1.1"
    Decimal("-0"),
    Decimal("0.000"),
    Decimal("1E+125"),
    Decimal("9.9999999999999999999999999999999999999E+125"),
    Decimal("-9.9999999999999999999999999999999999999E+125"),
    Decimal("1E-130"),
    Decimal("12345678901234567890123456789012345678"),
    Decimal("1E+2"),
    Decimal("100"),
]
numbers = st.sampled_from(EDGE_NUMBERS) | dynamo_numbers()
strings = st.text(max_size=10)
binaries = st.binary(max_size=10)
scalars = st.one_of(strings, numbers, binaries, st.booleans(), st.none())
# DynamoDB sets are non-empty and of one kind: SS, NS, BS.
sets = st.one_of(
    st.sets(strings, min_size=1, max_size=4),
    st.sets(numbers, min_size=1, max_size=4),
    st.sets(binaries, min_size=1, max_size=4),
)
names = st.text(min_size=1, max_size=8)
values = st.recursive(
    scalars | sets,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=25,
)
items = st.dictionaries(names, values, min_size=1, max_size=6)


@st.composite
def deeply_nested(draw: st.DrawFn) -> Any:
    """A value nested as deep as DynamoDB allows (32 levels), maps and lists mixed."""
    value: Any = draw(scalars | sets)
    for _ in range(draw(st.integers(1, 32))):
        value = {draw(names): value} if draw(st.booleans()) else [value]
    return value


def strict(value: Any) -> Any:
    """A hashable form of a value that tells types and Decimal text apart exactly."""
    kind = type(value)
    if kind is str:
        return ("S", value)
    if kind is Decimal:
        return ("N", str(value))  # Decimal("1.10") == Decimal("1.1"), their text differs
    if kind is bytes:
        return ("B", value)
    if kind is bool:
        return ("BOOL", value)
    if value is None:
        return ("NULL",)
    if kind is set:
        return ("SET", frozenset(strict(v) for v in value))
    if kind is list:
        return ("L", tuple(strict(v) for v in value))
    if kind is dict:
        return ("M", frozenset((k, strict(v)) for k, v in value.items()))
    if kind.__name__ == "Binary":  # boto3's, what its own deserializer yields for B
        return ("Binary", bytes(value.value))
    raise AssertionError(f"unexpected type {kind.__name__}")


def unbinary(value: Any) -> Any:
    """boto3 ``Binary`` as bytes, everywhere in a value."""
    if type(value).__name__ == "Binary":
        return bytes(value.value)
    if isinstance(value, set):
        return {unbinary(v) for v in value}
    if isinstance(value, list):
        return [unbinary(v) for v in value]
    if isinstance(value, dict):
        return {k: unbinary(v) for k, v in value.items()}
    return value


def lambda_json(av: Any) -> Any:
    """A typed attribute value as a Lambda event's JSON carries it: binary as base64 text."""
    ((kind, raw),) = av.items()
    if kind == "B":
        return {"B": base64.b64encode(raw).decode()}
    if kind == "BS":
        return {"BS": [base64.b64encode(b).decode() for b in raw]}
    if kind == "L":
        return {"L": [lambda_json(v) for v in raw]}
    if kind == "M":
        return {"M": {k: lambda_json(v) for k, v in raw.items()}}
    return av


@PURE
@given(values)
def test_codec_round_trips_every_dynamodb_type(value: Any) -> None:
    """S, N (exact text), B, BOOL, NULL, SS/NS/BS, L and M come back with their types and digits."""
    assert strict(_codec.decode(_codec.encode(value))) == strict(value)


@PURE
@given(deeply_nested())
def test_codec_and_serializer_round_trip_the_deepest_nesting(value: Any) -> None:
    """32 levels of maps and lists survive the codec and boto3's serializer."""
    assert strict(_codec.decode(_codec.encode(value))) == strict(value)
    assert strict(_from_dynamo(_to_dynamo({"v": value}))["v"]) == strict(value)


@PURE
@given(items)
def test_item_round_trips_through_the_serializer_and_the_codec(item: dict[str, Any]) -> None:
    """What DynamoTable writes (TypeSerializer) and reads back is the item, and caches exactly."""
    read_back = _from_dynamo(_to_dynamo(item))
    assert strict(read_back) == strict(item)
    assert strict(_codec.decode(_codec.encode(read_back))) == strict(item)


@PURE
@given(items)
def test_stream_image_json_reads_back_as_the_item(item: dict[str, Any]) -> None:
    """A NewImage as Lambda's JSON carries it (base64 binary) reads back as the item itself."""
    image = json.loads(json.dumps({k: lambda_json(v) for k, v in _to_dynamo(item).items()}))
    decoded = _deserialize_image(image)
    assert strict(unbinary(decoded)) == strict(item)
    assert strict(_codec.decode(_codec.encode(decoded))) == strict(decoded)


@pytest.fixture
async def cache(redis_client: aioredis.Redis) -> AsyncIterator[Cache]:
    c = Cache(
        redis_client,
        namespace="prop",
        soft_ttl=60,
        hard_ttl=600,
        clock=FakeClock(),
        early_refresh=0,
    )
    async with CacheHost(c) as entered:
        yield entered


_ids = itertools.count()


@pytest.mark.redis
@WITH_REDIS
@given(item=items)
async def test_stream_refresh_stores_the_item_readers_get(
    cache: Cache, item: dict[str, Any]
) -> None:
    """Refresh mode's entry, read back by a ``@cached_item`` reader, is the item (no origin call)."""
    pk = f"item-{next(_ids)}"
    item = {**item, "pk": pk}
    loads = 0

    @cached_item(cache, table="Props", key=lambda pk: {"pk": pk})
    async def get(pk: str, *, attributes: list[str] | None = None) -> dict[str, Any] | None:
        nonlocal loads
        loads += 1
        return None

    image = {k: lambda_json(v) for k, v in _to_dynamo(item).items()}
    record = {
        "eventName": "MODIFY",
        "eventSourceARN": "arn:aws:dynamodb:us-east-1:1:table/Props/stream/x",
        "dynamodb": {"Keys": {"pk": {"S": pk}}, "NewImage": image, "SequenceNumber": "7"},
    }
    report = await StreamInvalidator(cache, mode="refresh").handle(
        json.loads(json.dumps({"Records": [record]}))
    )
    assert report.applied == 1 and report.superseded == 0
    got = await get(pk)
    assert got is not None and strict(unbinary(got)) == strict(item)
    assert loads == 0


# --------------------------------------------------------------------------- keys

key_values = st.one_of(strings, numbers, st.integers(-(10**40), 10**40), binaries)


def typed(value: object, number_form: int) -> dict[str, Any]:
    """A key value as a stream record types it; numbers in one of several spellings."""
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, bytes):
        return {"B": base64.b64encode(value).decode()}
    d = Decimal(value)  # type: ignore[arg-type]
    spellings = (str(d), format(d, "f"), format(d, "E"), format(d, "e"), format(d, ".60e"))
    return {"N": spellings[number_form % len(spellings)]}


@PURE
@given(st.dictionaries(names, key_values, min_size=1, max_size=2), st.integers(0, 4), names)
def test_stream_key_meets_the_readers_key(key: dict[str, Any], form: int, table: str) -> None:
    """A record's typed key, numbers in any spelling, names the readers' entry and tags."""
    assume("/" not in table)
    raw = {
        "eventName": "REMOVE",
        "eventSourceARN": f"arn:aws:dynamodb:us-east-1:1:table/{table}/stream/x",
        "dynamodb": {"Keys": {k: typed(v, form) for k, v in key.items()}, "SequenceNumber": "1"},
    }
    parsed = parse_record(json.loads(json.dumps(raw)))
    assert parsed.identity == item_identity(table, key)
    assert parsed.tags == item_tags(table, key)


@PURE
@given(key_values, key_values, names)
def test_item_identity_separates_exactly_the_different_typed_values(
    a: object, b: object, table: str
) -> None:
    """Two key values share an identity iff they are one DynamoDB value (S "10" is not N 10)."""
    same = typed_key_part(a) == typed_key_part(b)
    assert (item_identity(table, {"k": a}) == item_identity(table, {"k": b})) is same
    assert (change_tags(table, {"k": a}) == change_tags(table, {"k": b})) is same


@PURE
@given(st.dictionaries(names, key_values, min_size=1, max_size=3), names)
def test_change_tags_are_distinct_and_end_with_the_table(key: dict[str, Any], table: str) -> None:
    """One tag per non-empty subset of the key's attributes, the full key first, the table's last."""
    tags = change_tags(table, key)
    assert len(set(tags)) == len(tags) == 2 ** len(key)
    assert tags[0] == f"item:{item_identity(table, key)}"
    assert tags[-1] == table_tag(table) and not any(t.startswith("table:") for t in tags[:-1])


# --------------------------------------------------------------------------- stream records

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def or_junk(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return strategy | json_values


number_texts = st.one_of(
    numbers.map(str),
    st.sampled_from(
        ["10", "1e3", "-0", "NaN", "Infinity", "-inf", "1e999999", "1E-999999", "", " 1", "x"]
    ),
    st.text(string.digits + "eE.-+", max_size=8),
)
key_value_texts = st.one_of(
    st.builds(lambda s: {"S": s}, strings),
    st.builds(lambda n: {"N": n}, number_texts),
    st.builds(lambda b: {"B": base64.b64encode(b).decode()}, binaries),
    st.builds(lambda s: {"B": s}, st.text(max_size=6)),
    st.dictionaries(st.sampled_from(["S", "N", "B", "SS", "M", "NULL"]), json_values, max_size=2),
)
images = st.builds(
    lambda item: {k: lambda_json(v) for k, v in _to_dynamo(item).items()}, items
) | st.dictionaries(st.text(max_size=5), or_junk(key_value_texts), max_size=3)
dynamodb_sections = st.fixed_dictionaries(
    {},
    optional={
        "Keys": or_junk(st.dictionaries(st.text(max_size=5), or_junk(key_value_texts), max_size=3)),
        "SequenceNumber": or_junk(st.integers(0, 10**40).map(str)) | st.integers(-3, 10**30),
        "NewImage": or_junk(images),
        "StreamViewType": st.just("NEW_AND_OLD_IMAGES"),
    },
)
arns = st.builds(
    lambda t: f"arn:aws:dynamodb:us-east-1:123456789012:table/{t}/stream/2024-01-01",
    st.text(min_size=1, max_size=8),
) | st.text(max_size=12)
lambda_records = st.fixed_dictionaries(
    {},
    optional={
        "eventID": or_junk(st.text(max_size=5)),
        "eventName": or_junk(st.sampled_from(["INSERT", "MODIFY", "REMOVE"])),
        "eventSourceARN": or_junk(arns),
        "dynamodb": or_junk(dynamodb_sections),
    },
)


def kinesis(inner: Any, table: Any, sequence: Any, garble: bool) -> dict[str, Any]:
    payload = dict(inner, tableName=table) if isinstance(inner, dict) else inner
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return {
        "kinesis": {"data": data[:-3] if garble else data, "sequenceNumber": sequence},
        "eventSource": "aws:kinesis",
    }


kinesis_records = st.builds(
    kinesis, or_junk(lambda_records), or_junk(st.text(max_size=6)), json_scalars, st.booleans()
)
stream_records = (
    lambda_records
    | kinesis_records
    | json_values
    | st.dictionaries(
        st.sampled_from(["kinesis", "dynamodb", "eventSourceARN", "eventName"]), json_values
    )
)

# Records that must parse: a valid shape with arbitrary keys and images.
valid_keys = st.dictionaries(names, key_values, min_size=1, max_size=2)
valid_records = st.builds(
    lambda table, event, key, form, seq: {
        "eventName": event,
        "eventSourceARN": f"arn:aws:dynamodb:us-east-1:1:table/{table}/stream/x",
        "dynamodb": {"Keys": {k: typed(v, form) for k, v in key.items()}, "SequenceNumber": seq},
    },
    names.filter(lambda t: "/" not in t),
    st.sampled_from(["INSERT", "MODIFY", "REMOVE"]),
    valid_keys,
    st.integers(0, 4),
    st.integers(0, 10**40).map(str),
)


@PURE
@given(stream_records)
def test_parse_record_gives_a_record_or_a_stream_record_error(raw: Any) -> None:
    """Any JSON is a parsed record consistent with its key, or a StreamRecordError."""
    try:
        parsed = parse_record(raw)
    except StreamRecordError:
        return
    assert parsed.event_name in {"INSERT", "MODIFY", "REMOVE"}
    assert parsed.identity == item_identity(parsed.table, parsed.key)
    assert parsed.tags == item_tags(parsed.table, parsed.key)


@PURE
@given(valid_records)
def test_well_formed_records_always_parse(raw: dict[str, Any]) -> None:
    """A well-formed record parses, whatever its key holds; its sequence number orders refreshes."""
    parsed = parse_record(raw)
    assert parsed.sequence == (raw["dynamodb"]["SequenceNumber"].lstrip("0") or "0")


def test_deeply_nested_kinesis_data_is_malformed_not_a_crash() -> None:
    """JSON nested beyond the recursion limit inside Kinesis data is a malformed record."""
    deep = "[" * 100_000 + "]" * 100_000
    raw = {"kinesis": {"data": base64.b64encode(deep.encode()).decode(), "sequenceNumber": "1"}}
    with pytest.raises(StreamRecordError, match="Kinesis"):
        parse_record(raw)


@pytest.mark.redis
@WITH_REDIS
@given(
    batch=st.lists(stream_records | valid_records, max_size=6),
    mode=st.sampled_from(["invalidate", "refresh"]),
)
async def test_invalidator_applies_or_skips_every_record(
    cache: Cache, batch: list[Any], mode: Any
) -> None:
    """Every record of any JSON batch is applied or counted as a malformed skip; nothing raises."""
    inv = StreamInvalidator(cache, mode=mode)
    counts = inv.metrics.counts
    before = counts["stream_records_malformed"], counts["stream_records_applied"]
    report = await inv.handle({"Records": batch})
    assert report.failed == [] and report.error is None
    assert report.applied + report.skipped == len(batch)
    assert counts["stream_records_malformed"] - before[0] == report.skipped
    assert counts["stream_records_applied"] - before[1] == report.applied


@pytest.mark.redis
async def test_malformed_record_with_a_non_object_dynamodb_section_is_skipped(
    cache: Cache,
) -> None:
    """A record whose dynamodb section is a list or text is skipped (it used to crash the batch)."""
    good = {
        "eventName": "REMOVE",
        "eventSourceARN": "arn:aws:dynamodb:us-east-1:1:table/T/stream/x",
        "dynamodb": {"Keys": {"pk": {"S": "a"}}, "SequenceNumber": "1"},
    }
    report = await StreamInvalidator(cache).handle_records(
        [{"dynamodb": [1]}, {"dynamodb": "x"}, good]
    )
    assert (report.applied, report.skipped, report.failed) == (1, 2, [])


# --------------------------------------------------------------------------- Cache-Control

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
tokens = st.text(TCHAR, min_size=1, max_size=8)
# Quoted-string content: any visible latin-1 text, commas, '=', '"' and '\' included.
quoted_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=10
)


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# (the argument as rendered, or None for none; what the parser must give back)
arguments = st.one_of(
    st.none().map(lambda _: (None, None)),
    tokens.map(lambda t: (t, t)),
    quoted_text.map(lambda t: (quote(t), t)),
)
directives = st.dictionaries(tokens.map(str.lower), arguments, max_size=5)


def render(name: str, rendered: str | None) -> bytes:
    text = name if rendered is None else f"{name}={rendered}"
    return text.encode("latin-1")


@PURE
@given(directives, st.data())
def test_cache_control_round_trips_tokens_and_quoted_values(
    parsed: dict[str, tuple[str | None, str | None]], data: st.DataObject
) -> None:
    """Rendered directives, in any case, on one line or many, parse back to names and arguments."""
    members = [
        render("".join(c.upper() if data.draw(st.booleans()) else c for c in name), arg[0])
        for name, arg in parsed.items()
    ]
    expected = {name: arg[1] for name, arg in parsed.items()}
    assert _http.parse_cache_control([b", ".join(members)]) == expected
    assert _http.parse_cache_control(members) == expected
    assert (
        _http.parse_cache_control([b" ,".join(m.upper() for m in members)]).keys()
        == expected.keys()
    )


@PURE
@given(directives, st.data())
def test_cache_control_repeats_agree_or_are_invalid_in_any_order(
    parsed: dict[str, tuple[str | None, str | None]], data: st.DataObject
) -> None:
    """A directive repeated alike is kept; repeated with another argument it reads as invalid."""
    assume(parsed)
    members = [render(name, arg[0]) for name, arg in parsed.items()]
    name = data.draw(st.sampled_from(sorted(parsed)))
    rendered, value = parsed[name]
    same = _http.parse_cache_control([*members, render(name.upper(), rendered)])
    assert same == {n: a[1] for n, a in parsed.items()}
    other = data.draw(tokens.filter(lambda t: t != value))
    clash = [*members, render(name, other)]
    shuffled = data.draw(st.permutations(clash))
    result = _http.parse_cache_control(shuffled)
    assert result == _http.parse_cache_control(clash)
    assert result[name] != value and result[name] != other
    assert _http.seconds(result, name) == -1  # e.g. two max-ages: already stale


long_digits = st.integers(1, 6000).map(lambda n: b"7" * n)
header_bytes = (
    st.binary(max_size=40)
    | long_digits
    | st.builds(
        lambda a, b: a + b"=" + b,
        st.sampled_from([b"max-age", b"s-maxage", b"min-fresh"]),
        long_digits,
    )
)


@PURE
@given(st.lists(header_bytes, max_size=4))
def test_cache_control_parser_takes_any_bytes(lines: list[bytes]) -> None:
    """Any bytes parse: lower-cased, stripped names; delta-seconds are -1 or saturated, never huge."""
    parsed = _http.parse_cache_control(lines)
    for name in parsed:
        assert name and name == name.strip().lower()
        assert -1 <= (_http.seconds(parsed, name) or 0) <= 2**31
    directives_ = _http.RequestDirectives.parse(lines[0] if lines else None, b"no-cache")
    assert directives_.max_age is None or 0 < directives_.max_age <= 2**31


def judge(
    status: int,
    headers: list[tuple[bytes, bytes]],
    credentials: tuple[bool, bool] = (False, False),
    request_time: float = 0.0,
    took: float = 0.0,
) -> _http.Judgement:
    """The verdict with a 5 s default TTL, 3 s of grace, at most 100 s fresh and 50 s stale."""
    return _http.judge_response(
        status,
        headers,
        request_time=request_time,
        response_time=request_time + took,
        has_cookie=credentials[0],
        has_auth=credentials[1],
        default_ttl=5.0,
        grace=3.0,
        grace_explicit=False,
        max_ttl=100.0,
        max_stale=50.0,
    )


def test_delta_seconds_of_thousands_of_digits_saturate() -> None:
    """max-age, s-maxage and Age of 5000 digits saturate at 2^31 (int() would refuse them)."""
    huge = b"9" * 5000
    assert _http.RequestDirectives.parse(b"max-age=" + huge, None).max_age == 2**31
    judged = judge(200, [(b"cache-control", b"s-maxage=" + huge), (b"age", huge)])
    assert judged.store is False and judged.reason == "already expired"
    assert _http.saturated(b"0" * 5000 + b"12") == 12


response_fields = st.sampled_from(
    [
        b"cache-control",
        b"expires",
        b"date",
        b"age",
        b"vary",
        b"set-cookie",
        b"etag",
        b"last-modified",
    ]
)
field_values = (
    st.binary(max_size=30)
    | long_digits
    | long_digits.map(b"max-age=".__add__)
    | st.sampled_from(
        [
            b"max-age=60",
            b"public, s-maxage=10",
            b'no-cache="set-cookie"',
            b"Thu, 01 Jan 2099 00:00:00 GMT",
            b"stale-while-revalidate=30",
            b"must-revalidate",
            b"*",
            b"accept-encoding",
        ]
    )
)


@PURE
@example(status=200, headers=[(b"age", b"9" * 5000)], credentials=(False, False), times=(0.0, 0.0))
@given(
    status=st.sampled_from([200, 203, 204, 206, 301, 304, 404, 500]),
    headers=st.lists(st.tuples(response_fields, field_values), max_size=6),
    credentials=st.tuples(st.booleans(), st.booleans()),
    times=st.tuples(st.floats(0, 1e10), st.floats(0, 100)),
)
def test_judge_response_never_raises_and_keeps_its_bounds(
    status: int,
    headers: list[tuple[bytes, bytes]],
    credentials: tuple[bool, bool],
    times: tuple[float, float],
) -> None:
    """Any response headers give a verdict within the configured caps, stored only if still usable."""
    request_time, took = times
    judged = judge(status, headers, credentials, request_time, took)
    if judged.store:
        # A default-TTL response's freshness counts from its arrival: its age is added back.
        assert judged.freshness <= 100.0 + judged.initial_age and 0.0 <= judged.stale <= 50.0
        assert judged.soft > 0 or judged.stale > 0
        assert judged.reason == ""
    else:
        assert judged.reason


@PURE
@given(st.binary(max_size=40), st.binary(max_size=20) | st.none())
def test_other_header_parsers_take_any_bytes(value: bytes, other: bytes | None) -> None:
    """split_list, Vary, dates, If-None-Match and surrogate keys never raise on any bytes."""
    members = _http.split_list(value)
    assert all(m and m == m.strip() for m in members)
    if b'"' not in value:
        assert members == [p.strip() for p in value.split(b",") if p.strip()]
    vary = _http.parse_vary([value])
    assert vary is None or list(vary) == sorted(set(vary))
    date = _http.parse_http_date(value)
    assert date is None or isinstance(date, float)
    assert isinstance(_http.none_match(value, other), bool)
    assert isinstance(_http.not_modified_since(value, other, value), bool)
    assert all(" " not in t and t for t in _http.content_tags([value]))


# --------------------------------------------------------------------------- the middleware

_paths = itertools.count()
request_fields = st.sampled_from(
    [b"cache-control", b"pragma", b"if-none-match", b"if-modified-since", b"accept-encoding"]
)
# What an ASGI server lets through: no CR, LF or NUL in a field value.
wire_values = (st.binary(max_size=30) | long_digits | field_values).map(
    lambda v: v.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
)


async def asgi_call(
    app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]]
) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 9),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body


@pytest.mark.redis
@WITH_REDIS
@example(request_headers=[], response_headers=[(b"content-length", b"1" * 5000)])
@example(request_headers=[(b"cache-control", b"max-age=" + b"2" * 5000)], response_headers=[])
@given(
    request_headers=st.lists(st.tuples(request_fields, wire_values), max_size=4),
    response_headers=st.lists(
        st.tuples(
            response_fields | st.just(b"content-length") | st.just(b"surrogate-key"), wire_values
        ),
        max_size=5,
    ),
)
async def test_middleware_answers_any_header_values(
    cache: Cache,
    request_headers: list[tuple[bytes, bytes]],
    response_headers: list[tuple[bytes, bytes]],
) -> None:
    """Whatever the request and response headers hold, each GET gets the app's answer or a 304."""
    calls = 0

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": response_headers})
        await send({"type": "http.response.body", "body": b"hello", "more_body": False})

    middleware = CacheMiddleware(app, cache=cache)
    path = f"/p{next(_paths)}"
    for _ in range(2):
        status, body = await asgi_call(middleware, "GET", path, request_headers)
        assert (status, body) in {(200, b"hello"), (304, b"")}
    assert 1 <= calls <= 2


@pytest.mark.redis
async def test_unsafe_request_purges_its_url_despite_a_malformed_location(cache: Cache) -> None:
    """A POST answered with an unparsable Location still reaches the client and purges its URL."""
    gets = 0

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        nonlocal gets
        if scope["method"] == "POST":
            headers = [(b"location", b"//[not-a-host")]
            await send({"type": "http.response.start", "status": 303, "headers": headers})
        else:
            gets += 1
            headers = [(b"cache-control", b"max-age=60")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    middleware = CacheMiddleware(app, cache=cache)
    await asgi_call(middleware, "GET", "/orders", [])
    await asgi_call(middleware, "GET", "/orders", [])
    assert gets == 1
    assert (await asgi_call(middleware, "POST", "/orders", []))[0] == 303
    await asgi_call(middleware, "GET", "/orders", [])
    assert gets == 2
