"""What the client gets: stored responses (hits, 304s), relabelled app responses, pass-throughs.

Stored entries keep their header lines in the form a hit sends them
(``Content-Length`` included), so serving one adds only ``Age`` and
``Cache-Status``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .. import _http
from .._metrics import Metrics
from ._rules import (
    _CHUNK,
    _MARK,
    _NOT_MODIFIED_FIELDS,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    _matches,
)


class Responder:
    """Sends responses to the client with this cache's labels (``Cache-Status``, ``Date``)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        *,
        cache_status: str | None,
        strip_surrogate_keys: bool,
        tag_fields: frozenset[bytes],
        add_date: bool,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.cache_status = cache_status
        # ``Cache-Status`` up to the member: "swr-cache; ".
        self.status_prefix = None if cache_status is None else f"{cache_status}; ".encode()
        self.strip_surrogate_keys = strip_surrogate_keys
        self.tag_fields = tag_fields
        self.add_date = add_date

    def relabel(self, message: Message, member: str, date: float | None = None) -> Message:
        """A response start for the client: surrogate keys out, ``Date`` and ``Cache-Status`` in."""
        out: list[tuple[bytes, bytes]] = []
        has_date = False
        strip = self.strip_surrogate_keys
        for raw_name, value in message.get("headers", ()):
            name = bytes(raw_name).lower()
            if strip and name in self.tag_fields:
                continue
            if name == b"date":
                has_date = True
            out.append((raw_name, value))
        if self.add_date and not has_date:
            out.append((b"date", _http.format_http_date(time.time() if date is None else date)))
        if self.status_prefix is not None:
            out.append((b"cache-status", self.status_prefix + member.encode()))
        relabelled = dict(message)
        relabelled["headers"] = out
        return relabelled

    async def pass_through(self, scope: Scope, receive: Receive, send: Send, member: str) -> None:
        """Hand the request to the app untouched (nothing read from or written to Redis)."""
        self.metrics.counts["http_passes"] += 1
        inner = dict(scope)
        inner[_MARK] = True

        async def relay(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = self.relabel(message, member)
            await send(message)

        await self.app(inner, receive, relay)

    async def serve(
        self,
        send: Send,
        entry: dict[str, Any],
        h: Mapping[bytes, bytes],
        head: bool,
        age: float,
        member: str,
    ) -> None:
        """Send a stored response: ``Age``, ``Cache-Status``, a 304 or the body in chunks."""
        status: int = entry["s"]
        body: bytes = entry["b"]
        stored: list[Any] = entry["h"]
        if (
            status == 200
            and (b"if-none-match" in h or b"if-modified-since" in h)
            and _matches(entry, h.get(b"if-none-match"), h.get(b"if-modified-since"))
        ):
            self.metrics.counts["http_not_modified"] += 1
            stored = [(k, v) for k, v in stored if k.lower() in _NOT_MODIFIED_FIELDS]
            status, body = 304, b""
        prefix = self.status_prefix
        headers = stored + (
            [(b"age", b"%d" % max(0, int(age)))]
            if prefix is None
            else [(b"age", b"%d" % max(0, int(age))), (b"cache-status", prefix + member.encode())]
        )
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if head or len(body) <= _CHUNK:
            await send(
                {"type": "http.response.body", "body": b"" if head else body, "more_body": False}
            )
            return
        view = memoryview(body)
        for start in range(0, len(body), _CHUNK):
            end = start + _CHUNK
            await send(
                {
                    "type": "http.response.body",
                    "body": bytes(view[start:end]),
                    "more_body": end < len(body),
                }
            )

    async def not_cached(self, send: Send) -> None:
        """``only-if-cached`` without a usable stored response: 504 (RFC 9111 §5.2.1.7)."""
        headers = [(b"content-length", b"0")]
        if self.status_prefix is not None:
            headers.append((b"cache-status", self.status_prefix + b"detail=only-if-cached"))
        await send({"type": "http.response.start", "status": 504, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
