"""The SCIM API end to end through HTTP (ASGI), on PostgreSQL and on SQLite."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from orchestrator import db
from tests.hub import (
    CUSTOMER,
    GROUP_SCHEMA,
    SCIM,
    SentStatements,
    client,
    events,
    hub_client,
    patch,
    user,
)


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def hub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Engine]]:
    folder = tmp_path_factory.mktemp("api")
    with hub_client(request.param, folder, max_body_bytes=64_000, bulk_max_operations=50) as pair:
        yield pair


def name() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


def create(c: TestClient, **extra: Any) -> dict[str, Any]:
    r = c.post("/scim/v2/Users", json=user(extra.pop("userName", name()), **extra))
    assert r.status_code == 201, r.text
    return dict(r.json())


def assert_scim_error(r: Any, status: int, scim_type: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    assert body["status"] == str(status)
    if scim_type is not None:
        assert body.get("scimType") == scim_type, body
    return dict(body)


# -- create, read, events ----------------------------------------------------------------------------


def test_create_answers_201_with_location_etag_and_one_event(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    before = len(events(engine))
    r = c.post(
        "/scim/v2/Users",
        json=user(name(), emails=[{"value": "Ada@Example.org", "primary": True}], name={"givenName": "Ada"}),
    )
    assert r.status_code == 201
    body = r.json()
    assert r.headers["Location"].endswith(f"/scim/v2/Users/{body['id']}")
    assert r.headers["ETag"] == body["meta"]["version"] == 'W/"1"'
    assert body["meta"]["created"].endswith(("Z", "+00:00"))
    new = events(engine)[before:]
    assert [(e.resource_id, e.version, e.kind) for e in new] == [(body["id"], 1, "created")]
    assert set(new[0].changed) == {"userName", "emails", "name"}
    assert "Ada" not in json.dumps([list(e) for e in new], default=str)


def test_user_name_is_unique_case_insensitively_and_a_conflict_stores_nothing(
    hub: tuple[TestClient, Engine],
) -> None:
    c, engine = hub
    n = name()
    create(c, userName=n)
    before = len(events(engine))
    r = c.post("/scim/v2/Users", json=user(n.upper()))
    assert_scim_error(r, 409, "uniqueness")
    assert len(events(engine)) == before


def test_get_unknown_is_404_scim_error(hub: tuple[TestClient, Engine]) -> None:
    c, _ = hub
    assert_scim_error(c.get(f"/scim/v2/Users/{uuid.uuid4()}"), 404)


def test_etags_if_none_match_304_and_if_match_412(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    u = create(c)
    url = f"/scim/v2/Users/{u['id']}"
    assert c.get(url, headers={"If-None-Match": u["meta"]["version"]}).status_code == 304
    before = len(events(engine))
    r = c.patch(
        url,
        json=patch({"op": "replace", "path": "displayName", "value": "x"}),
        headers={"If-Match": 'W/"99"'},
    )
    assert_scim_error(r, 412)
    assert len(events(engine)) == before
    r = c.patch(
        url, json=patch({"op": "replace", "path": "displayName", "value": "x"}), headers={"If-Match": 'W/"1"'}
    )
    assert r.status_code == 200
    assert r.json()["meta"]["version"] == 'W/"2"' == r.headers["ETag"]


# -- PATCH, PUT, lifecycle events ---------------------------------------------------------------------


def test_patch_answers_200_with_the_resource_and_supports_value_path_filters(
    hub: tuple[TestClient, Engine],
) -> None:
    c, engine = hub
    u = create(
        c, emails=[{"value": "w@example.org", "type": "work"}, {"value": "h@example.org", "type": "home"}]
    )
    url = f"/scim/v2/Users/{u['id']}"
    r = c.patch(
        url,
        json=patch(
            {"op": "replace", "path": 'emails[type eq "work"].value', "value": "w2@example.org"},
            {"op": "add", "path": "nickName", "value": "Nick"},
            {"op": "remove", "path": 'emails[type eq "home"]'},
        ),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["emails"] == [{"value": "w2@example.org", "type": "work"}]
    assert body["nickName"] == "Nick"
    last = events(engine)[-1]
    assert (last.kind, last.version) == ("updated", 2)
    assert set(last.changed) == {"emails", "nickName"}


def test_a_customer_is_created_by_one_statement_and_a_group_in_a_transaction(
    hub: tuple[TestClient, Engine],
) -> None:
    """On PostgreSQL a User's row and event are one statement, committed by itself: no BEGIN, no COMMIT."""
    c, engine = hub
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite serves every write in a transaction")
    create(c)  # the token is verified (and remembered) on the first request
    with SentStatements(c.app.state.hub) as seen:  # type: ignore[attr-defined]
        created = create(c)
        by_user = [(in_transaction, word) for in_transaction, word, _ in seen.sent]
        seen.sent.clear()
        group = {"schemas": [GROUP_SCHEMA], "displayName": name(), "members": [{"value": created["id"]}]}
        assert c.post("/scim/v2/Groups", json=group).status_code == 201
        by_group = list(seen.sent)
    assert by_user == [(False, "WITH")]
    assert by_group
    assert all(in_transaction for in_transaction, _, _ in by_group)
    assert [e.version for e in events(engine) if e.resource_id == created["id"]] == [1]


def test_deactivation_and_reactivation_are_their_own_events(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    u = create(c, active=True)
    url = f"/scim/v2/Users/{u['id']}"
    c.patch(url, json=patch({"op": "replace", "path": "active", "value": False}))
    c.patch(url, json=patch({"op": "replace", "path": "active", "value": True}))
    kinds = [e.kind for e in events(engine) if e.resource_id == u["id"]]
    assert kinds == ["created", "deactivated", "reactivated"]


def test_a_patch_that_changes_nothing_keeps_the_version_and_sends_no_event(
    hub: tuple[TestClient, Engine],
) -> None:
    c, engine = hub
    u = create(c, displayName="Same")
    before = len(events(engine))
    r = c.patch(
        f"/scim/v2/Users/{u['id']}", json=patch({"op": "replace", "path": "displayName", "value": "Same"})
    )
    assert r.status_code == 200
    assert r.json()["meta"]["version"] == 'W/"1"'
    assert len(events(engine)) == before


def test_put_replaces_the_whole_resource(hub: tuple[TestClient, Engine]) -> None:
    c, _ = hub
    u = create(c, displayName="Before", nickName="Gone")
    r = c.put(f"/scim/v2/Users/{u['id']}", json=user(u["userName"], displayName="After"))
    assert r.status_code == 200, r.text
    assert r.json()["displayName"] == "After"
    assert "nickName" not in r.json()


def test_delete_erases_personal_data_at_once_and_leaves_a_tombstone(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    n = name()
    u = create(c, userName=n, emails=[{"value": f"{n}@example.org"}], name={"familyName": "Secret"})
    assert c.delete(f"/scim/v2/Users/{u['id']}").status_code == 204
    assert_scim_error(c.get(f"/scim/v2/Users/{u['id']}"), 404)
    with engine.connect() as conn:
        row = conn.execute(select(db.identities).where(db.identities.c.id == u["id"])).one()
    assert (row.doc, row.user_name, row.email_ci) == ({}, None, None)
    assert row.deleted_at is not None
    assert n not in json.dumps(list(row), default=str)
    last = events(engine)[-1]
    assert (last.resource_id, last.kind, last.version) == (u["id"], "deleted", 2)
    # The userName is free again.
    create(c, userName=n)


# -- search ------------------------------------------------------------------------------------------


def test_filter_sort_page_and_attribute_selection(hub: tuple[TestClient, Engine]) -> None:
    c, _ = hub
    tag = uuid.uuid4().hex[:6]
    for i, tier in enumerate(["gold", "silver", "gold"]):
        create(
            c,
            userName=f"{tag}-{i}",
            displayName=f"D{2 - i}",
            **{CUSTOMER: {"loyalty": {"tier": tier, "points": i * 10}}},
        )
    flt = f'userName sw "{tag}" and {CUSTOMER}:loyalty.tier eq "gold"'
    r = c.get("/scim/v2/Users", params={"filter": flt, "sortBy": "displayName", "attributes": "userName"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["totalResults"] == 2
    assert [u["userName"] for u in body["Resources"]] == [f"{tag}-2", f"{tag}-0"]
    assert set(body["Resources"][0]) <= {"id", "userName", "schemas", "meta"}
    r = c.post(
        "/scim/v2/Users/.search",
        json={
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"],
            "filter": f'userName sw "{tag}"',
            "sortBy": "userName",
            "sortOrder": "descending",
            "startIndex": 2,
            "count": 1,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["totalResults"], body["startIndex"], body["itemsPerPage"]) == (3, 2, 1)
    assert [u["userName"] for u in body["Resources"]] == [f"{tag}-1"]


def test_page_size_is_capped(hub: tuple[TestClient, Engine]) -> None:
    c, _ = hub
    r = c.get("/scim/v2/Users", params={"count": 10**6})
    assert r.status_code == 200
    assert r.json()["itemsPerPage"] <= 1000


# -- groups and bulk ---------------------------------------------------------------------------------


def test_groups_with_members_and_membership_events(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    a, b = create(c), create(c)
    r = c.post(
        "/scim/v2/Groups",
        json={"schemas": [GROUP_SCHEMA], "displayName": "VIP", "members": [{"value": a["id"]}]},
    )
    assert r.status_code == 201, r.text
    g = r.json()
    assert [m["value"] for m in g["members"]] == [a["id"]]
    r = c.patch(
        f"/scim/v2/Groups/{g['id']}",
        json=patch({"op": "add", "path": "members", "value": [{"value": b["id"]}]}),
    )
    assert r.status_code == 200, r.text
    assert sorted(m["value"] for m in r.json()["members"]) == sorted([a["id"], b["id"]])
    assert events(engine)[-1].kind == "members_changed"
    r = c.get("/scim/v2/Groups", params={"filter": f'members.value eq "{b["id"]}"'})
    assert [x["id"] for x in r.json()["Resources"]] == [g["id"]]
    # A deleted member leaves the group, and the group's version moves on.
    c.delete(f"/scim/v2/Users/{a['id']}")
    r = c.get(f"/scim/v2/Groups/{g['id']}")
    assert [m["value"] for m in r.json()["members"]] == [b["id"]]
    assert r.json()["meta"]["version"] == 'W/"3"'
    bad = c.post(
        "/scim/v2/Groups",
        json={"schemas": [GROUP_SCHEMA], "displayName": "X", "members": [{"value": "nope"}]},
    )
    assert_scim_error(bad, 400, "invalidValue")


def test_bulk_with_bulk_id_references_and_per_operation_failures(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    n = name()
    taken = create(c)["userName"]
    before = len(events(engine))
    r = c.post(
        "/scim/v2/Bulk",
        json={
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],
            "Operations": [
                {"method": "POST", "path": "/Users", "bulkId": "u1", "data": user(n)},
                {"method": "POST", "path": "/Users", "bulkId": "dup", "data": user(taken)},
                {
                    "method": "POST",
                    "path": "/Groups",
                    "bulkId": "g1",
                    "data": {
                        "schemas": [GROUP_SCHEMA],
                        "displayName": "B",
                        "members": [{"value": "bulkId:u1"}],
                    },
                },
            ],
        },
    )
    assert r.status_code == 200, r.text
    statuses = [op["status"] for op in r.json()["Operations"]]
    assert statuses == ["201", "409", "201"]
    new = events(engine)[before:]
    assert [(e.resource_type, e.kind) for e in new] == [("User", "created"), ("Group", "created")]


def test_bulk_fail_on_errors_stops_and_over_the_limit_is_413(hub: tuple[TestClient, Engine]) -> None:
    c, _ = hub
    taken = create(c)["userName"]
    ops = [{"method": "POST", "path": "/Users", "bulkId": f"b{i}", "data": user(taken)} for i in range(3)]
    r = c.post(
        "/scim/v2/Bulk",
        json={
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],
            "failOnErrors": 1,
            "Operations": ops,
        },
    )
    assert r.status_code == 200
    assert len(r.json()["Operations"]) == 1
    many = [{"method": "POST", "path": "/Users", "bulkId": f"m{i}", "data": user(name())} for i in range(51)]
    r = c.post(
        "/scim/v2/Bulk",
        json={"schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"], "Operations": many},
    )
    assert_scim_error(r, 413)


# -- identity-provider quirks -------------------------------------------------------------------------


def test_entra_quirks(hub: tuple[TestClient, Engine]) -> None:
    c, _ = hub
    u = create(
        c, externalId=f"ext-{uuid.uuid4()}", active=True, emails=[{"value": "e@example.org", "type": "work"}]
    )
    url = f"/scim/v2/Users/{u['id']}"
    # Capitalised op names and booleans as strings.
    r = c.patch(url, json=patch({"op": "Replace", "path": "active", "value": "False"}))
    assert r.status_code == 200, r.text
    assert r.json()["active"] is False
    # PATCH without a path, carrying a value object.
    r = c.patch(url, json=patch({"op": "Add", "value": {"displayName": "Entra", "active": "True"}}))
    assert r.status_code == 200, r.text
    assert (r.json()["displayName"], r.json()["active"]) == ("Entra", True)
    # Remove with a value selecting what to remove.
    r = c.patch(url, json=patch({"op": "Remove", "path": "emails", "value": [{"value": "e@example.org"}]}))
    assert r.status_code == 200, r.text
    assert "emails" not in r.json()
    # Add to a filtered path that matches nothing creates the entry.
    r = c.patch(
        url, json=patch({"op": "Add", "path": 'emails[type eq "work"].value', "value": "n@example.org"})
    )
    assert r.status_code == 200, r.text
    assert r.json()["emails"] == [{"type": "work", "value": "n@example.org"}]
    # Matching by externalId and by userName.
    for flt in (f'externalId eq "{u["externalId"]}"', f'userName eq "{u["userName"].upper()}"'):
        found = c.get("/scim/v2/Users", params={"filter": flt}).json()
        assert [x["id"] for x in found["Resources"]] == [u["id"]]


def test_okta_put_with_the_full_resource_and_patch_answers_200(hub: tuple[TestClient, Engine]) -> None:
    c, _ = hub
    u = create(c, name={"givenName": "O", "familyName": "K"}, active=True)
    full = {k: v for k, v in u.items() if k != "meta"}
    full["name"] = {"givenName": "Okta", "familyName": "K"}
    r = c.put(f"/scim/v2/Users/{u['id']}", json=full)
    assert r.status_code == 200, r.text
    assert r.json()["name"]["givenName"] == "Okta"
    r = c.patch(f"/scim/v2/Users/{u['id']}", json=patch({"op": "replace", "value": {"active": False}}))
    assert r.status_code == 200
    assert r.json()["active"] is False


# -- authentication ----------------------------------------------------------------------------------


def test_tokens_and_scopes(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    app = c.app
    anonymous = TestClient(app)
    r = anonymous.get("/scim/v2/Users")
    assert_scim_error(r, 401)
    assert "Bearer" in r.headers.get("WWW-Authenticate", "")
    assert_scim_error(anonymous.get("/scim/v2/Users", headers={"Authorization": "Bearer idh_wrong"}), 401)
    reader = client(app, engine, ("scim:read",), name=f"reader-{uuid.uuid4().hex[:6]}")
    assert reader.get("/scim/v2/Users").status_code == 200
    assert_scim_error(reader.post("/scim/v2/Users", json=user(name())), 403)
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/readyz").json() == {"status": "ready"}
    assert anonymous.get("/scim/v2/ServiceProviderConfig").status_code == 200


# -- bad input ---------------------------------------------------------------------------------------


BAD_INPUTS: list[tuple[str, Any, dict[str, str], int, str | None]] = [
    ("malformed json", b'{"schemas": [', {}, 400, "invalidSyntax"),
    ("wrong content type", b'{"userName": "x"}', {"Content-Type": "text/plain"}, 415, None),
    ("unknown attribute", {"userName": "x", "shoeSize": 44}, {}, 400, None),
    ("unknown schema", {"schemas": ["urn:example:nope"], "userName": "x"}, {}, 400, None),
    ("wrong type", {"userName": "x", "active": {"nested": 1}}, {}, 400, None),
    ("missing required", {"displayName": "x"}, {}, 400, None),
    ("over-long userName", {"userName": "x" * 300}, {}, 400, "invalidValue"),
    ("over-long string", {"userName": "ok-long", "nickName": "y" * 5000}, {}, 400, "invalidValue"),
    ("NUL byte", {"userName": "nul\u0000byte"}, {}, 400, "invalidValue"),
    ("oversized body", {"userName": "big", "title": "z" * 70_000}, {}, 413, None),
]


@pytest.mark.parametrize(
    ("case", "body", "headers", "status", "scim_type"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_create_input_answers_a_scim_error_and_stores_nothing(
    hub: tuple[TestClient, Engine],
    case: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    scim_type: str | None,
) -> None:
    c, engine = hub
    if isinstance(body, dict):
        body = json.dumps({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], **body}).encode()
    before = len(events(engine))
    r = c.post("/scim/v2/Users", content=body, headers={"Content-Type": SCIM, **headers})
    assert_scim_error(r, status, scim_type)
    assert len(events(engine)) == before


@pytest.mark.parametrize(
    ("flt", "status", "scim_type"),
    [
        ('userName eq "unterminated', 400, "invalidFilter"),
        ("noSuchAttribute eq 1", 400, "invalidFilter"),
        ("userName xx 1", 400, "invalidFilter"),
    ],
)
def test_bad_filters(hub: tuple[TestClient, Engine], flt: str, status: int, scim_type: str) -> None:
    c, _ = hub
    assert_scim_error(c.get("/scim/v2/Users", params={"filter": flt}), status, scim_type)


def test_mutability_violations(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    u = create(c)
    before = len(events(engine))
    r = c.patch(f"/scim/v2/Users/{u['id']}", json=patch({"op": "replace", "path": "id", "value": "other"}))
    assert_scim_error(r, 400, "mutability")
    r = c.patch(f"/scim/v2/Users/{u['id']}", json=patch({"op": "replace", "path": "noSuchPath", "value": 1}))
    assert_scim_error(r, 400)
    r = c.patch(f"/scim/v2/Users/{u['id']}", json=patch({"op": "explode", "path": "nickName", "value": 1}))
    assert_scim_error(r, 400)
    assert len(events(engine)) == before


def test_a_password_sent_is_neither_stored_returned_nor_announced(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    secret = f"Pw-{uuid.uuid4().hex}"
    created = c.post("/scim/v2/Users", json=user(name(), password=secret, nickName="n"))
    assert created.status_code == 201, created.text
    uid = created.json()["id"]
    replaced = c.put(f"/scim/v2/Users/{uid}", json=user(created.json()["userName"], password=secret + "2"))
    patched = c.patch(
        f"/scim/v2/Users/{uid}", json=patch({"op": "replace", "path": "password", "value": secret})
    )
    searched = c.get("/scim/v2/Users", params={"filter": f'id eq "{uid}"'})
    for answer in (created, replaced, patched, searched, c.get(f"/scim/v2/Users/{uid}")):
        assert answer.status_code == (201 if answer is created else 200), answer.text
        assert secret not in answer.text
        assert "password" not in answer.text
    with engine.connect() as conn:
        doc = conn.execute(select(db.identities.c.doc).where(db.identities.c.id == uid)).scalar_one()
    assert "password" not in doc
    assert secret not in json.dumps(doc)
    changes = [e for e in events(engine) if e.resource_id == uid]
    assert changes
    assert all("password" not in e.changed for e in changes)
