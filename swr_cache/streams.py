"""DynamoDB Streams: keep the cache true to the table.

Two ways in, one way of applying records:

* :class:`StreamInvalidator` takes stream records as Lambda delivers them
  (``Records[]`` of a DynamoDB stream event, or of a Kinesis Data Streams for
  DynamoDB event), or as ``dynamodbstreams.get_records`` returns them, maps
  each to the cache key the readers use, and invalidates (or, in ``refresh``
  mode, rewrites) the item's entry, its lease and everything tagged with the
  item, its partition or its table (what a write through ``DynamoTable``'s
  cached view purges, so cached queries and scans follow the stream). Its
  :meth:`~StreamInvalidator.lambda_handler` is a plain synchronous Lambda
  handler that reports failures per record.
* :class:`StreamConsumer` reads a table's stream itself through aiobotocore's
  ``dynamodbstreams`` client, for deployments without Lambda: shards in lineage
  order, checkpoints per shard in Redis (written only once records are
  applied), per-shard leases so several consumers split the shards.

Failure semantics. A malformed record (not an object, no keys, an unknown
key type, a bad table ARN) is skipped, counted and logged: retrying it could
never succeed. A record that could not be applied because Redis is down or
slow is *failed*: Lambda retries it (``batchItemFailures``), the consumer does
not checkpoint past it. Records are applied at least once; applying one again
is harmless (an invalidation is idempotent, a refresh is guarded by the
record's sequence number).

Refresh mode writes ``NewImage`` as a whole-item entry with the cache's TTLs
(REMOVE writes a not-found entry), in one Lua script per item that compares
the record's sequence number with a per-item high-water mark as a big
integer, so a late or repeated record never regresses an entry. The entry
lags the table by the stream's delay: a reader that filled the entry from the
table just before an older record arrives sees that record's image until the
newer record follows. Use ``invalidate`` (the default) where that matters.
Records without a usable sequence number (Kinesis-wrapped records, which AWS
may reorder or repeat) are invalidated instead.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Literal

import anyio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._cache import Cache
from ._engine_api import engine_of
from ._errors import (
    CodecError,
    ConfigError,
    InvalidationError,
    KeyEncodingError,
    StreamRecordError,
)
from ._fills import EntryTooLarge
from ._host import CacheHost
from ._keys import from_typed, item_identity, item_tags, table_tag
from ._loads import while_renewing
from ._metrics import Metrics
from ._policy import Policy
from ._store import StreamPut
from .dynamodb._common import _converters, _error_code

__all__ = [
    "StreamConsumer",
    "StreamInvalidator",
    "StreamRecord",
    "StreamReport",
    "parse_record",
    "table_from_arn",
]

log = logging.getLogger("swr_cache.streams")

Mode = Literal["invalidate", "refresh"]

_EVENT_NAMES: Final = frozenset({"INSERT", "MODIFY", "REMOVE"})
# arn:<partition>:dynamodb:<region>:<account>:table/<name>/stream/<label>
_TABLE_ARN: Final = re.compile(r"arn:[^:]+:dynamodb:[^:]*:[^:]*:table/([^/]+)/stream/[^/]+")
_DIGITS: Final = re.compile(r"[0-9]+")
_WRITE: Final = b"w"
_DELETE: Final = b"d"
# A shard read to its end (closed) keeps this as its checkpoint: its children may start.
_SHARD_DONE: Final = "done"
_METRICS_NAME: Final = "swr_cache.streams"


# ---------------------------------------------------------------------------
# Records


def table_from_arn(arn: object) -> str:
    """The table name in a DynamoDB stream ARN.

    Args:
        arn: ``arn:aws:dynamodb:<region>:<account>:table/<name>/stream/<label>``.

    Returns:
        ``<name>``.

    Raises:
        StreamRecordError: ``arn`` is not a DynamoDB stream ARN.
    """
    if isinstance(arn, str):
        match = _TABLE_ARN.fullmatch(arn)
        if match is not None:
            return match.group(1)
    raise StreamRecordError(f"not a DynamoDB stream ARN: {_short(arn)}")


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """One stream record, mapped to the cache.

    Attributes:
        event_name: ``INSERT``, ``MODIFY`` or ``REMOVE``.
        table: The table the record belongs to.
        key: The item's primary key as plain values (str, ``Decimal``, bytes).
        identity: The item's cache identity (the readers' entry).
        tags: ``item_tag`` of the full key and of each non-empty subset of
            its attributes.
        sequence: The stream sequence number (canonical digits) when it can
            order refreshes; ``None`` otherwise.
        item_identifier: What ``batchItemFailures`` names when the record
            fails (the record's sequence number, or the Kinesis sequence
            number of a Kinesis-wrapped record; ``""`` when it had none,
            which Lambda treats as a failure of the whole batch).
        new_image: The typed ``NewImage``, as delivered, or ``None``.
        position: Index of the record in the batch it came in.
    """

    event_name: str
    table: str
    key: dict[str, object]
    identity: str
    tags: tuple[str, ...]
    sequence: str | None
    item_identifier: str
    new_image: Mapping[str, Any] | None = field(default=None, repr=False)
    position: int = 0


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _sequence_text(raw: object) -> str | None:
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return str(raw)
    if isinstance(raw, str) and raw:
        return raw
    return None


def _canonical_sequence(text: str | None) -> str | None:
    """Digits without leading zeros (so length orders them), or ``None``."""
    if text is None or _DIGITS.fullmatch(text) is None:
        return None
    return text.lstrip("0") or "0"


def parse_record(raw: object, *, table: str | None = None, position: int = 0) -> StreamRecord:
    """Map one raw stream record to the cache.

    Accepts a DynamoDB stream record as Lambda delivers it (table from
    ``eventSourceARN``, binary key values base64 text), a Kinesis Data Streams
    for DynamoDB record (``kinesis.data`` base64 JSON with ``tableName``), and
    a record from ``dynamodbstreams.get_records`` (no ARN: pass ``table``;
    binary values are bytes). Numbers are normalised as the readers' keys are
    (``N "10"`` and ``10`` are one item).

    Args:
        raw: The record.
        table: The table, for records that do not name it.
        position: Index of the record in its batch (kept on the result).

    Returns:
        The parsed record.

    Raises:
        StreamRecordError: The record is malformed.
    """
    if not isinstance(raw, Mapping):
        raise StreamRecordError(f"a stream record must be an object, not {type(raw).__name__}")
    kinesis = raw.get("kinesis")
    if kinesis is not None:
        return _parse_kinesis(kinesis, position)
    arn = raw.get("eventSourceARN")
    if arn is not None:
        table = table_from_arn(arn)
    dynamodb = raw.get("dynamodb")
    sequence_text = (
        _sequence_text(dynamodb.get("SequenceNumber")) if isinstance(dynamodb, Mapping) else None
    )
    return _parse_change(
        raw,
        table,
        identifier=sequence_text or "",
        sequence=_canonical_sequence(sequence_text),
        position=position,
    )


def _parse_kinesis(kinesis: object, position: int) -> StreamRecord:
    if not isinstance(kinesis, Mapping):
        raise StreamRecordError("the kinesis section of a record must be an object")
    data = kinesis.get("data")
    if not isinstance(data, str):
        raise StreamRecordError("a Kinesis record without base64 data")
    try:
        inner = json.loads(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and UnicodeDecodeError; JSON nested
        # deeper than the interpreter's recursion limit is malformed too.
        raise StreamRecordError(f"Kinesis data is not base64 JSON: {exc}") from None
    if not isinstance(inner, Mapping):
        raise StreamRecordError("Kinesis data must hold a JSON object")
    table = inner.get("tableName")
    if not isinstance(table, str) or not table:
        raise StreamRecordError("a Kinesis-wrapped DynamoDB record without tableName")
    # AWS may deliver these out of order or twice: they carry no sequence
    # number that could order refreshes, so they are always invalidations.
    identifier = _sequence_text(kinesis.get("sequenceNumber")) or ""
    return _parse_change(inner, table, identifier=identifier, sequence=None, position=position)


def _parse_change(
    raw: Mapping[str, Any],
    table: str | None,
    *,
    identifier: str,
    sequence: str | None,
    position: int,
) -> StreamRecord:
    if not table:
        raise StreamRecordError("the record names no table (no eventSourceARN or tableName)")
    event_name = raw.get("eventName")
    if not isinstance(event_name, str) or event_name not in _EVENT_NAMES:
        raise StreamRecordError(f"unknown eventName {_short(event_name)}")
    dynamodb = raw.get("dynamodb")
    if not isinstance(dynamodb, Mapping):
        raise StreamRecordError("the record has no dynamodb section")
    typed_key = dynamodb.get("Keys")
    if not isinstance(typed_key, Mapping) or not typed_key:
        raise StreamRecordError("the record has no Keys")
    key: dict[str, object] = {}
    for name, value in typed_key.items():
        if not isinstance(name, str) or not name:
            raise StreamRecordError(f"bad key attribute name {_short(name)}")
        try:
            key[name] = from_typed(value)
        except KeyEncodingError as exc:
            raise StreamRecordError(f"key attribute {name!r}: {exc}") from None
    try:
        identity = item_identity(table, key)
        tags = item_tags(table, key)
    except KeyEncodingError as exc:
        raise StreamRecordError(str(exc)) from None
    image = dynamodb.get("NewImage")
    return StreamRecord(
        event_name=event_name,
        table=table,
        key=key,
        identity=identity,
        tags=tags,
        sequence=sequence,
        item_identifier=identifier,
        new_image=image if isinstance(image, Mapping) else None,
        position=position,
    )


def _purged_tags(records: Iterable[StreamRecord]) -> list[str]:
    """The tags applying ``records`` purges, without repeats.

    For each item, what a write through ``DynamoTable``'s cached view purges
    (:func:`swr_cache.dynamodb.change_tags`): its item tags, parsed with the
    record, and its table's tag, which cached scans and index queries carry.
    """
    tags: dict[str, None] = {}
    for record in records:
        tags.update(dict.fromkeys(record.tags))
        tags[table_tag(record.table)] = None
    return list(tags)


def _event_records(event: object) -> Sequence[Any]:
    records = event.get("Records") if isinstance(event, Mapping) else None
    if not isinstance(records, list):
        raise StreamRecordError("not a stream event: it has no Records list")
    return records


def _describe(raw: object) -> str:
    """A short name for a record in log lines (its event id or sequence number)."""
    if isinstance(raw, Mapping):
        dynamodb = raw.get("dynamodb")
        sequence = dynamodb.get("SequenceNumber") if isinstance(dynamodb, Mapping) else None
        for value in (raw.get("eventID"), sequence):
            if isinstance(value, str):
                return value
    return "?"


def _plain_binary(av: Any) -> Any:
    """A typed attribute value with Lambda's base64 binary text (B, BS) as bytes."""
    if not isinstance(av, Mapping) or len(av) != 1:
        raise StreamRecordError(f"not a DynamoDB attribute value: {_short(av)}")
    ((kind, raw),) = av.items()
    if kind == "B" and isinstance(raw, str):
        return {"B": base64.b64decode(raw, validate=True)}
    if kind == "BS" and isinstance(raw, list):
        return {
            "BS": [base64.b64decode(v, validate=True) if isinstance(v, str) else v for v in raw]
        }
    if kind == "M" and isinstance(raw, Mapping):
        return {"M": {k: _plain_binary(v) for k, v in raw.items()}}
    if kind == "L" and isinstance(raw, list):
        return {"L": [_plain_binary(v) for v in raw]}
    return av


def _deserialize_image(image: Mapping[str, Any]) -> dict[str, Any]:
    """``NewImage`` as DynamoTable's reads return items (B as ``bytes``, not boto3 ``Binary``).

    So an entry holds the same types whether a read or a stream record filled it.
    """
    deserializer = _converters()[1]
    return {str(name): deserializer.deserialize(_plain_binary(av)) for name, av in image.items()}


# ---------------------------------------------------------------------------
# Reports


@dataclass(slots=True)
class StreamReport:
    """What one batch did.

    Attributes:
        applied: Records applied (invalidated or refreshed).
        superseded: Of those, refresh-mode records no newer than what the
            cache already reflected (they changed nothing).
        skipped: Malformed records skipped (logged; never retried).
        failed: ``item_identifier`` of each record that could not be applied.
        failed_records: Those records.
        error: Why they failed (the first error).
    """

    applied: int = 0
    superseded: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    failed_records: list[StreamRecord] = field(default_factory=list, repr=False)
    error: BaseException | None = field(default=None, repr=False)

    def batch_item_failures(self) -> dict[str, list[dict[str, str]]]:
        """The Lambda reply for ``ReportBatchItemFailures``.

        Returns:
            ``{"batchItemFailures": [{"itemIdentifier": <sequence number>}, ...]}``.
        """
        return {"batchItemFailures": [{"itemIdentifier": i} for i in self.failed]}


def _is_connection_error(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


async def _drop_connections(client: Any) -> None:
    """Close every pooled connection; the next command opens a fresh one."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        await pool.disconnect()
        return
    get_nodes = getattr(client, "get_nodes", None)  # RedisCluster
    if get_nodes is not None:
        for node in get_nodes():
            await node.disconnect()


async def _no_loader(_attrs: tuple[str, ...] | None) -> Any:
    raise RuntimeError("stream refreshes never load")  # pragma: no cover


# ---------------------------------------------------------------------------
# The invalidator


class StreamInvalidator:
    """Apply DynamoDB stream records to a cache.

    ``handle(event)`` for a Lambda event (in an entered cache),
    ``lambda_handler`` as the Lambda entry point itself (it enters the cache
    on first use), ``handle_records`` for records from elsewhere
    (``StreamConsumer`` uses it).

    Args:
        cache: The cache the readers use.
        mode: ``"invalidate"`` (default) deletes each record's entry and lease
            and purges its item tags and its table's tag (``change_tags``);
            ``"refresh"`` writes ``NewImage`` as the entry instead (REMOVE: a
            not-found entry), guarded by the record's sequence number, and
            purges the tags too.
        policy: TTLs of refreshed entries (default: the cache's), or a
            mapping of table name to policy (tables not in it use the cache's).
        sequence_ttl: Seconds a refreshed item remembers the newest sequence
            number applied to it (never less than its hard TTL). A record
            replayed after that is applied again. Default: a day, a stream's
            retention.
        batch_size: Records per Redis pipeline.
        timeout: Seconds one pipeline may take before its records count as
            failed.

    Raises:
        ConfigError: An unknown mode or a non-positive setting.
    """

    def __init__(
        self,
        cache: Cache,
        mode: Mode = "invalidate",
        *,
        policy: Policy | Mapping[str, Policy] | None = None,
        sequence_ttl: float = 86_400.0,
        batch_size: int = 500,
        timeout: float = 10.0,
    ) -> None:
        if mode not in ("invalidate", "refresh"):
            raise ConfigError(f"mode must be 'invalidate' or 'refresh', not {mode!r}")
        if batch_size < 1 or timeout <= 0 or sequence_ttl <= 0:
            raise ConfigError("batch_size, timeout and sequence_ttl must be positive")
        self.cache = cache
        self.engine = engine_of(cache)
        self.mode: Mode = mode
        self._policy = policy
        self.sequence_ttl = float(sequence_ttl)
        self.batch_size = batch_size
        self.timeout = float(timeout)
        self.metrics: Metrics = cache.metrics.get(_METRICS_NAME)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._host: CacheHost | None = None

    def __repr__(self) -> str:
        return f"StreamInvalidator({self.cache.namespace!r}, mode={self.mode!r})"

    def policy_for(self, table: str) -> Policy:
        """The TTLs refreshed entries of ``table`` get."""
        policy = self._policy
        if isinstance(policy, Policy):
            return policy
        if policy is not None:
            found = policy.get(table)
            if found is not None:
                return found
        return self.cache.policy

    # -- applying ------------------------------------------------------------

    async def handle(self, event: Mapping[str, Any]) -> StreamReport:
        """Apply a Lambda stream event (DynamoDB or Kinesis Data Streams for DynamoDB).

        Args:
            event: The event, ``{"Records": [...]}``.

        Returns:
            The report; ``report.batch_item_failures()`` is the Lambda reply.

        Raises:
            StreamRecordError: ``event`` is not a stream event at all.
            CacheNotEnteredError: refresh mode on a cache never entered.
        """
        return await self.handle_records(_event_records(event))

    async def handle_records(
        self, records: Iterable[Any], *, table: str | None = None
    ) -> StreamReport:
        """Apply raw stream records in order; see :func:`parse_record` for the shapes.

        Args:
            records: The records.
            table: The table, for records that do not name it (those read
                with ``dynamodbstreams.get_records``).

        Returns:
            The report. Malformed records are skipped and counted; records
            that could not be applied are listed as failed, never raised.

        Raises:
            CacheNotEnteredError: refresh mode on a cache never entered.
        """
        if self.mode == "refresh":
            self.engine.require_entered()  # deadlines are in Redis time, measured on entry
        counts = self.metrics.counts
        report = StreamReport()
        parsed: list[StreamRecord] = []
        for position, raw in enumerate(records):
            try:
                parsed.append(parse_record(raw, table=table, position=position))
            except StreamRecordError as exc:
                report.skipped += 1
                counts["stream_records_malformed"] += 1
                log.warning(
                    "swr_cache: skipping malformed stream record %s: %s", _describe(raw), exc
                )
        await self._apply(parsed, report)
        return report

    async def _apply(self, parsed: Sequence[StreamRecord], report: StreamReport) -> None:
        counts = self.metrics.counts
        for start in range(0, len(parsed), self.batch_size):
            chunk = parsed[start : start + self.batch_size]
            try:
                with anyio.fail_after(self.timeout):
                    superseded = await self._apply_chunk(chunk)
            except Exception as exc:
                # Redis down or slow: this chunk and the rest are retried
                # (at least once), so stop here instead of waiting out each.
                rest = parsed[start:]
                report.failed.extend(r.item_identifier for r in rest)
                report.failed_records.extend(rest)
                report.error = exc
                counts["stream_records_failed"] += len(rest)
                if isinstance(exc, (InvalidationError, RedisError)) or _is_connection_error(exc):
                    counts["redis_errors"] += 1
                    log.warning("swr_cache: %d stream records not applied: %r", len(rest), exc)
                else:
                    log.error("swr_cache: %d stream records not applied", len(rest), exc_info=exc)
                return
            report.applied += len(chunk)
            report.superseded += superseded
            counts["stream_records_applied"] += len(chunk)
            counts["stream_records_superseded"] += superseded

    async def _apply_chunk(self, chunk: Sequence[StreamRecord]) -> int:
        cache = self.cache
        engine = self.engine
        tags = _purged_tags(chunk)
        if self.mode == "invalidate":
            identities = list(dict.fromkeys(r.identity for r in chunk))
            await cache.invalidate_identities(identities, tags)
            return 0
        plain: list[str] = []
        puts = []
        ks = engine.keys
        for record in chunk:
            if record.sequence is None:
                plain.append(record.identity)
                continue
            op, fields, expire_ms, seq_ms = self._entry_fields(record)
            keys = (
                ks.entry(record.identity),
                ks.lease(record.identity),
                ks.fence(record.identity),
                ks.seq(record.identity),
            )
            puts.append((keys, record.sequence, seq_ms, expire_ms, op, fields))
        superseded = 0
        if puts:
            async with engine.slots.hold(engine.invalidation_wait):
                replies = await engine.store.stream_put_many(puts)
            # As for an invalidation: this process's reads and loads of these
            # entries begun before the writes are not shared from now on.
            engine.detach(put[0][0] for put in puts)
            counts = self.metrics.counts
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
                if reply == StreamPut.SUPERSEDED:
                    superseded += 1
                elif reply == StreamPut.WRITTEN:
                    counts["fills"] += 1
                else:
                    counts["invalidations"] += 1
        # Records that cannot be ordered are invalidated; tags always go.
        await cache.invalidate_identities(list(dict.fromkeys(plain)), tags)
        return superseded

    def _entry_fields(self, record: StreamRecord) -> tuple[bytes, dict[bytes, bytes], int, int]:
        """``(op, fields, entry pexpire ms, high-water pexpire ms)`` for a refresh."""
        engine = self.engine
        policy = self.policy_for(record.table)
        seq_ms = max(round(self.sequence_ttl * 1000), policy.hard_ms, policy.negative_ms)
        value: dict[str, Any] | None
        if record.event_name == "REMOVE":
            value = None
        elif record.new_image is None:
            # KEYS_ONLY / OLD_IMAGE streams carry no new image: invalidate.
            return _DELETE, {}, 1, seq_ms
        else:
            try:
                value = _deserialize_image(record.new_image)
            except Exception as exc:  # a bad image still invalidates
                log.warning(
                    "swr_cache: NewImage of %s cannot be read (%s); invalidating",
                    record.identity,
                    exc,
                )
                return _DELETE, {}, 1, seq_ms
        req = engine.request(
            metrics=self.metrics,
            policy=policy,
            identity=record.identity,
            is_item=True,
            attrs=None,
            loader=_no_loader,
        )
        try:
            # What an engine fill writes; no load time, so no early refresh.
            fields, expire_ms = engine.whole_entry(req, None, value, engine.now_ms(), None)
        except CodecError as exc:
            log.warning(
                "swr_cache: NewImage of %s cannot be cached (%s); invalidating",
                record.identity,
                exc,
            )
            return _DELETE, {}, 1, seq_ms
        except EntryTooLarge:
            self.metrics.counts["fills_skipped_too_large"] += 1
            return _DELETE, {}, 1, seq_ms
        return _WRITE, fields, expire_ms, seq_ms

    # -- Lambda ----------------------------------------------------------------

    def lambda_handler(self, event: Mapping[str, Any], context: object = None) -> dict[str, Any]:
        """A synchronous AWS Lambda handler for DynamoDB stream events.

        Configure the event source mapping with ``ReportBatchItemFailures``.
        The handler keeps one private event loop for the container's life (an
        ``asyncio.run`` per call would strand pooled connections on warm
        starts), enters the cache on first use, and after a connection error
        drops the pooled connections and retries the failed records once (a
        thawed container's sockets may be dead).

        Args:
            event: The Lambda event.
            context: The Lambda context (unused).

        Returns:
            ``{"batchItemFailures": [{"itemIdentifier": <SequenceNumber>}, ...]}``.

        Raises:
            StreamRecordError: ``event`` is not a stream event at all.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.new_event_loop()
        report = loop.run_until_complete(self._invoke(event))
        return report.batch_item_failures()

    async def _invoke(self, event: Mapping[str, Any]) -> StreamReport:
        records = _event_records(event)
        host = self._host
        if host is None or not host.alive:
            if self.engine.entered and host is None:
                raise RuntimeError(
                    "lambda_handler enters its cache itself; do not enter the cache elsewhere"
                )
            host = self._host = CacheHost(self.cache)
            await host.start()
        report = await self.handle_records(records)
        if report.failed_records and _is_connection_error(report.error):
            log.info("swr_cache: reconnecting to Redis and retrying %d records", len(report.failed))
            with contextlib.suppress(RedisError, OSError):
                await _drop_connections(self.cache.client)
            retry = StreamReport()
            self.metrics.counts["stream_records_failed"] -= len(report.failed_records)
            await self._apply(report.failed_records, retry)
            report.applied += retry.applied
            report.superseded += retry.superseded
            report.failed = retry.failed
            report.failed_records = retry.failed_records
            report.error = retry.error
        return report

    def close(self) -> None:
        """Leave the cache the Lambda handler entered and close its event loop.

        A Lambda container never needs this; tests and scripts that call
        ``lambda_handler`` do.
        """
        loop, self._loop = self._loop, None
        host, self._host = self._host, None
        if loop is None or loop.is_closed():
            return
        try:
            if host is not None:
                loop.run_until_complete(host.stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


# ---------------------------------------------------------------------------
# The consumer


class _LeaseLost(Exception):
    """Another consumer owns the shard now: stop reading it."""


class StreamConsumer:
    """Read a DynamoDB stream and apply it to the cache, without Lambda.

    Lists the stream's shards, reads each (a parent to its end before its
    children) from its checkpoint (``AFTER_SEQUENCE_NUMBER``) or from
    ``TRIM_HORIZON``, applies the records through the invalidator, and only
    then moves the shard's checkpoint in Redis, so records are applied at
    least once. Consumers in several processes split the shards: each shard
    is read under a lease in Redis (SET NX PX with a token, renewed while the
    consumer works), so no two read one shard at once; a consumer that dies
    lets its leases expire. Expired iterators are renewed from the
    checkpoint; if the stream trimmed records before they were read, the
    shard restarts at ``TRIM_HORIZON`` (counted as ``stream_trimmed``).

    Use it inside ``async with cache:``. ``swr-cache consume-stream`` runs one.

    Args:
        invalidator: Applies the records (its mode decides invalidate or refresh).
        streams_client: An aiobotocore ``dynamodbstreams`` client.
        stream_arn: The stream's ARN (``LatestStreamArn`` of the table).
        table: The table, if the ARN does not say (it normally does).
        lease_ttl: Seconds a shard lease lives without renewal.
        checkpoint_ttl: Seconds a checkpoint outlives its last write (longer
            than the stream's 24 h retention).
        batch_limit: ``Limit`` of each ``GetRecords`` call.
        max_batches: ``GetRecords`` calls per shard per poll (others get a turn).
        max_shards: At most this many shards leased at once (``None``: no cap).
        idle_wait, max_idle_wait: ``run()``'s pause after a poll that found
            nothing, doubling up to the maximum.

    Raises:
        ConfigError: No table can be told, or a non-positive setting.
    """

    def __init__(
        self,
        invalidator: StreamInvalidator,
        streams_client: Any,
        stream_arn: str,
        *,
        table: str | None = None,
        lease_ttl: float = 30.0,
        checkpoint_ttl: float = 2 * 86_400.0,
        batch_limit: int = 1000,
        max_batches: int = 100,
        max_shards: int | None = None,
        idle_wait: float = 0.5,
        max_idle_wait: float = 5.0,
    ) -> None:
        if table is None:
            try:
                table = table_from_arn(stream_arn)
            except StreamRecordError as exc:
                raise ConfigError(f"{exc}; pass table=") from None
        if min(lease_ttl, checkpoint_ttl, idle_wait, max_idle_wait) <= 0:
            raise ConfigError("lease_ttl, checkpoint_ttl, idle_wait and max_idle_wait must be > 0")
        if batch_limit < 1 or max_batches < 1 or (max_shards is not None and max_shards < 1):
            raise ConfigError("batch_limit, max_batches and max_shards must be >= 1")
        self.invalidator = invalidator
        self.cache = invalidator.cache
        self.engine = invalidator.engine
        self.client = streams_client
        self.stream_arn = stream_arn
        self.table = table
        self.lease_ms = max(1, round(lease_ttl * 1000))
        self.checkpoint_ms = max(1, round(checkpoint_ttl * 1000))
        self.batch_limit = min(batch_limit, 1000)
        self.max_batches = max_batches
        self.max_shards = max_shards
        self.idle_wait = float(idle_wait)
        self.max_idle_wait = float(max_idle_wait)
        self.metrics = invalidator.metrics
        # Identifies this consumer in its leases.
        self.token = os.urandom(12).hex()
        self._iterators: dict[str, str] = {}
        self._held: set[str] = set()
        self._stopping = False
        self._wake: anyio.Event | None = None

    def __repr__(self) -> str:
        return f"StreamConsumer({self.stream_arn!r}, table={self.table!r})"

    @property
    def held_shards(self) -> frozenset[str]:
        """The shards this consumer holds leases on."""
        return frozenset(self._held)

    # -- Redis -----------------------------------------------------------------

    async def _redis(self, call: Callable[[], Any]) -> Any:
        engine = self.engine
        async with engine.slots.hold(engine.invalidation_wait):
            return await call()

    async def _claim(self, shard_id: str) -> bool:
        key = self.engine.keys.shard_lease(self.stream_arn, shard_id)
        got = await self._redis(
            lambda: self.engine.store.claim_shard(key, self.token, self.lease_ms)
        )
        if got:
            self._held.add(shard_id)
        else:
            self._forget(shard_id)
        return bool(got)

    def _forget(self, shard_id: str) -> None:
        self._held.discard(shard_id)
        self._iterators.pop(shard_id, None)

    async def _checkpoint(self, shard_id: str, value: str) -> None:
        ks = self.engine.keys
        ck, lease = (
            ks.checkpoint(self.stream_arn, shard_id),
            ks.shard_lease(self.stream_arn, shard_id),
        )
        ok = await self._redis(
            lambda: self.engine.store.write_checkpoint(
                ck, lease, self.token, value, self.checkpoint_ms, self.lease_ms
            )
        )
        if not ok:
            self._forget(shard_id)
            raise _LeaseLost(shard_id)

    async def release(self) -> None:
        """Give up every shard lease this consumer holds (others may take them at once)."""
        self._iterators.clear()
        for shard_id in list(self._held):
            await self.release_shard(shard_id)

    async def _renew_forever(self, shard_id: str) -> None:
        """Keep a shard's lease alive while a batch is applied (Redis may be slow)."""
        key = self.engine.keys.shard_lease(self.stream_arn, shard_id)
        while True:
            await anyio.sleep(self.lease_ms / 3000.0)
            with contextlib.suppress(RedisError, OSError):
                await self._redis(
                    lambda: self.engine.store.renew_lease(key, self.token, self.lease_ms)
                )

    # -- AWS -------------------------------------------------------------------

    async def _shards(self) -> list[Mapping[str, Any]]:
        shards: list[Mapping[str, Any]] = []
        start: str | None = None
        while True:
            kwargs: dict[str, Any] = {"StreamArn": self.stream_arn}
            if start is not None:
                kwargs["ExclusiveStartShardId"] = start
            reply = await self.client.describe_stream(**kwargs)
            description = reply["StreamDescription"]
            shards.extend(description.get("Shards") or ())
            start = description.get("LastEvaluatedShardId")
            if not start:
                return shards

    async def _iterator(self, shard_id: str, checkpoint: str | None) -> str | None:
        """A shard iterator after the checkpoint (or at the trim horizon); ``None``: shard gone."""
        kwargs: dict[str, Any] = {"StreamArn": self.stream_arn, "ShardId": shard_id}
        if checkpoint is not None:
            kwargs["ShardIteratorType"] = "AFTER_SEQUENCE_NUMBER"
            kwargs["SequenceNumber"] = checkpoint
        else:
            kwargs["ShardIteratorType"] = "TRIM_HORIZON"
        try:
            reply = await self.client.get_shard_iterator(**kwargs)
        except Exception as exc:
            code = _error_code(exc)
            if code == "TrimmedDataAccessException" and checkpoint is not None:
                self._trimmed(shard_id)
                return await self._iterator(shard_id, None)
            if code == "ResourceNotFoundException":
                log.warning("swr_cache: shard %s is gone from the stream", shard_id)
                return None
            raise
        iterator = reply.get("ShardIterator")
        return iterator if isinstance(iterator, str) else None

    def _trimmed(self, shard_id: str) -> None:
        self.metrics.counts["stream_trimmed"] += 1
        log.warning(
            "swr_cache: records of shard %s were trimmed from the stream before they were read; "
            "restarting it at TRIM_HORIZON (entries changed meanwhile live until their hard TTL)",
            shard_id,
        )

    # -- polling -----------------------------------------------------------------

    async def poll_once(self) -> int:
        """Read every shard this consumer can lease to its current end once, apply, checkpoint.

        A parent shard is read to its end before its children; children of a
        shard that closes during the poll are read in the same poll.

        Returns:
            The number of records applied.

        Raises:
            Exception: The first error met (AWS or Redis), after the other
                shards were read; nothing past a failed record is checkpointed.
        """
        shards = await self._shards()
        by_id = {s["ShardId"]: s for s in shards if isinstance(s.get("ShardId"), str)}
        checkpoints = await self._checkpoints(list(by_id))
        done = {i for i, v in checkpoints.items() if v == _SHARD_DONE}
        # Shards we stopped seeing are gone (trimmed): let go of them.
        for shard_id in list(self._held):
            if shard_id not in by_id:
                self._forget(shard_id)
        pending = [i for i in by_id if i not in done]
        applied = 0
        errors: list[BaseException] = []
        progress = True
        while progress and pending and not self._stopping:
            progress = False
            for shard_id in self._ready(pending, by_id, done):
                count, closed = await self._poll_counted(shard_id, checkpoints[shard_id], errors)
                applied += count
                if closed:
                    done.add(shard_id)
                    progress = True
        if errors:
            raise errors[0]
        return applied

    async def _checkpoints(self, ids: list[str]) -> dict[str, str | None]:
        """Each shard's checkpoint (a sequence number, the done mark, or None)."""
        ks = self.engine.keys
        raw = await self._redis(
            lambda: self.engine.store.read_many([ks.checkpoint(self.stream_arn, i) for i in ids])
        )
        return {i: None if v is None else v.decode() for i, v in zip(ids, raw, strict=True)}

    def _ready(
        self, pending: list[str], by_id: Mapping[str, Mapping[str, Any]], done: set[str]
    ) -> Iterator[str]:
        """Take off ``pending`` the shards to read now: parents first, within ``max_shards``."""
        for shard_id in list(pending):
            if self._stopping:
                return
            parent = by_id[shard_id].get("ParentShardId")
            if parent in by_id and parent not in done:
                continue  # its parent's records come first
            pending.remove(shard_id)
            if (
                self.max_shards is not None
                and shard_id not in self._held
                and len(self._held) >= self.max_shards
            ):
                continue
            yield shard_id

    async def _poll_counted(
        self, shard_id: str, checkpoint: str | None, errors: list[BaseException]
    ) -> tuple[int, bool]:
        """``_poll_shard``, with a lost lease skipped and other errors kept for the end."""
        try:
            return await self._poll_shard(shard_id, checkpoint)
        except _LeaseLost:
            log.info("swr_cache: lost the lease of shard %s to another consumer", shard_id)
        except Exception as exc:
            self._iterators.pop(shard_id, None)
            log.warning("swr_cache: reading shard %s failed: %r", shard_id, exc)
            errors.append(exc)
        return 0, False

    async def _poll_shard(self, shard_id: str, checkpoint: str | None) -> tuple[int, bool]:
        """Read one shard to its current end. Returns ``(records applied, closed and done)``."""
        if not await self._claim(shard_id):
            return 0, False
        last = checkpoint if checkpoint is not None and _DIGITS.fullmatch(checkpoint) else None
        iterator = self._iterators.pop(shard_id, None)
        fresh = iterator is None
        if iterator is None:
            iterator = await self._iterator(shard_id, last)
        applied = 0
        batches = 0
        while iterator is not None:
            if batches >= self.max_batches or self._stopping:
                self._iterators[shard_id] = iterator
                return applied, False
            batches += 1
            try:
                reply = await self.client.get_records(
                    ShardIterator=iterator, Limit=self.batch_limit
                )
            except Exception as exc:
                code = _error_code(exc)
                if code == "ExpiredIteratorException" and not fresh:
                    self.metrics.counts["stream_iterators_expired"] += 1
                    iterator, fresh = await self._iterator(shard_id, last), True
                    continue
                if code == "TrimmedDataAccessException":
                    self._trimmed(shard_id)
                    last = None
                    iterator, fresh = await self._iterator(shard_id, None), True
                    continue
                raise
            fresh = False
            records = reply.get("Records") or []
            next_iterator = reply.get("NextShardIterator")
            if records:
                count, seq = await self._apply_batch(shard_id, records)
                applied += count
                last = seq or last
            if not isinstance(next_iterator, str):
                # Closed and read to its end: its children may start.
                await self._checkpoint(shard_id, _SHARD_DONE)
                await self.release_shard(shard_id)
                return applied, True
            iterator = next_iterator
            if not records:
                break  # caught up with the open shard
        if iterator is None:
            # Gone from the stream (trimmed away): nothing left to read.
            await self._checkpoint(shard_id, _SHARD_DONE)
            await self.release_shard(shard_id)
            return applied, True
        self._iterators[shard_id] = iterator
        return applied, False

    async def _apply_batch(self, shard_id: str, records: list[Any]) -> tuple[int, str | None]:
        """Apply one GetRecords batch and checkpoint past what applied.

        Returns the records applied and the new checkpoint (``None``: unchanged).
        Raises the first failed record's error, after checkpointing before it:
        it is read again next time.
        """
        report = await self._apply_renewing(shard_id, records)
        cut = report.failed_records[0].position if report.failed_records else len(records)
        seq = _last_sequence(records[:cut])
        if seq is not None:
            await self._checkpoint(shard_id, seq)
        if report.failed_records:
            assert report.error is not None
            raise report.error
        return report.applied, seq

    async def _apply_renewing(self, shard_id: str, records: list[Any]) -> StreamReport:
        """Apply a batch while a sibling task keeps the shard's lease alive."""
        return await while_renewing(
            partial(self.invalidator.handle_records, records, table=self.table),
            partial(self._renew_forever, shard_id),
        )

    async def release_shard(self, shard_id: str) -> None:
        """Give up the lease of one shard."""
        self._forget(shard_id)
        key = self.engine.keys.shard_lease(self.stream_arn, shard_id)
        with contextlib.suppress(RedisError, OSError):
            await self._redis(lambda: self.engine.store.release_lease(key, self.token))

    async def run(self) -> None:
        """Poll until :meth:`stop`: at once while records flow, backing off when idle.

        Errors are logged and retried after a pause. Leaves after the batch
        in hand when stopped, and releases its shard leases.
        """
        self._wake = anyio.Event()
        if self._stopping:  # stopped before it started (a signal during start-up)
            self._wake.set()
        delay = self.idle_wait
        try:
            while not self._stopping:
                try:
                    applied = await self.poll_once()
                except Exception as exc:
                    log.warning("swr_cache: stream poll failed: %r", exc)
                    applied = 0
                if self._stopping:
                    break
                if applied:
                    delay = self.idle_wait
                    continue
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                delay = min(delay * 2, self.max_idle_wait)
        finally:
            with anyio.CancelScope(shield=True):
                await self.release()
            self._wake = None

    def stop(self) -> None:
        """Ask :meth:`run` (and a poll in progress) to stop after the current batch.

        Final: a stopped consumer's ``run()`` and ``poll_once()`` return at once.
        """
        self._stopping = True
        if self._wake is not None:
            self._wake.set()


def _last_sequence(records: Sequence[Any]) -> str | None:
    for raw in reversed(records):
        if isinstance(raw, Mapping):
            dynamodb = raw.get("dynamodb")
            if isinstance(dynamodb, Mapping):
                # As AWS wrote it: AFTER_SEQUENCE_NUMBER takes it back verbatim.
                seq = _sequence_text(dynamodb.get("SequenceNumber"))
                if seq is not None and _DIGITS.fullmatch(seq):
                    return seq
    return None
