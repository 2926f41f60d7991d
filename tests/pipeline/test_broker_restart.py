"""The broker restarts (empty) while a delivery is in flight, on a private redis-server of this module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.chaos.servers import Procs, Redis
from tests.pipeline.conftest import Workers, put_user, wait_for
from tests.pipeline.recording import RecordingTarget

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    procs = Procs(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield Redis(procs).start()
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def broker_url(private_redis: Redis) -> str:
    return f"{private_redis.url}/0"


def _synced(rec: RecordingTarget, uid: str) -> bool:
    account = rec.by_hub_id(uid)
    return account is not None and account["version"] == 1


def test_a_delivery_cut_off_by_a_broker_restart_finishes_and_records_its_outcome(
    clean: Engine, pool: Workers, relay: None, rec: RecordingTarget, private_redis: Redis
) -> None:
    # A prefork pool, as in production: a task cancelled on connection loss has its child killed mid-call.
    pool.start("fanout,admin,target.rec,target.other", beat=True, processes=2)
    rec.faults.delay = 1.5
    calm = put_user(clean)
    wait_for(lambda: _synced(rec, calm), what="a delivery without a restart")
    calm_requests = len(rec.requests)  # its lookup and its create
    rec.in_flight.clear()
    uid = put_user(clean)
    wait_for(rec.in_flight.is_set, what="a delivery in flight")
    private_redis.restart()
    wait_for(lambda: _synced(rec, uid), timeout=60, what="delivered after the restart")
    # The delivery finished and recorded its outcome: nothing was asked twice, as a cancelled one would.
    assert len(rec.requests) == 2 * calm_requests, rec.requests
