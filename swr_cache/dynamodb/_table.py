"""``DynamoTable``: one DynamoDB table, uncached (and what its cached view calls on it)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio

from .._batch import first_error_gather as _first_error_gather
from .._cache import Cache
from .._errors import ConfigError, KeyEncodingError
from .._keys import (
    item_identity,
)
from ._common import (
    _BATCH_GET_MAX,
    _CHUNKS_IN_FLIGHT,
    _RESERVED_PREFIX,
    _SORT_OPERATORS,
    Item,
    Key,
    _attribute_list,
    _check_placeholders,
    _chunks,
    _from_dynamo,
    _has_requests,
    _keyable,
    _one_each,
    _projection,
    _to_dynamo,
    _top_names,
    is_throttle,
)

if TYPE_CHECKING:
    from ._cached import CachedTable


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

    def _ops(self) -> _TableOps:
        # The calls are looked up at each use (tests and tools may wrap them).
        return _TableOps(
            get=lambda *a: self._get(*a),
            batch_get=lambda *a: self._batch_get(*a),
            pages=lambda *a: self._pages(*a),
            call=lambda *a: self._call(*a),
            batch_write=lambda *a: self._batch_write(*a),
            check_key=self._check_key,
            key_of=self._key_of,
            consistent_ok=self._consistent_ok,
            query_params=self._query_params,
            scan_params=self._scan_params,
        )

    def _check_key(self, key: Key, names: tuple[str, ...]) -> dict[str, Any]:
        return _check_key(self.name, key, names)

    def _key_of(self, item: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        return _key_of(self.name, item, names)

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
        from ._cached import CachedTable  # (it builds on this module)

        return CachedTable(
            self,
            cache,
            policy,
            ops=self._ops(),
            consistent_fills=consistent_fills,
            write_through=write_through,
            version_attribute=version_attribute,
            name=name,
        )


def _check_key(table: str, key: Key, names: tuple[str, ...]) -> dict[str, Any]:
    """``key`` reduced to exactly the table's key attributes, or KeyEncodingError."""
    if not isinstance(key, Mapping) or len(key) != len(names) or any(n not in key for n in names):
        got = sorted(key) if isinstance(key, Mapping) else type(key).__name__
        raise KeyEncodingError(
            f"a key of table {table!r} has exactly the attributes {list(names)}, got {got}"
        )
    return {n: key[n] for n in names}


def _key_of(table: str, item: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The key of ``item``, or KeyEncodingError when it lacks key attributes."""
    missing = [n for n in names if n not in item]
    if missing:
        raise KeyEncodingError(f"the item lacks key attributes {missing} of table {table!r}")
    return {n: item[n] for n in names}


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


class _TableOps(NamedTuple):
    """What a ``CachedTable`` calls on its ``DynamoTable`` (handed over by ``cached``)."""

    get: Callable[..., Awaitable[Item | None]]
    batch_get: Callable[..., Awaitable[dict[str, Item]]]
    pages: Callable[..., Awaitable[list[Item]]]
    call: Callable[..., Awaitable[dict[str, Any]]]
    batch_write: Callable[..., Awaitable[None]]
    check_key: Callable[[Key, tuple[str, ...]], dict[str, Any]]
    key_of: Callable[[Mapping[str, Any], tuple[str, ...]], dict[str, Any]]
    consistent_ok: Callable[[str | None], bool]
    query_params: Callable[..., dict[str, Any]]
    scan_params: Callable[..., dict[str, Any]]
