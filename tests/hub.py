"""Test helpers for the hub: a hub on a store, an HTTP client with a token, a live server on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from scim2_server.requests import ScimRequest
from sqlalchemy import Engine, event, select

from orchestrator.api import Hub, create_app
from orchestrator.auth import create_token
from orchestrator.db import make_engine, outbox
from orchestrator.scim import storage as scim_storage
from orchestrator.settings import Settings
from tests.conftest import create_pg_database, drop_pg_database

SCIM = "application/scim+json"
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
CUSTOMER = "urn:idhub:schemas:extension:customer:2.0:User"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def make_hub(url: str, **overrides: Any) -> tuple[FastAPI, Engine]:
    settings = Settings(database_url=url, **overrides)
    engine = make_engine(settings.database_url)
    return create_app(settings, engine), engine


@contextmanager
def hub_client(dialect: str, folder: Path, **overrides: Any) -> Iterator[tuple[TestClient, Engine]]:
    """A hub with an admin client on a new store of ``dialect`` (a fresh PostgreSQL database or a SQLite file
    in ``folder``), dropped afterwards."""
    url = f"sqlite:///{folder}/hub.db" if dialect == "sqlite" else create_pg_database()
    app, engine = make_hub(url, **overrides)
    try:
        yield client(app, engine), engine
    finally:
        engine.dispose()
        if dialect == "postgresql":
            drop_pg_database(url)


def client(
    app: FastAPI, engine: Engine, scopes: tuple[str, ...] = ("admin",), name: str = "test"
) -> TestClient:
    token = create_token(engine, name, list(scopes))
    return TestClient(app, headers={"Authorization": f"Bearer {token}", "Content-Type": SCIM})


def user(user_name: str, **extra: Any) -> dict[str, Any]:
    schemas = [USER_SCHEMA] + ([CUSTOMER] if CUSTOMER in extra else [])
    return {"schemas": schemas, "userName": user_name, **extra}


def patch(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [PATCH_SCHEMA], "Operations": list(operations)}


def serve_in_process(hub: Hub, token: str, method: str, path: str, body: Any = None, **headers: str) -> Any:
    """``Hub.serve`` of one SCIM request with ``token``, without HTTP: the ScimResponse."""
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    request = ScimRequest(
        method=method,
        base_url="http://hub/scim/v2",
        path=path,
        query={},
        headers=[("authorization", f"Bearer {token}"), ("content-type", SCIM), *headers.items()],
        body=raw,
    )
    return hub.serve(request)


class SentStatements:
    """Every statement a hub sends, through SQLAlchemy or on the driver's connection (``storage.on_driver``):
    (in a transaction?, its first word, its text). ``before_write`` is called once, just before the first
    write sent without a transaction (a WITH statement): another request can be served in that gap."""

    def __init__(self, hub: Hub, before_write: Callable[[], None] | None = None) -> None:
        self.engines = {hub.engine, hub.reader} - {None}
        self.sent: list[tuple[bool, str, str]] = []
        self.before_write = before_write
        self.on_driver = scim_storage.on_driver

    def _seen(self, in_transaction: bool, statement: str) -> None:
        self.sent.append((in_transaction, statement.split(None, 1)[0].upper(), statement))
        if self.before_write is not None and not in_transaction and statement.lstrip().startswith("WITH"):
            interfere, self.before_write = self.before_write, None
            interfere()

    def _record(self, conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self._seen(not conn.connection.dbapi_connection.autocommit, statement)

    def _driven(self, conn: Any, statement: Any, params: dict[str, Any]) -> Any:
        text, _ = scim_storage._driver_text(statement, conn.dialect)
        self._seen(not conn.connection.driver_connection.autocommit, text)
        return self.on_driver(conn, statement, params)

    def __enter__(self) -> SentStatements:
        for engine in self.engines:
            event.listen(engine, "before_cursor_execute", self._record)
        scim_storage.on_driver = self._driven  # type: ignore[assignment]
        return self

    def __exit__(self, *_: Any) -> None:
        scim_storage.on_driver = self.on_driver  # type: ignore[assignment]
        for engine in self.engines:
            event.remove(engine, "before_cursor_execute", self._record)


def events(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(select(outbox).order_by(outbox.c.seq)).all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a loopback port in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_http(url: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
