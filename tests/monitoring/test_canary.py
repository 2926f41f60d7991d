"""The canary proof of invariant 6 (PII stays home), on the real system.

Customers carrying unusual canary values (an e-mail, names, a phone number) go in through the real hub API
(``idhub serve``), through the real relay (``idhub relay``), a Redis broker and a real prefork Celery worker
(with beat) to the CRM and webhook simulators; one is refused by the CRM for good (a dead letter), one is
erased. Everything the hub itself writes is captured: every log line of the API, relay, worker and Flower
processes (JSON, DEBUG), every command the broker received (Redis MONITOR, message bodies decoded), every
metric sample of the API, worker and relay, every row of the ledger, dead letters, receipts, outbox and
target health, and Flower's task list. No canary value may appear in any of it, while the targets did
receive them (so they really went through) and the logs show redaction at work.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, select

from connectors.sandbox import runner
from orchestrator import migrations
from orchestrator.auth import create_token
from orchestrator.db import identities, make_engine, metadata
from orchestrator.ledger import dead_letters, erasure_receipts, sync_ledger
from tests.conftest import create_pg_database, drop_pg_database
from tests.services import REDIS_URL

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
USER = "urn:ietf:params:scim:schemas:core:2.0:User"

# .org, not .test: the hub validates e-mail domains, and special-use ones are refused.
EMAIL = "canary.x7q9@pii-canary.org"
GIVEN = "Qoxbcanary"
FAMILY = "Zzyzxcanary"
PHONE = "+1-555-0199-424242"
DEAD_EMAIL = "canary.k3m8@pii-canary.org"
DEAD_FAMILY = "Vvqxjcanary"
DEAD_PHONE = "+44 20 7946 0958 88"
# Each value, and the other spellings it takes on the way (URL-encoded, digits only).
CANARIES = (
    "x7q9",
    "k3m8",
    "pii-canary",
    GIVEN,
    FAMILY,
    DEAD_FAMILY,
    "0199-424242",
    "0199424242",
    "7946 0958",
    "79460958",
)
CRM_TOKEN = "sandbox-crm-token"  # the simulator's fixed test credential
TABLES_WITH_PERSONAL_DATA = {"identities", "groups", "group_members"}  # the hub's own store: PII lives there


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class BrokerTap:
    """Every command Redis receives (MONITOR), kept raw; the broker's database is picked out later."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.sendall(b"MONITOR\r\n")
        self.sock.settimeout(0.2)
        self.chunks: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            self.chunks.append(data)

    def close(self) -> str:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        return b"".join(self.chunks).decode("utf-8", "replace")


@dataclass
class System:
    """The running processes and what they write."""

    tmp: Path
    engine: Engine
    token: str
    broker_db: int
    api: str
    worker_metrics: str
    relay_metrics: str
    sandboxes: runner.Sandboxes
    tap: BrokerTap
    flower: str | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.api + "/scim/v2",
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/scim+json"},
            timeout=10,
        )

    def stop(self) -> None:
        """SIGTERM every process and wait: each flushes its last lines before it exits."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def outputs(self) -> dict[str, str]:
        return {p.name: p.read_text(errors="replace") for p in sorted(self.tmp.glob("*.log"))}


def _start(tmp: Path, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(tmp / f"{name}.out.log", "wb") as out, open(tmp / f"{name}.err.log", "wb") as err:
        return subprocess.Popen([sys.executable, *argv], env=env, cwd=str(tmp), stdout=out, stderr=err)


def _up(url: str) -> bool:
    return httpx.get(url, timeout=1).status_code == 200


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("canary")
    db_url = create_pg_database("idhub_canary")
    engine = make_engine(db_url)
    migrations.upgrade(engine)
    token = create_token(engine, "canary", ["admin"])
    broker_db = 1 + (os.getpid() + sum(map(ord, "canary"))) % 15
    broker_url = f"{REDIS_URL}/{broker_db}"
    redis.Redis.from_url(broker_url).flushdb()
    sandboxes = runner.start_sandboxes(kinds=("crm", "webhook"))
    (tmp / "targets.yaml").write_text(
        f"""targets:
  - name: crm
    connector: crm
    url: {sandboxes.urls["crm"]}
    token_env: CANARY_CRM_TOKEN
    on_delete: erase
    retry: {{max_attempts: 3, base: 100ms, cap: 500ms}}
  - name: hooks
    connector: webhook
    url: {sandboxes.urls["webhook"]}
    token_env: CANARY_WEBHOOK_SECRET
    on_delete: erase
"""
    )
    host, port = REDIS_URL.removeprefix("redis://").split(":")
    tap = BrokerTap(host, int(port))
    api_port, worker_port, relay_port, flower_port = (free_port() for _ in range(4))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "IDHUB_DATABASE_URL": db_url,
        "IDHUB_BROKER_URL": broker_url,
        "IDHUB_TARGETS_FILE": str(tmp / "targets.yaml"),
        "IDHUB_LOG_FORMAT": "json",
        "IDHUB_LOG_LEVEL": "DEBUG",
        "IDHUB_LEASE_SECONDS": "3",
        "IDHUB_STALE_AFTER_SECONDS": "1",
        "IDHUB_SWEEP_INTERVAL": "0.5",
        "IDHUB_TASK_EVENTS": "true",  # every task reaches Flower, the first ones included
        "CANARY_CRM_TOKEN": runner.CRM_TOKEN,
        "CANARY_WEBHOOK_SECRET": runner.WEBHOOK_SECRET,
    }
    prom = tmp / "prometheus"
    prom.mkdir()
    procs = {
        "api": _start(tmp, "api", ["-m", "orchestrator.cli", "serve", "--port", str(api_port)], env),
        "relay": _start(
            tmp, "relay", ["-m", "orchestrator.cli", "relay"], {**env, "IDHUB_METRICS_PORT": str(relay_port)}
        ),
        "worker": _start(
            tmp,
            "worker",
            [
                *("-m", "celery", "-A", "workers", "worker", "-P", "prefork", "-c", "2", "-B"),
                *("-Q", "fanout,admin,target.crm,target.hooks", "-n", "canary@localhost"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat", "-s", str(tmp / "beat")),
            ],
            {**env, "IDHUB_METRICS_PORT": str(worker_port), "PROMETHEUS_MULTIPROC_DIR": str(prom)},
        ),
        "flower": _start(
            tmp,
            "flower",
            ["-m", "celery", "-A", "workers", "flower", f"--port={flower_port}", "--address=127.0.0.1"],
            {**env, "FLOWER_UNAUTHENTICATED_API": "true"},
        ),
    }
    sut = System(
        tmp=tmp,
        engine=engine,
        token=token,
        broker_db=broker_db,
        api=f"http://127.0.0.1:{api_port}",
        worker_metrics=f"http://127.0.0.1:{worker_port}/metrics",
        relay_metrics=f"http://127.0.0.1:{relay_port}/metrics",
        sandboxes=sandboxes,
        tap=tap,
        procs=procs,
    )
    try:
        wait_for(lambda: _up(sut.api + "/healthz"), "the API")
        wait_for(lambda: _up(sut.relay_metrics), "the relay's metrics")
        wait_for(lambda: _up(sut.worker_metrics), "the worker's metrics")
        flower = f"http://127.0.0.1:{flower_port}"
        try:
            wait_for(lambda: _up(flower + "/api/tasks"), "Flower", timeout=15)
            sut.flower = flower
        except AssertionError:
            sut.flower = None  # the Flower test skips; the canary test goes on without it
        yield sut
    finally:
        sut.stop()
        if not tap.stop.is_set():
            tap.close()
        sandboxes.stop()
        redis.Redis.from_url(broker_url).flushdb()
        engine.dispose()
        drop_pg_database(db_url)


def customer(email: str, given: str, family: str, phone: str) -> dict[str, Any]:
    return {
        "schemas": [USER],
        "userName": email,
        "name": {"givenName": given, "familyName": family, "formatted": f"{given} {family}"},
        "displayName": f"{given} {family}",
        "emails": [{"value": email, "type": "work", "primary": True}],
        "phoneNumbers": [{"value": phone, "type": "mobile", "primary": True}],
    }


def crm_contact(system: System, email: str) -> dict[str, Any] | None:
    found = [
        c for c in system.sandboxes.servers["crm"].sim.snapshot() if c["properties"].get("email") == email
    ]
    return found[0]["properties"] if found else None


def webhook_events(system: System, identity_id: str) -> list[str]:
    events = system.sandboxes.servers["webhook"].sim.snapshot()["events"]
    return [e["type"] for e in events if e["body"]["data"]["id"] == identity_id]


def _flower_tasks(system: System) -> dict[str, Any]:
    assert system.flower is not None
    answer: dict[str, Any] = httpx.get(system.flower + "/api/tasks", timeout=5).json()
    return answer


_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# A task's arguments as Flower shows them: target names, identity ids, outbox sequence numbers. Nothing else.
_ID_ONLY_ARGS = re.compile(rf"^[\[\]\(\)\s,'\"0-9]*(?:(?:'[a-z0-9_-]+'|'{_UUID}'|\d+)[\[\]\(\)\s,]*)*$")


def test_flower_shows_task_names_and_id_only_arguments(system: System) -> None:
    if system.flower is None:
        pytest.skip("Flower did not start")
    with system.client() as c:
        r = c.post("/Users", json=customer("flower.probe@example.org", "Flo", "Wer", "+1-555-0100-000001"))
        assert r.status_code == 201, r.text
        uid = r.json()["id"]

    def delivered() -> list[dict[str, Any]]:
        tasks = _flower_tasks(system).values()
        return [
            t
            for t in tasks
            if t["name"] == "idhub.deliver" and uid in (t["args"] or "") and t["state"] == "SUCCESS"
        ]

    wait_for(delivered, "Flower to list the delivery as done", timeout=20)
    tasks = list(_flower_tasks(system).values())
    names = {t["name"] for t in tasks}
    assert {"idhub.fanout", "idhub.deliver"} <= names
    for task in tasks:
        assert task["name"].startswith("idhub."), task
        assert _ID_ONLY_ARGS.match(task["args"] or ""), task["args"]
        assert task["kwargs"] in ("{}", None, ""), task["kwargs"]
    assert "flower.probe" not in json.dumps(tasks)


def test_canary_values_never_leave_home(system: System) -> None:
    system.sandboxes.servers["crm"].sim.faults.update({"reject_keys": [DEAD_EMAIL]})
    with system.client() as c:
        r = c.post("/Users", json=customer(EMAIL, GIVEN, FAMILY, PHONE))
        assert r.status_code == 201, r.text
        alive = r.json()["id"]
        r = c.post("/Users", json=customer(DEAD_EMAIL, "Deadcanary", DEAD_FAMILY, DEAD_PHONE))
        assert r.status_code == 201, r.text
        dead = r.json()["id"]
        # Error paths and personal data in URLs: a uniqueness conflict, a filter, an e-mail where an id goes.
        assert c.post("/Users", json=customer(EMAIL, GIVEN, FAMILY, PHONE)).status_code == 409
        r = c.get("/Users", params={"filter": f'userName eq "{EMAIL}" or name.familyName eq "{FAMILY}"'})
        assert r.status_code == 200
        assert r.json()["totalResults"] == 1
        assert c.get(f"/Users/{EMAIL}").status_code == 404

        # The canaries really travel: the CRM holds them, the webhook got them, one record is a dead letter.
        contact = wait_for(lambda: crm_contact(system, EMAIL), "the CRM contact")
        assert (contact["lastname"], contact["phone"]) == (FAMILY, PHONE)
        wait_for(lambda: webhook_events(system, alive) and webhook_events(system, dead), "the webhook events")

        def dead_lettered() -> bool:
            with system.engine.connect() as conn:
                return bool(
                    conn.execute(select(dead_letters).where(dead_letters.c.identity_id == dead)).first()
                )

        wait_for(dead_lettered, "the dead letter")
        assert crm_contact(system, DEAD_EMAIL) is None

        assert c.delete(f"/Users/{alive}").status_code == 204

    def erased() -> bool:
        with system.engine.connect() as conn:
            targets = set(
                conn.scalars(select(erasure_receipts.c.target).where(erasure_receipts.c.identity_id == alive))
            )
            gone = conn.execute(select(identities.c.id).where(identities.c.id == alive)).first() is None
        return gone and targets == {"crm", "hooks", "*hub*"}

    try:
        wait_for(erased, "the erasure receipts")
    except AssertionError as exc:  # say where the erasure stopped
        with system.engine.connect() as conn:
            rows = conn.execute(select(sync_ledger).where(sync_ledger.c.identity_id == alive)).all()
        raise AssertionError(
            f"{exc}; ledger rows: {[(r.target, r.status, r.last_error_code) for r in rows]}"
        ) from None
    assert crm_contact(system, EMAIL) is None
    assert "customer.erased" in webhook_events(system, alive)

    # -- capture everything the hub wrote ------------------------------------------------------------------
    scrapes = {
        "api": httpx.get(
            system.api + "/metrics", headers={"Authorization": f"Bearer {system.token}"}, timeout=5
        ).text,
        "worker": httpx.get(system.worker_metrics, timeout=5).text,
        "relay": httpx.get(system.relay_metrics, timeout=5).text,
    }
    flower = json.dumps(_flower_tasks(system)) if system.flower is not None else ""
    with system.engine.connect() as conn:
        tables = {
            t.name: [dict(r._mapping) for r in conn.execute(select(t))]
            for t in metadata.sorted_tables
            if t.name not in TABLES_WITH_PERSONAL_DATA
        }
    system.stop()  # every process flushes and exits: its whole output is on disk now
    outputs = system.outputs()
    broker = system.tap.close()

    # -- the captures are real: they saw the pipeline --------------------------------------------------------
    samples = {
        name: {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        for name, text in scrapes.items()
    }
    assert samples["worker"][("idhub_deliveries_total", (("outcome", "dead"), ("target", "crm")))] == 1
    assert samples["worker"][("idhub_deliveries_total", (("outcome", "done"), ("target", "hooks")))] >= 3
    assert samples["worker"][("idhub_sync_lag_seconds_count", (("target", "crm"),))] >= 1
    assert samples["worker"][("idhub_tasks_total", (("outcome", "ok"), ("task", "idhub.deliver")))] >= 4
    # The relay publishes at commit (LISTEN/NOTIFY); the sweeper drains too, so the two share the events.
    published = ("idhub_relay_published_total", ())
    assert samples["relay"][published] + samples["worker"][published] >= 3
    assert samples["api"][("idhub_ledger_records", (("status", "dead"), ("target", "crm")))] == 1
    assert samples["api"][("idhub_ledger_scrape_ok", ())] == 1
    assert len(tables["dead_letters"]) == 1
    assert {"sync_ledger", "dead_letters", "erasure_receipts", "outbox", "target_state"} <= set(tables)
    logs = "\n".join(outputs.values())
    json_lines = [
        json.loads(line) for text in outputs.values() for line in text.splitlines() if line.startswith("{")
    ]
    assert len(json_lines) > 100
    assert any(
        line.get("task_name") == "idhub.deliver" and line.get("target") == "crm" for line in json_lines
    )
    assert alive in logs  # identifiers are logged...
    assert dead in logs
    assert "[email]" in logs  # ...and personal data reached the loggers and was masked
    bodies = [
        base64.b64decode(b).decode("utf-8", "replace")
        for line in broker.splitlines()
        if f"[{system.broker_db} " in line
        for b in re.findall(r'\\"body\\": \\"([A-Za-z0-9+/=]+)\\"', line)
    ]
    assert any(alive in b for b in bodies)
    assert any(dead in b for b in bodies)

    # -- and no canary anywhere ------------------------------------------------------------------------------
    haystacks = {
        **{f"log {name}": text for name, text in outputs.items()},
        "broker commands": broker,
        "broker message bodies": "\n".join(bodies),
        **{f"metrics {name}": text for name, text in scrapes.items()},
        "flower tasks": flower,
        **{f"table {name}": json.dumps(rows, default=str) for name, rows in tables.items()},
    }
    secrets = (system.token, CRM_TOKEN, runner.WEBHOOK_SECRET)
    for where, text in haystacks.items():
        lowered = text.lower()
        for canary in CANARIES:
            at = lowered.find(canary.lower())
            assert at < 0, f"canary {canary!r} found in {where}: ...{text[max(0, at - 160) : at + 40]}..."
        for secret in secrets:
            assert secret not in text, f"a credential found in {where}"
    for name, text in scrapes.items():
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                for value in sample.labels.values():
                    assert not re.search(_UUID, value), f"an id as a label value in {name}: {sample}"
    with system.engine.connect() as conn:
        assert conn.execute(select(sync_ledger).where(sync_ledger.c.identity_id == alive)).first() is None
