"""Mailchimp Marketing API v3 list members, in memory.

Modelled: upsert ``PUT /3.0/lists/{list_id}/members/{hash}`` (hash = md5 of the lower-cased address; the
address itself is accepted too), ``GET``, ``PATCH``, archive ``DELETE`` (204), permanent deletion
``POST .../actions/delete-permanent`` (204; the address can never be added again: 400 "Forgotten Email Not
Subscribed"), the member list (``count`` ≤ 1000, ``offset``; archived members only with ``status=archived``),
batch subscribe ``POST /3.0/lists/{list_id}`` (≤ 500 members, per-member ``errors``), Basic (any user, API
key as password) or Bearer auth, ``application/problem+json`` errors and the limit of 10 simultaneous
connections (429). Not modelled: changing a member's address, interests, tags, unknown merge fields (dropped).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from connectors.sandbox.core import ApiError, JsonResponse, Simulator, now_iso

STATUSES = frozenset({"subscribed", "unsubscribed", "cleaned", "pending", "transactional"})
MAX_BATCH = 500
MAX_COUNT = 1000
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_TITLES = {
    400: "Invalid Resource",
    401: "API Key Invalid",
    404: "Resource Not Found",
    405: "Method Not Allowed",
    410: "Gone",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def subscriber_hash(email: str) -> str:
    """Mailchimp's member id: md5 of the lower-cased address."""
    return hashlib.md5(email.lower().encode(), usedforsecurity=False).hexdigest()


class NewsletterSimulator(Simulator):
    name = "newsletter"
    base_path = "/3.0"

    def __init__(
        self,
        *,
        list_ids: Sequence[str] = ("sandbox01",),
        api_key: str | None = None,
        merge_fields: Sequence[str] = ("FNAME", "LNAME", "PHONE", "IDHUB_ID"),
        max_concurrent: int = 10,
        **kwargs: Any,
    ) -> None:
        self.list_ids = tuple(list_ids)
        self.api_key = api_key
        self.merge_tags = tuple(merge_fields)
        super().__init__(max_concurrent=max_concurrent, **kwargs)

    def reset_state(self) -> None:
        self.members: dict[str, dict[str, dict[str, Any]]] = {list_id: {} for list_id in self.list_ids}
        self.forgotten: dict[str, set[str]] = {list_id: set() for list_id in self.list_ids}
        self._web_id = 1000

    def snapshot(self) -> Any:
        return {list_id: list(members.values()) for list_id, members in self.members.items()}

    def error(self, status: int, reason: str, detail: str = "", **extra: Any) -> Response:
        title = _TITLES.get(status, "Error")
        if reason == "forgotten":
            title = "Forgotten Email Not Subscribed"
        elif reason == "exists":
            title = "Member Exists"
        body = {
            "type": "https://mailchimp.com/developer/marketing/docs/errors/",
            "title": title,
            "status": status,
            "detail": detail,
            "instance": f"sandbox-{self.rng.getrandbits(32):08x}",
            **extra,
        }
        return JsonResponse(body, status_code=status, media_type="application/problem+json")

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return value == self.api_key
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value).decode()
            except ValueError:
                return False
            return decoded.partition(":")[2] == self.api_key
        return False

    def routes(self) -> Sequence[BaseRoute]:
        p = "/3.0/lists/{list_id}"
        return [
            Route(p, self.batch, methods=["POST"]),
            Route(p + "/members", self.list_members, methods=["GET"]),
            Route(p + "/members/{key}", self.get_member, methods=["GET"]),
            Route(p + "/members/{key}", self.put_member, methods=["PUT"]),
            Route(p + "/members/{key}", self.patch_member, methods=["PATCH"]),
            Route(p + "/members/{key}", self.archive_member, methods=["DELETE"]),
            Route(p + "/members/{key}/actions/delete-permanent", self.delete_permanent, methods=["POST"]),
        ]

    # -- helpers ------------------------------------------------------------------------------------
    def _list(self, request: Request) -> str:
        list_id: str = request.path_params["list_id"]
        if list_id not in self.members:
            raise ApiError(self.error(404, "not_found", "The requested resource could not be found."))
        return list_id

    def _member(self, list_id: str, key: str) -> dict[str, Any]:
        member = self.members[list_id].get(_hash(key))
        if member is None:
            raise ApiError(self.error(404, "not_found", "The requested resource could not be found."))
        return member

    def _invalid(self, detail: str, field: str = "", message: str = "") -> ApiError:
        errors = [{"field": field, "message": message or detail}] if field else []
        return ApiError(self.error(400, "invalid", detail, errors=errors))

    def _check_new(self, list_id: str, email: Any, status: Any) -> None:
        """Raise the error Mailchimp gives for a new member with this address and status, if any."""
        if not isinstance(email, str) or not _EMAIL.match(email):
            raise self._invalid("Please provide a valid email address.", "email_address")
        if subscriber_hash(email) in self.forgotten[list_id]:
            raise ApiError(
                self.error(
                    400,
                    "forgotten",
                    f"{email} was permanently deleted and cannot be re-imported. "
                    "The contact must re-subscribe to get back on the list.",
                )
            )
        if self.rejected(email):
            raise self._invalid(f"{email} looks fake or invalid, please enter a real email address.")
        if status not in STATUSES:
            raise self._invalid(
                "The resource submitted could not be validated.", "status_if_new", "Invalid status."
            )

    def _create(self, list_id: str, body: dict[str, Any], status: str) -> dict[str, Any]:
        email = body["email_address"]
        key = subscriber_hash(email)
        self._web_id += 1
        member: dict[str, Any] = {
            "id": key,
            "email_address": email,
            "unique_email_id": key[:10],
            "contact_id": key,
            "web_id": self._web_id,
            "email_type": "html",
            "status": status,
            "merge_fields": dict.fromkeys(self.merge_tags, ""),
            "language": "",
            "vip": False,
            "source": "API - Generic",
            "timestamp_signup": now_iso(),
            "last_changed": now_iso(),
            "list_id": list_id,
            "tags": [],
        }
        self._apply(member, body)
        self.members[list_id][key] = member
        return member

    def _apply(self, member: dict[str, Any], body: dict[str, Any]) -> None:
        merge = body.get("merge_fields") or {}
        if not isinstance(merge, dict):
            raise self._invalid("The resource submitted could not be validated.", "merge_fields")
        for tag, value in merge.items():
            if tag in member["merge_fields"]:
                member["merge_fields"][tag] = "" if value is None else value
        if isinstance(body.get("language"), str):
            member["language"] = body["language"]
        full = f"{member['merge_fields'].get('FNAME', '')} {member['merge_fields'].get('LNAME', '')}"
        member["full_name"] = full.strip()
        member["last_changed"] = now_iso()

    def _update(self, list_id: str, member: dict[str, Any], body: dict[str, Any], status: Any) -> None:
        email = body.get("email_address")
        if email is not None and (not isinstance(email, str) or subscriber_hash(email) != member["id"]):
            raise self._invalid("The email address does not match the subscriber hash.", "email_address")
        if status is not None:
            if status not in STATUSES:
                raise self._invalid("The resource submitted could not be validated.", "status")
            member["status"] = status
        if self.rejected(member["email_address"]):
            raise self._invalid(f"{member['email_address']} looks fake or invalid.")
        self._apply(member, body)

    def _view(self, member: dict[str, Any]) -> dict[str, Any]:
        return {**member, "merge_fields": dict(member["merge_fields"]), "_links": []}

    # -- routes -------------------------------------------------------------------------------------
    async def get_member(self, request: Request) -> Response:
        with self.lock:
            member = self._member(self._list(request), request.path_params["key"])
            return JsonResponse(self._view(member))

    async def put_member(self, request: Request) -> Response:
        body = await self.json_body(request)
        with self.lock:
            list_id = self._list(request)
            key = _hash(request.path_params["key"])
            member = self.members[list_id].get(key)
            if member is None:
                email = body.get("email_address")
                if isinstance(email, str) and subscriber_hash(email) != key:
                    raise self._invalid("The email address does not match the subscriber hash.")
                status = body.get("status_if_new") or body.get("status")
                self._check_new(list_id, email, status)
                member = self._create(list_id, body, status)
            else:
                status = body.get("status")
                if member["status"] == "archived" and status is None:
                    status = body.get("status_if_new")  # an archived contact comes back like a new one
                self._update(list_id, member, body, status)
            return JsonResponse(self._view(member))

    async def patch_member(self, request: Request) -> Response:
        body = await self.json_body(request)
        with self.lock:
            list_id = self._list(request)
            member = self._member(list_id, request.path_params["key"])
            self._update(list_id, member, body, body.get("status"))
            return JsonResponse(self._view(member))

    async def archive_member(self, request: Request) -> Response:
        with self.lock:
            member = self._member(self._list(request), request.path_params["key"])
            if member["status"] == "archived":
                raise ApiError(self.error(404, "not_found", "The requested resource could not be found."))
            member["status"] = "archived"
            member["last_changed"] = now_iso()
            return Response(status_code=204)

    async def delete_permanent(self, request: Request) -> Response:
        with self.lock:
            list_id = self._list(request)
            member = self._member(list_id, request.path_params["key"])
            del self.members[list_id][member["id"]]
            self.forgotten[list_id].add(member["id"])
            return Response(status_code=204)

    async def list_members(self, request: Request) -> Response:
        q = request.query_params
        try:
            count, offset = int(q.get("count", "10")), int(q.get("offset", "0"))
        except ValueError as exc:
            raise self._invalid("count and offset must be integers.") from exc
        if not 0 <= count <= MAX_COUNT or offset < 0:
            raise self._invalid(f"count must be between 0 and {MAX_COUNT}.", "count")
        wanted = q.get("status")
        with self.lock:
            list_id = self._list(request)
            members = [
                m
                for m in self.members[list_id].values()
                if (m["status"] == wanted if wanted else m["status"] != "archived")
            ]
            page = [self._view(m) for m in members[offset : offset + count]]
            return JsonResponse({"members": page, "list_id": list_id, "total_items": len(members)})

    async def batch(self, request: Request) -> Response:
        body = await self.json_body(request)
        members = body.get("members") if isinstance(body, dict) else None
        if not isinstance(members, list):
            raise self._invalid("The resource submitted could not be validated.", "members")
        if len(members) > MAX_BATCH:
            raise self._invalid(f"You can only add up to {MAX_BATCH} members per batch.", "members")
        update_existing = bool(body.get("update_existing"))
        created: list[dict[str, Any]] = []
        updated: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        with self.lock:
            list_id = self._list(request)
            for item in members:
                email = item.get("email_address") if isinstance(item, dict) else None
                try:
                    if not isinstance(item, dict):
                        raise self._invalid("Each member must be an object.")
                    existing = self.members[list_id].get(subscriber_hash(email)) if email else None
                    if existing is not None and existing["status"] != "archived":
                        if not update_existing:
                            errors.append(
                                _batch_error(
                                    email, f"{email} is already a list member.", "ERROR_CONTACT_EXISTS"
                                )
                            )
                            continue
                        self._update(list_id, existing, item, item.get("status"))
                        updated.append(self._view(existing))
                    elif existing is not None:
                        self._update(list_id, existing, item, item.get("status") or "subscribed")
                        updated.append(self._view(existing))
                    else:
                        self._check_new(list_id, email, item.get("status"))
                        created.append(self._view(self._create(list_id, item, item["status"])))
                except ApiError as exc:
                    detail = bytes(exc.response.body).decode()
                    errors.append(_batch_error(email, _detail(detail), "ERROR_GENERIC"))
        return JsonResponse(
            {
                "new_members": created,
                "updated_members": updated,
                "errors": errors,
                "total_created": len(created),
                "total_updated": len(updated),
                "error_count": len(errors),
                "_links": [],
            }
        )


def _hash(key: str) -> str:
    return subscriber_hash(key) if "@" in key else key.lower()


def _batch_error(email: Any, message: str, code: str) -> dict[str, Any]:
    return {"email_address": email, "error": message, "error_code": code, "field": "", "field_message": ""}


def _detail(raw: str) -> str:
    body = orjson.loads(raw)
    return str(body.get("detail") or body.get("title"))
