"""Consent-driven scope: the newsletter follows every grant and withdrawal, and consent changes jump a
backlog of ordinary deliveries."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from connectors.newsletter import subscriber_hash
from orchestrator import sync
from orchestrator.db import now
from orchestrator.ledger import sync_ledger
from tests.hub import CUSTOMER
from tests.privacy.conftest import Privacy, customer


def _member(world: Privacy, email: str) -> dict[str, Any] | None:
    return next((m for m in world.members() if m["email_address"] == email), None)


def _crm(world: Privacy) -> tuple[list[Any], int]:
    return world.state("crm"), len(world.requests("crm"))


def test_withdrawal_unsubscribes_regrant_resubscribes_and_the_crm_is_untouched(world: Privacy) -> None:
    email, attrs, _ = customer()
    uid = world.create(email, **attrs)
    world.settle()
    assert _member(world, email)["status"] == "subscribed"  # type: ignore[index]
    crm_before = _crm(world)
    assert len(crm_before[0]) == 1

    world.set_consent(uid, False)
    world.settle()
    member = _member(world, email)
    assert member is not None
    assert member["status"] == "unsubscribed"
    with world.engine.connect() as conn:
        row = conn.execute(
            select(sync_ledger).where(sync_ledger.c.target == "news", sync_ledger.c.identity_id == uid)
        ).one()
    assert (row.status, row.synced_action, row.priority) == ("deprovisioned", "deactivate", 0)

    world.set_consent(uid, True)
    world.settle()
    assert _member(world, email)["status"] == "subscribed"  # type: ignore[index]
    assert len(world.members()) == 1
    # The CRM maps no consent: neither change cost it a single request.
    assert _crm(world) == crm_before

    # A profile update after the regrant never touches the subscription status by itself.
    world.patch(uid, {"op": "replace", "path": "name.givenName", "value": "Ada"})
    world.settle()
    member = _member(world, email)
    assert member is not None
    assert member["status"] == "subscribed"
    assert member["merge_fields"]["FNAME"] == "Ada"


def test_a_consent_withdrawal_jumps_a_backlog(world: Privacy) -> None:
    email, attrs, _ = customer()
    early = world.create(email, **attrs)
    world.settle()
    backlog = []
    for _ in range(35):
        other_email, other_attrs, _ = customer()
        backlog.append(world.create(other_email, **other_attrs))
    world.flow()  # 35 subscriptions due at the newsletter, none delivered yet
    world.set_consent(early, False)
    due = world.flow()
    assert due["news"] == [early]
    with world.engine.connect() as conn:
        prio = dict(
            conn.execute(
                select(sync_ledger.c.identity_id, sync_ledger.c.priority).where(
                    sync_ledger.c.target == "news"
                )
            ).all()
        )
    assert prio[early] == 1
    assert not any(prio[b] for b in backlog)

    # The sweeper lists it first ...
    found = sync.sweep(world.engine, world.targets, now(), stale_after=timedelta(0))
    assert found.due["news"][0] == early
    assert set(found.due["news"]) == {early, *backlog}

    # ... and a delivery asked for the backlog's first batch takes it before anything else.
    start = len(world.requests("newsletter"))
    report = world.deliver("news", backlog[:10])
    log = world.requests("newsletter")[start:]
    member_path = f"/3.0/lists/sandbox01/members/{subscriber_hash(email)}"
    assert log[0]["path"] == member_path
    first_write = next(e for e in log if e["method"] != "GET")
    assert (first_write["method"], first_write["path"]) == ("PATCH", member_path)
    assert early in report.done
    assert set(backlog[:10]) <= set(report.done)
    assert _member(world, email)["status"] == "unsubscribed"  # type: ignore[index]
    with world.engine.connect() as conn:
        assert (
            conn.scalar(
                select(sync_ledger.c.priority).where(
                    sync_ledger.c.target == "news", sync_ledger.c.identity_id == early
                )
            )
            == 0
        )
    world.settle()
    assert len([m for m in world.members() if m["status"] == "subscribed"]) == 35


def test_a_raised_priority_holds_until_delivered(world: Privacy) -> None:
    email, attrs, _ = customer()
    uid = world.create(email, **attrs)
    world.settle()
    world.set_consent(uid, False)
    world.flow()
    world.patch(uid, {"op": "replace", "path": "name.givenName", "value": "Later"})  # ordinary, undelivered
    world.flow()
    with world.engine.connect() as conn:
        row = conn.execute(
            select(sync_ledger).where(sync_ledger.c.target == "news", sync_ledger.c.identity_id == uid)
        ).one()
    assert row.priority == 1, "an ordinary change must not lower a pending consent change"
    world.settle()
    world.patch(uid, {"op": "replace", "path": "name.givenName", "value": "Ordinary"})
    world.flow()
    with world.engine.connect() as conn:
        assert (
            conn.scalar(
                select(sync_ledger.c.priority).where(
                    sync_ledger.c.target == "news", sync_ledger.c.identity_id == uid
                )
            )
            == 0
        )


@pytest.mark.parametrize(
    ("changed", "urgent"),
    [
        ([f"{CUSTOMER}:consents"], True),
        ([f"{CUSTOMER}:consents.granted"], True),
        ([CUSTOMER], True),  # the extension appeared or went whole
        (["consents"], True),
        ([f"{CUSTOMER}:loyalty.points", "name.givenName"], False),
        (["*"], False),
    ],
)
def test_consent_paths_match_by_attribute_name(changed: list[str], urgent: bool) -> None:
    assert sync._touches(changed, ["consents"]) is urgent
    assert sync._touches(changed, [f"{CUSTOMER}:consents"]) is urgent
