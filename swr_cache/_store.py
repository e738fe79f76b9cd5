"""Every Redis command and Lua script swr_cache sends lives in this module.

The engine above speaks in entries, leases, fences and tags; this module turns
those into commands, normalises replies and decides what is cluster-safe:

* an item's entry, lease, fence and sequence keys share one hash tag, so each
  Lua script here touches a single slot;
* a tag's generation counter and member set share the tag's own slot, while the
  members (entry keys) live anywhere: purges delete them key by key through a
  pipeline, which redis-py groups by node on a cluster.

Entry layout (one Redis hash per item or result)::

    \\xffs  soft deadline, ms of Redis server time
    \\xffh  hard deadline, ms of Redis server time
    \\xfff  codec format version
    \\xffw  b"1" when the hash holds the whole item
    \\xffa  msgpack list of attribute names known to be absent
    \\xffn  b"1" for a not-found (negative) entry
    \\xffv  entry version (random), so a merge only lands on the hash it read
    \\xffd  how long the load took, ms (for probabilistic early refresh)
    \\xffr  the value of a ``@cached`` result
    <name> one field per item attribute, msgpack-encoded

Metadata field names start with byte 0xFF, which never occurs in UTF-8, so no
DynamoDB attribute name (always valid UTF-8) can collide with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from redis.exceptions import NoScriptError, ResponseError

__all__ = [
    "ALL_META",
    "M_ABSENT",
    "M_DELTA",
    "M_FORMAT",
    "M_HARD",
    "M_NONE",
    "M_RESULT",
    "M_SOFT",
    "M_VERSION",
    "M_WHOLE",
    "FillOutcome",
    "Script",
    "Store",
]

M_SOFT: Final = b"\xffs"
M_HARD: Final = b"\xffh"
M_FORMAT: Final = b"\xfff"
M_WHOLE: Final = b"\xffw"
M_ABSENT: Final = b"\xffa"
M_NONE: Final = b"\xffn"
M_VERSION: Final = b"\xffv"
M_DELTA: Final = b"\xffd"
M_RESULT: Final = b"\xffr"

#: The metadata fields a projection read asks for, in this order, before the attributes.
ALL_META: Final = (M_SOFT, M_HARD, M_FORMAT, M_WHOLE, M_ABSENT, M_NONE, M_VERSION, M_DELTA)

# HSET in slices so a wide item never overflows Lua's C stack with unpack().
_HSET_CHUNKED = """
local function hset_all(key, first)
  local n = #ARGV
  local i = first
  while i <= n do
    local j = math.min(i + 999, n)
    redis.call('HSET', key, unpack(ARGV, i, j))
    i = j + 1
  end
end
"""

# KEYS: entry, lease, fence. ARGV: token, pexpire ms, check fence (1/0), field, value, ...
# 1 stored; 0 lease lost (invalidated or taken over); -1 fenced by a recent invalidation.
# A load that read consistently after taking its lease may skip the fence: the
# lease itself proves it began after any invalidation (which deletes leases).
_FILL = _HSET_CHUNKED + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('DEL', KEYS[2])
  return -1
end
redis.call('DEL', KEYS[1])
hset_all(KEYS[1], 4)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: entry, lease, fence. ARGV: token, expected version, check fence (1/0), field, value, ...
# Adds fields to the hash it read, keeping its deadlines. 1 merged; 0 lease lost;
# -1 fenced; -2 the entry changed or vanished since it was read.
_MERGE = _HSET_CHUNKED + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('DEL', KEYS[2])
  return -1
end
if redis.call('HGET', KEYS[1], '\\255v') ~= ARGV[2] then
  redis.call('DEL', KEYS[2])
  return -2
end
hset_all(KEYS[1], 4)
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: lease. ARGV: token, pexpire ms. Renews a lease this process still holds.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease. ARGV: token. Deletes a lease only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: member set. ARGV: member, pexpire ms. Adds a member and stretches the
# set's TTL so it outlives its longest-lived member.
_ADD_MEMBER = """
redis.call('SADD', KEYS[1], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


# KEYS: a tag's purge stamp. ARGV: pexpire ms. Sets it to the server's time
# in ms, never backwards. Fills compare their load's start with it.
_MARK_PURGED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if cur < now then cur = now end
redis.call('SET', KEYS[1], string.format('%d', cur), 'PX', ARGV[1])
return cur
"""


class Script:
    """A Lua script run by SHA, loaded on first use or after a server restart."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        import hashlib

        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


class FillOutcome:
    """Reply codes of the fill and merge scripts."""

    STORED: Final = 1
    LEASE_LOST: Final = 0
    FENCED: Final = -1
    CHANGED: Final = -2


_fill = Script(_FILL)
_merge = Script(_MERGE)
_renew = Script(_RENEW)
_release = Script(_RELEASE)
_add_member = Script(_ADD_MEMBER)
_mark_purged = Script(_MARK_PURGED)


def is_wrongtype(exc: BaseException) -> bool:
    """True for Redis' WRONGTYPE reply: a key of ours holds another type."""
    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


class Store:
    """Entry-level operations over a ``redis.asyncio`` client (standalone or cluster)."""

    __slots__ = ("_direct_pool", "client", "is_cluster")

    def __init__(self, client: Any, direct_reads: bool = True) -> None:
        self.client = client
        self.is_cluster = hasattr(client, "get_nodes")
        # Entry reads may take a pooled connection themselves: redis-py's
        # per-command wrapper (retry closure, observability hooks, response
        # callback) costs about as much again as parsing the reply. Only for a
        # plain pooled client; a cluster or single-connection client keeps
        # the normal command path.
        pool = getattr(client, "connection_pool", None)
        usable = (
            direct_reads
            and not self.is_cluster
            and getattr(client, "connection", None) is None
            and not getattr(client, "single_connection_client", False)
            and pool is not None
            and hasattr(pool, "get_connection")
            and hasattr(pool, "release")
        )
        self._direct_pool = pool if usable else None

    # -- reads ---------------------------------------------------------------

    async def read_entry(self, key: str, fields: Sequence[bytes] | None) -> Any:
        """One entry: HGETALL as a dict (``fields is None``) or HMGET as a list.

        A missing key is an empty dict / a list of ``None``. Raises redis-py's
        errors (``ResponseError`` for WRONGTYPE, ``ConnectionError``,
        ``TimeoutError``); a connection that failed mid-command is closed by
        redis-py before it returns to the pool.
        """
        pool = self._direct_pool
        if pool is None:
            if fields is None:
                return await self.client.hgetall(key)
            return await self.client.hmget(key, fields)
        try:
            conn = await pool.get_connection()
        except TypeError:  # redis-py < 5.3 wants a command name: use the normal path
            self._direct_pool = None
            return await self.read_entry(key, fields)
        try:
            if fields is None:
                await conn.send_command("HGETALL", key)
            else:
                await conn.send_command("HMGET", key, *fields)
            raw = await conn.read_response()
        finally:
            await pool.release(conn)
        if fields is None and type(raw) is list:  # RESP2 gives pairs, RESP3 a map
            it = iter(raw)
            return dict(zip(it, it, strict=True))
        return raw

    async def read_all(self, key: str) -> dict[bytes, bytes]:
        """HGETALL of one entry (a missing key is an empty dict)."""
        reply: dict[bytes, bytes] = await self.read_entry(key, None)
        return reply

    async def read_fields(self, key: str, fields: Sequence[bytes]) -> list[bytes | None]:
        """HMGET of one entry's metadata and the given fields."""
        reply: list[bytes | None] = await self.read_entry(key, fields)
        return reply

    async def server_time_ms(self) -> float:
        """Redis server time in milliseconds (TIME)."""
        reply = await self.client.time()
        if isinstance(reply, dict):  # RedisCluster answers per node
            reply = next(iter(reply.values()))
        seconds, micros = reply
        return int(seconds) * 1000.0 + int(micros) / 1000.0

    # -- leases --------------------------------------------------------------

    async def acquire_and_read(
        self,
        lease_key: str,
        token: str,
        lease_ms: int,
        entry_key: str,
        fields: Sequence[bytes] | None,
    ) -> tuple[bool, dict[bytes, bytes] | list[bytes | None] | None]:
        """Try to take the lease and re-read the entry in one round trip.

        The re-read closes the race where another process filled the entry
        between our miss and our lease attempt. Both keys share a slot, so the
        pipeline goes to one node. A WRONGTYPE entry reads as ``None``.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.set(lease_key, token, nx=True, px=lease_ms)
        if fields is None:
            pipe.hgetall(entry_key)
        else:
            pipe.hmget(entry_key, fields)
        got, current = await pipe.execute(raise_on_error=False)
        if isinstance(got, BaseException):
            raise got
        if isinstance(current, BaseException):
            if not is_wrongtype(current):
                raise current
            current = None
        return bool(got), current

    async def renew_lease(self, lease_key: str, token: str, lease_ms: int) -> bool:
        return bool(await _renew(self.client, (lease_key,), (token, lease_ms)))

    async def release_lease(self, lease_key: str, token: str) -> bool:
        return bool(await _release(self.client, (lease_key,), (token,)))

    async def hold_lease(self, lease_key: str, token: str, hold_ms: int) -> bool:
        """Keep a lease we hold for ``hold_ms`` more: a failed refresh backs off everywhere."""
        return await self.renew_lease(lease_key, token, hold_ms)

    # -- writes ----------------------------------------------------------------

    async def fill(
        self,
        entry_key: str,
        lease_key: str,
        fence_key: str,
        token: str,
        expire_ms: int,
        mapping: Mapping[bytes, bytes],
        check_fence: bool = True,
    ) -> int:
        """Replace the entry with ``mapping`` if our lease is valid and no fence stands."""
        args: list[Any] = [token, expire_ms, b"1" if check_fence else b"0"]
        for field, value in mapping.items():
            args.append(field)
            args.append(value)
        return int(await _fill(self.client, (entry_key, lease_key, fence_key), args))

    async def merge(
        self,
        entry_key: str,
        lease_key: str,
        fence_key: str,
        token: str,
        version: bytes,
        mapping: Mapping[bytes, bytes],
        check_fence: bool = True,
    ) -> int:
        """Add fields to the entry version we read, if our lease is valid and no fence stands."""
        args: list[Any] = [token, version, b"1" if check_fence else b"0"]
        for field, value in mapping.items():
            args.append(field)
            args.append(value)
        return int(await _merge(self.client, (entry_key, lease_key, fence_key), args))

    async def delete(self, *keys: str) -> None:
        """Delete keys (one by one on a cluster: they may live in different slots)."""
        if not keys:
            return
        if len(keys) == 1 or not self.is_cluster:
            await self.client.delete(*keys)
            return
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)
        await pipe.execute()

    async def invalidate(
        self, items: Iterable[tuple[str, str, str]], fence_ms: int, extra: Iterable[str] = ()
    ) -> None:
        """Invalidate items given as ``(entry, lease, fence)`` key triples, in one pipeline.

        Order matters and needs no script: the fence goes up first (a fill
        arriving later is refused), then the lease goes (a load in flight can
        no longer fill), then the entry goes (a fill that landed before the
        fence is removed). Raises on any failure: invalidations fail loudly.
        """
        pipe = self.client.pipeline(transaction=False)
        count = 0
        for entry_key, lease_key, fence_key in items:
            if fence_ms > 0:
                pipe.set(fence_key, b"1", px=fence_ms)
            pipe.delete(lease_key)
            pipe.delete(entry_key)
            count += 1
        for key in extra:
            pipe.delete(key)
            count += 1
        if count:
            await pipe.execute()

    # -- tags ------------------------------------------------------------------

    async def tag_generations(self, gen_keys: Sequence[str]) -> list[bytes | None]:
        """When each tag was last purged, ms of server time (``None``: never, or long ago)."""
        if not gen_keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in gen_keys:
            pipe.get(key)
        reply: list[bytes | None] = await pipe.execute()
        return reply

    async def add_tag_members(
        self, member_keys: Sequence[str], entry_key: str, expire_ms: int
    ) -> None:
        """Record ``entry_key`` in each tag's member set."""
        if not member_keys:
            return
        if len(member_keys) == 1:
            await _add_member(self.client, (member_keys[0],), (entry_key, expire_ms))
            return
        pipe = self.client.pipeline(transaction=False)
        for key in member_keys:
            pipe.evalsha(_add_member.sha, 1, key, entry_key, expire_ms)
        results = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, NoScriptError) for r in results):
            for key in member_keys:
                await _add_member(self.client, (key,), (entry_key, expire_ms))
        else:
            for r in results:
                if isinstance(r, BaseException):
                    raise r

    async def mark_purged(self, gen_keys: Sequence[str], expire_ms: int) -> None:
        """Stamp each tag with the Redis server time of this purge (kept ``expire_ms``)."""
        if len(gen_keys) == 1:
            await _mark_purged(self.client, (gen_keys[0],), (expire_ms,))
            return
        pipe = self.client.pipeline(transaction=False)
        for key in gen_keys:
            pipe.evalsha(_mark_purged.sha, 1, key, expire_ms)
        results = await pipe.execute(raise_on_error=False)
        for key, result in zip(gen_keys, results, strict=True):
            if isinstance(result, NoScriptError):
                await _mark_purged(self.client, (key,), (expire_ms,))
            elif isinstance(result, BaseException):
                raise result

    async def tag_members(self, member_keys: Sequence[str]) -> list[set[bytes]]:
        """SMEMBERS of each member set."""
        pipe = self.client.pipeline(transaction=False)
        for key in member_keys:
            pipe.smembers(key)
        reply: list[set[bytes]] = await pipe.execute()
        return reply
