"""Tests for swr_cache._keys: readable, injective, namespaced, hash-tagged keys."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import enum
import re
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from swr_cache._errors import ConfigError, KeyEncodingError, SwrCacheError
from swr_cache._keys import (
    KeySpace,
    KeyTemplate,
    encode_args,
    escape,
    from_typed,
    item_identity,
    item_tag,
    normalize_number,
    result_identity,
    typed_key_part,
)

# ---------------------------------------------------------------- helpers


def crc16_xmodem(data: bytes) -> int:
    """CRC16/XMODEM (poly 0x1021, init 0), as Redis Cluster uses."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def hash_tag(key: str) -> bytes:
    """The part of a key Redis Cluster hashes (the first non-empty {...})."""
    raw = key.encode("utf-8", "surrogatepass")
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            return raw[start + 1 : end]
    return raw


def slot(key: str) -> int:
    return crc16_xmodem(hash_tag(key)) % 16384


_ESCAPE_RUN = re.compile(r"(?:%[0-9A-F]{2})+")


def unescape(s: str) -> str:
    """The inverse of escape(); its existence proves escape() injective."""
    assert "%" not in _ESCAPE_RUN.sub("", s), f"stray % in {s!r}"
    return _ESCAPE_RUN.sub(
        lambda m: bytes.fromhex(m.group().replace("%", "")).decode("utf-8", "surrogatepass"), s
    )


RESERVED = set("%{}:|=,")
HOSTILE_CHARS = list(":{}|%=,[]() \t\n\r\x00\x7f\x85\xa0\u2028é✓日🎉\ud800-.3Aa")
hostile_text = st.text(st.sampled_from(HOSTILE_CHARS) | st.characters(), max_size=12)
LONG = "x:{y}|%=,\n" * 205  # over 2 KB of separators


# ---------------------------------------------------------------- crc16 sanity


def test_crc16_matches_redis_reference() -> None:
    """The test's CRC16 is the one in the Redis Cluster spec (check value 0x31C3)."""
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert slot("{user1000}.following") == slot("{user1000}.followers")
    assert hash_tag("foo{}{bar}") == b"foo{}{bar}"
    assert hash_tag("foo{{bar}}zap") == b"{bar"


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "value",
    [
        10,
        10.0,
        Decimal("10"),
        Decimal("10.0"),
        Decimal("1E+1"),
        Decimal("0.01E+3"),
        "10",
        "1E1",
        "10.000",
    ],
    ids=repr,
)
def test_ten_is_always_ten(value: int | float | Decimal | str) -> None:
    """Every spelling of ten normalises to "10"."""
    assert normalize_number(value) == "10"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("0.50"), "0.5"),
        (Decimal("-0"), "0"),
        (Decimal("-0.000"), "0"),
        (-0.0, "0"),
        (0, "0"),
        ("-0", "0"),
        (Decimal("1E-7"), "0.0000001"),
        (1e-7, "0.0000001"),
        (Decimal("1E+20"), "100000000000000000000"),
        (1e16, "10000000000000000"),
        (0.1, "0.1"),
        (-1.25, "-1.25"),
        (Decimal("-12.3400"), "-12.34"),
        (2**70, "1180591620717411303424"),
        (-(2**70), "-1180591620717411303424"),
        ("12345678901234567890123456789012345678.5", "12345678901234567890123456789012345678.5"),
        (
            Decimal("9.9999999999999999999999999999999999999E+125"),
            "99999999999999999999999999999999999999" + "0" * 88,
        ),
        (" 7 ", "7"),
    ],
    ids=repr,
)
def test_normalize_number(value: int | float | Decimal | str, expected: str) -> None:
    """Canonical text: no trailing zeros, no exponent, no negative zero."""
    assert normalize_number(value) == expected


def test_normalize_number_ignores_thread_context() -> None:
    """A low-precision thread context never rounds a key."""
    with decimal.localcontext() as ctx:
        ctx.prec = 2
        assert normalize_number(Decimal("123.4500")) == "123.45"
        assert normalize_number("1.23456789") == "1.23456789"


class Level(enum.IntEnum):
    HIGH = 3


def test_normalize_number_int_subclass() -> None:
    """An IntEnum is normalised as its int."""
    assert normalize_number(Level.HIGH) == "3"


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        float("nan"),
        float("inf"),
        float("-inf"),
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        "NaN",
        "Infinity",
        "abc",
        "",
        "0x10",
        Decimal("1E+5000"),
        Decimal("1E-5000"),
        10**5000,
        None,
        [1],
    ],
    ids=lambda v: type(v).__name__,
)
def test_normalize_number_rejects(value: Any) -> None:
    """Bools, NaN, infinities, non-numbers and absurd magnitudes are KeyEncodingError."""
    with pytest.raises(KeyEncodingError):
        normalize_number(value)


def test_normalize_number_rejects_garbage_under_non_trapping_context() -> None:
    """A malformed string is refused even when the context would make it NaN."""
    with decimal.localcontext() as ctx:
        ctx.traps[decimal.InvalidOperation] = False
        with pytest.raises(KeyEncodingError):
            normalize_number("garbage")


@given(
    st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
        lambda d: abs(d.adjusted()) < 300
    )
)
def test_property_normalize_number_preserves_value(value: Decimal) -> None:
    """The text parses back to an equal number and has no exponent or trailing zeros."""
    text = normalize_number(value)
    assert Decimal(text) == value
    assert "E" not in text and "e" not in text
    if "." in text:
        assert not text.endswith("0") and not text.endswith(".")
    assert text != "-0"


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_property_float_normalises_like_its_repr(value: float) -> None:
    """A float is the number its shortest repr spells."""
    assert Decimal(normalize_number(value)) == Decimal(repr(value))


# ---------------------------------------------------------------- typed parts


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("u1", ("S", "u1")),
        ("", ("S", "")),
        ("10", ("S", "10")),
        (10, ("N", "10")),
        (Decimal("10.0"), ("N", "10")),
        (2.5, ("N", "2.5")),
        (b"\x00\x01", ("B", "AAE=")),
        (bytearray(b"\xff"), ("B", "/w==")),
        (memoryview(b"hi"), ("B", "aGk=")),
    ],
    ids=repr,
)
def test_typed_key_part(value: object, expected: tuple[str, str]) -> None:
    """str is S, numbers are normalised N, bytes-likes are base64 B."""
    assert typed_key_part(value) == expected


@pytest.mark.parametrize(
    "value", [True, None, [1], {"S": "x"}, dt.date(2020, 1, 1), float("nan")], ids=repr
)
def test_typed_key_part_rejects(value: object) -> None:
    """Anything else is a KeyEncodingError (bool is not a number)."""
    with pytest.raises(KeyEncodingError):
        typed_key_part(value)


@pytest.mark.parametrize(
    ("av", "expected"),
    [
        ({"S": "x"}, "x"),
        ({"S": ""}, ""),
        ({"N": "10"}, Decimal("10")),
        ({"N": "-1.50"}, Decimal("-1.50")),
        ({"B": b"\x00\x01"}, b"\x00\x01"),
        ({"B": bytearray(b"\x02")}, b"\x02"),
        ({"B": "AAE="}, b"\x00\x01"),
    ],
    ids=repr,
)
def test_from_typed(av: Mapping[str, Any], expected: object) -> None:
    """DynamoDB typed key values become str, Decimal and bytes."""
    out = from_typed(av)
    assert out == expected
    assert type(out) is type(expected) or isinstance(expected, bytes)


@pytest.mark.parametrize(
    "av",
    [
        {},
        {"S": "x", "N": "1"},
        {"N": "abc"},
        {"N": "NaN"},
        {"N": 10},
        {"S": 1},
        {"B": "not base64!"},
        {"B": 12},
        {"SS": ["a"]},
        {"NULL": True},
        {"BOOL": True},
        {"M": {}},
        "x",
        None,
    ],
    ids=repr,
)
def test_from_typed_rejects(av: Any) -> None:
    """Non-key types and malformed values are KeyEncodingError."""
    with pytest.raises(KeyEncodingError):
        from_typed(av)


def test_stream_and_reader_keys_meet() -> None:
    """A stream record's {"N": "10"} gives the same identity as a reader's 10 or 10.0."""
    from_stream = item_identity(
        "T", {"pk": from_typed({"N": "10.0"}), "sk": from_typed({"B": "AAE="})}
    )
    from_reader = item_identity("T", {"sk": b"\x00\x01", "pk": 10})
    assert from_stream == from_reader


# ---------------------------------------------------------------- escape


def test_escape_examples() -> None:
    """Reserved characters become %XX; readable text stays as is."""
    assert escape("a:b") == "a%3Ab"
    assert escape("%{}:|=,") == "%25%7B%7D%3A%7C%3D%2C"
    assert escape("two words\n") == "two%20words%0A"
    assert escape("héllo-日本_✓.🎉") == "héllo-日本_✓.🎉"
    assert escape("") == ""


@pytest.mark.parametrize(
    ("char", "escaped"),
    [
        ("\x00", "%00"),
        ("\t", "%09"),
        ("\x7f", "%7F"),
        ("\x85", "%C2%85"),
        ("\xa0", "%C2%A0"),
        ("\u2028", "%E2%80%A8"),
        ("\ud800", "%ED%A0%80"),
    ],
    ids=repr,
)
def test_escape_controls_whitespace_surrogates(char: str, escaped: str) -> None:
    """Control characters, Unicode whitespace and lone surrogates are UTF-8 %XX."""
    assert escape(char) == escaped


def test_escape_fast_path_returns_same_object() -> None:
    """A string with nothing to escape is returned without copying."""
    s = "plain-text_123.é"
    assert escape(s) is s


def test_escape_long_hostile_string() -> None:
    """A 2 KB string full of separators escapes and unescapes back."""
    out = escape(LONG)
    assert not RESERVED & set(out.replace("%", ""))
    assert unescape(out) == LONG


@given(hostile_text)
def test_property_escape_is_injective(s: str) -> None:
    """escape() has an inverse and its output holds no reserved character but %."""
    out = escape(s)
    assert not (RESERVED - {"%"}) & set(out)
    assert not re.search(r"[\x00-\x20\x7f-\x9f\s]", out)
    assert unescape(out) == s


@given(hostile_text, hostile_text)
def test_property_escape_distinct_inputs_distinct_outputs(a: str, b: str) -> None:
    """Different strings never escape alike."""
    assume(a != b)
    assert escape(a) != escape(b)


# ---------------------------------------------------------------- item identity


def test_item_identity_examples() -> None:
    """Table, then key attributes sorted by name as name=T:value."""
    assert item_identity("Users", {"pk": "u1"}) == "Users|pk=S:u1"
    assert (
        item_identity("Orders", {"order_id": 10, "customer_id": "c1"})
        == "Orders|customer_id=S:c1,order_id=N:10"
    )
    assert item_identity("Files", {"h": b"\x00\x01"}) == "Files|h=B:AAE%3D"


def test_item_identity_types_differ() -> None:
    """S "10", N 10 and B b"10" are three different items."""
    ids = {
        item_identity("T", {"pk": "10"}),
        item_identity("T", {"pk": 10}),
        item_identity("T", {"pk": b"10"}),
    }
    assert len(ids) == 3


@pytest.mark.parametrize("value", [10, 10.0, Decimal("10.0"), Decimal("1E+1")], ids=repr)
def test_item_identity_numbers_meet(value: object) -> None:
    """Equal numbers are one item whatever their spelling."""
    assert item_identity("T", {"pk": value}) == "T|pk=N:10"


def test_item_identity_escapes_hostile_parts() -> None:
    """Separators inside names and values are escaped, never raw."""
    out = item_identity("a|b", {"k=1,x": "v:{w}|"})
    assert out == "a%7Cb|k%3D1%2Cx=S:v%3A%7Bw%7D%7C"
    assert "{" not in out and "}" not in out


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("T", {}),
        ("", {"pk": "x"}),
        ("T", {1: "x"}),
        ("T", {"pk": None}),
        ("T", {"pk": True}),
        ("T", {"pk": [1]}),
    ],
    ids=repr,
)
def test_item_identity_rejects(table: str, key: Any) -> None:
    """Empty key or table, non-str names and unsupported values are KeyEncodingError."""
    with pytest.raises(KeyEncodingError):
        item_identity(table, key)


def test_item_identity_error_names_attribute() -> None:
    """The error says which key attribute was wrong."""
    with pytest.raises(KeyEncodingError, match="'sk'"):
        item_identity("T", {"pk": "ok", "sk": object()})


def parse_identity(identity: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """Parse an item identity back (proves item_identity injective)."""
    table, sep, rest = identity.partition("|")
    assert sep and "|" not in rest
    key: dict[str, tuple[str, str]] = {}
    for part in rest.split(","):
        name, eq, typed = part.partition("=")
        kind, colon, text = typed.partition(":")
        assert eq and colon and kind in {"S", "N", "B"}
        key[unescape(name)] = (kind, unescape(text))
    return unescape(table), key


key_values = st.one_of(
    hostile_text,
    st.integers(),
    st.decimals(allow_nan=False, allow_infinity=False).filter(lambda d: abs(d.adjusted()) < 200),
    st.binary(max_size=8),
)
item_keys = st.dictionaries(hostile_text, key_values, min_size=1, max_size=3)
tables = hostile_text.filter(bool)


@given(tables, item_keys)
def test_property_item_identity_is_injective(table: str, key: dict[str, object]) -> None:
    """An identity parses back to its table and typed key: no two items share one."""
    identity = item_identity(table, key)
    assert "{" not in identity and "}" not in identity
    assert parse_identity(identity) == (table, {k: typed_key_part(v) for k, v in key.items()})


def test_item_tag() -> None:
    """item_tag is "item:" + identity, for a full key or a partition."""
    assert item_tag("Orders", {"customer_id": "c1"}) == "item:Orders|customer_id=S:c1"
    assert item_tag("Orders", {"order_id": 1, "customer_id": "c1"}) == (
        "item:Orders|customer_id=S:c1,order_id=N:1"
    )
    with pytest.raises(KeyEncodingError):
        item_tag("Orders", {})


def test_result_identity() -> None:
    """Result identities are r|name|rendered with the name escaped."""
    assert result_identity("mod.list_orders", "orders:c1") == "r|mod.list_orders|orders:c1"
    assert result_identity("a|b", "x") == "r|a%7Cb|x"


@pytest.mark.parametrize("rendered", ["{x}", "a}", "{"])
def test_result_identity_refuses_braces(rendered: str) -> None:
    """An unescaped rendering with braces would break the hash tag: refused."""
    with pytest.raises(KeyEncodingError):
        result_identity("f", rendered)


@given(hostile_text, hostile_text, item_keys)
def test_property_result_and_item_identities_never_meet(
    name: str, rendered: str, key: dict[str, object]
) -> None:
    """An @cached result never shares an identity with an item, even of table "r"."""
    result = result_identity(name, escape(rendered))
    assert result != item_identity("r", key)
    assert result.count("|") >= 2
    assert item_identity("r", key).count("|") == 1


# ---------------------------------------------------------------- key space


def test_keyspace_layout() -> None:
    """Every kind of key is <ns>:<kind>:{...} with the documented kind codes."""
    ks = KeySpace("shop")
    ident = "Users|pk=S:u1"
    assert ks.entry(ident) == "shop:e:{Users|pk=S:u1}"
    assert ks.lease(ident) == "shop:l:{Users|pk=S:u1}"
    assert ks.fence(ident) == "shop:f:{Users|pk=S:u1}"
    assert ks.seq(ident) == "shop:q:{Users|pk=S:u1}"
    assert ks.tag_gen("product-1") == "shop:tg:{product-1}"
    assert ks.tag_members("product-1") == "shop:tm:{product-1}"
    arn = "arn:aws:dynamodb:eu-west-1:123:table/Users/stream/2024"
    assert ks.checkpoint(arn, "shardId-0001") == (
        "shop:ck:{arn%3Aaws%3Adynamodb%3Aeu-west-1%3A123%3Atable/Users/stream/2024}:shardId-0001"
    )
    assert ks.shard_lease(arn, "s:1") == (
        "shop:sl:{arn%3Aaws%3Adynamodb%3Aeu-west-1%3A123%3Atable/Users/stream/2024}:s%3A1"
    )
    assert ks.prefix == "shop:"


def test_keyspace_escapes_namespace() -> None:
    """A namespace with separators or braces is escaped; the first { is always the tag's."""
    ks = KeySpace("a:{b}")
    assert ks.entry("x") == "a%3A%7Bb%7D:e:{x}"
    assert hash_tag(ks.entry("x")) == b"x"


@pytest.mark.parametrize("namespace", ["", None, 1], ids=repr)
def test_keyspace_rejects_bad_namespace(namespace: Any) -> None:
    """An empty or non-str namespace is a ConfigError (a ValueError)."""
    with pytest.raises(ConfigError):
        KeySpace(namespace)
    assert issubclass(ConfigError, ValueError)


def test_keyspace_is_frozen_value() -> None:
    """KeySpace is immutable, hashable and compares by namespace."""
    ks = KeySpace("n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ks.namespace = "m"  # type: ignore[misc]
    assert ks == KeySpace("n")
    assert hash(ks) == hash(KeySpace("n"))
    assert repr(ks) == "KeySpace(namespace='n')"


@pytest.mark.parametrize("tag", ["", None], ids=repr)
def test_empty_tag_is_refused(tag: Any) -> None:
    """An empty tag would give `{}`, which Redis does not treat as a hash tag."""
    with pytest.raises(KeyEncodingError):
        KeySpace("n").tag_gen(tag)
    with pytest.raises(KeyEncodingError):
        KeySpace("n").tag_members(tag)


@pytest.mark.parametrize(("arn", "shard"), [("", "s"), ("a", ""), (None, "s")], ids=repr)
def test_stream_keys_refuse_empty_parts(arn: Any, shard: Any) -> None:
    """Checkpoint keys need a non-empty ARN and shard id."""
    with pytest.raises(KeyEncodingError):
        KeySpace("n").checkpoint(arn, shard)


@given(tables, item_keys)
def test_property_item_keys_share_a_slot(table: str, key: dict[str, object]) -> None:
    """Entry, lease, fence and sequence keys of one item hash to one Cluster slot."""
    ks = KeySpace("ns")
    identity = item_identity(table, key)
    keys = [ks.entry(identity), ks.lease(identity), ks.fence(identity), ks.seq(identity)]
    assert {hash_tag(k) for k in keys} == {identity.encode("utf-8", "surrogatepass")}
    assert len({slot(k) for k in keys}) == 1


def test_result_keys_share_a_slot() -> None:
    """An @cached result's entry and lease live in one slot too."""
    ks = KeySpace("ns")
    identity = result_identity("f", KeyTemplate("orders:{c}").render({"c": "{x}"}))
    assert slot(ks.entry(identity)) == slot(ks.lease(identity)) == slot(ks.fence(identity))


@given(hostile_text.filter(bool), hostile_text)
def test_property_tag_keys_share_a_slot(tag: str, namespace: str) -> None:
    """A tag's generation and member keys hash to one slot."""
    assume(namespace)
    ks = KeySpace(namespace)
    assert hash_tag(ks.tag_gen(tag)) == hash_tag(ks.tag_members(tag)) == escape(tag).encode()
    assert slot(ks.tag_gen(tag)) == slot(ks.tag_members(tag))


def test_item_tag_keys_share_a_slot() -> None:
    """Tags built by item_tag (full of separators) still keep gen and members together."""
    ks = KeySpace("ns")
    tag = item_tag("Orders", {"customer_id": "c:{1}"})
    assert slot(ks.tag_gen(tag)) == slot(ks.tag_members(tag))


@given(hostile_text.filter(bool), hostile_text.filter(bool))
def test_property_checkpoint_and_shard_lease_share_a_slot(arn: str, shard: str) -> None:
    """All keys of one stream share the ARN's slot."""
    ks = KeySpace("ns")
    assert (
        slot(ks.checkpoint(arn, shard))
        == slot(ks.shard_lease(arn, "other"))
        == slot(ks.checkpoint(arn, "x"))
    )


def test_namespaces_never_overlap_example() -> None:
    """KeySpace("a:b") and KeySpace("a") never produce the same key."""
    nested = KeySpace("a:b")
    outer = KeySpace("a")
    assert nested.entry("x") == "a%3Ab:e:{x}"
    assert outer.entry("x") != nested.entry("x")
    # An identity that starts like the nested namespace's remainder cannot alias it.
    assert outer.entry("b:e:{x") != nested.entry("x")
    assert not outer.entry("x").startswith(nested.prefix)
    assert not nested.entry("x").startswith(outer.prefix)


KINDS = ("entry", "lease", "fence", "seq", "tag_gen", "tag_members")


@given(
    hostile_text.filter(bool),
    hostile_text.filter(bool),
    st.sampled_from(KINDS),
    st.sampled_from(KINDS),
    tables,
    item_keys,
)
def test_property_namespaces_never_overlap(
    ns1: str, ns2: str, kind1: str, kind2: str, table: str, key: dict[str, object]
) -> None:
    """Keys of two different namespaces never coincide, and each key names its namespace."""
    assume(ns1 != ns2)
    a, b = KeySpace(ns1), KeySpace(ns2)
    identity = item_identity(table, key)
    key1 = getattr(a, kind1)(identity)
    key2 = getattr(b, kind2)(identity)
    assert key1 != key2
    assert unescape(key1.split(":", 1)[0]) == ns1
    assert unescape(key2.split(":", 1)[0]) == ns2


def test_kinds_never_overlap() -> None:
    """Within a namespace, each kind of key has its own prefix."""
    ks = KeySpace("n")
    keys = {getattr(ks, kind)("x") for kind in KINDS} | {
        ks.checkpoint("x", "y"),
        ks.shard_lease("x", "y"),
    }
    assert len(keys) == len(KINDS) + 2


@given(tables, item_keys)
def test_property_identity_of_inverts_entry(table: str, key: dict[str, object]) -> None:
    """identity_of(entry(i)) == i."""
    ks = KeySpace("n:s")
    identity = item_identity(table, key)
    assert ks.identity_of(ks.entry(identity)) == identity


@pytest.mark.parametrize(
    "key",
    ["other:e:{x}", "n:l:{x}", "n:e:{}", "n:e:{x", "n:e:x}", "n:e:{a}b}", "", "n:e:{a{b}"],
)
def test_identity_of_rejects_other_keys(key: str) -> None:
    """identity_of refuses keys that are not this namespace's entry keys."""
    with pytest.raises(KeyEncodingError):
        KeySpace("n").identity_of(key)


# ---------------------------------------------------------------- templates


class Color(enum.Enum):
    RED = "red"
    BLUE = 2


def test_template_render_basic() -> None:
    """Fields are filled in; literal text is kept as written."""
    tpl = KeyTemplate("orders:{customer_id}")
    assert tpl.fields == ("customer_id",)
    assert tpl.render({"customer_id": "c1"}) == "orders:c1"
    assert tpl.render({"customer_id": "c1", "unused": object()}) == "orders:c1"
    assert repr(tpl) == "KeyTemplate('orders:{customer_id}')"


def test_template_fields_in_order_without_duplicates() -> None:
    """.fields lists each field once, in order of first appearance."""
    assert KeyTemplate("{b}-{a}-{b}").fields == ("b", "a")
    assert KeyTemplate("constant").fields == ()
    assert KeyTemplate("constant").render({}) == "constant"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("x", "x"),
        (10, "10"),
        (10.0, "10"),
        (Decimal("1E+1"), "10"),
        (Decimal("0.50"), "0.5"),
        (True, "true"),
        (False, "false"),
        (None, "null"),
        (b"\x00\x01", "AAE%3D"),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        (dt.date(2024, 2, 29), "2024-02-29"),
        (dt.datetime(2024, 2, 29, 1, 2, 3), "2024-02-29T01%3A02%3A03"),
        (Color.RED, "red"),
        (Color.BLUE, "2"),
        (Level.HIGH, "3"),
    ],
    ids=repr,
)
def test_template_converts_by_type(value: object, text: str) -> None:
    """Each type has one readable rendering, then escaped."""
    assert KeyTemplate("k/{v}").render({"v": value}) == "k/" + text


@pytest.mark.parametrize(
    "value", [object(), [1], {"a": 1}, {1}, float("nan"), dt.time(1)], ids=repr
)
def test_template_rejects_unsupported_values(value: object) -> None:
    """Other types raise KeyEncodingError telling the user to pass a callable key=."""
    with pytest.raises(KeyEncodingError, match="key"):
        KeyTemplate("k:{v}").render({"v": value})


def test_template_unsupported_value_message_suggests_callable() -> None:
    """The message for an unrenderable type points at key=."""
    with pytest.raises(KeyEncodingError, match="callable key="):
        KeyTemplate("k:{v}").render({"v": object()})


def test_template_missing_field_is_named() -> None:
    """A missing value raises KeyEncodingError naming the field."""
    with pytest.raises(KeyEncodingError, match="'page'"):
        KeyTemplate("o:{customer_id}:{page}").render({"customer_id": "c"})


@pytest.mark.parametrize(
    "template",
    [
        "{}",
        "{0}",
        "x{1}",
        "{a.b}",
        "{a[0]}",
        "{a!r}",
        "{a:>5}",
        "{a:{b}}",
        "{a}{b}",
        "x:{a}{b}:y",
        "{a",
        "a}",
        "{{literal}}:{a}",
        "100%:{a}",
        "tab\there:{a}",
        "{a b}",
    ],
)
def test_template_rejects_bad_templates(template: str) -> None:
    """Non-identifier fields, conversions, specs, touching fields and unsafe literals are refused."""
    with pytest.raises(KeyEncodingError):
        KeyTemplate(template)


def test_template_not_a_str() -> None:
    """A non-str template is a KeyEncodingError."""
    with pytest.raises(KeyEncodingError):
        KeyTemplate(b"x")  # type: ignore[arg-type]


def test_template_escapes_hostile_values() -> None:
    """Values are escaped, so separators and braces never come through raw."""
    tpl = KeyTemplate("o:{a}:{b}")
    out = tpl.render({"a": "x:y", "b": "{z}"})
    assert out == "o:x%3Ay:%7Bz%7D"
    assert tpl.render({"a": "x", "b": "y:z"}) != tpl.render({"a": "x:y", "b": "z"})


def test_template_escapes_separator_start_in_values() -> None:
    """The first character of text between fields is escaped inside values."""
    tpl = KeyTemplate("{a}-{b}")
    assert tpl.render({"a": "x-y", "b": "z"}) == "x%2Dy-z"
    assert tpl.render({"a": "x", "b": "y-z"}) == "x-y%2Dz"
    assert tpl.render({"a": "x-y", "b": "z"}) != tpl.render({"a": "x", "b": "y-z"})


def test_template_is_readable() -> None:
    """Letters that merely occur in literal text are not escaped in values."""
    assert KeyTemplate("user-{id}").render({"id": "user"}) == "user-user"
    assert KeyTemplate("orders:{c}:page{p}").render({"c": "page", "p": 2}) == "orders:page:page2"


def test_template_long_value() -> None:
    """A 2 KB hostile value renders without braces and parses back."""
    tpl = KeyTemplate("o:{a}|{b}")
    out = tpl.render({"a": LONG, "b": LONG})
    assert "{" not in out and "}" not in out
    assert parse_render(tpl, out) == {"a": LONG, "b": LONG}


def parse_render(tpl: KeyTemplate, out: str) -> dict[str, str]:
    """Parse a rendering back to field texts (proves KeyTemplate.render injective).

    Literal text is raw and never contains '%'; a value ends at the first raw
    occurrence of the next literal's first character, skipping %XX tokens.
    """
    parts = tpl._parts
    values: dict[str, str] = {}
    pos = 0
    for i, (literal, name) in enumerate(parts):
        assert out.startswith(literal, pos)
        pos += len(literal)
        if name is None:
            continue
        following = parts[i + 1][0] if i + 1 < len(parts) else ""
        if i + 1 < len(parts) and parts[i + 1][1] is not None:
            start = pos
            while out[pos] != following[0]:
                pos += 3 if out[pos] == "%" else 1
            text = out[start:pos]
        else:  # the last field: whatever precedes the suffix
            end = len(out) - len(following)
            text = out[pos:end]
            pos = end
        value = unescape(text)
        assert values.setdefault(name, value) == value
    assert pos == len(out)
    return values


LITERAL_CHARS = list(":|=,-_/. ab3AéË日\u2028[]()")
literals = st.text(st.sampled_from(LITERAL_CHARS), max_size=4)


@st.composite
def templates(draw: st.DrawFn) -> tuple[str, list[str]]:
    n = draw(st.integers(1, 4))
    names = [draw(st.sampled_from(["a", "b", "c", "d"])) for _ in range(n)]
    text = draw(literals)
    for i, name in enumerate(names):
        text += "{" + name + "}"
        text += draw(literals.filter(bool)) if i + 1 < n else draw(literals)
    return text, sorted(set(names))


@given(templates(), st.data())
def test_property_template_render_is_injective(
    spec: tuple[str, list[str]], data: st.DataObject
) -> None:
    """For a fixed template, the rendering parses back to the field values."""
    template, names = spec
    tpl = KeyTemplate(template)
    values = {name: data.draw(hostile_text, label=name) for name in names}
    out = tpl.render(values)
    assert "{" not in out and "}" not in out
    assert parse_render(tpl, out) == values


@given(templates(), st.data())
def test_property_template_distinct_values_render_distinctly(
    spec: tuple[str, list[str]], data: st.DataObject
) -> None:
    """Two different assignments never render alike (values built from separator characters)."""
    template, names = spec
    tpl = KeyTemplate(template)
    sep_text = st.text(st.sampled_from([*LITERAL_CHARS, "%", "{"]), max_size=6)
    v1 = {name: data.draw(sep_text) for name in names}
    v2 = {name: data.draw(sep_text) for name in names}
    assume(v1 != v2)
    assert tpl.render(v1) != tpl.render(v2)


# ---------------------------------------------------------------- encode_args


def test_encode_args_example() -> None:
    """name=typed value pairs in parameter order."""
    assert encode_args({"user_id": "u1", "limit": 10}) == "user_id=s:u1,limit=n:10"
    assert encode_args({}) == ""


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("x", "s:x"),
        ("", "s:"),
        (1, "n:1"),
        (1.0, "n:1"),
        (Decimal("1.0"), "n:1"),
        (True, "t"),
        (False, "f"),
        (None, "z"),
        (b"\x00", "b:AA%3D%3D"),
        ([1, "a"], "[n:1,s:a]"),
        ((1, "a"), "[n:1,s:a]"),
        ([], "[]"),
        ({"b": 1, "a": [None]}, "(s:a=[z],s:b=n:1)"),
        ({}, "()"),
        (uuid.UUID(int=2), "u:00000000-0000-0000-0000-000000000002"),
        (dt.date(2020, 1, 2), "d:2020-01-02"),
        (dt.datetime(2020, 1, 2, 3, 4), "dt:2020-01-02T03%3A04%3A00"),
        (Color.RED, "s:red"),
        ("a,b=[c](d){e}:f", "s:a%2Cb%3D%5Bc%5D%28d%29%7Be%7D%3Af"),
    ],
    ids=repr,
)
def test_encode_args_values(value: object, text: str) -> None:
    """Values carry a type prefix; containers nest; text is escaped."""
    assert encode_args({"v": value}) == "v=" + text


def test_encode_args_keeps_types_apart() -> None:
    """ "1", 1, True, b"1", None and [1] are different keys."""
    values: list[object] = ["1", 1, True, b"1", None, [1], "true", "null", ["1"], {"1": 1}]
    assert len({encode_args({"v": v}) for v in values}) == len(values)


def test_encode_args_dict_order_does_not_matter() -> None:
    """Dicts are encoded with sorted keys."""
    assert encode_args({"d": {"b": 1, "a": 2}}) == encode_args({"d": {"a": 2, "b": 1}})


@pytest.mark.parametrize("value", [object(), {1, 2}, float("nan"), 1 + 2j], ids=repr)
def test_encode_args_rejects_unsupported(value: object) -> None:
    """Unsupported types raise KeyEncodingError naming the argument."""
    with pytest.raises(KeyEncodingError, match="'bad'"):
        encode_args({"ok": 1, "bad": value})


def test_encode_args_rejects_cycles() -> None:
    """A self-referencing argument is a KeyEncodingError, not a RecursionError."""
    cyclic: list[object] = []
    cyclic.append(cyclic)
    with pytest.raises(KeyEncodingError):
        encode_args({"c": cyclic})


def parse_args(text: str) -> list[tuple[str, Any]]:
    """Parse encode_args output back to a typed tree (proves it injective)."""
    pos = 0

    def leaf() -> str:
        nonlocal pos
        start = pos
        while pos < len(text) and text[pos] not in ",=])":
            pos += 1
        return unescape(text[start:pos])

    def value() -> Any:
        nonlocal pos
        for prefix, kind in (
            ("s:", "s"),
            ("n:", "n"),
            ("b:", "b"),
            ("u:", "u"),
            ("dt:", "dt"),
            ("d:", "d"),
        ):
            if text.startswith(prefix, pos):
                pos += len(prefix)
                raw = leaf()
                return (kind, base64.b64decode(raw) if kind == "b" else raw)
        ch = text[pos]
        pos += 1
        if ch in "tfz":
            return {"t": True, "f": False, "z": None}[ch]
        if ch == "[":
            items = []
            while text[pos] != "]":
                items.append(value())
                if text[pos] == ",":
                    pos += 1
            pos += 1
            return ("l", items)
        assert ch == "("
        pairs = []
        while text[pos] != ")":
            k = value()
            assert text[pos] == "="
            pos += 1
            pairs.append((k, value()))
            if text[pos] == ",":
                pos += 1
        pos += 1
        return ("m", pairs)

    result = []
    while pos < len(text):
        name = leaf()
        assert text[pos] == "="
        pos += 1
        result.append((name, value()))
        if pos < len(text):
            assert text[pos] == ","
            pos += 1
    return result


def tree(v: Any) -> Any:
    """What parse_args should give back for a value."""
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, str):
        return ("s", v)
    if isinstance(v, (int, float, Decimal)):
        return ("n", normalize_number(v))
    if isinstance(v, bytes):
        return ("b", v)
    if isinstance(v, (list, tuple)):
        return ("l", [tree(x) for x in v])
    assert isinstance(v, dict)
    return ("m", sorted(((tree(k), tree(x)) for k, x in v.items()), key=repr))


def untree_order(v: Any) -> Any:
    """Normalise the order of parsed map pairs for comparison."""
    if isinstance(v, tuple) and v and v[0] == "m":
        return ("m", sorted(((untree_order(k), untree_order(x)) for k, x in v[1]), key=repr))
    if isinstance(v, tuple) and v and v[0] == "l":
        return ("l", [untree_order(x) for x in v[1]])
    return v


arg_leaves = (
    st.none()
    | st.booleans()
    | hostile_text
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.binary(max_size=6)
)
arg_values = st.recursive(
    arg_leaves,
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children, children)
        | st.dictionaries(hostile_text | st.integers(), children, max_size=3)
    ),
    max_leaves=12,
)


@given(
    st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True), arg_values, max_size=4)
)
def test_property_encode_args_is_injective(arguments: dict[str, Any]) -> None:
    """encode_args parses back to the arguments' typed tree: different arguments, different keys."""
    text = encode_args(arguments)
    assert "{" not in text and "}" not in text
    parsed = [(name, untree_order(v)) for name, v in parse_args(text)]
    assert parsed == [(name, tree(v)) for name, v in arguments.items()]


# ---------------------------------------------------------------- errors


def test_key_errors_are_value_errors() -> None:
    """KeyEncodingError is both a package error and a ValueError."""
    assert issubclass(KeyEncodingError, SwrCacheError)
    assert issubclass(KeyEncodingError, ValueError)
