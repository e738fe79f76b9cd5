"""The engine: fresh / stale / absent entries, single flight, leases, fences, tags.

``Cache`` is what users construct; the decorators, ``DynamoTable``, the stream
hook and the ASGI middleware all call its ``_get`` family, which speaks in
entries. Every Redis command goes through ``_store.Store``.

How one read goes (``Cache._get``):

1. One Redis round trip reads the entry (HGETALL for a whole item, HMGET of the
   metadata plus the requested attributes for a projection). Concurrent reads
   of one entry in this process share that round trip.
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
import copy
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import anyio
from anyio.abc import TaskGroup
from redis.exceptions import RedisError, ResponseError

from . import _codec
from ._breaker import Breaker
from ._entry import FRESH as _FRESH
from ._entry import (
    _Corrupt,
    _Plan,
    _Snap,
    _snap_from_hash,
    _snap_from_list,
    _snap_from_result,
    judge,
    stamp_entry,
    with_version,
)
from ._errors import (
    CacheNotEnteredError,
    CodecError,
    ConfigError,
    InvalidationError,
    KeyEncodingError,
)
from ._gate import (
    _Bypass,
    _is_pool_exhausted,
    _Limiter,
    _NoSlot,
    _pool_size,
    _reject_decoding_client,
    _warn_without_timeout,
)
from ._keys import KeySpace, change_tags, item_identity
from ._metrics import Metrics, MetricsRegistry
from ._near import NearCache
from ._policy import Policy
from ._readiness import describe_client, ping_client
from ._signing import M_SIG, Signer
from ._store import (
    ALL_META,
    M_ABSENT,
    M_DELTA,
    M_FORMAT,
    M_HARD,
    M_NONE,
    M_RESULT,
    M_SOFT,
    M_VERSION,
    M_WHOLE,
    FillOutcome,
    LeaseOutcome,
    Store,
    is_wrongtype,
)

__all__ = ["Cache", "EntryState", "Fill"]

log = logging.getLogger("swr_cache")

_ONE: Final = b"1"
_RESULT_FIELDS: Final = (M_SOFT, M_HARD, M_FORMAT, M_DELTA, M_VERSION, M_RESULT)
_SIGNED_RESULT_FIELDS: Final = (*_RESULT_FIELDS, M_SIG)
_NO_ATTRS: Final[tuple[str, ...]] = ()
# Our estimate of Redis time is off by at most half a round trip plus clock
# drift between syncs; a purge this close before a load counts as during it.
_PURGE_MARGIN_MS: Final = 20.0


class EntryState:
    FRESH: Final = "fresh"
    STALE: Final = "stale"


class _Retry:
    """A coalesced read whose leader was cancelled: followers read themselves."""


_RETRY: Final = _Retry()


def _consume(fut: asyncio.Future[Any]) -> None:
    # Mark an exception as retrieved when every waiter has gone away.
    if not fut.cancelled():
        fut.exception()


# ---------------------------------------------------------------------------
# Snapshots: an entry as read, before it is judged against a request.


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


class _Failed:
    """A loader's exception carried out of a task group unwrapped."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


_T = TypeVar("_T")


async def _while_renewing(
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


class Fill:
    """What a loader may return instead of a bare value, to steer the fill.

    Args:
        value: what callers receive.
        store: ``False`` serves the value without storing it (an uncacheable
            HTTP response, say).
        policy: TTLs for this fill only (HTTP freshness from response headers).
        tags: tags known only once the value is loaded (``Surrogate-Key``).
    """

    __slots__ = ("policy", "store", "tags", "value")

    def __init__(
        self,
        value: Any,
        *,
        store: bool = True,
        policy: Policy | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        self.value = value
        self.store = store
        self.policy = policy
        self.tags = list(tags)


# ---------------------------------------------------------------------------
# Requests: what one call wants from one entry.


class _Request:
    """One call's view of one entry: its keys, what it wants and how to load it."""

    __slots__ = (
        "attrs",
        "cache",
        "consistent",
        "entry",
        "fields",
        "identity",
        "is_item",
        "landed",
        "loader",
        "metrics",
        "outcome",
        "policy",
        "purge_floor",
        "tags",
        "version_attr",
    )

    def __init__(
        self,
        cache: Cache,
        metrics: Metrics,
        policy: Policy,
        identity: str,
        is_item: bool,
        attrs: tuple[str, ...] | None,
        loader: Callable[[tuple[str, ...] | None], Awaitable[Any]],
        tags: Callable[[], Sequence[str]] | None,
        entry: str | None = None,
        consistent: bool = False,
        version_attr: str | None = None,
    ) -> None:
        self.cache = cache
        # The item's own version attribute: every projection load includes it
        # and a merge happens only into an entry holding the same version.
        self.version_attr = version_attr
        # The loader reads strongly consistently: a fill under a lease taken
        # after an invalidation cannot hold pre-write data, so no fence applies.
        self.consistent = consistent
        self.metrics = metrics
        self.policy = policy
        self.identity = identity
        self.entry = cache._keys.entry(identity) if entry is None else entry
        self.is_item = is_item
        self.attrs = attrs
        self.loader = loader
        # Set once this request's load has stored its fill (see Cache._flight).
        self.landed = False
        # A purge stamp this request's last load already lost to: the next load
        # only counts newer ones (see Cache._check_tags).
        self.purge_floor = 0.0
        self.tags = tags
        # How _get answered: fresh, stale, miss or bypass (for tracing spans).
        self.outcome = ""
        # What one read asks Redis for: None = HGETALL (a whole item).
        if cache._signer is not None:
            # A signature covers every field: signed entries are read whole.
            self.fields: tuple[bytes, ...] | None = None if is_item else _SIGNED_RESULT_FIELDS
        elif not is_item:
            self.fields = _RESULT_FIELDS
        elif attrs is None:
            self.fields = None
        else:
            self.fields = ALL_META + tuple(a.encode() for a in attrs)

    @property
    def lease(self) -> str:
        return self.cache._keys.lease(self.identity)

    @property
    def fence(self) -> str:
        return self.cache._keys.fence(self.identity)

    @property
    def backoff(self) -> str:
        return self.cache._keys.backoff(self.identity)

    def read_fields(self) -> tuple[bytes, ...] | None:
        return self.fields


# ---------------------------------------------------------------------------


class _LoadResult:
    """A loaded value shared by the callers of one flight; each gets its own copy."""

    __slots__ = ("_given", "state", "superseded", "value")

    def __init__(self, value: Any, state: str = EntryState.FRESH, superseded: bool = False) -> None:
        self.value = value
        self.state = state
        # An invalidation overtook the load that produced the value (see Cache._load).
        self.superseded = superseded
        self._given = False

    def take(self) -> Any:
        if not self._given:
            self._given = True
            return self.value
        return copy.deepcopy(self.value)


class Cache:
    """The swr_cache engine over one Redis (standalone or cluster) client.

    ``Cache(client)`` never closes a client it was handed; ``Cache.from_url``
    and ``Cache.from_env`` build a client with a waiting connection pool and
    close it on exit. Nothing touches Redis before ``async with cache:``,
    which owns the task group that runs background refreshes and loads;
    leaving it drains them (up to ``drain_timeout``), cancels the rest and
    releases held leases.

    Args:
        client: a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``
            built with ``decode_responses=False``.
        namespace: prefix of every key; two namespaces never see each other.
            A deploy-wide purge is a namespace bump (``"shop-v2"``).
        soft_ttl, hard_ttl, negative_ttl, jitter, early_refresh: the default
            ``Policy``; decorators may override each.
        lease_ttl: seconds a load lease lives; renewed every third of it
            while the load runs, so it outlives any load.
        lease_wait: how long a caller waits for another process's load
            before loading itself (default ``lease_ttl``).
        fence_ttl: after an invalidation, loads are served but not stored for
            this long (an eventually consistent read may still see the old item).
        refresh_concurrency: background refreshes running at once.
        max_pending_refreshes: queued refreshes beyond which a stale hit drops
            its refresh (counted as ``refreshes_dropped``).
        max_entry_bytes: entries larger than this are not stored (counted).
        max_in_flight: Redis commands in flight at once from this cache; by
            default the client's pool size, at most 64. Waiting for a slot is
            capped by ``call_timeout`` and then bypasses Redis.
        call_timeout: cap on waiting for a Redis slot; the per-command timeout
            is the client's ``socket_timeout`` (``from_url`` sets it).
        breaker_threshold, breaker_cooldown: consecutive Redis failures that open
            the breaker, and its first cool-down in seconds (doubling to 15 s).
        refresh_backoff: first back-off after a failed refresh, seconds
            (doubling to ``max_refresh_backoff``); the stale value keeps serving.
        drain_timeout: seconds ``__aexit__`` waits for background work.
        clock_sync_interval: seconds between re-measurements of the offset
            to Redis server time.
        tag_stamp_ttl: how long a purged tag remembers when it was purged
            (one small key per purged tag). A tagged fill whose load took
            longer than this is not stored, since it could not be checked.
        direct_reads: entry reads (the hit path) take a pooled connection and
            send HGETALL/HMGET themselves, skipping redis-py's per-command
            retry and observability wrappers (about 8 us a hit here). A read
            that fails is a miss served by the origin anyway. ``False`` uses
            the client's normal command path (e.g. to keep redis-py's
            OpenTelemetry metrics for hits).
        compress_threshold: values (attributes, results) whose encoding is
            longer than this many bytes are stored zlib-compressed when that
            is smaller; ``None`` (the default) never compresses. Reads inflate
            transparently (at most 64 MiB per value).
        signing_key: sign every entry written with HMAC-SHA256 and serve only
            entries whose signature checks (others are a counted miss,
            ``bad_signatures``), so a shared Redis cannot feed forged values.
            ``str``/``bytes`` of at least 16 bytes, or a list for rotation
            (the first signs, any verifies). See ``swr_cache._signing``.
        near_cache: a ``NearCache`` to serve hot entries from process memory,
            kept correct by Redis client tracking (off by default; one near
            cache per ``Cache``). See the README's "Near cache" section.
        clock: wall clock in seconds; shared deadlines are in Redis server time,
            this clock plus a measured offset.

    Raises:
        ConfigError: on invalid settings or a client that decodes responses.
    """

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = "swr",
        soft_ttl: float = 30.0,
        hard_ttl: float = 600.0,
        negative_ttl: float | None = None,
        jitter: float = 0.0,
        early_refresh: float = 1.0,
        lease_ttl: float = 5.0,
        lease_wait: float | None = None,
        fence_ttl: float = 1.0,
        refresh_concurrency: int = 16,
        max_pending_refreshes: int = 1000,
        max_entry_bytes: int = 1 << 20,
        max_in_flight: int | None = None,
        call_timeout: float = 0.5,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 0.5,
        refresh_backoff: float = 1.0,
        max_refresh_backoff: float = 60.0,
        drain_timeout: float = 5.0,
        clock_sync_interval: float = 60.0,
        tag_stamp_ttl: float = 120.0,
        direct_reads: bool = True,
        compress_threshold: int | None = None,
        signing_key: bytes | str | Sequence[bytes | str] | None = None,
        near_cache: NearCache | None = None,
        clock: Callable[[], float] = time.time,
        _owns_client: bool = False,
    ) -> None:
        _reject_decoding_client(client)
        _warn_without_timeout(client)
        self.policy = Policy(
            soft_ttl=soft_ttl,
            hard_ttl=hard_ttl,
            negative_ttl=negative_ttl,
            jitter=jitter,
            early_refresh=early_refresh,
        )
        if lease_ttl <= 0 or fence_ttl < 0 or call_timeout <= 0:
            raise ConfigError("lease_ttl and call_timeout must be > 0, fence_ttl >= 0")
        if refresh_concurrency < 1 or max_pending_refreshes < 1 or max_entry_bytes < 1:
            raise ConfigError(
                "refresh_concurrency, max_pending_refreshes, max_entry_bytes must be >= 1"
            )
        self.client = client
        self.namespace = namespace
        self._keys = KeySpace(namespace)
        self._store = Store(client, direct_reads)
        self._signer = None if signing_key is None else Signer(signing_key)
        self._store.signer = self._signer
        self._owns_client = _owns_client
        self.lease_ms = max(1, round(lease_ttl * 1000))
        self.lease_wait = lease_ttl if lease_wait is None else float(lease_wait)
        self.fence_ms = round(fence_ttl * 1000)
        self.max_entry_bytes = max_entry_bytes
        self.call_timeout = float(call_timeout)
        self.refresh_backoff = float(refresh_backoff)
        self.max_refresh_backoff = float(max_refresh_backoff)
        self.drain_timeout = float(drain_timeout)
        self.clock_sync_interval = float(clock_sync_interval)
        self.tag_stamp_ms = max(1000, round(tag_stamp_ttl * 1000))
        if compress_threshold is not None and compress_threshold < 1:
            raise ConfigError("compress_threshold must be a positive number of bytes or None")
        self.compress_threshold = compress_threshold
        # Invalidations wait longer for a slot than reads: they must not be dropped.
        self._invalidation_wait = max(10 * self.call_timeout, 5.0)
        self._clock = clock
        self._offset_ms = 0.0
        self.breaker = Breaker(threshold=breaker_threshold, cooldown=breaker_cooldown)
        if max_in_flight is None:
            max_in_flight = min(64, _pool_size(client) or 64)
        self._slots = _Limiter(max_in_flight)
        self._refresh_slots = asyncio.Semaphore(refresh_concurrency)
        self.max_pending_refreshes = max_pending_refreshes
        self.metrics = MetricsRegistry()
        self._engine_metrics = self.metrics.get("swr_cache")
        self._tg: TaskGroup | None = None
        self._entered = False
        self._reads: dict[Any, list[asyncio.Future[Any]]] = {}
        self._flights: dict[tuple[Any, ...], tuple[asyncio.Future[_LoadResult], _Request]] = {}
        self._refreshing: set[tuple[Any, ...]] = set()
        self._backoff: dict[str, tuple[float, float]] = {}
        self._held: dict[str, str] = {}  # lease key -> token, for release at shutdown
        self._pending = 0
        self._idle: anyio.Event | None = None  # made on entry: no event loop is needed to construct
        # near cache: entry copies in memory, dropped by Redis tracking announcements
        self._near = near_cache
        if near_cache is not None:
            near_cache.bind(self)

    # -- construction helpers ------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        max_connections: int = 64,
        socket_timeout: float = 0.5,
        socket_connect_timeout: float = 0.5,
        pool_timeout: float = 1.0,
        **kwargs: Any,
    ) -> Cache:
        """A cache over a client it builds and owns (closed on ``__aexit__``).

        ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs work, with ACL
        users as ``redis://user:password@host``. The pool waits for a free
        connection (``BlockingConnectionPool``) instead of raising when all
        ``max_connections`` are busy. ``kwargs`` go to ``Cache``.
        """
        from redis.asyncio import BlockingConnectionPool, Redis

        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            health_check_interval=30,
        )
        client = Redis.from_pool(pool)
        kwargs.setdefault("max_in_flight", max_connections)
        return cls(client, _owns_client=True, **kwargs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> Cache:
        """A cache configured from environment variables.

        ``SWR_CACHE_REDIS_URL``, else ``REDIS_URL``, else ``REDIS_HOST`` /
        ``REDIS_PORT`` / ``REDIS_DB`` (default ``localhost:6379/0``);
        ``SWR_CACHE_NAMESPACE``, ``SWR_CACHE_SOFT_TTL``, ``SWR_CACHE_HARD_TTL``.
        Explicit ``kwargs`` win over the environment. With none of the Redis
        variables set it logs a warning before falling back to localhost.
        """
        env = os.environ if environ is None else environ
        url = env.get("SWR_CACHE_REDIS_URL") or env.get("REDIS_URL")
        if not url and not any(v in env for v in ("REDIS_HOST", "REDIS_PORT", "REDIS_DB")):
            # A deploy that forgot its variables would otherwise run uncached
            # against a localhost nobody listens on, quietly (reads fail open).
            log.warning(
                "swr_cache: none of SWR_CACHE_REDIS_URL, REDIS_URL, REDIS_HOST is set; "
                "using redis://localhost:6379/0"
            )
        if not url:
            host = env.get("REDIS_HOST", "localhost")
            port = env.get("REDIS_PORT", "6379")
            db = env.get("REDIS_DB", "0")
            if not port.isdigit() or not db.isdigit():
                raise ConfigError(f"REDIS_PORT and REDIS_DB must be integers, got {port!r}, {db!r}")
            url = f"redis://{host}:{port}/{db}"
        if "SWR_CACHE_NAMESPACE" in env:
            kwargs.setdefault("namespace", env["SWR_CACHE_NAMESPACE"])
        for var, name in (("SWR_CACHE_SOFT_TTL", "soft_ttl"), ("SWR_CACHE_HARD_TTL", "hard_ttl")):
            if var in env:
                try:
                    kwargs.setdefault(name, float(env[var]))
                except ValueError:
                    raise ConfigError(
                        f"{var} must be a number of seconds, got {env[var]!r}"
                    ) from None
        return cls.from_url(url, **kwargs)

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("this Cache is already entered")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._entered = True
        await self.sync_clock()
        tg.start_soon(self._clock_loop)
        if self._near is not None:  # near cache: start tracking this namespace's entry keys
            self._near.start(
                self.client,
                self._keys.entry_prefix,
                tg,
                now_ms=self._now_ms,
                on_invalidate=self._detach,
                metrics=self._engine_metrics,
            )
        log.info(
            "swr_cache: cache on %s, namespace %r", describe_client(self.client), self.namespace
        )
        return self

    async def _clock_loop(self) -> None:
        """Re-measure the offset to Redis time now and then (clocks drift)."""
        while True:
            await anyio.sleep(self.clock_sync_interval)
            await self.sync_clock()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        assert tg is not None
        try:
            if exc is None:
                with anyio.move_on_after(self.drain_timeout) as scope:
                    while self._flights or self._refreshing:
                        self._idle = anyio.Event()
                        await self._idle.wait()
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
                self._tg = None
                self._entered = False
                if self._near is not None:  # near cache: stop serving copies
                    self._near.stop()
                self._abandon_background()
                with anyio.CancelScope(shield=True):
                    await self._release_held()
                    if self._owns_client:
                        await self.client.aclose()
        return None

    def _abandon_background(self) -> None:
        """Answer callers of loads that the closed task group never ran (or cut short).

        A task cancelled before its first step never runs its own cleanup, so
        without this its callers would wait forever.
        """
        flights, self._flights = self._flights, {}
        for fut, _ in flights.values():
            if not fut.done():
                fut.set_exception(_closed())
        self._refreshing.clear()
        self._pending = 0

    async def _release_held(self) -> None:
        held, self._held = self._held, {}
        for lease, token in held.items():
            try:
                with anyio.move_on_after(self.call_timeout):
                    async with self._slots.hold(self.call_timeout):
                        await self._store.release_lease(lease, token)
            except (RedisError, OSError):
                pass

    def _require_entered(self) -> TaskGroup:
        tg = self._tg
        if tg is None:
            raise CacheNotEnteredError(
                "the cache is not running: enter it first with `async with cache:` "
                "(for example in your app's lifespan)"
            )
        return tg

    async def sync_clock(self) -> None:
        """Measure this process's offset to Redis ``TIME`` (deadlines are in server time)."""
        try:
            with anyio.fail_after(max(self.call_timeout, 1.0)):
                before = self._clock()
                server_ms = await self._store.server_time_ms()
                after = self._clock()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("swr_cache: could not read Redis TIME (%s); using the local clock", exc)
            return
        self._offset_ms = server_ms - (before + after) * 500.0

    def _now_ms(self) -> float:
        return self._clock() * 1000.0 + self._offset_ms

    async def ping(self, limit: float | None = None) -> float:
        """Round trip of one PING to Redis, in seconds: for readiness checks.

        Unlike reads it does not fail open and ignores the circuit breaker: it
        asks Redis now. Works on a cache that was not entered too.

        Args:
            limit: cap on the whole call, seconds (default ``call_timeout``).

        Raises:
            CacheUnavailableError: Redis did not answer within the timeout.
        """
        seconds = self.call_timeout if limit is None else float(limit)
        return await ping_client(self.client, seconds, self._slots)

    # -- public operations ---------------------------------------------------

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters and latency histograms per function (and ``swr_cache`` for the engine)."""
        out = self.metrics.snapshot()
        out["swr_cache"]["breaker_open"] = self.breaker.is_open
        out["swr_cache"]["breaker_opened"] = self.breaker.opened
        out["swr_cache"]["refreshes_pending"] = self._pending
        return out

    async def invalidate_item(self, table: str, key: Mapping[str, Any]) -> None:
        """Invalidate one DynamoDB item: its entry, its lease, and everything a change to it touches.

        That is every result tagged with ``item_tag`` of the item's key or of
        a subset of its key attributes (its partition), and with the table's
        tag (scans): see ``change_tags``. DynamoTable's writes and the stream
        invalidator purge the same.

        Raises:
            InvalidationError: Redis could not be reached; nothing was assumed.
        """
        await self.invalidate_items([(table, key)])

    async def invalidate_items(self, items: Iterable[tuple[str, Mapping[str, Any]]]) -> int:
        """Invalidate many items in as few round trips as possible (see ``invalidate_item``).

        Returns:
            How many distinct items were invalidated.
        """
        identities: dict[str, None] = {}
        tags: dict[str, None] = {}
        for table, key in items:
            identities[item_identity(table, key)] = None
            tags.update(dict.fromkeys(change_tags(table, key)))
        await self.invalidate_identities(list(identities), list(tags))
        return len(identities)

    async def invalidate_identities(
        self, identities: Sequence[str], tags: Sequence[str] = ()
    ) -> None:
        """Invalidate entries by identity and purge tags, failing loudly."""
        ks = self._keys
        triples = [(ks.entry(i), ks.lease(i), ks.fence(i)) for i in identities]
        try:
            async with self._slots.hold(self._invalidation_wait):
                await self._store.invalidate(triples, self.fence_ms)
            self._detach(t[0] for t in triples)
            if tags:
                await self._purge(tags)
        except (RedisError, OSError) as exc:
            raise InvalidationError(
                f"could not invalidate {len(triples)} entries / {len(tags)} tags: {exc}",
                keys=[t[0] for t in triples],
            ) from exc
        self._engine_metrics.counts["invalidations"] += len(triples)

    async def purge_tags(self, tags: Iterable[str]) -> None:
        """Remove every entry stored with any of these tags (items, results, HTTP responses).

        Raises:
            InvalidationError: Redis could not be reached.
        """
        tag_list = list(dict.fromkeys(tags))
        if not tag_list:
            return
        try:
            await self._purge(tag_list)
        except (RedisError, OSError) as exc:
            raise InvalidationError(
                f"could not purge tags {tag_list!r}: {exc}", keys=tag_list
            ) from exc

    async def _purge(self, tags: Sequence[str]) -> None:
        ks = self._keys
        gen_keys = [ks.tag_gen(t) for t in tags]
        member_keys = [ks.tag_members(t) for t in tags]
        # Stamp first, members second: a fill either sees the stamp (newer
        # than its load's start) when it checks, or is already a member we delete.
        counts = self._engine_metrics.counts
        async with self._slots.hold(self._invalidation_wait):
            _, broken_stamps = await self._store.mark_purged(gen_keys, self.tag_stamp_ms)
            member_sets, broken_sets = await self._store.tag_members(member_keys)
        counts["tag_keys_repaired"] += broken_stamps + broken_sets
        triples: list[tuple[str, str, str]] = []
        for members in member_sets:
            for raw in members:
                ident = self._member_identity(raw)
                if ident is None:
                    # Not an entry key of ours (undecodable, another namespace):
                    # it cannot stand for an entry, so it must not stop the
                    # purge of those that do. Removed below with the rest.
                    counts["tag_members_dropped"] += 1
                    continue
                triples.append((ks.entry(ident), ks.lease(ident), ks.fence(ident)))
        if not any(member_sets):
            return
        async with self._slots.hold(self._invalidation_wait):
            if triples:
                await self._store.invalidate(triples, self.fence_ms)
                self._detach(t[0] for t in triples)
            await self._store.remove_tag_members(member_keys, member_sets)
        counts["invalidations"] += len(triples)

    def _member_identity(self, raw: bytes) -> str | None:
        """The identity a tag member names, or ``None`` if it names no entry of this cache."""
        try:
            return self._keys.identity_of(raw.decode())
        except (UnicodeDecodeError, KeyEncodingError):
            return None

    def _note_hit(self, req: _Request, snap: _Snap, state: str, none: bool, now: float) -> None:
        """Count a usable entry and start its refresh when stale (or, by XFetch, nearly so)."""
        counts = req.metrics.counts
        if state == _FRESH:
            counts["negative_hits" if none and req.is_item else "hits"] += 1
            beta = req.policy.early_refresh
            if beta and snap.delta is not None:
                # XFetch: refresh early, likelier as the soft deadline nears.
                gap = -float(snap.delta) * beta * math.log(1.0 - random.random())
                if now + gap >= (snap.soft_ms or 0.0):
                    counts["early_refreshes"] += 1
                    self._schedule_refresh(req, snap.version)
        else:
            counts["stale_hits"] += 1
            self._schedule_refresh(req, snap.version)

    def _detach(self, entries: Iterable[str]) -> None:
        """Make later callers of just-invalidated entries start their own reads and loads.

        A read or load begun before an invalidation may return what it saw
        before it; a caller arriving after the invalidation completed must not
        share it. (The detached work still finishes for those already waiting;
        a detached load cannot store, its lease is gone.)
        """
        if self._near is not None:  # near cache: own invalidations drop copies before returning
            entries = set(entries)
            self._near.drop(entries)
        if not self._reads and not self._flights:
            return
        gone = set(entries)
        for rkey in [k for k in self._reads if (k if type(k) is str else k[0]) in gone]:
            del self._reads[rkey]
        for fkey in [k for k in self._flights if k[0] in gone]:
            del self._flights[fkey]

    # -- the read path -------------------------------------------------------

    async def _read(self, req: _Request) -> _Snap | None:
        """One round trip for the entry, shared by concurrent readers in this process.

        The first reader registers an empty list; a concurrent reader of the
        same entry adds a future to it and is answered with the same snapshot
        (metadata is shared; each caller decodes its own values). Raises
        ``_Bypass`` when Redis cannot be used, ``_Corrupt`` for a key of the
        wrong type. This is the hit path: it is one frame on purpose.
        """
        fields = req.fields
        rkey: Any = req.entry if fields is None else (req.entry, fields)
        reads = self._reads
        followers = reads.get(rkey)
        if followers is not None:
            # Each follower awaits a future of its own, so cancelling one
            # follower touches nothing shared (no shield needed).
            fut = asyncio.get_running_loop().create_future()
            followers.append(fut)
            got = await fut
            if got is _RETRY:  # the leader was cancelled
                return await self._read(req)
            if isinstance(got, BaseException):
                raise got
            return got  # type: ignore[no-any-return]
        followers = reads[rkey] = []
        metrics = req.metrics
        slots = self._slots
        breaker = self.breaker
        failure: BaseException | None = None
        if slots.free:
            slots.free -= 1
        else:
            try:
                got_slot = await slots.wait(self.call_timeout)
            except BaseException:
                # Cancelled while registered: followers must not wait on a
                # leader that will never read (one of them reads instead).
                _settle(reads, rkey, followers, _RETRY)
                raise
            if not got_slot:
                # Every slot stayed busy for as long as a call may take. A pool
                # wait says nothing about Redis' health: not a breaker failure.
                metrics.counts["pool_waits_timed_out"] += 1
                failure = _Bypass()
        if failure is None and not breaker.allow():
            slots.release()
            failure = _Bypass()
        if failure is not None:
            metrics.counts["bypasses"] += 1
            _settle(reads, rkey, followers, failure)
            raise failure
        t0 = time.perf_counter()
        try:
            raw: Any = await self._store.read_entry(req.entry, fields)
        except BaseException as exc:
            slots.release()
            mapped = self._read_failed(metrics, exc)
            _settle(reads, rkey, followers, _RETRY if mapped is None else mapped)
            if mapped is None:
                breaker.abandon()  # cancelled (perhaps mid-probe): let another probe go
                raise
            raise mapped from exc
        slots.release()
        breaker.success()
        metrics.redis_latency.observe(time.perf_counter() - t0)
        if self._signer is not None:
            snap = self._snap(req, raw, fields)
        elif fields is None:
            snap = _snap_from_hash(raw)
        elif req.is_item:
            snap = _snap_from_list(raw)
        else:
            snap = _snap_from_result(raw)
        if reads.get(rkey) is followers:
            del reads[rkey]
        for f in followers:
            if not f.done():
                f.set_result(snap)
        return snap

    def _read_failed(self, metrics: Metrics, exc: BaseException) -> BaseException | None:
        """Map a failed entry read to ``_Corrupt``/``_Bypass`` (``None``: not ours to handle)."""
        if _is_pool_exhausted(exc):
            # The client's pool is busy with other work: not Redis' health.
            metrics.counts["pool_waits_timed_out"] += 1
            metrics.counts["bypasses"] += 1
            return _Bypass()
        if isinstance(exc, ResponseError):
            self.breaker.success()  # the server answered: not a breaker failure
            if is_wrongtype(exc):
                metrics.counts["decode_errors"] += 1
                return _Corrupt()
            metrics.counts["redis_errors"] += 1
            return _Bypass()
        if isinstance(exc, (RedisError, OSError, TimeoutError)):
            metrics.counts["redis_errors"] += 1
            self.breaker.failure()
            log.debug("swr_cache: Redis read failed: %r", exc)
            return _Bypass()
        return None

    def _snap(
        self, req: _Request, raw: Any, fields: tuple[bytes, ...] | None, count: bool = True
    ) -> _Snap | None:
        signer = self._signer
        if signer is not None:
            ok = (
                signer.check_hash(req.entry, raw)
                if fields is None
                else signer.check_fields(req.entry, fields, raw)
            )
            if not ok:
                # Not written by a holder of our key: treat it as absent (reloaded, overwritten).
                if count:
                    req.metrics.counts["bad_signatures"] += 1
                return None
            if fields is not None:
                raw = raw[:-1]
        if fields is None:
            return _snap_from_hash(raw)
        if not req.is_item:
            return _snap_from_result(raw)
        return _snap_from_list(raw)

    async def _get(self, req: _Request) -> Any:
        """Answer one call: from the cache when it can, else through a shared load."""
        if self._tg is None:
            self._require_entered()
        counts = req.metrics.counts
        near = self._near
        from_near = False
        try:
            # near cache: a held copy skips the round trip; a read installs what it got
            if near is None:
                snap = await self._read(req)
            elif (snap := near.lookup(req.entry, req.fields)) is not None:
                from_near = True
            else:
                snap = await near.read(self._read, req)
        except _Bypass:
            req.outcome = "bypass"
            return await self._bypass(req)
        except _Corrupt:
            snap = None
        verdict: tuple[str, Any] | _Plan | None = None
        if snap is not None:
            now = self._now_ms()
            try:
                verdict = self._judge(req, snap, now)
            except _Corrupt:
                counts["decode_errors"] += 1
            if type(verdict) is tuple:
                state, value = verdict
                self._note_hit(req, snap, state, value is None, now)
                req.outcome = state
                if from_near:  # near cache: a hit from memory
                    counts["near_hits"] += 1
                return value
        if verdict is not None:
            counts["partial_misses"] += 1
        else:
            counts["misses"] += 1
        req.outcome = "miss"
        result = await self._flight(req)
        return result.take()

    _judge = staticmethod(judge)

    async def _bypass(self, req: _Request) -> Any:
        """Redis is unusable: answer from the origin, still coalesced in this process."""
        result = await self._flight(req, bypass=True)
        return result.take()

    # -- loads -----------------------------------------------------------------

    async def _flight(self, req: _Request, *, bypass: bool = False) -> _LoadResult:
        """Join this process's load of the entry (or start it in the cache's task group).

        The load runs in its own task, so a caller that is cancelled leaves it
        running for the others; each caller awaits it through a shield.
        """
        fkey = (req.entry, req.attrs, bypass)
        flight = self._flights.get(fkey)
        # A flight whose fill already landed, yet our read found no usable
        # entry: the entry was invalidated since, so its value may predate a
        # completed write. Start a new flight rather than join it.
        if flight is None or flight[1].landed:
            tg = self._require_entered()
            fut: asyncio.Future[_LoadResult] = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_consume)
            self._flights[fkey] = (fut, req)
            tg.start_soon(self._run_flight, fkey, fut, req, bypass)
        else:
            fut = flight[0]
        return await asyncio.shield(fut)

    async def _run_flight(
        self, fkey: tuple[Any, ...], fut: asyncio.Future[_LoadResult], req: _Request, bypass: bool
    ) -> None:
        try:
            if bypass:
                value = await self._call_loader(req, req.attrs)
                result = _LoadResult(value)
            else:
                result = await self._load(req, background=False)
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
            flight = self._flights.get(fkey)
            if flight is not None and flight[0] is fut:
                del self._flights[fkey]
            if not self._flights and not self._refreshing and self._idle is not None:
                self._idle.set()

    async def _call_loader(
        self, req: _Request, attrs: tuple[str, ...] | None, *, unwrap: bool = True
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

    async def _load(
        self, req: _Request, *, background: bool, seen_version: bytes | None = None
    ) -> _LoadResult:
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
        result = await self._load_once(req, background, seen_version)
        if result.superseded and not background:
            req.landed = True  # (see _flight: later callers start a flight of their own)
            req.metrics.counts["reloads_after_invalidation"] += 1
            result = await self._load_once(req, background, seen_version, merge=False)
        return result

    async def _load_once(
        self, req: _Request, background: bool, seen_version: bytes | None, merge: bool = True
    ) -> _LoadResult:
        store = self._store
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
                got, raw, backoff_left = await self._guard(
                    req,
                    lambda: store.acquire_and_read(
                        lease, token, self.lease_ms, req.entry, fields, backoff_key
                    ),
                )
            except _Bypass:
                if background:  # nothing to store the refresh in: keep serving stale
                    return _LoadResult(None)
                return _LoadResult(await self._call_loader(req, req.attrs))
            if got == LeaseOutcome.REPAIRED:
                req.metrics.counts["leases_repaired"] += 1
            if backoff_left:
                # A refresh failed lately (here or in another process): keep
                # serving stale. Remember it briefly, so stale hits do not ask
                # Redis again each time, yet a success elsewhere ends it soon.
                now = time.monotonic()
                mirror = min(backoff_left / 1000.0, self.refresh_backoff)
                prev = self._backoff.get(req.entry)
                self._backoff[req.entry] = (now + mirror, prev[1] if prev else 0.0)
                if got:
                    await self._release(lease, token)
                return _LoadResult(None)
            # (A bad signature seen again here was counted by the read that led here.)
            snap = None if raw is None else self._snap(req, raw, fields, count=False)
            verdict: tuple[str, Any] | _Plan | None = None
            if snap is not None:
                try:
                    verdict = self._judge(req, snap, self._now_ms())
                except _Corrupt:
                    verdict = None
            plan: _Plan | None
            if type(verdict) is tuple:
                # A refresh is moot once someone else replaced the entry it saw.
                if not background or (snap is not None and snap.version != seen_version):
                    # Answered from what Redis held: a reader that finds the
                    # entry gone from now on must not join us (see _flight).
                    req.landed = True
                    if got:
                        await self._release(lease, token)
                    return _LoadResult(verdict[1], verdict[0])
                plan = _Plan()
                plan.state = verdict[0]
            else:
                plan = verdict  # type: ignore[assignment]
            if got:
                if waited:
                    req.metrics.counts["lease_takeovers"] += 1
                break
            if background:
                # Another process refreshes it; nothing for us to do.
                return _LoadResult(None)
            if not waited:
                req.metrics.counts["lease_waits"] += 1
                waited = True
            if time.monotonic() >= deadline:
                # The holder is slow: answer from the origin, store nothing.
                return await self._load_unleased(req)
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)
        # We hold the lease.
        if not merge and plan is not None and plan.merge_version is not None:
            # Load the cached and the requested attributes together and replace
            # the entry: an answer from one load cannot join two versions.
            plan.merge_version = None
            plan.merged = None
            plan.load_attrs = tuple(sorted({*(plan.load_attrs or ()), *(req.attrs or ())}))
        self._held[lease] = token
        try:
            return await self._load_with_lease(req, token, plan, background)
        finally:
            self._held.pop(lease, None)

    async def _load_unleased(self, req: _Request) -> _LoadResult:
        """Load without a lease (its holder is slow) and store nothing.

        No lease can be taken away to tell us a write landed meanwhile; the
        fence tells instead: it is set for fence_ttl by every invalidation, so
        its remaining time dates the last one. One newer than our load's start
        makes the result superseded (``_load`` loads again).
        """
        start_ms = self._now_ms() - _PURGE_MARGIN_MS
        value = await self._call_loader(req, req.attrs)
        superseded = False
        if self.fence_ms:
            try:
                left = await self._guard(req, lambda: self.client.pttl(req.fence))
            except _Bypass:
                left = -2
            superseded = left > 0 and self._now_ms() + left - self.fence_ms >= start_ms
        return _LoadResult(value, superseded=superseded)

    async def _guard(self, req: _Request, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run a miss-path Redis call: errors count, trip the breaker and bypass."""
        counts = req.metrics.counts
        if not self.breaker.allow():
            counts["bypasses"] += 1
            raise _Bypass
        ok = False
        try:
            async with self._slots.hold(self.call_timeout):
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
            elif self.breaker._probing:
                self.breaker.abandon()
        return out

    async def _release(self, lease: str, token: str) -> None:
        with contextlib.suppress(RedisError, OSError):  # else it expires by itself
            async with self._slots.hold(self.call_timeout):
                await self._store.release_lease(lease, token)

    async def _release_all(self, held: Mapping[str, str]) -> None:
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
            async with self._slots.hold(self.call_timeout):
                await self._store.release_leases(held)

    async def _renew_forever(self, lease: str, token: str) -> None:
        interval = self.lease_ms / 3000.0
        while True:
            await anyio.sleep(interval)
            try:
                async with self._slots.hold(self.call_timeout):
                    if not await self._store.renew_lease(lease, token, self.lease_ms):
                        return
            except (RedisError, OSError):
                pass

    async def _load_with_lease(
        self, req: _Request, token: str, plan: _Plan | None, background: bool
    ) -> _LoadResult:
        lease = req.lease
        attrs: tuple[str, ...] | None = req.attrs
        merge_version: bytes | None = None
        merged: dict[str, Any] | None = None
        prior_absent: list[str] = []
        if plan is not None and req.is_item:
            if plan.state is not None:
                # A background refresh of a usable entry reloads what it holds.
                attrs = None if req.attrs is None else await self._widen(req, req.attrs)
            elif plan.merge_version is not None:
                # A fresh entry lacking some attributes: load just those and merge.
                attrs = plan.load_attrs
                merge_version = plan.merge_version
                merged = plan.merged
                prior_absent = plan.prior_absent
            elif plan.load_attrs is not None:
                # A stale partial entry: load the union and replace (no mixed versions).
                attrs = await self._widen(req, plan.load_attrs)
            else:
                attrs = None
        attrs = with_version(attrs, req.version_attr) if req.is_item else attrs
        # Server time (less a margin for our offset estimate) when the load
        # began: a tag purged after it means the load may predate the change.
        start_ms = max(self._now_ms() - _PURGE_MARGIN_MS, req.purge_floor)
        t0 = time.perf_counter()
        try:
            value = await self._load_renewing(req, attrs, lease, token)
        except BaseException:
            with anyio.CancelScope(shield=True):
                if background:
                    await self._back_off(req, lease, token)
                else:
                    await self._release(lease, token)
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
                superseded = await self._fill(
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
            await self._release(lease, token)
        if req.is_item and req.attrs is not None and value is not None:
            out = {} if merged is None else dict(merged)
            for name in req.attrs:
                if name in value:
                    out[name] = value[name]
            return _LoadResult(out, superseded=superseded)
        return _LoadResult(value, superseded=superseded)

    async def _load_renewing(
        self, req: _Request, attrs: tuple[str, ...] | None, lease: str, token: str
    ) -> Any:
        """Run the loader while a sibling task keeps the lease alive."""
        return await _while_renewing(
            lambda: self._call_loader(req, attrs, unwrap=False),
            lambda: self._renew_forever(lease, token),
        )

    async def _widen(self, req: _Request, attrs: tuple[str, ...]) -> tuple[str, ...] | None:
        """For a stale partial entry: load the union of cached and requested attributes."""
        try:
            async with self._slots.hold(self.call_timeout):
                names = await self.client.hkeys(req.entry)
        except (RedisError, OSError):
            return attrs
        cached = {n.decode("utf-8", "replace") for n in names if not n.startswith(b"\xff")}
        if M_WHOLE in names:
            return None
        return tuple(sorted(cached.union(attrs)))

    async def _back_off(self, req: _Request, lease: str, token: str) -> None:
        """A refresh failed: keep serving stale, and back off further refreshes only.

        The back-off (doubling up to ``max_refresh_backoff``) is marked in
        Redis for every process's background refreshes; the lease is given
        back, so a foreground miss loads at once. A stored fill ends it.
        """
        prev = self._backoff.get(req.entry)
        step = self.refresh_backoff if not prev else min(prev[1] * 2, self.max_refresh_backoff)
        step = max(step, self.refresh_backoff)
        self._backoff[req.entry] = (time.monotonic() + step, step)
        if len(self._backoff) > 10_000:
            now = time.monotonic()
            self._backoff = {k: v for k, v in self._backoff.items() if v[0] > now}
        try:
            async with self._slots.hold(self.call_timeout):
                await self._store.back_off(lease, req.backoff, token, max(1, round(step * 1000)))
        except (RedisError, OSError):
            await self._release(lease, token)

    def _encode_fields(
        self, req: _Request, attrs: tuple[str, ...] | None, value: Any, merging: bool
    ) -> dict[bytes, bytes]:
        threshold = self.compress_threshold
        encode: Callable[[Any], bytes] = _codec.encode
        if threshold is not None:

            def encode(v: Any) -> bytes:
                packed = _codec.encode(v)
                return _codec.compress(packed) if len(packed) > threshold else packed

        fields: dict[bytes, bytes] = {}
        if not req.is_item:
            fields[M_RESULT] = encode(value)
            return fields
        if value is None:
            fields[M_NONE] = _ONE
            return fields
        for name, attr in value.items():
            if attrs is not None and name not in attrs:
                continue  # the origin returned more than asked: keep the projection exact
            fields[name.encode()] = encode(attr)
        if attrs is None:
            fields[M_WHOLE] = _ONE
        else:
            absent = [a for a in attrs if a not in value]
            if absent or merging:
                fields[M_ABSENT] = encode(absent)
        return fields

    async def _fill(
        self,
        req: _Request,
        token: str,
        attrs: tuple[str, ...] | None,
        value: Any,
        merge_version: bytes | None,
        prior_absent: list[str],
        delta_ms: float,
        tags: list[str],
        start_ms: float,
        policy: Policy,
    ) -> bool:
        """Store a loaded value under the lease; True if an invalidation superseded it.

        Superseded means the lease was taken away (invalidations delete it), a
        tag was purged while the value loaded, or a merge found its entry
        replaced or holding another version: the value (or the cached
        attributes it was to join) may predate a write that has completed
        since, so it is not stored and ``_load`` loads once more.
        """
        store = self._store
        lease = req.lease
        counts = req.metrics.counts
        merging = merge_version is not None and value is not None
        try:
            fields = self._encode_fields(req, attrs, value, merging)
            if merging and M_ABSENT in fields:
                # Known-absent names accumulate across merges.
                newly = [a for a in attrs or () if a not in value]
                fields[M_ABSENT] = _codec.encode(sorted(set(prior_absent).union(newly)))
        except CodecError as exc:
            log.warning(
                "swr_cache: %s returned a value that cannot be cached: %s", req.metrics.name, exc
            )
            counts["fills_rejected"] += 1
            await self._release(lease, token)
            return False
        size = sum(len(k) + len(v) for k, v in fields.items())
        if size > self.max_entry_bytes:
            counts["fills_skipped_too_large"] += 1
            await self._release(lease, token)
            return False
        expire_ms = policy.hard_ms
        try:
            if merging:
                assert merge_version is not None
                vname = req.version_attr
                vfield = None if vname is None else vname.encode()
                check = None if vfield is None or vfield not in fields else (vfield, fields[vfield])
                async with self._slots.hold(self.call_timeout):
                    outcome = await store.merge(
                        req.entry,
                        lease,
                        req.fence,
                        token,
                        merge_version,
                        fields,
                        not req.consistent,
                        check,
                        req.backoff,
                    )
            else:
                negative = req.is_item and value is None
                expire_ms = stamp_entry(fields, policy, negative, self._now_ms(), delta_ms)
                async with self._slots.hold(self.call_timeout):
                    outcome = await store.fill(
                        req.entry,
                        lease,
                        req.fence,
                        token,
                        expire_ms,
                        fields,
                        not req.consistent,
                        req.backoff,
                    )
        except (RedisError, OSError) as exc:
            counts["redis_errors"] += 1
            log.debug("swr_cache: fill failed: %r", exc)
            return False
        if outcome == FillOutcome.STORED_FENCE_REPAIRED:
            counts["fences_repaired"] += 1
            outcome = FillOutcome.STORED
        if outcome != FillOutcome.STORED:
            counts["fills_rejected"] += 1
            if outcome == FillOutcome.OUTDATED:
                counts["merges_outdated"] += 1
            # Lease taken (an invalidation) or, for a merge, the entry replaced
            # since it was read (a write-through or stream refresh) or holding
            # another version of the item: the value or the cached attributes
            # it was to join may be out of date.
            return outcome in (FillOutcome.LEASE_LOST, FillOutcome.CHANGED, FillOutcome.OUTDATED)
        counts["fills"] += 1
        req.landed = True
        if self._near is not None:  # near cache: a copy read before this fill is outdated
            self._near.drop((req.entry,))
        self._backoff.pop(req.entry, None)  # (the fill script ended it in Redis)
        if tags:
            return await self._check_tags(req, tags, start_ms, expire_ms)
        return False

    async def _check_tags(
        self, req: _Request, tags: list[str], start_ms: float, expire_ms: int
    ) -> bool:
        """Join the tags' member sets, then undo the fill if any tag was purged since the load began."""
        ks = self._keys
        raced = True
        try:
            async with self._slots.hold(self.call_timeout):
                repaired = await self._store.add_tag_members(
                    [ks.tag_members(t) for t in tags], req.entry, expire_ms
                )
                stamps, broken = await self._store.tag_generations(
                    [ks.tag_gen(t) for t in tags], self.tag_stamp_ms
                )
            if repaired or broken:
                self._engine_metrics.counts["tag_keys_repaired"] += repaired + broken
            newer = [s for s in stamps if s is not None and s >= start_ms]
            raced = bool(newer)
            if newer:
                # A load that starts after we saw these stamps need not lose to them again.
                req.purge_floor = max(newer) + 1
            # A purge stamp lives tag_stamp_ttl; a load older than that cannot
            # prove no purge happened during it.
            raced = raced or self._now_ms() - start_ms >= self.tag_stamp_ms
        except (RedisError, OSError, ValueError):
            pass
        if raced:
            # A purge ran while we loaded (or we cannot tell): take back what we wrote.
            req.metrics.counts["tag_races"] += 1
            try:
                async with self._slots.hold(self._invalidation_wait):
                    await self._store.delete(req.entry)
            except (RedisError, OSError) as exc:
                log.warning("swr_cache: could not remove a fill that raced a tag purge: %r", exc)
        return raced

    # -- background refresh --------------------------------------------------

    def _schedule_refresh(self, req: _Request, seen_version: bytes | None) -> None:
        rkey = (req.entry, req.attrs)
        if rkey in self._refreshing:
            return
        backoff = self._backoff.get(req.entry)
        if backoff is not None and time.monotonic() < backoff[0]:
            return
        if self._pending >= self.max_pending_refreshes or self._tg is None:
            req.metrics.counts["refreshes_dropped"] += 1
            return
        self._refreshing.add(rkey)
        self._pending += 1
        self._tg.start_soon(self._refresh_task, rkey, req, seen_version)

    async def _refresh_task(
        self, rkey: tuple[Any, ...], req: _Request, seen_version: bytes | None
    ) -> None:
        try:
            async with self._refresh_slots:
                req.metrics.counts["refreshes"] += 1
                try:
                    await self._load(req, background=True, seen_version=seen_version)
                except Exception as exc:
                    req.metrics.counts["refresh_errors"] += 1
                    log.warning("swr_cache: background refresh of %s failed: %r", req.entry, exc)
                # (A stored fill ends the back-off; a refresh that found one stays backed off.)
        finally:
            self._pending -= 1
            self._refreshing.discard(rkey)
            if not self._flights and not self._refreshing and self._idle is not None:
                self._idle.set()

    # -- peek / refresh / invalidate for one entry ------------------------------

    async def _peek(self, req: _Request) -> tuple[Any, str] | None:
        self._require_entered()
        try:
            snap = await self._read(req)
        except (_Bypass, _Corrupt):
            return None
        if snap is None:
            return None
        try:
            verdict = self._judge(req, snap, self._now_ms())
        except _Corrupt:
            return None
        if type(verdict) is not tuple:
            return None
        return verdict[1], verdict[0]

    async def _refresh_now(self, req: _Request) -> Any:
        """Reload in the foreground and store, whatever the entry's state."""
        self._require_entered()
        await self.invalidate_identities([req.identity])
        # A deliberate refresh must store: lift the fence our own invalidation set.
        with contextlib.suppress(RedisError, OSError):
            async with self._slots.hold(self._invalidation_wait):
                await self.client.delete(req.fence)
        # Not shared with a flight already under way: that one may have read old data.
        result = await self._load(req, background=False)
        return result.take()
