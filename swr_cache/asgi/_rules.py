"""The middleware's shared vocabulary: ASGI types, constants, request reading, pure helpers."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any, Final

from .. import _http

log = logging.getLogger("swr_cache.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Marks a scope this middleware has handled: a second instance refuses it.
_MARK: Final = "swr_cache.cache_middleware"
# The engine identity name of HTTP entries; the version salts every key.
# 2: entries hold their Content-Length line (a hit sends the stored lines as they are).
_IDENTITY: Final = "\x00asgi.2"

# Forwarding headers an app may act on: always part of the key.
_KEYED: Final = (
    b"forwarded",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"x-forwarded-prefix",
    b"x-forwarded-proto",
    b"x-forwarded-scheme",
)
# Requests the cache must not answer or store: a body, partial
# content, preconditions a cache may not evaluate, method overrides, rewrites.
_BYPASS: Final = frozenset(
    {
        b"transfer-encoding",
        b"range",
        b"if-range",
        b"if-match",
        b"if-unmodified-since",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-original-url",
        b"x-rewrite-url",
    }
)
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Extensions removed from the scope of a request whose response may be
# stored: a file sent by path, trailers or early hints cannot be teed.
_UNTEEABLE: Final = (
    "http.response.pathsend",
    "http.response.zerocopysend",
    "http.response.trailers",
    "http.response.early_hint",
)
# The client's validators: evaluated here against the entry, never sent to the
# app when fetching for storage.
_CONDITIONALS: Final = frozenset({b"if-none-match", b"if-modified-since"})
# What a 304 carries (RFC 9110 §15.4.5).
_NOT_MODIFIED_FIELDS: Final = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"}
)
# Fields that describe the stored bytes themselves: a 304 cannot change the
# body, so they keep their stored values (RFC 9111 §3.2).
_BODY_FIELDS: Final = frozenset(
    {b"content-encoding", b"content-range", b"content-md5", b"etag", b"content-length"}
)
_CHUNK: Final = 64 * 1024
# A Content-Length beyond any body this cache would keep (it saturates here).
_MAX_CONTENT_LENGTH: Final = 1 << 62
# Bytes an entry holds besides its body, header lines, key and tags (field
# names, times, a generated ETag, Date and Content-Length), rounded well up.
_ENTRY_OVERHEAD: Final = 512

# Phases of a request's load, as its loader sees them.
_LOOKUP: Final = 0  # the request waits on the engine: the loader may stream to it
_LEADING: Final = 1  # the loader runs the app for this request and streams to it
_DONE: Final = 2  # the request went on: a later call of the loader is a refresh


class _LeaderGone(Exception):
    """The request whose app call was loading the entry went away (cancelled)."""


class _OriginFailed(Exception):
    """A refresh got a 5xx: the stale entry stays (stale-if-error)."""


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _call(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    await app(scope, receive, send)


def _field_name(name: str) -> bytes:
    """A configured field name as :func:`_request_headers` spells it."""
    return name.strip().lower().replace("_", "-").encode("latin-1")


def _request_headers(scope: Scope) -> dict[bytes, bytes]:
    """Request fields by lower-case name, repeated lines combined (``Cookie`` with ``; ``).

    ``_`` in a name counts as ``-``: servers pass ``X_Forwarded_Host`` on and
    frameworks read it as ``X-Forwarded-Host`` (both become
    ``HTTP_X_FORWARDED_HOST``), so every field the key holds, that a Vary
    names or that makes a request bypass is matched in both spellings.
    """
    out: dict[bytes, bytes] = {}
    for raw_name, value in scope["headers"]:
        name = bytes(raw_name).lower()
        if b"_" in name:
            name = name.replace(b"_", b"-")
        prev = out.get(name)
        if prev is None:
            out[name] = bytes(value).strip()
        else:
            out[name] = prev + (b"; " if name == b"cookie" else b", ") + bytes(value).strip()
    return out


class _Replay:
    """A ``receive`` that first hands back the messages the middleware already read."""

    __slots__ = ("has_body", "messages", "receive")

    def __init__(self, messages: list[Message], receive: Receive) -> None:
        self.messages = messages
        self.receive = receive
        self.has_body = False

    @classmethod
    async def read(cls, first: Message, receive: Receive) -> _Replay:
        """Read until the request's body is known to be empty or not (one non-empty chunk)."""
        replay = cls([first], receive)
        message = first
        has_body = bool(first.get("body"))
        while not has_body and message["type"] == "http.request" and message.get("more_body"):
            message = await receive()
            replay.messages.append(message)
            has_body = message["type"] == "http.request" and bool(message.get("body"))
        replay.has_body = has_body
        return replay

    def settled(self) -> Message:
        """For a request without a body: the one message that stands for all those read."""
        last = self.messages[-1]
        if last["type"] != "http.request":
            return last  # the client left
        return {"type": "http.request", "body": b"", "more_body": False}

    async def __call__(self) -> Message:
        if self.messages:
            return self.messages.pop(0)
        return await self.receive()


def _matches(
    entry: Mapping[str, Any], if_none_match: bytes | None, if_modified_since: bytes | None
) -> bool:
    """Whether the client's validators say it already holds this stored 200."""
    if if_none_match is not None:
        return _http.none_match(if_none_match, entry.get("et"))
    if if_modified_since is not None:
        last_modified = date = None
        for name, value in entry["h"]:
            lower = name.lower()
            if lower == b"last-modified" and last_modified is None:
                last_modified = value
            elif lower == b"date" and date is None:
                date = value
        return _http.not_modified_since(if_modified_since, last_modified, date)
    return False


def _validators(stored: Any) -> list[tuple[bytes, bytes]]:
    """The conditional fields that revalidate a stored 200: its app ``ETag``, ``Last-Modified``."""
    out: list[tuple[bytes, bytes]] = []
    if type(stored) is dict and stored.get("ok") and stored.get("s") == 200:
        if stored.get("et") is not None and not stored.get("eg"):
            out.append((b"if-none-match", stored["et"]))
        for name, value in stored["h"]:
            if name.lower() == b"last-modified":
                out.append((b"if-modified-since", value))
                break
    return out


def _forget(registry: dict[str, Any], identity: str, fut: asyncio.Future[Any]) -> None:
    held = registry.get(identity)
    if held is not None and held[0] is fut:
        del registry[identity]


def _settled_without_entry(fut: asyncio.Future[tuple[Any, ...]]) -> bool:
    """A finished revalidation that gave nothing to serve: a later request tries again."""
    if not fut.done():
        return False
    return fut.cancelled() or fut.exception() is not None or fut.result()[0] != "entry"


def _stored_at(entry: Any) -> float:
    """When a stored response arrived (``inf`` for anything else: it joins nothing)."""
    if type(entry) is dict and entry.get("ok"):
        return float(entry["rt"])
    return math.inf


def _live_matches(h: Mapping[bytes, bytes], headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """The client's validators against a response the app is sending now."""
    inm = h.get(b"if-none-match")
    ims = h.get(b"if-modified-since")
    if inm is None and ims is None:
        return False
    etag = last_modified = date = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"etag" and etag is None:
            etag = value
        elif lower == b"last-modified" and last_modified is None:
            last_modified = value
        elif lower == b"date" and date is None:
            date = value
    if inm is not None:
        return etag is not None and _http.none_match(inm, etag)
    assert ims is not None
    return (last_modified is not None or date is not None) and _http.not_modified_since(
        ims, last_modified, date
    )


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            text = value.strip()
            return _http.saturated(text, _MAX_CONTENT_LENGTH) if text.isdigit() else None
    return None


def _is_event_stream(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False
