"""WooCommerce REST API v3 customers (``/wp-json/wc/v3``), Basic auth with ``token = "ck_...:cs_..."``.

Choices, each forced by the API:
- upsert without a remote id looks the customer up by e-mail and adopts it (PUT), else creates; a create
  that loses a race (400 ``registration-error-email-exists``) looks up again and adopts; with a remote id
  it PUTs, and a 404 raises GoneError;
- the hub id and a status live in ``meta_data`` (``idhub_id``, ``idhub_status``);
- WooCommerce cannot disable a customer: DEACTIVATE sets ``idhub_status = deactivated`` in meta_data and
  changes nothing else (the shop's own logic may act on it); DELETE and ERASE delete for good
  (``force=true``; customers cannot be trashed); ANONYMIZE overwrites names, addresses and phone with blanks
  and the e-mail with a placeholder ``anonymized-{id}@anonymized.invalid`` (RFC 2606), keeping orders;
- ``upsert_many`` is one ``customers/batch`` call (≤ 100 items, else 413): updates for records with a
  remote id, creates for the others; a create refused because the e-mail exists is adopted one by one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
from connectors.errors import GoneError, PermanentError, SyncError
from connectors.http import json_of, make_client, send

EXISTS = "registration-error-email-exists"
ADDRESS = (
    "first_name",
    "last_name",
    "company",
    "address_1",
    "address_2",
    "city",
    "postcode",
    "country",
    "state",
    "phone",
)
READ = ("email", "first_name", "last_name", "billing", "shipping")


class ShopConnector(Connector):
    kind = "shop"
    default_mapping = {
        "email": "emails[primary eq true].value",
        "first_name": "name.givenName",
        "last_name": "name.familyName",
        "billing.first_name": "name.givenName",
        "billing.last_name": "name.familyName",
        "billing.phone": "phoneNumbers[primary eq true].value",
    }
    match_field = "email"
    supports_batch = True
    supports_list = True
    supports_read = True
    max_batch = 100

    def __init__(self, settings: ConnectorSettings) -> None:
        key, _, secret = (settings.token or "").partition(":")
        key = str(settings.options.get("consumer_key", key))
        secret = str(settings.options.get("consumer_secret", secret))
        self.page_size = int(settings.options.get("page_size", 100))
        self.client = make_client(settings, auth=(key, secret) if key else None)

    # -- upsert -------------------------------------------------------------------------------------
    def upsert(self, record: Record) -> Result:
        body = self._body(record)
        if record.remote_id:
            send(self.client, "PUT", f"customers/{record.remote_id}", json=body)
            return Result(record.remote_id, "updated")
        email = email_of(record, "email")
        existing = self.find(email)
        if existing is None:
            try:
                return Result(
                    str(json_of(send(self.client, "POST", "customers", json=body))["id"]), "created"
                )
            except PermanentError as exc:
                if exc.code != EXISTS:
                    raise
            existing = self.find(email)  # another writer created it meanwhile
            if existing is None:
                raise PermanentError("customer rejected", code=EXISTS, status=400)
        send(self.client, "PUT", f"customers/{existing}", json=body)
        return Result(existing, "adopted")

    def upsert_many(self, records: Sequence[Record]) -> list[Result | Exception]:
        out: list[Result | Exception | None] = [None] * len(records)
        creates = [i for i, r in enumerate(records) if not r.remote_id]
        updates = [i for i, r in enumerate(records) if r.remote_id]
        payload = {
            "create": [self._body(records[i]) for i in creates],
            "update": [{**self._body(records[i]), "id": int(str(records[i].remote_id))} for i in updates],
        }
        answer = json_of(send(self.client, "POST", "customers/batch", json=payload))
        for i, item in zip(creates, answer.get("create", []), strict=False):
            error = item.get("error")
            if error is None:
                out[i] = Result(str(item["id"]), "created")
            elif error.get("code") != EXISTS:
                out[i] = _item_error(error)
        for i, item in zip(updates, answer.get("update", []), strict=False):
            error = item.get("error")
            out[i] = Result(str(records[i].remote_id), "updated") if error is None else _item_error(error)
        return self.upsert_rest(records, out)  # open ones: the e-mail exists already, adopt it

    # -- deprovision --------------------------------------------------------------------------------
    def deprovision(self, record: Record, action: DeprovisionAction) -> Result:
        remote_id = self.locate(record)
        if remote_id is None:
            return Result(None, "absent")
        path = f"customers/{remote_id}"
        body: dict[str, Any]
        if action in (DeprovisionAction.DELETE, DeprovisionAction.ERASE):
            response = send(self.client, "DELETE", path, params={"force": "true"}, expect={404})
        elif action == DeprovisionAction.DEACTIVATE:
            body = {"meta_data": [{"key": "idhub_status", "value": "deactivated"}]}
            response = send(self.client, "PUT", path, json=body, expect={404})
        else:
            blank = dict.fromkeys(ADDRESS, "")
            body = {
                "email": f"anonymized-{remote_id}@anonymized.invalid",
                "first_name": "",
                "last_name": "",
                "billing": {**blank, "email": ""},
                "shipping": blank,
                "meta_data": [{"key": "idhub_status", "value": "anonymized"}],
            }
            response = send(self.client, "PUT", path, json=body, expect={404})
        if response.status_code == 404:
            return Result(remote_id, "absent")
        return Result(remote_id, "deprovisioned", detail=str(action))

    # -- reading ------------------------------------------------------------------------------------
    def find(self, match_key: str) -> str | None:
        params = {"email": match_key, "role": "all"}
        found = json_of(send(self.client, "GET", "customers", params=params))
        return str(found[0]["id"]) if found else None

    def read(self, remote_id: str) -> Mapping[str, Any] | None:
        response = send(self.client, "GET", f"customers/{remote_id}", expect={404})
        return None if response.status_code == 404 else _mapped(json_of(response))

    def list_accounts(self, cursor: str | None = None) -> Page:
        page = int(cursor or 1)
        params = {"page": page, "per_page": self.page_size, "orderby": "id", "order": "asc", "role": "all"}
        response = send(self.client, "GET", "customers", params=params)
        accounts = [
            RemoteAccount(
                remote_id=str(c["id"]),
                match_key=c.get("email"),
                attributes=_mapped(c),
                external_id=_meta(c, "idhub_id"),
            )
            for c in json_of(response)
        ]
        pages = int(response.headers.get("X-WP-TotalPages", "1") or 1)
        return Page(accounts, str(page + 1) if page < pages else None)

    def probe(self) -> None:
        send(self.client, "GET", "customers", params={"per_page": 1})

    def close(self) -> None:
        self.client.close()

    # -- helpers ------------------------------------------------------------------------------------
    def _body(self, record: Record) -> dict[str, Any]:
        body = dict(record.attributes)
        if not record.remote_id:
            body["email"] = email_of(record, "email")
        body["meta_data"] = [
            *body.get("meta_data", []),
            {"key": "idhub_id", "value": record.identity_id},
            {"key": "idhub_status", "value": "active"},
        ]
        return body


def _item_error(error: Mapping[str, Any]) -> SyncError:
    status = int((error.get("data") or {}).get("status", 400))
    if status == 404:
        return GoneError("customer not found", status=404)
    return PermanentError("customer rejected", code=str(error.get("code") or "rejected"), status=status)


def _meta(customer: Mapping[str, Any], key: str) -> str | None:
    for meta in customer.get("meta_data") or ():
        if meta.get("key") == key:
            return str(meta.get("value"))
    return None


def _mapped(customer: Mapping[str, Any]) -> dict[str, Any]:
    out = {name: customer.get(name) for name in READ}
    out["meta_data"] = {m["key"]: m.get("value") for m in customer.get("meta_data") or ()}
    return out
