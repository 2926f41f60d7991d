"""The chaos run's world: a private PostgreSQL and Redis, four targets, and the hub's real processes.

The hub runs as in production (``idhub serve``, ``idhub relay``, ``idhub beat`` and Celery prefork workers on
every queue), with short timings from the environment so that a run takes minutes, not hours. The targets are
the scim2-server app and the shop, newsletter and CRM simulators, each simulator in a process of its own
(``tests.chaos.target``) so it can be taken down (connection refused) and brought back with its accounts.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from connectors.base import Connector
from connectors.registry import build
from connectors.sandbox import runner
from orchestrator import migrations
from orchestrator.auth import create_token
from orchestrator.db import make_engine
from orchestrator.scim.schemas import CustomerUser
from orchestrator.targets import TargetConfig, connector_settings, load_targets
from tests.chaos.servers import Postgres, Procs, Redis, announcement, descendants
from tests.hub import free_port, wait_http

ROOT = Path(__file__).resolve().parents[2]
SIMULATED = ("shop", "newsletter", "crm")
KINDS = ("app", *SIMULATED)
APP_TOKEN = "chaos-app-token"  # the local scim2-server's throwaway token
MARKETING = 'consents[purpose eq "marketing_email" and granted eq true]'
HUB_ROLES = ("api", "relay", "beat")


@dataclass(frozen=True)
class Timings:
    """The pipeline's short settings for a chaos run."""

    workers: int = 2
    concurrency: int = 2
    batch_size: int = 50
    stale_after: float = 3.0  # IDHUB_STALE_AFTER_SECONDS: a lost message is re-enqueued this soon
    lease: float = 15.0  # IDHUB_LEASE_SECONDS: outlasts a batch call with its per-record fallbacks
    call_timeout: str = "2s"  # a hung target call gives up after this
    retry_cap: str = "2s"


TARGETS = """targets:
  - name: app
    connector: scim
    url: {app}
    token_env: CHAOS_APP_TOKEN
    groups: true
    on_deactivate: deactivate
    on_delete: delete
{common}
  - name: shop
    connector: shop
    url: {shop}
    token_env: CHAOS_SHOP_TOKEN
    on_deactivate: deactivate
    on_delete: erase
{common}
  - name: newsletter
    connector: newsletter
    url: {newsletter}
    token_env: CHAOS_NEWSLETTER_TOKEN
    options: {{list_id: {list_id}}}
    scope: '{scope}'
    priority_paths: [consents]
    on_leave_scope: deactivate
    on_deactivate: deactivate
    on_delete: erase
{common}
  - name: crm
    connector: crm
    url: {crm}
    token_env: CHAOS_CRM_TOKEN
    on_deactivate: deactivate
    on_delete: erase
{common}
"""


def targets_yaml(urls: dict[str, str], t: Timings) -> str:
    """The four targets. ``max_attempts`` and ``max_age`` are far above anything an outage in the run lasts,
    so only a record the target refuses for good may become a dead letter."""
    common = (
        f"    batch_size: {t.batch_size}\n    timeout: {t.call_timeout}\n"
        f"    retry: {{max_attempts: 100000, max_age: 1d, base: 200ms, cap: {t.retry_cap}}}\n"
        "    quarantine: {threshold: 10, probe_base: 500ms, probe_cap: 2s}"
    )
    return TARGETS.format(common=common, list_id=runner.NEWSLETTER_LIST, scope=MARKETING, **urls)


TOKENS = {
    "CHAOS_APP_TOKEN": APP_TOKEN,
    "CHAOS_SHOP_TOKEN": f"{runner.SHOP_KEY}:{runner.SHOP_SECRET}",
    "CHAOS_NEWSLETTER_TOKEN": runner.NEWSLETTER_KEY,
    "CHAOS_CRM_TOKEN": runner.CRM_TOKEN,
}


class World:
    """Everything a chaos run talks to; ``close`` (also at exit) stops all of it."""

    def __init__(self, work: Path, timings: Timings, seed: int) -> None:
        self.work = work
        self.timings = timings
        self.rng = random.Random(seed)
        self.seed = seed
        self.procs = Procs(work)
        self.roots: dict[str, str] = {}
        self.urls: dict[str, str] = {}
        self.worker_generation = 0
        self.expected_exit: set[int] = set()  # pids we killed on purpose
        self.crashes: list[dict[str, Any]] = []

    # -- start and stop -----------------------------------------------------------------------------------

    def start(self) -> World:
        os.chmod(self.work, 0o755)  # the postgres user walks through it to its own folder
        (self.work / "pg").mkdir()
        self.pg = Postgres(self.procs, self.work / "pg").start()
        self.redis = Redis(self.procs).start()
        self.engine = make_engine(self.pg.url, pool_size=4, max_overflow=4)
        migrations.upgrade(self.engine)
        self.token = create_token(self.engine, "chaos", ["admin"])
        for kind in SIMULATED:
            self._start_simulator(kind)
        self._start_app()
        self.targets_file = self.work / "targets.yaml"
        self.targets_file.write_text(targets_yaml(self.urls, self.timings))
        os.environ.update(TOKENS)
        self.targets: list[TargetConfig] = load_targets(self.targets_file)
        t = self.timings
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "IDHUB_DATABASE_URL": self.pg.url,
            "IDHUB_BROKER_URL": f"{self.redis.url}/0",
            "IDHUB_TARGETS_FILE": str(self.targets_file),
            "IDHUB_LOG_FORMAT": "json",
            "IDHUB_LOG_LEVEL": "WARNING",
            "IDHUB_SWEEP_INTERVAL": "1",
            "IDHUB_STALE_AFTER_SECONDS": str(t.stale_after),
            "IDHUB_LEASE_SECONDS": str(t.lease),
            # The run deprovisions far more than a real day would: the guard is not what it tests.
            "IDHUB_GUARD_MAX_COUNT": str(10**9),
            "IDHUB_GUARD_MAX_SHARE": "1",
        }
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self._hub("api", "serve", "--port", str(port))
        self._hub("relay", "relay")
        self._hub("beat", "beat", "--loglevel", "WARNING", "--schedule", str(self.work / "beat-schedule"))
        for i in range(t.workers):
            self._start_worker(i)
        wait_http(f"{self.base}/readyz", timeout=60)
        return self

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.dispose()
        self.procs.stop_all()

    def _start_simulator(self, kind: str) -> None:
        argv = [sys.executable, "-m", "tests.chaos.target", kind, str(self.seed)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        process = self.procs.spawn(f"target:{kind}", argv, env, stdout=subprocess.PIPE)
        info = announcement(process, f"the {kind} simulator", self.work / f"target:{kind}.log")
        self.urls[kind], self.roots[kind] = info["url"], info["root"]

    def _start_app(self) -> None:
        from connectors.sandbox.scim_app import ScimApp

        extension = CustomerUser.to_schema().model_dump(mode="json", exclude_none=True)
        self.app = ScimApp(self.work / "app", APP_TOKEN, [extension]).start()
        self.procs.on_exit("app", self.app.stop)
        self.urls["app"] = self.app.url

    def _hub(self, role: str, *argv: str) -> None:
        self.procs.spawn(role, [sys.executable, "-m", "orchestrator.cli", *argv], self.env)

    def _start_worker(self, index: int) -> None:
        self.worker_generation += 1
        t = self.timings
        queues = ",".join(["fanout", "admin", *(cfg.queue for cfg in self.targets)])
        argv = [sys.executable, "-m", "celery", "-A", "workers", "worker", "-P", "prefork"]
        argv += ["-c", str(t.concurrency), "-Q", queues, "-l", "WARNING"]
        argv += ["-n", f"chaos{index}-{self.worker_generation}@%h", "--without-gossip", "--without-mingle"]
        self.procs.spawn(f"worker#{index}", argv, self.env)

    # -- faults -------------------------------------------------------------------------------------------

    def kill_worker(self, child: bool) -> str:
        """SIGKILL one worker: a prefork child (its parent replaces it) or a whole worker, which the harness
        starts again at once (as a supervisor would). Returns what was killed."""
        roles = sorted(r for r in self.procs.running if r.startswith("worker#"))
        role = self.rng.choice(roles)
        process = self.procs.running[role]
        kids = descendants(process.pid)
        if child and kids:
            pid = self.rng.choice(sorted(kids))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return "child"
        self.expected_exit.add(process.pid)
        self.procs.stop(role, sig=signal.SIGKILL)
        self._start_worker(int(role.split("#")[1]))
        return "worker"

    def faults(self, kind: str, **knobs: Any) -> None:
        httpx.post(f"{self.roots[kind]}/_sandbox/faults", json=knobs, timeout=10).raise_for_status()

    def target_down(self, kind: str) -> None:
        self.procs.running[f"target:{kind}"].send_signal(signal.SIGUSR1)

    def target_up(self, kind: str) -> None:
        self.procs.running[f"target:{kind}"].send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"{self.roots[kind]}/_sandbox/faults", timeout=1)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def watch(self) -> None:
        """Note and restart any hub process that died without being killed by the run (a crash)."""
        for role, process in list(self.procs.running.items()):
            if not role.startswith(("worker#", *HUB_ROLES)) or process.poll() is None:
                continue
            if process.pid in self.expected_exit:
                continue
            self.crashes.append({"role": role.split("#")[0], "returncode": process.returncode})
            self.procs.running.pop(role)
            if role.startswith("worker#"):
                self._start_worker(int(role.split("#")[1]))
            else:
                argv = {
                    "api": ("serve", "--port", self.base.rsplit(":", 1)[1]),
                    "relay": ("relay",),
                    "beat": ("beat", "--loglevel", "WARNING", "--schedule", str(self.work / "beat-schedule")),
                }[role]
                self._hub(role, *argv)

    # -- reading the targets ------------------------------------------------------------------------------

    def keep_request_logs(self) -> None:
        """Each simulator's request log (method, path, status, time) into the work folder (post-mortems)."""
        for kind, root in self.roots.items():
            log = httpx.get(f"{root}/_sandbox/requests", timeout=120).text
            (self.work / f"requests-{kind}.json").write_text(log)

    def connectors(self) -> dict[str, Connector]:
        """One connector per target, as the workers build them (the verification reads through these)."""
        out = {}
        for cfg in self.targets:
            out[cfg.name] = build(cfg.connector, replace(connector_settings(cfg), timeout=60.0))
        return out
