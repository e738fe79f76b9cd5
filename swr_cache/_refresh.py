"""Background refreshes: XFetch's early refresh, the stale refresh, their bound and back-off.

A stale hit (or a fresh one XFetch picks, likelier as the soft deadline
nears) schedules one refresh per entry in this process; the load's lease
makes it one across processes. At most ``max_pending_refreshes`` wait and
``refresh_concurrency`` run; beyond that a refresh is dropped (counted). After
a failed refresh the entry is backed off (here and, through a mark in Redis,
in every process) while its stale value keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from ._engine_api import EntryRequest
from ._entry import FRESH as _FRESH
from ._entry import _Snap, due_early

if TYPE_CHECKING:
    from ._engine import RedisEngine

log = logging.getLogger("swr_cache")


class Refresher:
    """Schedules and runs one engine's background refreshes."""

    def __init__(self, engine: RedisEngine, concurrency: int, max_pending: int) -> None:
        self.engine = engine
        self.slots = asyncio.Semaphore(concurrency)
        self.max_pending_refreshes = max_pending
        self.refreshing: set[tuple[Any, ...]] = set()
        self.pending = 0
        # entry key -> (monotonic time the back-off ends, its last step in seconds)
        self.backoff: dict[str, tuple[float, float]] = {}

    def note_hit(self, req: EntryRequest, snap: _Snap, state: str, none: bool, now: float) -> None:
        """Count a usable entry and start its refresh when stale (or, by XFetch, nearly so)."""
        counts = req.metrics.counts
        if state == _FRESH:
            counts["negative_hits" if none and req.is_item else "hits"] += 1
            beta = req.policy.early_refresh
            if (
                beta
                and snap.delta is not None
                and due_early(beta, snap.delta, snap.soft_ms or 0.0, now)
            ):
                counts["early_refreshes"] += 1
                self.schedule_refresh(req, snap.version)
        else:
            counts["stale_hits"] += 1
            self.schedule_refresh(req, snap.version)

    def schedule_refresh(self, req: EntryRequest, seen_version: bytes | None) -> None:
        rkey = (req.entry, req.attrs)
        if rkey in self.refreshing:
            return
        backoff = self.backoff.get(req.entry)
        if backoff is not None and time.monotonic() < backoff[0]:
            return
        if self.pending >= self.max_pending_refreshes or self.engine.tg is None:
            req.metrics.counts["refreshes_dropped"] += 1
            return
        self.refreshing.add(rkey)
        self.pending += 1
        self.engine.tg.start_soon(self.refresh_task, rkey, req, seen_version)

    async def refresh_task(
        self, rkey: tuple[Any, ...], req: EntryRequest, seen_version: bytes | None
    ) -> None:
        try:
            async with self.slots:
                req.metrics.counts["refreshes"] += 1
                try:
                    await self.engine.loads.load(req, background=True, seen_version=seen_version)
                except Exception as exc:
                    req.metrics.counts["refresh_errors"] += 1
                    log.warning("swr_cache: background refresh of %s failed: %r", req.entry, exc)
                # (A stored fill ends the back-off; a refresh that found one stays backed off.)
        finally:
            self.pending -= 1
            self.refreshing.discard(rkey)
            if not self.refreshing:
                self.engine.note_idle()
