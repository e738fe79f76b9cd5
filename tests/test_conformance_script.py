"""benchmarks/conformance.py's bookkeeping (the suite itself needs node: `make conformance`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def conformance() -> ModuleType:
    return load("conformance")


META = [
    {"suite": "a", "id": "gate", "name": "gate", "kind": "required", "depends_on": []},
    {"suite": "a", "id": "t1", "name": "one", "kind": "required", "depends_on": ["gate"]},
    {"suite": "a", "id": "t2", "name": "two", "kind": "required", "depends_on": []},
    {"suite": "a", "id": "t3", "name": "three", "kind": "optimal", "depends_on": []},
    {"suite": "a", "id": "c1", "name": "check", "kind": "check", "depends_on": []},
    {"suite": "a", "id": "t4", "name": "four", "kind": "required", "depends_on": ["c1"]},
    {"suite": "a", "id": "t5", "name": "five", "kind": "required", "depends_on": []},
    {
        "suite": "a",
        "id": "b1",
        "name": "b",
        "kind": "required",
        "depends_on": [],
        "browser_only": True,
    },
]


def test_outcomes_follow_the_suites_own_classification(conformance: ModuleType) -> None:
    """Pass, fail, setup error, blocked by a prerequisite (a check answered no counts), untested."""
    results = {
        "gate": ["Assertion", "Response 2 comes from cache"],
        "t1": True,
        "t2": ["Setup", "PUT config failed"],
        "t3": True,
        "c1": False,
        "t4": True,
    }
    outcomes = conformance.classify(META, results)
    assert outcomes == {
        "gate": "fail",
        "t1": "blocked",
        "t2": "setup",
        "t3": "pass",
        "c1": "no",
        "t4": "blocked",
        "t5": "untested",
        "b1": "untested",
    }
    # required: pass, fail, setup, blocked (+ untested); optimal: pass, of; browser-only left out
    assert conformance.counts(META, outcomes, {"a"}) == [0, 1, 1, 3, 1, 1]


def test_results_block_is_replaced_in_place(conformance: ModuleType, tmp_path: Path) -> None:
    """--write replaces only its own marked block of RESULTS.md (appending it the first time)."""
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Hit path\n\nkept\n")
    conformance.write_results([conformance.BEGIN, "first", conformance.END], path)
    conformance.write_results([conformance.BEGIN, "second", conformance.END], path)
    text = path.read_text()
    assert "## Hit path\n\nkept" in text and "second" in text and "first" not in text
    assert text.count(conformance.BEGIN) == 1


def test_make_bench_skips_the_conformance_script_and_keeps_its_block(tmp_path: Path) -> None:
    """run_all.py does not run conformance.py, and rewriting RESULTS.md keeps its block."""
    run_all = load("run_all")
    assert "conformance" not in [name for name, _ in run_all.discover([], [])]
    previous = f"# old\n\n{run_all.KEEP_BEGIN}\nconformance table\n{run_all.KEEP_END}\n"
    (tmp_path / "RESULTS.md").write_text(previous)
    info = {
        "date": "2030-01-02 03:04:05 UTC",
        "cpu": "Test CPU",
        "cores": 2,
        "usable_cores": 2,
        "python": "CPython 3.11.0",
        "versions": {"swr-cache": "0"},
    }
    path = run_all.report(tmp_path, info, [], quick=False)
    text = path.read_text()
    assert "# old" not in text and "conformance table" in text
