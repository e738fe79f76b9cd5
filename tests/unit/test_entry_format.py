"""Entry format 3 without a server: what a fill writes, what each read gets back, and the verdict.

Each case goes the way a real entry does: ``encode_fields`` and ``stamp_entry``
build the fields a fill hands the store (a whole entry's string as
``M_ENTRY``, which the store writes as a Redis string; a partial entry's
hash), the test answers a read of it as Redis would (GET of the string; for
a hash, HMGET of ``WHOLE_FIELDS`` or of ``ALL_META`` and the attributes, or
HGETALL for signed entries) and ``judge`` decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any
from unittest.mock import patch

import pytest
from redis.exceptions import ResponseError

from swr_cache import _codec
from swr_cache._entry import (
    FORMAT,
    FRESH,
    STALE,
    _Corrupt,
    _Plan,
    _Snap,
    _snap_from_hash,
    _snap_from_item,
    _snap_from_list,
    due_early,
    encode_fields,
    expand,
    fresh_items,
    held_value,
    judge,
    stamp_entry,
)
from swr_cache._policy import Policy
from swr_cache._signing import Signer
from swr_cache._store import (
    ALL_META,
    M_ABSENT,
    M_ENTRY,
    M_FORMAT,
    M_HARD,
    M_SOFT,
    M_VERSION,
    M_WHOLE,
    WHOLE_FIELDS,
)

from .test_entry import request as entry_request

NOW = 1_000_000.0
ITEM = {"pk": "u1", "name": "Ada", "age": Decimal("36"), "tags": {"a", "b"}, "v": Decimal("7")}
POLICY = Policy(soft_ttl=10, hard_ttl=100, negative_ttl=5)


def request(attrs: tuple[str, ...] | None = None, *, signed: bool = False) -> Any:
    """An item request with a version attribute (so a fresh partial entry plans a merge)."""
    return entry_request(attrs, signed=signed, version_attr="v")


def filled(
    value: Any,
    attrs: tuple[str, ...] | None = None,
    *,
    compress: int | None = None,
    version_attr: str | None = None,
) -> dict[bytes, bytes]:
    """The hash a fill writes for ``value`` (a projection of ``attrs``, or whole)."""
    fields = encode_fields(True, attrs, value, False, compress, version_attr)
    stamp_entry(fields, POLICY, value is None, NOW, 12.0)
    return fields


def hmget(raw: dict[bytes, bytes], names: Sequence[bytes]) -> list[bytes | None]:
    return [raw.get(n) for n in names]


def read(raw: dict[bytes, bytes], attrs: tuple[str, ...] | None) -> _Snap:
    """Read ``raw`` as the engine does unsigned: a whole entry is a string (GET answers
    either read), a hash answers a fixed HMGET, whole or projection."""
    if M_ENTRY in raw:  # stored as a string: GET answers whole reads and projections
        snap = _snap_from_item(raw[M_ENTRY])
    else:
        names = WHOLE_FIELDS if attrs is None else (*ALL_META, *(a.encode() for a in attrs))
        snap = _snap_from_item(hmget(raw, names))
    assert snap is not None
    return snap


FORMAT_1_WHOLE = {
    M_SOFT: b"%d" % (NOW + 10_000),
    M_HARD: b"%d" % (NOW + 100_000),
    M_FORMAT: b"1",
    M_WHOLE: b"1",
    M_VERSION: b"abc",
    b"name": _codec.encode("Ada"),
}


def test_a_whole_item_is_one_string_of_header_and_one_msgpack_map() -> None:
    """A whole fill writes one string (handed to the store as \\xffe): format, deadlines, version, delta, kind, item version, blob."""
    raw = filled(ITEM, version_attr="v")
    assert list(raw) == [M_ENTRY]
    fmt, soft, hard, version, delta, kind, digits, blob = raw[M_ENTRY].split(b"|", 7)
    assert (fmt, soft, hard) == (FORMAT, b"%d" % (NOW + 10_000), b"%d" % (NOW + 100_000))
    assert len(version) == 12 and delta == b"12" and kind == b"w" and digits == b"7"
    assert _codec.decode(blob) == ITEM


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        (None, ITEM),
        (("name", "age"), {"name": "Ada", "age": Decimal("36")}),
        (("name", "nope"), {"name": "Ada"}),  # a whole entry knows what the item lacks
    ],
)
def test_whole_entry_answers_whole_and_projection_reads_from_its_blob(
    attrs: tuple[str, ...] | None, expected: dict[str, Any]
) -> None:
    """Whole reads and projections of a whole entry decode the one blob: no plan, no load."""
    assert judge(request(attrs), read(filled(ITEM), attrs), NOW) == (FRESH, expected)


def test_whole_entry_turns_stale_then_unusable() -> None:
    raw = filled(ITEM)
    assert judge(request(), read(raw, None), NOW + 20_000) == (STALE, ITEM)
    assert judge(request(), read(raw, None), NOW + 100_000) is None


@pytest.mark.parametrize("attrs", [None, ("name",)])
def test_negative_entry_answers_none(attrs: tuple[str, ...] | None) -> None:
    """A not-found item is a whole entry of kind n with an empty blob, living negative_ttl."""
    raw = filled(None, ("name",) if attrs else None)
    assert raw[M_ENTRY].split(b"|")[5] == b"n"
    assert judge(request(attrs), read(raw, attrs), NOW) == (FRESH, None)
    assert judge(request(attrs), read(raw, attrs), NOW + 5_000) is None


def test_partial_entry_keeps_a_field_per_attribute() -> None:
    """A projection fill writes its attributes as fields, its metadata alongside, absent names listed."""
    raw = filled({"name": "Ada", "extra": 1}, ("gone", "name"))
    assert M_ENTRY not in raw and raw[b"name"] == _codec.encode("Ada") and b"extra" not in raw
    assert _codec.decode(raw[M_ABSENT]) == ["gone"] and raw[M_FORMAT] == FORMAT
    assert judge(request(("gone", "name")), read(raw, ("gone", "name")), NOW) == (
        FRESH,
        {"name": "Ada"},
    )
    plan = judge(request(("age", "name")), read(raw, ("age", "name")), NOW)
    assert isinstance(plan, _Plan) and plan.load_attrs == ("age",)
    assert plan.merge_version == raw[M_VERSION] and plan.merged == {"name": "Ada"}


def test_whole_read_of_a_partial_entry_plans_a_whole_load() -> None:
    """HMGET of WHOLE_FIELDS on a partial entry returns only its format: load the whole item."""
    raw = filled({"name": "Ada"}, ("name",))
    assert hmget(raw, WHOLE_FIELDS) == [None, FORMAT]
    plan = judge(request(), read(raw, None), NOW)
    assert isinstance(plan, _Plan) and plan.load_attrs is None and plan.merge_version is None


@pytest.mark.parametrize("attrs", [None, ("name",)])
def test_format_1_entry_is_corrupt(attrs: tuple[str, ...] | None) -> None:
    """An entry of format 1 (a field per attribute and \\xffw) is corrupt to format 3: a counted miss."""
    with pytest.raises(_Corrupt):
        judge(request(attrs), read(dict(FORMAT_1_WHOLE), attrs), NOW)
    signed_read = _snap_from_hash(dict(FORMAT_1_WHOLE))
    assert signed_read is not None
    with pytest.raises(_Corrupt):
        judge(request(attrs, signed=True), signed_read, NOW)


@pytest.mark.parametrize("attrs", [None, ("name",)])
def test_format_2_whole_entry_is_corrupt(attrs: tuple[str, ...] | None) -> None:
    """A hash holding \\xffe (format 2's whole entry) is corrupt, whatever its header says."""
    for head in (b"2", FORMAT):
        old = {M_ENTRY: head + filled(ITEM)[M_ENTRY][1:]}
        names = WHOLE_FIELDS if attrs is None else (*ALL_META, *(a.encode() for a in attrs))
        snap = _snap_from_item(hmget(old, names))
        assert snap is not None
        with pytest.raises(_Corrupt):
            judge(request(attrs), snap, NOW)
        signed_read = _snap_from_hash(dict(old))
        assert signed_read is not None
        with pytest.raises(_Corrupt):
            judge(request(attrs, signed=True), signed_read, NOW)


def test_no_entry_reads_as_absent() -> None:
    assert _snap_from_item(None) is None
    assert _snap_from_list([None, None]) is None
    assert _snap_from_list([None] * (len(ALL_META) + 2)) is None
    assert _snap_from_hash({}) is None


def test_compression_compresses_the_blob() -> None:
    """Above compress_threshold the whole blob is stored compressed, and reads back exactly."""
    big = {**ITEM, "bio": "abc" * 1000}
    plain, packed = filled(big), filled(big, compress=100)
    assert len(packed[M_ENTRY]) < 200 < len(plain[M_ENTRY])
    assert judge(request(), read(packed, None), NOW) == (FRESH, big)
    assert judge(request(("bio",)), read(packed, ("bio",)), NOW) == (FRESH, {"bio": "abc" * 1000})
    broken = {M_ENTRY: packed[M_ENTRY][:-5]}  # (the string, truncated)
    with pytest.raises(_Corrupt):
        judge(request(), read(broken, None), NOW)


def test_signed_entries_cover_the_blob_and_read_whole() -> None:
    """A whole entry's signature ends its string; a changed blob, another key or a cut fails; a valid one decodes."""
    signer = Signer(b"k" * 32)
    whole = filled(ITEM)[M_ENTRY]
    raw = signer.signed_string("e", whole)
    assert len(raw) == len(whole) + 32 and raw.startswith(whole)
    got = signer.check_string("e", raw)
    assert got == whole
    for attrs, expected in ((None, ITEM), (("name",), {"name": "Ada"})):
        snap = _snap_from_item(got)
        assert snap is not None
        assert judge(request(attrs, signed=True), snap, NOW) == (FRESH, expected)
    assert signer.check_string("e", raw.replace(b"Ada", b"Eve")) is None
    assert signer.check_string("other", raw) is None
    assert signer.check_string("e", whole) is None  # unsigned
    assert signer.check_string("e", raw[:20]) is None
    assert signer.check_string("e", b"") is None
    # A partial entry (a hash) carries a signature field over all of its fields.
    partial = signer.signed("e", filled({"name": "Ada"}, ("name",)))
    fields = dict(partial)
    assert signer.check_hash("e", fields)  # (removes the signature field)
    snap = _snap_from_hash(fields)
    assert snap is not None
    assert judge(request(("name",), signed=True), snap, NOW) == (FRESH, {"name": "Ada"})
    assert not signer.check_hash("e", {**partial, b"name": _codec.encode("Eve")})
    assert not signer.check_hash("other", dict(partial))


@pytest.mark.parametrize(
    ("version", "digits"),
    [
        (Decimal("7"), b"7"),
        (Decimal("1E+2"), b"100"),
        (12, b"12"),
        (Decimal("1.5"), b""),
        (Decimal("-1"), b""),
        (True, b""),
        ("7", b""),
        (None, b""),
    ],
)
def test_item_version_in_the_header(version: Any, digits: bytes) -> None:
    """The write-through script compares the header's digits: only a non-negative integer is written."""
    raw = filled({"pk": "u1", "v": version}, version_attr="v")
    assert raw[M_ENTRY].split(b"|", 7)[6] == digits
    assert filled({"pk": "u1", "v": version})[M_ENTRY].split(b"|", 7)[6] == b""


def test_expand_gives_tools_a_field_per_attribute() -> None:
    """The CLI and the consistency checker see a whole entry as format 1 laid it out."""
    view = expand(filled(ITEM)[M_ENTRY])  # the string a whole entry is
    assert view[M_WHOLE] == b"1" and view[M_FORMAT] == FORMAT
    assert {k: _codec.decode(v) for k, v in view.items() if not k.startswith(b"\xff")} == {
        k.encode(): v for k, v in ITEM.items()
    }
    partial = filled({"name": "Ada"}, ("name",))
    assert expand(partial) == partial
    assert expand(b"not an entry") == {M_ENTRY: b"not an entry"}


def test_a_held_flat_item_is_decoded_once_and_copied_per_caller() -> None:
    """A near copy of an item whose values are all immutable is decoded once; each caller gets a dict of its own."""
    snap = read(filled({"name": "Ada", "age": 36, "raw": b"\x00"}), None)
    snap.held = True
    first = judge(request(), snap, NOW)
    assert isinstance(first, tuple)
    first[1]["name"] = "changed"
    second = judge(request(), snap, NOW)
    assert isinstance(second, tuple)
    assert second[1] == {"name": "Ada", "age": 36, "raw": b"\x00"}
    assert snap.kept is not None and second[1] is not snap.kept


def test_a_held_item_with_mutable_values_is_copied_for_each_caller() -> None:
    """Lists, sets and maps (nested too) inside a held item are copied, never shared between callers."""
    item = {
        "tags": {"a"},
        "list": [1],
        "map": {"k": "v"},
        "nested": {"l": [{"x": [1, 2]}], "s": {"a", "b"}},
        "listed": [[1], {"m": 2}],
        "name": "Ada",
    }
    snap = read(filled(item), None)
    snap.held = True
    first = judge(request(), snap, NOW)
    assert isinstance(first, tuple)
    assert snap.kept is not None  # decoded once
    assert {name for name, _ in snap.copies} == {"tags", "list", "map", "nested", "listed"}
    got = first[1]
    got["tags"].add("b")
    got["list"].append(2)
    got["map"]["k"] = "changed"
    got["nested"]["l"][0]["x"].append(3)
    got["nested"]["s"].add("c")
    got["listed"][0].append(9)
    got["listed"][1]["m"] = 3
    got["name"] = "changed"
    second = judge(request(), snap, NOW)
    assert isinstance(second, tuple)
    assert second[1] == item
    assert held_value(snap) == item


def test_a_held_item_of_a_type_it_cannot_copy_is_decoded_for_each_caller() -> None:
    """A value whose type the copier does not know (boto3's Binary) keeps the item decoded per call."""
    from boto3.dynamodb.types import Binary

    snap = read(filled({"raw": Binary(b"\x00"), "list": [1]}), None)
    snap.held = True
    first = judge(request(), snap, NOW)
    assert isinstance(first, tuple)
    first[1]["list"].append(2)
    second = judge(request(), snap, NOW)
    assert isinstance(second, tuple)
    assert second[1]["list"] == [1] and snap.kept is None


def test_fresh_items_answer_fresh_whole_entries_and_leave_the_rest_to_judge() -> None:
    """A batch's fresh whole entries are decoded from their GET/MGET replies; every other reply is left to judge."""
    fresh = filled(ITEM)[M_ENTRY]
    negative = filled(None)[M_ENTRY]
    partial = hmget(filled({"name": "Ada"}, ("name",)), WHOLE_FIELDS)  # a hash, probed
    header = fresh.split(b"|", 7)
    stale_soft = b"|".join([header[0], b"%d" % (NOW - 1), *header[2:]])
    garbage = b"|".join([*header[:7], b"\xc1"])  # a blob msgpack rejects
    old = b"|".join([b"2", *header[1:]])  # another format
    replies = [fresh, None, negative, partial, stale_soft, garbage, ResponseError("WRONGTYPE"), old]
    values, rest, early = fresh_items(replies, NOW, 0.0)
    assert values[0] == ITEM and values[1:] == [None] * 7
    assert rest == [1, 2, 3, 4, 5, 6, 7] and early == []
    # Each caller gets objects of its own.
    again, _, _ = fresh_items([fresh], NOW, 0.0)
    assert again[0] == ITEM and again[0] is not values[0]


def test_xfetch_draws_only_near_the_soft_deadline() -> None:
    """An early refresh is drawn only within 40 load-times x beta of the soft deadline; nearer, it is likely."""
    soft = NOW + 1000.0
    with patch("swr_cache._entry.random.random") as draw:
        draw.return_value = 0.999999
        assert not due_early(1.0, b"10", soft, NOW)  # 1000 ms away, 400 ms horizon: no draw
        assert draw.call_count == 0
        assert due_early(1.0, b"100", soft, NOW)  # within the horizon, a draw near 1: due
        draw.return_value = 0.0
        assert not due_early(1.0, b"100", soft, NOW)  # a zero gap: not yet
        assert draw.call_count == 2
    header = filled(ITEM)[M_ENTRY].split(b"|", 7)
    header[1] = b"%d" % (NOW + 5)  # soft in 5 ms
    header[4] = b"1000"  # a load of 1 s
    _, _, early = fresh_items([b"|".join(header)], NOW, 1e6)
    assert early == [(0, header[3])]
