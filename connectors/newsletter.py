"""Mailchimp Marketing API v3: one audience (``options.list_id``) of list members.

A member's id is the md5 of its lower-cased address, so the address is both the matching key and the
remote id. Choices, each forced by the API:
- upsert without a remote id reads the member first (to tell created from adopted), then ``PUT``s it with
  ``status_if_new`` (``options.status_if_new``, default subscribed); ``status`` is sent only when the mapping
  gives one, so a contact who unsubscribed at Mailchimp is never re-subscribed by a profile update;
- upsert with a remote id ``PATCH``es; a member that is missing or archived raises GoneError;
- a changed address makes a new member (Mailchimp keys members by address): the old one is archived first;
- the hub id is stored in the merge field ``options.id_merge_field`` (default ``IDHUB_ID``; empty: not sent);
- DEACTIVATE = status unsubscribed, DELETE = archive, ERASE = delete-permanent (the address can never be
  added again), ANONYMIZE = blank every merge field, then archive (the address is the key: only ERASE
  removes it);
- ``upsert_many`` uses batch subscribe (≤ 500). That endpoint overwrites the status of existing members,
  so it is sent with ``update_existing`` only when every record carries a mapped ``status``; otherwise it
  takes the records without a remote id and ``update_existing: false``, and members that already exist
  (and records with a remote id) go through ``upsert`` one by one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from connectors.base import (
    Connector,
    ConnectorSettings,
    DeprovisionAction,
    Page,
    Record,
    RemoteAccount,
    Result,
    email_of,
)
from connectors.errors import GoneError, PermanentError
from connectors.http import json_of, make_client, send


def subscriber_hash(email: str) -> str:
    """Mailchimp's member id for an address."""
    return hashlib.md5(email.strip().lower().encode(), usedforsecurity=False).hexdigest()


class NewsletterConnector(Connector):
    kind = "newsletter"
    default_mapping = {
        "email_address": "emails[primary eq true].value",
        "merge_fields.FNAME": "name.givenName",
        "merge_fields.LNAME": "name.familyName",
        "language": "preferredLanguage",
    }
    match_field = "email_address"
    supports_batch = True
    supports_list = True
    supports_read = True
    max_batch = 500

    def __init__(self, settings: ConnectorSettings) -> None:
        options = settings.options
        if not options.get("list_id"):
            raise ValueError("the newsletter connector needs options.list_id")
        self.list_id = str(options["list_id"])
        self.status_if_new = str(options.get("status_if_new", "subscribed"))
        self.id_merge_field = str(options.get("id_merge_field", "IDHUB_ID"))
        self.page_size = int(options.get("page_size", 1000))
        self.client = make_client(settings)
        self.members = f"lists/{self.list_id}/members"

    # -- upsert -------------------------------------------------------------------------------------
    def upsert(self, record: Record) -> Result:
        email = email_of(record, "email_address")
        key = subscriber_hash(email)
        if record.remote_id and record.remote_id != key:  # the address changed
            send(self.client, "DELETE", f"{self.members}/{record.remote_id}", expect={404})
            record = replace(record, remote_id=None)
        if record.remote_id:
            member = json_of(send(self.client, "PATCH", f"{self.members}/{key}", json=self._body(record)))
            if member.get("status") == "archived":
                raise GoneError("member is archived at the target", status=404)
            return Result(key, "updated")
        existing = self.find(email)
        body = {**self._body(record), "email_address": email, "status_if_new": self.status_if_new}
        send(self.client, "PUT", f"{self.members}/{key}", json=body)
        return Result(key, "adopted" if existing else "created")

    def upsert_many(self, records: Sequence[Record]) -> list[Result | Exception]:
        explicit = all("status" in self._body(r) for r in records)
        batched = [i for i, r in enumerate(records) if explicit or not r.remote_id]
        out: list[Result | Exception | None] = [None] * len(records)
        members: list[dict[str, Any]] = []
        for i in batched:
            try:
                email = email_of(records[i], "email_address")
            except PermanentError as exc:
                out[i] = exc
                continue
            body = self._body(records[i])
            members.append({**body, "email_address": email, "status": body.get("status", self.status_if_new)})
        if members:
            body = {"members": members, "update_existing": explicit}
            answer = json_of(send(self.client, "POST", f"lists/{self.list_id}", json=body))
            created = {m["email_address"].lower() for m in answer.get("new_members", [])}
            updated = {m["email_address"].lower() for m in answer.get("updated_members", [])}
            errors = {str(e.get("email_address", "")).lower(): e for e in answer.get("errors", [])}
            for i in batched:
                if out[i] is not None:
                    continue
                email = email_of(records[i], "email_address").lower()
                error = errors.get(email)
                if email in created:
                    out[i] = Result(subscriber_hash(email), "created")
                elif email in updated:
                    out[i] = Result(subscriber_hash(email), "updated")
                elif error is not None and error.get("error_code") != "ERROR_CONTACT_EXISTS":
                    out[i] = _batch_error(error)
        return self.upsert_rest(records, out)  # open ones: known or existing members, one PATCH/PUT each

    # -- deprovision --------------------------------------------------------------------------------
    def deprovision(self, record: Record, action: DeprovisionAction) -> Result:
        key = record.remote_id or self._key_of(record)
        if key is None:
            return Result(None, "absent")
        member = self._get(key)
        if member is None or (member["status"] == "archived" and action != DeprovisionAction.ERASE):
            return Result(key, "absent")
        path = f"{self.members}/{key}"
        if action == DeprovisionAction.DEACTIVATE:
            send(self.client, "PATCH", path, json={"status": "unsubscribed"})
        elif action == DeprovisionAction.DELETE:
            send(self.client, "DELETE", path)
        elif action == DeprovisionAction.ANONYMIZE:
            blank = dict.fromkeys(member.get("merge_fields") or {}, "")
            send(self.client, "PATCH", path, json={"merge_fields": blank, "language": ""})
            send(self.client, "DELETE", path)
        else:
            send(self.client, "POST", f"{path}/actions/delete-permanent")
        return Result(key, "deprovisioned", detail=str(action))

    # -- reading ------------------------------------------------------------------------------------
    def find(self, match_key: str) -> str | None:
        member = self._get(subscriber_hash(match_key))
        return None if member is None or member["status"] == "archived" else str(member["id"])

    def read(self, remote_id: str) -> Mapping[str, Any] | None:
        member = self._get(remote_id)
        if member is None or member["status"] == "archived":
            return None
        return _mapped(member)

    def list_accounts(self, cursor: str | None = None) -> Page:
        offset = int(cursor or 0)
        params = {"count": self.page_size, "offset": offset}
        answer = json_of(send(self.client, "GET", self.members, params=params))
        members = answer.get("members", [])
        accounts = [
            RemoteAccount(
                remote_id=str(m["id"]),
                match_key=m.get("email_address"),
                attributes=_mapped(m),
                external_id=(m.get("merge_fields") or {}).get(self.id_merge_field) or None,
            )
            for m in members
        ]
        end = offset + len(members)
        return Page(accounts, str(end) if members and end < int(answer.get("total_items", 0)) else None)

    def probe(self) -> None:
        send(self.client, "GET", self.members, params={"count": 1, "fields": "total_items"})

    def close(self) -> None:
        self.client.close()

    # -- helpers ------------------------------------------------------------------------------------
    def _key_of(self, record: Record) -> str | None:
        email = record.attributes.get("email_address") or record.match_key
        return subscriber_hash(email) if isinstance(email, str) and email else None

    def _body(self, record: Record) -> dict[str, Any]:
        body = {k: v for k, v in record.attributes.items() if k in ("merge_fields", "language", "status")}
        if record.resume:
            body.setdefault("status", self.status_if_new)
        if self.id_merge_field:
            body["merge_fields"] = {
                **(body.get("merge_fields") or {}),
                self.id_merge_field: record.identity_id,
            }
        return body

    def _get(self, key: str) -> dict[str, Any] | None:
        response = send(self.client, "GET", f"{self.members}/{key}", expect={404})
        return None if response.status_code == 404 else dict(json_of(response))


def _mapped(member: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "email_address": member.get("email_address"),
        "merge_fields": dict(member.get("merge_fields") or {}),
        "language": member.get("language", ""),
        "status": member.get("status"),
    }


def _batch_error(error: Mapping[str, Any]) -> PermanentError:
    # The error text names the address: keep only Mailchimp's code.
    text = str(error.get("error", ""))
    code = "forgotten_email" if "permanently deleted" in text else str(error.get("error_code") or "rejected")
    return PermanentError(f"batch member rejected ({code})", code=code)
