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

The modules: ``_middleware`` (``CacheMiddleware``: screening, lookup,
answering), ``_context`` (what one middleware's requests share), ``_vary``
(keys, the per-URL Vary names, the bounded memos), ``_respond`` (what the
client gets), ``_fetch`` (the engine's loader for one request: live load,
revalidation, refresh), ``_recorder`` (one app response: forwarded, judged,
buffered) and ``_rules`` (ASGI types, constants, pure helpers). The HTTP rules
themselves are in ``swr_cache._http``.
"""

from __future__ import annotations

from ._middleware import CacheMiddleware

__all__ = ["CacheMiddleware"]
