"""A busy relay publishes the commits of one linger together; a quiet one publishes a commit at once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import Engine

from orchestrator.relay import run_forever
from tests.pipeline.conftest import put_user, wait_for


@contextmanager
def relaying(engine: Engine, publish: Callable[[Sequence[int]], None]) -> Iterator[None]:
    """A relay with a long linger (2 s) runs in a thread while the block does."""
    stop = threading.Event()
    relay = threading.Thread(
        target=run_forever, args=(engine, publish), kwargs={"stop": stop, "poll_interval": 0.05, "linger": 2.0}
    )
    relay.start()
    try:
        yield
    finally:
        stop.set()
        relay.join(10)


def test_commits_arriving_together_go_out_as_one_batch(clean: Engine) -> None:
    batches: list[list[int]] = []
    with relaying(clean, lambda seqs: batches.append(list(seqs))):
        put_user(clean)
        wait_for(lambda: batches, timeout=10, what="the first commit published")
        for _ in range(5):
            put_user(clean)
        wait_for(lambda: sum(map(len, batches)) == 6, timeout=10, what="every commit published")
    # The first went out alone and at once; the five that followed within the linger, in one batch.
    assert [len(b) for b in batches] == [1, 5]


def test_commits_made_while_a_batch_goes_out_wait_for_the_next_linger(clean: Engine) -> None:
    batches: list[list[int]] = []

    def publish(seqs: Sequence[int]) -> None:
        if not batches:
            for _ in range(3):
                put_user(clean)  # committed while the first batch is being published
        batches.append(list(seqs))

    with relaying(clean, publish):
        put_user(clean)
        wait_for(lambda: batches, timeout=10, what="the first commit published")
        for _ in range(2):
            put_user(clean)
        wait_for(lambda: sum(map(len, batches)) == 6, timeout=10, what="every commit published")
    assert [len(b) for b in batches] == [1, 5]
