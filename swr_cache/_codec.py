"""msgpack codec for cached values. Never pickle: a poisoned cache must not be
able to run code, so decoding only ever builds plain data.

Values are what boto3's ``TypeDeserializer`` yields for DynamoDB attributes
(str, Decimal, bytes, bool, None, set, list, dict) and general cache results.
Plain msgpack types are used where they are exact; the rest are msgpack
extension types, all registered here:

====  ==================  ==================================================
code  Python type         payload
====  ==================  ==================================================
1     ``Decimal``         ``str(d)`` in ASCII - exact, ``Decimal("1.10")``
                          stays ``Decimal("1.10")``; NaN/Infinity allowed
2     ``set``/frozenset   a msgpack array of the elements (str, bytes, int,
                          float, Decimal, Binary), sorted when comparable
3     ``datetime``        ``isoformat()``: microseconds, naive or aware with
                          its UTC offset (a named zone becomes a fixed offset)
4     ``date``            ``isoformat()``
5     ``UUID``            the 16 bytes
6     int beyond 64 bits  big-endian two's complement
7     boto3 ``Binary``    the bytes (what ``TypeDeserializer`` yields for B
                          and BS; boto3 is imported only to decode one)
8     ``datetime`` with   ``<naive isoformat>|<offset in microseconds>``
      sub-second offset   (Python 3.11's fromisoformat misreads ``+00:00:00.000001``)
9     any (compressed)    zlib of an :func:`encode` result, written by
                          :func:`compress` above a size threshold; inflated
                          to at most ``MAX_INFLATED`` bytes, never nested
====  ==================  ==================================================

Lossy by design, as in JSON:

* ``tuple`` is a msgpack array and decodes to ``list``;
* ``frozenset`` decodes to ``set``; ``bytearray`` and ``memoryview`` decode to
  ``bytes``;
* subclasses of str/int/float/dict/list (``StrEnum``, ``IntEnum``,
  ``OrderedDict``...) decode to the base type.

Dict keys must come back hashable, so tuple and frozenset keys are refused when
encoding rather than failing on every later read. A msgpack timestamp
(ext -1, written by other msgpack clients) decodes to an aware UTC datetime.

There is no per-value format byte: the format version (``FORMAT_VERSION``) is
kept in each entry's metadata, and an entry of another version is a miss.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import uuid
import zlib
from collections.abc import Iterable
from typing import Any, Final

import msgpack

from swr_cache._errors import CodecError

__all__ = ["FORMAT_VERSION", "MAX_INFLATED", "compress", "decode", "encode"]

FORMAT_VERSION: Final[int] = 3
"""Version of the entry and value format; bump when either changes incompatibly.

2: a whole item is one msgpack map in one hash field (see ``_store``); 1: a field per attribute.
"""

_EXT_DECIMAL: Final = 1
_EXT_SET: Final = 2
_EXT_DATETIME: Final = 3
_EXT_DATE: Final = 4
_EXT_UUID: Final = 5
_EXT_BIGINT: Final = 6
_EXT_BINARY: Final = 7
_EXT_DATETIME_SUBSECOND_OFFSET: Final = 8
_EXT_ZLIB: Final = 9

#: The most a compressed value may inflate to (bytes).
MAX_INFLATED: Final = 64 << 20

_ExtType = msgpack.ExtType
_Decimal = decimal.Decimal
_datetime = _dt.datetime
_date = _dt.date
_UUID = uuid.UUID
_fromisoformat_datetime = _dt.datetime.fromisoformat
_fromisoformat_date = _dt.date.fromisoformat
_isoformat_datetime = _dt.datetime.isoformat
_isoformat_date = _dt.date.isoformat
_int_from_bytes = int.from_bytes
_ONE_MICROSECOND: Final = _dt.timedelta(microseconds=1)

# The Decimal constructor never rounds; its context only decides what a
# malformed string gives. An explicit trapping context makes that an error
# whatever the calling thread's context says (a non-trapping one would
# silently give NaN).
_DECIMAL_CONTEXT: Final = decimal.Context(traps=[decimal.InvalidOperation])

# Set elements: hashable, and decoded back to an equal hashable value.
_SET_ELEMENT_TYPES: Final = (str, bytes, int, float, _Decimal)
# Keys that would decode to an unhashable list or set.
_UNHASHABLE_AFTER_DECODE: Final = (tuple, frozenset)
_STR_ONLY: Final = frozenset({str})
# Exact types that hold no dict; anything else is looked into.
_LEAF_TYPES: Final = frozenset(
    {str, bytes, int, float, bool, type(None), _Decimal, _datetime, _date, _UUID, set, frozenset}
)


def _type_name(value: object) -> str:
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_boto3_binary(value: object) -> bool:
    # By name: the codec must not import boto3 (an optional dependency).
    cls = type(value)
    return cls.__name__ == "Binary" and cls.__module__ == "boto3.dynamodb.types"


_binary_class: Any = None


def _boto3_binary(data: bytes) -> Any:
    global _binary_class
    if _binary_class is None:
        # Only reached for values that were boto3 Binary when stored.
        from boto3.dynamodb.types import Binary

        _binary_class = Binary
    return _binary_class(data)


def _default(value: object) -> Any:
    """msgpack ``default``: called only for types msgpack cannot pack itself."""
    if isinstance(value, _Decimal):
        return _ExtType(_EXT_DECIMAL, str(value).encode("ascii"))
    if isinstance(value, (set, frozenset)):
        for element in value:
            if not isinstance(element, _SET_ELEMENT_TYPES) and not _is_boto3_binary(element):
                raise CodecError(
                    f"cannot encode a set element of type {_type_name(element)} "
                    "(sets may hold str, bytes, int, float, Decimal or boto3 Binary)"
                )
        try:
            # Sorted so equal sets encode to equal bytes; mixed kinds
            # (str with bytes) are not comparable and keep set order.
            elements: list[object] = sorted(value)
        except (TypeError, ArithmeticError):  # decimal NaN comparisons may trap
            elements = list(value)
        return _ExtType(_EXT_SET, msgpack.packb(elements, default=_default, use_bin_type=True))
    if isinstance(value, _datetime):  # before date: datetime is a date
        offset = value.utcoffset()
        if offset is not None and offset.microseconds:
            naive = _isoformat_datetime(value.replace(tzinfo=None))
            text = f"{naive}|{offset // _ONE_MICROSECOND}"
            return _ExtType(_EXT_DATETIME_SUBSECOND_OFFSET, text.encode("ascii"))
        # The base-class method: a subclass's isoformat() may not parse back.
        return _ExtType(_EXT_DATETIME, _isoformat_datetime(value).encode("ascii"))
    if isinstance(value, _date):
        return _ExtType(_EXT_DATE, _isoformat_date(value).encode("ascii"))
    if isinstance(value, _UUID):
        return _ExtType(_EXT_UUID, value.bytes)
    if isinstance(value, int):  # msgpack calls default on 64-bit overflow
        n = int(value)
        return _ExtType(_EXT_BIGINT, n.to_bytes((n.bit_length() + 8) // 8, "big", signed=True))
    if _is_boto3_binary(value):
        return _ExtType(_EXT_BINARY, bytes(value.value))  # type: ignore[attr-defined]
    raise CodecError(f"cannot encode a value of type {_type_name(value)}")


def _bigint(data: bytes) -> int:
    if not data:
        raise CodecError("empty integer payload")
    return _int_from_bytes(data, "big", signed=True)


def _ext_hook_scalar(code: int, data: bytes) -> Any:
    """Extension types allowed inside a set: scalars only, so a crafted payload
    cannot nest sets (each level would recurse through msgpack's C stack)."""
    if code == _EXT_DECIMAL:
        return _Decimal(data.decode("ascii"), _DECIMAL_CONTEXT)
    if code == _EXT_BIGINT:
        return _bigint(data)
    if code == _EXT_BINARY:
        return _boto3_binary(data)
    raise CodecError(f"extension type {code} is not allowed in a set")


def _ext_hook(code: int, data: bytes) -> Any:
    # Ordered by frequency: DynamoDB numbers are all Decimals.
    if code == _EXT_DECIMAL:
        return _Decimal(data.decode("ascii"), _DECIMAL_CONTEXT)
    if code == _EXT_SET:
        elements = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook_scalar)
        if type(elements) is not list:
            raise CodecError("set payload is not an array")
        return set(elements)
    if code == _EXT_DATETIME:
        return _fromisoformat_datetime(data.decode("ascii"))
    if code == _EXT_DATE:
        return _fromisoformat_date(data.decode("ascii"))
    if code == _EXT_UUID:
        return _UUID(bytes=data)
    if code == _EXT_BIGINT:
        return _bigint(data)
    if code == _EXT_BINARY:
        return _boto3_binary(data)
    if code == _EXT_DATETIME_SUBSECOND_OFFSET:
        naive, _, offset = data.decode("ascii").partition("|")
        tz = _dt.timezone(_dt.timedelta(microseconds=int(offset)))
        return _fromisoformat_datetime(naive).replace(tzinfo=tz)
    if code == _EXT_ZLIB:
        return _inflate(data)
    raise CodecError(f"unknown extension type {code}")


def _inflate(data: bytes) -> Any:
    """A compressed value: inflate at most ``MAX_INFLATED`` bytes (no zip bombs), then decode."""
    inflater = zlib.decompressobj()
    packed = inflater.decompress(data, MAX_INFLATED)
    if inflater.unconsumed_tail or not inflater.eof:
        raise CodecError("compressed value is truncated or inflates beyond the size limit")
    inner = msgpack.unpackb(
        packed, raw=False, strict_map_key=False, timestamp=3, ext_hook=_ext_hook_plain
    )
    return inner


def _ext_hook_plain(code: int, data: bytes) -> Any:
    # Inside a compressed value: every type but another compressed layer.
    if code == _EXT_ZLIB:
        raise CodecError("nested compression is not allowed")
    return _ext_hook(code, data)


def compress(packed: bytes, level: int = 6) -> bytes:
    """Wrap an :func:`encode` result as a zlib-compressed value when that is smaller.

    :func:`decode` inflates it transparently (to at most ``MAX_INFLATED`` bytes).
    """
    wrapped: bytes = msgpack.packb(
        _ExtType(_EXT_ZLIB, zlib.compress(packed, level)), use_bin_type=True
    )
    return wrapped if len(wrapped) < len(packed) else packed


def _check_keys(value: object) -> None:
    """Refuse dict keys that msgpack would decode to an unhashable list/set.

    Iterative so a deep (but msgpack-legal) value cannot hit the recursion
    limit. The type sets are built in C, so a container of scalars (the common
    case) is checked without a Python-level loop.
    """
    stack = [value]
    pop = stack.pop
    push = stack.append
    while stack:
        obj = pop()
        if isinstance(obj, dict):
            if not _STR_ONLY.issuperset(map(type, obj)):
                for key in obj:
                    if isinstance(key, _UNHASHABLE_AFTER_DECODE):
                        raise CodecError(
                            f"cannot encode a dict key of type {_type_name(key)} "
                            "(it would decode to an unhashable value)"
                        )
            items: Iterable[object] = obj.values()
        else:  # a list or tuple
            items = obj  # type: ignore[assignment]
        if not _LEAF_TYPES.issuperset(map(type, items)):
            for item in items:
                if isinstance(item, (dict, list, tuple)):
                    push(item)


def encode(value: object) -> bytes:
    """Encode a value to msgpack bytes.

    Args:
        value: A DynamoDB attribute value as plain Python, or any cache result
            built from the supported types (see the module docstring).

    Returns:
        The msgpack encoding.

    Raises:
        CodecError: The value holds a type that cannot be encoded (the message
            names it), a set element or dict key that would not round-trip,
            or is nested too deeply.
    """
    try:
        data: bytes = msgpack.packb(value, default=_default, use_bin_type=True)
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises TypeError/ValueError/OverflowError
        raise CodecError(
            f"cannot encode a value of type {_type_name(value)}: {str(exc)[:200]}"
        ) from exc
    if isinstance(value, (dict, list, tuple)):
        _check_keys(value)
    return data


def decode(data: bytes | memoryview) -> Any:
    """Decode bytes produced by :func:`encode`.

    Args:
        data: One complete msgpack value.

    Returns:
        The decoded value (see the module docstring for what comes back as
        which type).

    Raises:
        CodecError: The bytes are not one well-formed value of this format:
            garbage, truncated, trailing bytes, an unknown extension type or
            a malformed extension payload. Never any other exception type.
    """
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=False, timestamp=3, ext_hook=_ext_hook
        )
    except CodecError:
        raise
    except Exception as exc:
        # Not repr(exc): msgpack's ExtraData carries the whole decoded value.
        raise CodecError(
            f"cannot decode cached value: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
