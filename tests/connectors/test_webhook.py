"""The webhook connector against the Standard Webhooks receiver: the parts of the contract that apply."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from connectors.base import DeprovisionAction, Record
from connectors.errors import PermanentError, TargetDisabledError
from connectors.sandbox.core import SandboxServer
from connectors.sandbox.runner import connector_settings
from connectors.webhook import WebhookConnector, webhook_id
from tests.connectors.contract import ConnectorContract, SandboxHarness, sandbox_server


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    yield from sandbox_server("webhook")


class WebhookHarness(SandboxHarness):
    kind = "webhook"

    def record(self, n: int, *, version: int = 1, remote_id: str | None = None, given: str = "Ada") -> Record:
        attributes = {"email": self.email(n), "given_name": given, "family_name": f"Lovelace{n}"}
        return Record(self.identity_id(n), version, attributes, remote_id=remote_id, match_key=self.email(n))

    def events(self) -> list[dict[str, Any]]:
        return list(self.state()["events"])

    def accounts(self) -> list[Mapping[str, Any]]:
        return self.events()

    def account(self, n: int) -> Mapping[str, Any] | None:
        mine = [e for e in self.events() if e["body"]["data"]["id"] == self.identity_id(n)]
        return mine[-1] if mine else None

    def given_name(self, account: Mapping[str, Any]) -> str:
        return str(account["body"]["data"]["attributes"]["given_name"])

    def is_deactivated(self, account: Mapping[str, Any]) -> bool:
        return bool(account["type"] == "customer.deactivated")

    def create_directly(self, n: int) -> str:
        raise NotImplementedError("a webhook receiver has no accounts to create")

    def remove_directly(self, remote_id: str) -> None:
        raise NotImplementedError("a webhook receiver has no accounts to remove")


class TestWebhookContract(ConnectorContract):
    stateful = False

    @pytest.fixture
    def harness(self, server: SandboxServer) -> Iterator[WebhookHarness]:
        harness = WebhookHarness(server)
        yield harness
        harness.close()

    def test_upsert_sends_a_signed_event_with_mapped_attributes_only(
        self, harness: WebhookHarness, connector: WebhookConnector
    ) -> None:
        connector.upsert(harness.record(1))
        [event] = harness.events()  # the receiver verified the signature before recording it
        assert event["id"] == webhook_id(harness.identity_id(1), 1, "upsert")
        assert event["type"] == "customer.upserted"
        assert event["body"]["data"] == {
            "id": harness.identity_id(1),
            "version": 1,
            "attributes": {"email": harness.email(1), "given_name": "Ada", "family_name": "Lovelace1"},
        }

    def test_retries_share_one_webhook_id(self, harness: WebhookHarness, connector: WebhookConnector) -> None:
        connector.upsert(harness.record(1))
        connector.upsert(harness.record(1))  # a retry of the same change
        connector.upsert(harness.record(1, version=2, given="Grace"))
        state = harness.state()
        assert [e["body"]["data"]["version"] for e in state["events"]] == [1, 2]
        assert state["duplicates"] == 1
        account = harness.account(1)
        assert account is not None
        assert harness.given_name(account) == "Grace"

    def test_deprovision_events_carry_no_attributes(
        self, harness: WebhookHarness, connector: WebhookConnector
    ) -> None:
        for version, action in enumerate(DeprovisionAction, start=2):
            connector.deprovision(Record(harness.identity_id(1), version, {}), action)
        events = harness.events()
        assert [e["type"] for e in events] == [
            "customer.deleted",
            "customer.deactivated",
            "customer.erased",
            "customer.erased",
        ]
        assert all(set(e["body"]["data"]) == {"id", "version"} for e in events)

    def test_410_disables_the_target(self, harness: WebhookHarness, connector: WebhookConnector) -> None:
        harness.set_faults(gone=True)
        with pytest.raises(TargetDisabledError):
            connector.upsert(harness.record(1))
        with pytest.raises(TargetDisabledError):
            connector.probe()

    def test_wrong_secret_is_refused(self, harness: WebhookHarness) -> None:
        other = "whsec_" + base64.b64encode(b"another-secret-of-32-bytes-long!").decode()
        connector = WebhookConnector(connector_settings("webhook", harness.server.url, token=other))
        with pytest.raises(PermanentError) as caught:
            connector.upsert(harness.record(1))
        assert caught.value.status == 401
        assert harness.events() == []
        connector.close()

    def test_secret_is_never_sent(self, connector: WebhookConnector) -> None:
        assert "authorization" not in {k.lower() for k in connector.client.headers}
