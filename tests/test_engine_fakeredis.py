"""Fast unit runs of the engine on fakeredis (with Lua); the real-server tests are the proof."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fakeredis import FakeAsyncRedis

from swr_cache import Cache, cached_item
from swr_cache.testing import FakeClock, RecordingOrigin


@pytest.fixture
def origin() -> RecordingOrigin:
    return RecordingOrigin({"u1": {"pk": "u1", "name": "Ada", "age": 36}})


async def test_fresh_stale_absent_on_fakeredis(origin: RecordingOrigin) -> None:
    """The state machine and the Lua fill run on fakeredis too."""
    clock = FakeClock()
    cache = Cache(FakeAsyncRedis(), soft_ttl=10, hard_ttl=100, clock=clock, early_refresh=0)
    async with cache:

        @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
        async def get_user(
            user_id: str, *, attributes: list[str] | None = None
        ) -> dict[str, Any] | None:
            return await origin.get(user_id, attributes)

        assert (await get_user("u1"))["name"] == "Ada"
        assert await get_user.peek("u1") == (origin.items["u1"], "fresh")
        clock.advance(11)
        origin.hold()
        assert (await get_user("u1"))["name"] == "Ada"  # stale, served at once
        await origin.entered.wait()
        origin.release()
        clock.advance(200)
        assert await get_user.peek("u1") is None
        assert await get_user("u1", attributes=["age"]) == {"age": 36}


async def test_single_flight_on_fakeredis(origin: RecordingOrigin) -> None:
    """100 concurrent misses make one origin call."""
    cache = Cache(FakeAsyncRedis())
    async with cache:

        @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
        async def get_user(user_id: str) -> dict[str, Any] | None:
            return await origin.get(user_id)

        origin.hold()
        tasks = [asyncio.create_task(get_user("u1")) for _ in range(100)]
        await origin.entered.wait()
        origin.release()
        assert len(await asyncio.gather(*tasks)) == 100
        assert origin.count == 1
