"""Checks that the services the suite talks to answer, and says in one line which does not."""

from __future__ import annotations

import os
import socket
import sys

PG_URL = os.environ.get("IDHUB_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("IDHUB_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def main() -> int:
    missing = [
        f"{name} on {host}:{port}"
        for name, host, port in (("PostgreSQL", "127.0.0.1", 5432), ("Redis", "127.0.0.1", 6379))
        if not _reachable(host, port)
    ]
    if missing:
        print(f"make test: cannot reach {', '.join(missing)}; start it (see .ci/run) and try again.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
