"""Readiness: which Redis a cache talks to, and whether it answers.

``Cache.ping`` and the startup log line live here rather than in the engine:
neither is on a read path, and both must describe a client without ever
printing its credentials.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from redis.exceptions import RedisError

from ._errors import CacheUnavailableError

__all__ = ["describe_client", "ping_client"]

# A cluster description names this many startup nodes, then "and N more".
_MAX_NODES = 3


def describe_client(client: Any) -> str:
    """Where ``client`` points, for logs and error messages: never a password.

    ``redis://host:port/db``, ``rediss://...`` for TLS, ``unix:///path?db=N``,
    or ``Redis Cluster host:port, ...`` (its startup nodes).
    """
    nodes_manager = getattr(client, "nodes_manager", None)
    if nodes_manager is not None:  # redis.asyncio.cluster.RedisCluster
        nodes = getattr(nodes_manager, "startup_nodes", None) or {}
        names = [str(name) for name in nodes][:_MAX_NODES]
        more = len(nodes) - len(names)
        listed = ", ".join(names) if names else "?"
        return f"Redis Cluster {listed}" + (f" and {more} more" if more > 0 else "")
    pool = getattr(client, "connection_pool", None)
    kw: dict[str, Any] = dict(getattr(pool, "connection_kwargs", None) or {})
    db = kw.get("db", 0)
    if "path" in kw:
        return f"unix://{kw['path']}?db={db}"
    connection_class = getattr(pool, "connection_class", None)
    scheme = "rediss" if "SSL" in getattr(connection_class, "__name__", "") else "redis"
    return f"{scheme}://{kw.get('host', '?')}:{kw.get('port', '?')}/{db}"


async def ping_client(client: Any, limit: float, slots: Any = None) -> float:
    """Send PING and return the round trip in seconds.

    Args:
        client: the cache's Redis (or RedisCluster) client.
        limit: seconds for the whole call, waiting for a connection included.
        slots: the engine's in-flight limiter, so a ping queues like any command.

    Raises:
        CacheUnavailableError: no answer within ``limit`` (refused, timed
            out, authentication failed, a cluster node down).
    """
    where = describe_client(client)
    start = time.perf_counter()
    try:
        with anyio.fail_after(limit):
            if slots is None:
                answered = await client.ping()
            else:
                async with slots.hold(limit):
                    answered = await client.ping()
    except TimeoutError as exc:  # our deadline, a socket timeout or no free slot
        raise CacheUnavailableError(
            f"Redis at {where} did not answer PING within {limit:g} s"
        ) from exc
    except (RedisError, OSError) as exc:
        raise CacheUnavailableError(f"Redis at {where} cannot be reached: {exc}") from exc
    if not answered:
        raise CacheUnavailableError(f"Redis at {where} did not answer PING")
    return time.perf_counter() - start
