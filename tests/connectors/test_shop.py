"""The shop connector against the WooCommerce simulator: the contract plus WooCommerce's own rules."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest

from connectors.base import DeprovisionAction, Record
from connectors.errors import PermanentError
from connectors.sandbox.core import SandboxServer
from connectors.sandbox.runner import SHOP_KEY, SHOP_SECRET
from connectors.shop import ShopConnector
from tests.connectors.contract import ConnectorContract, SandboxHarness, sandbox_server


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    yield from sandbox_server("shop")


class ShopHarness(SandboxHarness):
    kind = "shop"

    def record(self, n: int, *, version: int = 1, remote_id: str | None = None, given: str = "Ada") -> Record:
        attributes = {
            "email": self.email(n),
            "first_name": given,
            "last_name": f"Lovelace{n}",
            "billing": {"first_name": given, "phone": f"+4930{n:06d}"},
        }
        return Record(self.identity_id(n), version, attributes, remote_id=remote_id, match_key=self.email(n))

    def accounts(self) -> list[Mapping[str, Any]]:
        return list(self.state())

    def account(self, n: int) -> Mapping[str, Any] | None:
        return next((c for c in self.accounts() if c["email"] == self.email(n)), None)

    def given_name(self, account: Mapping[str, Any]) -> str:
        return str(account["first_name"])

    def is_deactivated(self, account: Mapping[str, Any]) -> bool:
        return any(m["key"] == "idhub_status" and m["value"] == "deactivated" for m in account["meta_data"])

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url + "/", auth=(SHOP_KEY, SHOP_SECRET))

    def create_directly(self, n: int) -> str:
        with self.api() as api:
            response = api.post("customers", json={"email": self.email(n), "first_name": "Someone"})
            response.raise_for_status()
            return str(response.json()["id"])

    def remove_directly(self, remote_id: str) -> None:
        with self.api() as api:
            api.delete(f"customers/{remote_id}", params={"force": "true"}).raise_for_status()


class TestShopContract(ConnectorContract):
    @pytest.fixture
    def harness(self, server: SandboxServer) -> Iterator[ShopHarness]:
        harness = ShopHarness(server)
        yield harness
        harness.close()

    def test_batch_over_100_items_is_413(self, harness: ShopHarness, connector: ShopConnector) -> None:
        with pytest.raises(PermanentError) as caught:
            connector.upsert_many([harness.record(n) for n in range(101)])
        assert caught.value.status == 413
        assert harness.accounts() == []
        with harness.api() as api:
            response = api.post(
                "customers/batch", json={"create": [{"email": harness.email(n)} for n in range(101)]}
            )
        assert response.status_code == 413
        assert response.json()["code"] == "woocommerce_rest_request_entity_too_large"

    def test_duplicate_email_is_registration_error(self, harness: ShopHarness) -> None:
        harness.create_directly(1)
        with harness.api() as api:
            response = api.post("customers", json={"email": harness.email(1).upper()})
        assert response.status_code == 400
        assert response.json()["code"] == "registration-error-email-exists"

    def test_hub_id_and_status_in_meta_data(self, harness: ShopHarness, connector: ShopConnector) -> None:
        connector.upsert(harness.record(1))
        account = harness.account(1)
        assert account is not None
        meta = {m["key"]: m["value"] for m in account["meta_data"]}
        assert meta == {"idhub_id": harness.identity_id(1), "idhub_status": "active"}

    def test_anonymize_overwrites_personal_fields(
        self, harness: ShopHarness, connector: ShopConnector
    ) -> None:
        created = connector.upsert(harness.record(1))
        connector.deprovision(harness.record(1, remote_id=created.remote_id), DeprovisionAction.ANONYMIZE)
        [customer] = harness.accounts()
        assert customer["email"] == f"anonymized-{created.remote_id}@anonymized.invalid"
        assert customer["first_name"] == customer["last_name"] == customer["billing"]["phone"] == ""
        assert "example.com" not in str(customer)
        assert "Ada" not in str(customer)

    def test_totals_headers_and_page_size_limit(self, harness: ShopHarness, connector: ShopConnector) -> None:
        for n in range(3):
            connector.upsert(harness.record(n))
        with harness.api() as api:
            page = api.get("customers", params={"per_page": 2})
            too_big = api.get("customers", params={"per_page": 101})
            untrashed = api.delete(f"customers/{page.json()[0]['id']}")
        assert page.headers["X-WP-Total"] == "3"
        assert page.headers["X-WP-TotalPages"] == "2"
        assert too_big.status_code == 400
        assert untrashed.status_code == 501
