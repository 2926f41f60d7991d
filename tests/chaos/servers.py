"""Processes the chaos run owns: each in a session of its own, all stopped at exit (also on Ctrl-C or
failure), plus a private PostgreSQL cluster and a private Redis it may kill and restart without touching the
machine's own servers.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from tests.hub import free_port


def signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group ``process`` leads (started with ``start_new_session``), if any is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def stop_group(process: subprocess.Popen[bytes], *, sig: signal.Signals, timeout: float = 10.0) -> None:
    """Signal the group, wait for its leader, then SIGKILL whatever of the group is left."""
    signal_group(process, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)
    signal_group(process, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, read from /proc."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for path in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in path.read_text().split()]
                found += kids
                frontier += kids
    return found


def announcement(process: subprocess.Popen[bytes], what: str, log: Path) -> dict[str, Any]:
    """The JSON line a started server prints first on its stdout (its URL and folder)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} did not start; see {log}")
    return dict(json.loads(line))


class Procs:
    """Started processes by role; ``stop_all`` (registered with atexit) ends each one's whole group."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.cleanups: list[tuple[str, object]] = []
        atexit.register(self.stop_all)

    def spawn(
        self,
        role: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        *,
        stdout: int | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new session, its output appended to ``<logs>/<role>.log``."""
        with open(self.logs / f"{role.split('#')[0]}.log", "ab") as log:
            process = subprocess.Popen(
                list(argv),
                env=env,
                cwd=cwd or self.logs,
                stdout=stdout if stdout is not None else log,
                stderr=log,
                start_new_session=True,
            )
        self.running[role] = process
        return process

    def stop(self, role: str, *, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal the role's process group, wait, then SIGKILL whatever of the group is left."""
        process = self.running.pop(role, None)
        if process is not None:
            stop_group(process, sig=sig, timeout=timeout)

    def on_exit(self, name: str, callback: object) -> None:
        """Run ``callback()`` in ``stop_all`` after the processes (servers that daemonize themselves)."""
        self.cleanups.append((name, callback))

    def stop_all(self) -> None:
        for role in list(self.running):
            self.stop(role, timeout=5)
        while self.cleanups:
            _, callback = self.cleanups.pop()
            with contextlib.suppress(Exception):
                callback()  # type: ignore[operator]


class Postgres:
    """A throw-away PostgreSQL cluster on a free loopback port, run as the ``postgres`` user when we are root
    (PostgreSQL refuses to run as root); ``restart`` is ``pg_ctl restart -m fast``."""

    def __init__(self, procs: Procs, root: Path) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
        if not bins:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        self.bin = bins[-1].parent
        self.procs = procs
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.as_owner: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(root, owner.pw_uid, owner.pw_gid)
            self.as_owner = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/idhub"

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.as_owner, *argv], check=True, capture_output=True, timeout=120)

    def _ctl(self, *argv: str) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=300 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        log = str(self.root / "postgres.log")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, "-w", *argv)

    def start(self) -> Postgres:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"
        )
        self._ctl("start")
        self.procs.on_exit("postgres", self.stop)
        self._run(
            str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "idhub"
        )
        return self

    def restart(self) -> None:
        self._ctl("-m", "fast", "restart")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")


def redis_server_argv(port: int) -> list[str]:
    """A redis-server on loopback that keeps nothing on disk, so a restart loses every queued message."""
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not installed")
    return [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


def wait_redis(port: int, timeout: float = 15.0) -> None:
    """Return once the Redis on ``port`` answers PING; RuntimeError after ``timeout`` seconds."""
    client = redis.Redis(port=port, socket_timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
    finally:
        client.close()


class Redis:
    """A private redis-server that keeps nothing on disk, so a restart loses every queued message."""

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> Redis:
        self.procs.spawn("redis", redis_server_argv(self.port))
        wait_redis(self.port)
        return self

    def restart(self) -> None:
        """Kill it (nothing is saved: the queues are gone) and start it again on the same port."""
        self.procs.stop("redis", sig=signal.SIGKILL)
        self.start()

    def cut_off(self, seconds: float) -> int:
        """``CLIENT KILL TYPE normal`` every 100 ms for ``seconds``: every client loses its connection again
        and again while the server stays up. Returns how many connections were killed."""
        client = self.client()
        killed = 0
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                killed += int(client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))
                time.sleep(0.1)
        finally:
            client.close()
        return killed

    def queued(self) -> int:
        """Messages waiting in the broker's queues (database 0)."""
        client = self.client()
        try:
            keys = [k for k in client.keys("*") if client.type(k) == b"list"]
            return sum(int(client.llen(k)) for k in keys)
        finally:
            client.close()
