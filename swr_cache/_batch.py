"""Batch reads: many entries in one pipeline, the misses under leases in one batch load.

``RedisEngine.get_many`` (``CachedTable.batch_get_item`` and ``warm``) does
for a batch what ``get`` does for one entry, in as few round trips as it
can: one pipelined read of every entry; for the misses, one pipeline that
takes their leases and re-reads them; one call of the batch loader (chunked
by the adapter) for the entries whose leases it holds, renewed meanwhile;
then pipelined fills (and merges, for fresh partial entries) under the same
lease and fence scripts as single fills. Keys whose lease another load holds
wait for that load's fill through ``get``, as a single read would.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
from redis.exceptions import RedisError, ResponseError

from ._engine_api import EntryRequest, LoadMany
from ._entry import _Corrupt, _Plan, fresh_items, judge, with_version
from ._errors import CodecError
from ._fills import EntryTooLarge
from ._gate import _is_pool_exhausted, _NoSlot
from ._loads import PURGE_MARGIN_MS, while_renewing
from ._metrics import Metrics
from ._policy import Policy
from ._store import FillOutcome, LeaseOutcome, is_wrongtype

if TYPE_CHECKING:
    from ._engine import RedisEngine

__all__ = ["BatchReads", "first_error_gather"]

T = TypeVar("T")

FILLS_IN_FLIGHT: Final = 32  # concurrent merges of one batch
# A snapshot that could not be read (WRONGTYPE, undecodable): a counted miss.
_CORRUPT: Final = object()


async def first_error_gather(
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


def _needs(req: EntryRequest, plan: _Plan | None) -> tuple[str, ...] | None:
    """What a miss must load: the attributes it lacks, or ``None`` for the whole item."""
    if plan is not None and plan.merge_version is not None:
        return with_version(plan.load_attrs, req.version_attr)
    return with_version(req.attrs, req.version_attr)


def _answer(value: Any, attrs: tuple[str, ...] | None, merged: dict[str, Any] | None) -> Any:
    """What a caller asking for ``attrs`` gets from a loaded item (``merged``: cached attributes)."""
    if value is None or attrs is None:
        return value
    out = {} if merged is None else dict(merged)
    for name in attrs:
        if name in value:
            out[name] = value[name]
    return out


class BatchReads:
    """``get_many`` for one engine."""

    def __init__(self, engine: RedisEngine) -> None:
        self.engine = engine

    async def get_many(
        self, reqs: Sequence[EntryRequest], load_many: LoadMany
    ) -> tuple[dict[str, Any], int]:
        """Answer distinct requests (one projection, one metrics set): values by identity, loads made."""
        self.engine.require_entered()
        if not reqs:
            return {}, 0
        return await _Batch(self.engine, reqs[0].metrics, load_many).run(reqs)

    async def get_items(
        self,
        entries: Sequence[str],
        request: Callable[[int], EntryRequest],
        load_many: LoadMany,
        metrics: Metrics,
        policy: Policy,
    ) -> tuple[list[Any], int]:
        """Whole items of distinct entries of one accessor: their values in order, loads made.

        ``get_many`` for callers that have entry keys at hand and build a
        request (``request(i)`` for ``entries[i]``) only where one is needed:
        a fresh whole entry is answered from the pipeline's reply alone
        (``_entry.fresh_items``); anything else (absent, stale, negative, partial,
        corrupt) goes through ``get_many``'s steps with the reply already
        read. With a near cache or a signing key every entry takes those steps.
        """
        engine = self.engine
        engine.require_entered()
        n = len(entries)
        if engine.near is not None or engine.signer is not None:
            reqs = [request(i) for i in range(n)]
            got, loaded = await self.get_many(reqs, load_many)
            return [got.get(req.identity) for req in reqs], loaded
        batch = _Batch(engine, metrics, load_many)

        one_node = not engine.store.is_cluster

        def build(pipe: Any) -> None:
            pipe.read_wholes(entries, one_node)

        replies = await batch.pipeline(build, n) if n else []
        if replies is None:  # Redis is unusable: from the origin, nothing stored
            reqs = [request(i) for i in range(n)]
            loaded = await batch.load_unstored(reqs)
            return [batch.results.get(req.identity) for req in reqs], loaded
        values, rest, early = fresh_items(replies, engine.now_ms(), policy.early_refresh)
        metrics.counts["hits"] += n - len(rest)
        for i, version in early:
            metrics.counts["early_refreshes"] += 1
            engine.refresher.schedule_refresh(request(i), version)
        loaded = 0
        if rest:
            reqs = [request(i) for i in rest]
            snaps = [batch.snap(req, replies[i]) for req, i in zip(reqs, rest, strict=True)]
            misses = batch.judge_many(reqs, snaps)
            if misses:
                loaded = await batch.load_misses(misses)
            for req, i in zip(reqs, rest, strict=True):
                values[i] = batch.results.get(req.identity)
        return values, loaded


class _Batch:
    """One ``get_many`` call: its answers so far and what it loads with."""

    def __init__(self, engine: RedisEngine, metrics: Metrics, load_many: LoadMany) -> None:
        self.engine = engine
        self.metrics = metrics
        self.load_many = load_many
        self.results: dict[str, Any] = {}

    async def run(self, reqs: Sequence[EntryRequest]) -> tuple[dict[str, Any], int]:
        todo = list(reqs)
        near = self.engine.near
        if near is None:
            snaps = await self._read_many(todo)
        else:  # held copies skip the pipeline
            snaps = await near.read_many(self._read_many, todo, self.metrics)
        if snaps is None:
            loaded = await self.load_unstored(todo)
        else:
            misses = self.judge_many(todo, snaps)
            loaded = await self.load_misses(misses) if misses else 0
        return self.results, loaded

    def judge_many(
        self, reqs: Sequence[EntryRequest], snaps: Sequence[Any]
    ) -> list[tuple[EntryRequest, _Plan | None]]:
        """Serve what the snapshots answer (scheduling stale refreshes); return the misses."""
        engine = self.engine
        counts = self.metrics.counts
        now = engine.now_ms()
        misses: list[tuple[EntryRequest, _Plan | None]] = []
        for req, snap in zip(reqs, snaps, strict=True):
            verdict: Any = None
            if snap is _CORRUPT:
                counts["decode_errors"] += 1
            elif snap is not None:
                try:
                    verdict = judge(req, snap, now)
                except _Corrupt:
                    counts["decode_errors"] += 1
            if type(verdict) is tuple:
                state, value = verdict
                self.results[req.identity] = value
                engine.refresher.note_hit(req, snap, state, value is None, now)
                continue
            counts["partial_misses" if verdict is not None else "misses"] += 1
            misses.append((req, verdict))
        return misses

    def _redis_failed(self, exc: BaseException, n: int) -> None:
        """Count a failed pipeline and tell the breaker (a busy pool is not a Redis failure)."""
        counts = self.metrics.counts
        breaker = self.engine.breaker
        counts["bypasses"] += n
        if isinstance(exc, _NoSlot) or _is_pool_exhausted(exc):
            counts["pool_waits_timed_out"] += 1
            if breaker.probing:
                breaker.abandon()
        else:
            counts["redis_errors"] += 1
            breaker.failure()

    async def pipeline(self, build: Callable[[Any], None], n: int) -> list[Any] | None:
        """Run one non-transactional pipeline (grouped by node on a cluster); ``None`` to bypass."""
        engine = self.engine
        breaker = engine.breaker
        if not breaker.allow():
            self.metrics.counts["bypasses"] += n
            return None
        t0 = time.perf_counter()
        try:
            async with engine.slots.hold(engine.call_timeout):
                pipe = engine.store.read_pipeline()
                build(pipe)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            self._redis_failed(exc, n)
            return None
        except BaseException:
            if breaker.probing:
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

    async def _read_many(self, reqs: Sequence[EntryRequest]) -> list[Any] | None:
        """Every entry in one pipeline: snapshots (``None`` absent, ``_CORRUPT``), or ``None`` to bypass."""

        def build(pipe: Any) -> None:
            for req in reqs:
                pipe.read(req.entry, req.fields)

        replies = await self.pipeline(build, len(reqs))
        if replies is None:
            return None
        return [self.snap(req, raw) for req, raw in zip(reqs, replies, strict=True)]

    def snap(self, req: EntryRequest, raw: Any, count: bool = True) -> Any:
        if isinstance(raw, BaseException):
            return _CORRUPT  # WRONGTYPE
        try:
            return self.engine.snap(req, raw, req.fields, count)
        except (TypeError, ValueError):
            return _CORRUPT

    async def load_unstored(
        self,
        reqs: Sequence[EntryRequest],
    ) -> int:
        """Redis is unusable: answer from DynamoDB, store nothing."""
        attrs = reqs[0].attrs if reqs else None  # one batch asks one projection
        found = await self.timed_load(reqs, attrs)
        for req in reqs:
            self.results[req.identity] = _answer(found.get(req.identity), req.attrs, None)
        return len(reqs)

    async def timed_load(
        self, reqs: Sequence[EntryRequest], attrs: tuple[str, ...] | None
    ) -> Mapping[str, Any]:
        """One call of the batch loader, counted and timed like single loads."""
        counts = self.metrics.counts
        counts["loads"] += len(reqs)
        t0 = time.perf_counter()
        try:
            return await self.load_many(reqs, attrs)
        except Exception:
            counts["load_errors"] += len(reqs)
            raise
        finally:
            self.metrics.load_latency.observe(time.perf_counter() - t0)

    async def load_misses(
        self,
        misses: list[tuple[EntryRequest, _Plan | None]],
    ) -> int:
        """Take the misses' leases in one pipeline (re-reading each entry), then load ours in batches."""
        engine = self.engine
        tokens = {req.identity: os.urandom(12).hex() for req, _ in misses}

        def build(pipe: Any) -> None:
            for req, _ in misses:
                pipe.acquire(req.lease, tokens[req.identity], engine.lease_ms)
                pipe.read(req.entry, req.fields)

        replies = await self.pipeline(build, len(misses))
        if replies is None:
            return await self.load_unstored([req for req, _ in misses])
        now = engine.now_ms()
        mine: list[tuple[EntryRequest, _Plan | None]] = []
        others: list[EntryRequest] = []
        release: list[EntryRequest] = []
        for i, (req, _) in enumerate(misses):
            reply, raw = replies[2 * i], replies[2 * i + 1]
            got = bool(reply) and not isinstance(reply, BaseException)
            if got and reply == LeaseOutcome.REPAIRED:
                req.metrics.counts["leases_repaired"] += 1
            # (A bad signature seen again here was counted by the first read.)
            snap = self.snap(req, raw, count=False)
            verdict: Any = None
            if snap is not _CORRUPT and snap is not None:
                try:
                    verdict = judge(req, snap, now)
                except _Corrupt:
                    verdict = None
            if type(verdict) is tuple:
                # Filled between our read and our lease: use it.
                self.results[req.identity] = verdict[1]
                if got:
                    release.append(req)
            elif got:
                mine.append((req, verdict))
            else:
                others.append(req)
        thunks: list[Callable[[], Awaitable[Any]]] = [
            partial(engine.loads.release, req.lease, tokens[req.identity]) for req in release
        ]
        if mine:
            thunks.append(lambda: self._load_mine(mine, tokens))
        for req in others:

            async def wait_for_theirs(req: EntryRequest = req) -> None:
                self.results[req.identity] = await engine.get(req)

            thunks.append(wait_for_theirs)
        try:
            await first_error_gather(thunks)
        except BaseException:
            # Cancelled (or failed) before every lease we took was filled or
            # released: give them back now rather than at their TTL.
            await engine.loads.release_all(
                {req.lease: tokens[req.identity] for req, _ in mine}
                | {req.lease: tokens[req.identity] for req in release}
            )
            raise
        return len(mine)

    async def _load_mine(
        self,
        mine: list[tuple[EntryRequest, _Plan | None]],
        tokens: dict[str, str],
    ) -> None:
        """BatchGetItem the entries whose leases we hold (renewed meanwhile), then fill each."""
        engine = self.engine
        held = {req.lease: tokens[req.identity] for req, _ in mine}
        engine.held.update(held)
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
            start_ms = engine.now_ms() - PURGE_MARGIN_MS
            t0 = time.perf_counter()
            loading = [req for req, _ in mine]
            try:
                found = await while_renewing(
                    partial(self.timed_load, loading, load_attrs),
                    partial(self._renew, held),
                )
            except BaseException:
                await engine.loads.release_all(held)
                raise
            delta_ms = (time.perf_counter() - t0) * 1000.0
            replace: list[tuple[EntryRequest, Any]] = []
            merges: list[Callable[[], Awaitable[bool]]] = []
            merged: list[EntryRequest] = []
            for req, plan in mine:
                value = found.get(req.identity)
                if load_attrs is not None and plan is not None and plan.merge_version is not None:
                    # A fresh entry lacking some attributes: merge just those into it
                    # (with the item's version attribute, which the merge compares).
                    merge_attrs = with_version(plan.load_attrs, req.version_attr)
                    if value is not None:
                        value = {k: v for k, v in value.items() if k in merge_attrs}  # type: ignore[operator]
                    self.results[req.identity] = _answer(value, req.attrs, plan.merged)
                    merged.append(req)
                    merges.append(
                        partial(
                            engine.fills.fill,
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
                    self.results[req.identity] = _answer(value, req.attrs, None)
                    replace.append((req, value))
            if merges:
                superseded = await first_error_gather(merges, FILLS_IN_FLIGHT)
                await self._reload_torn([r for r, s in zip(merged, superseded, strict=True) if s])
            if replace:
                await self._fill_many(replace, load_attrs, tokens, delta_ms)
        finally:
            for lease in held:
                engine.held.pop(lease, None)

    async def _reload_torn(self, reqs: list[EntryRequest]) -> None:
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
        again = await self.timed_load(reqs, None if whole else tuple(sorted(names)))
        for req in reqs:
            self.results[req.identity] = _answer(again.get(req.identity), req.attrs, None)

    async def _fill_many(
        self,
        fills: Sequence[tuple[EntryRequest, Any]],
        attrs: tuple[str, ...] | None,
        tokens: Mapping[str, str],
        delta_ms: float,
    ) -> None:
        """Replace many entries under our leases in one pipeline (the engine's fill, batched).

        Like ``Fills.fill`` for a replacing fill without tags: the same
        fields and deadlines, the same lease/fence compare-and-write script,
        but one round trip for the whole batch instead of one per entry.
        """
        engine = self.engine
        counts = self.metrics.counts
        now = engine.now_ms()
        calls: list[tuple[str, str, str, str, int, Mapping[bytes, bytes], bool]] = []
        release: list[EntryRequest] = []
        for req, value in fills:
            try:
                fields, expire_ms = engine.fills.whole_entry(req, attrs, value, now, delta_ms)
            except (CodecError, EntryTooLarge) as exc:
                too_large = isinstance(exc, EntryTooLarge)
                counts["fills_skipped_too_large" if too_large else "fills_rejected"] += 1
                release.append(req)
                continue
            token = tokens[req.identity]
            calls.append(
                (req.entry, req.lease, req.fence, token, expire_ms, fields, not req.consistent)
            )
        if release:
            await first_error_gather(
                [partial(engine.loads.release, r.lease, tokens[r.identity]) for r in release]
            )
        if not calls:
            return
        try:
            async with engine.slots.hold(engine.call_timeout):
                outcomes = await engine.store.fill_many(calls)
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
        engine = self.engine
        while True:
            await anyio.sleep(engine.lease_ms / 3000.0)
            for lease, token in held.items():
                try:
                    async with engine.slots.hold(engine.call_timeout):
                        await engine.store.renew_lease(lease, token, engine.lease_ms)
                except (RedisError, OSError):
                    pass
