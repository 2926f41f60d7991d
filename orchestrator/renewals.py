"""Periodic renewals (a delivery's lease, its concurrency slot) on one daemon thread per process.

A thread started and stopped around every delivery cost a worker near a tenth of its CPU under a stream of
small deliveries (the start, and the wake-up that ends it). Here a delivery only registers a call for as long
as it runs. A call may still run once just after its ``with`` block ends; renewals are fenced by their owner
or token, so a late one changes nothing.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Renewals:
    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked worker starts its own thread

    def _reset(self) -> None:
        self._wake = threading.Condition()
        self._calls: dict[int, tuple[float, float, Callable[[], None]]] = {}  # key: (due, every, call)
        self._sleeping_until = float("inf")
        self._thread: threading.Thread | None = None
        self._keys = itertools.count(1)

    @contextmanager
    def every(self, seconds: float, call: Callable[[], None]) -> Iterator[None]:
        """Run ``call`` every ``seconds`` on the renewal thread while the ``with`` block runs."""
        due = time.monotonic() + seconds
        with self._wake:
            key = next(self._keys)
            self._calls[key] = (due, seconds, call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="idhub-renewals", daemon=True)
                self._thread.start()
            elif due < self._sleeping_until:
                self._wake.notify()
        try:
            yield
        finally:
            with self._wake:
                self._calls.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                due = [(k, c) for k, c in self._calls.items() if c[0] <= now]
                for key, (_, seconds, call) in due:
                    self._calls[key] = (now + seconds, seconds, call)
                if not due:
                    until = min((c[0] for c in self._calls.values()), default=None)
                    self._sleeping_until = until if until is not None else float("inf")
                    self._wake.wait(None if until is None else until - now)
                    self._sleeping_until = float("inf")
                    continue
            for _, (_, _, call) in due:
                try:
                    call()
                except Exception:  # one failed renewal must not stop the others; the next beat tries again
                    log.warning("a renewal failed", exc_info=True)


renewals = Renewals()
