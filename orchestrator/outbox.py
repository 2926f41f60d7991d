"""Change events, written in the same transaction as the change they describe (transactional outbox)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from enum import StrEnum

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


def emit(
    conn: Connection,
    resource_type: str,
    resource_id: str,
    version: int,
    kind: Kind,
    changed: Iterable[str] = (),
) -> str:
    """Record that a resource reached ``version``; ``changed`` holds attribute paths, never values."""
    event_id = str(uuid.uuid4())
    conn.execute(
        insert(outbox).values(
            event_id=event_id,
            resource_type=resource_type,
            resource_id=resource_id,
            version=version,
            kind=str(kind),
            changed=sorted(set(changed)),
            created_at=now(),
        )
    )
    return event_id
