"""``idhub`` operations sub-commands: status, resync, reconcile, dlq, sync-now, explain, approve, reject.

Each runs its action here and now (``orchestrator.admin``), as the local OS user (written to the audit log),
prints a human summary or ``--json``, and shows a counter on stderr for long work when stderr is a terminal.
Deliveries a command makes due go to the broker, or with ``--now`` are sent from this process. A bad
request (unknown target, user, dead letter or hold; conflicting options) prints one line and exits 2 having
changed nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from sqlalchemy.engine import Engine

from connectors.base import Connector
from orchestrator import admin, migrations, settings, sync
from orchestrator.db import engine_for
from orchestrator.targets import TargetConfig, connector_settings, load_targets

Command = Callable[[argparse.Namespace], int]


# -------------------------------------------------------------------------------------------- plumbing


@dataclass
class _Ctx:
    """What every command works with: the migrated store, the targets, who runs it."""

    engine: Engine
    targets: list[TargetConfig]
    actor: str

    @classmethod
    def load(cls) -> _Ctx:
        cfg = settings.get()
        engine = engine_for(cfg.database_url, custom_plans=True)
        migrations.upgrade(engine)
        targets = load_targets(cfg.targets_file) if cfg.targets_file is not None else []
        return cls(engine, targets, admin.local_actor())

    def target(self, name: str) -> TargetConfig:
        return admin.target_named(self.targets, name)

    def connector(self, cfg: TargetConfig) -> Connector:
        from connectors.registry import build

        return build(cfg.connector, connector_settings(cfg))


class _Counter:
    """``label: n`` rewritten in place on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, total: int | None = None) -> None:
        self.label = label
        self.total = total
        self.shown = False

    def __call__(self, done: int) -> None:
        if not sys.stderr.isatty():
            return
        of = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\r{self.label}: {done}{of}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _enqueue(due: Mapping[str, Sequence[str]]) -> None:
    """Send deliveries to the broker (the worker layer sits above the core: imported only when used)."""
    importlib.import_module("workers.admin_tasks").enqueue(due)


def _deliver(ctx: _Ctx, due: Mapping[str, Sequence[str]]) -> dict[str, dict[str, int]]:
    """Deliver what is due from this process, target by target, in the target's batch size."""
    out: dict[str, dict[str, int]] = {}
    for name, ids in due.items():
        cfg = ctx.target(name)
        connector = ctx.connector(cfg)
        counter = _Counter(f"delivering to {name}", len(ids))
        tally = out.setdefault(name, {})
        try:
            for start in range(0, len(ids), cfg.batch_size):
                chunk = list(ids[start : start + cfg.batch_size])
                report = sync.deliver(ctx.engine, cfg, connector, chunk, owner=admin._owner())
                for key in ("done", "unchanged", "retrying", "dead", "held", "not_due"):
                    tally[key] = tally.get(key, 0) + len(getattr(report, key))
                counter(start + len(chunk))
        finally:
            counter.close()
            connector.close()
    return out


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _guarded(command: Command) -> Command:
    """Run a command; a bad request is one line on stderr and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except admin.AdminError as exc:
            print(f"idhub: {exc}", file=sys.stderr)
            return 2

    return run


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse report a bad option as one line (``idhub resync: ...``), exit code 2."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: {message}\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


def _tally(counts: Mapping[str, Mapping[str, int]]) -> str:
    return "; ".join(f"{t}: " + ", ".join(f"{k} {v}" for k, v in c.items() if v) for t, c in counts.items())


# -------------------------------------------------------------------------------------------- commands


def cmd_status(args: argparse.Namespace) -> int:
    ctx = _Ctx.load()
    if args.target is not None:
        ctx.target(args.target)
    result = admin.status(ctx.engine, ctx.targets, only=args.target)
    if args.json:
        _print_json(result)
        return 0
    cols = ("synced", "pending", "retrying", "held", "dead", "out_of_scope", "deprovisioned")
    print(
        f"{'TARGET':<16}"
        + "".join(f"{c.upper():>{len(c) + 2}}" for c in cols)
        + f"{'OLDEST':>9}{'LAST MIN':>10}  STATE"
    )
    for t in result["targets"]:
        age = t["oldest_pending_seconds"]
        state = "disabled" if t["disabled"] else ("quarantined" if t["quarantined_until"] else "ok")
        print(
            f"{t['target']:<16}"
            + "".join(f"{t['counts'][c]:>{len(c) + 2}}" for c in cols)
            + f"{(f'{age:.0f}s' if age is not None else '-'):>9}{t['delivered_last_minute']:>10}  {state}"
        )
        if t["open_dead_letters"]:
            print(f"  {t['open_dead_letters']} dead letters: idhub dlq list --target {t['target']}")
        for h in t["holds"]:
            decide = f"idhub approve|reject --target {t['target']} --hold {h['id']}"
            print(f"  hold {h['id']}: {h['held']} held ({h['reason']}): {decide}")
    pending = result["erasures_pending"]
    print(f"erasures pending: {len(pending)}")
    for e in pending:
        where = " ".join(f"{k}={v}" for k, v in sorted(e["targets"].items()))
        print(f"  {e['identity_id']}  deleted {e['deleted_at']}  {where}")
    return 0


def cmd_resync(args: argparse.Namespace) -> int:
    if args.dry_run and args.now:
        raise admin.AdminError("--dry-run: not with --now")
    ctx = _Ctx.load()
    chosen = admin.resync_scope(ctx.targets, user=args.user, target=args.target, every=args.all)
    users = [admin.find_user(ctx.engine, args.user)] if args.user is not None else None
    connectors = {cfg.name: ctx.connector(cfg) for cfg in chosen} if args.now else None
    counter = _Counter("identities")
    try:
        report = admin.resync(
            ctx.engine,
            chosen,
            actor=ctx.actor,
            user_ids=users,
            dry_run=args.dry_run,
            enqueue=None if args.dry_run or args.now else _enqueue,
            connectors=connectors,
            progress=counter,
        )
    finally:
        counter.close()
        for c in (connectors or {}).values():
            c.close()
    if args.json:
        _print_json(report.as_dict())
        return 0
    verb = "would mark" if args.dry_run else "marked"
    for name in report.targets:
        line = f"{name}: {verb} {report.marked.get(name, 0)} due again, {report.created.get(name, 0)} new"
        line += f", {report.skipped.get(name, 0)} skipped"
        if name in report.enqueued:
            line += f", {report.enqueued[name]} enqueued"
        print(line)
    if report.delivered:
        print("delivered: " + _tally(report.delivered))
    print(f"{report.identities} identities in {report.batches} batches")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    ctx = _Ctx.load()
    cfg = ctx.target(args.target)
    connector = ctx.connector(cfg)
    counter = _Counter(f"listing {cfg.name}")
    try:
        report = admin.reconcile(
            ctx.engine,
            cfg,
            connector,
            actor=ctx.actor,
            apply=args.apply,
            enqueue=None if args.now else _enqueue,
            deliver_now=args.now,
            progress=counter,
        )
    finally:
        counter.close()
        connector.close()
    if args.json:
        _print_json(report.as_dict())
        return 0
    print(f"{cfg.name}: {report.listed} accounts listed, {report.compared} hub identities compared")
    print(f"missing: {len(report.missing)}")
    for i in report.missing:
        print(f"  {i}")
    print(f"orphaned: {len(report.orphaned)}")
    for o in report.orphaned:
        print(f"  remote {o['remote_id']}  {o['reason']}  {o['identity_id'] or ''}".rstrip())
    print(f"differing: {len(report.differing)}")
    for d in report.differing:
        print(f"  {d['identity_id']}  remote {d['remote_id']}  {', '.join(d['fields'])}")
    if report.held:
        print(f"held for approval (not judged): {report.held}")
    if args.apply:
        print("applied: " + ", ".join(f"{k} {v}" for k, v in report.applied.items()))
    return 0


def cmd_dlq_list(args: argparse.Namespace) -> int:
    ctx = _Ctx.load()
    if args.target is not None:
        ctx.target(args.target)
    letters = admin.dlq_list(ctx.engine, target=args.target)
    if args.json:
        _print_json(letters)
        return 0
    for d in letters:
        print(
            f"{d['id']:>6}  {d['target']:<12} {d['identity_id']}  v{d['version']}  "
            f"{d['error_code']}: {d['error_message']}  ({d['attempts']} attempts, {d['created_at']})"
        )
    print(f"{len(letters)} dead letters")
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    ctx = _Ctx.load()
    if args.target is not None:
        ctx.target(args.target)
    due = admin.dlq_replay(
        ctx.engine,
        actor=ctx.actor,
        letter_id=args.id,
        target=args.target,
        every=args.all,
        enqueue=None if args.now else _enqueue,
    )
    delivered = _deliver(ctx, due) if args.now else {}
    if args.json:
        _print_json({"replayed": due, "delivered": delivered})
        return 0
    print(f"replayed {sum(len(i) for i in due.values())} records" + (" (enqueued)" if not args.now else ""))
    if delivered:
        print("delivered: " + _tally(delivered))
    return 0


def cmd_dlq_discard(args: argparse.Namespace) -> int:
    ctx = _Ctx.load()
    if args.target is not None:
        ctx.target(args.target)
    count = admin.dlq_discard(ctx.engine, actor=ctx.actor, letter_id=args.id, target=args.target)
    if args.json:
        _print_json({"discarded": count})
    else:
        print(f"discarded {count} dead letters")
    return 0


def cmd_sync_now(args: argparse.Namespace) -> int:
    ctx = _Ctx.load()
    cfg = ctx.target(args.target)
    user = admin.find_user(ctx.engine, args.user)
    connector = ctx.connector(cfg)
    try:
        result = admin.sync_now(
            ctx.engine, cfg, connector, user, actor=ctx.actor, show_values=args.show_values
        )
    finally:
        connector.close()
    ledger = result["ledger"] or {}
    ok = ledger.get("status") in ("synced", "deprovisioned", "out_of_scope")
    if args.json:
        _print_json(result)
        return 0 if ok else 1
    d = result["decision"]
    print(f"1. scope at {cfg.name}: {d['action']} ({d['reason']})")
    print(f"2. mapped attributes: {_attributes(result['attributes'])}")
    if not result["calls"]:
        print("3. connector: not called (nothing to change)")
    for n, call in enumerate(result["calls"], start=1):
        answer = (
            f"{call['outcome']}, remote id {call['remote_id']}"
            if "outcome" in call
            else f"error {call['error']}: {call['message']}"
        )
        print(f"3.{n} connector {call['call']}: {answer}")
    synced = f"synced v{ledger.get('synced_version')} ({ledger.get('synced_action')})"
    print(
        f"4. ledger: {ledger.get('status')}, {synced}, remote id {ledger.get('remote_id')}"
        + (f", last error {ledger['last_error_code']}" if ledger.get("last_error_code") else "")
    )
    return 0 if ok else 1


def _attributes(attributes: Any) -> str:
    if isinstance(attributes, list):
        return ", ".join(attributes) or "(none)"
    return json.dumps(attributes, sort_keys=True, default=str)


def cmd_explain(args: argparse.Namespace) -> int:
    ctx = _Ctx.load()
    user = admin.find_user(ctx.engine, args.user)
    result = admin.explain(ctx.engine, ctx.targets, user, show_values=args.show_values)
    admin.audit(ctx.engine, ctx.actor, "explain", {"user": user, "show_values": args.show_values})
    if args.json:
        _print_json(result)
        return 0
    ident = result["identity"]
    state = "deleted" if ident["deleted"] else ("active" if ident["active"] else "inactive")
    print(f"identity {ident['id']} v{ident['version']} ({state})")
    for t in result["targets"]:
        scope = "in scope" if t["in_scope"] else "out of scope"
        if t["failing_scope_term"]:
            scope += f": fails {t['failing_scope_term']}"
        print(f"{t['target']}: {t['action']} ({t['reason']}); {scope}")
        print(f"  attributes: {_attributes(t['attributes'])}")
        row = t["ledger"]
        if row is None:
            print("  ledger: no row")
        else:
            print(
                f"  ledger: {row['status']}, desired v{row['desired_version']} {row['desired_action']}, "
                f"synced v{row['synced_version']} {row['synced_action']}, remote id {row['remote_id']}"
                + (f", last error {row['last_error_code']}" if row["last_error_code"] else "")
            )
        if t["hold"] is not None:
            print(f"  hold {t['hold']['id']}: {t['hold']['action']} {t['hold']['state']}")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    ctx = _Ctx.load()
    cfg = ctx.target(args.target)
    decision = admin.approve(
        ctx.engine, cfg, actor=ctx.actor, hold_id=args.hold, enqueue=None if args.now else _enqueue
    )
    delivered = _deliver(ctx, {cfg.name: decision.released}) if args.now and decision.released else {}
    if args.json:
        _print_json({"hold": decision.hold_id, "released": decision.released, "delivered": delivered})
        return 0
    how = "delivered" if args.now else "enqueued"
    print(f"hold {decision.hold_id} approved: {len(decision.released)} deprovisions released ({how})")
    if delivered:
        print("delivered: " + _tally(delivered))
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    ctx = _Ctx.load()
    cfg = ctx.target(args.target)
    decision = admin.reject(ctx.engine, cfg, actor=ctx.actor, hold_id=args.hold)
    if args.json:
        _print_json({"hold": decision.hold_id, "rejected": decision.rejected, "kept": decision.kept})
        return 0
    print(f"hold {decision.hold_id}: {len(decision.rejected)} deprovisions rejected; the accounts stay")
    if decision.kept:
        print(f"{len(decision.kept)} erasures stay held: an erasure cannot be rejected, only approved")
    return 0


# ------------------------------------------------------------------------------------------ the parser


def register(sub: Any) -> None:
    """Add the operations sub-commands to the ``idhub`` parser's sub-parsers."""

    def add(name: str, command: Command, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        p = _one_line_errors(parent.add_parser(name, help=help, description=help))
        p.set_defaults(func=_guarded(command))
        return p

    p = add("status", cmd_status, "per-target sync state, holds, quarantine and pending erasures")
    p.add_argument("--target", metavar="T")
    p.add_argument("--json", action="store_true")

    p = add("resync", cmd_resync, "push the current state again (one user, one target, or everything)")
    p.add_argument("--user", metavar="ID", help="an identity id or userName")
    p.add_argument("--target", metavar="T")
    p.add_argument("--all", action="store_true", help="every user at every target")
    p.add_argument("--dry-run", action="store_true", help="count what would be marked; change nothing")
    p.add_argument("--now", action="store_true", help="deliver from this process instead of the workers")
    p.add_argument("--json", action="store_true")

    p = add("reconcile", cmd_reconcile, "compare a target's accounts with the hub (report; --apply repairs)")
    p.add_argument("--target", metavar="T", required=True)
    p.add_argument("--apply", action="store_true", help="resync missing/differing, remove orphans by policy")
    p.add_argument("--now", action="store_true", help="with --apply: deliver from this process")
    p.add_argument("--json", action="store_true")

    dlq = add("dlq", _no_action, "dead letters: list, replay, discard")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    p = add("list", cmd_dlq_list, "dead letters not replayed yet", dsub)
    p.add_argument("--target", metavar="T")
    p.add_argument("--json", action="store_true")
    p = add("replay", cmd_dlq_replay, "push the current state of dead-lettered records again", dsub)
    p.add_argument("--id", type=int, metavar="N")
    p.add_argument("--target", metavar="T")
    p.add_argument("--all", action="store_true")
    p.add_argument("--now", action="store_true", help="deliver from this process instead of the workers")
    p.add_argument("--json", action="store_true")
    p = add("discard", cmd_dlq_discard, "drop dead letters (their records stay dead)", dsub)
    p.add_argument("--id", type=int, metavar="N")
    p.add_argument("--target", metavar="T")
    p.add_argument("--json", action="store_true")

    p = add("sync-now", cmd_sync_now, "provision one user at one target now, showing each step")
    p.add_argument("user", metavar="USER", help="an identity id or userName")
    p.add_argument("--target", metavar="T", required=True)
    p.add_argument("--show-values", action="store_true", help="print the mapped values (personal data)")
    p.add_argument("--json", action="store_true")

    p = add("explain", cmd_explain, "why a user is or is not at each target, and what it would get")
    p.add_argument("user", metavar="USER", help="an identity id or userName")
    p.add_argument("--show-values", action="store_true", help="print the mapped values (personal data)")
    p.add_argument("--json", action="store_true")

    p = add("approve", cmd_approve, "release a held mass deprovisioning")
    p.add_argument("--target", metavar="T", required=True)
    p.add_argument("--hold", type=int, metavar="ID", help="default: the target's open hold")
    p.add_argument("--now", action="store_true", help="deliver from this process instead of the workers")
    p.add_argument("--json", action="store_true")

    p = add("reject", cmd_reject, "drop a held mass deprovisioning (the accounts stay)")
    p.add_argument("--target", metavar="T", required=True)
    p.add_argument("--hold", type=int, metavar="ID", help="default: the target's open hold")
    p.add_argument("--json", action="store_true")


def _no_action(args: argparse.Namespace) -> int:  # pragma: no cover - argparse requires an ACTION
    raise admin.AdminError("give an action")


__all__ = ["register"]
