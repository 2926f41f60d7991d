"""What every simulator shares: fault knobs, the request log, the read-back endpoints and a server thread.

A simulator subclasses ``Simulator``: it keeps its accounts in memory (guarded by ``self.lock``), lists its
routes, says how its target spells an error body (``error``), and calls ``self.rejected(key)`` where its
target validates a record. ``Simulator.app`` wraps the routes in the fault layer and adds:

    GET  /_sandbox/faults     the current knobs
    POST /_sandbox/faults     JSON knobs, merged into the current ones; answers the full set (400 on unknown)
    GET  /_sandbox/state      every stored account (``snapshot()``)
    GET  /_sandbox/requests   the request log: method, path (no query), status, received (Unix seconds)
    POST /_sandbox/reset      empty state and log, knobs back to their start values, RNG reseeded

``/_sandbox/*`` is never faulted, authenticated or logged. A connection-refused outage is a stopped server:
``SandboxServer.stop()`` then ``start()`` again (it keeps its port).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class JsonResponse(JSONResponse):
    """Starlette's JSONResponse encoded by orjson: the simulators share the benchmark's two cores with idhub,
    and the stdlib encoder was up to a third of a simulator's CPU."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def copied(value: Any) -> Any:
    """A deep copy of a JSON value (what a target hands out is never its stored object)."""
    return orjson.loads(orjson.dumps(value))


@dataclass
class Faults:
    """The knobs; every simulator honours all of them."""

    latency_ms: float = 0.0  # added to every request
    error_rate: float = 0.0  # share of requests answered 500 or 503
    timeout_rate: float = 0.0  # share held open until the client gives up (at most hang_s), then 504
    burst_429: int = 0  # the next N requests get 429
    retry_after: float | None = 1.0  # Retry-After sent with burst_429 answers; None sends none
    outage: bool = False  # 503 for everything
    gone: bool = False  # 410 for everything (a webhook endpoint switched off)
    reject_keys: list[str] = field(default_factory=list)  # matching keys (e-mails) always refused with 400
    rate_limit: int | None = None  # at most this many requests per rate_window_s, then 429
    rate_window_s: float = 10.0
    hang_s: float = 30.0

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply knob changes; ValueError names an unknown knob or a value of the wrong kind."""
        known = {f.name: f for f in dataclasses.fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown fault knob {name!r}")
            if name == "reject_keys":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError("reject_keys must be a list of strings")
                value = [v.lower() for v in value]
            elif name in ("outage", "gone"):
                value = bool(value)
            elif name in ("burst_429",):
                value = int(value)
            elif name in ("retry_after", "rate_limit") and value is None:
                pass
            elif name == "rate_limit":
                value = int(value)
            else:
                value = float(value)
            setattr(self, name, value)


class ApiError(Exception):
    """Raised inside a handler to answer with a ready (target-shaped) error response."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def now_iso() -> str:
    """The current UTC time the way the targets print it (ISO 8601, seconds, ``+00:00``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


class Simulator:
    """One target's API in memory, with fault knobs and read-back; subclasses add state and routes."""

    name: ClassVar[str]
    base_path: ClassVar[str] = ""  # what a connector's base URL ends with ("/3.0", "/wp-json/wc/v3")

    def __init__(self, *, seed: int = 0, max_concurrent: int | None = None, **faults: Any) -> None:
        self.lock = threading.RLock()
        self.seed = seed
        self.max_concurrent = max_concurrent
        self._initial_faults = dict(faults)
        self.faults = Faults()
        self.faults.update(faults)
        self.rng = random.Random(seed)  # noqa: S311 - reproducible faults, not secrets
        self.log: list[dict[str, Any]] = []
        self.inflight = 0
        self.window: deque[float] = deque()
        self.reset_state()
        self._app: Starlette | None = None

    # -- what a subclass provides -------------------------------------------------------------------
    def reset_state(self) -> None:
        """Forget every account."""

    def snapshot(self) -> Any:
        """Every stored account, JSON-ready."""
        raise NotImplementedError

    def routes(self) -> Sequence[BaseRoute]:
        raise NotImplementedError

    def error(self, status: int, reason: str, detail: str = "") -> Response:
        """The target's error body for ``status``; ``reason`` is a short code (rate_limited, gone...)."""
        raise NotImplementedError

    def authorized(self, request: Request) -> bool:
        """Whether the request carries the target's credentials."""
        return True

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        """Headers the target adds to every answer (rate-limit counters)."""
        return []

    # -- helpers for subclasses ---------------------------------------------------------------------
    def rejected(self, key: str | None) -> bool:
        """Whether ``key`` (an e-mail) is one the ``reject_keys`` knob refuses."""
        return key is not None and key.lower() in self.faults.reject_keys

    async def json_body(self, request: Request) -> Any:
        """The request's JSON body, or a target-shaped 400."""
        try:
            return orjson.loads(await request.body())
        except ValueError as exc:
            raise ApiError(self.error(400, "bad_json", "The request body is not valid JSON.")) from exc

    # -- machinery ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty state and log, knobs back to their start values, RNG reseeded."""
        with self.lock:
            self.faults = Faults()
            self.faults.update(self._initial_faults)
            self.rng = random.Random(self.seed)  # noqa: S311 - reproducible faults
            self.log.clear()
            self.window.clear()
            self.reset_state()

    @property
    def app(self) -> Starlette:
        """The ASGI app: the target's routes behind the fault layer, plus ``/_sandbox/*``."""
        if self._app is None:
            app = Starlette(
                routes=[*self._sandbox_routes(), *self.routes()],
                exception_handlers={ApiError: self._api_error},
            )
            app.add_middleware(_FaultMiddleware, sim=self)
            self._app = app
        return self._app

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response

    def _sandbox_routes(self) -> list[BaseRoute]:
        async def get_faults(request: Request) -> Response:
            with self.lock:
                return JsonResponse(dataclasses.asdict(self.faults))

        async def set_faults(request: Request) -> Response:
            try:
                changes = await request.json()
                if not isinstance(changes, dict):
                    raise ValueError("a JSON object of knobs is expected")
                with self.lock:
                    self.faults.update(changes)
                    return JsonResponse(dataclasses.asdict(self.faults))
            except (ValueError, TypeError) as exc:
                return JsonResponse({"error": str(exc)}, status_code=400)

        async def state(request: Request) -> Response:
            with self.lock:
                return JsonResponse(self.snapshot())

        async def requests(request: Request) -> Response:
            with self.lock:
                return JsonResponse([dict(e) for e in self.log])

        async def reset(request: Request) -> Response:
            self.reset()
            return Response(status_code=204)

        return [
            Route("/_sandbox/faults", get_faults, methods=["GET"]),
            Route("/_sandbox/faults", set_faults, methods=["POST"]),
            Route("/_sandbox/state", state, methods=["GET"]),
            Route("/_sandbox/requests", requests, methods=["GET"]),
            Route("/_sandbox/reset", reset, methods=["POST"]),
        ]

    def decide(self, request: Request) -> tuple[float, Response | str | None]:
        """Under the lock: the latency to add and a fault answer, ``"hang"``, or None to serve normally."""
        f = self.faults
        latency = f.latency_ms / 1000.0
        if f.gone:
            return latency, self.error(410, "gone", "This endpoint is disabled.")
        if f.outage:
            return latency, self.error(503, "unavailable", "The service is unavailable.")
        if self.max_concurrent is not None and self.inflight > self.max_concurrent:
            return latency, self.error(429, "too_many_connections", "Too many simultaneous connections.")
        if not self.authorized(request):
            return latency, self.error(401, "unauthorized", "The credentials are missing or invalid.")
        if f.rate_limit is not None:
            now = time.monotonic()
            while self.window and self.window[0] <= now - f.rate_window_s:
                self.window.popleft()
            if len(self.window) >= f.rate_limit:
                return latency, self.error(429, "rate_limited", "The rate limit was reached.")
            self.window.append(now)
        if f.burst_429 > 0:
            f.burst_429 -= 1
            response = self.error(429, "rate_limited", "Too many requests.")
            if f.retry_after is not None:
                response.headers["Retry-After"] = f"{f.retry_after:g}"
            return latency, response
        if f.timeout_rate > 0 and self.rng.random() < f.timeout_rate:
            return latency, "hang"
        if f.error_rate > 0 and self.rng.random() < f.error_rate:
            status = self.rng.choice((500, 503))
            return latency, self.error(status, "server_error", "An unexpected error occurred.")
        return latency, None


class _FaultMiddleware:
    """Logs each target request and answers it from the knobs before the routes see it."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], sim: Simulator) -> None:
        self.app = app
        self.sim = sim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_sandbox/"):
            await self.app(scope, receive, send)
            return
        sim = self.sim
        entry: dict[str, Any] = {
            "method": scope["method"],
            "path": scope["path"],
            "status": None,
            "received": time.time(),
        }

        async def logged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), *sim.extra_headers()]
            await send(message)

        with sim.lock:
            sim.log.append(entry)
            sim.inflight += 1
            latency, decision = sim.decide(Request(scope))
        try:
            if latency:
                await asyncio.sleep(latency)
            if decision == "hang":
                await _hold_until_disconnect(receive, sim.faults.hang_s)
                decision = sim.error(504, "timeout", "The request timed out.")
            if isinstance(decision, Response):
                await decision(scope, receive, logged_send)
            else:
                await self.app(scope, receive, logged_send)
        finally:
            with sim.lock:
                sim.inflight -= 1


async def _hold_until_disconnect(receive: Receive, limit: float) -> None:
    # Read the body first: only then does the server report the client's disconnect.
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = bool(message.get("more_body"))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(receive(), limit)


class SandboxServer:
    """One simulator served by uvicorn on loopback in a background thread."""

    def __init__(self, sim: Simulator, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sim = sim
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def root(self) -> str:
        """``http://host:port`` (where ``/_sandbox/*`` lives)."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL a connector is configured with."""
        return self.root + self.sim.base_path

    def start(self, timeout: float = 10.0) -> SandboxServer:
        """Listen (on the port of the last run, if any) and return once the server accepts connections."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.sim.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"sandbox-{self.sim.name}", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"sandbox {self.sim.name} did not start")
            time.sleep(0.01)
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop listening (connections are refused until ``start`` again)."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None
