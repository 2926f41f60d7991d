"""A busy relay publishes the commits of one linger together; a quiet one publishes a commit at once."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from sqlalchemy import Engine

from orchestrator.relay import run_forever
from tests.pipeline.conftest import put_user, wait_for


def test_commits_arriving_together_go_out_as_one_batch(clean: Engine) -> None:
    batches: list[list[int]] = []

    def publish(seqs: Sequence[int]) -> None:
        batches.append(list(seqs))

    stop = threading.Event()
    relay = threading.Thread(
        target=run_forever, args=(clean, publish), kwargs={"stop": stop, "poll_interval": 0.05, "linger": 2.0}
    )
    relay.start()
    try:
        put_user(clean)
        wait_for(lambda: batches, timeout=10, what="the first commit published")
        for _ in range(5):
            put_user(clean)
        wait_for(lambda: sum(map(len, batches)) == 6, timeout=10, what="every commit published")
    finally:
        stop.set()
        relay.join(10)
    # The first went out alone and at once; the five that followed within the linger, in one batch.
    assert [len(b) for b in batches] == [1, 5]


def test_commits_made_while_a_batch_goes_out_wait_for_the_next_linger(clean: Engine) -> None:
    batches: list[list[int]] = []

    def publish(seqs: Sequence[int]) -> None:
        if not batches:
            for _ in range(3):
                put_user(clean)  # committed while the first batch is being published
        batches.append(list(seqs))

    stop = threading.Event()
    relay = threading.Thread(
        target=run_forever, args=(clean, publish), kwargs={"stop": stop, "poll_interval": 0.05, "linger": 2.0}
    )
    relay.start()
    try:
        put_user(clean)
        wait_for(lambda: batches, timeout=10, what="the first commit published")
        for _ in range(2):
            put_user(clean)
        wait_for(lambda: sum(map(len, batches)) == 6, timeout=10, what="every commit published")
    finally:
        stop.set()
        relay.join(10)
    assert [len(b) for b in batches] == [1, 5]
