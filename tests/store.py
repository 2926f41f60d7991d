"""Writing identities the way the hub does, without HTTP: the row and its outbox event in one transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, insert, select, update

from orchestrator.db import identities, now
from orchestrator.outbox import Kind, emit
from orchestrator.scim.storage import changed_paths, user_columns


def write_user(engine: Engine, user_id: str, doc: dict[str, Any]) -> str:
    """Create the user, or move it to ``doc`` with the next version and the event the hub would emit."""
    columns = user_columns(doc)
    stamp = now()
    with engine.begin() as conn:
        row = conn.execute(select(identities).where(identities.c.id == user_id)).first()
        if row is None:
            version, kind, changed = 1, Kind.CREATED, changed_paths({}, doc)
            conn.execute(
                insert(identities).values(
                    id=user_id, version=1, doc=doc, created_at=stamp, updated_at=stamp, **columns
                )
            )
        else:
            version, changed = row.version + 1, changed_paths(row.doc, doc)
            kind = Kind.UPDATED
            if row.active != columns["active"]:
                kind = Kind.REACTIVATED if columns["active"] else Kind.DEACTIVATED
            conn.execute(
                update(identities)
                .where(identities.c.id == user_id)
                .values(version=version, doc=doc, updated_at=stamp, **columns)
            )
        emit(conn, "User", user_id, version, kind, changed)
    return user_id
