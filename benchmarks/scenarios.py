"""The scenarios of ``make bench``: drain, latency, resync, floor and naive. Each takes its sizes from the
environment, runs in a world of its own (``benchmarks.world.World``) and returns a JSON-ready dict."""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select

from benchmarks.hub import PREFIX, Connection, percentile
from benchmarks.world import APP_TOKEN, World, customer, env_float, env_int, env_kinds, phase
from connectors.base import Record
from connectors.errors import RetryableError
from connectors.registry import build
from orchestrator.db import identities, outbox
from orchestrator.mapping import compile_mapping, match_key
from orchestrator.targets import connector_settings, in_scope, load_targets

Scenario = Callable[[Path], dict[str, Any]]


def timeout() -> float:
    return env_float("BENCH_TIMEOUT", 1800)


def spread(samples: list[float]) -> dict[str, float]:
    """p50, p95, p99, max and mean of samples in seconds, in milliseconds."""
    if not samples:
        return {"count": 0}
    return {
        "count": len(samples),
        "p50_ms": round(percentile(samples, 0.50), 1),
        "p95_ms": round(percentile(samples, 0.95), 1),
        "p99_ms": round(percentile(samples, 0.99), 1),
        "max_ms": round(max(samples) * 1000, 1),
        "mean_ms": round(statistics.fmean(samples) * 1000, 1),
    }


def idhub_peak(processes: dict[str, dict[str, float]]) -> float:
    """The largest peak RSS of one idhub process (API, relay, beat, workers and their children, CLI)."""
    return max(
        (
            v["peak_rss_mb"]
            for r, v in processes.items()
            if not r.startswith(("target:", "redis", "naive", "postgres", "harness"))
        ),
        default=0.0,
    )


# ---------------------------------------------------------------------------------------------- drain


def drain(work: Path) -> dict[str, Any]:
    """N changes committed through SCIM Bulk with the pipeline stopped, then the pipeline started: the time
    until every target's ledger says synced."""
    n = env_int("BENCH_DRAIN_N", 50_000)
    with World(work / "drain", env_kinds()) as w:
        w.start_api()
        ingest = w.load(n)
        w.start_pipeline(relay=False)
        timeline: list[tuple[float, dict[str, int]]] = []
        expected = dict.fromkeys(w.kinds, n)
        with phase(w.monitor) as ph:
            w.start_relay()
            finished = w.wait_done(
                expected, timeout=timeout(), on_sample=lambda t, c: timeline.append((t, c))
            )
            ph["seconds"] = round(max(finished.values()), 3)
        seconds = ph["seconds"]
        stats, calls, held = w.sim_stats(), w.target_calls(), w.held()
        deliveries = sum(expected.values())
        return {
            "n": n,
            "targets": list(w.kinds),
            "ingest_seconds": round(ingest, 2),
            "ingest_per_s": round(n / ingest, 1),
            "seconds": seconds,
            "changes_per_s": round(n / seconds, 1),
            "deliveries_per_s": round(deliveries / seconds, 1),
            "per_target": {
                t: {
                    "seconds": round(finished[t], 2),
                    "records_per_s": round(n / finished[t], 1),
                    "hub_calls": calls.get(t),
                    "requests_received": stats.get(t, {}).get("requests"),
                    "held": held.get(t),
                }
                for t in w.kinds
            },
            "complete": all(held.get(t) == n for t in w.kinds),
            "timeline": [[round(t, 2), c] for t, c in timeline],
            "processes": ph["processes"],
            "machine_cpu_busy": ph.get("machine_cpu_busy"),
            "pg_size_mb": w.pg_size_mb(),
            "tuning": w.tuning.describe(),
        }


# -------------------------------------------------------------------------------------------- latency


async def _offer(base: str, token: str, rate: float, seconds: float, run: str) -> list[dict[str, Any]]:
    """POST new customers at a fixed rate (open loop: a slow answer never delays the next request).

    Over keep-alive connections of the lean client ``make bench-hub`` uses: an httpx client spent about 2 ms
    of CPU a request, a fifth of this machine at 200/s, taken from the hub it measures.
    """
    where = urlsplit(base)
    assert where.hostname is not None
    assert where.port is not None
    inflight = env_int("BENCH_LATENCY_INFLIGHT", 64)
    # Requests beyond ``inflight`` wait for a free connection here.
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(inflight):
        idle.put_nowait(Connection(where.hostname, where.port, token))
    sent: list[dict[str, Any]] = []

    async def one(i: int) -> None:
        body = customer(i, run, prefix="l")
        entry: dict[str, Any] = {"email": body["userName"].lower(), "sent": time.time()}
        connection = await idle.get()
        try:
            status, answer = await asyncio.wait_for(connection.request("POST", PREFIX + "/Users", body), 60)
            entry["status"] = status
            entry["id"] = answer.get("id") if status == 201 else None
        except (OSError, EOFError, RuntimeError, TimeoutError) as exc:
            entry["status"] = type(exc).__name__
            await connection.close()  # in an unknown state: the next request opens a new one
        finally:
            idle.put_nowait(connection)
        entry["answered"] = time.time()
        sent.append(entry)

    total = int(rate * seconds)
    started = time.perf_counter()
    tasks = []
    for i in range(total):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    while not idle.empty():
        await idle.get_nowait().close()
    return sent


def _app_created(w: World, prefix: str) -> dict[str, float]:
    """When the SCIM app created each account (its own ``meta.created``), by lower-cased userName."""
    out: dict[str, float] = {}
    headers = {"Authorization": f"Bearer {APP_TOKEN}"}
    start = 1
    with httpx.Client(base_url=w.urls["app"], headers=headers, timeout=120) as c:
        while True:
            page = c.get("/Users", params={"startIndex": start, "count": 1000}).json()
            resources = page.get("Resources") or []
            for r in resources:
                name = str(r.get("userName", "")).lower()
                if name.startswith(prefix):
                    out[name] = datetime.fromisoformat(
                        r["meta"]["created"].replace("Z", "+00:00")
                    ).timestamp()
            start += len(resources)
            if not resources or start > int(page.get("totalResults", 0)):
                return out


def latency(work: Path) -> dict[str, Any]:
    """Creates offered through the SCIM API at a fixed rate; commit -> applied per target, from the targets'
    own clocks (the simulators' recorders; scim2-server's meta.created when BENCH_APP says so)."""
    rate = env_float("BENCH_LATENCY_RATE", 200)
    seconds = env_float("BENCH_LATENCY_SECONDS", 60)
    warm = 50
    with World(work / "latency", env_kinds()) as w:
        w.start_api()
        w.start_pipeline()
        w.load(warm, prefix="w", batch=warm, concurrency=1)  # connectors built, pools warm
        w.wait_done(dict.fromkeys(w.kinds, warm), timeout=120, interval=0.2)
        w.record(True)
        timeline: list[tuple[float, dict[str, int]]] = []
        calls_before, tasks_before = w.target_calls(), w.counter("idhub_tasks")
        with phase(w.monitor) as ph:
            sent = asyncio.run(_offer(w.base, w.token, rate, seconds, w.run))
            ok = [s for s in sent if s["status"] == 201]
            w.wait_done(
                dict.fromkeys(w.kinds, warm + len(ok)),
                timeout=max(300.0, seconds * 5),
                interval=0.5,
                on_sample=lambda t, c: timeline.append((t, c)),
            )
        calls = {k: v - calls_before.get(k, 0.0) for k, v in w.target_calls().items()}
        tasks = {k: v - tasks_before.get(k, 0.0) for k, v in w.counter("idhub_tasks").items()}
        with w.engine.connect() as conn:
            ids = [s["id"] for s in ok]
            commits: dict[str, float] = {}
            for start in range(0, len(ids), 1000):
                q = select(outbox.c.resource_id, outbox.c.created_at).where(
                    outbox.c.resource_id.in_(ids[start : start + 1000]), outbox.c.version == 1
                )
                commits.update({r.resource_id: r.created_at.timestamp() for r in conn.execute(q)})
        applied = {k: {e: v[1] for e, v in by.items()} for k, by in w.applied().items()}
        if "app" in w.kinds and w.tuning.app == "scim2-server":
            applied["app"] = _app_created(w, "l")
        per_target: dict[str, list[float]] = {k: [] for k in w.kinds}
        missing: dict[str, int] = {}
        for s in ok:
            commit = commits.get(s["id"])
            for k in w.kinds:
                at = applied.get(k, {}).get(s["email"])
                if commit is None or at is None:
                    missing[k] = missing.get(k, 0) + 1
                else:
                    per_target[k].append(at - commit)
        everything = [x for v in per_target.values() for x in v]
        span = max(s["sent"] for s in sent) - min(s["sent"] for s in sent) if sent else 0.0
        # What the hub took in: when the API falls behind the offered rate, commits come slower than offered.
        committed = sorted(commits.values())
        commit_span = committed[-1] - committed[0] if len(committed) > 1 else 0.0
        return {
            "rate": rate,
            "seconds": seconds,
            "offered": len(sent),
            "accepted": len(ok),
            "achieved_rate": round(len(sent) / span, 1) if span else None,
            "committed_rate": round(len(committed) / commit_span, 1) if commit_span else None,
            "api": spread([s["answered"] - s["sent"] for s in sent]),
            "all": spread(everything),
            "per_target": {k: spread(v) for k, v in per_target.items()},
            "unmatched": missing,
            "hub_calls": calls,
            "tasks": {k: v for k, v in tasks.items() if v},
            "samples": {k: [round(x * 1000, 1) for x in v] for k, v in per_target.items()},
            "timeline": [[round(t, 2), c] for t, c in timeline],
            "processes": ph["processes"],
            "machine_cpu_busy": ph.get("machine_cpu_busy"),
            "tuning": w.tuning.describe(),
        }


# --------------------------------------------------------------------------------------------- resync


def _short(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else str(n)


def resync(work: Path) -> dict[str, Any]:
    """A full resync (``idhub resync --target app``) of 10,000 and of 100,000 customers to the SCIM app.

    The customers are created through the hub (SCIM Bulk); the app and the ledger are then seeded directly as
    a finished first sync would leave them (``World.seed_app``): a first provisioning is what the drain
    measures, not this.
    The workers and beat are restarted for each size, so each size's peak RSS is its own.
    """
    sizes = sorted({int(s) for s in os.environ.get("BENCH_RESYNC_SIZES", "10000,100000").split(",")})
    out: dict[str, Any] = {
        "sizes": sizes,
        "how": "idhub resync --target app (orchestrator.admin.resync), after seeding app and ledger directly",
    }
    with World(work / "resync", kinds=("app",)) as w:
        w.start_api()
        for size in sizes:
            w.stop(*[r for r in list(w.procs) if r.startswith("worker") or r == "beat"])
            ingest = w.load(size - w.loaded)
            seeding = time.perf_counter()
            w.seed_app()
            seeding = time.perf_counter() - seeding
            w.start_pipeline(relay=False)
            calls_before = w.target_calls().get("app", 0.0)
            timeline: list[tuple[float, dict[str, int]]] = []
            with phase(w.monitor) as ph:
                cli = w.idhub(f"resync-{size}", "resync", "--target", "app", "--json")
                w.wait_done(
                    {"app": size},
                    timeout=timeout(),
                    on_sample=lambda t, c, seen=timeline: seen.append((t, c)),  # type: ignore[misc]
                    also=lambda cli=cli: cli.poll() is not None,  # type: ignore[misc]
                )
            calls = w.target_calls().get("app", 0.0) - calls_before
            out[f"n{size}"] = {
                "seconds": ph["seconds"],
                "records_per_s": round(size / ph["seconds"], 1),
                "cli_exit": cli.returncode,
                "hub_calls": calls,
                "records_per_call": round(size / calls, 1) if calls else None,
                "peak_rss_mb": idhub_peak(ph["processes"]),
                "processes": ph["processes"],
                "machine_cpu_busy": ph.get("machine_cpu_busy"),
                "load_seconds": round(ingest, 2),
                "seed_seconds": round(seeding, 2),
                "timeline": [[round(t, 2), c] for t, c in timeline],
            }
        out["held"] = w.held().get("app")
        out["pg_size_mb"] = w.pg_size_mb()
        out["tuning"] = w.tuning.describe()
    if len(sizes) >= 2:
        small, big = sizes[0], sizes[-1]
        ratio = round(out[f"n{big}"]["seconds"] / out[f"n{small}"]["seconds"], 2)
        out[f"ratio_{_short(big)}_{_short(small)}"] = ratio
        out["ratio"] = ratio
        out["size_ratio"] = big / small
    return out


# ---------------------------------------------------------------------------------------------- floor


def floor(work: Path) -> dict[str, Any]:
    """The same upserts sent by a bare script straight to the same targets: connectors, the same batch
    sizes, pooled connections, one thread per target (BENCH_FLOOR_THREADS); no queue, no ledger."""
    n = env_int("BENCH_FLOOR_N", env_int("BENCH_DRAIN_N", 50_000))
    threads_per_target = env_int("BENCH_FLOOR_THREADS", 1)
    with World(work / "floor", env_kinds()) as w:
        os.environ.update({k: v for k, v in w.env.items() if k.startswith("BENCH_") and k.endswith("TOKEN")})
        cfgs = load_targets(w.targets_file)
        docs = [(str(uuid.uuid4()), customer(i, w.run)) for i in range(n)]
        seconds: dict[str, float] = {}
        errors: dict[str, int] = {}
        calls: dict[str, int] = {}
        waits: dict[str, int] = {}

        def push(cfg: Any, part: int) -> None:
            connector = connectors[cfg.name]
            mapper = compile_mapping(cfg.mapping or connector.default_mapping)
            mine = docs[part::threads_per_target]
            size = max(1, min(cfg.batch_size, connector.max_batch)) if connector.supports_batch else 1
            records = []
            for ident, doc in mine:
                if in_scope(cfg, doc):
                    attrs = mapper(doc)
                    key = match_key(attrs, connector.match_field)
                    # Never sent before, as idhub marks a first provisioning: no lookup ahead of the create.
                    records.append(Record(ident, 1, attrs, match_key=key, first_attempt=True))
            for start in range(0, len(records), size):
                chunk = records[start : start + size]
                while True:
                    calls[cfg.name] = calls.get(cfg.name, 0) + 1
                    try:
                        results = connector.upsert_many(chunk) if size > 1 else [connector.upsert(chunk[0])]
                        break
                    except RetryableError as exc:
                        # A bare script too must wait as the target says (the CRM's ten-second limit).
                        waits[cfg.name] = waits.get(cfg.name, 0) + 1
                        time.sleep(exc.retry_after or 1.0)
                errors[cfg.name] = errors.get(cfg.name, 0) + sum(isinstance(r, Exception) for r in results)
            seconds[cfg.name] = max(seconds.get(cfg.name, 0.0), time.perf_counter() - began)

        connectors = {c.name: build(c.connector, connector_settings(c)) for c in cfgs}
        for c in connectors.values():
            c.probe()  # connections open and the SCIM app's features read, as in a running worker
        with phase(w.monitor) as ph:
            began = time.perf_counter()
            pool = [
                threading.Thread(target=push, args=(cfg, part))
                for cfg in cfgs
                for part in range(threads_per_target)
            ]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
        held = w.held()
        for c in connectors.values():
            c.close()
        total = ph["seconds"]
        return {
            "n": n,
            "threads_per_target": threads_per_target,
            "seconds": total,
            "changes_per_s": round(n / total, 1),
            "deliveries_per_s": round(n * len(cfgs) / total, 1),
            "per_target": {
                t: {
                    "seconds": round(s, 2),
                    "calls": calls.get(t),
                    "rate_limited": waits.get(t, 0),
                    "errors": errors.get(t),
                    "held": held.get(t),
                }
                for t, s in seconds.items()
            },
            "complete": all(held.get(t) == n for t in w.kinds),
            "processes": ph["processes"],
            "machine_cpu_busy": ph.get("machine_cpu_busy"),
        }


# ---------------------------------------------------------------------------------------------- naive


def naive(work: Path) -> dict[str, Any]:
    """The textbook design on the same machine: one task per change per target, one request per record."""
    n = env_int("BENCH_NAIVE_N", 5_000)
    with World(work / "naive", env_kinds()) as w:
        w.env["BENCH_NAIVE_BROKER"] = w.naive_broker
        w.start_api()
        w.load(n)
        with w.engine.connect() as conn:
            ids = list(conn.scalars(select(identities.c.id).order_by(identities.c.id)))
        from benchmarks import naive as textbook

        client = textbook.make_app(w.naive_broker)
        import redis

        counter = redis.Redis.from_url(w.naive_broker)
        groups = ["naive"] * len(w.tuning.groups)  # as many worker processes as idhub runs
        w.start_workers(app="benchmarks.naive", prefix="naive", groups=groups)
        total = n * len(w.kinds)
        timeline: list[tuple[float, int]] = []
        with phase(w.monitor) as ph:
            began = time.perf_counter()
            for ident in ids:  # the textbook API enqueues one task per target as each change commits
                for kind in w.kinds:
                    client.send_task("naive.sync", args=[kind, ident], queue=textbook.QUEUE)
            deadline = began + timeout()
            while True:
                finished = int(counter.get(textbook.DONE) or 0) + int(counter.get(textbook.FAILED) or 0)
                timeline.append((time.perf_counter() - began, finished))
                if finished >= total:
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"naive: {finished} of {total} tasks after {timeout():.0f}s")
                time.sleep(0.5)
        failed = int(counter.get(textbook.FAILED) or 0)
        counter.close()
        client.close()
        stats, held = w.sim_stats(), w.held()
        seconds = ph["seconds"]
        return {
            "n": n,
            "tasks": total,
            "failed": failed,
            "seconds": seconds,
            "changes_per_s": round(n / seconds, 1),
            "deliveries_per_s": round(total / seconds, 1),
            "requests_received": {k: v.get("requests") for k, v in stats.items()},
            "held": held,
            "complete": all(held.get(t) == n for t in w.kinds),
            "timeline": [[round(t, 2), c] for t, c in timeline],
            "processes": ph["processes"],
            "machine_cpu_busy": ph.get("machine_cpu_busy"),
        }


SCENARIOS: dict[str, Scenario] = {
    "drain": drain,
    "floor": floor,
    "naive": naive,
    "latency": latency,
    "resync": resync,
}
