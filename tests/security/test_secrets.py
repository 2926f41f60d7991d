"""Secrets stay secret: webhook deliveries carry a Standard Webhooks signature the receiver's own library
verifies (and rejects once anything is changed), the signing secret never travels, and neither target
tokens nor secrets pasted into the wrong place of a targets file reach an error message or a log."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from connectors.base import ConnectorSettings, DeprovisionAction, Record
from connectors.errors import SyncError
from connectors.registry import build
from connectors.sandbox.runner import start_sandboxes
from connectors.webhook import WebhookConnector
from orchestrator import logs
from orchestrator.targets import TargetConfigError, parse_targets
from tests.security.conftest import Recorder

# Test values shaped like real secrets (fixed, never real keys).
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a Standard Webhooks secret without + / =
STRIPE_LIKE = "sk_live_51HxQ2bKZ8mR4tY7uP0aL9cVnQ"
B64_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"


# ---- webhook signatures


def _deliver(recorder: Recorder, secret: str) -> tuple[bytes, dict[str, str]]:
    hook = WebhookConnector(ConnectorSettings(name="hook", url=recorder.url + "/hooks/idhub", token=secret))
    try:
        hook.upsert(Record("id-1", 3, {"email": "ada@example.org", "given_name": "Ada"}))
        hook.deprovision(Record("id-1", 4, {}), DeprovisionAction.DELETE)
    finally:
        hook.close()
    assert [r.method for r in recorder.requests] == ["POST", "POST"]
    sent = recorder.requests[0]
    return sent.body, {k.lower(): v for k, v in sent.headers.items()}


def test_a_webhook_delivery_verifies_with_the_receivers_library(recorder: Recorder) -> None:
    body, headers = _deliver(recorder, WHSEC)
    payload = Webhook(WHSEC).verify(body, headers)
    assert payload["type"] == "customer.upserted"
    assert payload["data"] == {
        "id": "id-1",
        "version": 3,
        "attributes": {"email": "ada@example.org", "given_name": "Ada"},
    }
    second = recorder.requests[1]
    assert Webhook(WHSEC).verify(second.body, second.headers)["type"] == "customer.deleted"
    # The secret signs; it never travels, in any form the receiver could read back.
    for sent in recorder.requests:
        raw = sent.body + repr(sent.headers).encode()
        assert WHSEC.encode() not in raw
        assert WHSEC.removeprefix("whsec_").encode() not in raw
        assert "authorization" not in {k.lower() for k in sent.headers}


def test_a_tampered_webhook_delivery_fails_verification(recorder: Recorder) -> None:
    body, headers = _deliver(recorder, WHSEC)
    receiver = Webhook(WHSEC)
    stamp = int(headers["webhook-timestamp"])
    tampered: dict[str, tuple[bytes, dict[str, str]]] = {
        "body": (body.replace(b"ada@example.org", b"eve@example.org"), headers),
        "timestamp": (body, headers | {"webhook-timestamp": str(stamp + 1)}),
        "id": (body, headers | {"webhook-id": headers["webhook-id"] + "x"}),
        "no signature": (body, {k: v for k, v in headers.items() if k != "webhook-signature"}),
    }
    for what, (b, h) in tampered.items():
        with pytest.raises(WebhookVerificationError):
            receiver.verify(b, h)
        assert what  # named for the failure message
    with pytest.raises(WebhookVerificationError):
        Webhook(B64_SECRET).verify(body, headers)  # another receiver's secret


# ---- secrets in a targets file


def _target(**keys: Any) -> str:
    base = {"name": "hook", "connector": "webhook", "url": "https://hooks.example/idhub"}
    lines = ["targets:", "  -"]
    for key, value in (base | keys).items():
        lines.append(f"    {key}: {value}")
    return "\n".join(lines) + "\n"


PASTED = {
    "a URL that is a secret": _target(url=STRIPE_LIKE),
    "a secret in the URL's userinfo, another key wrong": _target(
        url=f"https://user:{STRIPE_LIKE}@hooks.example/x", timeout="soon"
    ),
    "a secret under an unknown key": _target(token=WHSEC),
    "a secret under api_key": _target(api_key=STRIPE_LIKE),
    "a secret in options, another key wrong": _target(
        options=f"{{api_key: {STRIPE_LIKE}}}", concurrency="many"
    ),
    "a secret as options": _target(options=STRIPE_LIKE),
    "a base64 secret as token_env": _target(token_env=f"'{B64_SECRET}'"),
    "a secret as the rate limit": _target(rate_limit=STRIPE_LIKE),
    "a secret as the timeout": _target(timeout=STRIPE_LIKE),
    "a secret as the connector": _target(connector=STRIPE_LIKE),
    "a secret as a policy": _target(on_delete=STRIPE_LIKE),
    "a secret in the scope": _target(scope=f"'userName eq {STRIPE_LIKE}'"),
}


def _secrets_in(text: str) -> list[str]:
    return [s for s in (WHSEC, STRIPE_LIKE, B64_SECRET) if s in text or s.split("_")[-1] in text]


@pytest.mark.parametrize("case", sorted(PASTED))
def test_a_secret_pasted_into_a_targets_file_is_never_echoed(case: str) -> None:
    with pytest.raises(TargetConfigError) as raised:
        parse_targets(PASTED[case])
    assert _secrets_in(str(raised.value)) == []


@pytest.mark.parametrize("secret", [STRIPE_LIKE, WHSEC])
def test_a_secret_pasted_as_token_env_is_never_echoed(secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(secret, raising=False)
    with pytest.raises(TargetConfigError) as raised:
        parse_targets(_target(token_env=secret))
    assert _secrets_in(str(raised.value)) == []
    # Refused as a name whatever the environment holds, so connector_settings never sees it either.
    with pytest.raises(TargetConfigError) as raised:
        parse_targets(_target(token_env=secret), check_env=False)
    assert _secrets_in(str(raised.value)) == []


# ---- target tokens in logs and errors


@pytest.fixture
def all_logs() -> Iterator[io.StringIO]:
    """Every log line at DEBUG, the HTTP client's included, as the process would write it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ["httpx", "httpcore", "sqlalchemy", "alembic"]
    levels = {n: logging.getLogger(n).level for n in names}
    out = io.StringIO()
    logs.configure("json", "DEBUG", stream=out)
    for n in ("httpx", "httpcore"):
        logging.getLogger(n).setLevel(logging.DEBUG)
    yield out
    root.handlers[:] = handlers
    root.setLevel(level)
    for n, lvl in levels.items():
        logging.getLogger(n).setLevel(lvl)
    structlog.reset_defaults()


def test_target_tokens_reach_neither_logs_nor_errors(all_logs: io.StringIO) -> None:
    sandboxes = start_sandboxes(kinds=("crm", "webhook", "newsletter"))
    errors: list[str] = []
    secrets: list[str] = []
    try:
        for kind in ("crm", "webhook", "newsletter"):
            good = sandboxes.settings(kind)
            secrets.append(str(good.token))
            record = Record(f"{kind}-1", 1, {"email": f"{kind}@example.org"}, match_key=f"{kind}@example.org")
            wrong = B64_SECRET if kind == "webhook" else f"{good.token}-wrong"
            secrets.append(wrong)
            for token in (good.token, wrong):
                connector = build(kind, sandboxes.settings(kind, token=token))
                try:
                    connector.upsert(record)
                except SyncError as exc:  # the wrong token: refused by the target
                    errors.append(f"{exc} {exc!r}")
                finally:
                    connector.close()
    finally:
        sandboxes.stop()
    assert len(errors) >= 2  # the wrong tokens were refused, and said so
    text = all_logs.getvalue() + "\n".join(errors)
    assert "127.0.0.1" in all_logs.getvalue()  # the client's requests were logged (URLs only)
    assert [s for s in secrets if s in text] == []
