"""An app's SCIM 2.0 provisioning endpoint (RFC 7643 / RFC 7644), in memory.

Modelled: ``/ServiceProviderConfig`` (PATCH, Bulk with ``maxOperations`` and ``maxPayloadSize``, filter with
``maxResults``, ETags); ``/Users`` and ``/Groups``: POST (201 with ``Location`` and ``ETag``), GET by id, the
list with ``filter``, ``startIndex`` and ``count``, PUT (the whole resource), PATCH (add, replace and remove,
op names in any case, paths to an attribute, a sub-attribute or an extension attribute, and path-less
operations carrying a value object), DELETE (204); ``If-Match`` (412 when the version moved on); ``/Bulk``
(``failOnErrors``, 413 beyond the limits); userName unique case-insensitively (409 ``uniqueness``); group
members must be existing users; Bearer auth; every error as SCIM error JSON with ``status`` as a string.
Lookups by userName, externalId, id and group displayName are indexed, so a batch's lookups cost no scan.

Not modelled: filter operators other than ``eq`` (400 ``invalidFilter``), ``not`` and value-path filters in
filters or PATCH paths (400 ``invalidPath``), sorting, ``attributes``/``excludedAttributes``, bulkId
references, ``/Schemas`` and ``/ResourceTypes``, a user's ``groups``.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from connectors.sandbox.core import ApiError, Simulator, copied

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
CUSTOMER = "urn:idhub:schemas:extension:customer:2.0:User"
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
LIST = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
BULK_REQUEST = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
BULK_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:BulkResponse"
CONFIG = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"
MEDIA = "application/scim+json"
MAX_OPERATIONS = 1000
MAX_PAYLOAD = 4_000_000
MAX_RESULTS = 1000
# RFC 7643 §4.1: the core User attributes a client may send (id, meta and groups are the server's).
_USER_MULTI = (
    "emails",
    "phonenumbers",
    "ims",
    "photos",
    "addresses",
    "entitlements",
    "roles",
    "x509certificates",
)
_USER_SINGLE = (
    "username name displayname nickname profileurl title usertype preferredlanguage locale timezone"
)
USER_ATTRIBUTES = frozenset((*_USER_SINGLE.split(), "active", "password", "externalid", *_USER_MULTI))
GROUP_ATTRIBUTES = frozenset({"displayname", "members", "externalid"})
READ_ONLY = frozenset({"id", "meta", "groups"})
MULTI_VALUED = frozenset((*_USER_MULTI, "members"))
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')
_REASONS = {"rate_limited": "tooMany", "too_many_connections": "tooMany"}


class ScimSimulator(Simulator):
    name = "scim"
    base_path = "/v2"

    def __init__(
        self, *, token: str | None = None, extensions: Sequence[str] = (ENTERPRISE, CUSTOMER), **kwargs: Any
    ) -> None:
        self.token = token
        self.extensions = frozenset(extensions)
        super().__init__(**kwargs)

    def reset_state(self) -> None:
        self.store: dict[str, dict[str, dict[str, Any]]] = {"Users": {}, "Groups": {}}
        # Lower-cased userName / group displayName -> id, externalId -> ids: lookups without a scan.
        self.names: dict[str, dict[str, str]] = {"Users": {}, "Groups": {}}
        self.external: dict[str, dict[str, set[str]]] = {"Users": {}, "Groups": {}}
        self._ids = itertools.count(1)

    def snapshot(self) -> Any:
        return {kind: list(resources.values()) for kind, resources in self.store.items()}

    def authorized(self, request: Request) -> bool:
        return self.token is None or request.headers.get("authorization") == f"Bearer {self.token}"

    def error(self, status: int, reason: str, detail: str = "", scim_type: str | None = None) -> Response:
        body: dict[str, Any] = {"schemas": [ERROR], "status": str(status), "detail": detail or reason}
        scim_type = scim_type or _REASONS.get(reason)
        if scim_type:
            body["scimType"] = scim_type
        return _json(body, status)

    def fail(self, status: int, detail: str, scim_type: str | None = None) -> ApiError:
        return ApiError(self.error(status, "", detail, scim_type))

    def routes(self) -> Sequence[BaseRoute]:
        p = self.base_path
        routes: list[BaseRoute] = [
            Route(p + "/ServiceProviderConfig", self.config, methods=["GET"]),
            Route(p + "/Bulk", self.bulk, methods=["POST"]),
        ]
        for kind in ("Users", "Groups"):
            routes += [
                Route(f"{p}/{kind}", self._route(self.list_resources, kind), methods=["GET"]),
                Route(f"{p}/{kind}", self._route(self.create, kind), methods=["POST"]),
                Route(
                    f"{p}/{kind}/{{rid}}",
                    self._route(self.one, kind),
                    methods=["GET", "PUT", "PATCH", "DELETE"],
                ),
            ]
        return routes

    def _route(
        self, handler: Callable[[Request, str], Awaitable[Response]], kind: str
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await handler(request, kind)

        return endpoint

    # -- endpoints ---------------------------------------------------------------------------------------

    async def config(self, request: Request) -> Response:
        supported = {"supported": True}
        return _json(
            {
                "schemas": [CONFIG],
                "patch": supported,
                "bulk": {"supported": True, "maxOperations": MAX_OPERATIONS, "maxPayloadSize": MAX_PAYLOAD},
                "filter": {"supported": True, "maxResults": MAX_RESULTS},
                "changePassword": {"supported": False},
                "sort": {"supported": False},
                "etag": supported,
                "authenticationSchemes": [
                    {"type": "oauthbearertoken", "name": "Bearer token", "description": "A static token."}
                ],
            }
        )

    async def list_resources(self, request: Request, kind: str) -> Response:
        params = request.query_params
        start = max(1, _integer(params.get("startIndex"), 1, self))
        count = min(MAX_RESULTS, max(0, _integer(params.get("count"), MAX_RESULTS, self)))
        with self.lock:
            if params.get("filter") is not None:
                matches = [self.store[kind][i] for i in self._filter(kind, params["filter"])]
            else:
                matches = list(self.store[kind].values())
            page = matches[start - 1 : start - 1 + count]
            return _json(
                {
                    "schemas": [LIST],
                    "totalResults": len(matches),
                    "startIndex": start,
                    "itemsPerPage": len(page),
                    "Resources": page,
                }
            )

    async def create(self, request: Request, kind: str) -> Response:
        doc = await self.json_body(request)
        with self.lock:
            resource = self._create(kind, doc)
        return self._answer(resource, 201, location=True)

    async def one(self, request: Request, kind: str) -> Response:
        rid = request.path_params["rid"]
        method = request.method
        doc = await self.json_body(request) if method in ("PUT", "PATCH") else None
        with self.lock:
            current = self.store[kind].get(rid)
            if current is None:
                raise self.fail(404, f"{kind[:-1]} {rid} not found")
            if method == "GET":
                if request.headers.get("if-none-match") == current["meta"]["version"]:
                    return Response(status_code=304, headers={"ETag": current["meta"]["version"]})
                return self._answer(current, 200)
            self._check_version(current, request.headers.get("if-match"))
            if method == "DELETE":
                self._delete(kind, rid)
                return Response(status_code=204)
            resource = self._replace(kind, rid, doc) if method == "PUT" else self._patch(kind, rid, doc)
        return self._answer(resource, 200)

    async def bulk(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_PAYLOAD:
            raise self.fail(413, f"The payload exceeds maxPayloadSize ({MAX_PAYLOAD} bytes).")
        try:
            doc = orjson.loads(body)
        except ValueError:
            raise self.fail(400, "The request body is not valid JSON.", "invalidSyntax") from None
        if not isinstance(doc, dict) or BULK_REQUEST not in (doc.get("schemas") or []):
            raise self.fail(400, f"A BulkRequest ({BULK_REQUEST}) is expected.", "invalidSyntax")
        operations = doc.get("Operations")
        if not isinstance(operations, list) or not all(isinstance(op, dict) for op in operations):
            raise self.fail(400, "Operations must be a list of objects.", "invalidSyntax")
        if len(operations) > MAX_OPERATIONS:
            raise self.fail(413, f"More than maxOperations ({MAX_OPERATIONS}) operations.")
        fail_on = doc.get("failOnErrors")
        if fail_on is not None and (not isinstance(fail_on, int) or isinstance(fail_on, bool) or fail_on < 1):
            raise self.fail(400, "failOnErrors must be a positive integer.", "invalidValue")
        answers: list[dict[str, Any]] = []
        errors = 0
        with self.lock:
            for op in operations:
                answer = self._bulk_one(op)
                answers.append(answer)
                if int(answer["status"]) >= 400:
                    errors += 1
                    if fail_on is not None and errors >= fail_on:
                        break
        return _json({"schemas": [BULK_RESPONSE], "Operations": answers})

    # -- the operations (under the lock; raise ApiError) -------------------------------------------------

    def _bulk_one(self, op: dict[str, Any]) -> dict[str, Any]:
        method = str(op.get("method") or "").upper()
        path = str(op.get("path") or "")
        answer: dict[str, Any] = {"method": method}
        if "bulkId" in op:
            answer["bulkId"] = op["bulkId"]
        try:
            kind, _, rid = path.strip("/").partition("/")
            if kind not in self.store or "/" in rid or method not in ("POST", "PUT", "PATCH", "DELETE"):
                raise self.fail(400, f"{method} {path} is not a bulk operation here.", "invalidPath")
            if method == "POST":
                if rid or "bulkId" not in op:
                    raise self.fail(
                        400, "A bulk POST needs a bulkId and a resource type path.", "invalidValue"
                    )
                resource = self._create(kind, op.get("data"))
                answer.update(status="201", location=resource["meta"]["location"])
            else:
                current = self.store[kind].get(rid)
                if current is None:
                    raise self.fail(404, f"{kind[:-1]} {rid} not found")
                self._check_version(current, op.get("version"))
                answer["location"] = current["meta"]["location"]
                if method == "DELETE":
                    self._delete(kind, rid)
                    answer["status"] = "204"
                    return answer
                data = op.get("data")
                resource = self._replace(kind, rid, data) if method == "PUT" else self._patch(kind, rid, data)
                answer["status"] = "200"
            answer["version"] = resource["meta"]["version"]
        except ApiError as exc:
            answer["status"] = str(exc.response.status_code)
            answer["response"] = orjson.loads(exc.response.body)
        return answer

    def _create(self, kind: str, doc: Any) -> dict[str, Any]:
        resource = self._validated(kind, doc)
        rid = f"{next(self._ids):08x}"
        stamp = _now()
        resource["id"] = rid
        resource["meta"] = {
            "resourceType": kind[:-1],
            "created": stamp,
            "lastModified": stamp,
            "location": f"{self.base_path}/{kind}/{rid}",
            "version": 'W/"1"',
        }
        self._unique(kind, resource, None)
        self.store[kind][rid] = resource
        self._index(kind, resource)
        return resource

    def _replace(self, kind: str, rid: str, doc: Any) -> dict[str, Any]:
        resource = self._validated(kind, doc)
        return self._store(kind, rid, resource)

    def _patch(self, kind: str, rid: str, doc: Any) -> dict[str, Any]:
        if not isinstance(doc, dict) or PATCH_OP not in (doc.get("schemas") or []):
            raise self.fail(400, f"A PatchOp ({PATCH_OP}) is expected.", "invalidSyntax")
        operations = doc.get("Operations")
        if not isinstance(operations, list) or not operations:
            raise self.fail(400, "Operations must be a non-empty list.", "invalidSyntax")
        # Applied to a copy: a failing operation leaves the stored resource as it was.
        resource = copied(self.store[kind][rid])
        for op in operations:
            if not isinstance(op, dict):
                raise self.fail(400, "Each operation must be an object.", "invalidSyntax")
            self._apply(resource, str(op.get("op") or "").lower(), op.get("path"), op.get("value"))
        return self._store(kind, rid, self._validated(kind, resource))

    def _apply(self, resource: dict[str, Any], op: str, path: Any, value: Any) -> None:
        if op not in ("add", "replace", "remove"):
            raise self.fail(400, f"Unknown PATCH op {op!r}.", "invalidSyntax")
        if path is None or path == "":
            if op == "remove":
                raise self.fail(400, "A remove operation needs a path.", "noTarget")
            if not isinstance(value, dict):
                raise self.fail(400, "An operation without a path carries an object.", "invalidValue")
            for name, item in value.items():
                self._apply(resource, op, name, item)
            return
        if not isinstance(path, str) or "[" in path:
            raise self.fail(400, f"Unsupported path {path!r}.", "invalidPath")
        holder, name = self._locate(resource, path, create=op != "remove")
        if holder is None:
            return  # removing from an absent parent removes nothing
        if name.lower() in READ_ONLY and holder is resource:
            raise self.fail(400, f"{name} is read-only.", "mutability")
        key = _key(holder, name)
        if op == "remove":
            holder.pop(key, None)
            return
        if value is None:
            raise self.fail(400, f"A {op} operation needs a value.", "invalidValue")
        old = holder.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            old.update(value)  # RFC 7644 §3.5.2.3: sub-attributes not given stay as they are
        elif op == "add" and isinstance(old, list):
            old.extend(value if isinstance(value, list) else [value])
        else:
            holder[key] = value

    def _locate(
        self, resource: dict[str, Any], path: str, *, create: bool
    ) -> tuple[dict[str, Any] | None, str]:
        """The object holding the attribute ``path`` names, and the attribute's name in it."""
        holder = resource
        if path.startswith("urn:"):
            urn = max(
                (u for u in self.extensions if path == u or path.startswith(u + ":")), key=len, default=None
            )
            if urn is None:
                raise self.fail(400, f"{path!r} names no schema of this server.", "invalidPath")
            if create and urn not in resource["schemas"]:
                resource["schemas"].append(urn)
            if path == urn:
                return resource, urn
            found = resource.get(urn)
            if not isinstance(found, dict):
                if not create:
                    return None, ""
                found = resource[urn] = {}
            holder, path = found, path[len(urn) + 1 :]
        parts = path.split(".")
        if len(parts) > 2 or not all(parts):
            raise self.fail(400, f"Unsupported path {path!r}.", "invalidPath")
        if len(parts) == 2:
            key = _key(holder, parts[0])
            parent = holder.get(key)
            if parent is None:
                if not create:
                    return None, ""
                parent = holder[key] = {}
            if not isinstance(parent, dict):
                raise self.fail(400, f"{parts[0]} has no sub-attribute {parts[1]}.", "invalidPath")
            return parent, parts[1]
        return holder, parts[0]

    def _validated(self, kind: str, doc: Any) -> dict[str, Any]:
        """A resource as stored: what the client may set, checked; id, meta and groups dropped."""
        core = USER if kind == "Users" else GROUP
        if not isinstance(doc, dict):
            raise self.fail(400, "The resource must be a JSON object.", "invalidSyntax")
        schemas = doc.get("schemas")
        if not isinstance(schemas, list) or core not in schemas:
            raise self.fail(400, f"schemas must list {core}.", "invalidValue")
        unknown = [s for s in schemas if s != core and (kind == "Groups" or s not in self.extensions)]
        if unknown:
            raise self.fail(400, f"Unknown schemas {unknown}.", "invalidValue")
        known = USER_ATTRIBUTES if kind == "Users" else GROUP_ATTRIBUTES
        resource: dict[str, Any] = {"schemas": list(schemas)}
        for name, value in doc.items():
            lower = name.lower()
            if lower in READ_ONLY or lower in ("schemas", "password") or value is None:
                continue  # a password is taken and dropped: it is never returned (RFC 7643 §4.1.1)
            if name.startswith("urn:"):
                if name not in schemas or not isinstance(value, dict):
                    raise self.fail(400, f"{name} must be an object listed in schemas.", "invalidValue")
            elif lower not in known:
                raise self.fail(400, f"Unknown attribute {name!r}.", "invalidSyntax")
            elif lower in MULTI_VALUED and not (
                isinstance(value, list) and all(isinstance(v, dict) for v in value)
            ):
                raise self.fail(400, f"{name} must be a list of objects.", "invalidValue")
            elif lower == "active" and not isinstance(value, bool):
                raise self.fail(400, "active must be a boolean.", "invalidValue")
            resource[name] = value
        label = "userName" if kind == "Users" else "displayName"
        if not isinstance(resource.get(label), str) or not resource[label].strip():
            raise self.fail(400, f"{label} is required.", "invalidValue")
        if kind == "Users":
            addresses = [resource["userName"]] + [e.get("value") for e in resource.get("emails", [])]
            if any(isinstance(a, str) and self.rejected(a) for a in addresses):
                raise self.fail(400, "The address is refused.", "invalidValue")
        else:
            users = self.store["Users"]
            missing = [m.get("value") for m in resource.get("members", []) if m.get("value") not in users]
            if missing:
                raise self.fail(400, f"Unknown members: {missing}.", "invalidValue")
        return resource

    def _store(self, kind: str, rid: str, resource: dict[str, Any]) -> dict[str, Any]:
        current = self.store[kind][rid]
        self._unique(kind, resource, rid)
        meta = dict(current["meta"])
        meta["lastModified"] = _now()
        meta["version"] = f'W/"{int(meta["version"][3:-1]) + 1}"'
        resource["id"], resource["meta"] = rid, meta
        self._unindex(kind, current)
        self.store[kind][rid] = resource
        self._index(kind, resource)
        return resource

    def _delete(self, kind: str, rid: str) -> None:
        self._unindex(kind, self.store[kind].pop(rid))
        if kind == "Users":
            for group in self.store["Groups"].values():
                members = group.get("members") or []
                kept = [m for m in members if m.get("value") != rid]
                if len(kept) != len(members):
                    group["members"] = kept

    def _check_version(self, current: dict[str, Any], expected: Any) -> None:
        if expected and expected != "*" and expected != current["meta"]["version"]:
            raise self.fail(412, f"The resource is at {current['meta']['version']}, not {expected}.")

    def _unique(self, kind: str, resource: dict[str, Any], rid: str | None) -> None:
        if kind == "Users":
            holder = self.names[kind].get(resource["userName"].lower())
            if holder is not None and holder != rid:
                raise self.fail(409, "userName is already taken.", "uniqueness")

    def _index(self, kind: str, resource: dict[str, Any]) -> None:
        self.names[kind][_name(kind, resource)] = resource["id"]
        if isinstance(resource.get("externalId"), str):
            self.external[kind].setdefault(resource["externalId"], set()).add(resource["id"])

    def _unindex(self, kind: str, resource: dict[str, Any]) -> None:
        name = _name(kind, resource)
        if self.names[kind].get(name) == resource["id"]:
            del self.names[kind][name]
        held = self.external[kind].get(resource.get("externalId"))  # type: ignore[arg-type]
        if held is not None:
            held.discard(resource["id"])
            if not held:
                del self.external[kind][resource["externalId"]]

    def _answer(self, resource: dict[str, Any], status: int, *, location: bool = False) -> Response:
        headers = {"ETag": resource["meta"]["version"]}
        if location:
            headers["Location"] = resource["meta"]["location"]
        return _json(resource, status, headers)

    # -- filters -----------------------------------------------------------------------------------------

    def _filter(self, kind: str, text: str) -> list[str]:
        """Ids matching ``text``: ``attr eq value`` clauses joined by ``and`` and ``or``, maybe bracketed."""
        tokens = list(self._tokens(text))
        position = 0

        def expression() -> set[str]:
            nonlocal position
            found = term()
            while position < len(tokens) and tokens[position].lower() == "or":
                position += 1
                found = found | term()
            return found

        def term() -> set[str]:
            nonlocal position
            found = factor()
            while position < len(tokens) and tokens[position].lower() == "and":
                position += 1
                found = found & factor()
            return found

        def factor() -> set[str]:
            nonlocal position
            if position < len(tokens) and tokens[position] == "(":
                position += 1
                found = expression()
                if position >= len(tokens) or tokens[position] != ")":
                    raise self.fail(400, "Unbalanced parentheses in the filter.", "invalidFilter")
                position += 1
                return found
            if position + 3 > len(tokens):
                raise self.fail(400, "The filter ends too soon.", "invalidFilter")
            attribute, operator, raw = tokens[position : position + 3]
            position += 3
            if operator.lower() != "eq":
                raise self.fail(400, f"Only eq is supported, not {operator!r}.", "invalidFilter")
            try:
                value = json.loads(raw)
            except ValueError:
                raise self.fail(400, "A comparison value is not JSON.", "invalidFilter") from None
            return self._equal(kind, attribute, value)

        found = expression()
        if position != len(tokens):
            raise self.fail(400, "The filter goes on after its end.", "invalidFilter")
        return sorted(found)  # ids are fixed-width hex counters: sorted is the order of creation

    def _tokens(self, text: str) -> Iterator[str]:
        position = 0
        while position < len(text.rstrip()):
            match = _TOKEN.match(text, position)
            if match is None:
                raise self.fail(400, "The filter cannot be read.", "invalidFilter")
            if "[" in match.group(1) or match.group(1).lower() == "not":
                raise self.fail(400, "Value paths and not are not supported in filters.", "invalidPath")
            yield match.group(1)
            position = match.end()

    def _equal(self, kind: str, attribute: str, value: Any) -> set[str]:
        lower = attribute.lower()
        if lower == "id":
            return {value} if value in self.store[kind] else set()
        if lower == "externalid":
            return set(self.external[kind].get(value, ()))
        if lower == ("username" if kind == "Users" else "displayname") and isinstance(value, str):
            rid = self.names[kind].get(value.lower())
            return {rid} if rid else set()
        names = attribute.split(".")
        return {rid for rid, r in self.store[kind].items() if _matches(r, names, value)}


def _matches(resource: dict[str, Any], names: list[str], value: Any) -> bool:
    found: list[Any] = [resource]
    for name in names:
        step: list[Any] = []
        for item in found:
            if isinstance(item, dict):
                got = item.get(_key(item, name))
                step.extend(got if isinstance(got, list) else [got])
        found = step
    fold = str.lower if isinstance(value, str) else None
    return any(v == value or (fold and isinstance(v, str) and fold(v) == fold(value)) for v in found)


def _key(holder: dict[str, Any], name: str) -> str:
    """The key ``holder`` stores attribute ``name`` under (SCIM attribute names ignore case)."""
    if name in holder:
        return name
    lower = name.lower()
    return next((k for k in holder if k.lower() == lower), name)


def _name(kind: str, resource: dict[str, Any]) -> str:
    return str(resource["userName" if kind == "Users" else "displayName"]).lower()


def _integer(raw: str | None, default: int, sim: ScimSimulator) -> int:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise sim.fail(400, "startIndex and count are integers.", "invalidValue") from None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = orjson.dumps(body)
    return Response(content, status_code=status, headers=headers, media_type=MEDIA)
