"""The shop and CRM simulators find accounts by e-mail through an index: it must follow every change of
address, deletion and archiving as the scans it replaced did."""

from __future__ import annotations

import base64

from starlette.testclient import TestClient

from connectors.sandbox.runner import CRM_TOKEN, SHOP_KEY, SHOP_SECRET, build_simulator

SHOP = "/wp-json/wc/v3/customers"
CRM = "/crm/v3/objects/contacts"


def _shop() -> TestClient:
    auth = base64.b64encode(f"{SHOP_KEY}:{SHOP_SECRET}".encode()).decode()
    return TestClient(build_simulator("shop").app, headers={"Authorization": f"Basic {auth}"})


def _crm() -> TestClient:
    return TestClient(build_simulator("crm").app, headers={"Authorization": f"Bearer {CRM_TOKEN}"})


def test_shop_lookup_follows_address_changes_and_deletions() -> None:
    shop = _shop()
    first = shop.post(SHOP, json={"email": "ann@example.test"}).json()
    assert shop.post(SHOP, json={"email": "Ann@Example.test"}).json()["code"] == (
        "registration-error-email-exists"
    )
    shop.put(f"{SHOP}/{first['id']}", json={"email": "ann.new@example.test"}).raise_for_status()
    assert shop.get(SHOP, params={"email": "ANN@example.test"}).json() == []
    assert [c["id"] for c in shop.get(SHOP, params={"email": "Ann.New@example.test"}).json()] == [first["id"]]
    # The old address is free again; the new one is taken, also within a batch.
    second = shop.post(SHOP, json={"email": "ann@example.test"})
    assert second.status_code == 201
    assert second.json()["username"] == "ann2"  # the first customer kept "ann"
    batch = shop.post(f"{SHOP}/batch", json={"create": [{"email": "ann.new@example.test"}]}).json()
    assert batch["create"][0]["error"]["code"] == "registration-error-email-exists"
    shop.delete(f"{SHOP}/{first['id']}", params={"force": "true"}).raise_for_status()
    assert shop.get(SHOP, params={"email": "ann.new@example.test"}).json() == []
    again = shop.post(SHOP, json={"email": "ann.new@example.test", "username": "ann"})
    assert again.status_code == 201
    assert again.json()["username"] == "ann"


def test_crm_lookup_follows_address_changes_archiving_and_erasure() -> None:
    crm = _crm()
    made = crm.post(CRM, json={"properties": {"email": "bo@example.test"}}).json()
    clash = crm.post(CRM, json={"properties": {"email": "BO@example.test"}})
    assert clash.status_code == 409
    assert made["id"] in clash.json()["message"]
    crm.patch(f"{CRM}/{made['id']}", json={"properties": {"email": "bo.new@example.test"}}).raise_for_status()
    assert crm.get(f"{CRM}/bo@example.test", params={"idProperty": "email"}).status_code == 404
    assert crm.get(f"{CRM}/BO.NEW@example.test", params={"idProperty": "email"}).json()["id"] == made["id"]
    upsert = {"inputs": [{"id": "bo.new@example.test", "idProperty": "email", "properties": {}}]}
    assert crm.post(f"{CRM}/batch/upsert", json=upsert).json()["results"][0]["id"] == made["id"]
    # Archived: the address is free for a new contact, which erasure then removes for good.
    crm.delete(f"{CRM}/{made['id']}").raise_for_status()
    assert crm.get(f"{CRM}/bo.new@example.test", params={"idProperty": "email"}).status_code == 404
    fresh = crm.post(CRM, json={"properties": {"email": "bo.new@example.test"}})
    assert fresh.status_code == 201
    assert fresh.json()["id"] != made["id"]
    gone = {"objectId": "bo.new@example.test", "idProperty": "email"}
    assert crm.post(f"{CRM}/gdpr-delete", json=gone).status_code == 204
    assert crm.post(f"{CRM}/gdpr-delete", json=gone).status_code == 404
