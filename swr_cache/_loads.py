"""Loads: a leased load of one entry, its fill (or merge), and the tag check after it.

``Loads.load`` is what a miss (a flight) and a background refresh run: take
the item's lease and re-read the entry in one round trip, wait for another
process's fill or take an expired lease over, run the loader while the lease
is renewed, then store the value with a compare-and-write script that lands
only if the lease is still ours and no invalidation fence stands. A load an
invalidation overtook is answered again by one more load (see ``load``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
from redis.exceptions import RedisError, ResponseError

from ._engine_api import EntryRequest, EntryState, Fill
from ._entry import _Corrupt, _Plan, judge, with_version
from ._gate import _Bypass, _is_pool_exhausted, _NoSlot
from ._store import M_ENTRY, LeaseOutcome, Store

if TYPE_CHECKING:
    from ._engine import RedisEngine

log = logging.getLogger("swr_cache")

_ONE: Final = b"1"
# Our estimate of Redis time is off by at most half a round trip plus clock
# drift between syncs; a purge this close before a load counts as during it.
PURGE_MARGIN_MS: Final = 20.0


class _Failed:
    """A loader's exception carried out of a task group unwrapped."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


_T = TypeVar("_T")


async def while_renewing(
    work: Callable[[], Awaitable[_T]], renew: Callable[[], Awaitable[None]]
) -> _T:
    """Run ``work`` while ``renew`` (a loop keeping leases alive) runs beside it.

    ``renew`` is cancelled as soon as ``work`` ends; if ``renew`` returns
    first, ``work`` runs on alone. ``work``'s result is returned, and its
    exception raised unwrapped (a task group would wrap it in a group).
    """
    outcome: list[Any] = []

    async def run(scope: anyio.CancelScope) -> None:
        try:
            outcome.append(await work())
        except Exception as exc:
            outcome.append(_Failed(exc))
        finally:
            scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, tg.cancel_scope)
        await renew()
    got = outcome[0]
    if isinstance(got, _Failed):
        raise got.exc
    return got  # type: ignore[no-any-return]


class LoadResult:
    """A loaded value shared by the callers of one flight; each gets its own copy."""

    __slots__ = ("_given", "state", "superseded", "value")

    def __init__(self, value: Any, state: str = EntryState.FRESH, superseded: bool = False) -> None:
        self.value = value
        self.state = state
        # An invalidation overtook the load that produced the value (see Loads.load).
        self.superseded = superseded
        self._given = False

    def take(self) -> Any:
        if not self._given:
            self._given = True
            return self.value
        return copy.deepcopy(self.value)


class Loads:
    """The load protocol of one engine (leases, fills, merges, tag checks)."""

    def __init__(self, engine: RedisEngine) -> None:
        self.engine = engine
        self.slots = engine.slots
        self.breaker = engine.breaker
        self.keys = engine.keys
        self.held = engine.held
        self.backoff = engine.refresher.backoff
        self.counts = engine.counts
        self.now_ms = engine.now_ms
        self.call_timeout = engine.call_timeout
        self.invalidation_wait = engine.invalidation_wait
        self.lease_ms = engine.lease_ms
        self.lease_wait = engine.lease_wait
        self.fence_ms = engine.fence_ms
        self.tag_stamp_ms = engine.tag_stamp_ms
        self.compress_threshold = engine.compress_threshold
        self.max_entry_bytes = engine.max_entry_bytes
        self.refresh_backoff = engine.refresh_backoff
        self.max_refresh_backoff = engine.max_refresh_backoff

    @property
    def store(self) -> Store:
        return self.engine.store

    async def call_loader(
        self, req: EntryRequest, attrs: tuple[str, ...] | None, *, unwrap: bool = True
    ) -> Any:
        metrics = req.metrics
        metrics.counts["loads"] += 1
        t0 = time.perf_counter()
        try:
            value = await req.loader(attrs)
        except Exception:
            metrics.counts["load_errors"] += 1
            raise
        finally:
            metrics.load_latency.observe(time.perf_counter() - t0)
        inner = value.value if type(value) is Fill else value
        if req.is_item and inner is not None and not isinstance(inner, Mapping):
            raise TypeError(
                f"{metrics.name} must return a mapping of attributes or None, got {type(inner).__name__}"
            )
        return inner if unwrap else value

    async def load(
        self, req: EntryRequest, *, background: bool, seen_version: bytes | None = None
    ) -> LoadResult:
        """Load under the item's lease and fill; see the module docstring.

        A foreground load that an invalidation overtook (its lease was taken,
        its tags purged, or its merge found another version) may hold data
        older than a write that has since completed, and a caller waiting on
        it may have started after that write. From the moment that is seen,
        no new caller joins this flight (they start their own), and one more
        load, begun after it, answers those already waiting: each of them
        started before this moment, so before that load began, and it sees
        every write completed before they started. Its own result is answered
        whether or not a later write overtakes it too, so it does not merge
        into the entry (the cached attributes could be of an older version).
        """
        result = await self.load_once(req, background, seen_version)
        if result.superseded and not background:
            req.landed = True  # (see _flight: later callers start a flight of their own)
            req.metrics.counts["reloads_after_invalidation"] += 1
            result = await self.load_once(req, background, seen_version, merge=False)
        return result

    async def load_once(
        self, req: EntryRequest, background: bool, seen_version: bytes | None, merge: bool = True
    ) -> LoadResult:
        store = self.store
        token = os.urandom(12).hex()
        lease = req.lease
        fields = req.read_fields()
        deadline = time.monotonic() + self.lease_wait
        delay = 0.002
        waited = False
        # Only background refreshes heed a back-off: a foreground miss never waits on one.
        backoff_key = req.backoff if background else None
        while True:
            try:
                got, raw, backoff_left = await self.guard(
                    req,
                    lambda: store.acquire_and_read(
                        lease, token, self.lease_ms, req.entry, fields, backoff_key
                    ),
                )
            except _Bypass:
                if background:  # nothing to store the refresh in: keep serving stale
                    return LoadResult(None)
                return LoadResult(await self.call_loader(req, req.attrs))
            if got == LeaseOutcome.REPAIRED:
                req.metrics.counts["leases_repaired"] += 1
            if backoff_left:
                # A refresh failed lately (here or in another process): keep serving stale.
                self._mirror_backoff(req.entry, backoff_left)
                if got:
                    await self.release(lease, token)
                return LoadResult(None)
            answer, plan = self._examine(req, raw, fields, background, seen_version)
            if answer is not None:
                if got:
                    await self.release(lease, token)
                return answer
            if got:
                if waited:
                    req.metrics.counts["lease_takeovers"] += 1
                break
            if background:
                # Another process refreshes it; nothing for us to do.
                return LoadResult(None)
            if not waited:
                req.metrics.counts["lease_waits"] += 1
                waited = True
            if time.monotonic() >= deadline:
                # The holder is slow: answer from the origin, store nothing.
                return await self.load_unleased(req)
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)
        # We hold the lease.
        if not merge and plan is not None and plan.merge_version is not None:
            # Load the cached and the requested attributes together and replace
            # the entry: an answer from one load cannot join two versions.
            plan.merge_version = None
            plan.merged = None
            plan.load_attrs = tuple(sorted({*(plan.load_attrs or ()), *(req.attrs or ())}))
        self.held[lease] = token
        try:
            return await self.load_with_lease(req, token, plan, background)
        finally:
            self.held.pop(lease, None)

    def _mirror_backoff(self, entry: str, backoff_left: int) -> None:
        """Remember another refresh's back-off briefly, so stale hits do not ask
        Redis again each time, yet a success elsewhere ends it soon."""
        mirror = min(backoff_left / 1000.0, self.refresh_backoff)
        prev = self.backoff.get(entry)
        self.backoff[entry] = (time.monotonic() + mirror, prev[1] if prev else 0.0)

    def _examine(
        self,
        req: EntryRequest,
        raw: Any,
        fields: tuple[bytes, ...] | None,
        background: bool,
        seen_version: bytes | None,
    ) -> tuple[LoadResult | None, _Plan | None]:
        """What the entry read with the lease says: an answer, or the plan of a load."""
        # (A bad signature seen again here was counted by the read that led here.)
        snap = None if raw is None else self.engine.snap(req, raw, fields, count=False)
        verdict: tuple[str, Any] | _Plan | None = None
        if snap is not None:
            try:
                verdict = judge(req, snap, self.now_ms())
            except _Corrupt:
                verdict = None
        if type(verdict) is not tuple:
            return None, verdict  # type: ignore[return-value]
        # A refresh is moot once someone else replaced the entry it saw.
        if not background or (snap is not None and snap.version != seen_version):
            # Answered from what Redis held: a reader that finds the entry
            # gone from now on must not join us (see RedisEngine.flight).
            req.landed = True
            return LoadResult(verdict[1], verdict[0]), None
        plan = _Plan()
        plan.state = verdict[0]
        return None, plan

    async def load_unleased(self, req: EntryRequest) -> LoadResult:
        """Load without a lease (its holder is slow) and store nothing.

        No lease can be taken away to tell us a write landed meanwhile; the
        fence tells instead: it is set for fence_ttl by every invalidation, so
        its remaining time dates the last one. One newer than our load's start
        makes the result superseded (``_load`` loads again).
        """
        start_ms = self.now_ms() - PURGE_MARGIN_MS
        value = await self.call_loader(req, req.attrs)
        superseded = False
        if self.fence_ms:
            try:
                left = await self.guard(req, lambda: self.store.pttl(req.fence))
            except _Bypass:
                left = -2
            superseded = left > 0 and self.now_ms() + left - self.fence_ms >= start_ms
        return LoadResult(value, superseded=superseded)

    async def guard(self, req: EntryRequest, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run a miss-path Redis call: errors count, trip the breaker and bypass."""
        counts = req.metrics.counts
        if not self.breaker.allow():
            counts["bypasses"] += 1
            raise _Bypass
        ok = False
        try:
            async with self.slots.hold(self.call_timeout):
                out = await call()
            ok = True
        except ResponseError as exc:
            ok = True
            counts["redis_errors"] += 1
            raise _Bypass from exc
        except (RedisError, OSError) as exc:
            if isinstance(exc, _NoSlot) or _is_pool_exhausted(exc):
                ok = True  # a local wait, not a sign of Redis' health
                counts["pool_waits_timed_out"] += 1
                counts["bypasses"] += 1
                raise _Bypass from exc
            counts["redis_errors"] += 1
            self.breaker.failure()
            raise _Bypass from exc
        finally:
            if ok:
                self.breaker.success()
            elif self.breaker.probing:
                self.breaker.abandon()
        return out

    async def release(self, lease: str, token: str) -> None:
        with contextlib.suppress(RedisError, OSError):  # else it expires by itself
            async with self.slots.hold(self.call_timeout):
                await self.store.release_lease(lease, token)

    async def release_all(self, held: Mapping[str, str]) -> None:
        """Give back leases that may still be ours, even while being cancelled.

        Shielded and bounded: a caller cancelled after taking leases must not
        leave other readers waiting for their TTL. (A lease already consumed
        by its fill, or taken over, is left alone: the script checks tokens.)
        """
        if not held:
            return
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(2 * self.call_timeout),
            contextlib.suppress(RedisError, OSError),
        ):
            async with self.slots.hold(self.call_timeout):
                await self.store.release_leases(held)

    async def renew_forever(self, lease: str, token: str) -> None:
        interval = self.lease_ms / 3000.0
        while True:
            await anyio.sleep(interval)
            try:
                async with self.slots.hold(self.call_timeout):
                    if not await self.store.renew_lease(lease, token, self.lease_ms):
                        return
            except (RedisError, OSError):
                pass

    async def load_with_lease(
        self, req: EntryRequest, token: str, plan: _Plan | None, background: bool
    ) -> LoadResult:
        lease = req.lease
        attrs: tuple[str, ...] | None = req.attrs
        merge_version: bytes | None = None
        merged: dict[str, Any] | None = None
        prior_absent: list[str] = []
        if plan is not None and req.is_item:
            if plan.state is not None:
                # A background refresh of a usable entry reloads what it holds.
                attrs = None if req.attrs is None else await self.widen(req, req.attrs)
            elif plan.merge_version is not None:
                # A fresh entry lacking some attributes: load just those and merge.
                attrs = plan.load_attrs
                merge_version = plan.merge_version
                merged = plan.merged
                prior_absent = plan.prior_absent
            elif plan.load_attrs is not None:
                # A stale partial entry: load the union and replace (no mixed versions).
                attrs = await self.widen(req, plan.load_attrs)
            else:
                attrs = None
        attrs = with_version(attrs, req.version_attr) if req.is_item else attrs
        # Server time (less a margin for our offset estimate) when the load
        # began: a tag purged after it means the load may predate the change.
        start_ms = max(self.now_ms() - PURGE_MARGIN_MS, req.purge_floor)
        t0 = time.perf_counter()
        try:
            value = await self.load_renewing(req, attrs, lease, token)
        except BaseException:
            with anyio.CancelScope(shield=True):
                if background:
                    await self.back_off(req, lease, token)
                else:
                    await self.release(lease, token)
            raise
        delta_ms = (time.perf_counter() - t0) * 1000.0
        policy = req.policy
        tags = list(req.tags()) if req.tags is not None else []
        store_it = True
        if type(value) is Fill:
            store_it = value.store
            policy = value.policy or policy
            tags.extend(value.tags)
            value = value.value
        superseded = False
        if store_it:
            # Shielded: a fill that lands must also join its tags' member sets and
            # check their purge stamps, or a purge could miss it (a cancellation at
            # shutdown between those steps left such entries). Each step is bounded
            # by the call timeouts.
            with anyio.CancelScope(shield=True):
                superseded = await self.engine.fills.fill(
                    req,
                    token,
                    attrs,
                    value,
                    merge_version,
                    prior_absent,
                    delta_ms,
                    tags,
                    start_ms,
                    policy,
                )
        else:
            await self.release(lease, token)
        if req.is_item and req.attrs is not None and value is not None:
            out = {} if merged is None else dict(merged)
            for name in req.attrs:
                if name in value:
                    out[name] = value[name]
            return LoadResult(out, superseded=superseded)
        return LoadResult(value, superseded=superseded)

    async def load_renewing(
        self, req: EntryRequest, attrs: tuple[str, ...] | None, lease: str, token: str
    ) -> Any:
        """Run the loader while a sibling task keeps the lease alive."""
        return await while_renewing(
            lambda: self.call_loader(req, attrs, unwrap=False),
            lambda: self.renew_forever(lease, token),
        )

    async def widen(self, req: EntryRequest, attrs: tuple[str, ...]) -> tuple[str, ...] | None:
        """For a stale partial entry: load the union of cached and requested attributes."""
        try:
            async with self.slots.hold(self.call_timeout):
                names = await self.store.field_names(req.entry)
        except (RedisError, OSError):
            return attrs
        if names is None or M_ENTRY in names:  # a whole (or negative) entry by now
            return None
        cached = {n.decode("utf-8", "replace") for n in names if not n.startswith(b"\xff")}
        return tuple(sorted(cached.union(attrs)))

    async def back_off(self, req: EntryRequest, lease: str, token: str) -> None:
        """A refresh failed: keep serving stale, and back off further refreshes only.

        The back-off (doubling up to ``max_refresh_backoff``) is marked in
        Redis for every process's background refreshes; the lease is given
        back, so a foreground miss loads at once. A stored fill ends it.
        """
        prev = self.backoff.get(req.entry)
        step = self.refresh_backoff if not prev else min(prev[1] * 2, self.max_refresh_backoff)
        step = max(step, self.refresh_backoff)
        self.backoff[req.entry] = (time.monotonic() + step, step)
        if len(self.backoff) > 10_000:
            now = time.monotonic()
            for gone in [k for k, v in self.backoff.items() if v[0] <= now]:
                del self.backoff[gone]
        try:
            async with self.slots.hold(self.call_timeout):
                await self.store.back_off(lease, req.backoff, token, max(1, round(step * 1000)))
        except (RedisError, OSError):
            await self.release(lease, token)

    async def consistent_get(self, req: EntryRequest) -> Any:
        """Read DynamoDB strongly consistently and store the result under a fresh lease."""
        self.engine.require_entered()
        token = os.urandom(12).hex()
        lease = req.lease
        try:
            outcome = await self.guard(req, lambda: self.store.acquire(lease, token, self.lease_ms))
        except _Bypass:
            outcome = LeaseOutcome.HELD_ELSEWHERE  # Redis is unusable: read anyway, store nothing
        if outcome == LeaseOutcome.REPAIRED:
            req.metrics.counts["leases_repaired"] += 1
        got = outcome != LeaseOutcome.HELD_ELSEWHERE
        if not got:
            # Another load of this item is under way and will fill it.
            return await self.call_loader(req, req.attrs)
        self.held[lease] = token
        try:
            start_ms = self.now_ms() - PURGE_MARGIN_MS
            t0 = time.perf_counter()
            try:
                value = await self.call_loader(req, req.attrs)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self.release(lease, token)
                raise
            delta_ms = (time.perf_counter() - t0) * 1000.0
            # Shielded like the engine's fills: a fill cut short could leave its
            # lease behind or skip its tag bookkeeping. Each step is bounded.
            with anyio.CancelScope(shield=True):
                await self.engine.fills.fill(
                    req, token, req.attrs, value, None, [], delta_ms, [], start_ms, req.policy
                )
        finally:
            self.held.pop(lease, None)
        return value
