"""The ``idhub`` operations commands, run in-process through ``orchestrator.cli.main``: output, exit codes,
and bad input that is one line with exit code 2 and changes nothing."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update

from orchestrator import cli, logs
from orchestrator.admin import audit_log
from orchestrator.db import identities
from orchestrator.ledger import dead_letters, sync_ledger, target_state
from tests.admin.conftest import cfg_of, deliver, erase, flow, provision, put_customer, row, shop_customers

pytestmark = pytest.mark.usefixtures("cli_env")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse's own errors leave main() this way: the process exits with it
        code = int(exc.code or 0)
    finally:
        # ``idhub`` points logging at the stderr of the moment (this test's captured one): undo that.
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logs._Handler)]:
            root.removeHandler(handler)
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert (code, err) == (0, "")
    return json.loads(out)


def email_of(uid: str) -> str:
    return f"c-{uid[:8]}@example.test"


def test_status_counts_holds_quarantine_and_pending_erasures(clean: Engine, targets: list, capsys) -> None:
    ids = [put_customer(clean) for _ in range(3)]
    provision(clean, targets)
    erase(clean, ids[0])  # its deletion is not fanned out yet: the erasure is pending
    with clean.begin() as conn:  # the news target is down: quarantined after five failures
        conn.execute(
            update(target_state)
            .where(target_state.c.target == "news")
            .values(consecutive_failures=5, quarantined_until=func.now())
        )
    result = run_json(capsys, "status")
    shop, news = result["targets"]
    assert shop["counts"]["synced"] == 3
    assert shop["delivered_last_minute"] == 3
    assert shop["oldest_pending_seconds"] is None
    assert news["quarantined_until"] is not None
    assert news["consecutive_failures"] == 5
    assert [e["identity_id"] for e in result["erasures_pending"]] == [ids[0]]
    assert result["erasures_pending"][0]["targets"] == {"shop": "synced", "news": "synced"}

    code, out, err = run(capsys, "status", "--target", "shop")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TARGET", "SYNCED", "PENDING"]
    assert lines[1].split()[:3] == ["shop", "3", "0"]
    assert lines[1].split()[-1] == "ok"
    assert "erasures pending: 1" in out


def test_explain_shows_names_and_values_only_when_asked(clean: Engine, targets: list, capsys) -> None:
    uid = put_customer(clean, language="de")
    provision(clean, targets)
    code, out, err = run(capsys, "explain", uid)
    assert (code, err) == (0, "")
    assert "shop: upsert (in scope); in scope" in out
    assert (
        'news: none (never provisioned, out of scope); out of scope: fails preferredLanguage eq "en"' in out
    )
    assert "attributes: email, first_name, last_name, billing.first_name, billing.last_name" in out
    assert email_of(uid) not in out
    assert "Ann" not in out
    assert "ledger: synced" in out
    assert "ledger: no row" in out

    code, out, _ = run(capsys, "explain", email_of(uid), "--show-values")  # a userName works too
    assert code == 0
    assert email_of(uid) in out
    assert '"first_name": "Ann"' in out
    result = run_json(capsys, "explain", uid)
    assert result["targets"][0]["attributes"] == [
        "email",
        "first_name",
        "last_name",
        "billing.first_name",
        "billing.last_name",
    ]
    with clean.connect() as conn:
        audits = conn.execute(select(audit_log.c.action, audit_log.c.args).order_by(audit_log.c.id)).all()
    assert [a.action for a in audits] == ["explain"] * 3
    assert audits[1].args == {"user": uid, "show_values": True}
    assert all(actor.startswith("local:") for actor in _actors(clean))


def _actors(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(audit_log.c.actor)))


def test_sync_now_prints_each_step(clean: Engine, targets: list, sandboxes, capsys) -> None:
    uid = put_customer(clean)  # never fanned out: sync-now provisions it on demand
    code, out, err = run(capsys, "sync-now", uid, "--target", "shop")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "1. scope at shop: upsert (in scope)"
    assert (
        lines[1]
        == "2. mapped attributes: email, first_name, last_name, billing.first_name, billing.last_name"
    )
    [remote] = [c["id"] for c in shop_customers(sandboxes)]
    assert lines[2] == f"3.1 connector upsert: created, remote id {remote}"
    assert lines[3] == f"4. ledger: synced, synced v1 (upsert), remote id {remote}"
    assert email_of(uid) not in out

    put_customer(clean, uid, active=False)
    result = run_json(capsys, "sync-now", uid, "--target", "shop", "--show-values")
    assert result["decision"]["action"] == "deactivate"
    assert result["attributes"]["email"] == email_of(uid)
    assert result["calls"] == [
        {"call": "deprovision deactivate", "outcome": "deprovisioned", "remote_id": str(remote)}
    ]
    assert result["ledger"]["status"] == "deprovisioned"


def test_resync_now_and_dry_run(clean: Engine, targets: list, sandboxes, capsys) -> None:
    ids = [put_customer(clean) for _ in range(3)]
    code, out, err = run(capsys, "resync", "--target", "shop", "--dry-run")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "shop: would mark 0 due again, 3 new, 0 skipped"
    assert shop_customers(sandboxes) == []
    code, out, err = run(capsys, "resync", "--target", "shop", "--now")
    assert (code, err) == (0, "")
    assert "delivered: shop: done 3" in out
    assert len(shop_customers(sandboxes)) == 3
    assert {row(clean, "shop", i).status for i in ids} == {"synced"}
    result = run_json(capsys, "resync", "--user", ids[0], "--now")
    assert result["marked"] == {"shop": 1}
    assert result["created"] == {"news": 1}


def test_dead_letters_list_replay_discard(clean: Engine, targets: list, sandboxes, capsys) -> None:
    shop = cfg_of(targets, "shop")
    bad, worse = put_customer(clean), put_customer(clean)
    sim = sandboxes.servers["shop"].sim
    sim.faults.update({"reject_keys": [email_of(bad), email_of(worse)]})
    report = deliver(clean, shop, flow(clean, targets)["shop"])
    assert sorted(report.dead) == sorted([bad, worse])
    letters = run_json(capsys, "dlq", "list", "--target", "shop")
    assert sorted(d["identity_id"] for d in letters) == sorted([bad, worse])
    assert {d["error_code"] for d in letters} == {"registration-error-invalid-email"}
    code, out, _ = run(capsys, "dlq", "list")
    assert code == 0
    assert out.splitlines()[-1] == "2 dead letters"

    sim.faults.update({"reject_keys": []})
    first = next(d["id"] for d in letters if d["identity_id"] == bad)
    code, out, err = run(capsys, "dlq", "replay", "--id", str(first), "--now")
    assert (code, err) == (0, "")
    assert "delivered: shop: done 1" in out
    assert [c["email"] for c in shop_customers(sandboxes)] == [email_of(bad)]
    assert row(clean, "shop", bad).status == "synced"

    code, out, _ = run(capsys, "dlq", "discard", "--target", "shop")
    assert (code, out) == (0, "discarded 1 dead letters\n")
    with clean.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(dead_letters)) == 1  # the replayed one
    assert row(clean, "shop", worse).status == "dead"  # until a newer version re-arms it


def test_approve_and_reject(clean: Engine, targets: list, sandboxes, capsys, monkeypatch) -> None:
    monkeypatch.setenv("IDHUB_GUARD_MAX_COUNT", "2")
    shop = cfg_of(targets, "shop")
    ids = [put_customer(clean) for _ in range(6)]
    provision(clean, targets)
    for uid in ids[:3]:
        put_customer(clean, uid, active=False)
    assert len(deliver(clean, shop, flow(clean, targets)["shop"]).held) == 3
    result = run_json(capsys, "reject", "--target", "shop")
    assert sorted(result["rejected"]) == sorted(ids[:3])
    for uid in ids[3:]:
        erase(clean, uid)
    assert len(deliver(clean, shop, flow(clean, targets)["shop"]).held) == 3
    hold = run_json(capsys, "status", "--target", "shop")["targets"][0]["holds"][0]["id"]
    code, out, err = run(capsys, "approve", "--target", "shop", "--hold", str(hold), "--now")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"hold {hold} approved: 3 deprovisions released (delivered)",
        "delivered: shop: done 3",
    ]
    assert sorted(c["email"] for c in shop_customers(sandboxes)) == sorted(email_of(i) for i in ids[:3])


def _snapshot(engine: Engine) -> tuple[Any, ...]:
    with engine.connect() as conn:
        return (
            conn.execute(
                select(
                    sync_ledger.c.target,
                    sync_ledger.c.identity_id,
                    sync_ledger.c.status,
                    sync_ledger.c.updated_at,
                ).order_by(sync_ledger.c.target, sync_ledger.c.identity_id)
            ).all(),
            conn.scalar(select(func.count()).select_from(audit_log)),
            conn.scalar(select(func.count()).select_from(dead_letters)),
            conn.scalar(select(func.count()).select_from(identities)),
        )


BAD = [
    (["status", "--target", "nope"], "unknown target 'nope'"),
    (["resync", "--target", "nope"], "unknown target 'nope'"),
    (["resync", "--user", "nobody@example.test"], "unknown user 'nobody@example.test'"),
    (["resync", "--all", "--user", "{uid}"], "--all: not with --user or --target"),
    (["resync"], "give --user, --target or --all"),
    (["resync", "--all", "--dry-run", "--now"], "--dry-run: not with --now"),
    (["reconcile"], "the following arguments are required: --target"),
    (["reconcile", "--target", "nope", "--apply"], "unknown target 'nope'"),
    (["dlq", "replay", "--id", "999"], "unknown dead letter 999"),
    (["dlq", "replay", "--id", "1", "--all"], "give exactly one of --id, --target, --all"),
    (["dlq", "discard"], "give exactly one of --id, --target"),
    (["dlq", "list", "--target", "nope"], "unknown target 'nope'"),
    (["sync-now", "nobody", "--target", "shop"], "unknown user 'nobody'"),
    (["sync-now", "{uid}", "--target", "nope"], "unknown target 'nope'"),
    (["explain", "nobody"], "unknown user 'nobody'"),
    (["approve", "--target", "shop"], "target 'shop' has no open hold"),
    (["approve", "--target", "shop", "--hold", "abc"], "argument --hold: invalid int value: 'abc'"),
    (["reject", "--target", "nope"], "unknown target 'nope'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    clean: Engine, targets: list, capsys, argv: list[str], message: str
) -> None:
    uid = put_customer(clean)
    provision(clean, targets)
    before = _snapshot(clean)
    code, out, err = run(capsys, *(a.replace("{uid}", uid) for a in argv))
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert message in err
    assert _snapshot(clean) == before
