"""The CRM connector against the HubSpot simulator: the contract plus HubSpot's own rules."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest

from connectors.base import DeprovisionAction, Record
from connectors.crm import CrmConnector
from connectors.errors import PermanentError, RetryableError
from connectors.sandbox.core import SandboxServer
from connectors.sandbox.runner import CRM_TOKEN
from tests.connectors.contract import ConnectorContract, SandboxHarness, sandbox_server

CONTACTS = "/crm/v3/objects/contacts"


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    yield from sandbox_server("crm")


class CrmHarness(SandboxHarness):
    kind = "crm"

    def record(self, n: int, *, version: int = 1, remote_id: str | None = None, given: str = "Ada") -> Record:
        properties = {"email": self.email(n), "firstname": given, "lastname": f"Lovelace{n}"}
        return Record(
            self.identity_id(n),
            version,
            {"properties": properties},
            remote_id=remote_id,
            match_key=self.email(n),
        )

    def accounts(self) -> list[Mapping[str, Any]]:
        return list(self.state())

    def account(self, n: int) -> Mapping[str, Any] | None:
        return next((c for c in self.accounts() if c["properties"].get("email") == self.email(n)), None)

    def given_name(self, account: Mapping[str, Any]) -> str:
        return str(account["properties"]["firstname"])

    def is_deactivated(self, account: Mapping[str, Any]) -> bool:
        return bool(account["properties"].get("idhub_status") == "deactivated")

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {CRM_TOKEN}"})

    def create_directly(self, n: int) -> str:
        with self.api() as api:
            response = api.post(
                CONTACTS, json={"properties": {"email": self.email(n), "firstname": "Someone"}}
            )
            response.raise_for_status()
            return str(response.json()["id"])

    def remove_directly(self, remote_id: str) -> None:
        with self.api() as api:
            api.post(f"{CONTACTS}/gdpr-delete", json={"objectId": remote_id}).raise_for_status()


class TestCrmContract(ConnectorContract):
    @pytest.fixture
    def harness(self, server: SandboxServer) -> Iterator[CrmHarness]:
        harness = CrmHarness(server)
        yield harness
        harness.close()

    def test_409_adopts_the_id_named_in_the_message(
        self, harness: CrmHarness, connector: CrmConnector
    ) -> None:
        existing = harness.create_directly(1)
        before = len(harness.requests())
        result = connector.upsert(harness.record(1, given="Grace"))
        log = harness.requests()[before:]
        assert result.remote_id == existing
        assert result.outcome == "adopted"
        assert [(e["method"], e["status"]) for e in log] == [
            ("POST", 409),
            ("PATCH", 200),
        ]  # no lookup needed
        account = harness.account(1)
        assert account is not None
        assert account["properties"]["idhub_id"] == harness.identity_id(1)

    def test_rolling_limit_answers_hubspot_429(self, harness: CrmHarness, connector: CrmConnector) -> None:
        harness.set_faults(rate_limit=3)
        with harness.api() as api:
            statuses = [api.get(CONTACTS).status_code for _ in range(3)]
            limited = api.get(CONTACTS)
        assert statuses == [200, 200, 200]
        assert limited.status_code == 429
        body = limited.json()
        assert body["status"] == "error"
        assert body["errorType"] == "RATE_LIMIT"
        assert body["policyName"] == "TEN_SECONDLY_ROLLING"
        assert limited.headers["X-HubSpot-RateLimit-Max"] == "3"
        assert limited.headers["X-HubSpot-RateLimit-Remaining"] == "0"
        with pytest.raises(RetryableError) as caught:
            connector.upsert(harness.record(1))
        assert caught.value.status == 429
        assert caught.value.retry_after == 10

    def test_archive_is_restorable_but_gdpr_delete_is_not(
        self, harness: CrmHarness, connector: CrmConnector
    ) -> None:
        one, two = connector.upsert(harness.record(1)), connector.upsert(harness.record(2))
        connector.deprovision(harness.record(1, remote_id=one.remote_id), DeprovisionAction.DELETE)
        connector.deprovision(harness.record(2, remote_id=two.remote_id), DeprovisionAction.ERASE)
        sim = harness.server.sim
        assert sim.contacts[str(one.remote_id)]["archived"] is True  # type: ignore[attr-defined]
        assert str(two.remote_id) not in sim.contacts  # type: ignore[attr-defined]

    def test_anonymize_blanks_personal_properties(self, harness: CrmHarness, connector: CrmConnector) -> None:
        created = connector.upsert(harness.record(1))
        connector.deprovision(harness.record(1, remote_id=created.remote_id), DeprovisionAction.ANONYMIZE)
        [contact] = harness.accounts()
        props = contact["properties"]
        assert props["email"] == props["firstname"] == props["lastname"] == ""
        assert props["idhub_status"] == "anonymized"
        assert props["idhub_id"] == harness.identity_id(1)

    def test_batch_duplicate_email_waits_for_a_single_upsert(
        self, harness: CrmHarness, connector: CrmConnector
    ) -> None:
        first, second = harness.record(1), harness.record(1, version=2, given="Grace")
        results = connector.upsert_many([first, second])
        assert [getattr(r, "outcome", r) for r in results] == ["created", "adopted"]
        assert len(harness.accounts()) == 1

    def test_batch_partial_failure_is_207(self, harness: CrmHarness) -> None:
        inputs = [{"id": "404404", "properties": {"firstname": "X"}}]
        with harness.api() as api:
            created = api.post(
                f"{CONTACTS}/batch/create", json={"inputs": [{"properties": {"email": harness.email(1)}}]}
            )
            inputs.append({"id": created.json()["results"][0]["id"], "properties": {"firstname": "Y"}})
            answer = api.post(f"{CONTACTS}/batch/update", json={"inputs": inputs})
            too_many = api.post(
                f"{CONTACTS}/batch/read", json={"inputs": [{"id": str(i)} for i in range(101)]}
            )
        assert created.status_code == 201
        assert answer.status_code == 207
        assert answer.json()["numErrors"] == 1
        assert answer.json()["errors"][0]["category"] == "OBJECT_NOT_FOUND"
        assert too_many.status_code == 400

    def test_unknown_property_is_refused(self, harness: CrmHarness, connector: CrmConnector) -> None:
        record = harness.record(1)
        bad = Record(record.identity_id, 1, {"properties": {**record.attributes["properties"], "shoe": "42"}})
        with pytest.raises(PermanentError) as caught:
            connector.upsert(bad)
        assert caught.value.code == "VALIDATION_ERROR"
        assert caught.value.status == 400
