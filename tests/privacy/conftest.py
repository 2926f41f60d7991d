"""The privacy harness: the hub's SCIM API on a PostgreSQL store, five targets (scim2-server in a subprocess,
newsletter, CRM, shop and webhook simulators on loopback) and helpers that move changes through relay,
fan-out and delivery in-process, the way the workers do."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, delete, inspect, text

from connectors.base import Connector
from connectors.registry import build
from connectors.sandbox.core import SandboxServer
from connectors.sandbox.runner import (
    CRM_TOKEN,
    NEWSLETTER_KEY,
    NEWSLETTER_LIST,
    SHOP_KEY,
    SHOP_SECRET,
    WEBHOOK_SECRET,
    build_simulator,
)
from connectors.sandbox.webhook import WebhookSimulator
from orchestrator import db, sync
from orchestrator.db import metadata
from orchestrator.relay import drain
from orchestrator.targets import TargetConfig, connector_settings, parse_targets
from tests.conftest import create_pg_database, drop_pg_database
from tests.connectors.test_scim import TOKEN as SCIM_TOKEN
from tests.connectors.test_scim import scim_server  # noqa: F401 - the scim2-server subprocess fixture
from tests.hub import CUSTOMER, client, make_hub, patch, user

CONSENT_SCOPE = f'{CUSTOMER}:consents[purpose eq "marketing_email" and granted eq true]'
ENV = {
    "PRIV_SCIM_TOKEN": SCIM_TOKEN,
    "PRIV_NEWS_KEY": NEWSLETTER_KEY,
    "PRIV_CRM_TOKEN": CRM_TOKEN,
    "PRIV_SHOP_KEY": f"{SHOP_KEY}:{SHOP_SECRET}",
    "PRIV_HOOK_SECRET": WEBHOOK_SECRET,
}


class ForgettingReceiver(WebhookSimulator):
    """A webhook receiver that honours ``customer.erased``: it forgets the earlier events of that customer
    (what the hub asks of every receiver; the stock simulator only records)."""

    async def receive(self, request: Any) -> Any:
        response = await super().receive(request)
        with self.lock:
            gone = {e["body"]["data"]["id"] for e in self.events if e["type"] == "customer.erased"}
            self.events = [
                e
                for e in self.events
                if e["type"] == "customer.erased" or e["body"]["data"]["id"] not in gone
            ]
        return response


def targets_yaml(urls: dict[str, str]) -> str:
    """Five targets, one per connector kind, with short retry and quarantine timings."""
    common = """
    retry: {max_attempts: 3, max_age: 1h, base: 10ms, cap: 50ms}
    quarantine: {threshold: 50, probe_base: 50ms, probe_cap: 200ms}"""
    return f"""
targets:
  - name: app
    connector: scim
    url: {urls["scim"]}
    token_env: PRIV_SCIM_TOKEN
    # The connector's default mapping names the customer extension whole, which compile_mapping refuses.
    mapping:
      userName: userName
      name.givenName: name.givenName
      name.familyName: name.familyName
      displayName: displayName
      emails: emails
      active: active
      locale: locale
    on_delete: erase{common}
  - name: news
    connector: newsletter
    url: {urls["newsletter"]}
    token_env: PRIV_NEWS_KEY
    options: {{list_id: {NEWSLETTER_LIST}}}
    scope: '{CONSENT_SCOPE}'
    priority_paths: [consents]
    batch_size: 10
    on_delete: erase{common}
  - name: crm
    connector: crm
    url: {urls["crm"]}
    token_env: PRIV_CRM_TOKEN
    on_delete: erase{common}
  - name: shop
    connector: shop
    url: {urls["shop"]}
    token_env: PRIV_SHOP_KEY
    on_delete: anonymize{common}
  - name: hooks
    connector: webhook
    url: {urls["webhook"]}
    token_env: PRIV_HOOK_SECRET
    on_delete: erase{common}
"""


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Privacy:
    """One test's world: the hub, its store, the targets, their connectors and the simulators behind them."""

    engine: Engine
    api: TestClient
    targets: list[TargetConfig]
    connectors: dict[str, Connector]
    servers: dict[str, SandboxServer]
    scim_base: str
    seen: set[int] = field(default_factory=set)

    def cfg(self, name: str) -> TargetConfig:
        return next(t for t in self.targets if t.name == name)

    # -- the hub's side -----------------------------------------------------------------------------
    def create(self, user_name: str, **attrs: Any) -> str:
        response = self.api.post("/scim/v2/Users", json=user(user_name, **attrs))
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def patch(self, identity_id: str, *ops: dict[str, Any]) -> None:
        response = self.api.patch(f"/scim/v2/Users/{identity_id}", json=patch(*ops))
        assert response.status_code in (200, 204), response.text

    def set_consent(self, identity_id: str, granted: bool) -> None:
        value = [{"purpose": "marketing_email", "granted": granted}]
        self.patch(identity_id, {"op": "replace", "path": f"{CUSTOMER}:consents", "value": value})

    def delete(self, identity_id: str) -> None:
        assert self.api.delete(f"/scim/v2/Users/{identity_id}").status_code == 204

    # -- the pipeline, in-process ---------------------------------------------------------------------
    def flow(self) -> dict[str, list[str]]:
        """Relay every unpublished event straight into fan-out; returns what became due, by target."""
        due: dict[str, list[str]] = {}

        def publish(seqs: Any) -> None:
            for target, ids in sync.fanout(self.engine, self.targets, list(seqs)).items():
                due.setdefault(target, []).extend(ids)

        drain(self.engine, publish)
        return due

    def deliver(self, target: str, ids: list[str], **kw: Any) -> sync.DeliveryReport:
        return sync.deliver(
            self.engine, self.cfg(target), self.connectors[target], ids, owner=uuid.uuid4().hex, **kw
        )

    def settle(self, timeout: float = 20.0, only: set[str] | None = None) -> None:
        """Flow, sweep, probe and deliver until nothing is due (back-off waits are milliseconds here)."""

        def quiet() -> bool:
            self.flow()
            found = sync.sweep(self.engine, self.targets, db.now(), stale_after=timedelta(0))
            for name in found.probes:
                sync.probe(self.engine, self.cfg(name), self.connectors[name])
            due = {t: i for t, i in found.due.items() if only is None or t in only}
            for target, ids in due.items():
                self.deliver(target, ids)
            return not due and not found.probes and not self._waiting(only)

        wait_for(quiet, timeout, "the pipeline to go quiet")

    def _waiting(self, only: set[str] | None) -> bool:
        """Rows still owed something (in back-off or quarantined), on the targets looked at."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT target FROM sync_ledger WHERE status NOT IN ('dead', 'held') AND "
                    "(synced_version IS NULL OR desired_version > synced_version "
                    "OR desired_action <> synced_action)"
                )
            ).all()
        return any(only is None or r.target in only for r in rows)

    # -- the targets' side --------------------------------------------------------------------------
    def sandbox(self, kind: str) -> httpx.Client:
        return httpx.Client(base_url=self.servers[kind].root, timeout=5)

    def state(self, kind: str) -> Any:
        with self.sandbox(kind) as c:
            return c.get("/_sandbox/state").json()

    def requests(self, kind: str) -> list[dict[str, Any]]:
        with self.sandbox(kind) as c:
            return list(c.get("/_sandbox/requests").json())

    def faults(self, kind: str, **knobs: Any) -> None:
        with self.sandbox(kind) as c:
            assert c.post("/_sandbox/faults", json=knobs).status_code == 200

    def scim_users(self) -> list[dict[str, Any]]:
        with httpx.Client(headers={"Authorization": f"Bearer {SCIM_TOKEN}"}, timeout=5) as c:
            return list(
                c.get(f"{self.scim_base}/Users", params={"count": 1000}).json().get("Resources") or []
            )

    def members(self) -> list[dict[str, Any]]:
        return list(self.state("newsletter")[NEWSLETTER_LIST])

    def hub_dump(self) -> str:
        """Every row of every table of the hub's store, every column, as text."""
        out = []
        with self.engine.connect() as conn:
            for table in inspect(conn).get_table_names():
                for row in conn.execute(text(f'SELECT CAST(t AS text) FROM "{table}" t')):
                    out.append(f"{table}: {row[0]}")
        return "\n".join(out)

    def target_dump(self) -> dict[str, str]:
        """Everything each target keeps: simulator state and request log, the SCIM app's users."""
        dumps = {kind: json.dumps([self.state(kind), self.requests(kind)]) for kind in self.servers}
        dumps["scim"] = json.dumps(self.scim_users())
        return dumps


@pytest.fixture(scope="module")
def store() -> Iterator[str]:
    url = create_pg_database("idhub_priv")
    yield url
    db.dispose_engines(url)
    drop_pg_database(url)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, SandboxServer]]:
    running: dict[str, SandboxServer] = {}
    try:
        for kind in ("newsletter", "crm", "shop"):
            running[kind] = SandboxServer(build_simulator(kind)).start()
        running["webhook"] = SandboxServer(ForgettingReceiver(secret=WEBHOOK_SECRET)).start()
        yield running
    finally:
        for server in running.values():
            server.stop()


@pytest.fixture(scope="module")
def hub(store: str) -> Iterator[tuple[Any, Engine]]:
    app, engine = make_hub(store)
    yield app, engine
    engine.dispose()


@pytest.fixture
def world(
    hub: tuple[Any, Engine],
    servers: dict[str, SandboxServer],
    scim_server: str,  # noqa: F811 - the imported fixture
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Privacy]:
    """An emptied store, reset simulators, a fresh SCIM tenant, and connectors to all five targets."""
    app, engine = hub
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            if inspect(conn).has_table(table.name):
                conn.execute(delete(table))
    for server in servers.values():
        server.sim.reset()
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    scim_base = f"{scim_server}/t{uuid.uuid4().hex[:12]}/v2"
    urls = {kind: s.url for kind, s in servers.items()} | {"scim": scim_base}
    targets = parse_targets(targets_yaml(urls))
    connectors = {cfg.name: build(cfg.connector, connector_settings(cfg)) for cfg in targets}
    api = client(app, engine, name=f"t-{uuid.uuid4().hex[:8]}")
    try:
        yield Privacy(engine, api, targets, connectors, servers, scim_base)
    finally:
        for connector in connectors.values():
            connector.close()


def customer(tag: str | None = None, *, consent: bool = True) -> tuple[str, dict[str, Any], dict[str, str]]:
    """A customer's SCIM attributes with unique personal values; returns (userName, attributes, the PII)."""
    tag = tag or uuid.uuid4().hex[:8]
    pii = {
        "email": f"ada.{tag}@example.org",
        "given": f"Adelheid{tag}",
        "family": f"Lovelace{tag}",
        "phone": f"+44 20 7946 {int(tag, 16) % 10000:04d}",
    }
    attrs = {
        "name": {"givenName": pii["given"], "familyName": pii["family"]},
        "displayName": f"{pii['given']} {pii['family']}",
        "emails": [{"value": pii["email"], "primary": True, "type": "home"}],
        "phoneNumbers": [{"value": pii["phone"], "primary": True, "type": "mobile"}],
        "preferredLanguage": "en",
        CUSTOMER: {"consents": [{"purpose": "marketing_email", "granted": consent}]},
    }
    return pii["email"], attrs, pii
