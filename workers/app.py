"""The Celery application: JSON only, late acks, one message prefetched, no results, events on."""

from __future__ import annotations

from celery import Celery
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator import settings

FANOUT_QUEUE = "fanout"
ADMIN_QUEUE = "admin"


class WorkerSettings(BaseSettings):
    """Pipeline timings (prefix ``IDHUB_``); the defaults suit production, tests shorten them."""

    model_config = SettingsConfigDict(env_prefix="IDHUB_", extra="ignore")

    lease_seconds: float = Field(default=300.0, gt=0, description="A delivery lease; outlasts a batch call.")
    stale_after_seconds: float = Field(
        default=60.0, gt=0, description="A due row enqueued this long ago is enqueued again by the sweeper."
    )
    sweep_interval: float = Field(default=5.0, gt=0)
    # Above the longest task (a batch delivery is bounded by its lease), or Redis re-delivers it meanwhile.
    visibility_timeout: int = Field(default=7200, gt=0)


def queue_for(target: str) -> str:
    """The queue of one target's deliveries, so a slow target never delays another."""
    return f"target.{target}"


def make_app(broker_url: str, tuning: WorkerSettings | None = None) -> Celery:
    """A Celery app on ``broker_url`` with idhub's reliability settings and routes."""
    tuning = tuning or WorkerSettings()
    app = Celery("idhub", broker=broker_url, include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": tuning.visibility_timeout},
        task_default_queue=ADMIN_QUEUE,
        task_routes={
            "idhub.fanout": {"queue": FANOUT_QUEUE},
            "idhub.sweep": {"queue": ADMIN_QUEUE},
            "idhub.probe": {"queue": ADMIN_QUEUE},
            "idhub.relay": {"queue": ADMIN_QUEUE},
        },
        beat_schedule={
            "idhub.sweep": {"task": "idhub.sweep", "schedule": tuning.sweep_interval},
        },
    )
    return app


app = make_app(settings.get().broker_url)
