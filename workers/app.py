"""The Celery application: JSON only, late acks, one message prefetched, no results, events on request."""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator import settings

FANOUT_QUEUE = "fanout"
ADMIN_QUEUE = "admin"


class WorkerSettings(BaseSettings):
    """Pipeline timings (prefix ``IDHUB_``); the defaults suit production, tests shorten them."""

    model_config = SettingsConfigDict(env_prefix="IDHUB_", extra="ignore")

    # Leases and slots are renewed while a delivery runs, so they only need to outlast a renewal beat:
    # short ones free what a killed worker held soon.
    lease_seconds: float = Field(default=60.0, gt=0, description="A delivery lease, renewed while it runs.")
    slot_ttl_seconds: float = Field(
        default=15.0, gt=0, description="A concurrency slot's life, renewed while its delivery runs."
    )
    stale_after_seconds: float = Field(
        default=60.0, gt=0, description="A due row enqueued this long ago is enqueued again by the sweeper."
    )
    sweep_interval: float = Field(default=5.0, gt=0)
    # Above the longest task (a batch delivery is bounded by its lease), or Redis re-delivers it meanwhile.
    visibility_timeout: int = Field(default=7200, gt=0)
    reconcile_every: float | None = Field(
        default=None, gt=0, description="Seconds between scheduled reconciliations (report only); unset: off."
    )
    # Three broker messages per task (sent, started, succeeded) cost a worker about a tenth of its CPU; Flower
    # switches a running worker's events on every few seconds by itself, so only set this to see every task.
    task_events: bool = Field(default=False, description="Celery task events from the start.")


# The embedded broker's transport (see workers/fsbroker.py), known to kombu by a scheme of its own.
TRANSPORT_ALIASES.setdefault("idhubfs", "workers.fsbroker:Transport")


def queue_for(target: str) -> str:
    """The queue of one target's deliveries, so a slow target never delays another."""
    return f"target.{target}"


def broker_options(broker_url: str, tuning: WorkerSettings) -> tuple[str, dict[str, object]]:
    """The URL Celery gets and its transport options.

    ``filesystem:///some/folder`` is the embedded broker of the demo: kombu's file-system transport keeps
    messages as files in that folder, so the hub runs with no server at all.
    """
    if broker_url.startswith("filesystem://"):
        folder = Path(broker_url.removeprefix("filesystem://") or ".idhub/broker")
        folder.mkdir(parents=True, exist_ok=True)
        return "idhubfs://", {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            # Broadcast (control) messages too, or kombu drops a "control" folder in the working directory.
            "control_folder": str(folder / "control"),
            "polling_interval": 0.05,
        }
    return broker_url, {"visibility_timeout": tuning.visibility_timeout}


def make_app(broker_url: str, tuning: WorkerSettings | None = None) -> Celery:
    """A Celery app on ``broker_url`` with idhub's reliability settings and routes."""
    tuning = tuning or WorkerSettings()
    url, transport_options = broker_options(broker_url, tuning)
    app = Celery("idhub", broker=url, include=["workers.tasks", "workers.admin_tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A delivery cut off from the broker finishes and records its outcome under its lease (the message
        # comes again and finds the row done); cancelling it mid-call would leave an unknown outcome.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_send_task_events=tuning.task_events,
        task_send_sent_event=tuning.task_events,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        task_default_queue=ADMIN_QUEUE,
        task_routes={
            "idhub.fanout": {"queue": FANOUT_QUEUE},
            "idhub.sweep": {"queue": ADMIN_QUEUE},
            "idhub.probe": {"queue": ADMIN_QUEUE},
            "idhub.relay": {"queue": ADMIN_QUEUE},
            "idhub.admin.*": {"queue": ADMIN_QUEUE},
        },
        beat_schedule={
            "idhub.sweep": {"task": "idhub.sweep", "schedule": tuning.sweep_interval},
        },
    )
    if tuning.reconcile_every is not None:
        app.conf.beat_schedule["idhub.admin.reconcile_all"] = {
            "task": "idhub.admin.reconcile_all",
            "schedule": tuning.reconcile_every,
        }
    return app


app = make_app(settings.get().broker_url)
