"""Checked by mypy (``make typecheck``), not run: decorated functions keep their types."""

from __future__ import annotations

from typing import Any, assert_type

from swr_cache import Cache, CachedTable, DynamoTable, cached, cached_item


async def check(cache: Cache) -> None:
    @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
    async def get_user(
        user_id: str, *, attributes: list[str] | None = None
    ) -> dict[str, Any] | None:
        return None

    assert_type(await get_user("u1"), dict[str, Any] | None)
    assert_type(await get_user("u1", attributes=["name"]), dict[str, Any] | None)
    assert_type(await get_user.peek("u1"), tuple[dict[str, Any] | None, str] | None)
    assert_type(await get_user.invalidate("u1"), None)

    async def load_users(ids: list[str]) -> dict[str, dict[str, Any] | None]:
        return {}

    assert_type(
        await get_user.many(["u1", "u2"], load=load_users), dict[str, dict[str, Any] | None]
    )

    @cached(cache, key="orders:{customer_id}")
    async def list_orders(customer_id: str, limit: int = 10) -> list[dict[str, Any]]:
        return []

    assert_type(await list_orders("c1"), list[dict[str, Any]])
    assert_type(await list_orders.refresh("c1", limit=5), list[dict[str, Any]])

    class Repo:
        @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id})
        async def get(self, user_id: str) -> dict[str, Any] | None:
            return None

    assert_type(await Repo().get("u1"), dict[str, Any] | None)


async def check_table(cache: Cache, client: Any) -> None:
    users: CachedTable = DynamoTable(client, "Users").cached(cache)
    assert_type(DynamoTable(client, "Users").cached(cache), CachedTable)
    assert_type(await users.get_item({"pk": "u1"}), dict[str, Any] | None)
