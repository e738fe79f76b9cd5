"""HTTP cache-tests (the suite behind cache-tests.fyi) against CacheMiddleware.

Not a benchmark and not part of ``make test``: ``make conformance`` runs it.

The suite drives a reverse proxy in front of its own origin server and records,
per test, whether the cache behaved as the specifications say. Here the
"reverse proxy" is a small httpx proxy (an ASGI app forwarding every request to
the suite's origin, streaming the answer back untouched) wrapped in
``CacheMiddleware`` and served by uvicorn on a loopback port, with a
redis-server of its own. It runs two profiles:

* ``strict``: freshness and stale windows only from the responses
  (``soft_ttl = hard_ttl = 0.001``, ``grace_for_explicit=False``): what the
  suite measures.
* ``readme``: the README's example settings (``soft_ttl=5, hard_ttl=60``):
  responses without freshness are stored for 5 s and served stale for 55 s
  more, deliberate departures that the README names.

The suite comes from the npm registry (``http-cache-tests``, installed into a
scratch directory outside the repository) or from a checkout given with
``--suite``. Its required tests are classified the way its own result pages do
(a test whose prerequisite did not pass counts as blocked, not failed), and the
results the package ships for other caches are classified the same way, so the
table compares like with like. ``--write`` puts the table into
``benchmarks/RESULTS.md`` between ``<!-- conformance:begin -->`` and
``<!-- conformance:end -->`` (``make bench`` keeps that block).

    python benchmarks/conformance.py [--suite DIR] [--profile strict|readme|both]
                                     [--write] [--json FILE] [--id TEST-ID]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
import uvicorn
from _common import say, start_redis

from swr_cache import Cache, CacheMiddleware

HERE = Path(__file__).resolve().parent
SUITE_PACKAGE = "http-cache-tests"
SUITE_VERSION = "0.4.5"
BEGIN, END = "<!-- conformance:begin -->", "<!-- conformance:end -->"

PROFILES: dict[str, dict[str, Any]] = {
    "strict": {"soft_ttl": 0.001, "hard_ttl": 0.001, "grace_for_explicit": False},
    "readme": {"soft_ttl": 5, "hard_ttl": 60},
}

# Hop-by-hop fields (RFC 9110 §7.6.1) a proxy does not forward; Host is the origin's.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"host",
    }
)

# Lists every test of the suite with its kind and prerequisites (the suite's
# own modules, imported by node).
META_SCRIPT = """
const base = process.argv[2]
const tests = (await import(base + '/tests/index.mjs')).default
const surrogate = (await import(base + '/tests/surrogate-control.mjs')).default
tests.push(surrogate)
const out = []
for (const suite of tests) {
  for (const t of suite.tests) {
    out.push({suite: suite.id, id: t.id, name: t.name, kind: t.kind || 'required',
              depends_on: t.depends_on || [], browser_only: t.browser_only === true})
  }
}
console.log(JSON.stringify(out))
"""


# ---------------------------------------------------------------------------
# The suite


def scratch_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "swr_cache" / "http-cache-tests"


def install_suite(version: str) -> Path:
    """``npm install http-cache-tests@version`` into the scratch directory (once)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise SystemExit("conformance: node and npm are needed (node >= 14)")
    root = scratch_dir() / version
    suite = root / "node_modules" / SUITE_PACKAGE
    if not (suite / "cli.mjs").exists():
        root.mkdir(parents=True, exist_ok=True)
        say(f"installing {SUITE_PACKAGE}@{version} into {root}")
        subprocess.run(
            [
                "npm",
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--prefix",
                str(root),
                f"{SUITE_PACKAGE}@{version}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return suite


def suite_meta(suite: Path) -> list[dict[str, Any]]:
    script = scratch_dir() / "meta.mjs"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(META_SCRIPT)
    out = subprocess.run(
        ["node", "--no-warnings", str(script), suite.resolve().as_uri()],
        check=True,
        capture_output=True,
        text=True,
    )
    meta: list[dict[str, Any]] = json.loads(out.stdout)
    return meta


def classify(meta: list[dict[str, Any]], results: dict[str, Any]) -> dict[str, str]:
    """Each test's outcome as the suite's result pages show it.

    ``pass``/``fail`` for required and optimal tests, ``yes``/``no`` for checks,
    ``setup`` when the test's setup went wrong, ``blocked`` when a test it
    depends on did not pass, ``untested`` when there is no result.
    """
    by_id = {t["id"]: t for t in meta}
    memo: dict[str, str] = {}

    def outcome(test_id: str) -> str:
        if test_id in memo:
            return memo[test_id]
        test = by_id[test_id]
        result = results.get(test_id)
        if result is None:
            value = "untested"
        elif any(outcome(dep) not in ("pass", "yes") for dep in test["depends_on"]):
            value = "blocked"
        elif isinstance(result, list) and result and result[0] == "Setup":
            value = "setup"
        elif test["kind"] == "check":
            value = "yes" if result is True else "no"
        else:
            value = "pass" if result is True else "fail"
        memo[test_id] = value
        return value

    return {t["id"]: outcome(t["id"]) for t in meta}


def published(suite: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, version, results) of the reverse proxies and CDNs the package ships results for."""
    index = (suite / "results" / "index.mjs").read_text()
    out = []
    # The index is a JS module of object literals; its fields are one per line.
    entry: dict[str, str] = {}
    for line in index.splitlines():
        line = line.strip().rstrip(",")
        for field in ("file", "name", "type", "version"):
            if line.startswith(f"{field}:"):
                entry[field] = line.split(":", 1)[1].strip().strip("'\"")
        if line.startswith("}") and entry:
            if entry.get("type") in ("rev-proxy", "cdn"):
                results = json.loads((suite / "results" / entry["file"]).read_text())
                out.append((entry["name"], entry.get("version", ""), results))
            entry = {}
    return out


# ---------------------------------------------------------------------------
# The proxy under test


def proxy_app(origin: str, client: httpx.AsyncClient) -> Any:
    """An ASGI reverse proxy to ``origin``: request and response forwarded as they are."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        request = client.build_request(
            scope["method"], origin + target.decode("latin-1"), headers=headers, content=body
        )
        response = await client.send(request, stream=True)
        # A proxy removes the hop-by-hop fields and those Connection names (RFC 9110 §7.6.1).
        drop = set(HOP_BY_HOP)
        for name, value in response.headers.raw:
            if name.lower() == b"connection":
                drop.update(v.strip().lower() for v in value.split(b","))
        status = response.status_code
        if not 100 <= status <= 599:
            # The suite's origin answers 999 to a request it did not expect;
            # uvicorn sends three-digit statuses up to 599 only: a 502 instead.
            status = 502
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in drop],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="error",
        access_log=False,
        date_header=False,
        server_header=False,
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped during startup")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.contextmanager
def origin_server(suite: Path) -> Any:
    """The suite's origin server (node) on a free loopback port."""
    port = free_port()
    env = dict(
        os.environ,
        npm_config_port=str(port),
        npm_config_protocol="http",
        npm_config_pidfile=str(scratch_dir() / "server.pid"),
    )
    proc = subprocess.Popen(
        ["node", "--no-warnings", "server/server.mjs"],
        cwd=suite,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the suite's origin server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run_profile(
    suite: Path, origin: str, redis_url: str, profile: str, test_id: str
) -> dict[str, Any]:
    """Run the suite's CLI against the middleware in one profile; its raw results."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    await client.flushdb()
    cache = Cache(client, namespace=f"conformance-{profile}")
    try:
        async with (
            cache,
            # No keep-alive to the origin: it closes idle connections on its
            # own schedule, and a request racing that close would fail a test
            # for a reason that has nothing to do with caching.
            httpx.AsyncClient(
                timeout=30,
                follow_redirects=False,
                limits=httpx.Limits(max_keepalive_connections=0),
            ) as upstream,
        ):
            app = CacheMiddleware(
                proxy_app(origin, upstream), cache=cache, add_date=True, **PROFILES[profile]
            )
            async with serving(app) as base:
                # (The CLI reads `npm_config_id || npm_package_config_id`: both
                # empty means every test.)
                env = dict(
                    os.environ,
                    npm_config_base=base,
                    npm_config_id=test_id,
                    npm_package_config_id=test_id,
                )
                proc = await asyncio.create_subprocess_exec(
                    "node",
                    "--no-warnings",
                    "cli.mjs",
                    cwd=suite,
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                )
                out, _ = await proc.communicate()
    finally:
        await client.aclose()
    text = out.decode()
    if test_id:
        print(text)
        return {}
    results: dict[str, Any] = json.loads(text)
    return results


# ---------------------------------------------------------------------------
# Reporting

COLUMNS = ["cache", "required: pass", "fail", "setup error", "blocked", "optimal: pass", "of"]


def counts(meta: list[dict[str, Any]], outcomes: dict[str, str], suites: set[str]) -> list[int]:
    """Required pass, fail, setup error, blocked; optimal pass, of (browser-only tests left out)."""
    meta = [t for t in meta if not t.get("browser_only")]
    required = Counter(
        outcomes[t["id"]] for t in meta if t["kind"] == "required" and t["suite"] in suites
    )
    optimal = Counter(
        outcomes[t["id"]] for t in meta if t["kind"] == "optimal" and t["suite"] in suites
    )
    n_optimal = sum(1 for t in meta if t["kind"] == "optimal" and t["suite"] in suites)
    return [
        required["pass"],
        required["fail"],
        required["setup"],
        required["blocked"] + required["untested"],
        optimal["pass"],
        n_optimal,
    ]


def report(
    meta: list[dict[str, Any]],
    ours: dict[str, dict[str, str]],
    others: list[tuple[str, str, dict[str, str]]],
    version: str,
) -> list[str]:
    # The published tables leave the Surrogate-Control suite out (it is not
    # about HTTP caching proper); so does this one, and says so. Tests for
    # browser caches only are never run against a proxy.
    meta = [t for t in meta if not t.get("browser_only")]
    suites = {t["suite"] for t in meta} - {"surrogate-control"}
    n_required = sum(1 for t in meta if t["kind"] == "required" and t["suite"] in suites)
    lines = [
        BEGIN,
        "## HTTP cache-tests conformance",
        "",
        f"Written by `make conformance` (`python benchmarks/conformance.py --write`) on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, suite "
        f"`{SUITE_PACKAGE}` {version}: the {n_required} required tests that apply to a "
        "shared cache (the Surrogate-Control group left out, as in the published tables, "
        "and the browser-only tests, which the suite does not run against a proxy). "
        "A test is *blocked* when a test it "
        "depends on did not pass; *setup error* when the suite could not set it up. "
        "The other caches' rows are the result files the package ships, classified the same "
        "way; they are older than cache-tests.fyi's current tables (which add caddy and "
        "HAProxy and rerun the others), so their numbers differ from the site's.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    for profile, outcomes in ours.items():
        settings = ", ".join(f"{k}={v}" for k, v in PROFILES[profile].items())
        row = [f"**CacheMiddleware, {profile}** ({settings})", *counts(meta, outcomes, suites)]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    for name, ver, outcomes in others:
        row = [f"{name} {ver}", *counts(meta, outcomes, suites)]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    lines.append("")
    for profile, outcomes in ours.items():
        failed = [
            t
            for t in meta
            if t["kind"] == "required"
            and t["suite"] in suites
            and outcomes[t["id"]] in ("fail", "setup")
        ]
        lines.append(f"Required tests not passed, {profile} profile:")
        lines.append("")
        if not failed:
            lines.append("- none")
        for t in failed:
            lines.append(f"- `{t['id']}` ({outcomes[t['id']]}): {t['name']}")
        lines.append("")
    lines.append(END)
    return lines


def write_results(block: list[str], path: Path) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    begin, end = text.find(BEGIN), text.find(END)
    if begin >= 0 and end > begin:
        text = text[:begin] + "\n".join(block) + text[end + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(block) + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", help="a checkout of the suite (default: install from npm)")
    parser.add_argument("--suite-version", default=SUITE_VERSION)
    parser.add_argument("--profile", choices=["strict", "readme", "both"], default="both")
    parser.add_argument("--id", default="", help="run one test and print its exchange")
    parser.add_argument("--redis-url", help="use this Redis (flushed!) instead of starting one")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--json", help="write the raw results and outcomes here")
    args = parser.parse_args(argv)

    suite = Path(args.suite) if args.suite else install_suite(args.suite_version)
    version = json.loads((suite / "package.json").read_text()).get("version", "?")
    meta = suite_meta(suite)
    profiles = ["strict", "readme"] if args.profile == "both" else [args.profile]
    redis_url, redis_server = start_redis(args.redis_url)
    raw: dict[str, dict[str, Any]] = {}
    try:
        with origin_server(suite) as origin:
            for profile in profiles:
                say(f"running {SUITE_PACKAGE} {version} against CacheMiddleware ({profile})")
                raw[profile] = asyncio.run(run_profile(suite, origin, redis_url, profile, args.id))
    finally:
        if redis_server is not None:
            redis_server.stop()
    if args.id:
        return 0
    ours = {p: classify(meta, r) for p, r in raw.items()}
    others = [(n, v, classify(meta, r)) for n, v, r in published(suite)]
    block = report(meta, ours, others, version)
    print("\n".join(block[1:-1]))
    if args.write:
        write_results(block, HERE / "RESULTS.md")
        say(f"wrote {HERE / 'RESULTS.md'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"raw": raw, "outcomes": ours}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
