"""The relay outlives its LISTEN connection: a database restart kills it, the relay polls and listens again.

Found by the chaos run (tests/chaos): ``pg_ctl restart`` made ``idhub relay`` exit on the dead listener.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence

from sqlalchemy import text

from orchestrator import migrations
from orchestrator.db import make_engine
from orchestrator.outbox import Kind, emit
from orchestrator.relay import CHANNEL, notify, run_forever

LISTENERS = text(
    "SELECT pid FROM pg_stat_activity"
    " WHERE datname = current_database() AND query = :q AND pid <> pg_backend_pid()"
)


def _wait(check, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_relay_listens_again_after_its_connection_is_killed(pg_url: str) -> None:
    engine = make_engine(pg_url)
    migrations.upgrade(engine)
    published: list[int] = []

    def publish(seqs: Sequence[int]) -> None:
        published.extend(seqs)

    stop = threading.Event()
    relay = threading.Thread(
        target=run_forever, args=(engine, publish), kwargs={"stop": stop, "poll_interval": 0.2}, daemon=True
    )
    relay.start()
    query = {"q": f"LISTEN {CHANNEL}"}
    try:
        # Autocommit: pg_stat_activity is a snapshot per transaction.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            first = _wait(lambda: conn.execute(LISTENERS, query).scalars().all())
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first[0]})
            again = _wait(lambda: [p for p in conn.execute(LISTENERS, query).scalars() if p not in first])
        assert relay.is_alive()
        assert again
        with engine.begin() as conn:
            emit(conn, "User", str(uuid.uuid4()), 1, Kind.CREATED)
            notify(conn)
        _wait(lambda: published)
    finally:
        stop.set()
        relay.join(10)
        engine.dispose()
    assert not relay.is_alive()
