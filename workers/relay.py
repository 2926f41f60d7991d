"""The relay process: ``python -m workers.relay`` publishes the outbox to the broker until stopped."""

from __future__ import annotations

from orchestrator import settings
from orchestrator.db import engine_for
from orchestrator.relay import run_forever
from workers.app import app
from workers.base import publisher


def main() -> None:
    """Relay forever with the process settings (LISTEN/NOTIFY on PostgreSQL, polling on SQLite)."""
    run_forever(engine_for(settings.get().database_url), publisher(app))


if __name__ == "__main__":
    main()
