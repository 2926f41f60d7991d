"""scim2-server storage on SQLAlchemy: Users in ``identities``, Groups in ``groups`` + ``group_members``.

Every write happens on the connection of the current request (``bind``) and leaves an outbox event in the
same transaction, so a committed change always has its event and a rolled-back one never does.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, lru_cache
from typing import Any, NamedTuple, cast

from psycopg import OperationalError as DriverOperationalError
from psycopg.errors import IntegrityError as DriverIntegrityError
from psycopg.types.json import Jsonb
from pydantic import TypeAdapter
from pydantic_core import to_json
from scim2_models import (
    InvalidValueException,
    Meta,
    NotFoundException,
    NotImplementedException,
    PreconditionFailedException,
    Resource,
    ResourceType,
    ResponseParameters,
    ScimProvider,
    SearchRequest,
    UniquenessException,
)
from scim2_server.storage import ScimStorage, SearchPage
from sqlalchemy import (
    JSON,
    ColumnElement,
    Executable,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ClauseElement

from orchestrator.db import group_members, groups, identities, now, outbox
from orchestrator.outbox import Kind, emit, event_row


@dataclass
class _Batch:
    """User creations of one Bulk request, held back to be written in two statements instead of two each.

    ``names`` are the userNames held back since the last flush, so a second creation of one name in the
    request is refused at once, as the first one's insert would refuse it. Clashes with stored rows only show
    at the flush: then ``clashed`` is set and the request is served again one operation at a time.
    """

    identities: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    clashed: bool = False


@dataclass
class _Unit:
    """One request's unit of work: its connection, whether it writes, and the rows it has locked."""

    conn: Connection
    write: bool
    rows: dict[tuple[str, str], Any] = field(default_factory=dict)
    # Rows are read without locks and each write is one statement that checks the version it read.
    optimistic: bool = False
    batch: _Batch | None = None
    # What each resource ``create`` and ``update`` returned was stored as, by the returned object's id().
    written: dict[int, Written] = field(default_factory=dict)


@dataclass(frozen=True)
class Written:
    """A resource as this request stored it: its document and its meta as a response carries it."""

    resource: Resource[Any]
    doc: dict[str, Any]
    meta: dict[str, Any]


def written(resource: Resource[Any]) -> Written | None:
    """How ``resource``, as ``create`` or ``update`` returned it in this request, was stored; None if not."""
    unit = _current.get()
    found = unit.written.get(id(resource)) if unit is not None else None
    return found if found is not None and found.resource is resource else None


class BatchClash(Exception):
    """A held-back creation met a stored userName: the request must run again without batching."""


class StaleRow(Exception):
    """An unlocked read-modify-write found its row changed, or its new userName taken, at the write; nothing
    was written, and the request must run again in a transaction with its rows locked."""


_current: ContextVar[_Unit | None] = ContextVar("idhub_scim_unit", default=None)


@contextmanager
def bind(
    conn: Connection, *, write: bool = False, batch: bool = False, optimistic: bool = False
) -> Iterator[None]:
    """Make ``conn`` the connection the storage works through for one request.

    In a writing request every row read is locked at once, so a read-modify-write (PATCH, PUT) cannot
    interleave with another request's and answer a spurious 412. With ``batch`` (a Bulk request) User
    creations are held back and written together by ``flush``, which the caller runs before it commits;
    ``flush`` raises ``BatchClash`` when the request must be served again with ``batch`` off.

    ``optimistic`` (PostgreSQL, a User's creation, PATCH or PUT on a connection without a transaction) reads
    without locks; a write, one statement, applies only to the version read, and ``StaleRow`` says when not.
    """
    unit = _Unit(conn, write, batch=_Batch() if batch else None, optimistic=optimistic)
    token = _current.set(unit)
    try:
        yield
    finally:
        _current.reset(token)


def flush() -> None:
    """Write the held-back creations of the current request (one statement on PostgreSQL, two on SQLite)."""
    unit = _unit()
    batch = unit.batch
    if batch is None:
        return
    if batch.clashed:
        raise BatchClash
    if not batch.identities:
        batch.names.clear()
        return
    conn = unit.conn
    if conn.dialect.name == "postgresql":
        rows = [{"row": r, "event": e} for r, e in zip(batch.identities, batch.events, strict=True)]
        statement = _batch_create_statement(tuple(batch.identities[0]), tuple(batch.events[0]))
        # pydantic's encoder writes the stamps as ISO 8601, which PostgreSQL reads as timestamptz; json.dumps
        # took a fifteenth of a Bulk request's CPU here.
        written = len(conn.execute(statement, {"rows": to_json(rows).decode()}).all())
    else:
        written = len(conn.execute(_insert_new_statement("sqlite", identities), batch.identities).all())
        if written == len(batch.identities):
            conn.execute(_OUTBOX_INSERT, batch.events)
    if written != len(batch.identities):
        # Nothing of this request is committed yet: the caller rolls back and serves it one operation at a
        # time, which answers 409 for exactly the operations whose userName is taken.
        batch.clashed = True
        raise BatchClash
    batch.identities.clear()
    batch.events.clear()
    # Written now: a clash with these rows shows in the database from here on.
    batch.names.clear()


def _unit() -> _Unit:
    unit = _current.get()
    if unit is None:
        raise RuntimeError("the SCIM storage is used outside of a request transaction")
    return unit


def _conn() -> Connection:
    """The request's connection, once every held-back creation is written (anything else may read them)."""
    flush()
    return _unit().conn


# The hot statements are built once and given their values at execution: building a statement with
# ``.values(...)`` and its cache key cost more CPU per request than PostgreSQL spends running it.
@cache
def _insert_new_statement(dialect: str, table: Table) -> Executable:
    dialect_insert = pg_insert if dialect == "postgresql" else sqlite_insert
    return dialect_insert(table).on_conflict_do_nothing().returning(table.c.id)


@cache
def _row_statement(table: Table, *, lock: bool) -> Executable:
    query = select(table).where(table.c.id == bindparam("row_id"), table.c.deleted_at.is_(None))
    return query.with_for_update() if lock else query


@cache
def _update_statement(table: Table) -> Executable:
    return update(table).where(table.c.id == bindparam("row_id"))


_OUTBOX_INSERT = insert(outbox)


class StoredUser(NamedTuple):
    """What a User's unlocked write reads of its row (``_USER_ROW``)."""

    id: str
    version: int
    doc: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    user_name_ci: str | None
    active: bool | None


_USER_ROW = select(*(identities.c[name] for name in StoredUser._fields)).where(
    identities.c.id == bindparam("row_id"), identities.c.deleted_at.is_(None)
)


def on_driver(conn: Connection, statement: Executable, params: dict[str, Any]) -> tuple[Any, ...] | None:
    """The first row of ``statement`` run on PostgreSQL through the driver's own connection, beneath
    ``conn``: for the two statements of a User's unlocked creation, PATCH or PUT (``bind(optimistic=True)``),
    which run without a transaction. SQLAlchemy's execution and result set-up around each took 75 µs of
    CPU, more than psycopg's own 55 µs (a primary-key SELECT, in-process); with both run here a PATCH took
    0.60 ms of CPU instead of 0.88, a creation 0.52 instead of 0.59. Parameters are as ``conn.execute``
    takes them; JSON values go as JSONB, dumped by the serializer SQLAlchemy registers with psycopg.
    """
    text, json_params = _driver_text(statement, conn.dialect)
    sent = {**params, **{name: Jsonb(params[name]) for name in json_params}} if json_params else params
    driver: Any = conn.connection.driver_connection
    try:
        found: tuple[Any, ...] | None = driver.execute(text, sent, prepare=True).fetchone()
    except DriverOperationalError:
        # A lost connection (or the server refusing the statement): sent again through SQLAlchemy, which
        # handles that as for any statement; a lost connection then invalidates every pooled one, instead of
        # each failing the next request it is lent to. Nothing of the first try was written.
        return tuple(row) if (row := conn.execute(statement, params).first()) is not None else None
    return found


@lru_cache(maxsize=64)
def _driver_text(statement: Executable, dialect: Any) -> tuple[str, tuple[str, ...]]:
    """A statement's SQL as SQLAlchemy compiles it (psycopg's named placeholders), and its JSON parameters."""
    compiled: Any = cast(ClauseElement, statement).compile(dialect=dialect)
    json_params = tuple(name for name, bind in compiled.binds.items() if isinstance(bind.type, JSON))
    return str(compiled), json_params


@cache
def _batch_create_statement(row_columns: tuple[str, ...], event_columns: tuple[str, ...]) -> Executable:
    """PostgreSQL: held-back User rows and their events, sent as one JSON array, written by one statement.

    One parameter of fixed SQL instead of a multi-row VALUES list: psycopg rewrites the placeholders of every
    new VALUES text, which cost more CPU than PostgreSQL spends inserting the rows. Each event is written only
    for a row its insert wrote (one whose userName was free), in request order.
    """
    rows, events = ", ".join(row_columns), ", ".join(event_columns)
    return text(
        f"""
        WITH incoming AS (
            SELECT item.value, item.ordinality
            FROM jsonb_array_elements(CAST(:rows AS jsonb)) WITH ORDINALITY AS item
        ), written AS (
            INSERT INTO identities ({rows})
            SELECT {", ".join(f"r.{c}" for c in row_columns)}
            FROM incoming, jsonb_populate_record(NULL::identities, incoming.value -> 'row') AS r
            ORDER BY incoming.ordinality
            ON CONFLICT DO NOTHING
            RETURNING id
        )
        INSERT INTO outbox ({events})
        SELECT {", ".join(f"e.{c}" for c in event_columns)}
        FROM incoming, jsonb_populate_record(NULL::outbox, incoming.value -> 'event') AS e
        WHERE e.resource_id IN (SELECT id FROM written)
        ORDER BY incoming.ordinality
        RETURNING seq
        """  # noqa: S608 - column names of our own tables, never input
    )


_EVENT_COLUMNS = ("event_id", "resource_type", "version", "kind", "changed", "created_at")


@cache
def _write_with_event_statement(table: Table, columns: tuple[str, ...], *, update_row: bool) -> Executable:
    """PostgreSQL: a row's INSERT (or UPDATE) and its outbox row as one statement, so one round trip.

    The outbox row is made from what the data-modifying CTE returns: an insert that met a taken unique key
    returns nothing, and then no event is written either.
    """
    row = {c: bindparam(f"row_{c}", type_=table.c[c].type) for c in columns}
    written: Any
    if update_row:
        # The version read: under a lock it always matches; without one a changed row is left alone.
        match = (table.c.id == bindparam("target_id"), table.c.version == bindparam("read_version"))
        written = update(table).where(*match, table.c.deleted_at.is_(None)).values(row)
    else:
        written = pg_insert(table).values(row).on_conflict_do_nothing()
    written = written.returning(table.c.id).cte("written")
    source = select(*(bindparam(f"event_{c}", type_=outbox.c[c].type) for c in _EVENT_COLUMNS), written.c.id)
    return (
        insert(outbox)
        .from_select([*_EVENT_COLUMNS, "resource_id"], source)
        .add_cte(written)
        .returning(outbox.c.seq)
    )


def _write_with_event(
    conn: Connection,
    table: Table,
    values: Mapping[str, Any],
    event: Mapping[str, Any],
    *,
    row_id: str | None = None,
    read_version: int | None = None,
) -> bool:
    """Insert a row (or update row ``row_id``) and write its outbox ``event``; False when an insert met a
    taken unique key or, on PostgreSQL, the row was no longer at ``read_version``: nothing is written then.
    SQLite writes inside a transaction begun IMMEDIATE, where no other writer can come between."""
    if conn.dialect.name == "postgresql":
        statement = _write_with_event_statement(table, tuple(values), update_row=row_id is not None)
        params = {f"row_{k}": v for k, v in values.items()}
        params.update({f"event_{k}": event[k] for k in _EVENT_COLUMNS})
        if row_id is not None:
            params.update(target_id=row_id, read_version=read_version)
        if _unit().optimistic:
            return on_driver(conn, statement, params) is not None
        return conn.execute(statement, params).first() is not None
    if row_id is None:
        if not _insert_new(conn, table, values):
            return False
    else:
        conn.execute(_update_statement(table), {"row_id": row_id, **values})
    conn.execute(_OUTBOX_INSERT, dict(event))
    return True


def _insert_new(conn: Connection, table: Table, values: Mapping[str, Any]) -> bool:
    """Insert a row unless a unique key is taken; True when inserted (one round trip, no aborted txn)."""
    return conn.execute(_insert_new_statement(conn.dialect.name, table), dict(values)).first() is not None


@dataclass(frozen=True)
class _Row:
    """A stored row's fields that a response reads, as this request wrote them."""

    id: str
    doc: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    version: int


def _merged(stored: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """``stored`` with ``values`` merged in: dictionaries key by key, anything else replaced; copied only
    along the paths ``values`` writes, as nothing here mutates the rest."""
    out = dict(stored)
    for key, value in values.items():
        held = out.get(key)
        out[key] = _merged(held, value) if isinstance(value, dict) and isinstance(held, dict) else value
    return out


def _utc(stamp: datetime) -> datetime:
    # SQLite hands back naive datetimes; every stamp is written in UTC.
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def response_meta(
    resource_type: ResourceType, created: datetime, modified: datetime, version: int
) -> dict[str, Any]:
    """The meta ``build`` gives a resource, as a response carries it (without its location)."""
    return {
        "resourceType": resource_type.name,
        "created": _STAMP.dump_python(_utc(created), mode="json"),
        "lastModified": _STAMP.dump_python(_utc(modified), mode="json"),
        "version": etag(version),
    }


def etag(version: int) -> str:
    return f'W/"{version}"'


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 36 and "\x00" not in value


def _version_of(expected: str | None) -> int | None:
    if expected is None:
        return None
    try:
        return int(expected.removeprefix("W/").strip('"'))
    except ValueError:
        # An ETag we never issued can match no stored version.
        return -1


def changed_paths(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Attribute paths whose values differ, down to sub-attributes of complex and extension attributes."""
    out: set[str] = set()
    for key in old.keys() | new.keys():
        if key == "schemas":
            continue
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            sep = ":" if key.startswith("urn:") else "."
            out |= changed_paths(a, b, path + sep)
        else:
            out.add(path)
    return out


def _primary_email(doc: Mapping[str, Any]) -> str | None:
    emails = doc.get("emails") or []
    chosen = next((e for e in emails if e.get("primary")), emails[0] if emails else None)
    value = chosen.get("value") if chosen else None
    return value.lower() if isinstance(value, str) else None


def user_columns(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The indexed copies of a User document's attributes."""
    user_name = doc.get("userName")
    return {
        "user_name": user_name,
        "user_name_ci": user_name.lower() if isinstance(user_name, str) else None,
        "external_id": doc.get("externalId"),
        "email_ci": _primary_email(doc),
        # RFC 7643 leaves active's default to the provider: absent means active here.
        "active": doc.get("active", True) is not False,
    }


def group_columns(doc: Mapping[str, Any]) -> dict[str, Any]:
    name = doc.get("displayName")
    return {
        "display_name": name,
        "display_name_ci": name.lower() if isinstance(name, str) else None,
        "external_id": doc.get("externalId"),
    }


Member = tuple[str, str, str | None]  # id, resource type, display


def _window(search_request: SearchRequest[Any]) -> tuple[int, int | None]:
    """The first index (past any real table, and below what an SQL OFFSET holds) and the count of a page."""
    return min(max(search_request.start_index or 1, 1), 2**62), search_request.count


def _page(
    table: Table,
    condition: ColumnElement[bool],
    start: int,
    count: int | None,
    order: Any = None,
) -> tuple[Executable, Executable]:
    """The statements of a page: its total alone, and its rows with the total riding along (one statement,
    one snapshot, one round trip)."""
    counted = select(func.count()).select_from(table).where(condition)
    query = select(table, counted.scalar_subquery().label("idhub_total")).where(condition)
    query = query.order_by(*order) if order else query.order_by(table.c.created_at, table.c.id)
    query = query.offset(start - 1)
    if count is not None:
        query = query.limit(count)
    return counted, query


@lru_cache(maxsize=256)
def _equal_page(table: Table, column: str, start: int, count: int | None) -> tuple[Executable, Executable]:
    # The clause filters.where writes for ``eq`` on a bare column, the value bound by name.
    compared = table.c[column]
    condition = and_(table.c.deleted_at.is_(None), compared.isnot(None), compared == bindparam("operand"))
    return _page(table, condition, start, count)


@dataclass(frozen=True)
class Found:
    """A page of stored resources of one type, as read: rows (``doc`` and stamps) and group members by id."""

    resource_type: ResourceType
    total: int
    rows: list[Any]
    members: dict[str, list[dict[str, Any]]]


# The serializer pydantic gives a datetime field, so stamps read the same with or without a model.
_STAMP: TypeAdapter[datetime] = TypeAdapter(datetime)

# Attributes copied into indexed columns must fit them.
COLUMN_LIMITS = {"userName": 256, "externalId": 256, "displayName": 256, "emails.value": 320}


class SqlStorage(ScimStorage):
    """The hub's store of Users and Groups, behind scim2-server's storage contract."""

    def __init__(self, provider: ScimProvider, *, max_string_length: int = 2048) -> None:
        self.provider = provider
        self.max_string_length = max_string_length

    def _check_values(self, doc: Any, path: str = "") -> None:
        """Refuse strings the store cannot or should not keep, before they reach the database."""
        if isinstance(doc, dict):
            for key, value in doc.items():
                self._check_values(value, f"{path}.{key}" if path else key)
        elif isinstance(doc, list):
            for value in doc:
                self._check_values(value, path)
        elif isinstance(doc, str):
            limit = COLUMN_LIMITS.get(path, self.max_string_length)
            if len(doc) > limit:
                raise InvalidValueException(detail=f"{path} is longer than {limit} characters")
            if "\x00" in doc:
                raise InvalidValueException(detail=f"{path} holds a NUL character")

    # -- helpers ------------------------------------------------------------------------------------

    def model(self, resource_type: ResourceType) -> type[Resource[Any]]:
        return self.provider.model_for(resource_type)  # type: ignore[return-value]

    @staticmethod
    def _is_user(resource_type: ResourceType) -> bool:
        return resource_type.name == "User"

    def _table(self, resource_type: ResourceType) -> Table:
        if resource_type.name == "User":
            return identities
        if resource_type.name == "Group":
            return groups
        raise NotImplementedException(detail=f"no storage for {resource_type.name}")

    def _doc_of(self, resource: Resource[Any]) -> dict[str, Any]:
        """The document a model is stored as, not yet checked (``_check_values``)."""
        doc = resource.model_dump(exclude={"id", "meta"})
        doc.pop("members", None)
        # The hub keeps no passwords (migration 0006): customers sign in elsewhere, none is ever returned (RFC
        # 7643 §4.1.1) or synced, and a copy at rest would only be one more secret to leak.
        doc.pop("password", None)
        return doc

    def build(
        self,
        resource_type: ResourceType,
        row: Any,
        members: list[dict[str, Any]] | None = None,
    ) -> Resource[Any]:
        payload = dict(row.doc)
        payload["id"] = row.id
        if members:
            payload["members"] = members
        resource = self.model(resource_type).model_validate(payload)
        resource.meta = Meta(
            resource_type=resource_type.name,
            created=_utc(row.created_at),
            last_modified=_utc(row.updated_at),
            version=etag(row.version),
        )
        return resource

    def _members(self, conn: Connection, group_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {gid: [] for gid in group_ids}
        if not group_ids:
            return out
        rows = conn.execute(
            select(
                group_members.c.group_id,
                group_members.c.member_id,
                group_members.c.member_type,
                group_members.c.display,
            )
            .where(group_members.c.group_id.in_(group_ids))
            .order_by(group_members.c.group_id, group_members.c.member_id)
        )
        for gid, mid, mtype, display in rows:
            member = {"value": mid, "type": mtype, "$ref": f"{mtype}s/{mid}"}
            if display is not None:
                member["display"] = display
            out[gid].append(member)
        return out

    def _row(self, conn: Connection, table: Table, resource_id: str) -> Any:
        if not _is_id(resource_id):
            # Not an id this store could have issued (a NUL byte would even break PostgreSQL).
            raise NotFoundException(detail="Resource not found")
        unit = _unit()
        key = (table.name, resource_id)
        if key in unit.rows:
            return unit.rows[key]
        row: Any
        if unit.optimistic and table is identities:
            found = on_driver(conn, _USER_ROW, {"row_id": resource_id})
            row = None if found is None else StoredUser(*found)
        else:
            lock = unit.write and not unit.optimistic
            row = conn.execute(_row_statement(table, lock=lock), {"row_id": resource_id}).first()
        if row is None:
            raise NotFoundException(detail=f"Resource {resource_id} not found")
        if unit.write:
            unit.rows[key] = row
        return row

    def operation(self) -> AbstractContextManager[Any]:
        """One Bulk operation. A failed one must leave the others in place (RFC 7644 §3.7).

        No savepoint is needed for that: every check (values, uniqueness, members, preconditions) runs before
        the operation's first write, and a create's unique-key clash is an ``ON CONFLICT DO NOTHING`` that
        aborts nothing, so a refused operation has written nothing. That saves two round trips an operation.
        """
        _unit().rows.clear()
        return nullcontext()

    def _check_unique_user(self, conn: Connection, columns: Mapping[str, Any], own_id: str | None) -> None:
        ci = columns["user_name_ci"]
        if ci is None:
            return
        query = select(identities.c.id).where(identities.c.user_name_ci == ci)
        if own_id is not None:
            query = query.where(identities.c.id != own_id)
        if conn.execute(query).first() is not None:
            raise UniquenessException(detail="userName is already taken")

    def _check_members(self, conn: Connection, members: list[dict[str, Any]]) -> list[Member]:
        """Members as (id, type, display), each one an existing User or Group."""
        wanted: dict[str, str | None] = {}
        for member in members:
            value = member.get("value")
            if not value:
                continue
            wanted[value] = member.get("display")
        if not wanted:
            return []
        ids = list(wanted)
        if not all(_is_id(mid) for mid in ids):
            raise InvalidValueException(detail="a member value is not a resource id")
        users = {
            r[0]
            for r in conn.execute(
                select(identities.c.id).where(identities.c.id.in_(ids), identities.c.deleted_at.is_(None))
            )
        }
        found_groups = {
            r[0]
            for r in conn.execute(
                select(groups.c.id).where(groups.c.id.in_(ids), groups.c.deleted_at.is_(None))
            )
        }
        out = []
        for mid in ids:
            if mid in users:
                out.append((mid, "User", wanted[mid]))
            elif mid in found_groups:
                out.append((mid, "Group", wanted[mid]))
            else:
                raise InvalidValueException(detail=f"member {mid} is neither a User nor a Group")
        return out

    # -- ScimStorage ------------------------------------------------------------------------------

    def get(
        self,
        resource_type: ResourceType,
        resource_id: str,
        *,
        response_parameters: ResponseParameters[Any] | None = None,
    ) -> Resource[Any]:
        conn = _conn()
        row = self._row(conn, self._table(resource_type), resource_id)
        members = None if self._is_user(resource_type) else self._members(conn, [row.id])[row.id]
        return self.build(resource_type, row, members)

    def search(
        self,
        resource_types: list[ResourceType],
        search_request: SearchRequest[Any],
        *,
        position: Any = None,
    ) -> SearchPage:
        found = self.find(resource_types, search_request)
        return SearchPage(
            total=found.total,
            resources=[self.build(found.resource_type, row, found.members.get(row.id)) for row in found.rows],
        )

    def find(self, resource_types: list[ResourceType], search_request: SearchRequest[Any]) -> Found:
        """The page a search asks for, as stored: rows and group members, which no model holds yet."""
        if len(resource_types) != 1:
            raise NotImplementedException(detail="search one resource type at a time")
        resource_type = resource_types[0]
        conn = _conn()
        table = self._table(resource_type)
        model = self.model(resource_type)
        from orchestrator.scim import filters

        dialect = conn.dialect.name
        condition: ColumnElement[bool] = table.c.deleted_at.is_(None)
        if search_request.filter is not None:
            condition = and_(condition, filters.where(search_request.filter, model, table, dialect))
        order = None
        if search_request.sort_by:
            descending = str(getattr(search_request, "sort_order", "") or "").lower().endswith("descending")
            order = filters.order_by(str(search_request.sort_by), descending, model, table, dialect)
        start, count = _window(search_request)
        counted, query = _page(table, condition, start, count, order)
        return self._found(conn, resource_type, counted, query, start, count, {})

    def equal_column(self, resource_type: ResourceType, attribute: str, value: str) -> tuple[str, Any] | None:
        """The column and operand of the filter ``attribute eq "value"`` where it compares a column of the
        row as it is (``filters.own_column``), for ``find_equal``; None where it does not."""
        from orchestrator.scim import filters

        table = self._table(resource_type)
        return filters.own_column(self.model(resource_type), table, _conn().dialect.name, attribute, value)

    def find_equal(
        self, resource_type: ResourceType, compared: tuple[str, Any], search_request: SearchRequest[Any]
    ) -> Found:
        """``find`` for a filter ``equal_column`` read, by a statement built once per column and page."""
        conn = _conn()
        column, operand = compared
        start, count = _window(search_request)
        counted, query = _equal_page(self._table(resource_type), column, start, count)
        return self._found(conn, resource_type, counted, query, start, count, {"operand": operand})

    def _found(
        self,
        conn: Connection,
        resource_type: ResourceType,
        counted: Executable,
        query: Executable,
        start: int,
        count: int | None,
        parameters: dict[str, Any],
    ) -> Found:
        if count == 0:
            return Found(resource_type, conn.execute(counted, parameters).scalar_one(), [], {})
        rows = conn.execute(query, parameters).all()
        if rows:
            total = rows[0].idhub_total
        elif start == 1:
            total = 0  # an empty first page: nothing matches
        else:
            total = conn.execute(counted, parameters).scalar_one()
        members = {} if self._is_user(resource_type) else self._members(conn, [r.id for r in rows])
        return Found(resource_type, total, list(rows), members)

    def create(self, resource_type: ResourceType, resource: Resource[Any]) -> Resource[Any]:
        is_user = self._is_user(resource_type)
        doc = self._doc_of(resource)
        if is_user:
            batch = _unit().batch
            held = batch is not None and not batch.clashed
            row = self.create_document(resource_type, doc)
            # A Bulk request's results carry no resources: what its creations were stored as is not kept.
            kept = None if held else doc
            return self._stamped(resource, resource_type, row.id, row.created_at, row.updated_at, 1, kept)
        self._check_values(doc)
        conn = _conn()
        resource_id = str(uuid.uuid4())
        stamp = now()
        member_pairs = self._check_members(
            conn, [m.model_dump() for m in (getattr(resource, "members", None) or [])]
        )
        values = {"id": resource_id, "version": 1, "doc": doc, "created_at": stamp, "updated_at": stamp}
        changed = changed_paths({}, doc)
        if member_pairs:
            changed.add("members")
        created = event_row(str(resource_type.name), resource_id, 1, Kind.CREATED, changed, stamp)
        if not _write_with_event(conn, groups, {**values, **group_columns(doc)}, created):
            raise UniquenessException(detail="the group's id is already taken")
        self._write_members(conn, resource_id, member_pairs)
        return self._stored_copy(conn, resource_type, resource_id)

    def create_document(self, resource_type: ResourceType, doc: dict[str, Any]) -> Any:
        """Store a new User's document (``_doc_of`` or ``plain.document``) and its event, or in a Bulk request
        hold it back for ``flush``; the row as written."""
        batch = _unit().batch
        if batch is not None and not batch.clashed:
            return self._create_later(batch, resource_type, doc)
        return self._create_user(resource_type, doc)

    def _create_user(self, resource_type: ResourceType, doc: dict[str, Any]) -> Any:
        self._check_values(doc)
        conn = _conn()
        resource_id = str(uuid.uuid4())
        stamp = now()
        values = {"id": resource_id, "version": 1, "doc": doc, "created_at": stamp, "updated_at": stamp}
        created = event_row(
            str(resource_type.name), resource_id, 1, Kind.CREATED, changed_paths({}, doc), stamp
        )
        if not _write_with_event(conn, identities, {**values, **user_columns(doc)}, created):
            raise UniquenessException(detail="userName is already taken")
        return _Row(resource_id, doc, stamp, stamp, 1)

    def _create_later(self, batch: _Batch, resource_type: ResourceType, doc: dict[str, Any]) -> _Row:
        """A User's creation in a Bulk request: checked now, written by the next ``flush``."""
        self._check_values(doc)
        columns = user_columns(doc)
        name = columns["user_name_ci"]
        if name is not None:
            if name in batch.names:
                raise UniquenessException(detail="userName is already taken")
            batch.names.add(name)
        resource_id = str(uuid.uuid4())
        stamp = now()
        batch.identities.append(
            {"id": resource_id, "version": 1, "doc": doc, "created_at": stamp, "updated_at": stamp, **columns}
        )
        batch.events.append(
            event_row(str(resource_type.name), resource_id, 1, Kind.CREATED, changed_paths({}, doc), stamp)
        )
        return _Row(resource_id, doc, stamp, stamp, 1)

    @staticmethod
    def _stamped(
        resource: Resource[Any],
        resource_type: ResourceType,
        resource_id: str,
        created: datetime,
        modified: datetime,
        version: int,
        doc: dict[str, Any] | None,
    ) -> Resource[Any]:
        """The stored state of a resource just written as ``doc``, without reading it back.

        A Bulk request's results carry no resources, so its creations (``doc`` None) are not remembered.
        """
        # Shallow: nothing below mutates the nested values the caller's resource shares with the copy. Given
        # as an update, id and meta skip the assignment validation, a twentieth of a Bulk creation's CPU.
        stamp = Meta(
            resource_type=resource_type.name,
            created=_utc(created),
            last_modified=_utc(modified),
            version=etag(version),
        )
        stored = resource.model_copy(update={"id": resource_id, "meta": stamp})
        if doc is not None:
            meta = response_meta(resource_type, created, modified, version)
            _unit().written[id(stored)] = Written(stored, doc, meta)
        return stored

    def _stored_copy(self, conn: Connection, resource_type: ResourceType, resource_id: str) -> Resource[Any]:
        row = self._row(conn, self._table(resource_type), resource_id)
        members = None if self._is_user(resource_type) else self._members(conn, [resource_id])[resource_id]
        return self.build(resource_type, row, members)

    def _write_members(self, conn: Connection, group_id: str, members: list[Member]) -> None:
        conn.execute(delete(group_members).where(group_members.c.group_id == group_id))
        if members:
            conn.execute(
                insert(group_members),
                [
                    {"group_id": group_id, "member_id": mid, "member_type": mtype, "display": display}
                    for mid, mtype, display in members
                ],
            )

    def update(
        self,
        resource_type: ResourceType,
        resource: Resource[Any],
        *,
        expected_version: str | None = None,
    ) -> Resource[Any]:
        conn = _conn()
        table = self._table(resource_type)
        assert resource.id is not None
        row = self._row(conn, table, resource.id)
        expected = _version_of(expected_version)
        if expected is not None and expected != row.version:
            raise PreconditionFailedException(detail="the resource changed since that version")
        doc = self._doc_of(resource)
        self._check_values(doc)
        if self._is_user(resource_type):
            stored = self._rewrite_user(conn, resource_type, row, doc)
            if stored is row:
                # Nothing changed: keep the version and the ETag, and send no event.
                return self.build(resource_type, row)
            return self._stamped(
                resource, resource_type, row.id, row.created_at, stored.updated_at, stored.version, doc
            )
        changed = changed_paths(row.doc, doc)
        kind = Kind.UPDATED
        new_pairs = self._check_members(
            conn, [m.model_dump() for m in (getattr(resource, "members", None) or [])]
        )
        old_pairs = {(m["value"], m["type"], m.get("display")) for m in self._members(conn, [row.id])[row.id]}
        if set(new_pairs) != old_pairs:
            self._write_members(conn, row.id, new_pairs)
            changed.add("members")
            kind = Kind.MEMBERS_CHANGED
        if not changed:
            return self.build(resource_type, row, self._members(conn, [row.id])[row.id])
        self._write_update(conn, resource_type, table, row, doc, group_columns(doc), changed, kind)
        return self._stored_copy(conn, resource_type, row.id)

    def set_values(self, resource_type: ResourceType, resource_id: str, values: Mapping[str, Any]) -> Any:
        """Set attributes of a stored User, given as a fragment of its document (``plain.patch_values``),
        and return the row as stored afterwards (``id``, ``doc``, stamps and ``version``).

        A fragment's dictionaries merge into the ones stored under the same keys; any other value replaces
        what is stored. The rest is what ``update`` does with a document.
        """
        conn = _conn()
        self._check_values(values)
        row = self._row(conn, identities, resource_id)
        doc = _merged(row.doc, values)
        # An extension's attributes come with its schema URN, in the order scim2-models dumps them.
        schemas = list(doc.get("schemas") or ())
        if any(key.startswith("urn:") and key not in schemas for key in values):
            extensions = self.model(resource_type).get_extension_models()
            doc["schemas"] = [s for s in schemas if s not in extensions] + [u for u in extensions if u in doc]
        return self._rewrite_user(conn, resource_type, row, doc)

    def _rewrite_user(
        self, conn: Connection, resource_type: ResourceType, row: Any, doc: dict[str, Any]
    ) -> Any:
        """Store ``doc`` as the new document of the User ``row`` with its event; ``row`` itself when that
        changes nothing, else the row as written."""
        changed = changed_paths(row.doc, doc)
        if not changed:
            return row
        columns = user_columns(doc)
        if columns["user_name_ci"] != row.user_name_ci:
            self._check_unique_user(conn, columns, row.id)
        kind = Kind.UPDATED
        if row.active and not columns["active"]:
            kind = Kind.DEACTIVATED
        elif not row.active and columns["active"]:
            kind = Kind.REACTIVATED
        version, stamp = self._write_update(conn, resource_type, identities, row, doc, columns, changed, kind)
        return _Row(row.id, doc, row.created_at, stamp, version)

    def _write_update(
        self,
        conn: Connection,
        resource_type: ResourceType,
        table: Table,
        row: Any,
        doc: dict[str, Any],
        columns: dict[str, Any],
        changed: set[str],
        kind: Kind,
    ) -> tuple[int, datetime]:
        """Write ``doc`` over ``row`` (the version read) and its event; the new version and its stamp."""
        version = row.version + 1
        stamp = now()
        updated = event_row(str(resource_type.name), row.id, version, kind, changed, stamp)
        values = {"version": version, "doc": doc, "updated_at": stamp, **columns}
        try:
            applied = _write_with_event(conn, table, values, updated, row_id=row.id, read_version=row.version)
        except (IntegrityError, DriverIntegrityError):
            if not _unit().optimistic:
                raise
            applied = False  # a userName taken since the check above; with locks the check answers 409
        if not applied:
            raise StaleRow
        _unit().rows.pop((table.name, row.id), None)
        return version, stamp

    def delete(
        self,
        resource_type: ResourceType,
        resource_id: str,
        *,
        expected_version: str | None = None,
    ) -> None:
        conn = _conn()
        table = self._table(resource_type)
        row = self._row(conn, table, resource_id)
        expected = _version_of(expected_version)
        if expected is not None and expected != row.version:
            raise PreconditionFailedException(detail="the resource changed since that version")
        _unit().rows.pop((table.name, row.id), None)
        tombstone(conn, str(resource_type.name), row.id, row.version)


def tombstone(conn: Connection, resource_type: str, resource_id: str, version: int) -> None:
    """Erase a resource's personal data at once, keeping only its id, version and deletion time."""
    table = identities if resource_type == "User" else groups
    stamp = now()
    blank = {c: None for c in (user_columns({}) if resource_type == "User" else group_columns({}))}
    conn.execute(
        update(table)
        .where(table.c.id == resource_id)
        .values(version=version + 1, doc={}, updated_at=stamp, deleted_at=stamp, **blank)
    )
    emit(conn, resource_type, resource_id, version + 1, Kind.DELETED, ["*"])
    if resource_type == "Group":
        conn.execute(delete(group_members).where(group_members.c.group_id == resource_id))
    # The resource leaves every group it was in: those groups change too.
    affected = [
        r[0]
        for r in conn.execute(
            select(group_members.c.group_id).where(group_members.c.member_id == resource_id)
        )
    ]
    if affected:
        conn.execute(delete(group_members).where(group_members.c.member_id == resource_id))
        for gid in affected:
            new_version = conn.execute(
                update(groups)
                .where(groups.c.id == gid)
                .values(version=groups.c.version + 1, updated_at=stamp)
                .returning(groups.c.version)
            ).scalar_one()
            emit(conn, "Group", gid, new_version, Kind.MEMBERS_CHANGED, ["members"])
