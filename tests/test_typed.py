"""Typed values: dataclasses, Pydantic v2 models and msgspec Structs named by the return
annotation are stored as msgpack of their fields and rebuilt as that type (real redis-server)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import uuid
from decimal import Decimal
from typing import Any

import msgspec
import pydantic
import pytest
import redis.asyncio as aioredis

from swr_cache import Cache, ConfigError, cached, cached_item
from swr_cache._codec import decode
from swr_cache._store import M_RESULT

pytestmark = [pytest.mark.redis, pytest.mark.on_cluster]


class Tier(enum.Enum):
    FREE = "free"
    PRO = "pro"


@dataclasses.dataclass(frozen=True)
class Address:
    city: str
    zip: str


@dataclasses.dataclass
class User:
    pk: str
    name: str
    balance: Decimal
    tier: Tier
    address: Address | None = None
    tags: set[str] = dataclasses.field(default_factory=set)
    display: str = dataclasses.field(init=False, default="")

    def __post_init__(self) -> None:
        self.display = self.name.title()


class Line(pydantic.BaseModel):
    sku: str
    qty: int
    price: Decimal


class Order(pydantic.BaseModel):
    id: uuid.UUID
    placed: datetime.datetime
    tier: Tier
    lines: list[Line]
    note: str | None = None


class Product(msgspec.Struct):
    sku: str
    price: Decimal
    added: datetime.date
    photos: list[bytes] = []


ADA = User("u1", "ada lovelace", Decimal("10.50"), Tier.PRO, Address("London", "N1"), {"a"})
ORDER = Order(
    id=uuid.UUID(int=7),
    placed=datetime.datetime(2026, 12, 1, 9, 30, tzinfo=datetime.UTC),
    tier=Tier.FREE,
    lines=[Line(sku="s1", qty=2, price=Decimal("1.10"))],
)
PRODUCT = Product("s1", Decimal("9.99"), datetime.date(2026, 1, 2), [b"\x00\xff"])


async def raw_results(client: Any) -> list[Any]:
    """Every stored @cached result, decoded with the package's msgpack codec (no pickle)."""
    out = []
    nodes = client.get_primaries() if hasattr(client, "get_primaries") else [None]
    for node in nodes:
        kwargs = {"target_nodes": node} if node is not None else {}
        keys = await client.keys("t:*", **kwargs)
        for key in keys:
            if await client.type(key) == b"hash":
                field = await client.hget(key, M_RESULT)
                if field is not None:
                    out.append(decode(field))
    return out


async def test_dataclass_result_round_trips(cache: Cache, redis_client: aioredis.Redis) -> None:
    """A dataclass is stored as plain fields and every caller gets a User back."""
    calls = 0

    @cached(cache, key="user:{pk}")
    async def get(pk: str) -> User:
        nonlocal calls
        calls += 1
        return dataclasses.replace(ADA)

    first = await get("u1")
    second = await get("u1")
    assert calls == 1
    assert type(first) is User and type(second) is User
    assert first == second == ADA and first is not second
    assert second.display == "Ada Lovelace"  # __post_init__ ran on the rebuilt value
    assert isinstance(second.address, Address) and second.tier is Tier.PRO
    [stored] = await raw_results(redis_client)
    assert stored == {
        "pk": "u1",
        "name": "ada lovelace",
        "balance": Decimal("10.50"),
        "tier": "pro",
        "address": {"city": "London", "zip": "N1"},
        "tags": {"a"},
    }
    assert cache.stats()[get.name]["fills_rejected"] == 0


async def test_pydantic_list_round_trips(cache: Cache) -> None:
    """``list[Order]`` of Pydantic v2 models (UUID, aware datetime, enum, nested) comes back exact."""
    calls = 0

    @cached(cache, key="orders:{customer}")
    async def orders(customer: str) -> list[Order]:
        nonlocal calls
        calls += 1
        return [ORDER, ORDER.model_copy(update={"note": "gift"})]

    first = await orders("c1")
    hit = await orders("c1")
    assert calls == 1
    assert all(type(o) is Order for o in hit)
    assert hit == first == [ORDER, ORDER.model_copy(update={"note": "gift"})]
    assert hit[0].lines[0].price == Decimal("1.10")  # exact, not a float
    peeked = await orders.peek("c1")
    assert peeked is not None and peeked[0] == hit and peeked[1] == "fresh"


async def test_optional_msgspec_struct(cache: Cache) -> None:
    """``Product | None``: a Struct round-trips, and None is cached as None."""
    catalogue = {"s1": PRODUCT}
    calls = 0

    @cached(cache, key="product:{sku}")
    async def product(sku: str) -> Product | None:
        nonlocal calls
        calls += 1
        return catalogue.get(sku)

    assert await product("s1") == PRODUCT
    got = await product("s1")
    assert type(got) is Product and got == PRODUCT and got.photos == [b"\x00\xff"]
    assert await product("nope") is None and await product("nope") is None
    assert calls == 2
    refreshed = await product.refresh("s1")
    assert type(refreshed) is Product and calls == 3


async def test_cached_item_with_a_dataclass(cache: Cache) -> None:
    """An item accessor annotated ``-> User | None`` stores the item's fields in its hash."""
    calls = 0

    @cached_item(cache, table="Users", key=lambda pk: {"pk": pk})
    async def get_user(pk: str) -> User | None:
        nonlocal calls
        calls += 1
        return dataclasses.replace(ADA) if pk == "u1" else None

    assert await get_user("u1") == ADA
    hit = await get_user("u1")
    assert type(hit) is User and hit == ADA and calls == 1
    assert await get_user("u2") is None and await get_user("u2") is None and calls == 2
    await cache.invalidate_item("Users", {"pk": "u1"})
    assert await get_user("u1") == ADA and calls == 3


async def test_methods_and_local_classes(cache: Cache) -> None:
    """A class defined next to the function (a string annotation) and a bound method both work."""

    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    class Repo:
        @cached(cache, key="point:{n}")
        async def point(self, n: int) -> Point:
            return Point(n, -n)

    repo = Repo()
    assert await repo.point(3) == Point(3, -3)
    hit = await repo.point(3)
    assert type(hit) is Point and hit == Point(3, -3)


async def test_an_outdated_stored_shape_is_a_counted_miss(cache: Cache) -> None:
    """An entry written before a field was added is reloaded, not a crash."""

    @dataclasses.dataclass
    class V1:
        a: int

    @dataclasses.dataclass
    class V2:
        a: int
        b: int

    @cached(cache, key="shape:{n}", name="shape")
    async def old(n: int) -> V1:
        return V1(n)

    await old(1)

    @cached(cache, key="shape:{n}", name="shape")
    async def new(n: int) -> V2:
        return V2(n, 2 * n)

    assert await new(1) == V2(1, 2)
    assert cache.stats()["shape"]["decode_errors"] == 1
    assert await new(1) == V2(1, 2)  # overwritten: a hit now
    assert cache.stats()["shape"]["decode_errors"] == 1


async def test_a_value_that_does_not_match_its_annotation_is_a_clear_error(
    cache: Cache,
) -> None:
    """The function's own value cannot be rebuilt as annotated: CodecError naming it."""
    from swr_cache import CodecError

    calls = 0

    @cached(cache, key="bad:{n}")
    async def bad(n: int) -> User:
        nonlocal calls
        calls += 1
        return "not a user"  # type: ignore[return-value]

    with pytest.raises(CodecError, match="bad"):
        await bad(1)
    assert calls == 1  # not loaded again: the origin's own value is wrong
    assert cache.stats()[bad.name]["decode_errors"] == 0


def test_ambiguous_or_unsupported_annotations_are_config_errors(cache: Cache) -> None:
    """A union of two models, a typed item accessor with projections, a list item: ConfigError."""
    with pytest.raises(ConfigError, match="which of"):

        @cached(cache)
        async def either() -> User | Order:
            raise AssertionError

    with pytest.raises(ConfigError, match="attributes"):

        @cached_item(cache, table="Users", key=lambda pk: {"pk": pk})
        async def projected(pk: str, *, attributes: list[str] | None = None) -> User | None:
            raise AssertionError

    with pytest.raises(ConfigError, match="one item per entry"):

        @cached_item(cache, table="Users", key=lambda pk: {"pk": pk})
        async def many(pk: str) -> list[User]:
            raise AssertionError


def test_plain_annotations_need_no_plan(cache: Cache) -> None:
    """dict, list[dict], str | None and unannotated functions keep the direct path."""

    @cached(cache)
    async def a() -> dict[str, Any]:
        return {}

    @cached(cache)
    async def b() -> list[dict[str, Any]] | None:
        return None

    @cached(cache)
    async def c():  # type: ignore[no-untyped-def]
        return 1

    assert a._plan is None and b._plan is None and c._plan is None


def test_importing_swr_cache_imports_neither_pydantic_nor_msgspec() -> None:
    """Both stay optional: a model class in an annotation is how swr_cache learns of them."""
    import subprocess
    import sys

    code = "import sys, swr_cache; print(sorted({'pydantic', 'msgspec'} & set(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
