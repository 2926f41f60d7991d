"""The admin tasks, ``idhub.admin.<action>`` on the ``admin`` queue. Arguments are ids, names and flags; each
body calls the plain function in ``orchestrator.admin``. Mapped values are never shown by a task."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import structlog

from orchestrator import admin
from workers.app import app
from workers.base import IdhubTask

log = structlog.get_logger("idhub.admin")
F = TypeVar("F", bound=Callable[..., Any])


def _task(name: str) -> Callable[[F], F]:
    """Register an admin task under its stable name, on the idhub base class (typed: Celery is not)."""
    return cast(Callable[[F], F], app.task(name=name, base=IdhubTask, bind=True))


def _actor(self: IdhubTask, actor: str | None) -> str:
    # The caller (an API token's name) when it says; else the task itself.
    return (actor or f"task:{self.name}")[:128]


def _targets(self: IdhubTask) -> list[Any]:
    return list(self.targets().values())


@_task("idhub.admin.status")
def status(self: IdhubTask, target: str | None = None) -> dict[str, Any]:
    return admin.status(self.engine, _targets(self), only=target)


@_task("idhub.admin.resync")
def resync(
    self: IdhubTask,
    target: str | None = None,
    user: str | None = None,
    every: bool = False,
    dry_run: bool = False,
    actor: str | None = None,
) -> dict[str, Any]:
    chosen = admin.resync_scope(_targets(self), user=user, target=target, every=every)
    users = [admin.find_user(self.engine, user)] if user is not None else None
    return admin.resync(
        self.engine,
        chosen,
        actor=_actor(self, actor),
        user_ids=users,
        dry_run=dry_run,
        enqueue=None if dry_run else self.enqueue_deliveries,
    ).as_dict()


@_task("idhub.admin.reconcile")
def reconcile(self: IdhubTask, target: str, apply: bool = False, actor: str | None = None) -> dict[str, Any]:
    cfg = admin.target_named(_targets(self), target)
    report = admin.reconcile(
        self.engine,
        cfg,
        self.connector(target),
        actor=_actor(self, actor),
        apply=apply,
        enqueue=self.enqueue_deliveries,
    )
    log.info(
        "reconciled",
        listed=report.listed,
        missing=len(report.missing),
        orphaned=len(report.orphaned),
        differing=len(report.differing),
        applied=report.applied,
    )
    return report.as_dict()


@_task("idhub.admin.reconcile_all")
def reconcile_all(self: IdhubTask) -> list[str]:
    """The scheduled reconciliation: one report-only ``idhub.admin.reconcile`` per listable target."""
    names = [cfg.name for cfg in _targets(self) if self.connector(cfg.name).supports_list]
    for name in names:
        self.app.send_task("idhub.admin.reconcile", kwargs={"target": name, "actor": "schedule"})
    return names


@_task("idhub.admin.dlq_list")
def dlq_list(self: IdhubTask, target: str | None = None) -> list[dict[str, Any]]:
    return admin.dlq_list(self.engine, target=target)


@_task("idhub.admin.dlq_replay")
def dlq_replay(
    self: IdhubTask,
    letter_id: int | None = None,
    target: str | None = None,
    every: bool = False,
    actor: str | None = None,
) -> dict[str, list[str]]:
    return admin.dlq_replay(
        self.engine,
        actor=_actor(self, actor),
        letter_id=letter_id,
        target=target,
        every=every,
        enqueue=self.enqueue_deliveries,
    )


@_task("idhub.admin.dlq_discard")
def dlq_discard(
    self: IdhubTask,
    letter_id: int | None = None,
    target: str | None = None,
    actor: str | None = None,
) -> int:
    return admin.dlq_discard(self.engine, actor=_actor(self, actor), letter_id=letter_id, target=target)


@_task("idhub.admin.sync_now")
def sync_now(self: IdhubTask, user: str, target: str, actor: str | None = None) -> dict[str, Any]:
    cfg = admin.target_named(_targets(self), target)
    return admin.sync_now(
        self.engine,
        cfg,
        self.connector(target),
        admin.find_user(self.engine, user),
        actor=_actor(self, actor),
    )


@_task("idhub.admin.explain")
def explain(self: IdhubTask, user: str) -> dict[str, Any]:
    return admin.explain(self.engine, _targets(self), admin.find_user(self.engine, user), show_values=False)


@_task("idhub.admin.approve")
def approve(self: IdhubTask, target: str, hold: int | None = None, actor: str | None = None) -> list[str]:
    cfg = admin.target_named(_targets(self), target)
    decision = admin.approve(
        self.engine, cfg, actor=_actor(self, actor), hold_id=hold, enqueue=self.enqueue_deliveries
    )
    return decision.released


@_task("idhub.admin.reject")
def reject(self: IdhubTask, target: str, hold: int | None = None, actor: str | None = None) -> list[str]:
    cfg = admin.target_named(_targets(self), target)
    return admin.reject(self.engine, cfg, actor=_actor(self, actor), hold_id=hold).rejected


def enqueue(due: Mapping[str, Sequence[str]]) -> None:
    """Send ``idhub.deliver`` tasks for what is due, from any process (the CLI uses it)."""
    resync.enqueue_deliveries(due)  # type: ignore[attr-defined]
