"""``CacheMiddleware``: a shared HTTP cache for ASGI apps, on the swr_cache engine.

The middleware stores responses to ``GET`` in Redis and serves them with
RFC 9111 semantics for a *shared* cache, RFC 5861's stale-while-revalidate
and stale-if-error, RFC 9213's targeted fields (``CDN-Cache-Control``) and
RFC 9211's ``Cache-Status``. The README's "HTTP responses" section states the
rules and every departure from them; comments below cite the RFC sections.

One request goes like this:

1. Not ``GET``/``HEAD`` → written through to the app; a 2xx/3xx answer to an
   unsafe method purges every stored variant of the target URI. A ``GET``
   with a body (whatever its framing says: ``receive`` is read first),
   ``Range``, ``If-Match``, a method override, ``Cache-Control: no-store`` or
   ``no-cache`` (client-forced misses) → passed through, never stored.
   Header names match with ``_`` and ``-`` alike.
2. The cache key is the scheme, ``Host``, raw target, the forwarding headers
   (``X-Forwarded-Host``, ...), and the values of the request headers the
   URL's responses ``Vary`` on. The Vary field names are kept per URL in Redis
   (and memoised briefly in the process).
3. The engine reads the entry: fresh → served with ``Age``; stale within its
   stale window → served at once while one background refresh runs (a lease
   makes it one across processes); stale past it but with validators →
   revalidated (a conditional request; a ``304`` serves the stored body);
   absent → one load per key (concurrent requests wait for it, at most
   ``lock_timeout``). The load *is* this request: the app's response is
   streamed to the client as it comes while a copy is buffered (up to
   ``max_body_size``) for storage.
4. A refresh re-runs the request against the app from the stored request
   alone: ``GET``, the target, ``Host``, the Vary-named and forwarding
   headers, validators; no cookies or credentials of the live user, a fresh
   ``contextvars.Context``, a synthetic ``receive``. A 5xx, an exception or a
   timeout keeps the stale entry (stale-if-error); an uncacheable answer
   deletes it.

Where the middleware goes in a stack: *inside* any access control that
relies on what the key does not hold (client IP allow-lists, mTLS identity,
rate limits), or a hit skips them. Every request header, cookie or body that
a handler reads without naming it in ``Vary`` is an unkeyed input: responses
that depend on it must say ``Vary`` (or ``private``). The app's
``BackgroundTask``s do not run on hits. Uvicorn prepends its own ``Date`` to
every response; run it with ``--no-date-header`` (``date_header=False``) so
hits carry the stored ``Date`` only, and pass ``add_date=True`` here.
"""

from __future__ import annotations

import asyncio
import contextvars
import fnmatch
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any, Final
from urllib.parse import urljoin, urlsplit

import anyio
from redis.exceptions import RedisError

from . import _http
from ._cache import Cache
from ._engine_api import EntryRequest, Fill, engine_of
from ._errors import CacheNotEnteredError, ConfigError, InvalidationError
from ._keys import escape, result_identity
from ._policy import Policy

__all__ = ["CacheMiddleware"]

log = logging.getLogger("swr_cache.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Marks a scope this middleware has handled: a second instance refuses it.
_MARK: Final = "swr_cache.cache_middleware"
# The engine identity name of HTTP entries; the version salts every key.
_IDENTITY: Final = "\x00asgi.1"

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
_MEMO_LIMIT: Final = 10_000
# Bytes an entry holds besides its body, header lines, key and tags (field
# names, times, a generated ETag and Date), rounded well up.
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


class _Key:
    """Everything derived from the request that names its entry."""

    __slots__ = (
        "host",
        "identity",
        "keyed",
        "names",
        "primary",
        "rendered",
        "scheme",
        "spec_key",
        "spec_known",
        "tag",
        "target",
        "url",
        "vary",
    )

    def __init__(self) -> None:
        self.scheme = ""
        self.host = ""
        self.target = ""
        self.url = ""
        self.primary = ""  # scheme, host, target and forwarding headers, escaped
        self.rendered = ""  # primary plus the Vary'd values: the full key, kept in the entry
        self.identity = ""
        self.spec_key = ""
        self.spec_known = False  # Redis held a Vary spec for this URL
        self.names: tuple[str, ...] = ()
        self.keyed: list[tuple[bytes, bytes]] = []
        self.vary: list[tuple[str, bytes | None]] = []
        self.tag = ""

    def copy(self) -> _Key:
        other = _Key()
        for name in self.__slots__:
            setattr(other, name, getattr(self, name))
        return other


class CacheMiddleware:
    """Cache an ASGI app's ``GET`` responses in Redis as a shared HTTP cache.

    The middleware never opens or closes Redis: enter the cache in the app's
    lifespan (``async with cache:``). It keeps no per-request state on
    itself; non-HTTP scopes (lifespan, websocket) pass straight through.

    Args:
        app: The ASGI app to wrap.
        cache: An entered (by the lifespan) ``Cache``.
        soft_ttl: Freshness of responses that carry no explicit freshness
            (``s-maxage``, ``max-age``, ``Expires``); only for statuses 200,
            203, 204, 300, 301 and 308. Default: the cache's.
        hard_ttl: ``hard_ttl - soft_ttl`` is the grace: how long such a
            response may be served stale while it is refreshed.
        grace_for_explicit: Whether the grace also applies to responses with
            explicit freshness (not with ``must-revalidate``,
            ``proxy-revalidate``, nor ``s-maxage`` without a ``stale-*``).
        max_ttl: Cap on any freshness lifetime, seconds.
        max_stale: Cap on any stale window, seconds.
        max_body_size: Larger bodies stream through unstored. Capped at the
            cache's ``max_entry_bytes``: a response is labelled ``stored``
            only when its whole entry fits what the engine stores.
        lock_timeout: How long a request waits for another's load of the same
            key before asking the app itself (``None``: no bound).
        refresh_timeout: A background refresh that takes longer counts as
            failed (the stale entry stays).
        request_directives: Honour the request's ``Cache-Control``
            (``no-cache``, ``max-age``, ``min-fresh``, ``only-if-cached``).
            ``False`` lets no client force a miss; ``no-store`` always bypasses.
        ignore_cookies: Cookie names (``fnmatch`` patterns, e.g. ``"_ga*"``)
            that do not make a request personal. A request with only such
            cookies is cached, and they are removed before the app sees it,
            so the app cannot reflect them into a shared response.
        key_headers: Request headers added to every key (beyond ``Host`` and
            the forwarding headers).
        cache_status: The cache's name in ``Cache-Status``; ``None`` sends no
            ``Cache-Status``. The cache key is never exposed.
        strip_surrogate_keys: Remove ``Surrogate-Key``/``xkey`` before the
            client sees them (keep them for a CDN that uses them).
        max_tags, max_tag_length: A response with more or longer tags is not
            stored (its purges could not all be honoured).
        uncacheable_ttl: Seconds an URL whose response could not be stored is
            passed straight to the app (no waiting behind a load); ``0`` off.
        vary_memo_ttl: Seconds the process remembers a URL's Vary names.
        add_date: Add ``Date`` to responses that lack one (with a server that
            adds none, e.g. ``uvicorn --no-date-header``).
        bypass: ``bypass(scope) -> bool``: requests for which it is true pass
            straight through.
        cache_by_default: ``True`` (the default) stores any storable
            response, giving those without explicit freshness ``soft_ttl``.
            ``False`` stores only responses the app marks as shareable:
            ``public``, ``s-maxage``, or ``max-age`` (without ``private`` or
            ``no-store``); ``/openapi.json`` and friends then pass through.
        targeted_fields: Targeted cache-control fields (RFC 9213) this cache
            obeys, highest priority first (a name of your own, then
            ``CDN-Cache-Control``, say). The first one a response carries with
            a valid value replaces its ``Cache-Control`` and ``Expires`` here;
            ``()`` ignores them all.
        revalidate_window: Seconds a stale response with validators (an
            ``ETag`` from the app, or ``Last-Modified``) is kept past its stale
            window, so that the next request revalidates it (a conditional
            request to the app; a ``304`` serves the stored body) instead of
            fetching it whole. ``0`` drops it at the end of its stale window.
        name: The metrics name in ``cache.stats()``.

    Raises:
        ConfigError: On invalid TTLs or limits.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        cache: Cache,
        soft_ttl: float | None = None,
        hard_ttl: float | None = None,
        grace_for_explicit: bool = True,
        max_ttl: float = 86400.0,
        max_stale: float = 86400.0,
        max_body_size: int = 512 * 1024,
        lock_timeout: float | None = 5.0,
        refresh_timeout: float = 30.0,
        request_directives: bool = True,
        ignore_cookies: Iterable[str] = (),
        key_headers: Iterable[str] = (),
        cache_status: str | None = "swr-cache",
        strip_surrogate_keys: bool = True,
        max_tags: int = 64,
        max_tag_length: int = 256,
        uncacheable_ttl: float = 5.0,
        vary_memo_ttl: float = 1.0,
        add_date: bool = False,
        bypass: Callable[[Scope], bool] | None = None,
        name: str = "http",
        cache_by_default: bool = True,
        targeted_fields: Iterable[str] = ("CDN-Cache-Control",),
        revalidate_window: float = 300.0,
    ) -> None:
        self.app = app
        self.cache = cache
        self.engine = engine_of(cache)
        self.policy: Policy = cache.policy.with_overrides(soft_ttl=soft_ttl, hard_ttl=hard_ttl)
        if max_body_size < 0 or max_tags < 0 or max_tag_length < 1:
            raise ConfigError("max_body_size and max_tags must be >= 0, max_tag_length >= 1")
        if not (max_ttl > 0 and max_stale >= 0 and refresh_timeout > 0):
            raise ConfigError("max_ttl and refresh_timeout must be > 0, max_stale >= 0")
        if lock_timeout is not None and lock_timeout <= 0:
            raise ConfigError("lock_timeout must be > 0 or None")
        if (
            cache_status is not None
            and not cache_status.replace("-", "").replace(".", "").isalnum()
        ):
            raise ConfigError(f"cache_status must be a token, got {cache_status!r}")
        self.grace = self.policy.hard_ttl - self.policy.soft_ttl
        self.grace_for_explicit = grace_for_explicit
        self.max_ttl = float(max_ttl)
        self.max_stale = float(max_stale)
        # What the engine would refuse to store is never labelled stored.
        self.max_body_size = min(max_body_size, cache.max_entry_bytes)
        self.cache_by_default = cache_by_default
        self.targeted_fields: tuple[bytes, ...] = tuple(
            _field_name(n) for n in targeted_fields if n.strip()
        )
        if revalidate_window < 0:
            raise ConfigError("revalidate_window must be >= 0")
        self.revalidate_window = float(revalidate_window)
        self.lock_timeout = lock_timeout
        self.refresh_timeout = float(refresh_timeout)
        self.request_directives = request_directives
        self.ignore_cookies = tuple(ignore_cookies)
        extra = {_field_name(h) for h in key_headers}
        self.key_headers: tuple[bytes, ...] = tuple(sorted(set(_KEYED) | extra))
        self.cache_status = cache_status
        self.strip_surrogate_keys = strip_surrogate_keys
        self.tag_fields = frozenset({b"surrogate-key", b"xkey"})
        self.max_tags = max_tags
        self.max_tag_length = max_tag_length
        self.uncacheable_ttl = float(uncacheable_ttl)
        self.vary_memo_ttl = float(vary_memo_ttl)
        self.add_date = add_date
        self.bypass = bypass
        self.metrics = cache.metrics.get(name)
        self._vary_memo: dict[str, tuple[tuple[str, ...], bool, float]] = {}
        self._uncacheable: dict[str, float] = {}
        self._bases: dict[tuple[Any, ...], _Key] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Entry identity -> outcome of the revalidation (or refresh) under way.
        # (Both keep the ``rt`` of the stored response they revalidate: a
        # request holding a newer one does not join them.)
        self._revalidating: dict[str, tuple[asyncio.Future[tuple[Any, ...]], float]] = {}

    # -- entry point -----------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _MARK in scope:
            raise ConfigError("CacheMiddleware is installed twice around this app")
        method = scope["method"]
        if method == "GET" or method == "HEAD":
            await self._get(scope, receive, send, method == "HEAD")
        else:
            await self._write_through(scope, receive, send, method)

    # -- public helpers ----------------------------------------------------------

    @staticmethod
    def url_tag(url: str) -> str:
        """The tag every stored variant of ``url`` carries (``scheme://host/path?query``).

        The host is lower-cased and a default port dropped; the path and query
        must be spelled as clients send them (percent-encoding included).
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = _http.authority(scheme, parts.netloc.encode("latin-1"), None)
        request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return _http.uri_tag(_http.url_for(scheme, host, request_target))

    async def purge_url(self, url: str) -> None:
        """Remove every stored variant of ``url`` (see :meth:`url_tag`).

        Raises:
            InvalidationError: Redis could not be reached.
        """
        await self.cache.purge_tags([self.url_tag(url)])

    # -- time ----------------------------------------------------------------------

    def _now(self) -> float:
        # Redis server time (seconds): every process agrees on ages.
        return self.engine.now_ms() / 1000.0

    # -- write-through (every method but GET and HEAD) ------------------------------

    async def _write_through(self, scope: Scope, receive: Receive, send: Send, method: str) -> None:
        inner = dict(scope)
        inner[_MARK] = True
        unsafe = method not in _SAFE_METHODS
        self.metrics.counts["http_passes"] += 1

        async def relay(message: Message) -> None:
            if message["type"] == "http.response.start":
                if unsafe and 200 <= message["status"] < 400:
                    # Before the client hears back: its next GET must not see old data.
                    await self._purge_after_write(scope, message.get("headers", ()))
                message = self._relabel(message, "fwd=method")
            await send(message)

        await self.app(inner, receive, relay)

    async def _purge_after_write(self, scope: Scope, response_headers: Iterable[Any]) -> None:
        """Purge the target URI and same-origin Location/Content-Location."""
        h = _request_headers(scope)
        scheme = scope.get("scheme", "http")
        host = _http.authority(scheme, h.get(b"host"), scope.get("server"))
        url = _http.url_for(scheme, host, _http.target(scope))
        tags = [_http.uri_tag(url)]
        for raw_name, raw_value in response_headers:
            if bytes(raw_name).lower() not in (b"location", b"content-location"):
                continue
            try:
                other = urlsplit(urljoin(url, bytes(raw_value).decode("latin-1").strip()))
            except ValueError:
                continue  # not a URL (an unclosed IPv6 bracket): it names nothing of ours
            # Another origin's URIs are never purged from here (a DoS guard).
            if (
                other.scheme != scheme
                or _http.authority(scheme, other.netloc.encode("latin-1"), None) != host
            ):
                continue
            other_target = (other.path or "/") + (f"?{other.query}" if other.query else "")
            tags.append(_http.uri_tag(_http.url_for(scheme, host, other_target)))
        try:
            await self.cache.purge_tags(tags)
        except InvalidationError as exc:
            # The write happened; failing the response would invite a retry of a
            # non-idempotent request. Say it loudly instead.
            self.metrics.counts["http_purge_errors"] += 1
            log.error("swr_cache: could not purge %s after %s: %s", url, scope["method"], exc)
        else:
            self.metrics.counts["http_purges"] += 1

    # -- pass-through ------------------------------------------------------------------

    def _relabel(self, message: Message, member: str, date: float | None = None) -> Message:
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
        if self.cache_status is not None:
            out.append((b"cache-status", f"{self.cache_status}; {member}".encode()))
        relabelled = dict(message)
        relabelled["headers"] = out
        return relabelled

    async def _pass(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        member: str,
    ) -> None:
        """Hand the request to the app untouched (nothing read from or written to Redis)."""
        self.metrics.counts["http_passes"] += 1
        inner = dict(scope)
        inner[_MARK] = True

        async def relay(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = self._relabel(message, member)
            await send(message)

        await self.app(inner, receive, relay)

    # -- GET and HEAD -------------------------------------------------------------------

    async def _get(self, scope: Scope, receive: Receive, send: Send, head: bool) -> None:
        h = _request_headers(scope)
        length = h.get(b"content-length")
        if (
            (length is not None and length not in (b"0", b""))
            or not _BYPASS.isdisjoint(h)
            or (self.bypass is not None and self.bypass(scope))
        ):
            await self._pass(scope, receive, send, "fwd=bypass")
            return
        # What the request's framing says is not enough: an HTTP/2 or HTTP/3
        # request may carry a body with neither Content-Length nor
        # Transfer-Encoding. Its first message tells (for HTTP/1.x it is
        # already complete, so this costs no wait).
        first = await receive()
        if first["type"] == "http.request" and (first.get("body") or first.get("more_body")):
            replay = await _Replay.read(first, receive)
            if replay.has_body:
                await self._pass(scope, replay, send, "fwd=bypass")
                return
            first = replay.settled()
        directives = _http.RequestDirectives()
        if b"cache-control" in h or b"pragma" in h:
            directives = _http.RequestDirectives.parse(h.get(b"cache-control"), h.get(b"pragma"))
            if directives.no_store:
                await self._pass(scope, _Replay([first], receive), send, "fwd=bypass")
                return
            if not self.request_directives:
                directives = _http.RequestDirectives()
            elif directives.no_cache:
                await self._pass(scope, _Replay([first], receive), send, "fwd=request")
                return
        # Credentials: stored and answered only with explicitly shared responses.
        has_auth = b"authorization" in h
        has_cookie = False
        cookie = h.get(b"cookie")
        if cookie is not None:
            has_cookie = self._personal(cookie)
            if not has_cookie:
                del h[b"cookie"]  # only ignorable cookies: the app never sees them
        key = await self._key(scope, h)
        if self._uncacheable:
            until = self._uncacheable.get(key.identity)
            if until is not None:
                if until > time.monotonic():
                    await self._pass(
                        scope, _Replay([first], receive), send, "fwd=uri-miss; detail=uncacheable"
                    )
                    return
                del self._uncacheable[key.identity]

        fetch = _Fetch(self, scope, receive, send, h, key, head, has_cookie, has_auth, first)
        req = self.engine.request(
            metrics=self.metrics,
            policy=self.policy,
            identity=key.identity,
            is_item=False,
            attrs=None,
            loader=fetch,
        )
        started = self._now()
        if directives.only_if_cached:
            await self._only_if_cached(req, fetch, send, started)
            return
        value: Any = None
        timed_out = False
        try:
            async with asyncio.timeout(self.lock_timeout) as timeout:
                fetch.timeout = timeout
                value = await self.engine.get(req)
                if fetch.phase == _LOOKUP:
                    fetch.phase = _DONE
                    fetch.stored = value  # the validators a refresh sends
        except CacheNotEnteredError:
            raise
        except Exception:
            if fetch.phase == _LEADING:
                await fetch.finish()  # the app's own outcome (its exception) is the answer
                return
            fetch.phase = _DONE
            if timeout.expired():
                timed_out = True
                self.metrics.counts["http_lock_timeouts"] += 1
            else:
                # The load this request waited for failed: ask the app for ourselves.
                log.debug("swr_cache: a shared load failed; passing through", exc_info=True)
        except BaseException:
            if fetch.phase == _LEADING and fetch.task is not None:
                fetch.task.cancel()
            fetch.phase = _DONE
            raise
        if fetch.phase == _LEADING:
            await fetch.finish()
            return
        if timed_out:
            await self._pass(
                scope, _Replay([first], receive), send, "fwd=uri-miss; detail=lock-timeout"
            )
            return
        await self._answer(scope, receive, send, fetch, value, directives, started)

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        fetch: _Fetch,
        value: Any,
        directives: _http.RequestDirectives,
        started: float,
    ) -> None:
        """Serve an entry the engine returned, if it may answer this request."""
        entry = value if type(value) is dict else None
        if entry is None or not entry.get("ok") or entry.get("k") != fetch.key.rendered:
            # Another request's response that is not reusable (or a foreign entry).
            await self._pass(scope, fetch.live_receive(), send, "fwd=uri-miss")
            return
        if (fetch.has_cookie and not entry["sh"]) or (fetch.has_auth and not entry["au"]):
            await self._pass(scope, fetch.live_receive(), send, "fwd=bypass")
            return
        now = self._now()
        age = entry["a0"] + max(0.0, now - entry["rt"])
        ttl = entry["fl"] - age
        if (directives.max_age is not None and age > directives.max_age) or (
            directives.min_fresh is not None and ttl < directives.min_fresh
        ):
            await self._pass(scope, fetch.live_receive(), send, "fwd=request")
            return
        if ttl < 0 and -ttl >= entry["st"]:
            # Past the window it may be served stale in: kept only to revalidate.
            await fetch.revalidate(entry)
            return
        if entry["rt"] > started:
            member = "fwd=uri-miss; collapsed"  # produced for a concurrent request
        else:
            member = f"hit; ttl={math.floor(ttl)}"
        await self._serve(send, entry, fetch, age, member)

    async def _only_if_cached(
        self, req: EntryRequest, fetch: _Fetch, send: Send, started: float
    ) -> None:
        """``only-if-cached``: a usable stored response, else 504; never the app."""
        fetch.phase = _DONE
        peeked = await self.engine.peek(req)
        entry = peeked[0] if peeked is not None else None
        if (
            type(entry) is dict
            and entry.get("ok")
            and entry.get("k") == fetch.key.rendered
            and not (fetch.has_cookie and not entry["sh"])
            and not (fetch.has_auth and not entry["au"])
        ):
            now = self._now()
            age = entry["a0"] + max(0.0, now - entry["rt"])
            if entry["fl"] - age > -entry["st"]:  # not past its stale window
                ttl = math.floor(entry["fl"] - age)
                await self._serve(send, entry, fetch, age, f"hit; ttl={ttl}")
                return
        headers = [(b"content-length", b"0")]
        if self.cache_status is not None:
            headers.append(
                (b"cache-status", f"{self.cache_status}; detail=only-if-cached".encode())
            )
        await send({"type": "http.response.start", "status": 504, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _serve(
        self, send: Send, entry: dict[str, Any], fetch: _Fetch, age: float, member: str
    ) -> None:
        """Send a stored response: ``Age``, ``Cache-Status``, a 304 or the body in chunks."""
        status: int = entry["s"]
        body: bytes = entry["b"]
        if status == 200 and _matches(
            entry, fetch.h.get(b"if-none-match"), fetch.h.get(b"if-modified-since")
        ):
            self.metrics.counts["http_not_modified"] += 1
            headers = [(k, v) for k, v in entry["h"] if k.lower() in _NOT_MODIFIED_FIELDS]
            status, body = 304, b""
        else:
            headers = [(k, v) for k, v in entry["h"]]
            if status != 204:
                headers.append((b"content-length", b"%d" % len(body)))
        headers.append((b"age", b"%d" % max(0, int(age))))
        if self.cache_status is not None:
            headers.append((b"cache-status", f"{self.cache_status}; {member}".encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if fetch.head or len(body) <= _CHUNK:
            await send(
                {
                    "type": "http.response.body",
                    "body": b"" if fetch.head else body,
                    "more_body": False,
                }
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

    # -- keys ------------------------------------------------------------------------------

    def _personal(self, cookie: bytes) -> bool:
        """Whether a ``Cookie`` holds any cookie not on the ignore list."""
        patterns = self.ignore_cookies
        if not patterns:
            return True
        for part in cookie.split(b";"):
            name = part.split(b"=", 1)[0].strip().decode("latin-1")
            if name and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                return True
        return False

    async def _key(self, scope: Scope, h: Mapping[bytes, bytes]) -> _Key:
        scheme = scope.get("scheme", "http")
        host_header = h.get(b"host")
        keyed_values = tuple(h.get(n) for n in self.key_headers)
        # What the URL part of the key depends on: derived once per distinct
        # request line (escaping costs more than the lookup).
        raw = (
            scheme,
            host_header,
            scope.get("server") if host_header is None else None,
            scope.get("raw_path"),
            scope.get("path"),
            scope.get("root_path"),
            scope.get("query_string"),
            keyed_values,
        )
        key = self._bases.get(raw)
        if key is None:
            key = self._base(scope, scheme, host_header, keyed_values)
            if len(self._bases) >= _MEMO_LIMIT:
                self._bases.clear()
            self._bases[raw] = key
        names, known = await self._vary_names(key)
        key = self._with_names(key, names, h)
        key.spec_known = known
        return key

    @staticmethod
    def _with_names(base: _Key, names: tuple[str, ...], h: Mapping[bytes, bytes]) -> _Key:
        """A copy of ``base`` keyed also on the request's values of the ``Vary`` names."""
        key = base.copy()
        key.names = names
        key.spec_known = True
        key.vary = [(n, h.get(n.encode("latin-1"))) for n in names]
        if names:
            key.rendered = key.primary + "|" + _http.render_pairs(key.vary)
            key.identity = result_identity(_IDENTITY, _http.hashed(key.rendered))
        return key

    async def _store_variant(self, key: _Key, fill: Fill) -> None:
        """Store a response under another key than its request's (its Vary names, learnt now)."""

        async def loader(attrs: object) -> Fill:
            return fill

        req = self.engine.request(
            metrics=self.metrics,
            policy=self.policy,
            identity=key.identity,
            is_item=False,
            attrs=None,
            loader=loader,
        )
        try:
            await self.engine.get(req)
        except Exception as exc:  # a failed store is a later miss, not this client's error
            log.debug("swr_cache: could not store the variant of %s: %r", key.url, exc)

    def _base(
        self,
        scope: Scope,
        scheme: str,
        host_header: bytes | None,
        keyed_values: tuple[bytes | None, ...],
    ) -> _Key:
        """The part of a key that the request line and forwarding headers decide."""
        key = _Key()
        key.scheme = scheme
        host = key.host = _http.authority(scheme, host_header, scope.get("server"))
        request_target = key.target = _http.target(scope)
        key.url = _http.url_for(scheme, host, request_target)
        key.tag = _http.uri_tag(key.url)
        keyed = key.keyed = [
            (n, v) for n, v in zip(self.key_headers, keyed_values, strict=True) if v is not None
        ]
        primary = f"{escape(scheme)}|{escape(host)}|{escape(request_target)}|" + ",".join(
            f"{escape(n.decode('latin-1'))}={escape(v.decode('latin-1'))}" for n, v in keyed
        )
        key.primary = primary
        key.spec_key = f"{self.engine.keys.prefix}hv:{{{_http.hashed(primary)}}}"
        # Without Vary names, the full key is the primary one.
        key.rendered = primary + "|"
        key.identity = result_identity(_IDENTITY, _http.hashed(key.rendered))
        return key

    async def _vary_names(self, key: _Key) -> tuple[tuple[str, ...], bool]:
        """The Vary field names stored for this URL (memoised for ``vary_memo_ttl``)."""
        memo = self._vary_memo.get(key.primary)
        now = time.monotonic()
        if memo is not None and memo[2] > now:
            return memo[0], memo[1]
        engine = self.engine
        names: tuple[str, ...] = ()
        known = False
        if not engine.breaker.is_open:
            try:
                async with engine.slots.hold(engine.call_timeout):
                    raw = await engine.store.get_value(key.spec_key)
            except (RedisError, OSError):
                # Reads fail open: the engine's own read will bypass Redis too.
                self.metrics.counts["redis_errors"] += 1
                return (), False
            if raw is not None:
                known = True
                names = tuple(n for n in bytes(raw).decode("latin-1").split(",") if n)
        self._remember_vary(key.primary, names, known)
        return names, known

    def _remember_vary(self, primary: str, names: tuple[str, ...], known: bool) -> None:
        memo = self._vary_memo
        if len(memo) >= _MEMO_LIMIT:
            memo.clear()
        memo[primary] = (names, known, time.monotonic() + self.vary_memo_ttl)

    def _vary_keep(self, j: _http.Judgement) -> float:
        """How long a URL's Vary names are kept: as long as a variant may be served or revalidated."""
        return max(j.soft, 0) + j.stale + self.revalidate_window + self.policy.hard_ttl

    async def _store_vary(self, key: _Key, names: tuple[str, ...], keep_s: float) -> None:
        """Record a URL's Vary names in Redis (a response's ``Vary`` differs from the key's)."""
        self._remember_vary(key.primary, names, True)
        engine = self.engine
        try:
            async with engine.slots.hold(engine.call_timeout):
                await engine.store.set_value(
                    key.spec_key,
                    ",".join(names).encode("latin-1"),
                    max(1000, round(keep_s * 1000)),
                )
        except (RedisError, OSError) as exc:
            self.metrics.counts["redis_errors"] += 1
            log.debug("swr_cache: could not store Vary names of %s: %r", key.url, exc)

    def _remember_uncacheable(self, identity: str) -> None:
        if self.uncacheable_ttl <= 0:
            return
        memo = self._uncacheable
        if len(memo) >= _MEMO_LIMIT:
            memo.clear()
        memo[identity] = time.monotonic() + self.uncacheable_ttl

    async def _delete_entry(self, key: _Key) -> None:
        """Drop an entry whose refresh came back uncacheable."""
        engine = self.engine
        try:
            async with engine.slots.hold(engine.call_timeout):
                await engine.store.delete(engine.keys.entry(key.identity))
        except (RedisError, OSError) as exc:
            self.metrics.counts["redis_errors"] += 1
            log.warning("swr_cache: could not delete the uncacheable entry of %s: %r", key.url, exc)

    def _fill_policy(self, j: _http.Judgement, elapsed: float, entry: dict[str, Any]) -> Policy:
        """The engine's deadlines for an entry: fresh, stale-servable, then kept to revalidate.

        Past its stale window an entry with validators stays (for
        ``revalidate_window``) only to be revalidated; the middleware never
        serves it from there without asking the app.
        """
        soft = max(j.soft - elapsed, 0.001)
        stale_until = max(j.soft, 0.0) + j.stale - elapsed
        if self.revalidate_window > 0 and _validators(entry):
            stale_until += self.revalidate_window
        return Policy(
            soft_ttl=soft,
            hard_ttl=max(stale_until, soft),
            early_refresh=self.policy.early_refresh,
        )


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


class _Fetch:
    """The engine's loader for one request's entry.

    Called while its request still waits on the engine, it runs the app for
    that request (streaming to the client) and returns once it knows what to
    store. Called later, by a background refresh, it re-runs the request from
    the stored request alone.
    """

    __slots__ = (
        "first",
        "h",
        "has_auth",
        "has_cookie",
        "head",
        "key",
        "mw",
        "phase",
        "rec",
        "receive",
        "scope",
        "send",
        "state",
        "stored",
        "task",
        "timeout",
    )

    def __init__(
        self,
        mw: CacheMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        h: dict[bytes, bytes],
        key: _Key,
        head: bool,
        has_cookie: bool,
        has_auth: bool,
        first: Message,
    ) -> None:
        self.mw = mw
        self.scope = scope
        self.receive = receive
        self.first = first  # the request message the middleware read (no body)
        self.rec: _Recorder | None = None
        self.send = send
        self.h = h
        self.key = key
        self.head = head
        self.has_cookie = has_cookie
        self.has_auth = has_auth
        # The lifespan state as it was when the request arrived: the app may
        # add the user to its request state, which a refresh must not see.
        state = scope.get("state")
        self.state = dict(state) if state is not None else None
        self.phase = _LOOKUP
        self.timeout: asyncio.Timeout | None = None
        self.task: asyncio.Task[None] | None = None
        self.stored: Any = None

    def live_receive(self) -> Receive:
        """The request's ``receive`` for the app, starting with the message already read."""
        return _Replay([self.first], self.receive)

    async def finish(self) -> None:
        """Wait for the app call this request leads (its exception, if any, propagates)."""
        assert self.task is not None
        await self.task
        rec = self.rec
        if rec is not None and rec.held is not None:
            await rec.release(None)  # the app ended without a body: its client still gets the start

    def _lead(self) -> bool:
        """Take the live request for this load, unless it already gave up waiting."""
        timeout = self.timeout
        if timeout is not None:
            try:
                timeout.reschedule(None)  # the app's own pace now bounds the request
            except RuntimeError:
                return False  # the wait bound fired first: the request passes through
        self.phase = _LEADING
        return True

    async def __call__(self, attrs: object) -> Fill:
        if self.phase == _LOOKUP and self._lead():
            return await self._load(live=True)
        mw = self.mw
        identity = self.key.identity
        held = mw._revalidating.get(identity)
        if held is not None and _stored_at(self.stored) <= held[1]:
            # A request is revalidating the response this refresh would (or
            # just did): its outcome is this refresh's, stored under our lease
            # (a failure too: the engine backs off rather than ask again at once).
            with anyio.fail_after(mw.refresh_timeout):
                outcome = await asyncio.shield(held[0])
            return await self._conclude(outcome, live=False)
        return await self._load(live=False)

    async def revalidate(self, entry: dict[str, Any]) -> None:
        """Answer from a stale entry past its stale window: a conditional request to the app.

        A ``304`` freshens the stored headers (RFC 9111 §4.3.4) and the stored
        body answers; a ``200`` streams to the client and replaces the entry.
        One request per entry does it in this process; the others arriving
        meanwhile wait for its outcome. The engine's background refresh of the
        entry, started by the same stale read, stores that outcome under its
        lease instead of asking the app again.
        """
        mw = self.mw
        identity = self.key.identity
        self.phase = _DONE
        held = mw._revalidating.get(identity)
        if held is not None and entry["rt"] <= held[1] and not _settled_without_entry(held[0]):
            try:
                with anyio.fail_after(mw.refresh_timeout):
                    joined = await asyncio.shield(held[0])
            except Exception:  # it timed out, or the app failed it: ask the app ourselves
                joined = ("failed", 0)
            if joined[0] == "entry" and joined[1]["k"] == self.key.rendered:
                fresh = joined[1]
                age = fresh["a0"] + max(0.0, mw._now() - fresh["rt"])
                await mw._serve(self.send, fresh, self, age, "fwd=stale; collapsed")
            else:
                await mw._pass(self.scope, self.live_receive(), self.send, "fwd=stale")
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fut.add_done_callback(_consume)
        mw._revalidating[identity] = (fut, entry["rt"])
        mw.metrics.counts["http_revalidations"] += 1
        self.stored = entry
        scope = self._live_scope()
        scope["headers"] = [*scope["headers"], *_validators(entry)]
        rec = _Recorder(self, self.send, mw._now(), validated=True, conditional=True)
        self.rec = rec
        self.task = task = loop.create_task(_call(mw.app, scope, self.live_receive(), rec.send))
        task.add_done_callback(rec.app_done)
        outcome: tuple[Any, ...] = ("failed", 0)
        try:
            outcome = await asyncio.shield(rec.decided)
        except BaseException:
            if not task.done():
                task.cancel()
            if not isinstance(rec.decided.exception() if rec.decided.done() else None, Exception):
                raise
        finally:
            if rec.status >= 500:
                outcome = ("failed", rec.status)  # the stale entry stays for the next try
            fut.set_result(outcome)
            # Kept a moment for the engine's refresh that this stale read started.
            loop.call_later(mw.refresh_timeout, _forget, mw._revalidating, identity, fut)
        if rec.freshened:
            member = "fwd=stale; fwd-status=304"
            if outcome[0] == "entry":
                fresh = outcome[1]
            elif outcome[0] == "pass" and len(outcome) > 4:
                fresh = outcome[4]  # for this request only: it is not stored
                member += "; stored=?0"
            else:
                fresh = None
            if fresh is not None:
                age = fresh["a0"] + max(0.0, mw._now() - fresh["rt"])
                await mw._serve(self.send, fresh, self, age, member)
            else:
                await mw._pass(self.scope, self.live_receive(), self.send, "fwd=stale")
        await self.finish()

    # -- scopes -------------------------------------------------------------------------

    def _live_scope(self) -> Scope:
        scope = dict(self.scope)
        scope[_MARK] = True
        scope["method"] = "GET"  # a HEAD miss fetches the GET it can be answered from
        scope["headers"] = [
            (k, v)
            for k, v in self.scope["headers"]
            if (name := bytes(k).lower().replace(b"_", b"-")) not in _CONDITIONALS
            and (name != b"cookie" or b"cookie" in self.h)
        ]
        extensions = scope.get("extensions")
        if extensions:
            scope["extensions"] = {k: v for k, v in extensions.items() if k not in _UNTEEABLE}
        return scope

    def _refresh_scope(self) -> tuple[Scope, bool]:
        """A request built from the stored request only; and whether it carries validators."""
        src = self.scope
        key = self.key
        headers: list[tuple[bytes, bytes]] = []
        host = self.h.get(b"host")
        if host is not None:
            headers.append((b"host", host))
        headers.extend(key.keyed)
        for name, value in key.vary:
            if value is not None and name != "host":
                headers.append((name.encode("latin-1"), value))
        validators = _validators(self.stored)
        headers.extend(validators)
        validated = bool(validators)
        scope: Scope = {
            "type": "http",
            "asgi": dict(src.get("asgi") or {"version": "3.0"}),
            "http_version": src.get("http_version", "1.1"),
            "method": "GET",
            "scheme": key.scheme,
            "path": src.get("path", "/"),
            "raw_path": src.get("raw_path"),
            "query_string": src.get("query_string", b""),
            "root_path": src.get("root_path", ""),
            "headers": headers,
            "client": None,
            "server": src.get("server"),
            "extensions": {},
            _MARK: True,
        }
        if self.state is not None:
            scope["state"] = dict(self.state)
        return scope, validated

    # -- one load ------------------------------------------------------------------------

    async def _load(self, live: bool) -> Fill:
        mw = self.mw
        loop = asyncio.get_running_loop()
        request_time = mw._now()
        if live:
            rec = _Recorder(self, self.send, request_time, validated=False, conditional=True)
            self.rec = rec
            self.task = task = loop.create_task(
                _call(mw.app, self._live_scope(), self.live_receive(), rec.send)
            )
        else:
            scope, validated = self._refresh_scope()
            rec = _Recorder(self, None, request_time, validated=validated, conditional=False)
            # Requests that find the entry past its stale window meanwhile
            # wait for this refresh instead of revalidating it themselves.
            identity = self.key.identity
            if identity not in mw._revalidating:
                mw._revalidating[identity] = (rec.decided, _stored_at(self.stored))
                rec.decided.add_done_callback(lambda fut: _forget(mw._revalidating, identity, fut))
            # A fresh context: nothing the triggering request set (a current
            # user, say) leaks into the refresh.
            task = loop.create_task(
                _call(mw.app, scope, rec.synthetic_receive, rec.send), context=contextvars.Context()
            )
            mw._tasks.add(task)
            task.add_done_callback(mw._tasks.discard)
        task.add_done_callback(rec.app_done)
        if live:
            outcome = await asyncio.shield(rec.decided)
        else:
            try:
                with anyio.fail_after(mw.refresh_timeout):
                    outcome = await asyncio.shield(rec.decided)
            except BaseException:
                task.cancel()
                raise
            if outcome[0] != "entry" and not task.done():
                task.cancel()  # nothing more to learn from it (an event stream, say)
            elif not task.done():
                # Let the app finish (its background tasks), within the bound.
                timer = loop.call_later(mw.refresh_timeout, task.cancel)
                task.add_done_callback(lambda _: timer.cancel())
        return await self._conclude(outcome, live)

    async def _conclude(self, outcome: tuple[Any, ...], live: bool) -> Fill:
        mw = self.mw
        key = self.key
        kind = outcome[0]
        if kind == "entry":
            entry, j, tags = outcome[1], outcome[2], outcome[3]
            if key.names:
                # Keep the URL's Vary names alive as long as its variants.
                await mw._store_vary(key, key.names, mw._vary_keep(j))
            # The engine counts its deadlines from the fill; the lifetime runs
            # from the response (a long body may have taken a while since).
            elapsed = max(0.0, mw._now() - entry["rt"])
            return Fill(entry, policy=mw._fill_policy(j, elapsed, entry), tags=[key.tag, *tags])
        if kind == "vary":
            entry, j, tags, varied = outcome[1], outcome[2], outcome[3], outcome[4]
            await mw._store_vary(key, varied.names, mw._vary_keep(j))
            elapsed = max(0.0, mw._now() - entry["rt"])
            await mw._store_variant(
                varied,
                Fill(entry, policy=mw._fill_policy(j, elapsed, entry), tags=[key.tag, *tags]),
            )
            return Fill({"ok": False, "k": key.rendered, "why": "vary"}, store=False)
        if kind == "failed":
            raise _OriginFailed(f"the app answered {outcome[1]} to a refresh of {key.url}")
        # Not stored.
        reason: str = outcome[1]
        intrinsic: bool = outcome[2]
        new_names: tuple[str, ...] | None = outcome[3]
        mw.metrics.counts["http_uncacheable"] += 1
        if new_names is not None:
            # The URL's responses vary on other fields than this key assumed.
            await mw._store_vary(key, new_names, mw.policy.hard_ttl)
        elif intrinsic and not (live and (self.has_cookie or self.has_auth)):
            # Remembered only from a request without credentials: a Set-Cookie
            # to a logged-in user says nothing about anonymous requests.
            mw._remember_uncacheable(key.identity)
        if not live:
            await mw._delete_entry(key)
        log.debug("swr_cache: not storing %s: %s", key.url, reason)
        return Fill({"ok": False, "k": key.rendered, "why": reason}, store=False)


class _Recorder:
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
        fetch: _Fetch,
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
        fetch = self.fetch
        mw = fetch.mw
        self.response_time = mw._now()
        status: int = message["status"]
        headers: list[tuple[bytes, bytes]] = []
        tag_lines: list[bytes] = []
        for raw_name, raw_value in message.get("headers", ()):
            name, value = bytes(raw_name), bytes(raw_value)
            if name.lower() in mw.tag_fields:
                tag_lines.append(value)
            else:
                headers.append((name, value))
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
            tags = _http.content_tags(tag_lines)
            length = self.declared = _content_length(headers)
            if message.get("trailers"):
                j.refused("trailers")
            elif _is_event_stream(headers):
                j.refused("text/event-stream")
            elif length is not None and (
                length > mw.max_body_size or self._bound(length, tags) > mw.cache.max_entry_bytes
            ):
                j.refused("body too large")
            elif len(tags) > mw.max_tags or any(len(t) > mw.max_tag_length for t in tags):
                j.refused("too many or too long surrogate keys")
            elif j.vary != fetch.key.names:
                names = j.vary
                if live and fetch.key.names == ():
                    # The URL's first response that varies: kept, then stored
                    # under the key its Vary names give this request.
                    self.tags = tags
                    self.buffer = []
                    self._hold(message, headers, "fwd=uri-miss")
                    return
                j.refused("vary changed", intrinsic=False)
            self.tags = tags
        if j.store:
            self.buffer = []
        else:
            self._not_stored(j.reason, j.intrinsic, names)
        if not live:
            return
        # The client's response: this is the origin's answer, so no Age.
        if self.validated:
            member = "fwd=stale"
        elif fetch.key.names and fetch.key.spec_known:
            member = "fwd=vary-miss"
        else:
            member = "fwd=uri-miss"
        if j.store:
            self._hold(message, headers, member)
            return
        await self._forward(mw._relabel(message, member + "; stored=?0", self.response_time))

    def _hold(self, message: Message, headers: list[tuple[bytes, bytes]], member: str) -> None:
        """Keep a storable response's start until its first body message."""
        fetch = self.fetch
        self.member = member
        if self.status == 200 and self.conditional and _live_matches(fetch.h, headers):
            # The client already holds this representation: a 304 for it, while
            # the full response is still read for storage.
            fetch.mw.metrics.counts["http_not_modified"] += 1
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
        await self._forward(self.fetch.mw._relabel(message, member, self.response_time))

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
            if self.size > self.fetch.mw.max_body_size:
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
        mw = self.fetch.mw
        declared = self.declared
        if declared is not None and declared != self.size:
            # Shorter (or longer) than announced: not the response the app meant (RFC 9112 §6.3).
            mw.metrics.counts["http_length_mismatches"] += 1
            self._not_stored(f"body of {self.size} bytes, Content-Length {declared}")
        elif self._bound(self.size, self.tags) > mw.cache.max_entry_bytes:
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
        key = fetch.key
        if j.vary != key.names:
            key = fetch.mw._with_names(key, j.vary, fetch.h)
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
        mw = self.fetch.mw
        return _http.judge_response(
            status,
            headers,
            request_time=self.request_time,
            response_time=self.response_time,
            has_cookie=has_cookie,
            has_auth=has_auth,
            default_ttl=mw.policy.soft_ttl,
            grace=mw.grace,
            grace_explicit=mw.grace_for_explicit,
            max_ttl=mw.max_ttl,
            max_stale=mw.max_stale,
            cache_by_default=mw.cache_by_default,
            targeted=mw.targeted_fields,
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
        merged = [(k, v) for k, v in stored["h"] if k.lower() not in replaced]
        merged.extend((k, v) for k, v in headers if k.lower() in replaced)
        tags = _http.content_tags(tag_lines) if tag_lines else list(stored.get("tg") or ())
        j = self._judge(200, merged, False, False)
        if not any(name.lower() == b"date" for name, _ in merged):
            merged.append((b"date", _http.format_http_date(self.response_time)))
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
