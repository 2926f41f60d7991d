"""The simulators' shared machinery: runner, knobs, reproducible faults, request log, refused connections."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from connectors.base import Record
from connectors.errors import RetryableError
from connectors.registry import build
from connectors.sandbox import SandboxServer, build_simulator, start_sandboxes
from connectors.sandbox.runner import KINDS, connector_settings
from tests.connectors.contract import sandbox_server


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    yield from sandbox_server("shop", seed=42)


@pytest.fixture
def api(server: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.root) as client:
        client.post("/_sandbox/reset").raise_for_status()
        yield client


def test_runner_starts_every_simulator_and_connectors_reach_them() -> None:
    sandboxes = start_sandboxes()
    try:
        assert set(sandboxes.urls) == set(KINDS)
        for kind in KINDS:
            connector = build(kind, sandboxes.settings(kind))
            connector.probe()
            connector.close()
    finally:
        sandboxes.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(sandboxes.urls["crm"] + "/crm/v3/objects/contacts")


def test_module_entry_point_prints_the_urls() -> None:
    command = [sys.executable, "-m", "connectors.sandbox"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            lines = [process.stdout.readline().split() for _ in KINDS]
            assert [kind for kind, _ in lines] == list(KINDS)
            for kind, url in lines:
                assert url.startswith("http://127.0.0.1:")
                connector = build(kind, connector_settings(kind, url))
                connector.probe()
                connector.close()
        finally:
            process.terminate()
            process.wait(timeout=10)


def test_knobs_are_validated_and_reset(api: httpx.Client) -> None:
    assert api.post("/_sandbox/faults", json={"no_such_knob": 1}).status_code == 400
    assert api.post("/_sandbox/faults", json={"error_rate": 0.5}).json()["error_rate"] == 0.5
    api.post("/_sandbox/reset")
    assert api.get("/_sandbox/faults").json()["error_rate"] == 0.0


def test_faults_are_reproducible_with_a_seed(server: SandboxServer, api: httpx.Client) -> None:
    def run() -> list[int]:
        api.post("/_sandbox/reset")
        api.post("/_sandbox/faults", json={"error_rate": 0.5})
        with httpx.Client(base_url=server.url + "/", auth=("ck_sandbox", "cs_sandbox")) as shop:
            return [shop.get("customers").status_code for _ in range(20)]

    first, second = run(), run()
    assert first == second
    assert {200, 500, 503} & set(first)
    assert 200 in first
    log = api.get("/_sandbox/requests").json()
    assert [e["status"] for e in log] == second
    assert all(e["method"] == "GET" and e["path"] == "/wp-json/wc/v3/customers" for e in log)
    assert all(isinstance(e["received"], float) for e in log)


def test_faults_set_at_start_survive_reset() -> None:
    sim = build_simulator("crm", error_rate=1.0)
    sim.faults.update({"error_rate": 0.0})
    sim.reset()
    assert sim.faults.error_rate == 1.0


def test_stopped_server_refuses_connections_then_comes_back(server: SandboxServer, api: httpx.Client) -> None:
    connector = build("shop", connector_settings("shop", server.url, timeout=2))
    created = connector.upsert(Record("id-1", 1, {"email": "a@example.com"}))
    port = server.port
    server.stop()
    try:
        with pytest.raises(RetryableError) as caught:
            connector.probe()
        assert caught.value.code == "connection"
    finally:
        server.start()
    assert server.port == port
    deadline = time.monotonic() + 5
    while True:
        try:
            connector.probe()
            break
        except RetryableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert connector.read(str(created.remote_id)) is not None  # state outlives the restart
    connector.close()


def test_latency_knob_delays_answers(server: SandboxServer, api: httpx.Client) -> None:
    api.post("/_sandbox/faults", json={"latency_ms": 200})
    started = time.monotonic()
    httpx.get(server.url + "/customers", auth=("ck_sandbox", "cs_sandbox"))
    assert time.monotonic() - started >= 0.2
