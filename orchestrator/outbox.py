"""Change events, written in the same transaction as the change they describe (transactional outbox)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Connection

from orchestrator.db import now, outbox


class Kind(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    DEACTIVATED = "deactivated"  # active went true -> false
    REACTIVATED = "reactivated"  # active went false -> true
    DELETED = "deleted"  # the hub erased the resource; a tombstone remains
    MEMBERS_CHANGED = "members_changed"  # a group's membership changed (and maybe more)


def event_row(
    resource_type: str,
    resource_id: str,
    version: int,
    kind: Kind,
    changed: Iterable[str] = (),
    stamp: datetime | None = None,
) -> dict[str, Any]:
    """The values of one outbox row: ``changed`` holds attribute paths, never values."""
    return {
        "event_id": str(uuid.uuid4()),
        "resource_type": resource_type,
        "resource_id": resource_id,
        "version": version,
        "kind": str(kind),
        "changed": sorted(set(changed)),
        "created_at": stamp or now(),
    }


def emit(
    conn: Connection,
    resource_type: str,
    resource_id: str,
    version: int,
    kind: Kind,
    changed: Iterable[str] = (),
) -> str:
    """Record that a resource reached ``version``, in the caller's transaction; returns the event id."""
    row = event_row(resource_type, resource_id, version, kind, changed)
    conn.execute(insert(outbox), row)
    return str(row["event_id"])
