"""The sync ledger: per (target, identity) what is desired and what was done, plus dead letters and receipts.

Events are hints, these rows are the truth. Nothing here holds personal data (ids, versions, codes and times),
but for ``inflight_key`` while a push's outcome is unknown.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
)

from orchestrator.db import BigId, metadata


class Status(StrEnum):
    PENDING = "pending"  # desired is ahead of synced and no attempt failed yet
    SYNCED = "synced"  # the target holds the desired version
    RETRYING = "retrying"  # an attempt failed; ``next_attempt_at`` says when to try again
    DEAD = "dead"  # a dead letter holds the reason; only a replay or a newer version re-arms it
    OUT_OF_SCOPE = "out_of_scope"  # the target should not hold this identity and does not
    DEPROVISIONED = "deprovisioned"  # deactivated, anonymized, deleted or erased at the target


# A status outside Status, the mass-deprovision guard's (orchestrator.guard): a deprovision waiting for an
# operator's approval.
HELD: Final = "held"

# Statuses after which a row needs nothing more for the version it records.
DONE = (Status.SYNCED, Status.OUT_OF_SCOPE, Status.DEPROVISIONED)

# On PostgreSQL its pages keep 30 % room (fillfactor 70, migration 0008), so that the updates of a delivery
# that change no indexed column (lease, attempt) stay on their page and add no index entries.
sync_ledger = Table(
    "sync_ledger",
    metadata,
    Column("target", String(64), nullable=False),
    Column("identity_id", String(36), nullable=False),
    Column("resource_type", String(16), nullable=False, default="User"),
    Column("remote_id", String(256)),
    Column("desired_version", BigInteger, nullable=False),
    Column("desired_action", String(16), nullable=False),
    Column("synced_version", BigInteger),
    Column("synced_action", String(16)),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("first_failure_at", DateTime(timezone=True)),
    # A fencing lease: taken by one UPDATE ... WHERE the lease is free or expired, and every write made
    # under it checks the owner, so a worker that lost its lease cannot record stale results.
    Column("lease_owner", String(128)),
    Column("lease_until", DateTime(timezone=True)),
    Column("last_error_code", String(64)),
    Column("last_error_message", String(512)),
    Column("payload_digest", String(64)),
    # The matching key (e-mail, userName) of an upsert whose outcome is unknown, as a worker killed mid-call
    # leaves it: the way back to an account the ledger has no (or an outdated) remote id for, also after the
    # hub erased its own copy. Cleared once an outcome is recorded or the target refused the record; deleted
    # with the row when an erasure completes.
    Column("inflight_key", String(320)),
    Column("priority", Integer, nullable=False, default=0),
    Column("enqueued_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Identity first (migration 0009): lookups by identity need no index of their own; a target's scans go
    # through the due index.
    PrimaryKeyConstraint("identity_id", "target", name="sync_ledger_pkey"),
    Index("ix_sync_ledger_due", "target", "status", "next_attempt_at"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("target", String(64), nullable=False),
    Column("identity_id", String(36), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("error_code", String(64), nullable=False),
    Column("error_message", String(512), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("replayed_at", DateTime(timezone=True)),
    Index("ix_dead_letters_target", "target", "identity_id"),
)

target_state = Table(
    "target_state",
    metadata,
    Column("target", String(64), primary_key=True),
    Column("consecutive_failures", Integer, nullable=False, default=0),
    # Set while quarantined: the time the next probe is due. NULL when the target is healthy.
    Column("quarantined_until", DateTime(timezone=True)),
    Column("probe_interval", Float),  # seconds
    Column("disabled", Boolean, nullable=False, default=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

erasure_receipts = Table(
    "erasure_receipts",
    metadata,
    Column("identity_id", String(36), primary_key=True),
    Column("target", String(64), primary_key=True),
    Column("action", String(16), nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("confirmed_at", DateTime(timezone=True), nullable=False),
    Column("detail", String(256), nullable=False, default=""),
)

# Outbox events handed to the broker whose fan-out has not committed yet. The broker may lose a message
# (a Redis restart keeps nothing), so the sweeper re-publishes what sits here too long; fan-out deletes
# its rows in the same transaction as its ledger writes.
outbox_inflight = Table(
    "outbox_inflight",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("published_at", DateTime(timezone=True), nullable=False),
    Index("ix_outbox_inflight_published_at", "published_at"),
)
