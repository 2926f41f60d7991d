"""The textbook design, for comparison: one Celery task per change per target, one HTTP request per record.

Each ``naive.sync(target, identity_id)`` task reads the identity from the hub's database, maps it for the
target and calls ``connector.upsert`` (which looks the account up by its e-mail, then creates or updates it).
No ledger, no coalescing, no batching. It runs on its own Celery app and Redis database
(``BENCH_NAIVE_BROKER``) with the same reliability settings as idhub's (JSON, late acks, prefetch 1), and
counts finished tasks in Redis (``naive:done`` / ``naive:failed``) so the harness knows when it is over.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis
from celery import Celery
from sqlalchemy import select

from connectors.base import Connector, Record
from connectors.errors import RetryableError
from connectors.registry import build
from orchestrator import settings
from orchestrator.db import engine_for, identities
from orchestrator.mapping import compile_mapping, match_key
from orchestrator.targets import TargetConfig, connector_settings, in_scope, load_targets

QUEUE = "naive"
DONE, FAILED = "naive:done", "naive:failed"


def make_app(broker_url: str) -> Celery:
    app = Celery("naive", broker=broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        task_default_queue=QUEUE,
    )
    return app


app = make_app(os.environ.get("BENCH_NAIVE_BROKER", "redis://127.0.0.1:6379/1"))
_lock = threading.Lock()
_built: dict[str, tuple[TargetConfig, Connector, Any]] = {}
_counter: list[redis.Redis] = []


def _target(name: str) -> tuple[TargetConfig, Connector, Any]:
    """The target's configuration, connector and compiled mapping, built once per process."""
    with _lock:
        if not _built:
            path = settings.get().targets_file
            assert path is not None
            for cfg in load_targets(path):
                connector = build(cfg.connector, connector_settings(cfg))
                _built[cfg.name] = (cfg, connector, compile_mapping(cfg.mapping or connector.default_mapping))
            _counter.append(redis.Redis.from_url(app.conf.broker_url))
        return _built[name]


@app.task(name="naive.sync", bind=True, max_retries=5)  # type: ignore[misc]
def sync(self: Any, target: str, identity_id: str) -> None:
    cfg, connector, mapper = _target(target)
    engine = engine_for(settings.get().database_url)
    with engine.connect() as conn:
        row = conn.execute(
            select(identities.c.version, identities.c.doc).where(identities.c.id == identity_id)
        ).one()
    try:
        if in_scope(cfg, row.doc):
            attrs = mapper(row.doc)
            key = match_key(attrs, connector.match_field)
            connector.upsert(Record(identity_id, row.version, attrs, match_key=key))
    except RetryableError as exc:
        if self.request.retries < self.max_retries:
            raise self.retry(exc=exc, countdown=1) from exc
        _counter[0].incr(FAILED)
        raise
    except Exception:
        _counter[0].incr(FAILED)
        raise
    _counter[0].incr(DONE)
