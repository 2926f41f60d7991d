"""A generic HTTPS endpoint receiving Standard Webhooks 1.0 events, signed with ``token`` (``whsec_...``).

Events: ``customer.upserted`` (data: id, version, the mapped attributes), ``customer.deactivated``,
``customer.deleted``, ``customer.erased`` (data: id and version only). ANONYMIZE sends
``customer.erased``: the receiver is told to forget the personal data, which is all anonymizing asks of it.
The ``webhook-id`` is derived from (identity, version, action), so every retry of one change carries the
same id and the receiver can drop repeats. 410 stops the target (TargetDisabledError). The secret signs;
it is never sent. A webhook cannot be queried: ``find`` knows nothing and there is no list or read.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

from connectors.base import Connector, ConnectorSettings, DeprovisionAction, Record, Result
from connectors.errors import TargetDisabledError
from connectors.http import make_client, send

EVENTS = {
    DeprovisionAction.DEACTIVATE: "customer.deactivated",
    DeprovisionAction.DELETE: "customer.deleted",
    DeprovisionAction.ERASE: "customer.erased",
    DeprovisionAction.ANONYMIZE: "customer.erased",
}


def webhook_id(identity_id: str, version: int, action: str) -> str:
    """The delivery id of one change: stable across retries, different for every change."""
    return f"msg_{identity_id}_{version}_{action}"


class WebhookConnector(Connector):
    kind = "webhook"
    default_mapping = {
        "email": "emails[primary eq true].value",
        "given_name": "name.givenName",
        "family_name": "name.familyName",
    }
    match_field = "email"

    def __init__(self, settings: ConnectorSettings) -> None:
        if not settings.token:
            raise ValueError("the webhook connector needs token (the whsec_ signing secret)")
        self.signer = Webhook(settings.token)
        self.client = make_client(replace(settings, token=None))  # the secret must never travel
        self.url = settings.url  # absolute: base_url joining would add a trailing slash

    def upsert(self, record: Record) -> Result:
        data = {"id": record.identity_id, "version": record.version, "attributes": dict(record.attributes)}
        self._deliver("customer.upserted", webhook_id(record.identity_id, record.version, "upsert"), data)
        return Result(record.remote_id, "updated", detail="delivered")

    def deprovision(self, record: Record, action: DeprovisionAction) -> Result:
        data = {"id": record.identity_id, "version": record.version}
        self._deliver(EVENTS[action], webhook_id(record.identity_id, record.version, str(action)), data)
        return Result(record.remote_id, "deprovisioned", detail=str(action))

    def find(self, match_key: str) -> str | None:
        return None

    def probe(self) -> None:
        # Any answer but an outage means the endpoint is up; GET/HEAD on a POST-only URL is often 405.
        response = send(self.client, "HEAD", self.url, expect={*range(400, 500)} - {408, 429})
        if response.status_code == 410:
            raise TargetDisabledError("endpoint answered 410 Gone", status=410)

    def close(self) -> None:
        self.client.close()

    def _deliver(self, event_type: str, msg_id: str, data: dict[str, Any]) -> None:
        now = datetime.now(UTC)
        body = json.dumps(
            {"type": event_type, "timestamp": now.isoformat(), "data": data}, separators=(",", ":")
        )
        headers = {
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.signer.sign(msg_id, now, body),
            "content-type": "application/json",
        }
        response = send(self.client, "POST", self.url, content=body.encode(), headers=headers, expect={410})
        if response.status_code == 410:
            raise TargetDisabledError("endpoint answered 410 Gone", status=410)
