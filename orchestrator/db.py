"""The identity store's tables and engine. SQL stays portable between PostgreSQL and SQLite."""

from __future__ import annotations

import functools
import threading
import time
from collections import namedtuple
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Final

from psycopg.types.array import ListBinaryDumper
from pydantic_core import from_json, to_json
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    any_,
    bindparam,
    column,
    create_engine,
    event,
    exc,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Connection, Result
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.type_api import TypeEngine
from sqlalchemy.sql.visitors import InternalTraversal

metadata = MetaData()

Json = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def now() -> datetime:
    return datetime.now(UTC)


identities = Table(
    "identities",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("version", BigInteger, nullable=False),
    # Indexed copies of what filters and uniqueness need; NULL on a tombstone.
    Column("user_name", String(256)),
    Column("user_name_ci", String(256)),
    Column("external_id", String(256)),
    Column("email_ci", String(320)),
    Column("active", Boolean),
    # The SCIM document without id and meta; {} on a tombstone.
    Column("doc", Json, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("deleted_at", DateTime(timezone=True)),
    Index("ux_identities_user_name_ci", "user_name_ci", unique=True),
    Index("ix_identities_external_id", "external_id"),
    Index("ix_identities_email_ci", "email_ci"),
    Index("ix_identities_updated_at", "updated_at"),
)

groups = Table(
    "groups",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("display_name", String(256)),
    Column("display_name_ci", String(256)),
    Column("external_id", String(256)),
    Column("doc", Json, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("deleted_at", DateTime(timezone=True)),
    Index("ix_groups_display_name_ci", "display_name_ci"),
    Index("ix_groups_external_id", "external_id"),
)

# Members live in their own table so that a segment of 100,000 customers is not one JSON document.
group_members = Table(
    "group_members",
    metadata,
    Column("group_id", String(36), ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True),
    Column("member_id", String(36), primary_key=True),
    Column("member_type", String(16), nullable=False),
    Column("display", String(256)),
    Index("ix_group_members_member_id", "member_id"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("seq", BigId, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("resource_type", String(16), nullable=False),
    Column("resource_id", String(36), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("kind", String(24), nullable=False),
    # Attribute paths only, never values.
    Column("changed", Json, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("published_at", DateTime(timezone=True)),
    Index(
        "ix_outbox_unpublished",
        "seq",
        postgresql_where=Column("published_at").is_(None),
        sqlite_where=Column("published_at").is_(None),
    ),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("scopes", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_used_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Transactions are begun by hand (see _sqlite_begin), not by the driver.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets the API, the relay and workers read while one of them writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # A deferred transaction that reads and then writes fails at once with "database is locked" when
    # another process wrote meanwhile; taking the write lock up front makes writers queue on busy_timeout.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _json_text(value: Any) -> str:
    return to_json(value).decode()


def make_engine(url: str, *, custom_plans: bool = False, **kwargs: Any) -> Engine:
    """An engine for a store URL, tuned per dialect; ``custom_plans``: see ``_custom_plans``."""
    # SQL errors would otherwise carry the statement's values (personal data) into logs and reports.
    kwargs.setdefault("hide_parameters", True)
    # Documents and events go in and out as JSON on every write and read: on a customer's document pydantic's
    # encoder takes a quarter of json.dumps's time and its decoder half of json.loads's, for the same values.
    kwargs.setdefault("json_serializer", _json_text)
    kwargs.setdefault("json_deserializer", from_json)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    engine = create_engine(url, **kwargs)
    event.listen(engine, "connect", _binary_arrays)
    if custom_plans:
        event.listen(engine, "connect", _custom_plans)
    if not kwargs.get("pool_pre_ping"):
        _ping_when_idle(engine)
    return engine


def _binary_arrays(dbapi_connection: Any, _record: Any) -> None:
    """Lists go to PostgreSQL as binary arrays: psycopg escapes each element of a text array in Python, and
    the batched statements pass one list per column (the seven of a 250-record delivery's outcome took 2.5 ms
    to dump as text, 0.5 ms as binary)."""
    adapters = getattr(dbapi_connection, "adapters", None)  # psycopg 3
    if adapters is not None:
        adapters.register_dumper(list, ListBinaryDumper)


def _custom_plans(dbapi_connection: Any, _record: Any) -> None:
    """Plan each execution for its own parameters (PostgreSQL's ``plan_cache_mode``): for the pipeline's
    processes, whose statements take lists of ids and rows.

    psycopg prepares a statement run five times on a connection, and PostgreSQL may then keep one generic plan
    for it, made for the table as it was and blind to how many ids an ``= ANY(:ids)`` brings. It stays until
    an ANALYZE of the table, which may never come: the fan-out's first lookups of identities, at a handful
    of customers, left a sequential scan that every later lookup ran (3.4 ms a call at 12,000 customers
    instead of 0.25, and 5.2 instead of 0.27 for marking events published; 13.6 s of PostgreSQL's time in
    a minute at 200 changes a second). Planning a statement that serves a batch costs little beside that.
    The API keeps generic plans: its statements look up one key each, and planning every one cost
    PostgreSQL 0.03 to 0.09 ms more a request."""
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET plan_cache_mode = force_custom_plan")
    dbapi_connection.autocommit = autocommit


# ``pool_pre_ping`` costs a round trip on every checkout, as many as a filtered GET needs for itself. A
# connection checked in moments ago is alive but for a server restart in between: the request that meets such
# a dead connection fails, and SQLAlchemy then invalidates every older connection of the pool, so one request
# pays, not many.
_PING_AFTER_IDLE_SECONDS: Final = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection at checkout only when it sat idle for a while."""

    def checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info["idhub_idle_since"] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idhub_idle_since")
        if idle_since is not None and time.monotonic() - idle_since < _PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            # The pool discards the connection and checks out (or opens) another.
            raise exc.DisconnectionError("the pooled connection is gone") from error

    event.listen(engine.pool, "checkin", checkin)
    event.listen(engine.pool, "checkout", checkout)


_engines: dict[tuple[str, bool, bool], Engine] = {}
_lock = threading.Lock()


def engine_for(url: str, *, custom_plans: bool = False, autocommit: bool = False) -> Engine:
    """The process-wide engine of a URL, made once; ``autocommit``: one whose connections commit every
    statement by itself, for statements that need no transaction around them."""
    with _lock:
        key = (url, custom_plans, autocommit)
        if key not in _engines:
            options = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
            _engines[key] = make_engine(url, custom_plans=custom_plans, **options)
        return _engines[key]


def dispose_engines(url: str) -> None:
    """Close and forget the process-wide engines of a URL (a database about to be dropped)."""
    with _lock:
        engines = [_engines.pop(key) for key in list(_engines) if key[0] == url]
    for engine in engines:
        engine.dispose()


def is_postgres(bind: Engine | Connection) -> bool:
    return bind.dialect.name == "postgresql"


@functools.cache
def _tuple_class(keys: tuple[str, ...]) -> Any:
    return namedtuple("Row", keys)


def light_rows(result: Result[Any]) -> list[Any]:
    """A result's rows as named tuples, for code that reads their columns by name many times: SQLAlchemy's
    ``Row`` takes 0.57 µs an attribute, a named tuple 0.03 (a delivery reads a ledger row's columns about
    25 times)."""
    make = _tuple_class(tuple(result.keys()))._make
    return [make(row) for row in result.all()]


@contextmanager
def unwrapped(engine: Engine) -> Iterator[Connection]:
    """A connection for reads, or for one statement, without BEGIN and COMMIT around it on PostgreSQL: two
    round trips fewer, each a wake-up of the server. SQLite's connections keep their transactions."""
    with engine.connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT") if is_postgres(engine) else conn


# The ledger's statements look up a few hundred ids at a time, and PostgreSQL picks the index for them from
# its statistics. Without fresh ones it assumes each id matches 0.5 % of the table, so it scanned the whole
# ledger for them: at 200,000 rows a fan-out's lookup took 37 ms instead of 4 and a claim 15 ms instead of 7
# (worse under load). autovacuum refreshes them where it runs, but lags while a first load grows the ledger
# from nothing and never comes where it is off: once the table has more than doubled (and a thousand rows)
# since its statistics were made, the sweeper analyzes it. Growth, not changes: a row's status moving on
# changes no lookup's plan, and counting changes had the sweeper analyze a busy ledger on almost every pass
# (about 200 ms of PostgreSQL's CPU at 80,000 rows, every 5 s: at 200 changes a second, a latency spike).
_GROWTH: Final = 2.0
_STALE_ROWS: Final = 1000
_ANALYZED: Final = ("sync_ledger",)
_SAMPLE_TARGET: Final = 10  # ANALYZE samples 300 rows per unit


def refresh_statistics(engine: Engine) -> list[str]:
    """ANALYZE the tables (PostgreSQL) whose statistics lag far behind their contents; returns their names."""
    if not is_postgres(engine):
        return []
    # reltuples is the row count the statistics were made at (-1: never made).
    stale = text(
        "SELECT s.relname FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid"
        " WHERE s.relname IN :names AND s.schemaname = current_schema()"
        " AND s.n_live_tup > :rows + :growth * greatest(c.reltuples, 0)"
    ).bindparams(bindparam("names", expanding=True))
    with unwrapped(engine) as conn:
        names = list(conn.scalars(stale, {"names": _ANALYZED, "rows": _STALE_ROWS, "growth": _GROWTH}))
    for name in names:
        with engine.begin() as conn:
            # A sample of 3,000 rows, not 30,000: the ledger's lookups need its size and how few rows an id
            # matches, which a small sample tells as well. The default's took 150 to 250 ms of a core at
            # 80,000 to 120,000 rows, this one 13 to 20 ms: less taken from deliveries under a steady stream.
            conn.exec_driver_sql(f"SET LOCAL default_statistics_target = {_SAMPLE_TARGET}")
            conn.exec_driver_sql(f"ANALYZE {name}")  # a name of ours, not input
    return names


# -- statements over many ids or rows at once ----------------------------------------------------------------
# On PostgreSQL such a statement takes a list as one array parameter: its text is then the same whatever the
# list's length, so psycopg prepares it once per connection and PostgreSQL parses and plans it once, where an
# IN list of each length is a statement of its own (psycopg even re-parses a long one on every call). Rows
# applied one statement each (an executemany) cost a statement each besides: about 30 us of the client's CPU
# and 20 of PostgreSQL's a row, against 6 and 9 through ``unnest`` for 250 rows. SQLite keeps the portable
# forms.


class InList(ColumnElement[bool]):
    """``column IN :name`` of the list bound under ``name``; ``column = ANY(:name)`` on PostgreSQL."""

    inherit_cache = True
    _traverse_internals = [  # what SQLAlchemy's statement cache keys on
        ("column", InternalTraversal.dp_clauseelement),
        ("name", InternalTraversal.dp_string),
    ]
    type = Boolean()

    def __init__(self, column: ColumnElement[Any], name: str) -> None:
        self.column, self.name = column, name


@compiles(InList)
def _in_list(element: InList, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column.in_(bindparam(element.name, expanding=True)), **kw))


@compiles(InList, "postgresql")
def _any_of_array(element: InList, compiler: Any, **kw: Any) -> str:
    array = bindparam(element.name, type_=ARRAY(element.column.type))
    return str(compiler.process(element.column == any_(array), **kw))


def row_source(columns: Mapping[str, TypeEngine[Any]], *, postgres: bool) -> dict[str, ColumnElement[Any]]:
    """Where a statement applying many rows reads each row's values: on PostgreSQL the columns of ``unnest``
    over one array parameter per column, elsewhere one bind parameter per column for an executemany. The
    statement is built once per dialect; ``row_params`` binds the rows for it."""
    if not postgres:
        return {name: bindparam(name, type_=kind) for name, kind in columns.items()}
    arrays = [bindparam(name, type_=ARRAY(kind)) for name, kind in columns.items()]
    rows = func.unnest(*arrays).table_valued(*(column(n, k) for n, k in columns.items())).render_derived("v")
    return {name: rows.c[name] for name in columns}


def row_params(
    columns: Mapping[str, TypeEngine[Any]],
    rows: Sequence[Mapping[str, Any]],
    shared: Mapping[str, Any],
    *,
    postgres: bool,
) -> dict[str, Any] | list[dict[str, Any]]:
    """The parameters of a ``row_source`` statement: a list per column on PostgreSQL, else a dict per row. A
    column named in ``shared`` takes that value in every row."""
    if postgres:
        return {
            **shared,
            **{
                name: [shared[name]] * len(rows) if name in shared else [row[name] for row in rows]
                for name in columns
            },
        }
    return [{**row, **shared} for row in rows]


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One unit of work: commits on success, rolls back on any error."""
    with engine.begin() as conn:
        yield conn
