"""Plain creations and PATCHes (``orchestrator.scim.plain``) answer and store what scim2-models' way does.

Each case runs twice: once as the hub serves it, once with plain reading turned off, so that scim2-models
validates and applies it (a PATCH on two customers stored alike). Answers, stored documents, versions and
events must be the same, and the first run must really have gone the plain way.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select

from orchestrator.auth import create_token
from orchestrator.db import identities, outbox
from orchestrator.scim import plain
from orchestrator.scim.extensions import user_model
from orchestrator.settings import Settings
from tests.conftest import create_pg_database, drop_pg_database
from tests.hub import CUSTOMER, PATCH_SCHEMA, USER_SCHEMA, make_hub, serve_in_process

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def hub(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("plain")
    url = create_pg_database() if request.param == "postgresql" else f"sqlite:///{folder}/hub.db"
    app, engine = make_hub(url)
    token = create_token(engine, "plain", ["admin"])
    yield app.state.hub, engine, token
    engine.dispose()
    if request.param == "postgresql":
        drop_pg_database(url)


def serve(hub: Any, method: str, path: str, body: Any, **headers: str) -> Any:
    served, _, token = hub
    return serve_in_process(served, token, method, path, body, **headers)


def patch_body(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_SCHEMA], "Operations": list(operations)}


def stored(engine: Engine, resource_id: str) -> tuple[dict[str, Any], int, list[tuple[str, list[str]]]]:
    with engine.connect() as conn:
        doc, version = conn.execute(
            select(identities.c.doc, identities.c.version).where(identities.c.id == resource_id)
        ).one()
        events = conn.execute(
            select(outbox.c.kind, outbox.c.changed)
            .where(outbox.c.resource_id == resource_id)
            .order_by(outbox.c.seq)
        ).all()
    return doc, version, [(kind, list(changed)) for kind, changed in events]


def customer(hub: Any, start: dict[str, Any]) -> str:
    name = f"p-{uuid.uuid4().hex[:10]}@plain.example"
    schemas = [USER_SCHEMA, *(key for key in (ENTERPRISE, CUSTOMER) if key in start)]
    response = serve(hub, "POST", "/Users", {"schemas": schemas, "userName": name, **start})
    assert response.status == 201, response.body
    return str(response.body["id"])


def without_identity(value: Any, resource_id: str) -> Any:
    """A document or answer with what differs between two customers stored alike taken out."""
    text = json.dumps(value, sort_keys=True).replace(resource_id, "ID")
    out = json.loads(text)
    if isinstance(out, dict):
        out.pop("userName", None)
        if isinstance(out.get("meta"), dict):
            out["meta"] = {k: v for k, v in out["meta"].items() if k not in ("created", "lastModified")}
    return out


class Ways:
    """The two runs of a case: with ``plain.<reader>`` as it is, watched (``taken``: whether it read each
    body it was given), then with it turned off, so that scim2-models reads the body."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, reader: str) -> None:
        self.monkeypatch, self.reader = monkeypatch, reader
        self.read = getattr(plain, reader)
        self.taken: list[bool] = []

    def spy(self, model: Any, body: Any) -> Any:
        result = self.read(model, body)
        self.taken.append(result is not None)
        return result

    def __iter__(self) -> Iterator[None]:
        for chosen in (self.spy, lambda *_: None):
            self.monkeypatch.setattr(plain, self.reader, chosen)
            yield
        self.monkeypatch.setattr(plain, self.reader, self.read)


def two_runs(
    hub: Any, monkeypatch: pytest.MonkeyPatch, reader: str, send: Callable[[], tuple[Any, str | None]]
) -> tuple[Any, Any]:
    """``send`` run twice, with ``plain.<reader>`` as it is and then turned off (scim2-models reads the
    body): each run's answer (status, headers, body) and what it stored, with its customer's id taken out.
    ``send`` returns the response and the id of the customer it wrote, if any."""
    _, engine, _ = hub
    ways = Ways(monkeypatch, reader)
    runs = []
    for _ in ways:
        response, resource_id = send()
        known = resource_id or "none"
        headers = {k: v for k, v in response.headers.items() if k != "Cache-Control"}
        answer = (
            int(response.status),
            without_identity(headers, known),
            without_identity(response.body, known),
        )
        if resource_id is None:
            runs.append((answer, None))
        else:
            doc, version, events = stored(engine, resource_id)
            runs.append((answer, (without_identity(doc, resource_id), version, events)))
    assert ways.taken == [True], "the first run did not go the plain way"
    return runs[0], runs[1]


def both_ways(
    hub: Any, monkeypatch: pytest.MonkeyPatch, start: dict[str, Any], body: Any, **headers: str
) -> tuple[Any, Any]:
    """(plain, scim2-models) runs of one PATCH, each on its own customer stored as ``start``."""
    ids = iter([customer(hub, start), customer(hub, start)])

    def send() -> tuple[Any, str]:
        resource_id = next(ids)
        return serve(hub, "PATCH", f"/Users/{resource_id}", body, **headers), resource_id

    return two_runs(hub, monkeypatch, "patch_values", send)


def op(path: str, value: Any, kind: str = "replace") -> dict[str, Any]:
    return {"op": kind, "path": path, "value": value}


CASES: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "a string": ({"nickName": "old"}, [op("nickName", "new")]),
    "an attribute not held yet, by add": ({}, [op("title", "Dr", "add")]),
    "a sub-attribute of an absent complex attribute": ({}, [op("name.givenName", "Ada")]),
    "a sub-attribute beside others, names in any case, Entra's op": (
        {"name": {"givenName": "Ada", "familyName": "L"}},
        [op("NAME.familyname", "Lovelace", "Replace")],
    ),
    "several operations, one path twice": (
        {"displayName": "a"},
        [op("displayName", "b"), op("locale", "de-CH"), op("displayName", "c", "Add")],
    ),
    "the core schema's URN before the name": ({}, [op(f"{USER_SCHEMA}:userType", "member")]),
    "the same value again: no change, no event": ({"nickName": "same"}, [op("nickName", "same")]),
    "one of two values the same": ({"nickName": "same"}, [op("nickName", "same"), op("title", "new")]),
    "deactivation": ({"active": True}, [op("active", False)]),
    "reactivation": ({"active": False}, [op("active", True)]),
    "externalId": ({"externalId": "e1"}, [op("externalId", "e2")]),
    "extensions not held yet": (
        {},
        [op(f"{CUSTOMER}:loyalty.points", 5), op(f"{ENTERPRISE}:department", "R&D")],
    ),
    "extension attributes beside others": (
        {CUSTOMER: {"customerNumber": "7", "loyalty": {"tier": "gold", "points": 1}}},
        [op(f"{CUSTOMER}:loyalty.points", 250), op(f"{CUSTOMER.upper()}:CUSTOMERNUMBER", "8")],
    ),
    # The answer then goes the model's way: publishing rewrites the manager's reference.
    "a customer holding a reference": (
        {ENTERPRISE: {"manager": {"value": "m-1", "$ref": "https://hub.example/scim/v2/Users/m-1"}}},
        [op("nickName", "new")],
    ),
    "a string too long to keep": ({}, [op("nickName", "x" * 5000)]),
    "a string holding NUL": ({}, [op("title", "a\x00b")]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_plain_patch_answers_and_stores_what_scim2_models_does(
    hub: Any, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    start, operations = CASES[case]
    plain, models = both_ways(hub, monkeypatch, start, patch_body(*operations))
    assert plain == models


def test_the_events_of_plain_patches_name_the_paths_changed(
    hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cases above compare the two ways; this pins what both write, so that they cannot agree on nothing.
    start, operations = CASES["extension attributes beside others"]
    (answer, (doc, version, events)), _ = both_ways(hub, monkeypatch, start, patch_body(*operations))
    assert answer[0] == 200
    assert doc[CUSTOMER] == {"customerNumber": "8", "loyalty": {"tier": "gold", "points": 250}}
    assert version == 2
    assert events[-1] == ("updated", [f"{CUSTOMER}:customerNumber", f"{CUSTOMER}:loyalty.points"])
    (_, (_, version, events)), _ = both_ways(
        hub, monkeypatch, {"active": True}, patch_body(op("active", False))
    )
    assert events[-1] == ("deactivated", ["active"])


def test_a_plain_patch_of_a_customer_not_stored_answers_404(hub: Any) -> None:
    body = patch_body(op("nickName", "x"))
    response = serve(hub, "PATCH", f"/Users/{uuid.uuid4()}", body)
    assert response.status == 404
    assert response.body["status"] == "404"


def test_a_plain_patch_of_a_taken_user_name_answers_409_and_changes_nothing(hub: Any) -> None:
    _, engine, _ = hub
    first, second = customer(hub, {}), customer(hub, {})
    taken = stored(engine, first)[0]["userName"]
    before = stored(engine, second)
    response = serve(hub, "PATCH", f"/Users/{second}", patch_body(op("userName", taken.upper())))
    assert response.status == 409
    assert response.body["scimType"] == "uniqueness"
    assert stored(engine, second) == before


def test_a_plain_patch_needs_the_write_scope_and_json(hub: Any) -> None:
    served, engine, _ = hub
    resource_id = customer(hub, {})
    before = stored(engine, resource_id)
    reader = (served, engine, create_token(engine, f"r-{uuid.uuid4().hex[:6]}", ["scim:read"]))
    assert serve(reader, "PATCH", f"/Users/{resource_id}", patch_body(op("title", "x"))).status == 403
    response = serve(
        hub, "PATCH", f"/Users/{resource_id}", patch_body(op("title", "x")), **{"content-type": "text/plain"}
    )
    assert response.status == 415
    assert stored(engine, resource_id) == before


@pytest.mark.parametrize(
    "operation",
    [
        op("nickName", None),
        op("nickName", 5),
        op("active", "False"),  # Entra ID's boolean as text: scim2-models reads it
        op(f"{CUSTOMER}:loyalty.points", True),
        op(f"{CUSTOMER}:loyalty.points", 1.5),
        op("name", {"givenName": "x"}),
        op("emails", [{"value": "a@b.example"}]),
        op('emails[type eq "work"].value', "a@b.example"),
        op("id", "x"),
        op("meta.lastModified", "2020-01-01T00:00:00Z"),
        op("profileUrl", "https://example.com/p"),
        op("password", "secret"),
        op(f"{CUSTOMER}:loyalty.memberSince", "2020-01-01T00:00:00Z"),
        op(f"{CUSTOMER}:marketingPreferences.frequency", "weekly"),
        op(f"{ENTERPRISE}:manager.value", "someone"),  # manager requires $ref beside it
        op(f"{ENTERPRISE}:manager", "someone"),
        op("unknownAttribute", "x"),
        op("nickName", "x", "remove"),
        op("nickName", "x", "move"),
        {"op": "replace", "value": {"nickName": "x"}},
        {"op": "replace", "path": "nickName", "value": "x", "extra": 1},
    ],
)
def test_other_patches_are_left_to_scim2_models(operation: dict[str, Any]) -> None:
    model = user_model(Settings().schema_dir)
    assert plain.patch_values(model, json.dumps(patch_body(operation)).encode()) is None
    assert plain.patch_values(model, json.dumps(patch_body(op("nickName", "x"))).encode()) == {
        "nickName": "x"
    }


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        json.dumps({"schemas": [PATCH_SCHEMA], "Operations": []}).encode(),
        json.dumps({"schemas": ["urn:other"], "Operations": [op("nickName", "x")]}).encode(),
        json.dumps({"Operations": [op("nickName", "x")]}).encode(),
        json.dumps({**patch_body(op("nickName", "x")), "extra": 1}).encode(),
    ],
)
def test_malformed_or_unusual_bodies_are_left_to_scim2_models(body: bytes) -> None:
    assert plain.patch_values(user_model(Settings().schema_dir), body) is None


def test_a_patch_with_preconditions_or_parameters_goes_the_models_way(
    hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bytes] = []
    monkeypatch.setattr(plain, "patch_values", lambda model, raw: calls.append(raw))
    resource_id = customer(hub, {})
    response = serve(
        hub, "PATCH", f"/Users/{resource_id}", patch_body(op("title", "x")), **{"if-match": 'W/"1"'}
    )
    assert response.status == 200
    assert calls == []


def created_both_ways(hub: Any, monkeypatch: pytest.MonkeyPatch, body: dict[str, Any]) -> tuple[Any, Any]:
    """(plain, scim2-models) runs of one creation, each with its own userName put into ``body``."""

    def send() -> tuple[Any, str | None]:
        name = f"c-{uuid.uuid4().hex[:10]}@plain.example"
        named = {k: name if k.lower() == "username" else v for k, v in body.items()}
        response = serve(hub, "POST", "/Users", named)
        return response, response.body["id"] if response.status == 201 else None

    return two_runs(hub, monkeypatch, "creation", send)


CREATIONS: dict[str, dict[str, Any]] = {
    "a registration": {
        "schemas": [USER_SCHEMA],
        "userName": "",
        "name": {"givenName": "Ada", "familyName": "Lovelace"},
        "emails": [{"value": "ada@plain.example", "primary": True}],
        "active": True,
    },
    "a userName alone": {"schemas": [USER_SCHEMA], "userName": ""},
    "names in any case, attributes in any order": {
        "USERNAME": "",
        "Name": {"GIVENNAME": "Ada", "formatted": "Ada L"},
        "schemas": [USER_SCHEMA],
        "nickname": "ada",
        "Active": False,
    },
    "every kind of plain value": {
        "schemas": [USER_SCHEMA],
        "userName": "",
        "externalId": "ext-1",
        "displayName": "Ada",
        "title": "Dr",
        "userType": "customer",
        "preferredLanguage": "en-GB",
        "locale": "en-GB",
        "timezone": "Europe/London",
        "emails": [
            {"value": "ada@plain.example", "type": "work", "primary": False, "display": "Work"},
            {"value": "ada@home.example", "type": "home", "primary": True},
        ],
        "phoneNumbers": [{"value": "+44 20 7946 0000", "type": "mobile"}],
        "addresses": [{"streetAddress": "1 Road", "locality": "London", "country": "GB", "type": "home"}],
        "roles": [{"value": "buyer"}],
        "entitlements": [{"value": "beta", "type": "feature"}],
        "ims": [{"value": "ada", "type": "xmpp"}],
    },
    "extensions with values, listed in another order": {
        "schemas": [USER_SCHEMA, CUSTOMER, ENTERPRISE],
        "userName": "",
        CUSTOMER: {"customerNumber": "C-7", "loyalty": {"tier": "gold", "points": 120}},
        ENTERPRISE: {"department": "R&D", "employeeNumber": "42"},
    },
    "an extension listed without values": {"schemas": [USER_SCHEMA, CUSTOMER], "userName": "", "title": "x"},
    "a string too long to keep": {"schemas": [USER_SCHEMA], "userName": "", "nickName": "x" * 5000},
    "a string holding NUL": {"schemas": [USER_SCHEMA], "userName": "", "title": "a\x00b"},
}


@pytest.mark.parametrize("case", CREATIONS)
def test_a_plain_creation_answers_and_stores_what_scim2_models_does(
    hub: Any, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    plain_run, models_run = created_both_ways(hub, monkeypatch, CREATIONS[case])
    assert plain_run == models_run


def test_a_plain_creation_stores_the_document_and_its_event(
    hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cases above compare the two ways; this pins what both write, so that they cannot agree on nothing.
    (answer, (doc, version, events)), _ = created_both_ways(
        hub, monkeypatch, CREATIONS["extensions with values, listed in another order"]
    )
    assert answer[0] == 201
    assert "Location" in answer[1]
    assert doc["schemas"] == [USER_SCHEMA, ENTERPRISE, CUSTOMER]
    assert doc[CUSTOMER] == {"customerNumber": "C-7", "loyalty": {"tier": "gold", "points": 120}}
    assert version == 1
    assert events == [("created", sorted([CUSTOMER, ENTERPRISE, "userName"]))]


def test_a_plain_creation_of_a_taken_user_name_answers_409(hub: Any) -> None:
    _, engine, _ = hub
    taken = stored(engine, customer(hub, {}))[0]["userName"]
    response = serve(hub, "POST", "/Users", {"schemas": [USER_SCHEMA], "userName": taken.upper()})
    assert response.status == 409
    assert response.body["scimType"] == "uniqueness"


@pytest.mark.parametrize(
    "change",
    [
        {"userName": None},
        {"nickName": None},
        {"id": "mine"},
        {"meta": {"resourceType": "User"}},
        {"password": "secret"},
        {"groups": [{"value": "g"}]},
        {"unknownAttribute": 1},
        {"active": "True"},
        {"nickName": 5},
        {"name": {}},
        {"name": {"givenName": "a", "GivenName": "b"}},
        {"name": "Ada"},
        {"emails": []},
        {"emails": {"value": "a@b.example"}},
        {"emails": [{"value": "A@B.EXAMPLE"}]},  # pydantic lower-cases the domain
        {"emails": [{"value": "not an address"}]},
        {"emails": [{"value": "a@b.example", "type": "Work"}]},  # scim2-models lower-cases canonical values
        {"emails": [{"value": "a@b.example", "primary": True}, {"value": "c@b.example", "primary": True}]},
        {"photos": [{"value": "https://example.com/p.png"}]},
        {"x509Certificates": [{"value": "TUlJ"}]},
        {"profileUrl": "https://example.com/p"},
        {CUSTOMER: {"customerNumber": "1"}},  # an extension's values without its URN in schemas
        {
            "schemas": [USER_SCHEMA, CUSTOMER],
            CUSTOMER: {"consents": [{"purpose": "profiling", "granted": True}]},
        },
        {"schemas": [USER_SCHEMA, CUSTOMER], CUSTOMER: {"loyalty": {"memberSince": "2020-01-01T00:00:00Z"}}},
        {"schemas": [USER_SCHEMA, CUSTOMER], CUSTOMER: {"marketingPreferences": {"frequency": "weekly"}}},
        {"schemas": [USER_SCHEMA, CUSTOMER], CUSTOMER: {}},
        {"schemas": [USER_SCHEMA, "urn:example:unknown"]},
        {"schemas": [USER_SCHEMA, USER_SCHEMA]},
        {"schemas": [CUSTOMER]},
        {"schemas": USER_SCHEMA},
    ],
)
def test_other_creations_are_left_to_scim2_models(change: dict[str, Any]) -> None:
    model = user_model(Settings().schema_dir)
    body = {"schemas": [USER_SCHEMA], "userName": "a@plain.example", **change}
    if body["userName"] is None:
        del body["userName"]  # a creation without one
    assert plain.creation(model, json.dumps(body).encode()) is None
    # The same creation without the change is plain: the reader refuses the change, not everything.
    assert plain.creation(
        model, json.dumps({"schemas": [USER_SCHEMA], "userName": "a@plain.example"}).encode()
    )


@pytest.mark.parametrize("body", [b"{", b"[]", b'"x"', json.dumps({"userName": "a@plain.example"}).encode()])
def test_malformed_or_unlisted_creation_bodies_are_left_to_scim2_models(body: bytes) -> None:
    assert plain.creation(user_model(Settings().schema_dir), body) is None


BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"


def bulk_both_ways(
    hub: Any, monkeypatch: pytest.MonkeyPatch, datas: list[dict[str, Any]], **envelope: Any
) -> tuple[Any, Any]:
    """(plain, scim2-models) runs of one Bulk request of creations, each run's userNames its own ("{run}" in a
    userName): per operation its status and what it stored, or its error."""
    _, engine, _ = hub
    ways = Ways(monkeypatch, "document")
    runs = []
    for _ in ways:
        run = uuid.uuid4().hex[:8]
        operations = [
            {
                "method": "POST",
                "path": "/Users",
                "bulkId": f"b{i}",
                "data": json.loads(json.dumps(data).replace("{run}", run)),
            }
            for i, data in enumerate(datas)
        ]
        response = serve(hub, "POST", "/Bulk", {"schemas": [BULK], "Operations": operations, **envelope})
        assert response.status == 200, response.body
        outcomes = []
        for outcome in response.body["Operations"]:
            if outcome["status"] != "201":
                outcomes.append((outcome["bulkId"], outcome["status"], outcome["response"]))
                continue
            resource_id = outcome["location"].rsplit("/", 1)[1]
            doc, version, events = stored(engine, resource_id)
            assert outcome["version"] == 'W/"1"'
            outcomes.append(
                (outcome["bulkId"], "201", json.loads(json.dumps(doc).replace(run, "RUN")), version, events)
            )
        runs.append(outcomes)
    assert any(ways.taken), "no operation went the plain way"
    return runs[0], runs[1]


def registration(user_name: str, **extra: Any) -> dict[str, Any]:
    emails = [{"value": user_name, "primary": True}]
    return {"schemas": [USER_SCHEMA], "userName": user_name, "emails": emails, **extra}


def test_a_bulk_of_plain_and_other_creations_stores_what_scim2_models_does(
    hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    datas = [
        registration("a-{run}@bulk.example", name={"givenName": "A"}, active=True),
        registration("b-{run}@bulk.example", active="True"),  # Entra's boolean: scim2-models reads it
        {
            "schemas": [USER_SCHEMA, CUSTOMER],
            "userName": "c-{run}@bulk.example",
            CUSTOMER: {"customerNumber": "7"},
        },
        registration("A-{run}@BULK.example"),  # the first one's userName in other case: 409
        registration("d-{run}@bulk.example", nickName="x" * 5000),  # too long: 400
    ]
    plain_run, models_run = bulk_both_ways(hub, monkeypatch, datas)
    assert plain_run == models_run
    assert [outcome[1] for outcome in plain_run] == ["201", "201", "201", "409", "400"]


def test_a_bulk_meeting_a_stored_user_name_is_served_again_the_same_both_ways(
    hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The held-back creations meet a stored userName at the flush; the request is served again an operation
    # at a time, with the stand-ins of the plain ones made anew.
    _, engine, _ = hub
    taken = stored(engine, customer(hub, {}))[0]["userName"]
    datas = [registration("e-{run}@bulk.example"), registration(taken), registration("f-{run}@bulk.example")]
    plain_run, models_run = bulk_both_ways(hub, monkeypatch, datas, failOnErrors=5)
    assert plain_run == models_run
    assert [outcome[1] for outcome in plain_run] == ["201", "409", "201"]
