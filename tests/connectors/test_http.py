"""connectors.http: client construction and the translation of every failure into a SyncError."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from connectors.base import ConnectorSettings
from connectors.errors import (
    ConflictError,
    GoneError,
    PermanentError,
    RetryableError,
    SyncError,
    TargetDisabledError,
)
from connectors.http import error_code, json_of, make_client, retry_after_seconds, send

EMAIL = "jane.doe@example.com"


def mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(base_url="http://target.test/api/v3/", transport=httpx.MockTransport(handler))


def answering(status: int, **kwargs: object) -> httpx.Client:
    return mock_client(lambda request: httpx.Response(status, **kwargs))  # type: ignore[arg-type]


def raising(exc: type[httpx.RequestError]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("boom " + EMAIL, request=request)

    return mock_client(handler)


def assert_pii_free(err: SyncError) -> None:
    text = f"{err} {err.message} {err.code}"
    for needle in (EMAIL, "jane", "secret", "q=", "Jane"):
        assert needle not in text


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_2xx_returns_the_response(status: int) -> None:
    assert send(answering(status), "GET", "Users").status_code == status


def test_expected_status_is_returned_not_raised() -> None:
    assert send(answering(410), "POST", "hook", expect={410}).status_code == 410
    assert send(answering(404), "GET", "Users/1", expect=(404,)).status_code == 404


def test_json_bodies_go_out_as_json_even_where_the_fast_encoder_refuses_them() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b'{"n": 18446744073709551617, "x": NaN, "name": "J\xc3\xb8rn"}')

    client = mock_client(handler)
    big = {"points": 2**70, "name": "Jørn"}
    answer = json_of(send(client, "POST", "Users", json={"a": 1, "name": "Jørn"}))
    send(client, "POST", "Users", json=big, headers={"content-type": "application/scim+json"})
    assert [json.loads(r.content) for r in seen] == [{"a": 1, "name": "Jørn"}, big]
    assert [r.headers["Content-Type"] for r in seen] == ["application/json", "application/scim+json"]
    assert answer["n"] == 2**64 + 1
    assert answer["name"] == "Jørn"
    assert math.isnan(answer["x"])


def test_a_body_that_is_not_json_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="Expecting value"):
        json_of(httpx.Response(200, content=b"<html>"))


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (httpx.ConnectTimeout, "timeout"),
        (httpx.ReadTimeout, "timeout"),
        (httpx.PoolTimeout, "timeout"),
        (httpx.ConnectError, "connection"),
        (httpx.ReadError, "connection"),
        (httpx.RemoteProtocolError, "connection"),
    ],
)
def test_transport_errors_are_retryable(exc: type[httpx.RequestError], code: str) -> None:
    with pytest.raises(RetryableError) as info:
        send(raising(exc), "GET", f"members/{EMAIL}?q=jane")
    assert info.value.code == code
    assert info.value.retry_after is None
    assert "/api/v3/members/{}" in info.value.message
    assert_pii_free(info.value)


def test_other_request_errors_are_permanent() -> None:
    with pytest.raises(PermanentError) as info:
        send(raising(httpx.TooManyRedirects), "GET", "x")
    assert info.value.code == "request"


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (429, "rate_limited"),
        (408, "timeout"),
        (500, "http_500"),
        (502, "http_502"),
        (503, "http_503"),
        (504, "http_504"),
    ],
)
def test_rate_limits_and_server_errors_are_retryable(status: int, code: str) -> None:
    client = answering(status, headers={"Retry-After": "7"}, json={"detail": f"{EMAIL} broke"})
    with pytest.raises(RetryableError) as info:
        send(client, "PUT", f"lists/abc123/members/{EMAIL}", json={"email": EMAIL})
    err = info.value
    assert (err.status, err.code, err.retry_after) == (status, code, 7.0)
    assert err.message == f"PUT /api/v3/lists/{{}}/members/{{}} -> {status}"
    assert_pii_free(err)


def test_429_without_retry_after_has_none() -> None:
    with pytest.raises(RetryableError) as info:
        send(answering(429, text="slow down"), "GET", "Users")
    assert info.value.retry_after is None


def test_429_with_http_date_retry_after() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    with pytest.raises(RetryableError) as info:
        send(answering(429, headers={"Retry-After": when}), "GET", "Users")
    assert info.value.retry_after is not None
    assert 100 < info.value.retry_after <= 120


def test_404_is_gone_and_409_is_conflict() -> None:
    with pytest.raises(GoneError) as gone:
        send(answering(404), "PATCH", "Users/2819c223")
    assert gone.value.status == 404
    assert gone.value.message == "PATCH /api/v3/Users/{} -> 404"
    body = {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
        "scimType": "uniqueness",
        "detail": f"userName {EMAIL} exists",
        "status": "409",
    }
    with pytest.raises(ConflictError) as conflict:
        send(answering(409, json=body), "POST", "Users", json={"userName": EMAIL})
    assert conflict.value.status == 409
    assert conflict.value.remote_id is None
    assert "(uniqueness)" in conflict.value.message
    assert_pii_free(conflict.value)


def test_410_is_permanent_but_not_target_disabled_unless_expected() -> None:
    with pytest.raises(PermanentError) as info:
        send(answering(410), "POST", "hook")
    assert not isinstance(info.value, TargetDisabledError)
    assert info.value.code == "http_410"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"schemas": [], "scimType": "invalidValue", "detail": f"bad {EMAIL}"}, "invalidValue"),
        (
            {"type": "https://mailchimp.com/x", "title": "Invalid Resource", "detail": EMAIL},
            "Invalid Resource",
        ),
        ({"status": "error", "category": "VALIDATION_ERROR", "message": EMAIL}, "VALIDATION_ERROR"),
        ({"code": "registration-error-email-exists", "message": EMAIL}, "registration-error-email-exists"),
        ({"title": f"Member {EMAIL} exists"}, "http_400"),  # a code holding PII is dropped
        ({"detail": "no code here"}, "http_400"),
        (["not", "an", "object"], "http_400"),
    ],
)
def test_other_4xx_is_permanent_with_the_targets_code(body: object, code: str) -> None:
    with pytest.raises(PermanentError) as info:
        send(answering(400, json=body), "POST", "Users")
    assert info.value.code == code
    assert info.value.status == 400
    assert_pii_free(info.value)


def test_non_json_error_body_has_no_code() -> None:
    response = httpx.Response(401, text=f"<html>{EMAIL}</html>", request=httpx.Request("GET", "http://x/"))
    assert error_code(response) is None
    with pytest.raises(PermanentError) as info:
        send(answering(401, text=f"<html>{EMAIL}</html>"), "GET", "Users")
    assert info.value.code == "http_401"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("  ", None),
        ("120", 120.0),
        ("2.0", 2.0),
        ("-3", 0.0),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert retry_after_seconds(value) == expected


def test_retry_after_future_http_date() -> None:
    when = datetime.now(UTC) + timedelta(hours=1)
    seconds = retry_after_seconds(format_datetime(when, usegmt=True))
    assert seconds is not None
    assert 3500 < seconds <= 3600


def settings(url: str, **kwargs: object) -> ConnectorSettings:
    return ConnectorSettings(name="t", url=url, **kwargs)  # type: ignore[arg-type]


def test_make_client_configuration() -> None:
    client = make_client(settings("http://target.test/scim/v2/", token="tok", timeout=3.5))
    assert client.headers["Authorization"] == "Bearer tok"
    assert client.timeout == httpx.Timeout(3.5)
    assert str(client.base_url) == "http://target.test/scim/v2/"
    client.close()


def test_make_client_auth_and_headers_win_over_the_token() -> None:
    client = make_client(settings("http://t.test/", token="tok"), auth=("any", "key"), headers={"X-K": "v"})
    assert "Authorization" not in client.headers
    assert client.headers["X-K"] == "v"
    assert isinstance(client.auth, httpx.BasicAuth)
    client.close()
    assert "Authorization" not in make_client(settings("http://t.test/")).headers


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    connections: set[int] = set()
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        type(self).connections.add(id(self.connection))
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        status = 200 if self.path.endswith("/ok") else 503
        body = b'{"ok": true}' if status == 200 else b'{"error": "maintenance"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 503:
            self.send_header("Retry-After", "30")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # silence the test server
        pass


@pytest.fixture
def loopback() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Handler.connections.clear()
    _Handler.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/base/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_against_a_real_loopback_server(loopback: str) -> None:
    client = make_client(settings(loopback, token="tok", max_connections=2))
    assert send(client, "GET", "ok").json() == {"ok": True}
    assert send(client, "GET", "ok").status_code == 200
    with pytest.raises(RetryableError) as info:
        send(client, "GET", "down")
    assert (info.value.status, info.value.retry_after, info.value.code) == (503, 30.0, "http_503")
    assert "(maintenance)" in info.value.message
    assert _Handler.seen[0] == ("/base/ok", "Bearer tok")
    assert len(_Handler.connections) == 1  # the pooled client kept the connection alive
    client.close()


def test_connection_refused_on_loopback() -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make_client(settings(f"http://127.0.0.1:{port}/", timeout=2))
    with pytest.raises(RetryableError) as info:
        send(client, "GET", "Users")
    assert info.value.code == "connection"
    client.close()
