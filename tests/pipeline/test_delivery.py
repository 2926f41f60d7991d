"""Fan-out, delivery, retries, quarantine, dead letters and erasure, driven in-process against real PG and
real loopback HTTP targets (the worker plumbing is covered by test_end_to_end)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from connectors.registry import build
from orchestrator import sync
from orchestrator.db import identities, now, outbox
from orchestrator.ledger import dead_letters, erasure_receipts, sync_ledger, target_state
from orchestrator.relay import drain
from orchestrator.targets import TargetConfig, connector_settings
from tests.pipeline.conftest import delete_user, deliver_now, ledger_row, put_user
from tests.pipeline.recording import RecordingTarget


def _cfg(targets: list[TargetConfig], name: str) -> TargetConfig:
    return next(t for t in targets if t.name == name)


def _flow(engine: Engine, targets: list[TargetConfig]) -> dict[str, list[str]]:
    """Relay every unpublished event straight into fan-out (what the broker does between them)."""
    due: dict[str, list[str]] = {}

    def publish(seqs: Any) -> None:
        for t, ids in sync.fanout(engine, targets, list(seqs)).items():
            due.setdefault(t, []).extend(ids)

    drain(engine, publish)
    return due


def test_burst_coalesces_and_old_events_change_nothing(
    clean: Engine, targets: list, rec: RecordingTarget
) -> None:
    cfg = _cfg(targets, "rec")
    uid = put_user(clean)
    for i in range(49):
        put_user(clean, uid, given=f"v{i}")
    due = _flow(clean, targets)
    assert due["rec"] == [uid]
    report = deliver_now(clean, cfg, [uid])
    assert report.done == [uid]
    with clean.connect() as conn:
        committed = conn.scalar(select(identities.c.updated_at).where(identities.c.id == uid))
    assert report.committed == {uid: committed}  # the sync lag runs from the version delivered
    assert rec.by_hub_id(uid)["version"] == 50
    assert rec.by_hub_id(uid)["given"] == "v48"
    assert rec.calls_for(uid) <= 3
    # A duplicated task and a late, old event do nothing.
    assert deliver_now(clean, cfg, [uid]).calls == 0
    with clean.connect() as conn:
        first = conn.scalar(select(func.min(outbox.c.seq)))
    assert sync.fanout(clean, targets, [first]) == {}
    row = ledger_row(clean, "rec", uid)
    assert (row.desired_version, row.synced_version, row.status) == (50, 50, "synced")


def test_update_deactivate_reactivate_delete_erasure(clean: Engine, targets: list, rec, other) -> None:
    uid = put_user(clean)
    _flow(clean, targets)
    for cfg in targets:
        deliver_now(clean, cfg, [uid])
    remote = rec.by_hub_id(uid)
    assert remote["active"] is True
    put_user(clean, uid, active=False)
    _flow(clean, targets)
    deliver_now(clean, _cfg(targets, "rec"), [uid])
    assert rec.by_hub_id(uid)["active"] is False
    assert ledger_row(clean, "rec", uid).status == "deprovisioned"
    put_user(clean, uid, active=True)
    _flow(clean, targets)
    deliver_now(clean, _cfg(targets, "rec"), [uid])
    assert rec.by_hub_id(uid)["active"] is True
    delete_user(clean, uid)
    _flow(clean, targets)
    deliver_now(clean, _cfg(targets, "rec"), [uid])
    assert rec.by_hub_id(uid) is None
    with clean.connect() as conn:
        assert conn.scalar(select(func.count()).where(identities.c.id == uid)) == 1  # "other" not done yet
    deliver_now(clean, _cfg(targets, "other"), [uid])
    assert other.by_hub_id(uid) is None
    with clean.connect() as conn:
        assert conn.scalar(select(func.count()).where(identities.c.id == uid)) == 0
        assert conn.scalar(select(func.count()).where(sync_ledger.c.identity_id == uid)) == 0
        receipts = {r.target: (r.action, r.outcome) for r in conn.execute(select(erasure_receipts))}
    assert receipts == {
        "rec": ("delete", "deprovisioned"),
        "other": ("delete", "deprovisioned"),
        sync.HUB: ("erase", "purged"),
    }


def test_500s_then_recovery_and_retry_after_honoured(clean: Engine, targets: list, rec) -> None:
    cfg = _cfg(targets, "rec")
    uid = put_user(clean)
    _flow(clean, targets)
    rec.faults.script = [(500, None)]
    start = now()
    report = deliver_now(clean, cfg, [uid])
    assert report.retrying == [uid]
    row = ledger_row(clean, "rec", uid)
    assert row.status == "retrying"
    assert row.attempts == 1
    assert row.last_error_code == "http_500"
    assert deliver_now(clean, cfg, [uid], now=start).not_due == [uid]  # back-off is respected
    report = deliver_now(clean, cfg, [uid], now=row.next_attempt_at + timedelta(milliseconds=1))
    assert report.done == [uid]
    assert rec.by_hub_id(uid) is not None

    put_user(clean, uid, given="B")
    _flow(clean, targets)
    rec.faults.script = [(429, 30)]
    start = now()
    deliver_now(clean, cfg, [uid], now=start)
    row = ledger_row(clean, "rec", uid)
    assert row.status == "retrying"
    assert row.next_attempt_at >= start + timedelta(seconds=30)
    assert sync.sweep(clean, targets, start + timedelta(seconds=5)).due == {}
    assert sync.sweep(clean, targets, start + timedelta(seconds=31)).due == {"rec": [uid]}


def test_permanent_400_dead_letters_one_record_then_replay(clean: Engine, targets: list, rec) -> None:
    cfg = _cfg(targets, "rec")
    bad, good = put_user(clean), put_user(clean)
    _flow(clean, targets)
    rec.faults.reject = {bad}
    report = deliver_now(clean, cfg, [bad, good])
    assert report.dead == [bad]
    assert report.done == [good]
    with clean.connect() as conn:
        letter = conn.execute(select(dead_letters)).one()
    assert (letter.target, letter.identity_id, letter.error_code) == ("rec", bad, "invalid_record")
    assert deliver_now(clean, cfg, [bad]).calls == 0  # dead rows wait for a replay
    rec.faults.reject = set()
    assert sync.replay_dead_letter(clean, letter.id) == ("rec", bad)
    assert deliver_now(clean, cfg, [bad]).done == [bad]
    assert rec.by_hub_id(bad)["version"] == 1
    assert ledger_row(clean, "rec", bad).status == "synced"


def test_retries_exhausted_dead_letter_with_reason(clean: Engine, targets: list, rec) -> None:
    cfg = _cfg(targets, "rec")
    uid = put_user(clean)
    _flow(clean, targets)
    for _ in range(4):
        rec.faults.script = [(502, None)]
        row = ledger_row(clean, "rec", uid)
        when = (row.next_attempt_at or now()) + timedelta(milliseconds=1)
        deliver_now(clean, cfg, [uid], now=when)
        with clean.begin() as conn:  # one success elsewhere resets the run of failures: no quarantine here
            conn.execute(target_state.update().values(consecutive_failures=0))
    row = ledger_row(clean, "rec", uid)
    assert row.status == "dead"
    assert row.attempts == 4
    with clean.connect() as conn:
        assert "gave up after 4 attempts" in conn.execute(select(dead_letters.c.error_message)).scalar_one()


def test_down_target_is_quarantined_no_dead_letters_and_catches_up(clean: Engine, targets: list, rec) -> None:
    cfg = _cfg(targets, "rec")
    ids = [put_user(clean) for _ in range(5)]
    _flow(clean, targets)
    rec.faults.down = True
    report = deliver_now(clean, cfg, ids)
    assert report.quarantined
    requests_while_down = len(rec.requests)
    later = now() + timedelta(hours=2)  # far past every back-off and max_attempts worth of retries
    for _ in range(10):
        assert deliver_now(clean, cfg, ids, now=later).quarantined
    assert len(rec.requests) == requests_while_down  # quarantined deliveries never call the target
    found = sync.sweep(clean, targets, later)
    assert found.probes == ["rec"]
    assert "rec" not in found.due
    connector = build(cfg.connector, connector_settings(cfg))
    assert sync.probe(clean, cfg, connector, now=later) is None  # still down: next probe later
    rec.faults.down = False
    due = sync.probe(clean, cfg, connector, now=later)
    connector.close()
    assert sorted(due or []) == sorted(ids)
    assert sorted(deliver_now(clean, cfg, ids, now=later).done) == sorted(ids)
    with clean.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(dead_letters)) == 0
    assert all(rec.by_hub_id(i) for i in ids)


def test_gone_remote_account_is_recreated_once(clean: Engine, targets: list, rec) -> None:
    cfg = _cfg(targets, "rec")
    uid = put_user(clean)
    _flow(clean, targets)
    deliver_now(clean, cfg, [uid])
    rec.accounts.clear()  # someone deleted it at the target
    put_user(clean, uid, given="B")
    _flow(clean, targets)
    assert deliver_now(clean, cfg, [uid]).done == [uid]
    assert rec.by_hub_id(uid)["given"] == "B"


@pytest.mark.parametrize("n", [1])
def test_lease_excludes_a_second_delivery(clean: Engine, targets: list, rec, n: int) -> None:
    cfg = _cfg(targets, "rec")
    uid = put_user(clean)
    _flow(clean, targets)
    with clean.begin() as conn:
        conn.execute(
            sync_ledger.update().values(lease_owner="someone", lease_until=now() + timedelta(minutes=1))
        )
    assert deliver_now(clean, cfg, [uid]).not_due == [uid]
    assert rec.calls_for(uid) == 0
