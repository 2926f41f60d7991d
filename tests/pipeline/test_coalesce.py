"""A coalescing delivery fills its batch with other pending rows of the target; the deliveries queued for
those rows then find nothing due."""

from __future__ import annotations

from sqlalchemy import Engine

from orchestrator import sync
from orchestrator.relay import drain
from orchestrator.targets import TargetConfig
from tests.pipeline.conftest import deliver_now, put_user
from tests.pipeline.recording import RecordingTarget


def _fan_out(engine: Engine, targets: list[TargetConfig]) -> None:
    drain(engine, lambda seqs: sync.fanout(engine, targets, list(seqs)) and None)


def test_a_small_delivery_takes_the_targets_other_pending_rows(
    clean: Engine, targets: list[TargetConfig], rec: RecordingTarget
) -> None:
    cfg = next(t for t in targets if t.name == "rec")  # batch size 20
    users = [put_user(clean) for _ in range(25)]
    _fan_out(clean, targets)
    plain = deliver_now(clean, cfg, users[:1])
    assert plain.done == users[:1]  # without coalescing, only what it was asked for
    report = deliver_now(clean, cfg, users[1:2], coalesce=cfg.batch_size)
    assert users[1] in report.done
    assert len(report.done) == cfg.batch_size  # topped up to one batch
    assert all(rec.by_hub_id(u) is not None for u in report.done)
    # A delivery enqueued for a row it took finds that row done, and takes what is left instead.
    late = deliver_now(clean, cfg, report.done[1:2], coalesce=cfg.batch_size)
    assert late.not_due == report.done[1:2]
    assert sorted(late.done) == sorted(set(users) - set(plain.done) - set(report.done))
