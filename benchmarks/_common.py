"""Shared pieces of the benchmark scripts: the item, the peers' configuration, stats, output.

Every script writes ``--json`` results holding, besides its raw numbers,
``tables`` (``{"title", "columns", "rows", "notes"}``) and ``charts`` (specs
that ``run_all.py`` draws with matplotlib), so the runner renders any script
that follows this shape without knowing it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import urlsplit

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from devtools.devservers import MotoProcess as MotoProcess  # noqa: E402  (for the scripts)
from swr_cache import _codec  # noqa: E402


def make_item(pk: str) -> dict[str, Any]:
    """A ~1 KB user item of the usual DynamoDB shapes (the same shape hit_path.py uses)."""
    return {
        "pk": pk,
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "age": Decimal("36"),
        "balance": Decimal("1024.50"),
        "active": True,
        "roles": {"admin", "editor", "viewer"},
        "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
        "bio": "x" * 600,
        "tags": ["math", "poetry", "engines"],
    }


def say(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the results."""
    print(message, file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def host_port_db(url: str) -> tuple[str, int, int]:
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    return parts.hostname or "127.0.0.1", parts.port or 6379, db


def versions() -> dict[str, str]:
    """Versions of the libraries compared (``missing`` when not installed)."""
    out = {}
    for name in (
        "swr-cache",
        "redis",
        "hiredis",
        "msgpack",
        "aiocache",
        "cashews",
        "aiobotocore",
        "moto",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def codec_serializer() -> Any:
    """An aiocache serializer on swr_cache's msgpack codec (exact Decimal and set, like ours)."""
    from aiocache.serializers import BaseSerializer  # type: ignore[import-untyped]

    class CodecSerializer(BaseSerializer):  # type: ignore[misc]
        DEFAULT_ENCODING = None

        def dumps(self, value: Any) -> bytes:
            return _codec.encode(value)

        def loads(self, value: bytes | None) -> Any:
            return None if value is None else _codec.decode(value)

    return CodecSerializer()


def aiocache_kwargs(url: str) -> dict[str, Any]:
    """How every aiocache contender reaches the Redis under test."""
    import aiocache  # type: ignore[import-untyped]

    host, port, db = host_port_db(url)
    return {
        "cache": aiocache.RedisCache,
        "endpoint": host,
        "port": port,
        "db": db,
        "serializer": codec_serializer(),
        "namespace": "",
    }


def floor_reader(client: Any, key: str) -> Any:
    """The floor of a hit: one GET of ``key`` (a codec-encoded item) and one ``msgpack.unpackb``."""
    import msgpack

    ext_hook = _codec._ext_hook

    async def floor() -> Any:
        return msgpack.unpackb(
            await client.get(key), raw=False, strict_map_key=False, ext_hook=ext_hook
        )

    return floor


async def total_commands(client: Any) -> int:
    """Redis' ``total_commands_processed`` (to count the commands a run sent)."""
    info = await client.info("stats")
    return int(info["total_commands_processed"])


def start_redis(url: str | None) -> tuple[str, Any]:
    """The Redis to use: ``url``, else a redis-server started on a free port (returned to stop)."""
    if url:
        return url, None
    from devtools.devservers import RedisServer

    server = RedisServer().start()
    return server.url, server


def pin(server: Any) -> str | None:
    """Put this process on the first CPU and redis-server on the second (see hit_path.py)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or server is None or not server.pid:
        return None
    os.sched_setaffinity(0, {cpus[0]})
    os.sched_setaffinity(server.pid, {cpus[1]})
    return f"this process on CPU {cpus[0]}, redis-server on CPU {cpus[1]}"


def pin_modes(server: Any, no_pin: bool) -> dict[str, str]:
    """``unpinned``, then ``pinned`` (see :func:`pin`) where there are two CPUs and our server."""
    modes = {"unpinned": "unpinned: the scheduler places the processes"}
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not no_pin and len(cpus) >= 2 and server is not None and server.pid:
        modes["pinned"] = f"pinned: this process on CPU {cpus[0]}, redis-server on CPU {cpus[1]}"
    return modes


def fmt(value: Any, digits: int | None = None) -> str:
    """A table cell: ints with separators, floats with as many decimals as their size needs.

    ``digits=None`` picks by magnitude (1,234 / 56.7 / 0.89), so a column of
    request rates does not show meaningless tenths and a ratio keeps two places.
    """
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "-"
        if digits is None:
            digits = 0 if abs(value) >= 1000 else 1 if abs(value) >= 10 else 2
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def median_count(values: Sequence[int]) -> int:
    """The median of counts as a count that was observed (the lower middle value)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else 0


def table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()
) -> dict[str, Any]:
    """A result table; cells are kept as given (numbers stay numbers in the JSON)."""
    return {
        "title": title,
        "columns": list(columns),
        "rows": [list(r) for r in rows],
        "notes": list(notes),
    }


def print_table(t: dict[str, Any]) -> None:
    cells = [[fmt(c) for c in row] for row in t["rows"]]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(t["columns"])]
    print(f"\n{t['title']}")
    print(
        "  ".join(
            f"{h:>{w}}" if i else f"{h:<{w}}"
            for i, (h, w) in enumerate(zip(t["columns"], widths, strict=True))
        )
    )
    for row in cells:
        print(
            "  ".join(
                f"{c:>{w}}" if i else f"{c:<{w}}"
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    for note in t["notes"]:
        print(f"  {note}")


def finish(results: dict[str, Any], json_path: str | None) -> None:
    """Print the tables and write the JSON (with the tables and chart specs) if asked."""
    for t in results.get("tables", []):
        print_table(t)
    results.setdefault("meta", {})
    results["meta"].update(
        {
            "python": platform.python_version(),
            "versions": versions(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
