"""The state one middleware's requests share: settings, the engine, keys, the responder.

``CacheMiddleware`` builds one ``Context``; each request's ``Fetch`` and the
``Recorder`` of each app response read it (and only it), so none of them
reaches into another's members.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from .. import _http
from .._cache import Cache
from .._engine_api import Engine
from .._metrics import Metrics
from .._policy import Policy
from ._respond import Responder
from ._rules import ASGIApp, _validators
from ._vary import Keys


class Context:
    """One middleware's settings and shared state (see ``CacheMiddleware`` for the settings)."""

    def __init__(
        self,
        *,
        app: ASGIApp,
        cache: Cache,
        engine: Engine,
        metrics: Metrics,
        policy: Policy,
        keys: Keys,
        respond: Responder,
        grace_for_explicit: bool,
        max_ttl: float,
        max_stale: float,
        max_body_size: int,
        cache_by_default: bool,
        targeted_fields: tuple[bytes, ...],
        revalidate_window: float,
        refresh_timeout: float,
        max_tags: int,
        max_tag_length: int,
        tag_fields: frozenset[bytes],
    ) -> None:
        self.app = app
        self.engine = engine
        self.metrics = metrics
        self.policy = policy
        self.keys = keys
        self.respond = respond
        self.grace = policy.hard_ttl - policy.soft_ttl
        self.grace_for_explicit = grace_for_explicit
        self.max_ttl = max_ttl
        self.max_stale = max_stale
        self.max_body_size = max_body_size
        self.max_entry_bytes = cache.max_entry_bytes
        self.cache_by_default = cache_by_default
        self.targeted_fields = targeted_fields
        self.revalidate_window = revalidate_window
        self.refresh_timeout = refresh_timeout
        self.max_tags = max_tags
        self.max_tag_length = max_tag_length
        self.tag_fields = tag_fields
        # Background refreshes under way (kept referenced until they end).
        self.tasks: set[asyncio.Task[Any]] = set()
        # Entry identity -> outcome of the revalidation (or refresh) under way.
        # (Both keep the ``rt`` of the stored response they revalidate: a
        # request holding a newer one does not join them.)
        self.revalidating: dict[str, tuple[asyncio.Future[tuple[Any, ...]], float]] = {}

    def now(self) -> float:
        """Redis server time (seconds): every process agrees on ages."""
        return self.engine.now_ms() / 1000.0

    def judge(
        self,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        *,
        request_time: float,
        response_time: float,
        has_cookie: bool,
        has_auth: bool,
    ) -> _http.Judgement:
        """The verdict on one app response, with this middleware's TTLs and caps."""
        return _http.judge_response(
            status,
            headers,
            request_time=request_time,
            response_time=response_time,
            has_cookie=has_cookie,
            has_auth=has_auth,
            default_ttl=self.policy.soft_ttl,
            grace=self.grace,
            grace_explicit=self.grace_for_explicit,
            max_ttl=self.max_ttl,
            max_stale=self.max_stale,
            cache_by_default=self.cache_by_default,
            targeted=self.targeted_fields,
        )

    def vary_keep(self, j: _http.Judgement) -> float:
        """How long a URL's Vary names are kept: as long as a variant may be served or revalidated."""
        return max(j.soft, 0) + j.stale + self.revalidate_window + self.policy.hard_ttl

    def fill_policy(self, j: _http.Judgement, elapsed: float, entry: dict[str, Any]) -> Policy:
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
