"""Helpers for testing code that uses swr_cache.

* ``FakeClock``: a wall clock you move by hand (pass it as ``Cache(clock=...)``)
  to step an entry from fresh to stale to gone without sleeping.
* ``RecordingOrigin``: an async item accessor over a dict that counts its calls,
  can be held at a gate (to prove single flight and stale serving with events,
  not sleeps) and can be told to fail.
* ``CacheHost``: enters a ``Cache`` in a task of its own, for pytest-asyncio
  fixtures, whose setup and teardown run in different tasks while an anyio task
  group must be exited by the task that entered it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from ._host import CacheHost

__all__ = ["CacheHost", "FakeClock", "RecordingOrigin"]


class FakeClock:
    """A wall clock (seconds) that only moves when told to."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingOrigin:
    """A stand-in for a DynamoDB accessor: ``await origin.get(key, attributes=None)``.

    ``calls`` lists ``(key, attributes)`` per call. Close ``gate`` (an
    ``asyncio.Event``, open by default) to hold calls until it is set again;
    ``entered`` is set each time a call arrives. Set ``error`` to make calls raise it.
    """

    def __init__(self, items: Mapping[Any, Mapping[str, Any]] | None = None) -> None:
        self.items: dict[Any, dict[str, Any]] = {k: dict(v) for k, v in (items or {}).items()}
        self.calls: list[tuple[Any, list[str] | None]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.error: BaseException | None = None

    @property
    def count(self) -> int:
        return len(self.calls)

    def hold(self) -> None:
        """Make the next calls wait until ``release()``."""
        self.gate.clear()
        self.entered.clear()

    def release(self) -> None:
        self.gate.set()

    async def get(self, key: Any, attributes: list[str] | None = None) -> dict[str, Any] | None:
        self.calls.append((key, attributes))
        self.entered.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        item = self.items.get(key)
        if item is None:
            return None
        if attributes is None:
            return dict(item)
        return {name: item[name] for name in attributes if name in item}
