"""Bad input at the SCIM API: bodies and filters are bounded, refused quickly with a SCIM error, and write
nothing; inputs that once crashed the hub (found by the fuzzing campaign) are pinned here."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.scim import filters
from tests.hub import GROUP_SCHEMA, client, patch, user
from tests.security.conftest import PgHub, assert_scim_error, fingerprint

SEARCH = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
C = "urn:idhub:schemas:extension:customer:2.0:User"
TWO_MB = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def api(pg_hub: PgHub) -> tuple[TestClient, str, str]:
    """An admin client, a user and a group that exist."""
    c = client(pg_hub.app, pg_hub.engine, name="bad-input")
    uid = c.post("/scim/v2/Users", json=user("bad-input-user")).json()["id"]
    gid = c.post("/scim/v2/Groups", json={"schemas": [GROUP_SCHEMA], "displayName": "bad-input"}).json()["id"]
    return c, uid, gid


def _search(flt: str) -> dict[str, Any]:
    return {"schemas": [SEARCH], "filter": flt}


# ---- body size


def _writes(uid: str, gid: str) -> list[tuple[str, str]]:
    return [
        ("POST", "/scim/v2/Users"),
        ("PUT", f"/scim/v2/Users/{uid}"),
        ("PATCH", f"/scim/v2/Users/{uid}"),
        ("POST", "/scim/v2/Groups"),
        ("PATCH", f"/scim/v2/Groups/{gid}"),
        ("POST", "/scim/v2/Users/.search"),
        ("POST", "/scim/v2/Bulk"),
    ]


def test_a_2mb_body_is_413_on_every_write_route_before_anything_else(
    api: tuple[TestClient, str, str], pg_hub: PgHub
) -> None:
    c, uid, gid = api
    anonymous = TestClient(pg_hub.app)
    big = b'{"schemas": ["' + b"x" * TWO_MB + b'"]}'
    before = fingerprint(pg_hub.engine)
    for method, path in _writes(uid, gid):
        for who in (c, anonymous):
            started = time.perf_counter()
            r = who.request(method, path, content=big, headers={"Content-Type": "application/scim+json"})
            assert_scim_error(r, 413)
            assert time.perf_counter() - started < 1.0, (method, path)
        # Without a Content-Length (chunked), the limit holds while reading.
        chunks = (b"x" * 65536 for _ in range(TWO_MB // 65536))
        assert_scim_error(c.request(method, path, content=chunks), 413)
    assert fingerprint(pg_hub.engine) == before


def test_a_deeply_nested_json_body_is_invalid_syntax(api: tuple[TestClient, str, str]) -> None:
    c, _, _ = api
    nested = b"[" * 100_000 + b"]" * 100_000
    assert_scim_error(c.post("/scim/v2/Users", content=nested), 400, "invalidSyntax")


# ---- filter complexity


def _complex_filters() -> dict[str, str]:
    leaf = 'userName eq "u{}"'
    chain = leaf.format(0)
    for i in range(1, 12):  # 12 comparisons, nested one level per term: deeper than the bound
        chain = f"{leaf.format(i)} {'and' if i % 2 else 'or'} ({chain})"
    return {
        "200 or terms": " or ".join(leaf.format(i) for i in range(200)),
        "not nested 50 deep": "not (" * 50 + leaf.format(0) + ")" * 50,
        "and/or nested 12 deep": chain,
        "value filter with 200 or terms": "emails["
        + " or ".join(f'type eq "t{i}"' for i in range(200))
        + "]",
    }


@pytest.mark.parametrize("case", sorted(_complex_filters()))
def test_an_over_complex_filter_is_invalid_filter_within_a_second(
    api: tuple[TestClient, str, str], case: str
) -> None:
    c, _, _ = api
    flt = _complex_filters()[case]
    for endpoint in ("Users", "Groups"):
        if endpoint == "Groups":
            flt = (
                flt.replace("userName", "displayName")
                .replace("emails[", "members[")
                .replace("type eq", "value eq")
            )
        started = time.perf_counter()
        assert_scim_error(c.get(f"/scim/v2/{endpoint}", params={"filter": flt}), 400, "invalidFilter")
        assert_scim_error(c.post(f"/scim/v2/{endpoint}/.search", json=_search(flt)), 400, "invalidFilter")
        assert time.perf_counter() - started < 1.0, case


def test_a_filter_longer_than_the_limit_is_invalid_filter(
    api: tuple[TestClient, str, str], pg_hub: PgHub
) -> None:
    c, _, _ = api
    limit = min(filters.MAX_FILTER_LENGTH, pg_hub.app.state.hub.settings.max_filter_length)
    flt = 'userName eq "' + "x" * limit + '"'
    assert_scim_error(c.post("/scim/v2/Users/.search", json=_search(flt)), 400, "invalidFilter")


def test_a_patch_path_filter_is_bounded_like_a_query_filter(api: tuple[TestClient, str, str]) -> None:
    c, uid, _ = api
    c.patch(
        f"/scim/v2/Users/{uid}", json=patch({"op": "add", "path": "emails", "value": [{"value": "a@b.org"}]})
    )
    terms = " or ".join(f'value eq "u{i}@example.org"' for i in range(199)) + ' or value eq "a@b.org"'
    r = c.patch(
        f"/scim/v2/Users/{uid}",
        json=patch({"op": "replace", "path": f"emails[{terms}].type", "value": "work"}),
    )
    assert r.status_code == 400, r.text


# ---- inputs that answered 500 (found by tests/security/test_fuzz.py); each must be a 4xx SCIM error


def _no_server_error(r: Any) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert_scim_error(r, r.status_code)


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("endpoint", ["Users", "Groups"])
def test_a_nul_in_the_resource_id_is_404(
    api: tuple[TestClient, str, str], method: str, endpoint: str
) -> None:
    c, _, _ = api
    attribute = "displayName" if endpoint == "Groups" else "title"
    body = {"PUT": user("x"), "PATCH": patch({"op": "replace", "path": attribute, "value": "x"})}.get(method)
    assert_scim_error(c.request(method, f"/scim/v2/{endpoint}/a%00b", json=body), 404)


def test_a_nul_in_a_member_value_is_invalid_value(api: tuple[TestClient, str, str], pg_hub: PgHub) -> None:
    c, _, gid = api
    members = [{"value": "a\x00b"}]
    before = fingerprint(pg_hub.engine)
    group = {"schemas": [GROUP_SCHEMA], "displayName": "nul-members", "members": members}
    assert_scim_error(c.post("/scim/v2/Groups", json=group), 400, "invalidValue")
    assert_scim_error(c.put(f"/scim/v2/Groups/{gid}", json=group), 400, "invalidValue")
    add = patch({"op": "add", "path": "members", "value": members})
    assert_scim_error(c.patch(f"/scim/v2/Groups/{gid}", json=add), 400, "invalidValue")
    bulk = {
        "schemas": [BULK],
        "Operations": [{"method": "POST", "path": "/Groups", "bulkId": "g", "data": group}],
    }
    assert c.post("/scim/v2/Bulk", json=bulk).json()["Operations"][0]["status"] == "400"
    assert fingerprint(pg_hub.engine) == before


def test_a_start_index_beyond_bigint_is_no_server_error(api: tuple[TestClient, str, str]) -> None:
    c, _, _ = api
    _no_server_error(c.get("/scim/v2/Users", params={"startIndex": str(10**30)}))


def test_a_filter_integer_beyond_bigint_is_no_server_error(api: tuple[TestClient, str, str]) -> None:
    c, _, _ = api
    _no_server_error(c.get("/scim/v2/Users", params={"filter": f"{C}:loyalty.points gt {10**35}"}))


def test_a_filter_date_at_the_calendar_edge_is_no_server_error(api: tuple[TestClient, str, str]) -> None:
    c, _, _ = api
    _no_server_error(
        c.get("/scim/v2/Users", params={"filter": 'meta.created gt "0001-01-01T00:00:00+14:00"'})
    )


def test_a_newline_in_the_path_is_a_scim_404(api: tuple[TestClient, str, str]) -> None:
    c, _, _ = api
    assert_scim_error(c.get("/scim/v2/Users/a%0Ab"), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/scim/v2/Users", "GET, POST"),
        ("PATCH", "/scim/v2/Users", "GET, POST"),
        ("DELETE", "/scim/v2/ServiceProviderConfig", "GET"),
        ("TRACE", "/scim/v2/Users/some-id", "DELETE, GET, PATCH, PUT"),
    ],
)
def test_a_method_an_endpoint_does_not_serve_is_a_scim_405_naming_those_it_does(
    api: tuple[TestClient, str, str], method: str, path: str, allowed: str
) -> None:
    c, _, _ = api
    answer = c.request(method, path)
    assert_scim_error(answer, 405)
    assert answer.headers["Allow"] == allowed
