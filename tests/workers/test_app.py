"""The Celery app's settings that are ours to choose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import cli, settings, sync
from workers import base
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


def test_the_relay_starts_without_the_other_commands_modules() -> None:
    # A relay started on a backlog is on its critical path: it must not load the SCIM models, the targets
    # or the connectors, which the admin and privacy commands' parsers would bring in.
    script = (
        "import sys\n"
        "from orchestrator import cli\n"
        "try:\n"
        "    cli.main(['relay', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "import workers.relay\n"
        "print(sorted(m for m in ('scim2_models', 'orchestrator.targets', 'connectors.base',"
        " 'orchestrator.admin', 'orchestrator.sync') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "--once" in out
    assert out.strip().endswith("[]")


def test_a_worker_prepares_its_targets_before_the_pool_forks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What each forked child would otherwise do in its first delivery: the targets read, the mappings
    # compiled (a filtered path builds SCIM model classes), once in the parent the children inherit.
    targets = tmp_path / "targets.yaml"
    targets.write_text(
        "targets:\n  - name: shop\n    connector: shop\n    url: http://127.0.0.1:9\n"
        "    mapping: {email: 'emails[type eq \"work\"].value'}\n"
    )
    monkeypatch.setenv("IDHUB_TARGETS_FILE", str(targets))
    monkeypatch.setattr(base, "_process", base._Process())
    settings.get.cache_clear()
    try:
        base._prepare()  # connected to worker_init, which a worker sends before its pool forks
        cfg = base._process.targets["shop"] if base._process.targets else None
        assert cfg is not None
        assert sync._mappers[id(cfg)][0] is cfg
    finally:
        settings.get.cache_clear()
