"""OpenTelemetry spans for cached calls, when ``opentelemetry-api`` is importable.

Each call of a ``@cached`` / ``@cached_item`` function is a ``swr_cache.get``
span with ``swr_cache.outcome`` (``fresh``, ``stale``, ``miss``, ``bypass``)
and ``swr_cache.function``; the origin call it makes is a child span,
``swr_cache.load`` in the foreground and ``swr_cache.refresh`` when it runs
in the background after a stale hit (or through ``.refresh()``).

Without OpenTelemetry, ``TRACER`` is ``None`` and the decorators keep their
direct path: no span objects, no context switches, no extra frame. With the
API but no SDK TracerProvider installed, a call costs one check, no span.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

__all__ = [
    "ATTR_FUNCTION",
    "ATTR_OUTCOME",
    "ATTR_TABLE",
    "CALL_DONE",
    "TRACER",
    "recording",
    "traced_loader",
]

ATTR_OUTCOME: Final = "swr_cache.outcome"
ATTR_FUNCTION: Final = "swr_cache.function"
ATTR_TABLE: Final = "swr_cache.table"

try:
    from opentelemetry import trace as _trace
except ImportError:  # the `otel` extra is not installed
    _trace = None  # type: ignore[assignment]

TRACER: Any = None
if _trace is not None:
    # A proxy until the application installs a TracerProvider; it follows
    # the provider from then on.
    TRACER = _trace.get_tracer("swr_cache")

_NO_OP_PROVIDERS: tuple[type[Any], ...] = ()
if _trace is not None:
    _NO_OP_PROVIDERS = (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider)


_recording = False
_next_check = 0.0


def recording() -> bool:
    """Whether the application installed a TracerProvider (else spans would be no-ops).

    OpenTelemetry's global provider is set once and never unset, so a yes is
    kept for good. A no is asked again at most every 0.2 s: looking the
    provider up reads the environment, too slow for every cache hit of an
    API-only install (FastAPI apps often have one) that has no SDK.
    """
    global _recording, _next_check
    if _recording:
        return True
    now = time.monotonic()
    if now < _next_check or _trace is None:
        return False
    _next_check = now + 0.2
    _recording = not isinstance(_trace.get_tracer_provider(), _NO_OP_PROVIDERS)
    return _recording


# Set while a get span is open: [True] once its call has returned, so a load
# that starts after that (a task the call left behind) is a refresh.
CALL_DONE: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "swr_cache_call_done", default=None
)


def traced_loader(
    load: Callable[[tuple[str, ...] | None], Awaitable[Any]], attributes: dict[str, str]
) -> Callable[[tuple[str, ...] | None], Awaitable[Any]]:
    """Wrap an origin call in a ``swr_cache.load`` or ``swr_cache.refresh`` span."""
    tracer = TRACER

    async def traced(attrs: tuple[str, ...] | None) -> Any:
        if not recording():
            return await load(attrs)
        done = CALL_DONE.get()
        name = "swr_cache.refresh" if done is None or done[0] else "swr_cache.load"
        with tracer.start_as_current_span(name, attributes=attributes):
            return await load(attrs)

    return traced
