"""Admin work through the real machinery: an ``idhub.admin.*`` task on a Celery worker over Redis, and the
``idhub`` command enqueueing deliveries for the workers; both reach the sandbox targets."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import Engine, select

from orchestrator.admin import audit_log
from tests.admin.conftest import put_customer, row, shop_customers, targets_yaml
from tests.pipeline.conftest import ROOT, Workers, wait_for
from tests.services import REDIS_URL
from workers.app import make_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker_url() -> Iterator[str]:
    number = 1 + (os.getpid() + 7) % 15
    url = f"{REDIS_URL}/{number}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def worker(
    store: tuple[str, Engine], broker_url: str, sandboxes, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    tmp = tmp_path_factory.mktemp("admin-workers")
    targets_file = tmp / "targets.yaml"
    targets_file.write_text(targets_yaml(sandboxes))
    pool = Workers(store[0], broker_url, targets_file, str(ROOT), tmp)
    pool.start("admin,target.shop,target.news")
    yield pool
    pool.stop_all()


def test_an_admin_task_runs_on_a_worker(clean: Engine, worker: Workers, broker_url: str, sandboxes) -> None:
    ids = [put_customer(clean) for _ in range(5)]
    app = make_app(broker_url)
    try:
        # No queue named: the idhub.admin.* route takes it to the admin queue the worker consumes.
        app.send_task("idhub.admin.resync", kwargs={"target": "shop", "actor": "token:ops"})
    finally:
        app.close()
    wait_for(lambda: len(shop_customers(sandboxes)) == 5, timeout=30, what="resync delivered by the workers")
    wait_for(lambda: all(row(clean, "shop", i).status == "synced" for i in ids), what="ledger synced")
    with clean.connect() as conn:
        entry = conn.execute(select(audit_log)).one()
    assert (entry.actor, entry.action, entry.result) == ("token:ops", "resync", "ok")
    assert entry.args == {"targets": ["shop"], "users": "all"}
    assert entry.detail["enqueued"] == {"shop": 5}


def test_the_command_enqueues_for_the_workers(clean: Engine, worker: Workers, sandboxes) -> None:
    uid = put_customer(clean)
    env = {**worker.env, "IDHUB_LOG_LEVEL": "WARNING"}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "resync", "--user", uid],
        env=env,
        cwd=str(worker.tmp),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert "shop: marked 0 due again, 1 new, 0 skipped, 1 enqueued" in done.stdout
    wait_for(lambda: len(shop_customers(sandboxes)) == 1, timeout=30, what="delivered by the workers")
    news = sandboxes.servers["newsletter"].sim
    wait_for(lambda: len(news.snapshot()) == 1, timeout=30, what="newsletter delivered")


def test_scheduled_reconciliation_reports_every_target(
    clean: Engine, worker: Workers, broker_url: str
) -> None:
    put_customer(clean)  # in the hub, at no target: each report finds it missing, and repairs nothing
    app = make_app(broker_url)
    try:
        app.send_task("idhub.admin.reconcile_all")
    finally:
        app.close()

    def reports() -> list[tuple[str, str, dict]]:
        with clean.connect() as conn:
            rows = conn.execute(select(audit_log.c.actor, audit_log.c.action, audit_log.c.detail)).all()
        return [tuple(r) for r in rows] if len(rows) == 2 else []

    found = sorted(wait_for(reports, timeout=30, what="two scheduled reports"), key=lambda r: str(r[2]))
    assert {(actor, action) for actor, action, _ in found} == {("schedule", "reconcile")}
    assert [d["missing"] for _, _, d in found] == [1, 1]
    assert all(d["applied"] == {} for _, _, d in found)


def test_scheduled_reconciliation_is_off_unless_configured() -> None:
    from workers.app import WorkerSettings

    assert "idhub.admin.reconcile_all" not in make_app("memory://").conf.beat_schedule
    app = make_app("memory://", WorkerSettings(reconcile_every=3600))
    assert app.conf.beat_schedule["idhub.admin.reconcile_all"]["schedule"] == 3600
    assert app.conf.task_routes["idhub.admin.*"] == {"queue": "admin"}
