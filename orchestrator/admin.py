"""Operations: status, resync, reconcile, dead letters, sync-now, explain, hold decisions, the audit log.

Each action is a plain function here; ``workers/admin_tasks.py`` runs them as ``idhub.admin.<action>`` tasks
and ``admin_cli.py`` as ``idhub`` sub-commands. Functions that change something take an ``actor`` and write
one ``audit_log`` row (ids and flags only, never personal data). Functions that need a target's connector
take it built; functions that drive deliveries take an ``enqueue`` callable (the broker) or a connector
(deliver here and now). Bad requests raise AdminError before anything changes.
"""

from __future__ import annotations

import functools
import getpass
import logging
import os
import socket
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    String,
    Table,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.type_api import TypeEngine

from connectors.base import Connector, DeprovisionAction, Record, Result
from connectors.errors import SyncError
from orchestrator import guard, sync
from orchestrator.db import BigId, InList, Json, identities, is_postgres, metadata, row_params, row_source
from orchestrator.db import now as utcnow
from orchestrator.guard import GuardSettings, load_settings
from orchestrator.ledger import DONE, Status, dead_letters, erasure_receipts, sync_ledger, target_state
from orchestrator.mapping import compile_mapping, match_key
from orchestrator.targets import DeprovisionPolicy, TargetConfig, decide, failing_scope_term

log = logging.getLogger(__name__)
L = sync_ledger.c
Enqueue = Callable[[Mapping[str, Sequence[str]]], None]
Progress = Callable[[int], None]
BATCH: Final = 500
# Statuses shown by ``status``, in this order.
STATUSES: Final = (
    Status.SYNCED.value,
    Status.PENDING.value,
    Status.RETRYING.value,
    guard.HELD,
    Status.DEAD.value,
    Status.OUT_OF_SCOPE.value,
    Status.DEPROVISIONED.value,
)

__all__ = [
    "AdminError",
    "GuardSettings",
    "ReconcileReport",
    "ResyncReport",
    "approve",
    "audit",
    "audit_log",
    "dlq_discard",
    "dlq_list",
    "dlq_replay",
    "explain",
    "find_user",
    "load_settings",
    "local_actor",
    "reconcile",
    "reject",
    "resync",
    "resync_scope",
    "status",
    "sync_now",
    "target_named",
]

# Admin actions: who (a token name or the local OS user), what, arguments (ids and flags only), result.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("args", Json, nullable=False),
    Column("result", String(32), nullable=False),
    Column("detail", Json, nullable=False),
    Index("ix_audit_log_at", "at"),
)


class AdminError(ValueError):
    """A bad request: an unknown target, user, dead letter or hold, or options that conflict; one line."""


# ------------------------------------------------------------------------------------------------ audit


def local_actor() -> str:
    """Who runs a command on this machine: ``local:<OS user>``."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers): the uid still says who
        name = f"uid{os.getuid()}"
    return f"local:{name}"[:128]


def audit(
    engine: Engine,
    actor: str,
    action: str,
    args: Mapping[str, Any],
    result: str = "ok",
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Write one audit row; ``args`` and ``detail`` hold ids, names, flags and counts only."""
    with engine.begin() as conn:
        conn.execute(
            insert(audit_log).values(
                at=utcnow(),
                actor=actor[:128],
                action=action[:64],
                args=dict(args),
                result=result[:32],
                detail=dict(detail or {}),
            )
        )


@contextmanager
def _audited(engine: Engine, actor: str, action: str, args: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Audit what the block did: ``ok`` with the detail it filled in, or ``error:<class>`` when it raised."""
    detail: dict[str, Any] = {}
    try:
        yield detail
    except BaseException as exc:
        audit(engine, actor, action, args, f"error:{type(exc).__name__}", detail)
        raise
    audit(engine, actor, action, args, "ok", detail)


# ---------------------------------------------------------------------------------------------- lookups


def target_named(targets: Sequence[TargetConfig], name: str) -> TargetConfig:
    """The configured target called ``name``; AdminError naming it otherwise."""
    for cfg in targets:
        if cfg.name == name:
            return cfg
    known = ", ".join(t.name for t in targets) or "none configured"
    raise AdminError(f"unknown target {name!r} (known: {known})")


def find_user(engine: Engine, ref: str) -> str:
    """The id of the identity ``ref`` names (its id, else its userName); AdminError when there is none."""
    with engine.connect() as conn:
        found = conn.scalar(select(identities.c.id).where(identities.c.id == ref))
        if found is None:
            found = conn.scalar(select(identities.c.id).where(identities.c.user_name_ci == ref.lower()))
    if found is None:
        raise AdminError(f"unknown user {ref!r}: no identity has that id or userName")
    return str(found)


def _connector_class(cfg: TargetConfig) -> Any:
    # Imported here, as targets.py does: the registry loads connector modules (and their HTTP client).
    from connectors import registry

    return registry.connector_class(cfg.connector)


def _mapper(cfg: TargetConfig) -> tuple[Callable[[Mapping[str, Any]], dict[str, Any]], str]:
    """The target's compiled mapping (its own, else its connector's default) and its matching field."""
    cls = _connector_class(cfg)
    return compile_mapping(cfg.mapping or cls.default_mapping), str(cls.match_field)


def _aware(value: datetime | None) -> datetime | None:
    return sync._aware(value, utcnow()) if value is not None else None


def _iso(value: datetime | None) -> str | None:
    value = _aware(value)
    return value.isoformat() if value is not None else None


def _row_state(row: Any) -> dict[str, Any] | None:
    """A ledger row as shown to an operator: ids, versions, actions, status, error code and times."""
    if row is None:
        return None
    return {
        "status": row.status,
        "remote_id": row.remote_id,
        "desired_version": row.desired_version,
        "desired_action": row.desired_action,
        "synced_version": row.synced_version,
        "synced_action": row.synced_action,
        "attempts": row.attempts,
        "next_attempt_at": _iso(row.next_attempt_at),
        "last_error_code": row.last_error_code,
        "last_error_message": row.last_error_message,
        "updated_at": _iso(row.updated_at),
    }


# ----------------------------------------------------------------------------------------------- status


def status(
    engine: Engine, targets: Sequence[TargetConfig], *, only: str | None = None, now: datetime | None = None
) -> dict[str, Any]:
    """Per target: counts by status, the oldest pending change, quarantine, holds, deliveries in the last
    minute and open dead letters; and the erasures not yet complete."""
    now = now or utcnow()
    chosen = [target_named(targets, only)] if only is not None else list(targets)
    names = [c.name for c in chosen]
    out: list[dict[str, Any]] = []
    with engine.connect() as conn:
        counts: dict[str, dict[str, int]] = defaultdict(dict)
        q = (
            select(L.target, L.status, func.count())
            .where(L.target.in_(names), L.resource_type == "User")
            .group_by(L.target, L.status)
        )
        for target, state, n in conn.execute(q):
            counts[target][state] = n
        waiting = L.status.in_((Status.PENDING.value, Status.RETRYING.value))
        oldest = dict(
            conn.execute(
                select(L.target, func.min(func.coalesce(L.first_failure_at, L.updated_at)))
                .where(L.target.in_(names), waiting)
                .group_by(L.target)
            ).all()
        )
        recent: dict[str, int] = dict(
            conn.execute(
                select(L.target, func.count())
                .where(
                    L.target.in_(names),
                    L.status.in_([s.value for s in DONE]),
                    L.updated_at >= now - timedelta(minutes=1),
                )
                .group_by(L.target)
            ).all()
        )
        dead: dict[str, int] = dict(
            conn.execute(
                select(dead_letters.c.target, func.count())
                .where(dead_letters.c.target.in_(names), dead_letters.c.replayed_at.is_(None))
                .group_by(dead_letters.c.target)
            ).all()
        )
        health = {
            s.target: s for s in conn.execute(select(target_state).where(target_state.c.target.in_(names)))
        }
        holds = defaultdict(list)
        for h in guard.open_holds(conn):
            holds[h.target].append(
                {"id": h.id, "held": h.held, "reason": h.reason, "opened_at": _iso(h.opened_at)}
            )
        for name in names:
            state = health.get(name)
            first = _aware(oldest.get(name))
            out.append(
                {
                    "target": name,
                    "counts": {s: counts[name].get(s, 0) for s in STATUSES},
                    "oldest_pending_seconds": round((now - first).total_seconds(), 1) if first else None,
                    "quarantined_until": _iso(state.quarantined_until) if state is not None else None,
                    "disabled": bool(state.disabled) if state is not None else False,
                    "consecutive_failures": state.consecutive_failures if state is not None else 0,
                    "delivered_last_minute": recent.get(name, 0),
                    "open_dead_letters": dead.get(name, 0),
                    "holds": holds.get(name, []),
                }
            )
        erasures = _pending_erasures(conn)
    return {"at": now.isoformat(), "targets": out, "erasures_pending": erasures}


def _pending_erasures(conn: Connection, limit: int = 1000) -> list[dict[str, Any]]:
    """Deleted identities whose tombstone is still waiting for targets, with each target's status."""
    tombs = list(
        conn.execute(
            select(identities.c.id, identities.c.deleted_at)
            .where(identities.c.deleted_at.is_not(None))
            .order_by(identities.c.deleted_at)
            .limit(limit)
        )
    )
    rows: dict[str, dict[str, str]] = defaultdict(dict)
    ids = [t.id for t in tombs]
    if ids:
        for r in conn.execute(select(L.identity_id, L.target, L.status).where(L.identity_id.in_(ids))):
            rows[r.identity_id][r.target] = r.status
    return [{"identity_id": t.id, "deleted_at": _iso(t.deleted_at), "targets": rows[t.id]} for t in tombs]


# ----------------------------------------------------------------------------------------------- resync


@dataclass
class ResyncReport:
    """What a resync marked (by target), what it found nothing to do for, and how it drove the rows."""

    targets: list[str]
    dry_run: bool
    identities: int = 0
    batches: int = 0
    marked: dict[str, int] = field(default_factory=dict)  # existing rows made due again
    created: dict[str, int] = field(default_factory=dict)  # rows a fan-out never made (e.g. a new target)
    skipped: dict[str, int] = field(default_factory=dict)  # held for approval, or nothing to hold there
    enqueued: dict[str, int] = field(default_factory=dict)
    delivered: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _identity_batches(engine: Engine, user_ids: Sequence[str] | None, size: int) -> Iterator[list[Any]]:
    """Users in pages of ``size`` by keyset over their id (never all at once); tombstones included.

    Each page is read on its own short connection: no transaction stays open between pages.
    """
    cols = (identities.c.id, identities.c.version, identities.c.doc, identities.c.deleted_at)
    if user_ids is not None:
        ids = sorted(set(user_ids))
        for start in range(0, len(ids), size):
            with engine.connect() as conn:
                page = list(conn.execute(select(*cols).where(identities.c.id.in_(ids[start : start + size]))))
            yield page
        return
    after: str | None = None
    while True:
        q = select(*cols).order_by(identities.c.id).limit(size)
        if after is not None:
            q = q.where(identities.c.id > after)
        with engine.connect() as conn:
            page = list(conn.execute(q))
        if not page:
            return
        yield page
        after = page[-1].id
        if len(page) < size:
            return


def resync_scope(
    targets: Sequence[TargetConfig], *, user: str | None, target: str | None, every: bool
) -> list[TargetConfig]:
    """The targets a resync names (``--user``, ``--target``, both, or ``--all`` alone); AdminError else."""
    if every and (user is not None or target is not None):
        raise AdminError("--all: not with --user or --target")
    if not every and user is None and target is None:
        raise AdminError("give --user, --target or --all")
    return [target_named(targets, target)] if target is not None else list(targets)


def resync(
    engine: Engine,
    targets: Sequence[TargetConfig],
    *,
    actor: str,
    user_ids: Sequence[str] | None = None,
    dry_run: bool = False,
    enqueue: Enqueue | None = None,
    connectors: Mapping[str, Connector] | None = None,
    batch_size: int = BATCH,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> ResyncReport:
    """Mark the current state of these users (all users when ``user_ids`` is None) desired again at these
    targets, so each row is due even where versions match, and drive it: ``enqueue`` the deliveries, or
    deliver here through ``connectors`` (by target name). Streams identities in batches; a held row stays
    held (an approval decides it)."""
    report = ResyncReport([c.name for c in targets], dry_run)
    users: Any = "all" if user_ids is None else (list(user_ids) if len(user_ids) <= 100 else len(user_ids))
    args = {"targets": report.targets, "users": users}
    with _audited(engine, actor, "resync" + (" (dry run)" if dry_run else ""), args) as detail:
        _resync(engine, targets, report, user_ids, enqueue, connectors, batch_size, progress, now)
        detail.update(
            identities=report.identities,
            marked=report.marked,
            created=report.created,
            enqueued=report.enqueued,
        )
    return report


def _resync(
    engine: Engine,
    targets: Sequence[TargetConfig],
    report: ResyncReport,
    user_ids: Sequence[str] | None,
    enqueue: Enqueue | None,
    connectors: Mapping[str, Connector] | None,
    batch_size: int = BATCH,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> ResyncReport:
    for batch in _identity_batches(engine, user_ids, batch_size):
        report.batches += 1
        report.identities += len(batch)
        due = _mark(engine, targets, batch, report, report.dry_run, now or utcnow())
        _drive(engine, targets, due, report, enqueue, connectors)
        if progress is not None:
            progress(report.identities)
    return report


def _mark(
    engine: Engine,
    targets: Sequence[TargetConfig],
    batch: Sequence[Any],
    report: ResyncReport,
    dry_run: bool,
    now: datetime,
) -> dict[str, list[str]]:
    """Make one batch of identities due at every target; returns the due ids by target."""
    due: dict[str, list[str]] = defaultdict(list)
    ids = [i.id for i in batch]
    with engine.begin() as conn:
        rows = {
            (r.target, r.identity_id): r
            for r in conn.execute(
                select(sync_ledger).where(
                    InList(L.identity_id, "ids"), L.target.in_([c.name for c in targets])
                ),
                {"ids": ids},
            )
        }
        new: list[dict[str, Any]] = []
        again: list[dict[str, Any]] = []
        for cfg in targets:
            for ident in batch:
                row = rows.get((cfg.name, ident.id))
                deleted = ident.deleted_at is not None
                provisioned = row is not None and sync._provisioned(row)
                decision = decide(
                    cfg, None if deleted else ident.doc, deleted=deleted, previously_provisioned=provisioned
                )
                nothing = row is None and decision.action == sync.NONE
                if nothing or (row is not None and row.status == guard.HELD):
                    report.skipped[cfg.name] = report.skipped.get(cfg.name, 0) + 1
                    continue
                if row is None:
                    new.append(
                        sync._desired(cfg.name, ident.id, "User", ident.version, decision.action, 0, now)
                    )
                    report.created[cfg.name] = report.created.get(cfg.name, 0) + 1
                else:
                    again.append(
                        {
                            "k_target": cfg.name,
                            "k_id": ident.id,
                            "v_version": ident.version,
                            "v_action": decision.action,
                        }
                    )
                    report.marked[cfg.name] = report.marked.get(cfg.name, 0) + 1
                due[cfg.name].append(ident.id)
        if dry_run:
            conn.rollback()
            return {}
        if new:
            sync._upsert_desired(conn, new)
        if again:
            postgres = is_postgres(conn)
            conn.execute(_mark_again(postgres), row_params(_AGAIN, again, {"now": now}, postgres=postgres))
    return due


_AGAIN: dict[str, TypeEngine[Any]] = {
    "k_target": String(),
    "k_id": String(),
    "v_version": BigInteger(),
    "v_action": String(),
}


@functools.cache
def _mark_again(postgres: bool) -> Any:
    row = row_source(_AGAIN, postgres=postgres)
    v = row["v_version"]
    stamp = bindparam("now", type_=L.updated_at.type)
    return (
        update(sync_ledger)
        .where(L.target == row["k_target"], L.identity_id == row["k_id"], L.status != guard.HELD)
        .values(
            # desired_version only ever grows (a fan-out may have raised it meanwhile).
            desired_version=case((L.desired_version < v, v), else_=L.desired_version),
            desired_action=case((L.desired_version <= v, row["v_action"]), else_=L.desired_action),
            # Due even where versions match: the sent payload is forgotten and the version re-pushed.
            synced_version=case((L.synced_version >= v, None), else_=L.synced_version),
            payload_digest=None,
            status=Status.PENDING.value,
            attempts=0,
            next_attempt_at=None,
            first_failure_at=None,
            enqueued_at=stamp,
            updated_at=stamp,
        )
    )


def _drive(
    engine: Engine,
    targets: Sequence[TargetConfig],
    due: Mapping[str, list[str]],
    report: ResyncReport,
    enqueue: Enqueue | None,
    connectors: Mapping[str, Connector] | None,
) -> None:
    """Send what a batch made due: through the broker, or here and now through the connectors."""
    due = {t: ids for t, ids in due.items() if ids}
    if not due:
        return
    if connectors is None:
        if enqueue is not None:
            enqueue(due)
            for t, ids in due.items():
                report.enqueued[t] = report.enqueued.get(t, 0) + len(ids)
        return
    by_name = {c.name: c for c in targets}
    for t, ids in due.items():
        result = sync.deliver(engine, by_name[t], connectors[t], ids, owner=_owner())
        tally = report.delivered.setdefault(t, {})
        for key in ("done", "unchanged", "retrying", "dead", "held", "not_due"):
            tally[key] = tally.get(key, 0) + len(getattr(result, key))


def _owner() -> str:
    """A lease owner unique to this attempt."""
    return f"admin:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------- explain


def _describe(
    cfg: TargetConfig, ident: Any, row: Any, show_values: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One target's view of one identity: the decision and why, and the payload it would receive."""
    deleted = ident.deleted_at is not None
    doc = None if deleted else ident.doc
    decision = decide(
        cfg, doc, deleted=deleted, previously_provisioned=row is not None and sync._provisioned(row)
    )
    failing = None if doc is None else failing_scope_term(cfg, doc)
    mapper, key_field = _mapper(cfg)
    payload = mapper(doc) if doc else {}
    view = {
        "target": cfg.name,
        "action": decision.action,
        "reason": decision.reason,
        "in_scope": doc is not None and failing is None,
        "failing_scope_term": failing,
        "scope": cfg.scope,
        "attributes": payload if show_values else _paths(payload),
        "matching_field": key_field,
    }
    return view, payload


def _paths(payload: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted field names of a mapped payload (its values left out)."""
    out: list[str] = []
    for key, value in payload.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.extend(_paths(value, path + "."))
        else:
            out.append(path)
    return out


def explain(
    engine: Engine, targets: Sequence[TargetConfig], user_id: str, *, show_values: bool = False
) -> dict[str, Any]:
    """For each target: in or out of scope and why, the payload it would receive (values only with
    ``show_values``, which only a local operator may ask for), the ledger row and any hold on it."""
    with engine.connect() as conn:
        ident = conn.execute(
            select(identities.c.id, identities.c.version, identities.c.doc, identities.c.deleted_at).where(
                identities.c.id == user_id
            )
        ).first()
        if ident is None:
            raise AdminError(f"unknown user {user_id!r}")
        rows = {r.target: r for r in conn.execute(select(sync_ledger).where(L.identity_id == user_id))}
        items = {
            r.target: r
            for r in conn.execute(
                select(guard.deprovision_hold_items)
                .where(guard.deprovision_hold_items.c.identity_id == user_id)
                .order_by(guard.deprovision_hold_items.c.hold_id)
            )
        }
    out = []
    for cfg in targets:
        view, _ = _describe(cfg, ident, rows.get(cfg.name), show_values)
        view["ledger"] = _row_state(rows.get(cfg.name))
        item = items.get(cfg.name)
        view["hold"] = (
            None if item is None else {"id": item.hold_id, "state": item.state, "action": item.action}
        )
        out.append(view)
    return {
        "identity": {
            "id": ident.id,
            "version": ident.version,
            "deleted": ident.deleted_at is not None,
            "active": None if ident.deleted_at is not None else ident.doc.get("active", True),
        },
        "targets": out,
    }


# --------------------------------------------------------------------------------------------- sync-now


class _Traced(Connector):
    """A connector that notes every call it passes on and the target's answer (ids and codes only)."""

    def __init__(self, inner: Connector) -> None:
        self.inner = inner
        self.calls: list[dict[str, Any]] = []

    def _note(self, call: str, outcome: Result | BaseException) -> None:
        if isinstance(outcome, Result):
            self.calls.append({"call": call, "outcome": outcome.outcome, "remote_id": outcome.remote_id})
        elif isinstance(outcome, SyncError):
            self.calls.append({"call": call, "error": outcome.code, "message": outcome.message})
        else:
            self.calls.append({"call": call, "error": type(outcome).__name__, "message": ""})

    def upsert(self, record: Record) -> Result:
        try:
            result = self.inner.upsert(record)
        except Exception as exc:
            self._note("upsert", exc)
            raise
        self._note("upsert", result)
        return result

    def upsert_many(self, records: Sequence[Record]) -> list[Result | Exception]:
        results = self.inner.upsert_many(records)
        for result in results:
            self._note("upsert_many", result)
        return results

    def deprovision(self, record: Record, action: DeprovisionAction) -> Result:
        try:
            result = self.inner.deprovision(record, action)
        except Exception as exc:
            self._note(f"deprovision {action}", exc)
            raise
        self._note(f"deprovision {action}", result)
        return result

    def find(self, match_key: str) -> str | None:
        return self.inner.find(match_key)

    def probe(self) -> None:
        self.inner.probe()


def _traced(inner: Connector) -> _Traced:
    """Wrap ``inner`` in a _Traced whose class carries the same capability flags and default mapping."""
    names = ("kind", "default_mapping", "match_field", "supports_batch", "supports_groups", "max_batch")
    cls = type(f"Traced{type(inner).__name__}", (_Traced,), {n: getattr(inner, n) for n in names})
    traced: _Traced = cls(inner)
    return traced


def sync_now(
    engine: Engine,
    cfg: TargetConfig,
    connector: Connector,
    user_id: str,
    *,
    actor: str,
    show_values: bool = False,
) -> dict[str, Any]:
    """Provision one user at one target now: the decision and why, the mapped attributes, each connector
    call with the target's answer, and the ledger row after."""
    with engine.connect() as conn:
        ident = conn.execute(
            select(identities.c.id, identities.c.version, identities.c.doc, identities.c.deleted_at).where(
                identities.c.id == user_id
            )
        ).first()
        if ident is None:
            raise AdminError(f"unknown user {user_id!r}")
        before = conn.execute(
            select(sync_ledger).where(L.target == cfg.name, L.identity_id == user_id)
        ).first()
    view, _ = _describe(cfg, ident, before, show_values)
    traced = _traced(connector)
    with _audited(engine, actor, "sync-now", {"target": cfg.name, "user": user_id}) as detail:
        _resync(engine, [cfg], ResyncReport([cfg.name], False), [user_id], None, {cfg.name: traced})
        with engine.connect() as conn:
            after = conn.execute(
                select(sync_ledger).where(L.target == cfg.name, L.identity_id == user_id)
            ).first()
        detail.update(calls=len(traced.calls), status=after.status if after is not None else None)
    return {
        "target": cfg.name,
        "identity_id": user_id,
        "decision": {k: view[k] for k in ("action", "reason", "in_scope", "failing_scope_term")},
        "attributes": view["attributes"],
        "calls": traced.calls,
        "ledger": _row_state(after),
    }


# -------------------------------------------------------------------------------------------- reconcile


@dataclass
class ReconcileReport:
    """A target compared with the hub: ids and field names only."""

    target: str
    listed: int = 0
    compared: int = 0
    missing: list[str] = field(default_factory=list)  # identity ids in scope with no account there
    orphaned: list[dict[str, Any]] = field(default_factory=list)  # remote_id, identity_id, reason
    differing: list[dict[str, Any]] = field(default_factory=list)  # identity_id, remote_id, fields
    held: int = 0  # rows waiting for a hold decision: not judged
    applied: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flat(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _same(a: Any, b: Any, *, fold: bool) -> bool:
    def norm(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, str):
            v = v.strip()
            return v.casefold() if fold else v
        return v

    return bool(norm(a) == norm(b))


def _differing(payload: Mapping[str, Any], remote: Mapping[str, Any], key_field: str) -> list[str]:
    """Fields both sides have whose values differ (the matching key compared case-insensitively)."""
    ours, theirs = _flat(payload), _flat(remote)
    return sorted(
        p for p in ours.keys() & theirs.keys() if not _same(ours[p], theirs[p], fold=p == key_field)
    )


def _may_delete(cfg: TargetConfig, reason: str) -> DeprovisionAction | None:
    """How an orphan may be removed under the target's policies, or None when they do not allow it."""
    on_delete = cfg.on_delete in (DeprovisionPolicy.DELETE, DeprovisionPolicy.ERASE)
    on_leave = cfg.on_leave_scope == DeprovisionPolicy.DELETE
    erase = DeprovisionAction.ERASE if cfg.on_delete == DeprovisionPolicy.ERASE else DeprovisionAction.DELETE
    if reason in ("deleted", "erased"):
        return erase if on_delete else None
    if reason == "out_of_scope":
        return DeprovisionAction.DELETE if on_leave else None
    # Unknown to the hub: only a target meant to hold nothing but the hub's customers in scope.
    return erase if on_delete and on_leave else None


def reconcile(
    engine: Engine,
    cfg: TargetConfig,
    connector: Connector,
    *,
    actor: str,
    apply: bool = False,
    enqueue: Enqueue | None = None,
    deliver_now: bool = False,
    batch_size: int = BATCH,
    progress: Progress | None = None,
) -> ReconcileReport:
    """Compare a target's accounts with the hub and the ledger: missing, orphaned and differing accounts.

    With ``apply``: missing and differing users are resynced; orphans are removed only where the target's
    policy deletes (else reported), and none at all when there are more than the mass-deprovisioning guard
    allows. An erased or unknown customer is never created. The target's listing is held in memory (ids,
    keys and mapped fields); the hub side is streamed in batches.
    """
    if not connector.supports_list:
        raise AdminError(f"target {cfg.name!r}: its connector cannot list accounts")
    report = ReconcileReport(cfg.name)
    mapper, key_field = _mapper(cfg)
    with _audited(engine, actor, "reconcile" + (" --apply" if apply else ""), {"target": cfg.name}) as detail:
        accounts: dict[str, Any] = {}
        by_external: dict[str, str] = {}
        by_key: dict[str, str] = {}
        for page in connector.pages():
            for acct in page.accounts:
                accounts[acct.remote_id] = acct
                if acct.external_id:
                    by_external[acct.external_id] = acct.remote_id
                if acct.match_key:
                    by_key[acct.match_key.casefold()] = acct.remote_id
            report.listed = len(accounts)
            if progress is not None:
                progress(report.listed)
        seen: set[str] = set()
        for batch in _identity_batches(engine, None, batch_size):
            with engine.connect() as conn:
                rows = {
                    r.identity_id: r
                    for r in conn.execute(
                        select(sync_ledger).where(
                            L.target == cfg.name, L.identity_id.in_([i.id for i in batch])
                        )
                    )
                }
            for ident in batch:
                _judge_one(
                    cfg,
                    ident,
                    rows.get(ident.id),
                    mapper,
                    key_field,
                    accounts,
                    by_external,
                    by_key,
                    seen,
                    report,
                )
            report.compared += len(batch)
        erased = _erased_ids(engine, cfg.name, [accounts[r].external_id for r in accounts if r not in seen])
        for rid, acct in accounts.items():
            if rid not in seen:
                reason = "erased" if acct.external_id in erased else "unknown"
                report.orphaned.append({"remote_id": rid, "identity_id": acct.external_id, "reason": reason})
        if apply:
            _apply(engine, cfg, connector, report, enqueue, deliver_now)
        detail.update(
            listed=report.listed,
            missing=len(report.missing),
            orphaned=len(report.orphaned),
            differing=len(report.differing),
            applied=report.applied,
        )
    return report


def _judge_one(
    cfg: TargetConfig,
    ident: Any,
    row: Any,
    mapper: Callable[[Mapping[str, Any]], dict[str, Any]],
    key_field: str,
    accounts: Mapping[str, Any],
    by_external: Mapping[str, str],
    by_key: Mapping[str, str],
    seen: set[str],
    report: ReconcileReport,
) -> None:
    """Compare one hub identity with the account the target holds for it (if any)."""
    deleted = ident.deleted_at is not None
    doc = None if deleted else ident.doc
    payload = mapper(doc) if doc else {}
    rid: str | None = None
    if row is not None and row.remote_id in accounts:
        rid = row.remote_id
    elif ident.id in by_external:
        rid = by_external[ident.id]
    elif payload and (key := match_key(payload, key_field)) is not None:
        rid = by_key.get(key.casefold())
    if rid is not None:
        seen.add(rid)
    if row is not None and row.status == guard.HELD:
        report.held += 1
        return
    provisioned = row is not None and sync._provisioned(row)
    action = decide(cfg, doc, deleted=deleted, previously_provisioned=provisioned).action
    if action == sync.UPSERT:
        if rid is None:
            report.missing.append(ident.id)
            return
        fields = _differing(payload, accounts[rid].attributes, key_field)
        if row is not None and row.remote_id is not None and row.remote_id != rid:
            fields.append("(remote id)")
        if fields:
            report.differing.append({"identity_id": ident.id, "remote_id": rid, "fields": fields})
    elif rid is not None and action in ("delete", "erase", sync.NONE):
        # The target should not hold this account (a deactivated or anonymized one it may keep).
        reason = "deleted" if deleted else "out_of_scope"
        report.orphaned.append({"remote_id": rid, "identity_id": ident.id, "reason": reason})


def _erased_ids(engine: Engine, target: str, ids: Sequence[str | None]) -> set[str]:
    wanted = sorted({i for i in ids if i})
    out: set[str] = set()
    with engine.connect() as conn:
        for start in range(0, len(wanted), BATCH):
            out.update(
                conn.scalars(
                    select(erasure_receipts.c.identity_id).where(
                        erasure_receipts.c.identity_id.in_(wanted[start : start + BATCH])
                    )
                )
            )
    return out


def _apply(
    engine: Engine,
    cfg: TargetConfig,
    connector: Connector,
    report: ReconcileReport,
    enqueue: Enqueue | None,
    deliver_now: bool,
) -> None:
    """Repair: resync missing and differing users; remove the orphans the target's policy lets go."""
    repair = sorted({*report.missing, *(d["identity_id"] for d in report.differing)})
    if repair:
        now = {cfg.name: connector} if deliver_now else None
        done = _resync(engine, [cfg], ResyncReport([cfg.name], False), repair, enqueue, now)
        report.applied["resynced"] = sum(done.marked.values()) + sum(done.created.values())
    removable = [(o, a) for o in report.orphaned if (a := _may_delete(cfg, o["reason"])) is not None]
    report.applied["kept"] = len(report.orphaned) - len(removable)
    limits = load_settings()
    if removable and (
        len(removable) > limits.max_count
        or (len(removable) >= limits.min_count and len(removable) > limits.max_share * max(report.listed, 1))
    ):
        # As many deletions as the guard would hold: an operator must look first (or raise the limits).
        report.applied["blocked"] = len(removable)
        return
    deleted = failed = 0
    for orphan, action in removable:
        record = Record(orphan["identity_id"] or "", 0, {}, remote_id=orphan["remote_id"])
        try:
            connector.deprovision(record, action)
            deleted += 1
        except SyncError as exc:
            failed += 1
            log.warning("reconcile: orphan %s at %s not removed: %s", orphan["remote_id"], cfg.name, exc.code)
    report.applied.update(deleted=deleted, failed=failed)


# ----------------------------------------------------------------------------------------- dead letters


def dlq_list(engine: Engine, *, target: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Dead letters not replayed yet (of one target), oldest first."""
    d = dead_letters.c
    q = select(dead_letters).where(d.replayed_at.is_(None)).order_by(d.id).limit(limit)
    if target is not None:
        q = q.where(d.target == target)
    with engine.connect() as conn:
        return [
            {
                "id": r.id,
                "target": r.target,
                "identity_id": r.identity_id,
                "version": r.version,
                "error_code": r.error_code,
                "error_message": r.error_message,
                "attempts": r.attempts,
                "created_at": _iso(r.created_at),
            }
            for r in conn.execute(q)
        ]


def _letters(
    engine: Engine, letter_id: int | None, target: str | None, every: bool | None, *, open_only: bool = True
) -> list[int]:
    """The ids of the dead letters a command names; exactly one of ``letter_id``, ``target``, ``every``
    (``every`` is None where a command does not offer it)."""
    if sum((letter_id is not None, target is not None, bool(every))) != 1:
        raise AdminError("give exactly one of --id, --target" + (", --all" if every is not None else ""))
    d = dead_letters.c
    q = select(d.id).order_by(d.id)
    if letter_id is not None:
        with engine.connect() as conn:
            if conn.scalar(q.where(d.id == letter_id)) is None:
                raise AdminError(f"unknown dead letter {letter_id}")
        return [letter_id]
    if open_only:
        q = q.where(d.replayed_at.is_(None))
    if target is not None:
        q = q.where(d.target == target)
    with engine.connect() as conn:
        return list(conn.scalars(q))


def dlq_replay(
    engine: Engine,
    *,
    actor: str,
    letter_id: int | None = None,
    target: str | None = None,
    every: bool = False,
    enqueue: Enqueue | None = None,
) -> dict[str, list[str]]:
    """Re-arm dead letters (one, a target's, or all open ones) and enqueue them; returns them by target."""
    ids = _letters(engine, letter_id, target, every)
    due: dict[str, list[str]] = defaultdict(list)
    args = {"id": letter_id, "target": target, "all": every}
    with _audited(engine, actor, "dlq replay", args) as detail:
        for lid in ids:
            t, identity = sync.replay_dead_letter(engine, lid)
            if identity not in due[t]:
                due[t].append(identity)
        if due and enqueue is not None:
            enqueue(due)
        detail.update(letters=ids[:1000], replayed=len(ids))
    return dict(due)


def dlq_discard(
    engine: Engine, *, actor: str, letter_id: int | None = None, target: str | None = None
) -> int:
    """Drop dead letters (one, or a target's open ones); their rows stay dead until a newer version."""
    ids = _letters(engine, letter_id, target, None)
    with _audited(engine, actor, "dlq discard", {"id": letter_id, "target": target}) as detail:
        with engine.begin() as conn:
            for start in range(0, len(ids), BATCH):
                conn.execute(delete(dead_letters).where(dead_letters.c.id.in_(ids[start : start + BATCH])))
        detail.update(letters=ids[:1000], discarded=len(ids))
    return len(ids)


# ---------------------------------------------------------------------------------------------- holds


def approve(
    engine: Engine,
    cfg: TargetConfig,
    *,
    actor: str,
    hold_id: int | None = None,
    enqueue: Enqueue | None = None,
) -> guard.Decision:
    """Release a held mass deprovisioning of ``cfg`` (its open hold, or ``hold_id``) and enqueue it."""
    hold_id = _hold(engine, cfg, hold_id)
    with _audited(engine, actor, "approve", {"target": cfg.name, "hold": hold_id}) as detail:
        decision = guard.approve(engine, cfg.name, hold_id, actor, utcnow())
        if decision.released and enqueue is not None:
            enqueue({cfg.name: decision.released})
        detail.update(released=len(decision.released))
    return decision


def reject(engine: Engine, cfg: TargetConfig, *, actor: str, hold_id: int | None = None) -> guard.Decision:
    """Drop a held mass deprovisioning: the accounts stay; erasures stay held (only approval ends them)."""
    hold_id = _hold(engine, cfg, hold_id)
    with _audited(engine, actor, "reject", {"target": cfg.name, "hold": hold_id}) as detail:
        decision = guard.reject(engine, cfg.name, hold_id, actor, utcnow())
        detail.update(rejected=len(decision.rejected), kept=len(decision.kept))
    return decision


def _hold(engine: Engine, cfg: TargetConfig, hold_id: int | None) -> int:
    try:
        return guard.find_hold(engine, cfg.name, hold_id)
    except guard.HoldError as exc:
        raise AdminError(str(exc)) from None
