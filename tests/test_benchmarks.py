"""The benchmark harness keeps working: run_all.py runs a benchmark and writes its report, charts and README table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
README_TEXT = "# App\n\nIntro.\n\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\n\n## Redis Cluster\n\nKept.\n"


def load_run_all() -> ModuleType:
    """benchmarks/run_all.py as a module (it puts benchmarks/ on sys.path for _common)."""
    spec = importlib.util.spec_from_file_location("bench_run_all", BENCH / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_all() -> ModuleType:
    return load_run_all()


def fake_info() -> dict[str, Any]:
    return {
        "date": "2030-01-02 03:04:05 UTC",
        "cpu": "Test CPU",
        "cores": 2,
        "usable_cores": 2,
        "python": "CPython 3.11.0",
        "redis_server": "7.2.0 (/usr/bin/redis-server)",
        "load": "0.10 0.20 0.30",
        "versions": {"swr-cache": "0", "redis": "5"},
    }


def fake_run(name: str, data: dict[str, Any], charts: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "name": name,
        "title": name,
        "status": "ok",
        "seconds": 1.0,
        "data": data,
        "tables": data.get("tables", []),
        "charts_drawn": [{"file": f, "title": f"chart {f}"} for f in charts],
        "stdout": "",
        "stderr": "",
        "argv": [name],
    }


STAMPEDE = {
    "config": {"callers": 1000, "processes": 4},
    "one_process": {
        "swr_cache": {"origin_calls_median": 1},
        "aiocache cached": {"origin_calls_median": 980},
        "cashews cache(lock=True)": {"origin_calls_median": 1},
    },
    "processes": {
        "swr_cache": {"origin_calls_median": 1},
        "aiocache cached": {"origin_calls_median": 931},
        "cashews cache(lock=True)": {"origin_calls_median": 1},
    },
}
HIT_PATH = {
    "unpinned": {
        "us_per_call": {"floor": 50.0, "swr_cache": 60.0, "aiocache": 70.0},
        "p99_us": {"floor": 90.0, "swr_cache": 120.0, "aiocache": 140.0},
        "calls_per_s_100": {"floor": 18000.4, "swr_cache": 80000.6, "aiocache": 9000.0},
    }
}


def test_readme_block_is_a_side_by_side_table_of_the_run(
    run_all: ModuleType, tmp_path: Path
) -> None:
    """The README block holds the machine line and one column per library, filled from the run's JSON."""
    readme = tmp_path / "README.md"
    runs = [
        fake_run("hit_path", HIT_PATH, ("hit_path.png",)),
        fake_run("stampede", STAMPEDE, ("stampede_origin_calls.png",)),
        fake_run("consistency", {"tables": [], "charts": []}),
        {**fake_run("asgi", {}), "status": "exit code 1"},
        {**fake_run("batch", {}), "status": "missing"},
    ]
    block = run_all.readme_block(
        fake_info(), runs, False, tmp_path / "benchmarks" / "results", readme
    )
    text = "\n".join(block)
    assert block[0] == run_all.BEGIN and block[-1] == run_all.END
    assert "2030-01-02 03:04:05 UTC, Test CPU, 2 cores" in text and "redis-server 7.2.0" in text
    assert "| measure | swr_cache | aiocache | cashews | reference |" in text
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:]
        for line in block
        if line.startswith("| ")
    }
    stampede_1 = next(
        v for k, v in rows.items() if k.startswith("cold stampede, 1000 callers in 1 process")
    )
    assert (
        stampede_1[0] == "1"
        and stampede_1[1] == "cached: 980"
        and stampede_1[2] == "cache(lock=True): 1"
    )
    hit = next(v for k, v in rows.items() if k.startswith("hit, one ~1 KB item"))
    assert hit[0] == "60.0 (1.20x), p99 120" and hit[3].startswith(
        "raw GET + unpackb: 50.0 (1.00x)"
    )
    concurrent = next(v for k, v in rows.items() if k.startswith("100 concurrent hits"))
    assert concurrent[0] == "80,000"  # a rate shows as an integer
    assert any("failed in this run (exit code 1)" in line for line in block)
    assert any("benchmarks/RESULTS.md#consistency" in line for line in block)
    assert "batch" not in rows  # a benchmark that is not in the checkout leaves no row
    assert "(benchmarks/results/stampede_origin_calls.png)" in text


def test_write_readme_replaces_only_the_marked_block(run_all: ModuleType, tmp_path: Path) -> None:
    """Text around the markers (other sections) is kept; a README without markers is left alone."""
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT)
    assert run_all.write_readme(readme, [run_all.BEGIN, "new table", run_all.END])
    text = readme.read_text()
    assert "new table" in text and "old table" not in text
    assert text.startswith("# App\n\nIntro.\n\n") and text.endswith(
        "\n\n## Redis Cluster\n\nKept.\n"
    )
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no markers\n")
    assert not run_all.write_readme(plain, [run_all.BEGIN, "x", run_all.END])
    assert plain.read_text() == "# no markers\n"


def test_table_cells_have_the_digits_their_size_needs(run_all: ModuleType) -> None:
    """Rates print as integers, microseconds with one decimal, ratios with two; counts stay counts."""
    rows = run_all.md_table(
        {
            "title": "t",
            "columns": ["a", "b", "c", "d", "e"],
            "rows": [["x", 18887.8, 56.71, 0.891, 1000]],
        }
    )
    assert "| x | 18,888 | 56.7 | 0.89 | 1,000 |" in rows
    assert run_all.fmt(float("nan")) == "-"


def test_unknown_benchmarks_are_titled_by_their_docstring(
    run_all: ModuleType, tmp_path: Path
) -> None:
    """A script run_all does not know is headed by the first line of its docstring."""
    script = tmp_path / "lag_probe.py"
    script.write_text('"""Replica reads: how far behind they are.\n\nMore.\n"""\n')
    assert run_all.title_of("lag_probe", script) == "Replica reads: how far behind they are"
    assert run_all.title_of("stampede", None) == run_all.KNOWN["stampede"]


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="needs the bench extra (matplotlib)"
)
def test_every_chart_kind_renders(run_all: ModuleType, tmp_path: Path) -> None:
    """Bar, horizontal bar and line charts, linear and log, NaN values included, all become PNGs."""
    specs: list[dict[str, Any]] = [
        {
            "file": "a.png",
            "title": "bars " * 30,
            "kind": "bar",
            "categories": ["x", "y"],
            "series": {"p50": [1.0, 2.0], "p99": [3.0, None]},
            "log": True,
        },
        {
            "file": "b.png",
            "title": "barh",
            "kind": "barh",
            "categories": ["x", "y", "z"],
            "series": {"r": [1000.0, 20.0, 5.0]},
        },
        {
            "file": "c.png",
            "title": "line",
            "kind": "line",
            "x": [0, 1, 2],
            "series": {"s": [0.0, 5.0, 1.0]},
            "xlabel": "t",
        },
    ]
    for spec in specs:
        assert run_all.draw(spec, tmp_path) == spec["file"]
        assert (tmp_path / spec["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.redis
def test_run_all_quick_stampede_writes_report(tmp_path: Path) -> None:
    """`run_all.py --quick --only stampede` reports the machine, a table, charts and the README row; swr_cache loads once."""
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT)
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run_all.py"),
            "--quick",
            "--only",
            "stampede",
            "--out",
            str(tmp_path),
            "--readme",
            str(readme),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/1] stampede" in proc.stdout and "round 1/2" in proc.stdout  # progress is shown
    report = (tmp_path / "RESULTS.md").read_text()
    for expected in (
        "## Machine",
        "| CPU |",
        "| redis-server |",
        "| Python |",
        "Cold stampede",
        "| swr_cache |",
    ):
        assert expected in report
    data = json.loads((tmp_path / "results" / "stampede.json").read_text())
    # Behaviour, not speed: 1000 cold callers cost one origin call, in one process and across four.
    assert data["one_process"]["swr_cache"]["origin_calls_max"] == 1
    assert data["processes"]["swr_cache"]["origin_calls_max"] == 1
    assert data["one_process"]["swr_cache"]["errors"] == 0
    text = readme.read_text()
    assert "old table" not in text and "## Redis Cluster\n\nKept." in text
    row = next(
        line
        for line in text.splitlines()
        if line.startswith("| cold stampede, 1000 callers in 4 processes")
    )
    assert row.split(" | ")[1] == "1"  # the swr_cache column
    if importlib.util.find_spec("matplotlib") is not None:
        for chart in ("stampede_origin_calls.png", "stampede_latency.png"):
            assert (tmp_path / "results" / chart).stat().st_size > 0
            assert f"(results/{chart})" in report


def test_run_all_rejects_unknown_benchmarks(tmp_path: Path) -> None:
    """Asking for a benchmark that does not exist fails with the list of those that do."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--only", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "no benchmark named nope" in proc.stderr and "stampede" in proc.stderr


def test_tables_without_charts_get_one(run_all: ModuleType) -> None:
    """A script that gives tables but no charts still gets a chart of its latency columns."""
    tables = [
        {"title": "notes only", "columns": ["a", "b"], "rows": [["x", "y"]]},
        {
            "title": "windows",
            "columns": [
                "condition",
                "trials",
                "window p50 µs",
                "window p99 µs",
                "first poll stale",
            ],
            "rows": [["idle", 100, 10.0, 40.0, "1/100"], ["loaded", 100, 30.0, 90.0, "5/100"]],
        },
    ]
    (chart,) = run_all.table_charts("replica_lag", tables)
    assert chart["categories"] == ["idle", "loaded"]
    assert chart["series"] == {"window p50 µs": [10.0, 30.0], "window p99 µs": [40.0, 90.0]}
    assert run_all.table_charts("x", tables[:1]) == []
