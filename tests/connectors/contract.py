"""The contract every connector passes, against a real loopback target.

To use it for a connector:
1. write a ``Harness`` subclass: it builds connectors for one running target, makes mapped ``Record``s,
   reads back what the target holds and sets its faults (``SandboxHarness`` does the generic part for the
   ``connectors.sandbox`` simulators);
2. start the target once per module (``sandbox_server`` does it for a simulator) and give the test class a
   function-scoped ``harness`` fixture that hands out a harness on an empty, fault-free target;
3. subclass ``ConnectorContract`` and add the target's own quirks as extra tests.
Capability flags on the class (``stateful``) and on the connector (``supports_batch``, ``supports_list``,
``supports_read``) skip what does not apply.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import httpx
import pytest

from connectors.base import Connector, DeprovisionAction, Record
from connectors.errors import GoneError, PermanentError, RetryableError
from connectors.registry import connector_class
from connectors.sandbox.core import SandboxServer
from connectors.sandbox.runner import build_simulator, connector_settings


class Harness(ABC):
    """One target as the contract sees it: built per test on an empty target without faults."""

    kind: str  # the connector kind

    @abstractmethod
    def connector(self, *, timeout: float = 5.0, **options: Any) -> Connector:
        """A connector for the target; ``options`` are connector options (e.g. ``page_size``)."""

    @abstractmethod
    def record(self, n: int, *, version: int = 1, remote_id: str | None = None, given: str = "Ada") -> Record:
        """Customer ``n`` (a unique e-mail ``email(n)``) mapped for this target, given name ``given``."""

    def email(self, n: int) -> str:
        return f"customer{n}@example.com"

    def identity_id(self, n: int) -> str:
        return f"00000000-0000-4000-8000-{n:012d}"

    @abstractmethod
    def accounts(self) -> list[Mapping[str, Any]]:
        """Every live account the target holds, as the target stores it."""

    @abstractmethod
    def account(self, n: int) -> Mapping[str, Any] | None:
        """The live account holding ``email(n)``, or None."""

    @abstractmethod
    def given_name(self, account: Mapping[str, Any]) -> str:
        """The given name as the target stores it."""

    @abstractmethod
    def is_deactivated(self, account: Mapping[str, Any]) -> bool:
        """Whether the account is switched off (unsubscribed, flagged, active=false)."""

    @abstractmethod
    def create_directly(self, n: int) -> str:
        """Create customer ``n`` through the target's own API, bypassing the connector; its remote id."""

    @abstractmethod
    def remove_directly(self, remote_id: str) -> None:
        """Remove an account behind the connector's back."""

    @abstractmethod
    def set_faults(self, **knobs: Any) -> None:
        """Set fault knobs: error_rate, timeout_rate, burst_429 + retry_after, outage, reject_keys."""

    def erased(self, n: int) -> bool:
        """Whether nothing of customer ``n`` is left at the target."""
        return self.account(n) is None


class SandboxHarness(Harness):
    """The generic half of a harness for a ``connectors.sandbox`` simulator (faults and state over HTTP)."""

    def __init__(self, server: SandboxServer) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.root, timeout=10)
        self.http.post("/_sandbox/reset").raise_for_status()

    def connector(self, *, timeout: float = 5.0, **options: Any) -> Connector:
        settings = connector_settings(self.kind, self.server.url, timeout=timeout)
        settings = replace(settings, options={**settings.options, **options})
        return connector_class(self.kind)(settings)  # type: ignore[call-arg]

    def state(self) -> Any:
        return self.http.get("/_sandbox/state").json()

    def requests(self) -> list[dict[str, Any]]:
        return list(self.http.get("/_sandbox/requests").json())

    def set_faults(self, **knobs: Any) -> None:
        self.http.post("/_sandbox/faults", json=knobs).raise_for_status()

    def close(self) -> None:
        self.http.close()


def sandbox_server(kind: str, **kwargs: Any) -> Iterator[SandboxServer]:
    """Run one simulator for a test module: ``yield from sandbox_server("crm")`` in a module fixture."""
    server = SandboxServer(build_simulator(kind, **kwargs)).start()
    try:
        yield server
    finally:
        server.stop()


class ConnectorContract:
    """What every connector must do; subclasses provide the ``harness`` fixture."""

    stateful = True  # the target holds accounts that can be found, adopted and read back

    @pytest.fixture
    def harness(self) -> Harness:
        raise NotImplementedError("a contract subclass provides the harness fixture")

    @pytest.fixture
    def connector(self, harness: Harness) -> Iterator[Connector]:
        connector = harness.connector()
        yield connector
        connector.close()

    def _stateful(self) -> None:
        if not self.stateful:
            pytest.skip("the target holds no queryable accounts")

    # -- upsert -------------------------------------------------------------------------------------
    def test_upsert_creates(self, harness: Harness, connector: Connector) -> None:
        self._stateful()
        result = connector.upsert(harness.record(1))
        account = harness.account(1)
        assert result.outcome == "created"
        assert result.remote_id
        assert account is not None
        assert harness.given_name(account) == "Ada"
        assert len(harness.accounts()) == 1

    def test_upsert_updates_by_remote_id(self, harness: Harness, connector: Connector) -> None:
        self._stateful()
        first = connector.upsert(harness.record(1))
        second = connector.upsert(harness.record(1, version=2, remote_id=first.remote_id, given="Grace"))
        account = harness.account(1)
        assert second.outcome == "updated"
        assert second.remote_id == first.remote_id
        assert account is not None
        assert harness.given_name(account) == "Grace"
        assert len(harness.accounts()) == 1

    def test_repeated_upsert_never_duplicates(self, harness: Harness, connector: Connector) -> None:
        self._stateful()
        first = connector.upsert(harness.record(1))
        again = connector.upsert(harness.record(1, given="Grace"))  # e.g. the ledger lost the remote id
        assert again.remote_id == first.remote_id
        assert again.outcome in ("adopted", "updated")
        assert len(harness.accounts()) == 1

    def test_adopts_an_existing_account(self, harness: Harness, connector: Connector) -> None:
        self._stateful()
        existing = harness.create_directly(1)
        result = connector.upsert(harness.record(1, given="Grace"))
        account = harness.account(1)
        assert result.remote_id == existing
        assert result.outcome == "adopted"
        assert account is not None
        assert harness.given_name(account) == "Grace"
        assert len(harness.accounts()) == 1
        assert connector.find(harness.email(1)) == existing

    def test_update_of_a_vanished_account_raises_gone(self, harness: Harness, connector: Connector) -> None:
        self._stateful()
        created = connector.upsert(harness.record(1))
        assert created.remote_id is not None
        harness.remove_directly(created.remote_id)
        with pytest.raises(GoneError):
            connector.upsert(harness.record(1, version=2, remote_id=created.remote_id))
        assert harness.accounts() == []  # nothing was re-created behind the ledger's back

    # -- deprovision --------------------------------------------------------------------------------
    def test_deactivate_keeps_the_account_switched_off(self, harness: Harness, connector: Connector) -> None:
        self._stateful()
        created = connector.upsert(harness.record(1))
        result = connector.deprovision(
            harness.record(1, remote_id=created.remote_id), DeprovisionAction.DEACTIVATE
        )
        account = harness.account(1)
        assert result.outcome == "deprovisioned"
        assert account is not None
        assert harness.is_deactivated(account)

    def test_delete_removes_the_account(self, harness: Harness, connector: Connector) -> None:
        self._stateful()
        created = connector.upsert(harness.record(1))
        result = connector.deprovision(
            harness.record(1, remote_id=created.remote_id), DeprovisionAction.DELETE
        )
        assert result.outcome == "deprovisioned"
        assert harness.account(1) is None

    def test_erase_from_a_tombstone(self, harness: Harness, connector: Connector) -> None:
        self._stateful()
        created = connector.upsert(harness.record(1))
        tombstone = Record(
            harness.identity_id(1), 2, {}, remote_id=created.remote_id, match_key=harness.email(1)
        )
        result = connector.deprovision(tombstone, DeprovisionAction.ERASE)
        assert result.outcome == "deprovisioned"
        assert harness.erased(1)

    @pytest.mark.parametrize("action", list(DeprovisionAction))
    def test_deprovision_of_an_absent_account(
        self, harness: Harness, connector: Connector, action: DeprovisionAction
    ) -> None:
        self._stateful()
        tombstone = Record(harness.identity_id(9), 2, {}, match_key=harness.email(9))
        assert connector.deprovision(tombstone, action).outcome == "absent"
        created = connector.upsert(harness.record(8))
        assert created.remote_id is not None
        harness.remove_directly(created.remote_id)
        gone = Record(harness.identity_id(8), 2, {}, remote_id=created.remote_id, match_key=harness.email(8))
        assert connector.deprovision(gone, action).outcome == "absent"

    # -- batch, list, read --------------------------------------------------------------------------
    def test_batch_reports_per_record(self, harness: Harness, connector: Connector) -> None:
        if not connector.supports_batch:
            pytest.skip("no batch API")
        known = connector.upsert(harness.record(1))
        harness.set_faults(reject_keys=[harness.email(4)])
        records = [
            harness.record(1, version=2, remote_id=known.remote_id, given="Grace"),
            harness.record(2),
            harness.record(3),
            harness.record(4),
        ]
        results = connector.upsert_many(records)
        assert len(results) == 4
        updated, second, third, rejected = results
        assert not isinstance(updated, Exception)
        assert updated.remote_id == known.remote_id
        assert not isinstance(second, Exception)
        assert second.outcome == "created"
        assert not isinstance(third, Exception)
        assert third.outcome == "created"
        assert isinstance(rejected, PermanentError)
        assert len(harness.accounts()) == 3
        account = harness.account(1)
        assert account is not None
        assert harness.given_name(account) == "Grace"
        # a repeat adopts instead of duplicating
        again = connector.upsert_many([harness.record(2, given="Grace"), harness.record(3)])
        assert [r.remote_id for r in again if not isinstance(r, Exception)] == [
            second.remote_id,
            third.remote_id,
        ]
        assert len(harness.accounts()) == 3

    def test_list_pages_through_every_account(self, harness: Harness) -> None:
        connector = harness.connector(page_size=2)
        if not connector.supports_list:
            pytest.skip("no list API")
        created = {connector.upsert(harness.record(n)).remote_id: harness.identity_id(n) for n in range(1, 6)}
        seen: dict[str, str | None] = {}
        cursor: str | None = None
        pages = 0
        while True:
            page = connector.list_accounts(cursor)
            pages += 1
            seen.update({a.remote_id: a.external_id for a in page.accounts})
            assert all(a.match_key for a in page.accounts)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == created
        assert pages == 3
        connector.close()

    def test_read_returns_what_the_target_holds(self, harness: Harness, connector: Connector) -> None:
        if not connector.supports_read:
            pytest.skip("no read API")
        created = connector.upsert(harness.record(1))
        assert created.remote_id is not None
        held = connector.read(created.remote_id)
        assert held is not None
        assert harness.email(1) in str(held)
        assert "Ada" in str(held)
        harness.remove_directly(created.remote_id)
        assert connector.read(created.remote_id) is None

    # -- error classes ------------------------------------------------------------------------------
    def test_server_errors_are_retryable(self, harness: Harness, connector: Connector) -> None:
        harness.set_faults(error_rate=1.0)
        with pytest.raises(RetryableError) as caught:
            connector.upsert(harness.record(1))
        assert caught.value.status in (500, 503)

    def test_429_is_retryable_with_retry_after(self, harness: Harness, connector: Connector) -> None:
        harness.set_faults(burst_429=1, retry_after=7)
        with pytest.raises(RetryableError) as caught:
            connector.upsert(harness.record(1))
        assert caught.value.status == 429
        assert caught.value.retry_after == 7

    def test_timeout_is_retryable(self, harness: Harness) -> None:
        connector = harness.connector(timeout=0.3)
        harness.set_faults(timeout_rate=1.0, hang_s=5)
        started = time.monotonic()
        with pytest.raises(RetryableError) as caught:
            connector.upsert(harness.record(1))
        assert caught.value.code == "timeout"
        assert time.monotonic() - started < 3
        connector.close()

    def test_rejected_record_is_permanent(self, harness: Harness, connector: Connector) -> None:
        harness.set_faults(reject_keys=[harness.email(1)])
        with pytest.raises(PermanentError) as caught:
            connector.upsert(harness.record(1))
        assert harness.email(1) not in str(caught.value)  # no PII in what gets stored
        connector.upsert(harness.record(2))  # only that record is refused

    def test_probe_follows_an_outage(self, harness: Harness, connector: Connector) -> None:
        connector.probe()
        harness.set_faults(outage=True)
        with pytest.raises(RetryableError):
            connector.probe()
        harness.set_faults(outage=False)
        connector.probe()
