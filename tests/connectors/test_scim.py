"""ScimConnector against a real, independent SCIM server (scim2-server in a subprocess) and loopback stubs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.base import ConnectorSettings, DeprovisionAction, Record, Result
from connectors.errors import GoneError, PermanentError, RetryableError
from connectors.scim import CUSTOMER_SCHEMA, ScimConnector, escape
from orchestrator.scim.schemas import CustomerUser

TOKEN = "test-token"
SCIM_JSON = {"Content-Type": "application/scim+json"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def scim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The root URL of a scim2-server serving the customer extension; each tenant path is a fresh store."""
    import scim2_server

    resources = Path(scim2_server.__file__).parent / "resources"
    schemas = json.loads((resources / "default-schemas.json").read_text())
    schemas.append(CustomerUser.to_schema().model_dump(mode="json", exclude_none=True))
    types = json.loads((resources / "default-resource-types.json").read_text())
    types[0]["schemaExtensions"].append({"schema": CUSTOMER_SCHEMA, "required": False})
    folder = tmp_path_factory.mktemp("scim")
    (folder / "schemas.json").write_text(json.dumps(schemas))
    (folder / "types.json").write_text(json.dumps(types))
    port = _free_port()
    command = [sys.executable, "-c", "from scim2_server.testserver.cli import main; main()"]
    command += ["--hostname", "127.0.0.1", "--port", str(port), "--bearer-token", TOKEN, "--dynamic-tenants"]
    command += ["--schema", str(folder / "schemas.json"), "--resource-type", str(folder / "types.json")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"{root}/ready/v2/ServiceProviderConfig", timeout=1)
            break
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("scim2-server did not start")
            time.sleep(0.05)
    yield root
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def base(scim_server: str) -> str:
    """The service root of a fresh, empty tenant."""
    return f"{scim_server}/t{uuid.uuid4().hex[:12]}/v2"


@pytest.fixture
def admin(base: str) -> Iterator[httpx.Client]:
    """A plain client to look at (and tamper with) the target behind the connector's back."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5) as client:
        yield client


def connector(url: str, token: str | None = TOKEN, **options: Any) -> ScimConnector:
    return ScimConnector(ConnectorSettings(name="app", url=url, token=token, timeout=5, options=options))


@pytest.fixture
def scim(base: str) -> Iterator[ScimConnector]:
    conn = connector(base)
    yield conn
    conn.close()


def record(identity_id: str | None = None, remote_id: str | None = None, **attrs: Any) -> Record:
    identity_id = identity_id or uuid.uuid4().hex
    user = attrs.pop("userName", f"user-{identity_id[:8]}")
    attributes = {
        "userName": user,
        "name": {"givenName": "Ada", "familyName": "Lovelace"},
        "displayName": "Ada Lovelace",
        "emails": [{"value": f"{user}@example.com", "primary": True}],
        "active": True,
        CUSTOMER_SCHEMA: {"customerNumber": "C-1", "loyalty": {"tier": "gold", "points": 10}},
    } | attrs
    return Record(identity_id, 1, attributes, remote_id=remote_id, match_key=user)


def users(admin: httpx.Client) -> list[dict[str, Any]]:
    return list(admin.get("/Users", params={"count": 1000}).json().get("Resources") or [])


def test_create_then_updates_never_duplicate(scim: ScimConnector, admin: httpx.Client) -> None:
    rec = record()
    created = scim.upsert(rec)
    assert created.outcome == "created"
    assert created.remote_id
    held = scim.read(created.remote_id)
    assert held is not None
    assert (held["userName"], held["externalId"], held["name"]["familyName"]) == (
        rec.match_key,
        rec.identity_id,
        "Lovelace",
    )
    assert held[CUSTOMER_SCHEMA]["loyalty"] == {"tier": "gold", "points": 10}

    again = scim.upsert(rec)  # a redelivery before the ledger learnt the remote id
    assert (again.remote_id, again.outcome) == (created.remote_id, "adopted")
    changed = record(rec.identity_id, created.remote_id, userName=rec.match_key, displayName="Countess")
    assert scim.upsert(changed) == Result(created.remote_id, "updated")
    assert [u["id"] for u in users(admin)] == [created.remote_id]
    assert users(admin)[0]["displayName"] == "Countess"


def test_adopts_an_account_created_directly_at_the_target(scim: ScimConnector, admin: httpx.Client) -> None:
    rec = record()
    direct = admin.post(
        "/Users",
        json={
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": str(rec.match_key).upper(),
        },
        headers=SCIM_JSON,
    )
    assert direct.status_code == 201
    result = scim.upsert(rec)
    assert (result.remote_id, result.outcome) == (direct.json()["id"], "adopted")
    assert [u["externalId"] for u in users(admin)] == [rec.identity_id]


def test_adopts_by_external_id_when_the_username_changed(scim: ScimConnector, admin: httpx.Client) -> None:
    rec = record()
    first = scim.upsert(rec)
    renamed = record(rec.identity_id, userName="renamed-" + rec.identity_id[:6])
    assert scim.upsert(renamed) == Result(first.remote_id, "adopted")
    assert [u["userName"] for u in users(admin)] == [renamed.match_key]


def test_adopts_on_409_when_the_account_appears_between_lookup_and_create(
    base: str, admin: httpx.Client
) -> None:
    rec = record()
    raced = {"done": False}

    def someone_else_creates_it(response: httpx.Response) -> None:
        if response.request.method == "GET" and not raced["done"] and "filter" in response.request.url.params:
            raced["done"] = True
            body = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": rec.match_key}
            assert admin.post("/Users", json=body, headers=SCIM_JSON).status_code == 201

    scim = connector(base)
    scim.client.event_hooks["response"].append(someone_else_creates_it)
    statuses: list[int] = []
    scim.client.event_hooks["response"].append(lambda r: statuses.append(r.status_code))
    result = scim.upsert(rec)
    assert result.outcome == "adopted"
    assert 409 in statuses
    assert len(users(admin)) == 1
    scim.close()


def test_patch_keeps_unmapped_attributes_and_put_replaces_the_resource(
    base: str, admin: httpx.Client
) -> None:
    patching, putting = connector(base), connector(base, update_method="put")
    rec = record()
    remote_id = patching.upsert(rec).remote_id
    assert remote_id
    ops = {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "add", "path": "title", "value": "Engineer"}],
    }
    assert admin.patch(f"/Users/{remote_id}", json=ops, headers=SCIM_JSON).status_code in (200, 204)

    patching.upsert(record(rec.identity_id, remote_id, userName=rec.match_key, displayName="Patched"))
    held = admin.get(f"/Users/{remote_id}").json()
    assert (held["displayName"], held.get("title")) == ("Patched", "Engineer")

    putting.upsert(record(rec.identity_id, remote_id, userName=rec.match_key, displayName="Put"))
    held = admin.get(f"/Users/{remote_id}").json()
    assert (held["displayName"], held.get("title")) == ("Put", None)
    patching.close()
    putting.close()


def test_a_none_value_removes_the_attribute(scim: ScimConnector, admin: httpx.Client) -> None:
    rec = record()
    remote_id = scim.upsert(rec).remote_id
    cleared = record(
        rec.identity_id,
        remote_id,
        userName=rec.match_key,
        displayName=None,
        **{CUSTOMER_SCHEMA: {"customerNumber": "C-2", "loyalty": None}},
    )
    scim.upsert(cleared)
    held = admin.get(f"/Users/{remote_id}").json()
    assert "displayName" not in held
    assert held[CUSTOMER_SCHEMA] == {"customerNumber": "C-2"}


def test_stale_etag_is_re_read_once_and_the_update_lands(scim: ScimConnector, admin: httpx.Client) -> None:
    assert scim.provider_config().etag
    rec = record()
    remote_id = scim.upsert(rec).remote_id
    ops = {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "replace", "path": "nickName", "value": "x"}],
    }
    admin.patch(f"/Users/{remote_id}", json=ops, headers=SCIM_JSON)  # the version moves on behind our back
    seen: list[tuple[str, int, str | None]] = []
    scim.client.event_hooks["response"].append(
        lambda r: seen.append((r.request.method, r.status_code, r.request.headers.get("If-Match")))
    )
    assert (
        scim.upsert(record(rec.identity_id, remote_id, userName=rec.match_key, locale="en")).outcome
        == "updated"
    )
    assert [s[:2] for s in seen] == [("PATCH", 412), ("GET", 200), ("PATCH", 204)]
    assert all(s[2] for s in seen if s[0] == "PATCH")
    assert admin.get(f"/Users/{remote_id}").json()["locale"] == "en"


def test_deactivate(scim: ScimConnector, admin: httpx.Client) -> None:
    rec = record()
    remote_id = scim.upsert(rec).remote_id
    result = scim.deprovision(record(rec.identity_id, remote_id), DeprovisionAction.DEACTIVATE)
    assert (result.remote_id, result.outcome) == (remote_id, "deprovisioned")
    assert admin.get(f"/Users/{remote_id}").json()["active"] is False


@pytest.mark.parametrize("action", [DeprovisionAction.DELETE, DeprovisionAction.ERASE])
def test_delete_and_erase_remove_the_account(
    scim: ScimConnector, admin: httpx.Client, action: DeprovisionAction
) -> None:
    rec = record()
    remote_id = scim.upsert(rec).remote_id
    tombstone = Record(rec.identity_id, 2, {}, remote_id=remote_id, match_key=None)
    assert scim.deprovision(tombstone, action).outcome == "deprovisioned"
    assert admin.get(f"/Users/{remote_id}").status_code == 404
    assert scim.read(str(remote_id)) is None
    assert scim.deprovision(tombstone, action).outcome == "absent"
    unknown = Record(uuid.uuid4().hex, 1, {}, match_key="nobody")
    assert scim.deprovision(unknown, action) == Result(None, "absent")


def test_deprovision_finds_the_account_without_a_remote_id(scim: ScimConnector, admin: httpx.Client) -> None:
    rec = record()
    remote_id = scim.upsert(rec).remote_id
    tombstone = Record(rec.identity_id, 2, {}, match_key=None)  # found by externalId
    assert scim.deprovision(tombstone, DeprovisionAction.DELETE) == Result(
        remote_id, "deprovisioned", "delete"
    )
    assert users(admin) == []


def test_anonymize_strips_personal_data(scim: ScimConnector, admin: httpx.Client) -> None:
    rec = record()
    remote_id = scim.upsert(rec).remote_id
    assert (
        scim.deprovision(
            Record(rec.identity_id, 2, {}, remote_id=remote_id), DeprovisionAction.ANONYMIZE
        ).outcome
        == "deprovisioned"
    )
    held = admin.get(f"/Users/{remote_id}").json()
    assert held["userName"] == f"anon-{rec.identity_id}"
    for gone in ("name", "displayName", "emails", CUSTOMER_SCHEMA):
        assert gone not in held
    assert str(rec.match_key) not in json.dumps(held)


def test_update_of_a_deleted_account_is_gone(scim: ScimConnector, admin: httpx.Client) -> None:
    rec = record()
    remote_id = scim.upsert(rec).remote_id
    assert admin.delete(f"/Users/{remote_id}").status_code == 204
    with pytest.raises(GoneError):
        scim.upsert(record(rec.identity_id, remote_id, userName=rec.match_key))
    with pytest.raises(GoneError):
        connector(scim.settings.url, update_method="put").upsert(record(rec.identity_id, remote_id))


def test_bulk_upsert_many(scim: ScimConnector, admin: httpx.Client) -> None:
    assert scim.supports_batch
    existing = record()
    existing_id = scim.upsert(existing).remote_id
    direct = admin.post(
        "/Users",
        json={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "made-by-hand"},
        headers=SCIM_JSON,
    ).json()["id"]
    gone = record()
    gone_id = scim.upsert(gone).remote_id
    admin.delete(f"/Users/{gone_id}")
    fresh = [record() for _ in range(4)]
    batch = [
        *fresh,
        record(existing.identity_id, existing_id, userName=existing.match_key, displayName="Bulk"),
        record(userName="made-by-hand"),
        record(gone.identity_id, gone_id, userName=gone.match_key),
        record(userName="bad", emails=[{"value": 42}], active="not-a-bool"),
    ]
    requests: list[str] = []
    scim.client.event_hooks["request"].append(lambda r: requests.append(f"{r.method} {r.url.path}"))
    out = scim.upsert_many(batch)
    assert [r.outcome for r in out[:6] if isinstance(r, Result)] == ["created"] * 4 + ["updated", "adopted"]
    assert out[5] == Result(direct, "adopted")
    assert isinstance(out[6], GoneError)
    assert isinstance(out[7], PermanentError)
    assert sum(1 for r in requests if r.endswith("/Bulk")) == 1
    held = {u["userName"]: u for u in users(admin)}
    assert len(held) == 6  # 4 fresh + existing + made-by-hand; nothing duplicated
    assert held[str(existing.match_key)]["displayName"] == "Bulk"
    assert held["made-by-hand"]["externalId"] == batch[5].identity_id


def test_list_accounts_pages_by_start_index(base: str) -> None:
    scim = connector(base, page_size=2)
    made = {scim.upsert(record()).remote_id for _ in range(5)}
    pages, cursor, seen = 0, None, []
    while True:
        page = scim.list_accounts(cursor)
        pages += 1
        seen += [a.remote_id for a in page.accounts]
        assert all(a.external_id and a.match_key for a in page.accounts)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert (pages, set(seen), len(seen)) == (3, made, 5)
    assert connector(f"{base}").list_accounts("99").accounts == []
    scim.close()


def test_groups_with_members(scim: ScimConnector, admin: httpx.Client) -> None:
    a, b = (scim.upsert(record()).remote_id for _ in range(2))
    assert a
    assert b
    created = scim.upsert_group("g-1", "Gold customers", [a, b])
    assert created.outcome == "created"
    gid = str(created.remote_id)
    members = {m["value"] for m in admin.get(f"/Groups/{gid}").json()["members"]}
    assert members == {a, b}
    assert scim.upsert_group("g-1", "Gold", [b], remote_id=gid) == Result(gid, "updated")
    held = admin.get(f"/Groups/{gid}").json()
    assert (held["displayName"], [m["value"] for m in held["members"]]) == ("Gold", [b])
    assert scim.upsert_group("g-1", "Gold", []) == Result(gid, "adopted")  # found by externalId
    assert "members" not in admin.get(f"/Groups/{gid}").json()
    assert scim.delete_group("g-1", gid).outcome == "deprovisioned"
    assert scim.delete_group("g-1", gid).outcome == "absent"


def test_group_delete_without_remote_id_finds_it_by_hub_id(scim: ScimConnector, admin: httpx.Client) -> None:
    # A create whose answer was lost: the ledger has no remote id, the target has the group.
    lost = str(scim.upsert_group("g-lost", "Silver", []).remote_id)
    namesake = str(scim.upsert_group("g-other", "Silver", []).remote_id)
    assert scim.delete_group("g-lost") == Result(lost, "deprovisioned")
    assert admin.get(f"/Groups/{lost}").status_code == 404
    assert admin.get(f"/Groups/{namesake}").status_code == 200  # same name, another hub group: kept
    assert scim.delete_group("g-lost") == Result(None, "absent")


def test_filter_values_are_escaped(scim: ScimConnector) -> None:
    assert escape('a"b\\c') == 'a\\"b\\\\c'
    tricky = record(userName='o"brien\\x')
    remote_id = scim.upsert(tricky).remote_id
    assert scim.find('o"brien\\x') == remote_id
    assert scim.find('O"BRIEN\\X') == remote_id  # userName is case-insensitive (RFC 7643 §4.1.1)
    assert scim.find("o") is None


def test_wrong_token_is_permanent(base: str) -> None:
    scim = connector(base, token="wrong")
    with pytest.raises(PermanentError) as info:
        scim.upsert(record())
    assert (info.value.status, info.value.code) == (401, "http_401")
    with pytest.raises(PermanentError):
        scim.probe()


def test_probe_answers(scim: ScimConnector) -> None:
    scim.probe()


# -- failures the real server does not produce: an httpx.MockTransport at the network edge ---------------


def mocked(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> ScimConnector:
    settings = ConnectorSettings(name="app", url="http://app.test/scim/v2", options=options)
    client = httpx.Client(base_url=settings.url, transport=httpx.MockTransport(handler))
    return ScimConnector(settings, client=client)


def test_rate_limit_server_error_and_timeout_are_retryable() -> None:
    def rate_limited(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "12"}, json={"status": "429"})

    with pytest.raises(RetryableError) as info:
        mocked(rate_limited).upsert(record(remote_id="r1"))
    assert (info.value.retry_after, info.value.code) == (12.0, "rate_limited")

    with pytest.raises(RetryableError) as info:
        mocked(lambda r: httpx.Response(500)).find("x")
    assert info.value.status == 500

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(RetryableError) as info:
        mocked(slow).probe()
    assert info.value.code == "timeout"


def test_no_service_provider_config_means_defaults_and_patch_200_is_fine() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if request.url.path.endswith("/ServiceProviderConfig"):
            return httpx.Response(404)
        return httpx.Response(200, json={"id": "r1", "userName": "u"})

    scim = mocked(handler)
    assert not scim.supports_batch
    assert scim.upsert(record(remote_id="r1")) == Result("r1", "updated")
    assert calls == ["GET /scim/v2/ServiceProviderConfig", "PATCH /scim/v2/Users/r1"]


def test_bulk_413_halves_the_batch() -> None:
    sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/ServiceProviderConfig"):
            return httpx.Response(
                200, json={"bulk": {"supported": True, "maxOperations": 10, "maxPayloadSize": 1_000_000}}
            )
        ops = json.loads(request.content)["Operations"]
        sizes.append(len(ops))
        if len(ops) > 2:
            return httpx.Response(413)
        return httpx.Response(
            200,
            json={
                "Operations": [
                    {"bulkId": op["bulkId"], "status": "200", "location": f"http://app.test{op['path']}"}
                    for op in ops
                ]
            },
        )

    batch = [record(remote_id=f"r{i}") for i in range(5)]
    out = mocked(handler).upsert_many(batch)
    assert out == [Result(f"r{i}", "updated") for i in range(5)]
    assert sizes == [5, 2, 3, 1, 2]


def test_bulk_429_fails_the_whole_batch() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/ServiceProviderConfig"):
            return httpx.Response(200, json={"bulk": {"supported": True, "maxOperations": 10}})
        return httpx.Response(429, headers={"Retry-After": "3"})

    with pytest.raises(RetryableError) as info:
        mocked(handler).upsert_many([record(remote_id="a"), record(remote_id="b")])
    assert info.value.retry_after == 3.0


# -- a minimal target: no /ServiceProviderConfig, no ETags, PATCH answers 204, POST without Location -------


class _MinimalTarget(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    log: list[tuple[str, str, str | None]] = []

    def _answer(self, status: int, body: dict[str, Any] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        if data:
            self.send_header("Content-Type", "application/scim+json")
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        type(self).log.append((self.command, self.path.split("?")[0], self.headers.get("If-Match")))

    def do_GET(self) -> None:
        self._record()
        if "ServiceProviderConfig" in self.path:
            self._answer(404, {"detail": "no such endpoint"})
        else:
            self._answer(200, {"totalResults": 0, "Resources": []})

    def do_POST(self) -> None:
        self._record()
        self._answer(201, {"id": "m-1"})

    def do_PATCH(self) -> None:
        self._record()
        self._answer(204)

    def log_message(self, format: str, *args: object) -> None:  # silence the stub
        pass


def test_minimal_target_with_204_patch_and_no_etags() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MinimalTarget)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _MinimalTarget.log.clear()
    try:
        scim = connector(f"http://127.0.0.1:{server.server_address[1]}/scim/v2")
        rec = record()
        assert scim.upsert(rec) == Result("m-1", "created")
        assert scim.upsert(record(rec.identity_id, "m-1")) == Result("m-1", "updated")
        assert scim.deprovision(record(rec.identity_id, "m-1"), DeprovisionAction.DEACTIVATE).outcome == (
            "deprovisioned"
        )
        methods = [(m, p) for m, p, _ in _MinimalTarget.log]
        assert methods[0] == ("GET", "/scim/v2/Users")  # lookup before create
        assert ("POST", "/scim/v2/Users") in methods
        assert methods[-2:] == [("PATCH", "/scim/v2/Users/m-1")] * 2
        assert all(if_match is None for _, _, if_match in _MinimalTarget.log)
        scim.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_bulk_adopts_on_409_when_an_account_appears_after_the_lookup(
    scim: ScimConnector, admin: httpx.Client
) -> None:
    late, fresh = record(), record()

    def someone_else_creates_it(response: httpx.Response) -> None:
        if response.request.method == "GET" and "filter" in response.request.url.params and not users(admin):
            body = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": late.match_key}
            assert admin.post("/Users", json=body, headers=SCIM_JSON).status_code == 201

    scim.client.event_hooks["response"].append(someone_else_creates_it)
    out = scim.upsert_many([late, fresh])
    assert [r.outcome for r in out if isinstance(r, Result)] == ["adopted", "created"]
    assert sorted(u["externalId"] for u in users(admin)) == sorted([late.identity_id, fresh.identity_id])


def test_bulk_splits_oversized_payloads_and_falls_back_to_single_lookups() -> None:
    bulk_sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/ServiceProviderConfig"):
            return httpx.Response(
                200, json={"bulk": {"supported": True, "maxOperations": 10, "maxPayloadSize": 1500}}
            )
        if request.method == "GET":  # this target filters with a single eq only
            if " or " in request.url.params["filter"]:
                return httpx.Response(400, json={"scimType": "invalidFilter"})
            return httpx.Response(200, json={"totalResults": 0, "Resources": []})
        ops = json.loads(request.content)["Operations"]
        bulk_sizes.append(len(ops))
        return httpx.Response(
            200,
            json={
                "Operations": [
                    {
                        "bulkId": op["bulkId"],
                        "status": "201",
                        "location": f"http://app.test/Users/n{op['bulkId']}",
                    }
                    for op in ops
                ]
            },
        )

    batch = [record() for _ in range(3)] + [record(displayName="x" * 2000)]
    out = mocked(handler).upsert_many(batch)
    assert out[:3] == [Result(f"nr{i}", "created") for i in range(3)]
    assert isinstance(out[3], PermanentError)
    assert out[3].code == "too_large"
    assert sum(bulk_sizes) == 3  # the oversized record never left; the others went in smaller requests


def test_a_first_attempt_creates_without_a_lookup_and_adopts_on_conflict(
    scim: ScimConnector, admin: httpx.Client
) -> None:
    rec = replace(record(), first_attempt=True)
    created = scim.upsert(rec)
    assert created.outcome == "created"
    # The same first attempt again (a crash lost the ledger write): the target's 409, then adoption.
    again = scim.upsert(rec)
    assert (again.outcome, again.remote_id) == ("adopted", created.remote_id)
    assert [u["id"] for u in users(admin)] == [created.remote_id]
