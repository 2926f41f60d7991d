"""The Celery app's settings that are ours to choose."""

from __future__ import annotations

import pytest

from orchestrator import cli
from workers.app import WorkerSettings, make_app


def test_task_events_are_sent_only_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = make_app("memory://")
    assert (quiet.conf.worker_send_task_events, quiet.conf.task_send_sent_event) == (False, False)
    monkeypatch.setenv("IDHUB_TASK_EVENTS", "true")
    loud = make_app("memory://", WorkerSettings())
    assert (loud.conf.worker_send_task_events, loud.conf.task_send_sent_event) == (True, True)


def test_idhub_worker_leaves_events_to_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[tuple[str, ...]] = []
    monkeypatch.setattr(cli, "_celery", lambda *argv: ran.append(argv) or 0)
    args = cli.build_parser().parse_args(["worker", "--queues", "fanout"])
    assert args.func(args) == 0
    assert ran == [("worker", "--loglevel", "INFO", "-Q", "fanout")]
