"""The garbage collector in worker processes: start-up objects frozen, young objects let gather.

Each case runs in a fresh interpreter, so the test process keeps its own collector settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.strip()


def test_start_up_objects_are_frozen_and_young_ones_gather_before_a_pass() -> None:
    out = run(
        "import gc\n"
        "from workers import telemetry\n"
        "threshold, frozen = gc.get_threshold(), gc.get_freeze_count()\n"
        "telemetry.freeze_startup_objects()\n"
        "now = gc.get_threshold()\n"
        "print(now[0], now[1:] == threshold[1:], gc.get_freeze_count() > frozen)\n"
    )
    assert out == "50000 True True"


def test_a_pool_child_freezes_what_its_first_task_built_and_only_that() -> None:
    out = run(
        "import gc\n"
        "from workers import telemetry\n"
        "kept = [{'n': i} for i in range(5000)]\n"  # what a first task leaves behind: a client, a pool...
        "before = gc.get_freeze_count()\n"
        "telemetry._freeze_after_first_task()\n"
        "first = gc.get_freeze_count()\n"
        "later = [{'n': i} for i in range(5000)]\n"
        "telemetry._freeze_after_first_task()\n"
        "print(first - before >= 5000, gc.get_freeze_count() == first)\n"
    )
    assert out == "True True"
