"""Enter a ``Cache`` in a task of its own (see ``swr_cache.testing.CacheHost``)."""

from __future__ import annotations

import asyncio
from types import TracebackType

from ._cache import Cache


class CacheHost:
    """Run ``async with cache`` in its own task: ``async with CacheHost(cache) as c: ...``.

    Entering and exiting may then happen in different tasks (as pytest-asyncio
    fixtures do, and as a Lambda handler does across invocations), while the
    cache's anyio task group is still exited by the task that entered it.
    ``start()``/``stop()`` do the same without ``async with``.
    """

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._error: Exception | None = None

    async def _host(self) -> None:
        try:
            async with self.cache:
                self._ready.set()
                await self._stop.wait()
        except Exception as exc:
            self._error = exc
            self._ready.set()

    async def start(self) -> Cache:
        """Enter the cache in a new task; raises what entering it raised."""
        self._task = asyncio.get_running_loop().create_task(self._host())
        await self._ready.wait()
        if self._error is not None:
            error, self._error = self._error, None  # told once: stop() will not raise it again
            raise error
        return self.cache

    @property
    def alive(self) -> bool:
        """The hosting task is still running (the cache is entered)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Leave the cache (draining background work); raises what leaving it raised."""
        self._stop.set()
        if self._task is not None:
            await self._task
        if self._error is not None:
            raise self._error

    async def __aenter__(self) -> Cache:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
