"""The connector contract: everything idhub asks of a target, in one small interface.

The hub hands a connector ``Record``s whose ``attributes`` are already mapped to the target's own field
names (data minimisation happens before a connector sees anything). A connector speaks its target's real
API, keeps one pooled HTTP client with timeouts, and raises only ``connectors.errors`` exceptions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from connectors.errors import PermanentError


class DeprovisionAction(StrEnum):
    DELETE = "delete"  # remove the remote account (archive where the API only archives)
    DEACTIVATE = "deactivate"  # keep the account, switch it off (SCIM active=false, unsubscribe, ...)
    ANONYMIZE = "anonymize"  # keep the account, overwrite every personal field
    ERASE = "erase"  # GDPR Art. 17: the target's permanent-erasure path where it has one, else delete


@dataclass(frozen=True)
class Record:
    """One hub identity as one target should hold it."""

    identity_id: str  # the hub's id; connectors may send it as externalId / a custom property
    version: int  # the hub version this payload reflects
    attributes: Mapping[str, Any]  # nested dict of the target's own fields, already mapped
    remote_id: str | None = None  # the target's id for this identity, when the ledger knows it
    match_key: str | None = None  # value used to find an existing account (e-mail, userName)
    # The hub switched this account off earlier (deactivated, left scope) and wants it on again: a target
    # whose update never changes an account's state by itself (a newsletter's status) turns it back on.
    resume: bool = False
    # Never tried at this target before: an account can only exist if someone else made it. A connector
    # whose target enforces uniqueness of the matching key (SCIM userName) may create first and adopt on
    # the conflict, saving a lookup per new record.
    first_attempt: bool = False


@dataclass(frozen=True)
class Result:
    """What the target now holds for a record."""

    remote_id: str | None
    outcome: str  # created | updated | adopted | unchanged | deprovisioned | absent
    detail: str = ""  # short, PII-free


@dataclass(frozen=True)
class RemoteAccount:
    """An account as listed by the target, for reconciliation."""

    remote_id: str
    match_key: str | None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    external_id: str | None = None  # the hub id, when the target stores it


@dataclass(frozen=True)
class Page:
    accounts: Sequence[RemoteAccount]
    next_cursor: str | None  # None on the last page


class Connector(ABC):
    """A target's API. Implementations are thread-safe and reuse one pooled client."""

    kind: ClassVar[str]  # the name used in the targets file (``connector: newsletter``)
    default_mapping: ClassVar[Mapping[str, str]]  # target field path <- hub attribute path
    match_field: ClassVar[str]  # target field path holding the matching key (e-mail, userName)
    supports_batch: ClassVar[bool] = False
    supports_list: ClassVar[bool] = False
    supports_groups: ClassVar[bool] = False
    supports_read: ClassVar[bool] = False  # ``read`` returns what the target holds (read-back, export)
    max_batch: ClassVar[int] = 1

    @abstractmethod
    def upsert(self, record: Record) -> Result:
        """Create or update the account so it holds ``record.attributes``; never creates a second account.

        With no ``remote_id`` it looks the account up by ``match_key`` first and adopts it when found.
        Raises GoneError when ``remote_id`` names an account the target no longer has.
        """

    def upsert_many(self, records: Sequence[Record]) -> list[Result | Exception]:
        """Upsert up to ``max_batch`` records, one result or SyncError per record, in order.

        Raises a SyncError only when the whole batch failed (e.g. RetryableError on a 429).
        """
        return self.upsert_rest(records, [None] * len(records))

    def upsert_rest(
        self, records: Sequence[Record], out: list[Result | Exception | None]
    ) -> list[Result | Exception]:
        """``out`` of a batch call with each record it left open (None) upserted on its own."""
        for i, record in enumerate(records):
            if out[i] is None:
                try:
                    out[i] = self.upsert(record)
                except Exception as exc:  # collected per record, classified by the caller
                    out[i] = exc
        return [r for r in out if r is not None]

    def locate(self, record: Record) -> str | None:
        """The record's remote id: the ledger's, else the account found by its matching key, else None."""
        if record.remote_id:
            return record.remote_id
        return self.find(record.match_key) if record.match_key else None

    @abstractmethod
    def deprovision(self, record: Record, action: DeprovisionAction) -> Result:
        """Apply a deprovisioning action; an account that is already absent gives outcome ``absent``.

        ``record.attributes`` may be empty (a tombstone): connectors then work from ``remote_id`` and
        ``match_key`` only.
        """

    @abstractmethod
    def find(self, match_key: str) -> str | None:
        """The remote id of the account whose matching key is ``match_key``, or None."""

    def read(self, remote_id: str) -> Mapping[str, Any] | None:
        """What the target holds for an account (mapped field names), or None when absent."""
        raise NotImplementedError

    def list_accounts(self, cursor: str | None = None) -> Page:
        """One page of the target's accounts; pass ``next_cursor`` back for the next page."""
        raise NotImplementedError

    def pages(self) -> Iterator[Page]:
        """Every page of ``list_accounts``, following the cursor to the end."""
        cursor: str | None = None
        while True:
            page = self.list_accounts(cursor)
            yield page
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def upsert_group(
        self, group_id: str, display_name: str, member_remote_ids: Sequence[str], remote_id: str | None = None
    ) -> Result:
        """Create or update a group with exactly these members (only when ``supports_groups``)."""
        raise NotImplementedError

    def delete_group(self, group_id: str, remote_id: str | None = None) -> Result:
        """Delete a group (only when ``supports_groups``); without ``remote_id`` it is looked up by
        ``group_id``, as a create whose answer was lost left it. Outcome ``absent`` when there is none."""
        raise NotImplementedError

    @abstractmethod
    def probe(self) -> None:
        """Return when the target answers; raise RetryableError when it does not (used by quarantine)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release pooled connections."""


@dataclass(frozen=True)
class ConnectorSettings:
    """What a connector is built from; the hub turns its target configuration into this."""

    name: str  # the target's name
    url: str
    token: str | None = None
    timeout: float = 10.0
    max_connections: int = 10
    options: Mapping[str, Any] = field(default_factory=dict)  # connector-specific keys (list_id, ...)


def email_of(record: Record, field: str) -> str:
    """The record's e-mail address (its mapped ``field``, else its matching key); PermanentError without."""
    email = record.attributes.get(field) or record.match_key
    if not isinstance(email, str) or not email:
        raise PermanentError("record has no e-mail address", code="no_email")
    return email
