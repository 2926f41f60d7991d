"""An operator's own User extension, from a schema file alone: served, stored, filtered in SQL, mapped to a
target and usable in a target's scope."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from orchestrator import settings
from orchestrator.db import identities
from orchestrator.mapping import compile_mapping
from orchestrator.targets import in_scope, parse_targets
from tests.hub import USER_SCHEMA, client, make_hub

CLUB = "urn:acme:schemas:extension:club:2.0:User"


def _attr(name: str, kind: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": kind,
        "multiValued": False,
        "required": False,
        "caseExact": False,
        "mutability": "readWrite",
        "returned": "default",
        "uniqueness": "none",
        "description": name,
    }


@pytest.fixture
def schema_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "schemas"
    folder.mkdir()
    schema = {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Schema"],
        "id": CLUB,
        "name": "Club",
        "description": "Membership of the ACME club",
        "attributes": [_attr("clubId", "string"), _attr("vip", "boolean"), _attr("visits", "integer")],
    }
    (folder / "club.json").write_text(json.dumps(schema))
    monkeypatch.setenv("IDHUB_SCHEMA_DIR", str(folder))
    settings.get.cache_clear()
    yield folder
    settings.get.cache_clear()


def _member(name: str, club: dict[str, Any]) -> dict[str, Any]:
    return {"schemas": [USER_SCHEMA, CLUB], "userName": name, CLUB: club}


def test_operator_extension_is_served_filtered_mapped_and_scoped(store_url: str, schema_dir: Path) -> None:
    app, engine = make_hub(store_url, schema_dir=schema_dir)
    api = client(app, engine)
    assert CLUB in {s["id"] for s in api.get("/scim/v2/Schemas").json()["Resources"]}
    user_type = api.get("/scim/v2/ResourceTypes/User").json()
    assert CLUB in {e["schema"] for e in user_type["schemaExtensions"]}

    vip = api.post("/scim/v2/Users", json=_member("vip@example.com", {"clubId": "C-1", "vip": True}))
    assert vip.status_code == 201, vip.text
    plain = api.post("/scim/v2/Users", json=_member("plain@example.com", {"clubId": "C-2", "visits": 3}))
    assert plain.status_code == 201, plain.text
    assert api.post(
        "/scim/v2/Users", json={"schemas": [USER_SCHEMA], "userName": "none@example.com"}
    ).is_success

    found = api.get("/scim/v2/Users", params={"filter": f"{CLUB}:vip eq true"}).json()
    assert [r["userName"] for r in found["Resources"]] == ["vip@example.com"]
    found = api.get("/scim/v2/Users", params={"filter": f"{CLUB}:visits gt 1"}).json()
    assert [r["userName"] for r in found["Resources"]] == ["plain@example.com"]
    wrong_type = api.get("/scim/v2/Users", params={"filter": f"{CLUB}:nosuch eq 1"})
    assert wrong_type.status_code == 400

    (target,) = parse_targets(
        f"""targets:
  - name: club
    connector: webhook
    url: http://127.0.0.1:9/hook
    scope: '{CLUB}:vip eq true'
    mapping:
      club: '{CLUB}:clubId'
      email: userName
""",
        check_env=False,
    )
    with engine.connect() as conn:
        docs = {r.id: r.doc for r in conn.execute(select(identities.c.id, identities.c.doc))}
    vip_doc, plain_doc = docs[vip.json()["id"]], docs[plain.json()["id"]]
    assert in_scope(target, vip_doc)
    assert not in_scope(target, plain_doc)
    assert compile_mapping(target.mapping)(vip_doc) == {"club": "C-1", "email": "vip@example.com"}


def test_a_scope_on_an_unknown_extension_attribute_is_refused(schema_dir: Path) -> None:
    with pytest.raises(ValueError, match="nosuch"):
        parse_targets(
            f"""targets:
  - name: club
    connector: webhook
    url: http://127.0.0.1:9/hook
    scope: '{CLUB}:nosuch eq true'
""",
            check_env=False,
        )
