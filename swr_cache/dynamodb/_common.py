"""DynamoDB plumbing: type conversion, error codes, expressions, small helpers."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final, TypeVar

from .. import _codec
from .._errors import ConfigError, KeyEncodingError
from .._keys import (
    normalize_number,
)

Item = dict[str, Any]
Key = Mapping[str, Any]
T = TypeVar("T")

#: DynamoDB error codes that mean "slow down" (besides HTTP 5xx).
THROTTLE_CODES: Final = frozenset(
    {"ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded"}
)

# Errors after which DynamoDB has certainly not applied a write, provided no
# earlier attempt was made (an attempt that timed out and was retried may
# have been applied: its retry then fails the condition it just satisfied).
_REJECTED_CODES: Final = THROTTLE_CODES | {
    "ConditionalCheckFailedException",
    "ValidationException",
    "TransactionCanceledException",
    "TransactionConflictException",
    "ResourceNotFoundException",
    "ItemCollectionSizeLimitExceededException",
    "AccessDeniedException",
    "IdempotentParameterMismatchException",
    "SerializationException",
    "UnrecognizedClientException",
    "MissingAuthenticationTokenException",
    "InvalidSignatureException",
}

_BATCH_GET_MAX: Final = 100  # keys per BatchGetItem (DynamoDB's limit)
_BATCH_WRITE_MAX: Final = 25  # requests per BatchWriteItem
_CHUNKS_IN_FLIGHT: Final = 4  # concurrent batch calls of one operation
_FORMAT: Final = str(_codec.FORMAT_VERSION).encode()
_RESERVED_PREFIX: Final = "swr_"
_PATH_PIECE: Final = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")
_SORT_OPERATORS: Final = frozenset({"=", "<", "<=", ">", ">=", "between", "begins_with"})
_RETURN_VALUES: Final = frozenset({"NONE", "ALL_OLD", "UPDATED_OLD", "ALL_NEW", "UPDATED_NEW"})

_converters_cache: tuple[Any, Any] | None = None


def _converters() -> tuple[Any, Any]:
    """boto3's serializer and a deserializer that yields ``bytes`` for B (not ``Binary``)."""
    global _converters_cache
    if _converters_cache is None:
        from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

        class _Deserializer(TypeDeserializer):  # type: ignore[misc]
            def _deserialize_b(self, value: Any) -> bytes:
                return bytes(value)

        _converters_cache = (TypeSerializer(), _Deserializer())
    return _converters_cache


def _to_dynamo(values: Mapping[str, Any]) -> dict[str, Any]:
    serialize = _converters()[0].serialize
    return {name: serialize(value) for name, value in values.items()}


def _from_dynamo(values: Mapping[str, Any]) -> Item:
    deserialize = _converters()[1].deserialize
    return {name: deserialize(value) for name, value in values.items()}


def _error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ``ClientError`` (``None`` for other errors).

    Read from ``exc.response``, so botocore need not be imported.
    """
    response = getattr(exc, "response", None)
    error = response.get("Error") if isinstance(response, Mapping) else None
    code = error.get("Code") if isinstance(error, Mapping) else None
    return code if isinstance(code, str) else None


def _error_info(exc: BaseException) -> tuple[str | None, int, int]:
    """(error code, HTTP status, retry attempts) of a botocore ``ClientError``."""
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return None, 0, 0
    meta = response.get("ResponseMetadata") or {}
    status = meta.get("HTTPStatusCode", 0) if isinstance(meta, Mapping) else 0
    retries = meta.get("RetryAttempts", 0) if isinstance(meta, Mapping) else 0
    return _error_code(exc), int(status or 0), int(retries or 0)


def is_throttle(exc: BaseException) -> bool:
    """True for throttling errors and HTTP 5xx from DynamoDB (worth a back-off)."""
    code, status, _ = _error_info(exc)
    return code in THROTTLE_CODES or status >= 500


def _write_rejected(exc: BaseException) -> bool:
    """True when DynamoDB certainly did not apply a write that raised ``exc``.

    A condition or validation failure on the first attempt, or a request
    botocore refused to send. Anything else (timeouts, connection errors,
    5xx, cancellation, a failure after retries) leaves the outcome unknown.
    """
    code, status, retries = _error_info(exc)
    if code is not None:
        return code in _REJECTED_CODES and retries == 0 and status < 500
    return type(exc).__name__ == "ParamValidationError"


def _projection(paths: Iterable[str], names: dict[str, str]) -> str:
    """A ProjectionExpression with a placeholder for every attribute name.

    ``.`` and ``[n]`` in a path denote nesting, as in DynamoDB document
    paths; every other character (reserved words, ``-``, ``:``, spaces) is
    safe, since names never appear in the expression itself.
    """
    placeholders: dict[str, str] = {}
    exprs = []
    for path in dict.fromkeys(paths):  # a path named twice is an error to DynamoDB
        parts = []
        for piece in path.split("."):
            m = _PATH_PIECE.fullmatch(piece)
            if m is None:
                raise ConfigError(f"not an attribute path: {path!r}")
            name, index = m.groups()
            ph = placeholders.get(name)
            if ph is None:
                ph = placeholders[name] = f"#{_RESERVED_PREFIX}p{len(placeholders)}"
            parts.append(ph + index)
        exprs.append(".".join(parts))
    for name, ph in placeholders.items():
        names[ph] = name
    return ", ".join(exprs)


def _top_names(paths: Iterable[str]) -> set[str]:
    """The top-level attribute each path names (``address.city`` -> ``address``)."""
    out = set()
    for path in paths:
        m = _PATH_PIECE.match(path)
        out.add(path if m is None else m.group(1))
    return out


def _check_placeholders(names: Mapping[str, str] | None, values: Mapping[str, Any] | None) -> None:
    for key in (*(names or ()), *(values or ())):
        if key[1:].startswith(_RESERVED_PREFIX):
            raise ConfigError(
                f"expression placeholders starting with {key[0]}{_RESERVED_PREFIX} are reserved"
            )


def _keyable(value: Any) -> Any:
    """Expression values as something ``encode_args`` renders injectively (sets included)."""
    if isinstance(value, (set, frozenset)):
        try:
            elements: list[Any] = sorted(value)
        except TypeError:
            elements = sorted(value, key=repr)
        return ["s", *elements]
    if isinstance(value, (list, tuple)):
        return ["l", *(_keyable(v) for v in value)]
    if isinstance(value, Mapping):
        return {k: _keyable(v) for k, v in value.items()}
    return value


def _version_text(value: Any) -> str | None:
    """The canonical digits of a non-negative integer version, else ``None``."""
    if isinstance(value, (bool, str)) or not isinstance(value, (int, float, Decimal)):
        return None
    try:
        text = normalize_number(value)
    except KeyEncodingError:
        return None
    return text if text.isdigit() else None


def _has_requests(unprocessed: Any) -> bool:
    """Whether an ``UnprocessedKeys`` entry (keys and options) or ``UnprocessedItems`` entry
    (a list of requests) holds anything."""
    return bool(unprocessed.get("Keys") if isinstance(unprocessed, Mapping) else unprocessed)


def _chunks(seq: Sequence[T], size: int) -> list[Sequence[T]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def _attribute_list(attributes: Sequence[str] | None) -> Sequence[str] | None:
    if isinstance(attributes, str):
        raise TypeError("attributes must be a list of attribute names, not a string")
    return attributes


def _one_each(
    idents: Sequence[str], found: Mapping[str, Item], wanted: set[str] | None
) -> list[Item | None]:
    """One answer per requested identity, in order: its item (only ``wanted``), or ``None``.

    A key asked for twice gets an object of its own each time.
    """
    out: list[Item | None] = []
    given: set[str] = set()
    for ident in idents:
        item = found.get(ident)
        if item is not None:
            if wanted is not None:
                item = {k: v for k, v in item.items() if k in wanted}
            if ident in given:
                item = copy.deepcopy(item)
        given.add(ident)
        out.append(item)
    return out
