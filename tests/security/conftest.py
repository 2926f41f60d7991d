"""Fixtures of the security tests: a hub on its own PostgreSQL database, the SCIM error check, a store
fingerprint that tells whether a request changed anything."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, func, select

from orchestrator import db
from tests.conftest import create_pg_database, drop_pg_database
from tests.hub import make_hub

ERROR_URN = "urn:ietf:params:scim:api:messages:2.0:Error"
SCIM_TYPES = frozenset(
    {
        "invalidFilter",
        "tooMany",
        "uniqueness",
        "mutability",
        "invalidSyntax",
        "invalidPath",
        "noTarget",
        "invalidValue",
        "invalidVers",
        "sensitive",
    }
)


@dataclass
class PgHub:
    app: FastAPI
    engine: Engine
    url: str


@pytest.fixture(scope="module")
def pg_hub() -> Iterator[PgHub]:
    """The hub on a PostgreSQL database of this module, with the default limits."""
    url = create_pg_database("idhub_sec")
    app, engine = make_hub(url)
    yield PgHub(app, engine, url)
    engine.dispose()
    db.dispose_engines(url)  # the CLI opens its own engine on the URL
    drop_pg_database(url)


def scim_error_problems(status: int, headers: Any, body: bytes) -> list[str]:
    """What is wrong with an error response as RFC 7644 §3.12 defines it (empty when it is right)."""
    problems = []
    content_type = headers.get("content-type") or ""
    if isinstance(content_type, list):  # schemathesis keeps every value of a header
        content_type = ",".join(content_type)
    if not content_type.startswith("application/scim+json"):
        problems.append(f"content type {content_type!r}")
    try:
        doc = json.loads(body)
    except ValueError:
        return [*problems, "body is not JSON"]
    if not isinstance(doc, dict):
        return [*problems, "body is not an object"]
    if doc.get("schemas") != [ERROR_URN]:
        problems.append(f"schemas {doc.get('schemas')!r}")
    if doc.get("status") != str(status):
        problems.append(f"status {doc.get('status')!r} for HTTP {status}")
    if "scimType" in doc and doc["scimType"] not in SCIM_TYPES:
        problems.append(f"scimType {doc['scimType']!r}")
    if "detail" in doc and not isinstance(doc["detail"], str):
        problems.append("detail is not a string")
    return problems


def assert_scim_error(response: Any, status: int, scim_type: str | None = None) -> dict[str, Any]:
    """``response`` is the SCIM error ``status`` (with ``scim_type``); its body."""
    assert response.status_code == status, response.text
    assert scim_error_problems(status, response.headers, response.content) == []
    body: dict[str, Any] = response.json()
    if scim_type is not None:
        assert body.get("scimType") == scim_type, body
    return body


def fingerprint(engine: Engine) -> tuple[Any, ...]:
    """Counts, version sums and last changes of every table a SCIM request may write: equal means
    nothing was written."""
    o, i, g, m = db.outbox, db.identities, db.groups, db.group_members
    columns = (
        func.count(o.c.seq),
        func.max(o.c.seq),
        func.count(i.c.id),
        func.sum(i.c.version),
        func.max(i.c.updated_at),
        func.count(g.c.id),
        func.sum(g.c.version),
        func.max(g.c.updated_at),
        func.count(m.c.group_id),
    )
    query = select(*(select(c).scalar_subquery() for c in columns))
    with engine.connect() as conn:
        return tuple(conn.execute(query).one())


@dataclass
class Received:
    method: str
    host: str
    path: str
    headers: dict[str, str]
    body: bytes


class Recorder:
    """A loopback HTTP server that keeps every request it gets (raw) and answers ``status`` with ``{}``
    and ``headers``."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.status = 200
        self.headers: dict[str, str] = {}
        self.lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with recorder.lock:
                    recorder.requests.append(
                        Received(
                            self.command, self.headers.get("Host", ""), self.path, dict(self.headers), body
                        )
                    )
                self.send_response(recorder.status)
                for name, value in recorder.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.host}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()
