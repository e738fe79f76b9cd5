"""CacheMiddleware end to end: a real uvicorn server, a real httpx client, real Redis (and moto)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn

from swr_cache import Cache, CacheMiddleware, item_tag
from swr_cache.streams import StreamConsumer, StreamInvalidator
from swr_cache.testing import CacheHost, FakeClock

pytestmark = pytest.mark.redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def wait_until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll a condition the code under test drives (never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.002)


@contextlib.asynccontextmanager
async def serving(
    app: Any, *, lifespan: Literal["auto", "on", "off"] = "off"
) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on a loopback socket in this event loop; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan=lifespan, log_level="warning", access_log=False, date_header=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started or task.done())
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped during startup")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def cache(redis_client: aioredis.Redis, clock: FakeClock) -> AsyncIterator[Cache]:
    c = Cache(redis_client, namespace="u", soft_ttl=10, hard_ttl=100, clock=clock, early_refresh=0)
    async with CacheHost(c) as entered:
        yield entered


class Gated:
    """An ASGI app answering in two chunks with a gate between them; counts calls."""

    def __init__(self, content_type: bytes = b"text/plain") -> None:
        self.calls = 0
        self.content_type = content_type
        self.gate = asyncio.Event()
        self.gate.set()
        self.first_sent = asyncio.Event()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        self.calls += 1
        n = self.calls
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", self.content_type)],
            }
        )
        await send({"type": "http.response.body", "body": b"part one #%d\n" % n, "more_body": True})
        self.first_sent.set()
        await self.gate.wait()
        await send(
            {"type": "http.response.body", "body": b"part two #%d\n" % n, "more_body": False}
        )


async def test_hit_over_real_http(cache: Cache, clock: FakeClock) -> None:
    """Through uvicorn: the second GET is a hit with Age, one Date, and the stored body."""
    app = Gated()
    async with (
        serving(CacheMiddleware(app, cache=cache, add_date=True)) as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        first = await client.get("/a")
        await wait_until(lambda: cache.stats()["http"]["fills"] == 1)
        clock.advance(4)
        second = await client.get("/a")
    assert first.text == second.text == "part one #1\npart two #1\n"
    assert app.calls == 1 and "age" not in first.headers
    assert (
        second.headers["age"] == "4" and second.headers["cache-status"] == "swr-cache; hit; ttl=6"
    )
    assert len(second.headers.get_list("date")) == 1
    assert second.headers["content-length"] == str(len(second.content))


async def test_miss_streams_to_the_client_before_the_app_finishes(cache: Cache) -> None:
    """The first bytes of a miss reach the client while the app is still producing; then it is stored."""
    app = Gated()
    app.gate.clear()
    async with (
        serving(CacheMiddleware(app, cache=cache)) as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        async with client.stream("GET", "/s") as response:
            chunks = response.aiter_raw()
            first = await anext(chunks)
            assert first == b"part one #1\n"  # received while the app waits at the gate
            app.gate.set()
            rest = b"".join([c async for c in chunks])
        assert rest == b"part two #1\n"
        hit = await client.get("/s")
    assert hit.headers["cache-status"].startswith("swr-cache; hit") and app.calls == 1


async def test_event_stream_passes_through_live_and_unstored(cache: Cache) -> None:
    """A text/event-stream is streamed event by event and never stored."""
    app = Gated(b"text/event-stream")
    app.gate.clear()
    async with (
        serving(CacheMiddleware(app, cache=cache)) as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        async with client.stream("GET", "/events") as response:
            chunks = response.aiter_raw()
            assert await anext(chunks) == b"part one #1\n"
            assert response.headers["cache-status"] == "swr-cache; fwd=uri-miss; stored=?0"
            app.gate.set()
            assert b"".join([c async for c in chunks]) == b"part two #1\n"
        again = await client.get("/events")
    assert again.text.endswith("#2\n") and app.calls == 2


async def test_stale_served_while_app_blocked_refreshed_once_over_http(
    cache: Cache, clock: FakeClock
) -> None:
    """Through uvicorn: stale answers come at once while the app is blocked; one refresh runs."""
    app = Gated()
    async with (
        serving(CacheMiddleware(app, cache=cache)) as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        await client.get("/a")
        # The client has the whole response before the server has stored it.
        await wait_until(lambda: cache.stats()["http"]["fills"] == 1)
        clock.advance(11)
        app.gate.clear()
        app.first_sent.clear()
        replies = await asyncio.gather(*(client.get("/a") for _ in range(10)))
        assert all(r.text == "part one #1\npart two #1\n" for r in replies)
        assert all(r.headers["cache-status"] == "swr-cache; hit; ttl=-1" for r in replies)
        await app.first_sent.wait()
        assert app.calls == 2
        app.gate.set()
        await wait_until(lambda: cache.stats()["http"]["fills"] == 2)
        fresh = await client.get("/a")
    assert fresh.text == "part one #2\npart two #2\n" and app.calls == 2


@pytest.mark.dynamodb
async def test_example_app_end_to_end(
    redis_url: str,
    redis_client: aioredis.Redis,
    dynamodb_endpoint: str,
    dynamodb_streams_client: Any,
) -> None:
    """examples/app.py under uvicorn: cached reads, writes that purge, and a stream that purges."""
    from examples.app import Settings, create_app

    settings = Settings(
        redis_url=redis_url,
        namespace="ex",
        endpoint_url=dynamodb_endpoint,
        create_tables=True,
        seed_users=3,
    )
    app = create_app(settings)
    async with serving(app, lifespan="on") as base, httpx.AsyncClient(base_url=base) as client:
        first = await client.get("/users/u1")
        assert first.status_code == 200 and first.json()["name"] == "User 1"
        assert "surrogate-key" not in first.headers
        hit = await client.get("/users/u1")
        assert hit.headers["cache-status"].startswith("swr-cache; hit") and "age" in hit.headers
        raw = await client.get("/raw/users/u1")
        assert (
            raw.json() == first.json()
            and raw.headers["cache-status"] == "swr-cache; fwd=uri-miss; stored=?0"
        )
        assert (await client.get("/ping")).text == "pong"

        # A write through the app invalidates the item and its responses.
        put = await client.put("/users/u1", json={"name": "Ada"})
        assert put.status_code == 200
        after = await client.get("/users/u1")
        assert after.json()["name"] == "Ada" and after.headers["cache-status"].startswith(
            "swr-cache; fwd="
        )

        # Query results: tagged with the partition, purged by a new order.
        assert (await client.get("/orders?customer=c1")).json() == []
        assert (
            (await client.get("/orders?customer=c1"))
            .headers["cache-status"]
            .startswith("swr-cache; hit")
        )
        created = await client.post(
            "/orders", json={"customer_id": "c1", "order_id": "o1", "total": 12.5}
        )
        assert created.status_code == 201
        listed = await client.get("/orders?customer=c1")
        assert [o["order_id"] for o in listed.json()] == ["o1"]

        # A write that bypasses the app reaches the cache through the table's stream.
        assert (await client.get("/users/u2")).headers["cache-status"].startswith("swr-cache; fwd=")
        assert (await client.get("/users/u2")).headers["cache-status"].startswith("swr-cache; hit")
        from aiobotocore.session import get_session

        async with get_session().create_client(
            "dynamodb", endpoint_url=dynamodb_endpoint, region_name="us-east-1"
        ) as ddb:
            await ddb.update_item(
                TableName="Users",
                Key={"pk": {"S": "u2"}},
                UpdateExpression="SET #n = :n",
                ExpressionAttributeNames={"#n": "name"},
                ExpressionAttributeValues={":n": {"S": "Grace"}},
            )
            stream_arn = (await ddb.describe_table(TableName="Users"))["Table"]["LatestStreamArn"]
        consumer_cache = Cache(redis_client, namespace="ex")
        async with CacheHost(consumer_cache):
            consumer = StreamConsumer(
                StreamInvalidator(consumer_cache), dynamodb_streams_client, stream_arn
            )
            assert await consumer.poll_once() >= 1
        streamed = await client.get("/users/u2")
        assert streamed.json()["name"] == "Grace"
        assert streamed.headers["cache-status"].startswith("swr-cache; fwd=")
        stats = (await client.get("/stats")).json()
    assert stats["http"]["hits"] >= 3 and stats["http"]["http_purges"] >= 2
    assert item_tag("Users", {"pk": "u1"}) == "item:Users|pk=S:u1"


def test_example_app_settings_from_the_environment() -> None:
    """examples/app.py reads its HTTP freshness, tables and Redis from the environment."""
    from examples.app import Settings

    s = Settings.from_env(
        {
            "REDIS_URL": "redis://r:1/0",
            "APP_MAX_AGE": "30",
            "APP_STALE_WHILE_REVALIDATE": "300",
            "APP_CREATE_TABLES": "1",
        }
    )
    assert (s.redis_url, s.max_age, s.stale_while_revalidate, s.create_tables) == (
        "redis://r:1/0",
        30,
        300,
        True,
    )
    assert (Settings.from_env({}).max_age, Settings.from_env({}).stale_while_revalidate) == (5, 55)


_ECHO_CALLS = [0]


async def _echo(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """Answers with its call number, the forwarding headers it saw and the body it read."""
    _ECHO_CALLS[0] += 1
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    seen = b";".join(k + b"=" + v for k, v in scope["headers"] if b"forward" in k.lower())
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send(
        {"type": "http.response.body", "body": b"#%d %s body=%s" % (_ECHO_CALLS[0], seen, body)}
    )


async def test_underscore_forwarding_header_cannot_poison_over_http(cache: Cache) -> None:
    """Through uvicorn: X_Forwarded_Host reaches the app and is keyed; plain GETs never see it."""
    _ECHO_CALLS[0] = 0
    async with (
        serving(CacheMiddleware(_echo, cache=cache)) as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        evil = await client.get("/page", headers={"X_Forwarded_Host": "evil.example"})
        assert b"evil.example" in evil.content  # uvicorn passed the _ spelling on
        plain = await client.get("/page")
        assert b"evil" not in plain.content
        assert (await client.get("/page")).text == plain.text
        again = await client.get("/page", headers={"X_Forwarded_Host": "evil.example"})
        assert again.text == evil.text and again.headers["cache-status"].startswith(
            "swr-cache; hit"
        )
    assert _ECHO_CALLS[0] == 2


async def test_get_body_without_content_length_bypasses_over_http(cache: Cache) -> None:
    """Through uvicorn, a GET body delivered without Content-Length bypasses and reaches the app.

    HTTP/1.1 has no body without Content-Length or Transfer-Encoding (h11 reads
    the bytes as the next request), so an outer ASGI layer removes the header,
    as an HTTP/2 server delivers such a body: the middleware sees only what
    ``receive`` hands it, over a real socket.
    """
    _ECHO_CALLS[0] = 0

    async def h2_like(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        await inner(scope, receive, send)

    inner = CacheMiddleware(_echo, cache=cache)
    async with serving(h2_like) as base, httpx.AsyncClient(base_url=base) as client:
        evil = await client.request("GET", "/q", content=b"id=evil")
        assert evil.text.endswith("body=id=evil")
        assert evil.headers["cache-status"] == "swr-cache; fwd=bypass"
        plain = await client.get("/q")
        assert plain.text.endswith("body=") and plain.headers["cache-status"].endswith("stored")
        assert (await client.request("GET", "/q", content=b"id=evil")).text.endswith("id=evil")
        assert (await client.get("/q")).text == plain.text
        # A raw HTTP/1.1 GET followed by bytes: they are not a body (h11 reads a new request).
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        authority = base.removeprefix("http://").encode()
        writer.write(b"GET /q HTTP/1.1\r\nHost: " + authority + b"\r\n\r\nid=evil")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"cache-status: swr-cache; hit" in head.lower()
        writer.close()
        await writer.wait_closed()
    assert _ECHO_CALLS[0] == 3
