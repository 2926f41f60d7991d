"""The tasks, by stable name. Arguments are ids only; each body calls plain functions."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from typing import Any, TypeVar, cast

from orchestrator import relay, sync
from orchestrator.db import now
from workers.app import app
from workers.base import IdhubTask, log
from workers.limits import ConcurrencySlots, RateLimiter, SlotUnavailable, admit

# A delivery held back by a rate limit or a busy concurrency slot comes back after at most this long.
REQUEUE_MAX = 2.0
F = TypeVar("F", bound=Callable[..., Any])


def _task(name: str) -> Callable[[F], F]:
    """Register a task under its stable name, on the idhub base class (typed: Celery is not)."""
    return cast(Callable[[F], F], app.task(name=name, base=IdhubTask, bind=True))


@_task("idhub.fanout")
def fanout(self: IdhubTask, seqs: list[int]) -> None:
    self.enqueue_deliveries(sync.fanout(self.engine, list(self.targets().values()), seqs))


@_task("idhub.deliver")
def deliver(self: IdhubTask, target: str, identity_ids: list[str]) -> None:
    if not isinstance(identity_ids, list) or not all(isinstance(i, str) for i in identity_ids):
        log.error("task dropped: identity_ids must be a list of ids", task="idhub.deliver")
        return
    cfg = self.targets().get(target)
    if cfg is None:
        # A target removed from the configuration: its rows wait in the ledger for an operator.
        log.warning("task dropped: unknown target", task="idhub.deliver", target=str(target)[:64])
        return
    ids = identity_ids
    lease = self.tuning.lease_seconds
    # The embedded broker has no Redis: there, rate limits and slots are not enforced (the demo only).
    store = self.redis()
    fill = cfg.batch_size
    if store is not None and cfg.rate_limit is not None:
        per_call = sync.records_per_call(cfg, self.connector(target))
        ids, wait = admit(RateLimiter(store), target, cfg.rate_limit, ids, per_call)
        if wait > 0:
            self.enqueue_deliveries(
                {target: identity_ids}, countdown=min(wait, REQUEUE_MAX), reason="rate_limited"
            )
            return
        # Other pending rows ride along only where the requests paid for have room: they cost no tokens.
        fill = min(fill, -(-len(ids) // per_call) * per_call)
    try:
        with (
            ConcurrencySlots(store).slot(target, cfg.concurrency, ttl=self.tuning.slot_ttl_seconds)
            if store is not None
            else nullcontext()
        ):
            self.deliver_batch(cfg, ids, lease, fill)
    except SlotUnavailable:
        self.enqueue_deliveries({target: identity_ids}, countdown=0.2, reason="busy")
        return
    if len(ids) < len(identity_ids):
        self.enqueue_deliveries({target: identity_ids[len(ids) :]})


@_task("idhub.probe")
def probe(self: IdhubTask, target: str) -> None:
    cfg = self.targets().get(target)
    if cfg is None:
        log.warning("task dropped: unknown target", task="idhub.probe", target=str(target)[:64])
        return
    if due := sync.probe(self.engine, cfg, self.connector(target)):
        self.enqueue_deliveries({target: due})


@_task("idhub.relay")
def relay_task(self: IdhubTask) -> int:
    return relay.drain(self.engine, self.publisher())


@_task("idhub.sweep")
def sweep(self: IdhubTask) -> dict[str, Any]:
    tuning, stamp = self.tuning, now()
    stale = timedelta(seconds=tuning.stale_after_seconds)
    # What the relay left behind (it is down, or was), not what it is about to publish: racing it for fresh
    # commits sent them out one or two at a time, a fan-out task each, for as long as they kept coming.
    published = relay.drain(self.engine, self.publisher(), older_than=stamp - stale)
    republished = relay.republish_stale(self.engine, self.publisher(), older_than=stamp - stale)
    found = sync.sweep(self.engine, list(self.targets().values()), stamp, stale_after=stale)
    self.enqueue_deliveries(found.due)
    for target in found.probes:
        self.app.send_task("idhub.probe", args=[target])
    return {
        "published": published,
        "republished": republished,
        "due": {t: len(i) for t, i in found.due.items()},
        "probes": found.probes,
    }
