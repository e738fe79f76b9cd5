"""examples/fastapi_app.py under uvicorn: the three layers and the readiness probe (real servers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.redis, pytest.mark.dynamodb]

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def service(restartable_redis: Any, dynamodb_endpoint: str) -> Iterator[httpx.Client]:
    """The example app under uvicorn, on a private redis-server and moto; an httpx client on it."""
    port = _port()
    env = {
        **os.environ,
        "SWR_CACHE_REDIS_URL": restartable_redis.url,
        "DYNAMODB_ENDPOINT_URL": dynamodb_endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "APP_CREATE_TABLES": "1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "examples.fastapi_app:create_app",
            "--no-date-header",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/health/live").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"uvicorn did not start:\n{proc.communicate()[0]}")
                time.sleep(0.05)
            yield client
    finally:
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        assert "Traceback" not in output, output


def test_fastapi_example_layers_and_readiness(
    service: httpx.Client, restartable_redis: Any
) -> None:
    """Items, typed results and responses are cached and invalidated; readiness follows Redis."""
    ready = service.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["redis_seconds"] > 0
    assert ready.headers["cache-control"] == "no-store"

    assert service.put("/users/u1", json={"pk": "u1", "name": "Ada"}).status_code == 200
    first = service.get("/users/u1")
    assert first.json() == {"pk": "u1", "name": "Ada", "visits": 0}
    assert "fwd=" in first.headers["cache-status"]  # from the app
    assert _eventually_hit(service, "/users/u1") == first.json()
    service.put("/users/u1", json={"pk": "u1", "name": "Grace", "visits": 2})
    assert service.get("/users/u1").json()["name"] == "Grace"  # the write purged the response

    order = {"customer_id": "c1", "order_id": 1, "total": "9.50"}
    assert service.post("/orders", json=order).status_code == 201
    orders = service.get("/customers/c1/orders")
    assert orders.json() == [order]
    # A fill that lands within a few ms of a purge of its tag is not kept (it
    # may have read data older than the purge): poll until one is kept.
    assert _eventually_hit(service, "/customers/c1/orders") == [order]
    service.post("/orders", json={**order, "order_id": 2})
    assert [o["order_id"] for o in service.get("/customers/c1/orders").json()] == [1, 2]
    stats = service.get("/stats").json()
    assert any(name.endswith("list_orders") for name in stats)

    restartable_redis.stop()
    down = service.get("/health/ready")
    assert down.status_code == 503 and down.json()["status"] == "unavailable"
    assert service.get("/users/u1").json()["name"] == "Grace"  # reads fail open


def _eventually_hit(client: httpx.Client, path: str, limit: float = 10.0) -> Any:
    """GET ``path`` until the middleware answers from the cache; returns that body."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        response = client.get(path)
        if "hit" in response.headers["cache-status"]:
            return response.json()
        time.sleep(0.02)
    raise AssertionError(f"{path} was never served from the cache")
