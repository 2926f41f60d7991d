"""The hub's shortcuts in rendering SCIM answers give exactly what scim2-server's own methods give.

``HubService`` publishes resources without references on a shallow copy, answers searches from stored
documents without models where it can (dumping the others once), renders successful Bulk results without a
BulkResponse model, and plans Bulk requests without ``bulkId:`` references without looking for them. Each is
compared here with the method it stands in for.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from scim2_models import BulkOperation, Context, InvalidValueException, Resource
from scim2_server.bulk import BulkPlan
from scim2_server.service import ScimService

from orchestrator.api import Hub, _PlainBulkPlan, _stored_shape
from orchestrator.scim import storage as scim_storage
from tests.conftest import create_pg_database, drop_pg_database
from tests.hub import CUSTOMER, GROUP_SCHEMA, SCIM, client, make_hub, user

BASE = "http://testserver/scim/v2"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def hub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Hub]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('rendering')}/hub.db"
    else:
        url = create_pg_database()
    app, engine = make_hub(url)
    yield client(app, engine), app.state.hub
    engine.dispose()
    if request.param == "postgresql":
        drop_pg_database(url)


def name() -> str:
    return f"r{uuid.uuid4().hex[:10]}@rendering.example"


def stored(hub: Hub, endpoint: str, resource_id: str) -> Resource[Any]:
    resource_type = hub.service.resource_type_at(endpoint)
    with hub.engine.connect() as conn, scim_storage.bind(conn):
        return hub.storage.get(resource_type, resource_id)


def resources(hub: tuple[TestClient, Hub]) -> list[tuple[str, Resource[Any]]]:
    """A customer without references, one with a manager, and a group with a member."""
    http, h = hub
    plain = http.post("/scim/v2/Users", json=user(name(), nickName="p")).json()
    manager = {"value": plain["id"], "$ref": f"Users/{plain['id']}"}
    managed = user(name(), **{ENTERPRISE: {"manager": manager}})
    managed["schemas"].append(ENTERPRISE)
    with_manager = http.post("/scim/v2/Users", json=managed).json()
    group = {"schemas": [GROUP_SCHEMA], "displayName": name(), "members": [{"value": plain["id"]}]}
    created = http.post("/scim/v2/Groups", json=group).json()
    assert with_manager[ENTERPRISE]["manager"]["$ref"].startswith(BASE)
    return [
        ("/Users", stored(h, "/Users", plain["id"])),
        ("/Users", stored(h, "/Users", with_manager["id"])),
        ("/Groups", stored(h, "/Groups", created["id"])),
    ]


def test_publish_matches_scim2_server(hub: tuple[TestClient, Hub]) -> None:
    service = hub[1].service
    context = Context.RESOURCE_QUERY_RESPONSE
    for _, resource in resources(hub):
        ours = service.publish(BASE, resource).model_dump(scim_ctx=context)
        theirs = ScimService.publish(service, BASE, resource).model_dump(scim_ctx=context)
        assert ours == theirs
        assert ours["meta"]["location"].startswith(BASE)


def rich_customer() -> dict[str, Any]:
    """A customer with every kind of attribute the hub stores, a password among them (returned never)."""
    doc = user(
        name(),
        externalId=f"crm-{uuid.uuid4().hex[:6]}",
        password="s3cret-Passw0rd",
        name={"givenName": "Ada", "familyName": "Lovelace", "honorificPrefix": "Dr."},
        displayName="Ada L.",
        nickName="ada",
        profileUrl="https://example.org/ada",
        preferredLanguage="en-GB",
        locale="en-GB",
        timezone="Europe/London",
        active=True,
        emails=[
            {"value": "Ada@Example.org", "type": "home", "primary": True},
            {"value": "ada@work.example", "type": "work"},
        ],
        phoneNumbers=[{"value": "+44 20 7946 0000", "type": "mobile"}],
        addresses=[{"streetAddress": "1 Analytical Way", "locality": "London", "country": "GB"}],
        photos=[{"value": "https://example.org/ada.png", "type": "photo"}],
        roles=[{"value": "customer"}],
        **{
            CUSTOMER: {
                "customerNumber": "C-42",
                "consents": [
                    {"purpose": "marketing_email", "granted": True, "updatedAt": "2024-03-01T10:00:00+02:00"},
                    {"purpose": "profiling", "granted": False, "source": "app"},
                ],
                "marketingPreferences": {"topics": ["news", "offers"], "frequency": "weekly"},
                "loyalty": {"tier": "gold", "points": 150, "memberSince": "2020-01-02T03:04:05Z"},
            }
        },
    )
    return doc


def searched(hub: tuple[TestClient, Hub], endpoint: str, query: dict[str, str]) -> tuple[Any, Any, Any]:
    """The hub's answer to a search from the stored rows, and scim2-server's from the built resources."""
    _, h = hub
    service = h.service
    resource_types = [service.resource_type_at(endpoint)]
    search_request, _ = service.read_search_query(resource_types, query)
    with h.engine.connect() as conn, scim_storage.bind(conn):
        found = h.storage.find(resource_types, search_request)
        ours = service.found_response(BASE, resource_types, found, search_request, h.storage.build)
        page = h.storage.search(resource_types, search_request)
    theirs = ScimService.search_response(service, BASE, resource_types, page, search_request)
    return found, ours, theirs


@pytest.mark.parametrize(
    "query",
    [{}, {"attributes": "userName"}, {"excludedAttributes": "emails"}, {"startIndex": "2", "count": "2"}],
)
def test_answers_from_stored_documents_match_scim2_server(
    hub: tuple[TestClient, Hub], query: dict[str, str]
) -> None:
    http, _ = hub
    marker = uuid.uuid4().hex[:8]
    ids = []
    for extra in ({}, {"nickName": "p"}):
        created = http.post("/scim/v2/Users", json={**rich_customer(), "title": marker, **extra})
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    manager = {"value": ids[0], "$ref": f"Users/{ids[0]}"}
    managed = user(name(), title=marker, **{ENTERPRISE: {"manager": manager, "department": "R&D"}})
    managed["schemas"].append(ENTERPRISE)
    assert http.post("/scim/v2/Users", json=managed).status_code == 201
    members = [{"value": ids[0]}]
    for group in ({"displayName": f"{marker} empty"}, {"displayName": f"{marker} full", "members": members}):
        assert http.post("/scim/v2/Groups", json={"schemas": [GROUP_SCHEMA], **group}).status_code == 201

    for endpoint, condition in (
        ("/Users", f'title eq "{marker}"'),
        ("/Groups", f'displayName sw "{marker}"'),
    ):
        found, ours, theirs = searched(hub, endpoint, {"filter": condition, **query})
        assert found.total == (3 if endpoint == "/Users" else 2)
        assert (ours.status, ours.headers) == (theirs.status, theirs.headers)
        assert json.dumps(ours.body, sort_keys=True) == json.dumps(theirs.body, sort_keys=True)
        assert "password" not in json.dumps(ours.body)


def test_an_empty_search_matches_scim2_server(hub: tuple[TestClient, Hub]) -> None:
    for query in ({"filter": 'userName eq "nobody@nowhere.example"'}, {"count": "0"}):
        _, ours, theirs = searched(hub, "/Users", query)
        assert json.dumps(ours.body, sort_keys=True) == json.dumps(theirs.body, sort_keys=True)


def test_documents_are_answered_without_models_only_where_nothing_differs(
    hub: tuple[TestClient, Hub],
) -> None:
    _, h = hub
    users, groups = (h.service.resource_type_at(endpoint) for endpoint in ("/Users", "/Groups"))
    shape = _stored_shape(h.service.get_model(users))
    assert shape is not None
    assert shape.withheld == {"password"}
    assert shape.references == {ENTERPRISE, "groups"}
    stamps = {"created_at": datetime.now(UTC), "updated_at": datetime.now(UTC), "version": 1}
    row = SimpleNamespace(id="x", doc={"userName": "u", ENTERPRISE: {"department": "D"}}, **stamps)
    assert h.service.stored_body(BASE, users, row, None) is None  # a manager would need its URL
    group_row = SimpleNamespace(id="g", doc={"displayName": "g"}, **stamps)
    assert h.service.stored_body(BASE, groups, group_row, [{"value": "x", "type": "User"}]) is None


def test_answers_to_writes_from_stored_documents_match_scim2_server(hub: tuple[TestClient, Hub]) -> None:
    _, h = hub
    service = h.service
    users = service.resource_type_at("/Users")
    context = Context.RESOURCE_REPLACEMENT_RESPONSE
    managed = user(name(), **{ENTERPRISE: {"department": "R&D"}})
    managed["schemas"].append(ENTERPRISE)
    for doc, from_document in ((rich_customer(), True), (managed, False)):
        with h.engine.begin() as conn, scim_storage.bind(conn, write=True):
            created = h.storage.create(users, service.read_creation(users, json.dumps(doc).encode(), SCIM))
            assert (
                service._written_response(BASE, created, None, HTTPStatus.CREATED) is not None
            ) is from_document
            answers = [
                (
                    service.creation_response(BASE, created),
                    ScimService.creation_response(service, BASE, created),
                )
            ]
            changed = created.model_copy(update={"nick_name": "changed"})
            updated = h.storage.update(users, changed, expected_version=created.meta.version)
            for query in ({}, {"attributes": "nickName"}):
                parameters = service.read_response_parameters(users, query)
                published = service.publish(BASE, updated)
                theirs = ScimService.resource_response(published, context, parameters)
                theirs.headers["ETag"] = updated.meta.version
                answers.append((service.patch_response(BASE, updated, parameters), theirs))
                answers.append(
                    (
                        service.replacement_response(BASE, updated, parameters),
                        ScimService.replacement_response(service, BASE, updated, parameters),
                    )
                )
        for ours, theirs in answers:
            assert (ours.status, ours.headers) == (theirs.status, theirs.headers)
            assert json.dumps(ours.body, sort_keys=True) == json.dumps(theirs.body, sort_keys=True)
            assert "password" not in json.dumps(ours.body)


def test_bulk_response_matches_scim2_server(hub: tuple[TestClient, Hub]) -> None:
    service = hub[1].service
    plan = BulkPlan([], None)
    location = f"{BASE}/Users/{uuid.uuid4()}"
    plan.results = {
        0: {"method": BulkOperation.Method.post, "bulk_id": "a", "location": location, "version": 'W/"1"'},
        1: {"method": BulkOperation.Method.patch, "bulk_id": None, "location": location, "version": 'W/"2"'},
        2: {"method": BulkOperation.Method.delete, "bulk_id": None, "location": location},
    }
    for result, status in zip(plan.results.values(), (201, 200, 204), strict=True):
        result["status"] = HTTPStatus(status)
    ours = service.bulk_response(plan)
    theirs = ScimService.bulk_response(service, plan)
    assert ours.status == theirs.status
    assert ours.body == theirs.body


def bulk_body(*operations: dict[str, Any]) -> bytes:
    return json.dumps({"schemas": [BULK], "Operations": list(operations)}).encode()


def test_bulk_plan_looks_for_references_only_when_the_payload_holds_some(
    hub: tuple[TestClient, Hub],
) -> None:
    service = hub[1].service
    creation = {"method": "POST", "path": "/Users", "bulkId": "u", "data": user(name())}
    plain = service.read_bulk(bulk_body(creation), SCIM)
    assert isinstance(plain, _PlainBulkPlan)
    group = {"schemas": [GROUP_SCHEMA], "displayName": name(), "members": [{"value": "bulkId:u"}]}
    # The group comes first in the request: the plan must still create the customer before it.
    referencing = {"method": "POST", "path": "/Groups", "bulkId": "g", "data": group}
    planned = service.read_bulk(bulk_body(referencing, creation), SCIM)
    assert type(planned) is BulkPlan
    assert [step.index for step in planned] == [1, 0]


def test_a_reused_bulk_id_is_still_refused_without_references(hub: tuple[TestClient, Hub]) -> None:
    service = hub[1].service
    first = {"method": "POST", "path": "/Users", "bulkId": "same", "data": user(name())}
    second = {"method": "POST", "path": "/Users", "bulkId": "same", "data": user(name())}
    plan = service.read_bulk(bulk_body(first, second), SCIM)
    assert isinstance(plan, _PlainBulkPlan)
    steps = list(plan)
    assert plan.resolve(steps[0]) is plan.operation(steps[0])
    with pytest.raises(InvalidValueException):
        plan.resolve(steps[1])


@pytest.mark.parametrize("fail_on_errors", [2, None])
def test_plain_creations_are_read_as_scim2_models_reads_them(
    hub: tuple[TestClient, Hub], fail_on_errors: int | None
) -> None:
    """Each resource validated once, as its single POST: the same request as through the envelope."""
    service = hub[1].service
    quirky = user(name(), active="False")  # Entra ID's string booleans
    quirky["USERNAME"] = quirky.pop("userName")  # attribute names are case-insensitive
    quirky["schemas"].append(CUSTOMER)
    quirky[CUSTOMER] = {
        "customerNumber": "7",
        "consents": [{"purpose": "marketing_email", "granted": "True"}],
    }
    group = {"schemas": [GROUP_SCHEMA], "displayName": name()}
    payload: dict[str, Any] = {
        "schemas": [BULK],
        "Operations": [
            {"method": "POST", "path": "/Users", "bulkId": "a", "data": user(name(), nickName="n")},
            {"method": "POST", "path": "/Users", "bulkId": "b", "data": quirky},
            {"method": "POST", "path": "/Groups", "bulkId": "c", "data": group},
        ],
    }
    if fail_on_errors is not None:
        payload["failOnErrors"] = fail_on_errors
    with service.provider:
        quick = service._creations(payload)
        full = service.read_body(
            service.bulk_request, json.dumps(payload).encode(), SCIM, Context.BULK_REQUEST
        )
    assert quick is not None
    assert type(quick) is type(full)
    assert quick.model_fields_set == full.model_fields_set
    # A plain creation (plain.py) carries the document the storage keeps: the model's, dumped as it stores it.
    assert isinstance(quick.operations[0].data, dict)
    assert quick.operations[0].data == full.operations[0].data.model_dump(exclude={"id", "meta"})
    quick.operations[0] = quick.operations[0].model_copy(update={"data": full.operations[0].data})
    assert quick == full
    for ours, theirs in zip(quick.operations, full.operations, strict=True):
        assert type(ours) is type(theirs)
        assert type(ours.data) is type(theirs.data)
        assert ours == theirs
        assert ours.model_fields_set == theirs.model_fields_set
    assert quick.operations[1].data.active is False


@pytest.mark.parametrize(
    ("change", "status"),
    [
        pytest.param(lambda p: p["Operations"][1]["data"].pop("userName"), 400, id="invalid resource"),
        pytest.param(lambda p: p["Operations"][1].update(data=None), 400, id="no data"),
        pytest.param(lambda p: p["Operations"][1].pop("bulkId"), 400, id="no bulkId"),
        pytest.param(lambda p: p["Operations"][1].update(method="PUT"), 405, id="not a creation"),
        pytest.param(lambda p: p["Operations"][1].update(path="/Users/x"), 405, id="a resource path"),
        pytest.param(lambda p: p["Operations"][1].update(path="/Nothing"), 404, id="no such endpoint"),
        pytest.param(lambda p: p["Operations"][1].update(version='W/"1"'), 201, id="another key"),
        pytest.param(lambda p: p.update(failOnErrors="1"), 201, id="failOnErrors as a string"),
        pytest.param(lambda p: p.update(operations=p.pop("Operations")), 201, id="operations in lower case"),
    ],
)
def test_anything_but_plain_creations_is_read_through_the_envelope(
    hub: tuple[TestClient, Hub], change: Any, status: int
) -> None:
    """The quick reading declines, and scim2-models reads the request as before: a bad operation fails
    alone, the others are created (statuses as they were before the quick reading existed)."""
    http, h = hub
    payload = {
        "schemas": [BULK],
        "Operations": [
            {"method": "POST", "path": "/Users", "bulkId": f"b{i}", "data": user(name())} for i in range(3)
        ],
    }
    change(payload)
    with h.service.provider:
        assert h.service._creations(payload) is None
    answer = http.post("/scim/v2/Bulk", json=payload)
    assert answer.status_code == 200, answer.text
    assert [int(operation["status"]) for operation in answer.json()["Operations"]] == [201, status, 201]


def test_a_plain_creation_of_a_taken_name_still_fails_alone(hub: tuple[TestClient, Hub]) -> None:
    http, h = hub
    taken = name()
    operations = [
        {"method": "POST", "path": "/Users", "bulkId": "a", "data": user(taken)},
        {"method": "POST", "path": "/Users", "bulkId": "b", "data": user(taken.upper())},
        {"method": "POST", "path": "/Users", "bulkId": "c", "data": user(name())},
    ]
    payload = {"schemas": [BULK], "Operations": operations}
    with h.service.provider:
        assert h.service._creations(payload) is not None
    answer = http.post("/scim/v2/Bulk", json=payload).json()["Operations"]
    assert [(o["status"], (o.get("response") or {}).get("scimType")) for o in answer] == [
        ("201", None),
        ("409", "uniqueness"),
        ("201", None),
    ]


def test_the_hub_answers_a_search_with_its_resources(hub: tuple[TestClient, Hub]) -> None:
    http, _ = hub
    wanted = name()
    created = http.post("/scim/v2/Users", json=user(wanted)).json()
    found = http.get("/scim/v2/Users", params={"filter": f'userName eq "{wanted}"'}).json()
    assert found["totalResults"] == found["itemsPerPage"] == 1
    assert found["Resources"][0]["id"] == created["id"]
    assert found["Resources"][0]["meta"]["location"] == f"{BASE}/Users/{created['id']}"
    assert Path(found["Resources"][0]["meta"]["location"]).name == created["id"]
