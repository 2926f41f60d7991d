"""``make bench``: the end-to-end benchmark on real PostgreSQL, Redis, Celery workers and loopback targets.

    python -m benchmarks [--scenario drain|latency|resync|floor|naive|all]

Sizes come from the environment, so a quick run and a full run use the same code:

    BENCH_DRAIN_N (50000)          changes committed, then drained to the four targets
    BENCH_LATENCY_RATE (200)       creates per second offered through the SCIM API ...
    BENCH_LATENCY_SECONDS (60)     ... for this long
    BENCH_RESYNC_SIZES (10000,100000)  customers resynced to the SCIM app, one resync per size
    BENCH_FLOOR_N (BENCH_DRAIN_N)  upserts the bare script sends; BENCH_FLOOR_THREADS (1) per target
    BENCH_NAIVE_N (5000)           changes the textbook design syncs
    BENCH_SERVER_WORKERS (2), BENCH_WORKER_GROUPS ("fanout,admin;targets"), BENCH_WORKER_CONCURRENCY (3),
    BENCH_WORKER_POOL (prefork), BENCH_BATCH_SIZE (500), BENCH_SWEEP_INTERVAL (5), BENCH_TIMEOUT (1800)
    BENCH_TARGET_CONCURRENCY (one per worker process serving target queues): deliveries in flight per target
    BENCH_APP_UPDATE_METHOD (unset: PATCH): "put" has the SCIM connector update the app by PUT
    BENCH_APP (sandbox): what serves the SCIM app, the sandbox's SCIM simulator or "scim2-server"
    BENCH_CRM_LIMIT (250): requests per rolling 10 s the CRM simulator allows (HubSpot: 100, 190 or 250)

Results are merged into ``build/bench/results.json`` (a scenario run alone replaces only its own part), the
table is printed, and ``latency.png`` / ``throughput.png`` are drawn next to it. Each scenario's processes
and logs live in ``build/bench/<scenario>/`` while it runs; everything it started is stopped at its end,
also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.scenarios import SCENARIOS

ORDER = ("drain", "floor", "naive", "latency", "resync")


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds every World, which stops what it started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="all", choices=[*ORDER, "all"])
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    chosen = ORDER if args.scenario == "all" else (args.scenario,)
    results = report.load_previous()
    results["env"] = report.environment()
    failed = []
    for name in chosen:
        print(f"bench: {name} ...", flush=True)
        started = time.perf_counter()
        try:
            result = SCENARIOS[name](Path(report.OUT / name).resolve())
        except KeyboardInterrupt:
            print("bench: interrupted; every process it started is stopped", file=sys.stderr)
            return 130
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        result["commit"] = results["env"]["commit"]
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        results[name] = result
        report.add_ratios(results)
        report.save(results)
        print(f"bench: {name} done in {result['wall_seconds']:.0f}s", flush=True)
    path = report.save(results)
    print()
    print(report.table(results))
    for chart in report.charts(results):
        print(f"bench: wrote {chart}")
    print(f"bench: wrote {path}")
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
