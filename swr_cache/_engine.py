"""The engine: fresh / stale / absent entries, read coalescing, single flight, invalidation.

``Cache`` is what users construct; it owns a ``RedisEngine``, and the
adapters (decorators, ``CachedTable``, the stream handlers, ``CacheMiddleware``,
the CLI) reach it through ``_engine_api.engine_of`` and speak in entries
(``EntryRequest``). Every Redis command goes through ``_store.Store``.

The engine composes its parts: ``Clock`` (Redis server time), ``Loads`` (the
leased load, fill and tag check), ``Refresher`` (background refreshes and
their back-off) and ``BatchReads`` (``get_many``); it keeps this process's
read coalescing and single flight itself.

How one read goes (``RedisEngine.get``):

1. One Redis round trip reads the entry: GET of its string for a whole item;
   for a projection GET and HMGET of the metadata and the requested
   attributes together (HGETALL for a signed one), answered by the string of
   a whole entry or the hash of a partial one (layout in ``_store``). Concurrent reads of one entry in this process share it;
   concurrent reads of distinct entries share a pipeline (``_autobatch``): the
   first takes a limiter slot and a connection and sends at once, the others
   ride on its connection with no slot of their own (one slot per pipeline),
   and its reader alone tells the breaker how the pipeline went.
2. Fresh → returned. Stale → returned, and one background refresh is queued
   (a lease in Redis makes it one across processes). Absent, corrupt, or
   lacking requested attributes → a foreground load.
3. A foreground load is shared by every caller in this process (a caller that
   is cancelled does not cancel it). It takes the item's lease (SET NX PX) and
   re-reads the entry in the same round trip; if another process holds the
   lease it polls for the fill for up to ``lease_wait`` and takes the lease over
   if its holder died. The loader runs while the lease is renewed; the fill is
   a Lua compare-and-write that lands only if the lease is still ours and no
   invalidation fence stands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Final, NoReturn

import anyio
from anyio.abc import TaskGroup
from redis.exceptions import RedisError, ResponseError

from ._autobatch import ReadAgain
from ._batch import BatchReads
from ._breaker import Breaker
from ._clock import Clock
from ._engine_api import NOT_HELD, EntryRequest, Fill, Peeked
from ._entry import (
    _Corrupt,
    _Plan,
    _Snap,
    _snap_from_hash,
    _snap_from_item,
    _snap_from_result,
    due_early,
    held_value,
    judge,
)
from ._errors import CacheNotEnteredError
from ._fills import Fills
from ._gate import _Bypass, _is_pool_exhausted, _Limiter
from ._invalidate import Invalidator
from ._keys import KeySpace
from ._loads import LoadResult, Loads
from ._metrics import Metrics, MetricsRegistry
from ._near import NearCache
from ._policy import Policy
from ._refresh import Refresher
from ._signing import Signer
from ._store import WHOLE_FIELDS, Store, is_wrongtype

__all__ = ["EntryRequest", "Fill", "RedisEngine"]

log = logging.getLogger("swr_cache")


class _Retry:
    """A coalesced read whose leader was cancelled: followers read themselves."""


_RETRY: Final = _Retry()


def _consume(fut: asyncio.Future[Any]) -> None:
    # Mark an exception as retrieved when every waiter has gone away.
    if not fut.cancelled():
        fut.exception()


def _settle(
    reads: dict[Any, Any], rkey: Any, followers: list[asyncio.Future[Any]], answer: Any
) -> None:
    """Take a read off the read table and answer its followers (a snapshot, an error or retry)."""
    if reads.get(rkey) is followers:
        del reads[rkey]
    for f in followers:
        if not f.done():
            f.set_result(answer)


def _closed() -> CacheNotEnteredError:
    return CacheNotEnteredError("the cache was closed while this load ran")


def map_read_failure(
    breaker: Breaker, metrics: Metrics, exc: BaseException, joined: bool = False
) -> BaseException | None:
    """Map a failed entry read to ``_Corrupt``/``_Bypass`` (``None``: not ours to handle).

    ``joined``: the read rode on a pipeline whose reader tells the breaker how
    the pipeline went; a failure still counts once per read it carried, so a
    wave of concurrent reads that fails opens the breaker at once, as the same
    reads on connections of their own would.
    """
    if _is_pool_exhausted(exc):
        # The client's pool is busy with other work: not Redis' health.
        metrics.counts["pool_waits_timed_out"] += 1
        metrics.counts["bypasses"] += 1
        return _Bypass()
    if isinstance(exc, ResponseError):
        if not joined:
            breaker.success()  # the server answered: not a breaker failure
        if is_wrongtype(exc):
            metrics.counts["decode_errors"] += 1
            return _Corrupt()
        metrics.counts["redis_errors"] += 1
        return _Bypass()
    if isinstance(exc, (RedisError, OSError, TimeoutError)):
        metrics.counts["redis_errors"] += 1
        breaker.failure()
        log.debug("swr_cache: Redis read failed: %r", exc)
        return _Bypass()
    return None


def _refuse(metrics: Metrics, reads: dict[Any, Any], rkey: Any, followers: list[Any]) -> NoReturn:
    """Redis is not to be used for this read: it and its followers bypass."""
    failure = _Bypass()
    metrics.counts["bypasses"] += 1
    _settle(reads, rkey, followers, failure)
    raise failure


class RedisEngine:
    """One cache's engine over one Redis client (see the module docstring).

    Built by ``Cache`` from its validated settings; every setting is fixed
    for the engine's life.
    """

    def __init__(
        self,
        client: Any,
        *,
        namespace: str,
        policy: Policy,
        store: Store,
        signer: Signer | None,
        breaker: Breaker,
        metrics: MetricsRegistry,
        max_in_flight: int,
        lease_ms: int,
        lease_wait: float,
        fence_ms: int,
        max_entry_bytes: int,
        call_timeout: float,
        refresh_concurrency: int,
        max_pending_refreshes: int,
        refresh_backoff: float,
        max_refresh_backoff: float,
        drain_timeout: float,
        clock_sync_interval: float,
        tag_stamp_ms: int,
        compress_threshold: int | None,
        near: NearCache | None,
        clock: Callable[[], float],
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.policy = policy
        self.keys = KeySpace(namespace)
        self.store = store
        self.signer = signer
        self.breaker = breaker
        self.metrics = metrics
        self.counts = metrics.get("swr_cache").counts
        if store.batcher is not None:
            store.batcher.counts = self.counts
        self.slots = _Limiter(max_in_flight)
        self.lease_ms = lease_ms
        self.lease_wait = lease_wait
        self.fence_ms = fence_ms
        self.max_entry_bytes = max_entry_bytes
        self.call_timeout = call_timeout
        # Invalidations wait longer for a slot than reads: they must not be dropped.
        self.invalidation_wait = max(10 * call_timeout, 5.0)
        self.refresh_backoff = refresh_backoff
        self.max_refresh_backoff = max_refresh_backoff
        self.drain_timeout = drain_timeout
        self.clock_sync_interval = clock_sync_interval
        self.tag_stamp_ms = tag_stamp_ms
        self.compress_threshold = compress_threshold
        # Entry copies in memory, dropped by Redis tracking announcements.
        self.near = near
        self.clock = Clock(clock)
        self.now_ms = self.clock.now_ms
        self.tg: TaskGroup | None = None
        self.reads: dict[Any, list[asyncio.Future[Any]]] = {}
        self.flights: dict[tuple[Any, ...], tuple[asyncio.Future[LoadResult], EntryRequest]] = {}
        self.held: dict[str, str] = {}  # lease key -> token, for release at shutdown
        self.idle: anyio.Event | None = None  # made on exit: no event loop is needed to construct
        self.refresher = Refresher(self, refresh_concurrency, max_pending_refreshes)
        self.loads = Loads(self)
        self.fills = Fills(self)
        self.invalidator = Invalidator(self)
        # The parts' entries into the internal API (see _engine_api.Engine).
        self.invalidate = self.invalidator.invalidate
        self.purge = self.invalidator.purge
        self.call_loader = self.loads.call_loader
        self.consistent_get = self.loads.consistent_get
        self.whole_entry = self.fills.whole_entry
        batches = BatchReads(self)
        self.get_many = batches.get_many
        self.get_items = batches.get_items
        # Requests are built on every call: a partial adds no Python frame.
        self.request = partial(EntryRequest, self)

    @property
    def entered(self) -> bool:
        return self.tg is not None

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open the task group that runs loads and refreshes; measure the clock."""
        if self.tg is not None:
            raise RuntimeError("this Cache is already entered")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self.tg = tg
        await self.sync_clock()
        tg.start_soon(self.clock_loop)
        if self.near is not None:  # track this namespace's entry keys
            self.near.start(
                self.client,
                self.keys.entry_prefix,
                tg,
                now_ms=self.now_ms,
                on_invalidate=self.detach,
                metrics=self.metrics.get("swr_cache"),
            )

    async def sync_clock(self) -> None:
        await self.clock.sync(self.store.server_time_ms, self.call_timeout)

    async def clock_loop(self) -> None:
        """Re-measure the offset to Redis time now and then (clocks drift)."""
        while True:
            await anyio.sleep(self.clock_sync_interval)
            await self.sync_clock()

    async def stop(self, drain: bool) -> None:
        """Drain background work (``drain``: up to ``drain_timeout``), cancel the rest, release leases."""
        tg = self.tg
        assert tg is not None
        try:
            if drain:
                with anyio.move_on_after(self.drain_timeout) as scope:
                    while self.flights or self.refresher.refreshing:
                        self.idle = anyio.Event()
                        await self.idle.wait()
                if scope.cancelled_caught:
                    log.warning(
                        "swr_cache: background work did not finish in %.1fs; cancelling",
                        self.drain_timeout,
                    )
        finally:
            tg.cancel_scope.cancel()
            try:
                # The body's own exception propagates unwrapped: the group is
                # only told to wind down the background tasks it cancelled.
                await tg.__aexit__(None, None, None)
            finally:
                self.tg = None
                if self.near is not None:  # stop serving copies
                    self.near.stop()
                self.abandon_background()
                with anyio.CancelScope(shield=True):
                    await self.release_held()
                    if self.store.batcher is not None:
                        await self.store.batcher.give_back()

    def use_store(self, store: Store) -> None:
        """Swap the store every part uses (tests wrap it to pause or fail commands)."""
        store.signer = self.signer
        if store.batcher is not None:
            store.batcher.counts = self.counts
        self.store = store

    def note_idle(self) -> None:
        """A flight or refresh ended: wake a draining ``stop`` once nothing runs."""
        if self.idle is not None and not self.flights and not self.refresher.refreshing:
            self.idle.set()

    def abandon_background(self) -> None:
        """Answer callers of loads that the closed task group never ran (or cut short).

        A task cancelled before its first step never runs its own cleanup, so
        without this its callers would wait forever.
        """
        flights, self.flights = self.flights, {}
        for fut, _ in flights.values():
            if not fut.done():
                fut.set_exception(_closed())
        self.refresher.refreshing.clear()
        self.refresher.pending = 0

    async def release_held(self) -> None:
        held = dict(self.held)
        self.held.clear()
        for lease, token in held.items():
            try:
                with anyio.move_on_after(self.call_timeout):
                    async with self.slots.hold(self.call_timeout):
                        await self.store.release_lease(lease, token)
            except (RedisError, OSError):
                pass

    def require_entered(self) -> TaskGroup:
        tg = self.tg
        if tg is None:
            raise CacheNotEnteredError(
                "the cache is not running: enter it first with `async with cache:` "
                "(for example in your app's lifespan)"
            )
        return tg

    def detach(self, entries: Iterable[str]) -> None:
        """Make later callers of just-invalidated entries start their own reads and loads.

        A read or load begun before an invalidation may return what it saw
        before it; a caller arriving after the invalidation completed must not
        share it. (The detached work still finishes for those already waiting;
        a detached load cannot store, its lease is gone.) Near copies of the
        entries are dropped first, so our own invalidations take effect here
        before they return.
        """
        if self.near is not None:
            entries = set(entries)
            self.near.drop(entries)
        if not self.reads and not self.flights:
            return
        gone = set(entries)
        for rkey in [k for k in self.reads if (k if type(k) is str else k[0]) in gone]:
            del self.reads[rkey]
        for fkey in [k for k in self.flights if k[0] in gone]:
            del self.flights[fkey]

    async def read(self, req: EntryRequest) -> _Snap | None:
        """One round trip for the entry, shared by concurrent readers in this process.

        The first reader registers an empty list; a concurrent reader of the
        same entry adds a future to it and is answered with the same snapshot
        (metadata is shared; each caller decodes its own values). Raises
        ``_Bypass`` when Redis cannot be used, ``_Corrupt`` for a key of the
        wrong type. This is the hit path: it is one frame on purpose.
        """
        fields = req.fields
        rkey: Any = req.entry if fields is WHOLE_FIELDS else (req.entry, fields)
        reads = self.reads
        followers = reads.get(rkey)
        if followers is not None:
            # Each follower awaits a future of its own, so cancelling one
            # follower touches nothing shared (no shield needed).
            fut = asyncio.get_running_loop().create_future()
            followers.append(fut)
            got = await fut
            if got is _RETRY:  # the leader was cancelled
                return await self.read(req)
            if isinstance(got, BaseException):
                raise got
            return got  # type: ignore[no-any-return]
        followers = reads[rkey] = []
        metrics = req.metrics
        slots = self.slots
        breaker = self.breaker
        # A read that rides on a pipeline under way takes no connection: no
        # slot of its own, and the pipeline's reader reports to the breaker.
        # Not while the breaker is open: a half-open probe stays one read.
        batcher = self.store.batcher
        joined = (
            batcher is not None
            and bool(batcher.open)
            and not breaker.is_open
            and batcher.joins(req.entry)
        )
        if joined:
            pass
        elif slots.free:
            slots.free -= 1
            if not breaker.allow():
                slots.release()
                _refuse(metrics, reads, rkey, followers)
        else:
            await self._wait_slot(metrics, reads, rkey, followers)
        t0 = time.perf_counter()
        try:
            raw: Any = await self.store.read_entry(req.entry, fields)
        except BaseException as exc:
            if self._read_broke(exc, metrics, joined, reads, rkey, followers):
                return await self.read(req)  # the pipeline's reader was cancelled
            raise
        if not joined:
            slots.release()
            breaker.success()
        metrics.redis_latency.observe(time.perf_counter() - t0)
        snap = req.parse(raw) if self.signer is None else self.snap(req, raw, fields)
        if reads.get(rkey) is followers:
            del reads[rkey]
        for f in followers:
            if not f.done():
                f.set_result(snap)
        return snap

    def _read_broke(
        self,
        exc: BaseException,
        metrics: Metrics,
        joined: bool,
        reads: dict[Any, Any],
        rkey: Any,
        followers: list[Any],
    ) -> bool:
        """Clean up after a failed entry read: True to read again, else raise what it maps to.

        Returns False (the caller re-raises ``exc``) for what is not ours to
        map: a cancellation, perhaps mid-probe.
        """
        if not joined:
            self.slots.release()
        if type(exc) is ReadAgain:
            _settle(reads, rkey, followers, _RETRY)
            return True
        mapped = map_read_failure(self.breaker, metrics, exc, joined)
        _settle(reads, rkey, followers, _RETRY if mapped is None else mapped)
        if mapped is not None:
            raise mapped from exc
        if not joined:
            self.breaker.abandon()  # let another probe go
        return False

    async def _wait_slot(
        self, metrics: Metrics, reads: dict[Any, Any], rkey: Any, followers: list[Any]
    ) -> None:
        """No slot is free: wait for one (up to ``call_timeout``), then ask the breaker."""
        try:
            got_slot = await self.slots.wait(self.call_timeout)
        except BaseException:
            # Cancelled while registered: followers must not wait on a
            # leader that will never read (one of them reads instead).
            _settle(reads, rkey, followers, _RETRY)
            raise
        if not got_slot:
            # Every slot stayed busy for as long as a call may take. A pool
            # wait says nothing about Redis' health: not a breaker failure.
            metrics.counts["pool_waits_timed_out"] += 1
            _refuse(metrics, reads, rkey, followers)
        if not self.breaker.allow():
            self.slots.release()
            _refuse(metrics, reads, rkey, followers)

    def snap(
        self, req: EntryRequest, raw: Any, fields: tuple[bytes, ...] | None, count: bool = True
    ) -> _Snap | None:
        """A read's snapshot; with a signing key, only of what verifies (else ``None``, counted)."""
        signer = self.signer
        if signer is not None:
            if type(raw) is bytes:  # a whole entry: its string ends with the signature
                raw = signer.check_string(req.entry, raw)
                ok = raw is not None
            elif type(raw) is dict:
                ok = signer.check_hash(req.entry, raw)
            elif fields is WHOLE_FIELDS or raw is None:
                # No entry, or a hash under a whole read: only its format is
                # looked at (a plan to load), never its data.
                ok = True
            else:
                assert fields is not None
                ok = signer.check_fields(req.entry, fields, raw)
                raw = raw[:-1]
            if not ok:
                # Not written by a holder of our key: treat it as absent (reloaded, overwritten).
                if count:
                    req.metrics.counts["bad_signatures"] += 1
                return None
        if not req.is_item:
            return _snap_from_result(raw)
        if type(raw) is dict:
            return _snap_from_hash(raw)
        return _snap_from_item(raw)

    def near_item(
        self,
        entry: str,
        metrics: Metrics,
        policy: Policy,
        request: Callable[..., EntryRequest],
        args: tuple[Any, ...],
    ) -> Any:
        """A fresh whole item (or ``None``, not found) from the near cache, counted.

        The item accessors' hit path with a near cache: no request is built
        and nothing is judged again (``NearCache.fresh``). ``NOT_HELD`` when
        there is no such copy. An early (XFetch) refresh it calls for is
        scheduled with a request built then, by ``request(args, {}, False)``.
        """
        got = self.near.fresh(entry)  # type: ignore[union-attr]
        if got is None:
            return NOT_HELD
        snap, now = got
        counts = metrics.counts
        counts["near_hits"] += 1
        if snap.none is not None:
            counts["negative_hits"] += 1
            value = None
        else:
            value = held_value(snap)
            counts["hits"] += 1
        beta = policy.early_refresh
        if (
            beta
            and snap.delta is not None
            and due_early(beta, snap.delta, snap.soft_ms or 0.0, now)
        ):
            counts["early_refreshes"] += 1
            self.refresher.schedule_refresh(request(args, {}, False), snap.version)
        return value

    async def get(self, req: EntryRequest) -> Any:
        """Answer one call: from the cache when it can, else through a shared load."""
        if self.tg is None:
            self.require_entered()
        counts = req.metrics.counts
        near = self.near
        from_near = False
        try:
            # A near copy skips the round trip; a read through the near cache installs what it got.
            if near is None:
                snap = await self.read(req)
            elif (snap := near.lookup(req.entry, req.fields)) is not None:
                from_near = True
            else:
                snap = await near.read(self.read, req)
        except _Bypass as failure:
            req.outcome = "bypass"
            return await self.bypass(req, failure)
        except _Corrupt:
            snap = None
        verdict: tuple[str, Any] | _Plan | None = None
        if snap is not None:
            now = self.now_ms()
            try:
                verdict = judge(req, snap, now)
            except _Corrupt:
                counts["decode_errors"] += 1
            if type(verdict) is tuple:
                state, value = verdict
                self.refresher.note_hit(req, snap, state, value is None, now)
                req.outcome = state
                if from_near:
                    counts["near_hits"] += 1
                return value
        if verdict is not None:
            counts["partial_misses"] += 1
        else:
            counts["misses"] += 1
        req.outcome = "miss"
        result = await self.flight(req)
        return result.take()

    async def bypass(self, req: EntryRequest, failure: _Bypass | None = None) -> Any:
        """Redis is unusable: answer from the origin, still coalesced in this process.

        ``failure``: the failed read's, shared by every caller of that read,
        so they share one origin load however late each gets to it.
        """
        result = await self.flight(req, bypass=True, shared=failure)
        return result.take()

    async def flight(
        self, req: EntryRequest, *, bypass: bool = False, shared: _Bypass | None = None
    ) -> LoadResult:
        """Join this process's load of the entry (or start it in the cache's task group).

        The load runs in its own task, so a caller that is cancelled leaves it
        running for the others; each caller awaits it through a shield.
        ``shared``: the failure of a read this caller shared with others; they
        all join the first one's origin load, even one that has finished.
        """
        fkey = (req.entry, req.attrs, bypass)
        flight = self.flights.get(fkey)
        fut: asyncio.Future[LoadResult]
        # A flight whose fill already landed, yet our read found no usable
        # entry: the entry was invalidated since, so its value may predate a
        # completed write. Start a new flight rather than join it.
        if shared is not None and shared.load is not None:
            fut = shared.load
            joined = True
        elif flight is None or flight[1].landed:
            tg = self.require_entered()
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_consume)
            self.flights[fkey] = (fut, req)
            tg.start_soon(self.run_flight, fkey, fut, req, bypass)
            joined = False
        else:
            fut = flight[0]
            joined = True
        if shared is not None:
            shared.load = fut
        if joined and req.wait_timeout is not None:
            # Only a wait for another call's load is bounded (never a hit).
            bound = asyncio.timeout(req.wait_timeout)
            try:
                async with bound:
                    return await asyncio.shield(fut)
            except TimeoutError:
                if bound.expired():
                    req.outcome = "wait-timeout"
                raise
        return await asyncio.shield(fut)

    async def run_flight(
        self,
        fkey: tuple[Any, ...],
        fut: asyncio.Future[LoadResult],
        req: EntryRequest,
        bypass: bool,
    ) -> None:
        try:
            if bypass:
                value = await self.loads.call_loader(req, req.attrs)
                result = LoadResult(value)
            else:
                result = await self.loads.load(req, background=False)
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
        except BaseException:
            # Only the closing cache cancels a flight: its callers were not
            # cancelled themselves, so they get an error, not a CancelledError.
            if not fut.done():
                fut.set_exception(_closed())
            raise
        else:
            if not fut.done():
                fut.set_result(result)
        finally:
            flight = self.flights.get(fkey)
            if flight is not None and flight[0] is fut:
                del self.flights[fkey]
            if not self.flights:
                self.note_idle()

    async def peek(self, req: EntryRequest) -> Peeked | None:
        self.require_entered()
        try:
            snap = await self.read(req)
        except (_Bypass, _Corrupt):
            return None
        if snap is None:
            return None
        try:
            verdict = judge(req, snap, self.now_ms())
        except _Corrupt:
            return None
        if type(verdict) is not tuple:
            return None
        return Peeked(verdict[1], verdict[0])

    async def refresh_now(self, req: EntryRequest) -> Any:
        """Reload in the foreground and store, whatever the entry's state."""
        self.require_entered()
        await self.invalidate([req.identity])
        # A deliberate refresh must store: lift the fence our own invalidation set.
        with contextlib.suppress(RedisError, OSError):
            async with self.slots.hold(self.invalidation_wait):
                await self.store.delete(req.fence)
        # Not shared with a flight already under way: that one may have read old data.
        result = await self.loads.load(req, background=False)
        return result.take()
