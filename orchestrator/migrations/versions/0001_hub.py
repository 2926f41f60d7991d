"""The hub: identities, groups and members, outbox, API tokens.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Stamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "identities",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("user_name", sa.String(256)),
        sa.Column("user_name_ci", sa.String(256)),
        sa.Column("external_id", sa.String(256)),
        sa.Column("email_ci", sa.String(320)),
        sa.Column("active", sa.Boolean),
        sa.Column("doc", Json, nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("updated_at", Stamp, nullable=False),
        sa.Column("deleted_at", Stamp),
    )
    op.create_index("ux_identities_user_name_ci", "identities", ["user_name_ci"], unique=True)
    op.create_index("ix_identities_external_id", "identities", ["external_id"])
    op.create_index("ix_identities_email_ci", "identities", ["email_ci"])
    op.create_index("ix_identities_updated_at", "identities", ["updated_at"])

    op.create_table(
        "groups",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("display_name", sa.String(256)),
        sa.Column("display_name_ci", sa.String(256)),
        sa.Column("external_id", sa.String(256)),
        sa.Column("doc", Json, nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("updated_at", Stamp, nullable=False),
        sa.Column("deleted_at", Stamp),
    )
    op.create_index("ix_groups_display_name_ci", "groups", ["display_name_ci"])
    op.create_index("ix_groups_external_id", "groups", ["external_id"])

    op.create_table(
        "group_members",
        sa.Column(
            "group_id", sa.String(36), sa.ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("member_id", sa.String(36), primary_key=True),
        sa.Column("member_type", sa.String(16), nullable=False),
        sa.Column("display", sa.String(256)),
    )
    op.create_index("ix_group_members_member_id", "group_members", ["member_id"])

    op.create_table(
        "outbox",
        sa.Column("seq", BigId, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(36), nullable=False, unique=True),
        sa.Column("resource_type", sa.String(16), nullable=False),
        sa.Column("resource_id", sa.String(36), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("changed", Json, nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("published_at", Stamp),
    )
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["seq"],
        postgresql_where=sa.text("published_at IS NULL"),
        sqlite_where=sa.text("published_at IS NULL"),
    )

    if op.get_bind().dialect.name == "postgresql":
        # Every transaction that writes outbox rows wakes the relays at commit, whoever wrote them, with no
        # extra round trip; PostgreSQL folds a transaction's identical notifications into one.
        op.execute(
            """
            CREATE FUNCTION idhub_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('idhub_outbox', '');
                RETURN NULL;
            END $$;
            CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
                FOR EACH STATEMENT EXECUTE FUNCTION idhub_outbox_notify();
            """
        )

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("last_used_at", Stamp),
        sa.Column("revoked_at", Stamp),
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS outbox_notify ON outbox")
        op.execute("DROP FUNCTION IF EXISTS idhub_outbox_notify()")
    for table in ("api_tokens", "outbox", "group_members", "groups", "identities"):
        op.drop_table(table)
