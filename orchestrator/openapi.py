"""An OpenAPI 3.1 description of the hub's HTTP API, served at ``GET /openapi.json``.

Written by hand so it says what the hub really does: the SCIM 2.0 routes it serves under ``/scim/v2``
(RFC 7644), the request bodies it accepts (RFC 7643 User and Group with the enterprise and customer
extensions, PatchOp, SearchRequest, BulkRequest), the status codes it answers and the SCIM error body of
every error. Fuzzers and client generators read it; ``tests/security/test_fuzz.py`` holds it to the truth.
Routes the hub answers with 501 (``/Me``, searches across resource types) are left out.
"""

from __future__ import annotations

from typing import Any, Final

from orchestrator.scim.schemas import CUSTOMER_SCHEMA
from orchestrator.settings import Settings

CORE_USER: Final = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP: Final = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE: Final = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
ERROR: Final = "urn:ietf:params:scim:api:messages:2.0:Error"
PATCH_OP: Final = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SEARCH: Final = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
LIST_RESPONSE: Final = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
BULK_REQUEST: Final = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
BULK_RESPONSE: Final = "urn:ietf:params:scim:api:messages:2.0:BulkResponse"
SCIM_JSON: Final = "application/scim+json"
# RFC 7643 §7: what an error's scimType may be.
SCIM_TYPES: Final = (
    "invalidFilter",
    "tooMany",
    "uniqueness",
    "mutability",
    "invalidSyntax",
    "invalidPath",
    "noTarget",
    "invalidValue",
    "invalidVers",
    "sensitive",
)
# The hub's indexed columns bound these strings (orchestrator.scim.storage.COLUMN_LIMITS).
SHORT: Final = 256

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: Schema, required: tuple[str, ...] = (), *, closed: bool = True) -> Schema:
    """An object schema; a closed one refuses unknown keys, as the hub refuses unknown attributes."""
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def _text(max_length: int | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "string", **extra}
    if max_length is not None:
        schema["maxLength"] = max_length
    return schema


def _strings(max_length: int, *keys: str) -> Schema:
    return {key: _text(max_length) for key in keys}


def _multi(value: Schema, types: tuple[str, ...] | None) -> Schema:
    """A multi-valued complex attribute: value, display, type, primary."""
    item: Schema = {"value": value, "display": _text(), "primary": {"type": "boolean"}}
    if types is not None:
        item["type"] = {"type": "string", "enum": list(types)}
    else:
        item["type"] = _text()
    return {"type": "array", "items": _obj(item)}


def _schemas_list(core: str, extensions: tuple[str, ...] = ()) -> Schema:
    return {
        "type": "array",
        "items": {"type": "string", "enum": [core, *extensions]},
        "contains": {"const": core},
        "minItems": 1,
        "uniqueItems": True,
    }


def _user_request(max_string: int) -> Schema:
    name = _obj(
        _strings(
            max_string,
            "formatted",
            "familyName",
            "givenName",
            "middleName",
            "honorificPrefix",
            "honorificSuffix",
        )
    )
    consent = _obj(
        {
            "purpose": _text(max_string),
            "granted": {"type": "boolean"},
            "updatedAt": _text(format="date-time"),
            "source": _text(max_string),
        },
        ("purpose", "granted"),
    )
    customer = _obj(
        {
            "consents": {"type": "array", "items": consent},
            "marketingPreferences": _obj(
                {
                    "topics": {"type": "array", "items": _text(max_string)},
                    "frequency": {"type": "string", "enum": ["daily", "weekly", "monthly", "never"]},
                }
            ),
            "loyalty": _obj(
                {
                    "tier": _text(max_string),
                    "points": {"type": "integer"},
                    "memberSince": _text(format="date-time"),
                }
            ),
            "customerNumber": _text(max_string),
        }
    )
    enterprise = _obj(
        {
            **_strings(max_string, "employeeNumber", "costCenter", "organization", "division", "department"),
            "manager": _obj({"value": _text(max_string)}),
        }
    )
    properties: Schema = {
        "schemas": _schemas_list(CORE_USER, (ENTERPRISE, CUSTOMER_SCHEMA)),
        "id": _text(),  # read-only: ignored when sent
        "externalId": _text(SHORT),
        "userName": _text(SHORT, minLength=1),
        "name": name,
        **_strings(
            max_string,
            "displayName",
            "nickName",
            "title",
            "userType",
            "preferredLanguage",
            "locale",
            "timezone",
        ),
        "active": {"type": "boolean"},
        "password": _text(max_string),  # write-only: never returned
        "emails": _multi(_text(320, format="email"), ("work", "home", "other")),
        "phoneNumbers": _multi(_text(max_string), ("work", "home", "mobile", "fax", "pager", "other")),
        "addresses": {
            "type": "array",
            "items": _obj(
                {
                    **_strings(
                        max_string,
                        "formatted",
                        "streetAddress",
                        "locality",
                        "region",
                        "postalCode",
                        "country",
                    ),
                    "type": {"type": "string", "enum": ["work", "home", "other"]},
                    "primary": {"type": "boolean"},
                }
            ),
        },
        "entitlements": _multi(_text(max_string), None),
        "roles": _multi(_text(max_string), None),
        ENTERPRISE: enterprise,
        CUSTOMER_SCHEMA: customer,
    }
    return _obj(properties, ("schemas", "userName"))


def _group_request() -> Schema:
    member = _obj(
        {
            "value": _text(SHORT, minLength=1),
            "type": {"type": "string", "enum": ["User", "Group"]},
            "display": _text(),
        },
        ("value",),
    )
    return _obj(
        {
            "schemas": _schemas_list(CORE_GROUP),
            "id": _text(),
            "externalId": _text(SHORT),
            "displayName": _text(SHORT, minLength=1),
            "members": {"type": "array", "items": member},
        },
        ("schemas", "displayName"),
    )


def _components(settings: Settings) -> Schema:
    meta = _obj(
        {
            "resourceType": _text(),
            "created": _text(format="date-time"),
            "lastModified": _text(format="date-time"),
            "location": _text(format="uri"),
            "version": _text(),
        },
        closed=False,
    )
    resource = _obj(
        {"schemas": {"type": "array", "items": _text()}, "id": _text(), "meta": meta},
        ("schemas",),
        closed=False,
    )
    patch_operation = _obj(
        {
            # RFC 7644 §3.5.2: op values are case-insensitive; these are the spellings clients send.
            "op": {"type": "string", "enum": ["add", "remove", "replace", "Add", "Remove", "Replace"]},
            "path": _text(),
            "value": {},
        },
        ("op",),
    )
    bulk_operation = _obj(
        {
            "method": {"type": "string", "enum": ["POST", "PUT", "PATCH", "DELETE"]},
            "bulkId": _text(SHORT),
            "version": _text(),
            "path": _text(SHORT, pattern="^/"),
            "data": {"type": "object"},
        },
        ("method", "path"),
    )
    return {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "A token made with `idhub token create`; scopes scim:read, scim:write, admin.",
            }
        },
        "schemas": {
            "Error": _obj(
                {
                    "schemas": {
                        "type": "array",
                        "items": {"const": ERROR},
                        "minItems": 1,
                        "maxItems": 1,
                    },
                    "status": _text(pattern="^[1-5][0-9][0-9]$"),
                    "scimType": {"type": "string", "enum": list(SCIM_TYPES)},
                    "detail": _text(),
                },
                ("schemas", "status"),
            ),
            "Meta": meta,
            "Resource": resource,
            "UserRequest": _user_request(settings.max_string_length),
            "GroupRequest": _group_request(),
            "PatchOp": _obj(
                {
                    "schemas": {"type": "array", "items": {"const": PATCH_OP}, "minItems": 1},
                    "Operations": {"type": "array", "items": patch_operation, "minItems": 1},
                },
                ("schemas", "Operations"),
            ),
            "SearchRequest": _obj(
                {
                    "schemas": {"type": "array", "items": {"const": SEARCH}, "minItems": 1},
                    "attributes": {"type": "array", "items": _text()},
                    "excludedAttributes": {"type": "array", "items": _text()},
                    "filter": _text(),
                    "sortBy": _text(),
                    "sortOrder": {"type": "string", "enum": ["ascending", "descending"]},
                    "startIndex": {"type": "integer"},
                    "count": {"type": "integer"},
                },
                ("schemas",),
            ),
            "ListResponse": _obj(
                {
                    "schemas": {"type": "array", "items": {"const": LIST_RESPONSE}},
                    "totalResults": {"type": "integer", "minimum": 0},
                    "startIndex": {"type": "integer"},
                    "itemsPerPage": {"type": "integer", "minimum": 0},
                    "Resources": {"type": "array", "items": _ref("Resource")},
                },
                ("schemas", "totalResults"),
                closed=False,
            ),
            "BulkRequest": _obj(
                {
                    "schemas": {"type": "array", "items": {"const": BULK_REQUEST}, "minItems": 1},
                    "failOnErrors": {"type": "integer", "minimum": 1},
                    "Operations": {
                        "type": "array",
                        "items": bulk_operation,
                        "maxItems": settings.bulk_max_operations,
                    },
                },
                ("schemas", "Operations"),
            ),
            "BulkResponse": _obj(
                {
                    "schemas": {"type": "array", "items": {"const": BULK_RESPONSE}},
                    "Operations": {
                        "type": "array",
                        "items": _obj(
                            {
                                "method": _text(),
                                "bulkId": _text(),
                                "version": _text(),
                                "location": _text(),
                                "status": _text(pattern="^[1-5][0-9][0-9]$"),
                                "response": {"type": "object"},
                            },
                            ("status",),
                            closed=False,
                        ),
                    },
                },
                ("schemas", "Operations"),
                closed=False,
            ),
        },
        "parameters": {
            "id": {
                "name": "id",
                "in": "path",
                "required": True,
                "description": "The resource's id, as the hub gave it (a UUID).",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            },
            "attributes": _query("attributes", "Comma-separated attribute paths to return."),
            "excludedAttributes": _query(
                "excludedAttributes", "Comma-separated attribute paths to leave out."
            ),
            "filter": _query("filter", "A SCIM filter (RFC 7644 §3.4.2.2), at most 50 comparisons."),
            "sortBy": _query("sortBy", "The attribute to sort on."),
            "sortOrder": {
                "name": "sortOrder",
                "in": "query",
                "schema": {"type": "string", "enum": ["ascending", "descending"]},
            },
            "startIndex": {"name": "startIndex", "in": "query", "schema": {"type": "integer"}},
            "count": {"name": "count", "in": "query", "schema": {"type": "integer"}},
            "If-Match": {
                "name": "If-Match",
                "in": "header",
                "description": "Apply only when the resource's ETag is this one; 412 otherwise.",
                "schema": {"type": "string"},
            },
            "If-None-Match": {
                "name": "If-None-Match",
                "in": "header",
                "description": "304 with no body when the resource's ETag is this one.",
                "schema": {"type": "string"},
            },
        },
        "responses": {
            str(status): {
                "description": description,
                "content": {SCIM_JSON: {"schema": _ref("Error")}},
                **(
                    {"headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}} if status == 401 else {}
                ),
            }
            for status, description in _ERRORS.items()
        },
    }


_ERRORS: Final = {
    400: "Bad request: invalid syntax, value, filter or path (scimType says which).",
    401: "No valid bearer token.",
    403: "The token lacks the scope this operation needs.",
    404: "No such resource.",
    409: "A uniqueness conflict (userName, externalId, displayName).",
    412: "The If-Match ETag is not the resource's.",
    413: "The body exceeds the configured size, or Bulk has too many operations.",
    415: "The body is not JSON (application/scim+json or application/json).",
}


_EXAMPLES: Final[dict[str, dict[str, Any]]] = {
    "UserRequest": {
        "customer": {
            "schemas": [CORE_USER, CUSTOMER_SCHEMA],
            "userName": "jdoe",
            "externalId": "crm-1042",
            "name": {"givenName": "Jane", "familyName": "Doe"},
            "emails": [{"value": "jane.doe@example.com", "type": "home", "primary": True}],
            CUSTOMER_SCHEMA: {
                "consents": [
                    {"purpose": "marketing_email", "granted": True, "updatedAt": "2025-05-01T09:30:00Z"}
                ],
                "loyalty": {"tier": "silver", "points": 120},
            },
        }
    },
    "GroupRequest": {"newsletter": {"schemas": [CORE_GROUP], "displayName": "Newsletter"}},
    "PatchOp": {
        "deactivate": {
            "schemas": [PATCH_OP],
            "Operations": [{"op": "replace", "path": "active", "value": False}],
        },
        "rename": {
            "schemas": [PATCH_OP],
            "Operations": [{"op": "replace", "value": {"name": {"givenName": "Janet"}, "title": "Dr"}}],
        },
        "withdraw consent": {
            "schemas": [PATCH_OP],
            "Operations": [
                {
                    "op": "replace",
                    "path": f'{CUSTOMER_SCHEMA}:consents[purpose eq "marketing_email"].granted',
                    "value": False,
                }
            ],
        },
        "remove title": {"schemas": [PATCH_OP], "Operations": [{"op": "remove", "path": "title"}]},
    },
    "SearchRequest": {
        "consented": {
            "schemas": [SEARCH],
            "filter": f'{CUSTOMER_SCHEMA}:consents[purpose eq "marketing_email" and granted eq true]',
            "sortBy": "userName",
            "count": 50,
        }
    },
    "BulkRequest": {
        "create and deactivate": {
            "schemas": [BULK_REQUEST],
            "Operations": [
                {
                    "method": "POST",
                    "path": "/Users",
                    "bulkId": "u1",
                    "data": {"schemas": [CORE_USER], "userName": "bulk-jdoe"},
                },
                {
                    "method": "PATCH",
                    "path": "/Users/bulkId:u1",
                    "data": {
                        "schemas": [PATCH_OP],
                        "Operations": [{"op": "replace", "path": "active", "value": False}],
                    },
                },
            ],
        }
    },
}


def _query(name: str, description: str) -> Schema:
    return {"name": name, "in": "query", "description": description, "schema": _text()}


def _param(name: str) -> Schema:
    return {"$ref": f"#/components/parameters/{name}"}


def _errors(*statuses: int) -> Schema:
    return {str(s): {"$ref": f"#/components/responses/{s}"} for s in statuses}


def _body(schema: str) -> Schema:
    media: Schema = {"schema": _ref(schema)}
    if schema in _EXAMPLES:
        media["examples"] = {name: {"value": value} for name, value in _EXAMPLES[schema].items()}
    return {"required": True, "content": {SCIM_JSON: media, "application/json": {"schema": _ref(schema)}}}


def _ok(schema: str, description: str, *, etag: bool = False, location: bool = False) -> Schema:
    response: Schema = {"description": description, "content": {SCIM_JSON: {"schema": _ref(schema)}}}
    headers: Schema = {}
    if etag:
        headers["ETag"] = {"schema": {"type": "string"}}
    if location:
        headers["Location"] = {"schema": {"type": "string"}}
    if headers:
        response["headers"] = headers
    return response


def _resource_paths(endpoint: str, request: str, label: str) -> dict[str, Schema]:
    """The five operations of a resource type, and its ``.search``. Reads never answer 403: every token
    holds a scope, and every scope reads."""
    selection = [_param("attributes"), _param("excludedAttributes")]
    listing = [
        _param("filter"),
        _param("sortBy"),
        _param("sortOrder"),
        _param("startIndex"),
        _param("count"),
        *selection,
    ]
    tag = [endpoint]
    return {
        f"/scim/v2/{endpoint}": {
            "get": {
                "operationId": f"list{endpoint}",
                "summary": f"List or filter {label}s.",
                "tags": tag,
                "parameters": listing,
                "responses": {"200": _ok("ListResponse", "A page."), **_errors(400, 401)},
            },
            "post": {
                "operationId": f"create{label}",
                "summary": f"Create a {label}; its outbox event commits with it.",
                "tags": tag,
                "parameters": selection,
                "requestBody": _body(request),
                "responses": {
                    "201": _ok("Resource", "Created.", etag=True, location=True),
                    **_errors(400, 401, 403, 409, 413, 415),
                },
            },
        },
        f"/scim/v2/{endpoint}/.search": {
            "post": {
                "operationId": f"search{endpoint}",
                "summary": f"Search {label}s with the query in the body (RFC 7644 §3.4.3).",
                "tags": tag,
                "requestBody": _body("SearchRequest"),
                "responses": {"200": _ok("ListResponse", "A page."), **_errors(400, 401, 413, 415)},
            }
        },
        f"/scim/v2/{endpoint}/{{id}}": {
            "parameters": [_param("id")],
            "get": {
                "operationId": f"get{label}",
                "tags": tag,
                "parameters": [*selection, _param("If-None-Match")],
                "responses": {
                    "200": _ok("Resource", f"The {label}.", etag=True),
                    "304": {"description": "Not modified since the ETag in If-None-Match."},
                    **_errors(400, 401, 404),
                },
            },
            "put": {
                "operationId": f"replace{label}",
                "tags": tag,
                "parameters": [*selection, _param("If-Match")],
                "requestBody": _body(request),
                "responses": {
                    "200": _ok("Resource", "Replaced.", etag=True),
                    **_errors(400, 401, 403, 404, 409, 412, 413, 415),
                },
            },
            "patch": {
                "operationId": f"patch{label}",
                "summary": "Apply a PatchOp; answers 200 with the resource (as Okta expects).",
                "tags": tag,
                "parameters": [*selection, _param("If-Match")],
                "requestBody": _body("PatchOp"),
                "responses": {
                    "200": _ok("Resource", "Patched.", etag=True),
                    **_errors(400, 401, 403, 404, 409, 412, 413, 415),
                },
            },
            "delete": {
                "operationId": f"delete{label}",
                "summary": f"Delete a {label}: personal data is erased at once, a tombstone stays.",
                "tags": tag,
                "parameters": [_param("If-Match")],
                "responses": {"204": {"description": "Deleted."}, **_errors(401, 403, 404, 412)},
            },
        },
    }


def _discovery(endpoint: str, ids: list[str] | None) -> dict[str, Schema]:
    """``/ResourceTypes`` or ``/Schemas`` and one of them by id."""
    one_id: Schema = {"type": "string"} if ids is None else {"type": "string", "enum": ids}
    return {
        f"/scim/v2/{endpoint}": {
            "get": {
                "operationId": f"list{endpoint}",
                "tags": ["Discovery"],
                "responses": {"200": _ok("ListResponse", f"Every {endpoint[:-1]}."), **_errors(401)},
            }
        },
        f"/scim/v2/{endpoint}/{{id}}": {
            "get": {
                "operationId": f"get{endpoint[:-1]}",
                "tags": ["Discovery"],
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": one_id}],
                "responses": {"200": _ok("Resource", f"The {endpoint[:-1]}."), **_errors(401, 404)},
            }
        },
    }


def _plain(operation_id: str, summary: str, responses: Schema) -> Schema:
    return {"get": {"operationId": operation_id, "summary": summary, "security": [], "responses": responses}}


def _status(value: str) -> Schema:
    return {
        "description": value,
        "content": {
            "application/json": {
                "schema": _obj({"status": {"type": "string"}}, ("status",)),
            }
        },
    }


def document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a hub running with ``settings`` (its size and count limits)."""
    bulk = {
        "post": {
            "operationId": "bulk",
            "summary": "Up to the configured number of operations, each in a savepoint (RFC 7644 §3.7).",
            "tags": ["Bulk"],
            "requestBody": _body("BulkRequest"),
            "responses": {
                "200": _ok("BulkResponse", "One result per operation that ran."),
                **_errors(400, 401, 403, 413, 415),
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "idhub",
            "version": "2.0",
            "description": "The customer-identity hub: SCIM 2.0 (RFC 7643, RFC 7644), health and metrics.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": _plain("healthz", "The process answers.", {"200": _status("ok")}),
            "/readyz": _plain(
                "readyz",
                "The database answers.",
                {"200": _status("ready"), "503": _status("database unreachable")},
            ),
            "/metrics": _plain(
                "metrics",
                "Prometheus metrics: aggregate counts by target and route, no personal data.",
                {
                    "200": {
                        "description": "Prometheus text, or OpenMetrics when the Accept header asks for it.",
                        "content": {"text/plain": {}, "application/openmetrics-text": {}},
                    }
                },
            ),
            "/openapi.json": _plain(
                "openapi",
                "This document.",
                {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
            ),
            "/scim/v2/ServiceProviderConfig": _plain(
                "serviceProviderConfig",
                "What the hub supports (RFC 7644 §4); open to all.",
                {"200": _ok("Resource", "The configuration.")},
            ),
            **_discovery("ResourceTypes", ["User", "Group"]),
            **_discovery("Schemas", None),
            **_resource_paths("Users", "UserRequest", "User"),
            **_resource_paths("Groups", "GroupRequest", "Group"),
            "/scim/v2/Bulk": bulk,
        },
        "components": _components(settings),
    }


__all__ = ["document"]
