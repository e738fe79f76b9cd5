"""Per-function counters and latency histograms.

Counting is a dict increment on the hot path; nothing is locked (one event
loop owns a ``Cache``). ``Cache.stats()`` snapshots them; the optional
Prometheus collector in ``swr_cache.metrics`` reads the same objects.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Final

__all__ = ["COUNTERS", "LATENCY_BUCKETS", "Histogram", "Metrics", "MetricsRegistry"]

#: Every counter a function reports, in a stable order.
COUNTERS: Final = (
    "hits",
    "stale_hits",
    "misses",
    "negative_hits",
    "partial_misses",
    "loads",
    "load_errors",
    "refreshes",
    "refresh_errors",
    "refreshes_dropped",
    "early_refreshes",
    "lease_waits",
    "lease_takeovers",
    "fills",
    "fills_rejected",
    "reloads_after_invalidation",
    "merges_outdated",
    "fills_skipped_too_large",
    "tag_races",
    "decode_errors",
    "bad_signatures",
    "redis_errors",
    "bypasses",
    "pool_waits_timed_out",
    # Auto-batched entry reads (engine-wide, ``swr_cache``): pipelines that
    # carried more than one read, and the reads they carried
    "read_batches",
    "batched_reads",
    "invalidations",
    # Near cache (NearCache): hits from memory, copies not installed because
    # an invalidation overtook their read; engine-wide: announcements heard
    # and flushes on losing tracking
    "near_hits",
    "near_install_refusals",
    "near_invalidations",
    "near_flushes",
    # Keys of ours found broken and repaired (see README, "Faults that heal")
    "leases_repaired",
    "fences_repaired",
    "tag_members_dropped",
    "tag_keys_repaired",
    # DynamoDB Streams (StreamInvalidator / StreamConsumer)
    "stream_records_applied",
    "stream_records_superseded",
    "stream_records_malformed",
    "stream_records_failed",
    "stream_iterators_expired",
    "stream_trimmed",
    # DynamoTable
    "throttles",
    "unprocessed_retries",
    "write_throughs",
    "write_throughs_skipped",
    # ASGI middleware (CacheMiddleware)
    "http_passes",
    "http_uncacheable",
    "http_not_modified",
    "http_purges",
    "http_purge_errors",
    "http_lock_timeouts",
    "http_length_mismatches",
    "http_revalidations",
)

#: Histogram bucket upper bounds, seconds.
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """A fixed-bucket latency histogram (seconds) with count and sum."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.count += 1
        self.total += seconds

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (``None`` when empty)."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank and n:
                return LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else float("inf")
        return float("inf")

    def snapshot(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": self.total,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
            "buckets": dict(zip([*LATENCY_BUCKETS, float("inf")], self.buckets, strict=True)),
        }


class Metrics:
    """Counters and latencies of one cached function (or of the engine itself)."""

    __slots__ = ("counts", "load_latency", "name", "redis_latency", "table")

    def __init__(self, name: str, table: str | None = None) -> None:
        self.name = name
        self.table = table
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.load_latency = Histogram()
        self.redis_latency = Histogram()

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counts)
        out["table"] = self.table
        out["load_latency"] = self.load_latency.snapshot()
        out["redis_latency"] = self.redis_latency.snapshot()
        return out


class MetricsRegistry:
    """The ``Metrics`` of every function registered on one cache."""

    __slots__ = ("_by_name",)

    def __init__(self) -> None:
        self._by_name: dict[str, Metrics] = {}

    def get(self, name: str, table: str | None = None) -> Metrics:
        metrics = self._by_name.get(name)
        if metrics is None:
            metrics = self._by_name[name] = Metrics(name, table)
        return metrics

    def __iter__(self) -> Any:
        return iter(list(self._by_name.values()))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: m.snapshot() for name, m in self._by_name.items()}
