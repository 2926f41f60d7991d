"""A lookup ``attribute eq "value"`` on a column answers exactly as the general search does.

``HubHandler.search`` answers such a filter without parsing it, by a statement built once per column
(``SqlStorage.find_equal``). Each search here runs both ways, the general one forced by switching the
shortcut off, and the two answers must be the same; where the shortcut must not apply, it must not.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.api import HubService
from orchestrator.scim import storage as scim_storage
from tests.conftest import create_pg_database, drop_pg_database
from tests.hub import GROUP_SCHEMA, client, make_hub, user


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def hub(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    url = (
        f"sqlite:///{tmp_path_factory.mktemp('lookup')}/hub.db"
        if request.param == "sqlite"
        else create_pg_database()
    )
    app, engine = make_hub(url)
    http = client(app, engine)
    run = uuid.uuid4().hex[:8]
    made = {"http": http, "hub": app.state.hub, "run": run}
    for i, (name, external) in enumerate(
        [(f"Ana.{run}@Lookup.example", f"Ext-{run}"), (f"bob.{run}@lookup.example", f"ext-{run}")]
    ):
        body = user(name, externalId=external, displayName=f"Person {i}", name={"givenName": "Ana"})
        made[f"user{i}"] = http.post("/scim/v2/Users", json=body).json()
    # Two more customers share an externalId, which nothing makes unique, so that paging has pages.
    for i in range(3):
        made[f"shared{i}"] = http.post(
            "/scim/v2/Users", json=user(f"s{i}.{run}@lookup.example", externalId=f"shared-{run}")
        ).json()
    gone = http.post(
        "/scim/v2/Users", json=user(f"gone.{run}@lookup.example", externalId=f"gone-{run}")
    ).json()
    assert http.delete(f"/scim/v2/Users/{gone['id']}").status_code == 204
    made["gone"] = gone
    made["umlaut"] = http.post("/scim/v2/Users", json=user(f"jürgen.{run}@lookup.example")).json()
    group = {"schemas": [GROUP_SCHEMA], "displayName": f"Segment {run}", "externalId": f"seg-{run}"}
    group["members"] = [{"value": made["user0"]["id"]}]
    made["group"] = http.post("/scim/v2/Groups", json=group).json()
    yield made
    engine.dispose()
    if request.param == "postgresql":
        drop_pg_database(url)


def both_ways(
    hub: dict[str, Any], monkeypatch: pytest.MonkeyPatch, endpoint: str, query: dict[str, str]
) -> tuple[Any, Any, int]:
    """(answer with the shortcut, answer without it, how many lookups took the shortcut)."""
    http: TestClient = hub["http"]
    taken = 0
    real = scim_storage.SqlStorage.find_equal

    def counted(self: Any, *args: Any) -> Any:
        nonlocal taken
        taken += 1
        return real(self, *args)

    with monkeypatch.context() as m:
        m.setattr(scim_storage.SqlStorage, "find_equal", counted)
        quick = http.get(f"/scim/v2{endpoint}", params=query)
    with monkeypatch.context() as m:
        m.setattr(HubService, "equality", lambda self, query: None)
        general = http.get(f"/scim/v2{endpoint}", params=query)
    return (quick.status_code, quick.json()), (general.status_code, general.json()), taken


def cases(hub: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """The searches the shortcut answers first (``SHORTCUT`` of them), then those it must leave alone."""
    run, ana, bob = hub["run"], hub["user0"], hub["user1"]
    return [
        ("/Users", {"filter": f'userName eq "ana.{run}@lookup.example"'}),  # stored in another case
        ("/Users", {"filter": f'USERNAME eq "ANA.{run}@LOOKUP.EXAMPLE"'}),
        ("/Users", {"filter": f'userName Eq "{bob["userName"]}"'}),
        ("/Users", {"filter": f'userName EQ "{hub["umlaut"]["userName"]}"'}),
        ("/Users", {"filter": f'userName eq "JÜRGEN.{run}@lookup.example"'}),
        ("/Users", {"filter": f'userName eq "gone.{run}@lookup.example"'}),  # a tombstone is not found
        ("/Users", {"filter": 'userName eq ""'}),
        ("/Users", {"filter": f'externalId eq "Ext-{run}"'}),
        ("/Users", {"filter": f'externalId eq "ext-{run}"'}),  # case-exact: only bob
        ("/Users", {"filter": f'externalId eq "EXT-{run}"'}),  # case-exact: nobody
        ("/Users", {"filter": f'externalId eq "shared-{run}"'}),
        ("/Users", {"filter": f'externalId eq "shared-{run}"', "startIndex": "2", "count": "1"}),
        ("/Users", {"filter": f'externalId eq "shared-{run}"', "startIndex": "9"}),  # past the end
        ("/Users", {"filter": f'externalId eq "shared-{run}"', "startIndex": "0"}),
        ("/Users", {"filter": f'id eq "{ana["id"]}"'}),
        ("/Users", {"filter": f'id eq "{ana["id"].upper()}"'}),
        ("/Users", {"filter": f'id eq "{hub["gone"]["id"]}"'}),  # a tombstone keeps its id
        ("/Users", {"filter": f'userName eq "{ana["userName"]}"', "attributes": "userName"}),
        ("/Users", {"filter": f'userName eq "{ana["userName"]}"', "excludedAttributes": "name,emails"}),
        ("/Users", {"filter": f'userName eq "{ana["userName"]}"', "unknownParameter": "x"}),
        ("/Groups", {"filter": f'displayName eq "segment {run}"'}),
        ("/Groups", {"filter": f'externalId eq "seg-{run}"', "excludedAttributes": "members"}),
        # Not columns, or not this type's, a page of no rows, anything but one such comparison, other
        # parameters: the general search answers.
        ("/Users", {"filter": f'externalId eq "shared-{run}"', "count": "0"}),
        ("/Users", {"filter": f'externalId eq "shared-{run}"', "count": "-3"}),
        ("/Users", {"filter": 'displayName eq "Person 0"'}),
        ("/Users", {"filter": 'name eq "Ana"'}),
        ("/Users", {"filter": 'emails eq "x"'}),
        ("/Users", {"filter": 'nickName eq "x"'}),
        ("/Users", {"filter": 'password eq "x"'}),
        ("/Users", {"filter": 'noSuchAttribute eq "x"'}),
        ("/Users", {"filter": 'active eq "true"'}),
        ("/Groups", {"filter": f'userName eq "{ana["userName"]}"'}),
        ("/", {"filter": f'userName eq "{ana["userName"]}"'}),
        ("/Users", {"filter": f'userName eq "{ana["userName"]}"', "sortBy": "userName"}),
        ("/Users", {"filter": f'userName eq "{ana["userName"]}"', "count": "many"}),
        ("/Users", {"filter": f'userName eq "{ana["userName"]}"', "attributes": "no such thing!"}),
        ("/Users", {"filter": f' userName eq "{ana["userName"]}"'}),
        ("/Users", {"filter": f'userName  eq "{ana["userName"]}"'}),
        ("/Users", {"filter": 'userName eq "a\\"b"'}),
        ("/Users", {"filter": 'userName eq "a\tb"'}),
        ("/Users", {"filter": f'userName ne "{ana["userName"]}"', "count": "1"}),
        ("/Users", {"filter": f'userName eq "{ana["userName"]}" or userName eq "x"'}),
    ]


SHORTCUT = 22


def test_a_lookup_answers_as_the_general_search(hub: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    took = []
    for i, (endpoint, query) in enumerate(cases(hub)):
        quick, general, taken = both_ways(hub, monkeypatch, endpoint, query)
        assert quick == general, (endpoint, query)
        if taken:
            took.append(i)
    assert took == list(range(SHORTCUT))


def test_the_lookup_finds_what_it_should(hub: dict[str, Any]) -> None:
    http: TestClient = hub["http"]
    run, ana = hub["run"], hub["user0"]

    def found(query: dict[str, str], endpoint: str = "/Users") -> list[str]:
        answer = http.get(f"/scim/v2{endpoint}", params=query)
        assert answer.status_code == 200, answer.text
        return [r["id"] for r in answer.json()["Resources"]]

    assert found({"filter": f'userName eq "ANA.{run}@lookup.example"'}) == [ana["id"]]
    assert found({"filter": f'externalId eq "ext-{run}"'}) == [hub["user1"]["id"]]
    assert found({"filter": f'externalId eq "EXT-{run}"'}) == []
    assert found({"filter": f'userName eq "gone.{run}@lookup.example"'}) == []
    assert found({"filter": f'id eq "{hub["gone"]["id"]}"'}) == []
    shared = [hub[f"shared{i}"]["id"] for i in range(3)]
    assert found({"filter": f'externalId eq "shared-{run}"'}) == shared
    assert found({"filter": f'externalId eq "shared-{run}"', "startIndex": "2", "count": "1"}) == shared[1:2]
    assert found({"filter": f'displayName eq "SEGMENT {run}"'}, "/Groups") == [hub["group"]["id"]]
    page = http.get("/scim/v2/Users", params={"filter": f'externalId eq "shared-{run}"', "count": "0"}).json()
    assert page["totalResults"] == 3
    assert not page.get("Resources")
