"""Hub benchmark: SCIM creates, PATCHes, filtered GETs and Bulk against PostgreSQL over HTTP with keep-alive.

Starts ``idhub serve`` on a fresh PostgreSQL database, loads customers through Bulk, then drives each
operation from concurrent keep-alive connections and prints one JSON document of rates and latencies.
Sizes come from the environment: BENCH_CUSTOMERS (default 100000), BENCH_OPS (default 5000 per kind),
BENCH_CONCURRENCY (default 16), BENCH_LOW_CONCURRENCY (default 4: latency where requests hardly queue),
BENCH_SERVER_WORKERS (default: one per core, as `idhub serve` picks on PostgreSQL).

The client is a small HTTP/1.1 keep-alive client on asyncio streams: on two cores a general-purpose client
took a large share of the CPU the server needs. Every response is still read whole and checked. Each phase
reports the CPU seconds the server (with its workers), this client and the rest of the machine spent in it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import create_engine, text

from tests.conftest import create_pg_database, drop_pg_database
from tests.hub import SCIM, USER_SCHEMA, free_port, wait_http

BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
PREFIX = "/scim/v2"


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def customer(i: int, run: str) -> dict[str, Any]:
    return {
        "schemas": [USER_SCHEMA],
        "userName": f"c{i}-{run}@bench.example",
        "name": {"givenName": f"G{i}", "familyName": f"F{i}"},
        "emails": [{"value": f"c{i}-{run}@bench.example", "primary": True}],
        "active": True,
    }


class Connection:
    """One HTTP/1.1 keep-alive connection: a request at a time, the whole response read and returned."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self.fixed = f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\nContent-Type: {SCIM}\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\n{self.fixed}Content-Length: {len(payload)}\r\n\r\n"
        self.writer.write(head.encode() + payload)
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = None
        close = False
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding":
                raise RuntimeError("the benchmark client reads Content-Length bodies only")
        if length is None:
            raise RuntimeError(f"{method} {path}: a response without Content-Length")
        raw = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, json.loads(raw) if raw else None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()
            self.reader = self.writer = None


def _cpu_of(pids: set[int]) -> float:
    """CPU seconds (user + system) of the processes ``pids``, where they still run."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _family(root: int) -> set[int]:
    """``root`` and its descendants (the server and its worker processes)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += parents.get(pid, [])
    return out


def wait_started(root: int, workers: int, timeout: float = 120.0) -> None:
    """Wait until the server ``root`` has its ``workers`` processes up and idle.

    Its first worker answers the health check while the others are still starting, and a keep-alive connection
    stays with the process that accepted it: a client connecting then would send everything to that one.
    """
    if workers <= 1:
        return
    deadline = time.monotonic() + timeout
    while len(_family(root) - {root}) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server's {workers} workers did not start within {timeout} s")
        time.sleep(0.25)
    wait_idle(root, max(1.0, deadline - time.monotonic()))


def wait_idle(root: int, timeout: float = 120.0) -> None:
    """Wait until process ``root`` and its children have stopped using the CPU: done importing and starting,
    which would otherwise count in the phase that follows."""
    deadline = time.monotonic() + timeout
    previous = _cpu_of(_family(root))
    while time.monotonic() < deadline:
        time.sleep(0.25)
        busy = _cpu_of(_family(root))
        if busy - previous < 0.02:
            return
        previous = busy
    raise TimeoutError(f"process {root} did not settle within {timeout} s")


def _machine_cpu() -> float:
    """CPU seconds every core of the machine spent busy since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _backends(database: str) -> set[int]:
    """The PostgreSQL server processes serving connections to ``database`` (on this machine)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f" {database} ".encode() in (entry / "cmdline").read_bytes():
                    out.add(int(entry.name))
            except OSError:
                continue
    return out


class CpuMeter:
    """CPU seconds spent during a phase by the server family, its PostgreSQL backends, this client, and the
    rest of the machine (other work on a shared machine shows there)."""

    def __init__(self, server_pid: int, database: str) -> None:
        self.server_pid = server_pid
        self.database = database

    def __enter__(self) -> CpuMeter:
        # Again each phase: a restarted worker is a new process, and so is a new database connection.
        self.server = _family(self.server_pid)
        self.postgres = _backends(self.database)
        self.start = (
            _cpu_of(self.server),
            _cpu_of(self.postgres),
            time.process_time(),
            _machine_cpu(),
            time.perf_counter(),
        )
        return self

    def __exit__(self, *_: object) -> None:
        server, postgres, client, machine, wall = self.start
        self.server_s = _cpu_of(self.server) - server
        # Connections the pool opened during the phase count from their start.
        opened = _backends(self.database) - self.postgres
        self.postgres_s = _cpu_of(self.postgres) - postgres + _cpu_of(opened)
        self.client_s = time.process_time() - client
        mine = self.server_s + self.postgres_s + self.client_s
        self.other_s = max(0.0, _machine_cpu() - machine - mine)
        self.wall_s = time.perf_counter() - wall

    def figures(self, name: str, count: int) -> dict[str, float]:
        busy = self.server_s + self.postgres_s + self.client_s + self.other_s
        return {
            f"{name}_server_cpu_ms_per_op": round(1000 * self.server_s / count, 3),
            f"{name}_postgres_cpu_ms_per_op": round(1000 * self.postgres_s / count, 3),
            f"{name}_client_cpu_share": round(self.client_s / busy, 3) if busy else 0.0,
            f"{name}_other_cpu_share": round(self.other_s / busy, 3) if busy else 0.0,
        }


async def drive(
    name: str,
    count: int,
    connections: list[Connection],
    call: Callable[[Connection, int], Awaitable[None]],
) -> dict[str, float]:
    """Run ``call(connection, i)`` ``count`` times, one worker per connection; rate and latency figures."""
    latencies: list[float] = []
    counter = iter(range(count))

    async def worker(connection: Connection) -> None:
        for i in counter:
            start = time.perf_counter()
            await call(connection, i)
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    elapsed = time.perf_counter() - started
    return {
        f"{name}_per_s": round(count / elapsed, 1),
        f"{name}_p50_ms": round(percentile(latencies, 0.50), 2),
        f"{name}_p99_ms": round(percentile(latencies, 0.99), 2),
        f"{name}_mean_ms": round(statistics.fmean(latencies) * 1000, 2),
    }


async def run(host: str, port: int, token: str, server_pid: int, database: str) -> dict[str, Any]:
    customers = env_int("BENCH_CUSTOMERS", 100_000)
    ops = env_int("BENCH_OPS", 5000)
    concurrency = env_int("BENCH_CONCURRENCY", 16)
    low = env_int("BENCH_LOW_CONCURRENCY", 4)
    run_id = uuid.uuid4().hex[:6]
    results: dict[str, Any] = {"customers": customers, "ops": ops, "concurrency": concurrency}
    pool = [Connection(host, port, token) for _ in range(max(concurrency, low, 4))]
    meter = CpuMeter(server_pid, database)
    batch = 500

    async def bulk(c: Connection, i: int) -> None:
        operations = [
            {"method": "POST", "path": "/Users", "bulkId": f"b{j}", "data": customer(j, run_id)}
            for j in range(i * batch, min((i + 1) * batch, customers))
        ]
        status, body = await c.request(
            "POST", PREFIX + "/Bulk", {"schemas": [BULK], "Operations": operations}
        )
        assert status == 200, body
        failed = [op for op in body["Operations"] if op["status"] != "201"]
        assert not failed, failed[:1]
        assert len(body["Operations"]) == len(operations)

    n_batches = -(-customers // batch)
    with meter:
        figures = await drive("bulk_request", n_batches, pool[:4], bulk)
    results["bulk_resources_per_s"] = round(customers / meter.wall_s, 1)
    results["bulk_request_p50_ms"] = figures["bulk_request_p50_ms"]
    results["bulk_request_p99_ms"] = figures["bulk_request_p99_ms"]
    results.update(meter.figures("bulk_resource", customers))

    ids: list[str] = []
    created = iter(range(customers, customers + 2 * ops))

    async def create(c: Connection, _: int) -> None:
        status, body = await c.request("POST", PREFIX + "/Users", customer(next(created), run_id))
        assert status == 201, body
        ids.append(body["id"])

    nicknames = itertools.count()

    async def patch(c: Connection, i: int) -> None:
        # A value never sent before: the low-concurrency pass patches the same customers again, and a
        # replace by the value already held changes nothing (no write, no event), which would be measured.
        nick = f"n{next(nicknames)}"
        body = {"schemas": [PATCH], "Operations": [{"op": "replace", "path": "nickName", "value": nick}]}
        status, answer = await c.request("PATCH", f"{PREFIX}/Users/{ids[i % len(ids)]}", body)
        assert status == 200, answer
        assert answer["nickName"] == nick, answer

    async def lookup(c: Connection, i: int) -> None:
        wanted = f"c{(i * 7919) % customers}-{run_id}@bench.example"
        query = urlencode({"filter": f'userName eq "{wanted}"'})
        status, body = await c.request("GET", f"{PREFIX}/Users?{query}", None)
        assert status == 200, body
        assert body["totalResults"] == 1, body
        assert body["Resources"][0]["userName"] == wanted, body

    for name, call in (("create", create), ("patch", patch), ("filtered_get", lookup)):
        with meter:
            results.update(await drive(name, ops, pool[:concurrency], call))
        results.update(meter.figures(name, ops))
    # The same at a low concurrency, where p99 is service time rather than queueing on two cores.
    for name, call in (("create", create), ("patch", patch), ("filtered_get", lookup)):
        figures = await drive(name, ops, pool[:low], call)
        results.update({f"{key}_at_c{low}": value for key, value in figures.items()})
    for c in pool:
        await c.close()
    return results


def main() -> int:
    url = create_pg_database("idhub_bench")
    port = free_port()
    # JSON log lines as in production (deploy/k8s/configmap.yaml), unless the caller says otherwise.
    env = {
        "IDHUB_LOG_FORMAT": "json",
        **os.environ,
        "IDHUB_DATABASE_URL": url,
        "IDHUB_BULK_MAX_OPERATIONS": "1000",
    }
    idhub = [sys.executable, "-m", "orchestrator.cli"]
    server = None
    try:
        token = subprocess.run(
            [*idhub, "token", "create", "bench", "--scope", "admin"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        workers = str(env_int("BENCH_SERVER_WORKERS", os.cpu_count() or 1))
        server = subprocess.Popen([*idhub, "serve", "--port", str(port), "--workers", workers], env=env)
        # Generous: on a busy shared machine the workers take long to import and migrate.
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=120)
        wait_started(server.pid, int(workers))
        results = asyncio.run(run("127.0.0.1", port, token, server.pid, url.rsplit("/", 1)[1]))
        engine = create_engine(url)
        with engine.connect() as conn:
            results["stored_customers"] = conn.execute(text("SELECT count(*) FROM identities")).scalar_one()
            results["outbox_events"] = conn.execute(text("SELECT count(*) FROM outbox")).scalar_one()
        engine.dispose()
        results["env"] = {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "server_workers": int(workers),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip(),
        }
        out = Path("build/bench")
        out.mkdir(parents=True, exist_ok=True)
        (out / "hub.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        return 0
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
        drop_pg_database(url)


if __name__ == "__main__":
    sys.exit(main())
