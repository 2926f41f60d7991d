"""outbox notifies only when rows were written

Revision ID: 0007
Revises: 0006

The trigger of 0001 runs once per INSERT statement, also one that wrote no row. That cost nothing while every
such statement ran inside a transaction that was then rolled back; a customer's creation now commits as one
statement by itself, and one refused for a taken userName writes no outbox row but would still wake every
relay, through the notification queue's commit lock. The trigger now looks at the rows the statement wrote.
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    _replace_trigger(
        "IF EXISTS (SELECT FROM written) THEN PERFORM pg_notify('idhub_outbox', ''); END IF;",
        "REFERENCING NEW TABLE AS written",
    )


def downgrade() -> None:
    _replace_trigger("PERFORM pg_notify('idhub_outbox', '');", "")


def _replace_trigger(body: str, referencing: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        DROP TRIGGER outbox_notify ON outbox;
        CREATE OR REPLACE FUNCTION idhub_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            {body}
            RETURN NULL;
        END $$;
        CREATE TRIGGER outbox_notify AFTER INSERT ON outbox {referencing}
            FOR EACH STATEMENT EXECUTE FUNCTION idhub_outbox_notify();
        """
    )
