"""Which server the suite runs against: Redis OSS (6.2, 7.x) or Valkey (8.x), both supported."""

from __future__ import annotations

import os
from typing import Any

import pytest
import redis

pytestmark = pytest.mark.redis

# `make test` sets this for its Valkey run, so that run cannot pass on a Redis by mistake.
EXPECTED = os.environ.get("SWR_CACHE_EXPECT_SERVER")


def _server(info: dict[str, object]) -> tuple[str, str]:
    if "valkey_version" in info or info.get("server_name") == "valkey":
        return "valkey", str(info.get("valkey_version", info.get("redis_version")))
    return "redis", str(info["redis_version"])


def _check(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        engine, version = _server(client.info("server"))
    finally:
        client.close()
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    assert major_minor >= ((7, 2) if engine == "valkey" else (6, 2)), (engine, version)
    if EXPECTED:
        assert engine == EXPECTED, f"asked for {EXPECTED}, running {engine} {version}"


def test_server_is_a_supported_engine(redis_url: str) -> None:
    """The session server is Redis >= 6.2 or Valkey >= 7.2, and the one the run asked for."""
    _check(redis_url)


@pytest.mark.cluster
def test_cluster_nodes_are_the_same_engine(redis_cluster: Any) -> None:
    """The session cluster's nodes run the same server binary."""
    _check(str(redis_cluster.url))
