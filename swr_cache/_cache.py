"""``Cache``: what users construct. Settings, lifecycle, invalidation, stats.

The work is done by the ``RedisEngine`` it owns (``_engine.py``), which the
adapters reach through ``_engine_api.engine_of``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import anyio
from redis.exceptions import RedisError

from ._breaker import Breaker
from ._engine import RedisEngine
from ._errors import ConfigError, InvalidationError
from ._gate import _pool_size, _reject_decoding_client, _warn_without_timeout
from ._keys import change_tags, item_identity
from ._metrics import MetricsRegistry
from ._near import NearCache
from ._policy import Policy
from ._readiness import describe_client, ping_client
from ._signing import Signer
from ._store import Store

__all__ = ["Cache"]

log = logging.getLogger("swr_cache")


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
            Each read of a failed pipeline of auto-batched reads is a failure.
        refresh_backoff: first back-off after a failed refresh, seconds
            (doubling to ``max_refresh_backoff``); the stale value keeps serving.
        drain_timeout: seconds ``__aexit__`` waits for background work.
        clock_sync_interval: seconds between re-measurements of the offset
            to Redis server time.
        tag_stamp_ttl: how long a purged tag remembers when it was purged
            (one small key per purged tag). A tagged fill whose load took
            longer than this is not stored, since it could not be checked.
        direct_reads: entry reads (the hit path) take a pooled connection and
            send GET/HMGET themselves, skipping redis-py's per-command
            retry and observability wrappers (about 8 us a hit here). A read
            that fails is a miss served by the origin anyway. ``False`` uses
            the client's normal command path (e.g. to keep redis-py's
            OpenTelemetry metrics for hits).
        batch_reads: entry reads of distinct keys made while another read
            to the same Redis node is under way (concurrent callers, one
            event-loop tick) share one pipeline on one connection, grouped
            per node on a cluster (counted as ``read_batches`` and
            ``batched_reads`` in the ``swr_cache`` stats). A lone read is
            sent at once, as without it. ``False`` sends one command per
            read; so does ``direct_reads=False`` on a standalone client.
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
        batch_reads: bool = True,
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
        self.breaker = Breaker(threshold=breaker_threshold, cooldown=breaker_cooldown)
        if max_in_flight is None:
            max_in_flight = min(64, _pool_size(client) or 64)
        self.max_pending_refreshes = max_pending_refreshes
        self.metrics = MetricsRegistry()
        signer = None if signing_key is None else Signer(signing_key)
        store = Store(client, direct_reads, batch_reads)
        store.signer = signer
        self._engine = RedisEngine(
            client,
            namespace=namespace,
            policy=self.policy,
            store=store,
            signer=signer,
            breaker=self.breaker,
            metrics=self.metrics,
            max_in_flight=max_in_flight,
            lease_ms=self.lease_ms,
            lease_wait=self.lease_wait,
            fence_ms=self.fence_ms,
            max_entry_bytes=max_entry_bytes,
            call_timeout=self.call_timeout,
            refresh_concurrency=refresh_concurrency,
            max_pending_refreshes=max_pending_refreshes,
            refresh_backoff=self.refresh_backoff,
            max_refresh_backoff=self.max_refresh_backoff,
            drain_timeout=self.drain_timeout,
            clock_sync_interval=self.clock_sync_interval,
            tag_stamp_ms=self.tag_stamp_ms,
            compress_threshold=compress_threshold,
            near=near_cache,
            clock=clock,
        )
        if near_cache is not None:
            near_cache.bind(self)
        # The engine's parts, for tests and tools that look inside.
        self._keys = self._engine.keys
        self._slots = self._engine.slots

    @property
    def _store(self) -> Store:
        return self._engine.store

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
        await self._engine.start()
        log.info(
            "swr_cache: cache on %s, namespace %r", describe_client(self.client), self.namespace
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            await self._engine.stop(drain=exc is None)
        finally:
            if self._owns_client:
                with anyio.CancelScope(shield=True):
                    await self.client.aclose()
        return None

    async def sync_clock(self) -> None:
        """Measure this process's offset to Redis ``TIME`` (deadlines are in server time)."""
        await self._engine.sync_clock()

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
        return await ping_client(self.client, seconds, self._engine.slots)

    # -- public operations ---------------------------------------------------

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters and latency histograms per function (and ``swr_cache`` for the engine)."""
        out = self.metrics.snapshot()
        out["swr_cache"]["breaker_open"] = self.breaker.is_open
        out["swr_cache"]["breaker_opened"] = self.breaker.opened
        out["swr_cache"]["refreshes_pending"] = self._engine.refresher.pending
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
        await self._engine.invalidate(identities, tags)

    async def purge_tags(self, tags: Iterable[str]) -> None:
        """Remove every entry stored with any of these tags (items, results, HTTP responses).

        Raises:
            InvalidationError: Redis could not be reached.
        """
        tag_list = list(dict.fromkeys(tags))
        if not tag_list:
            return
        try:
            await self._engine.purge(tag_list)
        except (RedisError, OSError) as exc:
            raise InvalidationError(
                f"could not purge tags {tag_list!r}: {exc}", keys=tag_list
            ) from exc
