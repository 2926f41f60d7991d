"""The benchmark's world: a private Redis, a fresh PostgreSQL database, the targets, and the hub's processes.

``World`` starts what a scenario asks for and stops all of it on exit, also on Ctrl-C or failure: every
process it starts runs in a session of its own and is terminated, then killed by process group. The hub runs
as it does in production: ``idhub serve``, ``idhub relay``, ``idhub beat`` and Celery workers on the
``workers`` app, with one worker process per queue group. Tuning comes from the environment (``Tuning``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, insert, select, text, update

from benchmarks.hub import wait_idle, wait_started
from benchmarks.targets import crm_limit
from connectors.sandbox import runner
from orchestrator import migrations
from orchestrator.auth import create_token
from orchestrator.db import identities, make_engine, now, outbox
from orchestrator.ledger import DONE, HELD, Status, sync_ledger
from orchestrator.scim.schemas import CUSTOMER_SCHEMA, CustomerUser
from tests.chaos.servers import announcement, descendants, redis_server_argv, wait_redis
from tests.conftest import create_pg_database, drop_pg_database
from tests.hub import SCIM, USER_SCHEMA, free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("app", "shop", "newsletter", "crm")
USER_BULK_SIZE = 500
BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
MARKETING = 'consents[purpose eq "marketing_email" and granted eq true]'
# The SCIM app: the sandbox's SCIM simulator, or with BENCH_APP=scim2-server that independent implementation.
APP_SERVERS = ("sandbox", "scim2-server")
APP_TOKEN = runner.SCIM_TOKEN  # the sandbox's public test token; scim2-server is started with it too
L = sync_ledger.c


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def env_kinds() -> tuple[str, ...]:
    """The targets of the drain, latency, floor and naive scenarios (BENCH_KINDS; all four by default)."""
    given = os.environ.get("BENCH_KINDS")
    kinds = tuple(k.strip() for k in given.split(",") if k.strip()) if given else KINDS
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(
            f"bench: BENCH_KINDS: unknown {', '.join(sorted(unknown))}; known {', '.join(KINDS)}"
        )
    return kinds


def customer(i: int, run: str, prefix: str = "c") -> dict[str, Any]:
    """A customer who consents to marketing e-mail, so every one of the four targets should hold them."""
    email = f"{prefix}{i}-{run}@bench.example"
    return {
        "schemas": [USER_SCHEMA, CUSTOMER_SCHEMA],
        "userName": email,
        "name": {"givenName": f"G{i}", "familyName": f"F{i}"},
        "emails": [{"value": email, "type": "home", "primary": True}],
        "active": True,
        CUSTOMER_SCHEMA: {
            "consents": [{"purpose": "marketing_email", "granted": True, "source": "signup"}],
            "loyalty": {"tier": "bronze", "points": 0},
        },
    }


@dataclass
class Tuning:
    """How the hub is run; every value can be set from the environment (``BENCH_*``)."""

    server_workers: int = 1  # idhub serve --workers
    # Queue groups, one worker process each; "targets" stands for every target queue.
    groups: list[str] = field(default_factory=lambda: ["fanout,admin", "targets"])
    # Processes per worker: one more than the cores, to keep them busy while one waits on PostgreSQL or a
    # target (50,000-change drains, alternated: 1,856 and 1,860 changes/s at 3, 1,810 and 1,837 at 2).
    concurrency: int = 3
    pool: str = "prefork"
    # Records per delivery: the ledger statements of one delivery serve this many (calls are split by each
    # target's own batch limit; a multiple of the shop's, the CRM's and the app's 100 sends no call part-full,
    # which matters most to the CRM, whose rate limit counts calls). The relay's batch of 500 events becomes
    # one delivery per target: 300 split it into 300 and 200, and the second was topped up with rows that the
    # next fan-out had enqueued. 50,000-change drains, alternated: 1,994, 1,824 and 1,959 changes/s at 500,
    # 1,689 and 1,676 at 300, 1,552 at 1,000 (whose deliveries look for rows to top up with, at PostgreSQL's
    # cost: 27 s of its CPU against 18).
    batch_size: int = 500
    sweep_interval: float = 5.0
    # Deliveries one target may have in flight at once (its ``concurrency``); 0: one per worker process
    # that serves the target queues, so no delivery waits for a slot another process of ours holds.
    target_concurrency: int = 0
    app: str = "sandbox"  # what serves the SCIM app target (APP_SERVERS)

    @classmethod
    def from_env(cls) -> Tuning:
        groups = os.environ.get("BENCH_WORKER_GROUPS")
        return cls(
            server_workers=env_int("BENCH_SERVER_WORKERS", 2),
            groups=[g.strip() for g in groups.split(";") if g.strip()] if groups else cls().groups,
            concurrency=env_int("BENCH_WORKER_CONCURRENCY", cls.concurrency),
            pool=os.environ.get("BENCH_WORKER_POOL") or "prefork",
            batch_size=env_int("BENCH_BATCH_SIZE", cls.batch_size),
            sweep_interval=env_float("BENCH_SWEEP_INTERVAL", 5.0),
            target_concurrency=env_int("BENCH_TARGET_CONCURRENCY", 0),
            app=app_server(),
        )

    def describe(self) -> dict[str, Any]:
        """The tuning a result was measured with (the resolved per-target concurrency included)."""
        return {
            **dataclasses.asdict(self),
            "target_concurrency": self.slots,
            "app_update": os.environ.get("BENCH_APP_UPDATE_METHOD") or "connector default",
        }

    @property
    def slots(self) -> int:
        """Each target's ``concurrency`` in the targets file."""
        serving = sum("targets" in g.split(",") or "target." in g for g in self.groups)
        return self.target_concurrency or max(1, serving * self.concurrency)


def app_server() -> str:
    """BENCH_APP: what serves the SCIM app target, the sandbox's simulator (default) or scim2-server."""
    given = os.environ.get("BENCH_APP") or "sandbox"
    if given not in APP_SERVERS:
        raise SystemExit(f"bench: BENCH_APP: unknown {given!r}; known {', '.join(APP_SERVERS)}")
    return given


def app_options() -> str:
    """The SCIM app's connector options: BENCH_APP_UPDATE_METHOD=put updates by PUT, which costs the app
    about a third of a PATCH that replaces every mapped attribute; unset, the connector decides (PATCH)."""
    method = os.environ.get("BENCH_APP_UPDATE_METHOD")
    return f"\n    options: {{update_method: {method}}}" if method else ""


def targets_yaml(urls: dict[str, str], batch_size: int, concurrency: int = 1) -> str:
    """The targets file: the SCIM app, the shop, the newsletter (scoped by consent) and the CRM."""
    blocks = {
        "app": f"connector: scim\n    url: {urls.get('app')}\n    token_env: BENCH_APP_TOKEN{app_options()}",
        "shop": f"connector: shop\n    url: {urls.get('shop')}\n    token_env: BENCH_SHOP_TOKEN",
        "newsletter": (
            f"connector: newsletter\n    url: {urls.get('newsletter')}\n    token_env: BENCH_NEWSLETTER_TOKEN"
            f"\n    options: {{list_id: sandbox01}}\n    scope: '{MARKETING}'"
        ),
        # The simulator answers 429 past crm_limit() requests in a rolling 10 s, like HubSpot; a few fewer
        # here, as requests reach it a little after they are counted.
        "crm": (
            f"connector: crm\n    url: {urls.get('crm')}\n    token_env: BENCH_CRM_TOKEN"
            f"\n    rate_limit: {crm_limit() * 24 // 25}/10s"
        ),
    }
    out = "targets:\n"
    for kind in urls:
        out += f"  - name: {kind}\n    {blocks[kind]}\n    batch_size: {batch_size}\n"
        out += f"    concurrency: {concurrency}\n"
    return out


# ------------------------------------------------------------------------------------------- processes


def _vm_kb(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Monitor:
    """Samples, for each started process and its children: peak RSS (VmHWM) and CPU seconds."""

    # VmHWM is the kernel's own peak, so a sample a second misses no peak of a process that lives on; the
    # harness shares the machine it measures: four samples a second through psutil cost it a tenth of a core.
    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.roles: dict[str, int] = {}  # role -> root pid
        self.peak_kb: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.role_of: dict[int, str] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self.thread.start()

    def watch(self, role: str, pid: int) -> None:
        with self.lock:
            self.roles[role] = pid

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        with self.lock:
            roles = dict(self.roles)
        for role, root in roles.items():
            for pid in [root, *descendants(root)]:
                hwm = _vm_kb(pid, "VmHWM")
                cpu = _cpu_seconds(pid)
                with self.lock:
                    self.role_of[pid] = role
                    if hwm:
                        self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), hwm)
                    if cpu >= 0:
                        self.cpu[pid] = cpu

    def clear_peaks(self) -> None:
        """Start a new peak-RSS window: the kernel's high-water marks are reset (clear_refs 5)."""
        self.sample()
        with self.lock:
            for pid in list(self.peak_kb):
                with contextlib.suppress(OSError):
                    Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.peak_kb.clear()
            for pid in [p for p in self.role_of if not Path(f"/proc/{p}").exists()]:
                del self.role_of[pid]  # gone before this window: not part of it

    def report(self, cpu_since: dict[int, float] | None = None) -> dict[str, dict[str, float]]:
        """Per role: the largest peak RSS of one of its processes (MB), its process count, CPU seconds."""
        self.sample()
        out: dict[str, dict[str, float]] = {}
        with self.lock:
            for pid, role in self.role_of.items():
                entry = out.setdefault(role, {"peak_rss_mb": 0.0, "processes": 0, "cpu_s": 0.0})
                entry["processes"] += 1
                entry["peak_rss_mb"] = max(entry["peak_rss_mb"], round(self.peak_kb.get(pid, 0) / 1024, 1))
                spent = self.cpu.get(pid, 0.0) - (cpu_since or {}).get(pid, 0.0)
                entry["cpu_s"] = round(entry["cpu_s"] + max(0.0, spent), 2)
        return out

    def cpu_mark(self) -> dict[int, float]:
        self.sample()
        with self.lock:
            return dict(self.cpu)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def stop_process(process: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """SIGTERM, wait, then SIGKILL the process's whole group (it was started in a session of its own)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # pool children left behind, if any
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


# ---------------------------------------------------------------------------------------------- world


class World:
    """Services, targets and hub processes for one scenario; a context manager that stops everything."""

    def __init__(self, work: Path, kinds: Sequence[str] = KINDS, tuning: Tuning | None = None) -> None:
        self.work = work
        self.kinds = tuple(kinds)
        self.tuning = tuning or Tuning.from_env()
        self.stack = ExitStack()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.monitor = Monitor()
        self.metrics_ports: list[int] = []
        self.sim_roots: dict[str, str] = {}
        self.urls: dict[str, str] = {}
        self.run = uuid.uuid4().hex[:6]
        self.loaded = 0

    # -- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> World:
        try:
            self._start()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stack.close()

    def _start(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.stack.callback(self.monitor.close)
        self.stack.callback(self._stop_all)
        self.redis_url = self._redis()
        self.db_url = create_pg_database("idhub_bench")
        self.stack.callback(drop_pg_database, self.db_url)
        # The harness's own reads (its counts of the ledger) without parallel workers: a parallel count ran
        # three processes of PostgreSQL at once on the two cores the hub was being measured on.
        quiet = {"options": "-c max_parallel_workers_per_gather=0"}
        self.engine = make_engine(self.db_url, connect_args=quiet)
        self.stack.callback(self.engine.dispose)
        migrations.upgrade(self.engine)
        self.token = create_token(self.engine, f"bench-{self.run}", ["admin"])
        for kind in self.kinds:
            if kind == "app" and self.tuning.app == "scim2-server":
                self._start_app()
            else:
                self._start_sim(kind)
        self.targets_file = self.work / "targets.yaml"
        self.targets_file.write_text(targets_yaml(self.urls, self.tuning.batch_size, self.tuning.slots))
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "IDHUB_DATABASE_URL": self.db_url,
            "IDHUB_BROKER_URL": f"{self.redis_url}/0",
            "IDHUB_TARGETS_FILE": str(self.targets_file),
            "IDHUB_LOG_FORMAT": "json",
            "IDHUB_LOG_LEVEL": "WARNING",
            "IDHUB_BULK_MAX_OPERATIONS": "1000",
            "IDHUB_SWEEP_INTERVAL": str(self.tuning.sweep_interval),
            "BENCH_APP_TOKEN": APP_TOKEN,
            "BENCH_SHOP_TOKEN": f"{runner.SHOP_KEY}:{runner.SHOP_SECRET}",
            "BENCH_NEWSLETTER_TOKEN": runner.NEWSLETTER_KEY,
            "BENCH_CRM_TOKEN": runner.CRM_TOKEN,
        }

    def _redis(self) -> str:
        """A private redis-server on a free port (shared Redis only when BENCH_REDIS_URL says so)."""
        given = os.environ.get("BENCH_REDIS_URL")
        if given:
            return given.rstrip("/")
        port = free_port()
        self.spawn("redis", redis_server_argv(port))
        wait_redis(port)
        return f"redis://127.0.0.1:{port}"

    def _start_sim(self, kind: str) -> None:
        process = self.spawn(
            f"target:{kind}",
            [sys.executable, "-m", "benchmarks.targets", "scim" if kind == "app" else kind],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
        )
        info = announcement(process, f"the {kind} simulator", self.work / f"target:{kind}.log")
        self.urls[kind], self.sim_roots[kind] = info["url"], info["root"]

    def _start_app(self, port: int = 0) -> None:
        from connectors.sandbox.scim_app import ScimApp

        extension = CustomerUser.to_schema().model_dump(mode="json", exclude_none=True)
        self.app = ScimApp(self.work / "app", APP_TOKEN, [extension], port=port).start()
        assert self.app.process is not None
        self.monitor.watch("target:app", self.app.process.pid)
        self.urls["app"] = self.app.url
        if port == 0:
            self.stack.callback(lambda: self.app.stop())

    def reset_targets(self) -> None:
        """Empty every target: the simulators reset, scim2-server restarted on its port."""
        for root in self.sim_roots.values():
            httpx.post(f"{root}/_bench/reset", timeout=30).raise_for_status()
        if "app" in self.kinds and self.tuning.app == "scim2-server":
            self.app.stop()
            self._start_app(self.app.port)

    def spawn(
        self, role: str, argv: Sequence[str], *, env: dict[str, str] | None = None, stdout: Any = None
    ) -> subprocess.Popen[bytes]:
        """Start a process in a session of its own, its output in ``<work>/<role>.log``; watched for RSS."""
        with open(self.work / f"{role}.log", "ab") as log:
            process = subprocess.Popen(
                list(argv),
                env=env if env is not None else getattr(self, "env", None),
                cwd=self.work,
                stdout=stdout if stdout is not None else log,
                stderr=log,
                start_new_session=True,
            )
        self.procs[role] = process
        self.monitor.watch(role, process.pid)
        return process

    def stop(self, *roles: str) -> None:
        for role in roles:
            process = self.procs.pop(role, None)
            if process is not None:
                stop_process(process)

    def _stop_all(self) -> None:
        # Hub processes first (they talk to the others), Redis last.
        for role in sorted(self.procs, key=lambda r: (r == "redis", r.startswith("target:"))):
            self.stop(role)

    # -- the hub -----------------------------------------------------------------------------------------

    def idhub(self, role: str, *argv: str) -> subprocess.Popen[bytes]:
        return self.spawn(role, [sys.executable, "-m", "orchestrator.cli", *argv])

    def start_api(self) -> str:
        port = free_port()
        api = self.idhub("api", "serve", "--port", str(port), "--workers", str(self.tuning.server_workers))
        self.base = f"http://127.0.0.1:{port}"
        wait_http(f"{self.base}/readyz", timeout=60)
        wait_started(api.pid, self.tuning.server_workers)
        return self.base

    def queues(self, group: str) -> str:
        return ",".join(
            ",".join(f"target.{k}" for k in self.kinds) if q == "targets" else q for q in group.split(",")
        )

    def start_workers(self, app: str = "workers", prefix: str = "worker", groups: Sequence[str] = ()) -> None:
        """One Celery worker process per queue group; returns when every one answers a ping."""
        names = []
        for i, group in enumerate(groups or self.tuning.groups):
            name = f"{prefix}{i}-{self.run}@bench"
            metrics_port = free_port()
            prom = self.work / f"prom-{prefix}{i}"
            prom.mkdir(exist_ok=True)
            env = {**self.env, "IDHUB_METRICS_PORT": str(metrics_port), "PROMETHEUS_MULTIPROC_DIR": str(prom)}
            argv = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", self.tuning.pool]
            argv += [
                "-c",
                str(self.tuning.concurrency),
                "-Q",
                self.queues(group),
                "-n",
                name,
                "-l",
                "WARNING",
            ]
            self.spawn(f"{prefix}{i}", argv, env=env)
            if app == "workers":
                self.metrics_ports.append(metrics_port)
            names.append(name)
        self.wait_workers(
            names, broker=self.env["IDHUB_BROKER_URL"] if app == "workers" else self.naive_broker
        )

    @property
    def naive_broker(self) -> str:
        return f"{self.redis_url}/1"

    def wait_workers(self, names: Sequence[str], broker: str, timeout: float = 90) -> None:
        from celery import Celery

        probe = Celery("bench-probe", broker=broker)
        deadline = time.monotonic() + timeout
        try:
            while True:
                replies = probe.control.ping(timeout=1.0) or []
                answered = {name for reply in replies for name in reply}
                if set(names) <= answered:
                    return
                dead = [r for r, p in self.procs.items() if r.startswith(("worker", "naive")) and p.poll()]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"workers did not start ({dead or names}); see the logs in {self.work}"
                    )
        finally:
            probe.close()

    def start_pipeline(self, *, relay: bool = True) -> None:
        """Workers (ready), beat, and the relay unless told not to."""
        self.start_workers()
        schedule = str(self.work / "beat-schedule")
        beat = self.idhub("beat", "beat", "--loglevel", "WARNING", "--schedule", schedule)
        # Beat imports the task modules, seconds of CPU, before its first tick: not inside a phase.
        wait_idle(beat.pid)
        if relay:
            self.start_relay()

    def start_relay(self) -> None:
        self.idhub("relay", "relay")

    # -- loading and observing ---------------------------------------------------------------------------

    def load(self, count: int, *, prefix: str = "c", batch: int = 500, concurrency: int = 4) -> float:
        """Create ``count`` more customers through SCIM Bulk; returns the seconds it took."""
        start_index = self.loaded
        started = time.perf_counter()
        asyncio.run(
            _bulk_load(self.base, self.token, start_index, count, self.run, prefix, batch, concurrency)
        )
        self.loaded += count
        return time.perf_counter() - started

    def done_counts(self, totals: dict[str, int] | None = None) -> dict[str, int]:
        """Per target: ledger rows that hold their desired version (synced, out of scope, deprovisioned).

        Counted as a target's rows less those still owed, which the due index finds among few: a status is
        done only while synced holds the desired version, as a newer one sets the row pending again.
        ``totals`` carries rows counted before: the benchmark deletes none, so a target whose total reached
        what a scenario waits for is not counted in full again (every second, that count of a ledger of
        200,000 rows cost PostgreSQL 28 s of CPU over a full run, and more the longer the ledger)."""
        totals = {} if totals is None else totals
        owed = [s.value for s in Status if s not in DONE] + [HELD]
        pending = select(L.target, func.count()).where(L.status.in_(owed)).group_by(L.target)
        with self.engine.connect() as conn:
            left = {t: int(n) for t, n in conn.execute(pending)}
            if recount := [t for t in self.kinds if t not in totals]:
                everything = select(L.target, func.count()).where(L.target.in_(recount)).group_by(L.target)
                totals.update({t: int(n) for t, n in conn.execute(everything)})
        return {t: n - left.get(t, 0) for t, n in totals.items()}

    def wait_done(
        self,
        expected: dict[str, int],
        *,
        timeout: float,
        interval: float = 0.25,
        longest: float = 2.0,
        on_sample: Callable[[float, dict[str, int]], None] | None = None,
        also: Callable[[], bool] = lambda: True,
    ) -> dict[str, float]:
        """Poll the ledger until every target has its expected rows done; returns when each got there.

        A count reads every row still owed (80 ms of PostgreSQL's CPU with 200,000 owed, a fifth of what
        PostgreSQL spent in a drain when counted every second). So the pause after a count is an eighth of the
        time the rows still owed should take at the rate seen since the last one, between ``interval`` and
        ``longest``: counts are rare while many rows are owed, and come every ``interval`` near the end."""
        started = time.perf_counter()
        finished: dict[str, float] = {}
        totals: dict[str, int] = {}
        last: tuple[float, int] | None = None
        pause = interval
        while True:
            ready = also()  # before the counts: what it waits for must precede what they show
            counts = self.done_counts(totals)
            # A total short of what is awaited may still grow (fan-out adding rows): counted again next time.
            for target, n in list(totals.items()):
                if n < expected.get(target, 0):
                    del totals[target]
            elapsed = time.perf_counter() - started
            if on_sample is not None:
                on_sample(elapsed, counts)
            for target, want in expected.items():
                if ready and target not in finished and counts.get(target, 0) >= want:
                    finished[target] = elapsed
            if len(finished) == len(expected):
                return finished
            if elapsed > timeout:
                raise RuntimeError(f"not synced after {timeout:.0f}s: {counts} of {expected}")
            done = sum(min(want, counts.get(t, 0)) for t, want in expected.items())
            if last is not None and done > last[1]:
                owed = sum(expected.values()) - done
                pause = min(longest, max(interval, owed * (elapsed - last[0]) / (done - last[1]) / 8))
                last = (elapsed, done)
            elif last is not None and done < last[1]:
                # Rows done went back to owed (a resync marking them): the work has just begun, count again
                # soon. Doubling the pause here had a 10,000-customer resync seen done only at its next count,
                # 2 s later, which overstated its time by half and understated the 100k/10k ratio.
                pause, last = interval, (elapsed, done)
            else:  # no rate to go by yet, or none since the last count: twice the last pause
                pause = interval if last is None else min(longest, 2 * pause)
                last = last or (elapsed, done)
            time.sleep(pause)

    def target_calls(self) -> dict[str, float]:
        """``idhub_target_calls`` summed over the workers' metrics endpoints, by target."""
        return {
            k.removeprefix('target="').removesuffix('"'): v
            for k, v in self.counter("idhub_target_calls").items()
        }

    def counter(self, name: str) -> dict[str, float]:
        """A counter summed over the workers' metrics endpoints, by its labels as printed."""
        out: dict[str, float] = {}
        pattern = re.compile(rf"^{name}_total\{{([^}}]*)\}} ([0-9.e+]+)$", re.M)
        for port in self.metrics_ports:
            with contextlib.suppress(httpx.HTTPError):
                body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                for labels, value in pattern.findall(body):
                    out[labels] = out.get(labels, 0.0) + float(value)
        return out

    def sim_stats(self) -> dict[str, dict[str, int]]:
        return {k: httpx.get(f"{r}/_bench/stats", timeout=30).json() for k, r in self.sim_roots.items()}

    def record(self, on: bool) -> None:
        for root in self.sim_roots.values():
            httpx.post(f"{root}/_bench/record", json={"on": on}, timeout=10).raise_for_status()

    def applied(self) -> dict[str, dict[str, list[float]]]:
        return {k: httpx.get(f"{r}/_bench/applied", timeout=60).json() for k, r in self.sim_roots.items()}

    def held(self) -> dict[str, int]:
        """How many accounts each target holds (the simulators' state, the SCIM app's totalResults)."""
        out: dict[str, int] = {}
        for kind, root in self.sim_roots.items():
            if kind == "app":
                continue
            state = httpx.get(f"{root}/_sandbox/state", timeout=120).json()
            out[kind] = sum(len(v) for v in state.values()) if isinstance(state, dict) else len(state)
        if "app" in self.kinds:
            r = httpx.get(
                f"{self.urls['app']}/Users",
                params={"count": 0},
                headers={"Authorization": f"Bearer {APP_TOKEN}"},
                timeout=120,
            )
            out["app"] = int(r.json()["totalResults"])
        return out

    def seed_app(self) -> int:
        """Make the SCIM app and the ledger hold every identity not yet seeded, as a finished sync would, and
        mark the outbox published: a benchmark shortcut past the first provisioning (see resync)."""
        seeded = 0
        headers = {"Authorization": f"Bearer {APP_TOKEN}", "Content-Type": SCIM}
        with httpx.Client(base_url=self.urls["app"], headers=headers, timeout=300) as client:
            while True:
                with self.engine.connect() as conn:
                    known = select(L.identity_id).where(L.target == "app")
                    page = list(
                        conn.execute(
                            select(identities.c.id, identities.c.version, identities.c.user_name)
                            .where(identities.c.id.not_in(known))
                            .limit(USER_BULK_SIZE)
                        )
                    )
                if not page:
                    return seeded
                ops = [
                    {
                        "method": "POST",
                        "path": "/Users",
                        "bulkId": r.id,
                        "data": {"schemas": [USER_SCHEMA], "userName": r.user_name, "externalId": r.id},
                    }
                    for r in page
                ]
                answer = client.post("/Bulk", json={"schemas": [BULK], "Operations": ops})
                answer.raise_for_status()
                remote = {
                    op["bulkId"]: op["location"].rstrip("/").rsplit("/", 1)[-1]
                    for op in answer.json()["Operations"]
                    if op.get("status") == "201"
                }
                if len(remote) != len(page):
                    raise RuntimeError(f"seeding the app: {len(page) - len(remote)} creates failed")
                stamp = now()
                rows = [
                    {
                        "target": "app",
                        "identity_id": r.id,
                        "resource_type": "User",
                        "remote_id": remote[r.id],
                        "desired_version": r.version,
                        "desired_action": "upsert",
                        "synced_version": r.version,
                        "synced_action": "upsert",
                        "status": Status.SYNCED.value,
                        "attempts": 0,
                        "priority": 0,
                        "created_at": stamp,
                        "updated_at": stamp,
                    }
                    for r in page
                ]
                with self.engine.begin() as conn:
                    conn.execute(insert(sync_ledger), rows)
                    conn.execute(
                        update(outbox).where(outbox.c.published_at.is_(None)).values(published_at=stamp)
                    )
                seeded += len(page)

    def pg_size_mb(self) -> float:
        with self.engine.connect() as conn:
            size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
        return round(int(size) / 1e6, 1)

    def idhub_roles(self, report: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return {r: v for r, v in report.items() if not r.startswith(("target:", "redis", "naive", "harness"))}


async def _bulk_load(
    base: str, token: str, start: int, count: int, run: str, prefix: str, batch: int, concurrency: int
) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": SCIM}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=f"{base}/scim/v2", headers=headers, limits=limits, timeout=300
    ) as c:
        batches = iter(range(start, start + count, batch))

        async def worker() -> None:
            for first in batches:
                ops = [
                    {"method": "POST", "path": "/Users", "bulkId": f"b{j}", "data": customer(j, run, prefix)}
                    for j in range(first, min(first + batch, start + count))
                ]
                r = await c.post("/Bulk", json={"schemas": [BULK], "Operations": ops})
                r.raise_for_status()
                failed = [op for op in r.json()["Operations"] if op["status"] != "201"]
                if failed:
                    raise RuntimeError(
                        f"bulk load: {len(failed)} operations failed, e.g. {failed[0]['status']}"
                    )

        await asyncio.gather(*(worker() for _ in range(concurrency)))


@contextlib.contextmanager
def phase(monitor: Monitor) -> Iterator[dict[str, Any]]:
    """Measure one phase: wall time and, per role, CPU seconds spent and peak RSS (peaks reset at start)."""
    monitor.clear_peaks()
    mark = monitor.cpu_mark()
    busy0 = _cpu_busy()
    pg0 = _postgres_cpu()
    out: dict[str, Any] = {}
    started, harness = time.perf_counter(), time.process_time()
    yield out
    out.setdefault("seconds", round(time.perf_counter() - started, 3))
    out["processes"] = monitor.report(mark)
    # The benchmark's own process: load generator, polling and this monitor, on the same two cores.
    out["processes"]["harness"] = {"cpu_s": round(time.process_time() - harness, 2), "processes": 1}
    pg1 = _postgres_cpu()
    # The database server is not ours to watch for RSS, but its CPU is part of what every change costs.
    out["processes"]["postgres"] = {
        "cpu_s": round(sum(cpu - pg0.get(pid, 0.0) for pid, cpu in pg1.items()), 2),
        "processes": len(pg1),
    }
    busy1 = _cpu_busy()
    if busy0 and busy1:
        total = busy1[1] - busy0[1]
        out["machine_cpu_busy"] = round((busy1[0] - busy0[0]) / total, 3) if total else None


def _postgres_cpu() -> dict[int, float]:
    """CPU seconds of every PostgreSQL server process on this machine, by pid (a backend that exits within a
    phase is missed: the pools keep theirs open)."""
    out: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
        except OSError:
            continue
        cpu = _cpu_seconds(int(entry.name))
        if cpu >= 0:
            out[int(entry.name)] = cpu
    return out


def _cpu_busy() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    try:
        values = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)
