"""Run every benchmark, then write ``benchmarks/RESULTS.md`` and a chart per benchmark.

``make bench`` runs this. Each script present in ``benchmarks/`` runs in its
own process (its own redis-server, and moto where needed) with ``--json``, and
``--quick`` when it has that flag; its progress is shown as it goes. Missing
scripts are skipped with a message. The report records the machine (CPU,
cores, Python, redis-server, library versions, load) and date, one table per
benchmark and a PNG chart per benchmark (matplotlib, the ``bench`` extra) in
``benchmarks/results/``. Every number in it comes from this run.

    python benchmarks/run_all.py [--quick] [--only stampede,batch] [--skip hit_path] [--out DIR]

Scripts may put ``tables`` (``{"title", "columns", "rows", "notes"}``) and
``charts`` (``{"file", "title", "kind": "bar"|"barh"|"line", "categories"
or "x", "series", "ylabel", "log"}``) in their JSON; other JSON shapes are
rendered generically (lists of records become tables), and a script's printed
output is kept in the report when it leaves no tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import fmt, versions  # noqa: E402

#: Benchmarks in report order; any other ``benchmarks/*.py`` (not ``_*``) runs after them.
KNOWN: dict[str, str] = {
    "hit_path": "Hit path: one cached item against the raw Redis floor and the peers",
    "stampede": "Cold stampede: 1000 concurrent callers of one key",
    "stale_latency": "Stale reads while a 50 ms origin refreshes",
    "batch": "A batch of 100 keys",
    "dynamodb": "DynamoDB: DynamoTable against moto, and reads saved on a skewed workload",
    "asgi": "ASGI middleware: cached HTTP responses",
    "consistency": "Consistency: staleness after writes",
}
#: Reduced settings for scripts that have no ``--quick`` flag.
QUICK_ARGS: dict[str, list[str]] = {
    "hit_path": ["--rounds", "3", "--calls", "500", "--no-pin"],
}
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
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
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
        from swr_cache.devservers import find_redis_server, redis_server_version

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
    present = {p.stem: p for p in HERE.glob("*.py") if not p.stem.startswith("_") and p.stem != "run_all"}
    names = list(KNOWN) + sorted(n for n in present if n not in KNOWN)
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise SystemExit(f"run_all: no benchmark named {', '.join(unknown)} (have: {', '.join(names)})")
        names = [n for n in names if n in only]
    return [(n, present.get(n)) for n in names if n not in skip]


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
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
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
    return {"returncode": code, "seconds": time.monotonic() - t0, "stdout": "".join(out), "stderr": "".join(err)}


# ---------------------------------------------------------------------------
# Turning results into tables and charts


def hit_path_view(data: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Tables and a chart for hit_path.py's JSON ({mode: {us_per_call, calls_per_s_100, ...}})."""
    tables, series_us, series_cps, names = [], {}, {}, []
    for mode, r in data.items():
        if not isinstance(r, dict) or "us_per_call" not in r:
            continue
        seq, conc = r["us_per_call"], r.get("calls_per_s_100", {})
        floor_s, floor_c = seq.get("floor"), conc.get("floor")
        names = list(seq)
        rows = []
        for name in names:
            rows.append(
                [
                    name,
                    seq[name],
                    seq[name] / floor_s if floor_s else math.nan,
                    conc.get(name, math.nan),
                    conc.get(name, math.nan) / floor_c if floor_c else math.nan,
                ]
            )
        notes = []
        if "origin_loads" in r:
            notes.append(f"swr_cache origin loads during the run: {r['origin_loads']} (the warm-up fill)")
        tables.append(
            {
                "title": f"Hit path, ~1 KB item, medians of interleaved rounds ({mode})",
                "columns": ["contender", "sequential us/call", "x floor", "100 same-key calls/s", "x floor"],
                "rows": rows,
                "notes": notes,
            }
        )
        series_us[f"us per call ({mode})"] = [seq[n] for n in names]
        series_cps[f"calls/s, 100 concurrent ({mode})"] = [conc.get(n, math.nan) for n in names]
    charts = []
    if names:
        charts.append(
            {
                "file": "hit_path.png",
                "title": "Hit path: microseconds per sequential call (lower is better)",
                "kind": "bar",
                "categories": names,
                "series": series_us,
                "ylabel": "microseconds per call",
                "log": False,
            }
        )
        charts.append(
            {
                "file": "hit_path_concurrent.png",
                "title": "Hit path: 100 concurrent same-key callers, calls per second (higher is better)",
                "kind": "bar",
                "categories": names,
                "series": series_cps,
                "ylabel": "calls per second",
                "log": False,
            }
        )
    return tables, charts


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
            numeric = [c for c in columns if c != time_key and all(_is_number(r.get(c)) for r in value)]
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
                label_key = next((c for c in columns if all(isinstance(r.get(c), str) for r in value)), None)
                timing = [c for c in numeric if re.search(r"(_us|_ms|latency|p50|p99)$", c)]
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
        if isinstance(value, list) and len(value) >= 5 and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_number(x) for x in p) for p in value
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
    except ImportError:
        return None
    series: dict[str, list[float]] = {
        k: [math.nan if v is None else float(v) for v in vals] for k, vals in spec["series"].items()
    }
    kind = spec.get("kind", "bar")
    if kind == "line":
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for label, values in series.items():
            ax.plot(spec["x"], values, label=label, linewidth=1.5)
        ax.set_xlabel(spec.get("xlabel", ""))
    else:
        cats = [str(c) for c in spec["categories"]]
        n = max(1, len(series))
        width = 0.8 / n
        horizontal = kind == "barh"
        size = (9, 0.5 * len(cats) + 1.5) if horizontal else (max(7.0, 1.3 * len(cats) + 2), 5)
        fig, ax = plt.subplots(figsize=size)
        for i, (label, values) in enumerate(series.items()):
            pos = [j + (i - (n - 1) / 2) * width for j in range(len(cats))]
            bars = ax.barh(pos, values, height=width, label=label) if horizontal else ax.bar(pos, values, width=width, label=label)
            finite = [v for v in values if not math.isnan(v)]
            if len(cats) * n <= 28 and finite:
                ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=7, padding=2)
        if horizontal:
            ax.set_yticks(range(len(cats)), cats)
            ax.invert_yaxis()
        else:
            ax.set_xticks(range(len(cats)), cats, rotation=20, ha="right")
        if spec.get("log"):
            finite = [v for vals in series.values() for v in vals if not math.isnan(v) and v > 0]
            if horizontal:
                ax.set_xscale("log")
            else:
                ax.set_yscale("log")
                if finite:
                    ax.set_ylim(bottom=min(finite) / 2, top=max(finite) * 3)
    if kind == "barh":
        ax.set_xlabel(spec.get("ylabel", ""))
    else:
        ax.set_ylabel(spec.get("ylabel", ""))
    ax.set_title(spec.get("title", ""), fontsize=10)
    if len(series) > 1 or kind == "line":
        ax.legend(fontsize=8)
    ax.grid(axis="x" if kind == "barh" else "y", alpha=0.3)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / spec["file"], dpi=110)
    plt.close(fig)
    return str(spec["file"])


def md_table(t: dict[str, Any]) -> list[str]:
    lines = [f"**{t['title']}**", ""] if t.get("title") else []
    cols = t["columns"]
    lines.append("| " + " | ".join(str(c) for c in cols) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
    for row in t["rows"]:
        lines.append("| " + " | ".join(fmt(c, 2 if isinstance(c, float) and abs(c) < 10 else 1).replace("|", "\\|") for c in row) + " |")
    lines.append("")
    for note in t.get("notes", []):
        lines.append(f"- {note}")
    if t.get("notes"):
        lines.append("")
    return lines


def report(
    out_dir: Path, info: dict[str, Any], runs: list[dict[str, Any]], quick: bool
) -> Path:
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `make bench` (`python benchmarks/run_all.py{' --quick' if quick else ''}`) on"
        f" {info['date']}. Every number below was measured in that run; run it again to regenerate"
        " this file and the charts.",
        "",
    ]
    if quick:
        lines += ["> Quick mode: fewer rounds, for a first look and CI. `make bench` runs the full set.", ""]
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
            lines += [f"**Failed** ({run['status']}). Last lines of its output:", "", "```", tail, "```", ""]
        for t in run["tables"]:
            lines += md_table(t)
        for chart in run["charts_drawn"]:
            lines += [f"![{chart['title']}](results/{chart['file']})", ""]
        if not run["tables"] and run["stdout"].strip():
            lines += ["```", run["stdout"].strip(), "```", ""]
    path = out_dir / "RESULTS.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds everywhere (about 2 minutes in all)")
    parser.add_argument("--only", action="append", default=[], help="run only these (comma-separated, repeatable)")
    parser.add_argument("--skip", action="append", default=[], help="skip these (comma-separated, repeatable)")
    parser.add_argument("--out", default=str(HERE), help="where RESULTS.md and results/ go (default: benchmarks/)")
    parser.add_argument("--timeout", type=float, help="seconds per benchmark (default 300 quick, 3600 full)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    only = [n for item in args.only for n in item.split(",") if n]
    skip = [n for item in args.skip for n in item.split(",") if n]
    todo = discover(only, skip)
    if args.list:
        for name, path in todo:
            print(f"{name:<16} {'present' if path else 'missing'}  {KNOWN.get(name, '')}")
        return 0
    out_dir = Path(args.out).resolve()
    results_dir = out_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    timeout = args.timeout or (300.0 if args.quick else 3600.0)
    say(f"swr_cache benchmarks{' (quick)' if args.quick else ''}: {len(todo)} to run, results in {out_dir}")
    info = machine()
    say(f"machine: {info['cpu']}, {info['cores']} cores, {info['python']}, redis-server {info['redis_server']}")
    runs: list[dict[str, Any]] = []
    failed = 0
    t_all = time.monotonic()
    for i, (name, path) in enumerate(todo, 1):
        title = KNOWN.get(name, name)
        entry: dict[str, Any] = {"name": name, "title": title, "tables": [], "charts_drawn": [], "stdout": "", "stderr": ""}
        runs.append(entry)
        if path is None:
            say(f"[{i}/{len(todo)}] {name}: benchmarks/{name}.py not found, skipped")
            entry.update(status="missing", seconds=0.0)
            continue
        json_path = results_dir / f"{name}.json"
        json_path.unlink(missing_ok=True)
        argv = command(name, path, json_path, args.quick)
        shown = [Path(a).name if a == sys.executable else os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in argv]
        say(f"[{i}/{len(todo)}] {name}: {' '.join(shown)}")
        got = run_script(argv, timeout)
        entry.update(argv=shown, seconds=got["seconds"], stdout=got["stdout"], stderr=got["stderr"])
        entry["status"] = "ok" if got["returncode"] == 0 else f"exit code {got['returncode']}"
        data: Any = None
        if json_path.exists():
            try:
                data = json.loads(json_path.read_text())
            except ValueError as exc:
                entry["status"] = f"unreadable JSON ({exc})"
        if entry["status"] != "ok":
            failed += 1
        if data is not None:
            if isinstance(data, dict) and "tables" in data:
                tables, charts = data["tables"], data.get("charts", [])
            elif name == "hit_path":
                tables, charts = hit_path_view(data)
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
    say(f"wrote {path} and {len(list(results_dir.glob('*.png')))} charts in {time.monotonic() - t_all:.0f} s")
    if failed:
        say(f"{failed} benchmark(s) failed: see {path}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
