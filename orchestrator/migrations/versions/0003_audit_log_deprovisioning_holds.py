"""audit log, deprovisioning holds

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column(
            "args",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("result", sa.String(length=32), nullable=False),
        sa.Column(
            "detail",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index("ix_audit_log_at", ["at"], unique=False)

    op.create_table(
        "deprovision_holds",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=256), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("deprovision_holds", schema=None) as batch_op:
        batch_op.create_index("ix_deprovision_holds_target", ["target", "state"], unique=False)

    op.create_table(
        "deprovision_window",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("deprovision_window", schema=None) as batch_op:
        batch_op.create_index("ix_deprovision_window_target_at", ["target", "at"], unique=False)

    op.create_table(
        "deprovision_hold_items",
        sa.Column("hold_id", sa.BigInteger(), nullable=False),
        sa.Column("identity_id", sa.String(length=36), nullable=False),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["hold_id"], ["deprovision_holds.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("hold_id", "identity_id"),
    )
    with op.batch_alter_table("deprovision_hold_items", schema=None) as batch_op:
        batch_op.create_index("ix_deprovision_hold_items_identity", ["target", "identity_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("deprovision_hold_items", schema=None) as batch_op:
        batch_op.drop_index("ix_deprovision_hold_items_identity")

    op.drop_table("deprovision_hold_items")
    with op.batch_alter_table("deprovision_window", schema=None) as batch_op:
        batch_op.drop_index("ix_deprovision_window_target_at")

    op.drop_table("deprovision_window")
    with op.batch_alter_table("deprovision_holds", schema=None) as batch_op:
        batch_op.drop_index("ix_deprovision_holds_target")

    op.drop_table("deprovision_holds")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_at")

    op.drop_table("audit_log")
