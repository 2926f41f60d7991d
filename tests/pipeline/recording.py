"""A loopback HTTP "recording target" with fault controls, and the test connector that speaks to it.

The server is real HTTP on 127.0.0.1 (a thread in the test process); worker subprocesses reach it over the
network. The connector is found by the registry through an entry point the tests put on the path.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

from connectors.base import Connector, ConnectorSettings, DeprovisionAction, Record, Result
from connectors.errors import GoneError
from connectors.http import make_client, send


@dataclass
class Faults:
    script: list[tuple[int, float | None]] = field(default_factory=list)  # (status, retry_after) per request
    delay: float = 0.0
    down: bool = False
    reject: set[str] = field(default_factory=set)  # hub ids answered with 400


class RecordingTarget:
    """Accounts by id, every request recorded, faults on demand."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accounts: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, hub id
        self.faults = Faults()
        self.in_flight = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self.lock:
            self.accounts.clear()
            self.requests.clear()
            self.faults = Faults()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def by_hub_id(self, hub_id: str) -> dict[str, Any] | None:
        with self.lock:
            found = [a for a in self.accounts.values() if a.get("hub_id") == hub_id]
        assert len(found) <= 1, "duplicate remote accounts"
        return found[0] if found else None

    def calls_for(self, hub_id: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r[2] == hub_id)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        target = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any = None, headers: Mapping[str, str] | None = None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                url = urlparse(self.path)
                hub_id = body.get("hub_id") or self.headers.get("X-Hub-Id")
                with target.lock:
                    faults = target.faults
                    target.requests.append((self.command, url.path, hub_id))
                    scripted = faults.script.pop(0) if faults.script else None
                target.in_flight.set()
                if faults.delay:
                    time.sleep(faults.delay)
                if faults.down:
                    return self._reply(503, {"code": "down"})
                if scripted is not None:
                    status, retry_after = scripted
                    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
                    return self._reply(status, {"code": "scripted"}, headers)
                if hub_id in faults.reject:
                    return self._reply(400, {"code": "invalid_record"})
                self._route(url.path, parse_qs(url.query), body)

            def _route(self, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> None:
                parts = [p for p in path.split("/") if p]
                with target.lock:
                    if parts == ["health"]:
                        return self._reply(200, {})
                    if parts == ["accounts"] and self.command == "GET":
                        email = query.get("email", [""])[0]
                        hit = [i for i, a in target.accounts.items() if a.get("email") == email]
                        return (
                            self._reply(200, {"id": hit[0]}) if hit else self._reply(404, {"code": "absent"})
                        )
                    if parts == ["accounts"] and self.command == "POST":
                        dup = [i for i, a in target.accounts.items() if a.get("email") == body.get("email")]
                        if dup:
                            return self._reply(409, {"code": "exists", "id": dup[0]})
                        new_id = uuid.uuid4().hex
                        target.accounts[new_id] = body
                        return self._reply(201, {"id": new_id})
                    if len(parts) == 2 and parts[0] == "accounts":
                        if parts[1] not in target.accounts:
                            return self._reply(404, {"code": "absent"})
                        if self.command == "PUT":
                            target.accounts[parts[1]] = body
                            return self._reply(200, {"id": parts[1]})
                        if self.command == "DELETE":
                            del target.accounts[parts[1]]
                            return self._reply(204)
                    return self._reply(400, {"code": "bad_route"})

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        return Handler


class RecordingConnector(Connector):
    """Creates with POST, updates with PUT, deactivates with PUT active=false, deletes with DELETE."""

    kind = "recording"
    default_mapping: ClassVar[Mapping[str, str]] = {
        "email": "userName",
        "given": "name.givenName",
        "active": "active",
    }
    match_field = "email"

    def __init__(self, settings: ConnectorSettings) -> None:
        self.client = make_client(settings)

    def _body(self, record: Record, **extra: Any) -> dict[str, Any]:
        return {**record.attributes, "hub_id": record.identity_id, "version": record.version, **extra}

    def upsert(self, record: Record) -> Result:
        if record.remote_id is None and record.match_key:
            found = self.find(record.match_key)
            if found is not None:
                record = Record(
                    record.identity_id, record.version, record.attributes, found, record.match_key
                )
        if record.remote_id is None:
            created = send(self.client, "POST", "/accounts", json=self._body(record))
            return Result(created.json()["id"], "created")
        send(self.client, "PUT", f"/accounts/{record.remote_id}", json=self._body(record))
        return Result(record.remote_id, "updated")

    def deprovision(self, record: Record, action: DeprovisionAction) -> Result:
        headers = {"X-Hub-Id": record.identity_id}
        if record.remote_id is None:
            return Result(None, "absent")
        if action in (DeprovisionAction.DELETE, DeprovisionAction.ERASE):
            try:
                send(self.client, "DELETE", f"/accounts/{record.remote_id}", headers=headers)
            except GoneError:
                return Result(None, "absent")
            return Result(None, "deprovisioned")
        body = self._body(record, active=False)
        send(self.client, "PUT", f"/accounts/{record.remote_id}", json=body)
        return Result(record.remote_id, "deprovisioned")

    def find(self, match_key: str) -> str | None:
        response = send(self.client, "GET", "/accounts", params={"email": match_key}, expect=(404,))
        return None if response.status_code == 404 else str(response.json()["id"])

    def probe(self) -> None:
        send(self.client, "GET", "/health")

    def close(self) -> None:
        self.client.close()
