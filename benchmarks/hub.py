"""Hub benchmark: SCIM creates, PATCHes, filtered GETs and Bulk against PostgreSQL over HTTP with keep-alive.

Starts ``idhub serve`` on a fresh PostgreSQL database, loads customers through Bulk, then drives each
operation from concurrent keep-alive connections and prints one JSON document of rates and latencies.
Sizes come from the environment: BENCH_CUSTOMERS (default 100000), BENCH_OPS (default 5000 per kind),
BENCH_CONCURRENCY (default 16), BENCH_SERVER_WORKERS (default 2).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

from tests.conftest import create_pg_database, drop_pg_database
from tests.hub import SCIM, USER_SCHEMA, free_port, wait_http

BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def customer(i: int, run: str) -> dict[str, Any]:
    return {
        "schemas": [USER_SCHEMA],
        "userName": f"c{i}-{run}@bench.example",
        "name": {"givenName": f"G{i}", "familyName": f"F{i}"},
        "emails": [{"value": f"c{i}-{run}@bench.example", "primary": True}],
        "active": True,
    }


async def drive(name: str, count: int, concurrency: int, call: Any) -> dict[str, float]:
    """Run ``call(i)`` ``count`` times from ``concurrency`` workers; rate and latency figures."""
    latencies: list[float] = []
    counter = iter(range(count))

    async def worker() -> None:
        for i in counter:
            start = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        f"{name}_per_s": round(count / elapsed, 1),
        f"{name}_p50_ms": round(percentile(latencies, 0.50), 2),
        f"{name}_p99_ms": round(percentile(latencies, 0.99), 2),
        f"{name}_mean_ms": round(statistics.fmean(latencies) * 1000, 2),
    }


async def run(base: str, token: str) -> dict[str, Any]:
    customers = env_int("BENCH_CUSTOMERS", 100_000)
    ops = env_int("BENCH_OPS", 5000)
    concurrency = env_int("BENCH_CONCURRENCY", 16)
    run_id = uuid.uuid4().hex[:6]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": SCIM}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: dict[str, Any] = {"customers": customers, "ops": ops, "concurrency": concurrency}
    async with httpx.AsyncClient(
        base_url=f"{base}/scim/v2", headers=headers, limits=limits, timeout=60
    ) as client:
        batch = 500

        async def bulk(i: int) -> None:
            operations = [
                {"method": "POST", "path": "/Users", "bulkId": f"b{j}", "data": customer(j, run_id)}
                for j in range(i * batch, min((i + 1) * batch, customers))
            ]
            r = await client.post("/Bulk", json={"schemas": [BULK], "Operations": operations})
            r.raise_for_status()
            failed = [op for op in r.json()["Operations"] if op["status"] != "201"]
            assert not failed, failed[:1]

        n_batches = -(-customers // batch)
        started = time.perf_counter()
        figures = await drive("bulk_request", n_batches, 4, bulk)
        results["bulk_resources_per_s"] = round(customers / (time.perf_counter() - started), 1)
        results["bulk_request_p50_ms"] = figures["bulk_request_p50_ms"]
        results["bulk_request_p99_ms"] = figures["bulk_request_p99_ms"]

        ids: list[str] = []

        async def create(i: int) -> None:
            r = await client.post("/Users", json=customer(customers + i, run_id))
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])

        results.update(await drive("create", ops, concurrency, create))

        async def patch(i: int) -> None:
            body = {
                "schemas": [PATCH],
                "Operations": [{"op": "replace", "path": "nickName", "value": f"n{i}"}],
            }
            r = await client.patch(f"/Users/{ids[i % len(ids)]}", json=body)
            assert r.status_code == 200, r.text

        results.update(await drive("patch", ops, concurrency, patch))

        async def lookup(i: int) -> None:
            wanted = f"c{(i * 7919) % customers}-{run_id}@bench.example"
            r = await client.get("/Users", params={"filter": f'userName eq "{wanted}"'})
            assert r.status_code == 200, r.text
            assert r.json()["totalResults"] == 1

        results.update(await drive("filtered_get", ops, concurrency, lookup))
    return results


def main() -> int:
    url = create_pg_database("idhub_bench")
    port = free_port()
    env = {**os.environ, "IDHUB_DATABASE_URL": url, "IDHUB_BULK_MAX_OPERATIONS": "1000"}
    idhub = [sys.executable, "-m", "orchestrator.cli"]
    server = None
    try:
        token = subprocess.run(
            [*idhub, "token", "create", "bench", "--scope", "admin"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        workers = str(env_int("BENCH_SERVER_WORKERS", 2))
        server = subprocess.Popen([*idhub, "serve", "--port", str(port), "--workers", workers], env=env)
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=30)
        results = asyncio.run(run(f"http://127.0.0.1:{port}", token))
        engine = create_engine(url)
        with engine.connect() as conn:
            results["stored_customers"] = conn.execute(text("SELECT count(*) FROM identities")).scalar_one()
            results["outbox_events"] = conn.execute(text("SELECT count(*) FROM outbox")).scalar_one()
        engine.dispose()
        results["env"] = {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "server_workers": int(workers),
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip(),
        }
        out = Path("build/bench")
        out.mkdir(parents=True, exist_ok=True)
        (out / "hub.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        return 0
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
        drop_pg_database(url)


if __name__ == "__main__":
    sys.exit(main())
