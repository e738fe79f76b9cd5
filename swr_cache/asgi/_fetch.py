"""``Fetch``: the engine's loader for one request (the live load, revalidation, refresh)."""

from __future__ import annotations

import asyncio
import contextvars
from typing import TYPE_CHECKING, Any

import anyio

from .._engine_api import Fill
from ._recorder import Recorder
from ._rules import (
    _CONDITIONALS,
    _DONE,
    _LEADING,
    _LOOKUP,
    _MARK,
    _UNTEEABLE,
    Message,
    Receive,
    Scope,
    Send,
    _call,
    _consume,
    _forget,
    _OriginFailed,
    _Replay,
    _settled_without_entry,
    _stored_at,
    _validators,
    log,
)
from ._vary import Key

if TYPE_CHECKING:
    from ._context import Context


class Fetch:
    """The engine's loader for one request's entry.

    Called while its request still waits on the engine, it runs the app for
    that request (streaming to the client) and returns once it knows what to
    store. Called later, by a background refresh, it re-runs the request from
    the stored request alone.
    """

    __slots__ = (
        "ctx",
        "first",
        "h",
        "has_auth",
        "has_cookie",
        "head",
        "key",
        "phase",
        "rec",
        "receive",
        "scope",
        "send",
        "state",
        "stored",
        "task",
    )

    def __init__(
        self,
        ctx: Context,
        scope: Scope,
        receive: Receive,
        send: Send,
        h: dict[bytes, bytes],
        key: Key,
        head: bool,
        has_cookie: bool,
        has_auth: bool,
        first: Message,
    ) -> None:
        self.ctx = ctx
        self.scope = scope
        self.receive = receive
        self.first = first  # the request message the middleware read (no body)
        self.rec: Recorder | None = None
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

    def may_use(self, entry: dict[str, Any]) -> bool:
        """Whether a stored response may answer this request's credentials (a shared one)."""
        return not ((self.has_cookie and not entry["sh"]) or (self.has_auth and not entry["au"]))

    async def serve(self, entry: dict[str, Any], member: str) -> None:
        """Answer this request from a stored response, with its current ``Age``."""
        age = entry["a0"] + max(0.0, self.ctx.now() - entry["rt"])
        await self.ctx.respond.serve(self.send, entry, self.h, self.head, age, member)

    async def pass_live(self, member: str) -> None:
        """Hand this request to the app untouched (the message already read comes first)."""
        await self.ctx.respond.pass_through(self.scope, self.live_receive(), self.send, member)

    async def __call__(self, attrs: object) -> Fill:
        if self.phase == _LOOKUP:
            # The request waits on the engine for this very load: it leads, and
            # the app's own pace bounds it (no wait bound applies).
            self.phase = _LEADING
            return await self._load(live=True)
        ctx = self.ctx
        identity = self.key.identity
        held = ctx.revalidating.get(identity)
        if held is not None and _stored_at(self.stored) <= held[1]:
            # A request is revalidating the response this refresh would (or
            # just did): its outcome is this refresh's, stored under our lease
            # (a failure too: the engine backs off rather than ask again at once).
            with anyio.fail_after(ctx.refresh_timeout):
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
        self.phase = _DONE
        held = self.ctx.revalidating.get(self.key.identity)
        if held is not None and entry["rt"] <= held[1] and not _settled_without_entry(held[0]):
            await self._join(held[0])
            return
        rec, outcome = await self._conditional_request(entry)
        if rec.freshened:
            await self._answer_not_modified(outcome)
        await self.finish()

    async def _join(self, revalidation: asyncio.Future[tuple[Any, ...]]) -> None:
        """Answer with the outcome of the revalidation another request runs."""
        try:
            with anyio.fail_after(self.ctx.refresh_timeout):
                joined = await asyncio.shield(revalidation)
        except Exception:  # it timed out, or the app failed it: ask the app ourselves
            joined = ("failed", 0)
        if joined[0] == "entry" and joined[1]["k"] == self.key.rendered:
            await self.serve(joined[1], "fwd=stale; collapsed")
        else:
            await self.pass_live("fwd=stale")

    async def _conditional_request(self, entry: dict[str, Any]) -> tuple[Recorder, tuple[Any, ...]]:
        """Ask the app with the entry's validators; its outcome is published to joiners."""
        ctx = self.ctx
        identity = self.key.identity
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fut.add_done_callback(_consume)
        ctx.revalidating[identity] = (fut, entry["rt"])
        ctx.metrics.counts["http_revalidations"] += 1
        self.stored = entry
        scope = self._live_scope()
        scope["headers"] = [*scope["headers"], *_validators(entry)]
        rec = Recorder(self, self.send, ctx.now(), validated=True, conditional=True)
        self.rec = rec
        self.task = task = loop.create_task(_call(ctx.app, scope, self.live_receive(), rec.send))
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
            loop.call_later(ctx.refresh_timeout, _forget, ctx.revalidating, identity, fut)
        return rec, outcome

    async def _answer_not_modified(self, outcome: tuple[Any, ...]) -> None:
        """The app said 304: serve the freshened entry (stored or, if not storable, this once)."""
        member = "fwd=stale; fwd-status=304"
        if outcome[0] == "entry":
            fresh = outcome[1]
        elif outcome[0] == "pass" and len(outcome) > 4:
            fresh = outcome[4]  # for this request only: it is not stored
            member += "; stored=?0"
        else:
            fresh = None
        if fresh is not None:
            await self.serve(fresh, member)
        else:
            await self.pass_live("fwd=stale")

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
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        request_time = ctx.now()
        if live:
            rec = Recorder(self, self.send, request_time, validated=False, conditional=True)
            self.rec = rec
            self.task = task = loop.create_task(
                _call(ctx.app, self._live_scope(), self.live_receive(), rec.send)
            )
        else:
            scope, validated = self._refresh_scope()
            rec = Recorder(self, None, request_time, validated=validated, conditional=False)
            # Requests that find the entry past its stale window meanwhile
            # wait for this refresh instead of revalidating it themselves.
            identity = self.key.identity
            if identity not in ctx.revalidating:
                ctx.revalidating[identity] = (rec.decided, _stored_at(self.stored))
                rec.decided.add_done_callback(lambda fut: _forget(ctx.revalidating, identity, fut))
            # A fresh context: nothing the triggering request set (a current
            # user, say) leaks into the refresh.
            task = loop.create_task(
                _call(ctx.app, scope, rec.synthetic_receive, rec.send),
                context=contextvars.Context(),
            )
            ctx.tasks.add(task)
            task.add_done_callback(ctx.tasks.discard)
        task.add_done_callback(rec.app_done)
        if live:
            outcome = await asyncio.shield(rec.decided)
        else:
            try:
                with anyio.fail_after(ctx.refresh_timeout):
                    outcome = await asyncio.shield(rec.decided)
            except BaseException:
                task.cancel()
                raise
            if outcome[0] != "entry" and not task.done():
                task.cancel()  # nothing more to learn from it (an event stream, say)
            elif not task.done():
                # Let the app finish (its background tasks), within the bound.
                timer = loop.call_later(ctx.refresh_timeout, task.cancel)
                task.add_done_callback(lambda _: timer.cancel())
        return await self._conclude(outcome, live)

    async def _conclude(self, outcome: tuple[Any, ...], live: bool) -> Fill:
        ctx = self.ctx
        key = self.key
        kind = outcome[0]
        if kind == "entry":
            entry, j, tags = outcome[1], outcome[2], outcome[3]
            if key.names:
                # Keep the URL's Vary names alive as long as its variants.
                await ctx.keys.store_vary(key, key.names, ctx.vary_keep(j))
            # The engine counts its deadlines from the fill; the lifetime runs
            # from the response (a long body may have taken a while since).
            elapsed = max(0.0, ctx.now() - entry["rt"])
            return Fill(entry, policy=ctx.fill_policy(j, elapsed, entry), tags=[key.tag, *tags])
        if kind == "vary":
            entry, j, tags, varied = outcome[1], outcome[2], outcome[3], outcome[4]
            await ctx.keys.store_vary(key, varied.names, ctx.vary_keep(j))
            elapsed = max(0.0, ctx.now() - entry["rt"])
            await ctx.keys.store_variant(
                varied,
                Fill(entry, policy=ctx.fill_policy(j, elapsed, entry), tags=[key.tag, *tags]),
                ctx.policy,
            )
            return Fill({"ok": False, "k": key.rendered, "why": "vary"}, store=False)
        if kind == "failed":
            raise _OriginFailed(f"the app answered {outcome[1]} to a refresh of {key.url}")
        # Not stored.
        reason: str = outcome[1]
        intrinsic: bool = outcome[2]
        new_names: tuple[str, ...] | None = outcome[3]
        ctx.metrics.counts["http_uncacheable"] += 1
        if new_names is not None:
            # The URL's responses vary on other fields than this key assumed.
            await ctx.keys.store_vary(key, new_names, ctx.policy.hard_ttl)
        elif intrinsic and not (live and (self.has_cookie or self.has_auth)):
            # Remembered only from a request without credentials: a Set-Cookie
            # to a logged-in user says nothing about anonymous requests.
            ctx.keys.remember_uncacheable(key.identity)
        if not live:
            await ctx.keys.delete_entry(key)
        log.debug("swr_cache: not storing %s: %s", key.url, reason)
        return Fill({"ok": False, "k": key.rendered, "why": reason}, store=False)
