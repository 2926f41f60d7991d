"""no stored passwords

Revision ID: 0006
Revises: 0005

Earlier versions kept a password a client sent inside the customer's document, in clear. The hub uses none,
returns none and syncs none, so they are removed; there is nothing to restore on the way down.
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("UPDATE identities SET doc = doc - 'password' WHERE doc ? 'password'")
    else:
        op.execute(
            "UPDATE identities SET doc = json_remove(doc, '$.password') "
            "WHERE json_type(doc, '$.password') IS NOT NULL"
        )


def downgrade() -> None:
    pass
