"""HubSpot CRM v3 contacts, in memory.

Modelled: create (201; a second contact with the same e-mail, case-insensitive, is 409 "Contact already
exists. Existing ID: N"), get / update / archive by id or ``?idProperty=email`` (archived contacts read as
404), batch create / read / update / upsert / archive (≤ 100 inputs; partial failure answers 207 with
``errors``), ``POST /crm/v3/objects/contacts/gdpr-delete`` (permanent), the list (``limit`` ≤ 100, ``after``,
``paging.next.after``), Bearer auth, unknown properties (400 PROPERTY_DOESNT_EXIST) and the ten-secondly
rolling limit: 429 ``{status, errorType: RATE_LIMIT, policyName: TEN_SECONDLY_ROLLING}`` once more than
``rate_limit`` (190) requests arrive within 10 s, with ``X-HubSpot-RateLimit-*`` headers on every answer.
Not modelled: the daily cap, search, associations, restoring archived contacts.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from connectors.sandbox.core import ApiError, JsonResponse, Simulator, now_iso

MAX_BATCH = 100
MAX_LIMIT = 100
PROPERTIES = (
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
    "lifecyclestage",
    "idhub_id",
    "idhub_status",
)
DEFAULT_READ = ("email", "firstname", "lastname")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_CATEGORY = {
    400: "VALIDATION_ERROR",
    401: "INVALID_AUTHENTICATION",
    404: "OBJECT_NOT_FOUND",
    409: "CONFLICT",
    410: "GONE",
    429: "RATE_LIMITS",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}


class CrmSimulator(Simulator):
    name = "crm"

    def __init__(
        self,
        *,
        token: str | None = None,
        properties: Iterable[str] = PROPERTIES,
        rate_limit: int | None = 190,
        **kwargs: Any,
    ) -> None:
        self.token = token
        self.properties = frozenset(properties)
        super().__init__(rate_limit=rate_limit, **kwargs)

    def reset_state(self) -> None:
        self.contacts: dict[str, dict[str, Any]] = {}
        # Lower-cased e-mail -> id of the live contact holding it: a lookup by address costs no scan.
        self.emails: dict[str, str] = {}
        self._next_id = 1001

    def snapshot(self) -> Any:
        return [c for c in self.contacts.values() if not c["archived"]]

    def authorized(self, request: Request) -> bool:
        return self.token is None or request.headers.get("authorization") == f"Bearer {self.token}"

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        limit = self.faults.rate_limit
        if limit is None:
            return []
        remaining = max(0, limit - len(self.window))
        return [
            (b"x-hubspot-ratelimit-max", str(limit).encode()),
            (b"x-hubspot-ratelimit-remaining", str(remaining).encode()),
            (
                b"x-hubspot-ratelimit-interval-milliseconds",
                str(int(self.faults.rate_window_s * 1000)).encode(),
            ),
        ]

    def error(self, status: int, reason: str, detail: str = "", **extra: Any) -> Response:
        body: dict[str, Any] = {
            "status": "error",
            "message": detail,
            "correlationId": str(uuid.UUID(int=self.rng.getrandbits(128))),
            "category": _CATEGORY.get(status, "ERROR"),
            **extra,
        }
        if reason == "rate_limited":
            body.update(
                message="You have reached your ten_secondly_rolling limit.",
                errorType="RATE_LIMIT",
                policyName="TEN_SECONDLY_ROLLING",
                groupName="sandbox",
            )
        return JsonResponse(body, status_code=status)

    def routes(self) -> Sequence[BaseRoute]:
        p = "/crm/v3/objects/contacts"
        return [
            Route(p, self.list_contacts, methods=["GET"]),
            Route(p, self.create, methods=["POST"]),
            Route(p + "/gdpr-delete", self.gdpr_delete, methods=["POST"]),
            Route(p + "/batch/{op}", self.batch, methods=["POST"]),
            Route(p + "/{contact_id}", self.get, methods=["GET"]),
            Route(p + "/{contact_id}", self.update, methods=["PATCH"]),
            Route(p + "/{contact_id}", self.archive, methods=["DELETE"]),
        ]

    # -- the operations, shared by single and batch routes (raise ApiError) ---------------------------
    def _lookup(self, key: Any, id_property: str | None) -> dict[str, Any] | None:
        if id_property in (None, "", "hs_object_id"):
            contact = self.contacts.get(str(key))
        elif id_property == "email":
            contact = self._by_email(str(key))
        else:
            raise ApiError(self.error(400, "invalid", f"{id_property} is not a unique property."))
        return contact if contact is not None and not contact["archived"] else None

    def _by_email(self, email: str) -> dict[str, Any] | None:
        contact = self.contacts.get(self.emails.get(email.lower(), ""))
        if contact is None or contact["archived"]:
            return None
        # An index entry whose contact was readdressed behind the simulator's back (tests do) is no match.
        return contact if str(contact["properties"].get("email") or "").lower() == email.lower() else None

    def _unindex(self, contact: dict[str, Any]) -> None:
        stored = str(contact["properties"].get("email") or "").lower()
        if stored and self.emails.get(stored) == contact["id"]:
            del self.emails[stored]

    def _index(self, contact: dict[str, Any]) -> None:
        stored = str(contact["properties"].get("email") or "").lower()
        if stored and not contact["archived"]:
            self.emails[stored] = contact["id"]

    def _not_found(self) -> ApiError:
        return ApiError(self.error(404, "not_found", "Object not found.  objectId are usually numeric."))

    def _validate(self, properties: Any, *, existing_id: str | None = None) -> dict[str, Any]:
        if not isinstance(properties, dict):
            raise ApiError(self.error(400, "invalid", "Invalid input JSON: properties must be an object."))
        unknown = sorted(set(properties) - self.properties)
        if unknown:
            errors = [
                {"message": f'Property "{n}" does not exist', "code": "PROPERTY_DOESNT_EXIST", "name": n}
                for n in unknown
            ]
            raise ApiError(self.error(400, "invalid", "Property values were not valid", errors=errors))
        email = properties.get("email")
        if email is not None and email != "":
            if not isinstance(email, str) or not _EMAIL.match(email):
                raise ApiError(self.error(400, "invalid", "Property values were not valid: INVALID_EMAIL"))
            if self.rejected(email):
                raise ApiError(self.error(400, "invalid", "Property values were not valid: INVALID_EMAIL"))
            other = self._by_email(email)
            if other is not None and other["id"] != existing_id:
                raise ApiError(
                    self.error(409, "exists", f"Contact already exists. Existing ID: {other['id']}")
                )
        return {k: "" if v is None else str(v) for k, v in properties.items()}

    def _create(self, properties: Any) -> dict[str, Any]:
        props = self._validate(properties)
        contact_id = str(self._next_id)
        self._next_id += 1
        stamp = now_iso()
        props.update(createdate=stamp, lastmodifieddate=stamp, hs_object_id=contact_id)
        contact = {
            "id": contact_id,
            "properties": props,
            "createdAt": stamp,
            "updatedAt": stamp,
            "archived": False,
        }
        self.contacts[contact_id] = contact
        self._index(contact)
        return contact

    def _update(self, contact: dict[str, Any], properties: Any) -> dict[str, Any]:
        props = self._validate(properties, existing_id=contact["id"])
        stamp = now_iso()
        self._unindex(contact)
        contact["properties"].update(props, lastmodifieddate=stamp)
        self._index(contact)
        contact["updatedAt"] = stamp
        return contact

    def _view(self, contact: dict[str, Any], wanted: Iterable[str] = ()) -> dict[str, Any]:
        names = {*DEFAULT_READ, "createdate", "lastmodifieddate", "hs_object_id", *wanted}
        props = {n: contact["properties"].get(n) for n in sorted(names)}
        return {**contact, "properties": props}

    # -- routes -------------------------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        body = await self.json_body(request)
        with self.lock:
            contact = self._create(body.get("properties") if isinstance(body, dict) else None)
            return JsonResponse(self._view(contact, contact["properties"]), status_code=201)

    async def get(self, request: Request) -> Response:
        wanted = _names(request.query_params.get("properties"))
        with self.lock:
            contact = self._lookup(request.path_params["contact_id"], request.query_params.get("idProperty"))
            if contact is None:
                raise self._not_found()
            return JsonResponse(self._view(contact, wanted))

    async def update(self, request: Request) -> Response:
        body = await self.json_body(request)
        with self.lock:
            contact = self._lookup(request.path_params["contact_id"], request.query_params.get("idProperty"))
            if contact is None:
                raise self._not_found()
            self._update(contact, body.get("properties") if isinstance(body, dict) else None)
            return JsonResponse(self._view(contact, contact["properties"]))

    async def archive(self, request: Request) -> Response:
        with self.lock:
            contact = self._lookup(request.path_params["contact_id"], request.query_params.get("idProperty"))
            if contact is not None:  # HubSpot answers 204 whether or not the contact exists
                self._unindex(contact)
                contact["archived"] = True
                contact["archivedAt"] = now_iso()
            return Response(status_code=204)

    async def gdpr_delete(self, request: Request) -> Response:
        body = await self.json_body(request)
        with self.lock:
            contact = self._lookup(body.get("objectId"), body.get("idProperty"))
            if contact is None:
                raise self._not_found()
            self._unindex(contact)
            del self.contacts[contact["id"]]
            return Response(status_code=204)

    async def list_contacts(self, request: Request) -> Response:
        q = request.query_params
        try:
            limit, after = int(q.get("limit", "10")), int(q.get("after", "0"))
        except ValueError as exc:
            raise ApiError(self.error(400, "invalid", "limit and after must be integers.")) from exc
        if not 1 <= limit <= MAX_LIMIT:
            raise ApiError(self.error(400, "invalid", f"limit must be between 1 and {MAX_LIMIT}."))
        wanted = _names(q.get("properties"))
        with self.lock:
            live = sorted(
                (c for c in self.contacts.values() if not c["archived"]), key=lambda c: int(c["id"])
            )
            rest = [c for c in live if int(c["id"]) > after]
            body: dict[str, Any] = {"results": [self._view(c, wanted) for c in rest[:limit]]}
            if len(rest) > limit:
                body["paging"] = {"next": {"after": rest[limit - 1]["id"], "link": ""}}
            return JsonResponse(body)

    async def batch(self, request: Request) -> Response:
        op = request.path_params["op"]
        if op not in ("create", "read", "update", "upsert", "archive"):
            raise self._not_found()
        body = await self.json_body(request)
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if not isinstance(inputs, list):
            raise ApiError(self.error(400, "invalid", "Invalid input JSON: inputs is required."))
        if len(inputs) > MAX_BATCH:
            raise ApiError(self.error(400, "invalid", f"Batch input limit is {MAX_BATCH}."))
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        started = now_iso()
        with self.lock:
            if op == "upsert":
                keys = [str(i.get("id", "")).lower() for i in inputs if isinstance(i, dict)]
                if len(keys) != len(set(keys)):
                    raise ApiError(self.error(400, "invalid", "Duplicate IDs found in batch input."))
            for item in inputs:
                try:
                    if not isinstance(item, dict):
                        raise ApiError(self.error(400, "invalid", "Each input must be an object."))
                    result = self._batch_one(op, item, body)
                    if result is not None:
                        results.append(result)
                except ApiError as exc:
                    errors.append(_batch_error(exc.response, item))
        if op == "archive":
            return Response(status_code=204)
        answer: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": now_iso(),
        }
        if errors:
            answer.update(numErrors=len(errors), errors=errors)
        ok = 201 if op == "create" else 200
        return JsonResponse(answer, status_code=207 if errors else ok)

    def _batch_one(self, op: str, item: dict[str, Any], body: dict[str, Any]) -> dict[str, Any] | None:
        id_property = item.get("idProperty") or body.get("idProperty")
        if op == "create":
            new = self._create(item.get("properties"))
            return self._view(new, new["properties"])
        contact = self._lookup(item.get("id"), id_property)
        if op == "read":
            if contact is None:
                raise self._not_found()
            return self._view(contact, body.get("properties") or ())
        if op == "archive":
            if contact is not None:
                self._unindex(contact)
                contact["archived"] = True
            return None
        if op == "update":
            if contact is None:
                raise self._not_found()
            self._update(contact, item.get("properties"))
            return self._view(contact, contact["properties"])
        # upsert: ``id`` is the value of ``idProperty`` (e-mail); a new contact gets it as that property
        properties = dict(item.get("properties") or {})
        if contact is None:
            if id_property == "email":
                properties.setdefault("email", item.get("id"))
            contact = self._create(properties)
            return {**self._view(contact, contact["properties"]), "new": True}
        self._update(contact, properties)
        return {**self._view(contact, contact["properties"]), "new": False}


def _names(value: str | None) -> list[str]:
    return [n for n in (value or "").split(",") if n]


def _batch_error(response: Response, item: Any) -> dict[str, Any]:
    body = orjson.loads(response.body)
    context = {"id": [str(item.get("id"))]} if isinstance(item, dict) and item.get("id") else {}
    return {
        "status": "error",
        "category": body.get("category"),
        "message": body.get("message"),
        "context": context,
        "errors": body.get("errors", []),
    }
