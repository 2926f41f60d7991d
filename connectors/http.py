"""HTTP plumbing every connector shares: one pooled httpx client per target and one error translation.

Speaks plain HTTP/1.1 to any target. ``send`` is the only place an httpx exception or an error status turns
into a ``connectors.errors`` exception, and what it keeps about a failure is PII-free by construction: the
method, a path whose variable segments are blanked (e-mails, hashes and ids live there), the status and the
target's machine-readable error code. Never body text, never query strings.
"""

from __future__ import annotations

import email.utils
import functools
import json
import math
import re
import ssl
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from connectors.base import ConnectorSettings
from connectors.errors import ConflictError, GoneError, PermanentError, RetryableError, SyncError

USER_AGENT = "idhub-connector/0.1"

# A path segment is kept only when it reads like an API word ("Users", "members", "v3", "graphql.json");
# anything with digits, '@', '.', '%' or '+' (ids, hashes, e-mails) becomes "{}".
_STATIC_SEGMENT = re.compile(r"^(?:[A-Za-z][A-Za-z_-]*|v\d+(?:\.\d+)?)(?:\.json)?$")
# The body fields that carry a target's machine-readable error code: SCIM scimType, WooCommerce/generic code,
# HubSpot category and errorType, Mailchimp (problem+json) title, OAuth-style error.
_CODE_FIELDS = ("scimType", "code", "errorType", "category", "title", "error")
_SAFE_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9 _.:-]{0,63}$")


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The process's one TLS context, shared by every target's client: making one reads the CA bundle, about
    20 ms, and a worker process keeps a client per target."""
    return httpx.create_ssl_context()


def make_client(
    settings: ConnectorSettings,
    *,
    headers: Mapping[str, str] | None = None,
    auth: httpx.Auth | tuple[str, str] | None = None,
) -> httpx.Client:
    """Build the pooled keep-alive client a connector keeps for its target (bearer token unless ``auth``)."""
    merged = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if settings.token and auth is None:
        merged["Authorization"] = f"Bearer {settings.token}"
    merged.update(headers or {})
    limits = httpx.Limits(
        max_connections=settings.max_connections, max_keepalive_connections=settings.max_connections
    )
    return httpx.Client(
        base_url=settings.url,
        timeout=httpx.Timeout(settings.timeout),
        limits=limits,
        headers=merged,
        auth=auth,
        verify=tls_context(),
    )


def encode(value: Any) -> bytes:
    """A request body as JSON. orjson: the stdlib's encoder was a tenth of a delivery worker's CPU."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # what orjson refuses and the stdlib writes (integers past 64 bits)
        return json.dumps(value).encode()


def json_of(response: httpx.Response) -> Any:
    """A response's JSON body (``Response.json``, decoded by orjson); ValueError when it is not JSON."""
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:  # what orjson refuses and the stdlib reads (NaN, integers past 64 bits)
        return response.json()


def send(
    client: httpx.Client, method: str, url: str, *, expect: Collection[int] = (), **kwargs: Any
) -> httpx.Response:
    """Perform a request; return the response on 2xx or a status in ``expect``, else raise a SyncError."""
    if "json" in kwargs:
        kwargs["content"] = encode(kwargs.pop("json"))
        headers = dict(kwargs.get("headers") or {})
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"
        kwargs["headers"] = headers
    try:
        response = client.request(method, url, **kwargs)
    except httpx.TimeoutException as exc:
        raise RetryableError(f"{method} {_where(exc)} timed out", code="timeout") from exc
    except httpx.TransportError as exc:
        raise RetryableError(
            f"{method} {_where(exc)} failed: {type(exc).__name__}", code="connection"
        ) from exc
    except httpx.RequestError as exc:  # too many redirects, undecodable body: the request itself is wrong
        raise PermanentError(f"{method} {_where(exc)} failed: {type(exc).__name__}", code="request") from exc
    status = response.status_code
    if 200 <= status < 300 or status in expect:
        return response
    raise error_for(response)


def error_for(response: httpx.Response) -> SyncError:
    """The SyncError an unexpected response stands for (410 is a PermanentError here, not target-disabled)."""
    status = response.status_code
    target_code = error_code(response)
    method = response.request.method
    path = _redact_path(response.request.url.path)
    message = f"{method} {path} -> {status}" + (f" ({target_code})" if target_code else "")
    if status in (408, 429) or status >= 500:
        default = {408: "timeout", 429: "rate_limited"}.get(status, f"http_{status}")
        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        return RetryableError(message, retry_after=retry_after, code=default, status=status)
    if status == 404:
        return GoneError(message, code="gone", status=status)
    if status == 409:
        return ConflictError(message, status=status)
    return PermanentError(message, code=target_code or f"http_{status}", status=status)


def error_code(response: httpx.Response) -> str | None:
    """The target's machine-readable error code from a JSON error body, when it has a short safe one."""
    try:
        body = json_of(response)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    for name in _CODE_FIELDS:
        value = body.get(name)
        if isinstance(value, str) and _SAFE_CODE.match(value) and "@" not in value:
            return value
    return None


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait per a Retry-After value (delta-seconds or HTTP-date, RFC 9110 §10.2.3), or None."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP-date is always GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def _where(exc: httpx.RequestError) -> str:
    try:
        return _redact_path(exc.request.url.path)
    except RuntimeError:  # raised before a request existed
        return "?"


def _redact_path(path: str) -> str:
    segments = [s if _STATIC_SEGMENT.match(s) else "{}" for s in path.split("/") if s]
    return "/" + "/".join(segments)
