"""Helpers shared by the engine and fault tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from swr_cache import Cache, cached_item
from swr_cache.testing import RecordingOrigin


def users(cache: Cache, origin: RecordingOrigin, **kw: Any) -> Any:
    """A ``@cached_item`` accessor of table ``Users`` (key ``pk``) over ``origin``."""

    @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id}, **kw)
    async def get_user(
        user_id: str, *, attributes: list[str] | None = None
    ) -> dict[str, Any] | None:
        return await origin.get(user_id, attributes)

    return get_user


async def wait_until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll a condition the code under test drives (never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


#: How ``entry_hash`` and ``entry_field`` name a whole entry's string (format 3).
WHOLE = b"\xffe"


async def entry_type(client: Any, key: str) -> str:
    """TYPE of an entry key: ``string`` (a whole entry), ``hash`` (partial, result) or ``none``."""
    kind = await client.type(key)
    return kind.decode() if isinstance(kind, bytes) else str(kind)


async def entry_field(client: Any, key: str, field: bytes) -> bytes | None:
    """One raw field of an entry hash (HGET), as bytes; ``WHOLE`` of a whole entry is its string."""
    if await entry_type(client, key) == "string":
        value = await client.get(key) if field == WHOLE else None
    else:
        value = await client.hget(key, field)
    assert value is None or isinstance(value, bytes)
    return value


async def entry_hash(client: Any, key: str) -> dict[bytes, bytes]:
    """An entry as stored: a hash's fields (HGETALL), or a whole entry's string as ``{WHOLE: string}``."""
    if await entry_type(client, key) == "string":
        value = await client.get(key)
        assert isinstance(value, bytes)
        return {WHOLE: value}
    return dict(await client.hgetall(key))


async def memory_usage(client: Any, key: str) -> int:
    """``MEMORY USAGE key SAMPLES 0``: every field counted."""
    used = await client.memory_usage(key, samples=0)
    assert isinstance(used, int)
    return used
