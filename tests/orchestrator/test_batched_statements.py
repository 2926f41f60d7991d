"""Statements over many ids or rows: the same answers on both dialects, one statement text on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.sql.type_api import TypeEngine

from orchestrator import sync
from orchestrator.db import InList, identities, is_postgres, make_engine, now, row_params, row_source

meta = MetaData()
things = Table(
    "things",
    meta,
    Column("id", String(36), primary_key=True),
    Column("n", BigInteger),
    Column("s", String(16)),
)
COLUMNS: dict[str, TypeEngine[Any]] = {"k_id": String(), "v_n": BigInteger(), "v_s": String()}


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    engine = make_engine(store_url, custom_plans=True)
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(things), [{"id": f"id{i}", "n": 0, "s": "old"} for i in range(50)])
    yield engine
    engine.dispose()


def _statements(engine: Engine) -> list[tuple[str, bool]]:
    """What the engine sends from now on: (statement, whether as an executemany); SQLite's BEGIN left out."""
    sent: list[tuple[str, bool]] = []

    def seen(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if not statement.startswith("BEGIN"):
            sent.append((statement, many))

    event.listen(engine, "before_cursor_execute", seen)
    return sent


def test_an_id_list_finds_its_rows_with_one_statement_text_whatever_its_length(engine: Engine) -> None:
    sent = _statements(engine)
    query = select(things.c.id).where(InList(things.c.id, "ids"))
    with engine.connect() as conn:
        for ids in (["id1"], ["id2", "id3", "nobody"], [f"id{i}" for i in range(0, 50, 2)], []):
            assert sorted(conn.scalars(query, {"ids": ids})) == sorted(i for i in ids if i != "nobody")
    texts = {statement for statement, _ in sent}
    if is_postgres(engine):
        assert len(texts) == 1  # prepared once per connection by psycopg
        assert "ANY" in texts.pop()
    else:
        assert len(texts) > 1  # an IN list of each length


def test_rows_apply_in_one_statement_on_postgresql_and_one_per_row_elsewhere(engine: Engine) -> None:
    postgres = is_postgres(engine)
    row = row_source(COLUMNS, postgres=postgres)
    stmt = update(things).where(things.c.id == row["k_id"]).values(n=row["v_n"], s=row["v_s"])
    rows = [{"k_id": f"id{i}", "v_n": i * 10, "v_s": None if i == 3 else f"s{i}"} for i in range(1, 6)]
    rows.append({"k_id": "nobody", "v_n": 1, "v_s": "x"})
    sent = _statements(engine)
    with engine.begin() as conn:
        changed = conn.execute(stmt, row_params(COLUMNS, rows, {}, postgres=postgres))
    assert changed.rowcount == 5
    assert len(sent) == 1
    assert sent[0][1] is not postgres  # one UPDATE from arrays, else an executemany of one per row
    with engine.connect() as conn:
        now = {r.id: (r.n, r.s) for r in conn.execute(select(things))}
    assert [now[f"id{i}"] for i in range(7)] == [
        (0, "old"),
        (10, "s1"),
        (20, "s2"),
        (30, None),
        (40, "s4"),
        (50, "s5"),
        (0, "old"),
    ]


def _lookup_on_a_grown_table(engine: Engine) -> tuple[int, str]:
    """The fan-out's and the deliveries' lookup of identities, run twenty times for twenty ids while the table
    holds five customers, as at a first start, then 5,000 customers in it: the generic plans PostgreSQL made
    for the lookup and the plan its next run gets."""
    identities.create(engine)
    stamp = now()

    def customers(prefix: str, n: int) -> list[dict[str, Any]]:
        doc = {"userName": "someone", "pad": "p" * 600}  # as wide as a customer's document
        return [
            {"id": f"{prefix}{i}", "version": 1, "user_name": f"{prefix}{i}", "user_name_ci": f"{prefix}{i}"}
            | {"active": True, "doc": doc, "created_at": stamp, "updated_at": stamp}
            for i in range(n)
        ]

    try:
        with engine.connect() as conn:
            conn.execute(insert(identities), customers("first", 5))
            for _ in range(20):
                conn.execute(sync._CURRENT_USERS, {"ids": [f"id{i}" for i in range(20)]}).all()
            conn.execute(insert(identities), customers("id", 5000))
            conn.commit()
            name, generic = conn.exec_driver_sql(
                "SELECT name, generic_plans FROM pg_prepared_statements"
                " WHERE statement LIKE '%%FROM identities%%ANY%%'"
            ).one()
            plan = conn.exec_driver_sql(f"EXPLAIN EXECUTE {name}('{{id1,id2}}')").all()
        return int(generic), "\n".join(line for (line,) in plan)
    finally:
        identities.drop(engine)


def test_postgresql_plans_each_lookup_for_its_ids(engine: Engine) -> None:
    if not is_postgres(engine):
        pytest.skip("plan caching is PostgreSQL's")
    # psycopg prepares a statement from its sixth run, and PostgreSQL may keep a generic plan for it from
    # the sixth run on: made for the table as it was, blind to how many ids come, until an ANALYZE.
    plain = create_engine(engine.url)
    try:
        generic, plan = _lookup_on_a_grown_table(plain)
    finally:
        plain.dispose()
    assert generic > 0
    assert "Seq Scan" in plan
    generic, plan = _lookup_on_a_grown_table(engine)
    assert generic == 0
    assert "Index" in plan


def test_a_delivery_s_outcomes_are_joined_by_key_however_many_rows(engine: Engine) -> None:
    """Recording 500 outcomes against a ledger whose statistics say no row is leased: the rows sent are joined
    by their keys, not compared one by one with each row found. Fenced by a constant owner, PostgreSQL
    expected one row of the target to match, scanned them all for it and compared each with every row sent
    (120 µs a row instead of 18)."""
    if not is_postgres(engine):
        pytest.skip("PostgreSQL's planner")
    sync.sync_ledger.create(engine)
    stamp = now()
    row = {"resource_type": "User", "desired_version": 1, "desired_action": "upsert", "status": "pending"}
    row |= {"attempts": 0, "priority": 0, "created_at": stamp, "updated_at": stamp}
    with engine.begin() as conn:
        for target in ("app", "shop", "newsletter", "crm"):
            conn.execute(
                insert(sync.sync_ledger),
                [{"target": target, "identity_id": f"u{i}", **row} for i in range(20_000)],
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE sync_ledger")
    ok = [
        {"k_id": f"u{i}", "v_version": 1, "v_action": "upsert", "v_status": "synced"}
        | {"v_remote": f"r{i}", "v_digest": "d", "v_inflight": None}
        for i in range(500)
    ]
    mine = {"k_target": "app", "k_owner": "worker:1:task", "v_now": stamp}
    statement = sync._record_success(True).compile(dialect=engine.dialect)
    params = statement.construct_params(row_params(sync._RECORDED, ok, mine, postgres=True))
    with engine.connect() as conn:
        plan = "\n".join(line for (line,) in conn.exec_driver_sql(f"EXPLAIN {statement}", params))
    assert "Join Filter" not in plan, plan
