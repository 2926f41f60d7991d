"""Shared fixtures: a fresh PostgreSQL database per test session, SQLite files, a Redis database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text

from orchestrator import db
from tests.services import PG_URL, REDIS_URL


def _admin_engine() -> Engine:
    return create_engine(PG_URL, isolation_level="AUTOCOMMIT")


def create_pg_database(prefix: str = "idhub_t") -> str:
    """Create an empty PostgreSQL database and return its URL."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database of this test session, dropped at the end."""
    url = create_pg_database()
    yield url
    db.dispose_engines(url)
    drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    return f"sqlite:///{tmp_path}/idhub.db"


@pytest.fixture(params=["postgresql", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    """A fresh, empty store on each dialect: a new PostgreSQL database or a new SQLite file."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/idhub.db"
        return
    url = create_pg_database()
    try:
        yield url
    finally:
        db.dispose_engines(url)
        drop_pg_database(url)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database flushed before and after the test (db 1-15 are the suite's)."""
    import redis

    number = 1 + (os.getpid() % 15)
    url = f"{REDIS_URL}/{number}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()
