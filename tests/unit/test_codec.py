"""Tests for swr_cache._codec: msgpack with extension types, never pickle."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import enum
import uuid
import zoneinfo
from decimal import Decimal
from typing import Any

import msgpack
import pytest
from boto3.dynamodb.types import Binary, TypeDeserializer
from hypothesis import given
from hypothesis import strategies as st

from swr_cache._codec import FORMAT_VERSION, decode, encode
from swr_cache._errors import CodecError, SwrCacheError

UTC = dt.UTC
PLUS_0530 = dt.timezone(dt.timedelta(hours=5, minutes=30))
MINUS_0300 = dt.timezone(dt.timedelta(hours=-3))


def canon(value: Any) -> Any:
    """A comparable form that tells apart what ``==`` does not (Decimal("1.10")
    vs Decimal("1.1"), 1 vs 1.0 vs True, naive vs aware, tz offsets)."""
    if isinstance(value, Decimal):
        return ("D", str(value))
    if isinstance(value, bool):
        return ("?", value)
    if isinstance(value, float):
        return ("F", repr(value))
    if isinstance(value, dt.datetime):
        return ("DT", value.isoformat())
    if isinstance(value, (set, frozenset)):
        return ("SET", sorted(repr(canon(v)) for v in value))
    if isinstance(value, dict):
        return ("MAP", sorted((repr(canon(k)), repr(canon(v))) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("LIST", [canon(v) for v in value])
    return (type(value).__name__, value)


def raw_ext(code: int, payload: bytes) -> bytes:
    """An ext 8 record; msgpack.ExtType cannot build negative (reserved) codes."""
    return b"\xc7" + bytes([len(payload), code & 0xFF]) + payload


def roundtrip(value: object) -> Any:
    return decode(encode(value))


# ---------------------------------------------------------------- round trips

SCALARS = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    2**64,
    -(2**63) - 1,
    10**40,
    -(10**40),
    1.5,
    -0.0,
    float("inf"),
    "",
    "héllo wörld ✓ 🎉",
    "x" * 2048,
    b"",
    b"\x00\xff\x10",
    Decimal("1.10"),
    Decimal("0"),
    Decimal("-0"),
    Decimal("-0.000"),
    Decimal("1E+400"),
    Decimal("1E-400"),
    Decimal("12345678901234567890123456789012345678"),
    Decimal("Infinity"),
    Decimal("-Infinity"),
    dt.datetime(2024, 2, 29, 23, 59, 58, 123456),
    dt.datetime(2024, 2, 29, 23, 59, 58, 1, tzinfo=UTC),
    dt.datetime(1, 1, 1, tzinfo=PLUS_0530),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=MINUS_0300),
    dt.date(2024, 2, 29),
    dt.date(1, 1, 1),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    uuid.UUID(int=0),
]


@pytest.mark.parametrize("value", SCALARS, ids=repr)
def test_scalar_round_trip(value: object) -> None:
    """Every supported scalar decodes to an equal value of the same type."""
    out = roundtrip(value)
    assert type(out) is type(value)
    assert canon(out) == canon(value)


def test_format_version_is_three() -> None:
    """The format version lives in entry metadata: 3 since whole items became Redis strings."""
    assert FORMAT_VERSION == 3
    assert isinstance(FORMAT_VERSION, int)


@pytest.mark.parametrize("text", ["1.10", "1.100", "-0.50", "1E+3", "1000", "0E-7", "123.4560"])
def test_decimal_is_exact(text: str) -> None:
    """A Decimal keeps its digits and exponent, not just its value."""
    out = roundtrip(Decimal(text))
    assert str(out) == str(Decimal(text))
    assert out.as_tuple() == Decimal(text).as_tuple()


@pytest.mark.parametrize("text", ["NaN", "-NaN", "sNaN", "NaN123"])
def test_decimal_nan_round_trips(text: str) -> None:
    """Decimal NaNs (quiet, signed, signalling, with payload) are values too."""
    out = roundtrip(Decimal(text))
    assert out.as_tuple() == Decimal(text).as_tuple()


def test_float_nan_round_trips() -> None:
    """A float NaN decodes to a float NaN."""
    out = roundtrip(float("nan"))
    assert isinstance(out, float)
    assert out != out


def test_decimal_decode_ignores_thread_context() -> None:
    """Decoding is exact and strict whatever the caller's decimal context."""
    data = encode(Decimal("3.14159265358979323846264338327950288419716939937510"))
    bad = msgpack.packb(msgpack.ExtType(1, b"not-a-number"))
    with decimal.localcontext() as ctx:
        ctx.prec = 3
        ctx.traps[decimal.InvalidOperation] = False
        assert str(decode(data)) == "3.14159265358979323846264338327950288419716939937510"
        with pytest.raises(CodecError):
            decode(bad)


def test_datetime_keeps_naive_and_offset() -> None:
    """Naive stays naive; aware keeps its UTC offset and microseconds."""
    naive = roundtrip(dt.datetime(2020, 1, 2, 3, 4, 5, 678901))
    assert naive.tzinfo is None
    assert naive.microsecond == 678901
    aware = roundtrip(dt.datetime(2020, 1, 2, 3, 4, 5, 6, tzinfo=PLUS_0530))
    assert aware.utcoffset() == dt.timedelta(hours=5, minutes=30)
    assert aware.microsecond == 6


def test_datetime_offset_with_seconds() -> None:
    """A UTC offset with seconds and microseconds survives."""
    tz = dt.timezone(dt.timedelta(hours=-1, minutes=-2, seconds=-3, microseconds=-4))
    value = dt.datetime(2020, 6, 1, 12, tzinfo=tz)
    out = roundtrip(value)
    assert out == value
    assert out.utcoffset() == value.utcoffset()


@pytest.mark.parametrize("micros", [1, -1, 999_999, 1_000_001, -86_399_999_999])
def test_datetime_subsecond_offset(micros: int) -> None:
    """Offsets that are not whole seconds survive (3.11's fromisoformat drops +00:00:00.000001)."""
    tz = dt.timezone(dt.timedelta(microseconds=micros))
    value = dt.datetime(2000, 1, 1, 0, 0, 0, 7, tzinfo=tz)
    out = roundtrip(value)
    assert out == value
    assert out.utcoffset() == value.utcoffset()
    assert out.microsecond == 7


def test_named_zone_becomes_fixed_offset() -> None:
    """A zoneinfo datetime decodes to the same instant at the same offset."""
    try:
        paris = zoneinfo.ZoneInfo("Europe/Paris")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no tz database")
    value = dt.datetime(2024, 7, 1, 12, 0, tzinfo=paris)
    out = roundtrip(value)
    assert out == value
    assert out.utcoffset() == dt.timedelta(hours=2)


def test_datetime_subclass_decodes_to_datetime() -> None:
    """A datetime subclass is encoded with the base isoformat and decodes to datetime."""

    class MyDateTime(dt.datetime):
        def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
            return "nonsense"

    out = roundtrip(MyDateTime(2020, 1, 1, 1, 2, 3))
    assert type(out) is dt.datetime
    assert out == dt.datetime(2020, 1, 1, 1, 2, 3)


def test_date_is_not_datetime() -> None:
    """A date decodes to a date, not a datetime."""
    assert type(roundtrip(dt.date(2020, 5, 17))) is dt.date


def test_bytes_like_decode_to_bytes() -> None:
    """bytearray and memoryview are msgpack bin and decode to bytes."""
    assert roundtrip(bytearray(b"ab\x00")) == b"ab\x00"
    assert type(roundtrip(bytearray(b"ab"))) is bytes
    assert roundtrip(memoryview(b"xyz")) == b"xyz"


def test_tuple_decodes_to_list() -> None:
    """A tuple (documented) comes back as a list, nested ones too."""
    assert roundtrip((1, (2, "3"), [4])) == [1, [2, "3"], [4]]


def test_str_and_int_subclasses_decode_to_base() -> None:
    """StrEnum/IntEnum members are packed as their str/int value."""

    class Color(enum.StrEnum):
        RED = "red"

    class Level(enum.IntEnum):
        HIGH = 3

    assert roundtrip({"c": Color.RED, "l": Level.HIGH}) == {"c": "red", "l": 3}
    assert type(roundtrip(Color.RED)) is str


def test_nested_dynamodb_item() -> None:
    """A realistic item with every supported type nested in maps and lists."""
    item = {
        "pk": "user#1",
        "age": Decimal("42"),
        "score": Decimal("1.10"),
        "tags": {"a", "b"},
        "nums": {Decimal("1"), Decimal("2.50")},
        "blobs": {b"\x00", b"\x01"},
        "avatar": b"\x89PNG",
        "active": True,
        "deleted": None,
        "profile": {
            "created": dt.datetime(2020, 1, 1, tzinfo=UTC),
            "birthday": dt.date(1990, 4, 1),
            "id": uuid.UUID(int=7),
            "history": [Decimal("1E+2"), {"x": [None, {"deep": {"s"}}]}],
            "big": 2**100,
        },
        "list": [],
        "map": {},
    }
    assert canon(roundtrip(item)) == canon(item)


def test_type_deserializer_item_round_trips() -> None:
    """Every DynamoDB type, as boto3's TypeDeserializer yields it, round-trips with its type."""
    item = TypeDeserializer().deserialize(
        {
            "M": {
                "s": {"S": "x"},
                "n": {"N": "1.10"},
                "b": {"B": b"\x00\x01"},
                "ss": {"SS": ["a", "b"]},
                "ns": {"NS": ["1", "2.50", "1E+2"]},
                "bs": {"BS": [b"\x00", b"\x01"]},
                "m": {"M": {"inner": {"L": [{"NULL": True}, {"BOOL": False}, {"N": "-0"}]}}},
                "l": {"L": []},
            }
        }
    )
    out = roundtrip(item)
    assert out == item
    assert type(out["b"]) is Binary
    assert {type(v) for v in out["bs"]} == {Binary}
    assert [str(d) for d in sorted(out["ns"])] == ["1", "2.50", "1E+2"]
    assert str(out["n"]) == "1.10"
    assert str(out["m"]["inner"][2]) == "-0"


def test_boto3_binary_keeps_its_type() -> None:
    """A boto3 Binary decodes to Binary, not bytes (a hit looks like a miss)."""
    out = roundtrip(Binary(bytearray(b"ab")))
    assert type(out) is Binary
    assert out.value == b"ab"


def test_non_str_dict_keys() -> None:
    """Maps may have int, bytes, Decimal, None, date and UUID keys."""
    value = {
        1: "a",
        b"k": 2,
        Decimal("1.5"): 3,
        None: 4,
        dt.date(2020, 1, 1): 5,
        uuid.UUID(int=1): 6,
    }
    assert roundtrip(value) == value


# ---------------------------------------------------------------- sets


@pytest.mark.parametrize(
    "value",
    [
        {"a", "b", ""},
        {1, -2, 2**70},
        {Decimal("1.10"), Decimal("2")},
        {1.5, 2.25},
        {b"\x00", b"\xff"},
        {"a", b"a", 1, Decimal("2.5")},
        set(),
    ],
    ids=repr,
)
def test_set_round_trip(value: set[object]) -> None:
    """Sets of str, numbers and bytes (even mixed, even empty) decode to sets."""
    out = roundtrip(value)
    assert type(out) is set
    assert canon(out) == canon(value)


def test_frozenset_decodes_to_set() -> None:
    """A frozenset (documented) comes back as a set."""
    out = roundtrip(frozenset({"x", "y"}))
    assert out == {"x", "y"}
    assert type(out) is set


def test_set_keeps_decimal_exactness() -> None:
    """Decimals inside a number set keep their exponent."""
    out = roundtrip({Decimal("1.10")})
    assert [str(d) for d in out] == ["1.10"]


def test_set_encoding_is_deterministic() -> None:
    """Equal sets built in different orders encode to the same bytes."""
    a = set()
    b = set()
    words = [f"w{i}" for i in range(50)]
    for w in words:
        a.add(w)
    for w in reversed(words):
        b.add(w)
    assert encode(a) == encode(b)


def test_set_with_decimal_nan_still_encodes() -> None:
    """A set whose elements cannot be ordered keeps its own order."""
    out = roundtrip({Decimal("NaN"), Decimal("1")})
    assert len(out) == 2


@pytest.mark.parametrize("element", [(1, 2), frozenset({1}), None, dt.date(2020, 1, 1)], ids=repr)
def test_set_with_unsupported_element_is_refused(element: object) -> None:
    """Set elements are limited to str, numbers and bytes; the error names the type."""
    with pytest.raises(CodecError, match=type(element).__name__):
        encode({element, "x"})


# ---------------------------------------------------------------- refusals


class Opaque:
    pass


class Plain(enum.Enum):
    A = 1


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (object(), "object"),
        (Opaque(), "Opaque"),
        (1 + 2j, "complex"),
        (Plain.A, "Plain"),
        (dt.time(12, 0), "time"),
        (dt.timedelta(1), "timedelta"),
        ({"nested": [Opaque()]}, "Opaque"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_unencodable_raises_codec_error_naming_type(value: object, type_name: str) -> None:
    """An unsupported type raises CodecError whose message names the type."""
    with pytest.raises(CodecError, match=type_name):
        encode(value)


def test_codec_error_is_package_error() -> None:
    """CodecError derives from the package root."""
    assert issubclass(CodecError, SwrCacheError)


@pytest.mark.parametrize("key", [(1, 2), frozenset({1})], ids=repr)
def test_dict_key_that_would_not_decode_is_refused(key: object) -> None:
    """Tuple and frozenset keys would decode unhashable, so encode refuses them."""
    with pytest.raises(CodecError, match=type(key).__name__):
        encode({"outer": [{"fine": 1}, {key: 1}]})


def test_lone_surrogate_is_refused() -> None:
    """A str that is not valid Unicode cannot be encoded."""
    with pytest.raises(CodecError):
        encode("bad \ud800")


def test_cycle_is_refused() -> None:
    """A self-referencing list raises CodecError, not RecursionError."""
    cyclic: list[object] = []
    cyclic.append(cyclic)
    with pytest.raises(CodecError):
        encode(cyclic)


def test_too_deep_is_refused() -> None:
    """Nesting beyond msgpack's limit raises CodecError."""
    value: object = "leaf"
    for _ in range(2000):
        value = [value]
    with pytest.raises(CodecError):
        encode(value)


def test_deep_but_legal_nesting_round_trips() -> None:
    """Nesting within msgpack's limit round-trips (the key check is iterative)."""
    value: object = {"leaf": 1}
    for _ in range(400):
        value = [{"k": value}]
    assert roundtrip(value) == value


# ---------------------------------------------------------------- decode failures

RICH = encode(
    {
        "s": "text",
        "d": Decimal("1.10"),
        "set": {"a", "b"},
        "ns": {Decimal("2"), 2**70},
        "dt": dt.datetime(2020, 1, 1, tzinfo=UTC),
        "date": dt.date(2020, 1, 1),
        "u": uuid.UUID(int=5),
        "big": -(2**80),
        "b": b"\x00",
        "l": [1, 2.5, None, True],
    }
)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used
        b"\x92\x01",  # array of 2, one element
        b"\x01\x02",  # trailing data
        b"\xd9\x03ab",  # truncated str
        b"\xa2\xff\xfe",  # invalid UTF-8
        b"\x81\x90\x01",  # array as map key
        b"\xdd\xff\xff\xff\xff",  # huge array header, no data
        b"\x91" * 10_000 + b"\x00",  # nesting beyond the limit
    ],
    ids=repr,
)
def test_garbage_raises_codec_error(data: bytes) -> None:
    """Malformed bytes raise CodecError and nothing else."""
    with pytest.raises(CodecError):
        decode(data)


def test_every_truncation_raises_codec_error() -> None:
    """Every strict prefix of a valid encoding raises CodecError."""
    for end in range(len(RICH)):
        with pytest.raises(CodecError):
            decode(RICH[:end])


def test_compressed_values_round_trip_and_refuse_bombs() -> None:
    """``compress`` output decodes transparently; bad, nested or oversized payloads are CodecErrors."""
    import zlib

    import msgpack

    from swr_cache._codec import MAX_INFLATED, compress

    value = {"text": "abc" * 10_000, "n": Decimal("1.10"), "s": {1, 2}}
    packed = encode(value)
    small = compress(packed)
    assert len(small) < len(packed)
    assert decode(small) == value
    assert compress(b"\x01") == b"\x01"  # not worth it: left as is
    with pytest.raises(CodecError):
        decode(raw_ext(9, b"not zlib"))
    nested = msgpack.packb(msgpack.ExtType(9, zlib.compress(small)))
    with pytest.raises(CodecError, match="nested"):
        decode(nested)
    bomb = msgpack.packb(msgpack.ExtType(9, zlib.compress(b"\x00" * (MAX_INFLATED + 10))))
    with pytest.raises(CodecError, match="size limit"):
        decode(bomb)


def test_trailing_byte_raises_codec_error() -> None:
    """A valid value followed by extra bytes is refused."""
    with pytest.raises(CodecError):
        decode(RICH + b"\x00")


@pytest.mark.parametrize("code", [0, 10, 42, 127, -2, -128])
def test_unknown_extension_raises_codec_error(code: int) -> None:
    """An extension code this module did not register is refused."""
    with pytest.raises(CodecError, match="extension"):
        decode(b"\x81\xa1x" + raw_ext(code, b"payload"))


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        (1, b"abc"),
        (1, b"\xff\xfe"),
        (1, b""),
        (2, msgpack.packb("not an array")),
        (2, msgpack.packb({"a": 1})),
        (2, msgpack.packb([[1, 2]])),
        (2, msgpack.packb([msgpack.ExtType(2, msgpack.packb([1]))])),  # set in a set
        (2, msgpack.packb([msgpack.ExtType(3, b"2020-01-01T00:00:00")])),
        (2, msgpack.packb([msgpack.ExtType(7, b"a"), [1]])),
        (2, b"\x92\x01"),
        (2, msgpack.packb([1]) + b"\x00"),
        (3, b"yesterday"),
        (3, b"2020-13-01T00:00:00"),
        (3, b"\xff"),
        (4, b"2020-02-30"),
        (4, b""),
        (5, b"short"),
        (5, b"\x00" * 17),
        (6, b""),
        (8, b"2020-01-01T00:00:00"),
        (8, b"2020-01-01T00:00:00|x"),
        (8, b"2020-01-01T00:00:00|86400000000"),
        (8, b"nope|1"),
    ],
    ids=repr,
)
def test_bad_extension_payload_raises_codec_error(code: int, payload: bytes) -> None:
    """A registered extension with a malformed payload raises CodecError."""
    with pytest.raises(CodecError):
        decode(msgpack.packb([msgpack.ExtType(code, payload)]))


def test_deeply_nested_sets_payload_is_refused() -> None:
    """A crafted chain of sets-in-sets is refused at the second level (no deep C recursion)."""
    payload = msgpack.packb([1])
    for _ in range(5000):
        payload = msgpack.packb([msgpack.ExtType(2, payload)])
    with pytest.raises(CodecError):
        decode(msgpack.packb(msgpack.ExtType(2, payload)))


def test_msgpack_timestamp_decodes_to_aware_datetime() -> None:
    """A msgpack timestamp from another client decodes to an aware UTC datetime."""
    out = decode(msgpack.packb(msgpack.Timestamp(1_700_000_000, 5000)))
    assert out == dt.datetime(2023, 11, 14, 22, 13, 20, 5, tzinfo=UTC)


def test_decode_accepts_memoryview() -> None:
    """decode takes a memoryview (e.g. a slice of a Redis reply) without copying first."""
    assert decode(memoryview(encode({"a": 1}))) == {"a": 1}


def test_decode_non_bytes_raises_codec_error() -> None:
    """A non-buffer argument is a CodecError too."""
    with pytest.raises(CodecError):
        decode("text")  # type: ignore[arg-type]


# ---------------------------------------------------------------- properties

TIMEZONES = st.builds(
    dt.timezone,
    st.timedeltas(
        min_value=dt.timedelta(hours=-23, minutes=-59), max_value=dt.timedelta(hours=23, minutes=59)
    ),
)
SCALAR_STRATEGY = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.decimals(allow_nan=False)
    | st.datetimes()
    | st.datetimes(timezones=TIMEZONES)
    | st.dates()
    | st.uuids()
)
SET_STRATEGY = (
    st.frozensets(st.text(), max_size=5)
    | st.frozensets(st.binary(), max_size=5)
    | st.frozensets(st.integers(), max_size=5)
    | st.frozensets(st.decimals(allow_nan=False), max_size=5)
).map(set)
VALUES = st.recursive(
    SCALAR_STRATEGY | SET_STRATEGY,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@given(VALUES)
def test_property_round_trip(value: object) -> None:
    """Any value built from supported types round-trips exactly."""
    assert canon(roundtrip(value)) == canon(value)


@given(st.binary(max_size=200))
def test_property_decode_never_raises_other_errors(data: bytes) -> None:
    """Arbitrary bytes either decode or raise CodecError."""
    with contextlib.suppress(CodecError):
        decode(data)


@given(VALUES, st.data())
def test_property_corrupted_encoding_raises_only_codec_error(
    value: object, data: st.DataObject
) -> None:
    """Flipping a byte of a valid encoding never raises anything but CodecError."""
    encoded = bytearray(encode(value))
    index = data.draw(st.integers(0, len(encoded) - 1))
    encoded[index] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(CodecError):
        decode(bytes(encoded))
