"""The SCIM connector against the sandbox's SCIM app: the contract, plus the RFC 7644 rules the app keeps."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest

from connectors.base import DeprovisionAction, Record
from connectors.sandbox.core import SandboxServer
from connectors.sandbox.runner import SCIM_TOKEN
from connectors.sandbox.scim import BULK_REQUEST, CUSTOMER, GROUP, MEDIA, PATCH_OP, USER
from tests.connectors.contract import ConnectorContract, SandboxHarness, sandbox_server


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    yield from sandbox_server("scim")


class ScimHarness(SandboxHarness):
    kind = "scim"

    def record(self, n: int, *, version: int = 1, remote_id: str | None = None, given: str = "Ada") -> Record:
        attributes = {
            "userName": self.email(n),
            "name": {"givenName": given, "familyName": f"Lovelace{n}"},
            "emails": [{"value": self.email(n), "primary": True}],
            "active": True,
            CUSTOMER: {"customerNumber": f"C-{n}", "loyalty": {"tier": "gold", "points": n}},
        }
        return Record(self.identity_id(n), version, attributes, remote_id=remote_id, match_key=self.email(n))

    def accounts(self) -> list[Mapping[str, Any]]:
        return list(self.state()["Users"])

    def account(self, n: int) -> Mapping[str, Any] | None:
        return next((u for u in self.accounts() if u["userName"] == self.email(n)), None)

    def given_name(self, account: Mapping[str, Any]) -> str:
        return str(account["name"]["givenName"])

    def is_deactivated(self, account: Mapping[str, Any]) -> bool:
        return account.get("active") is False

    def api(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {SCIM_TOKEN}", "Content-Type": MEDIA}
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=5)

    def create_directly(self, n: int) -> str:
        with self.api() as api:
            response = api.post("/Users", json={"schemas": [USER], "userName": self.email(n)})
            response.raise_for_status()
            return str(response.json()["id"])

    def remove_directly(self, remote_id: str) -> None:
        with self.api() as api:
            api.delete(f"/Users/{remote_id}").raise_for_status()


class TestScimSandboxContract(ConnectorContract):
    @pytest.fixture
    def harness(self, server: SandboxServer) -> Iterator[ScimHarness]:
        harness = ScimHarness(server)
        yield harness
        harness.close()


@pytest.fixture
def harness(server: SandboxServer) -> Iterator[ScimHarness]:
    harness = ScimHarness(server)
    yield harness
    harness.close()


@pytest.fixture
def api(harness: ScimHarness) -> Iterator[httpx.Client]:
    with harness.api() as client:
        yield client


def _error(response: httpx.Response, status: int, scim_type: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(MEDIA)
    body = response.json()
    assert body["status"] == str(status)
    assert body.get("scimType") == scim_type
    return dict(body)


def _patch(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": list(operations)}


def test_connector_updates_by_patch_with_etags_and_keeps_what_it_does_not_map(
    harness: ScimHarness, api: httpx.Client
) -> None:
    connector = harness.connector()
    created = connector.upsert(harness.record(1))
    assert created.remote_id is not None
    api.patch(
        f"/Users/{created.remote_id}", json=_patch({"op": "add", "path": "title", "value": "Engineer"})
    ).raise_for_status()
    record = harness.record(1, version=2, remote_id=created.remote_id, given="Grace")
    record.attributes[CUSTOMER] = {"customerNumber": None, "loyalty": {"tier": "silver"}}
    connector.upsert(record)
    held = harness.account(1)
    assert held is not None
    assert held["title"] == "Engineer"  # not mapped: PATCH leaves it
    assert held["name"]["givenName"] == "Grace"
    assert held[CUSTOMER] == {"loyalty": {"tier": "silver"}}  # None removed it
    assert held["meta"]["version"] == 'W/"3"'
    log = harness.requests()
    # The connector sent the version its create saw; the app moved on, so it re-read once and PATCHed again.
    assert [(e["method"], e["status"]) for e in log[-3:]] == [("PATCH", 412), ("GET", 200), ("PATCH", 200)]
    connector.close()


def test_create_answers_201_with_location_etag_and_meta(api: httpx.Client) -> None:
    doc = {"schemas": [USER], "userName": "Ada@Example.com", "externalId": "x1", "password": "pa55word"}
    response = api.post("/Users", json=doc)
    assert response.status_code == 201
    body = response.json()
    assert "password" not in body  # returned never (RFC 7643 §4.1.1), so not kept either
    assert "pa55word" not in api.get(f"/Users/{body['id']}").text
    assert response.headers["Location"] == f"/v2/Users/{body['id']}"
    assert response.headers["ETag"] == body["meta"]["version"] == 'W/"1"'
    assert body["meta"]["resourceType"] == "User"
    assert body["meta"]["created"].endswith("Z")
    got = api.get(f"/Users/{body['id']}", headers={"If-None-Match": 'W/"1"'})
    assert got.status_code == 304


def test_user_name_is_unique_case_insensitively(api: httpx.Client) -> None:
    api.post("/Users", json={"schemas": [USER], "userName": "ada@example.com"}).raise_for_status()
    _error(api.post("/Users", json={"schemas": [USER], "userName": "ADA@example.com"}), 409, "uniqueness")
    other = api.post("/Users", json={"schemas": [USER], "userName": "bob@example.com"}).json()
    rename = _patch({"op": "replace", "path": "userName", "value": "Ada@Example.com"})
    renamed = api.patch(f"/Users/{other['id']}", json=rename)
    _error(renamed, 409, "uniqueness")
    assert api.get(f"/Users/{other['id']}").json()["userName"] == "bob@example.com"


@pytest.mark.parametrize(
    ("doc", "scim_type"),
    [
        ({"userName": "a@example.com"}, "invalidValue"),  # no schemas
        ({"schemas": [USER]}, "invalidValue"),  # no userName
        ({"schemas": [USER], "userName": "a@example.com", "shoeSize": 44}, "invalidSyntax"),
        ({"schemas": [USER], "userName": "a@example.com", "active": "yes"}, "invalidValue"),
        ({"schemas": [USER], "userName": "a@example.com", "emails": "a@example.com"}, "invalidValue"),
        ({"schemas": [USER, "urn:example:unknown"], "userName": "a@example.com"}, "invalidValue"),
        ({"schemas": [USER], "userName": "a@example.com", CUSTOMER: {"customerNumber": "1"}}, "invalidValue"),
    ],
)
def test_bad_resources_are_refused_and_store_nothing(
    harness: ScimHarness, api: httpx.Client, doc: dict[str, Any], scim_type: str
) -> None:
    _error(api.post("/Users", json=doc), 400, scim_type)
    assert harness.accounts() == []


def test_patch_paths_path_less_values_and_atomic_failure(api: httpx.Client) -> None:
    doc = {"schemas": [USER], "userName": "a@example.com", "name": {"givenName": "Ada", "familyName": "L"}}
    rid = api.post("/Users", json=doc).json()["id"]
    answer = api.patch(
        f"/Users/{rid}",
        json=_patch(
            {"op": "Replace", "path": "name.givenName", "value": "Grace"},
            {"op": "add", "path": "emails", "value": [{"value": "a@example.com"}]},
            {"op": "add", "path": "emails", "value": [{"value": "b@example.com"}]},
            {"op": "add", "path": f"{CUSTOMER}:loyalty", "value": {"tier": "gold"}},
            {"op": "replace", "value": {"displayName": "Grace H", "active": False}},
        ),
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["name"] == {"givenName": "Grace", "familyName": "L"}
    assert [e["value"] for e in body["emails"]] == ["a@example.com", "b@example.com"]
    assert body[CUSTOMER] == {"loyalty": {"tier": "gold"}}
    assert CUSTOMER in body["schemas"]
    assert (body["displayName"], body["active"]) == ("Grace H", False)
    assert answer.headers["ETag"] == 'W/"2"'
    removed = api.patch(f"/Users/{rid}", json=_patch({"op": "remove", "path": f"{CUSTOMER}:loyalty"})).json()
    assert removed[CUSTOMER] == {}
    # The second operation fails: the first is not kept either.
    failed = api.patch(
        f"/Users/{rid}",
        json=_patch({"op": "replace", "path": "title", "value": "CEO"}, {"op": "replace", "path": "id"}),
    )
    _error(failed, 400, "mutability")
    after = api.get(f"/Users/{rid}").json()
    assert "title" not in after
    assert after["meta"]["version"] == 'W/"3"'
    _error(api.patch(f"/Users/{rid}", json=_patch({"op": "remove"})), 400, "noTarget")
    _error(api.patch(f"/Users/{rid}", json=_patch({"op": "move", "path": "title"})), 400, "invalidSyntax")
    value_path = _patch({"op": "remove", "path": 'emails[value eq "b@example.com"]'})
    _error(api.patch(f"/Users/{rid}", json=value_path), 400, "invalidPath")
    _error(api.patch(f"/Users/{rid}", json={"Operations": []}), 400, "invalidSyntax")


def test_if_match_guards_put_patch_and_delete(api: httpx.Client) -> None:
    rid = api.post("/Users", json={"schemas": [USER], "userName": "a@example.com"}).json()["id"]
    stale = {"If-Match": 'W/"0"'}
    patch = _patch({"op": "replace", "path": "title", "value": "x"})
    _error(api.patch(f"/Users/{rid}", json=patch, headers=stale), 412)
    put = {"schemas": [USER], "userName": "a@example.com", "title": "y"}
    _error(api.put(f"/Users/{rid}", json=put, headers=stale), 412)
    _error(api.delete(f"/Users/{rid}", headers=stale), 412)
    replaced = api.put(f"/Users/{rid}", json=put, headers={"If-Match": 'W/"1"'})
    assert replaced.status_code == 200
    assert replaced.json()["title"] == "y"
    assert api.delete(f"/Users/{rid}", headers={"If-Match": 'W/"2"'}).status_code == 204
    _error(api.get(f"/Users/{rid}"), 404)


def test_filters_use_eq_with_or_and_and_refuse_the_rest(api: httpx.Client) -> None:
    ids = {}
    for n in range(1, 5):
        doc = {"schemas": [USER], "userName": f"u{n}@example.com", "externalId": f"e{n}"}
        doc["title"] = f"t{n % 2}"
        ids[n] = api.post("/Users", json=doc).json()["id"]

    def found(filter_: str) -> list[str]:
        page = api.get("/Users", params={"filter": filter_})
        assert page.status_code == 200, page.text
        return [r["id"] for r in page.json()["Resources"]]

    assert found('userName eq "U1@EXAMPLE.COM"') == [ids[1]]
    assert found('externalId eq "E1"') == []  # externalId is case-exact
    assert found('userName eq "u3@example.com" or externalId eq "e1"') == [ids[1], ids[3]]
    assert found('title eq "t1" and (externalId eq "e3" or externalId eq "e2")') == [ids[3]]
    assert found(f'id eq "{ids[4]}"') == [ids[4]]
    for bad, scim_type in [
        ('userName co "u"', "invalidFilter"),
        ('userName eq "u1', "invalidFilter"),
        ('(userName eq "u1@example.com"', "invalidFilter"),
        ('userName eq "a" xor', "invalidFilter"),
        ('emails[value eq "u1@example.com"]', "invalidPath"),
    ]:
        body = _error(api.get("/Users", params={"filter": bad}), 400, scim_type)
        assert "u1@example.com" not in body["detail"]  # values are not echoed back
    page = api.get("/Users", params={"startIndex": 2, "count": 2}).json()
    assert (page["totalResults"], page["startIndex"], page["itemsPerPage"]) == (4, 2, 2)
    assert [r["id"] for r in page["Resources"]] == [ids[2], ids[3]]
    assert api.get("/Users", params={"count": 0}).json()["Resources"] == []


def test_bulk_answers_each_operation_and_stops_at_fail_on_errors(
    harness: ScimHarness, api: httpx.Client
) -> None:
    rid = api.post("/Users", json={"schemas": [USER], "userName": "a@example.com"}).json()["id"]
    operations = [
        {
            "method": "POST",
            "path": "/Users",
            "bulkId": "b1",
            "data": {"schemas": [USER], "userName": "b@x.io"},
        },
        # taken by the first operation, case aside
        {
            "method": "POST",
            "path": "/Users",
            "bulkId": "b2",
            "data": {"schemas": [USER], "userName": "B@X.IO"},
        },
        {"method": "PATCH", "path": f"/Users/{rid}", "version": 'W/"9"', "data": _patch()},
        {"method": "PUT", "path": "/Users/nope", "data": {"schemas": [USER], "userName": "c@x.io"}},
        {"method": "DELETE", "path": f"/Users/{rid}"},
    ]
    answer = api.post("/Bulk", json={"schemas": [BULK_REQUEST], "Operations": operations, "failOnErrors": 2})
    assert answer.status_code == 200
    results = answer.json()["Operations"]
    assert [r["status"] for r in results] == ["201", "409", "412"]  # stopped at the second error
    assert results[0]["location"].startswith("/v2/Users/")
    assert results[0]["version"] == 'W/"1"'
    assert results[1]["response"]["scimType"] == "uniqueness"
    assert len(harness.accounts()) == 2
    whole = api.post("/Bulk", json={"schemas": [BULK_REQUEST], "Operations": operations[3:]}).json()
    assert [r["status"] for r in whole["Operations"]] == ["404", "204"]
    assert len(harness.accounts()) == 1


def test_bulk_limits_are_advertised_and_enforced(api: httpx.Client) -> None:
    config = api.get("/ServiceProviderConfig").json()
    limit = config["bulk"]["maxOperations"]
    assert [config[k]["supported"] for k in ("bulk", "patch", "etag", "filter")] == [True] * 4
    too_many = [{"method": "DELETE", "path": "/Users/x"}] * (limit + 1)
    _error(api.post("/Bulk", json={"schemas": [BULK_REQUEST], "Operations": too_many}), 413)
    _error(api.post("/Bulk", json={"Operations": []}), 400, "invalidSyntax")
    _error(api.post("/Bulk", content=b"{"), 400, "invalidSyntax")


def test_groups_hold_existing_users_and_lose_deleted_ones(api: httpx.Client, harness: ScimHarness) -> None:
    connector = harness.connector()
    users = [connector.upsert(harness.record(n)).remote_id for n in (1, 2)]
    assert all(users)
    made = connector.upsert_group("g1", "Gold", [str(u) for u in users])
    assert made.outcome == "created"
    again = connector.upsert_group("g1", "Gold customers", [str(users[0])])
    assert (again.remote_id, again.outcome) == (made.remote_id, "adopted")
    group = api.get(f"/Groups/{made.remote_id}").json()
    assert group["displayName"] == "Gold customers"
    assert [m["value"] for m in group["members"]] == [users[0]]
    bad = {"schemas": [GROUP], "displayName": "X", "members": [{"value": "nobody"}]}
    _error(api.post("/Groups", json=bad), 400, "invalidValue")
    connector.deprovision(harness.record(1, remote_id=users[0]), DeprovisionAction.DELETE)
    assert api.get(f"/Groups/{made.remote_id}").json()["members"] == []
    assert connector.delete_group("g1").outcome == "deprovisioned"
    connector.close()


def test_wrong_token_is_401_in_scim_error_json(harness: ScimHarness) -> None:
    with httpx.Client(base_url=harness.server.url, headers={"Authorization": "Bearer nope"}) as client:
        _error(client.get("/Users"), 401)
