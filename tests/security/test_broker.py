"""Malformed broker messages against a real Celery worker on Redis: tasks with missing or wrong arguments,
an unknown target, an unknown task, bodies that are not JSON, pickle and YAML payloads built to run code.
The worker refuses each with a log line, keeps running, writes nothing to the ledger for them, and still
delivers the valid task sent after them promptly."""

from __future__ import annotations

import os
import pickle
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Exchange, Producer, Queue
from sqlalchemy import Engine, func, select

from orchestrator import migrations
from orchestrator.db import make_engine, outbox
from orchestrator.ledger import dead_letters, sync_ledger, target_state
from tests.conftest import create_pg_database, drop_pg_database
from tests.pipeline.conftest import Workers, plugin_path, put_user, wait_for  # noqa: F401 - a fixture
from tests.pipeline.recording import RecordingTarget
from tests.services import REDIS_URL
from workers.app import make_app

pytestmark = pytest.mark.slow


class _RunsCode:
    """Unpickling this makes a directory: proof that a worker unpickled what it was sent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


@dataclass
class Outcome:
    log: str
    ledger: dict[str, set[Any]]
    good: str
    task_ids: dict[str, str]
    markers: dict[str, str]
    alive: bool
    delivered: bool
    code_ran: list[Path]


def _ledger(engine: Engine) -> dict[str, set[Any]]:
    """What the ledger tables hold: (target, identity) rows, dead letters, target states."""
    with engine.connect() as conn:
        return {
            "rows": {(r.target, r.identity_id) for r in conn.execute(select(sync_ledger))},
            "dead letters": {(r.target, r.identity_id) for r in conn.execute(select(dead_letters))},
            "target states": {r.target for r in conn.execute(select(target_state))},
        }


def _publish_raw(app: Any, queue: str, body: bytes | str, content_type: str, headers: dict[str, Any]) -> None:
    exchange = Exchange(queue, type="direct")
    with app.connection_for_write() as conn:
        Producer(conn).publish(
            body,
            exchange=exchange,
            routing_key=queue,
            content_type=content_type,
            content_encoding="binary" if isinstance(body, bytes) else "utf-8",
            headers=headers,
            declare=[Queue(queue, exchange, routing_key=queue)],
        )


@pytest.fixture(scope="module")
def outcome(plugin_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("broker")
    url = create_pg_database("idhub_sec_broker")
    engine = make_engine(url)
    migrations.upgrade(engine)
    broker = f"{REDIS_URL}/{1 + (os.getpid() + sum(map(ord, __name__))) % 15}"
    redis.Redis.from_url(broker).flushdb()
    rec = RecordingTarget()
    targets = tmp / "targets.yaml"
    targets.write_text(
        f"targets:\n  - name: rec\n    connector: recording\n    url: {rec.url}\n    on_delete: delete\n"
    )
    pool = Workers(url, broker, targets, plugin_path, tmp)
    app = make_app(broker)
    try:
        proc = pool.start("fanout,target.rec")
        marker = tmp / "code-ran"
        ids = {
            "deliver without arguments": app.send_task("idhub.deliver", args=[], queue="target.rec").id,
            "deliver with one argument": app.send_task("idhub.deliver", args=["rec"], queue="target.rec").id,
            "deliver with ids of the wrong type": app.send_task(
                "idhub.deliver", args=["rec", [1, {"$ne": None}]], queue="target.rec"
            ).id,
            "deliver to an unknown target": app.send_task(
                "idhub.deliver", args=["no-such-target", [str(uuid.uuid4())]], queue="target.rec"
            ).id,
            "fanout with sequence numbers that are not numbers": app.send_task(
                "idhub.fanout", args=[["1; DROP TABLE sync_ledger", None]], queue="fanout"
            ).id,
            "fanout with an unknown keyword": app.send_task(
                "idhub.fanout", args=[[1]], kwargs={"bogus": True}, queue="fanout"
            ).id,
            "an unknown task": app.send_task("idhub.no_such_task", args=[1], queue="fanout").id,
        }
        markers = {
            "a body that is not JSON": "not-json-marker",
            "a pickle that runs code": "pickle",
            "a YAML document that runs code": "yaml",
            "a JSON body without task headers": "no-headers-marker",
        }
        _publish_raw(app, "fanout", '{"not-json-marker": [', "application/json", {})
        evil = (
            (_RunsCode(str(marker)),),
            {},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
        )
        task = {
            "task": "idhub.fanout",
            "id": str(uuid.uuid4()),
            "lang": "py",
            "argsrepr": "",
            "kwargsrepr": "",
        }
        _publish_raw(app, "fanout", pickle.dumps(evil), "application/x-python-serialize", task)
        yaml_evil = f"!!python/object/apply:os.mkdir ['{marker}-yaml']"
        _publish_raw(app, "fanout", yaml_evil, "application/x-yaml", task | {"id": str(uuid.uuid4())})
        _publish_raw(app, "fanout", '{"no-headers-marker": 1}', "application/json", {})

        # Every bad message has been taken off the queues (the worker serves one at a time, in order).
        client = redis.Redis.from_url(broker)
        wait_for(lambda: client.llen("fanout") == 0 and client.llen("target.rec") == 0, 30, "queues drained")
        uid = put_user(engine)
        with engine.connect() as conn:
            seq = conn.execute(select(func.max(outbox.c.seq))).scalar_one()
        app.send_task("idhub.fanout", args=[[seq]], queue="fanout")
        delivered = bool(wait_for(lambda: rec.by_hub_id(uid) is not None, 15, "the valid task delivered"))
        alive = proc.poll() is None
        pool.stop_all()
        log = "\n".join(p.read_text(errors="replace") for p in tmp.glob("*.log"))
        yield Outcome(
            log,
            _ledger(engine),
            uid,
            ids,
            markers,
            alive,
            delivered,
            [p for p in (marker, Path(f"{marker}-yaml")) if p.exists()],
        )
    finally:
        pool.stop_all()
        rec.close()
        redis.Redis.from_url(broker).flushdb()
        engine.dispose()
        drop_pg_database(url)


def test_the_worker_survives_and_then_delivers_a_valid_task(outcome: Outcome) -> None:
    assert outcome.alive
    assert outcome.delivered


def test_bad_messages_write_nothing_and_run_no_code(outcome: Outcome) -> None:
    # The ledger holds the valid task's row and nothing else (the store was empty before).
    assert outcome.ledger == {
        "rows": {("rec", outcome.good)},
        "dead letters": set(),
        "target states": {"rec"},
    }
    assert outcome.code_ran == []


@pytest.mark.parametrize(
    "case",
    [
        "deliver without arguments",
        "deliver with one argument",
        "deliver with ids of the wrong type",
        "deliver to an unknown target",
        "fanout with sequence numbers that are not numbers",
        "fanout with an unknown keyword",
        "an unknown task",
    ],
)
def test_each_bad_task_leaves_a_clear_error_in_the_log(outcome: Outcome, case: str) -> None:
    task_id = outcome.task_ids[case]
    # One log record: a timestamped line and what follows it (traceback, message dump).
    records = re.split(r"\n(?=\d{4}-\d\d-\d\dT)", outcome.log)
    mine = [r for r in records if task_id in r]
    assert mine, f"nothing logged for {case}"
    assert any(re.match(r"\S+ \[(error|critical|warning)", r) for r in mine), mine


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("a body that is not JSON", r"decode message body.*not-json-marker"),
        ("a pickle that runs code", r"untrusted content of type pickle"),
        ("a YAML document that runs code", r"untrusted content of type yaml"),
        ("a JSON body without task headers", r"invalid task message|unregistered task|no-headers-marker"),
    ],
)
def test_each_bad_message_leaves_a_clear_error_in_the_log(outcome: Outcome, case: str, says: str) -> None:
    assert re.search(says, outcome.log, re.IGNORECASE | re.DOTALL), f"nothing logged for {case}"
