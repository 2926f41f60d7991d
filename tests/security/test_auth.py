"""Tokens and scopes at the hub's HTTP face: every route the app declares needs a token except the few
that are open on purpose; scopes hold for every write; a revoked token stops working within the
verifier's cache TTL; tokens are compared in constant time and never logged or listed."""

from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from scim2_server.routing import ROUTES, Operation

from orchestrator import auth, cli, logs, settings
from orchestrator.api import READ_OPERATIONS, SCIM_PREFIX
from orchestrator.auth import TokenVerifier, create_token, digest, revoke_token
from tests.hub import GROUP_SCHEMA, PATCH_SCHEMA, SCIM, patch, user
from tests.security.conftest import PgHub, assert_scim_error, fingerprint

BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
SEARCH = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
# Open without a token, on purpose: probes, this API's own description, and what RFC 7644 §4 says a
# client reads before it authenticates. ``/metrics`` needs a token with the metrics (or admin) scope.
OPEN = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
    ("GET", f"{SCIM_PREFIX}/ServiceProviderConfig"),
}


@pytest.fixture(scope="module")
def world(pg_hub: PgHub) -> dict[str, Any]:
    """Tokens of each scope, and a user and a group the requests name."""
    tokens = {
        scope: create_token(pg_hub.engine, f"auth-{scope}", [scope])
        for scope in ("scim:read", "scim:write", "admin")
    }
    c = TestClient(pg_hub.app, headers={"Authorization": f"Bearer {tokens['admin']}", "Content-Type": SCIM})
    uid = c.post("/scim/v2/Users", json=user("auth-user")).json()["id"]
    gid = c.post("/scim/v2/Groups", json={"schemas": [GROUP_SCHEMA], "displayName": "auth-group"}).json()[
        "id"
    ]
    return {"tokens": tokens, "user": uid, "group": gid}


def _body(operation: Operation, endpoint: str | None, world: dict[str, Any]) -> Any:
    """A body the operation would accept, so that only authorization can refuse it."""
    if operation is Operation.bulk:
        return {
            "schemas": [BULK],
            "Operations": [{"method": "POST", "path": "/Users", "data": user(_name())}],
        }
    if operation is Operation.search_with_body:
        return {"schemas": [SEARCH], "count": 1}
    if operation is Operation.patch:
        return patch(
            {"op": "replace", "path": "displayName" if endpoint == "Groups" else "title", "value": "x"}
        )
    if operation in (Operation.create, Operation.replace):
        if endpoint == "Groups":
            return {"schemas": [GROUP_SCHEMA], "displayName": _name()}
        return user(_name())
    return None


def _name() -> str:
    return f"auth-{uuid.uuid4().hex[:10]}"


def scim_requests(app: Any, world: dict[str, Any]) -> list[tuple[str, str, Operation | None, Any]]:
    """Every (method, path) the app serves: its FastAPI routes, and under the SCIM endpoint every route
    of scim2-server's routing table for every resource type the hub has, naming resources that exist."""
    hub = app.state.hub
    endpoints = [str(rt.endpoint).strip("/") for rt in hub.provider.resource_types]
    existing = {"Users": world["user"], "Groups": world["group"]}
    out: list[tuple[str, str, Operation | None, Any]] = []
    for route in app.routes:
        assert isinstance(route, APIRoute), route  # docs and redirects are off: nothing else is mounted
        assert not route.path.startswith(SCIM_PREFIX), route  # the SCIM endpoint sits before the routes
        out += [(m, route.path, None, None) for m in sorted(route.methods)]
    for r in ROUTES:
        for endpoint in endpoints if "{endpoint}" in r.pattern else [None]:
            path = r.pattern.replace("{endpoint}", endpoint or "")
            rid = existing.get(endpoint or "", "User" if "ResourceTypes" in path else "nope")
            path = path.replace("{resource_id}", rid)
            out.append((r.method, SCIM_PREFIX + path, r.operation, _body(r.operation, endpoint, world)))
    return out


def test_every_route_but_the_open_ones_needs_a_valid_token(pg_hub: PgHub, world: dict[str, Any]) -> None:
    requests = scim_requests(pg_hub.app, world)
    assert len(requests) > 30  # the table really was expanded
    anonymous = TestClient(pg_hub.app)
    admin = world["tokens"]["admin"]
    wrong = [
        None,
        "Bearer",
        "Bearer ",
        "Bearer idh_" + "x" * 43,  # well-formed, unknown
        f"Bearer {digest(admin)}",  # the stored hash is no credential
        f"Bearer {admin[:-1]}",
        f"Basic {base64.b64encode(f'{admin}:'.encode()).decode()}",
        f"Token {admin}",
        f"{admin}",
    ]
    before = fingerprint(pg_hub.engine)
    served_open = set()
    for method, path, _op, body in requests:
        for header in wrong:
            headers = {"Content-Type": SCIM} | ({"Authorization": header} if header is not None else {})
            r = anonymous.request(method, path, json=body, headers=headers)
            if (method, path) in OPEN:
                assert r.status_code == 200, (method, path)
                served_open.add((method, path))
                continue
            assert_scim_error(r, 401) if path.startswith(SCIM_PREFIX) else None
            assert r.status_code == 401, (method, path, header, r.status_code)
            assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), (method, path)
    assert served_open == OPEN  # each open route exists, and nothing else was open
    assert fingerprint(pg_hub.engine) == before
    # A query-string token is no credential either (and never reaches a log: see below).
    assert anonymous.get("/scim/v2/Users", params={"access_token": admin}).status_code == 401


def test_a_read_token_cannot_write_anywhere_and_a_write_token_can_read(
    pg_hub: PgHub, world: dict[str, Any]
) -> None:
    requests = [r for r in scim_requests(pg_hub.app, world) if r[2] is not None]
    by_scope = {
        scope: TestClient(pg_hub.app, headers={"Authorization": f"Bearer {token}", "Content-Type": SCIM})
        for scope, token in world["tokens"].items()
    }
    writes = [r for r in requests if r[2] not in READ_OPERATIONS and r[0] != "GET"]
    assert {r[2] for r in writes} >= {
        Operation.create,
        Operation.replace,
        Operation.patch,
        Operation.delete,
        Operation.bulk,
    }
    before = fingerprint(pg_hub.engine)
    for method, path, operation, body in writes:
        r = by_scope["scim:read"].request(method, path, json=body)
        if operation is Operation.bulk:
            # Bulk is authorized operation by operation (RFC 7644 §3.7): each one is refused.
            assert r.status_code == 200, r.text
            assert [op["status"] for op in r.json()["Operations"]] == ["403"]
        elif path.endswith("/Me"):
            assert r.status_code in (403, 501), r.text  # /Me is not implemented: refused either way
        else:
            assert_scim_error(r, 403)
    assert fingerprint(pg_hub.engine) == before
    # Reads, including the POST of .search, are the read scope's; write implies read; admin holds both.
    reads = [
        r for r in requests if r[2] in READ_OPERATIONS and "/Me" not in r[1] and r[1] != SCIM_PREFIX + "/"
    ]
    assert any(r[2] is Operation.search_with_body for r in reads)
    for scope in ("scim:read", "scim:write", "admin"):
        for method, path, _op, body in reads:
            r = by_scope[scope].request(method, path, json=body)
            # the root search (".search" across types) is not implemented: 501, after authorization
            assert r.status_code in (200, 501), (scope, method, path, r.text)
    r = by_scope["scim:write"].post("/scim/v2/Users", json=user(_name()))
    assert r.status_code == 201
    assert by_scope["scim:write"].delete(f"/scim/v2/Users/{r.json()['id']}").status_code == 204


def test_a_revoked_token_fails_within_the_cache_ttl(pg_hub: PgHub) -> None:
    name = _name()
    token = create_token(pg_hub.engine, name, ["scim:read"])
    c = TestClient(pg_hub.app, headers={"Authorization": f"Bearer {token}"})
    assert c.get("/scim/v2/Users", params={"count": 0}).status_code == 200  # now cached as valid
    ttl = pg_hub.app.state.hub.tokens.ttl
    revoke_token(pg_hub.engine, name)
    revoked_at = time.monotonic()
    while c.get("/scim/v2/Users", params={"count": 0}).status_code != 401:
        assert time.monotonic() - revoked_at < ttl + 0.5, "still accepted after the cache TTL"
        time.sleep(0.05)


def test_tokens_are_compared_in_constant_time(pg_hub: PgHub, monkeypatch: pytest.MonkeyPatch) -> None:
    token = create_token(pg_hub.engine, _name(), ["scim:read"])
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    verifier = TokenVerifier(pg_hub.engine)
    assert verifier.verify(token) is not None
    # The secret is compared through compare_digest, as digests (the token itself is never compared).
    assert calls == [(digest(token), digest(token))]
    same_length = token[:-1] + ("A" if token[-1] != "A" else "B")
    for wrong in (same_length, token + "x", token[:-5], token.upper(), digest(token), "idh_", "x" * 300):
        assert verifier.verify(wrong) is None, wrong
    assert TokenVerifier(pg_hub.engine).verify(token) is not None  # and a fresh cache still says yes


@pytest.fixture
def captured_logs() -> Iterator[Callable[[], str]]:
    """Everything logged, rendered (JSON, DEBUG) and as raw records, SQL statements included."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ["sqlalchemy", "sqlalchemy.engine", "httpx", "httpcore", "alembic", "idhub"]
    levels = {n: logging.getLogger(n).level for n in names}
    rendered = io.StringIO()
    logs.configure("json", "DEBUG", stream=rendered)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)  # statements, to show what a lookup holds
    raw: list[str] = []

    class Raw(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # The test's own HTTP client logs the URLs it calls; that is not the hub speaking.
            if not record.name.startswith("httpx"):
                raw.append(f"{record.msg!r} {record.args!r} {record.exc_text or ''}")

    root.addHandler(Raw(logging.DEBUG))
    yield lambda: rendered.getvalue() + "\n".join(raw)
    root.handlers[:] = handlers
    root.setLevel(level)
    for n, lvl in levels.items():
        logging.getLogger(n).setLevel(lvl)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_tokens_never_reach_a_log(pg_hub: PgHub, captured_logs: Callable[[], str]) -> None:
    name = _name()
    token = create_token(pg_hub.engine, name, ["scim:read"])
    secret = token.removeprefix(auth.PREFIX)
    c = TestClient(pg_hub.app)
    bearer = {"Authorization": f"Bearer {token}"}
    assert c.get("/scim/v2/Users", headers=bearer).status_code == 200
    assert (
        c.post("/scim/v2/Users", headers=bearer | {"Content-Type": SCIM}, json=user(_name())).status_code
        == 403
    )
    assert c.get("/scim/v2/Users", headers={"Authorization": f"Bearer {token}x"}).status_code == 401
    assert c.get("/scim/v2/Users", headers={"Authorization": f"Basic {token}"}).status_code == 401
    assert c.get("/scim/v2/Users", params={"access_token": token}).status_code == 401
    c.get("/scim/v2/Users/a%00b", headers=bearer)  # an unexpected error, logged with its traceback
    revoke_token(pg_hub.engine, name)
    TokenVerifier(pg_hub.engine).verify(token)
    text = captured_logs()
    assert "http request" in text  # the capture did see the requests
    assert "SELECT" in text  # and the SQL
    assert secret not in text


def _cli(
    args: list[str], url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    monkeypatch.setenv("IDHUB_DATABASE_URL", url)
    settings.get.cache_clear()
    try:
        assert cli.main(args) == 0
    finally:
        settings.get.cache_clear()
        structlog.reset_defaults()
    out = capsys.readouterr()
    return out.out + out.err


def test_token_list_shows_no_secret(
    pg_hub: PgHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        token = create_token(pg_hub.engine, _name(), ["scim:write"])
        for args in (["token", "list"], ["token", "list", "--json"]):
            shown = _cli(args, pg_hub.url, monkeypatch, capsys)
            assert "scim:write" in shown
            assert token.removeprefix(auth.PREFIX) not in shown
            assert digest(token) not in shown
        listed = json.loads(_cli(["token", "list", "--json"], pg_hub.url, monkeypatch, capsys))
        assert {key for entry in listed for key in entry} == {"name", "scopes", "created", "revoked"}
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_metrics_hold_no_personal_data(pg_hub: PgHub, world: dict[str, Any]) -> None:
    c = TestClient(
        pg_hub.app, headers={"Authorization": f"Bearer {world['tokens']['admin']}", "Content-Type": SCIM}
    )
    email = f"{_name()}@example.org"
    uid = c.post("/scim/v2/Users", json=user(_name(), emails=[{"value": email}])).json()["id"]
    c.patch(
        f"/scim/v2/Users/{uid}",
        json={"schemas": [PATCH_SCHEMA], "Operations": [{"op": "replace", "path": "title", "value": "x"}]},
    )
    scraper = TestClient(pg_hub.app)
    assert scraper.get("/metrics").status_code == 401
    read = {"Authorization": f"Bearer {world['tokens']['scim:read']}"}
    assert scraper.get("/metrics", headers=read).status_code == 403
    token = create_token(pg_hub.engine, f"prometheus-{_name()}", ["metrics"])
    scrape = scraper.get("/metrics", headers={"Authorization": f"Bearer {token}"}).text
    assert "idhub" in scrape
    for secret in (email, uid, world["tokens"]["admin"].removeprefix(auth.PREFIX)):
        assert secret not in scrape
