"""The hub's SCIM resource models: core User and Group, the enterprise and the customer extensions."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import Field
from scim2_models import URN, CaseExact, ComplexAttribute, Extension, Required

CUSTOMER_SCHEMA = "urn:idhub:schemas:extension:customer:2.0:User"
# Examples document the format, and let schema-driven test clients fill the fields with valid values.
EXAMPLE_TIME = "2025-05-01T09:30:00Z"


class Consent(ComplexAttribute):
    """One purpose the customer granted or refused, and where that came from."""

    purpose: Annotated[str | None, Required.true, CaseExact.true] = None
    """What the consent is for, such as marketing_email, marketing_sms or profiling."""

    granted: Annotated[bool | None, Required.true] = None
    """Whether the customer agreed."""

    updated_at: datetime | None = Field(None, examples=[EXAMPLE_TIME])
    """When the customer last gave or withdrew it."""

    source: str | None = None
    """Where it was given: a form, an app, a shop checkout."""


class Frequency(StrEnum):
    daily = "daily"
    weekly = "weekly"
    monthly = "monthly"
    never = "never"


class MarketingPreferences(ComplexAttribute):
    topics: list[str] | None = None
    """Topics the customer wants to hear about."""

    frequency: Frequency | None = None
    """How often the customer wants to hear from the company."""


class Loyalty(ComplexAttribute):
    tier: str | None = None
    """Loyalty programme tier, such as bronze, silver, gold."""

    points: int | None = None
    """Current points balance."""

    member_since: datetime | None = Field(None, examples=[EXAMPLE_TIME])
    """When the customer joined the programme."""


class CustomerUser(Extension):
    __schema__ = URN(CUSTOMER_SCHEMA)

    consents: list[Consent] | None = None
    """The customer's consents, one per purpose."""

    marketing_preferences: MarketingPreferences | None = None
    """What and how often the customer wants to hear."""

    loyalty: Loyalty | None = None
    """The customer's loyalty programme membership."""

    customer_number: Annotated[str | None, CaseExact.true] = None
    """The company's own customer number."""
