"""A busy relay publishes the commits of one linger together; a quiet one publishes a commit at once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, event, insert, select, update

from orchestrator.db import now, outbox
from orchestrator.relay import drain, relay_once, run_forever
from tests.pipeline.conftest import put_user, wait_for


def _batch_sizes(
    engine: Engine, then: int, total: int, during_first: Callable[[], None] = lambda: None
) -> list[int]:
    """Under a relay with a long linger (2 s): one commit, ``then`` more once it is out (``during_first`` runs
    while the first batch is being published); the sizes of the batches that carried all ``total``."""
    batches: list[list[int]] = []

    def publish(seqs: Sequence[int]) -> None:
        if not batches:
            during_first()
        batches.append(list(seqs))

    stop = threading.Event()
    options = {"stop": stop, "poll_interval": 0.05, "linger": 2.0}
    relay = threading.Thread(target=run_forever, args=(engine, publish), kwargs=options)
    relay.start()
    try:
        put_user(engine)
        wait_for(lambda: batches, timeout=10, what="the first commit published")
        for _ in range(then):
            put_user(engine)
        wait_for(lambda: sum(map(len, batches)) == total, timeout=10, what="every commit published")
    finally:
        stop.set()
        relay.join(10)
    return [len(b) for b in batches]


def test_commits_arriving_together_go_out_as_one_batch(clean: Engine) -> None:
    # The first went out alone and at once; the five that followed within the linger, in one batch.
    assert _batch_sizes(clean, then=5, total=6) == [1, 5]


def test_commits_made_while_a_batch_goes_out_wait_for_the_next_linger(clean: Engine) -> None:
    def three_more() -> None:
        for _ in range(3):
            put_user(clean)

    assert _batch_sizes(clean, then=2, total=6, during_first=three_more) == [1, 5]


def test_the_sweepers_drain_leaves_fresh_commits_to_the_relay(clean: Engine) -> None:
    # The sweeper publishes what the relay left behind; racing the relay for what was just committed sent
    # those out a commit or two at a time.
    old, fresh = put_user(clean), put_user(clean)
    with clean.begin() as conn:
        conn.execute(
            update(outbox).where(outbox.c.resource_id == old).values(created_at=now() - timedelta(minutes=2))
        )
    published: list[int] = []
    assert drain(clean, published.extend, older_than=now() - timedelta(minutes=1)) == 1
    with clean.connect() as conn:
        ids = {r.resource_id: r.seq for r in conn.execute(select(outbox.c.resource_id, outbox.c.seq))}
    assert published == [ids[old]]
    assert drain(clean, published.extend) == 1  # the relay's own drain takes the rest
    assert published == [ids[old], ids[fresh]]


def test_a_relay_claims_a_backlog_through_the_index_without_statistics(clean: Engine) -> None:
    # Without statistics PostgreSQL put the unpublished events at a few rows and read and sorted all of them
    # for every batch: a backlog cost in proportion to its size squared.
    stamp = now()
    rows = [
        {
            "event_id": str(uuid.uuid4()),
            "resource_type": "User",
            "resource_id": str(uuid.uuid4()),
            "version": 1,
            "kind": "created",
            "changed": ["userName"],
            "created_at": stamp,
        }
        for _ in range(5000)
    ]
    with clean.begin() as conn:
        conn.execute(insert(outbox), rows)
    sent: list[tuple[str, Any]] = []

    def spy(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if statement.startswith("SELECT outbox.seq") or statement.startswith("SET LOCAL"):
            sent.append((statement, params))

    event.listen(clean, "before_cursor_execute", spy)
    try:
        assert relay_once(clean, lambda seqs: None, batch=500) == 500
    finally:
        event.remove(clean, "before_cursor_execute", spy)
    with clean.begin() as conn:
        for statement, params in sent:  # as the relay sent them, in one transaction
            if statement.startswith("SET"):
                conn.exec_driver_sql(statement, params)
            else:
                plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {statement}", params).scalars())
    assert "ix_outbox_unpublished" in plan
    assert "Sort" not in plan
