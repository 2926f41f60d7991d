"""Structured logging for every idhub process: JSON lines in production, a readable console in development.

``configure()`` is called once by every entry point (the API's ``create_app``, the Celery worker's
``setup_logging`` signal, the relay, the CLI). structlog loggers and stdlib loggers (celery, uvicorn,
sqlalchemy, httpx) share one chain and one handler on the root logger::

    bound context vars -> logger name, level -> exception and stack as text -> redact -> timestamp -> render

``redact`` runs on every line last before rendering, so no e-mail address, personal name (as the value of a
key that holds names), phone number, bearer token, ``idh_``/``whsec_`` secret or Authorization header
leaves the process, whatever the caller passed, in the message, any field, or a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any, Final, TextIO

import orjson
import structlog
from structlog.types import EventDict, Processor, WrappedLogger

from orchestrator import settings

REDACTED: Final = "[redacted]"
EMAIL_MARK: Final = "[email]"
PHONE_MARK: Final = "[phone]"
_MAX_DEPTH: Final = 12


def _norm(key: str) -> str:
    """A key compared without case, ``_`` or ``-``: ``given_name``, ``givenName`` and ``Given-Name`` match."""
    return key.lower().replace("_", "").replace("-", "")


# Keys whose value is personal or secret as a whole, whatever it looks like (compared by ``_norm``).
_NAMES: Final = (
    "name",
    "givenName",
    "familyName",
    "middleName",
    "displayName",
    "userName",
    "formatted",
    "nickName",
    "honorificPrefix",
    "honorificSuffix",
    "firstName",
    "lastName",
    "fullName",
    "FNAME",  # Mailchimp merge fields
    "LNAME",
)
_CONTACTS: Final = ("email", "emailAddress", "phone", "phoneNumber", "mobile", "streetAddress")
_SECRETS: Final = (
    "token",
    "accessToken",
    "refreshToken",
    "idToken",
    "apiKey",
    "password",
    "secret",
    "clientSecret",
)
_HEADERS: Final = ("authorization", "proxyAuthorization", "cookie", "setCookie", "xApiKey")
_WHOLE_KEYS: Final = frozenset(
    _norm(k)
    for k in (
        *_NAMES,
        *_CONTACTS,
        *_SECRETS,
        *_HEADERS,
        "emails",
        "mail",
        "phones",
        "phoneNumbers",
        "addresses",
    )
)


def _key_alternation(keys: Iterable[str]) -> str:
    """A regex alternation matching each key in camelCase, snake_case or kebab-case, longest first."""
    forms = set()
    for key in keys:
        forms.add(re.escape(key))
        snake = re.sub(r"(?<=[a-z])([A-Z])", r"_\1", key)
        forms.add(re.escape(snake))
        forms.add(re.escape(snake.replace("_", "-")))
    return "|".join(sorted(forms, key=len, reverse=True))


# pydantic prints the offending value of a validation error as ``input_value=...``.
_TEXT_KEYS: Final = (*_NAMES, *_CONTACTS, *_SECRETS, "input_value")

# In free text (messages, exception text, SQL errors, reprs, JSON): ``key: value`` / ``key=value`` pairs whose
# key holds names or secrets. The value is a quoted string or a bare word; an object or list value is left for
# its own keys to match.
_KV = re.compile(
    r"(?P<k>(?<![\w-])(?P<q>[\"']?)(?i:" + _key_alternation(_TEXT_KEYS) + r")(?P=q)\s*[:=]\s*)"
    r"(?:\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'|(?![%:?$])[^\s,;&{}\[\]()'\"]+)"
)
# An Authorization (or Cookie, API key) header's whole value: scheme and credentials, to the end of the field.
_HEADER = re.compile(
    r"(?P<k>(?<![\w-])[\"']?(?i:proxy-authorization|authorization|cookie|x-api-key)[\"']?\s*[:=]\s*)"
    r"(?:\"[^\"\n]*\"|'[^'\n]*'|[^\r\n,;}\]]+)"
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+")
# Base64 credentials, not a word: a digit, ``+/=`` or a capital after the first character.
_BASIC = re.compile(r"\b([Bb]asic)\s+(?=[A-Za-z0-9+/][A-Za-z0-9+/]*[0-9+/=A-Z])[A-Za-z0-9+/]{8,}={0,2}")
_TOKENS = re.compile(r"\b(idh|whsec)_[A-Za-z0-9_+/=-]+")
# ``%40`` too: e-mails reach logs inside URLs (query strings, paths) percent-encoded.
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+(?:@|%40)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
# International numbers (+ and 7 to 15 digits, any grouping) and national ones with a bracketed area code.
# Bare digit runs are left alone: they are ids, counts and versions far more often than phone numbers.
_PHONE = re.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .()/-]{0,2}\d){6,14}(?!\d)|(?<!\w)\(\d{2,5}\)[ .-]?\d{2,5}[ .-]?\d{2,6}(?!\d)"
)
# SQLAlchemy appends the bound values of a failed statement; PostgreSQL names the offending value in DETAIL.
_SQL_PARAMS = re.compile(r"\[parameters: [^\n]*")
_PG_DETAIL = re.compile(r"(?P<k>Key \([^)\n]*\)=\()[^\n]*?(?=\) (?:already exists|is not present|conflicts))")


def redact_text(text: str) -> str:
    """``text`` with e-mails, phone numbers, credentials and name/secret ``key: value`` pairs masked."""
    # Cheap membership tests first: most log text contains none of the triggers.
    if "[parameters: " in text:
        text = _SQL_PARAMS.sub("[parameters: " + REDACTED + "]", text)
    if "Key (" in text:
        text = _PG_DETAIL.sub(r"\g<k>" + REDACTED, text)
    if ":" in text or "=" in text:
        text = _HEADER.sub(r"\g<k>" + REDACTED, text)
        text = _KV.sub(r"\g<k>" + REDACTED, text)
    lowered = text.lower()
    if "bearer" in lowered:
        text = _BEARER.sub(r"\1 " + REDACTED, text)
    if "basic" in lowered:
        text = _BASIC.sub(r"\1 " + REDACTED, text)
    if "idh_" in text or "whsec_" in text:
        text = _TOKENS.sub(r"\1_" + REDACTED, text)
    if "@" in text or "%40" in text:
        text = _EMAIL.sub(EMAIL_MARK, text)
    if "+" in text or "(" in text:
        text = _PHONE.sub(PHONE_MARK, text)
    return text


def redact_value(value: Any, depth: int = 0) -> Any:
    """``value`` with personal data and secrets masked: containers walked, anything else checked as text."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if depth >= _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        return {redact_text(str(k)): _redact_item(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    # Any other object is rendered by its str(): check that text, never hand the object to a renderer.
    return redact_text(str(value))


def _redact_item(key: str, value: Any, depth: int) -> Any:
    if value is not None and not isinstance(value, bool) and _norm(key) in _WHOLE_KEYS:
        return REDACTED
    return redact_value(value, depth)


@lru_cache(maxsize=4096)
def _top_key(key: str) -> tuple[str, bool]:
    """A line's key masked, and whether its value is masked whole; cached, as lines reuse a few keys."""
    return redact_text(key), _norm(key) in _WHOLE_KEYS


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask personal data and secrets in every key and value of the line."""
    out: EventDict = {}
    for key, value in event_dict.items():
        masked, whole = _top_key(str(key))
        if value is None or isinstance(value, bool):
            out[masked] = value
        else:
            out[masked] = REDACTED if whole else redact_value(value, 0)
    return out


def _foreign_stack(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """A stdlib record's stack arrives as text already: keep it under the key structlog uses."""
    stack = event_dict.pop("stack_info", None)
    if stack:
        event_dict["stack"] = stack
    return event_dict


def _lead(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Time, level, logger and event first, so that a JSON line reads from the left."""
    lead = {k: event_dict.pop(k) for k in ("timestamp", "level", "logger", "event") if k in event_dict}
    return {**lead, **event_dict}


def _shared_processors(*, foreign: bool) -> list[Processor]:
    """What every line goes through before ``redact``: context, names, level, exception and stack as text."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.PositionalArgumentsFormatter(),
        _foreign_stack if foreign else structlog.processors.StackInfoRenderer(),
        # Tracebacks become text here so that ``redact`` sees them (the console renderer prints the text).
        structlog.processors.format_exc_info,
        structlog.processors.UnicodeDecoder(),
    ]


# Library loggers that say too much at INFO (SQLAlchemy logs every statement and its parameters; httpx logs
# every request URL): kept at WARNING, and SQLAlchemy's row and parameter logging stays off even at DEBUG.
_QUIET: Final = {
    "sqlalchemy": logging.WARNING,
    "httpcore": logging.WARNING,
    "httpx": logging.WARNING,
    "alembic": logging.WARNING,  # "Will assume transactional DDL" on every command that opens the store
}
_DEBUG_LOUDER: Final = {"httpx": logging.INFO, "alembic": logging.INFO}


# Loggers a server may have given handlers of its own (uvicorn's or granian's default logging config): their
# lines go to the root's handler instead, so they are formatted and redacted like every other.
_OWN_HANDLERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access", "_granian", "granian.access")


class _Handler(logging.StreamHandler[TextIO]):
    """The one handler idhub installs on the root logger; found again and replaced by ``configure``."""


def _json_line(event: Any, **options: Any) -> str:
    # orjson: json.dumps took a sixth of an access line's cost, and every request writes one. It refuses
    # integers past 64 bits, which json.dumps writes.
    try:
        return orjson.dumps(event, default=options.get("default"), option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(event, **options)


def configure(
    format: str = "console",
    level: str | int = "INFO",
    *,
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging through one redacting chain to ``stream`` (stderr by default).

    ``format`` is ``json`` (one JSON object a line) or ``console``. Calling it again replaces the previous
    configuration; handlers others installed on the root logger (a test runner's) are left in place.
    """
    if format not in ("json", "console"):
        raise ValueError(f"unknown log format {format!r}; use json or console")
    numeric = logging.getLevelNamesMapping()[level.upper()] if isinstance(level, str) else int(level)
    tail: list[Processor] = [redact, structlog.processors.TimeStamper(fmt="iso", utc=True), _lead]
    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_json_line)
        if format == "json"
        else structlog.dev.ConsoleRenderer(colors=False, pad_event_to=30)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(foreign=True), *tail],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _OWN_HANDLERS:
        server = logging.getLogger(name)
        server.handlers.clear()
        server.propagate = True
    for name, quiet in _QUIET.items():
        louder = _DEBUG_LOUDER.get(name) if numeric <= logging.DEBUG else None
        logging.getLogger(name).setLevel(louder if louder is not None else max(quiet, numeric))
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(foreign=False),
            *tail,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # What a later ``configure`` changes lives in the handler and the levels, which a cached logger reads
        # on each line; caching spares each line a new bound logger.
        cache_logger_on_first_use=True,
    )
    # No line shows where it was logged from: the documented switch that spares every record a stack walk.
    logging._srcfile = None


def configure_from_settings(level: str | int | None = None) -> None:
    """``configure`` from ``IDHUB_LOG_FORMAT`` and ``IDHUB_LOG_LEVEL`` (``level`` when that one is unset)."""
    cfg = settings.get()
    chosen = cfg.log_level if level is None or "log_level" in cfg.model_fields_set else level
    configure(cfg.log_format, chosen)
    # A process's warnings become log lines too: one format on stderr, and redacted.
    logging.captureWarnings(True)
