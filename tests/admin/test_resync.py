"""Resync: rows are made due again even where versions match, driven through the broker or at once; a full
resync streams the identities in keyset batches; an erased customer is never created again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select

from orchestrator import admin, migrations
from orchestrator.admin import audit_log
from orchestrator.db import make_engine, now
from orchestrator.ledger import sync_ledger
from tests.admin.conftest import (
    bulk_customers,
    cfg_of,
    connect,
    erase,
    provision,
    put_customer,
    row,
    shop_customers,
    statuses,
)

ACTOR = "test:operator"


def _requests(sandboxes: Any, kind: str = "shop") -> list[dict[str, Any]]:
    sim = sandboxes.servers[kind].sim
    with sim.lock:
        return [dict(e) for e in sim.log]


def test_resync_one_user_pushes_again_although_versions_match(
    clean: Engine, targets: list, sandboxes
) -> None:
    uid = put_customer(clean)
    other = put_customer(clean)
    provision(clean, targets)
    sent = len(_requests(sandboxes))
    shop = cfg_of(targets, "shop")
    connector = connect(shop)
    try:
        report = admin.resync(clean, [shop], actor=ACTOR, user_ids=[uid], connectors={"shop": connector})
    finally:
        connector.close()
    assert report.marked == {"shop": 1}
    assert report.delivered["shop"]["done"] == 1
    calls = _requests(sandboxes)[sent:]
    assert [(c["method"], c["status"]) for c in calls] == [("PUT", 200)]  # an update, not a second account
    assert len(shop_customers(sandboxes)) == 2
    r = row(clean, "shop", uid)
    assert (r.status, r.synced_version, r.attempts) == ("synced", 1, 0)
    assert row(clean, "shop", other).payload_digest is not None  # the other user was left alone
    with clean.connect() as conn:
        entry = conn.execute(select(audit_log).order_by(audit_log.c.id.desc())).first()
    assert (entry.actor, entry.action, entry.result) == (ACTOR, "resync", "ok")
    assert entry.args == {"targets": ["shop"], "users": [uid]}


def test_resync_enqueues_when_not_delivering(clean: Engine, targets: list) -> None:
    ids = [put_customer(clean) for _ in range(3)]
    provision(clean, targets)
    sent: list[dict[str, list[str]]] = []
    report = admin.resync(clean, targets, actor=ACTOR, enqueue=lambda due: sent.append(dict(due)))
    assert sorted(sent[0]["shop"]) == sorted(ids)
    assert sorted(sent[0]["news"]) == sorted(ids)
    assert report.enqueued == {"shop": 3, "news": 3}
    assert statuses(clean, "shop") == {"pending": 3}


def test_resync_marks_delivered_rows_due_again_on_sqlite(sqlite_url: str, targets: list) -> None:
    engine = make_engine(sqlite_url)
    migrations.upgrade(engine)
    ids = [put_customer(engine) for _ in range(3)]
    stamp = now()
    # As a finished delivery leaves them: synced, the pushed payload's digest kept.
    delivered = {
        "resource_type": "User",
        "desired_version": 1,
        "desired_action": "upsert",
        "synced_version": 1,
        "synced_action": "upsert",
        "status": "synced",
        "payload_digest": "d",
        "attempts": 0,
        "priority": 0,
        "created_at": stamp,
        "updated_at": stamp,
    }
    rows = [{"target": t, "identity_id": i, **delivered} for i in ids for t in ("shop", "news")]
    with engine.begin() as conn:
        conn.execute(insert(sync_ledger), rows)
    shop = cfg_of(targets, "shop")
    sent: list[dict[str, list[str]]] = []
    report = admin.resync(
        engine, [shop], actor=ACTOR, user_ids=ids[:2], enqueue=lambda due: sent.append(dict(due))
    )
    assert report.marked == {"shop": 2}
    assert sorted(sent[0]["shop"]) == sorted(ids[:2])
    for i in ids[:2]:
        r = row(engine, "shop", i)
        assert (r.status, r.synced_version, r.payload_digest, r.desired_version) == ("pending", None, None, 1)
    untouched = [row(engine, "shop", ids[2]), row(engine, "news", ids[0])]
    assert [(r.status, r.payload_digest) for r in untouched] == [("synced", "d"), ("synced", "d")]
    engine.dispose()


@pytest.fixture
def identity_queries(clean: Engine) -> Iterator[list[str]]:
    """Every SELECT on the identities table the engine runs while the test does."""
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM identities" in statement:
            seen.append(statement)

    event.listen(clean, "before_cursor_execute", note)
    yield seen
    event.remove(clean, "before_cursor_execute", note)


def test_full_resync_streams_in_bounded_batches(clean: Engine, targets: list, identity_queries) -> None:
    shop = cfg_of(targets, "shop")
    ids = bulk_customers(clean, 2600)
    batches: list[list[str]] = []
    progress: list[int] = []
    report = admin.resync(
        clean,
        [shop],
        actor=ACTOR,
        enqueue=lambda due: batches.append(list(due["shop"])),
        batch_size=500,
        progress=progress.append,
    )
    assert report.batches == 6
    assert report.identities == 2600
    assert report.created == {"shop": 2600}
    assert [len(b) for b in batches] == [500, 500, 500, 500, 500, 100]
    assert sorted(i for b in batches for i in b) == sorted(ids)
    assert progress == [500, 1000, 1500, 2000, 2500, 2600]
    # Every read of the identities was a page: keyset on the id with a LIMIT, never the whole table.
    assert len(identity_queries) == 6
    assert all("LIMIT" in q and "ORDER BY identities.id" in q for q in identity_queries)
    assert sum("identities.id >" in q for q in identity_queries) == 5

    with clean.connect() as conn:
        before = conn.execute(select(func.count(), func.max(sync_ledger.c.updated_at))).one()
    dry = admin.resync(clean, [shop], actor=ACTOR, dry_run=True, enqueue=batches.append, batch_size=1000)
    assert dry.marked == {"shop": 2600}
    assert dry.batches == 3
    assert len(batches) == 6
    with clean.connect() as conn:
        assert conn.execute(select(func.count(), func.max(sync_ledger.c.updated_at))).one() == before


def test_resync_never_creates_an_erased_customer(clean: Engine, targets: list, sandboxes) -> None:
    shop = cfg_of(targets, "shop")
    uid = put_customer(clean)
    provision(clean, targets)
    erase(clean, uid)
    provision(clean, targets)  # deleted at the shop, tombstone purged
    assert shop_customers(sandboxes) == []
    fresh = put_customer(clean)
    pending = put_customer(clean)
    provision(clean, targets)
    erase(clean, pending)  # a tombstone whose deletion no fan-out has marked yet
    connector = connect(shop)
    try:
        report = admin.resync(clean, [shop], actor=ACTOR, connectors={"shop": connector})
    finally:
        connector.close()
    assert report.identities == 2  # the purged customer is not in the hub any more
    assert report.delivered["shop"]["done"] == 2
    # The tombstone was deleted at the shop, not pushed; the erased customer did not come back.
    assert [c["email"] for c in shop_customers(sandboxes)] == [f"c-{fresh[:8]}@example.test"]
