"""Writes through a cached table: invalidate (or write through) what they change."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from redis.exceptions import RedisError

from .._cache import Cache
from .._engine_api import Engine, EntryRequest
from .._errors import CodecError, ConfigError
from .._fills import EntryTooLarge
from .._keys import (
    change_tags,
)
from .._metrics import Metrics
from ._common import (
    _BATCH_WRITE_MAX,
    _RETURN_VALUES,
    Item,
    Key,
    _from_dynamo,
    _to_dynamo,
    _version_text,
    _write_rejected,
)
from ._table import DynamoTable, _check_key, _key_of, _TableOps


class _CachedWrites:
    """The writes of a :class:`CachedTable` (a base class of it): each write
    invalidates, or with ``write_through`` stores, what it changes."""

    table: DynamoTable
    cache: Cache
    engine: Engine
    metrics: Metrics
    write_through: bool
    version_attribute: str | None
    _ops: _TableOps
    _others: dict[str, DynamoTable]

    if TYPE_CHECKING:

        def _request(
            self,
            key: dict[str, Any],
            attrs: tuple[str, ...] | None,
            consistent: bool,
            identity: str | None = None,
        ) -> EntryRequest: ...

        async def _key(self, key: Key) -> dict[str, Any]: ...

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
            return await self._ops.call(op, params, self.metrics.counts)
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
        engine = self.engine
        req = self._request(key, None, True)
        try:
            fields, expire_ms = engine.whole_entry(req, None, item, engine.now_ms(), 1.0)
        except (CodecError, EntryTooLarge):
            return False
        stored = False
        try:
            with anyio.CancelScope(shield=True):
                async with engine.slots.hold(engine.invalidation_wait):
                    stored = await engine.store.write_through(
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
            engine.detach([req.entry])
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
        key = self._ops.key_of(item, names)
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
            keys.append((self.table.name, self._ops.key_of(item, names)))
            requests.append({"PutRequest": {"Item": _to_dynamo(item)}})
        for key in deletes:
            clean = self._ops.check_key(key, names)
            keys.append((self.table.name, clean))
            requests.append({"DeleteRequest": {"Key": _to_dynamo(clean)}})
        touched: list[tuple[str, Mapping[str, Any]]] = []
        try:
            for start in range(0, len(requests), _BATCH_WRITE_MAX):
                chunk_keys = keys[start : start + _BATCH_WRITE_MAX]
                touched.extend(chunk_keys)
                try:
                    await self._ops.batch_write(
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
                key: dict[str, Any] = _key_of(table_name, body["Item"], names)
            else:
                key = _check_key(table_name, body["Key"], names)
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


def _attributes(reply: Mapping[str, Any], return_values: str) -> Item | None:
    raw = reply.get("Attributes")
    if return_values == "NONE" or raw is None:
        return None
    return _from_dynamo(raw)
