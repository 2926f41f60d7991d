"""Prometheus metrics: what the API and the workers count, and the ledger read at scrape time.

Where each process exposes them:

- **API**: ``GET /metrics`` on the hub renders ``hub_registry()``: the process's counters (HTTP requests)
  plus ``LedgerCollector``, which reads backlog, dead letters, held deprovisions, quarantine and the relay's
  backlog from the database at scrape time (a few GROUP BY queries). Only the API runs it, so every figure
  is scraped once however many workers run.
- **Workers and the relay**: a dedicated port, ``IDHUB_METRICS_PORT`` (unset: not served), bound to
  ``IDHUB_METRICS_ADDR`` (``127.0.0.1`` by default; ``0.0.0.0`` in a container). Celery's prefork pool runs
  tasks in child processes, so a prefork worker must also set ``PROMETHEUS_MULTIPROC_DIR`` to an empty
  directory of its own (prometheus-client's multiprocess mode; wiped at worker start): the children write
  their samples there and the worker's main process serves them merged. ``-P solo`` or threads need no
  directory. An API run with several server processes (``idhub serve --workers N``) sets it likewise and
  ``/metrics`` merges its processes (empty that directory before the server starts).

Labels are target names, outcomes, statuses, task names, HTTP methods and route templates: never identity
ids or personal data, so cardinality stays bounded and PII stays home.
"""

from __future__ import annotations

import bisect
import collections
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from orchestrator.db import now as utcnow
from orchestrator.db import outbox
from orchestrator.ledger import HELD, Status, outbox_inflight, sync_ledger, target_state

log = logging.getLogger(__name__)
access_log = structlog.stdlib.get_logger("idhub.http")

# What a delivery can say about a record (the lists of ``sync.DeliveryReport``).
OUTCOMES: Final = ("done", "unchanged", "retrying", "dead", "not_due", "held")
# Ledger statuses that mean "something is outstanding"; the done ones are the bulk and need no gauge.
BACKLOG: Final = (Status.PENDING.value, Status.RETRYING.value, Status.DEAD.value, HELD)

_LATENCY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LAG_BUCKETS: Final = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    21600.0,
    86400.0,
)

DELIVERIES = Counter(
    "idhub_deliveries", "Records a delivery finished with, by target and outcome.", ["target", "outcome"]
)
DELIVERY_SECONDS = Histogram(
    "idhub_delivery_duration_seconds",
    "Time one delivery batch took (lease, read, target calls, record), by target.",
    ["target"],
    buckets=_LATENCY_BUCKETS,
)
SYNC_LAG = Histogram(
    "idhub_sync_lag_seconds",
    "From the commit of a version in the hub to its delivery being recorded, by target.",
    ["target"],
    buckets=_LAG_BUCKETS,
)
TARGET_CALLS = Counter("idhub_target_calls", "Calls made to a target's API, by target.", ["target"])
DEFERRED = Counter(
    "idhub_delivery_batches_deferred",
    "Delivery batches put off (rate_limited, busy, quarantined, disabled), by target and reason.",
    ["target", "reason"],
)
ENQUEUED = Counter("idhub_deliveries_enqueued", "Records enqueued for delivery, by target.", ["target"])
TASKS = Counter(
    "idhub_tasks", "Celery tasks run, by task name and outcome (ok, retry, error).", ["task", "outcome"]
)
TASK_SECONDS = Histogram(
    "idhub_task_duration_seconds", "Time a Celery task ran, by task name.", ["task"], buckets=_LATENCY_BUCKETS
)
PUBLISHED = Counter("idhub_relay_published", "Outbox events handed to the broker.")
HTTP_REQUESTS = Counter(
    "idhub_http_requests", "HTTP requests served, by method, route and status.", ["method", "route", "status"]
)
HTTP_SECONDS = Histogram(
    "idhub_http_request_duration_seconds",
    "Time an HTTP request took, by method and route.",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)


class MetricsSettings(BaseSettings):
    """Where a worker or relay serves its metrics (prefix ``IDHUB_``)."""

    model_config = SettingsConfigDict(env_prefix="IDHUB_", extra="ignore")

    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_addr: str = "127.0.0.1"


# -- recording ----------------------------------------------------------------------------------------------


def observe_delivery(report: Any, seconds: float, *, now: datetime | None = None) -> None:
    """Record one delivery batch (a ``sync.DeliveryReport``): outcomes, duration, calls and sync lag.

    The lag runs from the commit of each delivered version (``report.committed``, read with the rows the
    delivery pushed: the row's ``updated_at`` is written with the version's outbox event) to ``now``."""
    target = report.target
    DELIVERY_SECONDS.labels(target).observe(seconds)
    for outcome in OUTCOMES:
        count = len(getattr(report, outcome, ()))
        if count:
            DELIVERIES.labels(target, outcome).inc(count)
    if report.calls:
        TARGET_CALLS.labels(target).inc(report.calls)
    for reason in ("quarantined", "disabled"):
        if getattr(report, reason, False):
            DEFERRED.labels(target, reason).inc()
    now = now or utcnow()
    lags = [max(0.0, (now - _aware(at, now)).total_seconds()) for at in report.committed.values()]
    if lags:
        observe_all(SYNC_LAG.labels(target), lags)


def observe_all(child: Histogram, amounts: Sequence[float]) -> None:
    """``child.observe`` of every amount, written as one increment per bucket touched. In a worker's process
    each increment is a write to a memory-mapped file, and the sync lag is observed for every record
    delivered: one at a time that was 4 % of a delivery worker's CPU."""
    upper = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if upper is None or buckets is None or total is None:  # a prometheus-client laid out otherwise
        for amount in amounts:
            child.observe(amount)
        return
    for index, count in collections.Counter(bisect.bisect_left(upper, a) for a in amounts).items():
        buckets[index].inc(count)
    total.inc(sum(amounts))


def _aware(value: datetime, like: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything here is UTC.
    return value.replace(tzinfo=like.tzinfo) if value.tzinfo is None else value


# -- the ledger, read at scrape time ----------------------------------------------------------------------


class LedgerCollector:
    """Gauges read from the database at scrape time: backlog per target and status, target health, relay."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterator[Metric]:
        try:
            families = self._read()
        except Exception:  # the database is away: say so, and keep /metrics answering
            log.warning("metrics: reading the ledger failed", exc_info=True)
            families = []
            ok = 0.0
        else:
            ok = 1.0
        yield from families
        yield GaugeMetricFamily(
            "idhub_ledger_scrape_ok", "Whether the ledger could be read for this scrape.", ok
        )

    def _read(self) -> list[Metric]:
        L = sync_ledger.c
        T = target_state.c
        now = utcnow()
        rows = GaugeMetricFamily(
            "idhub_ledger_records",
            "Ledger records with something outstanding, by target and status: pending, retrying, dead, held.",
            labels=["target", "status"],
        )
        oldest = GaugeMetricFamily(
            "idhub_ledger_oldest_pending_age_seconds",
            "Age of the oldest pending or retrying record's last change, by target.",
            labels=["target"],
        )
        quarantined = GaugeMetricFamily(
            "idhub_target_quarantined",
            "1 while the target is quarantined (deliveries paused).",
            labels=["target"],
        )
        disabled = GaugeMetricFamily(
            "idhub_target_disabled", "1 when the target switched the hub off.", labels=["target"]
        )
        failures = GaugeMetricFamily(
            "idhub_target_consecutive_failures", "Retryable failures in a row.", labels=["target"]
        )
        with self.engine.connect() as conn:
            counts = conn.execute(
                select(L.target, L.status, func.count(), func.min(L.updated_at))
                .where(L.status.in_(BACKLOG))
                .group_by(L.target, L.status)
            ).all()
            states = conn.execute(
                select(T.target, T.quarantined_until, T.disabled, T.consecutive_failures)
            ).all()
            unpublished = conn.execute(
                select(func.count(), func.min(outbox.c.created_at)).where(outbox.c.published_at.is_(None))
            ).one()
            inflight = conn.execute(
                select(func.count(), func.min(outbox_inflight.c.published_at)).select_from(outbox_inflight)
            ).one()
        # Every target with a health row or a backlog gets all its series, zeros included, so alerts see them.
        known = {r[0] for r in counts} | {s.target for s in states}
        by_key = {(r[0], r[1]): (int(r[2]), r[3]) for r in counts}
        for target in sorted(known):
            for status in BACKLOG:
                rows.add_metric([target, status], by_key.get((target, status), (0, None))[0])
            ages = [
                _age(by_key[(target, s)][1], now)
                for s in (Status.PENDING.value, Status.RETRYING.value)
                if by_key.get((target, s), (0, None))[1] is not None
            ]
            oldest.add_metric([target], max(ages, default=0.0))
        for s in states:
            quarantined.add_metric([s.target], 1.0 if s.quarantined_until is not None else 0.0)
            disabled.add_metric([s.target], 1.0 if s.disabled else 0.0)
            failures.add_metric([s.target], float(s.consecutive_failures or 0))
        return [
            rows,
            oldest,
            quarantined,
            disabled,
            failures,
            GaugeMetricFamily(
                "idhub_relay_unpublished", "Outbox events not yet handed to the broker.", unpublished[0]
            ),
            GaugeMetricFamily(
                "idhub_relay_oldest_unpublished_age_seconds",
                "Age of the oldest outbox event not yet handed to the broker.",
                _age(unpublished[1], now) if unpublished[1] is not None else 0.0,
            ),
            GaugeMetricFamily(
                "idhub_relay_inflight",
                "Events handed to the broker whose fan-out has not committed.",
                inflight[0],
            ),
            GaugeMetricFamily(
                "idhub_relay_oldest_inflight_age_seconds",
                "Age of the oldest event handed to the broker and not fanned out yet.",
                _age(inflight[1], now) if inflight[1] is not None else 0.0,
            ),
        ]


def _age(stamp: datetime, now: datetime) -> float:
    return max(0.0, (now - _aware(stamp, now)).total_seconds())


# -- exposition ------------------------------------------------------------------------------------------


class _ThisProcess:
    """The process's own metrics (the default registry) inside another registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when this process runs in prometheus-client's multiprocess mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def process_registry() -> CollectorRegistry:
    """This process's metrics, merged with its sibling processes' in multiprocess mode."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ThisProcess())
    return registry


def hub_registry(engine: Engine) -> CollectorRegistry:
    """What the API's ``/metrics`` serves: the process's metrics and the ledger's gauges."""
    registry = process_registry()
    registry.register(LedgerCollector(engine))
    return registry


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The registry in the exposition format the scraper accepts (OpenMetrics or text); body, content type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def serve(settings: MetricsSettings | None = None) -> int | None:
    """Serve this process's metrics on ``IDHUB_METRICS_PORT`` in a thread; the port, or None when unset."""
    settings = settings or MetricsSettings()
    if settings.metrics_port is None:
        return None
    server, _thread = start_http_server(
        settings.metrics_port, addr=settings.metrics_addr, registry=process_registry()
    )
    port = int(server.server_address[1])
    log.info("metrics served on %s:%d", settings.metrics_addr, port)
    return port


def reset_multiprocess_dir() -> None:
    """Empty the multiprocess directory at start: samples of an earlier run must not be served again."""
    folder = multiprocess_dir()
    if folder is None:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    mine = f"_{os.getpid()}.db"  # this process's own files are open already and stay
    for stale in Path(folder).glob("*.db"):
        if not stale.name.endswith(mine):
            stale.unlink(missing_ok=True)


def process_exited(pid: int) -> None:
    """Tell multiprocess mode a child process is gone (its live gauges stop counting)."""
    if multiprocess_dir():
        mark_process_dead(pid)  # type: ignore[no-untyped-call]


# -- HTTP requests ------------------------------------------------------------------------------------------

_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SCIM_ENDPOINTS: Final = frozenset(
    {"Users", "Groups", "Bulk", ".search", "Me", "ServiceProviderConfig", "ResourceTypes", "Schemas"}
)
_PLAIN_ROUTES: Final = frozenset({"/healthz", "/readyz", "/metrics"})
# Scrapes and probes come every few seconds: their access lines go to DEBUG.
_QUIET_ROUTES: Final = _PLAIN_ROUTES
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def route_of(path: str) -> str:
    """A bounded route label for a request path: ``/scim/v2/Users/{id}``, ``/healthz``, or ``other``."""
    if path in _PLAIN_ROUTES:
        return path
    if not path.startswith("/scim/v2"):
        return "other"
    parts = [p for p in path.removeprefix("/scim/v2").removesuffix(".scim").split("/") if p]
    if not parts:
        return "/scim/v2"
    if parts[0] not in _SCIM_ENDPOINTS:
        return "/scim/v2/other"
    route = "/scim/v2/" + parts[0]
    if len(parts) > 1:
        route += "/.search" if parts[1] == ".search" else "/{id}"
    return route + ("/..." if len(parts) > 2 else "")


class RequestTelemetry:
    """ASGI middleware: a request id in the log context, one access line and the HTTP metrics per request.

    The access line names the method, the path (no query string: SCIM filters carry personal data) and the
    status; the metrics use the route template so that ids never become label values.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope["method"] if scope["method"] in _METHODS else "other"
        path = str(scope.get("path", ""))
        if not path.isprintable():  # a control character must not start a forged line in console logs
            path = path.encode("unicode_escape").decode("ascii")
        route = route_of(path)
        request_id = _request_id(scope)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                HTTP_REQUESTS.labels(method, route, str(status)).inc()
                HTTP_SECONDS.labels(method, route).observe(elapsed)
                access_log.log(
                    logging.DEBUG if route in _QUIET_ROUTES else logging.INFO,
                    "http request",
                    method=method,
                    path=path,
                    status=status,
                    duration_ms=round(elapsed * 1000, 1),
                )


def _request_id(scope: Scope) -> str:
    """The caller's X-Request-Id when it is a plain token, else a new one."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = bytes(value).decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex
