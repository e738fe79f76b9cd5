"""The gate to Redis: how many commands may be in flight, and what a failure means.

``_Limiter`` bounds this process's Redis commands in flight (RedisCluster's
async pool raises instead of waiting, and a plain pool can be exhausted by the
application): a slot costs two integer updates, and a waiter cancelled just as
a slot reaches it passes the slot on. ``_Bypass`` is what the read path raises
when Redis cannot be used for a call (the origin answers instead). The client
checks here run once, when a ``Cache`` is built.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from redis.exceptions import RedisError

from ._errors import ConfigError

log = logging.getLogger("swr_cache")


class _Bypass(Exception):
    """Redis could not be used for this call; answer from the origin.

    Every caller that shared the failed read gets this one object; ``load``
    is the origin load the first of them started, which the others join even
    if it has finished by the time they get to it (see ``RedisEngine.flight``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.load: Any = None


class _Limiter:
    """Bounds Redis commands in flight; a free slot costs two integer updates.

    ``asyncio.Semaphore`` would do, at a few hundred nanoseconds more per hit.
    A released slot is handed straight to the oldest waiter.
    """

    __slots__ = ("free", "waiters")

    def __init__(self, size: int) -> None:
        self.free = size
        self.waiters: collections.deque[asyncio.Future[bool]] = collections.deque()

    async def wait(self, limit: float) -> bool:
        """Wait up to ``limit`` seconds for a slot (call only when ``free`` is 0).

        True: the slot is ours (``release`` it). A waiter cancelled just as a
        slot was handed to it passes the slot on, so no slot is ever lost.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self.waiters.append(fut)
        timer = loop.call_later(limit, _expire, fut)
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.result():
                self.release()
            raise
        finally:
            timer.cancel()

    def hold(self, timeout: float) -> _Slot:
        """``async with limiter.hold(t):`` one slot, or ``TimeoutError`` after ``t`` seconds."""
        return _Slot(self, timeout)

    def release(self) -> None:
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(True)
                return
        self.free += 1


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


class _NoSlot(TimeoutError):
    """No Redis slot came free in time: a local wait, not a sign of Redis' health."""


class _Slot:
    __slots__ = ("limiter", "timeout")

    def __init__(self, limiter: _Limiter, timeout: float) -> None:
        self.limiter = limiter
        self.timeout = timeout

    async def __aenter__(self) -> None:
        limiter = self.limiter
        if limiter.free:
            limiter.free -= 1
        elif not await limiter.wait(self.timeout):
            raise _NoSlot("every Redis slot stayed busy")

    async def __aexit__(self, *exc_info: object) -> None:
        self.limiter.release()


def _is_pool_exhausted(exc: BaseException) -> bool:
    """redis-py's plain pool raises when every connection is in use (by us or the app)."""
    name = type(exc).__name__
    return name == "MaxConnectionsError" or (
        isinstance(exc, RedisError) and "Too many connections" in str(exc)
    )


def _warn_without_timeout(client: Any) -> None:
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if isinstance(kwargs, dict) and kwargs.get("socket_timeout") is None:
        log.warning(
            "swr_cache: the Redis client has no socket_timeout, so a stalled Redis stalls "
            "reads instead of bypassing it; build it with socket_timeout=0.5 (Cache.from_url does)"
        )


def _pool_size(client: Any) -> int | None:
    pool = getattr(client, "connection_pool", None)
    size = getattr(pool, "max_connections", None)
    if isinstance(size, int) and size > 0:
        return size
    size = getattr(client, "max_connections", None)  # RedisCluster: per node
    if size is None:
        # redis.asyncio's RedisCluster keeps it only in the kwargs of its node pools.
        kwargs = getattr(getattr(client, "nodes_manager", None), "connection_kwargs", None)
        size = kwargs.get("max_connections") if isinstance(kwargs, dict) else None
    return size if isinstance(size, int) and size > 0 else None


def _reject_decoding_client(client: Any) -> None:
    for getter in ("get_encoder",):
        for owner in (getattr(client, "connection_pool", None), client):
            fn = getattr(owner, getter, None)
            if fn is None:
                continue
            try:
                encoder = fn()
            except Exception:
                continue
            if getattr(encoder, "decode_responses", False):
                raise ConfigError(
                    "swr_cache stores bytes: build the Redis client with decode_responses=False"
                )
            return
