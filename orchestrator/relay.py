"""The outbox relay: hands committed change events to the broker in order, at least once.

``publish`` is any callable taking a batch of outbox sequence numbers (the workers pass one that sends
``idhub.fanout`` tasks); it runs inside the claiming transaction, so a crash after it re-sends the batch,
which consumers tolerate because fan-out is idempotent.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import select as selectmod
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, bindparam, delete, insert, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.type_api import TypeEngine

from orchestrator.db import InList, is_postgres, now, outbox, row_params, row_source
from orchestrator.ledger import outbox_inflight

CHANNEL = "idhub_outbox"
# Seconds between two publishes of a busy relay: a fifth of the 500 ms delivery-latency goal at most.
LINGER = 0.1

Publish = Callable[[Sequence[int]], None]
log = logging.getLogger(__name__)


def notify(conn: Connection) -> None:
    """Wake the relays when ``conn``'s transaction commits (PostgreSQL NOTIFY; a no-op on SQLite)."""
    if is_postgres(conn):
        conn.execute(text(f"NOTIFY {CHANNEL}"))


def relay_once(
    engine: Engine, publish: Publish, *, batch: int = 500, older_than: datetime | None = None
) -> int:
    """Publish one batch of unpublished events (made before ``older_than``, if given) in seq order and mark
    them published; returns how many."""
    with engine.begin() as conn:
        query = (
            select(outbox.c.seq).where(outbox.c.published_at.is_(None)).order_by(outbox.c.seq).limit(batch)
        )
        if older_than is not None:
            query = query.where(outbox.c.created_at < older_than)
        if is_postgres(conn):
            # Several relays may run: each claims a disjoint batch instead of waiting on the others' locks.
            query = query.with_for_update(skip_locked=True)
            # The batch's first rows straight from the index of unpublished events, not every unpublished
            # event read and sorted: PostgreSQL chose that whenever its statistics (none yet, or made when
            # little was unpublished) put the backlog at a few rows. A claim in a 50,000-event backlog took
            # 10 ms of its CPU, 1 through the index.
            conn.exec_driver_sql("SET LOCAL enable_sort = off")
        seqs = list(conn.scalars(query))
        if not seqs:
            return 0
        stamp = now()
        postgres = is_postgres(conn)
        conn.execute(_MARK_PUBLISHED, {"seqs": seqs, "stamp": stamp})
        rows = row_params(_SEQ, [{"seq": s} for s in seqs], {"stamp": stamp}, postgres=postgres)
        conn.execute(_inflight(postgres), rows)
        publish(seqs)
    return len(seqs)


_MARK_PUBLISHED = update(outbox).where(InList(outbox.c.seq, "seqs")).values(published_at=bindparam("stamp"))
_SEQ: dict[str, TypeEngine[Any]] = {"seq": BigInteger()}


@functools.cache
def _inflight(postgres: bool) -> Any:
    row = row_source(_SEQ, postgres=postgres)
    stamp = bindparam("stamp", type_=outbox_inflight.c.published_at.type)
    return insert(outbox_inflight).from_select(["seq", "published_at"], select(row["seq"], stamp))


def republish_stale(engine: Engine, publish: Publish, *, older_than: datetime, batch: int = 500) -> int:
    """Publish again events whose fan-out has not committed since ``older_than`` (a broker lost them)."""
    with engine.begin() as conn:
        query = (
            select(outbox_inflight.c.seq)
            .where(outbox_inflight.c.published_at < older_than)
            .order_by(outbox_inflight.c.seq)
            .limit(batch)
        )
        if is_postgres(conn):
            query = query.with_for_update(skip_locked=True)
        seqs = list(conn.scalars(query))
        if not seqs:
            return 0
        conn.execute(
            update(outbox_inflight).where(outbox_inflight.c.seq.in_(seqs)).values(published_at=now())
        )
        publish(seqs)
    return len(seqs)


def fanned_out(conn: Connection, seqs: Sequence[int]) -> None:
    """Record, in the fan-out's own transaction, that these events need no re-publishing."""
    conn.execute(_FANNED_OUT, {"seqs": list(seqs)})


_FANNED_OUT = delete(outbox_inflight).where(InList(outbox_inflight.c.seq, "seqs"))


def drain(engine: Engine, publish: Publish, *, batch: int = 500, older_than: datetime | None = None) -> int:
    """Relay until nothing is left unpublished (made before ``older_than``, if given); returns how many events
    were published."""
    total = 0
    while (count := relay_once(engine, publish, batch=batch, older_than=older_than)) > 0:
        total += count
    return total


def _publish_due(engine: Engine, publish: Publish, batch: int) -> int:
    """Publish what is unpublished, going on only while batches come full: what commits while a batch goes
    out waits for the next linger, instead of leaving at once in a batch of its own."""
    total = 0
    while (count := relay_once(engine, publish, batch=batch)) > 0:
        total += count
        if count < batch:
            break
    return total


def run_forever(
    engine: Engine,
    publish: Publish,
    *,
    poll_interval: float | None = None,
    batch: int = 500,
    stop: threading.Event | None = None,
    linger: float = LINGER,
) -> None:
    """Relay until ``stop`` is set: woken by LISTEN/NOTIFY on PostgreSQL, polling behind it always.

    It publishes at most once per ``linger`` seconds: after a quiet spell a commit goes out at once, but under
    a steady stream of single-change commits those of one ``linger`` go out together, so one fan-out task
    (and one delivery per target) carries many changes instead of one each."""
    stop = stop or threading.Event()
    postgres = engine.dialect.name == "postgresql"
    interval = poll_interval if poll_interval is not None else (1.0 if postgres else 0.2)
    listener: Connection | None = None
    last = float("-inf")
    try:
        while not stop.is_set():
            stop.wait(max(0.0, last + linger - time.monotonic()))
            try:
                if _publish_due(engine, publish, batch):
                    last = time.monotonic()
            except Exception:
                # The database or the broker is away for a moment: keep relaying once it is back.
                log.exception("relay: batch failed")
                stop.wait(interval)
                continue
            if postgres:
                listener = _wait_listening(engine, listener, interval, stop)
            else:
                stop.wait(interval)
    finally:
        _discard(listener)


def _wait_listening(
    engine: Engine, listener: Connection | None, timeout: float, stop: threading.Event
) -> Connection | None:
    """Wait up to ``timeout`` for a NOTIFY on ``listener`` (made first when None); returns the listener to
    use next time, or None when it was lost (a database restart): the relay then polls until it is back."""
    try:
        if listener is None:
            listener = _listen(engine)
        _wait_notify(listener, timeout)
        return listener
    except Exception:
        log.warning("relay: no LISTEN connection; polling until the database is back")
        _discard(listener)
        stop.wait(timeout)
        return None


def _listen(engine: Engine) -> Connection:
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    conn.execute(text(f"LISTEN {CHANNEL}"))
    return conn


def _discard(listener: Connection | None) -> None:
    """Close a listening connection that may already be dead (invalidated first: no rollback is tried)."""
    if listener is None:
        return
    with contextlib.suppress(Exception):
        listener.invalidate()
    with contextlib.suppress(Exception):
        listener.close()


def _wait_notify(conn: Connection, timeout: float) -> None:
    raw = conn.connection.dbapi_connection
    assert raw is not None
    # psycopg 3: wait on the socket, then drain the queued notifications without blocking.
    deadline = time.monotonic() + timeout
    selectmod.select([raw.fileno()], [], [], max(0.0, deadline - time.monotonic()))
    for _ in raw.notifies(timeout=0, stop_after=1000):
        pass
