"""The randomized consistency checker (benchmarks/consistency.py), shortened and seeded.

Real redis-server and moto's DynamoDB server; loads are delayed at random so
they straddle writes. In every mode that invalidates before a write returns,
no read that begins after a write completed may return an older version, and
after quiescence every cached entry equals the table.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from swr_cache import _codec
from swr_cache._store import M_ABSENT, M_NONE, M_SOFT, M_WHOLE

ROOT = Path(__file__).resolve().parent.parent


def _load_checker() -> ModuleType:
    name = "swr_cache_consistency_checker"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "consistency.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


checker = _load_checker()
Read, Write, Load, Config = checker.Read, checker.Write, checker.Load, checker.Config


def read(key: int, t0: float, got: int, t1: float | None = None) -> Any:
    return Read(
        key,
        t0,
        t0 + 0.001 if t1 is None else t1,
        got,
        False,
        f"{got}/{got}",
        False,
        False,
        "accessor",
    )


def write(key: int, version: int, t1: float, t0: float | None = None) -> Any:
    start = t1 - 0.005 if t0 is None else t0
    return Write(key, version, start, t1, t1, "invalidate_item")


# --- the definitions, on hand-made histories ---------------------------------------------


def test_a_read_begun_after_a_completed_write_must_see_it() -> None:
    """Stale means: began after a write of its item completed, and got an older version."""
    writes = [write(0, 2, t1=10.0), write(0, 3, t1=20.0, t0=14.0), write(1, 5, t1=10.0)]
    reads = [
        read(0, 9.0, got=1, t1=12.0),  # began before the write completed: concurrent, fine
        read(0, 11.0, got=2),  # saw it
        read(0, 11.5, got=1),  # stale, 1.5 s after the write completed
        read(0, 15.0, got=2),  # v3 was still in flight: fine
        read(0, 21.0, got=0),  # read as absent after two writes: stale, missed v2 first
        read(1, 10.0, got=0),  # began exactly at completion: not after it
        read(2, 50.0, got=0),  # an item nobody wrote
    ]
    stale, windows = checker.find_stale(reads, writes)
    assert [(r.key, r.t0, required) for r, _, required in stale] == [(0, 11.5, 2), (0, 21.0, 3)]
    assert [round(s, 6) for _, s, _ in stale] == [1.5, 11.0]
    # Each write's window reaches to the start of the last read that still missed it.
    assert windows == {(0, 2): 11.0, (0, 3): 1.0}


def test_concurrent_writers_complete_out_of_version_order() -> None:
    """With writers racing on one item, the newest version completed so far is what counts."""
    writes = [write(0, 5, t1=10.0), write(0, 4, t1=11.0)]  # v4 landed first, returned last
    stale, _ = checker.find_stale([read(0, 10.5, got=4), read(0, 12.0, got=5)], writes)
    assert [(r.t0, required) for r, _, required in stale] == [(10.5, 5)]


def test_versions_and_torn_answers() -> None:
    """The older of v and w is the version read; v != w is a torn answer; no item is version 0."""
    assert checker.version_of(None) == (0, False)
    assert checker.version_of({"pk": "a", "v": 3, "w": 3}) == (3, False)
    assert checker.version_of({"v": 4, "w": 3}) == (3, True)
    assert checker.version_of({"w": 7}) == (7, False)
    assert checker.pair_of({"v": 4, "w": 3}) == "4/3" and checker.pair_of({"v": 2}) == "2/-"
    assert checker.version_of_pair("4/3") and not checker.version_of_pair("2/-")


def test_loads_that_straddle_a_write_are_counted() -> None:
    """A load still holding an older version when a write of its item completed straddled it."""
    writes = [write(0, 2, t1=10.0)]
    loads = [
        Load(0, 8.0, 9.0, 1, 10.5),  # read v1, handed back after v2 completed
        Load(0, 8.0, 9.0, 1, 9.5),  # handed back before
        Load(0, 10.2, 10.3, 2, 10.6),  # read v2
    ]
    assert checker.straddling_loads(loads, writes) == 1


def _hash(fields: dict[str, Any], *meta: bytes) -> dict[bytes, bytes]:
    raw = {name.encode(): _codec.encode(value) for name, value in fields.items()}
    raw[M_SOFT] = b"1"
    for m in meta:
        raw[m] = b"1"
    return raw


def test_entry_comparison_with_the_table() -> None:
    """Whole, partial and not-found entries are compared with the table's item."""
    truth = {"pk": "a", "v": 3, "w": 3, "p": "xx"}
    problem = checker.entry_problem
    assert problem(_hash(truth, M_WHOLE), truth) is None
    assert problem(_hash({"v": 3}), truth) is None  # a projection entry
    assert problem(_hash({"v": 2}), truth) is not None
    assert problem(_hash({"v": 3, "w": 3, "pk": "a"}, M_WHOLE), truth) is not None  # lacks p
    assert problem(_hash({}, M_NONE), None) is None
    assert problem(_hash({}, M_NONE), truth) is not None
    assert problem(_hash({"v": 3}), None) is not None
    absent = _hash({"v": 3})
    absent[M_ABSENT] = _codec.encode(["p"])
    assert problem(absent, truth) is not None  # p is not absent
    # Format 3 as stored: a whole entry's attributes are one blob in a string.
    head = b"3|1|2|v||"
    assert problem(head + b"w||" + _codec.encode(truth), truth) is None
    assert problem(head + b"w||" + _codec.encode({"pk": "a"}), truth) is not None
    assert problem(head + b"n||", None) is None


# --- the checker on the real parts -------------------------------------------------------


async def run(mode: str, ops: int, redis_url: str, endpoint: str, seed: int = 7) -> dict[str, Any]:
    result: dict[str, Any] = await checker.run_mode(
        Config(mode=mode, ops=ops, seed=seed), redis_url, endpoint, progress=False
    )
    return result


def assert_consistent(result: dict[str, Any]) -> None:
    assert result["errors"] == 0, result["error_samples"]
    assert result["origin_anomalies"] == 0  # the versions the verdict rests on are sound
    assert result["stale_reads_after_completed_write"] == 0, result["stale_samples"]
    assert result["entries_checked"] > 0
    assert result["entries_not_equal_to_table"] == 0, result["mismatches"]


@pytest.mark.redis
@pytest.mark.dynamodb
async def test_sync_mode_write_then_invalidate(redis_url: str, dynamodb_endpoint: str) -> None:
    """@cached_item readers, writers that invalidate: 0 stale reads after completed writes."""
    result = await run("sync", 2_000, redis_url, dynamodb_endpoint)
    assert_consistent(result)
    assert result["reads"] + result["writes"] == 2_000 and result["writes"] > 200
    # The delays did make loads race writes: the leases refused what they loaded.
    # (How many loads still held an older version when a write completed depends
    # on timing; it is reported, not asserted.)
    assert result["fills_rejected"] > 0
    assert result["peek_checked"] > 0


@pytest.mark.redis
@pytest.mark.dynamodb
@pytest.mark.parametrize("mode", ["table", "write_through"])
async def test_dynamodb_table_modes(mode: str, redis_url: str, dynamodb_endpoint: str) -> None:
    """DynamoTable views (single and batch reads; invalidating or write-through writes) stay consistent."""
    result = await run(mode, 1_200, redis_url, dynamodb_endpoint)
    assert_consistent(result)
    assert result["writes"] > 100


@pytest.mark.redis
@pytest.mark.dynamodb
async def test_stream_mode_converges(redis_url: str, dynamodb_endpoint: str) -> None:
    """Stream-only invalidation: every write's record is applied, nothing older is served after
    that, and once the stream is read to its end every entry equals the table."""
    result = await run("stream", 1_200, redis_url, dynamodb_endpoint)
    assert result["errors"] == 0, result["error_samples"]
    assert result["origin_anomalies"] == 0
    assert result["writes_with_applied_record"] == result["writes"] > 100
    assert result["stale_reads_after_applied_invalidation"] == 0, result[
        "stale_after_applied_samples"
    ]
    assert result["entries_not_equal_to_table"] == 0, result["mismatches"]
    assert result["lag_max_ms"] >= result["lag_p50_ms"] > 0


@pytest.mark.redis
@pytest.mark.dynamodb
async def test_stream_mode_with_a_version_attribute_never_mixes_versions(
    redis_url: str, dynamodb_endpoint: str
) -> None:
    """Stream-only invalidation with version_attribute: no answer joins attributes of two versions."""
    result = await run("stream_versioned", 1_200, redis_url, dynamodb_endpoint)
    assert result["errors"] == 0, result["error_samples"]
    assert result["origin_anomalies"] == 0
    assert result["torn_reads_not_from_origin"] == 0, result["torn_samples"]
    assert result["stale_reads_after_applied_invalidation"] == 0, result[
        "stale_after_applied_samples"
    ]
    assert result["entries_not_equal_to_table"] == 0, result["mismatches"]


def test_near_split_tells_own_writes_from_others() -> None:
    """Near mode: a stale read after its own process's write is told apart from one after another's."""
    records = checker.Records()
    records.writes = [
        Write(0, 2, 9.0, 10.0, 10.0, "invalidate_item", 0),
        Write(1, 2, 9.0, 10.0, 10.0, "invalidate_item", 1),
    ]
    mine = read(0, 11.0, got=1)
    mine.proc = 0
    theirs = read(1, 10.002, got=1)
    theirs.proc = 0
    fine = read(1, 12.0, got=2)
    fine.proc = 0
    records.reads = [mine, theirs, fine]
    split = checker.near_split(records, {"near_hits": 5})
    assert split["stale_within_process"] == 1 and split["stale_across_processes"] == 1
    assert round(split["cross_window_p99_ms"], 3) == 2.0 and split["near_hits"] == 5


@pytest.mark.redis
@pytest.mark.dynamodb
async def test_near_mode_own_writes_never_stale(redis_url: str, dynamodb_endpoint: str) -> None:
    """Near caches in two processes: no read is stale after its own process's write; the rest converge."""
    result = await run("near", 1_200, redis_url, dynamodb_endpoint)
    assert result["errors"] == 0, result["error_samples"]
    assert result["origin_anomalies"] == 0
    assert result["stale_within_process"] == 0, result["stale_samples"]
    assert result["entries_not_equal_to_table"] == 0, result["mismatches"]
    assert result["near_hits"] > 0 and result["near_invalidations"] > 0
    assert result["near_flushes"] == 0
