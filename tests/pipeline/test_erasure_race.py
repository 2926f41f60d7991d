"""The last two targets of an erasure finishing at the same moment still purge the tombstone.

Found by the chaos run (tests/chaos): each delivery's transaction saw the other target's row as not done yet
(uncommitted), neither purged, and the erasure never completed.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from sqlalchemy import Engine, func, insert, select, text, update

from orchestrator import sync
from orchestrator.db import identities, now
from orchestrator.ledger import sync_ledger

L = sync_ledger.c


def _tombstone_with_rows(engine: Engine, targets: list[str]) -> str:
    uid, stamp = str(uuid.uuid4()), now()
    with engine.begin() as conn:
        conn.execute(
            insert(identities).values(
                id=uid, version=2, doc={}, created_at=stamp, updated_at=stamp, deleted_at=stamp
            )
        )
        for target in targets:
            conn.execute(
                insert(sync_ledger).values(
                    target=target,
                    identity_id=uid,
                    resource_type="User",
                    desired_version=2,
                    desired_action="erase",
                    status="pending",
                    attempts=0,
                    priority=0,
                    created_at=stamp,
                    updated_at=stamp,
                )
            )
    return uid


def _done(conn: Any, target: str, uid: str) -> None:
    """What a delivery's record transaction does for a finished erasure at one target."""
    conn.execute(
        update(sync_ledger)
        .where(L.target == target, L.identity_id == uid)
        .values(status="deprovisioned", synced_version=2, synced_action="erase")
    )
    sync.finish_erasures(conn, [uid], now())


def test_two_targets_finishing_together_purge_the_tombstone(clean: Engine) -> None:
    uid = _tombstone_with_rows(clean, ["a", "b"])
    first = clean.connect()
    first.begin()
    _done(first, "a", uid)  # "b" is not done yet: no purge, and this transaction stays open

    def second() -> None:
        with clean.begin() as conn:
            _done(conn, "b", uid)

    thread = threading.Thread(target=second)
    thread.start()
    deadline = time.monotonic() + 10
    with clean.connect().execution_options(isolation_level="AUTOCOMMIT") as probe:
        waiting = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        # Until the second transaction waits for the first (the fix) or has already finished (the race).
        while thread.is_alive() and not probe.execute(text(waiting)).scalar() and time.monotonic() < deadline:
            time.sleep(0.02)
    first.commit()
    first.close()
    thread.join(10)
    with clean.connect() as conn:
        assert conn.scalar(select(func.count()).where(identities.c.id == uid)) == 0
        assert conn.scalar(select(func.count()).where(L.identity_id == uid)) == 0
