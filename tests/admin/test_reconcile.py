"""Reconciliation against the simulators: what is missing, orphaned or different is found by listing the
target; --apply repairs it as far as the target's policy allows, and never creates an erased customer."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import Engine

from connectors.base import Record
from orchestrator import admin
from tests.admin.conftest import (
    cfg_of,
    connect,
    erase,
    provision,
    put_customer,
    row,
    shop_customers,
    shop_meta,
)

ACTOR = "test:operator"


def _shop_sim(sandboxes: Any) -> Any:
    return sandboxes.servers["shop"].sim


def _by_hub_id(sandboxes: Any) -> dict[str, dict[str, Any]]:
    return {shop_meta(c, "idhub_id"): c for c in shop_customers(sandboxes)}


def _reconcile(engine: Engine, cfg: Any, **kw: Any) -> admin.ReconcileReport:
    connector = connect(cfg)
    try:
        return admin.reconcile(engine, cfg, connector, actor=ACTOR, **kw)
    finally:
        connector.close()


def test_reconcile_reports_then_repairs_the_shop(clean: Engine, targets: list, sandboxes) -> None:
    shop = cfg_of(targets, "shop")
    ok, lost, changed, erased = (put_customer(clean) for _ in range(4))
    provision(clean, targets)
    erase(clean, erased)
    provision(clean, targets)  # deleted everywhere, tombstone purged to its receipts
    connector = connect(shop)
    try:
        # Someone re-created the erased customer by hand, and a stranger exists that the hub never knew.
        connector.upsert(Record(erased, 1, {"email": f"c-{erased[:8]}@example.test"}))
        stranger = str(uuid.uuid4())
        connector.upsert(Record(stranger, 1, {"email": "stranger@example.test"}))
    finally:
        connector.close()
    accounts = _by_hub_id(sandboxes)
    sim = _shop_sim(sandboxes)
    with sim.lock:
        del sim.customers[accounts[lost]["id"]]
        sim.customers[accounts[changed]["id"]]["first_name"] = "Changed"

    report = _reconcile(clean, shop)
    assert report.listed == 4
    assert report.compared == 3
    assert report.missing == [lost]
    assert report.differing == [
        {"identity_id": changed, "remote_id": str(accounts[changed]["id"]), "fields": ["first_name"]}
    ]
    orphans = {o["identity_id"]: o["reason"] for o in report.orphaned}
    assert orphans == {erased: "erased", stranger: "unknown"}
    assert len(shop_customers(sandboxes)) == 4  # a report changes nothing

    report = _reconcile(clean, shop, apply=True, deliver_now=True)
    assert report.applied == {"resynced": 2, "kept": 0, "deleted": 2, "failed": 0}
    now = _by_hub_id(sandboxes)
    assert set(now) == {ok, lost, changed}  # the erased customer was removed, not re-created
    assert now[changed]["first_name"] == "Ann"
    again = _reconcile(clean, shop)
    assert (again.missing, again.orphaned, again.differing) == ([], [], [])


def test_orphans_are_kept_where_the_policy_does_not_delete(clean: Engine, targets: list, sandboxes) -> None:
    news = cfg_of(targets, "news")
    member = put_customer(clean)
    leaver = put_customer(clean)
    outsider = put_customer(clean, language="de")  # never in the newsletter's scope
    provision(clean, targets)
    put_customer(clean, leaver, language="de")  # leaves the scope: unsubscribed (on_leave_scope: deactivate)
    provision(clean, targets)
    connector = connect(news)
    try:
        # The outsider signed up at the newsletter directly.
        email = f"c-{outsider[:8]}@example.test"
        connector.upsert(Record(str(uuid.uuid4()), 1, {"email_address": email}, match_key=email))
    finally:
        connector.close()
    report = _reconcile(clean, news, apply=True)
    assert report.listed == 3
    assert (report.missing, report.differing) == ([], [])
    assert [(o["identity_id"], o["reason"]) for o in report.orphaned] == [(outsider, "out_of_scope")]
    assert report.applied == {"kept": 1, "deleted": 0, "failed": 0}
    # The unsubscribed leaver is where its policy put it, and the member is in step: no finding for either.
    assert (row(clean, "news", leaver).status, row(clean, "news", member).status) == (
        "deprovisioned",
        "synced",
    )


def test_mass_orphan_removal_is_blocked_by_the_guard_limits(
    clean: Engine, targets: list, sandboxes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDHUB_GUARD_MAX_COUNT", "2")
    shop = cfg_of(targets, "shop")
    connector = connect(shop)
    try:
        for n in range(3):
            connector.upsert(Record(str(uuid.uuid4()), 1, {"email": f"s{n}@example.test"}))
    finally:
        connector.close()
    report = _reconcile(clean, shop, apply=True)
    assert len(report.orphaned) == 3
    assert report.applied == {"kept": 0, "blocked": 3}
    assert len(shop_customers(sandboxes)) == 3


def test_reconcile_needs_a_listing_connector(clean: Engine, targets: list) -> None:
    class Unlisted:
        supports_list = False

    with pytest.raises(admin.AdminError, match="cannot list"):
        admin.reconcile(clean, cfg_of(targets, "shop"), Unlisted(), actor=ACTOR)  # type: ignore[arg-type]
