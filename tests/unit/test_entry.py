"""The sans-IO entry logic: snapshots of Redis replies judged against requests (no server)."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from swr_cache import _codec
from swr_cache._entry import (
    FORMAT,
    FRESH,
    STALE,
    _Corrupt,
    _Plan,
    _snap_from_hash,
    _snap_from_item,
    _snap_from_list,
    _snap_from_result,
    encode_fields,
    judge,
    stamp_entry,
)
from swr_cache._policy import Policy
from swr_cache._store import (
    ALL_META,
    M_ABSENT,
    M_ENTRY,
    M_FORMAT,
    M_HARD,
    M_SOFT,
    M_VERSION,
)

NOW = 1_000_000.0


def request(
    attrs: tuple[str, ...] | None = None,
    *,
    item: bool = True,
    signed: bool = False,
    version_attr: str | None = None,
) -> Any:
    return SimpleNamespace(
        is_item=item,
        attrs=attrs,
        version_attr=version_attr,
        engine=SimpleNamespace(signer=object() if signed else None),
    )


def entry(
    *,
    soft: float = NOW + 10,
    hard: float = NOW + 100,
    whole: bool = True,
    negative: bool = False,
    **attrs: Any,
) -> dict[bytes, bytes]:
    """The fields of an entry (format 3): whole or negative as its string (``M_ENTRY``), partial as fields."""
    head = b"%s|%d|%d|v1||" % (FORMAT, soft, hard)
    if negative:
        return {M_ENTRY: head + b"n||"}
    if whole:
        return {M_ENTRY: head + b"w||" + _codec.encode(attrs)}
    fields = {M_SOFT: b"%d" % soft, M_HARD: b"%d" % hard, M_FORMAT: FORMAT, M_VERSION: b"v1"}
    for name, value in attrs.items():
        fields[name.encode()] = _codec.encode(value)
    return fields


def stored(raw: dict[bytes, bytes]) -> Any:
    """A read of ``raw`` as Redis keeps it: a whole entry (``M_ENTRY``) is its string, else a hash (HGETALL)."""
    if M_ENTRY in raw:
        return _snap_from_item(raw[M_ENTRY])
    return _snap_from_hash(raw)


def projection(fields: dict[bytes, bytes], attrs: tuple[str, ...]) -> list[bytes | None] | bytes:
    """What a projection read returns for ``fields``: a whole entry's string (GET), else HMGET of the metadata and ``attrs``."""
    if M_ENTRY in fields:
        return fields[M_ENTRY]
    return [fields.get(f) for f in (*ALL_META, *(a.encode() for a in attrs))]


def test_empty_replies_are_absent() -> None:
    """An empty HGETALL or an HMGET without metadata is no entry at all."""
    assert _snap_from_hash({}) is None
    assert _snap_from_list([None] * (len(ALL_META) + 1)) is None
    assert _snap_from_result([None] * 6) is None


@pytest.mark.parametrize(
    ("soft", "hard", "state"),
    [
        (NOW + 1, NOW + 2, FRESH),
        (NOW - 1, NOW + 2, STALE),
        (NOW - 2, NOW - 1, None),
        (NOW - 2, NOW, None),
    ],
)
def test_deadlines_decide_the_state(soft: float, hard: float, state: str | None) -> None:
    """Fresh before the soft deadline, stale until the hard one, unusable from it on."""
    snap = stored(entry(soft=soft, hard=hard, name="Ada"))
    assert snap is not None
    verdict = judge(request(), snap, NOW)
    if state is None:
        assert verdict is None
    else:
        assert verdict == (state, {"name": "Ada"})


def test_whole_entry_decodes_every_attribute() -> None:
    """A whole entry answers a whole read with every attribute, exact types kept."""
    snap = stored(entry(pk="u1", n=Decimal("1.5"), tags={"a", "b"}))
    assert snap is not None
    assert judge(request(), snap, NOW) == (
        FRESH,
        {"pk": "u1", "n": Decimal("1.5"), "tags": {"a", "b"}},
    )


def test_negative_entry_answers_none() -> None:
    """A not-found mark answers None, for whole reads and projections alike."""
    fields = entry(negative=True)
    snap = stored(dict(fields))
    assert snap is not None
    assert judge(request(), snap, NOW) == (FRESH, None)
    listed = _snap_from_item(projection(fields, ("name",)))
    assert listed is not None
    assert judge(request(("name",)), listed, NOW) == (FRESH, None)


def test_partial_entry_cannot_answer_a_whole_read() -> None:
    """An entry holding some attributes plans a load of the whole item."""
    snap = stored(entry(whole=False, name="Ada"))
    assert snap is not None
    verdict = judge(request(), snap, NOW)
    assert isinstance(verdict, _Plan)
    assert verdict.load_attrs is None and verdict.merge_version is None


def test_projection_of_whole_entry_returns_what_exists() -> None:
    """A projection of a whole entry returns only the requested attributes that exist."""
    fields = entry(name="Ada", age=36)
    snap = _snap_from_item(projection(fields, ("age", "missing")))
    assert snap is not None
    assert judge(request(("age", "missing")), snap, NOW) == (FRESH, {"age": 36})


def test_fresh_partial_entry_plans_a_merge_of_the_missing() -> None:
    """With a version attribute, a fresh partial entry loads just the missing names and merges them into its version."""
    fields = entry(whole=False, name="Ada")
    fields[M_ABSENT] = _codec.encode(["gone"])
    snap = _snap_from_item(projection(fields, ("age", "gone", "name")))
    assert snap is not None
    plan = judge(request(("age", "gone", "name"), version_attr="ver"), snap, NOW)
    assert isinstance(plan, _Plan)
    assert plan.load_attrs == ("age",)
    assert plan.merge_version == b"v1"
    assert plan.merged == {"name": "Ada"}
    assert plan.prior_absent == ["gone"]


@pytest.mark.parametrize("why", ["stale", "signed", "unversioned"])
def test_stale_signed_or_unversioned_partial_entry_plans_a_replacement(why: str) -> None:
    """A stale partial entry, a signed one, or one without a version attribute to compare reloads the union instead of merging."""
    fields = entry(whole=False, soft=NOW - 1 if why == "stale" else NOW + 10, name="Ada")
    snap = _snap_from_item(projection(fields, ("age", "name")))
    assert snap is not None
    version_attr = None if why == "unversioned" else "ver"
    plan = judge(
        request(("age", "name"), signed=why == "signed", version_attr=version_attr), snap, NOW
    )
    assert isinstance(plan, _Plan)
    assert plan.merge_version is None and plan.load_attrs == ("age", "name")


@pytest.mark.parametrize(
    "damage",
    [
        {M_FORMAT: b"999"},
        {M_SOFT: b"soon"},
        {M_HARD: b""},
        {b"name": b"\xc1"},  # never valid msgpack
        {b"name": b"\x92\x01"},  # a truncated array
    ],
)
def test_damaged_entries_are_corrupt(damage: dict[bytes, bytes]) -> None:
    """Another format, unreadable deadlines or undecodable values raise _Corrupt (a counted miss)."""
    fields = entry(whole=False, name="Ada") | damage
    snap = _snap_from_hash(fields)
    assert snap is not None
    with pytest.raises(_Corrupt):
        judge(request(("name",)), snap, NOW)


@pytest.mark.parametrize(
    "value",
    [
        b"999|1|2|v||w||\x80",  # another format
        b"3|soon|2|v||w||\x80",  # unreadable deadline
        b"3|1000010|1000100|v||x||\x80",  # an unknown kind
        b"3|1000010|1000100|v||w||\xc1",  # never valid msgpack
        b"3|1000010|1000100|v||w||\x92\x01\x02",  # an array, not a map
        b"3|1000010|1000100|v||w||\x81\xa1a",  # a truncated map
        b"3|1000010|1000100",  # a header cut short
    ],
)
def test_damaged_whole_entries_are_corrupt(value: bytes) -> None:
    """A whole entry with a bad header or a blob that is not one msgpack map is corrupt."""
    snap = _snap_from_item(value)  # the string
    assert snap is not None
    with pytest.raises(_Corrupt):
        judge(request(), snap, NOW)


def test_result_entries() -> None:
    """A @cached result entry decodes its one value; without it, it is corrupt."""
    fields = [b"%d" % (NOW + 5), b"%d" % (NOW + 50), FORMAT, None, b"v", _codec.encode([1, 2])]
    snap = _snap_from_result(fields)
    assert snap is not None
    assert judge(request(item=False), snap, NOW) == (FRESH, [1, 2])
    broken = _snap_from_result([*fields[:5], None])
    assert broken is not None
    with pytest.raises(_Corrupt):
        judge(request(item=False), broken, NOW)


def test_stamp_entry_writes_deadlines_and_returns_the_lifetime() -> None:
    """A partial entry gets soft/hard deadlines from the policy, a version and the load time."""
    fields: dict[bytes, bytes] = {}
    life = stamp_entry(fields, Policy(soft_ttl=10, hard_ttl=100), False, NOW, 12.4)
    assert life == 100_000
    assert fields[M_SOFT] == b"%d" % (NOW + 10_000) and fields[M_HARD] == b"%d" % (NOW + 100_000)
    assert fields[M_FORMAT] == FORMAT and len(fields[M_VERSION]) == 12
    negative = encode_fields(True, None, None, False, None)
    assert (
        stamp_entry(negative, Policy(soft_ttl=10, hard_ttl=100, negative_ttl=3), True, NOW, None)
        == 3000
    )
    assert negative[M_ENTRY].startswith(b"%s|%d|%d|" % (FORMAT, NOW + 3000, NOW + 3000))
