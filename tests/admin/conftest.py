"""Fixtures of the admin tests: a migrated PG store per module, the real sandbox simulators (shop and
newsletter) as targets, helpers that change customers the way the hub does (row + outbox event in one
transaction), drive fan-out, and deliver through the real connectors."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, delete, func, insert, select

from connectors.base import Connector
from connectors.registry import build
from connectors.sandbox import Sandboxes, start_sandboxes
from connectors.sandbox.runner import NEWSLETTER_KEY, NEWSLETTER_LIST, SHOP_KEY, SHOP_SECRET
from orchestrator import db, migrations, settings, sync
from orchestrator.db import identities, make_engine, metadata, now
from orchestrator.ledger import sync_ledger
from orchestrator.relay import drain
from orchestrator.scim.storage import tombstone
from orchestrator.targets import TargetConfig, connector_settings, parse_targets
from tests.conftest import create_pg_database, drop_pg_database
from tests.store import write_user

SHOP_ENV = "IDHUB_ADMIN_TEST_SHOP_TOKEN"
NEWS_ENV = "IDHUB_ADMIN_TEST_NEWS_TOKEN"


@pytest.fixture(scope="session")
def sandboxes() -> Iterator[Sandboxes]:
    running = start_sandboxes(kinds=("shop", "newsletter"))
    yield running
    running.stop()


@pytest.fixture(scope="session", autouse=True)
def _tokens() -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    mp.setenv(SHOP_ENV, f"{SHOP_KEY}:{SHOP_SECRET}")
    mp.setenv(NEWS_ENV, NEWSLETTER_KEY)
    yield
    mp.undo()


def targets_yaml(sandboxes: Sandboxes) -> str:
    """shop: every customer, deletes on leaving; news: English speakers only, deactivates on leaving."""
    return f"""
targets:
  - name: shop
    connector: shop
    url: {sandboxes.urls["shop"]}
    token_env: {SHOP_ENV}
    on_deactivate: deactivate
    on_delete: delete
    on_leave_scope: delete
    batch_size: 100
    retry: {{max_attempts: 2, base: 10ms, cap: 20ms}}
  - name: news
    connector: newsletter
    url: {sandboxes.urls["newsletter"]}
    token_env: {NEWS_ENV}
    options: {{list_id: {NEWSLETTER_LIST}}}
    scope: 'active eq true and preferredLanguage eq "en"'
    on_delete: erase
    on_leave_scope: deactivate
    batch_size: 100
"""


@pytest.fixture(scope="module")
def store() -> Iterator[tuple[str, Engine]]:
    """A PG database of this module with the real migrated schema."""
    url = create_pg_database("idhub_admin")
    engine = make_engine(url)
    migrations.upgrade(engine)
    yield url, engine
    engine.dispose()
    db.dispose_engines(url)  # the one the ``idhub`` command made
    drop_pg_database(url)


@pytest.fixture
def targets(sandboxes: Sandboxes) -> list[TargetConfig]:
    return parse_targets(targets_yaml(sandboxes))


@pytest.fixture
def clean(store: tuple[str, Engine], sandboxes: Sandboxes, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """An empty store, empty simulators, and the guard's default limits."""
    engine = store[1]
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            if table.name != "alembic_version":
                conn.execute(delete(table))
    for server in sandboxes.servers.values():
        server.sim.reset()
    for name in ("MAX_SHARE", "MAX_COUNT", "WINDOW", "MIN_COUNT"):
        monkeypatch.delenv(f"IDHUB_GUARD_{name}", raising=False)
    return engine


@pytest.fixture
def cli_env(
    store: tuple[str, Engine], sandboxes: Sandboxes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """The process settings the ``idhub`` command reads: this store, these targets."""
    targets_file = tmp_path / "targets.yaml"
    targets_file.write_text(targets_yaml(sandboxes))
    monkeypatch.setenv("IDHUB_DATABASE_URL", store[0])
    monkeypatch.setenv("IDHUB_TARGETS_FILE", str(targets_file))
    settings.get.cache_clear()
    yield targets_file
    settings.get.cache_clear()


def cfg_of(targets: Sequence[TargetConfig], name: str) -> TargetConfig:
    return next(t for t in targets if t.name == name)


def connect(cfg: TargetConfig) -> Connector:
    return build(cfg.connector, connector_settings(cfg))


def _doc(email: str, given: str, family: str, active: bool, language: str) -> dict[str, Any]:
    return {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": email,
        "name": {"givenName": given, "familyName": family},
        "emails": [{"value": email, "primary": True}],
        "preferredLanguage": language,
        "active": active,
    }


def put_customer(
    engine: Engine,
    user_id: str | None = None,
    *,
    given: str = "Ann",
    family: str = "Lee",
    active: bool = True,
    language: str = "en",
) -> str:
    """Create or update a customer as the hub does: the row and its outbox event in one transaction."""
    user_id = user_id or str(uuid.uuid4())
    email = f"c-{user_id[:8]}@example.test"
    doc = _doc(email, given, family, active, language)
    return write_user(engine, user_id, doc)


def bulk_customers(engine: Engine, count: int, *, active: bool = True) -> list[str]:
    """Insert ``count`` customers at once (no events: for resync, which needs none)."""
    stamp = now()
    rows = []
    for _ in range(count):
        uid = str(uuid.uuid4())
        email = f"c-{uid[:8]}@example.test"
        rows.append(
            {
                "id": uid,
                "version": 1,
                "user_name": email,
                "user_name_ci": email,
                "email_ci": email,
                "active": active,
                "doc": _doc(email, "Bo", "Ek", active, "en"),
                "created_at": stamp,
                "updated_at": stamp,
            }
        )
    with engine.begin() as conn:
        conn.execute(insert(identities), rows)
    return [r["id"] for r in rows]


def erase(engine: Engine, user_id: str) -> None:
    """A SCIM DELETE: personal data gone at once, a tombstone and a ``deleted`` event remain."""
    with engine.begin() as conn:
        row = conn.execute(select(identities.c.version).where(identities.c.id == user_id)).one()
        tombstone(conn, "User", user_id, row.version)


def flow(engine: Engine, targets: Sequence[TargetConfig]) -> dict[str, list[str]]:
    """Relay every unpublished event straight into fan-out (what the broker does between them)."""
    due: dict[str, list[str]] = {}

    def publish(seqs: Any) -> None:
        for t, ids in sync.fanout(engine, targets, list(seqs)).items():
            due.setdefault(t, []).extend(ids)

    drain(engine, publish)
    return due


def deliver(engine: Engine, cfg: TargetConfig, ids: Sequence[str]) -> sync.DeliveryReport:
    connector = connect(cfg)
    try:
        return sync.deliver(engine, cfg, connector, list(ids), owner=f"test-{uuid.uuid4().hex[:6]}")
    finally:
        connector.close()


def provision(engine: Engine, targets: Sequence[TargetConfig]) -> None:
    """Fan out what is pending and deliver it everywhere."""
    for name, ids in flow(engine, targets).items():
        deliver(engine, cfg_of(targets, name), ids)


def row(engine: Engine, target: str, user_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(sync_ledger).where(sync_ledger.c.target == target, sync_ledger.c.identity_id == user_id)
        ).first()


def statuses(engine: Engine, target: str) -> dict[str, int]:
    with engine.connect() as conn:
        q = (
            select(sync_ledger.c.status, func.count())
            .where(sync_ledger.c.target == target)
            .group_by(sync_ledger.c.status)
        )
        return {s: n for s, n in conn.execute(q)}


def shop_customers(sandboxes: Sandboxes) -> list[dict[str, Any]]:
    sim: Any = sandboxes.servers["shop"].sim
    with sim.lock:
        return [dict(c) for c in sim.customers.values()]


def shop_meta(customer: dict[str, Any], key: str) -> Any:
    return next((m["value"] for m in customer["meta_data"] if m["key"] == key), None)
