"""Data minimisation and access: each target receives only what its mapping names, and an access export
shows the hub's record, each target's mapped view, the ledger and what the target holds now."""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from orchestrator import gdpr
from orchestrator.cli import main as idhub
from orchestrator.db import identities
from orchestrator.mapping import compile_mapping
from tests.hub import CUSTOMER
from tests.privacy.conftest import Privacy, targets_yaml

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"


def rich(tag: str) -> tuple[str, dict[str, Any], list[str]]:
    """A customer with many attributes, each personal value unique; returns (userName, attributes, values)."""
    digits = f"{int(tag, 16) % 10**6:06d}"
    attrs = {
        "name": {
            "givenName": f"Giv{tag}",
            "familyName": f"Fam{tag}",
            "middleName": f"Mid{tag}",
            "honorificPrefix": f"Pre{tag}",
        },
        "displayName": f"Disp{tag}",
        "nickName": f"Nick{tag}",
        "title": f"Title{tag}",
        "profileUrl": f"https://example.org/prof{tag}",
        "emails": [
            {"value": f"mail{tag}@example.org", "primary": True, "type": "home"},
            {"value": f"work{tag}@example.com", "type": "work"},
        ],
        "phoneNumbers": [
            {"value": f"+44 20 7{digits}", "primary": True, "type": "mobile"},
            {"value": f"+33 1 4{digits}", "type": "work"},
        ],
        "addresses": [{"streetAddress": f"Street{tag}", "locality": f"Town{tag}", "postalCode": f"PC{tag}"}],
        "preferredLanguage": "en",
        "locale": "en-GB",
        ENTERPRISE: {"employeeNumber": f"Emp{tag}", "department": f"Dept{tag}"},
        CUSTOMER: {
            "consents": [{"purpose": "marketing_email", "granted": True}],
            "customerNumber": f"Cust{tag}",
            "loyalty": {"tier": f"Tier{tag}", "points": 42},
            "marketingPreferences": {"topics": [f"Topic{tag}"]},
        },
    }
    values = [v for v in _leaves(attrs) if isinstance(v, str) and (tag in v or digits in v)]
    return f"mail{tag}@example.org", attrs, values


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _held(world: Privacy, target: str) -> str:
    """Everything the target stores, as text."""
    kind = {"app": "scim", "news": "newsletter", "hooks": "webhook"}.get(target, target)
    return json.dumps(world.scim_users() if kind == "scim" else world.state(kind)).lower()


@pytest.mark.parametrize("target", ["app", "news", "crm", "shop", "hooks"])
def test_a_target_receives_only_what_its_mapping_names(world: Privacy, target: str) -> None:
    tag = uuid.uuid4().hex[:8]
    user_name, attrs, values = rich(tag)
    uid = world.create(user_name, **attrs)
    world.settle(only={target})
    with world.engine.connect() as conn:
        doc = conn.execute(select(identities.c.doc).where(identities.c.id == uid)).scalar_one()
    cfg = world.cfg(target)
    mapped = compile_mapping(cfg.mapping or world.connectors[target].default_mapping)(doc)
    sent = {v for v in values if v in _leaves(mapped)}
    assert sent, "the mapping names some personal attributes"
    held = _held(world, target)
    for value in values:
        if value in sent:
            assert value.lower() in held, f"{target} should hold {value}"
        else:
            assert value.lower() not in held, f"{target} holds {value}, which its mapping does not name"
    if target == "hooks":
        (event,) = world.state("webhook")["events"]
        assert event["body"]["data"]["attributes"] == mapped


def _cli_env(world: Privacy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import settings

    urls = {kind: s.url for kind, s in world.servers.items()} | {"scim": world.scim_base}
    (tmp_path / "targets.yaml").write_text(targets_yaml(urls))
    monkeypatch.setenv("IDHUB_TARGETS_FILE", str(tmp_path / "targets.yaml"))
    monkeypatch.setenv("IDHUB_DATABASE_URL", world.engine.url.render_as_string(hide_password=False))
    settings.get.cache_clear()


def test_access_export_shows_hub_record_mapped_views_ledger_and_what_targets_hold(
    world: Privacy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = uuid.uuid4().hex[:8]
    user_name, attrs, _ = rich(tag)
    uid = world.create(user_name, **attrs)
    world.settle()
    _cli_env(world, tmp_path, monkeypatch)
    out = tmp_path / "export.json"
    try:
        assert idhub(["gdpr", "export", user_name, "--out", str(out)]) == 0
    finally:
        from orchestrator import settings

        settings.get.cache_clear()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    doc = json.loads(out.read_text())
    assert doc["identity_id"] == uid
    resource = doc["hub"]["resource"]
    assert resource["id"] == uid
    assert resource["userName"] == user_name
    assert resource["name"]["middleName"] == f"Mid{tag}"
    assert resource[CUSTOMER]["customerNumber"] == f"Cust{tag}"
    assert resource["meta"]["resourceType"] == "User"
    targets = {t["target"]: t for t in doc["targets"]}
    assert set(targets) == {"app", "news", "crm", "shop", "hooks"}
    for _name, entry in targets.items():
        assert entry["decision"]["action"] == "upsert"
        assert entry["ledger"]["status"] == "synced"
        assert entry["should_hold"] == entry["mapped"]
    assert targets["crm"]["mapped"]["properties"]["firstname"] == f"Giv{tag}"
    assert targets["news"]["mapped"]["merge_fields"] == {"FNAME": f"Giv{tag}", "LNAME": f"Fam{tag}"}
    # What each readable target holds now matches what it should hold.
    assert targets["crm"]["held_now"]["account"]["properties"]["firstname"] == f"Giv{tag}"
    assert targets["news"]["held_now"]["account"]["status"] == "subscribed"
    assert targets["shop"]["held_now"]["account"]["email"] == user_name
    assert targets["app"]["held_now"]["account"]["userName"] == user_name
    assert targets["hooks"]["held_now"] == {"available": False, "reason": "webhook cannot be read"}


def test_export_of_an_unknown_customer_is_one_line_and_exit_2(
    world: Privacy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _cli_env(world, tmp_path, monkeypatch)
    try:
        assert idhub(["gdpr", "export", "nobody@example.org"]) == 2
        assert idhub(["gdpr", "receipt", str(uuid.uuid4())]) == 2
        assert idhub(["gdpr", "erase", "nobody@example.org"]) == 2
    finally:
        from orchestrator import settings

        settings.get.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3
    assert all(line.startswith("idhub: ") for line in err)
    with pytest.raises(LookupError):
        gdpr.export(world.engine, "nobody@example.org", [], lambda cfg: None)
