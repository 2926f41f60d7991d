"""One sandbox simulator in a process of its own: ``python -m tests.chaos.target KIND SEED``.

It prints one JSON line ``{"url", "root"}`` and serves until SIGTERM. SIGUSR1 stops it listening (every
connection is refused, the target is down), SIGUSR2 starts it again on the same port with its accounts kept.
Fault knobs go through the simulator's own ``POST /_sandbox/faults``.
"""

from __future__ import annotations

import json
import queue
import signal
import sys

from connectors.sandbox.core import SandboxServer
from connectors.sandbox.runner import build_simulator


def main(argv: list[str]) -> int:
    kind, seed = argv[0], int(argv[1]) if len(argv) > 1 else 0
    server = SandboxServer(build_simulator(kind, seed=seed)).start()
    print(json.dumps({"url": server.url, "root": server.root}), flush=True)
    # Handlers only queue the request: stopping and starting uvicorn belongs to the main thread.
    orders: queue.Queue[str] = queue.Queue()
    signal.signal(signal.SIGUSR1, lambda *_: orders.put("down"))
    signal.signal(signal.SIGUSR2, lambda *_: orders.put("up"))
    signal.signal(signal.SIGTERM, lambda *_: orders.put("exit"))
    signal.signal(signal.SIGINT, lambda *_: orders.put("exit"))
    while True:
        order = orders.get()
        if order == "down":
            server.stop()
        elif order == "up":
            server.start()
        else:
            server.stop()
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
