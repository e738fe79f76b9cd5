"""The swr-cache command line: inspect, invalidate, stats, routing and exit codes, on a real redis-server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from helpers import entry_field

from devtools.devservers import free_port
from swr_cache import Cache, cached, cached_item, item_tag
from swr_cache._cli import main
from swr_cache.testing import CacheHost, FakeClock, RecordingOrigin

pytestmark = pytest.mark.redis

NS = "clitest"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def cache(redis_client: aioredis.Redis, clock: FakeClock) -> AsyncIterator[Cache]:
    c = Cache(redis_client, namespace=NS, soft_ttl=10, hard_ttl=100, clock=clock, early_refresh=0)
    async with CacheHost(c) as entered:
        yield entered


@pytest.fixture
def origin() -> RecordingOrigin:
    return RecordingOrigin(
        {
            "u1": {"pk": "u1", "name": "Ada", "age": Decimal("36.5"), "roles": {"admin"}},
            "u2": {"pk": "u2", "name": "Bob"},
        }
    )


def users(cache: Cache, origin: RecordingOrigin) -> Any:
    @cached_item(cache, table="Users", key=lambda user_id: {"pk": user_id}, name="get_user")
    async def get_user(
        user_id: str, *, attributes: list[str] | None = None
    ) -> dict[str, Any] | None:
        return await origin.get(user_id, attributes)

    return get_user


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI's main() in a thread (it runs its own event loop) and capture its output."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def at(url: str) -> list[str]:
    return ["--redis-url", url, "--namespace", NS]


async def test_inspect_fresh_whole_item(
    cache: Cache, origin: RecordingOrigin, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """inspect reports a fresh whole item with its deadlines, attribute fields and a free lease."""
    await users(cache, origin)("u1")
    code, out, _ = await cli(
        capsys, "inspect", *at(redis_url), "--table", "Users", "--key", '{"pk": "u1"}', "--json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["state"] == "fresh"
    assert data["entry"] == "clitest:e:{Users|pk=S:u1}"
    assert data["fields"] == ["age", "name", "pk", "roles"] and data["whole"] is True
    assert 0 < data["soft_remaining_ms"] <= 10_000 < data["hard_remaining_ms"] <= 100_000
    assert data["lease_held"] is False and data["fence_ttl_s"] is None
    code, text, _ = await cli(
        capsys, "inspect", *at(redis_url), "--table", "Users", "--key", '{"pk": "u1"}'
    )
    assert code == 0
    assert "state     fresh" in text and "whole item" in text and "lease     not held" in text
    assert data["layout"] == "one blob" and "one msgpack blob" in text  # format 2


async def test_inspect_stale_entry(
    cache: Cache,
    origin: RecordingOrigin,
    clock: FakeClock,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An entry past its soft deadline (in Redis server time) shows as stale, not yet gone."""
    clock.advance(
        -20
    )  # this fill believes it is 20 s earlier: soft passed 10 s ago, hard 80 s ahead
    await users(cache, origin)("u1")
    code, out, _ = await cli(
        capsys, "inspect", *at(redis_url), "--table", "Users", "--key", '{"pk": "u1"}', "--json"
    )
    data = json.loads(out)
    assert code == 0 and data["state"] == "stale"
    assert data["soft_remaining_ms"] < 0 < data["hard_remaining_ms"]


async def test_inspect_partial_negative_and_absent(
    cache: Cache, origin: RecordingOrigin, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Partial entries list their fields and known-absent attributes; negative and absent entries say so."""
    get_user = users(cache, origin)
    await get_user("u2", attributes=["name", "email"])
    await get_user("ghost")
    code, out, _ = await cli(
        capsys,
        "inspect",
        *at(redis_url),
        "--table",
        "Users",
        "--key",
        '{"pk": {"S": "u2"}}',
        "--json",
    )
    data = json.loads(out)
    assert code == 0 and data["fields"] == ["name"] and data["whole"] is False
    assert data["absent_attributes"] == ["email"]
    code, out, _ = await cli(
        capsys, "inspect", *at(redis_url), "--table", "Users", "--key", '{"pk": "ghost"}', "--json"
    )
    data = json.loads(out)
    assert data["state"] == "fresh" and data["negative"] is True and data["fields"] == []
    code, text, _ = await cli(
        capsys, "inspect", *at(redis_url), "--table", "Users", "--key", '{"pk": "nobody"}'
    )
    assert code == 0 and "state     absent" in text


async def test_inspect_format_1_entry_and_a_broken_blob(
    cache: Cache,
    origin: RecordingOrigin,
    redis_client: aioredis.Redis,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An entry of format 1 reads as unreadable (a miss to this version); so does a broken blob."""
    await users(cache, origin)("u1")
    entry = cache._keys.entry("Users|pk=S:u1")
    raw = await entry_field(redis_client, entry, b"\xffe")
    assert raw is not None
    soft, hard = raw.split(b"|")[1:3]
    await redis_client.delete(entry)
    old: dict[Any, Any] = {b"\xffs": soft, b"\xffh": hard, b"\xfff": b"1", b"\xffw": b"1"}
    await redis_client.hset(entry, mapping={**old, b"name": b"\xa3Ada"})
    args = ("inspect", *at(redis_url), "--table", "Users", "--key", '{"pk": "u1"}', "--json")
    data = json.loads((await cli(capsys, *args))[1])
    assert data["state"] == "unreadable" and "format b'1'" in data["problem"]
    await redis_client.delete(entry)
    await redis_client.set(entry, raw[:-3])  # a truncated blob
    data = json.loads((await cli(capsys, *args))[1])
    assert data["state"] == "unreadable" and "does not decode" in data["problem"]
    # A whole entry of format 2 (a hash of one field) is unreadable to this version.
    await redis_client.delete(entry)
    await redis_client.hset(entry, b"\xffe", b"2" + raw[1:])
    data = json.loads((await cli(capsys, *args))[1])
    assert data["state"] == "unreadable" and "format 2" in data["problem"]


async def test_inspect_shows_lease_and_fence(
    cache: Cache, redis_client: aioredis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A held load lease and an invalidation's fence are reported with their time left."""
    ks = cache._keys
    ident = "Users|pk=S:u9"
    await redis_client.set(ks.lease(ident), "token", px=4000)
    await cache.invalidate_item("Orders", {"id": 1})  # leaves a fence on another item
    code, out, _ = await cli(capsys, "inspect", *at(redis_url), "--identity", ident, "--json")
    data = json.loads(out)
    assert code == 0 and data["lease_held"] is True and 0 < data["lease_ttl_s"] <= 4
    code, out, _ = await cli(
        capsys, "inspect", *at(redis_url), "--table", "Orders", "--key", '{"id": 1}', "--json"
    )
    data = json.loads(out)
    assert data["state"] == "absent" and data["fence_ttl_s"] is not None and data["fence_ttl_s"] > 0


async def test_inspect_numbers_name_the_same_item(
    cache: Cache, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON numbers and typed N values are normalised like the readers' keys (10.0 is N 10)."""

    @cached_item(cache, table="Orders", key=lambda n: {"id": n}, name="get_order")
    async def get_order(n: int, *, attributes: list[str] | None = None) -> dict[str, Any] | None:
        return {"id": n}

    await get_order(10)
    for key in ('{"id": 10}', '{"id": 10.0}', '{"id": {"N": "1E+1"}}'):
        code, out, _ = await cli(
            capsys, "inspect", *at(redis_url), "--table", "Orders", "--key", key, "--json"
        )
        assert code == 0 and json.loads(out)["state"] == "fresh", key
    code, out, _ = await cli(
        capsys, "inspect", *at(redis_url), "--table", "Orders", "--key", '{"id": "10"}', "--json"
    )
    assert json.loads(out)["state"] == "absent"  # S "10" is another item


async def test_inspect_values_decodes_exact_types(
    cache: Cache, origin: RecordingOrigin, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--values prints the cached attributes decoded (Decimal and set stay exact)."""
    await users(cache, origin)("u1")
    code, text, _ = await cli(
        capsys, "inspect", *at(redis_url), "--table", "Users", "--key", '{"pk": "u1"}', "--values"
    )
    assert code == 0
    assert "age = Decimal('36.5')" in text and "roles = {'admin'}" in text


async def test_invalidate_item_and_tag(
    cache: Cache,
    origin: RecordingOrigin,
    redis_client: aioredis.Redis,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """invalidate removes an item's entry, and --tag purges what was stored with the tag."""
    get_user = users(cache, origin)
    await get_user("u1")

    @cached(
        cache,
        key="orders:{customer}",
        tags=lambda customer: [f"customer:{customer}"],
        name="orders",
    )
    async def orders(customer: str) -> list[int]:
        return [1, 2]

    await orders("c1")
    ks = cache._keys
    code, out, _ = await cli(
        capsys, "invalidate", *at(redis_url), "--table", "Users", "--key", '{"pk": "u1"}'
    )
    assert code == 0 and "invalidated item Users|pk=S:u1" in out
    assert not await redis_client.exists(ks.entry("Users|pk=S:u1"))
    assert await get_user.peek("u1") is None
    assert await orders.peek("c1") is not None
    code, out, _ = await cli(capsys, "invalidate", *at(redis_url), "--tag", "customer:c1")
    assert code == 0 and "purged 1 tag(s)" in out
    assert await orders.peek("c1") is None


async def test_invalidate_item_purges_its_item_tag(
    cache: Cache, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An item invalidated from the CLI purges results tagged with item_tag, like a write would."""

    @cached(
        cache,
        key="orders:{customer}",
        tags=lambda customer: [item_tag("Orders", {"customer": customer})],
    )
    async def orders(customer: str) -> list[int]:
        return [1]

    await orders("c1")
    code, _, _ = await cli(
        capsys, "invalidate", *at(redis_url), "--table", "Orders", "--key", '{"customer": "c1"}'
    )
    assert code == 0
    assert await orders.peek("c1") is None


async def test_stats_counts_by_kind_state_and_table(
    cache: Cache,
    origin: RecordingOrigin,
    clock: FakeClock,
    redis_client: aioredis.Redis,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """stats counts entries (fresh/stale/negative, per table), leases, fences and tag keys of one namespace only."""
    get_user = users(cache, origin)
    await get_user("u1")
    await get_user("ghost")
    clock.advance(-20)
    await get_user("u2")  # stale from the start
    clock.advance(20)

    @cached(
        cache,
        key="orders:{customer}",
        tags=lambda customer: [f"customer:{customer}"],
        name="orders",
    )
    async def orders(customer: str) -> list[int]:
        return [1]

    await orders("c1")
    await redis_client.set(cache._keys.lease("Users|pk=S:u7"), "t", px=5000)
    await redis_client.set("othernamespace:e:{Users|pk=S:u1}", "x")
    code, out, _ = await cli(capsys, "stats", *at(redis_url), "--json")
    data = json.loads(out)
    assert code == 0 and data["complete"] is True
    assert data["by_kind"]["entries"] == 4
    assert data["by_kind"]["leases"] == 1
    assert data["by_kind"]["tag member sets"] == 1
    assert data["entry_states"] == {"fresh": 2, "stale": 1, "negative": 1}
    assert data["entries_by_table"] == {"Users": 3, "result:orders:*": 1}
    code, text, _ = await cli(capsys, "stats", *at(redis_url))
    assert code == 0 and "fresh 2" in text and "stale 1" in text


async def test_stats_stops_at_max_keys(
    cache: Cache, redis_client: aioredis.Redis, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-keys bounds the scan, and the report says its counts are partial."""
    pipe = redis_client.pipeline(transaction=False)
    for i in range(300):
        pipe.set(cache._keys.lease(f"T|pk=N:{i}"), "t", px=60_000)
    await pipe.execute()
    code, out, _ = await cli(capsys, "stats", *at(redis_url), "--max-keys", "50", "--json")
    data = json.loads(out)
    assert code == 0 and data["complete"] is False and data["keys_scanned"] == 50
    code, text, _ = await cli(capsys, "stats", *at(redis_url), "--max-keys", "50")
    assert "counts are partial" in text


async def test_environment_supplies_url_and_namespace(
    cache: Cache,
    origin: RecordingOrigin,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --redis-url/--namespace the CLI reads SWR_CACHE_REDIS_URL and SWR_CACHE_NAMESPACE."""
    await users(cache, origin)("u1")
    monkeypatch.setenv("SWR_CACHE_REDIS_URL", redis_url)
    monkeypatch.setenv("SWR_CACHE_NAMESPACE", NS)
    code, out, _ = await cli(
        capsys, "inspect", "--table", "Users", "--key", '{"pk": "u1"}', "--json"
    )
    assert code == 0 and json.loads(out)["state"] == "fresh"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "--table", "Users", "--key", "{pk: 1}"], "not valid JSON"),
        (["inspect", "--table", "Users", "--key", '["u1"]'], "non-empty JSON object"),
        (["inspect", "--table", "Users", "--key", "{}"], "non-empty JSON object"),
        (["inspect", "--table", "Users", "--key", '{"pk": true}'], "must be a string, a number"),
        (
            ["inspect", "--table", "Users", "--key", '{"pk": {"X": "1"}}'],
            "not a DynamoDB key value",
        ),
        (["inspect", "--table", "Users"], "--table and --key go together"),
        (["inspect"], "give --table and --key"),
        (["inspect", "--identity", "a", "--table", "T", "--key", '{"a": 1}'], "not both"),
        (["inspect", "--identity", "a{b}"], "no braces"),
        (["inspect", "--table", "T", "--key", '{"a": 1}', "--timeout", "zero"], "invalid float"),
        (["invalidate"], "give --table and --key, --identity, or --tag"),
        (["stats", "--max-keys", "0"], "--max-keys must be >= 1"),
        (["inspect", "--bogus"], "unrecognized arguments"),
        (["frobnicate"], "unknown command"),
        ([], "usage: swr-cache"),
    ],
)
async def test_bad_input_exits_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    """Bad input is reported on stderr with exit code 2, before any Redis command."""
    code, out, err = await cli(capsys, *argv)
    assert code == 2, (out, err)
    assert message in err


async def test_unreachable_redis_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """A Redis nobody listens on is a clear error and exit code 1, not a traceback."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    for argv in (
        ["inspect", "--redis-url", url, "--table", "T", "--key", '{"a": 1}'],
        ["invalidate", "--redis-url", url, "--tag", "x"],
        ["stats", "--redis-url", url, "--timeout", "0.5"],
    ):
        code, _, err = await cli(capsys, *argv)
        assert code == 1, argv
        assert "Redis at redis://127.0.0.1:" in err and "cannot be reached" in err
        assert "Traceback" not in err


async def test_bad_url_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A URL redis-py cannot parse is bad input."""
    code, _, err = await cli(capsys, "stats", "--redis-url", "http://nowhere")
    assert code == 2 and "bad Redis URL" in err


async def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists every command, a command's --help exits 0, --version prints the version."""
    code, out, _ = await cli(capsys, "--help")
    assert code == 0
    for command in ("demo", "inspect", "invalidate", "stats", "consume-stream"):
        assert command in out
    code, out, _ = await cli(capsys, "inspect", "--help")
    assert code == 0 and "--table" in out and "--redis-url" in out
    code, out, _ = await cli(capsys, "--version")
    assert code == 0 and out.startswith("swr-cache ")


async def test_consume_stream_is_routed_to_its_own_parser(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """consume-stream hands the rest of the line to the streams consumer's own argparse."""
    code, out, _ = await cli(capsys, "consume-stream", "--help")
    assert code == 0 and "swr-cache consume-stream" in out and "--stream-arn" in out
    code, _, err = await cli(capsys, "consume-stream")
    assert code == 2 and "required" in err


def test_module_and_console_script_run_the_cli(redis_url: str) -> None:
    """`python -m swr_cache` and the installed `swr-cache` script both reach the CLI."""
    proc = subprocess.run(
        [sys.executable, "-m", "swr_cache", "stats", "--redis-url", redis_url, "--namespace", NS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"namespace {NS!r}" in proc.stdout
    script = Path(sys.executable).parent / "swr-cache"
    if not script.exists():
        pytest.skip("the swr-cache console script is not installed in this environment")
    proc = subprocess.run(
        [str(script), "inspect", "--redis-url", redis_url, "--table", "T", "--key", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr


async def test_consume_stream_failure_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """consume-stream against a DynamoDB endpoint nobody serves says so in one line and exits 1."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    endpoint = f"http://127.0.0.1:{free_port()}"
    code, _, err = await cli(
        capsys,
        "consume-stream",
        "--table",
        "Users",
        "--endpoint-url",
        endpoint,
        "--region",
        "us-east-1",
        "--redis-url",
        f"redis://127.0.0.1:{free_port()}/0",
        "--once",
    )
    assert code == 1
    assert "swr-cache consume-stream: EndpointConnectionError" in err and "Traceback" not in err


def test_ctrl_c_during_consume_stream_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second Ctrl-C, past consume-stream's own clean shutdown, ends with 130 and no traceback."""
    import swr_cache._cli as cli

    def interrupted(_argv: list[str]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_consume_stream", interrupted)
    assert cli.main(["consume-stream", "--table", "T"]) == 130
    assert "Traceback" not in capsys.readouterr().err
