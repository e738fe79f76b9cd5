"""Pipelined entry reads on the user's own connections: part of the store layer (see ``_store``).

Two things live here, both speaking RESP on connections taken from the
user's pool (standalone) or from the cluster node that owns a key's slot, so
the client's settings (TLS, ACL, timeouts) hold:

* ``ReadBatcher``: entry reads of distinct keys issued while one read to the
  same node is under way go out on that read's connection as one pipeline.
  The first read (the *leader*) takes a connection and writes its command at
  once, so a lone read costs no extra loop iteration or task. Reads arriving
  meanwhile (in the same event-loop tick, typically) append their commands;
  one callback per tick writes them all in one ``write``. The leader reads
  every reply in order and hands each to its waiter. A batch stops taking
  reads at ``MAX_BATCH`` or once the leader has read every reply.
* ``RawPipeline``: what ``get_many`` builds its pipelines with (entry reads,
  the lease script): the commands packed by hand, one write and one read loop
  per node, without redis-py's ``Pipeline`` object.

Failures:

* an error reply (WRONGTYPE, say) answers only its own read;
* MOVED/ASK/TRYAGAIN (a cluster resharding) sends that one command again
  through the client's normal path, which follows redirects;
* a connection error or timeout fails every read of the batch still waiting
  with that error; the connection is disconnected before it goes back to
  the pool, so it is never reused mid-reply;
* a cancelled follower's reply is read and dropped (the connection stays in
  step); a cancelled leader disconnects the connection and its followers get
  ``ReadAgain`` (they read again, on a batch of their own).

redis-py's connections have no public "write these bytes" or "read one reply
without a timer of its own" call (``send_packed_command`` wraps every write in
``asyncio.wait_for``, a task per write on Python 3.11). The two reaches into
a connection's private members are in ``_write`` and ``_reply_reader``
below, and nowhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import anyio
from redis.exceptions import AskError, RedisError, ResponseError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._gate import _is_pool_exhausted

_HIREDIS_PARSER: Any = None
_NOT_ENOUGH_DATA: Any = None
try:  # redis-py's hiredis parser: its replies are read straight from hiredis (see _read_into)
    from redis._parsers import hiredis as _hiredis_parsers

    _HIREDIS_PARSER = _hiredis_parsers._AsyncHiredisParser  # noqa: SLF001
    _NOT_ENOUGH_DATA = _hiredis_parsers.NOT_ENOUGH_DATA
except (ImportError, AttributeError):  # pragma: no cover - another redis-py layout
    pass

__all__ = [
    "MAX_BATCH",
    "WHOLE",
    "RawPipeline",
    "ReadAgain",
    "ReadBatcher",
    "combine",
    "is_pair",
    "pack_command",
    "pack_read",
]

#: Reads one pipeline carries at most (a longer batch waits longer for its last reply).
MAX_BATCH: Final = 256

#: The read spec of a whole item (``_store.WHOLE_FIELDS``): ``GET`` of the
#: string entry. On WRONGTYPE (a hash is there) the store asks the hash for
#: these two fields (``\xffe`` of an old entry, ``\xfff`` of a partial one).
WHOLE: Final = (b"\xffe", b"\xfff")
_ENTRY: Final = b"\xffe"

_GET: Final = b"*2\r\n$3\r\nGET\r\n"
_HGETALL: Final = b"*2\r\n$7\r\nHGETALL\r\n"
_HMGET: Final = b"$5\r\nHMGET\r\n"
# Packed field lists of HMGET reads, by field tuple (few distinct projections).
_TAILS: dict[tuple[bytes, ...], bytes] = {}
_TAILS_MAX: Final = 1024


class ReadAgain(Exception):
    """The batch's leader was cancelled before this read's reply: read again."""


def _arg(value: Any) -> bytes:
    if type(value) is bytes:
        return value
    if type(value) is str:
        return value.encode()
    if type(value) is int or type(value) is float:
        return repr(value).encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"cannot send {type(value).__name__} to Redis")


def pack_command(*args: Any) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for value in args:
        raw = _arg(value)
        out.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    return b"".join(out)


def is_pair(fields: Sequence[bytes] | None) -> bool:
    """Whether a read of ``fields`` is two commands: ``GET`` and a hash read of the same key.

    An item projection (``None``: signed, HGETALL; or fields beginning with
    ``\\xffe``, ``_store.ALL_META``) may find a string (a whole entry) or a
    hash (a partial one): both are asked in one round trip and one answers.
    A whole read (``WHOLE``) is ``GET`` alone; a result's fields are a hash's.
    """
    return fields is None or (fields is not WHOLE and fields[0] == _ENTRY)


def combine(fields: Sequence[bytes] | None, got: Any, other: Any) -> Any:
    """The one reply of a paired read: the string if ``GET`` found one, else the hash read's.

    A ``GET`` that found no key leaves the hash read's empty reply (absent);
    one that hit a hash (WRONGTYPE) leaves the hash read's reply. An error
    other than WRONGTYPE (a redirect, say) is the reply. HGETALL's RESP2
    pair list becomes a dict.
    """
    if type(got) is bytes:
        return got
    if got is not None and not (
        isinstance(got, ResponseError) and str(got).startswith("WRONGTYPE")
    ):
        return got
    if fields is None and type(other) is list:  # RESP2 gives pairs, RESP3 a map
        it = iter(other)
        return dict(zip(it, it, strict=True))
    return other


def pack_read(key: str, fields: Sequence[bytes] | None) -> bytes:
    """An entry read in RESP: GET ``key`` (``WHOLE``), HGETALL ``key`` or HMGET ``key`` ``fields``.

    (A paired read packs its two commands with ``pack_get`` first.)
    """
    k = key.encode()
    if fields is WHOLE:
        return b"%b$%d\r\n%b\r\n" % (_GET, len(k), k)
    if fields is None:
        return b"%b$%d\r\n%b\r\n" % (_HGETALL, len(k), k)
    return b"*%d\r\n%b$%d\r\n%b\r\n%b" % (len(fields) + 2, _HMGET, len(k), k, _tail(fields))


def _tail(fields: Sequence[bytes]) -> bytes:
    """HMGET's field arguments in RESP (remembered per field tuple)."""
    tail: bytes | None = _TAILS.get(fields)  # type: ignore[call-overload]
    if tail is None:
        tail = b"".join(b"$%d\r\n%b\r\n" % (len(f), f) for f in fields)
        if len(_TAILS) >= _TAILS_MAX:
            _TAILS.clear()
        _TAILS[tuple(fields)] = tail
    return tail


def _write(conn: Any, data: bytes) -> None:
    # Private: the connection's stream writer. A write into the transport's
    # buffer; the next read waits for the replies.
    conn._writer.write(data)  # noqa: SLF001


def _reply_reader(conn: Any) -> Callable[[], Awaitable[Any]]:
    # Private: the connection's "one reply from the parser" (RESP2 or RESP3,
    # hiredis or not), an error reply returned as a ``ResponseError``, not
    # raised. The caller bounds its whole read loop with one timer.
    read: Callable[[], Awaitable[Any]] = conn._read_response_from_parser  # noqa: SLF001
    return read


async def _read_into(conn: Any, replies: list[Any], indices: Sequence[int]) -> None:
    """Read one reply per index, in order, into ``replies`` (error replies as values).

    With redis-py's hiredis parser the replies are taken from its hiredis
    reader directly, one ``gets`` each, reading the socket only when a reply
    is incomplete; what redis-py's own read does besides (a connection error
    in the reply is raised, a RESP3 push is handed to its handler and
    skipped) is done here too. Other parsers: one ``_reply_reader`` call per
    reply. The caller bounds the whole loop with one timer.
    """
    parser: Any = conn._parser  # noqa: SLF001 (see the module docstring)
    if _HIREDIS_PARSER is None or type(parser) is not _HIREDIS_PARSER or not parser._connected:  # noqa: SLF001
        read = _reply_reader(conn)
        for i in indices:
            replies[i] = await read()
        return
    gets = parser._reader.gets  # noqa: SLF001
    push = parser._hiredis_PushNotificationType  # noqa: SLF001
    for i in indices:
        while True:
            reply = gets()
            while reply is _NOT_ENOUGH_DATA:
                await parser.read_from_socket()
                reply = gets()
            kind = type(reply)
            if kind is list:
                if reply and isinstance(reply[0], ConnectionError):
                    raise reply[0]
            elif isinstance(reply, ConnectionError):
                raise reply
            elif push is not None and kind is push:
                await parser.handle_push_response(reply)
                continue
            replies[i] = reply
            break


# MOVED (a subclass of ASK) and TRYAGAIN: the command did not run on this node.
_REDIRECTS: Final = (AskError, TryAgainError)


def pack_get(key: str) -> bytes:
    """GET ``key`` in RESP."""
    k = key.encode()
    return b"%b$%d\r\n%b\r\n" % (_GET, len(k), k)


async def read_via_client(client: Any, key: str, fields: Sequence[bytes] | None) -> Any:
    """One entry read through the client's own command path; an error reply is returned.

    ``WHOLE``: GET. A paired read (``is_pair``): GET and HGETALL/HMGET in one
    pipeline, ``combine``d. Else HMGET.
    """
    try:
        if fields is WHOLE:
            return await client.get(key)
        if not is_pair(fields):
            return await client.hmget(key, fields)
    except ResponseError as exc:
        return exc
    pipe = client.pipeline(transaction=False)
    pipe.get(key)
    if fields is None:
        pipe.hgetall(key)
    else:
        pipe.hmget(key, fields)
    got, other = await pipe.execute(raise_on_error=False)
    return combine(fields, got, other)


def is_redirect(reply: Any) -> bool:
    """MOVED, ASK or TRYAGAIN: the command did not run on this node."""
    return isinstance(reply, _REDIRECTS)


#: Connections a standalone node keeps between reads instead of handing them
#: back to the pool (see ``_Node``).
IDLE_KEPT: Final = 4
#: ... and only while its pool could hand out this many more: a small pool
#: shared with the application is never made smaller.
POOL_ROOM: Final = 16


def _clean(conn: Any) -> bool:
    """A kept connection is still open and holds no unread bytes (what the pool checks)."""
    if not conn.is_connected:
        return False
    should_reconnect = getattr(conn, "should_reconnect", None)  # redis-py 7+: a server moving
    if should_reconnect is not None and should_reconnect():
        return False
    stream = conn._reader  # noqa: SLF001 (the connection's asyncio stream; see the module docstring)
    if stream is None or stream.at_eof() or stream._buffer:  # noqa: SLF001
        return False
    parser: Any = conn._parser  # noqa: SLF001
    reader = getattr(parser, "_reader", None)
    return not (type(parser) is _HIREDIS_PARSER and reader is not None and reader.has_data())


def _roomy(pool: Any) -> bool:
    """The pool can give ``POOL_ROOM`` more connections: keeping one takes nothing the app needs."""
    limit = getattr(pool, "max_connections", None)
    in_use = getattr(pool, "_in_use_connections", None)
    if type(limit) is not int or in_use is None:
        return False
    return limit - len(in_use) >= POOL_ROOM


class _Node:
    """Where a read goes: the standalone pool, or one cluster node.

    A standalone node keeps up to ``IDLE_KEPT`` connections between reads,
    while its pool has room for ``POOL_ROOM`` more: taking one from redis-py's
    pool and handing it back costs 11-16 µs here (a lock and its
    observability records), a tenth of a hit. A kept
    connection is checked as the pool would check it (open, nothing unread)
    and goes back to the pool otherwise, and all of them when the cache
    closes (``give_back``). A cluster node's connections come from its own
    free list already.
    """

    __slots__ = ("idle", "node", "pool")

    def __init__(self, pool: Any, node: Any) -> None:
        self.pool = pool
        self.node = node
        self.idle: list[Any] = []

    async def acquire(self) -> Any:
        if self.node is None:
            idle = self.idle
            while idle:
                conn = idle.pop()
                if _clean(conn):
                    return conn
                await self.discard(conn)  # the pool connects it again when it is next taken
            return await self.pool.get_connection()
        conn = self.node.acquire_connection()
        if not conn.is_connected:
            try:
                await conn.connect()
            except BaseException:
                self.node.release(conn)
                raise
        return conn

    async def release(self, conn: Any) -> None:
        if self.node is None:
            if len(self.idle) < IDLE_KEPT and _roomy(self.pool):
                self.idle.append(conn)
            else:
                await self.pool.release(conn)
        else:
            self.node.release(conn)

    async def give_back(self) -> None:
        """Hand the kept connections back to the pool."""
        idle, self.idle = self.idle, []
        with anyio.CancelScope(shield=True):
            for conn in idle:
                await self.pool.release(conn)

    async def discard(self, conn: Any) -> None:
        """Give back a connection that may hold unread replies: disconnected first (shielded)."""
        with anyio.CancelScope(shield=True):
            try:
                await conn.disconnect(nowait=True)
            finally:
                if self.node is None:
                    await self.pool.release(conn)
                else:
                    self.node.release(conn)


class _Batch:
    __slots__ = ("conn", "pending", "reads", "scheduled", "sent", "timer", "waiters")

    def __init__(self, first: bytes) -> None:
        self.conn: Any = None
        self.pending = [first]  # packed commands not written yet (the leader's first)
        # One per command after the leader's first, in command order: a
        # follower's future, or ``None`` for the second command of the leader's
        # own paired read (the leader keeps that reply itself).
        self.waiters: list[asyncio.Future[Any] | None] = []
        self.reads = 1  # entry reads carried (a paired read is two commands)
        self.sent = 0
        self.scheduled = False
        self.timer: Any = None


class ReadBatcher:
    """Coalesces concurrent entry reads per node into pipelines (see the module docstring)."""

    __slots__ = ("client", "counts", "nodes", "open", "pool", "standalone", "suspect")

    def __init__(self, client: Any, pool: Any, is_cluster: bool) -> None:
        self.client = client
        self.pool = None if is_cluster else pool
        self.open: dict[Any, _Batch] = {}
        self.nodes: dict[Any, _Node] = {}
        self.standalone = _Node(pool, None)
        # Cluster nodes whose connection failed: their reads take the client's
        # own path (which refreshes the cluster's layout) until one succeeds.
        self.suspect: set[Any] = set()
        # The engine's counters (``read_batches``, ``batched_reads``); set by the engine.
        self.counts: dict[str, int] | None = None

    async def give_back(self) -> None:
        """Hand the connections kept between reads back to the client's pool (the cache closes)."""
        await self.standalone.give_back()

    def _route(self, key: str) -> tuple[Any, _Node]:
        if self.pool is not None:
            return None, self.standalone
        nid = self.client.get_node_from_key(key)
        node = self.nodes.get(nid)
        if node is None:
            if len(self.nodes) > 64:  # nodes replaced after failovers
                self.nodes.clear()
            node = self.nodes[nid] = _Node(None, nid)
        return nid, node

    def joins(self, key: str) -> bool:
        """Would a read of ``key`` now join a batch under way (and need no connection)?"""
        if not self.open:
            return False
        try:
            batch = self.open.get(self._route(key)[0])
        except Exception:  # no slot map: read() takes the client's path
            return False
        return batch is not None and len(batch.waiters) + 1 < MAX_BATCH

    async def read(self, key: str, fields: Sequence[bytes] | None) -> Any:
        """The raw reply of one entry read (an error reply is returned, not raised).

        A paired read (``is_pair``) sends its two commands in the same batch
        and returns their ``combine``d reply.
        """
        if fields is not WHOLE and is_pair(fields):
            return await self._read_pair(key, fields)
        if self.pool is not None:  # standalone: one pool, no routing
            batch = self.open.get(None)
            if batch is not None and len(batch.waiters) + 1 < MAX_BATCH:
                return await self._follow(batch, pack_read(key, fields))
            return await self._lead(None, self.standalone, pack_read(key, fields))
        try:
            nid, node = self._route(key)
        except Exception:  # no slot map (yet): the client's own path finds the node
            return await self._via_client(None, key, fields)
        if self.suspect and nid in self.suspect:
            return await self._via_client(nid, key, fields)
        batch = self.open.get(nid)
        if batch is not None and len(batch.waiters) + 1 < MAX_BATCH:
            return await self._follow(batch, pack_read(key, fields))
        return await self._lead(nid, node, pack_read(key, fields))

    async def _read_pair(self, key: str, fields: Sequence[bytes] | None) -> Any:
        """GET and the hash read of one key, in one batch (so one round trip)."""
        if self.pool is not None:
            nid: Any = None
            node = self.standalone
        else:
            try:
                nid, node = self._route(key)
            except Exception:
                return await self._via_client(None, key, fields)
            if self.suspect and nid in self.suspect:
                return await self._via_client(nid, key, fields)
        first, second = pack_get(key), pack_read(key, fields)
        batch = self.open.get(nid)
        # (The same bound as ``joins``, which the engine asked: a pipeline may
        # carry one command over MAX_BATCH rather than a joined read lead.)
        if batch is not None and len(batch.waiters) + 1 < MAX_BATCH:
            got, other = await self._follow_pair(batch, first, second)
        else:
            got, other = await self._lead(nid, node, first, second)
        return combine(fields, got, other)

    async def _via_client(self, nid: Any, key: str, fields: Sequence[bytes] | None) -> Any:
        raw = await read_via_client(self.client, key, fields)
        self.suspect.discard(nid)
        return raw

    def _failed(self, nid: Any, exc: BaseException) -> None:
        """A cluster node's connection failed: route its reads through the client for now."""
        if (
            self.pool is None
            and isinstance(exc, (RedisError, OSError))
            and not _is_pool_exhausted(exc)
        ):
            if len(self.suspect) > 64:
                self.suspect.clear()
            self.suspect.add(nid)

    async def _follow(self, batch: _Batch, command: bytes) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        batch.waiters.append(fut)
        batch.pending.append(command)
        batch.reads += 1
        if not batch.scheduled and batch.conn is not None:
            batch.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, batch)
        # (Cancelled here: the future is cancelled; the leader reads its reply and drops it.)
        return await fut

    async def _follow_pair(self, batch: _Batch, first: bytes, second: bytes) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        one: asyncio.Future[Any] = loop.create_future()
        two: asyncio.Future[Any] = loop.create_future()
        batch.waiters += (one, two)
        batch.pending += (first, second)
        batch.reads += 1
        if not batch.scheduled and batch.conn is not None:
            batch.scheduled = True
            loop.call_soon(self._flush, batch)
        try:
            return await one, await two
        except BaseException:
            for fut in (one, two):  # the leader drops a cancelled one's reply
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()  # (retrieved: the error is raised once, here)
            raise

    def _flush(self, batch: _Batch) -> None:
        batch.scheduled = False
        if batch.conn is not None and batch.pending:
            self._send(batch)

    def _send(self, batch: _Batch) -> None:
        pending = batch.pending
        _write(batch.conn, pending[0] if len(pending) == 1 else b"".join(pending))
        batch.sent += len(pending)
        pending.clear()
        timer = batch.timer
        if timer is not None and not timer.expired():  # (expired: the reader fails the batch)
            timeout = batch.conn.socket_timeout
            if timeout is not None:
                timer.reschedule(asyncio.get_running_loop().time() + timeout)

    async def _lead(
        self, nid: Any, node: _Node, command: bytes, second: bytes | None = None
    ) -> Any:
        """Send the batch and read every reply: the leader's own (a pair of them for ``second``)."""
        batch = _Batch(command)
        if second is not None:
            batch.pending.append(second)
            batch.waiters.append(None)
        self.open[nid] = batch
        conn = None
        done = 0  # replies read
        own: Any = None
        own2: Any = None
        try:
            conn = await node.acquire()
            batch.conn = conn
            self._send(batch)
            read = _reply_reader(conn)
            async with asyncio.timeout(conn.socket_timeout) as timer:
                batch.timer = timer
                while True:
                    if done == batch.sent:
                        if batch.pending:
                            self._send(batch)
                            continue
                        break
                    reply = await read()
                    if done:
                        fut = batch.waiters[done - 1]
                        if fut is None:
                            own2 = reply
                        elif not fut.done():
                            fut.set_result(reply)
                    else:
                        own = reply
                    done += 1
            if self.open.get(nid) is batch:
                del self.open[nid]
        except BaseException as exc:
            if self.open.get(nid) is batch:
                del self.open[nid]
            batch.conn = None
            if isinstance(exc, TimeoutError):
                exc = RedisTimeoutError("Timeout reading a pipelined entry read")
            unanswered = batch.waiters[max(0, done - 1) :]
            for fut in unanswered:
                if fut is not None and not fut.done():
                    if isinstance(exc, asyncio.CancelledError):
                        fut.set_exception(ReadAgain())
                    else:
                        fut.set_exception(exc)
            self._failed(nid, exc)
            if conn is not None:
                await node.discard(conn)
            if isinstance(exc, RedisTimeoutError):
                raise exc from None
            raise
        await node.release(conn)
        n = batch.reads
        if n > 1:
            counts = self.counts
            if counts is not None:
                counts["read_batches"] += 1
                counts["batched_reads"] += n
        if second is not None:
            return own, own2
        return own


class RawPipeline:
    """A non-transactional pipeline of keyed commands, packed by hand, one write per node.

    Offers what ``get_many`` queues (``get``, ``hgetall``, ``hmget``, ``execute_command``
    for the lease script) and ``execute(raise_on_error=False)``: replies in
    order, error replies as exceptions in place. Raises when a connection
    fails (every connection that may hold unread replies is disconnected).
    """

    def __init__(self, batcher: ReadBatcher) -> None:
        self.batcher = batcher
        # (args, or None for an entry read: built only if needed), key, packed
        # command, whether the reply is a pair list (HGETALL), the read's fields.
        self.commands: list[tuple[tuple[Any, ...] | None, str, bytes, bool, Any]] = []

    def get(self, key: str) -> None:
        self.commands.append((("GET", key), key, pack_get(key), False, None))

    def hgetall(self, key: str) -> None:
        self.commands.append((None, key, pack_read(key, None), True, None))

    def hmget(self, key: str, fields: Sequence[bytes]) -> None:
        if type(fields) is not tuple:
            fields = tuple(fields)
        self.commands.append((None, key, pack_read(key, fields), False, fields))

    def execute_command(self, *args: Any) -> None:
        """A raw command; EVAL/EVALSHA are routed by their first key, others by their first argument."""
        name = str(args[0]).upper()
        key = args[3] if name in ("EVAL", "EVALSHA") else args[1]
        self.commands.append((args, str(key), pack_command(*args), False, None))

    def _groups(self) -> dict[Any, tuple[_Node, list[int]]]:
        """The commands' indices by node (raises when the cluster's slot map is missing)."""
        batcher = self.batcher
        if batcher.pool is not None:  # standalone: one node
            return {None: (batcher.standalone, list(range(len(self.commands))))}
        groups: dict[Any, tuple[_Node, list[int]]] = {}
        for i, command in enumerate(self.commands):
            # (The batcher's own routing: this module's.)
            nid, node = batcher._route(command[1])  # noqa: SLF001
            group = groups.get(nid)
            if group is None:
                group = groups[nid] = (node, [])
            group[1].append(i)
        return groups

    async def execute(self, raise_on_error: bool = False) -> list[Any]:
        batcher = self.batcher
        if batcher.suspect:
            return await self._via_client(raise_on_error)
        try:
            groups = self._groups()
        except Exception:  # no slot map (yet): the client's pipeline finds the nodes
            return await self._via_client(raise_on_error)
        commands = self.commands
        replies: list[Any] = [None] * len(commands)
        taken: list[tuple[_Node, Any, list[int]]] = []
        try:
            for node, indices in groups.values():
                conn = await node.acquire()
                taken.append((node, conn, indices))
                _write(conn, b"".join([commands[i][2] for i in indices]))
            while taken:
                node, conn, indices = taken[0]
                async with asyncio.timeout(conn.socket_timeout):
                    await _read_into(conn, replies, indices)
                taken.pop(0)
                await node.release(conn)
        except BaseException as exc:
            for node, conn, _ in taken:
                await node.discard(conn)
            if isinstance(exc, TimeoutError):
                exc = RedisTimeoutError("Timeout reading a pipeline")
            for nid in groups:
                batcher._failed(nid, exc)  # noqa: SLF001 (same module)
            if isinstance(exc, RedisTimeoutError):
                raise exc from None
            raise
        return await self._finish(replies, raise_on_error)

    async def _finish(self, replies: list[Any], raise_on_error: bool) -> list[Any]:
        """Re-send what a node redirected (through the client), shape pair lists as maps."""
        client = self.batcher.client
        for i, command in enumerate(self.commands):
            reply = replies[i]
            if type(reply) is list:
                if command[3]:  # RESP2 gives HGETALL's pairs, RESP3 a map
                    it = iter(reply)
                    replies[i] = dict(zip(it, it, strict=True))
                continue
            if isinstance(reply, _REDIRECTS):
                try:
                    reply = await client.execute_command(*_args_of(command))
                except ResponseError as exc:
                    reply = exc
                replies[i] = reply
            if raise_on_error and isinstance(replies[i], ResponseError):
                raise replies[i]
        return replies

    async def _via_client(self, raise_on_error: bool) -> list[Any]:
        """A node is suspect: the client's own pipeline (it refreshes the cluster's layout)."""
        pipe = self.batcher.client.pipeline(transaction=False)
        for command in self.commands:
            pipe.execute_command(*_args_of(command))
        replies: list[Any] = await pipe.execute(raise_on_error=raise_on_error)
        self.batcher.suspect.clear()  # the client reached every node it needed
        for i, command in enumerate(self.commands):
            reply = replies[i]
            if command[3] and type(reply) is list:
                it = iter(reply)
                replies[i] = dict(zip(it, it, strict=True))
        return replies


def _args_of(command: tuple[tuple[Any, ...] | None, str, bytes, bool, Any]) -> tuple[Any, ...]:
    """A queued command's arguments (an entry read's are built only when they are needed)."""
    args, key, _packed, pairs, fields = command
    if args is not None:
        return args
    if pairs:
        return ("HGETALL", key)
    return ("HMGET", key, *fields)
