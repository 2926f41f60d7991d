"""Attribute mapping: each kind of hub path, data minimisation, and the matching key."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from orchestrator.mapping import (
    HubUser,
    MappingError,
    compile_mapping,
    map_attributes,
    match_key,
)

CUSTOMER = "urn:idhub:schemas:extension:customer:2.0:User"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"


def user_doc() -> dict[str, Any]:
    """A document as the hub stores it: ``User[...].model_dump()`` plus ``id`` and ``meta``."""
    user = HubUser.model_validate(
        {
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", CUSTOMER, ENTERPRISE],
            "userName": "customer-1",
            "name": {"givenName": "Ada", "familyName": "Lovelace"},
            "title": None,
            "phoneNumbers": [{"value": "+441234567890", "type": "mobile"}],
            "emails": [
                {"value": "home@example.org", "type": "home"},
                {"value": "work@example.org", "type": "work", "primary": True},
            ],
            CUSTOMER: {
                "consents": [
                    {
                        "purpose": "marketing_email",
                        "granted": True,
                        "updated_at": datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
                    },
                    {"purpose": "profiling", "granted": False},
                ],
                "loyalty": {"tier": "gold", "points": 1200},
            },
            ENTERPRISE: {"employeeNumber": "E-42"},
        }
    )
    doc = user.model_dump()
    doc["id"] = "2819c223-7f76-453a-919d-413861904646"
    doc["meta"] = {"resourceType": "User", "version": 'W/"1"'}
    return doc


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("userName", "customer-1"),
        ("USERNAME", "customer-1"),
        ("name.givenName", "Ada"),
        ("Name.GIVENNAME", "Ada"),
        ("emails[primary eq true].value", "work@example.org"),
        ('emails[type eq "home"].value', "home@example.org"),
        ('emails[type eq "HOME"].value', "home@example.org"),
        ('emails[type eq "work" and primary eq true].value', "work@example.org"),
        ("emails.value", ["home@example.org", "work@example.org"]),
        ('emails[type eq "home"]', [{"value": "home@example.org", "type": "home"}]),
        ("phoneNumbers", [{"value": "+441234567890", "type": "mobile"}]),
        (f"{CUSTOMER}:loyalty.tier", "gold"),
        (f"{CUSTOMER}:loyalty.points", 1200),
        ("loyalty.tier", "gold"),
        (f"{ENTERPRISE}:employeeNumber", "E-42"),
        ('consents[purpose eq "marketing_email"].granted', True),
        (f'{CUSTOMER}:consents[purpose eq "profiling"].granted', False),
        ('consents[purpose eq "marketing_email"].updatedAt', "2024-05-01T12:00:00Z"),
        ("id", "2819c223-7f76-453a-919d-413861904646"),
        ("title | userName", "customer-1"),
        ('emails[type eq "other"].value | emails[value pr].value', "home@example.org"),
    ],
)
def test_each_kind_of_path(source: str, expected: Any) -> None:
    assert map_attributes(user_doc(), {"out": source}) == {"out": expected}


def test_nested_target_fields_and_minimisation() -> None:
    mapping = {
        "email_address": "emails[primary eq true].value",
        "merge_fields.FNAME": "name.givenName",
        "merge_fields.LNAME": "name.familyName",
        "merge_fields.TIER": "loyalty.tier",
    }
    payload = map_attributes(user_doc(), mapping)
    assert payload == {
        "email_address": "work@example.org",
        "merge_fields": {"FNAME": "Ada", "LNAME": "Lovelace", "TIER": "gold"},
    }
    # Nothing unmapped leaks through: no phone, no other e-mail, no consents, no ids.
    flat = repr(payload)
    for absent in ("+441234567890", "home@example.org", "customer-1", "marketing_email", "2819c223", "E-42"):
        assert absent not in flat


def test_missing_values_are_left_out_not_null() -> None:
    doc = user_doc()
    payload = map_attributes(
        doc,
        {
            "title": "title",
            "properties.nick": "nickName",
            "mobile": 'phoneNumbers[type eq "work"].value',
            "sms": 'consents[purpose eq "marketing_sms"].granted',
            "middle": "name.middleName",
            "email": "emails[primary eq true].value",
        },
    )
    assert payload == {"email": "work@example.org"}
    doc["emails"] = [{"value": "only@example.org"}]
    # primary eq true means exactly that: no implicit fallback to the first value ...
    assert map_attributes(doc, {"email": "emails[primary eq true].value"}) == {}
    # ... an explicit alternative provides one.
    fallback = {"email": "emails[primary eq true].value | emails[value pr].value"}
    assert map_attributes(doc, fallback) == {"email": "only@example.org"}


def test_the_payload_does_not_alias_the_hub_document() -> None:
    doc = user_doc()
    payload = map_attributes(doc, {"emails": "emails"})
    payload["emails"][0]["value"] = "changed"
    assert doc["emails"][0]["value"] == "home@example.org"


@pytest.mark.parametrize(
    ("mapping", "says"),
    [
        ({"email": "nosuchattr"}, "email: unknown attribute 'nosuchattr'"),
        ({"email": "name.nosuch"}, "email: unknown attribute"),
        ({"email": "emails[nosuch eq 1].value"}, "email: invalid filter"),
        ({"email": "emails[type eq"}, "email: invalid path"),
        ({"email": ""}, "email: hub attribute path must be a non-empty string"),
        ({"a..b": "userName"}, "invalid target field path"),
        (
            {"props": "userName", "props.email": "emails.value"},
            "props.email: clashes with target field 'props'",
        ),
    ],
)
def test_bad_mappings_name_the_target_field(mapping: dict[str, str], says: str) -> None:
    with pytest.raises(MappingError) as caught:
        compile_mapping(mapping)
    assert says in str(caught.value)


def test_match_key() -> None:
    assert match_key({"properties": {"email": "a@example.org"}}, "properties.email") == "a@example.org"
    assert match_key({"userName": "customer-1"}, "userName") == "customer-1"
    emails = [{"value": "x@example.org"}, {"value": "p@example.org", "primary": True}]
    assert match_key({"emails": emails}, "emails") == "p@example.org"
    assert match_key({"emails": [{"value": "x@example.org"}]}, "emails") == "x@example.org"
    assert match_key({"ids": [7]}, "ids") == "7"
    assert match_key({}, "email") is None
    assert match_key({"properties": {}}, "properties.email") is None
    assert match_key({"emails": []}, "emails") is None


def test_a_compiled_mapping_is_fast_enough_for_the_benchmark() -> None:
    mapper = compile_mapping(
        {
            "email_address": "emails[primary eq true].value | emails[value pr].value",
            "merge_fields.FNAME": "name.givenName",
            "merge_fields.LNAME": "name.familyName",
            "tier": f"{CUSTOMER}:loyalty.tier",
            "consent": 'consents[purpose eq "marketing_email"].granted',
        }
    )
    docs = [user_doc() for _ in range(100)]
    start = time.perf_counter()
    for _ in range(200):
        for doc in docs:
            mapper(doc)
    elapsed = time.perf_counter() - start
    # 20,000 maps; a generous bound so a busy CI machine passes: 100,000 records well under 10 s.
    assert elapsed < 2.0, elapsed


@pytest.mark.parametrize("kind", ["scim", "shop", "newsletter", "crm", "webhook"])
def test_every_built_in_connector_default_mapping_compiles(kind: str) -> None:
    from connectors.registry import connector_class

    mapper = compile_mapping(connector_class(kind).default_mapping)
    mapped = mapper(
        {
            "userName": "u",
            "emails": [{"value": "u@example.org", "primary": True}],
            "name": {"givenName": "G", "familyName": "F"},
            "urn:idhub:schemas:extension:customer:2.0:User": {"loyalty": {"tier": "gold"}},
        }
    )
    assert mapped, kind
