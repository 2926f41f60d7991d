"""A User's PATCH and PUT on PostgreSQL: an unlocked read, then one statement writing only the version read.

When another request changes the row (or takes the new userName) between the two, that statement writes
nothing and the request is served again in a transaction with the row locked. These tests put a real second
request in that gap, and run PATCHes on one customer from several threads at once: nothing may be lost.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text

from orchestrator.api import Hub
from orchestrator.auth import create_token
from tests.conftest import create_pg_database, drop_pg_database
from tests.hub import PATCH_SCHEMA, SentStatements, events, make_hub, serve_in_process, user


@pytest.fixture(scope="module")
def pg() -> Iterator[tuple[Hub, Engine, str]]:
    url = create_pg_database()
    app, engine = make_hub(url)
    token = create_token(engine, "writes", ["admin"])
    yield app.state.hub, engine, token
    engine.dispose()
    drop_pg_database(url)


def serve(pg: tuple[Hub, Engine, str], method: str, path: str, body: Any = None, **headers: str) -> Any:
    hub, _, token = pg
    return serve_in_process(hub, token, method, path, body, **headers)


def create(pg: tuple[Hub, Engine, str], **extra: Any) -> dict[str, Any]:
    response = serve(pg, "POST", "/Users", user(f"w-{uuid.uuid4().hex[:10]}@writes.example", **extra))
    assert response.status == 201, response.body
    return dict(response.body)


def replace(path: str, value: Any) -> dict[str, Any]:
    return {"schemas": [PATCH_SCHEMA], "Operations": [{"op": "replace", "path": path, "value": value}]}


def versions(pg: tuple[Hub, Engine, str], resource_id: str) -> list[tuple[str, int]]:
    return [(e.kind, e.version) for e in events(pg[1]) if e.resource_id == resource_id]


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
def test_a_customer_write_is_an_unlocked_read_and_one_statement(
    pg: tuple[Hub, Engine, str], method: str
) -> None:
    made = create(pg, nickName="before")
    body = replace("nickName", "after") if method == "PATCH" else user(made["userName"], nickName="after")
    with SentStatements(pg[0]) as seen:
        response = serve(pg, method, f"/Users/{made['id']}", body)
    assert response.status == 200, response.body
    assert response.body["nickName"] == "after"
    assert [(txn, word) for txn, word, _ in seen.sent] == [(False, "SELECT"), (False, "WITH")]
    assert "FOR UPDATE" not in seen.sent[0][2]
    assert versions(pg, made["id"]) == [("created", 1), ("updated", 2)]


def test_a_change_made_between_the_read_and_the_write_is_kept(pg: tuple[Hub, Engine, str]) -> None:
    made = create(pg, nickName="first", title="first")

    def other_request() -> None:
        answer = serve(pg, "PATCH", f"/Users/{made['id']}", replace("title", "theirs"))
        assert answer.status == 200, answer.body

    with SentStatements(pg[0], other_request) as seen:
        response = serve(pg, "PATCH", f"/Users/{made['id']}", replace("nickName", "ours"))
    assert response.status == 200, response.body
    assert (response.body["nickName"], response.body["title"]) == ("ours", "theirs")
    assert response.body["meta"]["version"] == 'W/"3"'
    stored = serve(pg, "GET", f"/Users/{made['id']}").body
    assert (stored["nickName"], stored["title"]) == ("ours", "theirs")
    assert versions(pg, made["id"]) == [("created", 1), ("updated", 2), ("updated", 3)]
    # The second try locked the row in a transaction.
    assert any(txn and "FOR UPDATE" in text for txn, _, text in seen.sent)


def test_if_match_still_refuses_a_version_that_changed_between_the_read_and_the_write(
    pg: tuple[Hub, Engine, str],
) -> None:
    made = create(pg, nickName="first")

    def other_request() -> None:
        assert serve(pg, "PATCH", f"/Users/{made['id']}", replace("title", "theirs")).status == 200

    with SentStatements(pg[0], other_request):
        ours = replace("nickName", "ours")
        response = serve(pg, "PATCH", f"/Users/{made['id']}", ours, **{"if-match": 'W/"1"'})
    assert response.status == 412, response.body
    stored = serve(pg, "GET", f"/Users/{made['id']}").body
    assert (stored["nickName"], stored["title"]) == ("first", "theirs")
    assert versions(pg, made["id"]) == [("created", 1), ("updated", 2)]


def test_a_user_name_taken_between_the_check_and_the_write_answers_409(pg: tuple[Hub, Engine, str]) -> None:
    made = create(pg)
    wanted = f"taken-{uuid.uuid4().hex[:8]}@writes.example"

    def other_request() -> None:
        assert serve(pg, "POST", "/Users", user(wanted.upper())).status == 201

    with SentStatements(pg[0], other_request):
        response = serve(pg, "PATCH", f"/Users/{made['id']}", replace("userName", wanted))
    assert response.status == 409, response.body
    assert response.body["scimType"] == "uniqueness"
    assert serve(pg, "GET", f"/Users/{made['id']}").body["userName"] == made["userName"]
    assert versions(pg, made["id"]) == [("created", 1)]


def test_patches_from_many_threads_at_once_lose_nothing(pg: tuple[Hub, Engine, str]) -> None:
    made = create(pg)
    threads, each = 6, 12
    failures: list[Any] = []
    start = threading.Barrier(threads)

    def adder(t: int) -> None:
        start.wait()
        for i in range(each):
            add = {"op": "add", "path": "emails", "value": [{"value": f"t{t}-{i}@writes.example"}]}
            body = {"schemas": [PATCH_SCHEMA], "Operations": [add]}
            answer = serve(pg, "PATCH", f"/Users/{made['id']}", body)
            if answer.status != 200:
                failures.append(answer.body)

    workers = [threading.Thread(target=adder, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert failures == []
    stored = serve(pg, "GET", f"/Users/{made['id']}").body
    added = {e["value"] for e in stored["emails"]}
    assert added >= {f"t{t}-{i}@writes.example" for t in range(threads) for i in range(each)}
    assert stored["meta"]["version"] == f'W/"{1 + threads * each}"'
    assert [v for _, v in versions(pg, made["id"])] == list(range(1, 2 + threads * each))


def test_a_connection_lost_under_a_write_is_not_lent_again(pg: tuple[Hub, Engine, str]) -> None:
    # A User's write runs on the driver's connection (storage.on_driver), past SQLAlchemy's handling of a
    # lost connection: the pool must still drop it, or every later request lent it fails too.
    made = create(pg)
    assert serve(pg, "PATCH", f"/Users/{made['id']}", replace("nickName", "a")).status == 200
    with pg[1].connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    statuses = [
        serve(pg, "PATCH", f"/Users/{made['id']}", replace("nickName", f"n{i}")).status for i in range(4)
    ]
    # The first request may meet a dead connection (each pooled one is); none after it may.
    assert statuses[1:] == [200, 200, 200], statuses
