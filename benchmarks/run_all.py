"""Run every benchmark, then write ``benchmarks/RESULTS.md``, a chart per benchmark and the README table.

``make bench`` runs this. Each script present in ``benchmarks/`` runs in its
own process (its own redis-server, and moto where needed) with ``--json``, and
``--quick`` when it has that flag; its progress is shown as it goes. Missing
scripts are skipped with a message. The report records the machine (CPU,
cores, Python, redis-server, library versions, load) and date, one table per
benchmark and PNG charts (matplotlib, the ``bench`` extra) in
``benchmarks/results/``. Every number in it comes from this run.

A complete full run (no ``--quick``, ``--only`` or ``--skip``, default
``--out``) also rewrites the block between ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` in README.md with a compact table of the same run, so
the README's numbers are never typed by hand (``--readme FILE`` writes
another file, or forces it for a partial run; ``--no-readme`` never writes).
A run in which a benchmark failed leaves the README as it was.

    python benchmarks/run_all.py [--quick] [--only stampede,batch] [--skip hit_path] [--out DIR]

Scripts put ``tables`` (``{"title", "columns", "rows", "notes"}``) and
``charts`` (``{"file", "title", "kind": "bar"|"barh"|"line", "categories"
or "x", "series", "ylabel", "xlabel", "log"}``) in their JSON; other JSON
shapes are rendered generically (lists of records become tables), and a
script's printed output is kept in the report when it leaves no tables.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import fmt, versions  # noqa: E402

README = ROOT / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# Scripts here that are not benchmarks: this runner, and the HTTP cache-tests
# conformance run (`make conformance`), whose block in RESULTS.md is kept.
NOT_BENCHMARKS = frozenset({"run_all", "conformance"})
KEEP_BEGIN, KEEP_END = "<!-- conformance:begin -->", "<!-- conformance:end -->"

#: Benchmarks in report order; any other ``benchmarks/*.py`` (not ``_*``) runs after them.
KNOWN: dict[str, str] = {
    "hit_path": "Hit path: one cached item against the raw Redis floor and the peers",
    "near_cache": "Near cache: a hit from process memory, and its cross-process window",
    "stampede": "Cold stampede: 1000 concurrent callers of one key",
    "stale_latency": "Stale reads while a 50 ms origin refreshes",
    "batch": "A batch of 100 keys",
    "dynamodb": "DynamoDB: DynamoTable against moto, and reads saved on a skewed workload",
    "asgi": "ASGI middleware: cached HTTP responses",
    "consistency": "Consistency: staleness after writes",
    "replica_lag": "Replica reads: how long a replica still has an invalidated entry",
    "memory": "Redis memory per cached item against the same item as one msgpack blob",
}
#: Libraries of the side-by-side README table, matched on the start of a contender's name.
LIBRARIES = ("swr_cache", "aiocache", "cashews")
#: Reduced settings for scripts that have no ``--quick`` flag.
QUICK_ARGS: dict[str, list[str]] = {}
#: Columns that hold a latency: ``p50_ms``, ``fresh p99 us``, ``cached_us``, ``latency``.
TIMING = re.compile(r"(?:^|[\s_])(?:us|µs|ms|latency|p\d+)$", re.IGNORECASE)
TIME_KEYS = ("t", "t_s", "t_ms", "time", "time_s", "seconds", "elapsed", "elapsed_s", "at")


def say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------
# The machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run_text(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=20, check=False, cwd=ROOT
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": versions(),
    }
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory"] = f"{int(mem[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    if hasattr(os, "getloadavg"):
        info["load"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        from devtools.devservers import find_redis_server, redis_server_version

        binary = find_redis_server()
        info["redis_server"] = f"{redis_server_version(binary)} ({binary})"
    except Exception as exc:  # a report without it beats no report
        info["redis_server"] = f"unknown ({exc})"
    commit = _run_text(["git", "rev-parse", "--short", "HEAD"])
    if commit:
        dirty = _run_text(["git", "status", "--porcelain", "--untracked-files=no"])
        info["git"] = commit + (" with uncommitted changes" if dirty else "")
    return info


# ---------------------------------------------------------------------------
# Running the scripts


def discover(only: list[str], skip: list[str]) -> list[tuple[str, Path | None]]:
    """(name, path or None when missing) in report order."""
    present = {
        p.stem: p
        for p in HERE.glob("*.py")
        if not p.stem.startswith("_") and p.stem not in NOT_BENCHMARKS
    }
    names = list(KNOWN) + sorted(n for n in present if n not in KNOWN)
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise SystemExit(
                f"run_all: no benchmark named {', '.join(unknown)} (have: {', '.join(names)})"
            )
        names = [n for n in names if n in only]
    return [(n, present.get(n)) for n in names if n not in skip]


def title_of(name: str, script: Path | None) -> str:
    """A benchmark's heading: ours for the known ones, else its docstring's first line."""
    if name in KNOWN or script is None:
        return KNOWN.get(name, name)
    try:
        doc = ast.get_docstring(ast.parse(script.read_text()))
    except (OSError, SyntaxError, ValueError):
        doc = None
    first = (doc or "").strip().splitlines()[0].rstrip(".") if doc and doc.strip() else ""
    return first or name


def flags_of(script: Path) -> set[str]:
    """The options a script accepts, read from its ``--help``."""
    text = _run_text([sys.executable, str(script), "--help"]) or ""
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


def command(name: str, script: Path, json_path: Path, quick: bool) -> list[str]:
    flags = flags_of(script)
    argv = [sys.executable, str(script)]
    if "--json" in flags:
        argv += ["--json", str(json_path)]
    if quick:
        if "--quick" in flags:
            argv.append("--quick")
        elif name in QUICK_ARGS:
            argv += QUICK_ARGS[name]
        elif "--rounds" in flags:
            argv += ["--rounds", "2"]
    return argv


def _pump(stream: Any, sink: list[str], prefix: str, echo: bool) -> None:
    for line in iter(stream.readline, ""):
        sink.append(line)
        if echo:
            print(f"{prefix}{line.rstrip()}", flush=True)
    stream.close()


def run_script(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run one benchmark, echoing its progress (stderr) live and keeping its output."""
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    out: list[str] = []
    err: list[str] = []
    threads = [
        threading.Thread(target=_pump, args=(proc.stdout, out, "    ", True), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, err, "    . ", True), daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
        err.append(f"run_all: killed after {timeout:.0f} s\n")
    for t in threads:
        t.join(timeout=5)
    return {
        "returncode": code,
        "seconds": time.monotonic() - t0,
        "stdout": "".join(out),
        "stderr": "".join(err),
    }


# ---------------------------------------------------------------------------
# Turning results into tables and charts


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _records(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(r, dict) for r in value)
        and all(all(not isinstance(v, (dict, list)) for v in r.values()) for r in value)
    )


def generic_view(name: str, data: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Lists of flat records become tables; latency columns and time series become charts."""
    tables: list[dict[str, Any]] = []
    charts: list[dict[str, Any]] = []

    def visit(path: str, value: Any, depth: int) -> None:
        if depth > 3:
            return
        if _records(value):
            columns = list(dict.fromkeys(k for r in value for k in r))
            rows = [[r.get(c, "") for c in columns] for r in value]
            tables.append({"title": path, "columns": columns, "rows": rows, "notes": []})
            time_key = next((k for k in columns if k.lower() in TIME_KEYS), None)
            numeric = [
                c for c in columns if c != time_key and all(_is_number(r.get(c)) for r in value)
            ]
            if time_key and len(value) >= 5 and numeric:
                charts.append(
                    {
                        "file": f"{name}_{len(charts)}.png",
                        "title": f"{name}: {path} over time",
                        "kind": "line",
                        "x": [r[time_key] for r in value],
                        "xlabel": time_key,
                        "series": {c: [r[c] for r in value] for c in numeric},
                        "ylabel": ", ".join(numeric),
                        "log": False,
                    }
                )
            else:
                label_key = next(
                    (c for c in columns if all(isinstance(r.get(c), str) for r in value)), None
                )
                timing = [c for c in numeric if TIMING.search(c)]
                if label_key and timing:
                    charts.append(
                        {
                            "file": f"{name}_{len(charts)}.png",
                            "title": f"{name}: {path}",
                            "kind": "bar",
                            "categories": [str(r[label_key]) for r in value],
                            "series": {c: [r[c] for r in value] for c in timing},
                            "ylabel": ", ".join(timing) + " (log scale)",
                            "log": True,
                        }
                    )
            return
        if (
            isinstance(value, list)
            and len(value) >= 5
            and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_number(x) for x in p)
                for p in value
            )
        ):
            charts.append(
                {
                    "file": f"{name}_{len(charts)}.png",
                    "title": f"{name}: {path}",
                    "kind": "line",
                    "x": [p[0] for p in value],
                    "series": {path.rsplit(".", 1)[-1]: [p[1] for p in value]},
                    "ylabel": path.rsplit(".", 1)[-1],
                    "log": False,
                }
            )
            return
        if isinstance(value, dict):
            for key, sub in value.items():
                if key in ("config", "meta", "tables", "charts"):
                    continue
                visit(f"{path}.{key}" if path else str(key), sub, depth + 1)

    visit("", data, 0)
    return tables, charts


def table_charts(name: str, tables: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A chart for a script that gave tables but no charts: the latency columns of its first such table."""
    for t in tables:
        rows, columns = t.get("rows", []), t.get("columns", [])
        if not rows or not columns or not all(isinstance(r[0], str) for r in rows):
            continue
        timing = [
            i
            for i, c in enumerate(columns)
            if i and TIMING.search(str(c)) and all(_is_number(r[i]) for r in rows)
        ]
        if timing:
            units = {
                str(columns[i]).rsplit(" ", 1)[-1].rsplit("_", 1)[-1].replace("us", "µs")
                for i in timing
            }
            values = [r[i] for r in rows for i in timing]
            log = all(v > 0 for v in values) and max(values) > 20 * min(values)
            unit = units.pop() if len(units) == 1 and units <= {"µs", "ms"} else ""
            return [
                {
                    "file": f"{name}.png",
                    "title": t.get("title") or name,
                    "kind": "bar",
                    "categories": [r[0] for r in rows],
                    "series": {str(columns[i]): [r[i] for r in rows] for i in timing},
                    "ylabel": unit + (" (log scale)" if log else ""),
                    "log": log,
                }
            ]
    return []


def _short(v: float) -> str:
    """A bar label that fits above a bar: 1, 4.2, 870, 51.8k, 1.2M."""
    if math.isnan(v):
        return ""
    if abs(v) >= 1e6:
        return f"{v / 1e6:.1f}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.1f}k"
    if float(v).is_integer() or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def draw(spec: dict[str, Any], out_dir: Path) -> str | None:
    """Render one chart spec to PNG; returns the file name (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return None
    series: dict[str, list[float]] = {
        k: [math.nan if v is None else float(v) for v in vals] for k, vals in spec["series"].items()
    }
    finite = [v for vals in series.values() for v in vals if not math.isnan(v)]
    positive = [v for v in finite if v > 0]
    # A zero has no place on a log axis: such a chart is drawn linear, its zero bars labelled.
    log = bool(spec.get("log")) and bool(positive) and len(positive) == len(finite)
    kind = spec.get("kind", "bar")
    thousands = FuncFormatter(lambda v, _pos: f"{v:,.0f}" if abs(v) >= 1 or v == 0 else f"{v:g}")

    def plain_log(axis: Any, low: float, high: float) -> None:
        """Log ticks as plain numbers (100, 1,000); minor ones labelled when the axis spans little."""
        axis.set_major_formatter(thousands)
        axis.set_minor_formatter(thousands if high / low < 20 else NullFormatter())

    if kind == "line":
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for label, values in series.items():
            ax.plot(
                spec["x"],
                values,
                label=label,
                linewidth=1.5,
                drawstyle=spec.get("drawstyle", "default"),
            )
        ax.set_xlabel(spec.get("xlabel", ""))
        if log:
            ax.set_yscale("log")
            plain_log(ax.yaxis, min(positive), max(positive))
        elif finite and max(finite) >= 1000:
            ax.yaxis.set_major_formatter(thousands)
    else:
        cats = [str(c) for c in spec["categories"]]
        n = max(1, len(series))
        width = 0.8 / n
        horizontal = kind == "barh"
        # Vertical labels once bars get narrow, so neighbouring labels never overlap.
        crowded = not horizontal and (n >= 3 or len(cats) * n > 16)
        if horizontal:
            size = (9.0, 0.45 * len(cats) * max(1, n * 0.6) + 1.6)
        else:
            size = (min(13.0, max(7.0, 0.55 * len(cats) * n + 3)), 5.2)
        fig, ax = plt.subplots(figsize=size)
        for i, (label, values) in enumerate(series.items()):
            pos = [j + (i - (n - 1) / 2) * width for j in range(len(cats))]
            if horizontal:
                bars = ax.barh(pos, values, height=width, label=label)
            else:
                bars = ax.bar(pos, values, width=width, label=label)
            if len(cats) * n <= 40 and any(not math.isnan(v) for v in values):
                ax.bar_label(
                    bars,
                    labels=[_short(v) for v in values],
                    fontsize=7,
                    padding=2,
                    rotation=90 if crowded else 0,
                )
        if horizontal:
            ax.set_yticks(range(len(cats)), cats)
            ax.invert_yaxis()
        else:
            ax.set_xticks(range(len(cats)), cats, rotation=20, ha="right")
        value_axis = ax.xaxis if horizontal else ax.yaxis
        if log:
            # Room above the tallest bar for its label (more when labels stand upright).
            low, high = min(positive) / 1.5, max(positive) * (8 if crowded else 2.5)
            if horizontal:
                ax.set_xscale("log")
                ax.set_xlim(left=low, right=high)
            else:
                ax.set_yscale("log")
                ax.set_ylim(bottom=low, top=high)
            plain_log(value_axis, low, high)
        else:
            top = max(finite, default=1.0)
            limit = (0, top * (1.25 if crowded else 1.12)) if top > 0 else None
            if limit is not None:
                (ax.set_xlim if horizontal else ax.set_ylim)(*limit)
            if top >= 1000:
                value_axis.set_major_formatter(thousands)
    if kind == "barh":
        ax.set_xlabel(spec.get("ylabel", ""))
    else:
        ax.set_ylabel(spec.get("ylabel", ""))
    # Wrapped to the figure's width (about 11 characters an inch at this size).
    ax.set_title(
        textwrap.fill(spec.get("title", ""), width=int(fig.get_figwidth() * 11)), fontsize=10
    )
    if len(series) > 1 or kind == "line":
        ax.legend(fontsize=8)
    ax.grid(axis="x" if kind == "barh" else "y", alpha=0.3)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / spec["file"], dpi=110)
    plt.close(fig)
    return str(spec["file"])


def _cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|")


def md_table(t: dict[str, Any]) -> list[str]:
    lines = [f"**{t['title']}**", ""] if t.get("title") else []
    cols = t["columns"]
    lines.append("| " + " | ".join(str(c) for c in cols) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
    for row in t["rows"]:
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    lines.append("")
    for note in t.get("notes", []):
        lines.append(f"- {note}")
    if t.get("notes"):
        lines.append("")
    return lines


def machine_line(info: dict[str, Any]) -> str:
    """The machine and date in one line (the README block's heading)."""
    redis_version = str(info.get("redis_server", "?")).split(" ", 1)[0]
    return (
        f"{info['date']}, {info.get('cpu')}, {info.get('cores')} cores"
        f" ({info.get('usable_cores')} usable), {info.get('python')}, redis-server {redis_version},"
        f" load average at start {info.get('load', '?')}"
    )


def report(out_dir: Path, info: dict[str, Any], runs: list[dict[str, Any]], quick: bool) -> Path:
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `make bench` (`python benchmarks/run_all.py{' --quick' if quick else ''}`) on"
        f" {info['date']}. Every number below was measured in that run; run it again to regenerate"
        " this file and the charts.",
        "",
    ]
    if quick:
        lines += [
            "> Quick mode: fewer rounds, for a first look and CI. `make bench` runs the full set.",
            "",
        ]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    rows = [
        ("CPU", info.get("cpu")),
        ("cores", f"{info.get('cores')} ({info.get('usable_cores')} usable by this run)"),
        ("memory", info.get("memory")),
        ("OS", info.get("os")),
        ("Python", info.get("python")),
        ("redis-server", info.get("redis_server")),
        ("load average at start", info.get("load")),
        ("git", info.get("git")),
        ("libraries", ", ".join(f"{k} {v}" for k, v in info["versions"].items())),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows if v]
    lines += ["", "## Benchmarks", ""]
    for run in runs:
        status = run["status"] if run["status"] != "ok" else f"{run['seconds']:.0f} s"
        lines.append(f"- [{run['title']}](#{run['name']}) (`{run['name']}.py`: {status})")
    lines.append("")
    for run in runs:
        lines += [f'<a id="{run["name"]}"></a>', "", f"## {run['title']}", ""]
        if run["status"] == "missing":
            lines += [f"`benchmarks/{run['name']}.py` is not in this checkout: skipped.", ""]
            continue
        lines += [f"`{' '.join(run['argv'])}` — {run['seconds']:.1f} s", ""]
        if run["status"] != "ok":
            tail = "\n".join(run["stderr"].strip().splitlines()[-15:])
            lines += [
                f"**Failed** ({run['status']}). Last lines of its output:",
                "",
                "```",
                tail,
                "```",
                "",
            ]
        for t in run["tables"]:
            lines += md_table(t)
        for chart in run["charts_drawn"]:
            lines += [f"![{chart['title']}](results/{chart['file']})", ""]
        if not run["tables"] and run["stdout"].strip():
            lines += ["```", run["stdout"].strip(), "```", ""]
    path = out_dir / "RESULTS.md"
    kept = ""
    if path.exists():
        previous = path.read_text()
        begin, end = previous.find(KEEP_BEGIN), previous.find(KEEP_END)
        if 0 <= begin < end:
            kept = "\n\n" + previous[begin : end + len(KEEP_END)]
    path.write_text("\n".join(lines).rstrip() + kept + "\n")
    return path


# ---------------------------------------------------------------------------
# The README block: one compact side-by-side table of the same run


def _library(contender: str) -> tuple[str, str]:
    """(column, variant) of a contender name: ``cashews early`` is (cashews, early)."""
    for lib in LIBRARIES:
        if contender == lib or contender.startswith(lib + " "):
            return lib, contender[len(lib) :].strip()
    return "reference", contender


def _side_by_side(measure: str, values: dict[str, str]) -> list[str]:
    """A README row: each contender's value under its library, variants named after it."""
    cells: dict[str, list[str]] = {lib: [] for lib in (*LIBRARIES, "reference")}
    for contender, value in values.items():
        lib, variant = _library(contender)
        cells[lib].append(f"{variant}: {value}" if variant else value)
    return [measure, *("; ".join(cells[c]) or "-" for c in (*LIBRARIES, "reference"))]


def _n(value: Any) -> str:
    """A compact number: counts as they are, 1,234 / 123 / 12.3 / 1.23 for measurements."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return (
            f"{value:,.0f}"
            if abs(value) >= 100
            else f"{value:.1f}"
            if abs(value) >= 10
            else f"{value:.2f}"
        )
    return fmt(value)


def summary_rows(name: str, data: dict[str, Any]) -> list[list[str]]:
    """The README rows of one benchmark's JSON (empty when it has none to give)."""
    rows: list[list[str]] = []
    if name == "hit_path":
        mode = next((m for m in ("unpinned", "pinned") if m in data), None)
        if mode is None:
            return rows
        r = data[mode]
        seq, conc, p99 = r["us_per_call"], r["calls_per_s_100"], r.get("p99_us", {})
        floor = seq.get("floor") or math.nan
        rows.append(
            _side_by_side(
                "hit, one ~1 KB item: µs per call (x floor), p99",
                {
                    ("raw GET + unpackb" if k == "floor" else k): (
                        f"{_n(v)} ({v / floor:.2f}x)" + (f", p99 {_n(p99[k])}" if k in p99 else "")
                    )
                    for k, v in seq.items()
                },
            )
        )
        rows.append(
            _side_by_side(
                "100 concurrent hits of one key: calls/s",
                {("raw GET + unpackb" if k == "floor" else k): _n(int(v)) for k, v in conc.items()},
            )
        )
    elif name == "near_cache":
        mode = next((m for m in ("pinned", "unpinned") if m in data), None)
        if mode is None:
            return rows
        r = data[mode]
        p50, commands = r["p50_us"], r["commands_per_1000_reads"]
        rows.append(
            _side_by_side(
                f"hit from a NearCache ({mode}): p50 µs (x faster than the floor), Redis commands"
                " per 1,000 reads",
                {
                    ("raw GET + unpackb" if k == "floor" else k): (
                        f"{_n(v)} ({p50['floor'] / v:.1f}x), {_n(commands[k])}"
                    )
                    for k, v in p50.items()
                },
            )
        )
        d = r["invalidation_delay_us"]
        rows.append(
            _side_by_side(
                "NearCache: another process's invalidate_item returned -> copy gone here: p50 / p99 µs",
                {"swr_cache": f"{_n(d['p50'])} / {_n(d['p99'])}"},
            )
        )
    elif name == "stampede":
        config = data.get("config", {})
        callers = config.get("callers", "?")
        for mode, label in (
            ("one_process", "1 process"),
            ("processes", f"{config.get('processes', '?')} processes"),
        ):
            if mode in data:
                rows.append(
                    _side_by_side(
                        f"cold stampede, {callers} callers in {label}: origin calls (median of rounds)",
                        {k: _n(v["origin_calls_median"]) for k, v in data[mode].items()},
                    )
                )
    elif name == "stale_latency":
        per = data.get("libraries", {})
        origin_ms = float(data.get("config", {}).get("origin_ms", math.nan))
        rows.append(
            _side_by_side(
                f"reads once an entry is stale, {origin_ms:g} ms origin refreshing: p99 µs (fresh-hit p99)",
                {
                    k: f"{_n(v['window_p99_us'])} (fresh {_n(v['fresh_p99_us'])})"
                    for k, v in per.items()
                },
            )
        )
    elif name == "batch":
        per = data.get("libraries", {})
        rows.append(
            _side_by_side(
                "batch of 100 cached items: µs per batch",
                {k: _n(v["us_per_batch"]) for k, v in per.items()},
            )
        )
    elif name == "dynamodb":
        for r in data.get("latency", []):
            rows.append(
                _side_by_side(
                    f"DynamoDB {r['operation']} (moto): µs, cached hit vs uncached",
                    {"swr_cache": _n(r["cached_us"]), "uncached DynamoTable": _n(r["uncached_us"])},
                )
            )
        work = data.get("workload", [])
        if work:
            rows.append(
                _side_by_side(
                    f"Zipf workload, {float(data.get('config', {}).get('write_fraction', math.nan)):.0%} writes:"
                    " DynamoDB reads saved, stale reads after a write",
                    {
                        f"swr_cache {r['mode']}": (
                            f"{100 * r['reads_saved']:.1f}%, {r['stale_reads_after_completed_writes']}"
                        )
                        for r in work
                    },
                )
            )
    elif name == "consistency":
        modes = [m for m in data.get("modes", []) if isinstance(m, dict)]
        if modes and all("stale_reads_after_completed_write" in m for m in modes):
            rows.append(
                _side_by_side(
                    "randomized consistency check, per mode: stale reads after a completed write / torn reads"
                    " (stream: the only invalidation is the stream)",
                    {
                        f"swr_cache {m['mode']}": f"{m['stale_reads_after_completed_write']} / {m.get('torn_reads', '?')}"
                        for m in modes
                    },
                )
            )
    elif name == "replica_lag":
        conditions = data.get("conditions", {})
        if conditions and all(
            isinstance(c, dict) and "stale_cache_reads" in c for c in conditions.values()
        ):
            rows.append(
                _side_by_side(
                    "replica read right after invalidate_item returned: old value served, per write load",
                    {
                        f"swr_cache {k}": f"{c['stale_cache_reads']} / {c.get('trials', '?')}"
                        for k, c in conditions.items()
                    },
                )
            )
    elif name == "asgi":
        labels = {
            "cached": "swr_cache",
            "uncached": "uncached DynamoDB endpoint",
            "trivial": "trivial /ping",
        }
        if all(k in data for k in labels):
            rows.append(
                _side_by_side(
                    "HTTP through uvicorn: requests/s",
                    {labels[k]: _n(int(data[k]["rps"])) for k in ("cached", "uncached", "trivial")},
                )
            )
    return rows


def readme_block(
    info: dict[str, Any], runs: list[dict[str, Any]], quick: bool, results_dir: Path, readme: Path
) -> list[str]:
    """The lines between the README markers, from this run only."""
    rel_results = os.path.relpath(results_dir, readme.parent).replace(os.sep, "/")
    rel_report = os.path.relpath(results_dir.parent / "RESULTS.md", readme.parent).replace(
        os.sep, "/"
    )
    lines = [
        BEGIN,
        f"<!-- written by benchmarks/run_all.py on {info['date']}; edit run_all.py, not this block -->",
        "",
        f"Measured by `make bench`{' (quick mode: fewer rounds)' if quick else ''} on {machine_line(info)}."
        f" Full tables, settings and charts: [{rel_report}]({rel_report}).",
        "",
        "| measure | swr_cache | aiocache | cashews | reference |",
        "|---|---|---|---|---|",
    ]
    charts: list[tuple[str, str]] = []
    for run in runs:
        if run["status"] == "missing":
            continue
        rows = (
            summary_rows(run["name"], run["data"])
            if run["status"] == "ok" and isinstance(run["data"], dict)
            else []
        )
        if run["status"] != "ok":
            rows = [[run["title"], f"failed in this run ({run['status']})", "", "", ""]]
        elif not rows:
            rows = [[run["title"], f"see [{rel_report}]({rel_report}#{run['name']})", "", "", ""]]
        lines += [
            "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows
        ]
        charts += [(c["title"], c["file"]) for c in run["charts_drawn"]]
    lines += [
        "",
        "A library measured in several variants names each before its value; `-`: not measured for it. Charts:",
        "",
    ]
    lines += [f"- [{title}]({rel_results}/{file})" for title, file in charts]
    for file in ("stampede_origin_calls.png", "stale_latency.png"):
        if any(f == file for _, f in charts):
            lines += ["", f"![{next(t for t, f in charts if f == file)}]({rel_results}/{file})"]
    lines += ["", END]
    return lines


def write_readme(readme: Path, block: list[str]) -> bool:
    """Replace the marked block of ``readme``; False (and untouched) without both markers."""
    try:
        text = readme.read_text()
    except OSError:
        return False
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        return False
    readme.write_text(text[:begin] + "\n".join(block) + text[end + len(END) :])
    return True


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds everywhere, for a first look (leaves README.md alone)",
    )
    parser.add_argument(
        "--only", action="append", default=[], help="run only these (comma-separated, repeatable)"
    )
    parser.add_argument(
        "--skip", action="append", default=[], help="skip these (comma-separated, repeatable)"
    )
    parser.add_argument(
        "--out", default=str(HERE), help="where RESULTS.md and results/ go (default: benchmarks/)"
    )
    parser.add_argument(
        "--readme",
        help="rewrite the bench block of this file (default: README.md after a complete full run)",
    )
    parser.add_argument("--no-readme", action="store_true", help="never touch a README")
    parser.add_argument(
        "--timeout", type=float, help="seconds per benchmark (default 300 quick, 3600 full)"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    only = [n for item in args.only for n in item.split(",") if n]
    skip = [n for item in args.skip for n in item.split(",") if n]
    todo = discover(only, skip)
    if args.list:
        for name, path in todo:
            print(f"{name:<16} {'present' if path else 'missing'}  {title_of(name, path)}")
        return 0
    out_dir = Path(args.out).resolve()
    results_dir = out_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    readme: Path | None = None
    if args.readme:
        readme = Path(args.readme).resolve()
    elif not (args.no_readme or args.quick or only or skip) and out_dir == HERE:
        readme = README
    if args.no_readme:
        readme = None
    timeout = args.timeout or (300.0 if args.quick else 3600.0)
    say(
        f"swr_cache benchmarks{' (quick)' if args.quick else ''}: {len(todo)} to run, results in {out_dir}"
    )
    info = machine()
    say(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['python']}, redis-server {info['redis_server']}"
    )
    runs: list[dict[str, Any]] = []
    failed = 0
    t_all = time.monotonic()
    for i, (name, path) in enumerate(todo, 1):
        title = title_of(name, path)
        entry: dict[str, Any] = {
            "name": name,
            "title": title,
            "tables": [],
            "charts_drawn": [],
            "stdout": "",
            "stderr": "",
            "data": None,
        }
        runs.append(entry)
        if path is None:
            say(f"[{i}/{len(todo)}] {name}: benchmarks/{name}.py not found, skipped")
            entry.update(status="missing", seconds=0.0)
            continue
        json_path = results_dir / f"{name}.json"
        json_path.unlink(missing_ok=True)
        argv = command(name, path, json_path, args.quick)
        shown = [
            Path(a).name
            if a == sys.executable
            else os.path.relpath(a, ROOT)
            if a.startswith(str(ROOT))
            else a
            for a in argv
        ]
        say(f"[{i}/{len(todo)}] {name} ({time.monotonic() - t_all:.0f} s in): {' '.join(shown)}")
        got = run_script(argv, timeout)
        entry.update(argv=shown, seconds=got["seconds"], stdout=got["stdout"], stderr=got["stderr"])
        entry["status"] = "ok" if got["returncode"] == 0 else f"exit code {got['returncode']}"
        data: Any = None
        if json_path.exists():
            try:
                data = json.loads(json_path.read_text())
            except ValueError as exc:
                entry["status"] = f"unreadable JSON ({exc})"
        elif entry["status"] == "ok" and "--json" in argv:
            entry["status"] = "wrote no JSON"
        if entry["status"] != "ok":
            failed += 1
        entry["data"] = data
        if data is not None:
            if isinstance(data, dict) and "tables" in data:
                tables, charts = (
                    data["tables"],
                    data.get("charts") or table_charts(name, data["tables"]),
                )
            else:
                tables, charts = generic_view(name, data)
            entry["tables"] = tables
            for spec in charts:
                try:
                    drawn = draw(spec, results_dir)
                except Exception as exc:  # one bad chart must not lose the report
                    say(f"    chart {spec.get('file')} failed: {exc!r}")
                    continue
                if drawn is None:
                    say("    matplotlib is not installed (pip install -e '.[bench]'): no charts")
                    break
                entry["charts_drawn"].append(spec)
        say(f"[{i}/{len(todo)}] {name}: {entry['status']} in {got['seconds']:.1f} s")
    path = report(out_dir, info, runs, args.quick)
    drawn_total = sum(len(r["charts_drawn"]) for r in runs)
    say(
        f"wrote {path} and {drawn_total} charts in {results_dir} ({time.monotonic() - t_all:.0f} s in all)"
    )
    if readme is not None and failed:
        say(f"{failed} benchmark(s) failed: the table in {readme} is left as it was")
    elif readme is not None:
        block = readme_block(info, runs, args.quick, results_dir, readme)
        if write_readme(readme, block):
            say(f"rewrote the benchmark table in {readme}")
        else:
            say(f"{readme} has no {BEGIN} ... {END} block: left as it is")
    if failed:
        say(f"{failed} benchmark(s) failed: see {path}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
