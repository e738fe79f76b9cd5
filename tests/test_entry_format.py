"""Entry format 3 on a real Redis: a whole entry is a string, old entries (format 1, and
format 2's one-field hash) are counted misses, projections of whole entries are one round
trip, memory stays near the blob's, write-through reads the string's header."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis
from helpers import entry_field, entry_hash, entry_type, memory_usage, users

from swr_cache import Cache, _autobatch, _codec
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
    """An entry left by format 1 is never served: decode_errors, one load, a format-3 entry after."""
    get_user = users(cache, origin)
    entry = cache._keys.entry("Users|pk=S:u1")
    await write_format_1(redis_client, entry, {**ADA, "name": "Old"}, int(cache._engine.now_ms()))
    got = await get_user("u1", attributes=attributes)
    assert got == (ADA if attributes is None else {"name": "Ada"})
    stats = cache.stats()[get_user.name]
    assert stats["decode_errors"] == 1 and origin.count == 1
    raw = await entry_hash(redis_client, entry)
    if attributes is None:
        assert await entry_type(redis_client, entry) == "string"  # replaced whole
        assert set(raw) == {M_ENTRY} and raw[M_ENTRY].startswith(b"3|")
    else:
        assert await entry_type(redis_client, entry) == "hash"  # replaced by the projection
        assert raw[M_FORMAT] == b"3" and M_WHOLE not in raw
    assert await get_user("u1", attributes=attributes) == got  # a plain hit now
    assert origin.count == 1 and cache.stats()[get_user.name]["decode_errors"] == 1


async def write_format_2(redis_client: Any, key: str, attrs: dict[str, Any], now_ms: int) -> None:
    """A whole entry as format 2 wrote it: a hash of one field, \\xffe, holding header and blob."""
    head = b"2|%d|%d|0123456789ab|3|w||" % (now_ms + 60_000, now_ms + 600_000)
    await redis_client.hset(key, M_ENTRY, head + _codec.encode(attrs))
    await redis_client.pexpire(key, 600_000)


@pytest.mark.parametrize("attributes", [None, ["name"]])
async def test_format_2_whole_hash_is_a_counted_miss_then_replaced(
    cache: Cache,
    origin: RecordingOrigin,
    redis_client: aioredis.Redis,
    attributes: list[str] | None,
) -> None:
    """A one-field \\xffe hash left by format 2 is never served: decode_errors, one load, then a string (or a partial hash)."""
    get_user = users(cache, origin)
    entry = cache._keys.entry("Users|pk=S:u1")
    await write_format_2(redis_client, entry, {**ADA, "name": "Old"}, int(cache._engine.now_ms()))
    got = await get_user("u1", attributes=attributes)
    assert got == (ADA if attributes is None else {"name": "Ada"})
    stats = cache.stats()[get_user.name]
    assert stats["decode_errors"] == 1 and origin.count == 1
    if attributes is None:
        assert await entry_type(redis_client, entry) == "string"
        stored = await entry_field(redis_client, entry, M_ENTRY)
        assert stored is not None and stored.startswith(b"3|")
    else:
        raw = await entry_hash(redis_client, entry)
        assert M_ENTRY not in raw and raw[M_FORMAT] == b"3"  # no field of the old entry left
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
    cache: Cache,
    origin: RecordingOrigin,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A projection hit on a whole entry is one round trip: GET and HMGET go out together,
    the string answers (the HMGET fails WRONGTYPE); a whole hit is one GET."""
    get_user = users(cache, origin)
    await get_user("u1")
    assert await entry_type(redis_client, cache._keys.entry("Users|pk=S:u1")) == "string"
    sent: list[bytes] = []
    real = _autobatch._write

    def recording(conn: Any, data: bytes) -> None:
        sent.append(data)
        real(conn, data)

    monkeypatch.setattr(_autobatch, "_write", recording)
    before = await command_calls(redis_client)
    assert await get_user("u1", attributes=["name", "age", "nope"]) == {
        "name": "Ada",
        "age": Decimal("36"),
    }
    assert len(sent) == 1 and sent[0].count(b"\r\nGET\r\n") == 1
    assert sent[0].count(b"\r\nHMGET\r\n") == 1  # one write: one round trip
    assert await get_user("u1") == ADA
    assert len(sent) == 2 and sent[1].count(b"\r\n") == 5  # GET key, alone
    after = await command_calls(redis_client)
    spent = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert spent == {"get": 2, "hmget": 1}
    assert origin.count == 1 and cache.stats()[get_user.name]["hits"] == 2


async def test_whole_read_of_a_partial_entry_loads_the_whole_item(
    cache: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    """A partial entry cannot answer a whole read: a partial miss, then a whole entry replaces it."""
    get_user = users(cache, origin)
    assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
    entry = cache._keys.entry("Users|pk=S:u1")
    assert b"name" in await entry_hash(redis_client, entry)
    assert await entry_type(redis_client, entry) == "hash"
    assert await get_user("u1") == ADA
    stats = cache.stats()[get_user.name]
    assert stats["partial_misses"] == 1 and stats["decode_errors"] == 0 and origin.count == 2
    assert set(await entry_hash(redis_client, entry)) == {M_ENTRY}
    assert await entry_type(redis_client, entry) == "string"  # the key replaced
    assert await get_user("u1", attributes=["age"]) == {"age": Decimal("36")}
    assert origin.count == 2


async def test_batched_whole_reads_where_one_key_is_a_hash(
    cache: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    """Concurrent whole reads share a pipeline of GETs; the one that finds a partial hash
    (WRONGTYPE) is a partial miss, loads and replaces it, and fails none of the others."""
    names = [f"w{i}" for i in range(12)]
    for name in names:
        origin.items[name] = {"pk": name, "name": name.upper()}
    get_user = users(cache, origin)
    for name in names:
        await get_user(name)
    odd = cache._keys.entry("Users|pk=S:w5")
    await redis_client.delete(odd)
    assert await get_user("w5", attributes=["name"]) == {"name": "W5"}
    assert await entry_type(redis_client, odd) == "hash"
    loads = origin.count
    stats = cache.stats()[get_user.name]
    partial = stats["partial_misses"]
    batches = cache.stats()["swr_cache"]["read_batches"]
    got = await asyncio.gather(*(get_user(n) for n in names))
    assert got == [origin.items[n] for n in names]
    stats = cache.stats()[get_user.name]
    assert stats["partial_misses"] == partial + 1 and stats["decode_errors"] == 0
    assert origin.count == loads + 1  # w5 alone
    assert cache.stats()["swr_cache"]["read_batches"] > batches  # (pipelined)
    assert await entry_type(redis_client, odd) == "string"
    # The batch API (one hand-packed pipeline) takes the same mix.
    await redis_client.delete(odd)
    assert await get_user("w5", attributes=["name"]) == {"name": "W5"}
    seen = await get_user.many(names, load=lambda keys: batch_load(origin, keys))
    assert seen == {n: origin.items[n] for n in names}
    assert await entry_type(redis_client, odd) == "string"
    assert cache.stats()[get_user.name]["decode_errors"] == 0


async def batch_load(origin: RecordingOrigin, keys: list[str]) -> dict[str, Any]:
    return {k: await origin.get(k, None) for k in keys}


async def test_projection_fill_never_mixes_into_a_whole_entry(
    cache: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    """A merge that finds a whole entry (a string) where its partial entry was leaves it alone;
    whole and projection reads racing with invalidations leave only strings or complete hashes."""
    get_user = users(cache, origin)
    store = cache._engine.store
    ident = "Users|pk=S:u1"
    entry, lease, fence = (
        cache._keys.entry(ident),
        cache._keys.lease(ident),
        cache._keys.fence(ident),
    )
    await get_user("u1")
    whole = await entry_field(redis_client, entry, M_ENTRY)
    assert whole is not None
    await redis_client.set(lease, b"token")
    outcome = await store.merge(entry, lease, fence, "token", b"v", {b"name": b"x"}, False)
    assert outcome == -2  # changed since read: nothing written
    assert (
        await entry_field(redis_client, entry, M_ENTRY) == whole
        and await redis_client.exists(lease) == 0
    )
    for _ in range(30):
        await asyncio.gather(
            get_user("u1"),
            get_user("u1", attributes=["name"]),
            get_user("u1", attributes=["age", "tags"]),
            get_user.invalidate("u1"),
            get_user("u1", attributes=["name"]),
            get_user("u1"),
        )
        kind = await entry_type(redis_client, entry)
        if kind == "string":
            stored = await entry_field(redis_client, entry, M_ENTRY)
            assert stored is not None and stored.startswith(b"3|")
            assert _codec.decode(stored.split(b"|", 7)[7]) == ADA
        elif kind == "hash":
            raw = await entry_hash(redis_client, entry)
            assert M_ENTRY not in raw and raw[M_FORMAT] == b"3" and M_VERSION in raw
            assert {k for k in raw if not k.startswith(b"\xff")} <= {
                b"name",
                b"age",
                b"tags",
                b"pk",
            }
        else:
            assert kind == "none"
    assert cache.stats()[get_user.name]["decode_errors"] == 0


async def test_negative_entries_are_one_string(
    cache: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    get_user = users(cache, origin)
    assert await get_user("nobody") is None
    assert await get_user("nobody", attributes=["name"]) is None
    entry = cache._keys.entry("Users|pk=S:nobody")
    assert await entry_type(redis_client, entry) == "string"
    raw = await entry_hash(redis_client, entry)
    assert set(raw) == {M_ENTRY} and raw[M_ENTRY].split(b"|")[5] == b"n"
    assert origin.count == 1


@pytest.mark.standalone_only("MEMORY USAGE of keys on one server")
async def test_memory_of_a_whole_entry_stays_near_its_blob(
    cache: Cache, redis_client: aioredis.Redis
) -> None:
    """A ~1 KB item costs its blob plus a short header: a string, like the blob itself.

    Format 1 (a field per attribute, values over hash-max-listpack-value)
    measured about 1.8x the blob; format 2 (one field of a hashtable hash) a
    constant ~120 bytes over it; format 3 is a string, so only its header.
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
    assert await entry_type(redis_client, entry) == "string"
    assert entry_bytes <= 1.1 * blob_bytes, (entry_bytes, blob_bytes)
    assert entry_bytes - blob_bytes < 100  # the header, not a hashtable's node
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
    """The write-through script reads the cached version from a whole entry's string header."""
    store, now = cache._engine.store, cache._engine.now_ms()
    entry, lease = cache._keys.entry("Users|pk=S:u1"), cache._keys.lease("Users|pk=S:u1")

    async def cached_v() -> Any:
        raw = await entry_field(redis_client, entry, M_ENTRY)
        assert raw is not None
        assert await entry_type(redis_client, entry) == "string"
        return _codec.decode(raw.split(b"|", 7)[7])["v"]

    def string(fields: dict[Any, Any]) -> bytes:
        value = fields[M_ENTRY]
        assert isinstance(value, bytes)
        return value

    await redis_client.set(entry, string(whole_fields({"pk": "u1", "v": Decimal(9)}, now)))
    newer = whole_fields({"pk": "u1", "v": Decimal(10)}, now)
    older = whole_fields({"pk": "u1", "v": Decimal(8)}, now)
    assert not await store.write_through(entry, lease, b"v", "8", 600_000, older)
    assert not await store.write_through(entry, lease, b"v", "9", 600_000, older)
    assert await cached_v() == 9
    assert await store.write_through(entry, lease, b"v", "10", 600_000, newer)
    assert await cached_v() == 10
    assert 0 < await redis_client.pttl(entry) <= 600_000
    # A whole entry whose version is no integer carries no digits: never replaced.
    await redis_client.set(entry, string(whole_fields({"pk": "u1", "v": "x"}, now)))
    assert not await store.write_through(entry, lease, b"v", "11", 600_000, newer)
    # Nor is one written by a writer that did not know the version attribute
    # (a stream refresh): the caller invalidates instead.
    unknown: dict[Any, Any] = encode_fields(True, None, {"pk": "u1", "v": 3}, False, None)
    stamp_entry(unknown, Policy(soft_ttl=60, hard_ttl=600), False, now, None)
    await redis_client.set(entry, string(unknown))
    assert not await store.write_through(entry, lease, b"v", "11", 600_000, newer)
    # A format-2 whole entry (a hash holding \\xffe) is never compared: invalidate.
    await redis_client.delete(entry)
    await redis_client.hset(entry, M_ENTRY, b"2" + string(older)[1:])
    assert not await store.write_through(entry, lease, b"v", "11", 600_000, newer)
    # A partial entry (a hash) keeps the version in its attribute's field.
    await redis_client.delete(entry)
    await redis_client.hset(entry, mapping={M_FORMAT: b"3", b"v": _codec.encode(Decimal(9))})
    assert not await store.write_through(entry, lease, b"v", "9", 600_000, newer)
    assert await store.write_through(entry, lease, b"v", "10", 600_000, newer)
    assert await cached_v() == 10
