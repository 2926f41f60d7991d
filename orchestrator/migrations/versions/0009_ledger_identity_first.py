"""ledger keyed by identity, then target

Revision ID: 0009
Revises: 0008

The primary key (target, identity_id) left lookups by identity alone (fan-out, erasure, tombstones) to an
index of their own, one more entry written for every row a fan-out inserts and for every outcome that moves a
row's status. Keyed (identity_id, target), the key serves both: a single row is found by both columns either
way, and a target's scans go through the due index, which leads with the target.
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_KEY = "ALTER TABLE sync_ledger ADD CONSTRAINT sync_ledger_pkey PRIMARY KEY"


def upgrade() -> None:
    _rekey(("identity_id", "target"), identity_index=False)


def downgrade() -> None:
    _rekey(("target", "identity_id"), identity_index=True)


def _rekey(columns: tuple[str, str], *, identity_index: bool) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE sync_ledger DROP CONSTRAINT sync_ledger_pkey")
        op.execute(f"{_KEY} ({', '.join(columns)})")
        if identity_index:
            op.execute("CREATE INDEX ix_sync_ledger_identity ON sync_ledger (identity_id)")
        else:
            op.execute("DROP INDEX ix_sync_ledger_identity")
        return
    with op.batch_alter_table("sync_ledger", recreate="always") as batch_op:
        if identity_index:
            batch_op.create_index("ix_sync_ledger_identity", ["identity_id"])
        else:
            batch_op.drop_index("ix_sync_ledger_identity")
        batch_op.create_primary_key("sync_ledger_pkey", list(columns))
