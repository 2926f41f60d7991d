"""SCIM filters and sortBy as SQL on PostgreSQL and SQLite, checked against scim2-models' matcher."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scim2_models import EnterpriseUser, Group, InvalidFilterException, InvalidPathException, User
from sqlalchemy import Engine, delete, insert, select, text

from orchestrator import db
from orchestrator.scim import filters
from orchestrator.scim.schemas import CUSTOMER_SCHEMA, CustomerUser

M = User[EnterpriseUser | CustomerUser]
CORE = "urn:ietf:params:scim:schemas:core:2.0:User"
C = CUSTOMER_SCHEMA
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def user_doc(user_name: str, **attrs: Any) -> dict[str, Any]:
    """A User document as the store keeps it: validated by the model, dumped, without id and meta."""
    payload = {"schemas": [CORE, C], "userName": user_name, **attrs}
    doc = M.model_validate(payload).model_dump()
    doc.pop("id", None)
    doc.pop("meta", None)
    return doc


def primary_email(doc: dict[str, Any]) -> str | None:
    emails = doc.get("emails") or []
    chosen = next((e for e in emails if e.get("primary")), emails[0] if emails else None)
    return chosen["value"].lower() if chosen and chosen.get("value") else None


def add_user(conn: Any, doc: dict[str, Any], created: datetime, version: int = 1) -> dict[str, Any]:
    """Insert a row with its indexed columns; the document with id and meta, as ``matches`` takes it."""
    user_id = str(uuid.uuid4())
    conn.execute(
        insert(db.identities).values(
            id=user_id,
            version=version,
            user_name=doc["userName"],
            user_name_ci=doc["userName"].lower(),
            external_id=doc.get("externalId"),
            email_ci=primary_email(doc),
            active=doc.get("active", True) is not False,
            doc=doc,
            created_at=created,
            updated_at=created + timedelta(days=1),
        )
    )
    meta = {
        "resourceType": "User",
        "created": iso(created),
        "lastModified": iso(created + timedelta(days=1)),
        "version": f'W/"{version}"',
    }
    return {**doc, "id": user_id, "meta": meta}


@pytest.fixture
def store(store_url: str) -> Iterator[tuple[Engine, str]]:
    engine = db.make_engine(store_url)
    db.metadata.create_all(engine)
    yield engine, engine.dialect.name
    engine.dispose()


def ids(engine: Engine, dialect: str, flt: str, model: Any = M, table: Any = db.identities) -> set[str]:
    with engine.connect() as conn:
        rows = conn.execute(select(table.c.id).where(filters.where(flt, model, table, dialect)))
        return {row.id for row in rows}


@pytest.fixture
def people(store: tuple[Engine, str]) -> dict[str, dict[str, Any]]:
    engine, _ = store
    docs = {
        "bj": user_doc(
            "BJensen",
            externalId="EXT-1",
            name={"familyName": "Jensen", "givenName": "Barbara"},
            emails=[
                {"value": "bj@Example.com", "type": "work", "primary": True},
                {"value": "babs@home.org", "type": "home"},
            ],
            title="",
            **{
                C: {
                    "consents": [
                        {"purpose": "marketing_email", "granted": True, "updatedAt": "2024-03-01T10:00:00Z"},
                        {"purpose": "profiling", "granted": False},
                    ],
                    "loyalty": {"tier": "gold", "points": 150},
                    "customerNumber": "C-001",
                }
            },
        ),
        "alice": user_doc(
            "alice",
            externalId="ext-1",
            active=False,
            emails=[{"value": "alice@x.org", "type": "home"}, {"value": "zz@work.com", "type": "work"}],
            **{
                C: {
                    "consents": [
                        {
                            "purpose": "marketing_email",
                            "granted": False,
                            "updatedAt": "2024-02-01T12:30:00+02:00",
                        },
                        {"purpose": "marketing_sms", "granted": True},
                    ],
                    "loyalty": {"tier": "Silver", "points": 50},
                }
            },
        ),
        "zed": user_doc("Zed", name={"familyName": "zorro"}),
    }
    created = {"bj": T0, "alice": T0 + timedelta(days=150), "zed": T0 + timedelta(days=400)}
    with engine.begin() as conn:
        return {
            key: add_user(conn, doc, created[key], version=i + 1) for i, (key, doc) in enumerate(docs.items())
        }


CASES: list[tuple[str, set[str]]] = [
    # every operator, and the case rules of the model (userName, emails.value: no; externalId, id: yes)
    ('userName eq "bjensen"', {"bj"}),
    ('USERNAME EQ "BJENSEN"', {"bj"}),
    ('userName ne "bjensen"', {"alice", "zed"}),
    ('userName co "EN"', {"bj"}),
    ('userName sw "Al"', {"alice"}),
    ('userName ew "D"', {"zed"}),
    ('userName gt "b"', {"bj", "zed"}),
    ('userName ge "bjensen"', {"bj", "zed"}),
    ('userName lt "bjensen"', {"alice"}),
    ('userName le "bjensen"', {"alice", "bj"}),
    ('externalId eq "EXT-1"', {"bj"}),
    ('externalId eq "ext-1"', {"alice"}),
    ('externalId co "EXT"', {"bj"}),
    ("externalId pr", {"bj", "alice"}),
    ("externalId eq null", {"zed"}),
    ("externalId ne null", {"bj", "alice"}),
    ("title pr", set()),  # an empty string is not present
    ('name.familyName eq "JENSEN"', {"bj"}),
    ('name.familyName ew "O"', {"zed"}),
    ("name pr", {"bj", "zed"}),
    ("name.givenName pr", {"bj"}),
    # multi-valued: any item matches, ne means no item equals
    ('emails co "example.COM"', {"bj"}),
    ('emails.value sw "ALICE@"', {"alice"}),
    ('emails.value ew ".org"', {"bj", "alice"}),
    ('emails.value ne "alice@x.org"', {"bj", "zed"}),
    ('emails.type eq "work"', {"bj", "alice"}),
    ("emails pr", {"bj", "alice"}),
    ("emails.primary eq true", {"bj"}),
    ('emails[type eq "work" and value co "@work"]', {"alice"}),
    ('emails[type eq "work" and value co "@x"]', set()),
    ('emails[type eq "home" or primary eq true]', {"bj", "alice"}),
    ('emails[not (type eq "home")]', {"bj", "alice"}),
    ('emails[type eq "work"].value co "example"', {"bj"}),
    ('schemas eq "urn:IETF:params:scim:schemas:core:2.0:user"', {"bj", "alice", "zed"}),
    # extension attributes, fully qualified
    (f'{C}:consents[purpose eq "marketing_email" and granted eq true]', {"bj"}),
    (f'{C}:consents[purpose eq "MARKETING_EMAIL" and granted eq true]', set()),  # purpose is caseExact
    (f"{C}:consents[granted eq false]", {"bj", "alice"}),
    (f'{C}:consents.purpose eq "marketing_sms"', {"alice"}),
    (f'{C}:consents[updatedAt gt "2024-02-01T11:00:00Z"]', {"bj"}),  # 12:30+02:00 is 10:30Z
    (f'{C}:consents[updatedAt lt "2024-02-01T10:31:00Z"]', {"alice"}),
    (f"{C}:loyalty.points gt 100", {"bj"}),
    (f"{C}:loyalty.points ge 50", {"bj", "alice"}),
    (f"{C}:loyalty.points lt 150", {"alice"}),
    (f"{C}:loyalty.points le 49", set()),
    (f"{C}:loyalty.points eq 50", {"alice"}),
    (f"{C}:loyalty.points ne 50", {"bj", "zed"}),
    (f'{C}:loyalty.tier eq "silver"', {"alice"}),
    (f'{C}:customerNumber eq "c-001"', set()),
    (f"{C}:loyalty pr", {"bj", "alice"}),
    (f"not ({C}:loyalty.points gt 100)", {"alice", "zed"}),
    # booleans, id, meta
    ("active eq true", {"bj", "zed"}),
    ("active ne true", {"alice"}),
    ('meta.created gt "2024-01-01T00:00:00Z"', {"alice", "zed"}),
    ('meta.created ge "2024-01-01T00:00:00Z"', {"bj", "alice", "zed"}),
    ('meta.created lt "2024-05-29T21:00:00-02:00"', {"bj"}),
    ('meta.lastModified le "2024-01-02T00:00:00Z"', {"bj"}),
    ('meta.lastModified eq "2024-01-02T00:00:00Z"', {"bj"}),
    ('meta.version eq "W/\\"2\\""', {"alice"}),
    ('meta.resourceType eq "User"', {"bj", "alice", "zed"}),
    # and binds tighter than or; not and grouping
    ('userName eq "zed" or userName eq "alice" and active eq true', {"zed"}),
    ('(userName eq "zed" or userName eq "alice") and active eq true', {"zed"}),
    ('not (userName eq "zed" or active eq false)', {"bj"}),
    ('not (emails pr) or userName sw "b"', {"bj", "zed"}),
]


def test_every_operator_and_attribute_kind(
    store: tuple[Engine, str], people: dict[str, dict[str, Any]]
) -> None:
    engine, dialect = store
    name_of = {doc["id"]: key for key, doc in people.items()}
    failures = []
    for flt, expected in CASES:
        got = {name_of[i] for i in ids(engine, dialect, flt)}
        in_python = {key for key, doc in people.items() if filters.matches(flt, doc, M)}
        if got != expected or in_python != expected:
            failures.append((flt, expected, got, in_python))
    assert failures == []


def test_groups_members_through_group_members(store: tuple[Engine, str]) -> None:
    engine, dialect = store
    with engine.begin() as conn:
        for gid, name, members in (
            ("g1", "Newsletter", [("u1", "User"), ("u2", "User")]),
            ("g2", "VIP", [("u2", "User"), ("g1", "Group")]),
            ("g3", "empty", []),
        ):
            conn.execute(
                insert(db.groups).values(
                    id=gid,
                    version=1,
                    display_name=name,
                    display_name_ci=name.lower(),
                    doc={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": name},
                    created_at=T0,
                    updated_at=T0,
                )
            )
            for member_id, member_type in members:
                conn.execute(
                    insert(db.group_members).values(
                        group_id=gid, member_id=member_id, member_type=member_type
                    )
                )

    def group_ids(flt: str) -> set[str]:
        return ids(engine, dialect, flt, Group, db.groups)

    assert group_ids('members[value eq "u1"]') == {"g1"}
    assert group_ids('members.value eq "u2"') == {"g1", "g2"}
    assert group_ids('members eq "u2"') == {"g1", "g2"}
    assert group_ids('members[type eq "group"]') == {"g2"}
    assert group_ids('members[value eq "u2" and not (type eq "User")]') == set()
    assert group_ids("members pr") == {"g1", "g2"}
    assert group_ids('not (members.value eq "u1")') == {"g2", "g3"}
    assert group_ids('displayName eq "vip"') == {"g2"}
    assert group_ids('displayName sw "NEWS" or members.value eq null') == {"g1", "g3"}
    with pytest.raises(InvalidFilterException):
        group_ids('members.display eq "x"')
    # and from the User side, a member's groups
    with engine.begin() as conn:
        for uid in ("u1", "u2"):
            add_user(conn, user_doc(uid), T0)
            conn.execute(
                text("UPDATE identities SET id = :new WHERE user_name = :uid"), {"new": uid, "uid": uid}
            )
    assert ids(engine, dialect, 'groups[value eq "g2"]') == {"u2"}
    assert ids(engine, dialect, 'groups.value eq "g1"') == {"u1", "u2"}


BAD = [
    'userName eq "unterminated',
    "userName eq",
    'nosuch eq "x"',
    'name.nosuch eq "x"',
    'urn:example:unknown:2.0:User:x eq "y"',
    "active gt true",  # ordering on a boolean
    f"{C}:loyalty.points co 1",  # substring on an integer
    f'{C}:loyalty.points eq "many"',  # not an integer
    'meta.created co "2024"',
    'meta.created gt "yesterday"',
    'name eq "x"',  # a complex attribute is compared through a sub-attribute
    'userName[value eq "x"]',  # a value selection on a single value
    'password eq "secret"',  # write-only
    'emails[value eq "a@b.c" and emails[type eq "work"]]',
    "userName gt null",
    'meta.location eq "x"',
    " or ".join(f'userName eq "u{i}"' for i in range(filters.MAX_COMPARISONS + 1)),
    "not (" * 11 + 'userName eq "x"' + ")" * 11,
    'userName eq "' + "x" * filters.MAX_FILTER_LENGTH + '"',
]


@pytest.mark.parametrize("flt", BAD)
def test_bad_filters_are_invalid_filter_errors(flt: str) -> None:
    for dialect in ("postgresql", "sqlite"):
        with pytest.raises(InvalidFilterException) as raised:
            filters.where(flt, M, db.identities, dialect)
        assert raised.value.status == 400
        assert raised.value.scim_type == "invalidFilter"
        # The message never repeats a compared value (it may be personal data).
        assert "secret" not in str(raised.value)
    with pytest.raises(InvalidFilterException):
        filters.matches(flt, {"schemas": [CORE], "userName": "x", "id": "1"}, M)


def test_sort_by(store: tuple[Engine, str]) -> None:
    engine, dialect = store
    docs = {
        "b": user_doc("b", emails=[{"value": "z@x.org"}, {"value": "B@x.org", "primary": True}]),
        "A": user_doc("A", emails=[{"value": "c@x.org"}], **{C: {"loyalty": {"points": 10}}}),
        "c": user_doc("c", **{C: {"loyalty": {"points": 9}}}),
        "D": user_doc(
            "D", emails=[{"value": "a@x.org"}, {"value": "y@x.org"}], **{C: {"loyalty": {"points": 100}}}
        ),
    }
    with engine.begin() as conn:
        rows = {key: add_user(conn, doc, T0 + timedelta(days=i)) for i, (key, doc) in enumerate(docs.items())}
    name_of = {doc["id"]: key for key, doc in rows.items()}

    def order(sort_by: str, descending: bool = False) -> list[str]:
        terms = filters.order_by(sort_by, descending, M, db.identities, dialect)
        with engine.connect() as conn:
            return [name_of[r.id] for r in conn.execute(select(db.identities.c.id).order_by(*terms))]

    assert order("userName") == ["A", "b", "c", "D"]
    assert order("USERNAME", descending=True) == ["D", "c", "b", "A"]
    # primary item first, else the first item; no value last ascending, first descending
    assert order("emails") == ["D", "b", "A", "c"]
    assert order("emails.value", descending=True) == ["c", "A", "b", "D"]
    assert order(f"{C}:loyalty.points") == ["c", "A", "D", "b"]
    assert order("meta.created", descending=True) == ["D", "c", "A", "b"]
    # equal keys fall back to id, so pages are stable
    tie = order("name.familyName")
    assert tie == sorted(tie, key=lambda key: rows[key]["id"])
    with pytest.raises(InvalidPathException):
        filters.order_by("nosuch", False, M, db.identities, dialect)
    with pytest.raises(InvalidPathException):
        filters.order_by("name", False, M, db.identities, dialect)


def test_user_name_eq_uses_the_unique_index(pg_url: str) -> None:
    engine = db.make_engine(pg_url)
    db.metadata.create_all(engine)
    try:
        query = select(db.identities.c.id).where(
            filters.where('userName eq "BJensen"', M, db.identities, "postgresql"),
            db.identities.c.deleted_at.is_(None),
        )
        with engine.begin() as conn:
            # A table this small is cheaper to scan: ask whether the index can serve the query at all.
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            compiled = query.compile(engine, compile_kwargs={"literal_binds": True})
            plan = "\n".join(row[0] for row in conn.execute(text(f"EXPLAIN {compiled}")))
        assert "ux_identities_user_name_ci" in plan
    finally:
        engine.dispose()


# ---- property: SQL selection == Python selection (scim2-models' matcher)

LETTERS = st.text(alphabet="abAB", min_size=1, max_size=3)
PURPOSES = st.sampled_from(["marketing_email", "marketing_sms", "profiling"])
STAMPS = st.integers(0, 4).map(lambda d: T0 + timedelta(days=d, hours=d))


@st.composite
def customers(draw: st.DrawFn) -> list[dict[str, Any]]:
    names = draw(st.lists(LETTERS, min_size=2, max_size=6, unique_by=str.lower))
    out = []
    for name in names:
        attrs: dict[str, Any] = {}
        if draw(st.booleans()):
            attrs["active"] = draw(st.booleans())
        emails = draw(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "value": LETTERS.map(lambda s: f"{s}@{s.lower()}.org"),
                        "type": st.sampled_from(["work", "home"]),
                    },
                    optional={"primary": st.booleans()},
                ),
                max_size=3,
            )
        )
        if emails:
            attrs["emails"] = emails
        ext: dict[str, Any] = {}
        consents = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"purpose": PURPOSES, "granted": st.booleans()},
                    optional={"updatedAt": STAMPS.map(iso)},
                ),
                max_size=3,
            )
        )
        if consents:
            ext["consents"] = consents
        points = draw(st.none() | st.integers(0, 200))
        if points is not None:
            ext["loyalty"] = {"points": points}
        if ext:
            attrs[C] = ext
        out.append(user_doc(name, **attrs))
    return out


def quoted(value: str) -> str:
    return f'"{value}"'


LEAF = st.one_of(
    st.tuples(st.sampled_from(["eq", "ne", "co", "sw", "ew", "gt", "lt"]), LETTERS).map(
        lambda t: f"userName {t[0]} {quoted(t[1])}"
    ),
    st.tuples(st.sampled_from(["co", "sw", "ew"]), LETTERS).map(
        lambda t: f"emails.value {t[0]} {quoted(t[1])}"
    ),
    st.sampled_from(["emails.type", "emails"]).map(
        lambda a: f"{a} {'pr' if a == 'emails' else 'eq ' + quoted('work')}"
    ),
    st.tuples(st.sampled_from(["work", "home"]), LETTERS).map(
        lambda t: f'emails[type eq "{t[0]}" and value co "{t[1]}"]'
    ),
    st.booleans().map(lambda b: f"emails[primary eq {str(b).lower()}]"),
    st.tuples(PURPOSES, st.booleans()).map(
        lambda t: f'{C}:consents[purpose eq "{t[0]}" and granted eq {str(t[1]).lower()}]'
    ),
    st.tuples(st.sampled_from(["gt", "lt", "eq"]), STAMPS).map(
        lambda t: f'{C}:consents[updatedAt {t[0]} "{iso(t[1])}"]'
    ),
    st.tuples(st.sampled_from(["eq", "ne", "gt", "ge", "lt", "le"]), st.integers(0, 200)).map(
        lambda t: f"{C}:loyalty.points {t[0]} {t[1]}"
    ),
    st.sampled_from([f"{C}:loyalty pr", "active eq true", "active eq false", "emails.primary ne true"]),
    st.tuples(st.sampled_from(["gt", "le"]), STAMPS).map(lambda t: f'meta.created {t[0]} "{iso(t[1])}"'),
)
FILTERS = st.recursive(
    LEAF,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(lambda t: f"({t[0]}) {t[1]} ({t[2]})"),
        inner.map(lambda f: f"not ({f})"),
    ),
    max_leaves=4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    docs=customers(),
    stamps=st.lists(STAMPS, min_size=6, max_size=6),
    flts=st.lists(FILTERS, min_size=4, max_size=4),
)
def test_sql_selects_what_python_matches(
    store: tuple[Engine, str], docs: list[dict[str, Any]], stamps: list[datetime], flts: list[str]
) -> None:
    engine, dialect = store
    with engine.begin() as conn:
        conn.execute(delete(db.identities))
        rows = [add_user(conn, doc, stamp) for doc, stamp in zip(docs, stamps, strict=False)]
    for flt in flts:
        in_python = {row["id"] for row in rows if filters.matches(flt, row, M)}
        assert ids(engine, dialect, flt) == in_python, flt
