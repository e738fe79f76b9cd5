"""Export ``cache.stats()``: a Prometheus collector, and CloudWatch EMF lines for Lambda.

Prometheus (needs ``prometheus_client``, the ``prometheus`` extra)::

    from prometheus_client import REGISTRY
    from swr_cache.metrics import SwrCacheCollector

    REGISTRY.register(SwrCacheCollector(cache))

Every counter of :data:`swr_cache._metrics.COUNTERS` becomes
``swr_cache_<counter>_total{function, table, namespace}``; the load and Redis
latencies become the histograms ``swr_cache_load_latency_seconds`` and
``swr_cache_redis_latency_seconds``; the engine's breaker and refresh queue
become ``swr_cache_breaker_open``, ``swr_cache_breaker_opened_total`` and
``swr_cache_refreshes_pending`` (``function="swr_cache"``). A scrape reads the
in-memory counters only: it never touches Redis.

Lambda (no dependency): CloudWatch turns log lines in its Embedded Metric
Format into metrics, so printing them is all it takes::

    emf = EmfReporter(cache)
    def handler(event, context):
        ...
        emf.flush()          # one JSON line per function, deltas since the last flush
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from ._metrics import COUNTERS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ._cache import Cache

__all__ = ["COUNTERS", "EmfReporter", "SwrCacheCollector", "register"]

_LABELS: Final = ("function", "table", "namespace")
_HISTOGRAMS: Final = (
    ("load_latency", "Time spent in the origin (loader) per load, seconds."),
    ("redis_latency", "Time of one entry read from Redis (the hit path), seconds."),
)
# Keys of a stats() entry that are not counters; everything else numeric is exported.
_NOT_COUNTERS: Final = frozenset({"table", "load_latency", "redis_latency"})
# Engine-level values of cache.stats()["swr_cache"] with their Prometheus type and help.
_ENGINE_VALUES: Final = {
    "breaker_open": ("gauge", "1 while the circuit breaker bypasses Redis, else 0."),
    "breaker_opened": ("counter", "Times the circuit breaker opened."),
    "refreshes_pending": ("gauge", "Background refreshes queued or running."),
}


def _help(counter: str) -> str:
    return f"swr_cache {counter.replace('_', ' ')} per cached function (see cache.stats())."


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``+Inf`` for the overflow bucket)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


class SwrCacheCollector:
    """A ``prometheus_client`` collector over one or more caches' ``stats()``.

    Register it once per process (``REGISTRY.register(SwrCacheCollector(cache))``);
    give it every cache of the process at once, since one registry refuses two
    collectors exporting the same metric names. The ``namespace`` label tells
    caches apart.

    Args:
        caches: the caches to export (entered or not: only counters are read).
        prefix: metric name prefix.

    Raises:
        ValueError: no cache given.
    """

    def __init__(self, *caches: Cache, prefix: str = "swr_cache") -> None:
        if not caches:
            raise ValueError("SwrCacheCollector needs at least one Cache")
        self.caches = caches
        self.prefix = prefix

    def describe(self) -> list[Metric]:
        """The metric families (without samples), so registering reads no stats."""
        return list(self._families(with_samples=False))

    def collect(self) -> Iterator[Metric]:
        """One family per counter, histogram and engine value, labelled per function."""
        yield from self._families(with_samples=True)

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        p = self.prefix
        snapshots: list[tuple[str, Mapping[str, Mapping[str, Any]]]] = (
            [(c.namespace, c.stats()) for c in self.caches] if with_samples else []
        )
        counters: dict[str, CounterMetricFamily] = {
            name: CounterMetricFamily(f"{p}_{name}", _help(name), labels=_LABELS)
            for name in COUNTERS
        }
        histograms = {
            name: HistogramMetricFamily(f"{p}_{name}_seconds", text, labels=_LABELS)
            for name, text in _HISTOGRAMS
        }
        engine: dict[str, Any] = {}
        for name, (kind, text) in _ENGINE_VALUES.items():
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            engine[name] = cls(f"{p}_{name}", text, labels=_LABELS)
        extra: dict[str, GaugeMetricFamily] = {}
        for namespace, stats in snapshots:
            for function, values in stats.items():
                labels = [function, values.get("table") or "", namespace]
                for name, value in values.items():
                    if name in _NOT_COUNTERS:
                        continue
                    number = _number(value)
                    if number is None:
                        continue
                    if name in counters:
                        counters[name].add_metric(labels, number)
                    elif name in engine:
                        engine[name].add_metric(labels, number)
                    else:
                        # A value stats() gained after this module was written:
                        # exported as a gauge rather than silently dropped.
                        family = extra.get(name)
                        if family is None:
                            family = extra[name] = GaugeMetricFamily(
                                f"{p}_{name}", _help(name), labels=_LABELS
                            )
                        family.add_metric(labels, number)
                for name, _ in _HISTOGRAMS:
                    snap = values.get(name)
                    if not isinstance(snap, Mapping):
                        continue
                    cumulative = 0.0
                    buckets: list[tuple[str, float]] = []
                    for bound, n in snap["buckets"].items():
                        cumulative += n
                        buckets.append((_le(bound), cumulative))
                    histograms[name].add_metric(labels, buckets, float(snap["sum"]))
        yield from counters.values()
        yield from histograms.values()
        yield from engine.values()
        yield from extra.values()


def register(*caches: Cache, registry: Any = None, prefix: str = "swr_cache") -> SwrCacheCollector:
    """Register a :class:`SwrCacheCollector` for ``caches`` (default: the global ``REGISTRY``).

    Returns:
        The collector (``registry.unregister(collector)`` removes it).

    Raises:
        ImportError: ``prometheus_client`` is not installed.
        ValueError: the registry already exports these names.
    """
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    collector = SwrCacheCollector(*caches, prefix=prefix)
    registry.register(collector)
    return collector


# ---------------------------------------------------------------------------
# CloudWatch Embedded Metric Format

#: EMF allows at most 100 values in one metric's array.
_EMF_MAX_VALUES: Final = 100


def _latency_values(
    buckets: Mapping[float, int], previous: Mapping[float, int] | None
) -> list[float]:
    """The new observations of a histogram as values in ms (bucket upper bounds).

    At most 100 values, as EMF allows; when more arrived, each bucket keeps its
    share, so CloudWatch's percentiles stay close (to a bucket's width).
    """
    deltas: list[tuple[float, int]] = []
    finite = [b for b in buckets if math.isfinite(b)]
    top = max(finite) if finite else 0.0
    for bound, n in buckets.items():
        d = n - (previous or {}).get(bound, 0)
        if d > 0:
            # The overflow bucket has no bound: report it at the last finite one.
            deltas.append((bound if math.isfinite(bound) else top, d))
    total = sum(d for _, d in deltas)
    if total > _EMF_MAX_VALUES:
        scaled = [(b, max(1, round(d * _EMF_MAX_VALUES / total))) for b, d in deltas]
        while sum(d for _, d in scaled) > _EMF_MAX_VALUES:
            i = max(range(len(scaled)), key=lambda j: scaled[j][1])
            scaled[i] = (scaled[i][0], scaled[i][1] - 1)
        deltas = scaled
    return [round(b * 1000.0, 3) for b, d in deltas for _ in range(d)]


class EmfReporter:
    """CloudWatch Embedded Metric Format lines of a cache's counters, as deltas.

    CloudWatch sums the values it extracts, so each line carries what changed
    since the previous :meth:`lines` call (the first call: since the cache was
    built). Latencies are arrays of observed values in milliseconds (bucket
    upper bounds, at most 100 per line). Functions with nothing new are
    skipped.

    Args:
        cache: the cache to report.
        namespace: the CloudWatch metric namespace.
        dimensions: the dimension sets (from ``function``, ``table``,
            ``cache_namespace`` and the keys of ``properties``).
        properties: constant members added to every line (e.g. ``{"service": "api"}``).
        clock: wall clock in seconds, for the line's timestamp.
    """

    def __init__(
        self,
        cache: Cache,
        *,
        namespace: str = "swr_cache",
        dimensions: Sequence[Sequence[str]] = (("function",), ("function", "table")),
        properties: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.namespace = namespace
        self.dimensions = [list(d) for d in dimensions]
        self.properties = dict(properties or {})
        self._clock = clock
        self._last: dict[str, Mapping[str, Any]] = {}

    def lines(self) -> list[str]:
        """One JSON line per function with new counts since the previous call."""
        now_ms = int(self._clock() * 1000)
        out: list[str] = []
        for function, values in self.cache.stats().items():
            before = self._last.get(function, {})
            doc: dict[str, Any] = {}
            definitions: list[dict[str, str]] = []
            for name, value in values.items():
                if name in _NOT_COUNTERS or name not in COUNTERS:
                    continue
                delta = value - before.get(name, 0)
                if delta:
                    doc[name] = delta
                    definitions.append({"Name": name, "Unit": "Count"})
            for name, _ in _HISTOGRAMS:
                snap = values.get(name)
                if not isinstance(snap, Mapping):
                    continue
                prev = before.get(name)
                got = _latency_values(snap["buckets"], prev["buckets"] if prev else None)
                if got:
                    doc[f"{name}_ms"] = got
                    definitions.append({"Name": f"{name}_ms", "Unit": "Milliseconds"})
            self._last[function] = values
            if not definitions:
                continue
            doc.update(self.properties)
            doc["function"] = function
            doc["table"] = values.get("table") or ""
            doc["cache_namespace"] = self.cache.namespace
            doc["_aws"] = {
                "Timestamp": now_ms,
                "CloudWatchMetrics": [
                    {
                        "Namespace": self.namespace,
                        "Dimensions": self.dimensions,
                        "Metrics": definitions,
                    }
                ],
            }
            out.append(json.dumps(doc, separators=(",", ":"), sort_keys=True))
        return out

    def flush(self, write: Callable[[str], Any] | None = None) -> int:
        """Write the :meth:`lines` (default: ``print`` to stdout, which Lambda ships to CloudWatch).

        Returns:
            How many lines were written.
        """
        emit: Callable[[str], Any] = write if write is not None else _print_line
        lines = self.lines()
        for line in lines:
            emit(line)
        return len(lines)


def _print_line(line: str) -> None:
    print(line, flush=True)
