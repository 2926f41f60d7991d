"""Art. 17: an erasure reaches every target by its policy, leaves no personal data in the hub or on any
target, is confirmed per target on a receipt, survives a target outage, and is never undone."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import NoResultFound

from connectors.base import Connector, DeprovisionAction, Record, Result
from orchestrator import gdpr, sync
from orchestrator.cli import main as idhub
from orchestrator.db import identities, now, outbox
from orchestrator.ledger import dead_letters, sync_ledger
from tests.privacy.conftest import Privacy, customer

ALL = ("app", "news", "crm", "shop", "hooks")


def _hits(text: str, pii: dict[str, str]) -> list[str]:
    lowered = text.lower()
    return [k for k, v in pii.items() if v.lower() in lowered]


def _row(world: Privacy, target: str, uid: str) -> Any:
    with world.engine.connect() as conn:
        return conn.execute(
            select(sync_ledger).where(sync_ledger.c.target == target, sync_ledger.c.identity_id == uid)
        ).one()


def _provisioned(world: Privacy) -> tuple[str, str, dict[str, str]]:
    email, attrs, pii = customer()
    uid = world.create(email, **attrs)
    world.settle()
    for kind, dump in world.target_dump().items():
        assert _hits(dump, pii), f"{kind} should hold the customer before the erasure"
    return uid, email, pii


def test_erasure_leaves_no_personal_data_anywhere_and_a_receipt_per_target(world: Privacy) -> None:
    uid, _, pii = _provisioned(world)
    shop_id = world.state("shop")[0]["id"]
    world.delete(uid)  # SCIM DELETE: the hub's copy goes in this transaction
    with world.engine.connect() as conn:
        tomb = conn.execute(select(identities).where(identities.c.id == uid)).one()
    assert tomb.doc == {}
    assert tomb.user_name is None
    assert tomb.email_ci is None
    assert not _hits(world.hub_dump(), pii)

    world.settle()

    hub = world.hub_dump()
    assert not _hits(hub, pii), "personal data left in the hub"
    for kind, dump in world.target_dump().items():
        assert not _hits(dump, pii), f"personal data left at {kind}"
    # The shop's policy keeps an account: anonymized, orders kept, nothing personal in it.
    (kept,) = world.state("shop")
    assert kept["id"] == shop_id
    assert kept["email"] == f"anonymized-{shop_id}@anonymized.invalid"
    assert world.members() == []
    assert world.state("crm") == []
    assert world.scim_users() == []
    assert [e["type"] for e in world.state("webhook")["events"]] == ["customer.erased"]

    receipt = gdpr.receipt(world.engine, uid)
    assert receipt["status"] == "complete"
    assert receipt["hub"]["purged_at"] is not None
    assert receipt["requested_at"] is not None
    assert receipt["source"] == "api"
    by_target = {t["target"]: (t["action"], t["outcome"], t["confirmation"]) for t in receipt["targets"]}
    assert by_target == {
        "app": ("erase", "deprovisioned", gdpr.VERIFIED_ABSENT),
        "news": ("erase", "deprovisioned", gdpr.VERIFIED_ABSENT),
        "crm": ("erase", "deprovisioned", gdpr.VERIFIED_ABSENT),
        "shop": ("anonymize", "deprovisioned", gdpr.REQUESTED),
        "hooks": ("erase", "deprovisioned", gdpr.REQUESTED),
    }
    assert all(t["time"] for t in receipt["targets"])
    assert not _hits(json.dumps(receipt), pii)
    with world.engine.connect() as conn:
        assert conn.scalar(select(func.count()).where(identities.c.id == uid)) == 0
        assert conn.scalar(select(func.count()).where(sync_ledger.c.identity_id == uid)) == 0
    assert gdpr.pending_erasures(world.engine) == []


def test_cli_erasure_with_a_target_down_stays_pending_retries_then_completes(
    world: Privacy, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uid, email, pii = _provisioned(world)
    monkeypatch.setenv("IDHUB_DATABASE_URL", str(world.engine.url.render_as_string(hide_password=False)))
    from orchestrator import settings

    settings.get.cache_clear()
    world.faults("crm", outage=True)
    try:
        assert idhub(["gdpr", "erase", email.upper()]) == 0  # found by e-mail, case-insensitively
        assert uid in capsys.readouterr().out
        world.settle(only={"app", "news", "shop", "hooks"})
        crm = world.cfg("crm")
        # The CRM is down: far more attempts than max_attempts, and the erasure never dead-letters.
        for _ in range(crm.retry.max_attempts + 2):
            row = _row(world, "crm", uid)
            world.deliver(
                "crm", [uid], now=max(now(), row.next_attempt_at or now()) + timedelta(milliseconds=1)
            )
        row = _row(world, "crm", uid)
        assert (row.status, row.attempts > crm.retry.max_attempts) == ("retrying", True)
        with world.engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(dead_letters)) == 0

        assert idhub(["gdpr", "receipt", uid]) == 0
        receipt = json.loads(capsys.readouterr().out)
        assert receipt["status"] == "pending"
        assert receipt["source"].startswith("cli")
        outcomes = {t["target"]: t["outcome"] for t in receipt["targets"]}
        assert outcomes == dict.fromkeys(("app", "news", "shop", "hooks"), "deprovisioned") | {
            "crm": "pending"
        }
        (pending,) = gdpr.pending_erasures(world.engine)
        assert pending["identity_id"] == uid
        assert [(t["target"], t["status"]) for t in pending["targets"]] == [("crm", "retrying")]
        assert idhub(["gdpr", "pending"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["identity_id"] == uid
        assert world.state("crm"), "the CRM still holds the contact while it is down"
    finally:
        world.faults("crm", outage=False)
        settings.get.cache_clear()

    world.settle()
    receipt = gdpr.receipt(world.engine, uid)
    assert receipt["status"] == "complete"
    crm_receipt = next(t for t in receipt["targets"] if t["target"] == "crm")
    assert (crm_receipt["outcome"], crm_receipt["confirmation"]) == ("deprovisioned", gdpr.VERIFIED_ABSENT)
    assert world.state("crm") == []
    assert gdpr.pending_erasures(world.engine) == []
    for kind, dump in world.target_dump().items():
        assert not _hits(dump, pii), f"personal data left at {kind}"


def test_nothing_brings_an_erased_customer_back(world: Privacy) -> None:
    uid, email, pii = _provisioned(world)
    with world.engine.connect() as conn:
        old_seqs = list(conn.scalars(select(outbox.c.seq).where(outbox.c.resource_id == uid)))
    # An update the shop refuses becomes a dead letter (a record that is wrong, not a target that is down).
    world.faults("shop", reject_keys=[email])
    world.patch(uid, {"op": "replace", "path": "name.givenName", "value": "Countess"})
    world.settle()
    with world.engine.connect() as conn:
        (letter,) = conn.execute(select(dead_letters).where(dead_letters.c.identity_id == uid)).all()
    world.faults("shop", reject_keys=[])

    # While the erasure is pending (the CRM is down), replaying the old dead letter re-drives the erasure.
    world.faults("crm", outage=True)
    world.delete(uid)
    world.settle(only={"app", "news", "shop", "hooks"})
    sync.replay_dead_letter(world.engine, letter.id)
    world.settle(only={"app", "news", "shop", "hooks"})
    assert len(world.state("shop")) == 1
    assert world.state("shop")[0]["email"].startswith("anonymized-")
    world.faults("crm", outage=False)
    world.settle()
    assert gdpr.receipt(world.engine, uid)["status"] == "complete"
    with world.engine.connect() as conn:
        assert conn.scalar(select(func.count()).where(dead_letters.c.identity_id == uid)) == 0

    # After the purge: the old dead letter is gone with the customer ...
    with pytest.raises((LookupError, NoResultFound)):
        sync.replay_dead_letter(world.engine, letter.id)
    # ... late and replayed events find nothing to provision ...
    assert sync.fanout(world.engine, world.targets, old_seqs) == {}
    # ... and a resync or reconcile that marks it desired everywhere again is dropped without a call.
    stamp = now()
    with world.engine.begin() as conn:
        for cfg in world.targets:
            conn.execute(
                insert(sync_ledger).values(
                    target=cfg.name,
                    identity_id=uid,
                    resource_type="User",
                    remote_id="1",
                    desired_version=99,
                    desired_action="upsert",
                    status="pending",
                    attempts=0,
                    priority=0,
                    created_at=stamp,
                    updated_at=stamp,
                )
            )
    before = {kind: len(world.requests(kind)) for kind in world.servers}
    for cfg in world.targets:
        report = world.deliver(cfg.name, [uid])
        assert report.calls == 0
    assert {kind: len(world.requests(kind)) for kind in world.servers} == before
    with world.engine.connect() as conn:
        assert conn.scalar(select(func.count()).where(sync_ledger.c.identity_id == uid)) == 0
    assert gdpr.erased(world.engine.connect(), uid)
    for kind, dump in world.target_dump().items():
        assert not _hits(dump, pii), f"the erased customer is back at {kind}"
    assert world.members() == []
    assert world.state("crm") == []
    assert world.scim_users() == []


def test_an_erasure_waits_for_a_tombstone_not_a_replay(world: Privacy) -> None:
    """A tombstone's row is re-armed to its erasure, never to an upsert, whatever marks it desired."""
    uid, _, pii = _provisioned(world)
    world.faults("crm", outage=True)
    world.delete(uid)
    world.flow()
    with world.engine.begin() as conn:
        conn.execute(
            update(sync_ledger)
            .where(sync_ledger.c.identity_id == uid)
            .values(desired_action="upsert", synced_version=None)
        )
    world.faults("crm", outage=False)
    world.settle()
    for kind, dump in world.target_dump().items():
        assert not _hits(dump, pii), f"personal data back at {kind}"
    assert gdpr.receipt(world.engine, uid)["status"] == "complete"


class _Readable(Connector):
    """A target that can read accounts back; ``read`` says whether it was asked."""

    kind = "readable"
    default_mapping: dict[str, str] = {}
    match_field = "email"
    supports_read = True

    def __init__(self, holds: bool) -> None:
        self.holds, self.reads = holds, 0

    def read(self, remote_id: str) -> dict[str, Any] | None:
        self.reads += 1
        return {"email": "x"} if self.holds else None

    def upsert(self, record: Record) -> Result:
        raise NotImplementedError

    def deprovision(self, record: Record, action: DeprovisionAction) -> Result:
        raise NotImplementedError

    def find(self, match_key: str) -> str | None:
        raise NotImplementedError

    def probe(self) -> None:
        return None


def test_an_erasure_is_verified_absent_only_after_a_read_back() -> None:
    gone, kept = _Readable(holds=False), _Readable(holds=True)
    assert gdpr.confirm(gone, "erase", "r-1", "deprovisioned") == gdpr.VERIFIED_ABSENT
    assert gdpr.confirm(kept, "erase", "r-1", "deprovisioned") == gdpr.REQUESTED
    # No remote id: nothing could be read back, whatever the connector answered.
    nothing = _Readable(holds=False)
    assert gdpr.confirm(nothing, "erase", None, "absent") == gdpr.REQUESTED
    assert nothing.reads == 0
    assert gdpr.confirm(gone, "deactivate", "r-1", "deprovisioned") == gdpr.REQUESTED
