"""The mass-deprovisioning guard: deliveries that would switch off too many of a target's accounts wait.

A delivery asks ``hold_mass_deprovisions`` before it calls a target. When the deprovisions of that target
within the window (already sent, plus every one outstanding in the ledger) exceed ``IDHUB_GUARD_MAX_COUNT``,
or ``IDHUB_GUARD_MAX_SHARE`` of its accounts (judged only from ``IDHUB_GUARD_MIN_COUNT`` on, so that a small
target can still lose a customer), a hold opens: every outstanding deprovision of the target gets status
``held`` and is not sent, and so does every later one until an operator decides. ``approve`` releases the
held rows (they are then sent without being judged again); ``reject`` drops them: the rows stay provisioned,
status ``synced``, their desired version recorded as done and the rejected action kept on the hold item and
in ``last_error_code``. Erasures (deleted identities) are never rejected: they wait for an approval.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    and_,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from orchestrator.db import BigId, identities, is_postgres, metadata
from orchestrator.ledger import HELD, Status, sync_ledger
from orchestrator.settings import SettingsError
from orchestrator.targets import Duration

log = logging.getLogger(__name__)

DEPROVISIONS: Final = ("deactivate", "delete", "anonymize", "erase")
# Accounts a deprovision can still take something from.
_PROVISIONED: Final = ("upsert", "deactivate", "anonymize")
# Any fixed number: the first key of the advisory lock that serialises a target's guard decisions.
_LOCK_NS: Final = 7_143_222
_CHUNK: Final = 500  # ids per IN list: well under the drivers' parameter limits
L = sync_ledger.c


class GuardSettings(BaseSettings):
    """The guard's limits (prefix ``IDHUB_GUARD_``), the same for every target."""

    model_config = SettingsConfigDict(env_prefix="IDHUB_GUARD_", extra="ignore")

    max_share: float = Field(default=0.2, gt=0, le=1, description="Share of a target's accounts per window.")
    max_count: int = Field(default=100, ge=1, description="Deprovisions of one target per window.")
    window: Duration = Field(default=600.0, description="The window, e.g. 10m.")
    min_count: int = Field(default=10, ge=1, description="The share is judged from this many on.")


def load_settings() -> GuardSettings:
    """The guard's settings from the environment; a bad one raises SettingsError naming it in one line."""
    try:
        return GuardSettings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "IDHUB_GUARD_" + "_".join(str(p) for p in err["loc"]).upper()
        raise SettingsError(f"idhub: bad setting {name}: {err['msg']}") from None


deprovision_holds = Table(
    "deprovision_holds",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("target", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # open | approved | rejected
    Column("reason", String(256), nullable=False),  # counts only
    Column("opened_at", DateTime(timezone=True), nullable=False),
    Column("decided_at", DateTime(timezone=True)),
    Column("decided_by", String(128)),
    Index("ix_deprovision_holds_target", "target", "state"),
)

deprovision_hold_items = Table(
    "deprovision_hold_items",
    metadata,
    Column(
        "hold_id",
        BigInteger,
        ForeignKey("deprovision_holds.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("identity_id", String(36), primary_key=True),
    Column("target", String(64), nullable=False),
    Column("action", String(16), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),  # held | released | done | rejected
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_deprovision_hold_items_identity", "target", "identity_id"),
)

# Deprovisions the guard let through, for the window's count (the ledger forgets erased identities).
deprovision_window = Table(
    "deprovision_window",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("target", String(64), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("count", Integer, nullable=False),
    Index("ix_deprovision_window_target_at", "target", "at"),
)

H = deprovision_holds.c
I = deprovision_hold_items.c  # noqa: E741 - the items' columns, as L is the ledger's


@dataclass(frozen=True)
class Candidate:
    """A ledger row a delivery is about to push, with the action it decided and the version it read."""

    row: Any
    action: str
    version: int


def hold_mass_deprovisions(
    engine: Engine, target: str, candidates: Sequence[Candidate], now: datetime, owner: str
) -> set[str]:
    """The ids among ``candidates`` that must not be sent now: their rows are set ``held`` and their lease
    (``owner``'s) released. Deprovisions allowed through are counted in the target's window."""
    wanted = [c for c in candidates if _deprovisions(c)]
    if not wanted:
        return set()
    limits = load_settings()
    since = now - timedelta(seconds=limits.window)
    with engine.begin() as conn:
        _lock(conn, target)
        released = {
            r.identity_id: r.version
            for r in conn.execute(
                select(I.identity_id, I.version)
                .join(deprovision_holds, H.id == I.hold_id)
                .where(
                    I.target == target,
                    I.identity_id.in_([c.row.identity_id for c in wanted]),
                    I.state == "released",
                    H.state == "approved",
                )
            )
        }
        approved = [c for c in wanted if released.get(c.row.identity_id, -1) >= c.version]
        judged = [c for c in wanted if c not in approved]
        hold_id = _open_hold(conn, target)
        if judged and hold_id is None:
            hold_id = _judge(conn, target, judged, limits, since, now)
        held: set[str] = set()
        if judged and hold_id is not None:
            held = _hold(conn, target, hold_id, judged, now, owner)
        elif judged:
            fresh = sum(1 for c in judged if c.row.attempts == 0)  # a retry was counted on its first go
            if fresh:
                conn.execute(insert(deprovision_window).values(target=target, at=now, count=fresh))
            conn.execute(
                delete(deprovision_window).where(
                    deprovision_window.c.target == target, deprovision_window.c.at < since
                )
            )
        if approved:
            conn.execute(
                update(deprovision_hold_items)
                .where(I.target == target, I.identity_id.in_([c.row.identity_id for c in approved]))
                .where(I.state == "released")
                .values(state="done", updated_at=now)
            )
    return held


def _deprovisions(c: Candidate) -> bool:
    """The candidate takes something away from an account the target holds."""
    row = c.row
    provisioned = row.remote_id is not None or row.synced_action in _PROVISIONED
    return c.action in DEPROVISIONS and provisioned and c.action != row.synced_action


def _lock(conn: Connection, target: str) -> None:
    # One guard decision per target at a time; SQLite writers are serialised by BEGIN IMMEDIATE already.
    if is_postgres(conn):
        key = zlib.crc32(target.encode()) - 2**31
        conn.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"), {"ns": _LOCK_NS, "key": key})


def _open_hold(conn: Connection, target: str) -> int | None:
    found = conn.scalar(select(H.id).where(H.target == target, H.state == "open").order_by(H.id).limit(1))
    return int(found) if found is not None else None


def _outstanding(target: str) -> ColumnElement[bool]:
    """Ledger rows of ``target`` waiting to deprovision an account, not yet released by an approval."""
    released = exists().where(
        I.target == target,
        I.identity_id == L.identity_id,
        I.state == "released",
        I.version >= L.desired_version,
    )
    return and_(
        L.target == target,
        L.resource_type == "User",
        L.status.in_((Status.PENDING.value, Status.RETRYING.value)),
        L.desired_action.in_(DEPROVISIONS),
        or_(L.synced_action.is_(None), L.synced_action != L.desired_action),
        or_(L.remote_id.is_not(None), L.synced_action.in_(_PROVISIONED)),
        ~released,
    )


def _judge(
    conn: Connection,
    target: str,
    judged: Sequence[Candidate],
    limits: GuardSettings,
    since: datetime,
    now: datetime,
) -> int | None:
    """Open a hold when the window's deprovisions exceed the limits; returns its id, or None."""
    recent = int(
        conn.scalar(
            select(func.coalesce(func.sum(deprovision_window.c.count), 0)).where(
                deprovision_window.c.target == target, deprovision_window.c.at >= since
            )
        )
        or 0
    )
    outstanding = int(conn.scalar(select(func.count()).where(_outstanding(target))) or 0)
    # A row whose ledger still desires an upsert but whose current state deprovisions (fan-out to come).
    unseen = sum(1 for c in judged if c.row.desired_action not in DEPROVISIONS)
    total = recent + outstanding + unseen
    within = f"{total} deprovisions within {limits.window:g}s"
    if total > limits.max_count:
        reason = f"{within}: more than {limits.max_count}"
    elif total < limits.min_count:
        return None
    else:
        active = select(func.count()).where(
            L.target == target, L.resource_type == "User", L.synced_action == "upsert"
        )
        # The accounts the target held when the window opened: those active now and those taken since.
        accounts = recent + int(conn.scalar(active) or 0)
        if total <= limits.max_share * accounts:
            return None
        reason = f"{within}: more than {limits.max_share:g} of {accounts} accounts"
    hold_id = conn.execute(
        insert(deprovision_holds)
        .values(target=target, state="open", reason=reason[:256], opened_at=now)
        .returning(H.id)
    ).scalar_one()
    log.warning("deprovisioning held for approval: target=%s hold=%s %s", target, hold_id, reason)
    return int(hold_id)


def _hold(
    conn: Connection,
    target: str,
    hold_id: int,
    judged: Sequence[Candidate],
    now: datetime,
    owner: str,
) -> set[str]:
    """Put the judged rows, and every other outstanding deprovision of the target, into the hold."""
    mine = {c.row.identity_id: c for c in judged}
    others = list(
        conn.execute(
            select(L.identity_id, L.desired_action, L.desired_version).where(
                _outstanding(target),
                L.identity_id.not_in(list(mine)),
                or_(L.lease_until.is_(None), L.lease_until < now),
            )
        )
    )
    items = [{"identity_id": i, "action": c.action, "version": c.version} for i, c in mine.items()] + [
        {"identity_id": r.identity_id, "action": r.desired_action, "version": r.desired_version}
        for r in others
    ]
    _upsert_items(conn, target, hold_id, items, now)
    conn.execute(
        update(sync_ledger)
        .where(L.target == target, L.identity_id.in_(list(mine)), L.lease_owner == owner)
        .values(status=HELD, lease_owner=None, lease_until=None, enqueued_at=None, updated_at=now)
    )
    waiting = [r.identity_id for r in others]
    for start in range(0, len(waiting), _CHUNK):
        conn.execute(
            update(sync_ledger)
            .where(
                L.target == target,
                L.identity_id.in_(waiting[start : start + _CHUNK]),
                or_(L.lease_until.is_(None), L.lease_until < now),
            )
            .values(status=HELD, enqueued_at=None, updated_at=now)
        )
    return set(mine)


def _upsert_items(
    conn: Connection, target: str, hold_id: int, items: list[dict[str, Any]], now: datetime
) -> None:
    dialect_insert = postgresql.insert if is_postgres(conn) else sqlite.insert
    for start in range(0, len(items), _CHUNK):
        values = [
            {**item, "hold_id": hold_id, "target": target, "state": "held", "updated_at": now}
            for item in items[start : start + _CHUNK]
        ]
        ins = dialect_insert(deprovision_hold_items).values(values)
        conn.execute(
            ins.on_conflict_do_update(
                index_elements=[I.hold_id, I.identity_id],
                set_={
                    "action": ins.excluded.action,
                    "version": ins.excluded.version,
                    "state": "held",
                    "updated_at": now,
                },
            )
        )


# ------------------------------------------------------------------------------------------ decisions


class HoldError(ValueError):
    """No such hold, or it is not open; the message is one line."""


@dataclass
class Decision:
    """What an approval or a rejection did, by identity id."""

    hold_id: int
    target: str
    released: list[str]
    rejected: list[str]
    kept: list[str]  # erasures a rejection cannot drop: still held


def open_holds(conn: Connection, target: str | None = None) -> list[Any]:
    """The open holds (of one target), oldest first, each with its count of held rows."""
    held = (
        select(func.count())
        .where(I.hold_id == H.id, I.state == "held")
        .correlate(deprovision_holds)
        .scalar_subquery()
    )
    q = select(deprovision_holds, held.label("held")).where(H.state == "open").order_by(H.id)
    if target is not None:
        q = q.where(H.target == target)
    return list(conn.execute(q))


def _pick(conn: Connection, target: str, hold_id: int | None) -> int:
    q = select(H.id, H.target, H.state)
    q = q.where(H.id == hold_id) if hold_id is not None else q.where(H.target == target, H.state == "open")
    row = conn.execute(q.order_by(H.id).limit(1)).first()
    if row is None or row.target != target:
        raise HoldError(
            f"no hold {hold_id} on target {target!r}"
            if hold_id is not None
            else f"target {target!r} has no open hold"
        )
    if row.state != "open":
        raise HoldError(f"hold {row.id} is {row.state} already")
    return int(row.id)


def find_hold(engine: Engine, target: str, hold_id: int | None) -> int:
    """The id of ``hold_id`` if it is an open hold of ``target``, else of the target's open hold; HoldError
    when there is none."""
    with engine.connect() as conn:
        return _pick(conn, target, hold_id)


def approve(engine: Engine, target: str, hold_id: int | None, actor: str, now: datetime) -> Decision:
    """Release a target's open hold (or the given one): its held rows become due and are sent unjudged."""
    with engine.begin() as conn:
        _lock(conn, target)
        hid = _pick(conn, target, hold_id)
        ids = list(
            conn.scalars(
                update(deprovision_hold_items)
                .where(I.hold_id == hid, I.state == "held")
                .values(state="released", updated_at=now)
                .returning(I.identity_id)
            )
        )
        _close(conn, hid, "approved", actor, now)
        for start in range(0, len(ids), _CHUNK):
            conn.execute(
                update(sync_ledger)
                .where(L.target == target, L.identity_id.in_(ids[start : start + _CHUNK]), L.status == HELD)
                .values(status=Status.PENDING.value, next_attempt_at=None, enqueued_at=now, updated_at=now)
            )
    return Decision(hid, target, sorted(ids), [], [])


def reject(engine: Engine, target: str, hold_id: int | None, actor: str, now: datetime) -> Decision:
    """Drop a hold's deprovisions: the rows stay provisioned and done; erasures stay held for approval."""
    with engine.begin() as conn:
        _lock(conn, target)
        hid = _pick(conn, target, hold_id)
        items = list(conn.execute(select(I.identity_id).where(I.hold_id == hid, I.state == "held")))
        tombs: set[str] = set()
        for start in range(0, len(items), _CHUNK):
            chunk = [r.identity_id for r in items[start : start + _CHUNK]]
            tombs.update(
                conn.scalars(
                    select(identities.c.id).where(
                        identities.c.id.in_(chunk), identities.c.deleted_at.is_not(None)
                    )
                )
            )
        drop = [r.identity_id for r in items if r.identity_id not in tombs]
        for start in range(0, len(drop), _CHUNK):
            chunk = drop[start : start + _CHUNK]
            conn.execute(
                update(deprovision_hold_items)
                .where(I.hold_id == hid, I.identity_id.in_(chunk))
                .values(state="rejected", updated_at=now)
            )
            conn.execute(
                update(sync_ledger)
                .where(L.target == target, L.identity_id.in_(chunk), L.status == HELD)
                .values(
                    status=case(
                        (L.synced_action == "upsert", Status.SYNCED.value),
                        (L.synced_action.in_(DEPROVISIONS), Status.DEPROVISIONED.value),
                        else_=Status.OUT_OF_SCOPE.value,
                    ),
                    desired_action=func.coalesce(L.synced_action, "none"),
                    synced_version=L.desired_version,
                    attempts=0,
                    next_attempt_at=None,
                    first_failure_at=None,
                    last_error_code="deprovision_rejected",
                    last_error_message=f"hold {hid} rejected by an operator",
                    enqueued_at=None,
                    updated_at=now,
                )
            )
        if not tombs:
            _close(conn, hid, "rejected", actor, now)
    return Decision(hid, target, [], sorted(drop), sorted(tombs))


def _close(conn: Connection, hold_id: int, state: str, actor: str, now: datetime) -> None:
    conn.execute(
        update(deprovision_holds)
        .where(H.id == hold_id)
        .values(state=state, decided_at=now, decided_by=actor[:128])
    )


__all__ = [
    "DEPROVISIONS",
    "HELD",
    "Candidate",
    "Decision",
    "GuardSettings",
    "HoldError",
    "approve",
    "deprovision_hold_items",
    "deprovision_holds",
    "deprovision_window",
    "find_hold",
    "hold_mass_deprovisions",
    "load_settings",
    "open_holds",
    "reject",
]
