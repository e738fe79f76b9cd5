"""``CachedTable``: reads of a DynamoDB table through the cache (writes in ``_writes``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .._cache import Cache
from .._engine_api import EntryRequest, engine_of
from .._entry import normalize_attributes
from .._errors import ConfigError
from .._keys import (
    encode_args,
    item_identity,
    item_tag,
    result_identity,
    table_tag,
)
from .._metrics import Metrics
from .._policy import Policy
from ._common import Item, Key, _keyable, _one_each
from ._table import DynamoTable, _Search, _TableOps
from ._writes import _CachedWrites

_IDENTS_KEPT = 4096  # remembered key identities per cached table (see CachedTable._identity)


class CachedTable(_CachedWrites):
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
        ops: _TableOps,
        consistent_fills: bool,
        write_through: bool,
        version_attribute: str | None,
        name: str | None,
    ) -> None:
        self.table = table
        self._ops = ops
        self.cache = cache
        self.engine = engine_of(cache)
        self.policy = policy
        self.consistent_fills = consistent_fills
        self.write_through = write_through
        self.version_attribute = version_attribute
        self.name = name or f"dynamodb:{table.name}"
        self.metrics: Metrics = cache.metrics.get(self.name, table.name)
        self._query_metrics: Metrics = cache.metrics.get(f"{self.name}.query", table.name)
        self._scan_metrics: Metrics = cache.metrics.get(f"{self.name}.scan", table.name)
        self._others: dict[str, DynamoTable] = {}
        # Key values (all text) -> identity, entry key and key, for batches (see _identity).
        self._idents: dict[Any, tuple[str, str, dict[str, Any]]] = {}

    def __repr__(self) -> str:
        return f"<CachedTable {self.table.name!r} on {self.cache.namespace!r}>"

    # -- requests ------------------------------------------------------------------

    def _identity(self, key: Key, names: tuple[str, ...]) -> tuple[str, str, dict[str, Any]]:
        """A key's identity, entry key and the key reduced to the table's attributes.

        Keys of text values only are remembered (bounded): a batch of keys
        read before costs a dict lookup each, not the key's validation and
        canonical encoding again. (The reduced key is shared: it is only read.)
        """
        memo_key: Any = None
        if type(key) is dict and len(key) == len(names):
            if len(names) == 1:
                value = key.get(names[0])
                memo_key = value if type(value) is str else None
            else:
                first, second = key.get(names[0]), key.get(names[1])
                if type(first) is str and type(second) is str:
                    memo_key = (first, second)
            if memo_key is not None:
                known = self._idents.get(memo_key)
                if known is not None:
                    return known
        clean = self._ops.check_key(key, names)
        ident = item_identity(self.table.name, clean)
        entry = self.engine.keys.entry(ident)
        if memo_key is not None:
            if len(self._idents) >= _IDENTS_KEPT:
                self._idents.clear()
            self._idents[memo_key] = (ident, entry, clean)
        return ident, entry, clean

    def _request(
        self,
        key: dict[str, Any],
        attrs: tuple[str, ...] | None,
        consistent: bool,
        identity: str | None = None,
    ) -> EntryRequest:
        get = self._ops.get
        counts = self.metrics.counts

        async def load(load_attrs: tuple[str, ...] | None) -> Item | None:
            return await get(key, load_attrs, consistent, counts)

        return self.engine.request(
            metrics=self.metrics,
            policy=self.policy,
            identity=item_identity(self.table.name, key) if identity is None else identity,
            is_item=True,
            attrs=attrs,
            loader=load,
            consistent=consistent,
            version_attr=self.version_attribute,
        )

    async def _key(self, key: Key) -> dict[str, Any]:
        return self._ops.check_key(key, await self.table.key_names())

    # -- reads -----------------------------------------------------------------------

    async def get_item(
        self, key: Key, attributes: Sequence[str] | None = None, consistent_read: bool = False
    ) -> Item | None:
        """Read one item through the cache.

        Args:
            key: the primary key, e.g. ``{"pk": "u1"}``.
            attributes: only these top-level attributes (one round trip; missing
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
            result: Item | None = await self.engine.consistent_get(
                self._request(clean, attrs, True)
            )
            return result
        return await self.engine.get(self._request(clean, attrs, self.consistent_fills))  # type: ignore[no-any-return]

    async def peek(
        self, key: Key, attributes: Sequence[str] | None = None
    ) -> tuple[Item | None, str] | None:
        """The cached item and its state (``"fresh"``/``"stale"``) without loading, or ``None``."""
        clean = await self._key(key)
        got: tuple[Item | None, str] | None = await self.engine.peek(
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
        self.engine.require_entered()
        names = await self.table.key_names()
        attrs = normalize_attributes(attributes)
        keymap: dict[str, dict[str, Any]] = {}
        idents = []
        entry_of: dict[str, str] = {}
        for key in keys:
            ident, entry, clean = self._identity(key, names)
            idents.append(ident)
            if ident not in keymap:
                keymap[ident] = clean
                entry_of[ident] = entry
        batch_get = self._ops.batch_get
        consistent = self.consistent_fills
        counts = self.metrics.counts

        async def load_many(
            loading: Sequence[EntryRequest], load_attrs: tuple[str, ...] | None
        ) -> dict[str, Item]:
            return await batch_get(
                [keymap[req.identity] for req in loading], load_attrs, consistent, counts
            )

        firsts = list(keymap)
        engine = self.engine
        if attrs is None:  # whole items: a request only where a fresh hit does not answer
            values, loaded = await engine.get_items(
                [entry_of[ident] for ident in firsts],
                lambda i: self._request(keymap[firsts[i]], None, consistent, firsts[i]),
                load_many,
                self.metrics,
                self.policy,
            )
            return _one_each(idents, dict(zip(firsts, values, strict=True)), None), loaded
        reqs = [self._request(keymap[ident], attrs, consistent, ident) for ident in firsts]
        results, loaded = await engine.get_many(reqs, load_many)
        return _one_each(idents, results, None), loaded

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
        names = await self.table.key_names()
        if not isinstance(partition, Mapping) or len(partition) != 1:
            raise ConfigError("partition must be {partition_key_name: value}")
        ((pk_name, _),) = partition.items()
        tag = (
            item_tag(self.table.name, partition) if pk_name in names else table_tag(self.table.name)
        )
        consistent = (
            self.consistent_fills and self._ops.consistent_ok(index_name) and pk_name == names[0]
        )
        search = _Search(
            index_name, filter_expression, expression_names, expression_values, attributes
        )
        params = self._ops.query_params(partition, sort, scan_forward, search, consistent)
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
        consistent = self.consistent_fills and self._ops.consistent_ok(index_name)
        search = _Search(
            index_name, filter_expression, expression_names, expression_values, attributes
        )
        params = self._ops.scan_params(search, consistent)
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
        pages = self._ops.pages
        counts = metrics.counts
        described = search.described(table.name, query, limit)
        identity = result_identity(f"dynamodb.{op}", encode_args(described))

        async def load(_attrs: tuple[str, ...] | None) -> list[Item]:
            return await pages(op, dict(params), limit, counts)

        def tags() -> Sequence[str]:
            return (tag,)

        req = self.engine.request(
            metrics=metrics,
            policy=self.policy,
            identity=identity,
            is_item=False,
            attrs=None,
            loader=load,
            tags=tags,
            consistent=consistent,
        )
        result: list[Item] = await self.engine.get(req)
        return result
