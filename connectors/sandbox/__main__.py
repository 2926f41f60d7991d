"""``python -m connectors.sandbox [--port KIND=PORT ...] [--seed N]``: run the simulators until Ctrl-C."""

from __future__ import annotations

import argparse

from connectors.sandbox.runner import KINDS, serve


def main(argv: list[str] | None = None) -> int:
    """Start every simulator on loopback, print one ``kind url`` line each, and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m connectors.sandbox", description=__doc__)
    parser.add_argument("--port", action="append", default=[], metavar="KIND=PORT", help="fixed port")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault RNG")
    args = parser.parse_args(argv)
    ports = {}
    for item in args.port:
        kind, _, port = item.partition("=")
        if kind not in KINDS or not port.isdigit():
            parser.error(f"--port expects KIND=PORT with KIND one of {', '.join(KINDS)}")
        ports[kind] = int(port)
    return serve(ports, seed=args.seed)


if __name__ == "__main__":
    raise SystemExit(main())
