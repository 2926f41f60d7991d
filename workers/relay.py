"""The relay process: ``python -m workers.relay`` publishes the outbox to the broker until stopped."""

from __future__ import annotations

import argparse

from orchestrator import migrations, settings
from orchestrator.db import engine_for
from orchestrator.relay import drain, run_forever
from workers import telemetry
from workers.app import app
from workers.base import publisher


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
