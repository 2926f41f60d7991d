"""No personal data at rest outside the hub's identity rows: stored error text is scrubbed; privacy records
and the audit log are kept only as long as configured."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, ClassVar

import pytest
from sqlalchemy import func, insert, select

from connectors.base import Connector, DeprovisionAction, Record, Result
from connectors.errors import PermanentError, RetryableError
from orchestrator import gdpr, sync
from orchestrator.admin import audit_log
from orchestrator.db import now
from orchestrator.ledger import dead_letters, erasure_receipts, sync_ledger
from tests.privacy.conftest import Privacy, customer

LEAKY = (
    "rejected ada.lovelace@example.org (+44 20 7946 0958) Authorization: Bearer abc.def-123 whsec_c2VjcmV0"
)


class Leaky(Connector):
    """A target whose error messages quote the customer back (as some real APIs do)."""

    kind = "leaky"
    default_mapping: ClassVar[Mapping[str, str]] = {"email": "emails[primary eq true].value"}
    match_field = "email"
    error: ClassVar[type[Exception]] = PermanentError

    def upsert(self, record: Record) -> Result:
        raise self.error(LEAKY)

    def deprovision(self, record: Record, action: DeprovisionAction) -> Result:
        raise self.error(LEAKY)

    def find(self, match_key: str) -> str | None:
        return None

    def probe(self) -> None:
        return None


def test_scrub_masks_contact_data_and_credentials() -> None:
    text = gdpr.scrub(LEAKY)
    for secret in ("ada.lovelace@example.org", "7946", "abc.def-123", "c2VjcmV0"):
        assert secret not in text
    assert text.startswith("rejected ")
    assert gdpr.scrub("x" * 600) == "x" * 512
    assert gdpr.scrub(None) == ""
    # Identifiers survive: they are what an operator needs.
    ident = str(uuid.uuid4())
    assert (
        gdpr.scrub(f"POST /contacts/{ident} -> 400 (INVALID)") == f"POST /contacts/{ident} -> 400 (INVALID)"
    )


@pytest.mark.parametrize("error", [PermanentError, RetryableError])
def test_stored_error_text_is_scrubbed(world: Privacy, error: type[Exception]) -> None:
    email, attrs, _ = customer()
    uid = world.create(email, **attrs)
    world.flow()
    leaky = Leaky()
    leaky.error = error  # type: ignore[misc]
    sync.deliver(world.engine, world.cfg("crm"), leaky, [uid], owner="t")
    with world.engine.connect() as conn:
        row = conn.execute(
            select(sync_ledger).where(sync_ledger.c.target == "crm", sync_ledger.c.identity_id == uid)
        ).one()
        letters = [r.error_message for r in conn.execute(select(dead_letters))]
    stored = [row.last_error_message, *letters]
    assert row.status == ("dead" if error is PermanentError else "retrying")
    assert len(stored) == (2 if error is PermanentError else 1)
    for message in stored:
        assert "example.org" not in message
        assert "7946" not in message
        assert "abc.def" not in message
        assert "[email]" in message


def _receipt(identity_id: str, target: str, at: Any) -> dict[str, Any]:
    return {
        "identity_id": identity_id,
        "target": target,
        "action": "erase",
        "outcome": "purged" if target == gdpr.HUB else "deprovisioned",
        "confirmed_at": at,
        "detail": "",
    }


def test_purge_expired_keeps_receipts_and_audit_rows_for_their_configured_time(
    world: Privacy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDHUB_RECEIPT_RETENTION_DAYS", "30")
    monkeypatch.setenv("IDHUB_AUDIT_RETENTION_DAYS", "7")
    stamp = now()
    old, recent, open_ = (str(uuid.uuid4()) for _ in range(3))
    with world.engine.begin() as conn:
        conn.execute(
            insert(erasure_receipts),
            [
                _receipt(old, "crm", stamp - timedelta(days=31)),
                _receipt(old, gdpr.HUB, stamp - timedelta(days=31)),
                _receipt(recent, "crm", stamp - timedelta(days=29)),
                _receipt(recent, gdpr.HUB, stamp - timedelta(days=29)),
                _receipt(open_, "crm", stamp - timedelta(days=90)),  # still pending: never purged
            ],
        )
        conn.execute(
            insert(gdpr.erasure_requests),
            [
                {
                    "identity_id": old,
                    "requested_at": stamp - timedelta(days=32),
                    "source": "api",
                    "completed_at": stamp - timedelta(days=31),
                },
                {
                    "identity_id": recent,
                    "requested_at": stamp - timedelta(days=30),
                    "source": "api",
                    "completed_at": stamp - timedelta(days=29),
                },
                {
                    "identity_id": open_,
                    "requested_at": stamp - timedelta(days=90),
                    "source": "cli",
                    "completed_at": None,
                },
            ],
        )
        conn.execute(
            insert(audit_log),
            [
                {
                    "at": stamp - timedelta(days=days),
                    "actor": "t",
                    "action": "x",
                    "args": {},
                    "result": "ok",
                    "detail": {},
                }
                for days in (8, 6)
            ],
        )
    assert gdpr.purge_expired(world.engine, stamp) == {
        "erasure_receipts": 2,
        "erasure_requests": 1,
        "audit_log": 1,
    }
    with world.engine.connect() as conn:
        left = {r.identity_id for r in conn.execute(select(erasure_receipts.c.identity_id))}
        assert left == {recent, open_}
        assert set(conn.scalars(select(gdpr.erasure_requests.c.identity_id))) == {recent, open_}
        assert conn.scalar(select(func.count()).select_from(audit_log)) == 1
    assert gdpr.receipt(world.engine, recent)["status"] == "complete"
    with pytest.raises(LookupError):
        gdpr.receipt(world.engine, old)

    # The sweeper runs the purge itself, at most once per interval.
    with world.engine.begin() as conn:
        conn.execute(insert(erasure_receipts), [_receipt(recent, "shop", stamp)])
    gdpr._last_purge.clear()
    later = stamp + timedelta(days=2)
    sync.sweep(world.engine, world.targets, later)
    with world.engine.connect() as conn:
        assert conn.scalar(select(func.count()).where(erasure_receipts.c.identity_id == recent)) == 0
    assert gdpr.maybe_purge_expired(world.engine, later + timedelta(seconds=1)) is None


def test_erase_writes_an_audit_line_without_personal_data(world: Privacy) -> None:
    email, attrs, pii = customer()
    uid = world.create(email, **attrs)
    assert gdpr.erase(world.engine, email, actor="cli:tester") == (uid, True)
    assert gdpr.erase(world.engine, uid, actor="cli:tester") == (uid, False)  # already a tombstone
    with world.engine.connect() as conn:
        (line,) = conn.execute(select(audit_log)).all()
    assert (line.actor, line.action, line.args, line.result) == (
        "cli:tester",
        "gdpr.erase",
        {"identity_id": uid},
        "ok",
    )
    assert not any(v.lower() in world.hub_dump().lower() for v in pii.values())
