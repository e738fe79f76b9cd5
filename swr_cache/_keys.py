"""Redis key layout: readable, injective, namespaced and cluster hash-tagged.

Every key is ``<namespace>:<kind>:{<identity>}``. The pieces are escaped with
:func:`escape` (``%XX`` of the UTF-8 bytes for ``% { } : | = ,``, control
characters and whitespace), so:

* the namespace holds no ``:``; the first ``:`` ends it, and two namespaces
  never share a key (``"a:b"`` is ``a%3Ab``);
* an identity holds no braces, so the whole identity is the Redis Cluster hash
  tag: the entry, lease, fence and sequence keys of one item share one slot,
  as do the generation and member keys of one tag;
* no two inputs give the same key, whatever characters they hold.

Identities:

* an item: ``<table>|<name>=<T>:<value>,...`` with the key attributes sorted by
  name, ``T`` the DynamoDB type (``S``, ``N``, ``B``) and numbers normalised
  (``N 10``, ``10.0`` and ``Decimal("1E+1")`` are one item; ``S "10"`` another);
* an ``@cached`` result: ``r|<name>|<rendered arguments>``.

Kinds: ``e`` entry (hash), ``l`` lease, ``f`` fence, ``q`` stream sequence
high-water mark, ``tg`` tag generation, ``tm`` tag members, ``ck`` stream
checkpoint, ``sl`` stream shard lease.
"""

from __future__ import annotations

import base64
import binascii
import decimal
import enum
import itertools
import math
import re
import string
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final

from swr_cache._errors import ConfigError, KeyEncodingError

__all__ = [
    "KeySpace",
    "KeyTemplate",
    "encode_args",
    "escape",
    "from_typed",
    "item_identity",
    "item_tag",
    "normalize_number",
    "result_identity",
    "typed_key_part",
]

# --------------------------------------------------------------------------
# Escaping

# Always escaped: the separators of this module, braces (hash tags), `%`
# itself (so the escaping is injective), ASCII and C1 control characters,
# whitespace (ASCII and Unicode) and lone surrogates (which have no UTF-8
# encoding; they are escaped as their surrogatepass bytes).
_ALWAYS_CLASS: Final = r"%{}:|=,\x00-\x20\x7f-\x9f\s\ud800-\udfff"


def _escape_char(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))


_ESCAPED_ASCII: Final[dict[str, str]] = {chr(c): _escape_char(chr(c)) for c in range(128)}


def _replace(match: re.Match[str]) -> str:
    ch = match.group()
    return _ESCAPED_ASCII.get(ch) or _escape_char(ch)


def _make_escaper(extra: str = "") -> Callable[[str], str]:
    """An escaper for the fixed set plus the characters in ``extra``."""
    pattern = re.compile(f"[{_ALWAYS_CLASS}{''.join(re.escape(c) for c in sorted(set(extra)))}]")
    search = pattern.search
    sub = pattern.sub

    def escape_(s: str) -> str:
        if search(s) is None:
            return s
        return sub(_replace, s)

    return escape_


_escape: Final = _make_escaper()


def escape(s: str) -> str:
    """Percent-escape a string for use inside a key.

    ``% { } : | = ,``, control characters, whitespace and lone surrogates
    become ``%XX`` of their UTF-8 bytes (uppercase hex); everything else,
    non-ASCII letters included, is kept so keys stay readable. ``%`` itself is
    escaped, so the mapping is injective and the result never holds a brace.

    Args:
        s: Any string.

    Returns:
        The escaped string (``s`` itself when nothing needs escaping).
    """
    return _escape(s)


# --------------------------------------------------------------------------
# Numbers and typed key values

# Unbounded precision and exponent: normalising must never round.
_EXACT: Final = decimal.Context(
    prec=decimal.MAX_PREC,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[decimal.InvalidOperation],
)
# A number whose fixed-point text would run to thousands of characters is
# not a key anyone means (Python refuses str() of such ints, DynamoDB's range
# is 1E-130..1E+126).
_MAX_ADJUSTED_EXPONENT: Final = 4300


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def normalize_number(v: int | float | Decimal | str) -> str:
    """The canonical text of a number, as DynamoDB compares numbers.

    ``10``, ``10.0``, ``Decimal("10.0")``, ``Decimal("1E+1")`` and ``"10"`` are
    all ``"10"``; ``Decimal("0.50")`` is ``"0.5"``; ``-0`` is ``"0"``; there is
    never an exponent (``1E-7`` is ``"0.0000001"``). Floats are taken by their
    shortest repr (``0.1`` is ``"0.1"``, not its binary expansion).

    Args:
        v: An int, float, Decimal, or a string holding a decimal number.

    Returns:
        The canonical decimal text.

    Raises:
        KeyEncodingError: ``v`` is a bool, NaN, infinite, not a number, or
            absurdly large or small.
    """
    if type(v) is int:
        try:
            return str(v)
        except ValueError as exc:  # beyond sys.get_int_max_str_digits()
            raise KeyEncodingError("integer too large for a key") from exc
    if isinstance(v, bool):
        raise KeyEncodingError("a bool is not a number key")
    if isinstance(v, int):  # IntEnum and other subclasses
        return normalize_number(int(v))
    if isinstance(v, float):
        if not math.isfinite(v):
            raise KeyEncodingError(f"{v!r} cannot be a number key")
        d = Decimal(float.__repr__(v))
    elif isinstance(v, Decimal):
        d = v
    elif isinstance(v, str):
        try:
            d = Decimal(v, _EXACT)
        except (decimal.InvalidOperation, ValueError) as exc:
            raise KeyEncodingError(f"{_short(v)} is not a number") from exc
    else:
        raise KeyEncodingError(f"{type(v).__qualname__} is not a number")
    if not d.is_finite():
        raise KeyEncodingError(f"{_short(v)} cannot be a number key")
    if not d:
        return "0"
    if abs(d.adjusted()) > _MAX_ADJUSTED_EXPONENT:
        raise KeyEncodingError(f"{_short(v)} is too large or too small for a key")
    return format(d.normalize(_EXACT), "f")


def typed_key_part(value: object) -> tuple[str, str]:
    """The DynamoDB type and canonical text of one key attribute value.

    Args:
        value: A str (``S``), an int/float/Decimal but not a bool (``N``,
            normalised with :func:`normalize_number`), or bytes/bytearray/
            memoryview (``B``, standard base64).

    Returns:
        ``(type, text)``, e.g. ``("S", "u1")``, ``("N", "10")``.

    Raises:
        KeyEncodingError: The value is of another type, or a NaN/infinite
            number.
    """
    if type(value) is str:
        return ("S", value)
    if isinstance(value, str):
        return ("S", str.__str__(value))
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return ("N", normalize_number(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ("B", base64.b64encode(value).decode("ascii"))
    raise KeyEncodingError(
        f"a key attribute must be str, number or bytes, not {type(value).__qualname__}"
    )


def from_typed(av: Mapping[str, Any]) -> object:
    """A DynamoDB typed key value, as in stream records and low-level API
    responses, as plain Python.

    Args:
        av: ``{"S": "x"}``, ``{"N": "10"}``, or ``{"B": b"..."}`` /
            ``{"B": "<base64>"}`` (Lambda's JSON delivers binary as base64).

    Returns:
        The str, ``Decimal`` or bytes.

    Raises:
        KeyEncodingError: ``av`` is not exactly one of those.
    """
    if not isinstance(av, Mapping) or len(av) != 1:
        raise KeyEncodingError(f"not a DynamoDB key value: {_short(av)}")
    ((kind, raw),) = av.items()
    if kind == "S" and isinstance(raw, str):
        return raw
    if kind == "N" and isinstance(raw, str):
        try:
            number = Decimal(raw)
        except (decimal.InvalidOperation, ValueError) as exc:
            raise KeyEncodingError(f"not a DynamoDB number: {_short(raw)}") from exc
        if not number.is_finite():
            raise KeyEncodingError(f"not a DynamoDB number: {_short(raw)}")
        return number
    if kind == "B":
        if isinstance(raw, (bytes, bytearray, memoryview)):
            return bytes(raw)
        if isinstance(raw, str):
            try:
                return base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise KeyEncodingError(f"not base64: {_short(raw)}") from exc
    raise KeyEncodingError(f"not a DynamoDB key value (S, N or B): {_short(av)}")


# --------------------------------------------------------------------------
# Identities


def item_identity(table: str, key: Mapping[str, object]) -> str:
    """The canonical identity of a DynamoDB item (or, with a subset of its key
    attributes, of a partition).

    The escaped table, ``|``, then ``name=T:value`` for each key attribute in
    name order, joined by ``,``: ``Users|pk=S:u1``,
    ``Orders|customer_id=S:c1,order_id=N:10``.

    Args:
        table: The table name.
        key: Attribute name to value (str, number or bytes).

    Returns:
        The identity; it never contains a brace.

    Raises:
        KeyEncodingError: Empty table or key, a non-str attribute name, or an
            unsupported value (the message names the attribute).
    """
    if not isinstance(table, str) or not table:
        raise KeyEncodingError(f"table name must be a non-empty str, not {table!r}")
    if not key:
        raise KeyEncodingError(f"empty key for table {table!r}")
    for name in key:
        if not isinstance(name, str):
            raise KeyEncodingError(f"key attribute names must be str, not {name!r}")
    parts = []
    for name in sorted(key):
        try:
            kind, text = typed_key_part(key[name])
        except KeyEncodingError as exc:
            raise KeyEncodingError(f"key attribute {name!r} of table {table!r}: {exc}") from exc
        if kind != "N":  # number text is digits, '-' and '.'
            text = _escape(text)
        parts.append(f"{_escape(name)}={kind}:{text}")
    return f"{_escape(table)}|{','.join(parts)}"


def item_tag(table: str, key: Mapping[str, object]) -> str:
    """The tag naming a DynamoDB item, or a partition of a table.

    Writes through DynamoTable, ``cache.invalidate_item`` and the stream
    invalidator purge the tag of the item's full key and of every non-empty
    subset of its key attributes, so a query result tagged with its partition
    goes away when any item of that partition changes::

        @cached(cache, key="orders:{customer_id}",
                tags=lambda customer_id: [item_tag("Orders", {"customer_id": customer_id})])
        async def list_orders(customer_id: str) -> list[dict]: ...

        item_tag("Orders", {"customer_id": "c1"})   # 'item:Orders|customer_id=S:c1'

    Args:
        table: The table name.
        key: The full primary key, or a subset of its attributes.

    Returns:
        ``"item:" + <item identity>``.

    Raises:
        KeyEncodingError: As for an item's key (empty, unsupported types).
    """
    return "item:" + item_identity(table, key)


def table_tag(table: str) -> str:
    """The tag every change to an item of ``table`` purges (see :func:`change_tags`).

    Cached scans, and queries of an index whose partition key is not a key
    attribute of the table, are stored with it: no narrower tag is known to
    change with the items they hold.

    Args:
        table: The table name.

    Returns:
        ``"table:" + <escaped table name>``.
    """
    return "table:" + escape(table)


def item_tags(table: str, key: Mapping[str, Any]) -> tuple[str, ...]:
    """``item_tag`` of an item's full key and of every non-empty subset of its attributes.

    Query results are tagged with their partition (a subset of the key), so a
    change to any item of the partition must reach them. Full key first.

    Raises:
        KeyEncodingError: As for :func:`swr_cache.item_tag`.
    """
    names = sorted(key)
    return tuple(
        item_tag(table, {n: key[n] for n in subset})
        for size in range(len(names), 0, -1)
        for subset in itertools.combinations(names, size)
    )


def change_tags(table: str, key: Mapping[str, Any]) -> tuple[str, ...]:
    """Every tag a change to one item purges: its :func:`item_tags`, then :func:`table_tag`.

    What a write through a cached view purges beside the item's entry and
    lease, and what :class:`swr_cache.StreamInvalidator` purges for a stream
    record of the item, so cached queries and scans stay true either way.

    Args:
        table: The table name.
        key: The item's full primary key.

    Returns:
        The tags, without repeats.

    Raises:
        KeyEncodingError: As for :func:`swr_cache.item_tag`.
    """
    return (*item_tags(table, key), table_tag(table))


def result_identity(name: str, rendered: str) -> str:
    """The identity of an ``@cached`` result: ``r|<escaped name>|<rendered>``.

    Item identities have exactly one ``|``, result identities at least two, so
    the two never meet.

    Args:
        name: The cached function's name (escaped here).
        rendered: The rendered arguments: the output of
            :meth:`KeyTemplate.render`, :func:`encode_args` or :func:`escape`.

    Returns:
        The identity.

    Raises:
        KeyEncodingError: ``rendered`` holds a brace (it was not escaped), which
            would break the key's hash tag.
    """
    if "{" in rendered or "}" in rendered:
        raise KeyEncodingError(
            f"rendered key {_short(rendered)} must be escaped (it holds a brace)"
        )
    return f"r|{_escape(name)}|{rendered}"


@dataclass(frozen=True, slots=True)
class KeySpace:
    """The Redis keys of one namespace; built once per ``Cache``.

    ``KeySpace("shop").entry("Users|pk=S:u1")`` is
    ``shop:e:{Users|pk=S:u1}``. Identities (from :func:`item_identity` or
    :func:`result_identity`) hold no braces, so the identity is the Redis
    Cluster hash tag and all keys of one item share a slot.

    Raises:
        ConfigError: The namespace is not a non-empty str.
    """

    namespace: str
    prefix: str = field(init=False, repr=False, compare=False)
    _entry: str = field(init=False, repr=False, compare=False)
    _lease: str = field(init=False, repr=False, compare=False)
    _fence: str = field(init=False, repr=False, compare=False)
    _backoff: str = field(init=False, repr=False, compare=False)
    _seq: str = field(init=False, repr=False, compare=False)
    _tag_gen: str = field(init=False, repr=False, compare=False)
    _tag_members: str = field(init=False, repr=False, compare=False)
    _checkpoint: str = field(init=False, repr=False, compare=False)
    _shard_lease: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ConfigError(f"namespace must be a non-empty str, not {self.namespace!r}")
        prefix = _escape(self.namespace) + ":"
        set_ = object.__setattr__
        set_(self, "prefix", prefix)
        set_(self, "_entry", prefix + "e:{")
        set_(self, "_lease", prefix + "l:{")
        set_(self, "_fence", prefix + "f:{")
        set_(self, "_backoff", prefix + "b:{")
        set_(self, "_seq", prefix + "q:{")
        set_(self, "_tag_gen", prefix + "tg:{")
        set_(self, "_tag_members", prefix + "tm:{")
        set_(self, "_checkpoint", prefix + "ck:{")
        set_(self, "_shard_lease", prefix + "sl:{")

    @property
    def entry_prefix(self) -> str:
        """What every entry key of the namespace starts with, and no other key of it."""
        return self._entry

    def entry(self, identity: str) -> str:
        """The entry hash of an identity: ``<ns>:e:{<identity>}``."""
        return self._entry + identity + "}"

    def lease(self, identity: str) -> str:
        """The fill lease of an identity: ``<ns>:l:{<identity>}``."""
        return self._lease + identity + "}"

    def fence(self, identity: str) -> str:
        """The post-invalidation fence of an identity: ``<ns>:f:{<identity>}``."""
        return self._fence + identity + "}"

    def backoff(self, identity: str) -> str:
        """The refresh back-off mark of an identity, set after a failed refresh: ``<ns>:b:{<identity>}``."""
        return self._backoff + identity + "}"

    def seq(self, identity: str) -> str:
        """The stream sequence high-water mark: ``<ns>:q:{<identity>}``."""
        return self._seq + identity + "}"

    def tag_gen(self, tag: str) -> str:
        """The generation counter of a tag: ``<ns>:tg:{<escaped tag>}``."""
        return self._tag_gen + _tag_text(tag) + "}"

    def tag_members(self, tag: str) -> str:
        """The member set of a tag: ``<ns>:tm:{<escaped tag>}``."""
        return self._tag_members + _tag_text(tag) + "}"

    def checkpoint(self, stream_arn: str, shard_id: str) -> str:
        """A shard's checkpoint: ``<ns>:ck:{<escaped arn>}:<escaped shard>``."""
        return self._checkpoint + _stream_parts(stream_arn, shard_id)

    def shard_lease(self, stream_arn: str, shard_id: str) -> str:
        """A shard's consumer lease: ``<ns>:sl:{<escaped arn>}:<escaped shard>``."""
        return self._shard_lease + _stream_parts(stream_arn, shard_id)

    def identity_of(self, entry_key: str) -> str:
        """The identity inside an entry key (the inverse of :meth:`entry`).

        Raises:
            KeyEncodingError: ``entry_key`` is not an entry key of this
                namespace.
        """
        start = len(self._entry)
        if (
            len(entry_key) > start + 1
            and entry_key.startswith(self._entry)
            and entry_key.endswith("}")
            and "{" not in (identity := entry_key[start:-1])
            and "}" not in identity
        ):
            return identity
        raise KeyEncodingError(
            f"{_short(entry_key)} is not an entry key of namespace {self.namespace!r}"
        )


def _tag_text(tag: str) -> str:
    # An empty tag would give `{}`, which Redis ignores as a hash tag: the
    # generation and member keys would land in different slots.
    if not isinstance(tag, str) or not tag:
        raise KeyEncodingError(f"a tag must be a non-empty str, not {tag!r}")
    return _escape(tag)


def _stream_parts(stream_arn: str, shard_id: str) -> str:
    if not isinstance(stream_arn, str) or not stream_arn:
        raise KeyEncodingError(f"stream ARN must be a non-empty str, not {stream_arn!r}")
    if not isinstance(shard_id, str) or not shard_id:
        raise KeyEncodingError(f"shard id must be a non-empty str, not {shard_id!r}")
    return f"{_escape(stream_arn)}}}:{_escape(shard_id)}"


# --------------------------------------------------------------------------
# @cached keys

# Literal template text is kept as written (readable keys); these could
# not be: `%` starts every escape, braces would form a hash tag.
_BAD_LITERAL: Final = re.compile(r"[%{}\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _field_text(value: object, field_name: str) -> str:
    """A template field's value as text, by type (not yet escaped)."""
    if type(value) is str:
        return value
    if isinstance(value, enum.Enum):
        return _field_text(value.value, field_name)
    if isinstance(value, str):
        return str.__str__(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float, Decimal)):
        try:
            return normalize_number(value)
        except KeyEncodingError as exc:
            raise KeyEncodingError(f"key field {field_name!r}: {exc}") from exc
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return datetime.isoformat(value)
    if isinstance(value, date):
        return date.isoformat(value)
    raise KeyEncodingError(
        f"key field {field_name!r} is a {type(value).__qualname__}, which a key template "
        "cannot render; pass a callable key= that returns a str"
    )


class KeyTemplate:
    """A ``str.format``-style key template, compiled once: ``"orders:{customer_id}"``.

    Fields are plain parameter names (no ``{0}``, ``{a.b}``, ``{a[0]}``,
    ``{a!r}`` or ``{a:>5}``). Each value is rendered by type - str as is,
    numbers normalised (``10`` and ``10.0`` are one key), bools ``true``/
    ``false``, None ``null``, bytes base64, UUID/date/datetime in their
    standard text, an Enum by its value - and escaped with :func:`escape`.

    Literal text is kept as written, so keys read like the template. For the
    rendering to be injective, the first character of the text between two
    fields is percent-escaped in values too (``"{a}-{b}"`` renders ``a="x-y"``
    as ``x%2Dy``), two fields may not touch (``"{a}{b}"``), and literal text
    may not hold ``%``, ``{{``/``}}`` or control characters.

    Values of different types with the same text (``"10"`` and ``10``,
    ``"true"`` and ``True``) render alike; without ``key=`` a cached function
    uses :func:`encode_args`, which keeps types apart.

    Raises:
        KeyEncodingError: The template breaks one of these rules.
    """

    __slots__ = ("_escape_value", "_fields", "_parts", "template")

    template: str
    _parts: tuple[tuple[str, str | None], ...]
    _fields: tuple[str, ...]
    _escape_value: Callable[[str], str]

    def __init__(self, template: str) -> None:
        if not isinstance(template, str):
            raise KeyEncodingError(f"a key template must be a str, not {template!r}")
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise KeyEncodingError(f"bad key template {template!r}: {exc}") from exc
        parts: list[tuple[str, str | None]] = []
        separators: list[str] = []
        previous_was_field = False
        for literal, field_name, format_spec, conversion in parsed:
            if _BAD_LITERAL.search(literal):
                raise KeyEncodingError(
                    f"key template {template!r}: literal text may not hold '%', '{{{{', "
                    "'}}' or control characters"
                )
            if previous_was_field:
                if not literal and field_name is not None:
                    raise KeyEncodingError(
                        f"key template {template!r}: fields must be separated by literal "
                        "text, or different values could render alike"
                    )
                if literal and field_name is not None:
                    separators.append(literal[0])
            if field_name is not None:
                if not field_name.isidentifier():
                    raise KeyEncodingError(
                        f"key template {template!r}: field {{{field_name}}} must be a plain "
                        "parameter name (no positions, attributes or indexes)"
                    )
                if format_spec or conversion:
                    raise KeyEncodingError(
                        f"key template {template!r}: field {{{field_name}}} may not have a "
                        "conversion or format spec"
                    )
            parts.append((literal, field_name))
            previous_was_field = field_name is not None
        self.template = template
        self._parts = tuple(parts)
        self._fields = tuple(dict.fromkeys(f for _, f in parts if f is not None))
        self._escape_value = _make_escaper("".join(separators))

    @property
    def fields(self) -> tuple[str, ...]:
        """The field names, in order of first appearance."""
        return self._fields

    def render(self, arguments: Mapping[str, object]) -> str:
        """Render the key for the given arguments.

        Args:
            arguments: Parameter name to value (extra names are ignored).

        Returns:
            The rendered key; it never holds a brace.

        Raises:
            KeyEncodingError: A field is missing, or its value has a type that
                cannot be rendered.
        """
        out: list[str] = []
        escape_value = self._escape_value
        for literal, field_name in self._parts:
            out.append(literal)
            if field_name is not None:
                try:
                    value = arguments[field_name]
                except KeyError:
                    raise KeyEncodingError(
                        f"key template {self.template!r}: no value for field {field_name!r}"
                    ) from None
                out.append(escape_value(_field_text(value, field_name)))
        return "".join(out)

    def __repr__(self) -> str:
        return f"KeyTemplate({self.template!r})"


# Leaves of encode_args also escape its container delimiters.
_escape_arg: Final = _make_escaper("[]()")


def _encode_arg(value: object, out: list[str]) -> None:
    if type(value) is str:
        out.append("s:")
        out.append(_escape_arg(value))
    elif value is None:
        out.append("z")
    elif value is True:
        out.append("t")
    elif value is False:
        out.append("f")
    elif isinstance(value, enum.Enum):
        _encode_arg(value.value, out)
    elif isinstance(value, str):
        out.append("s:")
        out.append(_escape_arg(str.__str__(value)))
    elif isinstance(value, (int, float, Decimal)):
        out.append("n:")
        out.append(normalize_number(value))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out.append("b:")
        out.append(_escape_arg(base64.b64encode(value).decode("ascii")))
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode_arg(item, out)
        out.append("]")
    elif isinstance(value, dict):
        out.append("(")
        items = []
        for k, v in value.items():
            key_out: list[str] = []
            _encode_arg(k, key_out)
            items.append(("".join(key_out), v))
        items.sort(key=_first)
        for i, (k_text, v) in enumerate(items):
            if i:
                out.append(",")
            out.append(k_text)
            out.append("=")
            _encode_arg(v, out)
        out.append(")")
    elif isinstance(value, uuid.UUID):
        out.append("u:")
        out.append(str(value))
    elif isinstance(value, datetime):
        out.append("dt:")
        out.append(_escape_arg(datetime.isoformat(value)))
    elif isinstance(value, date):
        out.append("d:")
        out.append(date.isoformat(value))
    else:
        raise KeyEncodingError(
            f"cannot build a cache key from a {type(value).__qualname__}; "
            "pass a key= template or callable"
        )


def _first(pair: tuple[str, object]) -> str:
    return pair[0]


def encode_args(arguments: Mapping[str, object]) -> str:
    """The default key of an ``@cached`` function: its bound arguments.

    ``name=<value>`` in parameter order, joined by ``,``. Values carry their
    type: ``s:`` str, ``n:`` number (normalised: ``1``, ``1.0`` and
    ``Decimal("1")`` are one key, as they are equal), ``b:`` bytes (base64),
    ``t``/``f`` bools, ``z`` None, ``u:`` UUID, ``d:`` date, ``dt:`` datetime,
    ``[a,b]`` lists and tuples (alike), ``(k=v,...)`` dicts with keys in sorted
    order; an Enum by its value. Text is escaped so the result is injective.
    ``user_id="u1", limit=10`` gives ``user_id=s:u1,limit=n:10``.

    Args:
        arguments: Parameter name to value, in parameter order.

    Returns:
        The rendered arguments; never holds a brace.

    Raises:
        KeyEncodingError: A value (or element) has an unsupported type, or is
            nested too deeply.
    """
    out: list[str] = []
    try:
        for i, (name, value) in enumerate(arguments.items()):
            if i:
                out.append(",")
            out.append(_escape_arg(name))
            out.append("=")
            _encode_arg(value, out)
    except KeyEncodingError as exc:
        raise KeyEncodingError(f"argument {name!r}: {exc}") from exc
    except RecursionError as exc:
        raise KeyEncodingError(f"argument {name!r} is nested too deeply") from exc
    return "".join(out)
