"""One renewal thread per process runs every registered call at its pace, and only while it is registered."""

from __future__ import annotations

import os
import time

from orchestrator.renewals import Renewals


def test_each_call_runs_at_its_pace_only_inside_its_block() -> None:
    renewals = Renewals()
    fast: list[float] = []
    slow: list[float] = []
    with renewals.every(0.05, lambda: fast.append(time.monotonic())):
        with renewals.every(0.2, lambda: slow.append(time.monotonic())):
            time.sleep(0.5)
        ended = len(slow)
        time.sleep(0.3)
    stopped = len(fast)
    time.sleep(0.2)
    assert 5 <= stopped <= 17  # 0.8 s at 0.05 s, on a busy machine
    assert len(fast) == stopped  # none after its block
    assert 1 <= ended <= 3  # 0.5 s at 0.2 s
    assert len(slow) == ended  # none after its block, though the other call went on


def test_a_failing_call_does_not_stop_the_others() -> None:
    renewals = Renewals()
    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise RuntimeError("the store is away")

    with renewals.every(0.05, broken), renewals.every(0.05, lambda: calls.append("ok")):
        time.sleep(0.3)
    assert calls.count("broken") >= 3
    assert calls.count("ok") >= 3


def test_a_forked_child_renews_on_a_thread_of_its_own() -> None:
    renewals = Renewals()
    with renewals.every(0.05, lambda: None):
        time.sleep(0.1)  # the parent's thread runs
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread did not come along
        count = []
        with renewals.every(0.05, lambda: count.append(1)):
            time.sleep(0.3)
        os.write(write, str(len(count)).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert int(os.read(read, 16) or b"0") >= 3
