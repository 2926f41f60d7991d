"""erasure requests, urgent ledger rows

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasure_requests",
        sa.Column("identity_id", sa.String(length=36), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("identity_id"),
    )
    with op.batch_alter_table("erasure_requests", schema=None) as batch_op:
        batch_op.create_index("ix_erasure_requests_completed_at", ["completed_at"], unique=False)

    with op.batch_alter_table("sync_ledger", schema=None) as batch_op:
        batch_op.create_index(
            "ix_sync_ledger_urgent",
            ["target", "updated_at"],
            unique=False,
            postgresql_where=sa.text("priority > 0"),
            sqlite_where=sa.text("priority > 0"),
        )


def downgrade() -> None:
    with op.batch_alter_table("sync_ledger", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_sync_ledger_urgent",
            postgresql_where=sa.text("priority > 0"),
            sqlite_where=sa.text("priority > 0"),
        )

    with op.batch_alter_table("erasure_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_erasure_requests_completed_at")

    op.drop_table("erasure_requests")
