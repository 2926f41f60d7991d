"""Privacy by design (GDPR): erasure requests and receipts (Art. 17), access exports (Art. 15), the scrubber
for stored error text, and retention.

An erasure is a tombstone (``scim.storage.tombstone``: the hub's personal data goes at once), then each
target's ``on_delete`` path driven by the ledger, a receipt row per target when it is done (with a
read-back confirmation where the target can be read), and the purge of the tombstone, its ledger rows and
its dead letters once every target is done. Nothing this module stores holds personal data: identity ids,
target names, actions, outcomes and times.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import (
    Column,
    DateTime,
    Index,
    String,
    Table,
    delete,
    inspect,
    or_,
    select,
    union,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from connectors.base import Connector
from orchestrator.db import identities, is_postgres, metadata
from orchestrator.db import now as utcnow
from orchestrator.ledger import DONE, dead_letters, erasure_receipts, sync_ledger
from orchestrator.logs import redact_text
from orchestrator.mapping import compile_mapping, match_key
from orchestrator.relay import notify
from orchestrator.scim.storage import tombstone
from orchestrator.targets import TargetConfig, decide

log = logging.getLogger("idhub.gdpr")

HUB: Final = "*hub*"  # the receipt row the hub writes for itself when it purges a tombstone
VERIFIED_ABSENT: Final = "verified-absent"  # a read-back found no account after the erasure
REQUESTED: Final = "requested"  # the target accepted the request; it cannot be (or was not) read back
PENDING: Final = "pending"
# Policies that remove the account, so a read-back can confirm its absence.
_REMOVING: Final = frozenset({"delete", "erase"})

erasure_requests = Table(
    "erasure_requests",
    metadata,
    Column("identity_id", String(36), primary_key=True),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("source", String(16), nullable=False),  # api (a SCIM DELETE) or cli (``idhub gdpr erase``)
    Column("completed_at", DateTime(timezone=True)),  # set when the tombstone is purged
    Index("ix_erasure_requests_completed_at", "completed_at"),
)

# The rows a delivery takes first (``sync._urgent_first``): partial, so it holds only the few raised ones.
Index(
    "ix_sync_ledger_urgent",
    sync_ledger.c.target,
    sync_ledger.c.updated_at,
    postgresql_where=sync_ledger.c.priority > 0,
    sqlite_where=sync_ledger.c.priority > 0,
)


class RetentionSettings(BaseSettings):
    """How long privacy records are kept (prefix ``IDHUB_``)."""

    model_config = SettingsConfigDict(env_prefix="IDHUB_", extra="ignore")

    receipt_retention_days: int = Field(default=3650, ge=1, description="Erasure receipts, after completion.")
    audit_retention_days: int = Field(default=365, ge=1, description="Rows of the admin audit log.")
    retention_purge_interval: float = Field(
        default=3600.0, gt=0, description="Seconds between two retention purges run by the sweeper."
    )


# ------------------------------------------------------------------------------------------ scrubbing


def scrub(text: str | None, limit: int = 512) -> str:
    """``text`` fit to be stored: the log redaction (e-mails, phones, credentials, name pairs), then cut."""
    return redact_text(text or "")[:limit]


# ------------------------------------------------------------------------------ erasure bookkeeping


def _insert(conn: Connection) -> Any:
    return postgresql.insert if is_postgres(conn) else sqlite.insert


def record_requests(conn: Connection, requested: Mapping[str, datetime], source: str) -> None:
    """Note when these identities' erasure was asked for (the first note wins)."""
    if requested:
        values = [{"identity_id": i, "requested_at": t, "source": source} for i, t in requested.items()]
        conn.execute(_insert(conn)(erasure_requests).values(values).on_conflict_do_nothing())


def confirm(connector: Connector, action: str, remote_id: str | None, outcome: str) -> str:
    """Read the account back after an erasure: ``verified-absent`` when the target holds nothing."""
    if action not in _REMOVING:
        return REQUESTED  # deactivate and anonymize keep an account by design
    if connector.supports_read and remote_id:
        try:
            held = connector.read(remote_id)
        except Exception:  # a failed read-back does not undo the erasure; it stays unconfirmed
            return REQUESTED
        return VERIFIED_ABSENT if held is None else REQUESTED
    # With no remote id nothing could be read back: an "absent" may only mean no account was looked up.
    return REQUESTED


def write_receipts(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Upsert per-target receipt rows (identity_id, target, action, outcome, confirmed_at, detail)."""
    if not rows:
        return
    ins = _insert(conn)(erasure_receipts).values(list(rows))
    conn.execute(
        ins.on_conflict_do_update(
            index_elements=[erasure_receipts.c.identity_id, erasure_receipts.c.target],
            set_={
                "action": ins.excluded.action,
                "outcome": ins.excluded.outcome,
                "confirmed_at": ins.excluded.confirmed_at,
                "detail": ins.excluded.detail,
            },
        )
    )


def complete(conn: Connection, requested: Mapping[str, datetime], now: datetime) -> None:
    """Close the requests of purged tombstones and drop their dead letters (their only remaining trace)."""
    if not requested:
        return
    ins = _insert(conn)(erasure_requests).values(
        [
            {"identity_id": i, "requested_at": t, "source": "api", "completed_at": now}
            for i, t in requested.items()
        ]
    )
    conn.execute(
        ins.on_conflict_do_update(index_elements=[erasure_requests.c.identity_id], set_={"completed_at": now})
    )
    conn.execute(delete(dead_letters).where(dead_letters.c.identity_id.in_(list(requested))))


def erased(conn: Connection, identity_id: str) -> bool:
    """Whether an identity is erased or being erased: nothing may ever provision it again."""
    row = conn.execute(select(identities.c.deleted_at).where(identities.c.id == identity_id)).first()
    if row is not None:
        return row.deleted_at is not None
    known = select(erasure_requests.c.identity_id).where(erasure_requests.c.identity_id == identity_id)
    receipt = select(erasure_receipts.c.identity_id).where(erasure_receipts.c.identity_id == identity_id)
    return conn.execute(union(known, receipt)).first() is not None


# ------------------------------------------------------------------------------------ operations


def find_identity(conn: Connection, user: str, *, lock: bool = False) -> Any:
    """The identity named by id, userName or primary e-mail (case-insensitive); LookupError if none.

    ``lock`` locks its row (PostgreSQL; SQLite writers are serialised anyway).
    """
    q = select(identities.c.id, identities.c.version, identities.c.deleted_at)
    if lock:
        q = q.with_for_update()
    row = conn.execute(q.where(identities.c.id == user)).first()
    if row is None:
        row = conn.execute(q.where(identities.c.user_name_ci == user.lower())).first()
    if row is None:
        rows = conn.execute(q.where(identities.c.email_ci == user.lower()).limit(2)).all()
        row = rows[0] if len(rows) == 1 else None
    if row is None:
        raise LookupError("no such identity")
    return row


def erase(engine: Engine, user: str, *, actor: str = "cli") -> tuple[str, bool]:
    """Erase an identity the way a SCIM DELETE does, in one transaction; returns (id, newly requested).

    An identity already erased (a tombstone) is not erased twice; one already purged raises LookupError.
    """
    with engine.begin() as conn:
        # Locked: a concurrent SCIM write must not slip between this read and the tombstone.
        row = find_identity(conn, user, lock=True)
        if row.deleted_at is not None:
            return row.id, False
        tombstone(conn, "User", row.id, row.version)
        stamp = conn.execute(select(identities.c.deleted_at).where(identities.c.id == row.id)).scalar_one()
        record_requests(conn, {row.id: stamp}, actor)
        _audit(conn, actor, "gdpr.erase", row.id, stamp)
        notify(conn)
    return row.id, True


def _audit(conn: Connection, actor: str, action: str, identity_id: str, at: datetime) -> None:
    """One audit line: to the log, and to the admin audit log when the store has that table."""
    log.info("audit action=%s identity=%s actor=%s", action, identity_id, actor)
    if inspect(conn).has_table("audit_log"):
        from orchestrator.admin import audit_log  # the admin module's table; imported late, it sits above

        conn.execute(
            audit_log.insert().values(
                at=at, actor=actor, action=action, args={"identity_id": identity_id}, result="ok", detail={}
            )
        )


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def receipt(engine: Engine, identity_id: str) -> dict[str, Any]:
    """The erasure receipt of one identity, PII-free; targets not done yet show ``pending``."""
    with engine.connect() as conn:
        request = conn.execute(
            select(erasure_requests).where(erasure_requests.c.identity_id == identity_id)
        ).first()
        tomb = conn.execute(
            select(identities.c.deleted_at).where(
                identities.c.id == identity_id, identities.c.deleted_at.is_not(None)
            )
        ).first()
        rows = {
            r.target: r
            for r in conn.execute(
                select(erasure_receipts).where(erasure_receipts.c.identity_id == identity_id)
            )
        }
        ledger = list(conn.execute(select(sync_ledger).where(sync_ledger.c.identity_id == identity_id)))
    if request is None and tomb is None and not rows:
        raise LookupError("no erasure is known for this identity")
    done_states = {s.value for s in DONE}
    targets: dict[str, dict[str, Any]] = {}
    for name, r in rows.items():
        if name != HUB:
            targets[name] = {
                "target": name,
                "action": r.action,
                "outcome": r.outcome,
                "time": _iso(r.confirmed_at),
                "confirmation": r.detail or REQUESTED,
            }
    for row in ledger:
        finished = (
            row.status in done_states
            and row.synced_version is not None
            and row.synced_version >= row.desired_version
        )
        if tomb is not None and not (finished and row.target in targets):
            targets[row.target] = {
                "target": row.target,
                "action": row.desired_action,
                "outcome": PENDING,
                "time": None,
                "confirmation": None,
                "status": row.status,
                "attempts": row.attempts,
                "last_error_code": row.last_error_code,
            }
    hub = rows.get(HUB)
    requested_at = request.requested_at if request is not None else (tomb.deleted_at if tomb else None)
    return {
        "identity_id": identity_id,
        "requested_at": _iso(requested_at),
        "source": request.source if request is not None else None,
        "status": "complete" if hub is not None else PENDING,
        "targets": [targets[k] for k in sorted(targets)],
        "hub": {
            "personal_data_erased_at": _iso(tomb.deleted_at if tomb else requested_at),
            "purged_at": _iso(hub.confirmed_at) if hub is not None else None,
        },
    }


def pending_erasures(engine: Engine) -> list[dict[str, Any]]:
    """Erasures not finished yet, oldest first: identity id, when asked, and the targets still to do."""
    done_states = [s.value for s in DONE]
    with engine.connect() as conn:
        tombs = list(
            conn.execute(
                select(identities.c.id, identities.c.deleted_at)
                .where(identities.c.deleted_at.is_not(None))
                .order_by(identities.c.deleted_at, identities.c.id)
            )
        )
        ids = [t.id for t in tombs]
        open_rows: dict[str, list[Any]] = {i: [] for i in ids}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            q = select(sync_ledger).where(
                sync_ledger.c.identity_id.in_(chunk),
                or_(
                    sync_ledger.c.status.not_in(done_states),
                    sync_ledger.c.synced_version.is_(None),
                    sync_ledger.c.synced_version < sync_ledger.c.desired_version,
                ),
            )
            for r in conn.execute(q.order_by(sync_ledger.c.target)):
                open_rows[r.identity_id].append(r)
    return [
        {
            "identity_id": t.id,
            "requested_at": _iso(t.deleted_at),
            "targets": [
                {
                    "target": r.target,
                    "action": r.desired_action,
                    "status": r.status,
                    "attempts": r.attempts,
                    "last_error_code": r.last_error_code,
                    "next_attempt_at": _iso(r.next_attempt_at),
                }
                for r in open_rows[t.id]
            ],
        }
        for t in tombs
    ]


# ---------------------------------------------------------------------------------------- export

ConnectorFor = Callable[[TargetConfig], Connector | None]


def hub_resource(engine: Engine, identity_id: str) -> dict[str, Any] | None:
    """The identity as the SCIM API serves it (the full resource), or None for a tombstone."""
    from orchestrator import settings as settings_mod
    from orchestrator.api import build_provider  # the API's own models
    from orchestrator.scim import storage as scim_storage

    cfg = settings_mod.get()
    provider = build_provider(cfg)
    store = scim_storage.SqlStorage(provider, max_string_length=cfg.max_string_length)
    user_type = next(rt for rt in provider.resource_types if rt.name == "User")
    with engine.connect() as conn, scim_storage.bind(conn):
        try:
            resource = store.get(user_type, identity_id)
        except Exception:  # NotFound: a tombstone or a purged identity
            return None
    from scim2_models import Context

    dumped: dict[str, Any] = resource.model_dump(scim_ctx=Context.RESOURCE_QUERY_RESPONSE)
    return dumped


def export(
    engine: Engine,
    user: str,
    targets: Iterable[TargetConfig],
    connector_for: ConnectorFor,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """An access-request export (Art. 15): the hub's record, and per target what it should hold (the
    mapping), the ledger's state and, where the target can be read, what it holds now."""
    from connectors import registry

    with engine.connect() as conn:
        row = find_identity(conn, user)
        doc = conn.execute(select(identities.c.doc).where(identities.c.id == row.id)).scalar_one()
        ledger = {
            r.target: r for r in conn.execute(select(sync_ledger).where(sync_ledger.c.identity_id == row.id))
        }
    deleted = row.deleted_at is not None
    out: dict[str, Any] = {
        "identity_id": row.id,
        "exported_at": _iso(now or utcnow()),
        "hub": {"erased": deleted, "resource": None if deleted else hub_resource(engine, row.id)},
        "targets": [],
    }
    for cfg in targets:
        lrow = ledger.get(cfg.name)
        connector = connector_for(cfg)
        cls = type(connector) if connector is not None else registry.connector_class(cfg.connector)
        mapped = {} if deleted else compile_mapping(cfg.mapping or cls.default_mapping)(doc)
        decision = decide(
            cfg, None if deleted else doc, deleted=deleted, previously_provisioned=lrow is not None
        )
        entry: dict[str, Any] = {
            "target": cfg.name,
            "connector": cfg.connector,
            "decision": {"action": decision.action, "reason": decision.reason},
            "should_hold": mapped if decision.action in ("upsert", "deactivate") else None,
            "mapped": mapped,
            "ledger": None
            if lrow is None
            else {
                "status": lrow.status,
                "remote_id": lrow.remote_id,
                "desired_version": lrow.desired_version,
                "synced_version": lrow.synced_version,
                "synced_action": lrow.synced_action,
                "attempts": lrow.attempts,
                "last_error_code": lrow.last_error_code,
                "updated_at": _iso(lrow.updated_at),
            },
            "held_now": _held(connector, lrow.remote_id if lrow else None, mapped),
        }
        out["targets"].append(entry)
    return out


def _held(connector: Connector | None, remote_id: str | None, mapped: Mapping[str, Any]) -> dict[str, Any]:
    """What the target holds now, read through its connector, or why that cannot be told."""
    if connector is None:
        return {"available": False, "reason": "connector unavailable"}
    if not connector.supports_read:
        return {"available": False, "reason": f"{connector.kind} cannot be read"}
    try:
        if remote_id is None and mapped:
            key = match_key(mapped, connector.match_field)
            remote_id = connector.find(key) if key else None
        held = connector.read(remote_id) if remote_id else None
    except Exception as exc:  # the target is down: say so, the rest of the export stands
        return {"available": False, "reason": scrub(getattr(exc, "code", type(exc).__name__))}
    return {"available": True, "remote_id": remote_id, "account": None if held is None else dict(held)}


# -------------------------------------------------------------------------------------- retention

_last_purge: dict[str, datetime] = {}


def purge_expired(engine: Engine, now: datetime | None = None) -> dict[str, int]:
    """Delete erasure receipts past ``IDHUB_RECEIPT_RETENTION_DAYS`` (after completion) and audit rows past
    ``IDHUB_AUDIT_RETENTION_DAYS`` (when the audit table exists); returns rows deleted per table."""
    now = now or utcnow()
    cfg = RetentionSettings()
    cutoff = now - timedelta(days=cfg.receipt_retention_days)
    counts = {"erasure_receipts": 0, "erasure_requests": 0, "audit_log": 0}
    with engine.begin() as conn:
        expired = union(
            select(erasure_requests.c.identity_id).where(erasure_requests.c.completed_at < cutoff),
            select(erasure_receipts.c.identity_id).where(
                erasure_receipts.c.target == HUB, erasure_receipts.c.confirmed_at < cutoff
            ),
        )
        ids = list(conn.scalars(expired))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            counts["erasure_receipts"] += conn.execute(
                delete(erasure_receipts).where(erasure_receipts.c.identity_id.in_(chunk))
            ).rowcount
            counts["erasure_requests"] += conn.execute(
                delete(erasure_requests).where(
                    erasure_requests.c.identity_id.in_(chunk), erasure_requests.c.completed_at.is_not(None)
                )
            ).rowcount
        counts["audit_log"] = _purge_audit(conn, now - timedelta(days=cfg.audit_retention_days))
    if any(counts.values()):
        log.info("retention purge %s", " ".join(f"{k}={v}" for k, v in counts.items()))
    return counts


def _purge_audit(conn: Connection, cutoff: datetime) -> int:
    """Delete audit rows older than ``cutoff``; the table is the admin module's, so only if it exists."""
    if not inspect(conn).has_table("audit_log"):
        return 0
    from orchestrator.admin import audit_log

    return int(conn.execute(delete(audit_log).where(audit_log.c.at < cutoff)).rowcount)


def maybe_purge_expired(engine: Engine, now: datetime) -> dict[str, int] | None:
    """Run ``purge_expired`` when ``IDHUB_RETENTION_PURGE_INTERVAL`` passed since this process last did."""
    key = str(engine.url)
    last = _last_purge.get(key)
    if last is not None and (now - last).total_seconds() < RetentionSettings().retention_purge_interval:
        return None
    _last_purge[key] = now
    try:
        return purge_expired(engine, now)
    except Exception:  # retention must never stop the sweeper that runs it; the next interval tries again
        log.exception("retention purge failed")
        return None


__all__ = [
    "HUB",
    "PENDING",
    "REQUESTED",
    "VERIFIED_ABSENT",
    "RetentionSettings",
    "complete",
    "confirm",
    "erase",
    "erased",
    "erasure_requests",
    "export",
    "find_identity",
    "maybe_purge_expired",
    "pending_erasures",
    "purge_expired",
    "receipt",
    "record_requests",
    "scrub",
    "write_receipts",
]
