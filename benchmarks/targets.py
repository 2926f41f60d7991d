"""One sandbox simulator in a process of its own, with a recorder of when each record was applied.

``python -m benchmarks.targets KIND`` starts the simulator of KIND (``connectors.sandbox``) on a free loopback
port, prints one JSON line ``{"kind", "url", "root"}`` and serves until SIGTERM. Each simulator gets its own
process so that four targets are not served by one interpreter (one GIL) and the bare-script floor and idhub
meet the same servers.

The recorder sits in front of the simulator's routes. While it is on (``POST /_bench/record`` with
``{"on": true}``) it reads the body of every write, finds the benchmark's e-mail addresses in it, and keeps,
per address, the time the request was received and the time the simulator answered it with a 2xx: the
simulator's own clock, which is what the latency scenario compares with the hub's commit time. It also counts
requests and records always (``GET /_bench/stats``). ``GET /_bench/applied`` returns ``{email: [received,
answered]}``; ``POST /_bench/reset`` empties the recorder and resets the simulator.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from connectors.sandbox.core import SandboxServer, Simulator
from connectors.sandbox.runner import build_simulator

# Every customer the benchmark makes has an address in this domain (see benchmarks.world.customer).
EMAIL = re.compile(rb"[A-Za-z0-9._+-]+@bench\.example")
# Writes that only read: a lookup carries e-mails but applies nothing.
READ_PATHS = ("/batch/read", "/search")


def crm_limit() -> int:
    """Requests the CRM simulator takes in a rolling 10 s (BENCH_CRM_LIMIT). HubSpot allows 100 (Free,
    Starter), 190 (Professional, Enterprise) or 250 (with the API Limit Increase pack), 100 contacts a
    batch: at 190 no client at all moves more than 1,900 changes a second into it, short of the drain's goal
    of 2,000, so the benchmark's CRM is the largest account HubSpot sells."""
    return int(os.environ.get("BENCH_CRM_LIMIT") or 250)


class Recorder:
    """ASGI middleware: counts requests; while on, records when writes naming each address were applied."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.app = sim.app
        self.on = False
        self.lock = threading.Lock()
        self.applied: dict[str, list[float]] = {}
        self.requests = 0
        self.writes = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/_bench/"):
            await self.control(scope, receive, send)
            return
        if path.startswith("/_sandbox/"):
            await self.app(scope, receive, send)
            return
        received = time.time()
        with self.lock:
            self.requests += 1
        if scope["method"] == "GET" or not self.on or path.endswith(READ_PATHS):
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        keys = {m.decode().lower() for m in EMAIL.findall(body)}
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def timed(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] < 300:
                answered = time.time()
                with self.lock:
                    self.writes += 1
                    for key in keys:
                        self.applied.setdefault(key, [received, answered])
            await send(message)

        await self.app(scope, replay, timed)

    async def control(self, scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        response: Response
        if scope["path"] == "/_bench/record" and request.method == "POST":
            self.on = bool((await request.json()).get("on"))
            response = JSONResponse({"on": self.on})
        elif scope["path"] == "/_bench/applied":
            with self.lock:
                response = JSONResponse(dict(self.applied))
        elif scope["path"] == "/_bench/stats":
            with self.lock:
                response = JSONResponse(
                    {"requests": self.requests, "writes": self.writes, "recorded": len(self.applied)}
                )
        elif scope["path"] == "/_bench/reset" and request.method == "POST":
            with self.lock:
                self.applied.clear()
                self.requests = self.writes = 0
                self.on = False
            self.sim.reset()
            response = Response(status_code=204)
        else:
            response = JSONResponse({"error": "unknown"}, status_code=404)
        await response(scope, receive, send)


class _Recorded:
    """A simulator as SandboxServer sees it (name, base path, app), served through the recorder."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.name = sim.name
        self.base_path = sim.base_path
        self.app = Recorder(sim)


def main(argv: list[str]) -> int:
    kind = argv[0]
    options = {"rate_limit": crm_limit()} if kind == "crm" else {}
    server = SandboxServer(_Recorded(build_simulator(kind, **options))).start()  # type: ignore[arg-type]
    print(json.dumps({"kind": kind, "url": server.url, "root": server.root}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
