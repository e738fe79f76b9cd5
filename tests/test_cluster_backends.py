"""conftest's two backends: ``on_cluster`` tests get a ``[cluster]`` run on a real cluster client."""

from __future__ import annotations

from typing import Any

import conftest
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

pytestmark = [pytest.mark.redis, pytest.mark.on_cluster]


async def key_counts(client: Any) -> list[int]:
    """DBSIZE of each master (one for the standalone server)."""
    if isinstance(client, AsyncRedisCluster):
        await client.initialize()  # learns the nodes (a no-op once done)
        return [await client.dbsize(target_nodes=node) for node in client.get_primaries()]
    return [await client.dbsize()]


async def test_redis_client_is_on_the_backend_its_id_names(
    redis_client: Any, redis_backend: str, request: pytest.FixtureRequest
) -> None:
    """``[cluster]`` gets a flushed cluster client (and the cluster mark), ``[standalone]`` the server's."""
    on_cluster = redis_backend == "cluster"
    assert request.node.callspec.params["redis_backend"] == redis_backend
    assert isinstance(redis_client, AsyncRedisCluster) is on_cluster
    assert isinstance(redis_client, aioredis.Redis) is not on_cluster
    assert (request.node.get_closest_marker("cluster") is not None) is on_cluster
    assert await key_counts(redis_client) == ([0, 0, 0] if on_cluster else [0])
    for i in range(30):
        await redis_client.set(f"k{i}", i)
    counts = await key_counts(redis_client)
    assert sum(counts) == 30 and all(n > 0 for n in counts), counts


@pytest.mark.standalone_only(reason="checks the opt-out marker itself")
async def test_standalone_only_runs_once_on_the_server(
    redis_client: Any, request: pytest.FixtureRequest
) -> None:
    assert not hasattr(request.node, "callspec")
    assert isinstance(redis_client, aioredis.Redis)


async def test_a_test_needing_the_server_url_runs_standalone_only(
    redis_client: Any, redis_url: str, request: pytest.FixtureRequest
) -> None:
    assert not hasattr(request.node, "callspec")
    assert isinstance(redis_client, aioredis.Redis)
    await redis_client.set("k", "v")
    async with aioredis.Redis.from_url(redis_url) as other:
        assert await other.get("k") == b"v"


class _Definition:
    nodeid = "tests/test_x.py::test_x"

    def __init__(self, *marks: pytest.MarkDecorator) -> None:
        self.marks = {m.mark.name: m.mark for m in marks}

    def get_closest_marker(self, name: str) -> Any:
        return self.marks.get(name)


class _Metafunc:
    fixturenames = ("redis_client", "redis_backend")

    def __init__(self, *marks: pytest.MarkDecorator) -> None:
        self.definition = _Definition(*marks)
        self.parametrized: list[tuple[Any, ...]] = []

    def parametrize(self, name: str, values: list[Any], **kwargs: Any) -> None:
        self.parametrized.append((name, [v.values[0] for v in values], kwargs))


def test_generate_tests_parametrizes_only_opted_in_tests() -> None:
    """The hook adds the cluster run for ``on_cluster``, not without it nor under a reasoned opt-out."""
    opted_in = _Metafunc(pytest.mark.on_cluster)
    conftest.pytest_generate_tests(opted_in)  # type: ignore[arg-type]
    assert opted_in.parametrized == [
        ("redis_backend", ["standalone", "cluster"], {"indirect": True})
    ]
    for marks in [
        (),
        (pytest.mark.on_cluster, pytest.mark.standalone_only(reason="kills the server")),
    ]:
        metafunc = _Metafunc(*marks)
        conftest.pytest_generate_tests(metafunc)  # type: ignore[arg-type]
        assert metafunc.parametrized == []


def test_standalone_only_without_a_reason_is_refused() -> None:
    metafunc = _Metafunc(pytest.mark.on_cluster, pytest.mark.standalone_only)
    with pytest.raises(pytest.UsageError, match="needs a reason"):
        conftest.pytest_generate_tests(metafunc)  # type: ignore[arg-type]
