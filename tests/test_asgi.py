"""CacheMiddleware through httpx.ASGITransport against a real redis-server."""

from __future__ import annotations

import asyncio
import contextvars
import sys
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from swr_cache import Cache, CacheMiddleware, CacheNotEnteredError, ConfigError, _http, item_tag
from swr_cache.streams import StreamInvalidator
from swr_cache.testing import CacheHost, FakeClock

Scope = MutableMapping[str, Any]
Handler = Callable[[Scope, int], tuple[int, list[tuple[bytes, bytes]], bytes]]

pytestmark = pytest.mark.redis

SOFT, HARD = 10.0, 100.0


def text(scope: Scope, n: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The default origin answer: 200, no Cache-Control, a body naming the call."""
    qs = scope["query_string"].decode()
    return 200, [(b"content-type", b"text/plain")], f"#{n} {scope['path']}?{qs}".encode()


class Origin:
    """A raw ASGI app whose answers the test sets; it counts calls and can be held at a gate."""

    def __init__(self) -> None:
        self.calls: list[Scope] = []
        self.handler: Handler = text
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.error: BaseException | None = None
        self.contexts: list[str | None] = []

    @property
    def count(self) -> int:
        return len(self.calls)

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.calls.append(dict(scope))
        self.contexts.append(CURRENT_USER.get(None))
        self.entered.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        status, headers, body = self.handler(scope, self.count)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


CURRENT_USER: contextvars.ContextVar[str] = contextvars.ContextVar("current_user")


def respond(status: int = 200, *headers: tuple[str, str], body: str | None = None) -> Handler:
    """A handler answering ``status`` with these headers (and a per-call body)."""

    def handler(scope: Scope, n: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        raw = [(k.lower().encode(), v.encode()) for k, v in headers]
        content = (
            body if body is not None else f"#{n} {scope['path']}?{scope['query_string'].decode()}"
        )
        return status, [(b"content-type", b"text/plain"), *raw], content.encode()

    return handler


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def cache(redis_client: aioredis.Redis, clock: FakeClock) -> AsyncIterator[Cache]:
    c = Cache(
        redis_client, namespace="h", soft_ttl=SOFT, hard_ttl=HARD, clock=clock, early_refresh=0
    )
    async with CacheHost(c) as entered:
        yield entered


@pytest.fixture
def origin() -> Origin:
    return Origin()


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@pytest.fixture
async def client(cache: Cache, origin: Origin) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(CacheMiddleware(origin, cache=cache)) as c:
        yield c


async def wait_until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll a condition the code under test drives (never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.002)


def stats(cache: Cache) -> dict[str, Any]:
    return cache.stats()["http"]


def stats_of(client: httpx.AsyncClient) -> dict[str, Any]:
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    assert isinstance(transport.app, CacheMiddleware)
    return stats(transport.app.cache)


# --- hits, keys -------------------------------------------------------------------


async def test_second_get_served_from_cache_with_age(
    client: httpx.AsyncClient, origin: Origin, clock: FakeClock
) -> None:
    """A second GET is answered from Redis with Age and a hit Cache-Status; the first has no Age."""
    first = await client.get("/a")
    assert first.status_code == 200 and "age" not in first.headers
    assert first.headers["cache-status"] == "swr-cache; fwd=uri-miss; stored"
    clock.advance(3)
    second = await client.get("/a")
    assert second.text == first.text and origin.count == 1
    assert second.headers["age"] == "3"
    assert second.headers["cache-status"] == "swr-cache; hit; ttl=7"
    assert second.headers["content-length"] == str(len(second.content))
    assert second.headers["date"]  # stored with the entry (the app sent none)
    assert second.headers["etag"].startswith('"') and second.headers["etag"].endswith('"')


async def test_distinct_query_strings_are_distinct(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """Each query string is its own entry, kept byte for byte (no reordering)."""
    urls = ["/a?x=1", "/a?x=2", "/a?x=1&y=2", "/a?y=2&x=1", "/a", "/a?"]
    bodies = [(await client.get(u)).text for u in urls]
    assert origin.count == len(urls) - 1  # "/a?" and "/a" are one target for httpx
    again = [(await client.get(u)).text for u in urls]
    assert again == bodies and origin.count == len(urls) - 1
    assert len(set(bodies[:5])) == 5


async def test_hosts_and_forwarding_headers_are_keyed(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """Another Host, or an X-Forwarded-Host, never shares an entry with the plain request."""
    plain = await client.get("/a")
    other = await client.get("/a", headers={"host": "other.example"})
    forwarded = await client.get("/a", headers={"x-forwarded-host": "evil.example"})
    assert origin.count == 3
    assert len({plain.text, other.text, forwarded.text}) == 3
    assert (await client.get("/a")).text == plain.text
    assert (
        await client.get("/a", headers={"host": "testserver:80"})
    ).text == plain.text  # default port
    assert origin.count == 3


async def test_authorization_never_shared(client: httpx.AsyncClient, origin: Origin) -> None:
    """Responses to requests with Authorization are neither stored nor answered from shared entries."""
    origin.handler = lambda scope, n: (
        200,
        [],
        dict(scope["headers"]).get(b"authorization", b"anon") + b"#%d" % n,
    )
    alice = await client.get("/me", headers={"authorization": "Bearer alice"})
    bob = await client.get("/me", headers={"authorization": "Bearer bob"})
    anon = await client.get("/me")
    assert alice.text.startswith("Bearer alice") and bob.text.startswith("Bearer bob")
    assert anon.text.startswith("anon") and origin.count == 3
    # A default-TTL entry (from the anonymous request) is not for credentialed requests.
    carol = await client.get("/me", headers={"authorization": "Bearer carol"})
    assert carol.text.startswith("Bearer carol") and origin.count == 4
    assert (await client.get("/me")).text == anon.text and origin.count == 4


async def test_cookie_never_shared_unless_public(client: httpx.AsyncClient, origin: Origin) -> None:
    """A Cookie request's response is stored only when explicitly public, then shared."""
    origin.handler = lambda scope, n: (
        200,
        [],
        dict(scope["headers"]).get(b"cookie", b"none") + b"#%d" % n,
    )
    a = await client.get("/page", headers={"cookie": "session=a"})
    b = await client.get("/page", headers={"cookie": "session=b"})
    assert a.text.startswith("session=a") and b.text.startswith("session=b")
    assert "set-cookie" not in a.headers
    anon = await client.get("/page")
    assert anon.text.startswith("none") and origin.count == 3
    assert (await client.get("/page", headers={"cookie": "session=c"})).text.startswith("session=c")
    origin.handler = respond(200, ("cache-control", "public, max-age=60"), body="shared")
    await client.get("/public", headers={"cookie": "session=a"})
    assert (await client.get("/public")).headers["cache-status"].startswith("swr-cache; hit")
    assert (await client.get("/public", headers={"cookie": "session=z"})).text == "shared"
    assert origin.count == 5


async def test_ignored_cookies_are_cached_and_hidden(cache: Cache, origin: Origin) -> None:
    """Only-ignorable cookies keep a request cacheable, and the app never sees them."""
    async with client_for(CacheMiddleware(origin, cache=cache, ignore_cookies=["_ga*"])) as client:
        await client.get("/a", headers={"cookie": "_ga=1; _gat=2"})
        assert b"cookie" not in dict(origin.calls[0]["headers"])
        hit = await client.get("/a", headers={"cookie": "_ga=9"})
        assert hit.headers["cache-status"].startswith("swr-cache; hit")
        personal = await client.get("/a", headers={"cookie": "_ga=1; session=x"})
        assert personal.headers["cache-status"] == "swr-cache; fwd=bypass"
        assert origin.count == 2


@pytest.mark.parametrize(
    "headers",
    [
        [("set-cookie", "sid=1")],
        [("cache-control", "private, max-age=60")],
        [("cache-control", 'private="x-user", max-age=60')],
        [("cache-control", "no-store")],
        [("cache-control", "nO-StOrE, max-age=60")],
        [("cache-control", "no-cache")],
        [("vary", "*")],
        [("cache-control", "max-age=0")],
        [("expires", "0")],
    ],
)
async def test_uncacheable_responses_are_not_stored(
    client: httpx.AsyncClient, origin: Origin, headers: list[tuple[str, str]]
) -> None:
    """Set-Cookie, private, no-store, no-cache, Vary: * and already-expired responses are never stored."""
    origin.handler = respond(200, *headers)
    first = await client.get("/x")
    second = await client.get("/x")
    assert origin.count == 2 and first.text != second.text
    assert "age" not in second.headers
    assert second.headers["cache-status"].startswith("swr-cache; fwd=")


async def test_set_cookie_stored_without_it_when_no_cache_names_it(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """With no-cache="Set-Cookie" the rest is stored and Set-Cookie is never replayed."""
    origin.handler = respond(
        200, ("cache-control", 'max-age=60, no-cache="Set-Cookie"'), ("set-cookie", "sid=1")
    )
    first = await client.get("/x")
    assert first.headers["set-cookie"] == "sid=1"  # the origin's own answer is untouched
    client.cookies.clear()  # a new visitor, without the cookie
    second = await client.get("/x")
    assert origin.count == 1 and "set-cookie" not in second.headers


@pytest.mark.parametrize(
    ("status", "stored"), [(404, False), (400, False), (500, False), (301, True), (204, True)]
)
async def test_default_ttl_applies_only_to_safe_statuses(
    client: httpx.AsyncClient, origin: Origin, status: int, stored: bool
) -> None:
    """Without explicit freshness only 200/203/204/300/301/308 are stored; never a 5xx (CPDoS)."""
    origin.handler = respond(status, ("location", "/elsewhere"))
    await client.get("/s")
    await client.get("/s")
    assert origin.count == (1 if stored else 2)


async def test_explicit_freshness_stores_a_404_but_never_a_5xx(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """A 404 with max-age is stored; a 503 with max-age is not."""
    origin.handler = respond(404, ("cache-control", "max-age=60"))
    await client.get("/gone")
    assert (await client.get("/gone")).status_code == 404 and origin.count == 1
    origin.handler = respond(503, ("cache-control", "max-age=60"))
    await client.get("/down")
    await client.get("/down")
    assert origin.count == 3


async def test_vary_is_honoured(client: httpx.AsyncClient, origin: Origin) -> None:
    """Each value of a Vary'd header gets its own entry; an absent header matches only absence."""
    origin.handler = lambda scope, n: (
        200,
        [(b"vary", b"Accept-Language")],
        dict(scope["headers"]).get(b"accept-language", b"none") + b"#%d" % n,
    )
    await client.get("/v", headers={"accept-language": "en"})  # teaches the cache the Vary names
    en = await client.get("/v", headers={"accept-language": "en"})
    fr = await client.get("/v", headers={"accept-language": "fr"})
    none = await client.get("/v")
    calls = origin.count
    assert en.text.startswith("en") and fr.text.startswith("fr") and none.text.startswith("none")
    assert (await client.get("/v", headers={"accept-language": "en"})).text == en.text
    assert (await client.get("/v", headers={"accept-language": "fr"})).text == fr.text
    assert (await client.get("/v")).text == none.text
    assert origin.count == calls


async def test_vary_pairs_are_unambiguous(client: httpx.AsyncClient, origin: Origin) -> None:
    """With Vary: X-A, X-B, a request with only X-A: 1 and one with only X-B: 1 never share an entry."""
    origin.handler = lambda scope, n: (200, [(b"vary", b"X-A, X-B")], b"#%d" % n)
    await client.get("/v", headers={"x-a": "1"})
    a = await client.get("/v", headers={"x-a": "1"})
    b = await client.get("/v", headers={"x-b": "1"})
    assert a.text != b.text
    assert (await client.get("/v", headers={"x-b": "1"})).text == b.text


async def test_a_changed_vary_retires_old_variants(
    client: httpx.AsyncClient, origin: Origin, cache: Cache
) -> None:
    """When a URL's responses start to vary on another field, entries keyed the old way stop matching."""
    origin.handler = lambda scope, n: (200, [(b"vary", b"X-A")], b"#%d" % n)
    old = await client.get("/v", headers={"x-a": "1"})
    assert old.headers["cache-status"] == "swr-cache; fwd=uri-miss; stored"
    assert (await client.get("/v", headers={"x-a": "1"})).text == old.text
    origin.handler = lambda scope, n: (200, [(b"vary", b"X-B")], b"#%d" % n)
    await cache.client.delete(*[k async for k in cache.client.scan_iter(match="h:hv:*")])
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport) and isinstance(transport.app, CacheMiddleware)
    transport.app._keys.forget_vary_names()  # another process learned the new Vary names
    await client.get("/v", headers={"x-a": "1", "x-b": "2"})  # relearns: Vary is X-B now
    new = await client.get("/v", headers={"x-a": "1", "x-b": "2"})
    assert new.text != old.text
    assert (await client.get("/v", headers={"x-a": "9", "x-b": "2"})).text == new.text


async def test_too_many_surrogate_keys_are_not_stored(cache: Cache, origin: Origin) -> None:
    """A response with more tags than max_tags is not stored: some purges could not reach it."""
    origin.handler = respond(200, ("surrogate-key", " ".join(f"t{i}" for i in range(5))))
    async with client_for(CacheMiddleware(origin, cache=cache, max_tags=4)) as client:
        await client.get("/t")
        await client.get("/t")
    assert origin.count == 2


async def test_refresh_of_a_cookie_variant_sends_that_cookie(
    client: httpx.AsyncClient, origin: Origin, clock: FakeClock
) -> None:
    """Where the key holds the Cookie (Vary: Cookie, public) the refresh sends it; never otherwise."""
    origin.handler = lambda scope, n: (
        200,
        [(b"vary", b"Cookie"), (b"cache-control", b"public, max-age=5")],
        dict(scope["headers"]).get(b"cookie", b"-") + b"#%d" % n,
    )
    headers = {"cookie": "theme=dark", "authorization": "Bearer x"}
    await client.get("/c", headers=headers)
    assert (await client.get("/c", headers=headers)).text.startswith("theme=dark")
    clock.advance(6)
    await client.get("/c", headers=headers)
    await wait_until(lambda: origin.count == 2)
    refresh = dict(origin.calls[1]["headers"])
    assert refresh[b"cookie"] == b"theme=dark" and b"authorization" not in refresh


# --- conditional requests ---------------------------------------------------------------


async def test_etag_gives_304_with_weak_comparison(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """If-None-Match (weak comparison, lists, *) against a stored 200 answers 304 with no body."""
    origin.handler = respond(200, ("etag", '"v1"'), ("cache-control", "max-age=60"))
    await client.get("/e")
    for inm in ('W/"v1"', '"v1"', '"x", "v1"', "*"):
        r = await client.get("/e", headers={"if-none-match": inm})
        assert r.status_code == 304 and r.content == b""
        assert r.headers["etag"] == '"v1"' and "age" in r.headers
        assert r.headers["cache-control"] == "max-age=60"
    assert (await client.get("/e", headers={"if-none-match": '"v2"'})).status_code == 200
    assert origin.count == 1


async def test_generated_etag_is_quoted_deterministic_and_revalidates(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """Without an app ETag the entry gets a quoted content hash that conditional GETs match."""
    origin.handler = respond(200, body="same bytes")
    await client.get("/g")
    hit = await client.get("/g")
    etag = hit.headers["etag"]
    assert etag == _http.content_etag(b"text/plain", None, b"same bytes").decode()
    assert (await client.get("/g", headers={"if-none-match": etag})).status_code == 304
    assert origin.count == 1


async def test_if_modified_since(client: httpx.AsyncClient, origin: Origin) -> None:
    """If-Modified-Since is checked against Last-Modified; an invalid date is ignored."""
    origin.handler = respond(200, ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"))
    await client.get("/m")
    later = await client.get("/m", headers={"if-modified-since": "Tue, 02 Jan 2024 00:00:00 GMT"})
    earlier = await client.get("/m", headers={"if-modified-since": "Sun, 31 Dec 2023 00:00:00 GMT"})
    invalid = await client.get("/m", headers={"if-modified-since": "yesterday"})
    assert later.status_code == 304 and earlier.status_code == 200 and invalid.status_code == 200
    # If-None-Match wins over If-Modified-Since.
    both = await client.get(
        "/m",
        headers={"if-none-match": '"nope"', "if-modified-since": "Tue, 02 Jan 2024 00:00:00 GMT"},
    )
    assert both.status_code == 200 and origin.count == 1


async def test_304_from_the_app_is_never_stored(client: httpx.AsyncClient, origin: Origin) -> None:
    """An app 304 goes to its client but is never stored or replayed to one without a precondition."""
    origin.handler = respond(304, ("etag", '"v"'), ("cache-control", "max-age=60"))
    await client.get("/n")
    r = await client.get("/n")
    assert origin.count == 2 and r.headers["cache-status"].startswith("swr-cache; fwd=uri-miss")


async def test_miss_answers_the_clients_validators_itself(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """On a miss the app never sees If-None-Match; a matching client still gets a 304, and the 200 is stored."""
    origin.handler = respond(200, ("etag", '"v9"'))
    r = await client.get("/c", headers={"if-none-match": '"v9"'})
    assert r.status_code == 304 and r.content == b""
    assert b"if-none-match" not in dict(origin.calls[0]["headers"])
    full = await client.get("/c")
    assert full.status_code == 200 and full.content and origin.count == 1


# --- invalidation -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "M-SEARCH"])
async def test_unsafe_methods_invalidate_every_variant(
    client: httpx.AsyncClient, origin: Origin, method: str
) -> None:
    """A 2xx to POST/PUT/PATCH/DELETE/unknown methods purges every variant of the URI, for GET and HEAD."""
    origin.handler = lambda scope, n: (200, [(b"vary", b"Accept")], b"#%d" % n)
    for accept in ("a", "a", "b"):
        await client.get("/r", headers={"accept": accept})
    assert (
        (await client.head("/r", headers={"accept": "b"}))
        .headers["cache-status"]
        .startswith("swr-cache; hit")
    )
    written = await client.request(method, "/r")
    assert written.headers["cache-status"] == "swr-cache; fwd=method"
    before = origin.count
    for accept in ("a", "b"):
        r = await client.head("/r", headers={"accept": accept})
        assert r.headers["cache-status"] == "swr-cache; fwd=vary-miss; stored", accept
    assert origin.count == before + 2


async def test_failed_write_does_not_invalidate(client: httpx.AsyncClient, origin: Origin) -> None:
    """A 4xx or 5xx answer to an unsafe method leaves the entries alone."""
    origin.handler = lambda scope, n: (200 if scope["method"] == "GET" else 409, [], b"#%d" % n)
    await client.get("/w")
    await client.post("/w")
    assert (await client.get("/w")).headers["cache-status"].startswith("swr-cache; hit")


async def test_location_of_the_same_origin_is_invalidated(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """A write's Location/Content-Location on the same origin is purged; another origin's never."""
    origin.handler = lambda scope, n: (
        (201, [(b"location", b"/items/1"), (b"content-location", b"http://other.example/x")], b"")
        if scope["method"] == "POST"
        else (200, [], b"#%d" % n)
    )
    await client.get("/items/1")
    await client.get("/x", headers={"host": "other.example"})
    await client.post("/items")
    assert (
        (await client.get("/items/1")).headers["cache-status"].startswith("swr-cache; fwd=uri-miss")
    )
    assert (
        (await client.get("/x", headers={"host": "other.example"}))
        .headers["cache-status"]
        .startswith("swr-cache; hit")
    )


async def test_tag_purge_removes_response_and_tags_are_stripped(
    client: httpx.AsyncClient, origin: Origin, cache: Cache
) -> None:
    """Surrogate-Key tags are indexed and hidden from clients; purge_tags removes the response."""
    origin.handler = respond(200, ("surrogate-key", "product-1 list"), ("xkey", "extra"))
    first = await client.get("/p")
    assert "surrogate-key" not in first.headers and "xkey" not in first.headers
    assert "surrogate-key" not in (await client.get("/p")).headers
    await cache.purge_tags(["extra"])
    assert (await client.get("/p")).headers["cache-status"].startswith("swr-cache; fwd=uri-miss")
    assert origin.count == 2


async def test_stream_record_for_a_tagged_item_removes_response(
    client: httpx.AsyncClient, origin: Origin, cache: Cache
) -> None:
    """A DynamoDB stream record for an item purges every response tagged with that item."""
    tag = item_tag("Users", {"pk": "u1"})
    origin.handler = respond(200, ("surrogate-key", tag))
    await client.get("/users/u1")
    assert (await client.get("/users/u1")).headers["cache-status"].startswith("swr-cache; hit")
    event = {
        "Records": [
            {
                "eventID": "1",
                "eventName": "MODIFY",
                "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/Users/stream/2024",
                "dynamodb": {"Keys": {"pk": {"S": "u1"}}, "SequenceNumber": "100"},
            }
        ]
    }
    report = await StreamInvalidator(cache).handle(event)
    assert not report.batch_item_failures()["batchItemFailures"]
    assert (
        (await client.get("/users/u1"))
        .headers["cache-status"]
        .startswith("swr-cache; fwd=uri-miss")
    )
    assert origin.count == 2


async def test_purge_url(client: httpx.AsyncClient, origin: Origin, cache: Cache) -> None:
    """purge_url removes every variant of one URL and nothing else."""
    mw = CacheMiddleware(origin, cache=cache)
    await client.get("/u?a=1")
    await client.get("/u?a=2")
    await mw.purge_url("HTTP://TestServer:80/u?a=1")
    assert (
        (await client.get("/u?a=1")).headers["cache-status"].startswith("swr-cache; fwd=uri-miss")
    )
    assert (await client.get("/u?a=2")).headers["cache-status"].startswith("swr-cache; hit")


async def test_purge_beats_an_in_flight_refresh(
    client: httpx.AsyncClient, origin: Origin, cache: Cache, clock: FakeClock
) -> None:
    """A refresh that loaded before a tag purge never stores what it loaded."""
    origin.handler = respond(200, ("surrogate-key", "t1"))
    await client.get("/q")
    clock.advance(SOFT + 1)
    origin.hold()
    stale = await client.get("/q")
    assert stale.headers["cache-status"].startswith("swr-cache; hit; ttl=-")
    await origin.entered.wait()  # the refresh is inside the app
    await cache.purge_tags(["t1"])
    origin.gate.set()
    await wait_until(
        lambda: stats(cache)["refreshes"] == 1 and not cache._engine.refresher.refreshing
    )
    assert (await client.get("/q")).headers["cache-status"].startswith("swr-cache; fwd=uri-miss")


# --- stale-while-revalidate ------------------------------------------------------------------


async def test_stale_served_while_app_blocked_refreshed_once(
    client: httpx.AsyncClient, origin: Origin, cache: Cache, clock: FakeClock
) -> None:
    """Past its freshness the entry is served at once, visibly stale, while exactly one refresh runs."""
    first = await client.get("/s")
    clock.advance(SOFT + 2)
    origin.hold()
    replies = await asyncio.gather(*(client.get("/s") for _ in range(20)))
    assert all(r.text == first.text for r in replies)
    assert all(r.headers["cache-status"] == "swr-cache; hit; ttl=-2" for r in replies)
    assert all(r.headers["age"] == str(int(SOFT + 2)) for r in replies)
    await origin.entered.wait()
    assert origin.count == 2  # one refresh for twenty stale hits
    origin.gate.set()
    await wait_until(lambda: stats(cache)["fills"] == 2)
    fresh = await client.get("/s")
    assert fresh.text != first.text and fresh.headers["cache-status"].startswith(
        "swr-cache; hit; ttl="
    )
    assert origin.count == 2


async def test_refresh_is_built_from_the_stored_request(
    cache: Cache, origin: Origin, clock: FakeClock
) -> None:
    """A refresh carries only Host, Vary'd and forwarding headers, no client, and a fresh context."""
    origin.handler = lambda scope, n: (200, [(b"vary", b"accept-language")], b"#%d" % n)
    inner = CacheMiddleware(origin, cache=cache, ignore_cookies=["_ga"])

    async def outer(scope: Scope, receive: Any, send: Any) -> None:
        # An outer middleware that puts "the current user" in a context variable.
        CURRENT_USER.set("alice")
        await inner(scope, receive, send)

    headers = {
        "accept-language": "en",
        "x-user": "alice",
        "cookie": "_ga=1",
        "x-forwarded-proto": "https",
    }
    async with client_for(outer) as client:
        await client.get("/r?q=1", headers=headers)
        await client.get("/r?q=1", headers=headers)
        clock.advance(SOFT + 1)
        await client.get("/r?q=1", headers=headers)
        await wait_until(lambda: origin.count == 2)
    live, refresh = origin.calls[0], origin.calls[1]
    assert origin.contexts[0] == "alice" and origin.contexts[1] is None
    assert dict(live["headers"])[b"x-user"] == b"alice"
    assert sorted(refresh["headers"]) == [
        (b"accept-language", b"en"),
        (b"host", b"testserver"),
        (b"x-forwarded-proto", b"https"),
    ]
    assert refresh["client"] is None and refresh["method"] == "GET"
    assert refresh["path"] == "/r" and refresh["query_string"] == b"q=1"


async def test_refresh_sends_validators_and_a_304_freshens(
    client: httpx.AsyncClient, origin: Origin, cache: Cache, clock: FakeClock
) -> None:
    """A refresh revalidates with the app's ETag; its 304 keeps the body and renews freshness."""

    def handler(scope: Scope, n: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if dict(scope["headers"]).get(b"if-none-match") == b'"v1"':
            return 304, [(b"etag", b'"v1"'), (b"cache-control", b"max-age=20")], b""
        return 200, [(b"etag", b'"v1"'), (b"cache-control", b"max-age=10")], b"body v1"

    origin.handler = handler
    await client.get("/f")
    clock.advance(11)
    assert (await client.get("/f")).text == "body v1"
    await wait_until(lambda: stats(cache)["fills"] == 2)
    r = await client.get("/f")
    assert r.text == "body v1" and r.headers["cache-control"] == "max-age=20"
    assert r.headers["cache-status"] == "swr-cache; hit; ttl=20" and origin.count == 2


@pytest.mark.parametrize("failure", [500, 502, 503, 504, "exception"])
async def test_failing_refresh_keeps_serving_stale(
    client: httpx.AsyncClient, origin: Origin, cache: Cache, clock: FakeClock, failure: int | str
) -> None:
    """A 5xx or an exception from a refresh never replaces the good entry (stale-if-error)."""
    good = await client.get("/s")
    clock.advance(SOFT + 1)
    if failure == "exception":
        origin.error = RuntimeError("app crashed")
    else:
        origin.handler = respond(int(failure))
    assert (await client.get("/s")).text == good.text
    await wait_until(lambda: stats(cache)["refresh_errors"] == 1)
    r = await client.get("/s")
    assert r.status_code == 200 and r.text == good.text
    assert r.headers["cache-status"] == "swr-cache; hit; ttl=-1"
    assert origin.count == 2  # the failed refresh backs off: no refresh per stale hit


async def test_uncacheable_refresh_deletes_the_entry(
    client: httpx.AsyncClient, origin: Origin, cache: Cache, clock: FakeClock
) -> None:
    """A refresh that comes back no-store removes the stale entry instead of serving it on."""
    await client.get("/d")
    clock.advance(SOFT + 1)
    origin.handler = respond(200, ("cache-control", "no-store"))
    await client.get("/d")
    assert [k async for k in cache.client.scan_iter(match="h:e:*")]
    await wait_until(
        lambda: stats(cache)["http_uncacheable"] == 1 and not cache._engine.refresher.refreshing
    )
    assert [k async for k in cache.client.scan_iter(match="h:e:*")] == []


async def test_must_revalidate_and_s_maxage_are_never_served_stale(
    client: httpx.AsyncClient, origin: Origin, clock: FakeClock
) -> None:
    """must-revalidate, and s-maxage without stale-*, end at their lifetime; swr extends it."""
    origin.handler = respond(200, ("cache-control", "max-age=5, must-revalidate"))
    await client.get("/mr")
    origin.handler = respond(200, ("cache-control", "s-maxage=5"))
    await client.get("/sm")
    origin.handler = respond(200, ("cache-control", "s-maxage=5, stale-while-revalidate=50"))
    await client.get("/swr")
    clock.advance(6)
    origin.hold()
    swr = asyncio.create_task(client.get("/swr"))
    assert (await swr).headers["cache-status"] == "swr-cache; hit; ttl=-1"
    origin.gate.set()
    for path in ("/mr", "/sm"):
        assert (
            (await client.get(path)).headers["cache-status"].startswith("swr-cache; fwd=uri-miss")
        )


async def test_explicit_freshness_and_app_age(
    client: httpx.AsyncClient, origin: Origin, clock: FakeClock
) -> None:
    """max-age beats the default TTL, and an Age from the app counts against it."""
    origin.handler = respond(200, ("cache-control", "max-age=30"), ("age", "10"))
    await client.get("/x")
    clock.advance(5)
    r = await client.get("/x")
    assert r.headers["age"] == "15" and r.headers["cache-status"] == "swr-cache; hit; ttl=15"


# --- HEAD, bodies, streaming --------------------------------------------------------------------


async def test_head_answered_from_get_entry(client: httpx.AsyncClient, origin: Origin) -> None:
    """HEAD is answered from the GET entry (its Content-Length, no body); a HEAD miss fetches a GET."""
    get = await client.get("/h")
    head = await client.head("/h")
    assert origin.count == 1 and head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["cache-status"].startswith("swr-cache; hit")
    miss = await client.head("/h2")
    assert miss.content == b"" and origin.calls[-1]["method"] == "GET"
    again = await client.get("/h2")
    assert again.headers["cache-status"].startswith("swr-cache; hit") and again.content
    assert origin.count == 2


async def test_oversized_body_streams_through_unstored(cache: Cache, origin: Origin) -> None:
    """A body over max_body_size reaches the client whole and is not stored."""
    origin.handler = respond(200, body="x" * 5000)
    async with client_for(CacheMiddleware(origin, cache=cache, max_body_size=1000)) as client:
        first = await client.get("/big")
        second = await client.get("/big")
    assert len(first.content) == len(second.content) == 5000
    assert origin.count == 2


async def test_chunked_body_over_limit_is_not_stored(cache: Cache) -> None:
    """A body without Content-Length that outgrows the limit mid-stream keeps streaming, unstored."""
    calls = 0

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(10):
            await send({"type": "http.response.body", "body": b"y" * 300, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with client_for(CacheMiddleware(app, cache=cache, max_body_size=1000)) as client:
        assert len((await client.get("/c")).content) == 3000
        assert len((await client.get("/c")).content) == 3000
    assert calls == 2


async def test_large_entries_are_served_in_chunks(cache: Cache) -> None:
    """A stored body larger than one chunk is sent as several body messages."""
    body = bytes(range(256)) * 1000
    messages: list[MutableMapping[str, Any]] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    mw = CacheMiddleware(app, cache=cache)
    async with client_for(mw) as client:
        await client.get("/big")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": "/big",
        "raw_path": b"/big",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "server": ("testserver", 80),
    }
    await mw(scope, receive, send)
    bodies = [m for m in messages if m["type"] == "http.response.body"]
    assert len(bodies) > 1 and b"".join(m["body"] for m in bodies) == body


async def test_event_stream_streams_through_unstored(cache: Cache) -> None:
    """A text/event-stream response (Starlette StreamingResponse) is passed through and never stored."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    calls = 0

    async def events(request: Any) -> StreamingResponse:
        nonlocal calls
        calls += 1

        async def gen() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {i}\n\n".encode()

        return StreamingResponse(gen(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/events", events)])
    async with client_for(CacheMiddleware(app, cache=cache)) as client:
        first = await client.get("/events")
        second = await client.get("/events")
    assert first.text == second.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert calls == 2 and second.headers["cache-status"].startswith("swr-cache; fwd=")


async def test_pathsend_is_removed_from_the_inner_scope(cache: Cache) -> None:
    """Extensions whose body cannot be teed (pathsend, zerocopysend) are hidden from the app."""
    seen: list[dict[str, Any]] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope.get("extensions", {}))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": "/f",
        "raw_path": b"/f",
        "query_string": b"",
        "headers": [(b"host", b"h")],
        "server": ("h", 80),
        "extensions": {"http.response.pathsend": {}, "http.response.zerocopysend": {}, "other": {}},
    }
    await CacheMiddleware(app, cache=cache)(scope, receive, send)
    assert seen == [{"other": {}}]


# --- bypass, request directives ------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"range": "bytes=0-1"},
        {"if-match": '"x"'},
        {"if-unmodified-since": "Mon, 01 Jan 2024 00:00:00 GMT"},
        {"if-range": '"x"'},
        {"x-http-method-override": "DELETE"},
        {"x-original-url": "/admin"},
        {"cache-control": "no-store"},
    ],
)
async def test_bypassed_requests(
    client: httpx.AsyncClient, origin: Origin, headers: dict[str, str]
) -> None:
    """Range, preconditions a cache may not evaluate, method overrides and no-store bypass the cache."""
    await client.get("/b")
    r = await client.get("/b", headers=headers)
    assert r.headers["cache-status"] == "swr-cache; fwd=bypass" and origin.count == 2


async def test_get_with_a_body_bypasses(client: httpx.AsyncClient, origin: Origin) -> None:
    """A GET carrying a body (an unkeyed input) is neither answered nor stored."""
    await client.get("/b")
    r = await client.request("GET", "/b", content=b"payload")
    assert r.headers["cache-status"] == "swr-cache; fwd=bypass" and origin.count == 2


async def test_request_no_cache_and_max_age(
    client: httpx.AsyncClient, origin: Origin, clock: FakeClock
) -> None:
    """no-cache, Pragma: no-cache and max-age=0 go to the app; max-age=N uses entries young enough."""
    await client.get("/d")
    clock.advance(5)
    for headers in (
        {"cache-control": "no-cache"},
        {"pragma": "no-cache"},
        {"cache-control": "max-age=0"},
    ):
        r = await client.get("/d", headers=headers)
        assert r.headers["cache-status"] == "swr-cache; fwd=request"
    assert origin.count == 4
    assert (await client.get("/d", headers={"cache-control": "max-age=3"})).headers[
        "cache-status"
    ] == ("swr-cache; fwd=request")
    assert (
        (await client.get("/d", headers={"cache-control": "max-age=30"}))
        .headers["cache-status"]
        .startswith("swr-cache; hit")
    )
    assert (await client.get("/d", headers={"cache-control": "min-fresh=8"})).headers[
        "cache-status"
    ] == ("swr-cache; fwd=request")


async def test_request_directives_can_be_ignored(cache: Cache, origin: Origin) -> None:
    """With request_directives=False no client can force a miss."""
    async with client_for(CacheMiddleware(origin, cache=cache, request_directives=False)) as client:
        await client.get("/d")
        r = await client.get("/d", headers={"cache-control": "no-cache"})
    assert r.headers["cache-status"].startswith("swr-cache; hit") and origin.count == 1


async def test_only_if_cached(client: httpx.AsyncClient, origin: Origin) -> None:
    """only-if-cached answers from the cache or with 504, never from the app."""
    miss = await client.get("/o", headers={"cache-control": "only-if-cached"})
    assert miss.status_code == 504 and origin.count == 0
    await client.get("/o")
    hit = await client.get("/o", headers={"cache-control": "only-if-cached"})
    assert hit.status_code == 200 and origin.count == 1


# --- concurrency ---------------------------------------------------------------------------------


async def test_concurrent_misses_coalesce(
    client: httpx.AsyncClient, origin: Origin, clock: FakeClock
) -> None:
    """Fifty concurrent cold GETs of one URL make one app call; the others are answered from it."""
    origin.hold()
    tasks = [asyncio.create_task(client.get("/c")) for _ in range(50)]
    await origin.entered.wait()
    await wait_until(lambda: stats_of(client)["misses"] == 50)
    clock.advance(1)  # the response arrives after every request did
    origin.gate.set()
    replies = await asyncio.gather(*tasks)
    assert origin.count == 1 and len({r.text for r in replies}) == 1
    statuses = sorted(r.headers["cache-status"] for r in replies)
    assert statuses.count("swr-cache; fwd=uri-miss; stored") == 1
    assert all(
        s in ("swr-cache; fwd=uri-miss; collapsed", "swr-cache; fwd=uri-miss; stored")
        for s in statuses
    )


async def test_waiters_never_reuse_a_personal_leader_response(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """A request waiting on another's load asks the app itself when that response is not shareable."""
    origin.handler = lambda scope, n: (
        200,
        [],
        dict(scope["headers"]).get(b"cookie", b"anon") + b"#%d" % n,
    )
    origin.hold()
    leader = asyncio.create_task(client.get("/p", headers={"cookie": "session=alice"}))
    await origin.entered.wait()
    follower = asyncio.create_task(client.get("/p"))
    await wait_until(lambda: stats_of(client)["misses"] == 2)  # the follower waits on the load
    origin.gate.set()
    a, b = await leader, await follower
    assert a.text.startswith("session=alice") and b.text.startswith("anon")


async def test_lock_timeout_bounds_the_wait_for_another_load(cache: Cache, origin: Origin) -> None:
    """A request waits for another's load at most lock_timeout, then asks the app itself (not stored)."""
    async with client_for(CacheMiddleware(origin, cache=cache, lock_timeout=0.05)) as client:
        origin.hold()
        leader = asyncio.create_task(client.get("/slow"))
        await origin.entered.wait()
        follower = asyncio.create_task(client.get("/slow"))
        await wait_until(lambda: origin.count == 2)  # the follower gave up and called the app
        origin.gate.set()
        first, second = await leader, await follower
    assert second.headers["cache-status"] == "swr-cache; fwd=uri-miss; detail=lock-timeout"
    assert first.headers["cache-status"] == "swr-cache; fwd=uri-miss; stored"
    assert stats(cache)["http_lock_timeouts"] == 1


async def test_app_exception_propagates_and_waiters_recover(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """An app exception reaches its own request unchanged; a waiter on that load asks the app itself."""

    def handler(scope: Scope, n: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if n == 1:
            raise RuntimeError("boom")
        return text(scope, n)

    origin.handler = handler
    origin.hold()
    leader = asyncio.create_task(client.get("/x"))
    await origin.entered.wait()
    follower = asyncio.create_task(client.get("/x"))
    await wait_until(lambda: stats_of(client)["misses"] == 2)
    origin.gate.set()
    with pytest.raises(RuntimeError, match="boom"):
        await leader
    r = await follower
    assert r.status_code == 200 and r.text.startswith("#2")


# --- plumbing ------------------------------------------------------------------------------------


async def test_non_http_scopes_pass_through(cache: Cache) -> None:
    """Lifespan and websocket scopes reach the app untouched."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    mw = CacheMiddleware(app, cache=cache)
    for kind in ("lifespan", "websocket"):
        await mw({"type": kind}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan", "websocket"]


async def test_stacked_twice_is_refused(cache: Cache, origin: Origin) -> None:
    """Two CacheMiddlewares on one request is a configuration error."""
    app = CacheMiddleware(CacheMiddleware(origin, cache=cache), cache=cache)
    async with client_for(app) as client:
        with pytest.raises(ConfigError, match="twice"):
            await client.get("/")


async def test_cache_not_entered_is_a_clear_error(
    redis_client: aioredis.Redis, origin: Origin
) -> None:
    """A cache the lifespan never entered fails loudly, naming the fix."""
    cache = Cache(redis_client, namespace="h")
    async with client_for(CacheMiddleware(origin, cache=cache)) as client:
        with pytest.raises(CacheNotEnteredError, match="async with cache"):
            await client.get("/")


async def test_redis_down_fails_open(origin: Origin) -> None:
    """With Redis unreachable every GET is answered by the app."""
    from devtools.devservers import free_port

    dead = aioredis.Redis(port=free_port(), socket_timeout=0.2, socket_connect_timeout=0.2)
    cache = Cache(dead, namespace="h", breaker_threshold=1)
    async with CacheHost(cache), client_for(CacheMiddleware(origin, cache=cache)) as client:
        replies = [await client.get("/a") for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 200] and origin.count == 3
    await dead.aclose()


async def test_invalid_configuration(cache: Cache, origin: Origin) -> None:
    """Nonsense settings raise ConfigError at construction."""
    for kwargs in (
        {"soft_ttl": 0},
        {"max_body_size": -1},
        {"lock_timeout": 0},
        {"cache_status": "a b"},
    ):
        with pytest.raises(ConfigError):
            CacheMiddleware(origin, cache=cache, **kwargs)


# --- the rules, without Redis ----------------------------------------------------------------------


def judge(
    status: int = 200, *headers: tuple[str, str], cookie: bool = False, auth: bool = False
) -> _http.Judgement:
    raw = [(k.encode(), v.encode()) for k, v in headers]
    return _http.judge_response(
        status,
        raw,
        request_time=1000.0,
        response_time=1000.0,
        has_cookie=cookie,
        has_auth=auth,
        default_ttl=10.0,
        grace=90.0,
        grace_explicit=True,
        max_ttl=86400.0,
        max_stale=86400.0,
    )


def test_cache_control_parsing() -> None:
    """Directives are case-insensitive, quoted strings unquoted, conflicting duplicates invalid."""
    cc = _http.parse_cache_control(
        [b'Max-Age=60, no-cache="Set-Cookie, X-A", private', b"max-age=60"]
    )
    assert cc == {"max-age": "60", "no-cache": "Set-Cookie, X-A", "private": None}
    assert _http.seconds(_http.parse_cache_control([b"max-age=1, max-age=2"]), "max-age") == -1
    assert _http.seconds(_http.parse_cache_control([b'max-age="5"']), "max-age") == 5
    assert (
        _http.seconds(_http.parse_cache_control([b"max-age=99999999999"]), "max-age") == 2147483648
    )
    assert _http.seconds(_http.parse_cache_control([b"max-age=abc"]), "max-age") == -1


def test_http_dates() -> None:
    """All three HTTP-date forms parse, GMT only; anything else is invalid."""
    t = 784111777.0
    for text in (
        b"Sun, 06 Nov 1994 08:49:37 GMT",
        b"Sunday, 06-Nov-94 08:49:37 GMT",
        b"Sun Nov  6 08:49:37 1994",
        b"sun, 06 nov 1994 08:49:37 gmt",
    ):
        assert _http.parse_http_date(text) == t, text
    for bad in (b"0", b"Sun, 06 Nov 1994 08:49:37 +0100", b"yesterday", b"", None):
        assert _http.parse_http_date(bad) is None
    assert _http.parse_http_date(_http.format_http_date(t)) == t


def test_freshness_rules() -> None:
    """s-maxage beats max-age beats Expires beats the default TTL; invalid values mean stale."""
    assert judge(200, ("cache-control", "s-maxage=5, max-age=50")).freshness == 5
    assert (
        judge(
            200, ("cache-control", "max-age=50"), ("expires", "Thu, 01 Jan 2099 00:00:00 GMT")
        ).freshness
        == 50
    )
    assert (
        judge(
            200,
            ("date", "Thu, 01 Jan 1970 00:16:40 GMT"),
            ("expires", "Thu, 01 Jan 1970 00:17:00 GMT"),
        ).freshness
        == 20
    )
    assert judge(200).freshness == 10 and judge(200).stale == 90
    assert not judge(200, ("cache-control", "max-age=abc")).store  # invalid: already stale
    assert not judge(200, ("expires", "garbage")).store
    assert judge(200, ("cache-control", "max-age=0, stale-while-revalidate=30")).stale == 30


def test_stale_windows() -> None:
    """must-revalidate and bare s-maxage allow no stale; stale-while-revalidate and grace do."""
    assert judge(200, ("cache-control", "max-age=5, must-revalidate")).stale == 0
    assert judge(200, ("cache-control", "max-age=5, proxy-revalidate")).stale == 0
    assert judge(200, ("cache-control", "s-maxage=5")).stale == 0
    assert judge(200, ("cache-control", "s-maxage=5, stale-while-revalidate=7")).stale == 90
    assert judge(200, ("cache-control", "max-age=5")).stale == 90


def test_credentials_rules() -> None:
    """Authorization needs public, s-maxage or must-revalidate; Cookie needs public or s-maxage."""
    assert not judge(200, ("cache-control", "max-age=60"), auth=True).store
    assert judge(200, ("cache-control", "max-age=60, must-revalidate"), auth=True).store
    assert not judge(200, ("cache-control", "max-age=60, must-revalidate"), cookie=True).store
    assert judge(200, ("cache-control", "public, max-age=60"), cookie=True).store
    assert not judge(
        200, ("cache-control", "public"), cookie=True
    ).store  # no default TTL with credentials


def test_etag_comparison() -> None:
    """Weak comparison ignores W/; lists and * are understood; garbage matches nothing."""
    assert _http.none_match(b'W/"a"', b'"a"') and _http.none_match(b'"a"', b'W/"a"')
    assert _http.none_match(b'"x", W/"a"', b'"a"') and _http.none_match(b"*", None)
    assert not _http.none_match(b'"b"', b'"a"') and not _http.none_match(b"garbage", b'"a"')


def test_key_parts() -> None:
    """Authorities are lower-cased without default ports; tags name URLs; long ones are hashed."""
    assert _http.authority("http", b"Example.COM:80", None) == "example.com"
    assert _http.authority("https", b"example.com:443", None) == "example.com"
    assert _http.authority("https", b"example.com:8443", None) == "example.com:8443"
    assert _http.authority("http", None, ("10.0.0.1", 8000)) == "10.0.0.1:8000"
    assert CacheMiddleware.url_tag("http://Example.com:80/a?b=1") == "url:http://example.com/a?b=1"
    assert CacheMiddleware.url_tag("http://e.com/" + "x" * 500).startswith("url#")
    assert _http.render_pairs([("a", None)]) != _http.render_pairs([("a", b"")])


# --- issue 12: slow origins, header spellings, bodies, lengths, entry size -------------------------


async def test_slow_origin_is_cached_and_served_stale_while_one_refresh_runs(
    cache: Cache, origin: Origin, clock: FakeClock
) -> None:
    """An app slower than soft_ttl is stored with its grace; stale answers come at once, one refresh."""

    def slow(scope: Scope, n: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        clock.advance(2.5)  # the app takes longer than the default freshness
        return text(scope, n)

    origin.handler = slow
    async with client_for(CacheMiddleware(origin, cache=cache, soft_ttl=2, hard_ttl=60)) as client:
        first = await client.get("/slow")
        assert first.headers["cache-status"] == "swr-cache; fwd=uri-miss; stored"
        hit = await client.get("/slow")
        assert hit.headers["cache-status"] == "swr-cache; hit; ttl=2" and origin.count == 1
        clock.advance(3)
        origin.hold()
        stale = [await client.get("/slow") for _ in range(5)]  # the refresh is held at the gate
        assert {r.text for r in stale} == {first.text}
        assert all(r.headers["cache-status"].startswith("swr-cache; hit; ttl=-") for r in stale)
        await origin.entered.wait()
        assert origin.count == 2  # one refresh, however many stale answers
        origin.gate.set()
        await wait_until(lambda: stats(cache)["fills"] == 2)
        fresh = await client.get("/slow")
    assert fresh.text.startswith("#2") and fresh.headers["cache-status"].startswith(
        "swr-cache; hit"
    )
    assert origin.count == 2 and stats(cache)["http_uncacheable"] == 0


def test_default_ttl_runs_from_arrival_and_keeps_its_grace() -> None:
    """A default-TTL response that took longer than the TTL is stored with the full grace."""
    raw = [(b"content-type", b"text/plain")]
    kwargs: dict[str, Any] = {
        "has_cookie": False,
        "has_auth": False,
        "default_ttl": 2.0,
        "grace": 58.0,
        "grace_explicit": False,
        "max_ttl": 86400.0,
        "max_stale": 86400.0,
    }
    j = _http.judge_response(200, raw, request_time=100.0, response_time=105.0, **kwargs)
    assert j.store and j.initial_age == 5 and j.soft == 2 and j.stale == 58
    # Explicit freshness used up on arrival is still refused (no grace for it here).
    late = [(b"cache-control", b"max-age=2")]
    assert not _http.judge_response(
        200, late, request_time=100.0, response_time=105.0, **kwargs
    ).store


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x_forwarded_host", "evil.example"),
        ("X_Forwarded_Host", "evil.example"),
        ("x_forwarded-proto", "https"),
        ("forwarded", "host=evil.example"),
    ],
)
async def test_underscore_spellings_of_keyed_headers_are_keyed(
    client: httpx.AsyncClient, origin: Origin, name: str, value: str
) -> None:
    """X_Forwarded_Host (any mix of _ and -) is part of the key: it cannot poison the plain entry."""
    origin.handler = lambda scope, n: (
        200,
        [],
        b"%d " % n + b";".join(k + b"=" + v for k, v in scope["headers"] if b"forward" in k),
    )
    poisoned = await client.get("/p", headers={name: value})
    assert value.encode() in poisoned.content
    plain = await client.get("/p")
    assert value not in plain.text and origin.count == 2
    assert (await client.get("/p")).text == plain.text
    assert (await client.get("/p", headers={name: value})).text == poisoned.text
    assert origin.count == 2


@pytest.mark.parametrize(
    "headers",
    [
        {"x_http_method_override": "DELETE"},
        {"X_Method_Override": "PUT"},
        {"x_original_url": "/admin"},
        {"if_match": '"x"'},
        {"transfer_encoding": "chunked"},
    ],
)
async def test_underscore_spellings_of_bypass_headers_bypass(
    client: httpx.AsyncClient, origin: Origin, headers: dict[str, str]
) -> None:
    """Method overrides, rewrites and preconditions bypass the cache in their _ spelling too."""
    await client.get("/b")
    r = await client.get("/b", headers=headers)
    assert r.headers["cache-status"] == "swr-cache; fwd=bypass" and origin.count == 2


async def test_underscore_spelling_of_a_varied_header_is_keyed(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """A response varying on Accept-Language is keyed on Accept_Language as well."""

    def handler(scope: Scope, n: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        h = {k.replace(b"_", b"-"): v for k, v in scope["headers"]}
        return 200, [(b"vary", b"Accept-Language")], h.get(b"accept-language", b"none") + b"#%d" % n

    origin.handler = handler
    en = await client.get("/v", headers={"accept-language": "en"})
    fr = await client.get("/v", headers={"accept_language": "fr"})
    assert en.text.startswith("en") and fr.text.startswith("fr")
    assert (await client.get("/v", headers={"Accept_Language": "fr"})).text == fr.text
    assert (await client.get("/v", headers={"accept-language": "fr"})).text == fr.text
    assert (await client.get("/v", headers={"accept-language": "en"})).text == en.text
    assert origin.count == 2


def strip_content_length(app: Any) -> Any:
    """An outer ASGI layer that delivers bodies without Content-Length (as HTTP/2 servers may)."""

    async def outer(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = dict(scope)
            scope["headers"] = [
                (k, v) for k, v in scope["headers"] if k.lower() != b"content-length"
            ]
        await app(scope, receive, send)

    return outer


class BodyEcho:
    """An app answering with the request body it read (and its call number)."""

    def __init__(self) -> None:
        self.calls = 0
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.calls += 1
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"#%d body=%s" % (self.calls, body)})


async def test_get_body_without_content_length_bypasses_and_reaches_the_app(cache: Cache) -> None:
    """A GET whose receive delivers a body, without Content-Length, is never stored nor served."""
    app = BodyEcho()
    async with client_for(strip_content_length(CacheMiddleware(app, cache=cache))) as client:
        evil = await client.request("GET", "/q", content=b"id=evil")
        assert evil.headers["cache-status"] == "swr-cache; fwd=bypass"
        assert app.bodies == [b"id=evil"]
        plain = await client.get("/q")
        assert b"evil" not in plain.content
        assert plain.headers["cache-status"] == "swr-cache; fwd=uri-miss; stored"
        again = await client.request("GET", "/q", content=b"id=evil")
        assert again.text == "#3 body=id=evil"  # a body is never answered from the cache
        assert (await client.get("/q")).text == plain.text
    assert app.calls == 3


async def test_get_body_after_empty_chunks_is_seen(cache: Cache) -> None:
    """A body that arrives after empty ``more_body`` messages still bypasses; the app gets it all."""
    app = BodyEcho()
    messages = [
        {"type": "http.request", "body": b"", "more_body": True},
        {"type": "http.request", "body": b"id=", "more_body": True},
        {"type": "http.request", "body": b"evil", "more_body": False},
    ]

    async def receive() -> Scope:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[Scope] = []

    async def send(message: Scope) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": "/q",
        "raw_path": b"/q",
        "query_string": b"",
        "headers": [(b"host", b"h")],
        "server": ("h", 80),
    }
    await CacheMiddleware(app, cache=cache)(scope, receive, send)
    assert app.bodies == [b"id=evil"]
    assert (b"cache-status", b"swr-cache; fwd=bypass") in sent[0]["headers"]


async def test_empty_streamed_request_body_is_cacheable(cache: Cache) -> None:
    """Empty ``more_body`` messages are no body: the GET is cached and the app sees an empty one."""
    app = BodyEcho()
    mw = CacheMiddleware(app, cache=cache)

    def call() -> tuple[Any, list[Scope]]:
        messages = [
            {"type": "http.request", "body": b"", "more_body": True},
            {"type": "http.request", "body": b"", "more_body": False},
        ]

        async def receive() -> Scope:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        sent: list[Scope] = []

        async def send(message: Scope) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "GET",
            "scheme": "http",
            "path": "/e",
            "raw_path": b"/e",
            "query_string": b"",
            "headers": [(b"host", b"h")],
            "server": ("h", 80),
        }
        return mw(scope, receive, send), sent

    first, _ = call()
    await first
    second, sent2 = call()
    await second
    assert app.calls == 1 and app.bodies == [b""]
    assert dict(sent2[0]["headers"])[b"cache-status"].startswith(b"swr-cache; hit")


async def test_body_shorter_than_content_length_is_not_stored(
    client: httpx.AsyncClient, origin: Origin, cache: Cache
) -> None:
    """A response whose body is shorter than its Content-Length is passed on but never stored."""
    origin.handler = respond(200, ("content-length", "100"), body="only 12 byte")
    short = await client.get("/short")
    assert short.headers["cache-status"] == "swr-cache; fwd=uri-miss; stored=?0"
    assert stats(cache)["http_length_mismatches"] == 1
    origin.handler = respond(200, body="complete")
    r = await client.get("/short")
    assert r.text == "complete" and origin.count == 2


async def test_length_mismatch_label_and_count(cache: Cache) -> None:
    """A short body is labelled stored=?0 (it came in one message), counted and never stored."""
    sent: list[Scope] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"100")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"short", "more_body": False})

    async def receive() -> Scope:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Scope) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": "/s",
        "raw_path": b"/s",
        "query_string": b"",
        "headers": [(b"host", b"h")],
        "server": ("h", 80),
    }
    mw = CacheMiddleware(app, cache=cache)
    await mw(dict(scope), receive, send)
    assert (b"cache-status", b"swr-cache; fwd=uri-miss; stored=?0") in sent[0]["headers"]
    sent.clear()
    await mw(dict(scope), receive, send)  # remembered as uncacheable for a while: passed through
    assert (b"cache-status", b"swr-cache; fwd=uri-miss; detail=uncacheable") in sent[0]["headers"]
    assert stats(cache)["http_length_mismatches"] == 1 and stats(cache)["fills"] == 0


async def test_stored_only_when_the_engine_stores_it(
    redis_client: aioredis.Redis, clock: FakeClock, origin: Origin
) -> None:
    """max_body_size is capped at max_entry_bytes; an entry too big to store says stored=?0."""
    cache = Cache(
        redis_client, namespace="h", soft_ttl=10, hard_ttl=100, clock=clock, max_entry_bytes=4000
    )
    async with CacheHost(cache):
        mw = CacheMiddleware(origin, cache=cache, max_body_size=1 << 20)
        assert mw.max_body_size == 4000
        async with client_for(mw) as client:
            for path, size, stored in (("/big", 3900, False), ("/small", 1000, True)):
                origin.handler = respond(200, body="x" * size)
                first = await client.get(path)
                label = "stored" if stored else "stored=?0"
                assert first.headers["cache-status"] == f"swr-cache; fwd=uri-miss; {label}", path
                second = await client.get(path)
                assert second.headers["cache-status"].startswith(
                    "swr-cache; hit" if stored else "swr-cache; fwd="
                )
            # With a Content-Length the decision is made before any body arrives.
            origin.handler = respond(200, ("content-length", "3900"), body="y" * 3900)
            r = await client.get("/declared")
            assert r.headers["cache-status"] == "swr-cache; fwd=uri-miss; stored=?0"
        assert stats(cache)["fills_skipped_too_large"] == 0
        assert stats(cache)["fills"] == 1


async def test_streamed_response_does_not_claim_stored(cache: Cache) -> None:
    """A response in several body messages says neither stored nor not: unknown when the headers left."""
    sent: list[Scope] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"one ", "more_body": True})
        await send({"type": "http.response.body", "body": b"two", "more_body": False})

    async def receive() -> Scope:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Scope) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": "/st",
        "raw_path": b"/st",
        "query_string": b"",
        "headers": [(b"host", b"h")],
        "server": ("h", 80),
    }
    mw = CacheMiddleware(app, cache=cache)
    await mw(dict(scope), receive, send)
    assert (b"cache-status", b"swr-cache; fwd=uri-miss") in sent[0]["headers"]
    assert [m.get("body") for m in sent[1:]] == [b"one ", b"two"]
    sent.clear()
    await mw(dict(scope), receive, send)
    assert sent[-1]["body"] == b"one two"


# --- issue 16 point 5: cache_by_default=False ----------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "stored"),
    [
        ((), False),
        ((("cache-control", "max-age=60"),), True),
        ((("cache-control", "public"),), True),
        ((("cache-control", "s-maxage=60"),), True),
        ((("cache-control", "private, max-age=60"),), False),
        ((("cache-control", "no-store, max-age=60"),), False),
        ((("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),), False),
        ((("cdn-cache-control", "max-age=60"),), True),
    ],
)
async def test_cache_by_default_false_stores_only_shareable_responses(
    cache: Cache, origin: Origin, headers: tuple[tuple[str, str], ...], stored: bool
) -> None:
    """With cache_by_default=False only public, s-maxage or max-age responses are stored."""
    origin.handler = respond(200, *headers)
    async with client_for(CacheMiddleware(origin, cache=cache, cache_by_default=False)) as client:
        first = await client.get("/openapi.json")
        await client.get("/openapi.json")
    assert origin.count == (1 if stored else 2)
    assert first.headers["cache-status"].endswith("; stored" if stored else "; stored=?0")


async def test_cache_by_default_true_stores_unmarked_responses(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """The default stays: a 200 without Cache-Control is stored for soft_ttl."""
    await client.get("/stats")
    await client.get("/stats")
    assert origin.count == 1


# --- RFC 9213 targeted fields, Age ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "stored"),
    [
        ((("cdn-cache-control", "no-store"), ("cache-control", "max-age=60")), False),
        ((("cdn-cache-control", "private"), ("cache-control", "public, max-age=60")), False),
        ((("cdn-cache-control", "no-cache"), ("cache-control", "max-age=60")), False),
        ((("cdn-cache-control", "max-age=60"), ("cache-control", "no-store")), True),
        ((("cdn-cache-control", "max-age=60"), ("cache-control", "private")), True),
        ((("cdn-cache-control", "max-age=0"), ("cache-control", "max-age=60")), False),
        ((("cdn-cache-control", "Max-Age=0"), ("cache-control", "max-age=60")), True),  # invalid
        ((("cdn-cache-control", "max-age=60"), ("expires", "0")), True),
    ],
)
async def test_cdn_cache_control_overrides_cache_control(
    client: httpx.AsyncClient, origin: Origin, headers: tuple[tuple[str, str], ...], stored: bool
) -> None:
    """CDN-Cache-Control, when valid, decides instead of Cache-Control and Expires (RFC 9213)."""
    origin.handler = respond(200, *headers)
    await client.get("/t")
    await client.get("/t")
    assert origin.count == (1 if stored else 2)


async def test_targeted_fields_are_configurable_in_order(cache: Cache, origin: Origin) -> None:
    """A field name of our own, listed first, beats CDN-Cache-Control; () turns them all off."""
    origin.handler = respond(
        200,
        ("swr-cache-control", "max-age=60"),
        ("cdn-cache-control", "no-store"),
        ("cache-control", "no-store"),
    )
    mw = CacheMiddleware(
        origin, cache=cache, targeted_fields=("Swr-Cache-Control", "CDN-Cache-Control")
    )
    async with client_for(mw) as client:
        await client.get("/a")
        await client.get("/a")
    assert origin.count == 1
    async with client_for(CacheMiddleware(origin, cache=cache, targeted_fields=())) as client:
        await client.get("/b")
        await client.get("/b")
    assert origin.count == 3


@pytest.mark.parametrize(
    ("age", "stored"),
    [
        ("7200, 0", False),
        ("0, 0", False),
        ("7200.0", False),
        ("abc", False),
        ("-1", False),
        ("7200;foo=1", False),
        ("10", True),
        (" 10 ", True),
    ],
)
async def test_age_that_is_not_one_delta_seconds_is_stale(
    client: httpx.AsyncClient, origin: Origin, age: str, stored: bool
) -> None:
    """Age: 7200, 0 is never read as 0: a list or a malformed Age makes the response stale."""
    origin.handler = respond(200, ("cache-control", "max-age=3600"), ("age", age))
    await client.get("/age")
    await client.get("/age")
    assert origin.count == (1 if stored else 2)


async def test_first_response_of_a_varied_url_is_stored(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """The first Vary'd response is stored under its request's values of the Vary'd fields."""
    origin.handler = lambda scope, n: (
        200,
        [(b"vary", b"Accept-Language")],
        dict(scope["headers"]).get(b"accept-language", b"none") + b"#%d" % n,
    )
    first = await client.get("/v", headers={"accept-language": "en"})
    assert first.headers["cache-status"] == "swr-cache; fwd=uri-miss; stored"
    hit = await client.get("/v", headers={"accept-language": "en"})
    assert hit.text == first.text and hit.headers["cache-status"].startswith("swr-cache; hit")
    fr = await client.get("/v", headers={"accept-language": "fr"})
    assert fr.text.startswith("fr") and origin.count == 2


# --- issue 12 point 6: revalidation past the stale window ----------------------------------------


def validating(new_body: bytes | None = None) -> Handler:
    """v1 with an ETag and must-revalidate; a conditional request gets a 304 (or ``new_body``)."""

    def handler(scope: Scope, n: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if dict(scope["headers"]).get(b"if-none-match") == b'"v1"':
            if new_body is not None:
                return 200, [(b"etag", b'"v2"'), (b"cache-control", b"max-age=10")], new_body
            return 304, [(b"cache-control", b"max-age=20, must-revalidate"), (b"x-new", b"1")], b""
        headers = [(b"etag", b'"v1"'), (b"cache-control", b"max-age=10, must-revalidate")]
        return 200, [*headers, (b"content-encoding", b"identity")], b"body v1"

    return handler


async def test_past_its_stale_window_an_entry_is_revalidated_and_a_304_serves_it(
    client: httpx.AsyncClient, origin: Origin, cache: Cache, clock: FakeClock
) -> None:
    """A must-revalidate entry, once stale, is revalidated: the 304 freshens it and its body answers."""
    origin.handler = validating()
    await client.get("/r")
    clock.advance(11)
    r = await client.get("/r")
    assert r.status_code == 200 and r.text == "body v1"
    assert r.headers["cache-status"] == "swr-cache; fwd=stale; fwd-status=304"
    assert r.headers["x-new"] == "1" and r.headers["cache-control"].startswith("max-age=20")
    assert r.headers["content-length"] == "7" and r.headers["etag"] == '"v1"'
    assert dict(origin.calls[1]["headers"])[b"if-none-match"] == b'"v1"'
    assert stats(cache)["http_revalidations"] == 1
    await wait_until(lambda: stats(cache)["fills"] == 2)  # the freshened entry is stored once
    hit = await client.get("/r")
    assert hit.headers["cache-status"] == "swr-cache; hit; ttl=20" and hit.headers["x-new"] == "1"
    assert origin.count == 2
    # A 304 cannot change the body: the stored Content-Length stays, once, last of the stored lines.
    names = [name.lower() for name, _ in hit.headers.raw]
    assert names.count(b"content-length") == 1
    assert names[-3:] == [b"content-length", b"age", b"cache-status"]
    assert hit.headers["content-length"] == "7" and hit.text == "body v1"


async def test_a_200_to_a_revalidation_replaces_the_entry(
    client: httpx.AsyncClient, origin: Origin, cache: Cache, clock: FakeClock
) -> None:
    """A full response to the conditional request streams to the client and replaces the entry."""
    origin.handler = validating(new_body=b"body v2")
    await client.get("/r")
    clock.advance(11)
    r = await client.get("/r")
    assert r.text == "body v2" and r.headers["cache-status"] == "swr-cache; fwd=stale; stored"
    await wait_until(lambda: stats(cache)["fills"] == 2)
    hit = await client.get("/r")
    assert hit.text == "body v2" and hit.headers["cache-status"].startswith("swr-cache; hit")
    assert origin.count == 2


async def test_concurrent_requests_share_one_revalidation(
    client: httpx.AsyncClient, origin: Origin, cache: Cache, clock: FakeClock
) -> None:
    """Requests arriving while an entry is revalidated wait for that one conditional request."""
    origin.handler = validating()
    await client.get("/r")
    clock.advance(11)
    origin.hold()
    tasks = [asyncio.create_task(client.get("/r")) for _ in range(10)]
    await origin.entered.wait()
    await wait_until(lambda: stats_of(client)["stale_hits"] == 10)
    origin.gate.set()
    replies = await asyncio.gather(*tasks)
    assert {r.text for r in replies} == {"body v1"} and origin.count == 2
    statuses = sorted(r.headers["cache-status"] for r in replies)
    assert statuses.count("swr-cache; fwd=stale; fwd-status=304") == 1
    assert statuses.count("swr-cache; fwd=stale; collapsed") == 9


async def test_the_clients_own_validators_get_a_304_after_revalidation(
    client: httpx.AsyncClient, origin: Origin, clock: FakeClock
) -> None:
    """A conditional client request answered by a revalidated entry gets its 304."""
    origin.handler = validating()
    await client.get("/r")
    clock.advance(11)
    r = await client.get("/r", headers={"if-none-match": '"v1"'})
    assert r.status_code == 304 and r.content == b"" and origin.count == 2


async def test_revalidation_failure_passes_the_error_and_keeps_the_entry(
    client: httpx.AsyncClient, origin: Origin, cache: Cache, clock: FakeClock
) -> None:
    """A 5xx to a revalidation goes to the client (never stale past its window); the entry stays."""
    origin.handler = validating()
    await client.get("/r")
    clock.advance(11)
    origin.handler = respond(503)
    r = await client.get("/r")
    assert r.status_code == 503 and r.headers["cache-status"].startswith("swr-cache; fwd=stale")
    # The engine's refresh takes that failure as its own (and backs off): no second call.
    await wait_until(
        lambda: stats(cache)["refresh_errors"] == 1 and not cache._engine.refresher.refreshing
    )
    assert origin.count == 2
    origin.handler = validating()
    r = await client.get("/r")
    assert r.text == "body v1" and r.headers["cache-status"].endswith("fwd-status=304")


async def test_without_a_revalidate_window_a_stale_entry_is_fetched_whole(
    cache: Cache, origin: Origin, clock: FakeClock
) -> None:
    """revalidate_window=0 drops an entry at the end of its stale window: a plain miss follows."""
    origin.handler = validating()
    async with client_for(CacheMiddleware(origin, cache=cache, revalidate_window=0)) as client:
        await client.get("/r")
        clock.advance(11)
        r = await client.get("/r")
    assert r.headers["cache-status"] == "swr-cache; fwd=uri-miss; stored"
    assert b"if-none-match" not in dict(origin.calls[1]["headers"])


async def test_a_304_keeps_the_stored_body_fields(
    client: httpx.AsyncClient, origin: Origin, clock: FakeClock
) -> None:
    """Content-Encoding, ETag and friends describe the stored bytes: a 304 does not change them."""

    def handler(scope: Scope, n: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        cc = (b"cache-control", b"max-age=10, must-revalidate")
        if dict(scope["headers"]).get(b"if-none-match") == b'"v1"':
            return 304, [cc, (b"etag", b'"other"'), (b"content-encoding", b"gzip")], b""
        return 200, [cc, (b"etag", b'"v1"'), (b"content-encoding", b"identity")], b"plain"

    origin.handler = handler
    await client.get("/r")
    clock.advance(11)
    r = await client.get("/r")
    assert r.headers["etag"] == '"v1"' and r.headers["content-encoding"] == "identity"
    assert r.text == "plain"


async def test_only_if_cached_never_answers_from_an_entry_past_its_stale_window(
    client: httpx.AsyncClient, origin: Origin, clock: FakeClock
) -> None:
    """An entry kept only to be revalidated is not usable for only-if-cached: 504."""
    origin.handler = validating()
    await client.get("/r")
    assert (await client.get("/r", headers={"cache-control": "only-if-cached"})).status_code == 200
    clock.advance(11)
    r = await client.get("/r", headers={"cache-control": "only-if-cached"})
    assert r.status_code == 504 and origin.count == 1


async def test_head_past_the_stale_window_is_revalidated(
    client: httpx.AsyncClient, origin: Origin, clock: FakeClock
) -> None:
    """A HEAD that finds an entry past its stale window revalidates it with a conditional GET."""
    origin.handler = validating()
    await client.get("/r")
    clock.advance(11)
    r = await client.head("/r")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "7"
    assert origin.calls[1]["method"] == "GET"
    assert dict(origin.calls[1]["headers"])[b"if-none-match"] == b'"v1"'


# --- engine v2, speed: what a hit does and does not do --------------------------------------------


def count_swr_timeouts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every ``asyncio.timeout`` swr_cache code starts (the caller's module, in order).

    Not the store layer's read of a pipeline's replies (``_autobatch``): that is
    the client's socket timeout, which every Redis read has, cached or not.
    """
    started: list[str] = []
    real = asyncio.timeout

    def timeout(delay: float | None) -> asyncio.Timeout:
        caller = str(sys._getframe(1).f_globals.get("__name__", ""))
        if caller.startswith("swr_cache") and caller != "swr_cache._autobatch":
            started.append(caller)
        return real(delay)

    monkeypatch.setattr(asyncio, "timeout", timeout)
    return started


async def test_a_hit_starts_no_timer(
    client: httpx.AsyncClient, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lock_timeout bounds only a wait for another request's load: a hit (or a lead) runs no timer."""
    started = count_swr_timeouts(monkeypatch)
    first = await client.get("/t")  # this request leads the load: the app's pace bounds it
    for _ in range(3):
        hit = await client.get("/t")
        assert hit.headers["cache-status"].startswith("swr-cache; hit")
    assert first.text == hit.text and origin.count == 1
    assert started == []


async def test_only_a_wait_for_another_load_runs_the_lock_timeout(
    cache: Cache, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request that joins a load in flight starts one timer; the one that leads starts none."""
    started = count_swr_timeouts(monkeypatch)
    async with client_for(CacheMiddleware(origin, cache=cache, lock_timeout=30)) as client:
        origin.hold()
        leader = asyncio.create_task(client.get("/joined"))
        await origin.entered.wait()
        assert started == []
        follower = asyncio.create_task(client.get("/joined"))
        await wait_until(lambda: len(started) == 1)
        origin.gate.set()
        first, second = await leader, await follower
    assert started == ["swr_cache._engine"] and origin.count == 1
    assert second.text == first.text
    assert "lock-timeout" not in second.headers["cache-status"]  # it got the leader's response
    assert stats(cache)["http_lock_timeouts"] == 0


async def test_a_request_shape_is_keyed_once(
    client: httpx.AsyncClient, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The URL part of a key (target, authority, escaping, hashing) is derived once per request shape."""
    calls: list[str] = []
    real_target = _http.target

    def target(scope: Any) -> str:
        calls.append(scope["path"])
        return real_target(scope)

    monkeypatch.setattr(_http, "target", target)
    for _ in range(3):
        await client.get("/shape?a=1")
    await client.get("/shape?a=2")
    await client.get("/shape?a=1", headers={"x-forwarded-host": "other.example"})
    assert calls == ["/shape", "/shape", "/shape"]  # three shapes, each keyed once
    assert origin.count == 3


async def test_the_key_memos_are_bounded(
    cache: Cache, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every memo keeps at most MEMO_LIMIT entries (the oldest go first); answers stay right."""
    from swr_cache.asgi import _vary

    monkeypatch.setattr(_vary, "MEMO_LIMIT", 3)
    origin.handler = lambda scope, n: (
        200,
        [(b"vary", b"Accept")],
        dict(scope["headers"]).get(b"accept", b"-") + b" %s" % scope["path"].encode(),
    )
    mw = CacheMiddleware(origin, cache=cache)
    async with client_for(mw) as client:
        for i in range(8):
            for accept in ("a", "b"):
                r = await client.get(f"/m{i}", headers={"accept": accept})
                assert r.text == f"{accept} /m{i}"
            assert all(size <= 3 for size in mw._keys.memo_sizes())
        assert mw._keys.memo_sizes()[:3] == (3, 3, 3)
        # The first URL's key was dropped from every memo: it is rebuilt, and still hits.
        again = await client.get("/m0", headers={"accept": "b"})
    assert again.text == "b /m0" and again.headers["cache-status"].startswith("swr-cache; hit")


async def test_a_hit_sends_the_stored_lines_then_age_and_cache_status(
    client: httpx.AsyncClient, origin: Origin
) -> None:
    """Entries hold their lines as a hit sends them (Content-Length once, last); a hit adds Age, Cache-Status."""
    origin.handler = respond(200, ("cache-control", "max-age=60"), ("x-app", "1"), body="hello")
    await client.get("/lines")
    hit = await client.get("/lines")
    names = [name.lower() for name, _ in hit.headers.raw]
    assert names == [
        b"content-type",
        b"cache-control",
        b"x-app",
        b"date",
        b"etag",
        b"content-length",
        b"age",
        b"cache-status",
    ]
    assert hit.headers["content-length"] == "5" and hit.text == "hello"
    head = await client.head("/lines")
    assert head.headers["content-length"] == "5" and head.content == b""
    not_modified = await client.get("/lines", headers={"if-none-match": hit.headers["etag"]})
    assert not_modified.status_code == 304
    assert [n.lower() for n, _ in not_modified.headers.raw] == [
        b"cache-control",
        b"date",
        b"etag",
        b"age",
        b"cache-status",
    ]
