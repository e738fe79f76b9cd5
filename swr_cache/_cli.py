"""The ``swr-cache`` command line (also ``python -m swr_cache``).

Commands:

* ``demo`` — the repository's demo on embedded servers (``make demo``; needs a clone);
* ``inspect --table T --key JSON`` — one entry's state, deadlines, fields, lease;
* ``invalidate --table T --key JSON`` / ``--tag TAG`` — what a write would do;
* ``stats`` — entries (fresh/stale/negative), leases, fences and tags of a
  namespace, counted with SCAN (never KEYS), up to ``--max-keys`` keys;
* ``consume-stream`` — apply a DynamoDB table's stream to the cache.

Redis comes from ``--redis-url``, else ``SWR_CACHE_REDIS_URL``, ``REDIS_URL``
or ``REDIS_HOST``/``REDIS_PORT``/``REDIS_DB``; the namespace from
``--namespace``, else ``SWR_CACHE_NAMESPACE``, else ``swr``. Exit codes: 0 done,
1 Redis could not be reached or an invalidation failed, 2 bad input, 141 (quietly)
when stdout was closed early, as in ``swr-cache stats | head -1``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

from redis.exceptions import RedisError, ResponseError

from . import _codec
from ._cache import Cache
from ._engine_api import Engine, engine_of
from ._entry import expand
from ._errors import (
    CacheUnavailableError,
    ConfigError,
    InvalidationError,
    KeyEncodingError,
    SwrCacheError,
)
from ._keys import from_typed, item_identity
from ._readiness import describe_client
from ._store import (
    M_ABSENT,
    M_DELTA,
    M_ENTRY,
    M_FORMAT,
    M_HARD,
    M_NONE,
    M_RESULT,
    M_SOFT,
    M_VERSION,
    M_WHOLE,
)

__all__ = ["main"]

PROG: Final = "swr-cache"
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_PIPE: Final = 141  # 128 + SIGPIPE, as the shell reports a tool the signal ended

_COMMANDS: Final = {
    "demo": "from a clone: a workload on embedded Redis and DynamoDB (moto), with a report",
    "inspect": "show one entry: state, soft/hard TTL left, cached fields, lease",
    "invalidate": "invalidate an item (entry, lease and its tags) or purge tags",
    "stats": "count a namespace's entries, leases, fences and tags (SCAN, bounded)",
    "consume-stream": "apply a DynamoDB table's stream to the cache",
}
# Commands with parsers of their own: the rest of the line goes to them unparsed.
_PASS_THROUGH: Final = ("demo", "consume-stream")
_FORMAT: Final = str(_codec.FORMAT_VERSION).encode()
# Key kinds of _keys.KeySpace, as `stats` names them.
_KINDS: Final = {
    "e": "entries",
    "l": "leases",
    "f": "fences",
    "q": "stream sequence marks",
    "tg": "tag purge stamps",
    "tm": "tag member sets",
    "ck": "stream checkpoints",
    "sl": "stream shard leases",
}


class UsageError(Exception):
    """Bad input on the command line: reported with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise instead of exiting (``main`` returns codes)."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{self.prog}: {message}")


# ---------------------------------------------------------------------------
# Parsing


def _connection_options() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--redis-url",
        help="Redis URL (default: SWR_CACHE_REDIS_URL, REDIS_URL or REDIS_HOST/REDIS_PORT/REDIS_DB)",
    )
    common.add_argument(
        "--namespace", help="cache namespace (default: SWR_CACHE_NAMESPACE, else 'swr')"
    )
    common.add_argument(
        "--timeout", type=float, default=2.0, help="seconds per Redis command (default 2)"
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    return common


def _add_item_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", help="DynamoDB table name")
    parser.add_argument(
        "--key",
        help='primary key as JSON: {"pk": "u1"} or typed {"pk": {"S": "u1"}, "n": {"N": "10"}}',
    )
    parser.add_argument(
        "--identity",
        help="a raw entry identity instead (as `stats` or a key name shows it, e.g. r|fn|args)",
    )


def _parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="swr_cache: Redis in front of DynamoDB with soft/hard TTLs.",
        epilog="Exit codes: 0 done, 1 Redis unreachable or invalidation failed, 2 bad input.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    common = _connection_options()
    for name in _PASS_THROUGH:
        sub.add_parser(name, help=_COMMANDS[name], add_help=False)
    inspect = sub.add_parser(
        "inspect", parents=[common], help=_COMMANDS["inspect"], description=_COMMANDS["inspect"]
    )
    _add_item_options(inspect)
    inspect.add_argument(
        "--values", action="store_true", help="also decode and print cached values"
    )
    inspect.set_defaults(run=_inspect)
    invalidate = sub.add_parser(
        "invalidate",
        parents=[common],
        help=_COMMANDS["invalidate"],
        description=_COMMANDS["invalidate"],
    )
    _add_item_options(invalidate)
    invalidate.add_argument(
        "--tag",
        action="append",
        default=[],
        help="purge everything stored with this tag (repeatable)",
    )
    invalidate.set_defaults(run=_invalidate)
    stats = sub.add_parser(
        "stats", parents=[common], help=_COMMANDS["stats"], description=_COMMANDS["stats"]
    )
    stats.add_argument(
        "--max-keys",
        type=int,
        default=100_000,
        help="stop after scanning this many keys (default 100000); counts are then partial",
    )
    stats.add_argument(
        "--no-states", action="store_true", help="skip reading entry deadlines (fresh/stale counts)"
    )
    stats.set_defaults(run=_stats)
    return parser


def _parse_key(text: str) -> dict[str, Any]:
    """A key given as JSON: plain values, or DynamoDB typed values ({"S": ...})."""
    try:
        # Numbers stay exact: 1.10 must be the same item as N "1.1", never a float.
        raw = json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--key is not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(raw, dict) or not raw:
        raise UsageError(
            f'--key must be a non-empty JSON object such as {{"pk": "u1"}}, got {text!r}'
        )
    key: dict[str, Any] = {}
    for name, value in raw.items():
        if isinstance(value, dict):
            try:
                value = from_typed(value)
            except KeyEncodingError as exc:
                raise UsageError(f"--key attribute {name!r}: {exc}") from None
        elif isinstance(value, bool) or value is None or isinstance(value, (list, float)):
            raise UsageError(
                f"--key attribute {name!r} must be a string, a number or a typed value, not {value!r}"
            )
        key[name] = value
    return key


def _identity(ns: argparse.Namespace, *, required: bool = True) -> str | None:
    if ns.identity is not None:
        if ns.table is not None or ns.key is not None:
            raise UsageError("give either --identity or --table with --key, not both")
        if not ns.identity or "{" in ns.identity or "}" in ns.identity:
            raise UsageError(f"--identity must be non-empty and hold no braces: {ns.identity!r}")
        return str(ns.identity)
    if ns.table is None and ns.key is None:
        if required:
            raise UsageError("give --table and --key (or --identity)")
        return None
    if ns.table is None or ns.key is None:
        raise UsageError("--table and --key go together")
    try:
        return item_identity(ns.table, _parse_key(ns.key))
    except KeyEncodingError as exc:
        raise UsageError(str(exc)) from None


# ---------------------------------------------------------------------------
# Running against Redis


def _open_cache(ns: argparse.Namespace) -> Cache:
    if ns.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    namespace = ns.namespace or os.environ.get("SWR_CACHE_NAMESPACE") or "swr"
    kwargs: dict[str, Any] = {
        "namespace": namespace,
        "socket_timeout": ns.timeout,
        "socket_connect_timeout": ns.timeout,
        "call_timeout": ns.timeout,
        "max_connections": 4,
    }
    try:
        if ns.redis_url:
            return Cache.from_url(ns.redis_url, **kwargs)
        return Cache.from_env(**kwargs)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:  # redis-py rejects the URL itself
        raise UsageError(f"bad Redis URL: {exc}") from None


def _where(cache: Cache) -> str:
    """Where the client points, without credentials."""
    return describe_client(cache.client)


async def _with_cache(
    ns: argparse.Namespace, body: Callable[[argparse.Namespace, Cache], Awaitable[int]]
) -> int:
    cache = _open_cache(ns)
    try:
        await cache.ping(ns.timeout)
    except CacheUnavailableError as exc:
        await cache.client.aclose()
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        async with cache:
            return await body(ns, cache)
    except BrokenPipeError:
        raise  # our stdout was closed (`| head`): not Redis's doing; main() handles it
    except (RedisError, OSError) as exc:
        print(f"{PROG}: Redis at {_where(cache)} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _emit(ns: argparse.Namespace, data: Mapping[str, Any], lines: Sequence[str]) -> None:
    if ns.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        for line in lines:
            print(line)


def _seconds(ms: float) -> str:
    if ms >= 0:
        return f"{ms / 1000:.3f} s remaining"
    return f"passed {-ms / 1000:.3f} s ago"


def _display(identity: str) -> str:
    return unquote(identity)


# -- inspect -------------------------------------------------------------------


async def _inspect_entry(ns: argparse.Namespace, cache: Cache) -> int:
    identity = _identity(ns)
    assert identity is not None
    engine = engine_of(cache)
    ks = engine.keys
    entry, lease, fence = ks.entry(identity), ks.lease(identity), ks.fence(identity)
    async with engine.slots.hold(ns.timeout):
        raw, lease_ttl, fence_ttl, kind = await engine.store.describe(entry, lease, fence)
    now = engine.now_ms()
    for reply in (lease_ttl, fence_ttl, kind):
        if isinstance(reply, BaseException):
            raise reply
    data: dict[str, Any] = {
        "entry": entry,
        "identity": identity,
        # PTTL: -2 no such key, -1 no expiry (never set by us), else ms left.
        "lease_held": lease_ttl != -2,
        "lease_ttl_s": lease_ttl / 1000 if lease_ttl >= 0 else None,
        "fence_ttl_s": fence_ttl / 1000 if fence_ttl >= 0 else None,
    }
    if isinstance(raw, ResponseError):
        data["state"] = "unreadable"
        data["problem"] = (
            f"the key holds a {kind.decode() if isinstance(kind, bytes) else kind}, "
            "not a string or a hash"
        )
    elif isinstance(raw, BaseException):
        raise raw
    elif not raw:
        data["state"] = "absent"
    elif (
        type(raw) is bytes
        and engine.signer is not None
        and (engine.signer.check_string(entry, raw) is None)
    ):
        data["state"] = "unreadable"
        data["problem"] = "its signature does not verify with this cache's key: read as a miss"
    else:
        if type(raw) is bytes and engine.signer is not None:
            raw = engine.signer.check_string(entry, raw)
        _describe_entry(raw, now, data, values=ns.values)
    _emit(ns, data, _inspect_lines(data))
    return EXIT_OK


def _inspect_lines(data: Mapping[str, Any]) -> list[str]:
    """``inspect``'s text output for what ``_inspect_entry`` found."""
    lines = [
        f"entry     {data['entry']}",
        f"state     {data['state']}" + (f" ({data['problem']})" if "problem" in data else ""),
    ]
    if "soft_remaining_ms" in data:
        lines.append(f"soft TTL  {_seconds(data['soft_remaining_ms'])}")
        lines.append(f"hard TTL  {_seconds(data['hard_remaining_ms'])}")
    if "fields" in data:
        lines.extend(_field_lines(data))
    if not data["lease_held"]:
        lines.append("lease     not held")
    elif data["lease_ttl_s"] is None:
        lines.append("lease     held (no expiry set: not one of ours)")
    else:
        lines.append(f"lease     held, {data['lease_ttl_s']:.3f} s left (a load is running)")
    if data["fence_ttl_s"] is not None:
        lines.append(
            f"fence     {data['fence_ttl_s']:.3f} s left (fills are not stored until then)"
        )
    for name, value in (data.get("values") or {}).items():
        lines.append(f"  {name} = {value!r}")
    return lines


def _field_lines(data: Mapping[str, Any]) -> list[str]:
    """What an entry holds: its fields and shape, absent names, its load."""
    shape = "whole item" if data["whole"] else "partial item"
    if data["kind"] == "result":
        shape = "cached result"
    elif data["negative"]:
        shape = "not found in the origin (negative entry)"
    names = ", ".join(data["fields"]) or "-"
    stored = "one msgpack blob" if data.get("layout") == "one blob" else "a field each"
    if data["kind"] == "result" or data["negative"]:
        stored = ""
    lines = [f"fields    {names} ({shape}{', ' + stored if stored else ''}, {data['bytes']} bytes)"]
    if data["absent_attributes"]:
        lines.append(f"absent    {', '.join(data['absent_attributes'])} (known not to exist)")
    if data.get("load_ms") is not None:
        lines.append(f"loaded    in {data['load_ms']} ms (version {data.get('version') or '?'})")
    return lines


def _describe_entry(
    entry: Mapping[bytes, bytes] | bytes, now: float, data: dict[str, Any], *, values: bool
) -> None:
    if type(entry) is bytes:  # a whole entry: one string
        data["bytes"] = len(entry)
        data["layout"] = "one blob"
    else:
        assert isinstance(entry, Mapping)
        data["bytes"] = sum(len(k) + len(v) for k, v in entry.items())
        data["layout"] = "fields"
        if M_ENTRY in entry:
            data["state"] = "unreadable"
            data["problem"] = (
                f"a whole entry of format 2 (a hash), this version reads {_FORMAT!r} "
                "(a string): read as a miss"
            )
            return
        entry = dict(entry)
    try:
        raw = expand(entry)  # a whole entry's blob as one field per attribute
    except SwrCacheError as exc:
        data["state"] = "unreadable"
        data["problem"] = f"the entry's blob does not decode: {exc}"
        return
    meta = {k: v for k, v in raw.items() if k.startswith(b"\xff")}
    attrs = {k: v for k, v in raw.items() if not k.startswith(b"\xff")}
    data["kind"] = "result" if M_RESULT in meta else "item"
    data["fields"] = sorted(k.decode("utf-8", "replace") for k in attrs)
    data["whole"] = M_WHOLE in meta
    data["negative"] = M_NONE in meta
    data["version"] = meta[M_VERSION].decode() if M_VERSION in meta else None
    data["load_ms"] = int(meta[M_DELTA]) if meta.get(M_DELTA, b"").isdigit() else None
    data["absent_attributes"] = _absent_names(meta.get(M_ABSENT))
    try:
        soft = float(meta[M_SOFT])
        hard = float(meta[M_HARD])
    except (KeyError, ValueError):
        data["state"] = "unreadable"
        data["problem"] = "no soft/hard deadline fields: not an swr_cache entry"
        return
    data["soft_remaining_ms"] = soft - now
    data["hard_remaining_ms"] = hard - now
    if meta.get(M_FORMAT) != _FORMAT:
        data["state"] = "unreadable"
        data["problem"] = (
            f"format {meta.get(M_FORMAT)!r}, this version reads {_FORMAT!r}: read as a miss"
        )
    elif now >= hard:
        data["state"] = "absent"
        data["problem"] = "past its hard deadline; Redis drops it"
    else:
        data["state"] = "fresh" if now < soft else "stale"
    if values:
        source = dict(attrs)
        if M_RESULT in meta:
            source[b"(result)"] = meta[M_RESULT]
        data["values"] = _decoded_values(source)


def _absent_names(raw: bytes | None) -> list[str]:
    """The attribute names an entry knows not to exist (none if unreadable)."""
    if raw is None:
        return []
    try:
        got = _codec.decode(raw)
    except SwrCacheError:
        return []
    return [str(a) for a in got] if isinstance(got, list) else []


def _decoded_values(source: Mapping[bytes, bytes]) -> dict[str, Any]:
    """Each field's value, or a note saying why it does not decode."""
    decoded: dict[str, Any] = {}
    for name, blob in sorted(source.items()):
        try:
            decoded[name.decode("utf-8", "replace")] = _codec.decode(blob)
        except SwrCacheError as exc:
            decoded[name.decode("utf-8", "replace")] = f"<undecodable: {exc}>"
    return decoded


def _inspect(ns: argparse.Namespace) -> int:
    _identity(ns)  # bad input fails before any connection
    return asyncio.run(_with_cache(ns, _inspect_entry))


# -- invalidate ----------------------------------------------------------------


async def _invalidate_now(ns: argparse.Namespace, cache: Cache) -> int:
    identity = _identity(ns, required=False)
    done: list[str] = []
    try:
        if identity is not None:
            if ns.identity is None:
                await cache.invalidate_item(ns.table, _parse_key(ns.key))
                done.append(
                    f"invalidated item {_display(identity)} (entry, lease and its item tags)"
                )
            else:
                await cache.invalidate_identities([identity])
                done.append(f"invalidated {_display(identity)} (entry and lease)")
        if ns.tag:
            await cache.purge_tags(ns.tag)
            done.append(f"purged {len(ns.tag)} tag(s): {', '.join(ns.tag)}")
    except InvalidationError as exc:
        print(f"{PROG}: invalidation failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _emit(ns, {"identity": identity, "tags": ns.tag, "namespace": cache.namespace}, done)
    return EXIT_OK


def _invalidate(ns: argparse.Namespace) -> int:
    if _identity(ns, required=False) is None and not ns.tag:
        raise UsageError("give --table and --key, --identity, or --tag")
    if any(not t for t in ns.tag):
        raise UsageError("--tag must not be empty")
    return asyncio.run(_with_cache(ns, _invalidate_now))


# -- stats -----------------------------------------------------------------------


def _glob_escape(text: str) -> str:
    """Escape SCAN MATCH's glob characters."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _entry_group(identity: str) -> str:
    """Table of an item identity, ``result:<function>`` of a result identity."""
    if identity.startswith("r|"):
        _, name, rendered = identity.split("|", 2)
        if not name:
            # A template key (`@cached(key="orders:{id}")`): group by its first literal part.
            name = re.split(r"[:/|]", rendered, maxsplit=1)[0] + ":*"
        return "result:" + unquote(name)
    return unquote(identity.split("|", 1)[0])


async def _stats_now(ns: argparse.Namespace, cache: Cache) -> int:
    if ns.max_keys < 1:
        raise UsageError("--max-keys must be >= 1")
    engine = engine_of(cache)
    scan = await _scan_namespace(engine, ns.max_keys, ns.timeout)
    states: Counter[str] = Counter()
    if not ns.no_states and scan.entries:
        states = await _entry_states(engine, scan.entries, ns.timeout)
    data: dict[str, Any] = {
        "namespace": cache.namespace,
        "redis": _where(cache),
        "keys_scanned": scan.scanned,
        "complete": scan.complete,
        "by_kind": {_KINDS.get(k, k): n for k, n in sorted(scan.kinds.items())},
        "entries_by_table": dict(scan.groups.most_common()),
        "entry_states": dict(states) if states else None,
    }
    lines = [
        f"namespace {cache.namespace!r} on {_where(cache)}: {scan.scanned} keys"
        + ("" if scan.complete else f" (stopped at --max-keys {ns.max_keys}: counts are partial)"),
        *_stats_lines(scan, states),
    ]
    _emit(ns, data, lines)
    return EXIT_OK


@dataclass
class _Scan:
    """What a bounded SCAN of a namespace found."""

    scanned: int = 0
    complete: bool = False
    kinds: Counter[str] = field(default_factory=Counter)
    groups: Counter[str] = field(default_factory=Counter)
    entries: list[str] = field(default_factory=list)


async def _scan_namespace(engine: Engine, max_keys: int, slot_wait: float) -> _Scan:
    """Count the namespace's keys by kind and its entries by table, up to ``max_keys``."""
    prefix = engine.keys.prefix
    out = _Scan()
    cursor = 0
    while out.scanned < max_keys:
        room = max_keys - out.scanned
        async with engine.slots.hold(slot_wait):
            cursor, keys = await engine.store.scan(
                cursor, _glob_escape(prefix) + "*", min(1000, room)
            )
        # SCAN's COUNT is a hint: a reply may hold more keys than there is room for.
        cut = len(keys) > room
        for raw in keys[:room]:
            key = raw.decode("utf-8", "replace")
            out.scanned += 1
            kind = key[len(prefix) :].split(":", 1)[0]
            out.kinds[kind] += 1
            if kind == "e":
                out.entries.append(key)
                try:
                    out.groups[_entry_group(engine.keys.identity_of(key))] += 1
                except KeyEncodingError:
                    out.groups["(unparsable)"] += 1
        if cursor == 0 and not cut:
            out.complete = True
            break
    return out


async def _entry_states(engine: Engine, entries: list[str], slot_wait: float) -> Counter[str]:
    """How many entries are fresh, stale, negative, expired or unreadable (pipelined by 500)."""
    states: Counter[str] = Counter()
    now = engine.now_ms()
    for i in range(0, len(entries), 500):
        async with engine.slots.hold(slot_wait):
            replies = await engine.store.read_field_lists(
                entries[i : i + 500], [M_SOFT, M_HARD, M_ENTRY]
            )
        for reply in replies:
            states[_state_of(reply, now)] += 1
    return states


def _stats_lines(scan: _Scan, states: Counter[str]) -> list[str]:
    """``stats``' text table: keys by kind (entry states beside entries), entries by table."""
    lines: list[str] = []
    width = max(len(v) for v in _KINDS.values())
    for code, label in _KINDS.items():
        n = scan.kinds.get(code, 0)
        line = f"  {label:<{width}} {n:>9}"
        if code == "e" and states:
            shown = ("fresh", "stale", "negative", "expired", "unreadable")
            line += "   " + "  ".join(f"{s} {states[s]}" for s in shown if states[s])
        lines.append(line)
    others = {k: n for k, n in scan.kinds.items() if k not in _KINDS}
    for code, n in sorted(others.items()):
        lines.append(f"  {code + ' (unknown kind)':<{width}} {n:>9}")
    if scan.groups:
        lines.append("entries by table / function:")
        for group, n in scan.groups.most_common(20):
            lines.append(f"  {group:<{width}} {n:>9}")
        if len(scan.groups) > 20:
            lines.append(f"  ... and {len(scan.groups) - 20} more")
    return lines


def _state_of(reply: Any, now: float) -> str:
    """The state of an entry: its string (a whole entry), or HMGET of a hash's soft, hard and ``\\xffe`` fields."""
    if type(reply) is bytes:  # a whole entry: the deadlines are in its header
        reply = [None, None, reply]
    if isinstance(reply, BaseException) or not isinstance(reply, list):
        return "unreadable"
    soft, hard, entry = reply
    negative = False
    if entry is not None:
        parts = entry.split(b"|", 6)
        if len(parts) < 7 or parts[0] != _FORMAT:
            return "unreadable"
        soft, hard, negative = parts[1], parts[2], parts[5] == b"n"
    try:
        soft_ms, hard_ms = float(soft), float(hard)
    except (TypeError, ValueError):
        return "unreadable"
    if now >= hard_ms:
        return "expired"
    if negative:
        return "negative"
    return "fresh" if now < soft_ms else "stale"


def _stats(ns: argparse.Namespace) -> int:
    if ns.max_keys < 1:
        raise UsageError("--max-keys must be >= 1")
    return asyncio.run(_with_cache(ns, _stats_now))


# -- commands with parsers of their own ---------------------------------------------


def _checkout() -> Path | None:
    """The repository this package runs from, if it is a checkout with the developer tools."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "devtools" / "demo.py").is_file() else None


def _demo(argv: Sequence[str]) -> int:
    """Run the repository's demo (devtools/demo.py): an installed package does not ship it."""
    root = _checkout()
    if root is None:
        print(
            f"{PROG} demo: the demo ships with the repository, not with the package; "
            "run `make demo` in a clone of the repository",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from devtools.demo import main as demo

    return demo(list(argv), prog=f"{PROG} demo")


def _aws_errors() -> tuple[type[BaseException], ...]:
    """botocore's error roots, when botocore is installed (the ``dynamodb`` extra)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return ()
    return (BotoCoreError, ClientError)


def _consume_stream(argv: Sequence[str]) -> int:
    """Run the stream consumer; what goes wrong outside its argparse is one line and exit 1."""
    failures: tuple[type[BaseException], ...] = (RedisError, OSError, SwrCacheError, *_aws_errors())
    try:
        return _consume_stream_unguarded(argv)
    except BrokenPipeError:
        raise
    except ConfigError as exc:
        print(f"{PROG} consume-stream: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except failures as exc:
        print(f"{PROG} consume-stream: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _consume_stream_unguarded(argv: Sequence[str]) -> int:
    try:
        from ._cli_stream import main as consume
    except ImportError:
        # Hook for a streams module that ships its own entry point instead.
        try:
            from . import streams
        except ImportError as exc:
            print(f"{PROG}: consume-stream is unavailable: {exc}", file=sys.stderr)
            return EXIT_FAILED
        entry = getattr(streams, "consume_stream_main", None)
        if entry is None:
            print(f"{PROG}: consume-stream is unavailable in this build", file=sys.stderr)
            return EXIT_FAILED
        return int(entry(list(argv)))
    return int(consume(list(argv)))


def _exit_code(exc: SystemExit) -> int:
    """``sys.exit``'s code as a number: None is 0, a message is 1 (as Python does)."""
    if exc.code is None:
        return EXIT_OK
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return EXIT_FAILED


def _usage() -> str:
    lines = [f"usage: {PROG} <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {text}" for name, text in _COMMANDS.items()]
    lines += ["", f"Run `{PROG} <command> --help` for a command's options."]
    return "\n".join(lines)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file (captured in tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``swr-cache <command> ...``.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 done, 1 Redis unreachable or an invalidation failed,
        2 bad input, 130 interrupted, 141 stdout closed before the output was
        written (``swr-cache stats | head -1``; what a tool killed by SIGPIPE
        reports), which is quiet.
    """
    try:
        code = _main(argv)
        # Piped output sits in the buffer until here: flush while we can still
        # tell a closed pipe from a failure.
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_PIPE
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(_usage(), file=sys.stderr)
        return EXIT_USAGE
    first = args[0]
    if first in ("-h", "--help"):
        print(_usage())
        return EXIT_OK
    if first == "--version":
        from . import __version__

        print(f"{PROG} {__version__}")
        return EXIT_OK
    if first in _PASS_THROUGH:
        try:
            return _demo(args[1:]) if first == "demo" else _consume_stream(args[1:])
        except SystemExit as exc:  # their argparse: --help, or bad options
            return _exit_code(exc)
        except KeyboardInterrupt:  # a second Ctrl-C, past their own clean shutdown
            return 130
    if first not in _COMMANDS:
        print(f"{PROG}: unknown command {first!r} (try --help)", file=sys.stderr)
        return EXIT_USAGE
    try:
        ns = _parser().parse_args(args)
        run: Callable[[argparse.Namespace], int] = ns.run
        return run(ns)
    except UsageError as exc:
        print(f"{PROG}: {exc}" if not str(exc).startswith(PROG) else str(exc), file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help of a command
        return _exit_code(exc)
    except KeyboardInterrupt:
        return 130
