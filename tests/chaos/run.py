"""One chaos run: start the world, send the changes while the faults fall, wait for quiet, compare, report.

The faults, in the order of a run (times are shares of the planned sending time D = changes / rate):
- from the start: every simulated target answers 5xx to ``error_rate`` of its requests, holds
  ``timeout_rate`` of them until the client gives up, and one refuses the known bad records for good
  (``reject_keys``); every ``burst_every`` seconds one of them answers a burst of 429s with Retry-After;
- every ``kill_every`` seconds a worker process is SIGKILLed: a whole prefork worker (restarted at once) or,
  one time in three, one of its pool children (its parent replaces it);
- at 0.2 D Redis is killed and started again, empty, while it holds queued messages;
- at 0.3 D one target stops listening (connection refused) for ``outage_seconds``;
- at 0.5 D PostgreSQL restarts (``pg_ctl restart -m fast``);
- at 0.7 D every Redis client is cut off with ``CLIENT KILL TYPE normal`` every 100 ms for
  ``redis_cut_seconds`` (the server stays up, connections keep dying).
When the sending is done and the last fault is over, the knobs go back to zero and the run waits until the
ledger is quiet, then compares (``tests.chaos.check``).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from orchestrator.db import identities, outbox
from orchestrator.ledger import outbox_inflight, sync_ledger
from tests.chaos.check import verify
from tests.chaos.workload import Driver, Workload
from tests.chaos.world import APP_TOKEN, SIMULATED, Timings, World

L = sync_ledger.c


@dataclass
class Config:
    """A run's size and faults; the defaults are ``make chaos``'s, ``small()`` is the one in ``make test``."""

    changes: int = 20_000
    rate: float = 50.0  # changes per second the driver sends
    bulk: int = 50  # changes per SCIM Bulk request
    seed: int = 7
    workers: int = 2
    concurrency: int = 2
    kill_every: float = 6.0
    max_kills: int | None = None  # None: keep killing until the sending is done
    outage_target: str = "newsletter"
    outage_seconds: float = 60.0
    redis_cut_seconds: float = 5.0
    error_rate: float = 0.2
    timeout_rate: float = 0.05
    burst_every: float = 10.0
    burst_size: int = 5
    reject_target: str = "crm"
    bad_records: int = 10
    stale_after: float = 10.0
    converge_timeout: float = 900.0

    @classmethod
    def small(cls, **overrides: Any) -> Config:
        values: dict[str, Any] = {
            "changes": 400,
            "rate": 40.0,
            "bulk": 10,
            "kill_every": 3.0,
            "max_kills": 2,
            "outage_seconds": 5.0,
            "redis_cut_seconds": 2.0,
            "burst_every": 2.0,
            "burst_size": 3,
            "bad_records": 2,
            "stale_after": 3.0,
            "converge_timeout": 90.0,
        }
        return cls(**{**values, **overrides})


class Faults:
    """The fault schedule, run by the main thread while the driver sends."""

    def __init__(self, world: World, config: Config, driver: Driver) -> None:
        self.world, self.config, self.driver = world, config, driver
        self.rng = random.Random(config.seed + 1)
        self.counts: dict[str, Any] = {
            "worker_kills": 0,
            "pool_child_kills": 0,
            "redis_restarts": 0,
            "redis_queued_at_restart": 0,
            "redis_cutoffs": 0,
            "redis_connections_killed": 0,
            "postgres_restarts": 0,
            "target_outage": {"target": config.outage_target, "seconds": config.outage_seconds},
            "burst_429": 0,
        }

    def start(self) -> None:
        c = self.config
        for kind in SIMULATED:
            knobs: dict[str, Any] = {"error_rate": c.error_rate, "timeout_rate": c.timeout_rate, "hang_s": 30}
            if kind == c.reject_target:
                knobs["reject_keys"] = self.driver.workload.bad_emails
            self.world.faults(kind, **knobs)

    def stop(self) -> None:
        """Every knob back to zero but ``reject_keys``: those records are wrong, not the target."""
        for kind in SIMULATED:
            self.world.faults(kind, error_rate=0, timeout_rate=0, burst_429=0, outage=False)

    def run(self) -> float:
        """Run the schedule until the sending is done and every fault is over; returns when that was."""
        c = self.config
        began = time.monotonic()
        planned = c.changes / c.rate
        once = [
            (0.2 * planned, self.redis_restart),
            (0.3 * planned, self.outage_begin),
            (0.3 * planned + c.outage_seconds, self.outage_end),
            (0.5 * planned, self.pg_restart),
            (0.7 * planned, self.redis_cut),
        ]
        once.sort(key=lambda e: e[0])
        next_kill = began + min(c.kill_every, 0.15 * planned)
        next_burst = began + c.burst_every
        while once or self.driver.is_alive():
            now = time.monotonic()
            if once and now - began >= once[0][0]:
                once.pop(0)[1]()
                continue
            sending = self.driver.is_alive()
            kills = self.counts["worker_kills"] + self.counts["pool_child_kills"]
            if sending and now >= next_kill and (c.max_kills is None or kills < c.max_kills):
                kind = self.world.kill_worker(child=self.rng.random() < 1 / 3)
                self.counts["worker_kills" if kind == "worker" else "pool_child_kills"] += 1
                next_kill = now + c.kill_every * self.rng.uniform(0.6, 1.4)
            if sending and now >= next_burst:
                kind = self.rng.choice([k for k in SIMULATED if k != c.outage_target])
                self.world.faults(kind, burst_429=c.burst_size, retry_after=1)
                self.counts["burst_429"] += 1
                next_burst = now + c.burst_every
            self.world.watch()
            time.sleep(0.1)
        self.stop()
        return time.monotonic()

    def redis_restart(self) -> None:
        # Wait (briefly) for a moment with queued work, so the restart loses messages for real.
        deadline = time.monotonic() + 5
        queued = self.world.redis.queued()
        while queued == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            queued = self.world.redis.queued()
        self.world.redis.restart()
        self.counts["redis_restarts"] += 1
        self.counts["redis_queued_at_restart"] = queued

    def outage_begin(self) -> None:
        self.world.target_down(self.config.outage_target)

    def outage_end(self) -> None:
        self.world.target_up(self.config.outage_target)

    def pg_restart(self) -> None:
        self.world.pg.restart()
        self.counts["postgres_restarts"] += 1

    def redis_cut(self) -> None:
        self.counts["redis_connections_killed"] += self.world.redis.cut_off(self.config.redis_cut_seconds)
        self.counts["redis_cutoffs"] += 1


def backlog(engine: Engine) -> dict[str, int]:
    """What the pipeline still owes: unpublished and in-flight events, open ledger rows, tombstones."""
    with engine.connect() as conn:
        return {
            "unpublished": conn.scalar(
                select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
            )
            or 0,
            "in_flight": conn.scalar(select(func.count()).select_from(outbox_inflight)) or 0,
            "open_rows": conn.scalar(
                select(func.count())
                .select_from(sync_ledger)
                .where(L.status.not_in(("synced", "out_of_scope", "deprovisioned", "dead")))
            )
            or 0,
            "tombstones": conn.scalar(
                select(func.count()).select_from(identities).where(identities.c.deleted_at.is_not(None))
            )
            or 0,
        }


def wait_quiet(world: World, timeout: float) -> tuple[bool, dict[str, int]]:
    """Poll until nothing is owed (or ``timeout``); hub processes that crash meanwhile are restarted."""
    deadline = time.monotonic() + timeout
    while True:
        world.watch()
        try:
            left = backlog(world.engine)
        except Exception:  # the store may still be reconnecting after its restart
            left = {"store": 1}
        if not any(left.values()):
            return True, left
        if time.monotonic() > deadline:
            return False, left
        time.sleep(0.25)


def ledger_counts(engine: Engine) -> dict[str, dict[str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(select(L.target, L.status, func.count()).group_by(L.target, L.status))
        out: dict[str, dict[str, int]] = {}
        for target, status, count in rows:
            out.setdefault(target, {})[status] = int(count)
    return out


def run(config: Config, *, work: Path | None = None, keep: bool = False) -> dict[str, Any]:
    """Run the chaos scenario of ``config``; returns the report (``report["ok"]`` is the verdict)."""
    work = work or Path(tempfile.mkdtemp(prefix="idhub-chaos-"))
    started = time.monotonic()
    timings = Timings(workers=config.workers, concurrency=config.concurrency, stale_after=config.stale_after)
    world = World(work, timings, config.seed)
    report: dict[str, Any] = {"ok": False, "config": asdict(config)}
    try:
        world.start()
        report["startup_seconds"] = round(time.monotonic() - started, 1)
        workload = Workload(config.seed, uuid.uuid4().hex[:6], config.bad_records)
        driver = Driver(world.base, world.token, workload, config.changes, config.rate, config.bulk)
        faults = Faults(world, config, driver)
        faults.start()
        driver.start()
        last_fault = faults.run()
        driver.join()
        quiet, left = wait_quiet(world, config.converge_timeout)
        converge = round(time.monotonic() - last_fault, 1)
        world.keep_request_logs()
        bad_ids = {p.id for p in workload.people if p.bad and p.id}
        findings = verify(
            world.engine,
            world.targets,
            world.connectors(),
            workload,
            {(config.reject_target, i) for i in bad_ids},
            (world.app.url, APP_TOKEN),
        )
        details = findings.as_dict()
        report.update(
            {
                "changes_sent": driver.count,
                "changes_by_kind": dict(sorted(driver.sent.items())),
                "bulk_requests_resent": driver.resent,
                "send_seconds": round(driver.finished - driver.started, 1),
                "lost": details["lost"]["count"],
                "stale": details["stale"]["count"],
                "duplicate_remote_accounts": details["duplicate_remote_accounts"]["count"],
                "dead_letters": details["dead_letters"],
                "erasures": {
                    "requested": findings.erasures_requested,
                    "confirmed": findings.erasures_confirmed,
                },
                "converged": quiet,
                "seconds_to_converge_after_last_fault": converge if quiet else None,
                "backlog_at_end": left,
                "faults": faults.counts,
                "crashes": [c for c in world.crashes if c["role"] != "worker"],
                "worker_exits_restarted": len([c for c in world.crashes if c["role"] == "worker"]),
                "driver_error": repr(driver.error) if driver.error else None,
                "ledger": ledger_counts(world.engine),
                "details": details,
            }
        )
        # A Celery worker that exits on a broker restart (kombu's Redis transport, not idhub code) is started
        # again as the deployments' restart policy does; an idhub process (api, relay, beat) must not exit.
        report["ok"] = bool(
            quiet
            and findings.ok
            and not [c for c in world.crashes if c["role"] != "worker"]
            and driver.error is None
            and driver.count == config.changes
        )
    finally:
        report["total_seconds"] = round(time.monotonic() - started, 1)
        world.close()
        if keep or not report["ok"]:
            report["work"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return report
