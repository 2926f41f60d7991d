"""The worker side: what a task's log lines carry, and the worker start serving its metrics."""

from __future__ import annotations

import logging
import urllib.request
from types import SimpleNamespace

import pytest

from workers import telemetry
from workers.base import log_context

ID = "550e8400-e29b-41d4-a716-446655440000"


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("idhub.deliver", ("crm", [ID]), {"target": "crm", "identity_id": ID}),
        ("idhub.deliver", ("crm", [ID, ID]), {"target": "crm", "batch": 2}),
        ("idhub.fanout", ([7, 8, 9],), {"outbox_seqs": "7-9"}),
        ("idhub.fanout", ([7],), {"outbox_seqs": "7"}),
        ("idhub.probe", ("crm",), {"target": "crm"}),
        ("idhub.sweep", (), {}),
    ],
)
def test_task_log_context_holds_ids_only(
    name: str, args: tuple[object, ...], expected: dict[str, object]
) -> None:
    assert log_context(name, "t-1", args, {}) == {"task_id": "t-1", "task_name": name, **expected}


def test_worker_start_serves_metrics_and_warns_about_prefork_without_a_directory(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("IDHUB_METRICS_PORT", "0")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    served: list[int | None] = []
    monkeypatch.setattr(telemetry.metrics, "serve", lambda: served.append(0) or 0)
    with caplog.at_level(logging.WARNING, logger="idhub.workers"):
        telemetry._worker_init(sender=SimpleNamespace(pool_cls="prefork"))
        telemetry._worker_init(sender=SimpleNamespace(pool_cls="solo"))
    assert served == [0, 0]
    assert [r.getMessage() for r in caplog.records].count(
        "metrics: a prefork worker needs PROMETHEUS_MULTIPROC_DIR, or its children's samples are lost"
    ) == 1


def test_metrics_server_answers_on_its_port() -> None:
    from orchestrator import metrics

    port = metrics.serve(metrics.MetricsSettings(metrics_port=0))
    assert port is not None
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "idhub_relay_published_total" in body
    assert metrics.serve(metrics.MetricsSettings()) is None  # unset: not served
