"""Entries without I/O: snapshots of what Redis returned, and the verdict on them.

A read gives a snapshot (``_Snap``) of one entry: its metadata (soft and hard
deadlines in Redis server time, format, whole-item and not-found marks, known
absent attributes, version, load time) and its raw data. ``judge`` decides
what a snapshot gives one request: an answer and its state, a plan for what
to load, or nothing (past its hard deadline). ``stamp_entry`` writes the
metadata of a new entry. Nothing here talks to Redis, so all of it is
unit-tested from tables of snapshots.

Format 3 (``FORMAT``; the layout is drawn in ``_store``): a whole item is a
Redis string, ``3|soft|hard|version|delta|kind|item version|`` and then the
item as one msgpack map. Reading it is one GET (one bulk reply), one
``bytes.split`` for the header and one msgpack call for every attribute; a
projection of a whole entry is picked from the same decoded map. A partial
entry (a projection) keeps a field per attribute in a hash, with its
metadata in fields of their own, so merges can add to it. ``_snap_from_item``
takes any item read's reply: the string (bytes), no key (``None``), or a
hash's HMGET (a list) or HGETALL (a dict). A hash holding ``\\xffe`` (a whole
entry of format 2) or an entry whose format is not 3 (format 1's field per
attribute) is corrupt to this version: a counted miss (``decode_errors``),
reloaded and overwritten. Format 2 kept the same header and blob in that one
hash field, which Redis stores as a hashtable (1.12x the blob's memory by
default; the string costs 1.00x).
"""

from __future__ import annotations

import datetime
import math
import os
import random
import uuid
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any, Final

from . import _codec
from ._errors import CodecError, ConfigError
from ._policy import Policy
from ._store import (
    M_ABSENT,
    M_DELTA,
    M_ENTRY,
    M_FORMAT,
    M_HARD,
    M_NONE,
    M_RESULT,
    M_SOFT,
    M_VERSION,
    M_WHOLE,
)

_ONE: Final = b"1"
# Value types no caller can change in place (a near copy may share them).
_IMMUTABLE: Final = frozenset(
    {
        str,
        int,
        float,
        bool,
        type(None),
        bytes,
        Decimal,
        datetime.datetime,
        datetime.date,
        uuid.UUID,
    }
)
_WHOLE: Final = b"w"  # entry kinds in the \xffe header
_NEGATIVE: Final = b"n"

__all__ = [
    "due_early",
    "encode_fields",
    "expand",
    "fresh_items",
    "held_value",
    "judge",
    "normalize_attributes",
    "stamp_entry",
    "with_version",
]

FORMAT: Final = str(_codec.FORMAT_VERSION).encode()
FRESH: Final = "fresh"
STALE: Final = "stale"


class _Corrupt(Exception):
    """An entry that cannot be read: counted as a miss and overwritten."""


class _Snap:
    """The metadata of one read entry and its raw attribute fields."""

    __slots__ = (
        "absent",
        "blob",
        "copies",
        "data",
        "delta",
        "format",
        "hard",
        "hard_ms",
        "held",
        "kept",
        "none",
        "soft",
        "soft_ms",
        "version",
        "whole",
    )

    def __init__(self) -> None:
        # Concurrent readers of one entry share one snapshot (each decodes
        # its own values); the deadlines are parsed once for all of them.
        self.blob: bytes | None = None  # a whole entry's msgpack map
        self.soft_ms: float | None = None
        self.hard_ms: float | None = None
        self.soft: bytes | None = None
        self.hard: bytes | None = None
        self.format: bytes | None = None
        self.whole: bytes | None = None  # the kind of a whole entry (w, n)
        self.absent: bytes | None = None
        self.none: bytes | None = None
        self.version: bytes | None = None
        self.delta: bytes | None = None
        # A partial entry's attribute fields. HGETALL: name (bytes) -> raw;
        # HMGET: raw values in request order. A result: its raw value.
        self.data: Any = None
        # Held by a near cache (served many times): a whole item is decoded
        # once and kept; each caller gets its own copy: a new dict, and a new
        # container for each mutable value (``copies``: name -> copier; see
        # _decode_whole).
        self.held = False
        self.kept: dict[str, Any] | None = None
        self.copies: tuple[tuple[str, Callable[[Any], Any]], ...] = ()


def _snap_from_entry(entry: bytes) -> _Snap:
    """A whole (or not-found) entry: split the string's header from the blob.

    A header that does not split into its parts leaves the deadlines unset,
    which ``judge`` reports as corrupt.
    """
    snap = _Snap()
    parts = entry.split(b"|", 7)
    if len(parts) == 8:
        snap.format, snap.soft, snap.hard, snap.version, delta, kind, _, snap.blob = parts
        snap.whole = kind
        if kind == _NEGATIVE:
            snap.none = _ONE
        if delta:
            snap.delta = delta
    return snap


def _old_whole() -> _Snap:
    """A hash holding ``\\xffe``: a whole entry of format 2, corrupt to this version."""
    snap = _Snap()
    snap.format = b"2"
    return snap


def _snap_from_hash(raw: dict[bytes, bytes]) -> _Snap | None:
    """Split an HGETALL reply (which the caller owns) into metadata and attribute fields."""
    if not raw:
        return None
    pop = raw.pop
    if pop(M_ENTRY, None) is not None:
        return _old_whole()
    snap = _Snap()
    snap.soft = pop(M_SOFT, None)
    snap.hard = pop(M_HARD, None)
    snap.format = pop(M_FORMAT, None)
    snap.absent = pop(M_ABSENT, None)
    snap.version = pop(M_VERSION, None)
    snap.delta = pop(M_DELTA, None)
    snap.data = raw
    return snap


def _snap_from_list(raw: list[bytes | None]) -> _Snap | None:
    """Split an HMGET reply of ``WHOLE_FIELDS`` or of ``ALL_META + attributes`` from a hash.

    A partial entry answers with its format, and for a projection read its
    metadata and attribute fields. A whole read of a partial entry has no
    deadlines: judged as a plan to load the whole item. A ``\\xffe`` field
    is a format-2 whole entry: corrupt (whole entries are strings now).
    """
    if raw[0] is not None:
        return _old_whole()
    if raw[1] is None:
        return None
    snap = _Snap()
    snap.format = raw[1]
    if len(raw) > 2:
        snap.soft, snap.hard, snap.absent, snap.version, snap.delta = raw[2:7]
        snap.data = raw[7:]
    return snap


def _snap_from_item(raw: Any) -> _Snap | None:
    """An item read's snapshot (``_store.Store.read_entry``): the string, no key, or a hash's fields.

    A string (bytes) is a whole entry; ``None`` no entry; a list an HMGET of
    a hash (a partial entry, or a format-2 one); a dict a signed projection's
    HGETALL of a hash.
    """
    if type(raw) is bytes:
        return _snap_from_entry(raw)
    if raw is None:
        return None
    if type(raw) is dict:
        return _snap_from_hash(raw)
    return _snap_from_list(raw)


def _snap_from_result(raw: list[bytes | None]) -> _Snap | None:
    if raw[0] is None:
        return None
    snap = _Snap()
    snap.soft, snap.hard, snap.format, snap.delta, snap.version, snap.data = raw
    return snap


def _decode_whole(snap: _Snap) -> dict[str, Any]:
    """Decode a whole entry's blob: every attribute in one msgpack call.

    Concurrent readers share the snapshot and each decodes objects of its
    own. Anything but a map with text keys means corrupt data. A snapshot
    held by a near cache is decoded once: each caller then gets a copy that
    shares only immutable objects (a set, list or map value is copied).
    """
    kept = snap.kept
    if kept is not None:
        out = dict(kept)
        for name, copy in snap.copies:
            out[name] = copy(out[name])
        return out
    decoded = _codec.decode(snap.blob)  # type: ignore[arg-type]
    if type(decoded) is not dict:
        raise CodecError("a whole entry's blob is not a map")
    if snap.held:
        copies = _copiers(decoded)
        if copies is not None:
            snap.kept = decoded
            snap.copies = copies
            return _decode_whole(snap)
    return decoded


def fresh_items(
    replies: list[Any], now: float, beta: float
) -> tuple[list[Any], list[int], list[tuple[int, bytes]]]:
    """The items of whole entries fresh at ``now``, from whole reads' replies (GET, MGET).

    Returns each reply's item (``None`` where there is none), the indices of
    the replies that are not a fresh whole item (absent, stale, negative,
    partial, an error reply, a malformed header or blob: ``judge`` decides
    and counts those), and ``(index, entry version)`` of the fresh ones
    XFetch (``beta``) refreshes early. One loop for a whole batch: no
    snapshot is built for a fresh hit.
    """
    decode = _codec.decode
    values: list[Any] = [None] * len(replies)
    rest: list[int] = []
    early: list[tuple[int, bytes]] = []
    for i, raw in enumerate(replies):
        if type(raw) is bytes:
            parts = raw.split(b"|", 7)
            if len(parts) == 8 and parts[0] == FORMAT and parts[5] == _WHOLE:
                try:
                    soft = float(parts[1])
                    if now < soft and now < float(parts[2]):
                        value = decode(parts[7])
                        if type(value) is dict:
                            values[i] = value
                            if beta and parts[4] and due_early(beta, parts[4], soft, now):
                                early.append((i, parts[3]))
                            continue
                except (ValueError, CodecError):
                    pass
        rest.append(i)
    return values, rest, early


# XFetch draws ``gap = delta * beta * Exp(1)``: P(gap >= x) = exp(-x / (delta * beta)).
# Past this many ``delta * beta`` before the soft deadline that is below
# e**-40 (4e-18): no draw is made (the answer is "not yet" with certainty to
# that bound), which keeps a random number and a log off most hits.
_XFETCH_HORIZON: Final = 40.0


def due_early(beta: float, delta: bytes, soft: float, now: float) -> bool:
    """XFetch: whether a fresh entry is refreshed now, likelier as its soft deadline nears.

    ``delta`` is how long the entry's load took (ms, as its header holds it).
    """
    window = float(delta) * beta
    if soft - now >= window * _XFETCH_HORIZON:
        return False
    return now - window * math.log(1.0 - random.random()) >= soft


def held_value(snap: _Snap) -> dict[str, Any] | None:
    """The answer of a near copy ``NearCache.fresh`` returned: the caller's own copy, or None."""
    if snap.none is not None:
        return None
    return _decode_whole(snap)


def _copier(value: Any) -> Callable[[Any], Any] | None:
    """How to copy one decoded value so no mutable object is shared.

    ``None`` for a value of a type this does not know (a boto3 ``Binary``,
    say): such an item is decoded for every caller instead.
    """
    kind = type(value)
    if kind is set:  # set members are scalars (the codec allows no other)
        return set if all(type(v) in _IMMUTABLE for v in value) else None
    if kind is list:
        if all(type(v) in _IMMUTABLE for v in value):
            return list
    elif kind is dict:
        if all(type(v) in _IMMUTABLE for v in value.values()):
            return dict
    else:
        return None
    return _deep_copy if _copyable(value) else None


def _copyable(value: Any) -> bool:
    kind = type(value)
    if kind in _IMMUTABLE:
        return True
    if kind is set:
        return all(type(v) in _IMMUTABLE for v in value)
    if kind is list:
        return all(_copyable(v) for v in value)
    if kind is dict:
        return all(_copyable(v) for v in value.values())
    return False


def _deep_copy(value: Any) -> Any:
    """A copy of nested lists, maps and sets of scalars (``_copyable`` said so)."""
    kind = type(value)
    if kind is dict:
        return {k: _deep_copy(v) for k, v in value.items()}
    if kind is list:
        return [_deep_copy(v) for v in value]
    if kind is set:
        return set(value)
    return value


def _copiers(decoded: dict[str, Any]) -> tuple[tuple[str, Callable[[Any], Any]], ...] | None:
    """The copier of each mutable attribute, or ``None`` if one cannot be copied."""
    copies: list[tuple[str, Callable[[Any], Any]]] = []
    for name, value in decoded.items():
        if type(value) in _IMMUTABLE:
            continue
        copy = _copier(value)
        if copy is None:
            return None
        copies.append((name, copy))
    return tuple(copies)


def expand(raw: dict[bytes, bytes] | bytes) -> dict[bytes, bytes]:
    """A field-per-attribute view of an entry, for tools (CLI, checkers).

    ``raw`` is a string entry (bytes, GET; without its signature) or a hash's
    HGETALL reply. A whole entry (a string) becomes its header as metadata
    fields (``M_WHOLE`` or ``M_NONE`` marks what it holds) and one field per
    attribute, each msgpack on its own. A partial entry, a result or an
    unreadable header is returned as it is (a string as ``M_ENTRY``). Raises
    ``CodecError`` for a blob that is not a map.
    """
    if type(raw) is not bytes:
        return dict(raw)  # type: ignore[arg-type]
    snap = _snap_from_entry(raw)
    if snap.blob is None:
        return {M_ENTRY: raw}
    out: dict[bytes, bytes] = {}
    for name, field in (
        (M_FORMAT, snap.format),
        (M_SOFT, snap.soft),
        (M_HARD, snap.hard),
        (M_VERSION, snap.version),
        (M_DELTA, snap.delta),
    ):
        if field is not None:
            out[name] = field
    if snap.none is not None:
        out[M_NONE] = _ONE
    else:
        out[M_WHOLE] = _ONE
        for attr, value in _decode_whole(snap).items():
            out[str(attr).encode()] = _codec.encode(value)
    return out


class _Plan:
    """The verdict on a snapshot for a request."""

    __slots__ = ("load_attrs", "merge_version", "merged", "prior_absent", "state", "value")

    def __init__(self) -> None:
        self.state: str | None = None  # fresh / stale, or None when a load is needed
        self.value: Any = None
        self.load_attrs: tuple[str, ...] | None = None  # what a load must fetch
        self.merge_version: bytes | None = None  # merge into this version instead of replacing
        self.merged: dict[str, Any] | None = None  # cached attributes to merge with the load
        self.prior_absent: list[str] = []  # names the entry already knows are absent


def _top_level(path: str) -> str:
    """``address.city`` and ``tags[0]`` load their top-level attribute."""
    cut = len(path)
    for ch in ".[":
        i = path.find(ch)
        if i > 0:
            cut = min(cut, i)
    return path[:cut]


def with_version(attrs: tuple[str, ...] | None, version_attr: str | None) -> tuple[str, ...] | None:
    """A projection to load, widened by the item's version attribute (when there is one)."""
    if attrs is None or version_attr is None or version_attr in attrs:
        return attrs
    return tuple(sorted((*attrs, version_attr)))


def normalize_attributes(attributes: Iterable[str] | None) -> tuple[str, ...] | None:
    """Attribute projection as sorted, unique top-level names (``None`` = whole item)."""
    if attributes is None:
        return None
    if isinstance(attributes, str):
        raise TypeError("attributes must be a list of attribute names, not a string")
    names = sorted({_top_level(a) for a in attributes})
    for name in names:
        if not name:
            raise ConfigError("attribute names must be non-empty")
    return tuple(names)


def stamp_entry(
    fields: dict[bytes, bytes], policy: Policy, negative: bool, now: float, delta_ms: float | None
) -> int:
    """Add a new entry's metadata to ``fields``; returns its lifetime (PEXPIRE) in ms.

    Deadlines are server time ``now`` plus the policy's TTLs (a negative entry
    lives ``negative_ttl``; jitter shortens the soft TTL), a new random version,
    the format, and the load time XFetch scales by (when known). A whole item
    gets them as the header of its ``\\xffe`` field; a partial entry and a
    result as fields of their own.
    """
    if negative:
        soft_ms = expire_ms = policy.negative_ms
    else:
        soft_ms, expire_ms = policy.soft_ms, policy.hard_ms
        if policy.jitter:
            soft_ms = max(1, round(soft_ms * (1.0 - policy.jitter * random.random())))
    soft = b"%d" % (now + soft_ms)
    hard = b"%d" % (now + expire_ms)
    version = os.urandom(6).hex().encode()
    delta = b"" if delta_ms is None else b"%d" % max(1, round(delta_ms))
    body = fields.get(M_ENTRY)
    if body is not None:
        fields[M_ENTRY] = b"|".join((FORMAT, soft, hard, version, delta, body))
        return expire_ms
    fields[M_SOFT] = soft
    fields[M_HARD] = hard
    fields[M_FORMAT] = FORMAT
    fields[M_VERSION] = version
    if delta:
        fields[M_DELTA] = delta
    return expire_ms


def _version_digits(value: Mapping[str, Any], version_attr: str | None) -> bytes:
    """The item's version attribute as canonical digits (a non-negative integer), else empty."""
    if version_attr is None:
        return b""
    v = value.get(version_attr)
    if type(v) is int:
        return b"%d" % v if v >= 0 else b""
    if isinstance(v, Decimal) and v.is_finite() and v >= 0 and v == v.to_integral_value():
        return b"%d" % int(v)
    return b""


def encode_fields(
    is_item: bool,
    attrs: tuple[str, ...] | None,
    value: Any,
    merging: bool,
    compress_threshold: int | None,
    version_attr: str | None = None,
) -> dict[bytes, bytes]:
    """The data fields of an entry holding ``value`` (``attrs`` of it, or all).

    A result is one field. A whole item is one field: its kind, its
    ``version_attr`` as digits and its attributes as one msgpack map (the
    deadlines go in front in ``stamp_entry``); an absent item is a whole
    entry of the negative kind. A projection is a field per attribute, plus
    the names asked for and found absent. Values (a whole item's blob) longer
    than ``compress_threshold`` bytes are stored compressed when that is
    smaller. Raises ``CodecError``.
    """
    encode: Any = _codec.encode
    if compress_threshold is not None:
        threshold = compress_threshold

        def encode(v: Any) -> bytes:
            packed = _codec.encode(v)
            return _codec.compress(packed) if len(packed) > threshold else packed

    fields: dict[bytes, bytes] = {}
    if not is_item:
        fields[M_RESULT] = encode(value)
        return fields
    if value is None:
        fields[M_ENTRY] = b"n||"
        return fields
    if attrs is None:
        items = value if type(value) is dict else dict(value)
        digits = _version_digits(items, version_attr)
        fields[M_ENTRY] = b"w|" + digits + b"|" + encode(items)
        return fields
    for name, attr in value.items():
        if name not in attrs:
            continue  # the origin returned more than asked: keep the projection exact
        fields[name.encode()] = encode(attr)
    absent = [a for a in attrs if a not in value]
    if absent or merging:
        fields[M_ABSENT] = encode(absent)
    return fields


def judge(req: Any, snap: _Snap, now: float) -> tuple[str, Any] | _Plan | None:
    """Decide what a snapshot gives this request.

    Returns ``(state, value)`` when it answers the request, a ``_Plan``
    saying what to load when it holds only part of it, and ``None`` when
    it is unusable (past its hard deadline). Raises ``_Corrupt`` for
    undecodable data or another format version.
    """
    if snap.format != FORMAT:
        raise _Corrupt
    hard = snap.hard_ms
    soft = snap.soft_ms
    if hard is None or soft is None:
        if snap.hard is None and snap.whole is None and snap.data is None:
            # A partial entry read for a whole item (only its format came
            # back): it cannot answer, so load the whole item.
            return _Plan()
        try:
            hard = snap.hard_ms = float(snap.hard)  # type: ignore[arg-type]
            soft = snap.soft_ms = float(snap.soft)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise _Corrupt from None
    if now >= hard:
        return None
    state = FRESH if now < soft else STALE
    try:
        if not req.is_item:
            if snap.data is None:
                raise _Corrupt
            return state, _codec.decode(snap.data)
        whole = snap.whole
        if whole is None:
            return _judge_partial(req, snap, state)
        if whole == _NEGATIVE:
            return state, None
        if whole != _WHOLE:
            raise _Corrupt
        value = _decode_whole(snap)
        attrs = req.attrs
        if attrs is None:
            return state, value
        return state, {a: value[a] for a in attrs if a in value}
    except (CodecError, AttributeError, TypeError, UnicodeDecodeError):
        raise _Corrupt from None


def _judge_partial(req: Any, snap: _Snap, state: str) -> tuple[str, Any] | _Plan:
    """A partial entry (a field per attribute): its answer, or what to load."""
    attrs = req.attrs
    if attrs is None:
        # A partial entry cannot answer a whole read: load the whole item.
        return _Plan()
    decode = _codec.decode
    out: dict[str, Any] = {}
    missing: list[str] = []
    absent: list[str] | None = None
    data = snap.data
    if type(data) is dict:  # a signed entry, read whole for a projection
        data = [data.get(a.encode()) for a in attrs]
    for name, raw in zip(attrs, data, strict=True):
        if raw is not None:
            out[name] = decode(raw)
        else:
            if absent is None:
                absent = decode(snap.absent) if snap.absent is not None else []
            if name not in absent:
                missing.append(name)
    if not missing:
        return state, out
    plan = _Plan()
    if (
        state == FRESH
        and snap.version is not None
        and req.version_attr is not None
        and req.engine.signer is None
    ):
        # A merge joins cached attributes to newly loaded ones: only the
        # item's version attribute, compared by the merge script, proves
        # they are of one version. Without it the entry is replaced from
        # one load of the union (an answer never mixes two versions).
        # (A merge would leave the signature covering only the old fields.)
        plan.load_attrs = tuple(missing)
        plan.merge_version = snap.version
        plan.merged = out
        plan.prior_absent = list(absent or ())
    else:
        plan.load_attrs = attrs  # widened to the cached names by the loader
    return plan
