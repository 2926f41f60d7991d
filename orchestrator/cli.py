"""The ``idhub`` command. Every failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Only what every command needs: the others import theirs when they run (see ``main``).
from orchestrator import logs, settings


class CliError(Exception):
    """A user mistake or an unavailable dependency; the message is the one line shown."""


def _engine() -> Any:
    from orchestrator import migrations
    from orchestrator.db import engine_for

    engine = engine_for(settings.get().database_url)
    migrations.upgrade(engine)
    return engine


def cmd_serve(args: argparse.Namespace) -> int:
    # granian, not uvicorn: under uvicorn the first worker to wake accepted every connection waiting, so
    # keep-alive clients that connect together (a Bulk loader, a connection pool) often all stayed on one
    # process while the others idled. granian's workers share them more evenly and parse HTTP outside the GIL.
    from granian import Granian
    from granian.constants import Interfaces
    from granian.log import LogLevels

    engine = _engine()  # migrated once, before any worker starts
    workers = args.workers
    if workers is None:
        # One per CPU: with two, the processes took turns on the same cores, and a filtered GET cost 0.95
        # instead of 0.74 ms of CPU and waited longer (p99 at 16 clients 28 to 33 ms against 13 to 19).
        workers = (os.cpu_count() or 1) if engine.dialect.name == "postgresql" else 1
    engine.dispose()
    server = Granian(
        "orchestrator.api:app_from_env",
        factory=True,
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,
        workers=workers,
        websockets=False,
        respawn_failed_workers=True,
        # A worker told to stop while it was still starting never stops by itself: stopped the hard way.
        workers_kill_timeout=_STOP_SECONDS,
        log_level=LogLevels.warning,
        log_dictconfig=_SERVER_LOGGING,
    )
    try:
        server.serve()
    except RuntimeError as exc:  # a taken port, an address not ours...: granian's first line says which
        raise CliError(f"cannot serve on {args.host}:{args.port}: {str(exc).splitlines()[0]}") from None
    return 0


# Long enough for any request to finish (a full Bulk takes a few seconds), short of an orchestrator's 30 s.
_STOP_SECONDS = 10


# No handlers of granian's own: its lines reach the root logger, formatted and redacted as ours.
_SERVER_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {
        "_granian": {"handlers": [], "propagate": True},
        "granian.access": {"handlers": [], "propagate": True},
    },
}


def cmd_db_upgrade(_: argparse.Namespace) -> int:
    from orchestrator import migrations
    from orchestrator.db import engine_for

    engine = engine_for(settings.get().database_url)
    migrations.upgrade(engine)
    print(f"schema at revision {migrations.current(engine)}")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from orchestrator.auth import create_token

    token = create_token(_engine(), args.name, args.scope or [])
    print(token)
    print("Keep it now: only its hash is stored.", file=sys.stderr)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from orchestrator.auth import list_tokens

    tokens = list_tokens(_engine())
    if args.json:
        print(json.dumps(tokens, indent=2))
        return 0
    for t in tokens:
        state = f"revoked {t['revoked']}" if t["revoked"] else "active"
        print(f"{t['name']:<24} {' '.join(t['scopes']):<28} {state}")  # type: ignore[arg-type]
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from orchestrator.auth import revoke_token

    revoke_token(_engine(), args.name)
    print(f"revoked {args.name}")
    return 0


def _celery(*argv: str) -> int:
    """Run a Celery command on the hub's app; exec'd so signals reach Celery directly."""
    celery = shutil.which("celery", path=os.path.dirname(sys.executable)) or shutil.which("celery")
    if celery is None:
        raise CliError("the celery command is not installed")
    os.execv(celery, [celery, "-A", "workers", *argv])  # noqa: S606 - fixed program, argv from our parser
    return 0  # pragma: no cover


def all_queues() -> str:
    """Every queue of this installation: fan-out, admin, and one per configured target."""
    from orchestrator.targets import load_targets

    path = settings.get().targets_file
    names = [cfg.name for cfg in load_targets(path)] if path is not None else []
    return ",".join(["fanout", "admin", *(f"target.{name}" for name in names)])


def cmd_worker(args: argparse.Namespace) -> int:
    argv = ["worker", "--loglevel", args.loglevel, "-Q", args.queues or all_queues()]
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    return _celery(*argv)


def cmd_beat(args: argparse.Namespace) -> int:
    Path(args.schedule).parent.mkdir(parents=True, exist_ok=True)
    return _celery("beat", "--loglevel", args.loglevel, "--schedule", args.schedule)


def cmd_flower(args: argparse.Namespace) -> int:
    return _celery("flower", f"--port={args.port}", f"--address={args.host}")


def _delegate(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A sub-command implemented above the core (workers, sandbox); imported only when run."""

    def run(args: argparse.Namespace) -> int:
        result: int = getattr(importlib.import_module(module), function)(args)
        return result

    return run


def _kind_port(text: str) -> tuple[str, int]:
    kind, _, port = text.partition("=")
    if not kind or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected KIND=PORT, got {text!r}")
    return kind, int(port)


def build_parser() -> argparse.ArgumentParser:
    from orchestrator import admin_cli, gdpr_cli
    from orchestrator.auth import SCOPES

    parser = argparse.ArgumentParser(prog="idhub", description="Customer-identity sync hub.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the SCIM API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server processes, each serving one request at a time (default: one per CPU on PostgreSQL, "
        "one on SQLite, which allows no more)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("db", help="database schema")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    dbsub.add_parser("upgrade", help="apply migrations").set_defaults(func=cmd_db_upgrade)

    p = sub.add_parser("token", help="API tokens")
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    c = tsub.add_parser("create", help="create a token and print it once")
    c.add_argument("name")
    c.add_argument("--scope", action="append", choices=sorted(SCOPES), required=True)
    c.set_defaults(func=cmd_token_create)
    c = tsub.add_parser("list", help="list tokens (never the tokens themselves)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_token_list)
    c = tsub.add_parser("revoke", help="revoke a token by name")
    c.add_argument("name")
    c.set_defaults(func=cmd_token_revoke)

    p = sub.add_parser("worker", help="run a Celery worker")
    p.add_argument("--queues", "-Q", help="comma-separated queues (default: all)")
    p.add_argument("--concurrency", "-c", type=int)
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("beat", help="run the periodic scheduler (sweeper, probes); run exactly one")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--schedule", default=".idhub/celerybeat-schedule", help="beat's state file")
    p.set_defaults(func=cmd_beat)

    p = sub.add_parser("flower", help="run Flower against the configured broker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5555)
    p.set_defaults(func=cmd_flower)

    _add_relay(sub)

    p = sub.add_parser("sandbox", help="run the target simulators on loopback")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--port", action="append", default=[], metavar="KIND=PORT", type=_kind_port, dest="port_pairs"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the simulators' fault randomness")
    p.set_defaults(ports=None)
    p.set_defaults(func=_delegate("connectors.sandbox.runner", "cli_main"))

    admin_cli.register(sub)
    gdpr_cli.register(sub)
    return parser


def _add_relay(sub: Any) -> None:
    p = sub.add_parser("relay", help="move outbox events onto the broker")
    p.add_argument("--once", action="store_true", help="publish what is pending and exit")
    p.set_defaults(func=_delegate("workers.relay", "main"))


def _one_line_errors() -> tuple[type[Exception], ...]:
    from orchestrator.auth import TokenError

    return (CliError, TokenError)


def _config_errors() -> tuple[type[Exception], ...]:
    from orchestrator.targets import TargetConfigError

    return (TargetConfigError,)


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["relay"]:
        # Parsed without the other commands, whose modules (SCIM models, targets, connectors) were 0.5 s of a
        # relay's start: a relay started on a backlog is on its critical path from its first moment.
        parser = argparse.ArgumentParser(prog="idhub")
        _add_relay(parser.add_subparsers(dest="command", required=True))
    else:
        parser = build_parser()
    args = parser.parse_args(given)
    if getattr(args, "port_pairs", None):
        args.ports = dict(args.port_pairs)
    try:
        logs.configure_from_settings()
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except settings.SettingsError as exc:
        print(exc.line, file=sys.stderr)
    except _one_line_errors() as exc:
        print(f"idhub: {exc}", file=sys.stderr)
    except _config_errors() as exc:
        print(str(exc), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
