"""The one Task base class: logging context, the store, targets and connectors per process, enqueueing.

Tasks stay one-liners: they parse ids and call a plain function; this class holds every piece of plumbing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, ClassVar

import httpx
import redis
import structlog
from celery import Task, signals
from celery.exceptions import Retry
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from connectors.base import Connector
from connectors.http import tls_context
from connectors.registry import build, connector_class
from orchestrator import metrics, settings, sync
from orchestrator.db import engine_for
from orchestrator.relay import Publish
from orchestrator.targets import TargetConfig, connector_settings, load_targets
from workers import telemetry  # also connects the logging and metrics signals
from workers.app import WorkerSettings, queue_for
from workers.relay import publisher

log = structlog.get_logger("idhub.workers")


class _Process:
    """What a worker process builds once: the engine, the targets, one connector per target, Redis."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.targets: dict[str, TargetConfig] | None = None
        self.connectors: dict[str, Connector] = {}
        self.redis: redis.Redis | None = None
        self.tuning: WorkerSettings | None = None


_process = _Process()


def _targets() -> Mapping[str, TargetConfig]:
    with _process.lock:
        if _process.targets is None:
            path = settings.get().targets_file
            loaded = load_targets(path) if path is not None else []
            _process.targets = {cfg.name: cfg for cfg in loaded}
        return _process.targets


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _prepare(**_: Any) -> None:
    """Before the pool forks, what each child would otherwise do on its first delivery: the targets read,
    their connectors' modules imported, their mappings compiled (a filtered path builds SCIM model classes:
    about 70 ms a target), the TLS context made and httpx's transport loaded. At four targets, 0.5 s of CPU a
    child.
    A targets file that cannot be read is left for the first task to report, as before."""
    try:
        for cfg in _targets().values():
            sync.compile_target(cfg, connector_class(cfg.connector))
    except Exception as exc:  # reported by the first task that needs the targets
        log.warning("worker_prepare_failed", error=type(exc).__name__)
        _process.targets = None
    # httpx loads its transport's modules with the first client: here, not in each child's first delivery.
    httpx.HTTPTransport(verify=tls_context()).close()
    telemetry.freeze_startup_objects()  # last, and before the pool forks: its children inherit them frozen


class IdhubTask(Task):  # type: ignore[misc]
    """Binds task id, name and target to the log context; retries briefly when the store is away."""

    abstract = True
    # The store or Redis being away for a moment is the infrastructure's failure, not the record's:
    # retry the message shortly. Back-off of records lives in the ledger, never here.
    autoretry_for: ClassVar[tuple[type[BaseException], ...]] = (OperationalError, redis.ConnectionError)
    retry_backoff = 1
    retry_backoff_max = 30
    max_retries = 10

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        structlog.contextvars.bind_contextvars(**log_context(self.name, self.request.id, args, kwargs))
        started, outcome = time.perf_counter(), "error"
        try:
            result = super().__call__(*args, **kwargs)
            outcome = "ok"
            return result
        except Retry:
            outcome = "retry"
            raise
        finally:
            metrics.TASKS.labels(self.name, outcome).inc()
            metrics.TASK_SECONDS.labels(self.name).observe(time.perf_counter() - started)
            structlog.contextvars.clear_contextvars()

    # -- what a process builds once ------------------------------------------------------------------------

    @property
    def tuning(self) -> WorkerSettings:
        # Read from the environment once per process: parsing it on every task cost more than the task.
        if _process.tuning is None:
            _process.tuning = WorkerSettings()
        return _process.tuning

    @property
    def engine(self) -> Engine:
        return engine_for(settings.get().database_url, custom_plans=True)

    def targets(self) -> Mapping[str, TargetConfig]:
        return _targets()

    def connector(self, target: str) -> Connector:
        cfg = self.targets()[target]
        with _process.lock:
            if target not in _process.connectors:
                _process.connectors[target] = build(cfg.connector, connector_settings(cfg))
            return _process.connectors[target]

    def redis(self) -> redis.Redis | None:
        """The Redis that holds global rate limits and slots; None on the embedded broker (no Redis)."""
        with _process.lock:
            if _process.redis is None:
                url = settings.get().redis_url or settings.get().broker_url
                if not url.startswith(("redis://", "rediss://", "unix://")):
                    return None
                _process.redis = redis.Redis.from_url(url)
            return _process.redis

    def owner(self) -> str:
        """A lease owner unique to this attempt of this task."""
        return f"{socket.gethostname()}:{os.getpid()}:{self.request.id}"

    def deliver_batch(
        self, cfg: TargetConfig, ids: Sequence[str], lease: float, fill: int
    ) -> sync.DeliveryReport:
        """``sync.deliver`` under this attempt's lease, its batch topped up to ``fill`` records with other
        pending rows of the target; recorded in the metrics and the log (ids only)."""
        started = time.perf_counter()
        report = sync.deliver(
            self.engine,
            cfg,
            self.connector(cfg.name),
            ids,
            owner=self.owner(),
            lease=timedelta(seconds=lease),
            coalesce=fill,
        )
        elapsed = time.perf_counter() - started
        metrics.observe_delivery(report, elapsed)
        counts = {o: len(getattr(report, o, ())) for o in metrics.OUTCOMES}
        log.info("delivery batch", **counts, calls=report.calls, duration_ms=round(elapsed * 1000, 1))
        if report.dead:
            log.warning("dead letters", identity_ids=report.dead)
        if report.quarantined or report.disabled:
            log.warning("target paused", quarantined=report.quarantined, disabled=report.disabled)
        return report

    # -- enqueueing ---------------------------------------------------------------------------------------

    def enqueue_deliveries(
        self, due: Mapping[str, Sequence[str]], countdown: float | None = None, *, reason: str | None = None
    ) -> None:
        """One ``idhub.deliver`` per target and batch, on the target's own queue; ``reason`` of a put-off."""
        targets = self.targets()
        for target, ids in due.items():
            cfg = targets.get(target)
            if cfg is None or not ids:
                continue
            metrics.ENQUEUED.labels(target).inc(len(ids))
            if reason is not None:
                metrics.DEFERRED.labels(target, reason).inc()
            for start in range(0, len(ids), cfg.batch_size):
                self.app.send_task(
                    "idhub.deliver",
                    args=[target, list(ids[start : start + cfg.batch_size])],
                    queue=queue_for(target),
                    countdown=countdown,
                )

    def publisher(self) -> Publish:
        return publisher(self.app)


def log_context(
    name: str, task_id: str | None, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """What a task's log lines carry: its id and name, and the target and identity it works on (ids only)."""
    context: dict[str, Any] = {"task_id": task_id, "task_name": name}
    target = kwargs.get("target") or (args[0] if args and isinstance(args[0], str) else None)
    if target is not None:
        context["target"] = target
    ids = kwargs.get("identity_ids") or (args[1] if len(args) > 1 and isinstance(args[1], list) else None)
    if isinstance(ids, list):
        if len(ids) == 1:
            context["identity_id"] = ids[0]
        else:
            context["batch"] = len(ids)
    seqs = kwargs.get("seqs") or (args[0] if args and isinstance(args[0], list) else None)
    if isinstance(seqs, list) and seqs:
        context["outbox_seqs"] = f"{seqs[0]}-{seqs[-1]}" if len(seqs) > 1 else str(seqs[0])
    return context
