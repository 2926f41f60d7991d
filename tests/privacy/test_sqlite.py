"""The privacy bookkeeping on the embedded SQLite store: urgent consent rows, erasure receipts, purge."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, ClassVar

from sqlalchemy import Engine, insert, select, update

from connectors.base import Connector, DeprovisionAction, Record, Result
from orchestrator import gdpr, migrations, sync
from orchestrator.db import identities, make_engine, now, outbox
from orchestrator.outbox import Kind, emit
from orchestrator.scim.storage import tombstone
from orchestrator.targets import parse_targets
from tests.hub import CUSTOMER


class Memory(Connector):
    """A target in a dict, remembering the order of calls."""

    kind = "memory"
    default_mapping: ClassVar[Mapping[str, str]] = {"email": "emails[primary eq true].value"}
    match_field = "email"
    supports_read = True

    def __init__(self) -> None:
        self.accounts: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []

    def upsert(self, record: Record) -> Result:
        self.calls.append(("upsert", record.identity_id))
        self.accounts[record.identity_id] = {**record.attributes, "on": True}
        return Result(record.identity_id, "updated")

    def deprovision(self, record: Record, action: DeprovisionAction) -> Result:
        self.calls.append((str(action), record.identity_id))
        if action in (DeprovisionAction.ERASE, DeprovisionAction.DELETE):
            self.accounts.pop(record.identity_id, None)
        else:
            self.accounts[record.identity_id]["on"] = False
        return Result(record.identity_id, "deprovisioned")

    def find(self, match_key: str) -> str | None:
        return None

    def read(self, remote_id: str) -> Mapping[str, Any] | None:
        return self.accounts.get(remote_id)

    def probe(self) -> None:
        return None


def _put(engine: Engine, uid: str, consent: bool) -> None:
    doc = {
        "userName": f"{uid}@example.test",
        "emails": [{"value": f"{uid}@example.test", "primary": True}],
        CUSTOMER: {"consents": [{"purpose": "marketing_email", "granted": consent}]},
    }
    with engine.begin() as conn:
        row = conn.execute(select(identities).where(identities.c.id == uid)).first()
        stamp = now()
        if row is None:
            conn.execute(
                insert(identities).values(
                    id=uid,
                    version=1,
                    user_name_ci=uid,
                    active=True,
                    doc=doc,
                    created_at=stamp,
                    updated_at=stamp,
                )
            )
            emit(conn, "User", uid, 1, Kind.CREATED, ["userName", f"{CUSTOMER}:consents"])
        else:
            conn.execute(
                update(identities).where(identities.c.id == uid).values(version=row.version + 1, doc=doc)
            )
            emit(conn, "User", uid, row.version + 1, Kind.UPDATED, [f"{CUSTOMER}:consents"])


def test_urgent_rows_receipts_and_purge_on_sqlite(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    migrations.upgrade(engine)
    (cfg,) = parse_targets(
        f"""
targets:
  - name: mem
    connector: webhook
    url: https://example.invalid/hook
    scope: '{CUSTOMER}:consents[purpose eq "marketing_email" and granted eq true]'
    priority_paths: [consents]
    on_delete: erase
    batch_size: 5
""",
        check_env=False,
    )
    target = Memory()
    ids = [str(uuid.uuid4()) for _ in range(12)]

    def flow() -> dict[str, list[str]]:
        with engine.begin() as conn:
            seqs = list(conn.scalars(select(outbox.c.seq).where(outbox.c.published_at.is_(None))))
            conn.execute(update(outbox).values(published_at=now()))
        return sync.fanout(engine, [cfg], seqs)

    _put(engine, ids[0], True)
    flow()
    sync.deliver(engine, cfg, target, [ids[0]], owner="a")
    for uid in ids[1:]:
        _put(engine, uid, True)
    flow()
    _put(engine, ids[0], False)  # withdrawn behind a backlog of 11
    assert flow() == {"mem": [ids[0]]}
    target.calls.clear()
    sync.deliver(engine, cfg, target, ids[1:6], owner="b")
    assert target.calls[0] == ("deactivate", ids[0])
    assert target.accounts[ids[0]]["on"] is False

    with engine.begin() as conn:
        tombstone(conn, "User", ids[1], 1)
    flow()
    sync.deliver(engine, cfg, target, [ids[1]], owner="c")
    assert ids[1] not in target.accounts
    receipt = gdpr.receipt(engine, ids[1])
    assert receipt["status"] == "complete"
    assert [(t["target"], t["confirmation"]) for t in receipt["targets"]] == [("mem", gdpr.VERIFIED_ABSENT)]
    assert gdpr.purge_expired(engine, now() + timedelta(days=3651))["erasure_receipts"] == 2
    engine.dispose()
