"""The whole pipeline with real processes: relay thread -> Redis -> Celery workers -> loopback HTTP targets.
Workers are killed, Redis is flushed, a target is slowed; the ledger still brings every change home."""

from __future__ import annotations

import pytest
import redis
from sqlalchemy import Engine, func, select

from orchestrator.db import identities, outbox
from tests.pipeline.conftest import Workers, delete_user, put_user, wait_for
from tests.pipeline.recording import RecordingTarget

pytestmark = pytest.mark.slow


def _synced(rec: RecordingTarget, uid: str, version: int) -> bool:
    account = rec.by_hub_id(uid)
    return account is not None and account["version"] == version


def test_create_update_deactivate_reactivate_delete(
    clean: Engine, pool: Workers, relay: None, rec, other
) -> None:
    pool.start("fanout,admin,target.rec,target.other", beat=True)
    uid = put_user(clean)
    wait_for(lambda: _synced(rec, uid, 1) and _synced(other, uid, 1), what="created on both targets")
    put_user(clean, uid, given="B")
    wait_for(lambda: _synced(rec, uid, 2) and rec.by_hub_id(uid)["given"] == "B", what="updated")
    put_user(clean, uid, active=False)
    wait_for(lambda: _synced(rec, uid, 3) and rec.by_hub_id(uid)["active"] is False, what="deactivated")
    put_user(clean, uid, active=True)
    wait_for(lambda: _synced(rec, uid, 4) and rec.by_hub_id(uid)["active"] is True, what="reactivated")
    delete_user(clean, uid)
    wait_for(lambda: rec.by_hub_id(uid) is None and other.by_hub_id(uid) is None, what="deleted")

    def purged() -> bool:
        with clean.connect() as conn:
            return conn.scalar(select(func.count()).where(identities.c.id == uid)) == 0

    wait_for(purged, what="tombstone purged")


def test_burst_of_50_updates_coalesces(clean: Engine, pool: Workers, relay: None, rec) -> None:
    uid = put_user(clean)
    for i in range(49):
        put_user(clean, uid, given=f"v{i}")
    pool.start("fanout,admin,target.rec,target.other", beat=True)
    wait_for(lambda: _synced(rec, uid, 50), what="latest version delivered")
    assert rec.by_hub_id(uid)["given"] == "v48"
    assert rec.calls_for(uid) < 10


def test_sigkill_mid_delivery_still_delivers(clean: Engine, pool: Workers, relay: None, rec) -> None:
    rec.faults.delay = 2.0
    rec.in_flight.clear()
    first = pool.start("fanout,admin,target.rec,target.other", beat=True)
    uid = put_user(clean)
    wait_for(rec.in_flight.is_set, what="a delivery in flight")
    pool.kill(first)
    rec.faults.delay = 0.0
    assert rec.by_hub_id(uid) is None or rec.by_hub_id(uid)["version"] == 1
    pool.start("fanout,admin,target.rec,target.other", beat=True)
    wait_for(lambda: _synced(rec, uid, 1), what="delivered after the restart")


def test_redis_flushed_with_tasks_queued_sweeper_recovers(
    clean: Engine, pool: Workers, relay: None, broker_url: str, rec, other
) -> None:
    ids = [put_user(clean) for _ in range(10)]

    def published() -> bool:
        with clean.connect() as conn:
            return conn.scalar(select(func.count()).where(outbox.c.published_at.is_(None))) == 0

    wait_for(published, what="relay published everything")
    assert redis.Redis.from_url(broker_url).llen("fanout") > 0
    redis.Redis.from_url(broker_url).flushdb()  # the broker loses every queued message
    pool.start("fanout,admin,target.rec,target.other", beat=True)
    wait_for(lambda: all(_synced(rec, i, 1) and _synced(other, i, 1) for i in ids), what="all recovered")


def test_slow_target_does_not_delay_another(clean: Engine, pool: Workers, relay: None, rec, other) -> None:
    rec.faults.delay = 1.0
    pool.start("target.rec")
    pool.start("fanout,admin,target.other", beat=True)
    ids = [put_user(clean) for _ in range(30)]
    wait_for(lambda: all(_synced(other, i, 1) for i in ids), timeout=15, what="fast target done")
    done_on_slow = sum(1 for i in ids if rec.by_hub_id(i) is not None)
    assert done_on_slow < len(ids)  # the slow one still lags while the fast one is complete


def test_slow_target_does_not_delay_another_on_a_shared_worker(
    clean: Engine, pool: Workers, relay: None, rec, other
) -> None:
    # One worker with two processes for every queue, as `idhub worker` runs by default: the slow target's
    # concurrency (1 by default) leaves the other process to the rest.
    rec.faults.delay = 1.0
    pool.start("fanout,admin,target.rec,target.other", beat=True, processes=2)
    ids = [put_user(clean) for _ in range(30)]
    wait_for(lambda: all(_synced(other, i, 1) for i in ids), timeout=20, what="fast target done")
    done_on_slow = sum(1 for i in ids if rec.by_hub_id(i) is not None)
    assert done_on_slow < len(ids)
