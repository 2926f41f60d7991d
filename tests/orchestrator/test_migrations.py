"""The migrations build exactly the schema the code declares, on both dialects, and run idempotently."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

import orchestrator.ledger  # noqa: F401 - registers the ledger tables
from orchestrator import migrations
from orchestrator.db import make_engine, metadata


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
