"""``CacheMiddleware``: the entry point, keys and Vary names, serving stored responses."""

from __future__ import annotations

import asyncio
import fnmatch
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

from redis.exceptions import RedisError

from .. import _http
from .._cache import Cache
from .._engine_api import EntryRequest, Fill, engine_of
from .._errors import CacheNotEnteredError, ConfigError, InvalidationError
from .._keys import escape, result_identity
from .._policy import Policy
from ._fetch import _Fetch
from ._rules import (
    _BYPASS,
    _CHUNK,
    _DONE,
    _IDENTITY,
    _KEYED,
    _LEADING,
    _LOOKUP,
    _MARK,
    _MEMO_LIMIT,
    _NOT_MODIFIED_FIELDS,
    _SAFE_METHODS,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    _field_name,
    _Key,
    _matches,
    _Replay,
    _request_headers,
    _validators,
    log,
)


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
