"""The near cache: entry snapshots held in process memory, invalidated by Redis.

A ``NearCache`` keeps the snapshots (``_Snap``: raw field bytes and the
entry's deadlines) of recently read entries, so a hot read costs a dict
lookup and a decode instead of a Redis round trip. Every hit is judged like
a Redis read (soft TTL → stale + one background refresh, hard TTL → never
served) and decodes its own objects, so no two callers share a value.

How it stays correct:

* **Tracking.** One connection per Redis master runs
  ``CLIENT TRACKING on REDIRECT <its own id> BCAST PREFIX <ns>:e:{`` and
  ``SUBSCRIBE __redis__:invalidate`` (RESP2, whatever protocol the user's
  client speaks). Redis then announces every change to an entry key of the
  namespace — an invalidation, a fill, a write-through, a stream refresh,
  an eviction, an expiry — and a ``FLUSHALL``/``FLUSHDB`` (a message without
  keys). Each announcement drops the copies of those entries.
* **Listener health.** Copies are served only while every master's
  tracking connection is subscribed. When one fails (killed, Redis
  restarted, silent past the health check), the near cache is flushed and
  bypassed until tracking is back; what changed meanwhile was never heard,
  so nothing read before is kept.
* **No install race.** A read registers a ticket for its entry before it
  goes to Redis; an invalidation (announced or our own) or a flush that
  lands while it is in flight spoils the ticket, and the snapshot it brings
  back is not installed (counted as ``near_install_refusals``).
* **Own invalidations are immediate.** The engine drops this process's
  copies before ``invalidate_item``, ``purge_tags``, DynamoTable writes and
  stream handlers return, without waiting for the announcement.
* **Bounded.** At most ``max_items`` copies (least recently used go first),
  none older than ``max_age`` seconds nor past its entry's hard deadline.

The engine calls ``lookup``, ``read``, ``read_many``, ``drop``, ``start``
and ``stop``; nothing else here is the engine's business.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ._entry import _Snap
from ._errors import ConfigError
from ._metrics import Metrics
from ._store import WHOLE_FIELDS
from ._tracking import Tracker, TrackerPort, entries_of

__all__ = ["NearCache"]


class NearCache:
    """Entry copies in process memory, kept correct by Redis client tracking.

    Off by default: pass one to ``Cache(..., near_cache=NearCache(...))``.
    A near cache serves one ``Cache`` (for life); it starts tracking when
    the cache is entered and is emptied when the cache exits.

    Args:
        max_items: copies held at most; the least recently used go first.
        max_age: seconds any copy may be served from memory (it is also
            never served past its entry's hard deadline).
        health_check_interval: seconds of silence after which a tracking
            connection is pinged; no answer within as long again counts
            as a lost connection (flush, bypass, reconnect).
        reconnect_delay: first wait before re-establishing tracking after a
            failure, doubling up to ``max_reconnect_delay``.
        max_reconnect_delay: longest such wait.
        topology_interval: seconds between checks of a Redis Cluster's
            nodes (tracking follows failovers and nodes added or removed).

    Raises:
        ConfigError: on a non-positive size or duration.
    """

    def __init__(
        self,
        max_items: int = 10_000,
        max_age: float = 5.0,
        *,
        health_check_interval: float = 1.0,
        reconnect_delay: float = 0.05,
        max_reconnect_delay: float = 2.0,
        topology_interval: float = 1.0,
    ) -> None:
        if max_items < 1:
            raise ConfigError(f"max_items must be >= 1, not {max_items!r}")
        if not max_age > 0 or not math.isfinite(max_age):
            raise ConfigError(f"max_age must be a positive number of seconds, not {max_age!r}")
        for name, value in (
            ("health_check_interval", health_check_interval),
            ("reconnect_delay", reconnect_delay),
            ("max_reconnect_delay", max_reconnect_delay),
            ("topology_interval", topology_interval),
        ):
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, not {value!r}")
        self.max_items = max_items
        self.max_age = float(max_age)
        self.health_check_interval = float(health_check_interval)
        self.reconnect_delay = float(reconnect_delay)
        self.max_reconnect_delay = max(float(max_reconnect_delay), self.reconnect_delay)
        self.topology_interval = float(topology_interval)
        #: ``True`` while every tracked node's connection is subscribed:
        #: only then are copies served or installed.
        self.usable = False
        # rkey (entry, or (entry, fields) for a projection) -> (snapshot, serve-until ms)
        self._items: OrderedDict[Any, tuple[_Snap, float]] = OrderedDict()
        # entry -> its projection rkeys held, so dropping an entry drops them all
        self._proj: dict[str, set[Any]] = {}
        # Race guard: reads in flight per entry, and the stamp of the last
        # drop of an entry that had reads in flight. A ticket is the stamp
        # when its read began; a later drop or flush spoils it.
        self._inflight: dict[str, int] = {}
        self._spoiled: dict[str, int] = {}
        self._stamp = 0
        self._flushed = 0
        self._owner: object | None = None  # the Cache it serves (one, for life)
        self._running = False
        self._now_ms: Callable[[], float] = _no_clock
        self._on_invalidate: Callable[[list[str]], None] = _ignore
        self._metrics = Metrics("swr_cache")
        self._ready: anyio.Event | None = None  # made when awaited: no loop needed to construct
        self._expected: set[Any] = set()
        self._up: set[Any] = set()

    def __len__(self) -> int:
        """Copies held now."""
        return len(self._items)

    def __repr__(self) -> str:
        state = "tracking" if self.usable else "bypassed"
        return (
            f"NearCache(max_items={self.max_items}, max_age={self.max_age}, "
            f"held={len(self._items)}, {state})"
        )

    async def wait_ready(self) -> None:
        """Wait until tracking is established and copies are served (tests, warm-up)."""
        while not self.usable:
            if self._ready is None or self._ready.is_set():
                self._ready = anyio.Event()
            await self._ready.wait()

    # -- the engine's interface: reads -----------------------------------------

    def lookup(self, entry: str, fields: tuple[bytes, ...] | None) -> _Snap | None:
        """The copy of an entry read with ``fields`` (``None``: whole), if held and servable."""
        if not self.usable:
            return None
        # (A whole read's fixed field list is keyed by the entry alone, as the engine does.)
        rkey: Any = entry if fields is WHOLE_FIELDS else (entry, fields)
        items = self._items
        held = items.get(rkey)
        if held is None:
            return None
        if self._now_ms() >= held[1]:
            self._forget(rkey)
            return None
        items.move_to_end(rkey)
        return held[0]

    def fresh(self, entry: str) -> tuple[_Snap, float] | None:
        """A held whole entry that is fresh now and was judged before, and the time.

        The hit path of an item accessor asks this first (no request built,
        no judge): a snapshot whose deadlines were parsed by an earlier judge
        of it (so its format was checked), holding a decoded item or a
        not-found mark. Anything else (absent, stale, never judged): ``None``,
        and the call goes the usual way.
        """
        if not self.usable:
            return None
        held = self._items.get(entry)
        if held is None:
            return None
        snap = held[0]
        soft = snap.soft_ms
        now = self._now_ms()
        if soft is None or now >= soft or now >= held[1]:
            return None
        if snap.kept is None and snap.none is None:
            return None
        self._items.move_to_end(entry)
        return snap, now

    async def read(self, read: Callable[[Any], Awaitable[_Snap | None]], req: Any) -> _Snap | None:
        """Read an entry through ``read`` (one Redis round trip) and install what it returns.

        The snapshot is installed only if no invalidation of the entry and no
        flush happened while the read was in flight.
        """
        if not self.usable:
            return await read(req)
        entry = req.entry
        ticket = self._begin(entry)
        try:
            snap = await read(req)
        except BaseException:
            self._end(entry)
            raise
        if self._end(entry) > ticket or self._flushed > ticket:
            if snap is not None:
                req.metrics.counts["near_install_refusals"] += 1
        elif snap is not None:
            self._install(entry, req.fields, snap)
        return snap

    async def read_many(
        self,
        read_many: Callable[[Sequence[Any]], Awaitable[list[Any] | None]],
        reqs: Sequence[Any],
        metrics: Metrics,
    ) -> list[Any] | None:
        """A batch: copies for what is held, one ``read_many`` for the rest (then installed).

        ``read_many`` returns one snapshot (or ``None``, or a marker for a
        corrupt entry) per request, or ``None`` when Redis is unusable.
        """
        if not self.usable:
            return await read_many(reqs)
        lookup = self.lookup
        out: list[Any] = [lookup(r.entry, r.fields) for r in reqs]
        todo = [i for i, snap in enumerate(out) if snap is None]
        metrics.counts["near_hits"] += len(reqs) - len(todo)
        if not todo:
            return out
        asked = [reqs[i] for i in todo]
        tickets = [self._begin(r.entry) for r in asked]
        try:
            got = await read_many(asked)
        except BaseException:
            for r in asked:
                self._end(r.entry)
            raise
        flushed = self._flushed
        spoiled = [
            self._end(r.entry) > ticket or flushed > ticket
            for r, ticket in zip(asked, tickets, strict=True)
        ]
        if got is None:
            return None
        refused = 0
        for i, r, bad, snap in zip(todo, asked, spoiled, got, strict=True):
            out[i] = snap
            if type(snap) is _Snap:
                if bad:
                    refused += 1
                else:
                    self._install(r.entry, r.fields, snap)
        metrics.counts["near_install_refusals"] += refused
        return out

    # -- the engine's interface: invalidation ----------------------------------

    def drop(self, entries: Iterable[str]) -> None:
        """Forget the copies of these entries (whole and projections) and spoil reads in flight."""
        items = self._items
        proj = self._proj
        inflight = self._inflight
        for entry in entries:
            items.pop(entry, None)
            for rkey in proj.pop(entry, ()):
                items.pop(rkey, None)
            if entry in inflight:
                self._stamp += 1
                self._spoiled[entry] = self._stamp

    def flush(self) -> None:
        """Forget every copy and spoil every read in flight."""
        self._items.clear()
        self._proj.clear()
        self._stamp += 1
        self._flushed = self._stamp

    # -- the engine's interface: lifecycle ---------------------------------------

    def bind(self, cache: object) -> None:
        """Serve ``cache`` (at construction; a near cache serves one cache for life).

        Raises:
            ConfigError: it already serves another cache.
        """
        if self._owner is not None and self._owner is not cache:
            raise ConfigError("this NearCache already serves another Cache; make one per Cache")
        self._owner = cache

    def start(
        self,
        client: Any,
        prefix: str,
        tg: TaskGroup,
        *,
        now_ms: Callable[[], float],
        on_invalidate: Callable[[list[str]], None],
        metrics: Metrics,
    ) -> None:
        """Start tracking ``prefix`` on ``client``'s server(s) in ``tg`` (returns at once).

        Copies are served once tracking is up (see ``wait_ready``).
        ``on_invalidate`` hears the entries every announcement names (the
        engine detaches reads of them); ``metrics`` counts invalidations
        received and flushes.
        """
        self._running = True
        self._now_ms = now_ms
        self._on_invalidate = on_invalidate
        self._metrics = metrics
        self.flush()
        port = TrackerPort(self._expect, self._node_up, self._down, self._invalidated)
        tg.start_soon(Tracker(self, port, client, prefix).run)

    def stop(self) -> None:
        """Stop serving (the cache is exiting; its task group ends the tracking)."""
        self._down(None, False)
        self._running = False
        self._now_ms = _no_clock
        self._on_invalidate = _ignore

    # -- what the tracker reports ----------------------------------------------------

    def _expect(self, nodes: set[Any]) -> None:
        self._expected = nodes
        self._up &= nodes

    def _node_up(self, node: Any) -> None:
        self._up.add(node)
        if self._up >= self._expected and self._running:
            self.usable = True
            if self._ready is not None:
                self._ready.set()

    def _down(self, node: Any, lost: bool) -> None:
        """A tracking connection is gone (``None``: all of them): flush and bypass.

        ``lost``: it failed (counted in ``near_flushes``), rather than being
        closed on purpose (the cache exiting, the cluster's masters changing).
        """
        if node is None:
            self._up.clear()
        else:
            self._up.discard(node)
        if self.usable and lost:
            self._metrics.counts["near_flushes"] += 1
        self.usable = False
        self.flush()
        self._on_invalidate(list(self._inflight))

    def _invalidated(self, keys: list[bytes] | None) -> None:
        """An announcement from Redis: these entry keys changed (``None``: a flush of the database)."""
        counts = self._metrics.counts
        if keys is None:
            counts["near_invalidations"] += 1
            self.flush()
            # Reads in flight began before the flush: later callers must not join them.
            self._on_invalidate(list(self._inflight))
            return
        entries = entries_of(keys)
        counts["near_invalidations"] += len(entries)
        self.drop(entries)
        self._on_invalidate(entries)

    # -- internals ---------------------------------------------------------------

    def _begin(self, entry: str) -> int:
        inflight = self._inflight
        inflight[entry] = inflight.get(entry, 0) + 1
        return self._stamp

    def _end(self, entry: str) -> int:
        """Close one read of ``entry``; returns the stamp of its last drop (-1: none)."""
        inflight = self._inflight
        n = inflight[entry] - 1
        if n:
            inflight[entry] = n
            return self._spoiled.get(entry, -1)
        del inflight[entry]
        return self._spoiled.pop(entry, -1)

    def _install(self, entry: str, fields: tuple[bytes, ...] | None, snap: _Snap) -> None:
        try:
            hard = float(snap.hard)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return  # corrupt: the judge says so, and it is not worth holding
        until = min(self._now_ms() + self.max_age * 1000.0, hard)
        snap.held = True  # served many times: a flat item is decoded once (see _entry)
        items = self._items
        if fields is WHOLE_FIELDS:
            rkey: Any = entry
        else:
            rkey = (entry, fields)
            self._proj.setdefault(entry, set()).add(rkey)
        items[rkey] = (snap, until)
        items.move_to_end(rkey)
        while len(items) > self.max_items:
            old, _ = items.popitem(last=False)
            if type(old) is tuple:
                self._unindex(old)

    def _forget(self, rkey: Any) -> None:
        self._items.pop(rkey, None)
        if type(rkey) is tuple:
            self._unindex(rkey)

    def _unindex(self, rkey: tuple[str, Any]) -> None:
        keys = self._proj.get(rkey[0])
        if keys is not None:
            keys.discard(rkey)
            if not keys:
                del self._proj[rkey[0]]


def _no_clock() -> float:
    return math.inf  # never attached: nothing is servable


def _ignore(entries: list[str]) -> None:
    pass
