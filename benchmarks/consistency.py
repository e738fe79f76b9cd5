"""Randomized consistency checker: concurrent readers, writers and stream invalidations.

Everything is real: a redis-server, moto's DynamoDB server over HTTP through
aiobotocore (Streams included), the swr_cache engine, ``@cached_item``
accessors, ``DynamoTable`` cached views and ``StreamConsumer``. Many
concurrent workers run a seeded plan of operations on a few hot items:

* reads, whole or a projection (``["v"]``, ``["w"]``, ``["v", "w"]``,
  ``["v", "p"]``), and batch reads through ``DynamoTable``;
* writes: ``UpdateItem`` with ``ADD v :one, w :one`` (so each item carries
  a version raised on every write, and ``v == w`` in every item the table
  holds), then, depending on the mode, an invalidation, a guarded
  write-through, or nothing (the stream tells). One write per item is in
  flight at a time (in ``processes`` mode each process writes its own share
  of the items): moto applies an UpdateItem attribute by attribute without a
  lock, so concurrent updates of one item can lose an increment, which real
  DynamoDB never does. Replies and final items with ``v != w`` are counted
  as origin anomalies (the verdicts then cannot be trusted).

Every origin load (the accessor's GetItem, and the view's GetItem and
BatchGetItem through a wrapped client) sleeps a random time before and/or
after reading DynamoDB, so loads straddle writes: this is what exercises
single flight, leases and fences.

Definitions (``time.monotonic``, one clock for every process on the host):

* a write *completed* when its DynamoDB call and its invalidation (or
  write-through) both returned;
* a *stale read after a completed write* is a read that **started** after a
  write of its item completed and returned an older version (an item read
  as absent has version 0; a read that returns ``v`` and ``w`` returns the
  older of the two). Target: 0 in every mode that invalidates synchronously;
* a *torn read* returned ``v != w``: attributes of two versions in one answer.
  moto may serve an item in the middle of an UpdateItem, so torn pairs that
  some origin read returned are told apart from those the cache put together;
* staleness of a stale read: how long after the first write it missed had
  completed the read started. In ``stream`` mode also the *invalidation
  lag*: from a write's completion to the consumer having applied its record;
* after quiescence (workers done, background refreshes drained, the stream
  read to its end) every cached entry, read raw from Redis and decoded with
  swr_cache's codec (and cross-checked with ``peek``), must equal the item
  in the table (``ConsistentRead``); not-found entries must match absent items.

Modes:

* ``sync``: ``@cached_item`` readers; writers call DynamoDB, then
  ``cache.invalidate_item`` (the default write path of the design).
* ``table``: ``DynamoTable.cached`` readers (single and batch) and writers
  (``update_item`` invalidates).
* ``write_through``: as ``table`` with ``write_through=True`` (version ``v``).
* ``stream``: ``@cached_item`` readers; writers only write DynamoDB; a
  ``StreamConsumer`` reading moto's stream is the only invalidation. Stale
  reads are expected here: the report gives their staleness and the lag.
  A read begun after the consumer applied a write's record must not miss it.
* ``stream_versioned``: as ``stream`` with ``version_attribute="v"`` on the
  readers: projections never mix two versions (torn reads target 0).
* ``processes``: two processes share Redis and DynamoDB, each mixing the
  ``sync`` and ``table`` readers and writers at random.
* ``near``: as ``processes`` with a ``NearCache`` in every process. A read
  after a completed write *of its own process* must never be stale (own
  invalidations drop the copies before they return); a read in another
  process may be, until Redis' tracking announcement arrives: the report
  splits the two and gives that cross-process window (p50/p99).

    python benchmarks/consistency.py [--quick] [--modes sync,stream] [--ops 10000] [--seed 1] [--json FILE]

The plan of operations and the random delays come from ``--seed``; the
interleaving is up to the scheduler, so two runs with one seed are alike but
not identical. The exit status is 1 when a mode that promises consistency saw
a stale read after a completed write (in ``stream`` mode: after the record
was applied), when an entry differs from the table, or on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SCRIPT = os.path.abspath(__file__)
HERE = os.path.dirname(SCRIPT)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _common import MotoProcess, finish, percentile, say, start_redis, table  # noqa: E402

from swr_cache import (  # noqa: E402
    Cache,
    DynamoTable,
    NearCache,
    StreamConsumer,
    StreamInvalidator,
    _codec,
    cached_item,
)
from swr_cache._keys import KeySpace, item_identity  # noqa: E402

MODES = ("sync", "table", "write_through", "stream", "stream_versioned", "processes", "near")
#: Modes whose writers invalidate (or write through) before returning: 0 stale reads expected.
SYNC_MODES = frozenset({"sync", "table", "write_through", "processes"})
PROJECTIONS: tuple[tuple[str, ...] | None, ...] = (
    None,
    None,
    ("v",),
    ("w",),
    ("v", "w"),
    ("v", "p"),
)
UPDATE = "ADD v :one, w :one SET p = :p"
REGION = "us-east-1"
BUCKET_S = 0.25  # width of a time bucket in the staleness chart

# ---------------------------------------------------------------------------
# Configuration and records


@dataclass
class Config:
    """One run of one mode (all of it JSON-serialisable: worker processes get it on argv)."""

    mode: str
    ops: int = 10_000
    keys: int = 8
    seeded: float = 0.75  # fraction of the items that exist before the run
    workers: int = 32
    write_fraction: float = 0.2
    batch_fraction: float = 0.05  # of operations, in modes with DynamoTable readers
    batch_size: int = 3
    delay_chance: float = 0.5  # chance of a delay before, and (independently) after, a load's read
    max_delay_ms: float = 20.0
    gap_chance: float = 0.3  # chance of a pause (up to 2 ms) before an operation
    soft_ttl: float = 0.25
    hard_ttl: float = 60.0
    stream_soft_ttl: float = 600.0  # stream mode: entries stay fresh, only the stream can help
    stream_poll_ms: float = 50.0
    processes: int = 2
    seed: int = 1
    table: str = "Consistency"
    namespace: str = "consistency"
    flavor: str = ""  # set by the mode: "sync", "table", "write_through", "stream" or "mixed"
    index: int = 0  # worker process number
    version_attribute: str | None = None  # readers' version_attribute ("v" to guard merges)
    near: bool = False  # a NearCache in every process (the near mode)


@dataclass
class Read:
    key: int
    t0: float
    t1: float
    got: int  # version returned (0: no item); the older of v and w when both came back
    torn: bool
    pair: str  # "v/w" as returned ("-" for an attribute not returned)
    flight_at_start: bool  # an in-process load of this entry was under way when the read began
    read_at_start: bool  # an in-process Redis read of this entry was under way when the read began
    via: str
    attrs: str = ""  # the projection asked for ("" = the whole item)
    proc: int = 0


@dataclass
class Write:
    key: int
    version: int
    t0: float
    t_written: float  # DynamoDB returned
    t1: float  # the invalidation / write-through returned too: the write completed
    via: str
    proc: int = 0


@dataclass
class Load:
    key: int
    t0: float
    t_read: float  # DynamoDB answered
    version: int
    t1: float  # handed back to the cache
    pair: str = ""  # "v/w" as DynamoDB returned them
    proc: int = 0


@dataclass
class Records:
    reads: list[Read] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    applied: dict[tuple[int, int], float] = field(
        default_factory=dict
    )  # stream: (key, version) -> applied
    counters: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    started: float = 0.0
    ended: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "reads": [asdict(r) for r in self.reads],
            "writes": [asdict(w) for w in self.writes],
            "loads": [asdict(x) for x in self.loads],
            "errors": self.errors,
            "applied": [[k, v, t] for (k, v), t in self.applied.items()],
            "counters": dict(self.counters),
            "started": self.started,
            "ended": self.ended,
        }

    def merge_json(self, data: Mapping[str, Any]) -> None:
        self.reads += [Read(**r) for r in data["reads"]]
        self.writes += [Write(**w) for w in data["writes"]]
        self.loads += [Load(**x) for x in data["loads"]]
        self.errors += list(data["errors"])
        for k, v, t in data["applied"]:
            self.applied[(k, v)] = t
        for name, n in data["counters"].items():
            self.counters[name] += n
        self.started = min(self.started or data["started"], data["started"])
        self.ended = max(self.ended, data["ended"])


def key_name(k: int) -> str:
    return f"item-{k:03d}"


def pad(rng: random.Random) -> str:
    return "x" * rng.randrange(50, 400)


def version_of(item: Mapping[str, Any] | None) -> tuple[int, bool]:
    """(version, torn) of what a read returned: the older of ``v`` and ``w`` when both came back."""
    if item is None:
        return 0, False
    seen = [int(item[a]) for a in ("v", "w") if a in item]
    if not seen:
        return 0, False
    return min(seen), len(seen) == 2 and seen[0] != seen[1]


def version_of_pair(pair: str) -> bool:
    """Whether a "v/w" pair holds two different versions."""
    parts = pair.split("/")
    return len(parts) == 2 and "-" not in parts and parts[0] != parts[1]


def pair_of(item: Mapping[str, Any] | None) -> str:
    if item is None:
        return "none"
    return "/".join(str(int(item[a])) if a in item else "-" for a in ("v", "w"))


# ---------------------------------------------------------------------------
# DynamoDB


def session_kwargs(endpoint_url: str) -> dict[str, Any]:
    from aiobotocore.config import AioConfig

    return {
        "endpoint_url": endpoint_url,
        "region_name": REGION,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "config": AioConfig(
            max_pool_connections=64, retries={"max_attempts": 3, "mode": "standard"}
        ),
    }


def _deserialize(raw: Mapping[str, Any]) -> dict[str, Any]:
    from boto3.dynamodb.types import TypeDeserializer

    des = TypeDeserializer()
    return {k: des.deserialize(v) for k, v in raw.items()}


async def create_table(client: Any, cfg: Config, *, stream: bool) -> str | None:
    """Create the table and seed a fraction of the items at version 1; returns the stream ARN."""
    params: dict[str, Any] = {
        "TableName": cfg.table,
        "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
        "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}],
        "BillingMode": "PAY_PER_REQUEST",
    }
    if stream:
        params["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": "NEW_IMAGE"}
    reply = await client.create_table(**params)
    arn = reply["TableDescription"].get("LatestStreamArn")
    rng = random.Random(cfg.seed)
    for k in range(cfg.keys):
        if rng.random() < cfg.seeded:
            await client.put_item(
                TableName=cfg.table,
                Item={
                    "pk": {"S": key_name(k)},
                    "v": {"N": "1"},
                    "w": {"N": "1"},
                    "p": {"S": pad(rng)},
                },
            )
    return arn if isinstance(arn, str) else None


class DelayedClient:
    """An aiobotocore ``dynamodb`` client whose reads sleep at random before and after DynamoDB answers.

    Writes pass straight through. Every read is recorded as a ``Load`` per item.
    """

    def __init__(
        self,
        client: Any,
        cfg: Config,
        rng: random.Random,
        records: Records,
        keys: Mapping[str, int],
    ) -> None:
        self._client = client
        self._cfg = cfg
        self._rng = rng
        self._records = records
        self._keys = keys

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def _delay(self) -> None:
        if self._rng.random() < self._cfg.delay_chance:
            await asyncio.sleep(self._rng.uniform(0.0, self._cfg.max_delay_ms / 1000.0))

    async def get_item(self, **params: Any) -> Any:
        t0 = time.monotonic()
        await self._delay()
        reply = await self._client.get_item(**params)
        t_read = time.monotonic()
        await self._delay()
        raw = reply.get("Item")
        item = None if raw is None else _deserialize(raw)
        version, _ = version_of(item)
        self._records.loads.append(
            Load(
                self._keys[params["Key"]["pk"]["S"]],
                t0,
                t_read,
                version,
                time.monotonic(),
                pair_of(item),
                self._cfg.index,
            )
        )
        return reply

    async def batch_get_item(self, **params: Any) -> Any:
        t0 = time.monotonic()
        await self._delay()
        reply = await self._client.batch_get_item(**params)
        t_read = time.monotonic()
        await self._delay()
        t1 = time.monotonic()
        for items in reply.get("Responses", {}).values():
            for raw in items:
                item = _deserialize(raw)
                version, _ = version_of(item)
                self._records.loads.append(
                    Load(
                        self._keys[raw["pk"]["S"]],
                        t0,
                        t_read,
                        version,
                        t1,
                        pair_of(item),
                        self._cfg.index,
                    )
                )
        return reply


class TimedInvalidator(StreamInvalidator):
    """Records when each stream record (item, version) has been applied."""

    def __init__(self, cache: Cache, records: Records, keys: Mapping[str, int]) -> None:
        super().__init__(cache)
        self._records = records
        self._keys = keys

    async def handle_records(self, records: Iterable[Any], *, table: str | None = None) -> Any:
        batch = list(records)
        report = await super().handle_records(batch, table=table)
        now = time.monotonic()
        for raw in batch:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                change = raw["dynamodb"]
                k = self._keys[change["Keys"]["pk"]["S"]]
                self._records.applied.setdefault((k, int(change["NewImage"]["v"]["N"])), now)
        return report


# ---------------------------------------------------------------------------
# The workload


def plan_ops(cfg: Config) -> list[tuple[str, int, tuple[str, ...] | None, bool, float]]:
    """The seeded plan: (kind, item, projection, alternate flavour, pause before) per operation."""
    rng = random.Random(cfg.seed * 1_000_003 + cfg.index)
    batches = cfg.flavor in ("table", "write_through", "mixed")
    plan = []
    for _ in range(cfg.ops):
        r = rng.random()
        if r < cfg.write_fraction:
            kind = "write"
        elif batches and r < cfg.write_fraction + cfg.batch_fraction:
            kind = "batch"
        else:
            kind = "read"
        gap = rng.uniform(0.0, 0.002) if rng.random() < cfg.gap_chance else 0.0
        k = rng.randrange(cfg.keys)
        if kind == "write" and cfg.flavor == "mixed":
            # Each process writes its own share of the items (see ``write`` in ``workload``).
            k = k - k % cfg.processes + cfg.index
            if k >= cfg.keys:
                k = cfg.index
        plan.append((kind, k, rng.choice(PROJECTIONS), rng.random() < 0.5, gap))
    return plan


def _flights_of(cache: Cache, entry: str) -> bool:
    # Diagnostics only: which in-process sharing a read could have met.
    return any(type(k) is tuple and k and k[0] == entry for k in getattr(cache, "_flights", {}))


def _reads_of(cache: Cache, entry: str) -> bool:
    return any(
        k == entry or (type(k) is tuple and k and k[0] == entry)
        for k in getattr(cache, "_reads", {})
    )


def summarize_stats(cache: Cache) -> dict[str, int]:
    """Engine counters summed over every function name."""
    out: dict[str, int] = defaultdict(int)
    for stats in cache.stats().values():
        for name, value in stats.items():
            if isinstance(value, int) and not isinstance(value, bool):
                out[name] += value
    return dict(out)


async def workload(
    cfg: Config,
    cache: Cache,
    client: Any,
    records: Records,
    *,
    progress: bool = True,
) -> None:
    """Run the plan with ``cfg.workers`` concurrent workers on an entered ``cache``."""
    rng = random.Random(cfg.seed * 7919 + cfg.index)
    keys = {key_name(k): k for k in range(cfg.keys)}
    delayed = DelayedClient(client, cfg, rng, records, keys)
    entries = [
        cache._keys.entry(item_identity(cfg.table, {"pk": key_name(k)})) for k in range(cfg.keys)
    ]
    soft = cfg.stream_soft_ttl if cfg.flavor == "stream" else cfg.soft_ttl

    @cached_item(
        cache,
        table=cfg.table,
        key=lambda pk: {"pk": pk},
        soft_ttl=soft,
        hard_ttl=max(cfg.hard_ttl, soft),
        consistent_reads=True,
        name="accessor",
        version_attribute=cfg.version_attribute,
    )
    async def get_item(pk: str, *, attributes: list[str] | None = None) -> dict[str, Any] | None:
        params: dict[str, Any] = {
            "TableName": cfg.table,
            "Key": {"pk": {"S": pk}},
            "ConsistentRead": True,
        }
        if attributes is not None:
            names = {f"#a{i}": a for i, a in enumerate([*attributes, "pk"])}
            params["ProjectionExpression"] = ", ".join(names)
            params["ExpressionAttributeNames"] = names
        reply = await delayed.get_item(**params)
        item = reply.get("Item")
        return None if item is None else _deserialize(item)

    dynamo = DynamoTable(delayed, cfg.table, key_schema=["pk"])
    view = dynamo.cached(
        cache,
        soft_ttl=soft,
        hard_ttl=max(cfg.hard_ttl, soft),
        version_attribute=cfg.version_attribute,
        name="view",
    )
    through = dynamo.cached(
        cache,
        soft_ttl=soft,
        hard_ttl=max(cfg.hard_ttl, soft),
        write_through=True,
        version_attribute="v",
        name="write_through",
    )
    plan = plan_ops(cfg)
    write_locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
    counters = records.counters
    done = 0
    step = max(1, cfg.ops // 10)
    cursor = iter(range(len(plan)))

    def readers_via(alt: bool) -> str:
        if cfg.flavor in ("sync", "stream"):
            return "accessor"
        if cfg.flavor == "mixed":
            return "accessor" if alt else "view"
        return "view"

    async def read(k: int, attrs: tuple[str, ...] | None, alt: bool) -> None:
        via = readers_via(alt)
        entry = entries[k]
        flight, coalesced = _flights_of(cache, entry), _reads_of(cache, entry)
        t0 = time.monotonic()
        projection = None if attrs is None else list(attrs)
        if via == "accessor":
            item = await get_item(key_name(k), attributes=projection)
        else:
            item = await view.get_item({"pk": key_name(k)}, attributes=projection)
        t1 = time.monotonic()
        got, torn = version_of(item)
        records.reads.append(
            Read(
                k,
                t0,
                t1,
                got,
                torn,
                pair_of(item),
                flight,
                coalesced,
                via,
                ",".join(attrs or ()),
                cfg.index,
            )
        )

    async def batch(first: int, attrs: tuple[str, ...] | None) -> None:
        ks = sorted({(first + i * 5) % cfg.keys for i in range(cfg.batch_size)})
        flags = [(_flights_of(cache, entries[k]), _reads_of(cache, entries[k])) for k in ks]
        t0 = time.monotonic()
        items = await view.batch_get_item(
            [{"pk": key_name(k)} for k in ks], attributes=None if attrs is None else list(attrs)
        )
        t1 = time.monotonic()
        for k, item, (flight, coalesced) in zip(ks, items, flags, strict=True):
            got, torn = version_of(item)
            records.reads.append(
                Read(
                    k,
                    t0,
                    t1,
                    got,
                    torn,
                    pair_of(item),
                    flight,
                    coalesced,
                    "batch",
                    ",".join(attrs or ()),
                    cfg.index,
                )
            )

    async def write(k: int, alt: bool) -> None:
        # One write per item at a time: moto applies an UpdateItem attribute by attribute
        # without a lock, so concurrent updates of one item can lose an increment
        # (DynamoDB would not). The processes split the items between their writers.
        async with write_locks[k]:
            await write_locked(k, alt)

    async def write_locked(k: int, alt: bool) -> None:
        pk = key_name(k)
        values = {":one": 1, ":p": pad(rng)}
        t0 = time.monotonic()
        flavor = cfg.flavor
        if flavor == "mixed":
            flavor = "sync" if alt else "table"
        if flavor in ("sync", "stream"):
            reply = await client.update_item(
                TableName=cfg.table,
                Key={"pk": {"S": pk}},
                UpdateExpression=UPDATE,
                ExpressionAttributeValues={":one": {"N": "1"}, ":p": {"S": values[":p"]}},
                ReturnValues="UPDATED_NEW",
            )
            version = int(reply["Attributes"]["v"]["N"])
            if reply["Attributes"]["w"] != reply["Attributes"]["v"]:
                counters["origin_anomalies"] += 1
            t_written = time.monotonic()
            if flavor == "sync":
                await cache.invalidate_item(cfg.table, {"pk": pk})
            via = "invalidate_item" if flavor == "sync" else "stream only"
        elif flavor == "table":
            new = await view.update_item(
                {"pk": pk}, UPDATE, expression_values=values, return_values="UPDATED_NEW"
            )
            assert new is not None
            version = int(new["v"])
            counters["origin_anomalies"] += new["v"] != new["w"]
            t_written = time.monotonic()  # (update_item returns after invalidating)
            via = "view.update_item"
        else:
            new = await through.update_item(
                {"pk": pk}, UPDATE, expression_values=values, return_values="ALL_NEW"
            )
            assert new is not None
            version = int(new["v"])
            counters["origin_anomalies"] += new["v"] != new["w"]
            t_written = time.monotonic()
            via = "write-through update_item"
        records.writes.append(Write(k, version, t0, t_written, time.monotonic(), via, cfg.index))

    async def worker() -> None:
        nonlocal done
        for i in cursor:
            kind, k, attrs, alt, gap = plan[i]
            if gap:
                await asyncio.sleep(gap)
            try:
                if kind == "write":
                    await write(k, alt)
                elif kind == "batch":
                    await batch(k, attrs)
                else:
                    await read(k, attrs, alt)
            except Exception as exc:  # counted and reported: the run goes on
                counters["errors"] += 1
                if len(records.errors) < 20:
                    records.errors.append(f"{kind} {key_name(k)}: {exc!r}")
            done += 1
            if progress and done % step == 0:
                stale = (
                    len(find_stale(records.reads, records.writes)[0])
                    if cfg.flavor != "stream"
                    else None
                )
                extra = "" if stale is None else f", {stale} stale after a completed write so far"
                say(
                    f"  {cfg.mode}{f' [{cfg.index}]' if cfg.flavor == 'mixed' else ''}: {done:,}/{cfg.ops:,} ops{extra}"
                )

    records.started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(cfg.workers)))
    records.ended = time.monotonic()


# ---------------------------------------------------------------------------
# Analysis


def _write_index(writes: Iterable[Write]) -> dict[int, tuple[list[float], list[int], list[Write]]]:
    """Per item: completion times (sorted), the running maximum of versions, the writes."""
    by_key: dict[int, list[Write]] = defaultdict(list)
    for w in writes:
        by_key[w.key].append(w)
    out = {}
    for k, ws in by_key.items():
        ws.sort(key=lambda w: w.t1)
        running: list[int] = []
        top = 0
        for w in ws:
            top = max(top, w.version)
            running.append(top)
        out[k] = ([w.t1 for w in ws], running, ws)
    return out


def find_stale(
    reads: Sequence[Read], writes: Sequence[Write]
) -> tuple[list[tuple[Read, float, int]], dict[tuple[int, int], float]]:
    """Stale reads after completed writes: ``(read, staleness s, version required)``.

    Also each write's observed window: ``(item, version) -> seconds`` from its
    completion to the start of the last read that still returned an older version.
    """
    index = _write_index(writes)
    stale: list[tuple[Read, float, int]] = []
    windows: dict[tuple[int, int], float] = {}
    for r in reads:
        got = index.get(r.key)
        if got is None:
            continue
        times, running, ws = got
        n = bisect.bisect_left(times, r.t0)  # writes that completed before the read started
        if n == 0 or running[n - 1] <= r.got:
            continue
        first = bisect.bisect_right(running, r.got, 0, n)  # the first completed write it missed
        stale.append((r, r.t0 - times[first], running[n - 1]))
        for w in ws[first:n]:
            if w.version > r.got:
                key = (w.key, w.version)
                windows[key] = max(windows.get(key, 0.0), r.t0 - w.t1)
    return stale, windows


def straddling_loads(loads: Sequence[Load], writes: Sequence[Write]) -> int:
    """Loads that still held an older version when a write of their item completed."""
    index = _write_index(writes)
    n = 0
    for x in loads:
        got = index.get(x.key)
        if got is None or not x.version:
            continue  # (a projection without v and w tells no version)
        times, running, _ = got
        i = bisect.bisect_left(times, x.t1)
        if i and running[i - 1] > x.version:
            n += 1
    return n


def mechanism(r: Read) -> str:
    if r.flight_at_start:
        return "an in-process load of the item was under way when the read began"
    if r.read_at_start:
        return "an in-process Redis read of the item was under way when the read began"
    return "neither (no in-process sharing seen at the read's start)"


def pre_write_loads(stale: Sequence[tuple[Read, float, int]], loads: Sequence[Load]) -> int:
    """Stale reads whose answer matches a load that read DynamoDB before the missed write
    completed and handed its value back after the read began (the shape of a shared load)."""
    by_key: dict[int, list[Load]] = defaultdict(list)
    for x in loads:
        by_key[x.key].append(x)
    n = 0
    for r, staleness, _ in stale:
        missed_at = r.t0 - staleness
        if any(
            x.version == r.got and x.proc == r.proc and x.t_read < missed_at and x.t1 >= r.t0
            for x in by_key[r.key]
        ):
            n += 1
    return n


def ms(values: Sequence[float]) -> tuple[float, float, float]:
    """p50, p99, max of seconds, in ms (NaN when empty)."""
    if not values:
        return float("nan"), float("nan"), float("nan")
    return percentile(values, 50) * 1000.0, percentile(values, 99) * 1000.0, max(values) * 1000.0


def analyze(
    cfg: Config, records: Records, check: dict[str, Any], stats: Mapping[str, int]
) -> dict[str, Any]:
    stale, windows = find_stale(records.reads, records.writes)
    origin_pairs = {(x.key, x.pair) for x in records.loads}
    out: dict[str, Any] = {
        "mode": cfg.mode,
        "ops": cfg.ops,
        "reads": len(records.reads),
        "writes": len(records.writes),
        "errors": records.counters.get("errors", 0),
        "error_samples": records.errors[:5],
        "seconds": records.ended - records.started,
        "stale_reads_after_completed_write": len(stale),
        "torn_reads": sum(1 for r in records.reads if r.torn),
        "torn_reads_not_from_origin": sum(
            1 for r in records.reads if r.torn and (r.key, r.pair) not in origin_pairs
        ),
        "origin_torn_loads": sum(1 for x in records.loads if version_of_pair(x.pair)),
        "origin_anomalies": records.counters.get("origin_anomalies", 0)
        + check.get("table_torn", 0),
        "origin_loads": len(records.loads),
        "loads_straddling_a_write": straddling_loads(records.loads, records.writes),
        "fills": stats.get("fills", 0),
        "fills_rejected": stats.get("fills_rejected", 0),
        "reloads_after_invalidation": stats.get("reloads_after_invalidation", 0),
        "lease_waits": stats.get("lease_waits", 0),
        "refreshes": stats.get("refreshes", 0),
        "stale_hits": stats.get("stale_hits", 0),
        "entries_checked": check["entries"],
        "entries_not_equal_to_table": len(check["mismatches"]),
        "mismatches": check["mismatches"][:10],
        "peek_checked": check["peeked"],
    }
    p50, p99, top = ms([s for _, s, _ in stale])
    out.update(staleness_p50_ms=p50, staleness_p99_ms=p99, staleness_max_ms=top)
    by_mechanism: dict[str, int] = defaultdict(int)
    for r, _, _ in stale:
        by_mechanism[mechanism(r)] += 1
    out["stale_by_mechanism"] = dict(by_mechanism)
    out["stale_matching_a_pre_write_load"] = pre_write_loads(stale, records.loads)
    out["stale_samples"] = [
        {
            "item": key_name(r.key),
            "got": r.got,
            "required": req,
            "after_ms": round(s * 1000.0, 3),
            "read_ms": round((r.t1 - r.t0) * 1000.0, 3),
            "via": r.via,
            "process": r.proc,
            "writer_process": min(
                (w for w in records.writes if w.key == r.key),
                key=lambda w, at=r.t0 - s: abs(w.t1 - at),
            ).proc,
            "mechanism": mechanism(r),
        }
        for r, s, req in stale[:10]
    ]
    out["torn_samples"] = [
        {
            "item": key_name(r.key),
            "via": r.via,
            "attributes": r.attrs,
            "v/w": r.pair,
            "from_origin": (r.key, r.pair) in origin_pairs,
            "read_ms": round((r.t1 - r.t0) * 1000.0, 3),
            "process": r.proc,
        }
        for r in records.reads
        if r.torn
    ][:10]
    if cfg.near:
        out.update(near_split(records, stats))
    if cfg.flavor == "stream":
        window_values = [windows.get((w.key, w.version), 0.0) for w in records.writes]
        out["window_p50_ms"], out["window_p99_ms"], out["window_max_ms"] = ms(window_values)
        lags = [
            records.applied[(w.key, w.version)] - w.t1
            for w in records.writes
            if (w.key, w.version) in records.applied
        ]
        out["lag_p50_ms"], out["lag_p99_ms"], out["lag_max_ms"] = ms(lags)
        out["writes_with_applied_record"] = len(lags)
        # Once the consumer has applied a write's record, the cache must not serve older.
        applied = [
            Write(
                w.key,
                w.version,
                w.t0,
                w.t_written,
                records.applied[(w.key, w.version)],
                w.via,
                w.proc,
            )
            for w in records.writes
            if (w.key, w.version) in records.applied
        ]
        after_applied, _ = find_stale(records.reads, applied)
        out["stale_reads_after_applied_invalidation"] = len(after_applied)
        out["stale_after_applied_samples"] = [
            {
                "item": key_name(r.key),
                "got": r.got,
                "required": req,
                "after_ms": round(s * 1000.0, 3),
                "mechanism": mechanism(r),
            }
            for r, s, req in after_applied[:10]
        ]
        out["timeline"] = timeline(records, stale)
    return out


def near_split(records: Records, stats: Mapping[str, int]) -> dict[str, Any]:
    """Near mode: stale reads after a write of the reader's own process, and of another one.

    Each process writes its own share of the items, so a stale read is either
    within one process (a near copy outliving our own invalidation: must be 0)
    or across processes (the tracking announcement still on its way).
    """
    procs = sorted({r.proc for r in records.reads} | {w.proc for w in records.writes})
    within = 0
    for p in procs:
        own_writes = [w for w in records.writes if w.proc == p]
        own_reads = [r for r in records.reads if r.proc == p]
        within += len(find_stale(own_reads, own_writes)[0])
    across: list[float] = []
    for p in procs:
        others = [w for w in records.writes if w.proc != p]
        reads = [r for r in records.reads if r.proc == p]
        across += [s for _, s, _ in find_stale(reads, others)[0]]
    p50, p99, top = ms(across)
    return {
        "stale_within_process": within,
        "stale_across_processes": len(across),
        "cross_window_p50_ms": p50,
        "cross_window_p99_ms": p99,
        "cross_window_max_ms": top,
        "near_hits": stats.get("near_hits", 0),
        "near_install_refusals": stats.get("near_install_refusals", 0),
        "near_invalidations": stats.get("near_invalidations", 0),
        "near_flushes": stats.get("near_flushes", 0),
    }


def timeline(records: Records, stale: Sequence[tuple[Read, float, int]]) -> list[dict[str, float]]:
    """Per ``BUCKET_S`` of the run: reads, stale reads, their worst staleness, the worst lag."""
    start = records.started
    n = max(1, int((records.ended - start) / BUCKET_S) + 1)
    reads = [0] * n
    stale_n = [0] * n
    worst = [0.0] * n
    lag = [0.0] * n
    for r in records.reads:
        reads[min(n - 1, int((r.t0 - start) / BUCKET_S))] += 1
    for r, s, _ in stale:
        b = min(n - 1, int((r.t0 - start) / BUCKET_S))
        stale_n[b] += 1
        worst[b] = max(worst[b], s * 1000.0)
    for w in records.writes:
        applied = records.applied.get((w.key, w.version))
        if applied is not None:
            b = min(n - 1, max(0, int((w.t1 - start) / BUCKET_S)))
            lag[b] = max(lag[b], (applied - w.t1) * 1000.0)
    return [
        {
            "t_s": round(i * BUCKET_S, 3),
            "reads": reads[i],
            "stale_reads": stale_n[i],
            "max_staleness_ms": round(worst[i], 3),
            "max_invalidation_lag_ms": round(lag[i], 3),
        }
        for i in range(n)
    ]


# ---------------------------------------------------------------------------
# Quiescence: every entry against the table


async def check_entries(redis_client: Any, client: Any, cfg: Config) -> dict[str, Any]:
    """Read each item's entry raw from Redis and compare it with the table (and with ``peek``)."""
    ks = KeySpace(cfg.namespace)
    mismatches: list[str] = []
    entries = peeked = table_torn = 0
    cache = Cache(
        redis_client,
        namespace=cfg.namespace,
        soft_ttl=cfg.soft_ttl,
        hard_ttl=max(cfg.hard_ttl, cfg.stream_soft_ttl),
    )

    @cached_item(cache, table=cfg.table, key=lambda pk: {"pk": pk}, name="checker")
    async def never(pk: str) -> dict[str, Any] | None:  # peek only: never loads
        raise AssertionError("the checker does not load")

    async with cache:
        for k in range(cfg.keys):
            pk = key_name(k)
            reply = await client.get_item(
                TableName=cfg.table, Key={"pk": {"S": pk}}, ConsistentRead=True
            )
            truth = None if "Item" not in reply else _deserialize(reply["Item"])
            if truth is not None and truth.get("v") != truth.get("w"):
                table_torn += 1  # the fake lost an update: versions cannot be trusted
            key = ks.entry(item_identity(cfg.table, {"pk": pk}))
            # A whole entry is a string (format 3); a partial one a hash.
            if await redis_client.type(key) in (b"string", "string"):
                raw: dict[bytes, bytes] | bytes = await redis_client.get(key)
            else:
                raw = await redis_client.hgetall(key)
            if not raw:
                continue
            entries += 1
            problem = entry_problem(raw, truth)
            if problem:
                mismatches.append(f"{pk}: {problem}")
            seen = await never.peek(pk)
            if seen is not None:
                peeked += 1
                if seen[0] != truth:
                    mismatches.append(
                        f"{pk}: peek gives {summary(seen[0])}, the table has {summary(truth)}"
                    )
    return {
        "entries": entries,
        "mismatches": mismatches,
        "peeked": peeked,
        "table_torn": table_torn,
    }


def summary(item: Mapping[str, Any] | None) -> str:
    if item is None:
        return "no item"
    return (
        "{"
        + ", ".join(f"{k}={item[k]}" for k in sorted(item) if k != "p")
        + (", p=..." if "p" in item else "")
        + "}"
    )


def entry_problem(
    entry: Mapping[bytes, bytes] | bytes, truth: Mapping[str, Any] | None
) -> str | None:
    """How a raw entry (a whole entry's string, or a hash) differs from the table's item (``None``: it matches)."""
    from swr_cache._entry import expand
    from swr_cache._store import M_ABSENT, M_NONE, M_WHOLE

    # A whole entry's blob as a field per attribute.
    raw = expand(entry if type(entry) is bytes else dict(entry))

    attrs = {
        name.decode(): _codec.decode(value)
        for name, value in raw.items()
        if not name.startswith(b"\xff")
    }
    if M_NONE in raw:
        return None if truth is None else f"cached as not found, the table has {summary(truth)}"
    if truth is None:
        return f"cached {summary(attrs)}, the table has no item"
    if M_WHOLE in raw and set(attrs) != set(truth):
        return f"whole entry with attributes {sorted(attrs)}, the table has {sorted(truth)}"
    for name, value in attrs.items():
        if truth.get(name) != value:
            return f"cached {summary(attrs)}, the table has {summary(truth)}"
    if M_ABSENT in raw:
        for name in _codec.decode(raw[M_ABSENT]):
            if name in truth:
                return f"{name} cached as absent, the table has it"
    return None


# ---------------------------------------------------------------------------
# Running a mode


def mode_config(mode: str, base: Config) -> Config:
    cfg = Config(**{**asdict(base), "mode": mode})
    cfg.flavor = {"processes": "mixed", "near": "mixed", "stream_versioned": "stream"}.get(
        mode, mode
    )
    cfg.near = mode == "near"
    if mode == "stream_versioned":
        cfg.version_attribute = "v"  # readers merge projections only into the version they load
    cfg.table = f"Consistency_{mode}_{base.seed}"
    cfg.namespace = f"consistency-{mode}-{base.seed}-{os.getpid()}"
    return cfg


async def run_mode(
    base: Config, redis_url: str, endpoint_url: str, *, progress: bool = True
) -> dict[str, Any]:
    """Run one mode end to end and return its analysis."""
    import redis.asyncio as aioredis
    from aiobotocore.session import get_session

    cfg = mode_config(base.mode, base)
    records = Records()
    redis_client = aioredis.Redis.from_url(redis_url, socket_timeout=2.0, max_connections=64)
    stats: dict[str, int] = {}
    try:
        session = get_session()
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(
                session.create_client("dynamodb", **session_kwargs(endpoint_url))
            )
            arn = await create_table(client, cfg, stream=cfg.flavor == "stream")
            if cfg.mode in ("processes", "near"):
                stats = await run_processes(cfg, redis_url, endpoint_url, records)
            else:
                cache = Cache(redis_client, namespace=cfg.namespace)
                async with cache:
                    if cfg.flavor == "stream":
                        assert arn is not None
                        streams = await stack.enter_async_context(
                            session.create_client("dynamodbstreams", **session_kwargs(endpoint_url))
                        )
                        await run_with_stream(cfg, cache, client, streams, arn, records, progress)
                    else:
                        await workload(cfg, cache, client, records, progress=progress)
                # Leaving the cache drained its background refreshes: quiescent.
                stats = summarize_stats(cache)
            check = await check_entries(redis_client, client, cfg)
    finally:
        await redis_client.aclose()
    return analyze(cfg, records, check, stats)


async def run_with_stream(
    cfg: Config, cache: Cache, client: Any, streams: Any, arn: str, records: Records, progress: bool
) -> None:
    """The workload with a consumer polling the stream; then the stream is read to its end."""
    keys = {key_name(k): k for k in range(cfg.keys)}
    poll = cfg.stream_poll_ms / 1000.0
    # The table was seeded before the readers start: let those records pass first.
    inv = TimedInvalidator(cache, records, keys)
    drain = StreamConsumer(inv, streams, arn, idle_wait=poll, max_idle_wait=poll)
    while await drain.poll_once():
        pass
    await drain.release()
    consumer = StreamConsumer(inv, streams, arn, idle_wait=poll, max_idle_wait=poll)
    task = asyncio.create_task(consumer.run())
    try:
        await workload(cfg, cache, client, records, progress=progress)
    finally:
        consumer.stop()
        await task
    last = StreamConsumer(inv, streams, arn, idle_wait=poll, max_idle_wait=poll)
    idle = 0
    while idle < 2:  # read to the end twice in a row with nothing new
        idle = idle + 1 if await last.poll_once() == 0 else 0
    await last.release()


async def run_processes(
    cfg: Config, redis_url: str, endpoint_url: str, records: Records
) -> dict[str, int]:
    """``cfg.processes`` worker processes share Redis and DynamoDB; returns summed engine counters."""
    import redis.asyncio as aioredis

    per = cfg.ops // cfg.processes
    barrier = f"{cfg.namespace}:barrier"
    stats: dict[str, int] = defaultdict(int)
    control = aioredis.Redis.from_url(redis_url)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        outs = []
        for i in range(cfg.processes):
            child = Config(**{**asdict(cfg), "ops": per, "index": i})
            out = os.path.join(tmp, f"worker-{i}.json")
            outs.append(out)
            argv = [
                sys.executable,
                SCRIPT,
                "--worker",
                json.dumps(asdict(child)),
                "--redis-url",
                redis_url,
                "--endpoint-url",
                endpoint_url,
                "--worker-out",
                out,
            ]
            procs.append(await asyncio.create_subprocess_exec(*argv))
        try:
            deadline = time.monotonic() + 120
            while int(await control.get(f"{barrier}:ready") or 0) < cfg.processes:
                if any(p.returncode is not None for p in procs) or time.monotonic() > deadline:
                    raise RuntimeError("a worker process did not start")
                await asyncio.sleep(0.02)
            await control.set(f"{barrier}:go", b"1")
            codes = [await p.wait() for p in procs]
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
            await control.delete(f"{barrier}:ready", f"{barrier}:go")
            await control.aclose()
        if any(codes):
            raise RuntimeError(f"worker processes exited with {codes}")
        for out in outs:
            data = read_json(out)
            records.merge_json(data["records"])
            for name, n in data["stats"].items():
                stats[name] += n
    return dict(stats)


async def worker_main(cfg: Config, redis_url: str, endpoint_url: str, out: str) -> None:
    """One process of the ``processes`` mode: wait at the barrier, run, write the records."""
    import redis.asyncio as aioredis
    from aiobotocore.session import get_session

    records = Records()
    redis_client = aioredis.Redis.from_url(redis_url, socket_timeout=2.0, max_connections=64)
    barrier = f"{cfg.namespace}:barrier"
    try:
        async with get_session().create_client(
            "dynamodb", **session_kwargs(endpoint_url)
        ) as client:
            near = NearCache() if cfg.near else None
            cache = Cache(redis_client, namespace=cfg.namespace, near_cache=near)
            async with cache:
                if near is not None:
                    await asyncio.wait_for(near.wait_ready(), 30)
                await redis_client.incr(f"{barrier}:ready")
                # A barrier across processes: an asyncio.Event cannot span them.
                while not await redis_client.exists(f"{barrier}:go"):  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
                await workload(cfg, cache, client, records)
            stats = summarize_stats(cache)
    finally:
        await redis_client.aclose()
    write_json(out, {"records": records.to_json(), "stats": stats})


def read_json(path: str) -> Any:
    with open(path) as fh:
        return json.load(fh)


def write_json(path: str, data: Any) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh)


# ---------------------------------------------------------------------------
# Output


def render(results: dict[str, Any]) -> None:
    runs = results["modes"]
    rows = []
    for r in runs:
        rows.append(
            [
                r["mode"],
                r["ops"],
                r["reads"],
                r["writes"],
                r["stale_reads_after_completed_write"],
                r["torn_reads"],
                r["torn_reads_not_from_origin"],
                r["origin_loads"],
                r["loads_straddling_a_write"],
                r["fills_rejected"],
                r["entries_checked"],
                r["entries_not_equal_to_table"],
                r["errors"] + r["origin_anomalies"],
                r["seconds"],
            ]
        )
    cfg = results["config"]
    results["tables"] = [
        table(
            f"Consistency under random load delays: {cfg['workers']} workers, {cfg['keys']} items,"
            f" {cfg['write_fraction']:.0%} writes, loads delayed up to {cfg['max_delay_ms']:.0f} ms, seed {cfg['seed']}",
            [
                "mode",
                "ops",
                "reads",
                "writes",
                "stale after completed write",
                "torn reads",
                "torn, not from DynamoDB",
                "origin loads",
                "loads straddling a write",
                "fills rejected",
                "entries checked",
                "entries != table",
                "errors",
                "seconds",
            ],
            rows,
            notes=[
                "stale after completed write: reads that began after a write of their item (and its invalidation)"
                " had returned and got an older version; target 0 except in stream mode",
                "loads straddling a write: origin reads that still held an older version when a write completed",
                "entries != table: after quiescence, cached entries (raw entry decoded, and peek) that differ from"
                " a ConsistentRead of the table",
                "torn reads: answers with v != w (two versions); 'not from DynamoDB' excludes pairs some origin"
                " read returned (moto can serve an item in the middle of an UpdateItem)",
                "errors: failed operations, plus origin anomalies (an UpdateItem reply or a final item with v != w)",
                *(
                    f"{r['mode']}: {n} stale read(s) after a completed write where {why}"
                    for r in runs
                    if r["mode"] in SYNC_MODES
                    for why, n in r["stale_by_mechanism"].items()
                ),
            ],
        )
    ]
    near = [r for r in runs if r["mode"] == "near"]
    if near:
        n = near[0]
        results["tables"].append(
            table(
                f"Near cache in each of {cfg['processes']} processes: reads after a completed write",
                ["measure", "count", "p50 ms", "p99 ms", "max ms"],
                [
                    [
                        "stale, write of the same process (target 0)",
                        n["stale_within_process"],
                        "",
                        "",
                        "",
                    ],
                    [
                        "stale, write of another process (the tracking window)",
                        n["stale_across_processes"],
                        n["cross_window_p50_ms"],
                        n["cross_window_p99_ms"],
                        n["cross_window_max_ms"],
                    ],
                ],
                notes=[
                    f"near hits {n['near_hits']:,}, installs refused (an invalidation overtook the read)"
                    f" {n['near_install_refusals']:,}, announcements heard {n['near_invalidations']:,},"
                    f" flushes on losing tracking {n['near_flushes']:,}",
                    "window: from the write (DynamoDB and invalidate_item both returned) in one process to the"
                    " start of the last read in another process that still returned the older version",
                ],
            )
        )
    stream = [r for r in runs if r["mode"] == "stream"]
    if stream:
        s = stream[0]
        results["tables"].append(
            table(
                f"Stream-only invalidation (StreamConsumer polling moto's stream every {cfg['stream_poll_ms']:.0f} ms"
                " when idle): staleness",
                ["measure", "count", "p50 ms", "p99 ms", "max ms"],
                [
                    [
                        "stale reads: time since the missed write completed",
                        s["stale_reads_after_completed_write"],
                        s["staleness_p50_ms"],
                        s["staleness_p99_ms"],
                        s["staleness_max_ms"],
                    ],
                    [
                        "per write: last stale read began after completion",
                        s["writes"],
                        s["window_p50_ms"],
                        s["window_p99_ms"],
                        s["window_max_ms"],
                    ],
                    [
                        "per write: completion to its record applied",
                        s["writes_with_applied_record"],
                        s["lag_p50_ms"],
                        s["lag_p99_ms"],
                        s["lag_max_ms"],
                    ],
                    [
                        "stale reads begun after the record was applied (target 0)",
                        s["stale_reads_after_applied_invalidation"],
                        "",
                        "",
                        "",
                    ],
                ],
                notes=[
                    f"soft TTL {cfg['stream_soft_ttl']:.0f} s in this mode, so only the stream invalidates",
                    "per write windows are 0 for writes no later read saw past",
                ],
            )
        )
        line = s["timeline"]
        results["charts"] = [
            {
                "file": "consistency_stream_staleness.png",
                "title": "Stream-only invalidation: staleness over the run (worst per 250 ms)",
                "kind": "line",
                "x": [b["t_s"] for b in line],
                "xlabel": "seconds into the run",
                "series": {
                    "max staleness of stale reads (ms)": [b["max_staleness_ms"] for b in line],
                    "max write-to-invalidation lag (ms)": [
                        b["max_invalidation_lag_ms"] for b in line
                    ],
                },
                "ylabel": "ms",
                "log": False,
            }
        ]


def violations(results: Mapping[str, Any]) -> list[str]:
    out = []
    for r in results["modes"]:
        if r.get("stale_within_process"):
            out.append(
                f"{r['mode']}: {r['stale_within_process']} stale reads after a completed write"
                " of the same process"
            )
        if r["mode"] in SYNC_MODES and r["stale_reads_after_completed_write"]:
            out.append(
                f"{r['mode']}: {r['stale_reads_after_completed_write']} stale reads after completed writes"
            )
        if r.get("stale_reads_after_applied_invalidation"):
            out.append(
                f"{r['mode']}: {r['stale_reads_after_applied_invalidation']} stale reads after the stream"
                " invalidation was applied"
            )
        if r["mode"] == "stream_versioned" and r["torn_reads_not_from_origin"]:
            out.append(f"{r['mode']}: {r['torn_reads_not_from_origin']} answers mixed two versions")
        if r["entries_not_equal_to_table"]:
            out.append(
                f"{r['mode']}: {r['entries_not_equal_to_table']} entries differ from the table"
            )
        if r["origin_anomalies"]:
            out.append(
                f"{r['mode']}: {r['origin_anomalies']} origin anomalies: the versions cannot be trusted"
            )
        if r["errors"]:
            out.append(
                f"{r['mode']}: {r['errors']} operations failed, e.g. {r['error_samples'][:1]}"
            )
    return out


async def run_all(
    base: Config, modes: Sequence[str], redis_url: str, endpoint_url: str
) -> list[dict[str, Any]]:
    out = []
    for mode in modes:
        say(f"{mode}: {base.ops:,} ops")
        result = await run_mode(Config(**{**asdict(base), "mode": mode}), redis_url, endpoint_url)
        say(
            f"{mode}: {result['stale_reads_after_completed_write']} stale after completed writes,"
            f" {result['entries_not_equal_to_table']} entries != table, {result['seconds']:.1f} s"
        )
        out.append(result)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}"
    )
    parser.add_argument(
        "--ops", type=int, help="operations per mode (default 10,000; 2,000 with --quick)"
    )
    parser.add_argument("--keys", type=int, default=Config.keys)
    parser.add_argument("--workers", type=int, default=Config.workers)
    parser.add_argument("--write-fraction", type=float, default=Config.write_fraction)
    parser.add_argument("--max-delay-ms", type=float, default=Config.max_delay_ms)
    parser.add_argument("--stream-poll-ms", type=float, default=Config.stream_poll_ms)
    parser.add_argument("--processes", type=int, default=Config.processes)
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--quick", action="store_true", help="2,000 operations per mode")
    parser.add_argument(
        "--version-attribute",
        help="readers merge projections only into entries of the version they load (e.g. v)",
    )
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument(
        "--endpoint-url", help="use this DynamoDB endpoint instead of starting moto"
    )
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(
            worker_main(
                Config(**json.loads(args.worker)),
                args.redis_url,
                args.endpoint_url,
                args.worker_out,
            )
        )
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    base = Config(
        mode=modes[0],
        ops=args.ops or (2_000 if args.quick else 10_000),
        keys=args.keys,
        workers=args.workers,
        write_fraction=args.write_fraction,
        max_delay_ms=args.max_delay_ms,
        stream_poll_ms=args.stream_poll_ms,
        processes=args.processes,
        seed=args.seed,
        version_attribute=args.version_attribute,
    )
    from devtools.devservers import MotoServer, set_dummy_aws_env

    set_dummy_aws_env()
    with contextlib.ExitStack() as stack:
        redis_url, server = start_redis(args.redis_url)
        if server is not None:
            stack.callback(server.stop)
        endpoint_url = args.endpoint_url
        if endpoint_url is None:
            try:
                moto = MotoProcess().start()
            except (OSError, RuntimeError):
                endpoint_url = stack.enter_context(MotoServer()).endpoint_url
            else:
                stack.callback(moto.stop)
                endpoint_url = moto.endpoint_url
        say(f"consistency: modes {', '.join(modes)}, {base.ops:,} ops each, seed {base.seed}")
        runs = asyncio.run(run_all(base, modes, redis_url, endpoint_url))
    config = asdict(base)
    config.pop("mode")
    results: dict[str, Any] = {"benchmark": "consistency", "config": config, "modes": runs}
    render(results)
    finish(results, args.json)
    bad = violations(results)
    for line in bad:
        print(f"VIOLATION {line}")
    for r in runs:
        shown = (
            r["stale_samples"]
            if r["mode"] in SYNC_MODES
            else r.get("stale_after_applied_samples", [])
        )
        for sample in shown[:3]:
            print(f"  {r['mode']} stale read: {sample}")
        for sample in r["torn_samples"][:3]:
            print(f"  {r['mode']} torn read: {sample}")
        for m in r["mismatches"][:3]:
            print(f"  {r['mode']} entry != table: {m}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
