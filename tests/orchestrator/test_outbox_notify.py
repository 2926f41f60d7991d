"""On PostgreSQL a committed change wakes the relays (outbox trigger); a rolled-back one does not."""

from __future__ import annotations

import psycopg

from tests.hub import client, make_hub, user


def test_commit_notifies_and_rollback_does_not(pg_url: str) -> None:
    app, engine = make_hub(pg_url)
    c = client(app, engine, name="notify")
    with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as listener:
        listener.execute("LISTEN idhub_outbox")
        assert c.post("/scim/v2/Users", json=user("notify-me")).status_code == 201
        assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == ["idhub_outbox"]
        assert c.post("/scim/v2/Users", json=user("NOTIFY-ME")).status_code == 409
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []
    engine.dispose()
