"""The decorators' misuse errors and warnings (before any Redis I/O)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from swr_cache import Cache, ConfigError, cached_item


async def test_key_returning_a_string_names_the_function(cache: Cache) -> None:
    """``key=lambda u: u`` is a ConfigError saying what key= must return, not a TypeError."""

    @cached_item(cache, table="Users", key=lambda user_id: user_id)
    async def get_user(user_id: str) -> dict[str, Any] | None:
        return {"pk": user_id}

    with pytest.raises(ConfigError) as info:
        await get_user("u1")
    message = str(info.value)
    assert get_user.name in message  # the decorated function
    assert "<lambda>" in message and __file__ in message  # the key function, and where it is
    assert "returned str 'u1'" in message
    assert "must return the item's primary key as a mapping" in message


async def test_key_returning_a_tuple_through_the_slow_path(cache: Cache) -> None:
    """Keyword calls (no memo) check the key function's result too."""

    def key_of(tenant: str, user_id: str) -> Any:
        return (tenant, user_id)

    @cached_item(cache, table="Users", key=key_of)
    async def get_user(tenant: str, user_id: str) -> dict[str, Any] | None:
        return None

    with pytest.raises(ConfigError, match=r"key_of .*returned tuple"):
        await get_user("t1", user_id="u1")
    with pytest.raises(ConfigError, match="key_of"):
        await get_user.invalidate("t1", "u1")


def test_consistent_read_accessor_without_consistent_reads_warns(cache: Cache) -> None:
    """An accessor that reads with ConsistentRead=True but leaves consistent_reads off is warned about, once, at decoration."""
    with pytest.warns(UserWarning, match="consistent_reads=True") as record:

        @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
        async def get_user(user_id: str) -> dict[str, Any] | None:
            client: Any = None
            reply = await client.get_item(
                TableName="Users", Key={"pk": {"S": user_id}}, ConsistentRead=True
            )
            return dict(reply["Item"])

    assert len(record) == 1
    assert record[0].filename == __file__  # points at the decoration, not at swr_cache


def test_no_warning_when_consistent_reads_is_said_or_not_needed(cache: Cache) -> None:
    """``consistent_reads=True``, or an eventually consistent accessor, decorate quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        @cached_item(
            cache, table="Users", key=lambda user_id: {"pk": user_id}, consistent_reads=True
        )
        async def strong(user_id: str) -> dict[str, Any] | None:
            client: Any = None
            return dict(await client.get_item(Key={"pk": user_id}, ConsistentRead=True))

        @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
        async def eventual(user_id: str) -> dict[str, Any] | None:
            client: Any = None
            return dict(await client.get_item(Key={"pk": user_id}, ConsistentRead=False))

    assert strong.consistent_reads and not eventual.consistent_reads
