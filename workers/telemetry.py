"""Logging and metrics of the worker-side processes, wired through Celery's signals.

Imported by ``workers.base``, so every process that loads the tasks is wired:

- ``setup_logging``: Celery asks how to log; idhub's redacting JSON/console logging answers instead of
  Celery's own handlers (``IDHUB_LOG_LEVEL`` when set, else the worker's ``--loglevel``).
- ``worker_init`` (the worker's main process, before the pool forks): empties ``PROMETHEUS_MULTIPROC_DIR``
  and serves the metrics on ``IDHUB_METRICS_PORT`` (see ``orchestrator.metrics``).
- ``celeryd_after_setup``: silences one notice about a setting idhub sets explicitly.
- ``worker_process_shutdown``: a pool child is gone; multiprocess mode forgets its live gauges.

``start_process()`` does the same for a plain process (the relay). Both keep the objects start-up made out of
the garbage collector's full passes (``freeze_startup_objects``; a worker calls it once it has prepared its
targets, in ``workers.base``, so that its pool children inherit them frozen).
"""

from __future__ import annotations

import gc
import logging
import os
import warnings
from typing import Any

from celery import signals
from celery.exceptions import CPendingDeprecationWarning

from orchestrator import logs, metrics

log = logging.getLogger("idhub.workers")


@signals.setup_logging.connect  # type: ignore[untyped-decorator]
def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    logs.configure_from_settings(loglevel or None)


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _worker_init(sender: Any = None, **_: Any) -> None:
    metrics.reset_multiprocess_dir()
    port = metrics.serve()
    pool = getattr(sender, "pool_cls", None)  # a name here ("prefork"), or already the class
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if port is not None and metrics.multiprocess_dir() is None and "prefork" in name:
        log.warning(
            "metrics: a prefork worker needs PROMETHEUS_MULTIPROC_DIR, or its children's samples are lost"
        )


@signals.celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _quiet_setting_notice(**_: Any) -> None:
    # Celery (once its logging is set up) warns on every broker connection loss that the default of
    # worker_cancel_long_running_tasks_on_connection_loss changes in 6.0; workers.app sets it explicitly, so
    # the notice says nothing and would flood the log through a broker outage. Pool children inherit this.
    warnings.filterwarnings(
        "ignore",
        message=r"\s*In Celery 5\.1 we introduced an optional breaking change",
        category=CPendingDeprecationWarning,
    )


@signals.worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _child_exited(pid: int | None = None, **_: Any) -> None:
    metrics.process_exited(pid or os.getpid())


def start_process() -> None:
    """Set up logging and serve metrics in a process that is not a Celery worker (the relay)."""
    logs.configure_from_settings()
    metrics.serve()
    freeze_startup_objects()


# Young objects the collector lets accumulate before a pass. A delivery of 500 records keeps about 10,000
# containers alive at once (documents, payloads, rows) and reference counting frees them all; at Python's 700
# every delivery set off passes that found nothing to collect. In-process, 80,000 records delivered in
# batches of 500 spent 0.52 s in the collector with start-up frozen (3,000 passes), none with this; 2.7 s
# with neither.
_YOUNG = 50_000


def freeze_startup_objects() -> None:
    """Leave what start-up made (modules, classes, schemas, about 140,000 objects) out of the garbage
    collector's full passes: each one walked them all, 75 ms in which the process did nothing else. And let
    young objects gather up to ``_YOUNG`` before a pass."""
    gc.freeze()
    gc.set_threshold(_YOUNG, *gc.get_threshold()[1:])


_first_task_done = False


@signals.task_postrun.connect  # type: ignore[untyped-decorator]
def _freeze_after_first_task(**_: Any) -> None:
    """A pool child's first task imports and builds what start-up left for later (a connector's client, the
    engine's pool, compiled statements): frozen too, once, after a pass that frees that task's garbage."""
    global _first_task_done
    if not _first_task_done:
        _first_task_done = True
        gc.collect()
        gc.freeze()
