"""The migrations build exactly the schema the code declares, on both dialects, and run idempotently."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, inspect, select, text
from sqlalchemy.exc import IntegrityError

from orchestrator import migrations
from orchestrator.db import identities, make_engine, metadata
from orchestrator.ledger import sync_ledger


def test_migrations_match_the_declared_tables(store_url: str) -> None:
    engine = make_engine(store_url)
    migrations.upgrade(engine)
    migrations.upgrade(engine)  # a second start finds nothing to do
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    head = migrations.current(engine)
    engine.dispose()
    assert diff == []
    assert head is not None


def test_passwords_stored_by_earlier_versions_are_removed(store_url: str) -> None:
    engine = make_engine(store_url)
    migrations.upgrade(engine, "0005")
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    docs = {
        "kept": {"userName": "a@x.example"},
        "cleared": {"userName": "b@x.example", "password": "hunter2!"},
    }
    with engine.begin() as conn:
        for key, doc in docs.items():
            conn.execute(
                insert(identities).values(
                    id=key,
                    version=1,
                    doc=doc,
                    user_name_ci=doc["userName"],
                    created_at=stamp,
                    updated_at=stamp,
                )
            )
    migrations.upgrade(engine)
    with engine.connect() as conn:
        stored = dict(conn.execute(select(identities.c.id, identities.c.doc)).all())
    engine.dispose()
    assert stored == {"kept": {"userName": "a@x.example"}, "cleared": {"userName": "b@x.example"}}


def test_ledger_pages_keep_room_for_updates_on_postgresql(store_url: str) -> None:
    if not store_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL storage parameter")
    engine = make_engine(store_url)
    migrations.upgrade(engine)
    with engine.connect() as conn:
        options = conn.scalar(text("SELECT reloptions FROM pg_class WHERE relname = 'sync_ledger'"))
    engine.dispose()
    assert options == ["fillfactor=70"]


def test_the_ledger_is_rekeyed_by_identity_with_its_rows(store_url: str) -> None:
    engine = make_engine(store_url)
    migrations.upgrade(engine, "0008")
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        {"target": t, "identity_id": i, "desired_version": 1, "desired_action": "upsert", "status": "pending"}
        for t in ("crm", "shop")
        for i in ("a", "b")
    ]
    with engine.begin() as conn:
        for row in rows:
            conn.execute(insert(sync_ledger).values(**row, created_at=stamp, updated_at=stamp))
    migrations.upgrade(engine)
    key = inspect(engine).get_pk_constraint("sync_ledger")["constrained_columns"]
    indexes = {ix["name"] for ix in inspect(engine).get_indexes("sync_ledger")}
    with engine.connect() as conn:
        kept = {tuple(r) for r in conn.execute(select(sync_ledger.c.target, sync_ledger.c.identity_id))}
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(insert(sync_ledger).values(**rows[0], created_at=stamp, updated_at=stamp))
    engine.dispose()
    assert key == ["identity_id", "target"]
    assert "ix_sync_ledger_identity" not in indexes
    assert kept == {(r["target"], r["identity_id"]) for r in rows}
