"""ledger pages keep room for updates in place

Revision ID: 0008
Revises: 0007

Every delivery updates its ledger row four times (desired, lease, attempt, outcome). On pages filled to the
brim each update writes the new row version to another page and a new entry into every index of the table;
with room left on the page, an update that changes no indexed column (the lease, the attempt) stays on it
and touches no index (a heap-only tuple).
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE sync_ledger SET (fillfactor = 70)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE sync_ledger RESET (fillfactor)")
