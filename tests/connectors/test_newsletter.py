"""The newsletter connector against the Mailchimp simulator: the contract plus Mailchimp's own rules."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest

from connectors.base import DeprovisionAction, Record
from connectors.errors import PermanentError
from connectors.newsletter import NewsletterConnector, subscriber_hash
from connectors.sandbox.core import SandboxServer
from connectors.sandbox.runner import NEWSLETTER_KEY, NEWSLETTER_LIST
from tests.connectors.contract import ConnectorContract, SandboxHarness, sandbox_server


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    yield from sandbox_server("newsletter")


class NewsletterHarness(SandboxHarness):
    kind = "newsletter"

    def record(self, n: int, *, version: int = 1, remote_id: str | None = None, given: str = "Ada") -> Record:
        attributes = {
            "email_address": self.email(n),
            "merge_fields": {"FNAME": given, "LNAME": f"Lovelace{n}"},
            "language": "en",
        }
        return Record(self.identity_id(n), version, attributes, remote_id=remote_id, match_key=self.email(n))

    def members(self) -> list[dict[str, Any]]:
        return list(self.state()[NEWSLETTER_LIST])

    def accounts(self) -> list[Mapping[str, Any]]:
        return [m for m in self.members() if m["status"] != "archived"]

    def account(self, n: int) -> Mapping[str, Any] | None:
        return next((m for m in self.accounts() if m["email_address"] == self.email(n)), None)

    def given_name(self, account: Mapping[str, Any]) -> str:
        return str(account["merge_fields"]["FNAME"])

    def is_deactivated(self, account: Mapping[str, Any]) -> bool:
        return bool(account["status"] == "unsubscribed")

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url + "/", auth=("anyuser", NEWSLETTER_KEY))

    def create_directly(self, n: int) -> str:
        body = {
            "email_address": self.email(n),
            "status_if_new": "subscribed",
            "merge_fields": {"FNAME": "Someone"},
        }
        with self.api() as api:
            response = api.put(f"lists/{NEWSLETTER_LIST}/members/{subscriber_hash(self.email(n))}", json=body)
            response.raise_for_status()
            return str(response.json()["id"])

    def remove_directly(self, remote_id: str) -> None:
        with self.api() as api:
            api.post(
                f"lists/{NEWSLETTER_LIST}/members/{remote_id}/actions/delete-permanent"
            ).raise_for_status()

    def erased(self, n: int) -> bool:
        return all(m["email_address"] != self.email(n) for m in self.members())


class TestNewsletterContract(ConnectorContract):
    @pytest.fixture
    def harness(self, server: SandboxServer) -> Iterator[NewsletterHarness]:
        harness = NewsletterHarness(server)
        yield harness
        harness.close()

    def test_erased_address_cannot_come_back(
        self, harness: NewsletterHarness, connector: NewsletterConnector
    ) -> None:
        created = connector.upsert(harness.record(1))
        connector.deprovision(harness.record(1, remote_id=created.remote_id), DeprovisionAction.ERASE)
        with pytest.raises(PermanentError) as caught:
            connector.upsert(harness.record(1, version=3))
        assert caught.value.code == "Forgotten Email Not Subscribed"
        assert caught.value.status == 400
        [result] = connector.upsert_many([harness.record(1, version=4)])
        assert isinstance(result, PermanentError)
        assert result.code == "forgotten_email"
        assert harness.erased(1)

    def test_delete_archives_and_anonymize_blanks(
        self, harness: NewsletterHarness, connector: NewsletterConnector
    ) -> None:
        one, two = connector.upsert(harness.record(1)), connector.upsert(harness.record(2))
        connector.deprovision(harness.record(1, remote_id=one.remote_id), DeprovisionAction.DELETE)
        connector.deprovision(harness.record(2, remote_id=two.remote_id), DeprovisionAction.ANONYMIZE)
        members = {m["email_address"]: m for m in harness.members()}
        assert members[harness.email(1)]["status"] == "archived"
        assert members[harness.email(2)]["status"] == "archived"
        assert set(members[harness.email(2)]["merge_fields"].values()) == {""}

    def test_hub_id_lands_in_a_merge_field(
        self, harness: NewsletterHarness, connector: NewsletterConnector
    ) -> None:
        connector.upsert(harness.record(1))
        account = harness.account(1)
        assert account is not None
        assert account["merge_fields"]["IDHUB_ID"] == harness.identity_id(1)

    def test_profile_update_does_not_resubscribe(
        self, harness: NewsletterHarness, connector: NewsletterConnector
    ) -> None:
        created = connector.upsert(harness.record(1))
        connector.deprovision(harness.record(1, remote_id=created.remote_id), DeprovisionAction.DEACTIVATE)
        connector.upsert(harness.record(1, version=3, remote_id=created.remote_id, given="Grace"))
        connector.upsert_many([harness.record(1, version=4, remote_id=created.remote_id)])
        account = harness.account(1)
        assert account is not None
        assert account["status"] == "unsubscribed"

    def test_batch_with_mapped_status_is_one_request(
        self, harness: NewsletterHarness, connector: NewsletterConnector
    ) -> None:
        records = [harness.record(n) for n in range(1, 4)]
        records = [
            Record(r.identity_id, 1, {**r.attributes, "status": "subscribed"}, match_key=r.match_key)
            for r in records
        ]
        before = len(harness.requests())
        results = connector.upsert_many(records)
        assert [getattr(r, "outcome", r) for r in results] == ["created"] * 3
        assert len(harness.requests()) - before == 1

    def test_more_than_ten_simultaneous_connections_get_429(self, harness: NewsletterHarness) -> None:
        harness.set_faults(latency_ms=300)
        limits = httpx.Limits(max_connections=20)
        url = f"lists/{NEWSLETTER_LIST}/members"
        with (
            httpx.Client(base_url=harness.server.url + "/", auth=("u", NEWSLETTER_KEY), limits=limits) as api,
            concurrent.futures.ThreadPoolExecutor(12) as pool,
        ):
            statuses = list(pool.map(lambda _: api.get(url).status_code, range(12)))
        assert statuses.count(429) >= 1
        assert statuses.count(200) >= 10
        assert [e["status"] for e in harness.requests()].count(429) == statuses.count(429)

    def test_unknown_list_is_gone_and_errors_are_problem_json(self, harness: NewsletterHarness) -> None:
        with harness.api() as api:
            response = api.get("lists/nosuchlist/members")
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("application/problem+json")
        assert set(response.json()) >= {"type", "title", "status", "detail", "instance"}
