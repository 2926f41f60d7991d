"""The sweeper re-enqueues rows whose message the broker lost, not rows still queued behind a backlog."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, insert, update

from orchestrator import sync
from orchestrator.db import now as utcnow
from orchestrator.ledger import Status, sync_ledger
from orchestrator.targets import TargetConfig

L = sync_ledger.c
STALE = timedelta(seconds=60)


def _rows(engine: Engine, prefix: str, count: int, enqueued: timedelta, *, done: bool = False) -> list[str]:
    """``count`` ledger rows of target ``rec`` enqueued ``enqueued`` ago: pending, or delivered just now."""
    stamp = utcnow()
    ids = [f"{prefix}-{i:04d}" for i in range(count)]
    values = [sync._desired("rec", i, "User", 1, sync.UPSERT, 0, stamp - enqueued) for i in ids]
    with engine.begin() as conn:
        conn.execute(insert(sync_ledger), values)
        if done:
            conn.execute(
                update(sync_ledger)
                .where(L.identity_id.in_(ids))
                .values(
                    synced_version=1, synced_action=sync.UPSERT, status=Status.SYNCED.value, updated_at=stamp
                )
            )
    return ids


def _swept(engine: Engine, targets: list[TargetConfig]) -> set[str]:
    return set(sync.sweep(engine, targets, stale_after=STALE).due.get("rec", []))


def test_a_backlog_still_moving_is_not_enqueued_again(clean: Engine, targets: list[TargetConfig]) -> None:
    queued = _rows(clean, "queued", 30, timedelta(seconds=90))
    # Deliveries go on, of rows enqueued before the waiting ones: the queue has not reached them yet.
    _rows(clean, "ahead", 5, timedelta(seconds=120), done=True)
    assert _swept(clean, targets) == set()
    # Once rows enqueued after them are delivered, the waiting ones were overtaken: their message is lost.
    _rows(clean, "behind", 5, timedelta(seconds=70), done=True)
    assert _swept(clean, targets) == set(queued)


def test_stale_rows_of_a_queue_that_stopped_are_enqueued_again(
    clean: Engine, targets: list[TargetConfig]
) -> None:
    queued = _rows(clean, "queued", 10, timedelta(seconds=90))
    retry = _rows(clean, "retry", 3, timedelta(0))
    with clean.begin() as conn:  # retries whose time came have no enqueue time: always swept
        conn.execute(update(sync_ledger).where(L.identity_id.in_(retry)).values(enqueued_at=None))
    fresh = _rows(clean, "fresh", 4, timedelta(seconds=5))
    swept = _swept(clean, targets)
    assert swept == set(queued) | set(retry)
    assert not swept & set(fresh)
    # Enqueued again now: the next sweep leaves them to that message.
    assert _swept(clean, targets) == set()
