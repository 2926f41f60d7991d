"""The OpenAPI document matches the hub: served open at /openapi.json, every documented SCIM operation is one
the router serves, every route it leaves out is one the hub answers 501, and every reference resolves.
(That each answer is one the document lists is test_fuzz.py's job.)"""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from scim2_server.routing import ROUTES, match

from orchestrator.api import SCIM_PREFIX
from orchestrator.openapi import document
from orchestrator.settings import Settings
from tests.security.conftest import PgHub

# Routes of scim2-server the hub answers 501 (RFC 7644 §3.11 /Me, searches across resource types).
UNDOCUMENTED = {
    ("GET", "/"),
    ("POST", "/.search"),
    *((r.method, "/Me") for r in ROUTES if r.pattern == "/Me"),
}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref" and isinstance(v, str)] + [
            r for v in node.values() for r in _refs(v)
        ]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_document_is_served_open_and_says_the_hubs_limits(pg_hub: PgHub) -> None:
    r = TestClient(pg_hub.app).get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc == document(pg_hub.app.state.hub.settings)
    assert doc["openapi"].startswith("3.1")
    bulk = doc["components"]["schemas"]["BulkRequest"]["properties"]["Operations"]
    assert bulk["maxItems"] == pg_hub.app.state.hub.settings.bulk_max_operations


def test_every_documented_operation_is_routed_and_every_route_is_documented() -> None:
    doc = document(Settings(database_url="sqlite://"))
    documented = set()
    for path, item in doc["paths"].items():
        for method in item.keys() - {"parameters"}:
            documented.add((method.upper(), path))
            if path.startswith(SCIM_PREFIX):
                concrete = path.removeprefix(SCIM_PREFIX).replace("{id}", "some-id")
                match(method.upper(), concrete)  # raises NotFound / MethodNotAllowed when the router has none
    routed = set()
    for route in ROUTES:
        for endpoint in ("Users", "Groups") if "{endpoint}" in route.pattern else (None,):
            pattern = route.pattern.replace("{endpoint}", endpoint or "").replace("{resource_id}", "{id}")
            if (route.method, route.pattern) not in UNDOCUMENTED:
                routed.add((route.method, SCIM_PREFIX + pattern))
    scim_documented = {(m, p) for m, p in documented if p.startswith(SCIM_PREFIX)}
    assert scim_documented == routed


def test_every_reference_resolves() -> None:
    doc = document(Settings(database_url="sqlite://"))
    for ref in _refs(doc):
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert isinstance(node, dict), ref
