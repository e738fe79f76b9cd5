"""tests/unit/: pure tests (codec, keys, policy, metrics, exports) that start no server.

``make unit`` runs them in seconds, without redis-server or moto. The server
fixtures of tests/conftest.py are replaced here by ones that fail, so a test
that needs a server says so at once instead of quietly making this folder slow.
"""

from __future__ import annotations

import pytest


def _no_server(request: pytest.FixtureRequest) -> None:
    pytest.fail(
        f"a test asks for {request.fixturename}, but tests in tests/unit start no server: "
        "move it next to the tests that do",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> None:
    _no_server(request)


@pytest.fixture
def restartable_redis(request: pytest.FixtureRequest) -> None:
    _no_server(request)


@pytest.fixture(scope="session")
def redis_cluster(request: pytest.FixtureRequest) -> None:
    _no_server(request)


@pytest.fixture(scope="session")
def moto_server(request: pytest.FixtureRequest) -> None:
    _no_server(request)
