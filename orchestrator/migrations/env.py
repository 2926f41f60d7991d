"""Alembic environment: runs on the connection idhub hands over, never from a config file."""

from __future__ import annotations

from alembic import context

import orchestrator.admin  # registers the audit log
import orchestrator.gdpr  # registers the erasure requests and the urgent-row index
import orchestrator.guard  # registers the deprovisioning holds
import orchestrator.ledger  # noqa: F401 - registers the ledger tables on the metadata
from orchestrator.db import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
