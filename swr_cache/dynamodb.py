"""DynamoDB tables behind the cache: ``DynamoTable`` and its cached view.

``DynamoTable(client, "Users")`` wraps an aiobotocore ``dynamodb`` client for
one table and speaks plain Python (``Decimal``, ``set``, ``bytes``, nested
maps and lists) through boto3's ``TypeSerializer``/``TypeDeserializer``.
``table.cached(cache)`` returns a :class:`CachedTable`: reads through the
engine (one Redis hash per item, the same entry ``@cached_item`` uses for
that table and key), writes that invalidate what they change, and cached
query/scan results that item writes purge::

    users = DynamoTable(dynamodb, "Users").cached(cache, soft_ttl=30, hard_ttl=600)
    await users.get_item({"pk": "u1"}, attributes=["name"])
    await users.batch_get_item([{"pk": "u1"}, {"pk": "u2"}])
    await users.update_item({"pk": "u1"}, "SET #n = :n",
                            expression_names={"#n": "name"}, expression_values={":n": "Ada"})

Consistency. Fills read with ``ConsistentRead=True`` by default: an
eventually consistent read just after a write may return the item as it was
before it, and storing that would keep the old item for a whole TTL. A
strongly consistent read costs twice the read capacity of an eventually
consistent one (1 RCU per 4 KB instead of 0.5) and is not available on global
secondary indexes; since the cache absorbs most reads, the extra cost applies
only to fills. ``consistent_fills=False`` halves it; fills are then refused
for ``fence_ttl`` (default 1 s) after each invalidation, which is how long an
eventually consistent read is assumed to lag.

Writes that bypass the view (another service, the console, a Lambda) stay
invisible until the entry's TTL runs out, unless something invalidates it:
feed the table's stream to :class:`swr_cache.StreamInvalidator`, which purges
what the view's own writes purge (:func:`change_tags`), cached queries and
scans included.

boto3 and aiobotocore are imported only when a table is first used, so
``import swr_cache`` works without them. Install ``swr-cache[dynamodb]``: it
requires ``boto3`` beside ``aiobotocore``, and since both pin ``botocore``, the
resolver picks the boto3 release that matches aiobotocore's botocore.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Any, Final, TypeVar

import anyio
from redis.exceptions import RedisError, ResponseError

from . import _codec
from ._engine import _PURGE_MARGIN_MS, Cache, _Request, _while_renewing
from ._entry import _Corrupt, _Plan, normalize_attributes, stamp_entry, with_version
from ._errors import CodecError, ConfigError, KeyEncodingError
from ._gate import _Bypass, _is_pool_exhausted, _NoSlot
from ._keys import (
    change_tags,
    encode_args,
    item_identity,
    item_tag,
    item_tags,
    normalize_number,
    result_identity,
    table_tag,
)
from ._metrics import Metrics
from ._policy import Policy
from ._store import FillOutcome, LeaseOutcome, is_wrongtype, queue_acquire

__all__ = [
    "THROTTLE_CODES",
    "CachedTable",
    "DynamoTable",
    "change_tags",
    "is_throttle",
    "item_tags",
    "table_tag",
]

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
_FILLS_IN_FLIGHT: Final = 32  # concurrent fills of one batch
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


async def _first_error_gather(
    thunks: Sequence[Callable[[], Awaitable[T]]], limit: int | None = None
) -> list[T]:
    """Run thunks concurrently; on the first error cancel the rest and raise it unwrapped."""
    results: list[Any] = [None] * len(thunks)
    errors: list[BaseException] = []
    sem = asyncio.Semaphore(limit) if limit else None

    async with anyio.create_task_group() as tg:

        async def run(i: int, thunk: Callable[[], Awaitable[T]]) -> None:
            try:
                if sem is None:
                    results[i] = await thunk()
                else:
                    async with sem:
                        results[i] = await thunk()
            except Exception as exc:
                errors.append(exc)
                tg.cancel_scope.cancel()

        for i, thunk in enumerate(thunks):
            tg.start_soon(run, i, thunk)
    if errors:
        raise errors[0]
    return results


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


@dataclass(frozen=True, slots=True)
class _Search:
    """What Query and Scan share: an index, a filter with its placeholders, a projection."""

    index_name: str | None
    filter_expression: str | None
    expression_names: Mapping[str, str] | None
    expression_values: Mapping[str, Any] | None
    attributes: Sequence[str] | None

    def described(self, table: str, query: Mapping[str, Any], limit: int | None) -> dict[str, Any]:
        """Everything that shapes a result, for its cache key (``query``: a Query's
        partition, sort and direction). The order is part of the key: keep it."""
        out: dict[str, Any] = {"table": table, "index": self.index_name}
        if query:
            out["partition"] = query["partition"]
            out["sort"] = query["sort"]
        out["filter"] = self.filter_expression
        out["names"] = dict(self.expression_names or {})
        out["values"] = _keyable(dict(self.expression_values or {}))
        out["attributes"] = None if self.attributes is None else list(self.attributes)
        if query:
            out["forward"] = query["forward"]
        out["limit"] = limit
        return out


class DynamoTable:
    """One DynamoDB table over an aiobotocore ``dynamodb`` client, in plain Python values.

    A plain ``DynamoTable`` does not cache: its reads (``get_item``,
    ``batch_get_item``, ``query``, ``scan``) always go to DynamoDB.
    :meth:`cached` returns the cached view, a :class:`~swr_cache.CachedTable`,
    which reads through Redis and also writes (invalidating what it wrote).
    The client is the caller's: this class never creates or closes one, and
    does no I/O until a method is awaited.

    Args:
        client: an aiobotocore ``dynamodb`` client.
        table_name: the table.
        key_schema: the key attribute names, partition key first
            (``["pk", "sk"]``), or DescribeTable's ``KeySchema`` list. When
            omitted, DescribeTable is called once, on first use (concurrent
            first calls share it); pass it where IAM does not allow
            ``dynamodb:DescribeTable``.
        unprocessed_retries: rounds of retrying ``UnprocessedKeys`` /
            ``UnprocessedItems`` before the rest go one by one.
        backoff_base, backoff_cap: exponential back-off with full jitter
            between those rounds, seconds.

    Raises:
        ConfigError: an empty table name or a malformed key schema.
    """

    def __init__(
        self,
        client: Any,
        table_name: str,
        key_schema: Sequence[str] | Sequence[Mapping[str, str]] | None = None,
        *,
        unprocessed_retries: int = 8,
        backoff_base: float = 0.05,
        backoff_cap: float = 2.0,
    ) -> None:
        if not isinstance(table_name, str) or not table_name:
            raise ConfigError("table_name must be a non-empty str")
        if unprocessed_retries < 0 or backoff_base < 0 or backoff_cap < 0:
            raise ConfigError("unprocessed_retries, backoff_base and backoff_cap must be >= 0")
        self.client = client
        self.name = table_name
        self.unprocessed_retries = unprocessed_retries
        self.backoff_base = float(backoff_base)
        self.backoff_cap = float(backoff_cap)
        self._names: tuple[str, ...] | None = None
        self._lsi: frozenset[str] = frozenset()
        if key_schema is not None:
            self._names = _names_from_schema(key_schema)
        self._describe_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"DynamoTable({self.name!r})"

    # -- schema ------------------------------------------------------------------

    async def key_names(self) -> tuple[str, ...]:
        """The key attribute names, partition key first (DescribeTable once, if not given).

        Raises:
            botocore.exceptions.ClientError: DescribeTable failed (no such
                table, not allowed).
        """
        names = self._names
        if names is not None:
            return names
        async with self._describe_lock:
            if self._names is None:
                reply = await self.client.describe_table(TableName=self.name)
                table = reply["Table"]
                self._lsi = frozenset(
                    i["IndexName"] for i in table.get("LocalSecondaryIndexes") or ()
                )
                self._names = _names_from_schema(table["KeySchema"])
            return self._names

    def _check_key(self, key: Key, names: tuple[str, ...]) -> dict[str, Any]:
        if (
            not isinstance(key, Mapping)
            or len(key) != len(names)
            or any(n not in key for n in names)
        ):
            got = sorted(key) if isinstance(key, Mapping) else type(key).__name__
            raise KeyEncodingError(
                f"a key of table {self.name!r} has exactly the attributes {list(names)}, got {got}"
            )
        return {n: key[n] for n in names}

    def _key_of(self, item: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        missing = [n for n in names if n not in item]
        if missing:
            raise KeyEncodingError(
                f"the item lacks key attributes {missing} of table {self.name!r}"
            )
        return {n: item[n] for n in names}

    def _consistent_ok(self, index_name: str | None) -> bool:
        # Strongly consistent reads exist for the table and its local indexes only.
        return index_name is None or index_name in self._lsi

    # -- calls ---------------------------------------------------------------------

    async def _call(
        self, op: str, params: dict[str, Any], counts: dict[str, int] | None
    ) -> dict[str, Any]:
        try:
            reply: dict[str, Any] = await getattr(self.client, op)(**params)
        except Exception as exc:
            if counts is not None and is_throttle(exc):
                counts["throttles"] += 1
            raise
        return reply

    async def _backoff(self, attempt: int) -> None:
        # Full jitter: clients retrying together spread out instead of colliding again.
        await anyio.sleep(random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt)))

    async def _get(
        self,
        key: dict[str, Any],
        attrs: Sequence[str] | None,
        consistent: bool,
        counts: dict[str, int] | None,
    ) -> Item | None:
        """GetItem; with a projection, only the requested top-level attributes come back."""
        params: dict[str, Any] = {"TableName": self.name, "Key": _to_dynamo(key)}
        if consistent:
            params["ConsistentRead"] = True
        if attrs is not None:
            names: dict[str, str] = {}
            # Key attributes ride along so an existing item is never an empty reply.
            params["ProjectionExpression"] = _projection([*attrs, *key], names)
            params["ExpressionAttributeNames"] = names
        reply = await self._call("get_item", params, counts)
        raw = reply.get("Item")
        if raw is None:
            return None
        item = _from_dynamo(raw)
        if attrs is None:
            return item
        wanted = _top_names(attrs)
        return {k: v for k, v in item.items() if k in wanted}

    async def _batch_get(
        self,
        keys: Sequence[dict[str, Any]],
        attrs: Sequence[str] | None,
        consistent: bool,
        counts: dict[str, int] | None,
    ) -> dict[str, Item]:
        """BatchGetItem in chunks of 100; items by identity (key attributes included)."""
        names = await self.key_names()
        extra: dict[str, Any] = {}
        if consistent:
            extra["ConsistentRead"] = True
        if attrs is not None:
            expr_names: dict[str, str] = {}
            extra["ProjectionExpression"] = _projection([*attrs, *names], expr_names)
            extra["ExpressionAttributeNames"] = expr_names
        out: dict[str, Item] = {}

        def collect(reply: Mapping[str, Any]) -> None:
            for raw in reply.get("Responses", {}).get(self.name, ()):
                item = _from_dynamo(raw)
                out[item_identity(self.name, self._key_of(item, names))] = item

        async def one_by_one(request: Mapping[str, Any]) -> None:
            # A throttled GetItem raises its own error.
            rest = [_from_dynamo(k) for k in request["Keys"]]
            got = await _first_error_gather(
                [partial(self._get, k, attrs, consistent, counts) for k in rest],
                _CHUNKS_IN_FLIGHT,
            )
            for k, one in zip(rest, got, strict=True):
                if one is not None:
                    out[item_identity(self.name, k)] = {**k, **one}

        async def chunk(part: Sequence[dict[str, Any]]) -> None:
            request = {"Keys": [_to_dynamo(k) for k in part], **extra}
            await self._batch_call(
                "batch_get_item", request, "UnprocessedKeys", counts, one_by_one, collect
            )

        await _first_error_gather(
            [partial(chunk, part) for part in _chunks(keys, _BATCH_GET_MAX)],
            _CHUNKS_IN_FLIGHT,
        )
        return out

    async def _batch_call(
        self,
        op: str,
        request: Any,
        unprocessed: str,
        counts: dict[str, int] | None,
        one_by_one: Callable[[Any], Awaitable[None]],
        on_reply: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        """One batch call for this table, retrying what DynamoDB leaves ``unprocessed``.

        Retries back off exponentially with full jitter; after
        ``unprocessed_retries`` rounds, ``one_by_one`` takes the rest (the
        table's leftover request) with single-item calls.
        """
        pending: dict[str, Any] = {self.name: request}
        attempt = 0
        while True:
            reply = await self._call(op, {"RequestItems": pending}, counts)
            if on_reply is not None:
                on_reply(reply)
            pending = {t: r for t, r in (reply.get(unprocessed) or {}).items() if _has_requests(r)}
            if not pending:
                return
            if attempt >= self.unprocessed_retries:
                await one_by_one(pending[self.name])
                return
            if counts is not None:
                counts["unprocessed_retries"] += 1
            await self._backoff(attempt)
            attempt += 1

    async def _batch_write(
        self, requests: Sequence[dict[str, Any]], counts: dict[str, int] | None
    ) -> None:
        """One BatchWriteItem of at most 25 requests, retrying ``UnprocessedItems``."""

        async def one_by_one(rest: Sequence[Mapping[str, Any]]) -> None:
            for request in rest:
                if "PutRequest" in request:
                    params = {"TableName": self.name, "Item": request["PutRequest"]["Item"]}
                    await self._call("put_item", params, counts)
                else:
                    params = {"TableName": self.name, "Key": request["DeleteRequest"]["Key"]}
                    await self._call("delete_item", params, counts)

        await self._batch_call(
            "batch_write_item", list(requests), "UnprocessedItems", counts, one_by_one
        )

    def _search_params(
        self, search: _Search, consistent: bool
    ) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
        """Query and Scan parameters, and the placeholders they use so far."""
        _check_placeholders(search.expression_names, search.expression_values)
        params: dict[str, Any] = {"TableName": self.name}
        names: dict[str, str] = dict(search.expression_names or {})
        values: dict[str, Any] = dict(search.expression_values or {})
        if search.index_name is not None:
            params["IndexName"] = search.index_name
        if search.filter_expression is not None:
            params["FilterExpression"] = search.filter_expression
        attributes = _attribute_list(search.attributes)
        if attributes is not None:
            params["ProjectionExpression"] = _projection(attributes, names)
        if consistent:
            params["ConsistentRead"] = True
        return params, names, values

    def _scan_params(self, search: _Search, consistent: bool) -> dict[str, Any]:
        params, names, values = self._search_params(search, consistent)
        params["ExpressionAttributeNames"] = names
        params["ExpressionAttributeValues"] = _to_dynamo(values)
        return params

    def _query_params(
        self,
        partition: Key,
        sort: Sequence[Any] | None,
        scan_forward: bool,
        search: _Search,
        consistent: bool,
    ) -> dict[str, Any]:
        if not isinstance(partition, Mapping) or len(partition) != 1:
            raise ConfigError("partition must be {partition_key_name: value}")
        params, names, values = self._search_params(search, consistent)
        ((pk_name, pk_value),) = partition.items()
        names[f"#{_RESERVED_PREFIX}k0"] = pk_name
        values[f":{_RESERVED_PREFIX}k0"] = pk_value
        condition = f"#{_RESERVED_PREFIX}k0 = :{_RESERVED_PREFIX}k0"
        if sort is not None:
            if len(sort) < 3 or sort[1] not in _SORT_OPERATORS:
                raise ConfigError(
                    "sort must be (name, operator, value) with operator one of "
                    f"{sorted(_SORT_OPERATORS)}, or (name, 'between', low, high)"
                )
            name, op, *operands = sort
            if len(operands) != (2 if op == "between" else 1):
                raise ConfigError(
                    f"sort operator {op!r} takes {2 if op == 'between' else 1} value(s)"
                )
            names[f"#{_RESERVED_PREFIX}k1"] = name
            phs = []
            for i, operand in enumerate(operands):
                ph = f":{_RESERVED_PREFIX}s{i}"
                values[ph] = operand
                phs.append(ph)
            sk = f"#{_RESERVED_PREFIX}k1"
            if op == "between":
                condition += f" AND {sk} BETWEEN {phs[0]} AND {phs[1]}"
            elif op == "begins_with":
                condition += f" AND begins_with({sk}, {phs[0]})"
            else:
                condition += f" AND {sk} {op} {phs[0]}"
        params["KeyConditionExpression"] = condition
        if not scan_forward:
            params["ScanIndexForward"] = False
        params["ExpressionAttributeNames"] = names
        params["ExpressionAttributeValues"] = _to_dynamo(values)
        return params

    async def _pages(
        self, op: str, params: dict[str, Any], limit: int | None, counts: dict[str, int] | None
    ) -> list[Item]:
        """Follow ``LastEvaluatedKey`` until done or ``limit`` items."""
        if not params.get("ExpressionAttributeNames"):
            params.pop("ExpressionAttributeNames", None)
        if not params.get("ExpressionAttributeValues"):
            params.pop("ExpressionAttributeValues", None)
        items: list[Item] = []
        start: Any = None
        while True:
            page = dict(params)
            if start is not None:
                page["ExclusiveStartKey"] = start
            if limit is not None:
                page["Limit"] = limit - len(items)
            reply = await self._call(op, page, counts)
            items.extend(_from_dynamo(raw) for raw in reply.get("Items", ()))
            start = reply.get("LastEvaluatedKey")
            if not start or (limit is not None and len(items) >= limit):
                return items if limit is None else items[:limit]

    # -- uncached reads ------------------------------------------------------------

    async def get_item(
        self, key: Key, attributes: Sequence[str] | None = None, consistent_read: bool = False
    ) -> Item | None:
        """GetItem, uncached.

        Args:
            key: the primary key, e.g. ``{"pk": "u1"}``.
            attributes: attribute names or document paths to project; the
                top-level attributes they name come back.
            consistent_read: read strongly consistently.

        Returns:
            The item (plain Python values), or ``None``.

        Raises:
            KeyEncodingError: ``key`` is not exactly the table's key.
            botocore.exceptions.ClientError: DynamoDB's error, unchanged.
        """
        names = await self.key_names()
        attributes = _attribute_list(attributes)
        return await self._get(self._check_key(key, names), attributes, consistent_read, None)

    async def batch_get_item(
        self,
        keys: Iterable[Key],
        attributes: Sequence[str] | None = None,
        consistent_read: bool = False,
    ) -> list[Item | None]:
        """BatchGetItem, uncached: chunks of 100, ``UnprocessedKeys`` retried with back-off.

        Returns:
            One entry per key, in the keys' order: the item, or ``None``.
        """
        names = await self.key_names()
        attributes = _attribute_list(attributes)
        clean = [self._check_key(k, names) for k in keys]
        idents = [item_identity(self.name, k) for k in clean]
        unique = list({i: k for i, k in zip(idents, clean, strict=True)}.values())
        found = await self._batch_get(unique, attributes, consistent_read, None)
        return _one_each(idents, found, None if attributes is None else _top_names(attributes))

    async def query(
        self,
        partition: Key,
        *,
        sort: Sequence[Any] | None = None,
        index_name: str | None = None,
        filter_expression: str | None = None,
        expression_names: Mapping[str, str] | None = None,
        expression_values: Mapping[str, Any] | None = None,
        attributes: Sequence[str] | None = None,
        scan_forward: bool = True,
        limit: int | None = None,
        consistent_read: bool = False,
    ) -> list[Item]:
        """Query one partition, uncached, following pages.

        Args:
            partition: ``{partition_key_name: value}`` of the table or of ``index_name``.
            sort: a sort key condition: ``(name, op, value)`` with ``op`` one of
                ``= < <= > >= begins_with``, or ``(name, "between", low, high)``.
            index_name: a local or global secondary index.
            filter_expression, expression_names, expression_values: a
                FilterExpression with its placeholders (values as plain Python).
            attributes: names or document paths to project.
            scan_forward: ``False`` for descending sort order.
            limit: at most this many items (pages are followed until then).
            consistent_read: read strongly consistently (not on global indexes).

        Returns:
            The items, in sort order.
        """
        search = _Search(
            index_name, filter_expression, expression_names, expression_values, attributes
        )
        params = self._query_params(partition, sort, scan_forward, search, consistent_read)
        return await self._pages("query", params, limit, None)

    async def scan(
        self,
        *,
        index_name: str | None = None,
        filter_expression: str | None = None,
        expression_names: Mapping[str, str] | None = None,
        expression_values: Mapping[str, Any] | None = None,
        attributes: Sequence[str] | None = None,
        limit: int | None = None,
        consistent_read: bool = False,
    ) -> list[Item]:
        """Scan the table (or an index), uncached, following pages; arguments as for :meth:`query`."""
        search = _Search(
            index_name, filter_expression, expression_names, expression_values, attributes
        )
        return await self._pages("scan", self._scan_params(search, consistent_read), limit, None)

    # -- the cached view -----------------------------------------------------------

    def cached(
        self,
        cache: Cache,
        *,
        soft_ttl: float | None = None,
        hard_ttl: float | None = None,
        negative_ttl: float | None = None,
        jitter: float | None = None,
        early_refresh: float | None = None,
        consistent_fills: bool = True,
        write_through: bool = False,
        version_attribute: str | None = None,
        name: str | None = None,
    ) -> CachedTable:
        """A cached view of this table on ``cache``.

        Args:
            cache: the engine (enter it before reading: ``async with cache``).
            soft_ttl, hard_ttl, negative_ttl, jitter, early_refresh: override
                the cache's ``Policy`` for fills made through this view.
            consistent_fills: fills read with ``ConsistentRead=True`` (twice
                the read capacity of an eventually consistent read; see the
                module docstring).
            write_through: after a write, store the new item instead of
                invalidating, but only when its ``version_attribute`` is
                higher than the cached item's (compared in Redis); otherwise
                invalidate. Every writer must raise the version on each write
                (enforce it with a condition expression).
            version_attribute: the numeric (non-negative integer) version
                attribute; required with ``write_through``. Projections then
                also merge missing attributes only into an entry holding the
                version they loaded (see ``cached_item``'s ``version_attribute``).
            name: metrics name (default ``dynamodb:<table>``).

        Raises:
            ConfigError: invalid TTLs, or ``write_through`` without a version attribute.
        """
        if write_through and not version_attribute:
            raise ConfigError("write_through=True needs version_attribute (a numeric version)")
        policy = cache.policy.with_overrides(
            soft_ttl=soft_ttl,
            hard_ttl=hard_ttl,
            negative_ttl=negative_ttl,
            jitter=jitter,
            early_refresh=early_refresh,
        )
        return CachedTable(
            self,
            cache,
            policy,
            consistent_fills=consistent_fills,
            write_through=write_through,
            version_attribute=version_attribute,
            name=name,
        )


def _names_from_schema(schema: Sequence[str] | Sequence[Mapping[str, str]]) -> tuple[str, ...]:
    if isinstance(schema, str) or not schema:
        raise ConfigError("key_schema must be a non-empty list of key attribute names")
    hash_names: list[str] = []
    range_names: list[str] = []
    for part in schema:
        if isinstance(part, str):
            (range_names if hash_names else hash_names).append(part)
        elif isinstance(part, Mapping) and isinstance(part.get("AttributeName"), str):
            (hash_names if part.get("KeyType") == "HASH" else range_names).append(
                part["AttributeName"]
            )
        else:
            raise ConfigError("key_schema must be attribute names or DescribeTable's KeySchema")
    names = (*hash_names, *range_names)
    if not 1 <= len(names) <= 2 or len(set(names)) != len(names) or not all(names):
        raise ConfigError(
            f"a key schema has one or two distinct attribute names, got {list(names)}"
        )
    return names


_CORRUPT: Final = object()


class CachedTable:
    """A cached view of a :class:`DynamoTable`; made by :meth:`DynamoTable.cached`.

    Import it from ``swr_cache`` to annotate the view
    (``users: CachedTable = DynamoTable(client, "Users").cached(cache)``);
    build it with ``DynamoTable.cached``, not directly.

    Items live in the same Redis entries ``@cached_item(cache, table=...,
    key=...)`` uses, so hand-written accessors, this view and the stream
    invalidator all meet on one entry per item.
    """

    def __init__(
        self,
        table: DynamoTable,
        cache: Cache,
        policy: Policy,
        *,
        consistent_fills: bool,
        write_through: bool,
        version_attribute: str | None,
        name: str | None,
    ) -> None:
        self.table = table
        self.cache = cache
        self.policy = policy
        self.consistent_fills = consistent_fills
        self.write_through = write_through
        self.version_attribute = version_attribute
        self.name = name or f"dynamodb:{table.name}"
        self.metrics: Metrics = cache.metrics.get(self.name, table.name)
        self._query_metrics: Metrics = cache.metrics.get(f"{self.name}.query", table.name)
        self._scan_metrics: Metrics = cache.metrics.get(f"{self.name}.scan", table.name)
        self._others: dict[str, DynamoTable] = {}

    def __repr__(self) -> str:
        return f"<CachedTable {self.table.name!r} on {self.cache.namespace!r}>"

    # -- requests ------------------------------------------------------------------

    def _request(
        self,
        key: dict[str, Any],
        attrs: tuple[str, ...] | None,
        consistent: bool,
        identity: str | None = None,
    ) -> _Request:
        table = self.table
        counts = self.metrics.counts

        async def load(load_attrs: tuple[str, ...] | None) -> Item | None:
            return await table._get(key, load_attrs, consistent, counts)

        return _Request(
            self.cache,
            self.metrics,
            self.policy,
            item_identity(table.name, key) if identity is None else identity,
            True,
            attrs,
            load,
            None,
            None,
            consistent,
            self.version_attribute,
        )

    async def _key(self, key: Key) -> dict[str, Any]:
        names = self.table._names
        if names is None:
            names = await self.table.key_names()
        return self.table._check_key(key, names)

    # -- reads -----------------------------------------------------------------------

    async def get_item(
        self, key: Key, attributes: Sequence[str] | None = None, consistent_read: bool = False
    ) -> Item | None:
        """Read one item through the cache.

        Args:
            key: the primary key, e.g. ``{"pk": "u1"}``.
            attributes: only these top-level attributes (one HMGET; missing
                ones are loaded with a ProjectionExpression and merged).
                Document paths (``address.city``) load their top-level attribute.
            consistent_read: bypass the cache: always read DynamoDB with
                ``ConsistentRead=True``, and store what it returns (with
                ``attributes``, the entry then holds just those).

        Returns:
            The item (only the requested attributes that exist, ``{}`` if
            none do), or ``None`` when there is no item.

        Raises:
            CacheNotEnteredError: the cache was never entered.
            KeyEncodingError: ``key`` is not exactly the table's key.
            botocore.exceptions.ClientError: DynamoDB's error on a load,
                unchanged (throttling included; counted as ``throttles``).
        """
        clean = await self._key(key)
        attrs = normalize_attributes(attributes)
        if consistent_read:
            return await self._consistent_get(self._request(clean, attrs, True))
        result: Item | None = await self.cache._get(
            self._request(clean, attrs, self.consistent_fills)
        )
        return result

    async def _consistent_get(self, req: _Request) -> Item | None:
        """Read DynamoDB strongly consistently and store the result under a fresh lease."""
        cache = self.cache
        cache._require_entered()
        token = os.urandom(12).hex()
        lease = req.lease
        try:
            outcome = await cache._guard(
                req, lambda: cache._store.acquire(lease, token, cache.lease_ms)
            )
        except _Bypass:
            outcome = LeaseOutcome.HELD_ELSEWHERE  # Redis is unusable: read anyway, store nothing
        if outcome == LeaseOutcome.REPAIRED:
            req.metrics.counts["leases_repaired"] += 1
        got = outcome != LeaseOutcome.HELD_ELSEWHERE
        if not got:
            # Another load of this item is under way and will fill it.
            result: Item | None = await cache._call_loader(req, req.attrs)
            return result
        cache._held[lease] = token
        try:
            start_ms = cache._now_ms() - _PURGE_MARGIN_MS
            t0 = time.perf_counter()
            try:
                value = await cache._call_loader(req, req.attrs)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await cache._release(lease, token)
                raise
            delta_ms = (time.perf_counter() - t0) * 1000.0
            # Shielded like the engine's fills: a fill cut short could leave its
            # lease behind or skip its tag bookkeeping. Each step is bounded.
            with anyio.CancelScope(shield=True):
                await cache._fill(
                    req, token, req.attrs, value, None, [], delta_ms, [], start_ms, req.policy
                )
        finally:
            cache._held.pop(lease, None)
        return value  # type: ignore[no-any-return]

    async def peek(
        self, key: Key, attributes: Sequence[str] | None = None
    ) -> tuple[Item | None, str] | None:
        """The cached item and its state (``"fresh"``/``"stale"``) without loading, or ``None``."""
        clean = await self._key(key)
        got: tuple[Item | None, str] | None = await self.cache._peek(
            self._request(clean, normalize_attributes(attributes), self.consistent_fills)
        )
        return got

    async def batch_get_item(
        self, keys: Iterable[Key], attributes: Sequence[str] | None = None
    ) -> list[Item | None]:
        """Read many items: cached entries in one Redis pipeline, misses in BatchGetItem calls.

        Misses are loaded under their leases in chunks of 100 keys;
        ``UnprocessedKeys`` are retried with exponential back-off and full
        jitter. Absent items are cached as not found. Stale entries are
        served and refreshed in the background. Keys whose lease another
        load holds wait for that load's fill, as a single read would.

        Args:
            keys: primary keys (duplicates allowed).
            attributes: as for :meth:`get_item`.

        Returns:
            One entry per key, in the keys' order: the item or ``None``.

        Raises:
            CacheNotEnteredError: the cache was never entered.
            botocore.exceptions.ClientError: DynamoDB's error, unchanged.
        """
        values, _ = await self._batch(keys, attributes)
        return values

    async def warm(self, keys: Iterable[Key], attributes: Sequence[str] | None = None) -> int:
        """Preload entries with batch reads (fresh ones are left alone).

        Returns:
            How many entries were loaded from DynamoDB.
        """
        _, loaded = await self._batch(keys, attributes)
        return loaded

    async def _batch(
        self, keys: Iterable[Key], attributes: Sequence[str] | None
    ) -> tuple[list[Item | None], int]:
        cache = self.cache
        cache._require_entered()
        names = self.table._names or await self.table.key_names()
        attrs = normalize_attributes(attributes)
        clean = [self.table._check_key(k, names) for k in keys]
        reqs: dict[str, _Request] = {}
        keymap: dict[str, dict[str, Any]] = {}
        idents = []
        for key in clean:
            ident = item_identity(self.table.name, key)
            idents.append(ident)
            if ident not in reqs:
                reqs[ident] = self._request(key, attrs, self.consistent_fills, ident)
                keymap[ident] = key
        results: dict[str, Any] = {}
        loaded = 0
        todo = list(reqs.values())
        near = cache._near
        if not todo:
            snaps: list[Any] | None = []
        elif near is None:
            snaps = await self._read_many(todo)
        else:  # near cache: held copies skip the pipeline
            snaps = await near.read_many(self._read_many, todo, self.metrics)
        if snaps is None:
            loaded = await self._load_unstored(todo, keymap, results)
        else:
            misses = self._judge_many(todo, snaps, results)
            if misses:
                loaded = await self._load_misses(misses, keymap, results)
        return _one_each(idents, results, None), loaded

    def _judge_many(
        self, reqs: Sequence[_Request], snaps: Sequence[Any], results: dict[str, Any]
    ) -> list[tuple[_Request, _Plan | None]]:
        """Serve what the snapshots answer (scheduling stale refreshes); return the misses."""
        cache = self.cache
        counts = self.metrics.counts
        now = cache._now_ms()
        misses: list[tuple[_Request, _Plan | None]] = []
        for req, snap in zip(reqs, snaps, strict=True):
            verdict: Any = None
            if snap is _CORRUPT:
                counts["decode_errors"] += 1
            elif snap is not None:
                try:
                    verdict = cache._judge(req, snap, now)
                except _Corrupt:
                    counts["decode_errors"] += 1
            if type(verdict) is tuple:
                state, value = verdict
                results[req.identity] = value
                cache._note_hit(req, snap, state, value is None, now)
                continue
            counts["partial_misses" if verdict is not None else "misses"] += 1
            misses.append((req, verdict))
        return misses

    def _redis_failed(self, exc: BaseException, n: int) -> None:
        """Count a failed pipeline and tell the breaker (a busy pool is not a Redis failure)."""
        counts = self.metrics.counts
        breaker = self.cache.breaker
        counts["bypasses"] += n
        if isinstance(exc, _NoSlot) or _is_pool_exhausted(exc):
            counts["pool_waits_timed_out"] += 1
            if breaker._probing:
                breaker.abandon()
        else:
            counts["redis_errors"] += 1
            breaker.failure()

    async def _pipeline(self, build: Callable[[Any], None], n: int) -> list[Any] | None:
        """Run one non-transactional pipeline (grouped by node on a cluster); ``None`` to bypass."""
        cache = self.cache
        breaker = cache.breaker
        if not breaker.allow():
            self.metrics.counts["bypasses"] += n
            return None
        t0 = time.perf_counter()
        try:
            async with cache._slots.hold(cache.call_timeout):
                pipe = cache.client.pipeline(transaction=False)
                build(pipe)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            self._redis_failed(exc, n)
            return None
        except BaseException:
            if breaker._probing:
                breaker.abandon()
            raise
        for reply in replies:
            if isinstance(reply, BaseException) and not is_wrongtype(reply):
                if isinstance(reply, ResponseError):
                    # The server answered (OOM, a script error): not a breaker failure.
                    breaker.success()
                    self.metrics.counts["redis_errors"] += 1
                    self.metrics.counts["bypasses"] += n
                    return None
                if isinstance(reply, (RedisError, OSError)):
                    self._redis_failed(reply, n)
                    return None
                raise reply
        breaker.success()
        self.metrics.redis_latency.observe(time.perf_counter() - t0)
        return replies

    async def _read_many(self, reqs: Sequence[_Request]) -> list[Any] | None:
        """Every entry in one pipeline: snapshots (``None`` absent, ``_CORRUPT``), or ``None`` to bypass."""

        def build(pipe: Any) -> None:
            for req in reqs:
                if req.fields is None:
                    pipe.hgetall(req.entry)
                else:
                    pipe.hmget(req.entry, req.fields)

        replies = await self._pipeline(build, len(reqs))
        if replies is None:
            return None
        return [self._snap(req, raw) for req, raw in zip(reqs, replies, strict=True)]

    def _snap(self, req: _Request, raw: Any, count: bool = True) -> Any:
        if isinstance(raw, BaseException):
            return _CORRUPT  # WRONGTYPE
        try:
            return self.cache._snap(req, raw, req.fields, count)
        except (TypeError, ValueError):
            return _CORRUPT

    async def _load_unstored(
        self,
        reqs: Sequence[_Request],
        keymap: Mapping[str, dict[str, Any]],
        results: dict[str, Any],
    ) -> int:
        """Redis is unusable: answer from DynamoDB, store nothing."""
        attrs = reqs[0].attrs if reqs else None  # one batch asks one projection
        found = await self._timed_batch_get(
            [keymap[req.identity] for req in reqs], attrs, len(reqs)
        )
        for req in reqs:
            results[req.identity] = _answer(found.get(req.identity), req.attrs, None)
        return len(reqs)

    async def _timed_batch_get(
        self, keys: Sequence[dict[str, Any]], attrs: Sequence[str] | None, n: int
    ) -> dict[str, Item]:
        counts = self.metrics.counts
        counts["loads"] += n
        t0 = time.perf_counter()
        try:
            return await self.table._batch_get(keys, attrs, self.consistent_fills, counts)
        except Exception:
            counts["load_errors"] += n
            raise
        finally:
            self.metrics.load_latency.observe(time.perf_counter() - t0)

    async def _load_misses(
        self,
        misses: list[tuple[_Request, _Plan | None]],
        keymap: Mapping[str, dict[str, Any]],
        results: dict[str, Any],
    ) -> int:
        """Take the misses' leases in one pipeline (re-reading each entry), then load ours in batches."""
        cache = self.cache
        tokens = {req.identity: os.urandom(12).hex() for req, _ in misses}

        def build(pipe: Any) -> None:
            for req, _ in misses:
                queue_acquire(pipe, req.lease, tokens[req.identity], cache.lease_ms, None)
                if req.fields is None:
                    pipe.hgetall(req.entry)
                else:
                    pipe.hmget(req.entry, req.fields)

        replies = await self._pipeline(build, len(misses))
        if replies is None:
            return await self._load_unstored([req for req, _ in misses], keymap, results)
        now = cache._now_ms()
        mine: list[tuple[_Request, _Plan | None]] = []
        others: list[_Request] = []
        release: list[_Request] = []
        for i, (req, _) in enumerate(misses):
            reply, raw = replies[2 * i], replies[2 * i + 1]
            got = bool(reply) and not isinstance(reply, BaseException)
            if got and reply == LeaseOutcome.REPAIRED:
                req.metrics.counts["leases_repaired"] += 1
            # (A bad signature seen again here was counted by the first read.)
            snap = self._snap(req, raw, count=False)
            verdict: Any = None
            if snap is not _CORRUPT and snap is not None:
                try:
                    verdict = cache._judge(req, snap, now)
                except _Corrupt:
                    verdict = None
            if type(verdict) is tuple:
                # Filled between our read and our lease: use it.
                results[req.identity] = verdict[1]
                if got:
                    release.append(req)
            elif got:
                mine.append((req, verdict))
            else:
                others.append(req)
        thunks: list[Callable[[], Awaitable[Any]]] = [
            partial(cache._release, req.lease, tokens[req.identity]) for req in release
        ]
        if mine:
            thunks.append(lambda: self._load_mine(mine, tokens, keymap, results))
        for req in others:

            async def wait_for_theirs(req: _Request = req) -> None:
                results[req.identity] = await cache._get(req)

            thunks.append(wait_for_theirs)
        try:
            await _first_error_gather(thunks)
        except BaseException:
            # Cancelled (or failed) before every lease we took was filled or
            # released: give them back now rather than at their TTL.
            await cache._release_all(
                {req.lease: tokens[req.identity] for req, _ in mine}
                | {req.lease: tokens[req.identity] for req in release}
            )
            raise
        return len(mine)

    async def _load_mine(
        self,
        mine: list[tuple[_Request, _Plan | None]],
        tokens: dict[str, str],
        keymap: Mapping[str, dict[str, Any]],
        results: dict[str, Any],
    ) -> None:
        """BatchGetItem the entries whose leases we hold (renewed meanwhile), then fill each."""
        cache = self.cache
        held = {req.lease: tokens[req.identity] for req, _ in mine}
        cache._held.update(held)
        try:
            # One projection serves the whole batch: the union of what the
            # entries lack, or the whole item if any entry needs it.
            union: set[str] | None = set()
            for req, plan in mine:
                need = _needs(req, plan)
                if need is None:
                    union = None
                    break
                union.update(need)  # type: ignore[union-attr]
            load_attrs = None if union is None else tuple(sorted(union))
            start_ms = cache._now_ms() - _PURGE_MARGIN_MS
            t0 = time.perf_counter()
            keys = [keymap[req.identity] for req, _ in mine]
            try:
                found = await _while_renewing(
                    partial(self._timed_batch_get, keys, load_attrs, len(mine)),
                    partial(self._renew, held),
                )
            except BaseException:
                await cache._release_all(held)
                raise
            delta_ms = (time.perf_counter() - t0) * 1000.0
            replace: list[tuple[_Request, Item | None]] = []
            merges: list[Callable[[], Awaitable[bool]]] = []
            merged: list[_Request] = []
            for req, plan in mine:
                value = found.get(req.identity)
                if load_attrs is not None and plan is not None and plan.merge_version is not None:
                    # A fresh entry lacking some attributes: merge just those into it
                    # (with the item's version attribute, which the merge compares).
                    merge_attrs = with_version(plan.load_attrs, req.version_attr)
                    if value is not None:
                        value = {k: v for k, v in value.items() if k in merge_attrs}  # type: ignore[operator]
                    results[req.identity] = _answer(value, req.attrs, plan.merged)
                    merged.append(req)
                    merges.append(
                        partial(
                            cache._fill,
                            req,
                            tokens[req.identity],
                            merge_attrs,
                            value,
                            plan.merge_version,
                            plan.prior_absent,
                            delta_ms,
                            [],
                            start_ms,
                            req.policy,
                        )
                    )
                else:
                    # Replace the entry with all we loaded.
                    results[req.identity] = _answer(value, req.attrs, None)
                    replace.append((req, value))
            if merges:
                superseded = await _first_error_gather(merges, _FILLS_IN_FLIGHT)
                await self._reload_torn(
                    [r for r, s in zip(merged, superseded, strict=True) if s], keymap, results
                )
            if replace:
                await self._fill_many(replace, load_attrs, tokens, delta_ms)
        finally:
            for lease in held:
                cache._held.pop(lease, None)

    async def _reload_torn(
        self, reqs: list[_Request], keymap: Mapping[str, dict[str, Any]], results: dict[str, Any]
    ) -> None:
        """Answer again, from one load, the merges an invalidation or a write-through overtook.

        Their answers joined cached attributes to newly loaded ones; once the
        entry was replaced or invalidated meanwhile, the two may be of
        different versions of the item (nothing is stored).
        """
        if not reqs:
            return
        self.metrics.counts["reloads_after_invalidation"] += len(reqs)
        names: set[str] = set()
        for req in reqs:
            names.update(req.attrs or ())
        whole = any(req.attrs is None for req in reqs)
        again = await self._timed_batch_get(
            [keymap[req.identity] for req in reqs],
            None if whole else tuple(sorted(names)),
            len(reqs),
        )
        for req in reqs:
            results[req.identity] = _answer(again.get(req.identity), req.attrs, None)

    async def _fill_many(
        self,
        fills: Sequence[tuple[_Request, Item | None]],
        attrs: tuple[str, ...] | None,
        tokens: Mapping[str, str],
        delta_ms: float,
    ) -> None:
        """Replace many entries under our leases in one pipeline (the engine's fill, batched).

        Like ``Cache._fill`` for a replacing fill without tags: the same
        fields and deadlines, the same lease/fence compare-and-write script,
        but one round trip for the whole batch instead of one per entry.
        """
        cache = self.cache
        counts = self.metrics.counts
        now = cache._now_ms()
        calls: list[tuple[str, str, str, str, int, Mapping[bytes, bytes], bool]] = []
        release: list[_Request] = []
        for req, value in fills:
            try:
                fields, expire_ms = _whole_entry(cache, req, attrs, value, now, delta_ms)
            except (CodecError, _EntryTooLarge) as exc:
                too_large = isinstance(exc, _EntryTooLarge)
                counts["fills_skipped_too_large" if too_large else "fills_rejected"] += 1
                release.append(req)
                continue
            token = tokens[req.identity]
            calls.append(
                (req.entry, req.lease, req.fence, token, expire_ms, fields, not req.consistent)
            )
        if release:
            await _first_error_gather(
                [partial(cache._release, r.lease, tokens[r.identity]) for r in release]
            )
        if not calls:
            return
        try:
            async with cache._slots.hold(cache.call_timeout):
                outcomes = await cache._store.fill_many(calls)
        except (RedisError, OSError):
            counts["redis_errors"] += 1  # the leases expire by themselves
            return
        for outcome in outcomes:
            if outcome == FillOutcome.STORED_FENCE_REPAIRED:
                counts["fences_repaired"] += 1
                counts["fills"] += 1
            elif outcome == FillOutcome.STORED:
                counts["fills"] += 1
            elif isinstance(outcome, BaseException):
                counts["redis_errors"] += 1
            else:
                counts["fills_rejected"] += 1

    async def _renew(self, held: Mapping[str, str]) -> None:
        """Keep a batch's leases alive while its BatchGetItem calls run."""
        cache = self.cache
        while True:
            await anyio.sleep(cache.lease_ms / 3000.0)
            for lease, token in held.items():
                try:
                    async with cache._slots.hold(cache.call_timeout):
                        await cache._store.renew_lease(lease, token, cache.lease_ms)
                except (RedisError, OSError):
                    pass

    # -- cached query / scan -------------------------------------------------------

    async def query(
        self,
        partition: Key,
        *,
        sort: Sequence[Any] | None = None,
        index_name: str | None = None,
        filter_expression: str | None = None,
        expression_names: Mapping[str, str] | None = None,
        expression_values: Mapping[str, Any] | None = None,
        attributes: Sequence[str] | None = None,
        scan_forward: bool = True,
        limit: int | None = None,
    ) -> list[Item]:
        """A cached Query (arguments as for :meth:`DynamoTable.query`).

        The result is stored under all of its arguments and tagged with
        ``item_tag(table, partition)`` when the partition attribute is a key
        attribute of the table (the table itself or a local index), else with
        :func:`table_tag`; a write through any view of the table purges it.

        Returns:
            The items (a list of its own per caller).
        """
        names = self.table._names or await self.table.key_names()
        if not isinstance(partition, Mapping) or len(partition) != 1:
            raise ConfigError("partition must be {partition_key_name: value}")
        ((pk_name, _),) = partition.items()
        tag = (
            item_tag(self.table.name, partition) if pk_name in names else table_tag(self.table.name)
        )
        consistent = (
            self.consistent_fills and self.table._consistent_ok(index_name) and pk_name == names[0]
        )
        search = _Search(
            index_name, filter_expression, expression_names, expression_values, attributes
        )
        params = self.table._query_params(partition, sort, scan_forward, search, consistent)
        query = {
            "partition": _keyable(partition),
            "sort": None if sort is None else _keyable(list(sort)),
            "forward": scan_forward,
        }
        return await self._cached_search(
            "query", params, limit, search, query, tag, consistent, self._query_metrics
        )

    async def scan(
        self,
        *,
        index_name: str | None = None,
        filter_expression: str | None = None,
        expression_names: Mapping[str, str] | None = None,
        expression_values: Mapping[str, Any] | None = None,
        attributes: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[Item]:
        """A cached Scan, tagged with :func:`table_tag` (any write through a view purges it)."""
        consistent = self.consistent_fills and self.table._consistent_ok(index_name)
        search = _Search(
            index_name, filter_expression, expression_names, expression_values, attributes
        )
        params = self.table._scan_params(search, consistent)
        tag = table_tag(self.table.name)
        return await self._cached_search(
            "scan", params, limit, search, {}, tag, consistent, self._scan_metrics
        )

    async def _cached_search(
        self,
        op: str,
        params: dict[str, Any],
        limit: int | None,
        search: _Search,
        query: dict[str, Any],
        tag: str,
        consistent: bool,
        metrics: Metrics,
    ) -> list[Item]:
        """A Query or Scan result, stored under every argument that shapes it."""
        table = self.table
        counts = metrics.counts
        described = search.described(table.name, query, limit)
        identity = result_identity(f"dynamodb.{op}", encode_args(described))

        async def load(_attrs: tuple[str, ...] | None) -> list[Item]:
            return await table._pages(op, dict(params), limit, counts)

        def tags() -> Sequence[str]:
            return (tag,)

        req = _Request(
            self.cache, metrics, self.policy, identity, False, None, load, tags, None, consistent
        )
        result: list[Item] = await self.cache._get(req)
        return result

    # -- writes --------------------------------------------------------------------

    async def _invalidate(self, keys: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        items = list(keys)
        if not items:
            return
        # Shielded: a caller cancelled after its write must still not leave the old item cached.
        with anyio.CancelScope(shield=True):
            count = await self.cache.invalidate_items(items)
        self.metrics.counts["invalidations"] += count

    async def invalidate(self, key: Key) -> None:
        """Invalidate one item: its entry, its lease, and everything tagged with it or its partition.

        Raises:
            InvalidationError: Redis could not be reached.
        """
        await self._invalidate([(self.table.name, await self._key(key))])

    async def _write(
        self, op: str, params: dict[str, Any], touched: list[tuple[str, Mapping[str, Any]]]
    ) -> dict[str, Any]:
        """Call a write; if its outcome is unknown, invalidate before re-raising."""
        try:
            return await self.table._call(op, params, self.metrics.counts)
        except BaseException as exc:
            if not _write_rejected(exc):
                await self._invalidate(touched)
            raise

    async def _after_write(self, key: dict[str, Any], new_item: Item | None) -> None:
        """Store the new item if its version is newer than the cached one, else invalidate."""
        if new_item is not None and await self._write_through(key, new_item):
            self.metrics.counts["write_throughs"] += 1
            with anyio.CancelScope(shield=True):
                await self.cache.purge_tags(change_tags(self.table.name, key))
            return
        if new_item is not None:
            self.metrics.counts["write_throughs_skipped"] += 1
        await self._invalidate([(self.table.name, key)])

    async def _write_through(self, key: dict[str, Any], item: Item) -> bool:
        assert self.version_attribute is not None
        version = _version_text(item.get(self.version_attribute))
        if version is None:
            return False
        cache = self.cache
        req = self._request(key, None, True)
        try:
            fields, expire_ms = _whole_entry(cache, req, None, item, cache._now_ms(), 1.0)
        except (CodecError, _EntryTooLarge):
            return False
        stored = False
        try:
            with anyio.CancelScope(shield=True):
                async with cache._slots.hold(cache._invalidation_wait):
                    stored = await cache._store.write_through(
                        req.entry,
                        req.lease,
                        self.version_attribute.encode(),
                        version,
                        expire_ms,
                        fields,
                    )
        except (RedisError, OSError):
            pass  # the invalidation that follows fails loudly if Redis is down
        if stored:
            # Reads and loads of this entry begun before it was written must
            # not be shared with callers who start after this write returns.
            cache._detach([req.entry])
        return stored

    async def put_item(
        self,
        item: Mapping[str, Any],
        *,
        condition_expression: str | None = None,
        expression_names: Mapping[str, str] | None = None,
        expression_values: Mapping[str, Any] | None = None,
        return_values: str = "NONE",
    ) -> Item | None:
        """PutItem, then invalidate the item (or, with write-through, store it if newer).

        Args:
            item: the whole item, key attributes included.
            condition_expression, expression_names, expression_values: a
                ConditionExpression with its placeholders (plain Python values).
            return_values: ``"NONE"`` or ``"ALL_OLD"``.

        Returns:
            The old item for ``ALL_OLD`` (``None`` if there was none), else ``None``.

        Raises:
            botocore.exceptions.ClientError: DynamoDB's error, unchanged. A
                rejected write (condition failed, validation) leaves the cache
                alone; one whose outcome is unknown invalidates first.
            InvalidationError: the write happened (or may have) but Redis
                could not be told.
        """
        names = await self.table.key_names()
        key = self.table._key_of(item, names)
        serialized = _to_dynamo(item)
        params = self._params(
            {"TableName": self.table.name, "Item": serialized},
            condition_expression,
            expression_names,
            expression_values,
            return_values,
        )
        reply = await self._write("put_item", params, [(self.table.name, key)])
        await self._after_write(key, _from_dynamo(serialized) if self.write_through else None)
        return _attributes(reply, return_values)

    async def update_item(
        self,
        key: Key,
        update_expression: str,
        *,
        condition_expression: str | None = None,
        expression_names: Mapping[str, str] | None = None,
        expression_values: Mapping[str, Any] | None = None,
        return_values: str = "NONE",
    ) -> Item | None:
        """UpdateItem, then invalidate the item (or, with write-through, store the new item if newer).

        With write-through the update asks for ``ALL_NEW`` when
        ``return_values`` is ``"NONE"`` or ``"ALL_NEW"``; with other
        ``return_values`` the item is invalidated instead.

        Returns:
            The attributes ``return_values`` asks for, or ``None``.

        Raises:
            As for :meth:`put_item`.
        """
        clean = await self._key(key)
        through = self.write_through and return_values in ("NONE", "ALL_NEW")
        params = self._params(
            {
                "TableName": self.table.name,
                "Key": _to_dynamo(clean),
                "UpdateExpression": update_expression,
            },
            condition_expression,
            expression_names,
            expression_values,
            "ALL_NEW" if through else return_values,
        )
        reply = await self._write("update_item", params, [(self.table.name, clean)])
        new_item = _attributes(reply, "ALL_NEW") if through else None
        await self._after_write(clean, new_item)
        if return_values == "NONE":
            return None
        return new_item if through else _attributes(reply, return_values)

    async def delete_item(
        self,
        key: Key,
        *,
        condition_expression: str | None = None,
        expression_names: Mapping[str, str] | None = None,
        expression_values: Mapping[str, Any] | None = None,
        return_values: str = "NONE",
    ) -> Item | None:
        """DeleteItem, then invalidate the item.

        Returns:
            The old item for ``ALL_OLD`` (``None`` if there was none), else ``None``.

        Raises:
            As for :meth:`put_item`.
        """
        clean = await self._key(key)
        params = self._params(
            {"TableName": self.table.name, "Key": _to_dynamo(clean)},
            condition_expression,
            expression_names,
            expression_values,
            return_values,
        )
        reply = await self._write("delete_item", params, [(self.table.name, clean)])
        await self._invalidate([(self.table.name, clean)])
        return _attributes(reply, return_values)

    @staticmethod
    def _params(
        base: dict[str, Any],
        condition_expression: str | None,
        expression_names: Mapping[str, str] | None,
        expression_values: Mapping[str, Any] | None,
        return_values: str,
    ) -> dict[str, Any]:
        if return_values not in _RETURN_VALUES:
            raise ConfigError(f"return_values must be one of {sorted(_RETURN_VALUES)}")
        if condition_expression is not None:
            base["ConditionExpression"] = condition_expression
        if expression_names:
            base["ExpressionAttributeNames"] = dict(expression_names)
        if expression_values:
            base["ExpressionAttributeValues"] = _to_dynamo(expression_values)
        if return_values != "NONE":
            base["ReturnValues"] = return_values
        return base

    async def batch_write_item(
        self, *, puts: Iterable[Mapping[str, Any]] = (), deletes: Iterable[Key] = ()
    ) -> None:
        """BatchWriteItem in chunks of 25 (``UnprocessedItems`` retried), then invalidate every key.

        Args:
            puts: whole items to put.
            deletes: keys to delete.

        Raises:
            botocore.exceptions.ClientError: DynamoDB's error, unchanged; keys
                of every chunk that may have been written are invalidated first.
            InvalidationError: Redis could not be told.
        """
        names = await self.table.key_names()
        requests: list[dict[str, Any]] = []
        keys: list[tuple[str, Mapping[str, Any]]] = []
        for item in puts:
            keys.append((self.table.name, self.table._key_of(item, names)))
            requests.append({"PutRequest": {"Item": _to_dynamo(item)}})
        for key in deletes:
            clean = self.table._check_key(key, names)
            keys.append((self.table.name, clean))
            requests.append({"DeleteRequest": {"Key": _to_dynamo(clean)}})
        touched: list[tuple[str, Mapping[str, Any]]] = []
        try:
            for start in range(0, len(requests), _BATCH_WRITE_MAX):
                chunk_keys = keys[start : start + _BATCH_WRITE_MAX]
                touched.extend(chunk_keys)
                try:
                    await self.table._batch_write(
                        requests[start : start + _BATCH_WRITE_MAX], self.metrics.counts
                    )
                except BaseException as exc:
                    if _write_rejected(exc):
                        del touched[-len(chunk_keys) :]
                    raise
        finally:
            await self._invalidate(touched)

    async def transact_write_items(
        self,
        actions: Sequence[Mapping[str, Mapping[str, Any]]],
        *,
        client_request_token: str | None = None,
    ) -> None:
        """TransactWriteItems, then invalidate every item it put, updated or deleted.

        Args:
            actions: DynamoDB's ``TransactItems`` with plain Python values:
                ``{"Put": {"Item": {...}}}``, ``{"Update": {"Key": {...},
                "UpdateExpression": ...}}``, ``{"Delete": {"Key": {...}}}``,
                ``{"ConditionCheck": {"Key": {...}, "ConditionExpression": ...}}``,
                with ``ConditionExpression``, ``ExpressionAttributeNames`` and
                ``ExpressionAttributeValues`` as needed. ``TableName`` defaults
                to this table; other tables' items are invalidated too.
            client_request_token: idempotency token.

        Raises:
            botocore.exceptions.ClientError: DynamoDB's error, unchanged
                (a cancelled transaction leaves the cache alone).
            InvalidationError: Redis could not be told.
        """
        items: list[dict[str, Any]] = []
        touched: list[tuple[str, Mapping[str, Any]]] = []
        for action in actions:
            if len(action) != 1:
                raise ConfigError(
                    "each action is {'Put'|'Update'|'Delete'|'ConditionCheck': {...}}"
                )
            ((kind, body),) = action.items()
            if kind not in ("Put", "Update", "Delete", "ConditionCheck"):
                raise ConfigError(f"unknown transaction action {kind!r}")
            converted = dict(body)
            table_name = converted.setdefault("TableName", self.table.name)
            table = self.table if table_name == self.table.name else self._other(table_name)
            names = await table.key_names()
            if "Item" in converted:
                converted["Item"] = _to_dynamo(body["Item"])
                key: dict[str, Any] = table._key_of(body["Item"], names)
            else:
                key = table._check_key(body["Key"], names)
                converted["Key"] = _to_dynamo(key)
            if body.get("ExpressionAttributeValues"):
                converted["ExpressionAttributeValues"] = _to_dynamo(
                    body["ExpressionAttributeValues"]
                )
            if kind != "ConditionCheck":
                touched.append((table_name, key))
            items.append({kind: converted})
        params: dict[str, Any] = {"TransactItems": items}
        if client_request_token is not None:
            params["ClientRequestToken"] = client_request_token
        await self._write("transact_write_items", params, touched)
        await self._invalidate(touched)

    def _other(self, table_name: str) -> DynamoTable:
        other = self._others.get(table_name)
        if other is None:
            other = self._others[table_name] = DynamoTable(self.table.client, table_name)
        return other


class _EntryTooLarge(Exception):
    """An entry over the cache's ``max_entry_bytes``: not stored."""


def _whole_entry(
    cache: Cache,
    req: _Request,
    attrs: tuple[str, ...] | None,
    value: Item | None,
    now: float,
    delta_ms: float | None,
) -> tuple[dict[bytes, bytes], int]:
    """The fields of an entry that replaces ``req``'s with ``value``, and its pexpire (ms).

    The same fields and deadlines ``Cache._fill`` writes: the attributes
    (``attrs`` of them, or all), the soft deadline less the policy's jitter
    and the hard one (the negative TTL for ``None``), the format, a fresh
    version and, when known, how long the load took (``delta_ms``). Filled
    from batches, write-throughs and stream records.

    Raises:
        CodecError: ``value`` cannot be encoded.
        _EntryTooLarge: the entry would exceed ``cache.max_entry_bytes``.
    """
    fields = cache._encode_fields(req, attrs, value, False)
    if sum(len(k) + len(v) for k, v in fields.items()) > cache.max_entry_bytes:
        raise _EntryTooLarge(req.identity)
    return fields, stamp_entry(fields, req.policy, value is None, now, delta_ms)


def _needs(req: _Request, plan: _Plan | None) -> tuple[str, ...] | None:
    """What a miss must load: the attributes it lacks, or ``None`` for the whole item."""
    if plan is not None and plan.merge_version is not None:
        return with_version(plan.load_attrs, req.version_attr)
    return with_version(req.attrs, req.version_attr)


def _answer(
    value: Item | None, attrs: tuple[str, ...] | None, merged: dict[str, Any] | None
) -> Item | None:
    """What a caller asking for ``attrs`` gets from a loaded item (``merged``: cached attributes)."""
    if value is None or attrs is None:
        return value
    out = {} if merged is None else dict(merged)
    for name in attrs:
        if name in value:
            out[name] = value[name]
    return out


def _attributes(reply: Mapping[str, Any], return_values: str) -> Item | None:
    raw = reply.get("Attributes")
    if return_values == "NONE" or raw is None:
        return None
    return _from_dynamo(raw)
