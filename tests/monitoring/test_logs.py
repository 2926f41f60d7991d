"""The logging chain: the redaction processor on each kind of personal data and secret, and ``configure``
routing structlog and stdlib loggers through it in JSON and console mode with the bound context."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
import structlog

from orchestrator import cli, logs, settings
from orchestrator.logs import EMAIL_MARK, PHONE_MARK, REDACTED, redact, redact_text, redact_value

EMAIL = "canary.x7q9@pii-canary.test"
FAMILY = "Zzyzxcanary"
GIVEN = "Quxcanary"
PHONE = "+1-555-0199-424242"
TOKEN = "idh_T0kenCanary_abcdefghijklmnop"
SECRET = "whsec_c2VjcmV0Y2FuYXJ5LXNpZ25pbmc="
CANARIES = (EMAIL, FAMILY, GIVEN, PHONE, TOKEN, SECRET, "424242", "x7q9")

ID = "550e8400-e29b-41d4-a716-446655440000"


def assert_clean(text: str) -> None:
    for canary in CANARIES:
        assert canary.lower() not in text.lower(), f"{canary!r} leaked in {text!r}"


# -- each kind, in free text ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"welcome {EMAIL}!", f"welcome {EMAIL_MARK}!"),
        (
            "GET /contacts/canary.x7q9%40pii-canary.test?idProperty=email",
            f"GET /contacts/{EMAIL_MARK}?idProperty=email",
        ),
        (f"call {PHONE} now", f"call {PHONE_MARK} now"),
        ("call +44 20 7946 0958 or (555) 019-9424", f"call {PHONE_MARK} or {PHONE_MARK}"),
        ("call +49(0)30 1234567", f"call {PHONE_MARK}"),
        (f"Authorization: Bearer {TOKEN}", f"Authorization: {REDACTED}"),
        (f"sent with bearer {TOKEN[4:]}; ok", f"sent with bearer {REDACTED}; ok"),
        (
            "basic Y2tfc2FuZGJveDpjc19zYW5kYm94 and Basic dXNlcjpwYXNz",
            f"basic {REDACTED} and Basic {REDACTED}",
        ),
        (f"token {TOKEN} made", f"token idh_{REDACTED} made"),
        (f"signing with {SECRET}.", f"signing with whsec_{REDACTED}."),
        (
            "{'authorization': 'Bearer abc.def', 'accept': 'json'}",
            f"{{'authorization': {REDACTED}, 'accept': 'json'}}",
        ),
        (
            f'{{"name": {{"givenName": "{GIVEN}", "familyName": "{FAMILY}"}}}}',
            f'{{"name": {{"givenName": {REDACTED}, "familyName": {REDACTED}}}}}',
        ),
        (
            f"{{'displayName': \"O'{FAMILY}\", 'userName': 'jdoe'}}",
            f"{{'displayName': {REDACTED}, 'userName': {REDACTED}}}",
        ),
        (f"given_name={GIVEN} last-name: {FAMILY}", f"given_name={REDACTED} last-name: {REDACTED}"),
        (f"password=hunter2 secret: '{FAMILY}'", f"password={REDACTED} secret: {REDACTED}"),
        (
            f"[type=string_too_long, input_value='{FAMILY}', input_type=str]",
            f"[type=string_too_long, input_value={REDACTED}, input_type=str]",
        ),
        (
            f"[SQL: INSERT ...]\n[parameters: {{'user_name': 'jdoe', 'family': '{FAMILY}'}}]\n(Background)",
            f"[SQL: INSERT ...]\n[parameters: {REDACTED}]\n(Background)",
        ),
        (
            "DETAIL:  Key (user_name_ci)=(jdoe) already exists.",
            f"DETAIL:  Key (user_name_ci)=({REDACTED}) already exists.",
        ),
    ],
)
def test_redacts_each_kind_in_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        f"identity {ID} at version 12 delivered to crm",
        "2024-05-01T12:00:00.123456+00:00 took 1e+10 ms; 5550199424242 rows",
        "task_name=idhub.deliver target=crm logger_name=idhub.workers outbox_seqs=10-19",
        "WHERE groups.display_name = %(display_name_1)s AND users.name = :name_1",
        "POST /crm/v3/objects/contacts/batch/upsert -> 400 (invalid)",
        "the token lacks the scim:write scope; Basic authentication failed",
        "redis://127.0.0.1:6379/3 postgresql+psycopg://127.0.0.1:5432/idhub",
    ],
)
def test_keeps_identifiers_and_plain_text(text: str) -> None:
    assert redact_text(text) == text


# -- structure: keys, nesting, objects ----------------------------------------------------------------------


def test_values_of_name_contact_and_secret_keys_go_whole() -> None:
    out = redact(
        None,
        "info",
        {
            "event": "user changed",
            "name": {"givenName": GIVEN, "familyName": FAMILY},
            "userName": "jdoe",
            "display_name": "J Doe",
            "FNAME": GIVEN,
            "emails": [{"value": EMAIL, "primary": True}],
            "phoneNumbers": [{"value": "555 0199"}],
            "Authorization": "Bearer x",
            "password": "hunter2",
            "identity_id": ID,
            "version": 3,
            "active": True,
            "email": None,
        },
    )
    assert out == {
        "event": "user changed",
        "name": REDACTED,
        "userName": REDACTED,
        "display_name": REDACTED,
        "FNAME": REDACTED,
        "emails": REDACTED,
        "phoneNumbers": REDACTED,
        "Authorization": REDACTED,
        "password": REDACTED,
        "identity_id": ID,
        "version": 3,
        "active": True,
        "email": None,
    }


def test_nested_containers_are_walked_keys_included() -> None:
    value = {
        "batch": [{"doc": {"name": {"familyName": FAMILY}, "id": ID}}, (f"to {EMAIL}", 7)],
        EMAIL: "key is an e-mail",
        "set": {PHONE},
        "bytes": f"raw {EMAIL}".encode(),
        "deep": {"a": {"b": {"c": {"d": [f"see {TOKEN}"]}}}},
    }
    out = redact_value(value)
    assert_clean(json.dumps(out))
    assert out["batch"][0]["doc"]["id"] == ID
    assert out["batch"][1] == [f"to {EMAIL_MARK}", 7]
    assert out[EMAIL_MARK] == "key is an e-mail"
    assert out["deep"]["a"]["b"]["c"]["d"] == [f"see idh_{REDACTED}"]


def test_objects_and_exceptions_are_checked_as_their_text() -> None:
    class Customer:
        def __str__(self) -> str:
            return f"Customer(email={EMAIL}, familyName={FAMILY})"

    out = redact_value({"who": Customer(), "error": ValueError(f"no such user {EMAIL}")})
    assert out == {
        "who": f"Customer(email={REDACTED}, familyName={REDACTED})",
        "error": f"ValueError: no such user {EMAIL_MARK}",
    }


def test_cycles_and_deep_nesting_end() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    out = redact_value(loop)
    depth = 0
    while isinstance(out, dict):
        out, depth = out["self"], depth + 1
    assert out == REDACTED
    assert depth < 20


def test_redaction_is_fast() -> None:
    line = {
        "event": "delivery batch",
        "task_id": ID,
        "task_name": "idhub.deliver",
        "target": "crm",
        "done": 3,
        "duration_ms": 12.5,
        "logger": "idhub.workers",
        "level": "info",
    }
    started = time.perf_counter()
    for _ in range(5000):
        redact(None, "info", dict(line))
    # Measured about 6 µs a line; the bound leaves room for a loaded machine.
    assert (time.perf_counter() - started) / 5000 < 200e-6


# -- configure: every logger, every field, both formats ------------------------------------------------------


def _raise_with_pii() -> None:
    customer = {"email": EMAIL, "familyName": FAMILY}
    raise LookupError(f"customer {customer} not found; Authorization: Bearer {TOKEN}")


def test_json_lines_from_structlog_and_stdlib_carry_context_and_no_pii(
    json_log: Callable[[], list[dict[str, Any]]],
) -> None:
    structlog.contextvars.bind_contextvars(
        task_id="t-1", task_name="idhub.deliver", target="crm", identity_id=ID
    )
    structlog.get_logger("idhub.test").info(f"hello {EMAIL}", name=FAMILY, phone=PHONE, count=2)
    logging.getLogger("celery.app.trace").warning("Task %s failed for %s", "idhub.deliver", EMAIL)
    logging.getLogger("uvicorn.error").error("header Authorization: Bearer %s", TOKEN)
    try:
        _raise_with_pii()
    except LookupError:
        structlog.get_logger("idhub.test").exception("structlog failure")
        logging.getLogger("idhub.api").exception("stdlib failure %s", SECRET)
    lines = json_log()
    assert len(lines) == 5
    assert_clean(json.dumps(lines))
    for line in lines:
        assert line["task_id"] == "t-1"
        assert line["task_name"] == "idhub.deliver"
        assert line["target"] == "crm"
        assert line["identity_id"] == ID
        assert line["timestamp"].endswith("Z")
    first = lines[0]
    assert first["event"] == f"hello {EMAIL_MARK}"
    assert (first["name"], first["phone"], first["count"]) == (REDACTED, REDACTED, 2)
    assert (first["logger"], first["level"]) == ("idhub.test", "info")
    assert lines[1]["event"] == f"Task idhub.deliver failed for {EMAIL_MARK}"
    assert (lines[1]["logger"], lines[1]["level"]) == ("celery.app.trace", "warning")
    assert lines[2]["event"] == f"header Authorization: {REDACTED}"
    for line in lines[3:]:
        # The traceback is text (its source lines quote the f-string), redacted like the rest.
        assert "Traceback (most recent call last)" in line["exception"]
        assert (
            "LookupError: customer {'email': [redacted], 'familyName': [redacted]} not found"
            in line["exception"]
        )
        assert "_raise_with_pii" in line["exception"]
    assert lines[4]["event"] == f"stdlib failure whsec_{REDACTED}"


def test_json_lines_hold_any_value_json_can(json_log: Callable[[], list[dict[str, Any]]]) -> None:
    # Lines are rendered by orjson, which refuses integers past 64 bits: such a line still goes out whole.
    structlog.get_logger("idhub.test").info(
        "counted", big=2**70, small=3, text="Zürich", when=datetime(2026, 1, 1)
    )
    structlog.get_logger("idhub.test").info("plain", small=4)
    lines = json_log()
    assert [line["event"] for line in lines] == ["counted", "plain"]
    assert (lines[0]["big"], lines[0]["small"], lines[0]["text"]) == (2**70, 3, "Zürich")
    assert lines[0]["when"] == str(datetime(2026, 1, 1))
    assert lines[1]["small"] == 4


def test_console_lines_are_readable_and_redacted(restore_logging: None) -> None:
    buffer = io.StringIO()
    logs.configure("console", "INFO", stream=buffer)
    structlog.contextvars.bind_contextvars(task_id="t-2")
    structlog.get_logger("idhub.test").info("delivered", target="crm", email=EMAIL)
    try:
        _raise_with_pii()
    except LookupError:
        logging.getLogger("idhub.api").exception("failed")
    text = buffer.getvalue()
    assert_clean(text)
    first = text.splitlines()[0]
    assert "[info     ] delivered" in first
    assert "target=crm" in first
    assert "task_id=t-2" in first
    assert f"email={REDACTED}" in first
    assert "Traceback (most recent call last)" in text
    assert not text.lstrip().startswith("{")


def test_levels_and_noisy_libraries(restore_logging: None) -> None:
    buffer = io.StringIO()
    logs.configure("json", "INFO", stream=buffer)
    structlog.get_logger("idhub.test").debug("hidden")
    logging.getLogger("sqlalchemy.engine.Engine").info("SELECT secret statement")
    logging.getLogger("httpx").info("HTTP Request: GET http://x/")
    logging.getLogger("alembic.runtime.migration").info("Will assume transactional DDL.")
    assert buffer.getvalue() == ""
    logs.configure("json", "DEBUG", stream=buffer)
    logging.getLogger("httpx").info("HTTP Request: GET http://x/")
    # SQLAlchemy's statement and parameter logging stays off even at DEBUG: parameters are bare values.
    logging.getLogger("sqlalchemy.engine.Engine").info("SELECT secret statement")
    events = [json.loads(line)["event"] for line in buffer.getvalue().splitlines()]
    assert events == ["HTTP Request: GET http://x/"]


def test_configure_replaces_only_its_own_handler(restore_logging: None) -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    logs.configure("json", "INFO", stream=io.StringIO())
    logs.configure("console", "WARNING", stream=io.StringIO())
    ours = [h for h in root.handlers if isinstance(h, logs._Handler)]
    assert len(ours) == 1
    assert foreign in root.handlers
    assert root.level == logging.WARNING
    with pytest.raises(ValueError, match="unknown log format"):
        logs.configure("xml", "INFO")


def test_settings_level_wins_over_the_callers(restore_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.get.cache_clear()
    monkeypatch.setenv("IDHUB_LOG_FORMAT", "json")
    try:
        logs.configure_from_settings(logging.WARNING)  # IDHUB_LOG_LEVEL unset: the caller's level
        assert logging.getLogger().level == logging.WARNING
        monkeypatch.setenv("IDHUB_LOG_LEVEL", "DEBUG")
        settings.get.cache_clear()
        logs.configure_from_settings(logging.WARNING)
        assert logging.getLogger().level == logging.DEBUG
    finally:
        settings.get.cache_clear()


@pytest.mark.parametrize("name", ["uvicorn.error", "_granian"])
def test_servers_with_handlers_of_their_own_are_routed_too(restore_logging: None, name: str) -> None:
    server = logging.getLogger(name)
    server.addHandler(logging.StreamHandler(io.StringIO()))  # what the server's default logging config does
    server.propagate = False
    buffer = io.StringIO()
    logs.configure("json", "INFO", stream=buffer)
    server.warning("client %s sent a bad header", EMAIL)
    (line,) = [json.loads(text) for text in buffer.getvalue().splitlines()]
    assert (line["logger"], line["event"]) == (name, f"client {EMAIL_MARK} sent a bad header")


def test_granian_lines_reach_idhub(restore_logging: None) -> None:
    buffer = io.StringIO()
    logs.configure("json", "INFO", stream=buffer)
    logging.config.dictConfig(cli._SERVER_LOGGING)  # what granian applies with idhub serve's settings
    logging.getLogger("_granian").warning("Killing worker-1 after it refused to gracefully stop")
    lines = [json.loads(text) for text in buffer.getvalue().splitlines()]
    assert [(line["logger"], line["event"]) for line in lines] == [
        ("_granian", "Killing worker-1 after it refused to gracefully stop")
    ]
