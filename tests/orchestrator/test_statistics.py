"""The sweeper keeps the ledger's planner statistics fresh where autovacuum does not (PostgreSQL)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, insert, text, update

import orchestrator.ledger  # noqa: F401 - registers the ledger tables
from orchestrator import migrations
from orchestrator.db import make_engine, refresh_statistics
from orchestrator.ledger import sync_ledger
from tests.conftest import create_pg_database, drop_pg_database

ROWS = 20_000


@pytest.fixture
def engine() -> Iterator[Engine]:
    url = create_pg_database()
    engine = make_engine(url)
    migrations.upgrade(engine)
    yield engine
    engine.dispose()
    drop_pg_database(url)


def _fill(engine: Engine, targets: tuple[str, ...] = ("app", "crm")) -> None:
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        {
            "target": target,
            "identity_id": f"{i:08d}-0000-0000-0000-000000000000",
            "resource_type": "User",
            "desired_version": 1,
            "desired_action": "upsert",
            "status": "pending",
            "attempts": 0,
            "priority": 0,
            "created_at": stamp,
            "updated_at": stamp,
        }
        for i in range(ROWS // 2)
        for target in targets
    ]
    with engine.begin() as conn:
        conn.execute(insert(sync_ledger), rows)


def _plan(engine: Engine) -> str:
    # A delivery's worth of ids: without statistics, PostgreSQL expects each to match 0.5 % of the rows.
    ids = ", ".join(f"'{i:08d}-0000-0000-0000-000000000000'" for i in range(0, ROWS // 2, ROWS // 100))
    with engine.connect() as conn:
        lines = conn.exec_driver_sql(f"EXPLAIN SELECT * FROM sync_ledger WHERE identity_id IN ({ids})")
        return "\n".join(line for (line,) in lines)


def test_a_grown_ledger_is_analyzed_once_and_then_looked_up_by_index(engine: Engine) -> None:
    _fill(engine)
    assert "Seq Scan" in _plan(engine)  # what the ledger's lookups met before: no statistics yet
    deadline = time.monotonic() + 10
    analyzed: list[str] = []
    while not analyzed and time.monotonic() < deadline:
        time.sleep(0.2)  # PostgreSQL publishes a backend's table counters within a second
        analyzed = refresh_statistics(engine)
    assert analyzed == ["sync_ledger"]
    with engine.connect() as conn:
        last = conn.execute(
            text("SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'sync_ledger'")
        ).scalar_one()
    assert last is not None
    assert "Index Scan using sync_ledger_pkey" in _plan(engine)
    assert refresh_statistics(engine) == []  # fresh now: nothing to do


def test_changed_rows_are_not_analyzed_again_until_the_ledger_doubles(engine: Engine) -> None:
    _fill(engine)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE sync_ledger")
    with engine.begin() as conn:  # every row moves on, twice: no lookup's plan depends on it
        conn.execute(update(sync_ledger).values(status="synced", synced_version=1))
        conn.execute(update(sync_ledger).values(priority=1))
    time.sleep(1.5)  # PostgreSQL publishes a backend's table counters within a second
    assert refresh_statistics(engine) == []
    _fill(engine, ("shop", "newsletter", "webhook", "app2"))  # three times the rows the statistics know
    deadline = time.monotonic() + 10
    analyzed: list[str] = []
    while not analyzed and time.monotonic() < deadline:
        time.sleep(0.2)
        analyzed = refresh_statistics(engine)
    assert analyzed == ["sync_ledger"]


def test_nothing_is_analyzed_on_sqlite(tmp_path: object) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/idhub.db")
    migrations.upgrade(engine)
    assert refresh_statistics(engine) == []
    engine.dispose()
