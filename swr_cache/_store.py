"""Every Redis command and Lua script swr_cache sends lives in this module (and ``_autobatch``).

``_autobatch`` is part of this layer: it packs the entry reads and the lease
script in RESP itself and sends them pipelined on the client's own
connections (``Store.read_entry`` with ``batch_reads``, ``Store.read_pipeline``).

The engine above speaks in entries, leases, fences and tags; this module turns
those into commands, normalises replies and decides what is cluster-safe:

* an item's entry, lease, fence and sequence keys share one hash tag, so each
  Lua script here touches a single slot;
* a tag's generation counter and member set share the tag's own slot, while the
  members (entry keys) live anywhere: purges delete them key by key through a
  pipeline, which redis-py groups by node on a cluster.

Entry layout (format 3): a Redis string for a whole item, a hash for the rest.

A *whole* item (or a not-found item) is a **string** at the entry key: a
small text header and the item as **one msgpack map**::

    b"3|<soft>|<hard>|<version>|<delta>|<kind>|<item version>|" + blob

    3              the codec format version (``_codec.FORMAT_VERSION``)
    soft, hard     deadlines, ms of Redis server time
    version        entry version (random), so a merge only lands on what it read
    delta          how long the load took, ms (empty when unknown; for XFetch)
    kind           ``w`` a whole item, ``n`` not found (negative, empty blob)
    item version   the item's ``version_attribute`` as canonical digits, or
                   empty: what the write-through script compares (it cannot
                   decode msgpack, so the number sits in the header). Only a
                   writer that knows the attribute writes it: an entry
                   written without one (a stream refresh, an accessor with no
                   ``version_attribute``) has none, and a write-through over
                   it invalidates instead (always safe)
    blob           msgpack of the attributes map, zlib-compressed (codec
                   extension 9) above ``compress_threshold``

With a signing key the string ends with a 32-byte HMAC (``_signing``). Above
this module, fills hand a whole entry over as the one field ``M_ENTRY``
(``\\xffe``) of their field mapping; ``_with_entry`` turns it into the string
the scripts ``SET`` (``write_entry``: ``SET key value PX ms``, which replaces a
key of any type).

A whole read is ``GET key`` (``WHOLE_FIELDS`` marks it): one bulk reply and
one msgpack call. A hash at the key answers WRONGTYPE; the store then asks
it ``HMGET key \\xffe \\xfff``, a second round trip on that (miss) path
only: ``\\xfff`` answers for a partial entry (a whole read of it is a
*partial miss*: the whole item is loaded and its string replaces the hash),
``\\xffe`` for a whole entry left by format 2 (a one-field hash: a counted
``decode_errors`` miss, reloaded and overwritten). A key of any other type is
a counted miss as well.

A *partial* entry (a projection) is a hash with one field per attribute,
since merges add attributes to it::

    \\xffs  soft deadline, ms of Redis server time
    \\xffh  hard deadline, ms of Redis server time
    \\xfff  codec format version
    \\xffa  msgpack list of attribute names known to be absent
    \\xffv  entry version (random)
    \\xffd  how long the load took, ms
    <name> one field per attribute, msgpack-encoded

A projection read sends ``GET key`` and ``HMGET key`` of ``ALL_META`` and the
attribute names together (one pipeline: one round trip; ``_autobatch`` packs
both into the same batch): a string answers the GET (the projection is picked
from its blob) and the HMGET fails WRONGTYPE; a hash answers the HMGET and the
GET fails; no key answers nil to both. ``ALL_META`` still begins with
``\\xffe`` so a format-2 hash is recognised. A merge (the projection fill of
a fresh partial entry) that finds a string where its hash was leaves it
alone: a whole entry already holds every attribute. A ``@cached`` result is a
hash: ``\\xffr`` plus ``\\xffs \\xffh \\xfff \\xffv \\xffd``, read with HMGET.
With a signing key a hash also carries ``\\xffg``, an HMAC of all of its other
fields (see ``_signing``), and a projection reads it with HGETALL (paired
with GET).

Why a string, not a one-field hash (format 2), for whole entries: measured
with ``MEMORY USAGE`` on redis-server 7.0 (``benchmarks/memory.py``, 1,000
~1 KB items), with the default ``hash-max-listpack-value`` (64 bytes) a
one-field hash whose value is longer is a hashtable and costs 1.12x the same
blob stored with ``SET`` (a constant ~120 bytes); the string costs 1.00x
(its header fits the blob's allocation class), whatever that setting. A
projection read then needs two commands (GET and HMGET) instead of one HMGET,
in the same round trip; the whole hit, the common one, parses one bulk reply
instead of an array of two. A read-only script (``EVALSHA_RO``) could answer
from either type in one command, but costs a script call on every projection
hit and needs Redis 7 on replicas; the pair needs nothing.

Metadata field names start with byte 0xFF, which never occurs in UTF-8, so no
DynamoDB attribute name (always valid UTF-8) can collide with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio
from redis.exceptions import NoScriptError, ResponseError

from ._autobatch import (
    WHOLE,
    RawPipeline,
    ReadBatcher,
    combine,
    is_pair,
    is_redirect,
    read_via_client,
)

__all__ = [
    "ALL_META",
    "M_ABSENT",
    "M_DELTA",
    "M_ENTRY",
    "M_FORMAT",
    "M_HARD",
    "M_NONE",
    "M_RESULT",
    "M_SOFT",
    "M_VERSION",
    "M_WHOLE",
    "WHOLE_FIELDS",
    "FillOutcome",
    "Script",
    "Store",
]

M_SOFT: Final = b"\xffs"
M_HARD: Final = b"\xffh"
M_FORMAT: Final = b"\xfff"
# Format 1 marked a whole item (\xffw) and a not-found one (\xffn) with fields of
# their own; format 2 says so in the entry header. Kept as the names
# ``_entry.expand`` gives those marks in its field view (CLI, checker).
M_WHOLE: Final = b"\xffw"
M_ABSENT: Final = b"\xffa"
M_NONE: Final = b"\xffn"
M_VERSION: Final = b"\xffv"
M_DELTA: Final = b"\xffd"
M_RESULT: Final = b"\xffr"
#: Format 2 kept a whole item's header and blob in this hash field; format 3
#: keeps them as a string. Still asked for, so an old entry is recognised (and
#: counted as undecodable), and still the name a whole entry's text goes by in
#: the field mappings fills hand to this module (``Store.fill`` writes it as
#: the string).
M_ENTRY: Final = b"\xffe"

#: A whole-item read: GET of the string entry. On WRONGTYPE (a hash is there)
#: these two fields are read from it: ``\xffe`` of a format-2 entry, or
#: ``\xfff`` of a partial one. The tuple itself is the marker (``is``).
WHOLE_FIELDS: Final = WHOLE
#: The fields a projection read asks for, in this order, before the attributes.
ALL_META: Final = (M_ENTRY, M_FORMAT, M_SOFT, M_HARD, M_ABSENT, M_VERSION, M_DELTA)

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

# ARGV[first] is 's' (the entry is the string ARGV[first + 1]) or 'h' (a hash
# of the field, value pairs after it). SET replaces a key of any type.
_WRITE_ENTRY = """
local function write_entry(key, first, ms)
  if ARGV[first] == 's' then
    redis.call('SET', key, ARGV[first + 1], 'PX', ms)
  else
    redis.call('DEL', key)
    hset_all(key, first + 1)
    redis.call('PEXPIRE', key, ms)
  end
end
"""

# A fence set by an invalidation always has a TTL; one without (set by hand,
# or left by a foreign writer) would refuse every fill for ever: it is
# nobody's, so it is deleted and does not count as a fence.
_FENCE_CHECK = """
local fence_repaired = 0
local function fenced(key)
  local t = redis.call('PTTL', key)
  if t == -1 then
    redis.call('DEL', key)
    fence_repaired = 100
    return false
  end
  return t ~= -2
end
"""

# KEYS: entry, lease, fence[, refresh back-off mark]. ARGV: token, pexpire ms,
# check fence (1/0), then the entry ('s', string or 'h', field, value, ...:
# see write_entry). A stored fill ends the back-off. 1 stored; 0 lease lost (invalidated or taken over); -1 fenced by a recent invalidation.
# A load that read consistently after taking its lease may skip the fence: the
# lease itself proves it began after any invalidation (which deletes leases).
_FILL = (
    _HSET_CHUNKED
    + _WRITE_ENTRY
    + _FENCE_CHECK
    + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[3] == '1' and fenced(KEYS[3]) then
  redis.call('DEL', KEYS[2])
  return -1
end
write_entry(KEYS[1], 4, ARGV[2])
redis.call('DEL', KEYS[2])
if KEYS[4] then redis.call('DEL', KEYS[4]) end
return 1 + fence_repaired
"""
)

# KEYS: entry, lease, fence[, back-off mark]. ARGV: token, expected version, check fence (1/0),
# item version attribute and its loaded value (both '' when unchecked), field, value, ...
# Adds fields to the hash it read, keeping its deadlines. 1 merged; 0 lease lost;
# -1 fenced; -2 the entry changed or vanished since it was read (a whole
# entry, a string, now stands there: it holds every attribute and is left
# alone); -3 the entry
# holds another version of the item than the load read (entry and lease deleted:
# it is older than the table, or the load is; either way not to be mixed).
_MERGE = (
    _HSET_CHUNKED
    + _FENCE_CHECK
    + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[3] == '1' and fenced(KEYS[3]) then
  redis.call('DEL', KEYS[2])
  return -1
end
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash'
    or redis.call('HGET', KEYS[1], '\\255v') ~= ARGV[2] then
  redis.call('DEL', KEYS[2])
  return -2
end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], ARGV[4]) ~= ARGV[5] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return -3
end
hset_all(KEYS[1], 6)
redis.call('DEL', KEYS[2])
if KEYS[4] then redis.call('DEL', KEYS[4]) end
return 1 + fence_repaired
"""
)

# KEYS: lease. ARGV: token, lease ms. Takes a free lease: 1 taken, 0 another
# holder has it, 2 taken over from a lease nobody can hold (no TTL, a TTL
# longer than any lease, or not a string): such a key never expires by
# itself and would keep the item uncacheable and slow for good.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
local t = redis.call('PTTL', KEYS[1])
if t == -1 or t > tonumber(ARGV[2]) or redis.call('TYPE', KEYS[1])['ok'] ~= 'string' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
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
# A key of another type where the set belongs cannot hold members (SADD would
# fail for ever): it is replaced, and the reply says so (1 repaired, else 0).
_ADD_MEMBER = """
local repaired = 0
local ty = redis.call('TYPE', KEYS[1])['ok']
if ty ~= 'set' and ty ~= 'none' then
  redis.call('DEL', KEYS[1])
  repaired = 1
end
redis.call('SADD', KEYS[1], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return repaired
"""


# KEYS: lease, refresh back-off mark. ARGV: token, back-off ms. A refresh
# failed: mark the item backed off (background refreshes everywhere skip it)
# and give the lease back, so foreground misses load at once.
_BACK_OFF = """
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


# KEYS: a tag's purge stamp. ARGV: pexpire ms. Sets it to the server's time
# in ms, never backwards. Fills compare their load's start with it. A key of
# another type (or a string that is no number) is replaced, not fatal.
# Reply: {stamp, 1 if the key was repaired else 0}.
_MARK_PURGED = """
local repaired = 0
local ty = redis.call('TYPE', KEYS[1])['ok']
local cur = 0
if ty == 'string' then
  cur = tonumber(redis.call('GET', KEYS[1]))
  if not cur then repaired = 1; cur = 0 end
elseif ty ~= 'none' then
  redis.call('DEL', KEYS[1])
  repaired = 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if cur < now then cur = now end
redis.call('SET', KEYS[1], string.format('%d', cur), 'PX', ARGV[1])
return {cur, repaired}
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


class LeaseOutcome:
    """Reply codes of the lease script."""

    HELD_ELSEWHERE: Final = 0
    TAKEN: Final = 1
    REPAIRED: Final = 2  # taken over from a lease key nobody can hold


class FillOutcome:
    """Reply codes of the fill and merge scripts."""

    STORED: Final = 1
    #: Stored after deleting a fence that had no TTL (nobody's): count, then treat as STORED.
    STORED_FENCE_REPAIRED: Final = 101
    LEASE_LOST: Final = 0
    FENCED: Final = -1
    CHANGED: Final = -2
    OUTDATED: Final = -3


_fill = Script(_FILL)
_merge = Script(_MERGE)
_acquire = Script(_ACQUIRE)
_renew = Script(_RENEW)
_release = Script(_RELEASE)
_add_member = Script(_ADD_MEMBER)
_mark_purged = Script(_MARK_PURGED)
_back_off = Script(_BACK_OFF)


def _with_fields(args: list[Any], fields: Mapping[bytes, bytes]) -> list[Any]:
    """A script's leading arguments, then ``field, value, ...`` (what ``hset_all`` reads)."""
    for item in fields.items():
        args.extend(item)
    return args


def _with_entry(
    args: list[Any], entry_key: str, fields: Mapping[bytes, bytes], signer: Any
) -> list[Any]:
    """A script's leading arguments, then the entry as ``write_entry`` reads it.

    A whole entry (``M_ENTRY`` in ``fields``) is ``'s'`` and the string (its
    signature appended with a signer); any other entry ``'h'`` and its
    fields (with a signature field with a signer).
    """
    whole = fields.get(M_ENTRY)
    if whole is not None:
        args += (b"s", whole if signer is None else signer.signed_string(entry_key, whole))
        return args
    if signer is not None:
        fields = signer.signed(entry_key, fields)
    args.append(b"h")
    return _with_fields(args, fields)


def queue_acquire(pipe: Any, lease_key: str, token: str, lease_ms: int, sha: str | None) -> None:
    """Queue the lease script on a pipeline (EVAL when ``sha`` is ``None``).

    A raw command: redis-py's cluster pipeline routes it by its first key.
    """
    if sha is None:
        pipe.execute_command("EVAL", _ACQUIRE, 1, lease_key, token, lease_ms)
    else:
        pipe.execute_command("EVALSHA", sha, 1, lease_key, token, lease_ms)


def _reads_like_redis_py(connection_class: Any) -> bool:
    """Whether a connection class reads replies as redis-py's own connections do."""
    from redis.asyncio.connection import Connection

    return (
        isinstance(connection_class, type)
        and issubclass(connection_class, Connection)
        and connection_class.read_response is Connection.read_response
    )


class EntryPipeline:
    """A pipeline of entry reads and lease scripts, one reply per queued operation.

    An entry read queues one command (``GET`` for a whole item, HMGET for a
    result) or two (``GET`` and the hash read of an item projection, see
    ``_autobatch.is_pair``) and answers with one ``combine``d reply. A whole
    read that found a hash (WRONGTYPE) is answered by HMGET of
    ``WHOLE_FIELDS`` from it, in one more pipeline for all such reads.
    """

    __slots__ = ("client", "ops", "pipe")

    def __init__(self, client: Any, pipe: Any) -> None:
        self.client = client
        self.pipe = pipe
        self.ops: list[tuple[str | None, Any, int]] = []

    def read(self, key: str, fields: Sequence[bytes] | None) -> None:
        """Queue an entry read (see ``Store.read_entry`` for its reply)."""
        pipe = self.pipe
        if fields is WHOLE_FIELDS:
            pipe.get(key)
            self.ops.append((key, fields, 1))
            return
        if not is_pair(fields):
            pipe.hmget(key, fields)
            self.ops.append((key, fields, 1))
            return
        pipe.get(key)
        if fields is None:
            pipe.hgetall(key)
        else:
            pipe.hmget(key, fields)
        self.ops.append((key, fields, 2))

    def read_wholes(self, keys: Sequence[str], one_node: bool) -> None:
        """Queue whole reads of many keys: one reply per key (see ``read``).

        ``one_node`` (a standalone server): one MGET, so a key holding a hash
        (a partial or older entry) reads as absent; its loader's lease
        re-read (``read``) sees what it is. Else a GET per key.
        """
        if one_node and keys:
            self.pipe.execute_command("MGET", *keys)
            self.ops.append((None, keys, 0))
            return
        for key in keys:
            self.read(key, WHOLE_FIELDS)

    def acquire(self, lease_key: str, token: str, lease_ms: int, sha: str | None = None) -> None:
        """Queue the lease script (EVAL when ``sha`` is ``None``)."""
        queue_acquire(self.pipe, lease_key, token, lease_ms, sha)
        self.ops.append((None, None, 1))

    def pttl(self, key: str) -> None:
        self.pipe.pttl(key)
        self.ops.append((None, None, 1))

    async def execute(self, raise_on_error: bool = False) -> list[Any]:
        """Replies in order, error replies as exceptions in place (``raise_on_error`` is ignored)."""
        replies: list[Any] = await self.pipe.execute(raise_on_error=False)
        out: list[Any] = []
        probes: list[int] = []
        i = 0
        for key, fields, n in self.ops:
            if n == 0:  # MGET: its reply (or its error) for each key
                reply = replies[i]
                out.extend(reply if type(reply) is list else [reply] * len(fields))
                i += 1
                continue
            reply = replies[i] if n == 1 else combine(fields, replies[i], replies[i + 1])
            i += n
            if key is not None and fields is WHOLE_FIELDS and is_wrongtype(reply):
                probes.append(len(out))
            out.append(reply)
        if probes:
            pipe = self.client.pipeline(transaction=False)
            for j in probes:
                pipe.hmget(self.ops[j][0], WHOLE_FIELDS)
            for j, reply in zip(probes, await pipe.execute(raise_on_error=False), strict=True):
                out[j] = reply
        return out


def is_wrongtype(exc: Any) -> bool:
    """True for Redis' WRONGTYPE reply: a key of ours holds another type."""
    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


class _TagCommands:
    """The tag commands of ``Store`` (purge stamps and member sets; a base class of it)."""

    __slots__ = ()
    client: Any

    if TYPE_CHECKING:

        async def delete(self, *keys: str) -> None: ...

    async def tag_generations(
        self, gen_keys: Sequence[str], expire_ms: int
    ) -> tuple[list[float | None], int]:
        """When each tag was last purged, ms of server time (``None``: never, or long ago).

        A stamp key that is broken (another type, not a number) cannot say
        when its tag was purged: it is re-stamped now, as a purge would, so
        the caller's load counts as raced once and the next one is stored.
        Returns the stamps and how many keys were repaired.
        """
        if not gen_keys:
            return [], 0
        pipe = self.client.pipeline(transaction=False)
        for key in gen_keys:
            pipe.get(key)
        replies = await pipe.execute(raise_on_error=False)
        stamps: list[float | None] = []
        broken: list[int] = []
        for i, reply in enumerate(replies):
            if isinstance(reply, BaseException):
                if not is_wrongtype(reply):
                    raise reply
                broken.append(i)
                stamps.append(None)
                continue
            try:
                stamps.append(None if reply is None else float(reply))
            except ValueError:
                broken.append(i)
                stamps.append(None)
        if broken:
            marked, _ = await self.mark_purged([gen_keys[i] for i in broken], expire_ms)
            for i, stamp in zip(broken, marked, strict=True):
                stamps[i] = stamp
        return stamps, len(broken)

    async def add_tag_members(
        self, member_keys: Sequence[str], entry_key: str, expire_ms: int
    ) -> int:
        """Record ``entry_key`` in each tag's member set; how many sets were repaired."""
        calls = [((key,), (entry_key, expire_ms)) for key in member_keys]
        return sum(int(r) for r in await _run_each(self.client, _add_member, calls))

    async def mark_purged(self, gen_keys: Sequence[str], expire_ms: int) -> tuple[list[float], int]:
        """Stamp each tag with the Redis server time of this purge (kept ``expire_ms``).

        Returns the stamps and how many stamp keys were broken and replaced.
        """
        calls = [((key,), (expire_ms,)) for key in gen_keys]
        replies = await _run_each(self.client, _mark_purged, calls)
        return [float(r[0]) for r in replies], sum(int(r[1]) for r in replies)

    async def tag_members(self, member_keys: Sequence[str]) -> tuple[list[set[bytes]], int]:
        """SMEMBERS of each member set, and how many member keys were repaired.

        A member key of another type holds no members we could read: it is
        deleted (the next fill with the tag recreates it) rather than failing
        every purge of the tag.
        """
        pipe = self.client.pipeline(transaction=False)
        for key in member_keys:
            pipe.smembers(key)
        replies = await pipe.execute(raise_on_error=False)
        out: list[set[bytes]] = []
        broken: list[str] = []
        for key, reply in zip(member_keys, replies, strict=True):
            if isinstance(reply, BaseException):
                if not is_wrongtype(reply):
                    raise reply
                broken.append(key)
                reply = set()
            out.append(reply)
        if broken:
            await self.delete(*broken)
        return out, len(broken)

    async def remove_tag_members(
        self, member_keys: Sequence[str], member_sets: Sequence[set[bytes]]
    ) -> None:
        """SREM what a purge read from each member set (members added since stay)."""
        pipe = self.client.pipeline(transaction=False)
        for key, members in zip(member_keys, member_sets, strict=True):
            if members:
                pipe.srem(key, *members)
        await pipe.execute()

    # -- DynamoDB Streams (Lua below) -------------------------------------------


class Store(_TagCommands):
    """Entry-level operations over a ``redis.asyncio`` client (standalone or cluster)."""

    __slots__ = ("_direct_pool", "batcher", "client", "is_cluster", "signer")

    def __init__(self, client: Any, direct_reads: bool = True, batch_reads: bool = True) -> None:
        self.client = client
        # A ``_signing.Signer`` when the cache has a signing key: every whole
        # entry written below (fill, stream put, write-through) is signed.
        self.signer: Any = None
        self.is_cluster = hasattr(client, "get_nodes")
        # Entry reads may take a pooled connection themselves: redis-py's
        # per-command wrapper (retry closure, observability hooks, response
        # callback) costs about as much again as parsing the reply. Only for a
        # plain pooled client; a single-connection client keeps the normal
        # command path.
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
        # Concurrent entry reads share pipelines (``_autobatch``): on the
        # direct path's pool, or on a cluster's node connections.
        # A batch writes raw commands to redis-py's stream writer and reads with
        # its parser: not for connection classes that read replies their own
        # way (an in-process fake server, say), which keep the direct path.
        self.batcher: ReadBatcher | None = None
        own_replies = usable and _reads_like_redis_py(getattr(pool, "connection_class", None))
        if batch_reads and (
            own_replies or (self.is_cluster and hasattr(client, "get_node_from_key"))
        ):
            self.batcher = ReadBatcher(client, pool, self.is_cluster)

    # -- reads ---------------------------------------------------------------

    async def read_entry(self, key: str, fields: Sequence[bytes] | None) -> Any:
        """One entry's raw reply, for ``_entry``'s parsers.

        ``WHOLE_FIELDS`` (a whole item): GET, so the string entry (bytes) or
        ``None``; where a hash is (WRONGTYPE: a partial entry, or a format-2
        one) the HMGET of ``WHOLE_FIELDS`` from it, a list. An item projection
        (``ALL_META`` + names, or ``None`` for HGETALL of a signed one): GET and
        the hash read in one round trip, so the string entry (bytes) or the
        hash read's reply (a list, or a dict for HGETALL; all ``None`` or empty
        for no key). A result: HMGET of ``fields``, a list. HMGET's reply is an
        array in RESP2 and RESP3 alike.

        Raises redis-py's errors (``ResponseError`` for WRONGTYPE where no
        reading of the type is possible, ``ConnectionError``,
        ``TimeoutError``) and ``_autobatch.ReadAgain`` (the pipeline this read
        joined lost its reader: read again); a connection that failed
        mid-command is disconnected before it returns to the pool.
        """
        batcher = self.batcher
        if batcher is not None:
            raw = await batcher.read(key, fields)
            if isinstance(raw, ResponseError):
                if is_redirect(raw):  # a cluster resharding: the client follows it
                    raw = await read_via_client(self.client, key, fields)
                    if not isinstance(raw, ResponseError):
                        return raw
                return await self._read_failed(key, fields, raw)
            return raw
        pool = self._direct_pool
        if pool is None or (fields is not WHOLE_FIELDS and is_pair(fields)):
            raw = await read_via_client(self.client, key, fields)
            if isinstance(raw, ResponseError):
                return await self._read_failed(key, fields, raw)
            return raw
        try:
            conn = await pool.get_connection()
        except TypeError:  # redis-py < 5.3 wants a command name: use the normal path
            self._direct_pool = None
            return await self.read_entry(key, fields)
        try:
            if fields is WHOLE_FIELDS:
                await conn.send_command("GET", key)
            else:
                await conn.send_command("HMGET", key, *fields)  # type: ignore[misc]
            raw = await conn.read_response()
        except ResponseError as exc:  # an error reply, read whole: the connection is in step
            await pool.release(conn)
            return await self._read_failed(key, fields, exc)
        except BaseException:
            # (redis-py closed the connection if a reply may be left unread.)
            # Shielded: a cancel scope that re-raises at every await must not
            # keep the connection from going back, or the pool shrinks for good.
            with anyio.CancelScope(shield=True):
                await pool.release(conn)
            raise
        await pool.release(conn)
        return raw

    async def _read_failed(
        self, key: str, fields: Sequence[bytes] | None, exc: ResponseError
    ) -> Any:
        """An error reply to an entry read: a whole read that hit a hash asks the hash; else raise."""
        if fields is WHOLE_FIELDS and is_wrongtype(exc):
            return await self.client.hmget(key, WHOLE_FIELDS)
        raise exc

    async def read_all(self, key: str) -> Any:
        """A signed item projection's read: the string entry (bytes) or the hash (a dict)."""
        return await self.read_entry(key, None)

    async def read_fields(self, key: str, fields: Sequence[bytes]) -> Any:
        """HMGET of one entry's metadata and the given fields (or the string entry, bytes)."""
        return await self.read_entry(key, fields)

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
        backoff_key: str | None = None,
    ) -> tuple[int, Any, int]:
        """Try to take the lease (a :class:`LeaseOutcome`) and re-read the entry in one round trip.

        The re-read closes the race where another process filled the entry
        between our miss and our lease attempt. Every key shares a slot, so the
        pipeline goes to one node. The entry's reply is ``read_entry``'s; a
        WRONGTYPE entry (a key of a type no read can take) reads as ``None``. With
        ``backoff_key`` (background refreshes), the third value is the ms left
        of the item's refresh back-off (0: none).
        """
        replies = await self._acquire_pipeline(
            lease_key, token, lease_ms, entry_key, fields, backoff_key, _acquire.sha
        )
        if isinstance(replies[-2], NoScriptError):  # a restarted server: EVAL caches it again
            replies = await self._acquire_pipeline(
                lease_key, token, lease_ms, entry_key, fields, backoff_key, None
            )
        backoff_left = 0
        if backoff_key is not None:
            left = replies.pop(0)
            backoff_left = left if type(left) is int and left > 0 else 0
        got, current = replies
        if isinstance(got, BaseException):
            raise got
        if isinstance(current, BaseException):
            if not is_wrongtype(current):
                raise current
            current = None
        return int(got), current, backoff_left

    async def _acquire_pipeline(
        self,
        lease_key: str,
        token: str,
        lease_ms: int,
        entry_key: str,
        fields: Sequence[bytes] | None,
        backoff_key: str | None,
        sha: str | None,
    ) -> list[Any]:
        pipe = EntryPipeline(self.client, self.client.pipeline(transaction=False))
        if backoff_key is not None:
            pipe.pttl(backoff_key)
        pipe.acquire(lease_key, token, lease_ms, sha)
        pipe.read(entry_key, fields)
        return await pipe.execute()

    async def acquire(self, lease_key: str, token: str, lease_ms: int) -> int:
        """Take a lease (a :class:`LeaseOutcome` code)."""
        return int(await _acquire(self.client, (lease_key,), (token, lease_ms)))

    async def renew_lease(self, lease_key: str, token: str, lease_ms: int) -> bool:
        return bool(await _renew(self.client, (lease_key,), (token, lease_ms)))

    async def release_lease(self, lease_key: str, token: str) -> bool:
        return bool(await _release(self.client, (lease_key,), (token,)))

    async def release_leases(self, held: Mapping[str, str]) -> None:
        """Release many leases (``lease key -> token``) that may still be ours, in one pipeline."""
        calls = [((lease,), (token,)) for lease, token in held.items()]
        await _run_script_many(self.client, _release, calls)

    async def back_off(self, lease_key: str, backoff_key: str, token: str, backoff_ms: int) -> None:
        """Mark an item's refreshes backed off for ``backoff_ms`` and give back our lease."""
        await _back_off(self.client, (lease_key, backoff_key), (token, backoff_ms))

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
        backoff_key: str | None = None,
    ) -> int:
        """Replace the entry with ``mapping`` if our lease is valid and no fence stands.

        A stored fill also ends the item's refresh back-off (``backoff_key``).
        """
        args = _with_entry(
            [token, expire_ms, b"1" if check_fence else b"0"], entry_key, mapping, self.signer
        )
        keys = (entry_key, lease_key, fence_key) + (() if backoff_key is None else (backoff_key,))
        return int(await _fill(self.client, keys, args))

    async def merge(
        self,
        entry_key: str,
        lease_key: str,
        fence_key: str,
        token: str,
        version: bytes,
        mapping: Mapping[bytes, bytes],
        check_fence: bool = True,
        item_version: tuple[bytes, bytes] | None = None,
        backoff_key: str | None = None,
    ) -> int:
        """Add fields to the entry version we read, if our lease is valid and no fence stands.

        ``item_version`` is ``(field, loaded value)`` of the item's own version
        attribute: the merge happens only if the entry holds the same value.
        """
        name, value = item_version if item_version is not None else (b"", b"")
        args = _with_fields([token, version, b"1" if check_fence else b"0", name, value], mapping)
        keys = (entry_key, lease_key, fence_key) + (() if backoff_key is None else (backoff_key,))
        return int(await _merge(self.client, keys, args))

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

    async def stream_put_many(
        self,
        puts: Sequence[
            tuple[tuple[str, str, str, str], str, int, int, bytes, Mapping[bytes, bytes]]
        ],
    ) -> list[int | BaseException]:
        """Apply refresh-mode records in one pipeline, each guarded by its sequence number.

        Each put is ``((entry, lease, fence, seq_key), sequence, seq_ttl_ms,
        expire_ms, op, fields)`` with ``op`` ``b"w"`` (write ``fields`` as the
        entry) or ``b"d"`` (delete the entry). Replies are :class:`StreamPut`
        codes, or the error of that one call. Raises when the pipeline itself
        fails (connection lost, timeout).
        """
        calls: list[tuple[Sequence[str], Sequence[Any]]] = []
        for keys, sequence, seq_ttl_ms, expire_ms, op, fields in puts:
            args: list[Any] = [sequence, seq_ttl_ms, expire_ms, op]
            if op == b"w":
                args = _with_entry(args, keys[0], fields, self.signer)
            calls.append((keys, args))
        replies = await _run_script_many(self.client, _stream_put, calls)
        return [r if isinstance(r, BaseException) else int(r) for r in replies]

    async def claim_shard(self, lease_key: str, token: str, lease_ms: int) -> bool:
        """Take a free shard lease or renew ours; ``False`` when another consumer holds it."""
        return bool(await _claim(self.client, (lease_key,), (token, lease_ms)))

    async def write_checkpoint(
        self,
        checkpoint_key: str,
        lease_key: str,
        token: str,
        value: str,
        ttl_ms: int,
        lease_ms: int,
    ) -> bool:
        """Store a shard's checkpoint if we still hold its lease (renewing it)."""
        return bool(
            await _checkpoint(
                self.client, (checkpoint_key, lease_key), (token, value, ttl_ms, lease_ms)
            )
        )

    async def get_value(self, key: str) -> bytes | None:
        """A plain string key's value (GET)."""
        value: bytes | None = await self.client.get(key)
        return value

    async def set_value(self, key: str, value: bytes, expire_ms: int) -> None:
        """Set a plain string key with a lifetime (SET PX)."""
        await self.client.set(key, value, px=expire_ms)

    async def describe(self, entry: str, lease: str, fence: str) -> list[Any]:
        """For the CLI: an entry (the string, bytes, or the hash's fields, a dict), its lease's and fence's PTTL, and its type."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(entry)
        pipe.hgetall(entry)
        pipe.pttl(lease)
        pipe.pttl(fence)
        pipe.type(entry)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        got, fields = replies[:2]
        if isinstance(got, ResponseError) and isinstance(fields, ResponseError):
            raw: Any = fields  # neither a string nor a hash
        else:
            raw = combine(None, got, fields)
            if raw is None:
                raw = {}
        return [raw, *replies[2:]]

    async def scan(self, cursor: int, match: str, count: int) -> tuple[int, list[bytes]]:
        """One SCAN step (on a cluster, redis-py walks every node)."""
        cursor_out, keys = await self.client.scan(cursor, match=match, count=count)
        return int(cursor_out), list(keys)

    async def read_field_lists(self, keys: Sequence[str], fields: Sequence[bytes]) -> list[Any]:
        """Per key, the string entry (bytes) or HMGET of ``fields`` from its hash, in one pipeline (errors as replies)."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
            pipe.hmget(key, fields)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return [combine(fields, replies[i], replies[i + 1]) for i in range(0, len(replies), 2)]

    def pipeline(self) -> Any:
        """A non-transactional pipeline (grouped by node on a cluster)."""
        return self.client.pipeline(transaction=False)

    def read_pipeline(self) -> EntryPipeline:
        """A pipeline of entry reads and lease scripts (``EntryPipeline``).

        Packed by hand and sent on one connection per node (``_autobatch.RawPipeline``)
        where reads are batched; else redis-py's pipeline.
        """
        if self.batcher is not None:
            return EntryPipeline(self.client, RawPipeline(self.batcher))
        return EntryPipeline(self.client, self.pipeline())

    async def pttl(self, key: str) -> int:
        """Milliseconds ``key`` has left (-2: absent, -1: no TTL)."""
        return int(await self.client.pttl(key))

    async def field_names(self, key: str) -> list[bytes] | None:
        """The field names of the hash at ``key`` (HKEYS); ``None`` when a whole entry (a string) is there."""
        try:
            return list(await self.client.hkeys(key))
        except ResponseError as exc:
            if is_wrongtype(exc):
                return None
            raise

    async def read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """GET of each key (checkpoints, tag purge stamps), in one pipeline."""
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        reply: list[bytes | None] = await pipe.execute()
        return reply

    # -- DynamoTable write-through (Lua at the end of this module) -------------------

    async def write_through(
        self,
        entry_key: str,
        lease_key: str,
        version_field: bytes,
        version: str,
        expire_ms: int,
        mapping: Mapping[bytes, bytes],
    ) -> bool:
        """Replace the entry with a just-written item if its version is newer than the cached one.

        ``version`` is the new item's version as canonical digits (a
        non-negative integer). Only an existing entry whose ``version_field``
        holds a smaller integer is replaced; the lease goes with it, so a load
        in flight cannot fill over the new item. ``False`` means nothing was
        written: the caller invalidates instead.
        """
        args = _with_entry([version_field, version, expire_ms], entry_key, mapping, self.signer)
        return bool(await _write_through(self.client, (entry_key, lease_key), args))

    async def fill_many(
        self,
        fills: Sequence[tuple[str, str, str, str, int, Mapping[bytes, bytes], bool]],
    ) -> list[int | BaseException]:
        """Many :meth:`fill` calls in one pipeline (grouped by node on a cluster).

        Each fill is ``(entry, lease, fence, token, pexpire ms, fields,
        check_fence)``. Replies are :class:`FillOutcome` codes, or the error
        of that one call. Raises when the pipeline itself fails.
        """
        calls: list[tuple[Sequence[str], Sequence[Any]]] = []
        for entry_key, lease_key, fence_key, token, expire_ms, mapping, check_fence in fills:
            args = _with_entry(
                [token, expire_ms, b"1" if check_fence else b"0"], entry_key, mapping, self.signer
            )
            calls.append(((entry_key, lease_key, fence_key), args))
        replies = await _run_script_many(self.client, _fill, calls)
        return [r if isinstance(r, BaseException) else int(r) for r in replies]


# -- DynamoDB Streams ------------------------------------------------------------

# Stream sequence numbers are decimal strings of up to 40 digits: compared as
# big integers (length, then digit by digit), never through Lua's doubles.
_SEQ_NEWER = """
local function seq_newer(a, b)
  if #a ~= #b then return #a > #b end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return false
end
"""

# KEYS: entry, lease, fence, sequence high-water. ARGV: sequence number,
# high-water pexpire ms, entry pexpire ms, op ('w' write the entry, 'd'
# delete it), then the entry as write_entry reads it.
# 0 the record is not newer than the high-water (nothing changed); 1 written;
# 2 a fence stands (an invalidation just happened, and this record may predate
# its write): the entry was deleted instead; 3 deleted (op 'd').
# The lease goes in every applied case, so a load in flight cannot fill over
# the record.
_STREAM_PUT = (
    _HSET_CHUNKED
    + _WRITE_ENTRY
    + _SEQ_NEWER
    + _FENCE_CHECK
    + """
local cur = redis.call('GET', KEYS[4])
if cur and not seq_newer(ARGV[1], cur) then return 0 end
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('DEL', KEYS[1])
if ARGV[4] ~= 'w' then return 3 end
if fenced(KEYS[3]) then return 2 end
write_entry(KEYS[1], 5, ARGV[3])
return 1
"""
)

# KEYS: shard lease. ARGV: token, pexpire ms. Takes a free lease or renews
# our own; 1 held, 0 another consumer holds it.
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: shard checkpoint, shard lease (one slot: both are tagged by the stream).
# ARGV: token, checkpoint value, checkpoint pexpire ms, lease pexpire ms.
# Writes only while we hold the lease (so a consumer that lost its shard
# cannot move the checkpoint), and renews the lease. 1 written, 0 lease lost.
_CHECKPOINT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

_stream_put = Script(_STREAM_PUT)
_claim = Script(_CLAIM)
_checkpoint = Script(_CHECKPOINT)


class StreamPut:
    """Reply codes of :meth:`Store.stream_put_many`."""

    SUPERSEDED: Final = 0
    WRITTEN: Final = 1
    FENCED: Final = 2
    DELETED: Final = 3


async def _run_each(
    client: Any, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
) -> list[Any]:
    """Run one script per call, raising the first error: one call alone, more in one pipeline.

    Returns the replies in order. (NOSCRIPT after a restart is then retried
    as one pipeline of EVALs, not a round trip per call.)
    """
    if len(calls) == 1:
        ((keys, args),) = calls
        return [await script(client, keys, args)]
    results = await _run_script_many(client, script, calls)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


async def _run_script_many(
    client: Any, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
) -> list[Any]:
    """Run one script many times in one pipeline, in order; replies or exceptions.

    A node that has not cached the script (first use, or after a restart)
    answers NOSCRIPT to every call of it in the pipeline; those calls go again,
    in their original order, in a second pipeline of EVALs, which also caches
    the script. Per-key order is kept: every call for one key is on one node.
    """
    if not calls:
        return []
    pipe = client.pipeline(transaction=False)
    for keys, args in calls:
        # Raw commands: redis-py's cluster pipeline blocks its evalsha() method
        # but routes a raw EVALSHA by its first key like any keyed command.
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    results: list[Any] = await pipe.execute(raise_on_error=False)
    again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if again:
        pipe = client.pipeline(transaction=False)
        for i in again:
            keys, args = calls[i]
            pipe.execute_command("EVAL", script.source, len(keys), *keys, *args)
        for i, result in zip(again, await pipe.execute(raise_on_error=False), strict=True):
            results[i] = result
    return results


# -- DynamoTable write-through ------------------------------------------------------

# KEYS: entry, lease. ARGV: version attribute (field name), new version
# (canonical digits), pexpire ms, then the entry as write_entry reads it.
# 1 replaced; 0 untouched: no entry, a negative or partial entry without the
# version, a version that is not a plain non-negative integer, or one not
# smaller than the new one. A whole entry (a string) carries the version as
# digits in its header (format|soft|hard|version|delta|kind|item version|blob);
# a partial one (a hash) in the attribute's field, as a msgpack Decimal
# (extension type 1 holding its text). Compared as big integers (length,
# then digits), never through Lua's doubles.
_WRITE_THROUGH = (
    _HSET_CHUNKED
    + _WRITE_ENTRY
    + """
local function cached_version(raw)
  if not raw then return nil end
  local b = string.byte(raw, 1)
  local text
  if b == nil then return nil end
  if b <= 0x7f then
    text = tostring(b)
  else
    local n, start
    if b == 0xd4 then n, start = 1, 3
    elseif b == 0xd5 then n, start = 2, 3
    elseif b == 0xd6 then n, start = 4, 3
    elseif b == 0xd7 then n, start = 8, 3
    elseif b == 0xd8 then n, start = 16, 3
    elseif b == 0xc7 then n, start = string.byte(raw, 2), 4
    else return nil end
    if n == nil or #raw ~= start + n - 1 then return nil end
    if string.byte(raw, start - 1) ~= 1 then return nil end
    text = string.sub(raw, start)
  end
  if not string.find(text, '^%d+$') then return nil end
  text = string.gsub(text, '^0+', '')
  if text == '' then text = '0' end
  return text
end
local cur
local ty = redis.call('TYPE', KEYS[1])['ok']
if ty == 'string' then
  cur = string.match(redis.call('GET', KEYS[1]), '^3|[^|]*|[^|]*|[^|]*|[^|]*|w|(%d+)|')
  if cur then
    cur = string.gsub(cur, '^0+', '')
    if cur == '' then cur = '0' end
  end
elseif ty == 'hash' and not redis.call('HGET', KEYS[1], '\\255e') then
  cur = cached_version(redis.call('HGET', KEYS[1], ARGV[1]))
end
if not cur then return 0 end
local new = ARGV[2]
if #new < #cur or (#new == #cur and new <= cur) then return 0 end
redis.call('DEL', KEYS[2])
write_entry(KEYS[1], 4, ARGV[3])
return 1
"""
)

_write_through = Script(_WRITE_THROUGH)
