"""swr_cache.metrics: the Prometheus collector (scraped and parsed) and CloudWatch EMF lines."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from swr_cache import Cache, cached_item
from swr_cache._metrics import COUNTERS, LATENCY_BUCKETS, Histogram
from swr_cache.metrics import EmfReporter, SwrCacheCollector, _latency_values, register
from swr_cache.testing import CacheHost, RecordingOrigin

pytestmark = pytest.mark.redis


@pytest.fixture
async def cache(redis_client: aioredis.Redis) -> AsyncIterator[Cache]:
    c = Cache(redis_client, namespace="m", soft_ttl=10, hard_ttl=100, early_refresh=0)
    async with CacheHost(c) as entered:
        yield entered


def users(cache: Cache, origin: RecordingOrigin) -> Any:
    @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id}, name="get_user")
    async def get_user(
        user_id: str, *, attributes: list[str] | None = None
    ) -> dict[str, Any] | None:
        return await origin.get(user_id, attributes)

    return get_user


def scrape(registry: CollectorRegistry) -> dict[str, Any]:
    """Scrape the registry as Prometheus would and parse the text with prometheus_client's parser."""
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], family: str, sample_name: str, **labels: str) -> float:
    matches = [
        s.value
        for s in families[family].samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (sample_name, labels, matches)
    return float(matches[0])


async def test_scrape_exports_every_counter_and_histogram(cache: Cache) -> None:
    """A scrape parses and carries each counter of cache.stats() and both latency histograms per function."""
    origin = RecordingOrigin({"u1": {"pk": "u1", "name": "Ada"}})
    get_user = users(cache, origin)
    await get_user("u1")
    await get_user("u1")
    await get_user("nobody")
    registry = CollectorRegistry()
    registry.register(SwrCacheCollector(cache))
    families = scrape(registry)
    labels = {"function": "get_user", "table": "Users", "namespace": "m"}
    stats = cache.stats()["get_user"]
    for name in COUNTERS:
        assert families[f"swr_cache_{name}"].type == "counter"
        got = sample(families, f"swr_cache_{name}", f"swr_cache_{name}_total", **labels)
        assert got == stats[name], name
    assert sample(families, "swr_cache_hits", "swr_cache_hits_total", **labels) == 1
    assert sample(families, "swr_cache_misses", "swr_cache_misses_total", **labels) == 2
    assert sample(families, "swr_cache_loads", "swr_cache_loads_total", **labels) == 2
    for hist in ("swr_cache_load_latency_seconds", "swr_cache_redis_latency_seconds"):
        assert families[hist].type == "histogram"
        buckets = [
            (s.labels["le"], s.value)
            for s in families[hist].samples
            if s.name == f"{hist}_bucket" and s.labels["function"] == "get_user"
        ]
        assert len(buckets) == len(LATENCY_BUCKETS) + 1
        assert buckets[-1][0] == "+Inf"
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), "buckets are cumulative"
        assert counts[-1] == sample(families, hist, f"{hist}_count", **labels)
    assert (
        sample(
            families,
            "swr_cache_load_latency_seconds",
            "swr_cache_load_latency_seconds_count",
            **labels,
        )
        == 2
    )
    assert (
        sample(
            families,
            "swr_cache_redis_latency_seconds",
            "swr_cache_redis_latency_seconds_count",
            **labels,
        )
        == 3
    )


async def test_engine_values_are_exported(cache: Cache) -> None:
    """The breaker state, its open count and the refresh queue appear under function="swr_cache"."""
    registry = CollectorRegistry()
    registry.register(SwrCacheCollector(cache))
    families = scrape(registry)
    engine = {"function": "swr_cache", "table": "", "namespace": "m"}
    assert families["swr_cache_breaker_open"].type == "gauge"
    assert sample(families, "swr_cache_breaker_open", "swr_cache_breaker_open", **engine) == 0
    assert (
        sample(families, "swr_cache_breaker_opened", "swr_cache_breaker_opened_total", **engine)
        == 0
    )
    assert (
        sample(families, "swr_cache_refreshes_pending", "swr_cache_refreshes_pending", **engine)
        == 0
    )


async def test_scrapes_follow_the_counters(cache: Cache) -> None:
    """A second scrape sees hits made after the first: nothing is cached in the collector."""
    origin = RecordingOrigin({"u1": {"pk": "u1"}})
    get_user = users(cache, origin)
    await get_user("u1")
    registry = CollectorRegistry()
    registry.register(SwrCacheCollector(cache))
    labels = {"function": "get_user", "table": "Users"}
    assert sample(scrape(registry), "swr_cache_hits", "swr_cache_hits_total", **labels) == 0
    for _ in range(3):
        await get_user("u1")
    assert sample(scrape(registry), "swr_cache_hits", "swr_cache_hits_total", **labels) == 3


async def test_two_caches_in_one_collector_differ_by_namespace(
    redis_client: aioredis.Redis,
) -> None:
    """Caches given together export side by side, told apart by the namespace label."""
    a = Cache(redis_client, namespace="a")
    b = Cache(redis_client, namespace="b")
    a.metrics.get("f", "T").counts["hits"] = 2
    b.metrics.get("f", "T").counts["hits"] = 5
    registry = CollectorRegistry()
    registry.register(SwrCacheCollector(a, b))
    families = scrape(registry)
    assert (
        sample(families, "swr_cache_hits", "swr_cache_hits_total", function="f", namespace="a") == 2
    )
    assert (
        sample(families, "swr_cache_hits", "swr_cache_hits_total", function="f", namespace="b") == 5
    )


async def test_register_refuses_a_second_collector(redis_client: aioredis.Redis) -> None:
    """register() uses describe(), so exporting the same names twice fails at registration."""
    cache = Cache(redis_client, namespace="r")
    registry = CollectorRegistry()
    collector = register(cache, registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        register(cache, registry=registry)
    registry.unregister(collector)
    register(cache, registry=registry)


def test_collector_needs_a_cache() -> None:
    """A collector with nothing to export is a mistake, reported at once."""
    with pytest.raises(ValueError, match="at least one Cache"):
        SwrCacheCollector()


async def test_emf_lines_carry_deltas(cache: Cache) -> None:
    """EMF lines are valid documents whose counts are what changed since the previous call."""
    origin = RecordingOrigin({"u1": {"pk": "u1"}})
    get_user = users(cache, origin)
    await get_user("u1")
    await get_user("u1")
    emf = EmfReporter(
        cache, namespace="shop", properties={"service": "api"}, clock=lambda: 1700000000.5
    )
    first = [json.loads(line) for line in emf.lines()]
    doc = next(d for d in first if d["function"] == "get_user")
    assert doc["hits"] == 1 and doc["misses"] == 1 and doc["loads"] == 1
    assert "redis_errors" not in doc  # zero deltas are left out
    assert doc["table"] == "Users" and doc["cache_namespace"] == "m" and doc["service"] == "api"
    meta = doc["_aws"]
    assert meta["Timestamp"] == 1700000000500
    (directive,) = meta["CloudWatchMetrics"]
    assert directive["Namespace"] == "shop"
    assert directive["Dimensions"] == [["function"], ["function", "table"]]
    names = {m["Name"] for m in directive["Metrics"]}
    assert {"hits", "misses", "loads", "load_latency_ms", "redis_latency_ms"} <= names
    assert all(name in doc for name in names)
    assert len(doc["load_latency_ms"]) == 1 and len(doc["redis_latency_ms"]) == 2
    assert emf.lines() == []  # nothing new
    await get_user("u1")
    (again,) = [json.loads(line) for line in emf.lines()]
    assert again["hits"] == 1 and "misses" not in again


async def test_emf_flush_writes_lines(cache: Cache) -> None:
    """flush() hands each line to the writer and returns how many it wrote."""
    cache.metrics.get("f", None).counts["hits"] += 4
    written: list[str] = []
    assert EmfReporter(cache).flush(written.append) == 1
    assert json.loads(written[0])["hits"] == 4


def test_emf_latency_arrays_stay_within_100_values() -> None:
    """Thousands of observations become at most 100 values, each bucket keeping its share."""
    hist = Histogram()
    for _ in range(900):
        hist.observe(0.0004)
    for _ in range(100):
        hist.observe(0.2)
    hist.observe(30.0)  # beyond the last bound
    values = _latency_values(hist.snapshot()["buckets"], None)
    assert len(values) <= 100
    assert values.count(0.5) == 89 or values.count(0.5) == 90
    assert 9 <= values.count(250.0) <= 10
    assert max(values) == LATENCY_BUCKETS[-1] * 1000
