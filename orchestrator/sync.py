"""Level-triggered sync: fan-out marks versions desired, delivery pushes the CURRENT state and records it.

A delivery holds a fencing lease on each (target, identity) row it works on, reads the identity as it is now,
maps it once per target, calls the connector, and writes every outcome in one transaction that only touches
rows whose lease is still its own. Back-off, quarantine and dead letters live in the ledger, not the broker.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    String,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.type_api import TypeEngine

from connectors.base import Connector, DeprovisionAction, Record, Result
from connectors.errors import (
    ConflictError,
    GoneError,
    PermanentError,
    RetryableError,
    SyncError,
    TargetDisabledError,
)
from orchestrator import gdpr
from orchestrator.db import (
    InList,
    group_members,
    groups,
    identities,
    is_postgres,
    light_rows,
    outbox,
    refresh_statistics,
    row_params,
    row_source,
    unwrapped,
)
from orchestrator.db import now as utcnow
from orchestrator.guard import Candidate, hold_mass_deprovisions
from orchestrator.ledger import (
    DONE,
    HELD,
    Status,
    dead_letters,
    erasure_receipts,
    sync_ledger,
    target_state,
)
from orchestrator.mapping import compile_mapping, match_key, schema_of
from orchestrator.relay import fanned_out
from orchestrator.renewals import renewals
from orchestrator.targets import TargetConfig, decide

L = sync_ledger.c
UPSERT = "upsert"
NONE = "none"
# The receipt the hub writes for itself when it purges a tombstone.
HUB = gdpr.HUB
# Rows of raised priority (consent changes) a delivery takes on top of the ids it was asked for, so they
# jump a backlog queued ahead of them; bounded because those calls come on top of the rate-limit tokens.
_URGENT_PER_CALL = 10
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- fan-out


def fanout(
    engine: Engine, targets: Sequence[TargetConfig], seqs: Sequence[int], *, now: datetime | None = None
) -> dict[str, list[str]]:
    """Mark the current version of every resource these events name as desired per target; returns what
    became due, by target. Idempotent: re-running it, or running an older event late, changes nothing."""
    now = now or utcnow()
    due: dict[str, list[str]] = defaultdict(list)
    with engine.begin() as conn:
        events = light_rows(conn.execute(_EVENTS, {"seqs": list(seqs)}))
        changed: dict[str, set[str]] = defaultdict(set)
        for ev in events:
            changed[ev.resource_id].update(p.lower() for p in ev.changed or ())
        user_ids = sorted({ev.resource_id for ev in events if ev.resource_type == "User"})
        group_ids = sorted({ev.resource_id for ev in events if ev.resource_type == "Group"})
        users = _current_users(conn, user_ids)
        group_rows = _current_groups(conn, group_ids)
        existing = {
            (r.target, r.identity_id): r
            for r in light_rows(conn.execute(_EXISTING, {"ids": user_ids + group_ids}))
        }
        values: list[dict[str, Any]] = []
        for cfg in targets:
            for uid, ident in users.items():
                old = existing.get((cfg.name, uid))
                if old is not None and old.desired_version >= ident.version:
                    continue
                deleted = ident.deleted_at is not None
                decision = decide(
                    cfg,
                    None if deleted else ident.doc,
                    deleted=deleted,
                    previously_provisioned=old is not None and _provisioned(old),
                )
                if decision.action == NONE and old is None:
                    continue  # never held there, nothing to hold: no row needed
                # Urgent: a consent change to an account the target holds (stop mailing now); a first
                # provisioning waits its turn with the other sign-ups.
                prio = int(old is not None and _touches(changed[uid], cfg.priority_paths))
                values.append(_desired(cfg.name, uid, "User", ident.version, decision.action, prio, now))
            if cfg.groups:
                for gid, grp in group_rows.items():
                    old = existing.get((cfg.name, gid))
                    if old is not None and old.desired_version >= grp.version:
                        continue
                    action = "delete" if grp.deleted_at is not None else UPSERT
                    values.append(_desired(cfg.name, gid, "Group", grp.version, action, 0, now))
        # An identity's rows side by side: a page then holds a few rows of each target, and a delivery's
        # claim updates a few per page, which the room its fillfactor keeps takes in place (HOT, no index
        # entries). Target after target, a delivery claimed a page's every row and 18 % of its claims stayed
        # on the page; side by side all did, and a claim took 9.6 µs of PostgreSQL a row instead of 17.2.
        values.sort(key=lambda v: v["identity_id"])
        urgent = {(v["target"], v["identity_id"]) for v in values if v["priority"]}
        # Consent changes first, so the deliveries enqueued from this list take them first.
        for target, ident_id in sorted(_upsert_desired(conn, values), key=lambda k: k not in urgent):
            due[target].append(ident_id)
        fanned_out(conn, seqs)
        erased = {u: i.deleted_at for u, i in users.items() if i.deleted_at is not None}
        gdpr.record_requests(conn, erased, "api")
        finish_erasures(conn, list(erased), now)
    return dict(due)


def _desired(
    target: str, ident_id: str, rtype: str, version: int, action: str, prio: int, now: datetime
) -> dict[str, Any]:
    return {
        "target": target,
        "identity_id": ident_id,
        "resource_type": rtype,
        "desired_version": version,
        "desired_action": action,
        "status": Status.PENDING.value,
        "attempts": 0,
        "priority": prio,
        "enqueued_at": now,
        "created_at": now,
        "updated_at": now,
    }


def _upsert_desired(conn: Connection, values: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Insert or raise desired versions; returns the rows that changed."""
    if not values:
        return []
    postgres = is_postgres(conn)
    params = row_params(_DESIRED_COLUMNS, values, {}, postgres=postgres)
    return [(r.target, r.identity_id) for r in conn.execute(_upsert_desired_statement(postgres), params)]


_DESIRED_COLUMNS: dict[str, TypeEngine[Any]] = {
    "target": String(),
    "identity_id": String(),
    "resource_type": String(),
    "desired_version": BigInteger(),
    "desired_action": String(),
    "status": String(),
    "attempts": Integer(),
    "priority": Integer(),
    "enqueued_at": DateTime(timezone=True),
    "created_at": DateTime(timezone=True),
    "updated_at": DateTime(timezone=True),
}


@functools.cache
def _upsert_desired_statement(postgres: bool) -> Any:
    # Elsewhere than on PostgreSQL, one statement compiled once and sent as an executemany, which SQLAlchemy
    # turns into multi-row INSERTs ("insertmanyvalues"): a ``.values(list)`` statement is compiled anew for
    # every batch, and with a dozen columns per row that compilation cost more than the database's work.
    ins: Any
    if postgres:
        rows = row_source(_DESIRED_COLUMNS, postgres=True)
        ins = postgresql.insert(sync_ledger).from_select(list(rows), select(*rows.values()))
    else:
        ins = sqlite.insert(sync_ledger)
    ex = ins.excluded
    was_dead = L.status == Status.DEAD.value
    return ins.on_conflict_do_update(
        index_elements=[L.target, L.identity_id],
        set_={
            "desired_version": ex.desired_version,
            "desired_action": ex.desired_action,
            # A newer version re-arms a dead letter; a row in back-off keeps its back-off.
            "status": case((L.status == Status.RETRYING.value, L.status), else_=Status.PENDING.value),
            "attempts": case((was_dead, 0), else_=L.attempts),
            "next_attempt_at": case((was_dead, None), else_=L.next_attempt_at),
            "first_failure_at": case((was_dead, None), else_=L.first_failure_at),
            # A raised priority holds until it is delivered; a later ordinary change must not lower it.
            "priority": case(
                (and_(L.synced_version.is_not(None), L.synced_version >= L.desired_version), ex.priority),
                (L.priority > ex.priority, L.priority),
                else_=ex.priority,
            ),
            "enqueued_at": ex.enqueued_at,  # now, as every row of ``values`` says
            "updated_at": ex.updated_at,
        },
        # desired_version only ever grows: an older event changes nothing.
        where=L.desired_version < ex.desired_version,
    ).returning(L.target, L.identity_id)


def _current_users(conn: Connection, ids: Sequence[str]) -> dict[str, Any]:
    if not ids:
        return {}
    return {r.id: r for r in light_rows(conn.execute(_CURRENT_USERS, {"ids": list(ids)}))}


def _current_groups(conn: Connection, ids: Sequence[str]) -> dict[str, Any]:
    if not ids:
        return {}
    return {r.id: r for r in conn.execute(_CURRENT_GROUPS, {"ids": list(ids)})}


_EVENTS = select(outbox.c.resource_type, outbox.c.resource_id, outbox.c.changed).where(
    InList(outbox.c.seq, "seqs")
)
_I, _G = identities.c, groups.c
_CURRENT_USERS = select(_I.id, _I.version, _I.doc, _I.deleted_at, _I.updated_at).where(InList(_I.id, "ids"))
_CURRENT_GROUPS = select(_G.id, _G.version, _G.display_name, _G.deleted_at, _G.updated_at).where(
    InList(_G.id, "ids")
)
_EXISTING = select(
    L.target, L.identity_id, L.remote_id, L.synced_action, L.inflight_key, L.desired_version
).where(InList(L.identity_id, "ids"))


def _provisioned(row: Any) -> bool:
    """The target may hold an account for this row (so leaving scope must deprovision it): one is recorded,
    or a create was sent whose outcome was never recorded (``inflight_key``)."""
    return (
        row.remote_id is not None
        or row.synced_action in (UPSERT, "deactivate", "anonymize")
        or row.inflight_key is not None
    )


def _touches(changed: Iterable[str], paths: Iterable[str]) -> bool:
    """Whether a changed path falls under a priority path. Extension paths match by attribute name
    (``urn:...:User:consents`` matches ``consents``); a whole extension changed matches its attributes."""
    wanted = [_attr_name(p) for p in paths]
    for path in changed:
        name = _attr_name(path)
        for w in wanted:
            if name == w or name.startswith(w + ".") or w.startswith(name + "."):
                return True
            if path.lower() == (schema_of(w.split(".", 1)[0]) or "").lower():
                return True
    return False


def _attr_name(path: str) -> str:
    """A path without its schema URN, lower-cased: ``urn:...:User:consents.x`` -> ``consents.x``."""
    path = path.lower()
    return path.rsplit(":", 1)[1] if path.startswith("urn:") else path


# --------------------------------------------------------------------------------------------- delivery


@dataclass
class DeliveryReport:
    """What one delivery did, by identity id (no PII)."""

    target: str
    done: list[str] = field(default_factory=list)  # now synced / deprovisioned / out of scope
    unchanged: list[str] = field(default_factory=list)  # done without calling the target
    retrying: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    not_due: list[str] = field(default_factory=list)  # already synced, dead, in back-off or leased elsewhere
    held: list[str] = field(default_factory=list)  # deprovisions the mass-deprovisioning guard holds back
    # When each record in ``done`` was committed in the version delivered: the sync lag, without a query.
    committed: dict[str, datetime] = field(default_factory=dict)
    calls: int = 0
    quarantined: bool = False
    disabled: bool = False


@dataclass
class _Job:
    row: Any
    action: str
    version: int
    record: Record
    digest: str
    resource_type: str
    group: Any = None
    result: Result | None = None
    error: Exception | None = None
    committed_at: datetime | None = None  # when the version carried was committed (its row's updated_at)
    erased: bool = False  # the identity is a tombstone: this job carries out an erasure
    confirmation: str | None = None  # the erasure's read-back (gdpr.VERIFIED_ABSENT / REQUESTED)


_mappers: dict[int, tuple[Any, Callable[[Mapping[str, Any]], dict[str, Any]]]] = {}


def compile_target(cfg: TargetConfig, connector: Connector | type[Connector]) -> None:
    """Compile what deliveries to ``cfg`` compile once, ahead of the first (a worker, before it forks)."""
    _mapper(cfg, connector)


def _mapper(
    cfg: TargetConfig, connector: Connector | type[Connector]
) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The compiled mapping of a target (its own, else its connector's default), once per configuration."""
    cached = _mappers.get(id(cfg))
    if cached is None or cached[0] is not cfg:
        cached = (cfg, compile_mapping(cfg.mapping or connector.default_mapping))
        _mappers[id(cfg)] = cached
    return cached[1]


def deliver(
    engine: Engine,
    cfg: TargetConfig,
    connector: Connector,
    identity_ids: Sequence[str],
    *,
    now: datetime | None = None,
    owner: str,
    lease: timedelta = timedelta(minutes=5),
    coalesce: int = 0,
) -> DeliveryReport:
    """Push the current state of the due rows among ``identity_ids`` to one target and record the outcomes.

    ``owner`` must be unique per attempt; ``lease`` is renewed while the calls run, so it only says how long
    the rows of a worker that died stay taken. ``coalesce`` fills a batch short of that many records (up to
    the target's batch size) with other pending rows of the target: under a stream of small changes, one
    delivery carries what many queued deliveries were enqueued for, and those then find their rows done and
    return at once.
    """
    report = DeliveryReport(cfg.name)
    ids = list(dict.fromkeys(identity_ids))
    for chunk in _urgent_first(engine, cfg, ids, now or utcnow(), coalesce=coalesce):
        _deliver_chunk(engine, cfg, connector, chunk, now or utcnow(), owner, lease, report)
        if report.disabled or report.quarantined:
            return report
    return report


def _urgent_first(
    engine: Engine, cfg: TargetConfig, ids: list[str], now: datetime, *, coalesce: int = 0
) -> list[list[str]]:
    """Delivery chunks: the target's due rows of raised priority first, in a chunk of their own (up to
    ``_URGENT_PER_CALL`` of them beyond ``ids``), then ``ids`` in chunks of the target's batch size (topped
    up to ``coalesce`` records with other pending rows of the target)."""
    size = cfg.batch_size
    fill = min(coalesce, size)
    with unwrapped(engine) as conn:
        urgent = list(conn.scalars(_URGENT_IDS, {"k_target": cfg.name, "now": now}))
        taken = set(urgent)
        rest = [i for i in ids if i not in taken]
        if len(rest) < fill:
            known = taken | set(ids)
            more = conn.scalars(_PENDING_IDS, {"k_target": cfg.name, "now": now, "n": fill + len(known)})
            rest += [i for i in more if i not in known][: fill - len(rest)]
    chunks = [urgent[s : s + size] for s in range(0, len(urgent), size)]
    return chunks + [rest[s : s + size] for s in range(0, len(rest), size)]


def _deliver_chunk(
    engine: Engine,
    cfg: TargetConfig,
    connector: Connector,
    ids: list[str],
    now: datetime,
    owner: str,
    lease: timedelta,
    report: DeliveryReport,
) -> None:
    # The target's health, what is due with its current state, and the lease, in one transaction.
    with engine.begin() as conn:
        state = conn.execute(select(target_state).where(target_state.c.target == cfg.name)).first()
        if state is not None and (state.disabled or state.quarantined_until is not None):
            report.disabled = bool(state.disabled)
            report.quarantined = not state.disabled
            return
        due = light_rows(conn.execute(_DUE_USERS, {"k_target": cfg.name, "k_ids": ids, "now": now}))
        users = {r.identity_id: r for r in due if r.id is not None}
        upserts = _upserts(cfg, connector, users)
        rows = _claim(conn, cfg.name, [r.identity_id for r in due], upserts, now, owner, now + lease)
        jobs, purged = _plan(conn, cfg, connector, rows, users, upserts) if rows else ([], [])
    taken = {r.identity_id for r in rows}
    report.not_due.extend(i for i in ids if i not in taken)
    if not rows:
        return
    pending = [
        Candidate(j.row, j.action, j.version) for j in jobs if j.result is None and j.resource_type == "User"
    ]
    if held := hold_mass_deprovisions(engine, cfg.name, pending, now, owner):
        report.held.extend(sorted(held))
        jobs = [j for j in jobs if j.row.identity_id not in held]
    with _renewing(engine, cfg.name, sorted(taken), owner, lease):
        _find_lost_creates(connector, jobs, report)
        late = [j for j in jobs if not _noted_with_claim(j) and j.result is None and j.error is None]
        if late:
            with engine.begin() as conn:
                _note_attempts(conn, cfg.name, late, owner)
        disabled = _call(cfg, connector, [j for j in jobs if j.result is None and j.error is None], report)
    healthy = state is not None and not state.consecutive_failures
    _record(engine, cfg, jobs, purged, now, owner, report, disabled, healthy=healthy)


@contextmanager
def _renewing(engine: Engine, target: str, ids: list[str], owner: str, lease: timedelta) -> Iterator[None]:
    """Renew our lease on these rows every third of its length while the calls run: a slow batch keeps its
    rows (no second worker pushes them meanwhile), and only a dead worker's lease runs out."""

    def renew() -> None:
        with engine.begin() as conn:
            conn.execute(
                update(sync_ledger)
                .where(L.target == target, L.identity_id.in_(ids), L.lease_owner == owner)
                .values(lease_until=utcnow() + lease)
            )

    with renewals.every(lease.total_seconds() / 3, renew):
        yield


def _note_attempts(conn: Connection, target: str, jobs: list[_Job], owner: str) -> None:
    """Before the calls, write under our lease what a worker killed before recording their outcomes leaves
    behind: the digest of the last recorded push no longer tells what the target holds (cleared, so a change
    undone meanwhile is still pushed); an upsert's matching key is the one the account is found by if the push
    landed (``inflight_key``: a create the ledger has no remote id for, an address changed where the target
    keys accounts by it); a deprovisioning's action, which the target may hold from now on (so a later upsert
    switches the account back on); and a remote id ``_find_lost_creates`` found is a fact worth keeping."""
    params = [
        {
            "k_id": j.row.identity_id,
            "k_key": j.record.match_key if _upserts_user(j) and j.record.match_key else j.row.inflight_key,
            "k_remote": j.record.remote_id or j.row.remote_id,
            "k_action": j.action if j.resource_type == "User" and j.action != UPSERT else j.row.synced_action,
        }
        for j in jobs
        if j.result is None and j.error is None
    ]
    if params:
        postgres = is_postgres(conn)
        shared = {"k_target": target, "k_owner": owner}
        conn.execute(_note_attempt(postgres), row_params(_NOTED, params, shared, postgres=postgres))


def _upserts_user(job: _Job) -> bool:
    return job.resource_type == "User" and job.action == UPSERT


def _noted_with_claim(job: _Job) -> bool:
    """Upserts that need no lookup first (``_find_lost_creates``) are noted by the statement that takes their
    rows (``_claim_statement``). Deprovisions wait for the mass-deprovision guard, lookups for what they
    find, and are noted after."""
    return _upserts_user(job) and job.row.inflight_key in (None, job.record.match_key)


def _find_lost_creates(connector: Connector, jobs: list[_Job], report: DeliveryReport) -> None:
    """Upserts whose earlier push went out under another key (an e-mail changed since) and was never
    recorded: look that account up, so it is updated rather than a second one made (a target that keys
    accounts by address, like a newsletter, re-made it under that key). When it is not there, that push did
    not land, and the key of the one about to be sent replaces it."""
    for job in jobs:
        key = job.row.inflight_key
        pending = job.action == UPSERT and job.result is None and job.error is None
        if not pending or key in (None, job.record.match_key):
            continue
        report.calls += 1
        try:
            found = connector.find(key)
        except Exception as exc:  # classified by _record, like a failed call
            job.error = exc
            continue
        if found is not None and found != job.record.remote_id:
            job.record = replace(job.record, remote_id=found)


def _upserts(
    cfg: TargetConfig, connector: Connector, users: Mapping[str, Any]
) -> dict[str, tuple[dict[str, Any], str | None, str]]:
    """What an upsert of each user in the target's scope sends: attributes, matching key and digest. Known
    before the rows are taken, so the claim notes each upsert as it takes its row (``_claim``)."""
    mapper = _mapper(cfg, connector)
    out: dict[str, tuple[dict[str, Any], str | None, str]] = {}
    for ident_id, ident in users.items():
        # An active user in scope is upserted whatever the row says (``decide``): no row needed here.
        if ident.deleted_at is not None:
            continue
        if decide(cfg, ident.doc, deleted=False, previously_provisioned=False).action != UPSERT:
            continue
        attrs = mapper(ident.doc)
        key = match_key(attrs, connector.match_field) if attrs else None
        out[ident_id] = (attrs, key, _digest(UPSERT, attrs))
    return out


def _claim(
    conn: Connection,
    target: str,
    ids: list[str],
    upserts: Mapping[str, tuple[dict[str, Any], str | None, str]],
    now: datetime,
    owner: str,
    until: datetime,
) -> list[Any]:
    """Take the lease on the rows of ``ids`` still due and free, noting each upsert's attempt on the way
    (``_claim_statement``); the rows as they are now."""
    if not ids:
        return []
    values = [
        {"k_id": i, "k_key": upserts[i][1], "k_digest": upserts[i][2]}
        if i in upserts
        else {"k_id": i, "k_key": None, "k_digest": None}
        for i in ids
    ]
    shared = {"k_target": target, "now": now, "v_owner": owner, "v_until": until}
    if is_postgres(conn):
        return light_rows(
            conn.execute(_claim_statement(True), row_params(_CLAIMED, values, shared, postgres=True))
        )
    # SQLite runs an UPDATE ... RETURNING a row at a time.
    statement = _claim_statement(False)
    return [row for v in values for row in light_rows(conn.execute(statement, {**shared, **v}))]


def _plan(
    conn: Connection,
    cfg: TargetConfig,
    connector: Connector,
    rows: list[Any],
    users: Mapping[str, Any],
    upserts: Mapping[str, tuple[dict[str, Any], str | None, str]],
) -> tuple[list[_Job], list[str]]:
    """Decide what each leased row needs, from the users read with the due rows and the groups read now."""
    group_ids = [r.identity_id for r in rows if r.resource_type == "Group"]
    grps = _current_groups(conn, group_ids)
    members = _members(conn, cfg.name, list(grps)) if grps and connector.supports_groups else {}
    mapper = _mapper(cfg, connector)
    jobs: list[_Job] = []
    purged: list[str] = []
    for row in rows:
        if row.resource_type == "Group":
            grp = grps.get(row.identity_id)
            if grp is None:
                purged.append(row.identity_id)
                continue
            if not connector.supports_groups:
                action = NONE
            else:
                action = "delete" if grp.deleted_at is not None else UPSERT
            attrs = {"displayName": grp.display_name, "members": members.get(row.identity_id, [])}
            record = Record(row.identity_id, grp.version, attrs, remote_id=row.remote_id)
            job = _Job(row, action, grp.version, record, _digest(action, attrs), "Group", group=grp)
            job.committed_at = grp.updated_at
        else:
            ident = users.get(row.identity_id)
            if ident is None:
                purged.append(row.identity_id)  # the tombstone was purged: nothing left to do
                continue
            deleted = ident.deleted_at is not None
            doc = None if deleted else ident.doc
            upsert = upserts.get(row.identity_id)
            if upsert is not None:
                action, (attrs, key, digest) = UPSERT, upsert
            else:
                action = decide(cfg, doc, deleted=deleted, previously_provisioned=_provisioned(row)).action
                attrs = mapper(doc) if doc else {}
                key = match_key(attrs, connector.match_field) if attrs else None
                if action != UPSERT and row.remote_id is None and row.inflight_key is not None:
                    # The account a lost create may have made, found by that key alone (a tombstone has none).
                    key, attrs = row.inflight_key, {}
                digest = _digest(action, attrs)
            # Switched back on after a deactivation (consent regranted, reactivated).
            resume = action == UPSERT and row.synced_action == "deactivate"
            record = Record(
                row.identity_id,
                ident.version,
                attrs,
                remote_id=row.remote_id,
                match_key=key,
                resume=resume,
                first_attempt=row.remote_id is None and row.synced_version is None and row.attempts == 0,
            )
            job = _Job(row, action, ident.version, record, digest, "User", erased=deleted)
            job.committed_at = ident.updated_at
        if action == NONE or (job.digest == row.payload_digest and action == row.synced_action):
            job.result = Result(row.remote_id, "unchanged")
        jobs.append(job)
    return jobs, purged


def _members(conn: Connection, target: str, group_ids: list[str]) -> dict[str, list[str]]:
    """Per group, the sorted remote ids at ``target`` of the members the target holds (per the ledger)."""
    q = (
        select(group_members.c.group_id, L.remote_id)
        .join(sync_ledger, and_(L.identity_id == group_members.c.member_id, L.target == target))
        .where(group_members.c.group_id.in_(group_ids), L.remote_id.is_not(None))
    )
    members: dict[str, list[str]] = defaultdict(list)
    for m in conn.execute(q):
        members[m.group_id].append(m.remote_id)
    return {g: sorted(ids) for g, ids in members.items()}


def _rearm_groups(conn: Connection, target: str, jobs: list[_Job], now: datetime) -> None:
    """Make groups due again whose member list at ``target`` was built from remote ids that have moved since:
    the groups of users whose remote id this delivery changed (a group pushed before its member was created
    there lacks that member), and groups this delivery pushed whose members' ids changed meanwhile."""
    moved = [
        j.row.identity_id
        for j in jobs
        if j.resource_type == "User" and j.result is not None and _success(j)["v_remote"] != j.row.remote_id
    ]
    pushed = {
        j.row.identity_id: j.record.attributes["members"]
        for j in jobs
        if j.resource_type == "Group" and j.action == UPSERT and j.result is not None
    }
    current = _members(conn, target, list(pushed)) if pushed else {}
    stale = {g for g, ids in pushed.items() if current.get(g, []) != ids}
    if moved:
        stale.update(
            conn.scalars(select(group_members.c.group_id).where(group_members.c.member_id.in_(moved)))
        )
    if stale:
        retrying = Status.RETRYING.value
        conn.execute(
            update(sync_ledger)
            .where(
                L.target == target,
                L.resource_type == "Group",
                L.identity_id.in_(sorted(stale)),
                L.status != Status.DEAD.value,
            )
            # Not synced any more: due at once (a row in back-off keeps it), picked up by the next sweep.
            .values(
                synced_version=None,
                status=case((L.status == retrying, L.status), else_=Status.PENDING.value),
                enqueued_at=None,
                updated_at=now,
            )
        )


def _digest(action: str, attrs: Mapping[str, Any]) -> str:
    try:
        text = orjson.dumps([action, attrs], option=orjson.OPT_SORT_KEYS, default=str)
    except orjson.JSONEncodeError:  # what orjson refuses and the stdlib writes (integers past 64 bits)
        text = json.dumps([action, attrs], sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(text).hexdigest()


def records_per_call(cfg: TargetConfig, connector: Connector) -> int:
    """How many upserts one request to the target carries: its batch, or one where it takes no batches (or
    cannot say now: a SCIM target unreachable for its ServiceProviderConfig fails the delivery itself)."""
    try:
        batches = connector.supports_batch
    except SyncError:
        return 1
    return max(1, min(cfg.batch_size, connector.max_batch)) if batches else 1


def _call(cfg: TargetConfig, connector: Connector, jobs: list[_Job], report: DeliveryReport) -> bool:
    """Call the target for every job, storing a result or an error on each; True when it disabled us."""
    upserts = [j for j in jobs if j.action == UPSERT and j.resource_type == "User"]
    others = [j for j in jobs if not (j.action == UPSERT and j.resource_type == "User")]
    try:
        if connector.supports_batch and len(upserts) > 1:
            size = records_per_call(cfg, connector)
            for start in range(0, len(upserts), size):
                chunk = upserts[start : start + size]
                report.calls += 1
                try:
                    results = connector.upsert_many([j.record for j in chunk])
                except SyncError as exc:
                    results = [exc] * len(chunk)
                for job, res in zip(chunk, results, strict=True):
                    if isinstance(res, Result):
                        job.result = res
                    else:
                        _follow_up(connector, job, res, report)
        else:
            for job in upserts:
                _one(connector, job, report)
        for job in others:
            _one(connector, job, report)
        for job in jobs:
            if job.erased and job.result is not None:
                remote = job.result.remote_id or job.record.remote_id
                job.confirmation = gdpr.confirm(connector, job.action, remote, job.result.outcome)
    except TargetDisabledError:
        return True
    return False


def _one(connector: Connector, job: _Job, report: DeliveryReport) -> None:
    report.calls += 1
    try:
        job.result = _apply(connector, job)
    except TargetDisabledError:
        raise
    except Exception as exc:  # classified by _follow_up / _record
        _follow_up(connector, job, exc, report)


def _apply(connector: Connector, job: _Job) -> Result:
    rec = job.record
    if job.resource_type == "Group":
        if job.action == UPSERT:
            attrs = rec.attributes
            return connector.upsert_group(
                rec.identity_id, attrs["displayName"], attrs["members"], rec.remote_id
            )
        # No remote id may still mean a create whose answer was lost: the connector looks it up by hub id.
        return connector.delete_group(rec.identity_id, rec.remote_id)
    if job.action == UPSERT:
        return connector.upsert(rec)
    try:
        result = connector.deprovision(rec, DeprovisionAction(job.action))
    except GoneError:
        result = Result(None, "absent")
    key = job.row.inflight_key
    if key is not None and (rec.remote_id is not None or rec.match_key != key):
        # A push whose outcome was lost may have made the account under that key too (a newsletter member
        # is re-made under a changed address): deprovision what is found there as well.
        again = replace(rec, remote_id=None, match_key=key, attributes={})  # found by that key alone
        try:
            other = connector.deprovision(again, DeprovisionAction(job.action))
        except GoneError:
            other = Result(None, "absent")
        if result.outcome == "absent":
            job.record, result = again, other
    return result


def _follow_up(connector: Connector, job: _Job, exc: Exception, report: DeliveryReport) -> None:
    """Adopt on conflict and re-create on gone, once; anything else stays the job's error."""
    if isinstance(exc, TargetDisabledError):
        raise exc
    retry: Record | None = None
    if job.action == UPSERT and isinstance(exc, ConflictError) and exc.remote_id:
        retry = replace(job.record, remote_id=exc.remote_id)
    elif job.action == UPSERT and isinstance(exc, GoneError) and job.record.remote_id is not None:
        retry = replace(job.record, remote_id=None)
    if retry is None:
        job.error = exc
        return
    job.record = retry
    report.calls += 1
    try:
        job.result = _apply(connector, job)
    except TargetDisabledError:
        raise
    except Exception as again:  # classified by _record
        job.error = again


def _record(
    engine: Engine,
    cfg: TargetConfig,
    jobs: list[_Job],
    purged: list[str],
    now: datetime,
    owner: str,
    report: DeliveryReport,
    disabled: bool,
    *,
    healthy: bool = False,
) -> None:
    """Write every outcome in one transaction, only where our lease still holds (fencing). ``healthy``: the
    target had no failures counted when the rows were taken, so a success has nothing to reset."""
    ok: list[dict[str, Any]] = []
    retry: list[dict[str, Any]] = []
    dead: list[tuple[_Job, str, str, int]] = []
    release: list[str] = []
    retryable = successes = 0
    policy = cfg.retry
    for job in jobs:
        if job.result is not None:
            if job.result.outcome == "unchanged":
                report.unchanged.append(job.row.identity_id)
            else:
                successes += 1
                report.done.append(job.row.identity_id)
                if job.committed_at is not None:
                    report.committed[job.row.identity_id] = job.committed_at
            ok.append(_success(job))
            continue
        exc = job.error
        if exc is None:  # not attempted: the target disabled itself first
            release.append(job.row.identity_id)
            continue
        code, message = _describe(exc)
        attempts = job.row.attempts + 1
        if isinstance(exc, PermanentError):
            dead.append((job, code, message, attempts))
            continue
        retryable += isinstance(exc, RetryableError)
        first = job.row.first_failure_at or now
        # An erasure is owed whatever the wait: a target that is down delays it, never drops it.
        persist = job.erased and isinstance(exc, RetryableError)
        expired = (now - _aware(first, now)).total_seconds() >= policy.max_age
        if not persist and (attempts >= policy.max_attempts or expired):
            dead.append((job, code, f"gave up after {attempts} attempts: {message}"[:512], attempts))
            continue
        delay = _backoff(attempts, policy.base, policy.cap)
        hint = getattr(exc, "retry_after", None) or 0.0
        wait = max(delay, timedelta(seconds=float(hint)))
        report.retrying.append(job.row.identity_id)
        retry.append(
            {
                "k_id": job.row.identity_id,
                "r_attempts": attempts,
                "r_next": now + wait,
                "r_first": first,
                "r_code": code,
                "r_message": message,
            }
        )
    mine = {"k_target": cfg.name, "k_owner": owner, "v_now": now}
    plain = not (retry or dead or release or purged or disabled or cfg.groups) and healthy and successes
    if plain and is_postgres(engine) and not any(j.erased or j.confirmation for j in jobs):
        # Only successes, on a healthy target: the one statement needs no transaction around it.
        with unwrapped(engine) as conn:
            conn.execute(_record_success(True), row_params(_RECORDED, ok, mine, postgres=True))
        return
    with engine.begin() as conn:
        _erasure_receipts(conn, cfg.name, jobs, owner, now)
        if ok:
            postgres = is_postgres(conn)
            conn.execute(_record_success(postgres), row_params(_RECORDED, ok, mine, postgres=postgres))
        if retry:
            conn.execute(
                update(sync_ledger)
                .where(_FENCE)
                .values(
                    status=Status.RETRYING.value,
                    attempts=bindparam("r_attempts"),
                    next_attempt_at=bindparam("r_next"),
                    first_failure_at=bindparam("r_first"),
                    last_error_code=bindparam("r_code"),
                    last_error_message=bindparam("r_message"),
                    enqueued_at=None,
                    lease_owner=None,
                    lease_until=None,
                    updated_at=bindparam("v_now"),
                ),
                [{**mine, **r} for r in retry],
            )
        for job, code, message, attempts in dead:
            _dead_letter(conn, cfg.name, job, code, message, attempts, owner, now, report)
        if release:
            conn.execute(
                update(sync_ledger).where(_FENCE).values(lease_owner=None, lease_until=None),
                [{**mine, "k_id": i} for i in release],
            )
        if purged:
            conn.execute(
                delete(sync_ledger).where(
                    L.target == cfg.name, L.identity_id.in_(purged), L.lease_owner == owner
                )
            )
        if cfg.groups:
            _rearm_groups(conn, cfg.name, jobs, now)
        if not (healthy and successes):
            _account(conn, cfg, successes, retryable, now)
        if disabled:
            _state(conn, cfg.name, now, disabled=True)
            report.disabled = True
        # Only tombstones can finish an erasure; one made after the rows were read gets a delivery of its own.
        finish_erasures(conn, [j.row.identity_id for j in jobs if j.erased], now)
        # Only failures counted here quarantine a target; one quarantined elsewhere stops the next chunk.
        quarantined = bool(retryable) and _is_quarantined(conn, cfg.name)
    if disabled or quarantined:
        report.quarantined = report.quarantined or not disabled


def _erasure_receipts(conn: Connection, target: str, jobs: list[_Job], owner: str, now: datetime) -> None:
    """Write the receipt of each erasure this delivery carried out, where our lease still holds."""
    confirmed = {j.row.identity_id: j for j in jobs if j.confirmation is not None and j.result is not None}
    if not confirmed:
        return
    held = conn.scalars(
        select(L.identity_id).where(
            L.target == target, L.identity_id.in_(list(confirmed)), L.lease_owner == owner
        )
    )
    rows = []
    for ident in held:
        job = confirmed[ident]
        rows.append(
            {
                "identity_id": ident,
                "target": target,
                "action": job.action,
                "outcome": _success(job)["v_status"],
                "confirmed_at": now,
                "detail": job.confirmation,
            }
        )
    gdpr.write_receipts(conn, rows)


def _success(job: _Job) -> dict[str, Any]:
    assert job.result is not None
    action = job.action
    if action == NONE:
        status = Status.OUT_OF_SCOPE
    elif action == UPSERT:
        status = Status.SYNCED
    else:
        status = Status.DEPROVISIONED
    remote = job.result.remote_id or job.record.remote_id
    if action in ("delete", "erase") or job.result.outcome == "absent":
        remote = None
    return {
        "k_id": job.row.identity_id,
        "v_version": job.version,
        "v_action": action,
        "v_status": status.value,
        "v_remote": remote,
        "v_digest": job.digest,
        # A call's outcome is known now; a job done without a call leaves the row's doubt as it was.
        "v_inflight": job.row.inflight_key if job.result.outcome == "unchanged" else None,
    }


def _dead_letter(
    conn: Connection,
    target: str,
    job: _Job,
    code: str,
    message: str,
    attempts: int,
    owner: str,
    now: datetime,
    report: DeliveryReport,
) -> None:
    # A refusal (a permanent 4xx) created nothing at the target, so the matching key kept for a create
    # whose outcome might be unknown is personal data with no use left; after retries that gave up, the
    # last outcome is unknown and the key stays, to find the account an erasure must reach.
    refused = isinstance(job.error, PermanentError)
    moved = conn.execute(
        update(sync_ledger)
        .where(L.target == target, L.identity_id == job.row.identity_id, L.lease_owner == owner)
        .values(
            **({"inflight_key": None} if refused else {}),
            status=Status.DEAD.value,
            attempts=attempts,
            last_error_code=code,
            last_error_message=message,
            next_attempt_at=None,
            lease_owner=None,
            lease_until=None,
            updated_at=now,
        )
    )
    if moved.rowcount != 1:
        return  # lost the lease: the other holder decides
    conn.execute(
        insert(dead_letters).values(
            target=target,
            identity_id=job.row.identity_id,
            version=job.version,
            error_code=code,
            error_message=message,
            attempts=attempts,
            created_at=now,
        )
    )
    report.dead.append(job.row.identity_id)


def _describe(exc: Exception) -> tuple[str, str]:
    """A PII-free code and message: connector errors carry identifiers only; anything else by class name."""
    if isinstance(exc, SyncError):
        return gdpr.scrub(exc.code, 64), gdpr.scrub(exc.message or exc.code, 512)
    return "internal", type(exc).__name__


def _backoff(attempts: int, base: float, cap: float) -> timedelta:
    """Full-jitter exponential back-off: uniform in [0, min(cap, base * 2**(attempts-1))] seconds."""
    ceiling = min(cap, base * (2 ** min(attempts - 1, 30)))
    return timedelta(seconds=random.uniform(0, ceiling))  # noqa: S311 - jitter, not a secret


def _aware(value: datetime, like: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything here is UTC.
    if value.tzinfo is None and like.tzinfo is not None:
        return value.replace(tzinfo=like.tzinfo)
    return value


def _due(now: datetime) -> ColumnElement[bool]:
    return and_(
        L.status.not_in((Status.DEAD.value, HELD)),
        or_(
            L.synced_version.is_(None),
            L.desired_version > L.synced_version,
            L.desired_action != L.synced_action,
        ),
        or_(L.next_attempt_at.is_(None), L.next_attempt_at <= now),
    )


def _lease_free(now: datetime) -> ColumnElement[bool]:
    return or_(L.lease_until.is_(None), L.lease_until < now)


# A delivery's statements, built once: building these expressions cost more CPU than running them.
_NOW: Any = bindparam("now")
_URGENT_IDS = (
    select(L.identity_id)
    # The constant inline, so the planner can match the partial index ix_sync_ledger_urgent.
    .where(L.target == bindparam("k_target"), L.priority > literal_column("0"), _due(_NOW), _lease_free(_NOW))
    .order_by(L.updated_at)
    .limit(_URGENT_PER_CALL)
)
# Pending only (a row in back-off waits for its time): the due index narrows the search to them.
_PENDING_IDS = (
    select(L.identity_id)
    .where(L.target == bindparam("k_target"), L.status == Status.PENDING.value, _due(_NOW), _lease_free(_NOW))
    .limit(bindparam("n"))
)
# The rows of a delivery still due and free, with their users' current state (none for a group, or a user
# whose tombstone was purged): read without a lock, so a delivery whose rows are all done writes nothing.
_DUE_USERS = (
    select(L.identity_id, _I.id, _I.version, _I.doc, _I.deleted_at, _I.updated_at)
    .select_from(sync_ledger.outerjoin(identities, _I.id == L.identity_id))
    .where(
        L.target == bindparam("k_target"),
        InList(L.identity_id, "k_ids"),
        _due(_NOW),
        _lease_free(_NOW),
    )
)
_CLAIMED: dict[str, TypeEngine[Any]] = {"k_id": String(), "k_key": String(), "k_digest": String()}


@functools.cache
def _claim_statement(postgres: bool) -> Any:
    """Take the lease where the row is still due and free, and note an upsert's attempt in the same write:
    what a worker killed before recording the outcome leaves behind (``_note_attempts``), here for the
    upserts that need no lookup first. ``k_digest`` is set for an upsert only; the row, as it was, says
    whether the record changed since the last push and whether an earlier push went out under another key
    (``_noted_with_claim``), exactly as the plan reads the row this returns."""
    row = row_source(_CLAIMED, postgres=postgres)
    noted = and_(
        row["k_digest"].is_not(None),
        or_(L.inflight_key.is_(None), L.inflight_key == row["k_key"]),
        or_(L.payload_digest.is_distinct_from(row["k_digest"]), L.synced_action.is_distinct_from(UPSERT)),
    )
    return (
        update(sync_ledger)
        .where(L.target == bindparam("k_target"), L.identity_id == row["k_id"], _due(_NOW), _lease_free(_NOW))
        .values(
            lease_owner=bindparam("v_owner"),
            lease_until=bindparam("v_until"),
            payload_digest=case((noted, None), else_=L.payload_digest),
            inflight_key=case((noted, row["k_key"]), else_=L.inflight_key),
        )
        .returning(*sync_ledger.c)
    )


def _fenced(identity_id: ColumnElement[Any], owner: ColumnElement[Any]) -> ColumnElement[bool]:
    """A row of ours: one whose lease another worker took since is left alone."""
    return and_(L.target == bindparam("k_target"), L.identity_id == identity_id, L.lease_owner == owner)


_FENCE = _fenced(bindparam("k_id"), bindparam("k_owner"))
# The statements that apply many rows read the owner from each row, not from a constant: against a constant
# the planner takes lease_owner's statistics (NULL on nearly every row) to leave one row of the target, scans
# the target's rows for it and joins each with every row sent. At 500 rows sent a delivery's outcome took
# 60 ms of PostgreSQL, 120 µs a row; read from each row, the owner is a join condition, the rows sent are
# joined with the ledger's by key, and it took 18 µs a row.
_NOTED: dict[str, TypeEngine[Any]] = {
    "k_id": String(),
    "k_owner": String(),
    "k_key": String(),
    "k_remote": String(),
    "k_action": String(),
}


@functools.cache
def _note_attempt(postgres: bool) -> Any:
    row = row_source(_NOTED, postgres=postgres)
    return (
        update(sync_ledger)
        .where(_fenced(row["k_id"], row["k_owner"]))
        .values(
            payload_digest=None,
            inflight_key=row["k_key"],
            remote_id=row["k_remote"],
            synced_action=row["k_action"],
        )
    )


_RECORDED: dict[str, TypeEngine[Any]] = {
    "k_id": String(),
    "k_owner": String(),
    "v_version": BigInteger(),
    "v_action": String(),
    "v_status": String(),
    "v_remote": String(),
    "v_digest": String(),
    "v_inflight": String(),
}


@functools.cache
def _record_success(postgres: bool) -> Any:
    row = row_source(_RECORDED, postgres=postgres)
    version = row["v_version"]
    return (
        update(sync_ledger)
        .where(_fenced(row["k_id"], row["k_owner"]))
        .values(
            synced_version=version,
            synced_action=row["v_action"],
            desired_action=case((L.desired_version <= version, row["v_action"]), else_=L.desired_action),
            desired_version=case((L.desired_version < version, version), else_=L.desired_version),
            # A newer version desired meanwhile keeps the row due.
            status=case((L.desired_version > version, Status.PENDING.value), else_=row["v_status"]),
            remote_id=row["v_remote"],
            inflight_key=row["v_inflight"],
            payload_digest=row["v_digest"],
            priority=case((L.desired_version > version, L.priority), else_=0),
            attempts=0,
            next_attempt_at=None,
            first_failure_at=None,
            last_error_code=None,
            last_error_message=None,
            lease_owner=None,
            lease_until=None,
            updated_at=bindparam("v_now"),
        )
    )


# ---------------------------------------------------------------------------------- target health


def _is_quarantined(conn: Connection, target: str) -> bool:
    state = conn.execute(select(target_state).where(target_state.c.target == target)).first()
    return state is not None and state.quarantined_until is not None


def _state(conn: Connection, target: str, now: datetime, **values: Any) -> None:
    """Update a target's health row, creating it first when it is missing."""
    dialect_insert = postgresql.insert if is_postgres(conn) else sqlite.insert
    conn.execute(
        dialect_insert(target_state)
        .values(target=target, consecutive_failures=0, disabled=False, updated_at=now)
        .on_conflict_do_nothing(index_elements=[target_state.c.target])
    )
    if values:
        conn.execute(
            update(target_state).where(target_state.c.target == target).values(updated_at=now, **values)
        )


def _account(conn: Connection, cfg: TargetConfig, successes: int, failures: int, now: datetime) -> None:
    """Count consecutive retryable failures of a target; past the threshold, quarantine it."""
    if successes:
        _state(conn, cfg.name, now, consecutive_failures=0)
        return
    if not failures:
        return
    _state(conn, cfg.name, now)
    count = conn.execute(
        update(target_state)
        .where(target_state.c.target == cfg.name)
        .values(consecutive_failures=target_state.c.consecutive_failures + failures)
        .returning(target_state.c.consecutive_failures, target_state.c.quarantined_until)
    ).one()
    q = cfg.quarantine
    if count.consecutive_failures >= q.threshold and count.quarantined_until is None:
        _state(
            conn,
            cfg.name,
            now,
            quarantined_until=now + timedelta(seconds=q.probe_base),
            probe_interval=q.probe_base,
        )


def probe(
    engine: Engine, cfg: TargetConfig, connector: Connector, *, now: datetime | None = None
) -> list[str] | None:
    """Probe a quarantined target: on success lift the quarantine and return its due ids, else None."""
    now = now or utcnow()
    try:
        connector.probe()
    except Exception:  # any failure means "still down"; the next probe waits longer
        with engine.begin() as conn:
            state = conn.execute(select(target_state).where(target_state.c.target == cfg.name)).first()
            previous = (state.probe_interval if state is not None else None) or cfg.quarantine.probe_base
            interval = min(cfg.quarantine.probe_cap, previous * 2)
            _state(
                conn,
                cfg.name,
                now,
                quarantined_until=now + timedelta(seconds=interval),
                probe_interval=interval,
            )
        return None
    with engine.begin() as conn:
        _state(conn, cfg.name, now, quarantined_until=None, probe_interval=None, consecutive_failures=0)
        # The outage was the target's, not the records': give them a fresh start so none dead-letters.
        conn.execute(
            update(sync_ledger)
            .where(L.target == cfg.name, L.status == Status.RETRYING.value)
            .values(attempts=0, first_failure_at=None, next_attempt_at=None, updated_at=now)
        )
        ids = conn.scalars(
            update(sync_ledger)
            .where(L.target == cfg.name, _due(now))
            .values(enqueued_at=now)
            .returning(L.identity_id)
        ).all()
    return list(ids)


# ---------------------------------------------------------------------------------------- sweeper


@dataclass
class SweepResult:
    """What the sweeper found due: deliveries by target and targets whose probe is due."""

    due: dict[str, list[str]] = field(default_factory=dict)
    probes: list[str] = field(default_factory=list)


def sweep(
    engine: Engine,
    targets: Sequence[TargetConfig],
    now: datetime | None = None,
    *,
    stale_after: timedelta = timedelta(seconds=60),
    limit: int = 5000,
) -> SweepResult:
    """Claim what is due: retries whose time came, pending rows the broker seems to have lost, and probes."""
    now = now or utcnow()
    result = SweepResult()
    with engine.begin() as conn:
        states = {s.target: s for s in conn.execute(select(target_state))}
        for cfg in targets:
            state = states.get(cfg.name)
            if state is not None and state.disabled:
                continue
            if state is not None and state.quarantined_until is not None:
                if _aware(state.quarantined_until, now) <= now:
                    # Claim the probe so that concurrent sweeps do not probe twice.
                    interval = timedelta(seconds=state.probe_interval or 1.0)
                    claimed = conn.execute(
                        update(target_state)
                        .where(
                            target_state.c.target == cfg.name,
                            target_state.c.quarantined_until == state.quarantined_until,
                        )
                        .values(quarantined_until=now + interval, updated_at=now)
                    )
                    if claimed.rowcount == 1:
                        result.probes.append(cfg.name)
                continue
            ids = _stale(conn, cfg.name, now, stale_after, limit)
            if ids:
                conn.execute(
                    update(sync_ledger)
                    .where(L.target == cfg.name, L.identity_id.in_(ids))
                    .values(enqueued_at=now)
                )
                result.due[cfg.name] = ids
    gdpr.maybe_purge_expired(engine, now)  # at most once per IDHUB_RETENTION_PURGE_INTERVAL
    try:
        refresh_statistics(engine)
    except Exception:  # planner statistics must never stop the sweeper; the next pass tries again
        log.exception("refreshing the ledger's statistics failed")
    return result


def _stale(conn: Connection, target: str, now: datetime, stale_after: timedelta, limit: int) -> list[str]:
    """Due rows of ``target`` to enqueue again: retries whose time came (``enqueued_at`` cleared), and rows
    enqueued more than ``stale_after`` ago whose message the broker seems to have lost.

    A row merely waiting behind a backlog is not lost: a target's queue is first in, first out, so while
    deliveries go on, a message is lost only once rows enqueued after it have been delivered. The delivery
    front is the latest ``enqueued_at`` among rows delivered within ``stale_after``; rows enqueued before it
    were overtaken. When nothing was delivered that recently, every stale row counts as lost.
    """
    # Only pending and retrying rows are ever due (fan-out, replays and releases set pending; an outcome
    # keeps a row pending while a newer version is desired): said outright, the due index finds them, where
    # ``_due`` alone read every row of the target on every pass (10 ms at 20,000 rows, per target).
    waiting = L.status.in_((Status.PENDING.value, Status.RETRYING.value))
    conditions = [L.target == target, waiting, _due(now), _lease_free(now)]
    old = L.enqueued_at < now - stale_after
    picked = select(L.identity_id).order_by(L.priority.desc(), L.updated_at).limit(limit)
    ids = list(conn.scalars(picked.where(*conditions, or_(L.enqueued_at.is_(None), old))))
    if not ids:
        return ids
    front = conn.scalar(
        select(func.max(L.enqueued_at)).where(
            L.target == target,
            L.status.in_([s.value for s in DONE]),
            L.updated_at >= now - stale_after,
        )
    )
    if front is None:
        return ids
    return list(
        conn.scalars(
            picked.where(*conditions, or_(L.enqueued_at.is_(None), and_(old, L.enqueued_at < front)))
        )
    )


# ------------------------------------------------------------------------------ dead letters, erasure


def replay_dead_letter(
    engine: Engine, dead_letter_id: int, *, now: datetime | None = None
) -> tuple[str, str]:
    """Re-arm a dead letter's row so the current state is pushed again; returns (target, identity id)."""
    now = now or utcnow()
    with engine.begin() as conn:
        letter = conn.execute(select(dead_letters).where(dead_letters.c.id == dead_letter_id)).one()
        conn.execute(update(dead_letters).where(dead_letters.c.id == dead_letter_id).values(replayed_at=now))
        conn.execute(
            update(sync_ledger)
            .where(L.target == letter.target, L.identity_id == letter.identity_id)
            .values(
                status=Status.PENDING.value,
                attempts=0,
                next_attempt_at=None,
                first_failure_at=None,
                payload_digest=None,
                # Force a push even when the version did not move since.
                synced_version=case((L.synced_version >= L.desired_version, None), else_=L.synced_version),
                enqueued_at=now,
                updated_at=now,
            )
        )
    return letter.target, letter.identity_id


def finish_erasures(conn: Connection, identity_ids: Sequence[str], now: datetime) -> list[str]:
    """Purge tombstones every target is done with, down to their erasure receipts; returns purged ids."""
    if not identity_ids:
        return []
    # Locked, in id order: two targets finishing the same erasure at once would otherwise each see the
    # other's row as not done yet (uncommitted) and neither would purge the tombstone. Waiting here, the
    # second sees the first's committed row (PostgreSQL reads anew per statement; SQLite writers are serial).
    tombstones = {
        r.id: r
        for r in conn.execute(
            select(identities.c.id, identities.c.version, identities.c.deleted_at)
            .where(identities.c.id.in_(list(identity_ids)), identities.c.deleted_at.is_not(None))
            .order_by(identities.c.id)
            .with_for_update()
        )
    }
    tombs = list(tombstones)
    if not tombs:
        return []
    rows: dict[str, list[Any]] = defaultdict(list)
    for r in conn.execute(select(sync_ledger).where(L.identity_id.in_(tombs))):
        rows[r.identity_id].append(r)
    done_states = {s.value for s in DONE}
    finished = [
        t
        for t in tombs
        if all(
            r.status in done_states
            and r.synced_version is not None
            and r.synced_version >= r.desired_version
            # The deletion itself must have reached this row: a delivery that ran ahead of the delete's
            # fan-out (a resync, sync-now) leaves older versions that look done.
            and r.desired_version >= tombstones[t].version
            and r.lease_owner is None
            for r in rows[t]
        )
    ]
    if not finished:
        return []
    receipts = [
        {
            "identity_id": t,
            "target": r.target,
            "action": r.synced_action or NONE,
            "outcome": r.status,
            "confirmed_at": now,
            "detail": "",
        }
        for t in finished
        for r in rows[t]
    ]
    receipts += [
        {
            "identity_id": t,
            "target": HUB,
            "action": "erase",
            "outcome": "purged",
            "confirmed_at": now,
            "detail": "",
        }
        for t in finished
    ]
    dialect_insert = postgresql.insert if is_postgres(conn) else sqlite.insert
    conn.execute(dialect_insert(erasure_receipts).values(receipts).on_conflict_do_nothing())
    conn.execute(delete(sync_ledger).where(L.identity_id.in_(finished)))
    conn.execute(
        delete(identities).where(identities.c.id.in_(finished), identities.c.deleted_at.is_not(None))
    )
    gdpr.complete(conn, {t: tombstones[t].deleted_at for t in finished}, now)
    return finished
