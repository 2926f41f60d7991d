"""A Standard Webhooks 1.0 receiver at ``POST /webhook``.

Verifies each delivery with the ``standardwebhooks`` package (401 on a missing, stale or wrong signature),
records each verified event once (id, type, body, received) and answers 204; a repeated ``webhook-id`` is
acknowledged again but not recorded twice. ``reject_keys`` refuses (400) an event whose ``data.attributes``
hold one of the keys; the ``gone`` knob makes it answer 410 (endpoint disabled) to everything.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from connectors.sandbox.core import Simulator


class WebhookSimulator(Simulator):
    name = "webhook"
    base_path = "/webhook"

    def __init__(self, *, secret: str, **kwargs: Any) -> None:
        self.verifier = Webhook(secret)
        super().__init__(**kwargs)

    def reset_state(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.seen: set[str] = set()
        self.duplicates = 0

    def snapshot(self) -> Any:
        return {"events": list(self.events), "duplicates": self.duplicates}

    def error(self, status: int, reason: str, detail: str = "") -> Response:
        return JSONResponse({"error": reason, "detail": detail}, status_code=status)

    def routes(self) -> Sequence[BaseRoute]:
        return [Route("/webhook", self.receive, methods=["POST"])]

    async def receive(self, request: Request) -> Response:
        raw = (await request.body()).decode("utf-8", errors="replace")
        try:
            body = self.verifier.verify(raw, dict(request.headers))
        except (WebhookVerificationError, ValueError):
            return self.error(401, "invalid_signature", "The signature does not verify.")
        event_id = request.headers["webhook-id"]
        attributes = (body.get("data") or {}).get("attributes") or {} if isinstance(body, dict) else {}
        with self.lock:
            if any(isinstance(v, str) and self.rejected(v) for v in _leaves(attributes)):
                return self.error(400, "rejected", "The event was refused.")
            if event_id in self.seen:
                self.duplicates += 1
            else:
                self.seen.add(event_id)
                self.events.append(
                    {"id": event_id, "type": body.get("type"), "body": body, "received": time.time()}
                )
        return Response(status_code=204)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]
