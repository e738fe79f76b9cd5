"""``Recorder``: receives one app response, forwards it and decides what to store."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import _http
from ._rules import (
    _BODY_FIELDS,
    _ENTRY_OVERHEAD,
    _NOT_MODIFIED_FIELDS,
    Message,
    Send,
    _consume,
    _content_length,
    _is_event_stream,
    _LeaderGone,
    _live_matches,
)

if TYPE_CHECKING:
    from ._fetch import Fetch


class Recorder:
    """Receives one app response: forwards it to the client (if any) and buffers a copy.

    ``decided`` resolves as soon as the response's fate is known: an entry to
    store (at the end of a complete body), not stored (as soon as a rule says
    so, while the body keeps streaming to the client), a failed refresh, or
    the app's exception.
    """

    __slots__ = (
        "buffer",
        "client_gone",
        "complete",
        "conditional",
        "decided",
        "declared",
        "fetch",
        "finished",
        "forward_body",
        "freshened",
        "has_auth",
        "has_cookie",
        "headers",
        "held",
        "judgement",
        "live_send",
        "member",
        "request_time",
        "response_time",
        "sent_body",
        "size",
        "status",
        "tags",
        "validated",
    )

    def __init__(
        self,
        fetch: Fetch,
        live_send: Send | None,
        request_time: float,
        *,
        validated: bool,
        conditional: bool,
    ) -> None:
        self.fetch = fetch
        self.live_send = live_send
        self.request_time = request_time
        self.response_time = request_time
        self.validated = validated
        self.conditional = conditional
        self.decided: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        self.decided.add_done_callback(_consume)
        self.finished = asyncio.Event()
        self.buffer: list[bytes] | None = None
        self.size = 0
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.tags: list[str] = []
        self.judgement: _http.Judgement | None = None
        self.forward_body = live_send is not None and not fetch.head
        if live_send is not None:
            self.has_cookie, self.has_auth = fetch.has_cookie, fetch.has_auth
        else:
            # A refresh carries credentials only where the key holds them (Vary).
            sent = {name for name, value in fetch.key.vary if value is not None}
            self.has_cookie, self.has_auth = "cookie" in sent, "authorization" in sent
        self.client_gone = False
        self.complete = False
        self.sent_body = False
        self.declared: int | None = None  # the response's Content-Length
        # A storable response's start, held until its first body message: if
        # the whole body is in it, the client learns whether it was stored.
        self.held: Message | None = None
        self.member = ""
        self.freshened = False  # a live revalidation got a 304: the client gets the entry

    def _decide(self, outcome: tuple[Any, ...]) -> None:
        if not self.decided.done():
            self.decided.set_result(outcome)

    def _not_stored(
        self, reason: str, intrinsic: bool = True, names: tuple[str, ...] | None = None
    ) -> None:
        self.buffer = None
        self._decide(("pass", reason, intrinsic, names))

    def app_done(self, task: asyncio.Task[None]) -> None:
        """The app call ended: settle ``decided`` if the response did not."""
        self.finished.set()
        if self.decided.done():
            return
        if task.cancelled():
            self.decided.set_exception(_LeaderGone())
        elif (exc := task.exception()) is not None:
            self.decided.set_exception(exc)
        else:
            self._not_stored("incomplete response")

    async def synthetic_receive(self) -> Message:
        """A client that sent an empty body and stays until the response is complete."""
        if not self.sent_body:
            self.sent_body = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.finished.wait()
        return {"type": "http.disconnect"}

    async def _forward(self, message: Message) -> None:
        if self.client_gone or self.live_send is None:
            return
        try:
            await self.live_send(message)
        except OSError:
            if self.buffer is None:
                raise  # nothing to finish for anyone else: let the app see it
            # Keep reading the app's response: the requests waiting for this load get it.
            self.client_gone = True

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            await self._body(message)
        elif kind == "http.response.start":
            await self._start(message)
        else:
            self._not_stored(f"{kind} cannot be stored")
            if self.held is not None:
                await self.release(None)
            await self._forward(message)

    async def _start(self, message: Message) -> None:
        ctx = self.fetch.ctx
        self.response_time = ctx.now()
        status: int = message["status"]
        headers, tag_lines = self._split_tags(message)
        self.status = status
        self.headers = headers
        live = self.live_send is not None
        if status == 304 and self.validated:
            self.freshened = True
            self.forward_body = False
            self._decide(self._freshen(headers, tag_lines))
            return
        if not live and status >= 500:
            self._decide(("failed", status))  # the stale entry stays
            return
        j = self._judge(status, headers, self.has_cookie, self.has_auth)
        self.judgement = j
        names: tuple[str, ...] | None = None
        if j.store:
            self.tags = _http.content_tags(tag_lines)
            names = self._screen(message, j)
            if names is not None and j.store:
                # The URL's first response that varies: kept, then stored
                # under the key its Vary names give this request.
                self.buffer = []
                self._hold(message, headers, "fwd=uri-miss")
                return
        if j.store:
            self.buffer = []
        else:
            self._not_stored(j.reason, j.intrinsic, names)
        if not live:
            return
        # The client's response: this is the origin's answer, so no Age.
        member = self._miss_member()
        if j.store:
            self._hold(message, headers, member)
            return
        await self._forward(
            ctx.respond.relabel(message, member + "; stored=?0", self.response_time)
        )

    def _split_tags(self, message: Message) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
        """The response's header lines, and apart from them its surrogate-key lines."""
        tag_fields = self.fetch.ctx.tag_fields
        headers: list[tuple[bytes, bytes]] = []
        tag_lines: list[bytes] = []
        for raw_name, raw_value in message.get("headers", ()):
            name, value = bytes(raw_name), bytes(raw_value)
            if name.lower() in tag_fields:
                tag_lines.append(value)
            else:
                headers.append((name, value))
        return headers, tag_lines

    def _screen(self, message: Message, j: _http.Judgement) -> tuple[str, ...] | None:
        """Refuse (in ``j``) a storable response this cache cannot keep whole.

        Returns the response's Vary names when they differ from the key's
        (``j`` still storable: the URL's first varying response, on a live request).
        """
        ctx = self.fetch.ctx
        key_names = self.fetch.key.names
        tags = self.tags
        length = self.declared = _content_length(self.headers)
        if message.get("trailers"):
            j.refused("trailers")
        elif _is_event_stream(self.headers):
            j.refused("text/event-stream")
        elif length is not None and (
            length > ctx.max_body_size or self._bound(length, tags) > ctx.max_entry_bytes
        ):
            j.refused("body too large")
        elif len(tags) > ctx.max_tags or any(len(t) > ctx.max_tag_length for t in tags):
            j.refused("too many or too long surrogate keys")
        elif j.vary != key_names:
            if not (self.live_send is not None and key_names == ()):
                j.refused("vary changed", intrinsic=False)
            return j.vary
        return None

    def _miss_member(self) -> str:
        """``Cache-Status`` of a response the app sends to the client now."""
        if self.validated:
            return "fwd=stale"
        if self.fetch.key.names:
            return "fwd=vary-miss"  # (the URL's Vary names were known)
        return "fwd=uri-miss"

    def _hold(self, message: Message, headers: list[tuple[bytes, bytes]], member: str) -> None:
        """Keep a storable response's start until its first body message."""
        fetch = self.fetch
        self.member = member
        if self.status == 200 and self.conditional and _live_matches(fetch.h, headers):
            # The client already holds this representation: a 304 for it, while
            # the full response is still read for storage.
            fetch.ctx.metrics.counts["http_not_modified"] += 1
            self.forward_body = False
            message = {
                "type": "http.response.start",
                "status": 304,
                "headers": [(k, v) for k, v in headers if k.lower() in _NOT_MODIFIED_FIELDS],
            }
        self.held = message

    async def release(self, stored: bool | None) -> None:
        """Send the held start, saying whether the response was stored (``None``: not known yet)."""
        message = self.held
        if message is None:
            return
        self.held = None
        member = self.member
        if stored is not None:
            member += "; stored" if stored else "; stored=?0"
        await self._forward(self.fetch.ctx.respond.relabel(message, member, self.response_time))

    def _bound(self, body_size: int, tags: Sequence[str]) -> int:
        """An upper bound of the encoded entry's size for a body of ``body_size`` bytes."""
        key = self.fetch.key
        return (
            body_size
            + sum(len(k) + len(v) + 12 for k, v in self.headers)
            + 2 * len(key.rendered)
            + sum(len(t) + 6 for t in tags)
            + _ENTRY_OVERHEAD
        )

    async def _body(self, message: Message) -> None:
        if self.complete:
            return
        if self.freshened:
            if not message.get("more_body", False):
                self.complete = True
                self.finished.set()
            return
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        buffer = self.buffer
        if buffer is not None:
            self.size += len(body)
            if self.size > self.fetch.ctx.max_body_size:
                self._not_stored("body too large")  # stop buffering, keep streaming
            elif body:
                buffer.append(bytes(body))
        if not more and self.buffer is not None:
            self._check_complete()
        if self.held is not None:
            # Whether it is stored is known only if the whole body came at once.
            await self.release(None if more else self.buffer is not None)
        if self.forward_body:
            await self._forward(message)
        elif not more:
            await self._forward({"type": "http.response.body", "body": b"", "more_body": False})
        if not more:
            self.complete = True
            self.finished.set()
            if self.buffer is not None:
                self._decide(self._entry())

    def _check_complete(self) -> None:
        """Refuse a complete body that its Content-Length or the engine's limit disowns."""
        ctx = self.fetch.ctx
        declared = self.declared
        if declared is not None and declared != self.size:
            # Shorter (or longer) than announced: not the response the app meant (RFC 9112 §6.3).
            ctx.metrics.counts["http_length_mismatches"] += 1
            self._not_stored(f"body of {self.size} bytes, Content-Length {declared}")
        elif self._bound(self.size, self.tags) > ctx.max_entry_bytes:
            self._not_stored("body too large")

    def _entry(self) -> tuple[Any, ...]:
        """The entry of a complete, storable response."""
        j = self.judgement
        assert j is not None
        assert self.buffer is not None
        fetch = self.fetch
        body = b"".join(self.buffer)
        headers = _http.stored_headers(self.headers, j.strip)
        etag = content_type = content_encoding = None
        has_date = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"etag" and etag is None:
                etag = value
            elif lower == b"date":
                has_date = True
            elif lower == b"content-type" and content_type is None:
                content_type = value
            elif lower == b"content-encoding" and content_encoding is None:
                content_encoding = value
        if not has_date:
            headers.append([b"date", _http.format_http_date(self.response_time)])
        generated = False
        if etag is None and self.status == 200:
            etag = _http.content_etag(content_type, content_encoding, body)
            headers.append([b"etag", etag])
            generated = True
        if self.status != 204:
            # Stored as a hit sends it: a hit adds only Age and Cache-Status.
            headers.append([b"content-length", b"%d" % len(body)])
        key = fetch.key
        if j.vary != key.names:
            key = key.with_names(j.vary, fetch.h, fetch.ctx.engine)
        entry = {
            "ok": True,
            "k": key.rendered,
            "s": self.status,
            "h": headers,
            "b": body,
            "qt": self.request_time,
            "rt": self.response_time,
            "a0": j.initial_age,
            "fl": j.freshness,
            "st": j.stale,
            "sh": j.shared,
            "au": j.auth_shared,
            "et": etag,
            "eg": generated,
            "tg": self.tags,
        }
        if key is not fetch.key:
            return ("vary", entry, j, self.tags, key)
        return ("entry", entry, j, self.tags)

    def _judge(
        self, status: int, headers: list[tuple[bytes, bytes]], has_cookie: bool, has_auth: bool
    ) -> _http.Judgement:
        """The middleware's verdict on a response to this fetch (its TTLs and caps)."""
        return self.fetch.ctx.judge(
            status,
            headers,
            request_time=self.request_time,
            response_time=self.response_time,
            has_cookie=has_cookie,
            has_auth=has_auth,
        )

    def _freshen(
        self, headers: list[tuple[bytes, bytes]], tag_lines: list[bytes]
    ) -> tuple[Any, ...]:
        """A 304 to our validators: the stored body with the new headers (RFC 9111 §4.3.4).

        Not storable any more (``no-store`` in the 304, say): ``("pass", ...)``
        with the updated response last, for the request that revalidated only.
        """
        fetch = self.fetch
        stored = fetch.stored
        assert type(stored) is dict
        # The 304 is the newest answer: without a Date of its own, the stored
        # Date goes and its receipt time stands in (added after judging, so a
        # second-resolution Date of our own making adds no apparent age).
        replaced = (
            ({name.lower() for name, _ in headers} | {b"date"}) - _http.HOP_BY_HOP - _BODY_FIELDS
        )
        merged: list[tuple[bytes, bytes]] = []
        length: list[tuple[bytes, bytes]] = []  # the stored body's, kept last
        for k, v in stored["h"]:
            lower = k.lower()
            if lower == b"content-length":
                length.append((k, v))
            elif lower not in replaced:
                merged.append((k, v))
        merged.extend((k, v) for k, v in headers if k.lower() in replaced)
        tags = _http.content_tags(tag_lines) if tag_lines else list(stored.get("tg") or ())
        j = self._judge(200, merged, False, False)
        if not any(name.lower() == b"date" for name, _ in merged):
            merged.append((b"date", _http.format_http_date(self.response_time)))
        merged.extend(length)
        entry = dict(stored)
        entry.update(
            h=[[k, v] for k, v in merged],
            qt=self.request_time,
            rt=self.response_time,
            a0=j.initial_age,
            fl=j.freshness,
            st=j.stale,
            sh=j.shared,
            au=j.auth_shared,
            tg=tags,
        )
        if not j.store or j.vary != fetch.key.names:
            return ("pass", j.reason or "vary changed", j.intrinsic, None, entry)
        return ("entry", entry, j, tags)
