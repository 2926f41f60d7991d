"""On PostgreSQL a committed change wakes the relays (outbox trigger); a refused one does not."""

from __future__ import annotations

import psycopg

from tests.hub import GROUP_SCHEMA, client, make_hub, user

BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"


def test_a_written_event_notifies_and_a_refused_change_does_not(pg_url: str) -> None:
    app, engine = make_hub(pg_url)
    c = client(app, engine, name="notify")
    with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as listener:
        listener.execute("LISTEN idhub_outbox")
        assert c.post("/scim/v2/Users", json=user("notify-me")).status_code == 201
        assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == ["idhub_outbox"]
        # Refused by its own statement, committed with no row written (the creation needs no transaction).
        assert c.post("/scim/v2/Users", json=user("NOTIFY-ME")).status_code == 409
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []
        # Refused inside a transaction, which is rolled back.
        bad_group = {"schemas": [GROUP_SCHEMA], "displayName": "g", "members": [{"value": "no-such-id"}]}
        assert c.post("/scim/v2/Groups", json=bad_group).status_code == 400
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []
        operations = [
            {"method": "POST", "path": "/Users", "bulkId": f"b{i}", "data": user(f"notify-bulk-{i}")}
            for i in range(3)
        ]
        answer = c.post("/scim/v2/Bulk", json={"schemas": [BULK], "Operations": operations})
        assert [o["status"] for o in answer.json()["Operations"]] == ["201"] * 3
        assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == ["idhub_outbox"]
    engine.dispose()
