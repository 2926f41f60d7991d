"""Bulk User creations are written together; the answers and the stored state stay those of one at a time.

RFC 7644 §3.7: each operation has its own result, a refused one leaves the others in place, ``bulkId``
references resolve, ``failOnErrors`` stops the request. The held-back creations must not change any of it,
including when a userName clashes with a stored one (the request is then served one operation at a time).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, func, select

from orchestrator.db import identities
from tests.hub import GROUP_SCHEMA, events, hub_client, patch, user

BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def hub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Engine]]:
    with hub_client(request.param, tmp_path_factory.mktemp("bulk"), bulk_max_operations=100) as pair:
        yield pair


def name() -> str:
    return f"b-{uuid.uuid4().hex[:10]}"


def bulk(c: TestClient, operations: list[dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    r = c.post("/scim/v2/Bulk", json={"schemas": [BULK], "Operations": operations, **extra})
    assert r.status_code == 200, r.text
    return list(r.json()["Operations"])


def post(user_name: str, bulk_id: str) -> dict[str, Any]:
    return {"method": "POST", "path": "/Users", "bulkId": bulk_id, "data": user(user_name)}


def stored(engine: Engine, *user_names: str) -> list[str]:
    """The userNames of those given that are stored, in the order given."""
    wanted = [n.lower() for n in user_names]
    with engine.connect() as conn:
        rows = conn.execute(select(identities.c.user_name_ci).where(identities.c.user_name_ci.in_(wanted)))
        found = {r[0] for r in rows}
    return [n for n in wanted if n in found]


class Statements:
    """Counts the INSERTs into identities the engine sends while active."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inserts = 0

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "INSERT INTO IDENTITIES" in statement.upper():
            self.inserts += 1

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


def test_creations_are_written_together_with_one_event_each(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    names = [name() for _ in range(30)]
    before = len(events(engine))
    with Statements(engine) as seen:
        results = bulk(c, [post(n, f"u{i}") for i, n in enumerate(names)])
    assert seen.inserts == 1
    assert [r["status"] for r in results] == ["201"] * 30
    assert [r["bulkId"] for r in results] == [f"u{i}" for i in range(30)]
    assert all(r["version"] == 'W/"1"' for r in results)
    new = events(engine)[before:]
    ids = [r["location"].rsplit("/", 1)[1] for r in results]
    assert [(e.resource_id, e.kind, e.version) for e in new] == [(i, "created", 1) for i in ids]
    assert "userName" in new[0].changed
    assert stored(engine, *names) == [n.lower() for n in names]
    got = c.get("/scim/v2" + results[7]["location"].split("/scim/v2", 1)[1])
    assert got.status_code == 200
    assert got.json()["userName"] == names[7]


def test_a_name_twice_in_one_request_is_refused_the_second_time(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    n, other = name(), name()
    before = len(events(engine))
    with Statements(engine) as seen:
        results = bulk(c, [post(n, "a"), post(n.upper(), "b"), post(other, "c")])
    assert seen.inserts == 1  # no clash with the store: nothing to serve again
    assert [r["status"] for r in results] == ["201", "409", "201"]
    assert results[1]["response"]["scimType"] == "uniqueness"
    assert stored(engine, n, other) == [n, other]
    assert len(events(engine)) == before + 2


def test_a_stored_name_gets_409_and_the_others_are_created(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    taken = name()
    assert bulk(c, [post(taken, "x")])[0]["status"] == "201"
    fresh = [name() for _ in range(3)]
    before = len(events(engine))
    results = bulk(c, [post(fresh[0], "a"), post(taken, "b"), post(fresh[1], "c"), post(fresh[2], "d")])
    assert [r["status"] for r in results] == ["201", "409", "201", "201"]
    assert results[1]["response"]["scimType"] == "uniqueness"
    assert stored(engine, *fresh) == fresh
    new = events(engine)[before:]
    assert [e.kind for e in new] == ["created"] * 3
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).where(identities.c.user_name_ci == taken)).scalar_one() == 1


def test_fail_on_errors_stops_where_one_at_a_time_stops(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    taken = name()
    assert bulk(c, [post(taken, "x")])[0]["status"] == "201"
    first, after = name(), name()
    results = bulk(c, [post(first, "a"), post(taken, "b"), post(after, "c")], failOnErrors=1)
    assert [r["status"] for r in results] == ["201", "409"]
    assert stored(engine, first, after) == [first]


def test_references_to_held_back_creations_see_them(hub: tuple[TestClient, Engine]) -> None:
    c, engine = hub
    a, renamed, b = name(), name(), name()
    before = len(events(engine))
    results = bulk(
        c,
        [
            post(a, "a"),
            {
                "method": "PATCH",
                "path": "/Users/bulkId:a",
                "data": patch({"op": "replace", "value": {"userName": renamed}}),
            },
            # a's old name is free again once the PATCH is written.
            post(a, "b"),
            {
                "method": "POST",
                "path": "/Groups",
                "bulkId": "g",
                "data": {"schemas": [GROUP_SCHEMA], "displayName": b, "members": [{"value": "bulkId:a"}]},
            },
        ],
    )
    assert [r["status"] for r in results] == ["201", "200", "201", "201"]
    assert stored(engine, a, renamed) == [a, renamed]
    new = events(engine)[before:]
    user_id = results[0]["location"].rsplit("/", 1)[1]
    assert [(e.resource_type, e.kind, e.version) for e in new] == [
        ("User", "created", 1),
        ("User", "updated", 2),
        ("User", "created", 1),
        ("Group", "created", 1),
    ]
    assert new[1].resource_id == user_id
    group = c.get(f"/scim/v2/Groups/{results[3]['location'].rsplit('/', 1)[1]}").json()
    assert [m["value"] for m in group["members"]] == [user_id]
