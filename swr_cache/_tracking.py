"""Redis client tracking for the near cache: one listening connection per master.

Each connection is RESP2, whatever protocol the user's client speaks (the
redis-py asyncio client does not hand RESP3 ``invalidate`` pushes to its
callers), and is built from the user's client's own connection settings
(host, port, TLS, ACL user and password, credential provider). It runs::

    CLIENT ID                                   -> n
    CLIENT TRACKING on REDIRECT n BCAST PREFIX <namespace>:e:{
    SUBSCRIBE __redis__:invalidate

so it announces to itself every change to an entry key of the namespace.
One connection both tracks and listens: if it dies, nothing else is left
tracking in its name, and its reader sees the end of the stream at once.

``run`` keeps these connections up: on a failure it marks the near cache
unusable (flushing it), waits with back-off and starts again. On a Redis
Cluster it tracks every master (and every replica, when the client reads
from replicas) and restarts when that set of nodes changes (a failover, a
node added or removed).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import anyio
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from ._near import NearCache

__all__ = ["Tracker", "TrackerPort"]

log = logging.getLogger("swr_cache")

CHANNEL: Final = b"__redis__:invalidate"
#: The tracking connections' CLIENT SETNAME, so operators can find them.
CLIENT_NAME: Final = "swr_cache-near"

_Node = tuple[str, int]
_Factory = Callable[[], Any]


def _connection_for(connection_class: Any, kwargs: dict[str, Any]) -> _Factory:
    """A factory of tracking connections with the user's settings, RESP2, no retries of our own."""
    kw = dict(kwargs)
    kw["protocol"] = 2
    # redis-py's health check would PING before a command and read a pub/sub
    # message as its answer; the listener checks health itself.
    kw["health_check_interval"] = 0
    kw["client_name"] = CLIENT_NAME
    kw.pop("maint_notifications_config", None)
    kw.pop("maint_notifications_pool_handler", None)

    def make() -> Any:
        return connection_class(**kw)

    return make


def standalone_factory(client: Any) -> _Factory:
    """Tracking connections to the server of a ``redis.asyncio.Redis`` client."""
    pool = client.connection_pool
    return _connection_for(pool.connection_class, pool.connection_kwargs)


def is_cluster(client: Any) -> bool:
    return hasattr(client, "get_primaries")


class TrackerPort(NamedTuple):
    """The near cache's side of its tracker: what the tracker reports."""

    expect: Callable[[set[Any]], None]  # the nodes that must be tracked
    node_up: Callable[[Any], None]  # one of them is tracked now
    down: Callable[[Any, bool], None]  # one (None: all) is gone; bool: it failed
    invalidated: Callable[[list[bytes] | None], None]  # an announcement (None: flush)


class Tracker:
    """Keeps one near cache's tracking connections up (see the module doc)."""

    def __init__(self, near: NearCache, port: TrackerPort, client: Any, prefix: str) -> None:
        self.near = near
        # What the tracker reports to the near cache (handed over by NearCache.start).
        self.port = port
        self.client = client
        self.prefix = prefix

    async def run(self) -> None:
        """Track until cancelled (the cache's exit)."""
        near = self.near
        failed = False
        try:
            while True:
                try:
                    if is_cluster(self.client):
                        await self._run_cluster()
                    else:
                        self.port.expect({("", 0)})
                        await self._track_node(("", 0), standalone_factory(self.client))
                except Exception:
                    # Never take the cache's task group down: stay bypassed, retry.
                    log.log(
                        logging.DEBUG if failed else logging.ERROR,
                        "swr_cache: near cache tracking failed; bypassing it",
                        exc_info=True,
                    )
                    failed = True
                    self.port.down(None, True)
                await anyio.sleep(near.max_reconnect_delay)
        finally:
            self.port.down(None, False)

    # -- one connection ----------------------------------------------------------

    async def _track_node(self, node: _Node, make: _Factory) -> None:
        """Subscribe, listen until the connection fails, back off, again; forever."""
        near = self.near
        delay = near.reconnect_delay
        while True:
            conn: Any = None
            lost = False
            try:
                conn = make()
                with anyio.fail_after(max(near.health_check_interval, 1.0)):
                    await self._subscribe(conn)
                self.port.node_up(node)
                delay = near.reconnect_delay
                await self._listen(conn)
            except (RedisError, OSError, TimeoutError) as exc:
                lost = True
                # Loud once per outage; retries that keep failing stay quiet.
                level = logging.WARNING if delay == near.reconnect_delay else logging.DEBUG
                log.log(level, "swr_cache: near cache tracking lost (%r); bypassing it", exc)
            except Exception:
                # Never let the listener take the cache's task group down (a
                # client whose connections cannot be copied, say): stay bypassed.
                lost = True
                level = logging.ERROR if delay == near.reconnect_delay else logging.DEBUG
                log.log(level, "swr_cache: near cache tracking failed; bypassing it", exc_info=True)
            finally:
                self.port.down(node, lost)
                if conn is not None:
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await conn.disconnect()
            await anyio.sleep(delay)
            delay = min(delay * 2, near.max_reconnect_delay)

    async def _subscribe(self, conn: Any) -> None:
        await conn.connect()
        await conn.send_command("CLIENT", "ID")
        cid = await conn.read_response()
        await conn.send_command(
            "CLIENT", "TRACKING", "on", "REDIRECT", cid, "BCAST", "PREFIX", self.prefix
        )
        await conn.read_response()
        await conn.send_command("SUBSCRIBE", CHANNEL)
        await conn.read_response()

    async def _listen(self, conn: Any) -> None:
        """Apply invalidation messages; ping after silence, give up when the ping goes unanswered."""
        near = self.near
        interval = near.health_check_interval
        pinged = False
        while True:
            msg = await conn.read_response(timeout=interval)
            if msg is None:  # silence for `interval`
                if pinged:
                    raise TimeoutError("the tracking connection did not answer a PING")
                await conn.send_command("PING")
                pinged = True
                continue
            pinged = False
            if type(msg) is list and len(msg) == 3 and msg[0] == b"message":
                self.port.invalidated(msg[2])

    # -- a cluster -------------------------------------------------------------------

    async def _run_cluster(self) -> None:
        near = self.near
        while True:
            masters = self._masters()
            if not masters:
                await self._refresh_topology()
                await anyio.sleep(near.reconnect_delay)
                continue
            self.port.expect(set(masters))
            async with anyio.create_task_group() as tg:
                for node, make in masters.items():
                    tg.start_soon(self._track_node, node, make)
                await self._watch(set(masters))
                tg.cancel_scope.cancel()
            log.info("swr_cache: Redis Cluster masters changed; near cache tracking restarts")

    def _masters(self) -> dict[_Node, _Factory]:
        """The nodes to track: the masters, and the replicas too when entries are read there.

        A replica announces a change when it applies it; a read from a replica
        that lags its master must not be kept past that.
        """
        client = self.client
        replicas = bool(getattr(client, "read_from_replicas", False)) or (
            getattr(client, "load_balancing_strategy", None) is not None
        )
        nodes = client.get_nodes() if replicas else client.get_primaries()
        out: dict[_Node, _Factory] = {}
        for n in nodes:
            out[(n.host, n.port)] = _connection_for(n.connection_class, n.connection_kwargs)
        return out

    async def _watch(self, tracked: set[_Node]) -> None:
        """Return when the client's set of masters is no longer ``tracked``."""
        near = self.near
        while True:
            await anyio.sleep(near.topology_interval)
            if not near.usable:
                # A master is unreachable: perhaps failed over. Ask the
                # cluster (the client otherwise learns only from MOVED).
                await self._refresh_topology()
            if set(self._masters()) != tracked:
                return

    async def _refresh_topology(self) -> None:
        try:
            with anyio.fail_after(max(self.near.health_check_interval, 1.0)):
                await self.client.nodes_manager.initialize()
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("swr_cache: cluster topology refresh failed: %r", exc)


def entries_of(keys: Sequence[bytes]) -> list[str]:
    """Entry keys of an invalidation message (undecodable ones cannot be ours)."""
    out = []
    for k in keys:
        try:
            out.append(k.decode())
        except UnicodeDecodeError:
            continue
    return out
