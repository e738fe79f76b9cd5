"""Entries without I/O: snapshots of what Redis returned, and the verdict on them.

A read gives a snapshot (``_Snap``) of one entry: its metadata (soft and hard
deadlines in Redis server time, format, whole-item and not-found marks, known
absent attributes, version, load time) and its raw fields. ``judge`` decides
what a snapshot gives one request: an answer and its state, a plan for what
to load, or nothing (past its hard deadline). ``stamp_entry`` writes the
metadata of a new whole entry. Nothing here talks to Redis, so all of it is
unit-tested from tables of snapshots.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from typing import Any, Final

from . import _codec
from ._errors import CodecError, ConfigError
from ._policy import Policy
from ._store import (
    M_ABSENT,
    M_DELTA,
    M_FORMAT,
    M_HARD,
    M_NONE,
    M_RESULT,
    M_SOFT,
    M_VERSION,
    M_WHOLE,
)

_ONE: Final = b"1"

__all__ = [
    "encode_fields",
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
        "data",
        "delta",
        "format",
        "hard",
        "hard_ms",
        "names",
        "none",
        "soft",
        "soft_ms",
        "version",
        "whole",
    )

    def __init__(self) -> None:
        # Concurrent readers of one entry share one snapshot: what is derived
        # from it once (names, the joined blob) is cached here for all of them.
        self.blob: bytes | None = None
        self.names: list[str] | None = None
        self.soft_ms: float | None = None
        self.hard_ms: float | None = None
        self.soft: bytes | None = None
        self.hard: bytes | None = None
        self.format: bytes | None = None
        self.whole: bytes | None = None
        self.absent: bytes | None = None
        self.none: bytes | None = None
        self.version: bytes | None = None
        self.delta: bytes | None = None
        # HGETALL: attribute name (bytes) -> raw; HMGET: raw values in request order.
        self.data: Any = None


def _snap_from_hash(raw: dict[bytes, bytes]) -> _Snap | None:
    """Split an HGETALL reply (which the caller owns) into metadata and attribute fields."""
    if not raw:
        return None
    snap = _Snap()
    pop = raw.pop
    snap.soft = pop(M_SOFT, None)
    snap.hard = pop(M_HARD, None)
    snap.format = pop(M_FORMAT, None)
    snap.whole = pop(M_WHOLE, None)
    snap.absent = pop(M_ABSENT, None)
    snap.none = pop(M_NONE, None)
    snap.version = pop(M_VERSION, None)
    snap.delta = pop(M_DELTA, None)
    snap.data = raw
    return snap


def _snap_from_list(raw: list[bytes | None]) -> _Snap | None:
    """Split an HMGET reply of ``ALL_META + attributes`` (or result fields)."""
    if raw[0] is None:
        return None
    snap = _Snap()
    (
        snap.soft,
        snap.hard,
        snap.format,
        snap.whole,
        snap.absent,
        snap.none,
        snap.version,
        snap.delta,
    ) = raw[:8]
    snap.data = raw[8:]
    return snap


def _snap_from_result(raw: list[bytes | None]) -> _Snap | None:
    if raw[0] is None:
        return None
    snap = _Snap()
    snap.soft, snap.hard, snap.format, snap.delta, snap.version, snap.data = raw
    return snap


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _decode_whole(snap: _Snap) -> dict[str, Any]:
    """Decode the attribute fields of a whole entry with one msgpack call.

    Each field holds one complete msgpack value, so an array header followed
    by the fields' bytes is one msgpack array: one C call instead of one
    Python call per attribute. The names and the joined bytes are built once
    per snapshot and shared by every concurrent reader of it; each reader
    still gets objects of its own. A count that does not match (a field that
    is empty, truncated or holds two values) means corrupt data.
    """
    blob = snap.blob
    names = snap.names
    if blob is None or names is None:
        data: dict[bytes, bytes] = snap.data
        names = snap.names = list(map(bytes.decode, data))
        blob = snap.blob = _array_header(len(names)) + b"".join(data.values())
    decoded = _codec.decode(blob)
    if type(decoded) is not list or len(decoded) != len(names):
        raise CodecError("attribute fields do not decode one value each")
    return dict(zip(names, decoded, strict=True))


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
    """Add a whole entry's metadata to ``fields``; returns its lifetime (PEXPIRE) in ms.

    Deadlines are server time ``now`` plus the policy's TTLs (a negative entry
    lives ``negative_ttl``; jitter shortens the soft TTL), a new random version,
    the format, and the load time XFetch scales by (when known).
    """
    if negative:
        soft_ms = expire_ms = policy.negative_ms
    else:
        soft_ms, expire_ms = policy.soft_ms, policy.hard_ms
        if policy.jitter:
            soft_ms = max(1, round(soft_ms * (1.0 - policy.jitter * random.random())))
    fields[M_SOFT] = b"%d" % (now + soft_ms)
    fields[M_HARD] = b"%d" % (now + expire_ms)
    fields[M_FORMAT] = FORMAT
    fields[M_VERSION] = os.urandom(6).hex().encode()
    if delta_ms is not None:
        fields[M_DELTA] = b"%d" % max(1, round(delta_ms))
    return expire_ms


def encode_fields(
    is_item: bool,
    attrs: tuple[str, ...] | None,
    value: Any,
    merging: bool,
    compress_threshold: int | None,
) -> dict[bytes, bytes]:
    """The data fields of an entry holding ``value`` (``attrs`` of it, or all).

    A result is one field; an item is a field per attribute, plus the
    whole-item mark, or the names asked for and found absent; an absent item
    is the negative mark. Values longer than ``compress_threshold`` bytes are
    stored compressed when that is smaller. Raises ``CodecError``.
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
        fields[M_NONE] = _ONE
        return fields
    for name, attr in value.items():
        if attrs is not None and name not in attrs:
            continue  # the origin returned more than asked: keep the projection exact
        fields[name.encode()] = encode(attr)
    if attrs is None:
        fields[M_WHOLE] = _ONE
    else:
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
    hard = snap.hard_ms
    soft = snap.soft_ms
    if hard is None or soft is None:
        try:
            hard = snap.hard_ms = float(snap.hard)  # type: ignore[arg-type]
            soft = snap.soft_ms = float(snap.soft)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise _Corrupt from None
    if now >= hard:
        return None
    if snap.format != FORMAT:
        raise _Corrupt
    state = FRESH if now < soft else STALE
    try:
        if not req.is_item:
            if snap.data is None:
                raise _Corrupt
            return state, _codec.decode(snap.data)
        if snap.none is not None:
            return state, None
        attrs = req.attrs
        if attrs is None:
            if snap.whole is not None:
                return state, _decode_whole(snap)
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
            elif snap.whole is None:
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
    except CodecError:
        raise _Corrupt from None
    except (AttributeError, TypeError, UnicodeDecodeError):
        raise _Corrupt from None
