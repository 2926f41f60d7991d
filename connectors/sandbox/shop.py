"""WooCommerce REST API v3 customers, in memory.

Modelled under ``/wp-json/wc/v3``: create (201; e-mail required; a taken e-mail is 400
``registration-error-email-exists``), ``GET /customers?email=`` (and ``page``/``per_page`` ≤ 100,
``orderby`` id|name, ``X-WP-Total``/``X-WP-TotalPages``), ``GET``/``PUT /customers/{id}``, ``DELETE
/customers/{id}?force=true`` (without force: 501, customers cannot be trashed), batch ``POST
/customers/batch {create, update, delete}`` (more than 100 items: 413), ``meta_data`` merged by key, Basic
auth with consumer key and secret, errors ``{code, message, data: {status}}``. Not modelled: passwords,
search, roles other than customer, orders.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from connectors.sandbox.core import ApiError, JsonResponse, Simulator, copied, now_iso

MAX_BATCH = 100
MAX_PER_PAGE = 100
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
_REASONS = {
    "exists": "registration-error-email-exists",
    "invalid": "rest_invalid_param",
    "rejected": "registration-error-invalid-email",
    "missing": "rest_missing_callback_param",
    "no_trash": "woocommerce_rest_trash_not_supported",
}
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_CODES = {
    401: "woocommerce_rest_cannot_view",
    404: "woocommerce_rest_invalid_id",
    410: "rest_gone",
    413: "woocommerce_rest_request_entity_too_large",
    429: "rest_too_many_requests",
    500: "internal_server_error",
    503: "rest_service_unavailable",
    504: "rest_gateway_timeout",
}


class ShopSimulator(Simulator):
    name = "shop"
    base_path = "/wp-json/wc/v3"

    def __init__(self, *, key: str | None = None, secret: str | None = None, **kwargs: Any) -> None:
        self.key, self.secret = key, secret
        super().__init__(**kwargs)

    def reset_state(self) -> None:
        self.customers: dict[int, dict[str, Any]] = {}
        # Lower-cased e-mail -> customer id, and the usernames taken: lookups without a scan.
        self.emails: dict[str, int] = {}
        self.usernames: set[str] = set()
        self._next_id = 1
        self._next_meta = 1

    def snapshot(self) -> Any:
        return list(self.customers.values())

    def authorized(self, request: Request) -> bool:
        if self.key is None:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        try:
            decoded = base64.b64decode(value).decode() if scheme.lower() == "basic" else ""
        except ValueError:
            return False
        return decoded == f"{self.key}:{self.secret}"

    def error(self, status: int, reason: str, detail: str = "", **extra: Any) -> Response:
        code = _REASONS.get(reason) or _CODES.get(status, reason)
        return JsonResponse(
            {"code": code, "message": detail, "data": {"status": status, **extra}}, status_code=status
        )

    def routes(self) -> Sequence[BaseRoute]:
        p = "/wp-json/wc/v3/customers"
        return [
            Route(p, self.list_customers, methods=["GET"]),
            Route(p, self.create, methods=["POST"]),
            Route(p + "/batch", self.batch, methods=["POST", "PUT", "PATCH"]),
            Route(p + "/{customer_id:int}", self.get, methods=["GET"]),
            Route(p + "/{customer_id:int}", self.update, methods=["PUT", "POST", "PATCH"]),
            Route(p + "/{customer_id:int}", self.delete, methods=["DELETE"]),
        ]

    # -- operations (raise ApiError) ----------------------------------------------------------------
    def _customer(self, customer_id: Any) -> dict[str, Any]:
        customer = self.customers.get(customer_id) if isinstance(customer_id, int) else None
        if customer is None:
            raise ApiError(self.error(404, "not_found", "Invalid resource ID."))
        return customer

    def _check_email(self, email: Any, existing_id: int | None = None) -> None:
        if not isinstance(email, str) or not _EMAIL.match(email) or self.rejected(email):
            raise ApiError(self.error(400, "rejected", "Please provide a valid email address."))
        other = self._holder(email)
        if other is not None and other["id"] != existing_id:
            raise ApiError(
                self.error(
                    400,
                    "exists",
                    "An account is already registered with your email address. "
                    '<a href="#" class="showlogin">Please log in.</a>',
                )
            )

    def _holder(self, email: str) -> dict[str, Any] | None:
        """The customer with this address (any case), found through the index; an entry whose customer was
        removed or readdressed behind the simulator's back (tests do) is no holder."""
        found = self.customers.get(self.emails.get(email.lower(), 0))
        return found if found is not None and found["email"].lower() == email.lower() else None

    def _create(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not body.get("email"):
            raise ApiError(self.error(400, "missing", "Missing parameter(s): email", params=["email"]))
        self._check_email(body["email"])
        stamp = now_iso()[:19]
        customer: dict[str, Any] = {
            "id": self._next_id,
            "date_created": stamp,
            "date_created_gmt": stamp,
            "date_modified": stamp,
            "date_modified_gmt": stamp,
            "email": body["email"],
            "first_name": "",
            "last_name": "",
            "role": "customer",
            "username": self._username(body.get("username") or body["email"].split("@")[0]),
            "billing": {**dict.fromkeys(ADDRESS, ""), "email": ""},
            "shipping": dict.fromkeys(ADDRESS, ""),
            "is_paying_customer": False,
            "avatar_url": "",
            "meta_data": [],
        }
        self._next_id += 1
        self._apply(customer, {k: v for k, v in body.items() if k not in ("email", "username")})
        self.customers[customer["id"]] = customer
        self.emails[customer["email"].lower()] = customer["id"]
        self.usernames.add(customer["username"])
        return customer

    def _remove(self, customer: dict[str, Any]) -> None:
        del self.customers[customer["id"]]
        self._unindex(customer)
        self.usernames.discard(customer["username"])

    def _unindex(self, customer: dict[str, Any]) -> None:
        if self.emails.get(customer["email"].lower()) == customer["id"]:
            del self.emails[customer["email"].lower()]

    def _username(self, wanted: str) -> str:
        name, n = wanted, 1
        while name in self.usernames:
            n += 1
            name = f"{wanted}{n}"
        return name

    def _apply(self, customer: dict[str, Any], body: dict[str, Any]) -> None:
        if "email" in body:
            self._check_email(body["email"], customer["id"])
            self._unindex(customer)
            customer["email"] = body["email"]
            self.emails[customer["email"].lower()] = customer["id"]
        for name in ("first_name", "last_name"):
            if name in body:
                customer[name] = "" if body[name] is None else str(body[name])
        for part in ("billing", "shipping"):
            if isinstance(body.get(part), dict):
                for name, value in body[part].items():
                    if name in customer[part]:
                        customer[part][name] = "" if value is None else str(value)
        for meta in body.get("meta_data") or ():
            if not isinstance(meta, dict) or "key" not in meta:
                continue
            entry = next((m for m in customer["meta_data"] if m["key"] == meta["key"]), None)
            if entry is None:
                customer["meta_data"].append(
                    {"id": self._next_meta, "key": meta["key"], "value": meta.get("value")}
                )
                self._next_meta += 1
            else:
                entry["value"] = meta.get("value")
        customer["date_modified"] = customer["date_modified_gmt"] = now_iso()[:19]

    def _view(self, customer: dict[str, Any]) -> dict[str, Any]:
        links = {"self": [{"href": f"{self.base_path}/customers/{customer['id']}"}]}
        return {**copied(customer), "_links": links}

    # -- routes -------------------------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        body = await self.json_body(request)
        with self.lock:
            return JsonResponse(self._view(self._create(body)), status_code=201)

    async def get(self, request: Request) -> Response:
        with self.lock:
            return JsonResponse(self._view(self._customer(request.path_params["customer_id"])))

    async def update(self, request: Request) -> Response:
        body = await self.json_body(request)
        with self.lock:
            customer = self._customer(request.path_params["customer_id"])
            self._apply(customer, body if isinstance(body, dict) else {})
            return JsonResponse(self._view(customer))

    async def delete(self, request: Request) -> Response:
        if request.query_params.get("force") not in ("true", "1"):
            raise ApiError(self.error(501, "no_trash", "Customers do not support trashing."))
        with self.lock:
            customer = self._customer(request.path_params["customer_id"])
            self._remove(customer)
            return JsonResponse(self._view(customer))

    async def list_customers(self, request: Request) -> Response:
        q = request.query_params
        try:
            page, per_page = int(q.get("page", "1")), int(q.get("per_page", "10"))
        except ValueError as exc:
            raise ApiError(self.error(400, "invalid", "Invalid parameter(s): page, per_page")) from exc
        if not 1 <= per_page <= MAX_PER_PAGE or page < 1:
            raise ApiError(self.error(400, "invalid", "Invalid parameter(s): per_page"))
        email = q.get("email")
        with self.lock:
            if email is None:
                found = list(self.customers.values())
            else:
                hit = self._holder(email)
                found = [hit] if hit is not None else []
            if q.get("orderby", "name") == "name":  # WooCommerce's default order: display name
                found.sort(key=lambda c: c["username"])
            if q.get("order", "asc") == "desc":
                found.reverse()
            chunk = [self._view(c) for c in found[(page - 1) * per_page : page * per_page]]
        headers = {"X-WP-Total": str(len(found)), "X-WP-TotalPages": str(math.ceil(len(found) / per_page))}
        return JsonResponse(chunk, headers=headers)

    async def batch(self, request: Request) -> Response:
        body = await self.json_body(request)
        if not isinstance(body, dict):
            raise ApiError(self.error(400, "invalid", "Invalid parameter(s): create, update, delete"))
        groups = {op: body.get(op) or [] for op in ("create", "update", "delete")}
        if sum(len(items) for items in groups.values()) > MAX_BATCH:
            raise ApiError(
                self.error(
                    413, "too_large", f"Unable to accept more than {MAX_BATCH} items for this request."
                )
            )
        answer: dict[str, list[Any]] = {}
        with self.lock:
            for op, items in groups.items():
                answer[op] = [self._batch_one(op, item) for item in items]
        return JsonResponse({op: out for op, out in answer.items() if groups[op]})

    def _batch_one(self, op: str, item: Any) -> dict[str, Any]:
        try:
            if op == "create":
                return self._view(self._create(item))
            if op == "update":
                customer = self._customer(item.get("id") if isinstance(item, dict) else None)
                self._apply(customer, item)
                return self._view(customer)
            customer = self._customer(item)  # batch deletes are always forced
            self._remove(customer)
            return self._view(customer)
        except ApiError as exc:
            error = orjson.loads(exc.response.body)
            return {"id": item.get("id", 0) if isinstance(item, dict) else item, "error": error}
