"""``idhub serve`` as operators run it: a server process and its workers, on PostgreSQL, over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from orchestrator import migrations
from orchestrator.auth import create_token
from orchestrator.db import make_engine
from tests.chaos.servers import descendants, stop_group
from tests.conftest import create_pg_database, drop_pg_database
from tests.hub import SCIM, free_port, user, wait_http


def _serve(tmp_path: Path, env: dict[str, str], port: int, *extra: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(port), *extra]
    with open(tmp_path / "out.log", "wb") as out, open(tmp_path / "err.log", "wb") as err:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=err, cwd=tmp_path, start_new_session=True)


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_serve_answers_scim_logs_through_idhub_and_stops_on_sigterm(tmp_path: Path) -> None:
    url = create_pg_database()
    engine = make_engine(url)
    try:
        migrations.upgrade(engine)
        token = create_token(engine, "serve-test", ["admin"])
        env = {**os.environ, "IDHUB_DATABASE_URL": url, "IDHUB_LOG_FORMAT": "json", "IDHUB_LOG_LEVEL": "INFO"}
        port = free_port()
        server = _serve(tmp_path, env, port, "--workers", "2")
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/healthz", timeout=60)
            headers = {"Authorization": f"Bearer {token}", "Content-Type": SCIM}
            with httpx.Client(base_url=f"{base}/scim/v2", headers=headers, timeout=10) as client:
                created = client.post("/Users", json=user("serve.test@example.com"))
                assert created.status_code == 201, created.text
                fetched = client.get(f"/Users/{created.json()['id']}")
                assert fetched.status_code == 200
                assert fetched.json()["userName"] == "serve.test@example.com"
                assert client.get("/Users", headers={"Authorization": "Bearer nope"}).status_code == 401
            workers = descendants(server.pid)
            assert len(workers) >= 2
            server.send_signal(signal.SIGTERM)
            assert server.wait(30) == 0
            assert not _alive(workers), "a worker outlived the server"
        finally:
            stop_group(server, sig=signal.SIGKILL)  # what a failed test left, workers included
        assert (tmp_path / "out.log").read_text() == ""
        lines = [json.loads(line) for line in (tmp_path / "err.log").read_text().splitlines()]
        statuses = sorted(line["status"] for line in lines if line.get("event") == "http request")
        assert statuses == [200, 201, 401]
        assert "serve.test" not in (tmp_path / "err.log").read_text()
    finally:
        engine.dispose()
        drop_pg_database(url)


def test_serve_on_a_taken_port_says_so_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "IDHUB_DATABASE_URL": f"sqlite:///{tmp_path}/hub.db"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = _serve(tmp_path, env, port)
        assert server.wait(60) == 2
    (line,) = (tmp_path / "err.log").read_text().splitlines()
    assert line.startswith(f"idhub: cannot serve on 127.0.0.1:{port}: Address already in use"), line


def test_serve_stops_when_told_to_while_its_workers_still_start(tmp_path: Path) -> None:
    # The first worker answers while the others are still starting; a rolling deploy may stop it right then.
    env = {**os.environ, "IDHUB_DATABASE_URL": f"sqlite:///{tmp_path}/hub.db"}
    port = free_port()
    server = _serve(tmp_path, env, port, "--workers", "3")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
        workers = descendants(server.pid)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        assert not _alive(workers), "a worker outlived the server"
    finally:
        stop_group(server, sig=signal.SIGKILL)  # what a failed test left, workers included
