"""Shared time: deadlines in entries are Redis server time, this process's clock plus an offset."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
from redis.exceptions import RedisError

log = logging.getLogger("swr_cache")


class Clock:
    """This process's estimate of Redis server time, in milliseconds."""

    __slots__ = ("clock", "offset_ms")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.offset_ms = 0.0

    def now_ms(self) -> float:
        return self.clock() * 1000.0 + self.offset_ms

    async def sync(self, server_time_ms: Callable[[], Awaitable[float]], limit: float) -> None:
        """Measure the offset to Redis ``TIME`` (half the round trip is the error bound)."""
        try:
            with anyio.fail_after(max(limit, 1.0)):
                before = self.clock()
                server_ms = await server_time_ms()
                after = self.clock()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("swr_cache: could not read Redis TIME (%s); using the local clock", exc)
            return
        self.offset_ms = server_ms - (before + after) * 500.0
