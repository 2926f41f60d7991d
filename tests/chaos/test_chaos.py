"""The chaos run at its small size: 400 changes through real PostgreSQL, Redis, Celery and four targets while
workers are SIGKILLed, Redis and PostgreSQL restart, a target goes down and the others fail; then nothing may
be lost, stale or duplicated, the dead letters are exactly the refused records and every erasure completed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.check import differing, switched_on

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_small_chaos_run_loses_nothing(tmp_path: Path) -> None:
    # A process of its own: it starts and kills servers, and its report is what a person would read.
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--small", "--report", str(out)],
        cwd=ROOT,
        capture_output=True,
        timeout=170,
    )
    assert out.exists(), done.stderr.decode()[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    summary = {k: report.get(k) for k in ("lost", "stale", "duplicate_remote_accounts", "crashes", "work")}
    assert report["changes_sent"] == 400, summary
    assert report["converged"], report["backlog_at_end"]
    assert report["lost"] == 0, report["details"]["lost"]
    assert report["stale"] == 0, report["details"]["stale"]
    assert report["duplicate_remote_accounts"] == 0, report["details"]["duplicate_remote_accounts"]
    assert report["details"]["hub_differs_from_what_was_sent"]["count"] == 0
    dead = report["dead_letters"]
    assert dead["expected"] == dead["found"] == 2, dead
    assert dead["unexpected"] == dead["missing"] == []
    assert report["erasures"]["confirmed"] == report["erasures"]["requested"] > 0, report["details"][
        "erasures"
    ]
    assert report["crashes"] == []
    faults = report["faults"]
    assert faults["worker_kills"] + faults["pool_child_kills"] >= 1
    assert faults["redis_restarts"] == faults["postgres_restarts"] == faults["redis_cutoffs"] == 1
    assert report["ok"], summary
    assert done.returncode == 0


def test_comparison_sees_a_stale_attribute_and_nothing_else() -> None:
    payload = {"properties": {"email": "A@x.example", "firstname": "Ann", "phone": None}}
    held = {"properties": {"email": "a@x.example", "firstname": "Ann", "lastname": "extra"}}
    assert differing(payload, held, "properties.email") == []  # the key case-folded; None is absent
    held["properties"]["firstname"] = "Old"
    assert differing(payload, held, "properties.email") == ["properties.firstname"]
    assert differing({"emails": [{"value": "b", "primary": True}]}, {"emails": [{"value": "c"}]}, "u") == [
        "emails"
    ]


def test_switched_on_reads_each_target_in_its_own_terms() -> None:
    assert switched_on("scim", {"active": True})
    assert not switched_on("scim", {"active": False})
    assert not switched_on("shop", {"meta_data": {"idhub_status": "deactivated"}})
    assert switched_on("crm", {"properties": {"idhub_status": "active"}})
    assert not switched_on("newsletter", {"status": "unsubscribed"})
