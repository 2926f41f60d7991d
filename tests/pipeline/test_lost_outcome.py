"""Deliveries whose outcome is never recorded, and groups pushed before their members: found by the chaos run.

A worker killed (or a task Celery terminates on a broker connection loss) after the target made an account
but before the ledger recorded it leaves a row with no remote id. The next change must still reach that
account: a deactivation must switch it off, an erasure must remove it though the hub no longer holds the key,
an e-mail change must update it rather than create a second one, and a change undone since must be pushed.
A group pushed before a member existed at the target must be pushed again once the member does. Real PG, the
hub's SCIM API, the CRM simulator and the scim2-server app on loopback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from connectors.base import Connector, ConnectorSettings
from connectors.registry import build
from connectors.sandbox import runner
from connectors.sandbox.scim_app import ScimApp
from orchestrator import sync
from orchestrator.db import metadata
from orchestrator.ledger import sync_ledger
from orchestrator.relay import drain
from orchestrator.scim.schemas import CustomerUser
from orchestrator.targets import TargetConfig, parse_targets
from tests.conftest import create_pg_database, drop_pg_database
from tests.hub import CUSTOMER, GROUP_SCHEMA, USER_SCHEMA, client, make_hub, patch, user

TARGETS = """targets:
  - name: crm
    connector: crm
    url: {crm}
    on_deactivate: deactivate
    on_delete: erase
  - name: app
    connector: scim
    url: {app}
    groups: true
    on_delete: delete
  - name: newsletter
    connector: newsletter
    url: {newsletter}
    options: {{list_id: sandbox01}}
    scope: 'consents[purpose eq "marketing_email" and granted eq true]'
    on_leave_scope: deactivate
"""


class Killed(Exception):
    """Stands for the worker dying between the target's answer and the ledger write."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    url = create_pg_database("idhub_lost")
    app, engine = make_hub(url)
    sandboxes = runner.start_sandboxes(kinds=("crm", "newsletter"))
    extension = CustomerUser.to_schema().model_dump(mode="json", exclude_none=True)
    scim = ScimApp(Path(tmp_path_factory.mktemp("app")), "t-app", [extension]).start()
    urls = {**sandboxes.urls, "app": scim.url}
    targets = parse_targets(TARGETS.format(**urls), check_env=False)
    connectors: dict[str, Connector] = {
        "crm": build("crm", sandboxes.settings("crm")),
        "newsletter": build("newsletter", sandboxes.settings("newsletter")),
        "app": build("scim", ConnectorSettings(name="app", url=scim.url, token="t-app")),
    }
    try:
        yield {
            "hub": client(app, engine),
            "engine": engine,
            "targets": targets,
            "connectors": connectors,
            "crm": sandboxes.servers["crm"].sim,
        }
    finally:
        for connector in connectors.values():
            connector.close()
        scim.stop()
        sandboxes.stop()
        engine.dispose()
        drop_pg_database(url)


@pytest.fixture
def w(world: dict[str, Any]) -> dict[str, Any]:
    with world["engine"].begin() as conn:
        for table in ("sync_ledger", "dead_letters", "erasure_receipts", "erasure_requests"):
            conn.execute(metadata.tables[table].delete())
    return world


def _cfg(w: dict[str, Any], name: str) -> TargetConfig:
    return next(t for t in w["targets"] if t.name == name)


def _flow(w: dict[str, Any]) -> None:
    drain(w["engine"], lambda seqs: sync.fanout(w["engine"], w["targets"], list(seqs)) and None)


def _deliver(w: dict[str, Any], target: str, ids: list[str], *, killed: bool = False) -> None:
    """One delivery; ``killed``: the target is called, then the worker dies before anything is recorded."""
    cfg = _cfg(w, target)
    if not killed:
        sync.deliver(w["engine"], cfg, w["connectors"][target], ids, owner="after")
        return
    real = sync._record

    def die(*args: Any, **kwargs: Any) -> None:
        raise Killed

    sync._record = die  # type: ignore[assignment]
    try:
        with pytest.raises(Killed):
            sync.deliver(w["engine"], cfg, w["connectors"][target], ids, owner="dead")
    finally:
        sync._record = real  # type: ignore[assignment]
    # The dead worker's lease runs out.
    with w["engine"].begin() as conn:
        conn.execute(sync_ledger.update().values(lease_owner=None, lease_until=None))


def _customer(w: dict[str, Any], email: str, **extra: Any) -> str:
    name = {"givenName": "A", "familyName": "B"}
    body = user(email, emails=[{"value": email, "primary": True}], name=name, **extra)
    response = w["hub"].post("/scim/v2/Users", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _crm_contacts(w: dict[str, Any], uid: str) -> list[dict[str, Any]]:
    crm = w["connectors"]["crm"]
    return [dict(a.attributes["properties"]) for a in crm.list_accounts().accounts if a.external_id == uid]


def _deactivated_at_crm(w: dict[str, Any], uid: str) -> None:
    """Deactivate the customer in the hub, deliver to the CRM: its one contact must say so."""
    w["hub"].patch(f"/scim/v2/Users/{uid}", json=patch({"op": "replace", "path": "active", "value": False}))
    _flow(w)
    _deliver(w, "crm", [uid])
    [contact] = _crm_contacts(w, uid)
    assert contact["idhub_status"] == "deactivated"


def test_deactivation_reaches_an_account_whose_create_was_not_recorded(w: dict[str, Any]) -> None:
    uid = _customer(w, "lost-deactivate@example.org")
    _flow(w)
    _deliver(w, "crm", [uid], killed=True)
    assert len(_crm_contacts(w, uid)) == 1
    _deactivated_at_crm(w, uid)


def test_erasure_removes_an_account_whose_create_was_not_recorded(w: dict[str, Any]) -> None:
    uid = _customer(w, "lost-erase@example.org")
    _flow(w)
    _deliver(w, "crm", [uid], killed=True)
    assert len(_crm_contacts(w, uid)) == 1
    assert w["hub"].delete(f"/scim/v2/Users/{uid}").status_code == 204
    _flow(w)
    _deliver(w, "crm", [uid])
    assert _crm_contacts(w, uid) == []
    with w["engine"].connect() as conn:
        row = conn.execute(select(sync_ledger).where(sync_ledger.c.identity_id == uid)).first()
    assert row is None or row.inflight_key is None  # the key is gone with the erasure


def test_email_change_updates_the_account_whose_create_was_not_recorded(w: dict[str, Any]) -> None:
    uid = _customer(w, "lost-old@example.org")
    _flow(w)
    _deliver(w, "crm", [uid], killed=True)
    emails = [{"value": "lost-new@example.org", "primary": True}]
    w["hub"].patch(f"/scim/v2/Users/{uid}", json=patch({"op": "replace", "path": "emails", "value": emails}))
    _flow(w)
    _deliver(w, "crm", [uid])
    [contact] = _crm_contacts(w, uid)  # one account, not a second one under the new address
    assert contact["email"] == "lost-new@example.org"
    with w["engine"].connect() as conn:
        row = conn.execute(
            select(sync_ledger).where(sync_ledger.c.identity_id == uid, sync_ledger.c.target == "crm")
        ).one()
    assert row.remote_id is not None
    assert row.inflight_key is None


def test_group_pushed_before_its_member_gets_the_member_once_it_exists(w: dict[str, Any]) -> None:
    uid = _customer(w, "member@example.org")
    body = {"schemas": [GROUP_SCHEMA], "displayName": "early", "members": [{"value": uid}]}
    response = w["hub"].post("/scim/v2/Groups", json=body)
    assert response.status_code == 201, response.text
    gid = str(response.json()["id"])
    _flow(w)
    _deliver(w, "app", [gid])  # the group first: its member has no account at the app yet
    _deliver(w, "app", [uid])
    _deliver(w, "app", [gid])
    with w["engine"].connect() as conn:
        rows = {
            r.identity_id: r
            for r in conn.execute(select(sync_ledger).where(sync_ledger.c.identity_id.in_([uid, gid])))
            if r.target == "app"
        }
    remote = w["connectors"]["app"].client.get(f"Groups/{rows[gid].remote_id}").json()
    assert [m["value"] for m in remote.get("members") or []] == [rows[uid].remote_id]
    assert rows[gid].status == "synced"


def test_change_undone_after_an_unrecorded_push_is_still_pushed(w: dict[str, Any]) -> None:
    uid = _customer(w, "undone@example.org")
    _flow(w)
    _deliver(w, "crm", [uid])
    name = {"op": "replace", "path": "name.givenName"}
    w["hub"].patch(f"/scim/v2/Users/{uid}", json=patch({**name, "value": "Changed"}))
    _flow(w)
    _deliver(w, "crm", [uid], killed=True)  # the CRM now holds "Changed"; the ledger still has "A" pushed
    assert _crm_contacts(w, uid)[0]["firstname"] == "Changed"
    w["hub"].patch(f"/scim/v2/Users/{uid}", json=patch({**name, "value": "A"}))  # back to what was recorded
    _flow(w)
    _deliver(w, "crm", [uid])
    assert _crm_contacts(w, uid)[0]["firstname"] == "A"


def test_two_lost_creates_under_changing_addresses_leave_one_account(w: dict[str, Any]) -> None:
    uid = _customer(w, "first@example.org")
    _flow(w)
    w["crm"].faults.update({"error_rate": 1.0})  # this create never lands, and its outcome is lost too
    try:
        _deliver(w, "crm", [uid], killed=True)
    finally:
        w["crm"].faults.update({"error_rate": 0.0})
    assert _crm_contacts(w, uid) == []
    for address in ("second@example.org", "third@example.org"):
        emails = [{"value": address, "primary": True}]
        w["hub"].patch(
            f"/scim/v2/Users/{uid}", json=patch({"op": "replace", "path": "emails", "value": emails})
        )
        _flow(w)
        _deliver(w, "crm", [uid], killed=address.startswith("second"))
    [contact] = _crm_contacts(w, uid)
    assert contact["email"] == "third@example.org"


def _email(w: dict[str, Any], uid: str, address: str) -> None:
    emails = [{"value": address, "primary": True}]
    w["hub"].patch(f"/scim/v2/Users/{uid}", json=patch({"op": "replace", "path": "emails", "value": emails}))


def test_deactivation_finds_an_account_a_lost_update_moved_to_a_new_address(w: dict[str, Any]) -> None:
    uid = _customer(w, "moved-a@example.org")
    _flow(w)
    _deliver(w, "crm", [uid], killed=True)  # made under the first address, not recorded
    _email(w, uid, "moved-b@example.org")
    _flow(w)
    _deliver(w, "crm", [uid], killed=True)  # found and moved to the second address, not recorded either
    _deactivated_at_crm(w, uid)


def test_newsletter_unsubscribes_the_member_a_lost_address_change_made(w: dict[str, Any]) -> None:
    consent = {CUSTOMER: {"consents": [{"purpose": "marketing_email", "granted": True}]}}
    uid = _customer(w, "news-a@example.org", schemas=[USER_SCHEMA, CUSTOMER], **consent)
    _flow(w)
    _deliver(w, "newsletter", [uid])
    _email(w, uid, "news-b@example.org")
    _flow(w)
    _deliver(w, "newsletter", [uid], killed=True)  # the old member archived, the new one made: not recorded
    withdraw = {"op": "replace", "path": f'{CUSTOMER}:consents[purpose eq "marketing_email"].granted'}
    w["hub"].patch(f"/scim/v2/Users/{uid}", json=patch({**withdraw, "value": False}))
    _flow(w)
    _deliver(w, "newsletter", [uid])
    members = [
        a.attributes for a in w["connectors"]["newsletter"].list_accounts().accounts if a.external_id == uid
    ]
    held = {m["email_address"]: m["status"] for m in members if m["status"] != "archived"}
    assert held == {"news-b@example.org": "unsubscribed"}


def test_a_slow_batch_keeps_its_lease_so_no_second_worker_pushes_its_rows(w: dict[str, Any]) -> None:
    uid = _customer(w, "slow@example.org")
    _flow(w)
    cfg, crm = _cfg(w, "crm"), w["connectors"]["crm"]
    lease = timedelta(seconds=0.6)
    w["crm"].faults.update({"latency_ms": 2000})  # one call takes more than three leases
    try:
        slow = threading.Thread(
            target=sync.deliver, args=(w["engine"], cfg, crm, [uid]), kwargs={"owner": "slow", "lease": lease}
        )
        slow.start()
        _wait_leased(w, uid, "slow")
        time.sleep(3 * lease.total_seconds())  # the lease would have run out by now, were it not renewed
        second = sync.deliver(w["engine"], cfg, crm, [uid], owner="second", lease=lease)
        slow.join(10)
    finally:
        w["crm"].faults.update({"latency_ms": 0})
    assert second.not_due == [uid]
    assert second.calls == 0
    assert len(_crm_contacts(w, uid)) == 1


def _wait_leased(w: dict[str, Any], uid: str, owner: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with w["engine"].connect() as conn:
            row = conn.execute(
                select(sync_ledger).where(sync_ledger.c.identity_id == uid, sync_ledger.c.target == "crm")
            ).one()
        if row.lease_owner == owner:
            return
        time.sleep(0.02)
    raise AssertionError("never leased")


def test_newsletter_keeps_one_member_through_a_lost_address_change_then_erasure(w: dict[str, Any]) -> None:
    consent = {CUSTOMER: {"consents": [{"purpose": "marketing_email", "granted": True}]}}
    uid = _customer(w, "keep-a@example.org", schemas=[USER_SCHEMA, CUSTOMER], **consent)
    _flow(w)
    _deliver(w, "newsletter", [uid])
    _email(w, uid, "keep-b@example.org")
    _flow(w)
    _deliver(w, "newsletter", [uid], killed=True)  # member b made, a archived: not recorded
    _email(w, uid, "keep-c@example.org")
    _flow(w)
    _deliver(w, "newsletter", [uid])

    def held() -> dict[str, str]:
        accounts = w["connectors"]["newsletter"].list_accounts().accounts
        return {
            a.attributes["email_address"]: a.attributes["status"]
            for a in accounts
            if a.external_id == uid and a.attributes["status"] != "archived"
        }

    assert held() == {"keep-c@example.org": "subscribed"}
    assert w["hub"].delete(f"/scim/v2/Users/{uid}").status_code == 204
    _flow(w)
    _deliver(w, "newsletter", [uid])
    assert held() == {}


def test_newsletter_resubscribes_after_an_unrecorded_unsubscribe(w: dict[str, Any]) -> None:
    consent = {CUSTOMER: {"consents": [{"purpose": "marketing_email", "granted": True}]}}
    uid = _customer(w, "resub@example.org", schemas=[USER_SCHEMA, CUSTOMER], **consent)
    _flow(w)
    _deliver(w, "newsletter", [uid])
    granted = {"op": "replace", "path": f'{CUSTOMER}:consents[purpose eq "marketing_email"].granted'}
    w["hub"].patch(f"/scim/v2/Users/{uid}", json=patch({**granted, "value": False}))
    _flow(w)
    _deliver(w, "newsletter", [uid], killed=True)  # unsubscribed at the newsletter, not recorded
    w["hub"].patch(f"/scim/v2/Users/{uid}", json=patch({**granted, "value": True}))
    _flow(w)
    _deliver(w, "newsletter", [uid])
    [member] = [a for a in w["connectors"]["newsletter"].list_accounts().accounts if a.external_id == uid]
    assert member.attributes["status"] == "subscribed"


def test_newsletter_unsubscribes_a_lost_create_after_the_address_changed(w: dict[str, Any]) -> None:
    consent = {CUSTOMER: {"consents": [{"purpose": "marketing_email", "granted": True}]}}
    uid = _customer(w, "gone-a@example.org", schemas=[USER_SCHEMA, CUSTOMER], **consent)
    _flow(w)
    _deliver(w, "newsletter", [uid], killed=True)  # subscribed under the first address, not recorded
    _email(w, uid, "gone-b@example.org")
    granted = {"op": "replace", "path": f'{CUSTOMER}:consents[purpose eq "marketing_email"].granted'}
    w["hub"].patch(f"/scim/v2/Users/{uid}", json=patch({**granted, "value": False}))
    _flow(w)
    _deliver(w, "newsletter", [uid])
    members = [
        a.attributes for a in w["connectors"]["newsletter"].list_accounts().accounts if a.external_id == uid
    ]
    assert [m["status"] for m in members if m["status"] != "archived"] == ["unsubscribed"]
