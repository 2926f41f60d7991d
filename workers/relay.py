"""The relay process: ``python -m workers.relay`` publishes the outbox to the broker until stopped.

It imports what publishing needs and no more (no targets, connectors or SCIM models): a relay started on a
backlog is on its critical path from its first moment."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import structlog

from orchestrator import metrics, migrations, settings
from orchestrator.db import engine_for
from orchestrator.relay import Publish, drain, run_forever
from workers import telemetry
from workers.app import FANOUT_QUEUE, app

log = structlog.get_logger("idhub.workers")
# Outbox events per fan-out task: a relay batch (500) in one task, so its ledger writes are few statements.
FANOUT_BATCH = 500


def publisher(app: Any) -> Publish:
    """A relay ``publish`` callable: one ``idhub.fanout`` task per batch of outbox sequence numbers."""

    def publish(seqs: Sequence[int]) -> None:
        for start in range(0, len(seqs), FANOUT_BATCH):
            app.send_task("idhub.fanout", args=[list(seqs[start : start + FANOUT_BATCH])], queue=FANOUT_QUEUE)
        metrics.PUBLISHED.inc(len(seqs))
        log.debug("published", events=len(seqs), first_seq=seqs[0] if seqs else None)

    return publish


def main(args: argparse.Namespace | None = None) -> int:
    """Relay with the process settings (LISTEN/NOTIFY on PostgreSQL, polling on SQLite); ``--once`` drains."""
    telemetry.start_process()
    engine = engine_for(settings.get().database_url, custom_plans=True)
    migrations.upgrade(engine)
    if args is not None and getattr(args, "once", False):
        print(f"published {drain(engine, publisher(app))} events")
        return 0
    run_forever(engine, publisher(app))
    return 0


if __name__ == "__main__":
    main()
