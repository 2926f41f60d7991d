"""Where connectors send is configuration, never request data: a SCIM write full of URLs (profileUrl,
photos, ``$ref``, ``meta.location``) and forwarding headers (``X-Forwarded-Host``, ``Forwarded``) is
synced through the real fan-out and delivery, and every request lands on the configured targets, under
their configured paths, while a decoy server named by the data hears nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from connectors.base import Record
from connectors.crm import CrmConnector
from connectors.errors import SyncError
from connectors.registry import build
from connectors.sandbox.runner import Sandboxes, start_sandboxes
from connectors.sandbox.runner import connector_settings as sandbox_settings
from orchestrator import db, sync
from orchestrator.targets import TargetConfig, connector_settings, parse_targets
from tests.hub import CUSTOMER, SCIM, client, patch
from tests.security.conftest import PgHub, Recorder

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
KINDS = ("shop", "newsletter", "crm", "webhook")


@pytest.fixture(scope="module")
def sandboxes() -> Iterator[Sandboxes]:
    running = start_sandboxes(kinds=KINDS)
    yield running
    running.stop()


@pytest.fixture
def targets(sandboxes: Sandboxes, monkeypatch: pytest.MonkeyPatch) -> list[TargetConfig]:
    """One target per connector kind on its simulator; the webhook's mapping also sends the URL fields."""
    lines = ["targets:"]
    for kind in KINDS:
        settings = sandboxes.settings(kind)
        env = f"IDHUB_SEC_{kind.upper()}_TOKEN"
        monkeypatch.setenv(env, str(settings.token))
        lines += [
            f"  - name: {kind}",
            f"    connector: {kind}",
            f"    url: {settings.url}",
            f"    token_env: {env}",
        ]
        if settings.options:
            lines.append(f"    options: {dict(settings.options)}")
        if kind == "webhook":
            lines.append("    mapping: {email: 'emails[primary eq true].value', profile: profileUrl,")
            lines.append("              photos: photos.value}")
    return parse_targets("\n".join(lines) + "\n")


def _sync(engine: Any, targets: list[TargetConfig]) -> None:
    """Fan out every event and deliver what became due, to each target through its real connector."""
    with engine.connect() as conn:
        seqs = [r.seq for r in conn.execute(select(db.outbox.c.seq))]
    due = sync.fanout(engine, targets, seqs)
    for cfg in targets:
        connector = build(cfg.connector, connector_settings(cfg))
        try:
            report = sync.deliver(engine, cfg, connector, due.get(cfg.name, []), owner="security-test")
        finally:
            connector.close()
        assert report.dead == [], (cfg.name, report)
        assert report.retrying == [], (cfg.name, report)


def test_request_data_never_chooses_where_connectors_send(
    pg_hub: PgHub, sandboxes: Sandboxes, targets: list[TargetConfig]
) -> None:
    decoy = Recorder()
    try:
        c = client(pg_hub.app, pg_hub.engine, name="urls")
        forwarded = {
            "X-Forwarded-Host": decoy.host,
            "X-Forwarded-Proto": "http",
            "X-Forwarded-Prefix": "/steal",
            "Forwarded": f"host={decoy.host};proto=http",
            "X-Original-URL": decoy.url + "/steal",
            "Content-Type": SCIM,
        }
        body = {
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", ENTERPRISE, CUSTOMER],
            "userName": "url-carrier",
            "emails": [{"value": "url.carrier@example.org", "primary": True}],
            "profileUrl": decoy.url + "/profile",
            "photos": [{"value": decoy.url + "/photo.png"}],
            "meta": {"location": decoy.url + "/meta"},
            ENTERPRISE: {"manager": {"value": "m-1", "$ref": decoy.url + "/manager"}},
            CUSTOMER: {"consents": [{"purpose": "marketing_email", "granted": True, "source": decoy.url}]},
        }
        r = c.post("/scim/v2/Users", json=body, headers=forwarded)
        assert r.status_code == 201, r.text
        uid = r.json()["id"]
        update = patch({"op": "replace", "path": "profileUrl", "value": decoy.url + "/again"})
        assert c.patch(f"/scim/v2/Users/{uid}", json=update, headers=forwarded).status_code == 200
        _sync(pg_hub.engine, targets)
        assert c.delete(f"/scim/v2/Users/{uid}", headers=forwarded).status_code == 204
        _sync(pg_hub.engine, targets)

        assert decoy.requests == []
        for kind in KINDS:
            sim = sandboxes.servers[kind].sim
            paths = [entry["path"] for entry in sim.log]
            assert paths, f"{kind} received nothing"
            assert all(p == sim.base_path or p.startswith(sim.base_path + "/") for p in paths), (kind, paths)
        # The URLs travelled as data, to the target whose mapping names them, and nowhere else.
        [upserted, *_] = sandboxes.servers["webhook"].sim.snapshot()["events"]
        assert upserted["body"]["data"]["attributes"]["profile"].startswith(decoy.url)
    finally:
        decoy.close()


@pytest.mark.parametrize(
    "email", ["a/b@example.org", "a?idProperty=hs_object_id&b@example.org", "a#b@example.org"]
)
def test_a_match_key_with_url_syntax_never_shapes_a_crm_url(sandboxes: Sandboxes, email: str) -> None:
    """'/', '?' and '#' are valid in an e-mail's local part: they must not pick the route the CRM serves."""
    log = sandboxes.servers["crm"].sim.log
    crm = CrmConnector(sandboxes.settings("crm"))
    try:
        seen = len(log)
        assert crm.find("plain@example.org") is None
        plain = [entry["path"] for entry in log[seen:]]
        seen = len(log)
        assert crm.find(email) is None
        tricky = [entry["path"] for entry in log[seen:]]
    finally:
        crm.close()
    assert tricky == plain
    assert all(email.split("@")[0] not in path for path in tricky)


@pytest.mark.parametrize("kind", KINDS)
def test_a_redirect_from_a_target_moves_no_connector(kind: str, recorder: Recorder) -> None:
    decoy = Recorder()
    recorder.status, recorder.headers = 307, {"Location": decoy.url + "/steal"}
    settings = sandbox_settings(kind, recorder.url + "/api")
    connector = build(kind, settings)
    try:
        with pytest.raises(SyncError):
            connector.upsert(Record("r-1", 1, {"email": "ada@example.org"}, match_key="ada@example.org"))
    finally:
        connector.close()
        decoy.close()
    assert recorder.requests
    assert decoy.requests == []
