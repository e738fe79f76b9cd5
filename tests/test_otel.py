"""OpenTelemetry spans: swr_cache.get with its outcome, load and refresh child spans
(the SDK's in-memory exporter, a real redis-server)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from swr_cache import Cache, _otel, cached, cached_item
from swr_cache.testing import FakeClock

pytestmark = pytest.mark.redis


class _Recorder(InMemorySpanExporter):
    """Keeps spans only while a test of this module runs (the provider stays set after it)."""

    active = False

    def export(self, spans: Any) -> SpanExportResult:
        return super().export(spans) if self.active else SpanExportResult.SUCCESS


_EXPORTER = _Recorder()
_PROVIDER: TracerProvider | None = None


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The finished spans of this test (the global provider is set once per process)."""
    global _PROVIDER
    if _PROVIDER is None:
        _PROVIDER = TracerProvider()
        _PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(_PROVIDER)
        # A "no" seen just before (by an earlier test) would otherwise stand
        # for up to 0.2 s: look the provider up again now.
        _otel._next_check = 0.0
    _EXPORTER.clear()
    _EXPORTER.active = True
    yield _EXPORTER
    _EXPORTER.active = False
    _EXPORTER.clear()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def wait_for(exporter: InMemorySpanExporter, name: str, n: int) -> list[ReadableSpan]:
    """Wait until ``n`` spans called ``name`` have ended (background refreshes end later)."""
    for _ in range(2000):
        found = named(exporter, name)
        if len(found) >= n:
            return found
        await asyncio.sleep(0.005)
    raise AssertionError(f"fewer than {n} {name} spans")


async def test_miss_fresh_and_stale_outcomes_with_child_spans(
    cache: Cache, clock: FakeClock, spans: InMemorySpanExporter
) -> None:
    """A miss has a load child; a fresh hit none; a stale hit a refresh child that ends later."""
    calls = 0

    @cached(cache, key="price:{sku}", name="get_price")
    async def get_price(sku: str) -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await get_price("s1") == 1  # miss
    assert await get_price("s1") == 1  # fresh
    clock.advance(20)  # past the soft TTL (10 s), before the hard one
    assert await get_price("s1") == 1  # stale, refreshed in the background
    [refresh] = await wait_for(spans, "swr_cache.refresh", 1)
    gets = named(spans, "swr_cache.get")
    assert [(g.attributes or {})["swr_cache.outcome"] for g in gets] == ["miss", "fresh", "stale"]
    assert all((g.attributes or {})["swr_cache.function"] == "get_price" for g in gets)
    [load] = named(spans, "swr_cache.load")
    miss, fresh, stale = gets
    assert load.parent is not None and load.parent.span_id == miss.context.span_id
    assert load.context.trace_id == miss.context.trace_id
    assert refresh.parent is not None and refresh.parent.span_id == stale.context.span_id
    assert (refresh.attributes or {})["swr_cache.function"] == "get_price"
    children_of_fresh = [
        s
        for s in spans.get_finished_spans()
        if s.parent is not None and s.parent.span_id == fresh.context.span_id
    ]
    assert children_of_fresh == []
    assert calls == 2


async def test_item_spans_name_the_table_and_errors_are_recorded(
    cache: Cache, spans: InMemorySpanExporter
) -> None:
    """@cached_item spans carry the table; an origin error marks the get and load spans."""

    @cached_item(cache, table="Users", key=lambda pk: {"pk": pk}, name="get_user")
    async def get_user(pk: str) -> dict[str, Any] | None:
        if pk == "boom":
            raise RuntimeError("origin down")
        return {"pk": pk}

    await get_user("u1")
    with pytest.raises(RuntimeError):
        await get_user("boom")
    get_ok, get_err = named(spans, "swr_cache.get")
    assert (get_ok.attributes or {})["swr_cache.table"] == "Users"
    assert (get_err.attributes or {})["swr_cache.outcome"] == "miss"
    assert not get_err.status.is_ok
    failed_load = named(spans, "swr_cache.load")[1]
    assert not failed_load.status.is_ok
    assert any(e.name == "exception" for e in failed_load.events)


async def test_explicit_refresh_is_a_refresh_span(
    cache: Cache, spans: InMemorySpanExporter
) -> None:
    """``.refresh()`` loads under a swr_cache.refresh span."""

    @cached(cache, key="k:{n}", name="f")
    async def f(n: int) -> int:
        return n

    await f.refresh(1)
    assert len(named(spans, "swr_cache.refresh")) == 1
    assert named(spans, "swr_cache.load") == []


async def test_bypass_outcome_when_redis_is_down(
    restartable_redis: Any, spans: InMemorySpanExporter
) -> None:
    """With Redis stopped, the call is answered by the origin and says ``bypass``."""
    cache = Cache.from_url(restartable_redis.url, breaker_threshold=1)

    @cached(cache, key="k:{n}", name="g")
    async def g(n: int) -> int:
        return n

    async with cache:
        restartable_redis.stop()
        assert await g(1) == 1  # the failed read opens the breaker
        assert await g(2) == 2  # bypassed
    outcomes = [(s.attributes or {})["swr_cache.outcome"] for s in named(spans, "swr_cache.get")]
    assert outcomes[-1] == "bypass"


def test_no_opentelemetry_means_the_direct_path() -> None:
    """Without opentelemetry importable, no tracer exists and calls return the engine's coroutine."""
    code = """
import sys
sys.modules["opentelemetry"] = None  # as if not installed
import redis.asyncio as aioredis
from swr_cache import Cache, cached, _otel
assert _otel.TRACER is None
cache = Cache(aioredis.Redis(), namespace="t")

@cached(cache, key="k:{n}")
async def f(n: int) -> int:
    return n

assert f._direct and f._span_attributes is None
assert "opentelemetry.trace" not in sys.modules
print("ok")
"""
    run_ok(code)


def test_api_without_a_provider_records_nothing() -> None:
    """opentelemetry-api alone (no SDK provider installed): calls skip span creation; a provider installed later is picked up."""
    code = """
from swr_cache import _otel
assert _otel.TRACER is not None and not _otel.recording()
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
trace.set_tracer_provider(TracerProvider())
import time
time.sleep(0.25)  # a "no" is looked up again at most every 0.2 s
assert _otel.recording()
print("ok")
"""
    run_ok(code)


def run_ok(code: str) -> None:
    """Run ``code`` in a fresh interpreter (warnings are errors); it must print ``ok``."""
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
