"""The mass-deprovisioning guard, end to end against the shop simulator: a mass deprovisioning waits for an
operator; approving sends it, rejecting keeps every account; small ones pass, counted over the window."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, update

from connectors.sandbox import Sandboxes
from orchestrator import admin, sync
from orchestrator.db import identities, now
from orchestrator.guard import deprovision_holds
from orchestrator.ledger import erasure_receipts, sync_ledger
from tests.admin.conftest import (
    bulk_customers,
    cfg_of,
    deliver,
    erase,
    flow,
    provision,
    put_customer,
    row,
    shop_customers,
    shop_meta,
    statuses,
)

ACTOR = "test:operator"


def _hundred(engine: Engine, targets: list[Any], sandboxes: Sandboxes) -> list[str]:
    ids = [put_customer(engine) for _ in range(100)]
    provision(engine, targets)
    assert len(shop_customers(sandboxes)) == 100
    return ids


def test_deprovisioning_30_of_100_is_held_then_approved(clean: Engine, targets: list, sandboxes) -> None:
    shop = cfg_of(targets, "shop")
    ids = _hundred(clean, targets, sandboxes)
    gone = ids[:30]
    for uid in gone:
        erase(clean, uid)
    due = flow(clean, targets)["shop"]
    assert sorted(due) == sorted(gone)

    # One delivery of the first ten: the whole operation (all 30) is held, nothing reaches the target.
    report = deliver(clean, shop, due[:10])
    assert sorted(report.held) == sorted(due[:10])
    assert report.calls == 0
    assert statuses(clean, "shop") == {"synced": 70, "held": 30}
    report = deliver(clean, shop, due[10:])
    assert report.calls == 0
    assert report.not_due == due[10:]
    assert len(shop_customers(sandboxes)) == 100
    assert sync.sweep(clean, targets).due.get("shop") is None

    state = admin.status(clean, targets, only="shop")["targets"][0]
    assert state["counts"]["held"] == 30
    [hold] = state["holds"]
    assert hold["held"] == 30
    assert "more than 0.2 of 100 accounts" in hold["reason"]
    assert {e["identity_id"] for e in admin.status(clean, targets)["erasures_pending"]} == set(gone)

    released: dict[str, list[str]] = {}
    decision = admin.approve(clean, shop, actor=ACTOR, enqueue=released.update)
    assert decision.hold_id == hold["id"]
    assert sorted(decision.released) == sorted(gone)
    assert sorted(released["shop"]) == sorted(gone)
    report = deliver(clean, shop, released["shop"])
    assert sorted(report.done) == sorted(gone)
    assert not report.held
    assert len(shop_customers(sandboxes)) == 70
    remaining = {shop_meta(c, "idhub_id") for c in shop_customers(sandboxes)}
    assert remaining == set(ids[30:])
    with clean.connect() as conn:
        receipts = conn.scalar(select(func.count()).where(erasure_receipts.c.target == "shop"))
        assert receipts == 30
        assert conn.execute(select(deprovision_holds.c.state, deprovision_holds.c.decided_by)).all() == [
            ("approved", ACTOR)
        ]


def test_rejected_deactivations_keep_the_accounts(clean: Engine, targets: list, sandboxes) -> None:
    shop = cfg_of(targets, "shop")
    ids = _hundred(clean, targets, sandboxes)
    off = ids[:30]
    for uid in off:
        put_customer(clean, uid, active=False)
    due = flow(clean, targets)["shop"]
    assert len(deliver(clean, shop, due).held) == 30
    before = {c["id"]: shop_meta(c, "idhub_status") for c in shop_customers(sandboxes)}

    decision = admin.reject(clean, shop, actor=ACTOR)
    assert sorted(decision.rejected) == sorted(off)
    assert decision.kept == []
    assert statuses(clean, "shop") == {"synced": 100}
    r = row(clean, "shop", off[0])
    assert (r.desired_version, r.synced_version, r.desired_action, r.synced_action) == (
        2,
        2,
        "upsert",
        "upsert",
    )
    assert r.last_error_code == "deprovision_rejected"
    # Nothing is due, nothing was sent: every account is still active at the target.
    assert sync.sweep(clean, targets).due.get("shop") is None
    assert deliver(clean, shop, off).calls == 0
    assert {c["id"]: shop_meta(c, "idhub_status") for c in shop_customers(sandboxes)} == before
    assert set(before.values()) == {"active"}
    with pytest.raises(admin.AdminError, match="no open hold"):
        admin.reject(clean, shop, actor=ACTOR)


def test_small_deprovisions_pass_and_count_over_the_window(clean: Engine, targets: list, sandboxes) -> None:
    shop = cfg_of(targets, "shop")
    ids = _hundred(clean, targets, sandboxes)
    batches = [ids[0:12], ids[12:20], ids[20:30]]
    results = []
    for batch in batches:
        for uid in batch:
            put_customer(clean, uid, active=False)
        results.append(deliver(clean, shop, flow(clean, targets)["shop"]))
    # 12 and then 20 deactivations within the window pass (20 <= 0.2 of 100); the next 10 make 30: held.
    assert [len(r.done) for r in results] == [12, 8, 0]
    assert sorted(results[2].held) == sorted(batches[2])
    deactivated = [c for c in shop_customers(sandboxes) if shop_meta(c, "idhub_status") == "deactivated"]
    assert len(deactivated) == 20


def test_erasures_stay_held_when_a_hold_is_rejected(
    clean: Engine, targets: list, sandboxes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDHUB_GUARD_MAX_COUNT", "3")
    shop = cfg_of(targets, "shop")
    ids = [put_customer(clean) for _ in range(6)]
    provision(clean, targets)
    for uid in ids[:2]:
        erase(clean, uid)
    for uid in ids[2:4]:
        put_customer(clean, uid, active=False)
    assert len(deliver(clean, shop, flow(clean, targets)["shop"]).held) == 4

    decision = admin.reject(clean, shop, actor=ACTOR)
    assert sorted(decision.rejected) == sorted(ids[2:4])
    assert sorted(decision.kept) == sorted(ids[:2])
    assert [row(clean, "shop", i).status for i in ids[:4]] == ["held", "held", "synced", "synced"]
    # The erasures still need an approval; then they go, and the hold closes.
    decision = admin.approve(clean, shop, actor=ACTOR)
    assert sorted(decision.released) == sorted(ids[:2])
    assert sorted(deliver(clean, shop, decision.released).done) == sorted(ids[:2])
    assert len(shop_customers(sandboxes)) == 4
    with clean.connect() as conn:
        assert list(conn.scalars(select(deprovision_holds.c.state))) == ["approved"]


def test_a_hold_of_thousands_is_taken_and_dropped_in_chunks(clean: Engine, targets: list) -> None:
    shop = cfg_of(targets, "shop")
    ids = bulk_customers(clean, 1200, active=False)
    stamp = now()
    with clean.begin() as conn:
        conn.execute(update(identities).values(version=2))
        rows = [
            {
                "target": "shop",
                "identity_id": uid,
                "resource_type": "User",
                "remote_id": str(1000 + n),
                "desired_version": 2,
                "desired_action": "deactivate",
                "synced_version": 1,
                "synced_action": "upsert",
                "status": "pending",
                "attempts": 0,
                "priority": 0,
                "created_at": stamp,
                "updated_at": stamp,
            }
            for n, uid in enumerate(ids)
        ]
        conn.execute(insert(sync_ledger), rows)
    report = deliver(clean, shop, ids[:10])  # held before any call: the fake remote ids are never used
    assert report.calls == 0
    assert statuses(clean, "shop") == {"held": 1200}
    decision = admin.reject(clean, shop, actor=ACTOR)
    assert len(decision.rejected) == 1200
    assert statuses(clean, "shop") == {"synced": 1200}
