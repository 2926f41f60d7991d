"""``idhub gdpr``: erase a customer (Art. 17), print an erasure receipt, export a customer's data (Art. 15),
list pending erasures and purge expired privacy records. See register()."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

from sqlalchemy.engine import Engine

from connectors.base import Connector
from orchestrator import gdpr, migrations, settings
from orchestrator.db import engine_for
from orchestrator.targets import TargetConfig, TargetConfigError, connector_settings, load_targets


def _fail(message: str) -> Exception:
    from orchestrator.cli import CliError  # the command's own error type; cli imports this module first

    return CliError(message)


def _engine() -> Engine:
    engine = engine_for(settings.get().database_url, custom_plans=True)
    migrations.upgrade(engine)
    return engine


def _targets() -> list[TargetConfig]:
    path = settings.get().targets_file
    if path is None:
        return []
    try:
        return load_targets(path)
    except TargetConfigError as exc:
        raise _fail(str(exc)) from None


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"[:128]
    except Exception:  # no login name in a bare container
        return "cli"


def _print(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=False, default=str))


def cmd_erase(args: argparse.Namespace) -> int:
    try:
        identity_id, new = gdpr.erase(_engine(), args.user, actor=_actor())
    except LookupError:
        raise _fail("no such identity (already purged, or never known)") from None
    state = "erasure requested" if new else "erasure already requested"
    print(f"{identity_id} {state}; follow it with: idhub gdpr receipt {identity_id}")
    return 0


def cmd_receipt(args: argparse.Namespace) -> int:
    try:
        _print(gdpr.receipt(_engine(), args.identity_id))
    except LookupError:
        raise _fail(f"no erasure is known for {args.identity_id}") from None
    return 0


def _connector(cfg: TargetConfig) -> Connector | None:
    from connectors.registry import build

    try:
        return build(cfg.connector, connector_settings(cfg))
    except Exception:  # a missing token or plugin: the export says the target could not be read
        return None


def cmd_export(args: argparse.Namespace) -> int:
    built: list[Connector] = []

    def connector_for(cfg: TargetConfig) -> Connector | None:
        connector = _connector(cfg)
        if connector is not None:
            built.append(connector)
        return connector

    try:
        doc = gdpr.export(_engine(), args.user, _targets(), connector_for)
    except LookupError:
        raise _fail("no such identity (already purged, or never known)") from None
    finally:
        for connector in built:
            connector.close()
    text = json.dumps(doc, indent=2, default=str) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return 0
    # The export holds the customer's personal data: readable by its owner only.
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_pending(args: argparse.Namespace) -> int:
    _print(gdpr.pending_erasures(_engine()))
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    _print(gdpr.purge_expired(_engine()))
    return 0


def register(sub: Any) -> None:
    """Add ``idhub gdpr`` and its actions to the ``idhub`` parser's sub-parsers."""
    p = sub.add_parser("gdpr", help="privacy: erasure, receipts, access exports, retention")
    g = p.add_subparsers(dest="gdpr_command", required=True, metavar="ACTION")
    c = g.add_parser("erase", help="erase a customer as a SCIM DELETE does and deprovision every target")
    c.add_argument("user", help="identity id, userName or primary e-mail")
    c.set_defaults(func=cmd_erase)
    c = g.add_parser("receipt", help="the erasure receipt of an identity id, as JSON (no personal data)")
    c.add_argument("identity_id")
    c.set_defaults(func=cmd_receipt)
    c = g.add_parser("export", help="everything held about a customer, hub and targets, as JSON")
    c.add_argument("user", help="identity id, userName or primary e-mail")
    c.add_argument("--out", help="write to this file (mode 600) instead of standard output")
    c.set_defaults(func=cmd_export)
    g.add_parser("pending", help="erasures not finished yet, as JSON").set_defaults(func=cmd_pending)
    c = g.add_parser("purge-expired", help="delete receipts and audit rows past their retention now")
    c.set_defaults(func=cmd_purge)
