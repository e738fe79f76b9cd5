"""``CacheMiddleware``: the entry point; screens requests, looks entries up and answers."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

from .. import _http
from .._cache import Cache
from .._engine_api import EntryRequest, engine_of
from .._errors import CacheNotEnteredError, ConfigError, InvalidationError
from .._policy import Policy
from ._context import Context
from ._fetch import Fetch
from ._respond import Responder
from ._rules import (
    _BYPASS,
    _DONE,
    _KEYED,
    _LEADING,
    _LOOKUP,
    _MARK,
    _SAFE_METHODS,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    _field_name,
    _Replay,
    _request_headers,
    log,
)
from ._vary import Keys

_NO_DIRECTIVES = _http.RequestDirectives()


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
        _check_settings(
            max_body_size=max_body_size,
            max_tags=max_tags,
            max_tag_length=max_tag_length,
            max_ttl=max_ttl,
            max_stale=max_stale,
            refresh_timeout=refresh_timeout,
            lock_timeout=lock_timeout,
            cache_status=cache_status,
            revalidate_window=revalidate_window,
        )
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
        self._keys = Keys(
            self.engine,
            self.metrics,
            key_headers=self.key_headers,
            vary_memo_ttl=self.vary_memo_ttl,
            uncacheable_ttl=self.uncacheable_ttl,
        )
        self._respond = Responder(
            app,
            self.metrics,
            cache_status=cache_status,
            strip_surrogate_keys=strip_surrogate_keys,
            tag_fields=self.tag_fields,
            add_date=add_date,
        )
        self._ctx = Context(
            app=app,
            cache=cache,
            engine=self.engine,
            metrics=self.metrics,
            policy=self.policy,
            keys=self._keys,
            respond=self._respond,
            grace_for_explicit=grace_for_explicit,
            max_ttl=self.max_ttl,
            max_stale=self.max_stale,
            max_body_size=self.max_body_size,
            cache_by_default=cache_by_default,
            targeted_fields=self.targeted_fields,
            revalidate_window=self.revalidate_window,
            refresh_timeout=self.refresh_timeout,
            max_tags=max_tags,
            max_tag_length=max_tag_length,
            tag_fields=self.tag_fields,
        )

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
                message = self._respond.relabel(message, "fwd=method")
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
            if bytes(raw_name).lower() in (b"location", b"content-location"):
                tag = _same_origin_tag(url, scheme, host, raw_value)
                if tag is not None:
                    tags.append(tag)
        try:
            await self.cache.purge_tags(tags)
        except InvalidationError as exc:
            # The write happened; failing the response would invite a retry of a
            # non-idempotent request. Say it loudly instead.
            self.metrics.counts["http_purge_errors"] += 1
            log.error("swr_cache: could not purge %s after %s: %s", url, scope["method"], exc)
        else:
            self.metrics.counts["http_purges"] += 1

    # -- GET and HEAD -------------------------------------------------------------------

    async def _get(self, scope: Scope, receive: Receive, send: Send, head: bool) -> None:
        h = _request_headers(scope)
        respond = self._respond
        if self._bypassed(scope, h):
            await respond.pass_through(scope, receive, send, "fwd=bypass")
            return
        # What the request's framing says is not enough: an HTTP/2 or HTTP/3
        # request may carry a body with neither Content-Length nor
        # Transfer-Encoding. Its first message tells (for HTTP/1.x it is
        # already complete, so this costs no wait).
        first = await receive()
        if first["type"] == "http.request" and (first.get("body") or first.get("more_body")):
            replay = await _Replay.read(first, receive)
            if replay.has_body:
                await respond.pass_through(scope, replay, send, "fwd=bypass")
                return
            first = replay.settled()
        directives = _NO_DIRECTIVES
        if b"cache-control" in h or b"pragma" in h:
            directives, refusal = self._directives(h)
            if refusal:
                await respond.pass_through(scope, _Replay([first], receive), send, refusal)
                return
        # Credentials: stored and answered only with explicitly shared responses.
        has_auth = b"authorization" in h
        has_cookie = self._has_cookie(h)
        key = await self._keys.key(scope, h)
        if self._keys.is_uncacheable(key.identity):
            member = "fwd=uri-miss; detail=uncacheable"
            await respond.pass_through(scope, _Replay([first], receive), send, member)
            return
        fetch = Fetch(self._ctx, scope, receive, send, h, key, head, has_cookie, has_auth, first)
        req = self.engine.request(
            metrics=self.metrics,
            policy=self.policy,
            identity=key.identity,
            is_item=False,
            attrs=None,
            loader=fetch,
            entry=key.entry,
            wait_timeout=self.lock_timeout,
        )
        started = self._ctx.now()
        if directives.only_if_cached:
            await self._only_if_cached(req, fetch, started)
            return
        await self._lookup(req, fetch, directives, started)

    def _bypassed(self, scope: Scope, h: dict[bytes, bytes]) -> bool:
        """A request the cache must not answer: a body, ``Range``, preconditions, ``bypass``."""
        length = h.get(b"content-length")
        return (
            (length is not None and length not in (b"0", b""))
            or not _BYPASS.isdisjoint(h)
            or (self.bypass is not None and self.bypass(scope))
        )

    def _directives(self, h: dict[bytes, bytes]) -> tuple[_http.RequestDirectives, str]:
        """The request's cache directives, and the ``Cache-Status`` of a pass-through they force."""
        directives = _http.RequestDirectives.parse(h.get(b"cache-control"), h.get(b"pragma"))
        if directives.no_store:
            return directives, "fwd=bypass"
        if not self.request_directives:
            return _NO_DIRECTIVES, ""
        if directives.no_cache:
            return directives, "fwd=request"
        return directives, ""

    def _has_cookie(self, h: dict[bytes, bytes]) -> bool:
        """Whether the request carries a cookie that makes it personal.

        A ``Cookie`` with only ignorable cookies is removed: the app never sees it.
        """
        cookie = h.get(b"cookie")
        if cookie is None:
            return False
        if self._personal(cookie):
            return True
        del h[b"cookie"]
        return False

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

    async def _lookup(
        self,
        req: EntryRequest,
        fetch: Fetch,
        directives: _http.RequestDirectives,
        started: float,
    ) -> None:
        """Ask the engine for the entry, then answer from it (or lead, or pass through).

        Only a wait for another request's load is bounded (``lock_timeout``):
        a hit or this request's own load runs without a timer.
        """
        value: Any = None
        try:
            value = await self.engine.get(req)
        except CacheNotEnteredError:
            raise
        except Exception:
            if fetch.phase == _LEADING:
                await fetch.finish()  # the app's own outcome (its exception) is the answer
                return
            fetch.phase = _DONE
            if req.outcome == "wait-timeout":
                self.metrics.counts["http_lock_timeouts"] += 1
                await fetch.pass_live("fwd=uri-miss; detail=lock-timeout")
                return
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
        if fetch.phase == _LOOKUP:
            fetch.phase = _DONE
            fetch.stored = value  # the validators a refresh sends
        await self._answer(fetch, value, directives, started)

    async def _answer(
        self,
        fetch: Fetch,
        value: Any,
        directives: _http.RequestDirectives,
        started: float,
    ) -> None:
        """Serve an entry the engine returned, if it may answer this request."""
        entry = value if type(value) is dict else None
        if entry is None or not entry.get("ok") or entry.get("k") != fetch.key.rendered:
            # Another request's response that is not reusable (or a foreign entry).
            await fetch.pass_live("fwd=uri-miss")
            return
        if not fetch.may_use(entry):
            await fetch.pass_live("fwd=bypass")
            return
        age = entry["a0"] + max(0.0, self._ctx.now() - entry["rt"])
        ttl = entry["fl"] - age
        if (directives.max_age is not None and age > directives.max_age) or (
            directives.min_fresh is not None and ttl < directives.min_fresh
        ):
            await fetch.pass_live("fwd=request")
            return
        if ttl < 0 and -ttl >= entry["st"]:
            # Past the window it may be served stale in: kept only to revalidate.
            await fetch.revalidate(entry)
            return
        if entry["rt"] > started:
            member = "fwd=uri-miss; collapsed"  # produced for a concurrent request
        else:
            member = f"hit; ttl={math.floor(ttl)}"
        await self._respond.serve(fetch.send, entry, fetch.h, fetch.head, age, member)

    async def _only_if_cached(self, req: EntryRequest, fetch: Fetch, started: float) -> None:
        """``only-if-cached``: a usable stored response, else 504; never the app."""
        fetch.phase = _DONE
        peeked = await self.engine.peek(req)
        entry = peeked[0] if peeked is not None else None
        if (
            type(entry) is dict
            and entry.get("ok")
            and entry.get("k") == fetch.key.rendered
            and fetch.may_use(entry)
        ):
            age = entry["a0"] + max(0.0, self._ctx.now() - entry["rt"])
            if entry["fl"] - age > -entry["st"]:  # not past its stale window
                ttl = math.floor(entry["fl"] - age)
                await self._respond.serve(
                    fetch.send, entry, fetch.h, fetch.head, age, f"hit; ttl={ttl}"
                )
                return
        await self._respond.not_cached(fetch.send)


def _check_settings(
    *,
    max_body_size: int,
    max_tags: int,
    max_tag_length: int,
    max_ttl: float,
    max_stale: float,
    refresh_timeout: float,
    lock_timeout: float | None,
    cache_status: str | None,
    revalidate_window: float,
) -> None:
    """Refuse settings the middleware cannot honour (``ConfigError``)."""
    if max_body_size < 0 or max_tags < 0 or max_tag_length < 1:
        raise ConfigError("max_body_size and max_tags must be >= 0, max_tag_length >= 1")
    if not (max_ttl > 0 and max_stale >= 0 and refresh_timeout > 0):
        raise ConfigError("max_ttl and refresh_timeout must be > 0, max_stale >= 0")
    if lock_timeout is not None and lock_timeout <= 0:
        raise ConfigError("lock_timeout must be > 0 or None")
    if cache_status is not None and not cache_status.replace("-", "").replace(".", "").isalnum():
        raise ConfigError(f"cache_status must be a token, got {cache_status!r}")
    if revalidate_window < 0:
        raise ConfigError("revalidate_window must be >= 0")


def _same_origin_tag(url: str, scheme: str, host: str, raw_value: Any) -> str | None:
    """The URI tag of a ``Location``/``Content-Location`` on the request's origin (else ``None``).

    Another origin's URIs are never purged from here (a DoS guard).
    """
    try:
        other = urlsplit(urljoin(url, bytes(raw_value).decode("latin-1").strip()))
    except ValueError:
        return None  # not a URL (an unclosed IPv6 bracket): it names nothing of ours
    if (
        other.scheme != scheme
        or _http.authority(scheme, other.netloc.encode("latin-1"), None) != host
    ):
        return None
    other_target = (other.path or "/") + (f"?{other.query}" if other.query else "")
    return _http.uri_tag(_http.url_for(scheme, host, other_target))
