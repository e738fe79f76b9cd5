"""Entry format 2 on a real Redis: old entries are counted misses, projections of whole
entries are one round trip, memory stays near the blob's, write-through reads the header."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis
from helpers import entry_field, entry_hash, memory_usage, users

from swr_cache import Cache, _codec
from swr_cache._entry import encode_fields, stamp_entry
from swr_cache._policy import Policy
from swr_cache._store import M_ENTRY, M_FORMAT, M_HARD, M_SOFT, M_VERSION, M_WHOLE
from swr_cache.testing import RecordingOrigin

pytestmark = pytest.mark.on_cluster

ADA = {"pk": "u1", "name": "Ada", "age": Decimal("36"), "tags": {"a", "b"}}


@pytest.fixture
def origin() -> RecordingOrigin:
    return RecordingOrigin({"u1": ADA, "u2": {"pk": "u2", "name": "Bob"}})


async def write_format_1(redis_client: Any, key: str, attrs: dict[str, Any], now_ms: int) -> None:
    """An entry as format 1 wrote it: a field per attribute, seven metadata fields."""
    fields: dict[Any, Any] = {name.encode(): _codec.encode(v) for name, v in attrs.items()}
    fields |= {
        M_SOFT: b"%d" % (now_ms + 60_000),
        M_HARD: b"%d" % (now_ms + 600_000),
        M_FORMAT: b"1",
        M_WHOLE: b"1",
        M_VERSION: b"0123456789ab",
        b"\xffd": b"3",
    }
    await redis_client.hset(key, mapping=fields)
    await redis_client.pexpire(key, 600_000)


@pytest.mark.parametrize("attributes", [None, ["name"]])
async def test_format_1_entry_is_a_counted_miss_then_overwritten(
    cache: Cache,
    origin: RecordingOrigin,
    redis_client: aioredis.Redis,
    attributes: list[str] | None,
) -> None:
    """An entry left by format 1 is never served: decode_errors, one load, a format-2 entry after."""
    get_user = users(cache, origin)
    entry = cache._keys.entry("Users|pk=S:u1")
    await write_format_1(redis_client, entry, {**ADA, "name": "Old"}, int(cache._engine.now_ms()))
    got = await get_user("u1", attributes=attributes)
    assert got == (ADA if attributes is None else {"name": "Ada"})
    stats = cache.stats()[get_user.name]
    assert stats["decode_errors"] == 1 and origin.count == 1
    raw = await entry_hash(redis_client, entry)
    if attributes is None:
        assert set(raw) == {M_ENTRY} and raw[M_ENTRY].startswith(b"2|")  # replaced whole
    else:
        assert raw[M_FORMAT] == b"2" and M_WHOLE not in raw  # replaced by the projection
    assert await get_user("u1", attributes=attributes) == got  # a plain hit now
    assert origin.count == 1 and cache.stats()[get_user.name]["decode_errors"] == 1


async def command_calls(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command so far (INFO commandstats), without INFO itself."""
    info = await client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(stat["calls"])
        for name, stat in info.items()
        if name != "cmdstat_info"
    }


@pytest.mark.standalone_only("counts commands on one server")
async def test_projection_of_a_whole_entry_is_one_round_trip_and_no_load(
    cache: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    """A projection hit on a whole entry is one HMGET: the blob comes with the metadata."""
    get_user = users(cache, origin)
    await get_user("u1")
    before = await command_calls(redis_client)
    assert await get_user("u1", attributes=["name", "age", "nope"]) == {
        "name": "Ada",
        "age": Decimal("36"),
    }
    assert await get_user("u1") == ADA
    after = await command_calls(redis_client)
    spent = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert spent == {"hmget": 2}
    assert origin.count == 1 and cache.stats()[get_user.name]["hits"] == 2


async def test_whole_read_of_a_partial_entry_loads_the_whole_item(
    cache: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    """A partial entry cannot answer a whole read: a partial miss, then a whole entry replaces it."""
    get_user = users(cache, origin)
    assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
    entry = cache._keys.entry("Users|pk=S:u1")
    assert b"name" in await entry_hash(redis_client, entry)
    assert await get_user("u1") == ADA
    stats = cache.stats()[get_user.name]
    assert stats["partial_misses"] == 1 and stats["decode_errors"] == 0 and origin.count == 2
    assert set(await entry_hash(redis_client, entry)) == {M_ENTRY}
    assert await get_user("u1", attributes=["age"]) == {"age": Decimal("36")}
    assert origin.count == 2


async def test_negative_entries_are_one_field(
    cache: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    get_user = users(cache, origin)
    assert await get_user("nobody") is None
    assert await get_user("nobody", attributes=["name"]) is None
    raw = await entry_hash(redis_client, cache._keys.entry("Users|pk=S:nobody"))
    assert set(raw) == {M_ENTRY} and raw[M_ENTRY].split(b"|")[5] == b"n"
    assert origin.count == 1


@pytest.mark.standalone_only("MEMORY USAGE of keys on one server")
async def test_memory_of_a_whole_entry_stays_near_its_blob(
    cache: Cache, redis_client: aioredis.Redis
) -> None:
    """A ~1 KB item costs its blob plus one small hashtable node, far below format 1's hash.

    Format 1 (a field per attribute, values over hash-max-listpack-value)
    measured about 1.8x the blob; format 2 is one field: a constant ~120
    bytes over the blob as a plain string, so within 1.1x from ~1.3 KB up.
    """
    item = {
        "pk": "u9",
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "balance": Decimal("1024.50"),
        "roles": {"admin", "editor"},
        "address": {"street": "12 St James's Square", "city": "London"},
        "bio": "x" * 600,
        "notes": "y" * 500,
        **{f"a{i}": f"value {i}" for i in range(12)},
    }
    origin = RecordingOrigin({"u9": item})
    get_user = users(cache, origin)
    assert await get_user("u9") == item
    entry = cache._keys.entry("Users|pk=S:u9")
    blob_key = entry.replace(":e:", ":b:")  # a key of the same length
    await redis_client.set(blob_key, _codec.encode(item))
    entry_bytes = await memory_usage(redis_client, entry)
    blob_bytes = await memory_usage(redis_client, blob_key)
    assert entry_bytes <= 1.1 * blob_bytes, (entry_bytes, blob_bytes)
    # The same item as format 1 laid it out, for contrast.
    old = entry.replace(":e:", ":o:")
    await write_format_1(redis_client, old, item, 0)
    assert entry_bytes < 0.7 * await memory_usage(redis_client, old)


def whole_fields(value: dict[str, Any], now_ms: float) -> dict[Any, Any]:
    fields = encode_fields(True, None, value, False, None, "v")
    stamp_entry(fields, Policy(soft_ttl=60, hard_ttl=600), False, now_ms, 1.0)
    return fields


async def test_write_through_compares_the_header_version(
    cache: Cache, redis_client: aioredis.Redis
) -> None:
    """The write-through script reads the cached version from a whole entry's header digits."""
    store, now = cache._engine.store, cache._engine.now_ms()
    entry, lease = cache._keys.entry("Users|pk=S:u1"), cache._keys.lease("Users|pk=S:u1")

    async def cached_v() -> Any:
        raw = await entry_field(redis_client, entry, M_ENTRY)
        assert raw is not None
        return _codec.decode(raw.split(b"|", 7)[7])["v"]

    await redis_client.hset(entry, mapping=whole_fields({"pk": "u1", "v": Decimal(9)}, now))
    newer = whole_fields({"pk": "u1", "v": Decimal(10)}, now)
    older = whole_fields({"pk": "u1", "v": Decimal(8)}, now)
    assert not await store.write_through(entry, lease, b"v", "8", 600_000, older)
    assert not await store.write_through(entry, lease, b"v", "9", 600_000, older)
    assert await cached_v() == 9
    assert await store.write_through(entry, lease, b"v", "10", 600_000, newer)
    assert await cached_v() == 10
    # A whole entry whose version is no integer carries no digits: never replaced.
    await redis_client.hset(entry, mapping=whole_fields({"pk": "u1", "v": "x"}, now))
    assert not await store.write_through(entry, lease, b"v", "11", 600_000, newer)
    # Nor is one written by a writer that did not know the version attribute
    # (a stream refresh): the caller invalidates instead.
    unknown: dict[Any, Any] = encode_fields(True, None, {"pk": "u1", "v": 3}, False, None)
    stamp_entry(unknown, Policy(soft_ttl=60, hard_ttl=600), False, now, None)
    await redis_client.hset(entry, mapping=unknown)
    assert not await store.write_through(entry, lease, b"v", "11", 600_000, newer)
