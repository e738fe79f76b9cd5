"""Shared fixtures: a real redis-server, a real Redis Cluster, moto's DynamoDB server.

Servers are started once per session on free 127.0.0.1 ports (the cluster and
moto only if a test asks for them) by :mod:`devtools.devservers`; state is wiped
before each test (FLUSHALL, moto reset). Tests that kill, restart or pause Redis
take ``restartable_redis``, a private server, and leave the shared one alone.

Both backends: in a module (or on a test) marked ``on_cluster``, every test that
takes ``redis_client`` (directly or through a fixture such as ``cache``) runs
twice, ``[standalone]`` on the session redis-server and ``[cluster]`` on the
session Redis Cluster; the ``[cluster]`` runs carry the ``cluster`` mark, so
``-m "not cluster"`` skips them. Tests that need the standalone server's URL or
process (``redis_url``, ``redis_server``, ``restartable_redis``, ``sync_redis``)
run standalone only; any other test opts out with
``@pytest.mark.standalone_only(reason="...")``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis.asyncio as aioredis

from devtools.devservers import MotoServer, RedisCluster, RedisServer, set_dummy_aws_env
from swr_cache import Cache
from swr_cache.testing import CacheHost, FakeClock

if TYPE_CHECKING:
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

AWS_REGION = "us-east-1"
DEFAULT_RETRIES: dict[str, Any] = {"max_attempts": 1, "mode": "standard"}


# --- Redis ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole session (do not kill or pause it: see restartable_redis)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, with every key deleted before the test."""
    if not redis_server.running:
        # A test broke the rule above; don't let it fail every test after it.
        redis_server.start()
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
async def standalone_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A ``redis.asyncio.Redis`` on the flushed session server (bytes replies)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


STANDALONE = "standalone"
CLUSTER = "cluster"
# A test that takes one of these talks to the standalone server itself (its URL,
# its process, a second client on it), so it cannot also run on the cluster.
_STANDALONE_FIXTURES = frozenset(
    {"redis_url", "redis_server", "restartable_redis", "sync_redis", "standalone_client"}
)


@pytest.fixture
def redis_backend(request: pytest.FixtureRequest) -> str:
    """``"standalone"`` or ``"cluster"``: which server ``redis_client`` is on (see module doc)."""
    return str(getattr(request, "param", STANDALONE))


@pytest.fixture
def redis_client(redis_backend: str, request: pytest.FixtureRequest) -> Any:
    """A flushed client: ``redis.asyncio.Redis`` on the session server, or, in a
    test's ``[cluster]`` run, ``redis.asyncio.cluster.RedisCluster`` on the session cluster.
    """
    # Looked up by name so a standalone run never starts the cluster, nor a
    # cluster run flush the standalone server.
    if redis_backend == CLUSTER:
        return request.getfixturevalue("cluster_client")
    return request.getfixturevalue("standalone_client")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "on_cluster: tests taking redis_client also run on the Redis Cluster ([cluster] ids)",
    )
    config.addinivalue_line(
        "markers",
        "standalone_only(reason): an on_cluster test that runs on the standalone server only",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Give ``on_cluster`` tests that use ``redis_client`` a ``[cluster]`` run too."""
    if "redis_backend" not in metafunc.fixturenames:
        return
    definition = metafunc.definition
    if definition.get_closest_marker("on_cluster") is None:
        return
    opt_out = definition.get_closest_marker("standalone_only")
    if opt_out is not None:
        if not (opt_out.kwargs.get("reason") or opt_out.args):
            raise pytest.UsageError(f'{definition.nodeid}: standalone_only needs a reason="..."')
        return
    if _STANDALONE_FIXTURES & set(metafunc.fixturenames):
        return
    metafunc.parametrize(
        "redis_backend",
        [pytest.param(STANDALONE), pytest.param(CLUSTER, marks=pytest.mark.cluster)],
        indirect=True,
    )


@pytest.fixture
def clock() -> FakeClock:
    """A wall clock the test moves by hand (``clock.advance(seconds)``)."""
    return FakeClock()


@pytest.fixture
async def cache(redis_client: aioredis.Redis, clock: FakeClock) -> AsyncIterator[Cache]:
    """An entered ``Cache`` on ``redis_client`` (namespace ``t``, soft 10 s, hard 100 s, no XFetch).

    Modules that need other settings define a ``cache`` fixture of their own.
    """
    c = Cache(redis_client, namespace="t", soft_ttl=10, hard_ttl=100, clock=clock, early_refresh=0)
    async with CacheHost(c) as entered:
        yield entered


@pytest.fixture
def restartable_redis() -> Iterator[RedisServer]:
    """A private redis-server the test may stop, kill, restart, pause and resume."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster, started on first use and shared by the session."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
async def cluster_client(redis_cluster: RedisCluster) -> AsyncIterator[AsyncRedisCluster]:
    """A ``redis.asyncio.cluster.RedisCluster`` client on the flushed session cluster."""
    from redis.asyncio.cluster import ClusterNode
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    redis_cluster.flushall()
    client = AsyncRedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in redis_cluster.startup_nodes]
    )
    try:
        yield client
    finally:
        await client.aclose()


# --- DynamoDB (moto) ----------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto's server for the session; dummy AWS credentials are set where unset."""
    added = set_dummy_aws_env()
    with MotoServer(region=AWS_REGION) as server:
        yield server
    for name in added:
        os.environ.pop(name, None)


@pytest.fixture
def dynamodb_endpoint(moto_server: MotoServer) -> str:
    """moto's endpoint URL, with every table and stream deleted before the test."""
    moto_server.reset()
    return moto_server.endpoint_url


@pytest.fixture
def aws_retries(request: pytest.FixtureRequest) -> dict[str, Any]:
    """botocore ``retries`` for the clients below: one attempt unless a test asks otherwise.

    Override with ``@pytest.mark.parametrize("aws_retries", [{...}], indirect=True)``.
    """
    return dict(getattr(request, "param", DEFAULT_RETRIES))


def _client_kwargs(endpoint_url: str, retries: dict[str, Any]) -> dict[str, Any]:
    from aiobotocore.config import AioConfig

    # Explicit dummy credentials: whatever the environment holds, these clients
    # can only ever sign requests for the local moto server.
    return {
        "endpoint_url": endpoint_url,
        "region_name": AWS_REGION,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "config": AioConfig(retries=retries, connect_timeout=5, read_timeout=30),
    }


@pytest.fixture
async def dynamodb_client(
    dynamodb_endpoint: str, aws_retries: dict[str, Any]
) -> AsyncIterator[Any]:
    """An aiobotocore ``dynamodb`` client on the freshly reset moto server."""
    from aiobotocore.session import get_session

    async with get_session().create_client(
        "dynamodb", **_client_kwargs(dynamodb_endpoint, aws_retries)
    ) as client:
        yield client


@pytest.fixture
async def dynamodb_streams_client(
    dynamodb_endpoint: str, aws_retries: dict[str, Any]
) -> AsyncIterator[Any]:
    """An aiobotocore ``dynamodbstreams`` client on the freshly reset moto server."""
    from aiobotocore.session import get_session

    async with get_session().create_client(
        "dynamodbstreams", **_client_kwargs(dynamodb_endpoint, aws_retries)
    ) as client:
        yield client
