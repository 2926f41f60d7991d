"""Global rate limits and concurrency caps on the real Redis: shared by processes, expiring when abandoned."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from workers.limits import ConcurrencySlots, RateLimiter, SlotUnavailable, admit


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def take_all(limiter: RateLimiter, target: str, rate: float) -> int:
    """How many single requests are let through right now, until the first refusal."""
    taken = 0
    while limiter.acquire(target, rate) == 0:
        taken += 1
        assert taken < 1000, "the limit never refused"
    return taken


def test_a_window_lets_its_count_through_then_says_how_long_to_wait(client: redis.Redis) -> None:
    limiter = RateLimiter(client)
    start = time.monotonic()
    taken = take_all(limiter, "app", 20)
    took = time.monotonic() - start
    assert taken == 20 or took >= 1.0
    wait = limiter.acquire("app", 20)
    assert 1.0 - took - 0.05 < wait <= 1.0  # the first of them leaves the window a second after it went
    # Refused requests count for nothing, and another target has its own window.
    assert limiter.acquire("other", 20) == 0


def test_requests_leave_the_window_as_it_slides(client: redis.Redis) -> None:
    limiter = RateLimiter(client)
    start = time.monotonic()
    take_all(limiter, "app", 20)
    time.sleep(0.5)
    if time.monotonic() - start < 0.95:
        assert take_all(limiter, "app", 20) == 0  # half a second on, all twenty are still in the window
    time.sleep(max(0.0, limiter.acquire("app", 20)))
    assert take_all(limiter, "app", 20) >= 1
    time.sleep(1.05)  # every request so far has left the window
    begun = time.monotonic()
    taken = take_all(limiter, "app", 20)
    assert taken == 20 or time.monotonic() - begun >= 1.0


def test_rate_objects_and_big_batches_leave_a_debt(client: redis.Redis) -> None:
    from orchestrator.targets import Rate  # here, so spawned children need not import the hub

    limiter = RateLimiter(client)
    rate = Rate.parse("20/s")
    assert limiter.acquire("crm", rate, n=50) == 0  # an empty window lets a request over the count go ...
    wait = limiter.acquire("crm", rate, n=1)
    assert 1.5 < wait <= 1.6  # ... dating the 30 beyond it ahead, 50 ms apart: 1.5 s of debt, then 1 s


def test_wait_blocks_until_admitted_or_times_out(client: redis.Redis) -> None:
    limiter = RateLimiter(client)
    start = time.monotonic()
    take_all(limiter, "app", 20)
    assert limiter.wait("app", 20, timeout=0.0) is False
    assert limiter.wait("app", 20, timeout=2.0) is True
    assert time.monotonic() - start < 1.5


def _hammer(redis_url: str, seconds: float, start: Any, out: multiprocessing.Queue[list[float]]) -> None:
    client = redis.Redis.from_url(redis_url)
    limiter = RateLimiter(client)
    start.wait(timeout=30)
    admitted: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        wait = limiter.acquire("shared", 20)
        if wait == 0:
            admitted.append(time.time())
        else:
            time.sleep(min(wait, 0.01))
    out.put(admitted)
    client.close()


def test_two_processes_share_one_window(redis_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[list[float]] = ctx.Queue()
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_hammer, args=(redis_url, 1.5, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    assert all(results), "each process got some requests through"
    stamps = sorted(t for r in results for t in r)
    span = stamps[-1] - stamps[0]
    # Global, not per process: never more than 20 in any second (two private windows would let 40 through),
    # give or take one for the processes' clocks against Redis's, and together they still use most of it.
    busiest = max(sum(1 for u in stamps if t <= u < t + 1.0) for t in stamps)
    assert busiest <= 21, busiest
    assert len(stamps) >= 20 * span * 0.7, (len(stamps), span)


def test_slots_cap_concurrency_and_release(client: redis.Redis) -> None:
    slots = ConcurrencySlots(client)
    tokens = [slots.acquire("app", 2, ttl=30) for _ in range(3)]
    assert tokens[0]
    assert tokens[1]
    assert tokens[2] is None
    assert slots.held("app") == 2
    # Asking again with a held token refreshes it rather than taking a third slot.
    assert slots.acquire("app", 2, ttl=30, token=tokens[0]) == tokens[0]
    assert slots.held("app") == 2
    slots.release("app", tokens[0])
    assert slots.held("app") == 1
    assert slots.acquire("app", 2, ttl=30) is not None


def test_an_abandoned_slot_expires(client: redis.Redis) -> None:
    slots = ConcurrencySlots(client)
    dead_worker = slots.acquire("app", 1, ttl=0.3)
    assert dead_worker is not None
    assert slots.acquire("app", 1, ttl=30) is None
    deadline = time.monotonic() + 3.0
    while (token := slots.acquire("app", 1, ttl=30)) is None:
        assert time.monotonic() < deadline, "the abandoned slot never expired"
        time.sleep(0.05)
    assert slots.refresh("app", dead_worker, ttl=30) is False
    assert slots.refresh("app", token, ttl=30) is True


def test_slot_context_manager_waits_then_gives_up(client: redis.Redis) -> None:
    slots = ConcurrencySlots(client)
    with slots.slot("app", 1, ttl=10) as token:
        assert slots.held("app") == 1
        with pytest.raises(SlotUnavailable), slots.slot("app", 1, ttl=10, wait=0.1):
            pass
        assert token
    assert slots.held("app") == 0
    with slots.slot("app", 1, ttl=10, wait=0.1):
        assert slots.held("app") == 1


def test_a_slot_outlives_its_ttl_while_its_block_runs(client: redis.Redis) -> None:
    slots = ConcurrencySlots(client)
    with slots.slot("app", 1, ttl=0.3):
        # Three TTLs later the block still holds it: the keeper refreshed it meanwhile.
        deadline = time.monotonic() + 0.9
        while time.monotonic() < deadline:
            assert slots.acquire("app", 1, ttl=30) is None
            time.sleep(0.05)
    assert slots.held("app") == 0


def _hold_slot(
    redis_url: str, hold: float, start: Any, out: multiprocessing.Queue[tuple[float, float]]
) -> None:
    client = redis.Redis.from_url(redis_url)
    start.wait(timeout=30)
    with ConcurrencySlots(client).slot("shared", 2, ttl=10, wait=10):
        began = time.time()
        time.sleep(hold)
        out.put((began, time.time()))
    client.close()


def test_slots_hold_across_processes(redis_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[tuple[float, float]] = ctx.Queue()
    start = ctx.Barrier(4)
    procs = [ctx.Process(target=_hold_slot, args=(redis_url, 0.3, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    spans = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    # All four asked at once: two went in together, and at no moment were more than two inside.
    inside = [sum(1 for s, e in spans if s <= begin < e) for begin, _ in spans]
    assert max(inside) == 2, spans


def test_a_rate_limit_counts_requests_and_a_batch_is_one(client: redis.Redis) -> None:
    from orchestrator.targets import Rate

    limiter = RateLimiter(client)
    rate = Rate.parse("190/10s")  # HubSpot's: 190 requests in any 10 s
    ids = [f"id{i}" for i in range(250)]
    # Batches of 100: 250 records are three requests, so 63 such deliveries fit in the window.
    for _ in range(63):
        admitted, wait = admit(limiter, "crm", rate, ids, 100)
        assert (admitted, wait) == (ids, 0.0)
    admitted, wait = admit(limiter, "crm", rate, ids, 100)
    assert admitted == []
    assert 9.0 < wait <= 10.0  # until the first of them leaves the window
    # One record a request: a delivery takes at most what the window lets through, and leaves the rest.
    admitted, wait = admit(limiter, "webhook", rate, ids, 1)
    assert (admitted, wait) == (ids[:190], 0.0)


def test_less_than_one_request_a_period_is_one_in_a_longer_one(client: redis.Redis) -> None:
    from orchestrator.targets import Rate

    limiter = RateLimiter(client)
    assert limiter.acquire("slow", Rate.parse("0.5/s")) == 0
    assert 1.9 < limiter.acquire("slow", Rate.parse("0.5/s")) <= 2.0
