"""sync ledger, dead letters, target state, erasure receipts

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("identity_id", sa.String(length=36), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=False),
        sa.Column("error_message", sa.String(length=512), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.create_index("ix_dead_letters_target", ["target", "identity_id"], unique=False)

    op.create_table(
        "erasure_receipts",
        sa.Column("identity_id", sa.String(length=36), nullable=False),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("identity_id", "target"),
    )
    op.create_table(
        "outbox_inflight",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("outbox_inflight", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_inflight_published_at", ["published_at"], unique=False)

    op.create_table(
        "sync_ledger",
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("identity_id", sa.String(length=36), nullable=False),
        sa.Column("resource_type", sa.String(length=16), nullable=False),
        sa.Column("remote_id", sa.String(length=256), nullable=True),
        sa.Column("desired_version", sa.BigInteger(), nullable=False),
        sa.Column("desired_action", sa.String(length=16), nullable=False),
        sa.Column("synced_version", sa.BigInteger(), nullable=True),
        sa.Column("synced_action", sa.String(length=16), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_failure_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error_code", sa.String(length=64), nullable=True),
        sa.Column("last_error_message", sa.String(length=512), nullable=True),
        sa.Column("payload_digest", sa.String(length=64), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("target", "identity_id"),
    )
    with op.batch_alter_table("sync_ledger", schema=None) as batch_op:
        batch_op.create_index("ix_sync_ledger_due", ["target", "status", "next_attempt_at"], unique=False)
        batch_op.create_index("ix_sync_ledger_identity", ["identity_id"], unique=False)

    op.create_table(
        "target_state",
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("quarantined_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("probe_interval", sa.Float(), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("target"),
    )


def downgrade() -> None:
    op.drop_table("target_state")
    with op.batch_alter_table("sync_ledger", schema=None) as batch_op:
        batch_op.drop_index("ix_sync_ledger_identity")
        batch_op.drop_index("ix_sync_ledger_due")

    op.drop_table("sync_ledger")
    with op.batch_alter_table("outbox_inflight", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_inflight_published_at")

    op.drop_table("outbox_inflight")
    op.drop_table("erasure_receipts")
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.drop_index("ix_dead_letters_target")

    op.drop_table("dead_letters")
