"""Metrics: the ledger gauges read at scrape time, sync lag, delivery counters, the API's /metrics with its
request metrics and access log, and the multiprocess exposition the prefork workers use."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest
from sqlalchemy import Engine, create_engine, insert

from orchestrator import logs, metrics, migrations
from orchestrator.db import make_engine, now, outbox
from orchestrator.ledger import outbox_inflight, sync_ledger, target_state
from orchestrator.metrics import LedgerCollector, route_of
from orchestrator.sync import DeliveryReport
from tests.hub import SCIM, client, make_hub

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"target", "outcome", "status", "reason", "task", "method", "route", "le"}


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/healthz", "/healthz"),
        ("/metrics", "/metrics"),
        ("/scim/v2/Users", "/scim/v2/Users"),
        ("/scim/v2/Users/2819c223-7f76-453a-919d-413861904646", "/scim/v2/Users/{id}"),
        ("/scim/v2/Users/someone@example.test", "/scim/v2/Users/{id}"),
        ("/scim/v2/Users/.search", "/scim/v2/Users/.search"),
        ("/scim/v2/Groups/abc/members/x", "/scim/v2/Groups/{id}/..."),
        ("/scim/v2/Bulk", "/scim/v2/Bulk"),
        ("/scim/v2/Users.scim", "/scim/v2/Users"),
        ("/scim/v2/Whatever/x", "/scim/v2/other"),
        ("/scim/v2", "/scim/v2"),
        ("/admin/secret", "other"),
    ],
)
def test_route_labels_are_bounded(path: str, route: str) -> None:
    assert route_of(path) == route


def _engine(url: str) -> Engine:
    engine = make_engine(url)
    migrations.upgrade(engine)
    return engine


def _ledger(target: str, status: str, updated: datetime, **extra: Any) -> dict[str, Any]:
    return {
        "target": target,
        "identity_id": extra.pop("identity_id", str(uuid.uuid4())),
        "resource_type": extra.pop("resource_type", "User"),
        "desired_version": 1,
        "desired_action": "upsert",
        "status": status,
        "attempts": 0,
        "priority": 0,
        "created_at": updated,
        "updated_at": updated,
        **extra,
    }


def _outbox(created: datetime, published: datetime | None) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "resource_type": "User",
        "resource_id": str(uuid.uuid4()),
        "version": 1,
        "kind": "created",
        "changed": [],
        "created_at": created,
        "published_at": published,
    }


def test_ledger_collector_reads_backlog_health_and_relay(store_url: str) -> None:
    engine = _engine(store_url)
    t = now()
    with engine.begin() as conn:
        conn.execute(
            insert(sync_ledger),
            [
                _ledger("crm", "pending", t - timedelta(seconds=30)),
                _ledger("crm", "pending", t - timedelta(seconds=10)),
                _ledger("crm", "retrying", t - timedelta(seconds=60)),
                _ledger("crm", "dead", t - timedelta(seconds=900)),
                _ledger("crm", "held", t - timedelta(seconds=900)),
                *[_ledger("crm", "synced", t - timedelta(seconds=900)) for _ in range(3)],
                _ledger("news", "synced", t),
            ],
        )
        conn.execute(
            insert(target_state),
            [
                {
                    "target": "news",
                    "consecutive_failures": 5,
                    "quarantined_until": t + timedelta(seconds=10),
                    "probe_interval": 1.0,
                    "disabled": False,
                    "updated_at": t,
                },
                {
                    "target": "shop",
                    "consecutive_failures": 0,
                    "quarantined_until": None,
                    "probe_interval": None,
                    "disabled": True,
                    "updated_at": t,
                },
            ],
        )
        conn.execute(
            insert(outbox),
            [
                _outbox(t - timedelta(seconds=20), None),
                _outbox(t - timedelta(seconds=3), None),
                _outbox(t - timedelta(seconds=1), None),
                _outbox(t - timedelta(seconds=40), t - timedelta(seconds=39)),
            ],
        )
        conn.execute(
            insert(outbox_inflight),
            [{"seq": 1, "published_at": t - timedelta(seconds=5)}, {"seq": 2, "published_at": t}],
        )
    registry = CollectorRegistry()
    registry.register(LedgerCollector(engine))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    records = "idhub_ledger_records"
    assert [value(records, target="crm", status=s) for s in ("pending", "retrying", "dead", "held")] == [
        2,
        1,
        1,
        1,
    ]
    for target in ("news", "shop"):  # zero-filled: every known target has every series
        assert [value(records, target=target, status=s) for s in ("pending", "retrying", "dead", "held")] == [
            0
        ] * 4
    assert value(records, target="crm", status="synced") is None  # the done bulk is not counted
    assert 59 <= value("idhub_ledger_oldest_pending_age_seconds", target="crm") < 90
    assert value("idhub_ledger_oldest_pending_age_seconds", target="news") == 0
    assert value("idhub_target_quarantined", target="news") == 1
    assert value("idhub_target_quarantined", target="shop") == 0
    assert value("idhub_target_disabled", target="shop") == 1
    assert value("idhub_target_consecutive_failures", target="news") == 5
    assert value("idhub_relay_unpublished") == 3
    assert 19 <= value("idhub_relay_oldest_unpublished_age_seconds") < 50
    assert value("idhub_relay_inflight") == 2
    assert 4 <= value("idhub_relay_oldest_inflight_age_seconds") < 35
    assert value("idhub_ledger_scrape_ok") == 1
    engine.dispose()


def test_collector_keeps_answering_when_the_database_is_away(caplog: pytest.LogCaptureFixture) -> None:
    engine = create_engine(
        "postgresql+psycopg://root@127.0.0.1:1/nowhere", connect_args={"connect_timeout": 2}
    )
    registry = CollectorRegistry()
    registry.register(LedgerCollector(engine))
    assert registry.get_sample_value("idhub_ledger_scrape_ok") == 0
    assert registry.get_sample_value("idhub_relay_unpublished") is None
    assert "reading the ledger failed" in caplog.text


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_observe_delivery_counts_outcomes_calls_pauses_and_lag() -> None:
    t = now()
    uid = str(uuid.uuid4())
    target = "obs"
    before = {
        o: _sample("idhub_deliveries_total", target=target, outcome=o) for o in ("done", "dead", "unchanged")
    }
    lag_count = _sample("idhub_sync_lag_seconds_count", target=target)
    lag_sum = _sample("idhub_sync_lag_seconds_sum", target=target)
    report = DeliveryReport(target, done=[uid], unchanged=["a", "b"], dead=["c"], calls=4, quarantined=True)
    report.committed[uid] = t - timedelta(seconds=3)
    metrics.observe_delivery(report, 0.2, now=t)
    assert _sample("idhub_deliveries_total", target=target, outcome="done") - before["done"] == 1
    assert _sample("idhub_deliveries_total", target=target, outcome="unchanged") - before["unchanged"] == 2
    assert _sample("idhub_deliveries_total", target=target, outcome="dead") - before["dead"] == 1
    assert _sample("idhub_target_calls_total", target=target) >= 4
    assert _sample("idhub_delivery_batches_deferred_total", target=target, reason="quarantined") >= 1
    assert _sample("idhub_sync_lag_seconds_count", target=target) - lag_count == 1
    assert _sample("idhub_sync_lag_seconds_sum", target=target) - lag_sum == pytest.approx(3.0, abs=0.01)


def test_metrics_endpoint_request_metrics_and_access_log(sqlite_url: str, restore_logging: None) -> None:
    app, engine = make_hub(sqlite_url)
    c = client(app, engine)
    buffer = io.StringIO()
    logs.configure("json", "DEBUG", stream=buffer)  # after create_app, which configures from settings
    email = "canary.q1w2@pii-canary.test"
    r = c.get(
        "/scim/v2/Users", params={"filter": f'userName eq "{email}"'}, headers={"X-Request-Id": "req-42"}
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req-42"
    r = c.get(f"/scim/v2/Users/{email}", headers={"X-Request-Id": "bad id with spaces"})
    assert r.status_code == 404
    assert len(r.headers["x-request-id"]) == 32
    r = c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'idhub_http_requests_total{method="GET",route="/scim/v2/Users",status="200"}' in text
    assert 'idhub_http_requests_total{method="GET",route="/scim/v2/Users/{id}",status="404"}' in text
    assert "idhub_ledger_scrape_ok 1.0" in text
    assert "idhub_relay_unpublished 0.0" in text
    assert "canary" not in text
    r = c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")

    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    access = [line for line in lines if line["event"] == "http request"]
    assert [(a["path"], a["status"], a["level"]) for a in access] == [
        ("/scim/v2/Users", 200, "info"),
        ("/scim/v2/Users/[email]", 404, "info"),
        ("/metrics", 200, "debug"),
        ("/metrics", 200, "debug"),
    ]
    assert access[0]["request_id"] == "req-42"
    assert "canary" not in buffer.getvalue()
    engine.dispose()


def test_metric_labels_are_names_outcomes_and_routes_only() -> None:
    for family in REGISTRY.collect():
        if family.name.startswith("idhub_"):
            for sample in family.samples:
                assert set(sample.labels) <= LABELS, (family.name, sample.labels)


def test_observing_many_at_once_is_observing_each() -> None:
    amounts = [0.0, 0.05, 0.1, 0.1000001, 2.5, 2.5, 7.0, 1e9, -1.0]
    exposed = []
    for observe in (lambda h: [h.observe(a) for a in amounts], lambda h: metrics.observe_all(h, amounts)):
        registry = CollectorRegistry()
        histogram = Histogram("lag_seconds", "lag", ["target"], registry=registry, buckets=(0.1, 1, 2.5, 5))
        observe(histogram.labels("t"))
        lines = generate_latest(registry).decode().splitlines()
        exposed.append("\n".join(line for line in lines if "_created" not in line))
    assert exposed[0] == exposed[1]
    assert 'lag_seconds_bucket{le="0.1",target="t"} 4.0' in exposed[1]
    assert 'lag_seconds_count{target="t"} 9.0' in exposed[1]


def test_multiprocess_mode_serves_the_children_merged(tmp_path: Path) -> None:
    """What a prefork worker does: children write to the directory, the parent serves the sum on a port."""
    script = textwrap.dedent(
        """
        import multiprocessing, urllib.request
        from orchestrator import metrics

        def child() -> None:
            metrics.DELIVERIES.labels("mp", "done").inc(2)
            metrics.TASKS.labels("idhub.deliver", "ok").inc()
            metrics.observe_all(metrics.SYNC_LAG.labels("mp"), [0.2, 3.0])

        metrics.reset_multiprocess_dir()
        ctx = multiprocessing.get_context("fork")
        children = [ctx.Process(target=child) for _ in range(2)]
        for p in children:
            p.start()
        for p in children:
            p.join()
            metrics.process_exited(p.pid)
        port = metrics.serve(metrics.MetricsSettings(metrics_port=0))
        print(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
        """
    )
    folder = tmp_path / "prom"
    folder.mkdir()
    (folder / "counter_999999.db").write_bytes(b"stale")  # an earlier run's file: wiped at start
    env = {"PROMETHEUS_MULTIPROC_DIR": str(folder), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert 'idhub_deliveries_total{outcome="done",target="mp"} 4.0' in out
    assert 'idhub_tasks_total{outcome="ok",task="idhub.deliver"} 2.0' in out
    assert 'idhub_sync_lag_seconds_count{target="mp"} 4.0' in out
    assert 'idhub_sync_lag_seconds_sum{target="mp"} 6.4' in out
    assert not (folder / "counter_999999.db").exists()


def test_scim_content_type_is_untouched(sqlite_url: str) -> None:
    """The middleware adds a header and nothing else: SCIM answers keep their media type."""
    app, engine = make_hub(sqlite_url)
    r = client(app, engine).get("/scim/v2/Users")
    assert r.headers["content-type"] == SCIM
    engine.dispose()
