"""``python -m tests.chaos [--changes N] [--small] ...``: one chaos run; prints its JSON report, exits 1 on
a miss."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import fields
from pathlib import Path

from tests.chaos.run import Config, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--small", action="store_true", help="the size that runs in make test")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (logs) even when all is well"
    )
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--report", type=Path, help="also write the JSON report to this file")
    for f in fields(Config):
        kind = (
            float if f.type in ("float", "float | None") else int if f.type in ("int", "int | None") else str
        )
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    config = Config.small(**overrides) if args.small else Config(**overrides)
    # SIGTERM unwinds like Ctrl-C, so every process the run started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=False)
    report = run(config, work=args.work, keep=args.keep)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
