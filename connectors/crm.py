"""HubSpot CRM v3 contacts.

Choices, each forced by the API:
- upsert without a remote id creates; a 409 "Contact already exists. Existing ID: N" adopts N (PATCH);
  with a remote id it PATCHes, and a 404 raises GoneError;
- the hub id and a status go into two custom contact properties, ``options.id_property`` (default
  ``idhub_id``) and ``options.status_property`` (default ``idhub_status``: active, deactivated,
  anonymized); the portal must define them (an empty option name sends neither);
- DEACTIVATE sets the status property (HubSpot has no "disabled" contact), DELETE archives (restorable for
  90 days; HubSpot answers 204 even for an absent contact, so the connector reads first to report
  ``absent``), ERASE is ``gdpr-delete`` (permanent), ANONYMIZE blanks every personal property;
- ``upsert_many``: records with a remote id go through ``batch/update`` by id, the others through
  ``batch/upsert`` with ``idProperty: email`` (≤ 100 each; a repeated e-mail waits for a single upsert);
- a 429 from the ten-secondly limit carries no Retry-After: the hint is then the policy window
  (``X-HubSpot-RateLimit-Interval-Milliseconds``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from connectors.base import (
    Connector,
    ConnectorSettings,
    DeprovisionAction,
    Page,
    Record,
    RemoteAccount,
    Result,
)
from connectors.errors import ConflictError, GoneError, PermanentError, RetryableError, SyncError
from connectors.http import error_for, json_of, make_client, retry_after_seconds, send

BASE = "crm/v3/objects/contacts"
PERSONAL = (
    "email",
    "firstname",
    "lastname",
    "phone",
    "mobilephone",
    "company",
    "jobtitle",
    "website",
    "address",
    "city",
    "zip",
    "state",
    "country",
    "hs_language",
)
_EXISTING_ID = re.compile(r"Existing ID: (\d+)")


class CrmConnector(Connector):
    kind = "crm"
    default_mapping = {
        "properties.email": "emails[primary eq true].value",
        "properties.firstname": "name.givenName",
        "properties.lastname": "name.familyName",
        "properties.phone": "phoneNumbers[primary eq true].value",
    }
    match_field = "properties.email"
    supports_batch = True
    supports_list = True
    supports_read = True
    max_batch = 100

    def __init__(self, settings: ConnectorSettings) -> None:
        options = settings.options
        self.id_property = str(options.get("id_property", "idhub_id"))
        self.status_property = str(options.get("status_property", "idhub_status"))
        self.page_size = int(options.get("page_size", 100))
        self.client = make_client(settings)

    # -- upsert -------------------------------------------------------------------------------------
    def upsert(self, record: Record) -> Result:
        properties = self._properties(record)
        if record.remote_id:
            self._send("PATCH", f"{BASE}/{record.remote_id}", json={"properties": properties})
            return Result(record.remote_id, "updated")
        try:
            created = json_of(self._send("POST", BASE, json={"properties": properties}))
        except ConflictError as exc:
            existing = exc.remote_id or self.find(str(properties.get("email") or record.match_key or ""))
            if existing is None:
                raise
            self._send("PATCH", f"{BASE}/{existing}", json={"properties": properties})
            return Result(existing, "adopted")
        return Result(str(created["id"]), "created")

    def upsert_many(self, records: Sequence[Record]) -> list[Result | Exception]:
        out: list[Result | Exception | None] = [None] * len(records)
        updates = [i for i, r in enumerate(records) if r.remote_id]
        inputs = [{"id": records[i].remote_id, "properties": self._properties(records[i])} for i in updates]
        if inputs:
            answer = json_of(self._send("POST", f"{BASE}/batch/update", json={"inputs": inputs}))
            done = {str(r["id"]) for r in answer.get("results", [])}
            failed = _errors_by_context(answer)
            for i in updates:
                rid = str(records[i].remote_id)
                out[i] = Result(rid, "updated") if rid in done else failed.get(rid, _unknown())
        upserts: dict[str, int] = {}
        for i, record in enumerate(records):
            email = self._properties(record).get("email") or record.match_key
            if record.remote_id:
                continue
            if not email:
                out[i] = PermanentError("record has no e-mail address", code="no_email")
            elif str(email).lower() not in upserts:
                upserts[str(email).lower()] = i
        if upserts:
            inputs = [
                {"id": email, "idProperty": "email", "properties": self._properties(records[i])}
                for email, i in upserts.items()
            ]
            answer = json_of(self._send("POST", f"{BASE}/batch/upsert", json={"inputs": inputs}))
            by_email = {str(r["properties"].get("email", "")).lower(): r for r in answer.get("results", [])}
            failed = {k.lower(): v for k, v in _errors_by_context(answer).items()}
            for email, i in upserts.items():
                hit = by_email.get(email)
                if hit is not None:
                    out[i] = Result(str(hit["id"]), "created" if hit.get("new") else "updated")
                else:
                    out[i] = failed.get(email, _unknown())
        return self.upsert_rest(records, out)  # open ones: a second record with an e-mail of this batch

    # -- deprovision --------------------------------------------------------------------------------
    def deprovision(self, record: Record, action: DeprovisionAction) -> Result:
        remote_id = self.locate(record)
        if remote_id is None:
            return Result(None, "absent")
        path = f"{BASE}/{remote_id}"
        if action == DeprovisionAction.ERASE:
            response = self._send("POST", f"{BASE}/gdpr-delete", json={"objectId": remote_id}, expect={404})
        elif action == DeprovisionAction.DELETE:
            response = self._send("GET", path, expect={404})
            if response.status_code != 404:
                response = self._send("DELETE", path)
        else:
            deactivate = action == DeprovisionAction.DEACTIVATE
            properties: dict[str, str] = {} if deactivate else dict.fromkeys(PERSONAL, "")
            if self.status_property:
                properties[self.status_property] = "deactivated" if deactivate else "anonymized"
            response = self._send("PATCH", path, json={"properties": properties}, expect={404})
        if response.status_code == 404:
            return Result(remote_id, "absent")
        return Result(remote_id, "deprovisioned", detail=str(action))

    # -- reading ------------------------------------------------------------------------------------
    def find(self, match_key: str) -> str | None:
        # batch/read keeps the e-mail in the body: a GET by e-mail would put it in the target's access logs.
        body = {"idProperty": "email", "inputs": [{"id": match_key}], "properties": ["email"]}
        results = json_of(self._send("POST", f"{BASE}/batch/read", json=body)).get("results", [])
        return str(results[0]["id"]) if results else None

    def read(self, remote_id: str) -> Mapping[str, Any] | None:
        params = {"properties": ",".join(self._read_names())}
        response = self._send("GET", f"{BASE}/{remote_id}", params=params, expect={404})
        if response.status_code == 404:
            return None
        return {"properties": _present(json_of(response)["properties"], self._read_names())}

    def list_accounts(self, cursor: str | None = None) -> Page:
        params: dict[str, Any] = {"limit": self.page_size, "properties": ",".join(self._read_names())}
        if cursor:
            params["after"] = cursor
        answer = json_of(self._send("GET", BASE, params=params))
        accounts = [
            RemoteAccount(
                remote_id=str(c["id"]),
                match_key=c["properties"].get("email"),
                attributes={"properties": _present(c["properties"], self._read_names())},
                external_id=c["properties"].get(self.id_property) or None if self.id_property else None,
            )
            for c in answer.get("results", [])
        ]
        after = ((answer.get("paging") or {}).get("next") or {}).get("after")
        return Page(accounts, str(after) if after else None)

    def probe(self) -> None:
        self._send("GET", BASE, params={"limit": 1})

    def close(self) -> None:
        self.client.close()

    # -- helpers ------------------------------------------------------------------------------------
    def _properties(self, record: Record) -> dict[str, Any]:
        properties = dict(record.attributes.get("properties") or {})
        if self.id_property:
            properties[self.id_property] = record.identity_id
        if self.status_property:
            properties[self.status_property] = "active"
        return properties

    def _read_names(self) -> list[str]:
        names = [path.split(".", 1)[1] for path in self.default_mapping]
        return [*names, *(n for n in (self.id_property, self.status_property) if n)]

    def _send(
        self, method: str, url: str, *, expect: set[int] | None = None, **kwargs: Any
    ) -> httpx.Response:
        """``send`` plus HubSpot's quirks: the existing id of a 409, the policy window of a bare 429."""
        response = send(self.client, method, url, expect={409, 429, *(expect or ())}, **kwargs)
        if response.status_code == 409 and 409 not in (expect or ()):
            error = error_for(response)
            match = _EXISTING_ID.search(response.text)
            raise ConflictError(error.message, remote_id=match.group(1) if match else None, status=409)
        if response.status_code == 429 and 429 not in (expect or ()):
            hint = retry_after_seconds(response.headers.get("Retry-After"))
            if hint is None:
                window = response.headers.get("X-HubSpot-RateLimit-Interval-Milliseconds", "")
                hint = int(window) / 1000 if window.isdigit() else None
            policy = _policy(response)
            raise RetryableError(
                f"{method} contacts -> 429 ({policy})", retry_after=hint, code="rate_limited", status=429
            )
        return response


def _present(properties: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {n: properties.get(n) for n in names if properties.get(n) not in (None, "")}


def _policy(response: httpx.Response) -> str:
    try:
        body = json_of(response)
    except ValueError:
        return "unknown"
    policy = body.get("policyName") if isinstance(body, dict) else None
    return policy if isinstance(policy, str) and policy.isidentifier() else "unknown"


def _errors_by_context(answer: Mapping[str, Any]) -> dict[str, SyncError]:
    """Batch errors keyed by the input id HubSpot names in their context (messages dropped: they hold PII)."""
    out: dict[str, SyncError] = {}
    for error in answer.get("errors", []):
        category = str(error.get("category") or "error")
        exc: SyncError = (
            GoneError("contact not found", status=404)
            if category == "OBJECT_NOT_FOUND"
            else PermanentError(f"batch input rejected ({category})", code=category)
        )
        for value in (error.get("context") or {}).get("id", []):
            out[str(value)] = exc
    return out


def _unknown() -> SyncError:
    return RetryableError("the batch answer did not mention this record", code="batch_missing")
