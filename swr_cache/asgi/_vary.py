"""Cache keys: what names a request's entry, and the per-URL ``Vary`` names behind it.

A key is the scheme, ``Host``, the raw target and the forwarding headers (the
*primary* key), plus the request's values of the fields the URL's responses
``Vary`` on. Keys are immutable and memoised per request shape, so a request
for a URL seen before does no escaping, rendering or hashing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final

from redis.exceptions import RedisError

from .. import _http
from .._engine_api import Engine, Fill
from .._keys import escape, result_identity
from .._metrics import Metrics
from .._policy import Policy
from ._rules import _IDENTITY, Scope, log

#: How many request shapes, Vary'd keys, URLs' Vary names and uncacheable URLs
#: each memo holds; the oldest goes first.
MEMO_LIMIT: Final = 10_000


def remember(memo: dict[Any, Any], key: Any, value: Any) -> None:
    """Put ``key`` in a bounded memo, dropping its oldest entry when full."""
    if key not in memo and len(memo) >= MEMO_LIMIT:
        del memo[next(iter(memo))]
    memo[key] = value


class Key:
    """Everything derived from the request that names its entry (never changed once built)."""

    __slots__ = (
        "entry",
        "host",
        "identity",
        "keyed",
        "names",
        "primary",
        "rendered",
        "scheme",
        "spec_key",
        "tag",
        "target",
        "url",
        "vary",
    )

    def __init__(
        self,
        *,
        scheme: str,
        host: str,
        target: str,
        url: str,
        tag: str,
        keyed: list[tuple[bytes, bytes]],
        primary: str,
        spec_key: str,
        names: tuple[str, ...],
        vary: list[tuple[str, bytes | None]],
        rendered: str,
        identity: str,
        entry: str,
    ) -> None:
        self.scheme = scheme
        self.host = host
        self.target = target
        self.url = url
        self.tag = tag
        self.keyed = keyed
        self.primary = primary  # scheme, host, target and forwarding headers, escaped
        self.spec_key = spec_key  # where the URL's Vary names are kept in Redis
        self.names = names
        self.vary = vary
        self.rendered = rendered  # primary plus the Vary'd values: the full key, kept in the entry
        self.identity = identity
        self.entry = entry  # the engine's Redis key of the entry

    def with_names(self, names: tuple[str, ...], h: Mapping[bytes, bytes], engine: Engine) -> Key:
        """This key keyed also on the request's values of the ``Vary`` names."""
        vary = [(n, h.get(n.encode("latin-1"))) for n in names]
        rendered, identity, entry = self.rendered, self.identity, self.entry
        if names:
            rendered = self.primary + "|" + _http.render_pairs(vary)
            identity = result_identity(_IDENTITY, _http.hashed(rendered))
            entry = engine.keys.entry(identity)
        return Key(
            scheme=self.scheme,
            host=self.host,
            target=self.target,
            url=self.url,
            tag=self.tag,
            keyed=self.keyed,
            primary=self.primary,
            spec_key=self.spec_key,
            names=names,
            vary=vary,
            rendered=rendered,
            identity=identity,
            entry=entry,
        )


class Keys:
    """Builds keys, and keeps the URLs' Vary names and the URLs found uncacheable."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        key_headers: tuple[bytes, ...],
        vary_memo_ttl: float,
        uncacheable_ttl: float,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.key_headers = key_headers
        self.vary_memo_ttl = vary_memo_ttl
        self.uncacheable_ttl = uncacheable_ttl
        # Request shape -> its key without Vary values.
        self._bases: dict[tuple[Any, ...], Key] = {}
        # (primary key, Vary names, their values) -> the full key.
        self._varied: dict[tuple[Any, ...], Key] = {}
        # Primary key -> (Vary names, known in Redis, until when on the monotonic clock).
        self._vary_memo: dict[str, tuple[tuple[str, ...], bool, float]] = {}
        # Entry identity -> until when requests for it pass straight through.
        self._uncacheable: dict[str, float] = {}

    def memo_sizes(self) -> tuple[int, int, int, int]:
        """How many request shapes, Vary'd keys, Vary names and uncacheable URLs are held."""
        return len(self._bases), len(self._varied), len(self._vary_memo), len(self._uncacheable)

    # -- keys ----------------------------------------------------------------------

    async def key(self, scope: Scope, h: Mapping[bytes, bytes]) -> Key:
        """The key of a request (one Redis read of the URL's Vary names, at most, per memo period)."""
        host_header = h.get(b"host")
        keyed_values = tuple(map(h.get, self.key_headers))
        # What the URL part of the key depends on: derived once per distinct
        # request shape (escaping and hashing cost more than the lookup).
        shape = (
            scope.get("scheme", "http"),
            host_header,
            scope.get("server") if host_header is None else None,
            scope.get("raw_path"),
            scope.get("path"),
            scope.get("root_path"),
            scope.get("query_string"),
            keyed_values,
        )
        base = self._bases.get(shape)
        if base is None:
            base = self._base(scope, shape[0], host_header, keyed_values)
            remember(self._bases, shape, base)
        memo = self._vary_memo.get(base.primary)
        if memo is not None and memo[2] > time.monotonic():
            names = memo[0]
        else:
            names = await self.vary_names(base)
        if not names:
            return base
        values = tuple(h.get(n.encode("latin-1")) for n in names)
        memo_key = (base.primary, names, values)
        key = self._varied.get(memo_key)
        if key is None:
            key = base.with_names(names, h, self.engine)
            remember(self._varied, memo_key, key)
        return key

    def _base(
        self,
        scope: Scope,
        scheme: str,
        host_header: bytes | None,
        keyed_values: tuple[bytes | None, ...],
    ) -> Key:
        """The key that the request line and forwarding headers decide (no Vary values)."""
        host = _http.authority(scheme, host_header, scope.get("server"))
        request_target = _http.target(scope)
        url = _http.url_for(scheme, host, request_target)
        keyed = [
            (n, v) for n, v in zip(self.key_headers, keyed_values, strict=True) if v is not None
        ]
        primary = f"{escape(scheme)}|{escape(host)}|{escape(request_target)}|" + ",".join(
            f"{escape(n.decode('latin-1'))}={escape(v.decode('latin-1'))}" for n, v in keyed
        )
        # Without Vary names, the full key is the primary one.
        rendered = primary + "|"
        identity = result_identity(_IDENTITY, _http.hashed(rendered))
        return Key(
            scheme=scheme,
            host=host,
            target=request_target,
            url=url,
            tag=_http.uri_tag(url),
            keyed=keyed,
            primary=primary,
            spec_key=f"{self.engine.keys.prefix}hv:{{{_http.hashed(primary)}}}",
            names=(),
            vary=[],
            rendered=rendered,
            identity=identity,
            entry=self.engine.keys.entry(identity),
        )

    # -- Vary names ------------------------------------------------------------------

    async def vary_names(self, key: Key) -> tuple[str, ...]:
        """The Vary field names stored for this URL (memoised for ``vary_memo_ttl``)."""
        memo = self._vary_memo.get(key.primary)
        if memo is not None and memo[2] > time.monotonic():
            return memo[0]
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
                return ()
            if raw is not None:
                known = True
                names = tuple(n for n in bytes(raw).decode("latin-1").split(",") if n)
        self._remember_vary(key.primary, names, known)
        return names

    def forget_vary_names(self) -> None:
        """Drop every memoised URL's Vary names (the next request reads them from Redis)."""
        self._vary_memo.clear()

    def _remember_vary(self, primary: str, names: tuple[str, ...], known: bool) -> None:
        remember(self._vary_memo, primary, (names, known, time.monotonic() + self.vary_memo_ttl))

    async def store_vary(self, key: Key, names: tuple[str, ...], keep_s: float) -> None:
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

    async def store_variant(self, key: Key, fill: Fill, policy: Policy) -> None:
        """Store a response under another key than its request's (its Vary names, learnt now)."""

        async def loader(attrs: object) -> Fill:
            return fill

        req = self.engine.request(
            metrics=self.metrics,
            policy=policy,
            identity=key.identity,
            is_item=False,
            attrs=None,
            loader=loader,
            entry=key.entry,
        )
        try:
            await self.engine.get(req)
        except Exception as exc:  # a failed store is a later miss, not this client's error
            log.debug("swr_cache: could not store the variant of %s: %r", key.url, exc)

    async def delete_entry(self, key: Key) -> None:
        """Drop an entry whose refresh came back uncacheable."""
        engine = self.engine
        try:
            async with engine.slots.hold(engine.call_timeout):
                await engine.store.delete(key.entry)
        except (RedisError, OSError) as exc:
            self.metrics.counts["redis_errors"] += 1
            log.warning("swr_cache: could not delete the uncacheable entry of %s: %r", key.url, exc)

    # -- URLs whose responses could not be stored --------------------------------------

    def remember_uncacheable(self, identity: str) -> None:
        if self.uncacheable_ttl > 0:
            remember(self._uncacheable, identity, time.monotonic() + self.uncacheable_ttl)

    def is_uncacheable(self, identity: str) -> bool:
        """Whether requests for this entry pass straight to the app for now."""
        if not self._uncacheable:
            return False
        until = self._uncacheable.get(identity)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._uncacheable[identity]
        return False
