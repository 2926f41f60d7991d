"""Fixtures of the pipeline tests: a PG store per module, recording targets, the test connector plugin,
helpers that change identities the way the hub does (row + outbox event in one transaction), and workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, delete, select

from connectors.registry import build
from orchestrator import sync
from orchestrator.db import identities, make_engine, metadata
from orchestrator.ledger import sync_ledger
from orchestrator.relay import run_forever
from orchestrator.scim.storage import tombstone
from orchestrator.targets import TargetConfig, connector_settings, parse_targets
from tests.chaos.servers import signal_group, stop_group
from tests.conftest import create_pg_database, drop_pg_database
from tests.pipeline.recording import RecordingTarget
from tests.services import REDIS_URL
from tests.store import write_user
from workers.app import make_app
from workers.relay import publisher

ROOT = Path(__file__).resolve().parents[2]


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder whose dist-info registers the ``recording`` connector under idhub's entry-point group."""
    folder = tmp_path_factory.mktemp("plugins")
    info = folder / "idhub_pipeline_tests-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: idhub-pipeline-tests\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[idhub.connectors]\nrecording = tests.pipeline.recording:RecordingConnector\n"
    )
    sys.path.append(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def store() -> Iterator[tuple[str, Engine]]:
    url = create_pg_database("idhub_pipe")
    engine = make_engine(url)
    metadata.create_all(engine)
    yield url, engine
    engine.dispose()
    drop_pg_database(url)


@pytest.fixture(scope="module")
def rec() -> Iterator[RecordingTarget]:
    server = RecordingTarget()
    yield server
    server.close()


@pytest.fixture(scope="module")
def other() -> Iterator[RecordingTarget]:
    server = RecordingTarget()
    yield server
    server.close()


def targets_yaml(rec: RecordingTarget, other: RecordingTarget) -> str:
    common = """
    connector: recording
    batch_size: 20
    retry: {max_attempts: 4, max_age: 1h, base: 200ms, cap: 1s}
    quarantine: {threshold: 3, probe_base: 300ms, probe_cap: 1s}
    on_delete: delete
"""
    return f"targets:\n  - name: rec\n    url: {rec.url}{common}  - name: other\n    url: {other.url}{common}"


@pytest.fixture(scope="module")
def targets(plugin_path: str, rec: RecordingTarget, other: RecordingTarget) -> list[TargetConfig]:
    return parse_targets(targets_yaml(rec, other))


@pytest.fixture
def clean(store: tuple[str, Engine], rec: RecordingTarget, other: RecordingTarget) -> Engine:
    """An emptied store and targets with no faults."""
    engine = store[1]
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(delete(table))
    rec.reset()
    other.reset()
    return engine


def put_user(engine: Engine, user_id: str | None = None, *, active: bool = True, given: str = "A") -> str:
    """Create or update a user the way the hub does: the row and its outbox event in one transaction."""
    user_id = user_id or str(uuid.uuid4())
    doc = {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": f"u-{user_id[:8]}@example.test",
        "name": {"givenName": given},
        "active": active,
    }
    return write_user(engine, user_id, doc)


def delete_user(engine: Engine, user_id: str) -> None:
    """A SCIM DELETE: personal data gone at once, a tombstone and a ``deleted`` event remain."""
    with engine.begin() as conn:
        row = conn.execute(select(identities.c.version).where(identities.c.id == user_id)).one()
        tombstone(conn, "User", user_id, row.version)


def ledger_row(engine: Engine, target: str, user_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(sync_ledger).where(sync_ledger.c.target == target, sync_ledger.c.identity_id == user_id)
        ).first()


class Workers:
    """Celery worker subprocesses on one Redis database, started and killed by the tests."""

    def __init__(self, db_url: str, broker_url: str, targets_file: Path, plugin_path: str, tmp: Path) -> None:
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), plugin_path]),
            "IDHUB_DATABASE_URL": db_url,
            "IDHUB_BROKER_URL": broker_url,
            "IDHUB_TARGETS_FILE": str(targets_file),
            "IDHUB_LEASE_SECONDS": "3",
            "IDHUB_STALE_AFTER_SECONDS": "1",
            "IDHUB_SWEEP_INTERVAL": "0.5",
        }
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, queues: str, *, beat: bool = False, processes: int = 0) -> subprocess.Popen[bytes]:
        """A worker on ``queues``: the solo pool, or a prefork pool of ``processes`` children."""
        name = f"w{len(self.procs)}-{uuid.uuid4().hex[:6]}@localhost"
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers",
            "worker",
            *(["-P", "prefork", "-c", str(processes)] if processes else ["-P", "solo"]),
            "-Q",
            queues,
            "-n",
            name,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "WARNING",
        ]
        if beat:
            cmd += ["-B", "-s", str(self.tmp / f"beat-{name}")]
        # A group of its own: the embedded beat (-B) and prefork children go with the worker when it is
        # killed, as with a lost node, instead of living on as orphans that keep scheduling tasks.
        with open(self.tmp / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                cmd,
                env=self.env,
                cwd=str(self.tmp),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        stop_group(proc, sig=signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in self.procs:
            signal_group(proc, signal.SIGTERM)  # all at once: they stop side by side
        for proc in self.procs:
            stop_group(proc, sig=signal.SIGTERM)
        self.procs.clear()


@pytest.fixture(scope="module")
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A Redis database of this module, flushed before and after."""
    number = 1 + (os.getpid() + sum(map(ord, request.module.__name__))) % 15
    url = f"{REDIS_URL}/{number}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def workers(
    store: tuple[str, Engine],
    broker_url: str,
    rec: RecordingTarget,
    other: RecordingTarget,
    plugin_path: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Workers]:
    tmp = tmp_path_factory.mktemp("workers")
    targets_file = tmp / "targets.yaml"
    targets_file.write_text(targets_yaml(rec, other))
    pool = Workers(store[0], broker_url, targets_file, plugin_path, tmp)
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def relay(store: tuple[str, Engine], broker_url: str) -> Iterator[None]:
    """The relay, running as it does in production (polling behind LISTEN/NOTIFY)."""
    stop = threading.Event()
    app = make_app(broker_url)
    thread = threading.Thread(
        target=run_forever, args=(store[1], publisher(app)), kwargs={"stop": stop, "poll_interval": 0.1}
    )
    thread.start()
    yield
    stop.set()
    thread.join(10)


@pytest.fixture
def pool(clean: Engine, workers: Workers, broker_url: str) -> Iterator[Workers]:
    with redis.Redis.from_url(broker_url) as client:
        client.flushdb()
    yield workers
    workers.stop_all()


def deliver_now(engine: Engine, cfg: TargetConfig, ids: list[str], **kw: Any) -> sync.DeliveryReport:
    """One delivery in this process, as a worker's task makes it (its own connector, closed after)."""
    connector = build(cfg.connector, connector_settings(cfg))
    try:
        return sync.deliver(engine, cfg, connector, ids, owner="t", **kw)
    finally:
        connector.close()
