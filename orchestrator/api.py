"""The hub's HTTP face: SCIM 2.0 under ``/scim/v2`` (scim2-server on our SQL storage), health and metrics.

One writing request is one database transaction: the resource change and its outbox event commit together.
In a Bulk request a failed operation leaves the others in place (RFC 7644 §3.7); its User creations are
written together at the end (see ``storage.bind``), and if one of them meets a stored userName the request is
served again one operation at a time, which answers exactly as if it had been served so from the start.
Reads on PostgreSQL run without a transaction (each statement has its own snapshot either way).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import re
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, Union, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from pydantic_core import from_json, to_json
from scim2_models import (
    AuthenticationScheme,
    Bulk,
    BulkOperation,
    BulkRequest,
    BulkResponse,
    ChangePassword,
    ETag,
    Filter,
    ForbiddenException,
    Group,
    InvalidFilterException,
    ListResponse,
    Patch,
    PatchOp,
    PayloadTooLargeException,
    Resource,
    ResourceType,
    ResponseParameters,
    Returned,
    SCIMException,
    ScimPolicy,
    ScimProvider,
    SearchRequest,
    ServiceProviderConfig,
    Sort,
    UnauthorizedException,
    User,
    default_comparison_key,
)
from scim2_models import BaseModel as ScimBaseModel
from scim2_models import Context as ScimContext
from scim2_models import Path as ScimPath
from scim2_models import Reference as ScimReference
from scim2_server.bulk import BulkPlan, BulkStep
from scim2_server.handler import ScimHandler
from scim2_server.requests import ScimRequest
from scim2_server.responses import ScimResponse
from scim2_server.routing import Operation, Target
from scim2_server.routing import match as route_match
from scim2_server.service import SEARCH_REQUEST_PARAMETERS, ScimService
from scim2_server.storage import SearchPage
from scim2_server.utils import parametrize
from sqlalchemy import Engine, text
from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator import logs, metrics, migrations, openapi
from orchestrator.auth import Principal, TokenVerifier
from orchestrator.db import engine_for
from orchestrator.openapi import BULK_REQUEST, BULK_RESPONSE, LIST_RESPONSE
from orchestrator.scim import plain
from orchestrator.scim import storage as scim_storage
from orchestrator.scim.extensions import user_extensions, user_model
from orchestrator.settings import Settings

log = logging.getLogger("idhub.api")

SCIM_PREFIX = "/scim/v2"
READ_OPERATIONS = frozenset({Operation.query, Operation.search, Operation.search_with_body})


def service_provider_config(settings: Settings) -> ServiceProviderConfig:
    return ServiceProviderConfig(
        documentation_uri=None,
        patch=Patch(supported=True),
        bulk=Bulk(
            supported=True,
            max_operations=settings.bulk_max_operations,
            max_payload_size=settings.max_body_bytes,
        ),
        filter=Filter(supported=True, max_results=settings.max_page_size),
        change_password=ChangePassword(supported=False),
        sort=Sort(supported=True),
        etag=ETag(supported=True),
        authentication_schemes=[
            AuthenticationScheme(
                type=AuthenticationScheme.Type.oauthbearertoken,
                name="OAuth Bearer Token",
                description="A bearer token made with `idhub token create`.",
                primary=True,
            )
        ],
    )


def build_provider(settings: Settings) -> ScimProvider:
    """The hub's resource types: User with enterprise, customer and operator extensions; Group."""
    return ScimProvider(
        models=[User, Group, *user_extensions(settings.schema_dir)],
        resource_types=[
            ResourceType.from_resource(user_model(settings.schema_dir)),
            ResourceType.from_resource(Group),
        ],
        config=service_provider_config(settings),
        # Microsoft Entra ID sends PATCH remove with a value and adds to filtered paths that match nothing.
        policy=ScimPolicy(
            remove_value_as_filter=ScimPolicy.RemoveValue.apply,
            unmatched_path_filter=ScimPolicy.UnmatchedPathFilter.create,
        ),
    )


class HubService(ScimService):
    """scim2-server's protocol with the hub's choices: scopes, bounded filters, PATCH answering 200."""

    def __init__(self, provider: ScimProvider, *, max_filter_length: int) -> None:
        super().__init__(provider)
        self.max_filter_length = max_filter_length
        # scim2-server parametrizes these generic messages on every request. pydantic caches a parametrized
        # class only while something holds it, so without these references each request built new classes.
        models = self.get_models()
        every: Any = Union[tuple(models)]  # noqa: UP007 (the form scim2-server builds, so the cache key matches)
        per_request: tuple[Any, ...] = (ListResponse, BulkRequest, BulkResponse)
        per_model: tuple[Any, ...] = (PatchOp, SearchRequest, ResponseParameters)
        self.generics = [g[every] for g in per_request] + [g[m] for m in models for g in per_model]
        self.bulk_request: Any = self.generics[1]
        self.resource_models = frozenset(models)
        # Plain requests are read as scim2-models reads them under the default comparison key, which refuses
        # no string; under another it may refuse some (``_check_comparison_forms``).
        self.plain = provider.policy.comparison_key is default_comparison_key
        self._pages: dict[tuple[Any, ...], SearchRequest[Any]] = {}

    @staticmethod
    def match(request: ScimRequest) -> Target:
        # Asked three times a request; a Target is frozen, so one answer serves them all.
        return _route(request.method.upper(), request.path)

    def publish(self, base_url: str, resource: Resource[Any]) -> Resource[Any]:
        # scim2-server deep-copies every resource to rewrite its references to other resources as URLs; a
        # resource holding none (most customers) needs only its meta completed, on a shallow copy.
        holders = _reference_holders(type(resource))
        if holders is None or any(getattr(resource, name, None) for name in holders):
            return super().publish(base_url, resource)
        assert resource.meta is not None
        assert resource.id is not None
        update: dict[str, Any] = {
            "location": self.resource_location(base_url, self.get_resource_type_of(resource), resource.id)
        }
        if not self.etag_supported:
            update["version"] = None
        return resource.model_copy(update={"meta": resource.meta.model_copy(update=update)})

    def read_bulk(self, body: bytes, content_type: str | None) -> BulkPlan:
        # scim2-server's own steps, with a plan that skips looking for "bulkId:" references in every value
        # of every operation when the payload holds none (RFC 7644 §3.7.2).
        self.ensure_supported(self.config.bulk, "Bulk")
        assert self.config.bulk is not None
        self.ensure_bulk_payload_size(len(body))
        self.ensure_json(content_type)
        try:
            decoded = from_json(body)
        except ValueError:
            decoded = None  # read_body words the error as it always does
        # Without \u escapes no value holds "bulkId:" where the text does not; a key holding it only costs the
        # general plan.
        plain = decoded is not None and (
            b"bulkId:" not in body if b"\\u" not in body else not _mentions_bulk_id(decoded)
        )
        request = self._creations(decoded) if plain else None
        if request is None:
            request = self.read_body(self.bulk_request, body, content_type, ScimContext.BULK_REQUEST)
        operations = request.operations or []
        limit = self.config.bulk.max_operations
        if limit is not None and len(operations) > limit:
            raise PayloadTooLargeException(
                detail=f"The number of operations exceeds the maxOperations ({limit})"
            )
        plan = _PlainBulkPlan if plain else BulkPlan
        return plan(operations, request.fail_on_errors)

    def _creations(self, decoded: Any) -> Any:
        """The BulkRequest of a payload of well-formed creations without "bulkId:" references, each resource
        validated once as the single POST it stands for (RFC 7644 §3.7); None for any other payload.

        scim2-models validates a Bulk operation's data through the envelope, which cost as much again as the
        resource itself: per attribute it looks for a "bulkId:" reference that such a payload cannot hold. It
        still reads every other payload, and any operation that fails here, so that errors read as before.
        """
        if not isinstance(decoded, dict) or decoded.keys() - _ENVELOPE_KEYS:
            return None
        operations, fail_on_errors = decoded.get("Operations"), decoded.get("failOnErrors")
        if (
            decoded.get("schemas") != [BULK_REQUEST]
            or not isinstance(operations, list)
            or not operations
            or not (fail_on_errors is None or type(fail_on_errors) is int)
        ):
            return None
        built = []
        for operation in operations:
            if not isinstance(operation, dict) or operation.keys() != _CREATION_KEYS:
                return None
            path, bulk_id, data = operation["path"], operation["bulkId"], operation["data"]
            if operation["method"] != "POST" or not isinstance(data, dict):
                return None
            if not (isinstance(path, str) and isinstance(bulk_id, str) and bulk_id):
                return None
            endpoint, _, resource_id = path.lstrip("/").partition("/")
            model = self.provider.model_for_endpoint("/" + endpoint)
            if resource_id or model not in self.resource_models:
                return None
            # A plain creation's data is the document to store (``HubHandler.apply_bulk_operation``):
            # validated into a model, dumped and copied, it took half of a Bulk request's CPU.
            resource: Any = plain.document(model, data) if self.plain and issubclass(model, User) else None
            if resource is None:
                try:
                    resource = model.model_validate(data, scim_ctx=ScimContext.RESOURCE_CREATION_REQUEST)
                except (ValidationError, SCIMException):
                    return None
            built.append(
                _operation_model(model).model_construct(
                    method=BulkOperation.Method.post, bulk_id=bulk_id, path=path, data=resource
                )
            )
        given = {} if fail_on_errors is None else {"fail_on_errors": fail_on_errors}
        return self.bulk_request.model_construct(schemas=[BULK_REQUEST], operations=built, **given)

    def found_response(
        self,
        base_url: str,
        resource_types: list[ResourceType],
        found: scim_storage.Found,
        search_request: SearchRequest[Any],
        build: Callable[[ResourceType, Any, list[dict[str, Any]] | None], Resource[Any]],
    ) -> ScimResponse:
        """``search_response`` for a page as stored. Validating each stored document into a model only to
        dump it again cost a third of a filtered GET: a document the response carries as it is goes out so."""
        if search_request.cursor is not None:  # not announced, so not met: scim2-server's own way
            resources = [build(found.resource_type, row, found.members.get(row.id)) for row in found.rows]
            page = SearchPage(found.total, resources)
            return self.search_response(base_url, resource_types, page, search_request)
        plain = not search_request.attributes and not search_request.excluded_attributes
        dumped = []
        for row in found.rows:
            members = found.members.get(row.id)
            body = self.stored_body(base_url, found.resource_type, row, members) if plain else None
            if body is None:
                body = self.publish(base_url, build(found.resource_type, row, members)).model_dump(
                    scim_ctx=ScimContext.RESOURCE_QUERY_RESPONSE, response_parameters=search_request
                )
            dumped.append(body)
        listing: dict[str, Any] = {
            "schemas": [LIST_RESPONSE],
            "totalResults": found.total,
            "itemsPerPage": len(dumped),
            "startIndex": search_request.start_index,
            "Resources": dumped,
        }
        return ScimResponse(HTTPStatus.OK, {k: v for k, v in listing.items() if v is not None})

    def stored_body(
        self, base_url: str, resource_type: ResourceType, row: Any, members: list[dict[str, Any]] | None
    ) -> dict[str, Any] | None:
        """A stored row as a query response without ``attributes`` carries it, or None where only the model
        knows how: references to rewrite into URLs, attributes to leave out below the top level."""
        if members:
            return None
        meta = scim_storage.response_meta(resource_type, row.created_at, row.updated_at, row.version)
        return self._document_body(base_url, resource_type, row.id, row.doc, meta)

    def _document_body(
        self, base_url: str, resource_type: ResourceType, resource_id: str, doc: Any, meta: dict[str, Any]
    ) -> dict[str, Any] | None:
        shape = _stored_shape(self.get_model(resource_type))
        if shape is None or not shape.references.isdisjoint(doc):
            return None
        body = {key: value for key, value in doc.items() if key not in shape.withheld}
        body["id"] = resource_id
        body["meta"] = meta = dict(meta)
        meta["location"] = self.resource_location(base_url, resource_type, resource_id)
        if not self.etag_supported:
            del meta["version"]
        return body

    def _written_response(
        self,
        base_url: str,
        resource: Resource[Any],
        response_parameters: ResponseParameters[Any] | None,
        status: HTTPStatus,
    ) -> ScimResponse | None:
        """``resource_response`` for a resource this request just stored, from the document it was stored
        as: dumping the model again cost a tenth of a creation. None where only the model knows how."""
        stored = scim_storage.written(resource)
        if stored is None or resource.id is None:
            return None
        if response_parameters is not None and (
            response_parameters.attributes or response_parameters.excluded_attributes
        ):
            return None
        resource_type = self.get_resource_type_of(resource)
        return self.document_response(base_url, resource_type, resource.id, stored.doc, stored.meta, status)

    def stored_response(
        self, base_url: str, resource_type: ResourceType, row: Any, status: HTTPStatus
    ) -> ScimResponse | None:
        """``resource_response`` for a row as stored (a User's: no members); None where only the model knows
        how."""
        meta = scim_storage.response_meta(resource_type, row.created_at, row.updated_at, row.version)
        return self.document_response(base_url, resource_type, row.id, row.doc, meta, status)

    def document_response(
        self,
        base_url: str,
        resource_type: ResourceType,
        resource_id: str,
        doc: Any,
        meta: dict[str, Any],
        status: HTTPStatus,
    ) -> ScimResponse | None:
        body = self._document_body(base_url, resource_type, resource_id, doc, meta)
        if body is None:
            return None
        headers = {"Content-Location": body["meta"]["location"]}
        if "version" in body["meta"]:
            headers["ETag"] = body["meta"]["version"]
        return ScimResponse(status, body, headers)

    def creation_response(self, base_url: str, created: Resource[Any]) -> ScimResponse:
        response = self._written_response(base_url, created, None, HTTPStatus.CREATED)
        if response is None:
            return super().creation_response(base_url, created)
        response.headers["Location"] = response.headers["Content-Location"]
        return response

    def replacement_response(
        self, base_url: str, resource: Resource[Any], response_parameters: ResponseParameters[Any]
    ) -> ScimResponse:
        response = self._written_response(base_url, resource, response_parameters, HTTPStatus.OK)
        return response or super().replacement_response(base_url, resource, response_parameters)

    def bulk_response(self, plan: BulkPlan) -> ScimResponse:
        outcomes = plan.outcomes()
        if any(outcome.get("response") is not None for outcome in outcomes):
            return super().bulk_response(plan)  # error bodies are scim2-models' to render
        # Validating a BulkResponse model only to dump it again cost a tenth of a Bulk request.
        operations = [
            {
                key: value
                for key, value in (
                    ("method", str(outcome["method"])),
                    ("bulkId", outcome.get("bulk_id")),
                    ("version", outcome.get("version")),
                    ("location", outcome.get("location")),
                    ("status", str(int(outcome["status"]))),
                )
                if value is not None
            }
            for outcome in outcomes
        ]
        return ScimResponse(HTTPStatus.OK, {"schemas": [BULK_RESPONSE], "Operations": operations})

    def equality(self, query: Mapping[str, str]) -> _Equality | None:
        """A search's query parameters as an ``attribute eq "value"`` filter and the parameters besides it
        that a page needs, or None when they are anything else (the general reading then says what)."""
        given = {key: query[key] for key in SEARCH_REQUEST_PARAMETERS if key in query}
        text = given.pop("filter", None)
        if text is None or len(text) > self.max_filter_length or not _PAGING.issuperset(given):
            return None
        matched = _EQUALS.fullmatch(text)
        if matched is None:
            return None
        return _Equality(matched["attribute"], matched["value"], tuple(sorted(given.items())))

    def search_without_filter(
        self, resource_types: list[ResourceType], rest: tuple[tuple[str, str], ...]
    ) -> SearchRequest[Any]:
        """``read_search`` of the parameters besides the filter: read once for each set of them."""
        key = (tuple(str(rt.id) for rt in resource_types), rest)
        known = self._pages.get(key)
        if known is None:
            if len(self._pages) >= 256:
                self._pages.clear()
            known = self._pages[key] = self.read_search(resource_types, dict(rest))[0]
        return known.model_copy()

    def _bound(self, text: Any, what: str) -> None:
        # Checked on the raw text, before anything parses it: parsing is what a huge filter makes slow.
        if isinstance(text, str) and len(text) > self.max_filter_length:
            raise InvalidFilterException(
                detail=f"the {what} is longer than {self.max_filter_length} characters"
            )

    def read_search(self, resource_types: list[ResourceType], payload: Any) -> Any:
        if isinstance(payload, Mapping):
            self._bound(payload.get("filter"), "filter")
        return super().read_search(resource_types, payload)

    def read_patch(self, resource_type: ResourceType, body: bytes, content_type: str | None) -> Any:
        try:
            operations = json.loads(body).get("Operations")
        except (ValueError, AttributeError):
            operations = None  # scim2-server answers the malformed body itself
        for operation in operations if isinstance(operations, list) else ():
            if isinstance(operation, Mapping):
                self._bound(operation.get("path"), "PATCH path")
        return super().read_patch(resource_type, body, content_type)

    def authorize(self, request: ScimRequest, target: Target, resource_type: ResourceType) -> None:
        principal: Principal | None = request.subject
        if principal is None:
            raise UnauthorizedException(detail="a bearer token is required")
        scope = "scim:read" if target.operation in READ_OPERATIONS else "scim:write"
        if not principal.allows(scope):
            raise ForbiddenException(detail=f"the token lacks the {scope} scope")

    def bulk_success(
        self,
        base_url: str,
        operation: BulkOperation[Resource[Any]],
        outcome: dict[str, Any],
        resource: Resource[Any] | None,
    ) -> dict[str, Any]:
        # A Bulk result names only the resource's location and version (RFC 7644 §3.7.3): publishing a deep
        # copy of every resource with its references resolved cost more than writing it.
        outcome = super().bulk_success(base_url, operation, outcome, None)
        if isinstance(resource, _PlainCreation):
            outcome["location"] = self.resource_location(base_url, resource.resource_type, resource.id)
            outcome["version"] = scim_storage.etag(resource.version) if self.etag_supported else None
        elif resource is not None and resource.meta is not None and resource.id is not None:
            resource_type = self.get_resource_type_of(resource)
            outcome["location"] = self.resource_location(base_url, resource_type, resource.id)
            outcome["version"] = resource.meta.version if self.etag_supported else None
        return outcome

    def patch_response(
        self, base_url: str, resource: Resource[Any], response_parameters: Any
    ) -> ScimResponse:
        # Many identity providers (Okta among them) expect the resource back, not 204.
        response = self._written_response(
            base_url, resource, response_parameters, HTTPStatus.OK
        ) or self.resource_response(
            self.publish(base_url, resource), ScimContext.RESOURCE_REPLACEMENT_RESPONSE, response_parameters
        )
        if resource.meta is not None and resource.meta.version:
            response.headers["ETag"] = resource.meta.version
        return response


_ENVELOPE_KEYS = frozenset({"schemas", "Operations", "failOnErrors"})
_CREATION_KEYS = frozenset({"method", "path", "bulkId", "data"})

_route = functools.lru_cache(maxsize=1024)(route_match)


@dataclasses.dataclass(frozen=True)
class _Equality:
    """A search filter ``attribute eq "value"`` and the other search parameters, sorted."""

    attribute: str
    value: str
    rest: tuple[tuple[str, str], ...]


# An attribute name (RFC 7644 §3.4.2.2 ATTRNAME), ``eq`` in any case, and a string without escapes or control
# characters, so that it reads as it is written.
_EQUALS = re.compile(r'(?P<attribute>[A-Za-z][A-Za-z0-9_-]*) [eE][qQ] "(?P<value>[^"\\\x00-\x1f]*)"')
_PAGING = frozenset({"attributes", "excludedAttributes", "startIndex", "count"})


@functools.cache
def _reference_holders(model: type[Resource[Any]]) -> tuple[str, ...] | None:
    """The fields of ``model`` under which scim2-server's ``publish`` rewrites references; None if unknown."""
    by_name = {
        str(field.serialization_alias or name).lower(): name for name, field in model.model_fields.items()
    }
    holders = set()
    for path in parametrize(ScimPath, model).iter_paths(target_type=[ScimReference]):
        binding = path.resolve()
        types = set(getattr(binding.target_type, "__reference_types__", ()) if binding else ())
        if not types or types & {"external", "uri"}:
            continue  # publish leaves these as they are
        holder = by_name.get(str(path.schema or path.parts[0]).lower())
        if holder is None:
            return None
        holders.add(holder)
    return tuple(sorted(holders))


@dataclasses.dataclass(frozen=True)
class _Shape:
    withheld: frozenset[str]  # top-level keys a response leaves out: returned "never" or "request"
    references: frozenset[str]  # top-level keys under which ``publish`` rewrites references


@functools.cache
def _stored_shape(model: type[Resource[Any]]) -> _Shape | None:
    """How a stored document of ``model`` differs from its query response; None if not by top-level keys."""
    holders = _reference_holders(model)
    if holders is None:
        return None

    def key(name: str) -> str:
        return model.model_fields[name].serialization_alias or name

    withheld = set()
    for name in model.model_fields:
        if model.get_field_annotation(name, Returned) in (Returned.never, Returned.request):
            withheld.add(key(name))
        elif _withholds_below(model.get_field_root_type(name)):
            return None
    return _Shape(frozenset(withheld), frozenset(key(name) for name in holders))


def _withholds_below(kind: Any, seen: frozenset[type] = frozenset()) -> bool:
    """Whether a complex attribute or extension has a sub-attribute returned "never" or "request"."""
    if not (isinstance(kind, type) and issubclass(kind, ScimBaseModel)) or kind in seen:
        return False
    return any(
        kind.get_field_annotation(name, Returned) in (Returned.never, Returned.request)
        or _withholds_below(kind.get_field_root_type(name), seen | {kind})
        for name in kind.model_fields
    )


@functools.cache
def _operation_model(model: type[Resource[Any]]) -> type[BulkOperation[Any]]:
    return BulkOperation[model]  # type: ignore[valid-type]


def _mentions_bulk_id(value: Any) -> bool:
    """Whether a decoded JSON value holds a string with ``bulkId:`` anywhere."""
    if isinstance(value, str):
        return "bulkId:" in value
    if isinstance(value, dict):
        return any(_mentions_bulk_id(item) for item in value.values())
    if isinstance(value, list):
        return any(_mentions_bulk_id(item) for item in value)
    return False


@dataclasses.dataclass(frozen=True)
class _PlainCreation:
    """What ``bulk_success`` needs of a User a Bulk request created from a plain document."""

    resource_type: ResourceType
    id: str
    version: int


class _PlainBulkPlan(BulkPlan):
    """The plan of a Bulk request without "bulkId:" references: in request order, nothing to resolve."""

    @staticmethod
    def references(operation: BulkOperation[Resource[Any]]) -> list[str]:
        return []

    def resolve(self, step: BulkStep) -> BulkOperation[Resource[Any]]:
        operation = self.operation(step)
        if operation.bulk_id is not None and not self.is_creation(step.index, operation.bulk_id):
            return super().resolve(step)  # refuses a POST reusing an earlier POST's bulkId
        return operation


class HubHandler(ScimHandler):
    """scim2-server's handler, answering searches from the rows as stored (``HubService.found_response``)
    and serving plain creations and PATCHes of Users from their documents (``plain``)."""

    service: HubService
    storage: scim_storage.SqlStorage

    def create(self, request: ScimRequest) -> ScimResponse:
        return self._plain(request, Operation.create) or super().create(request)

    def patch(self, request: ScimRequest) -> ScimResponse:
        return self._plain(request, Operation.patch) or super().patch(request)

    def _plain(self, request: ScimRequest, operation: Operation) -> ScimResponse | None:
        """A User's creation or PATCH whose body ``plain`` reads, without response parameters or
        preconditions, served from the document it stores; None for any other (scim2-server serves it)."""
        if not self.service.plain or request.query:
            return None
        if request.header("If-Match") or request.header("If-None-Match"):
            return None
        with self.service.provider:
            target = self.service.route(request, operation)
            if target.me:
                return None
            resource_type = self.service.resource_type_at(str(target.endpoint))
            if resource_type.name != "User":
                return None
            # The checks ScimHandler makes before it reads the body, in its order.
            self.service.authorize(request, target, resource_type)
            self.service.ensure_json(request.header("Content-Type"))
            model = self.storage.model(resource_type)
            base_url = request.base_url
            if operation is Operation.create:
                doc = plain.creation(model, request.body)
                if doc is None:
                    return None
                with self.storage.operation():
                    row = self.storage.create_document(resource_type, doc)
                response = self.service.stored_response(base_url, resource_type, row, HTTPStatus.CREATED)
                if response is None:  # references to rewrite: the model's way, as scim2-server answers
                    return self.service.creation_response(base_url, self.storage.build(resource_type, row))
                response.headers["Location"] = response.headers["Content-Location"]
                return response
            values = plain.patch_values(model, request.body)
            if values is None or target.resource_id is None:
                return None
            with self.storage.operation():
                row = self.storage.set_values(resource_type, target.resource_id, values)
            response = self.service.stored_response(base_url, resource_type, row, HTTPStatus.OK)
            return response or self.service.patch_response(
                base_url, self.storage.build(resource_type, row), None
            )

    def apply_bulk_operation(
        self, resource_type: ResourceType, operation: BulkOperation[Resource[Any]]
    ) -> Resource[Any] | None:
        if isinstance(operation.data, dict):  # a plain creation, as ``HubService._creations`` read it
            row = self.storage.create_document(resource_type, operation.data)
            return cast(Resource[Any], _PlainCreation(resource_type, row.id, row.version))
        return super().apply_bulk_operation(resource_type, operation)

    def search(self, request: ScimRequest) -> ScimResponse:
        return self._search(
            request,
            Operation.search,
            lambda types: self.service.read_search_query(types, request.query),
            self.service.equality(request.query),
        )

    def search_with_body(self, request: ScimRequest) -> ScimResponse:
        content_type = request.header("Content-Type")
        return self._search(
            request,
            Operation.search_with_body,
            lambda types: self.service.read_search_body(types, request.body, content_type),
        )

    def _search(
        self,
        request: ScimRequest,
        operation: Operation,
        read: Callable[[list[ResourceType]], tuple[SearchRequest[Any], Any]],
        equality: _Equality | None = None,
    ) -> ScimResponse:
        # ScimHandler.search's steps; the hub pages by index only, so the position is always None.
        with self.service.provider:
            target = self.service.route(request, operation)
            resource_types = self.service.searched_types(target.endpoint)
            authorized = self.service.authorized_types(request, target, resource_types)
            page = None
            if equality is not None and len(resource_types) == len(authorized) == 1:
                page = self._find_equal(authorized, equality)
            if page is None:
                search_request, _ = read(resource_types)
                with self.storage.operation():
                    page = self.storage.find(authorized, search_request), search_request
            found, search_request = page
            return self.service.found_response(
                request.base_url, resource_types, found, search_request, self.storage.build
            )

    def _find_equal(
        self, resource_types: list[ResourceType], equality: _Equality
    ) -> tuple[scim_storage.Found, SearchRequest[Any]] | None:
        """An identity provider's lookup (``userName eq "..."``) without parsing its filter; None where the
        filter does not compare a column as it is, and the search goes the general way.

        Identity providers send such a lookup for each account they provision. Reading the filter into a
        SearchRequest, then building, hashing and compiling a statement for it took half of one: in-process
        on PostgreSQL, 840 µs the general way, 415 µs this way."""
        compared = self.storage.equal_column(resource_types[0], equality.attribute, equality.value)
        if compared is None:
            return None
        self.service.ensure_supported(self.service.config.filter, "Filtering")
        search_request = self.service.search_without_filter(resource_types, equality.rest)
        if search_request.cursor is not None or search_request.count == 0:
            return None
        with self.storage.operation():
            return self.storage.find_equal(resource_types[0], compared, search_request), search_request


_SINGLE_WRITES = frozenset({Operation.create, Operation.patch, Operation.replace})


class Hub:
    """The SCIM machinery bound to one store: provider, service, storage, handler and token checks."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or engine_for(settings.database_url)
        self.provider = build_provider(settings)
        self.service = HubService(self.provider, max_filter_length=settings.max_filter_length)
        self.storage = scim_storage.SqlStorage(self.provider, max_string_length=settings.max_string_length)
        self.handler = HubHandler(self.service, self.storage)
        self.tokens = TokenVerifier(self.engine)
        self.user_endpoints = frozenset(
            str(rt.endpoint).strip("/") for rt in self.provider.resource_types if rt.name == "User"
        )
        # SQLite reads keep their transaction: switching back from AUTOCOMMIT would hand SQLite's transactions
        # back to the driver, which db.py takes from it (BEGIN IMMEDIATE by hand). On PostgreSQL, an engine of
        # its own: switching a pooled connection to AUTOCOMMIT and back for each request cost 40 µs of CPU (a
        # checkout, a SELECT 1 and a checkin: 167 µs that way, 127 µs on an engine made AUTOCOMMIT).
        self.reader = (
            engine_for(self.engine.url.render_as_string(hide_password=False), autocommit=True)
            if self.engine.dialect.name == "postgresql"
            else None
        )

    def serve(self, request: ScimRequest) -> ScimResponse:
        """Authenticate and serve one SCIM request in one transaction; errors become SCIM error responses."""
        try:
            target = self.service.match(request)
            operation = target.operation
            if operation is not Operation.service_provider_config:
                request.subject = self._authenticate(request)
            write = request.method.upper() not in ("GET", "HEAD") and operation not in READ_OPERATIONS
            # A User's creation is one statement, its row and its event together (``_write_with_event``); so
            # is its PATCH or PUT, after one unlocked read, when no other request changed the row in between.
            single = operation in _SINGLE_WRITES and target.endpoint in self.user_endpoints
            try:
                response = self._handle(
                    request, write=write, batch=operation is Operation.bulk, single=single
                )
            except (scim_storage.BatchClash, scim_storage.StaleRow):
                # A held-back creation met a stored userName, or another request changed the row between an
                # unlocked read and its write. Nothing was written; again an operation at a time, rows locked.
                response = self._handle(request, write=write, batch=False)
        except SCIMException as exc:
            response = self.service.error_response(exc)
        except Exception as exc:
            log.exception("unexpected error serving a SCIM request", exc_info=exc)
            response = self.service.error_response(exc)
        response.headers.setdefault("Cache-Control", "no-cache")
        return response

    def _handle(
        self, request: ScimRequest, *, write: bool, batch: bool, single: bool = False
    ) -> ScimResponse:
        if (single or not write) and self.reader is not None:
            # Each PostgreSQL statement sees its own snapshot in READ COMMITTED and is atomic, so a read, or a
            # write of a ``single`` statement, needs no transaction; that saves BEGIN and COMMIT, two of a
            # creation's three round trips and of a PATCH's four (measured in-process: 13 % of a PATCH's CPU).
            with self.reader.connect() as conn, scim_storage.bind(conn, write=write, optimistic=single):
                return self.handler.handle(request)
        with self.engine.begin() as conn, scim_storage.bind(conn, write=write, batch=batch):
            response = self.handler.handle(request)
            scim_storage.flush()
            # Relays wake at commit through the outbox trigger (migration 0001); polling covers the rest.
        return response

    def _authenticate(self, request: ScimRequest) -> Principal:
        scheme, _, token = (request.header("Authorization") or "").partition(" ")
        principal = self.tokens.verify(token.strip()) if scheme.lower() == "bearer" else None
        if principal is None:
            raise UnauthorizedException(detail="a valid bearer token is required")
        return principal


def create_app(settings: Settings, engine: Engine | None = None, *, migrate: bool = True) -> FastAPI:
    """The ASGI application of the hub."""
    logs.configure(settings.log_format, settings.log_level)
    engine = engine or engine_for(settings.database_url)
    if migrate:
        migrations.upgrade(engine)
    hub = Hub(settings, engine)
    app = _HubApp(title="idhub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub

    # -- telemetry: request id, access log and HTTP metrics per request; the Prometheus scrape ------------
    scrape = metrics.hub_registry(engine)

    @app.get("/metrics", include_in_schema=False)
    def prometheus(request: Request) -> Response:
        # Counts only, but they tell how many customers and targets there are: a token with the metrics
        # scope (Prometheus sends it as ``authorization: {credentials: ...}``), like every other route.
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        principal = hub.tokens.verify(token.strip()) if scheme.lower() == "bearer" else None
        if principal is None or not principal.allows("metrics"):
            status = HTTPStatus.UNAUTHORIZED if principal is None else HTTPStatus.FORBIDDEN
            headers = {"WWW-Authenticate": "Bearer"} if principal is None else None
            return JSONResponse({"detail": "a token with the metrics scope is required"}, status, headers)
        body, content_type = metrics.render(scrape, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    spec = openapi.document(settings)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_json() -> JSONResponse:
        return JSONResponse(spec)

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> Response:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:
            return JSONResponse({"status": "database unreachable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def scim(scope: Scope, receive: Receive, send: Send) -> None:
        limit = settings.max_body_bytes
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody is left to answer
            body += message.get("body", b"")
            if len(body) > limit:
                error = PayloadTooLargeException(detail=f"the body exceeds {limit} bytes")
                await _send(send, hub.service.error_response(error))
                return
            if not message.get("more_body", False):
                break
        query = scope.get("query_string")
        scim_request = ScimRequest(
            method=scope["method"],
            base_url=_base_url(scope),
            path=_scim_path(scope) or "/",
            query=dict(QueryParams(query)) if query else {},
            headers=[(name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]],
            body=body,
        )
        # Served on the event loop, one request at a time per process: a thread hand-off and the GIL passing
        # between request threads cost a sixth of a request's CPU, while a database round trip on loopback
        # is a fraction of a millisecond. Concurrency comes from server processes (``serve --workers``).
        await _send(send, hub.serve(scim_request))

    # SCIM requests skip FastAPI's routing and middleware (the endpoint reads the request itself) but keep the
    # telemetry, so they are logged and counted like the others.
    app.scim = metrics.RequestTelemetry(scim)
    app.add_middleware(metrics.RequestTelemetry)
    return app


def app_from_env() -> FastAPI:
    """The server's factory (``idhub serve``): the app on the settings of the environment."""
    from orchestrator import settings as settings_module

    app = create_app(settings_module.get())
    # What start-up made stays out of the garbage collector's full passes: each walked it all, a pause of
    # tens of ms in the middle of requests.
    gc.freeze()
    return app


class _HubApp(FastAPI):
    """The hub's ASGI application: requests under ``/scim/v2`` go straight to the SCIM endpoint, others to
    FastAPI's routes.

    Routing, dependency solving and the error, exception and body-limit layers cost a tenth of a filtered
    GET's CPU. A method a SCIM endpoint does not serve gets scim2-server's 405 with the ``Allow`` header, a
    path it does not know a SCIM 404.
    """

    scim: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _scim_path(scope) is not None:
            scope["app"] = self
            await self.scim(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def _scim_path(scope: Scope) -> str | None:
    """The path below ``/scim/v2`` (``/Users``, ``/`` for the prefix itself), or None outside it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root + "/"):
        path = path[len(root) :]
    if path != SCIM_PREFIX and not path.startswith(SCIM_PREFIX + "/"):
        return None
    return (path[len(SCIM_PREFIX) :] or "/").removesuffix(".scim")


async def _send(send: Send, response: ScimResponse) -> None:
    """Send a SCIM response as Starlette's ``Response`` would, without making one."""
    status = int(response.status)
    content = b"" if response.body is None or status == HTTPStatus.NO_CONTENT else to_json(response.body)
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in response.headers.items()
    ]
    if status >= 200 and status not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
        headers.append((b"content-length", str(len(content)).encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


_base_urls: dict[tuple[Any, ...], str] = {}


def _base_url(scope: Scope) -> str:
    """The SCIM base URL of a request, as Starlette reads it from the scope; computed once for each scheme,
    server, root path and Host header (a few per deployment, but a header is the client's to choose)."""
    host = next((value for name, value in scope["headers"] if name == b"host"), None)
    root = scope.get("app_root_path", scope.get("root_path", ""))
    server = scope.get("server")
    key = (scope.get("scheme"), None if server is None else tuple(server), root, host)
    known = _base_urls.get(key)
    if known is None:
        if len(_base_urls) >= 256:
            _base_urls.clear()
        known = _base_urls[key] = str(Request(scope).base_url).rstrip("/") + SCIM_PREFIX
    return known
