"""The hub's HTTP face: SCIM 2.0 under ``/scim/v2`` (scim2-server on our SQL storage), health and metrics.

One request is one database transaction: the resource change and its outbox event commit together. A Bulk
request runs each operation in a savepoint, so a failed operation leaves the others in place (RFC 7644 §3.7).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from functools import reduce
from http import HTTPStatus
from operator import or_
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from scim2_models import (
    AuthenticationScheme,
    Bulk,
    ChangePassword,
    EnterpriseUser,
    ETag,
    Extension,
    Filter,
    ForbiddenException,
    Group,
    InvalidFilterException,
    NotFoundException,
    Patch,
    PayloadTooLargeException,
    Resource,
    ResourceType,
    Schema,
    SCIMException,
    ScimPolicy,
    ScimProvider,
    ServiceProviderConfig,
    Sort,
    UnauthorizedException,
    User,
)
from scim2_models import Context as ScimContext
from scim2_server.handler import ScimHandler
from scim2_server.requests import ScimRequest
from scim2_server.responses import ScimResponse
from scim2_server.routing import Operation, Target
from scim2_server.service import ScimService
from sqlalchemy import Engine, text
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator import logs, metrics, migrations, openapi
from orchestrator.auth import Principal, TokenVerifier
from orchestrator.db import engine_for
from orchestrator.scim import storage as scim_storage
from orchestrator.scim.schemas import CustomerUser
from orchestrator.settings import Settings

log = logging.getLogger("idhub.api")

SCIM_PREFIX = "/scim/v2"
READ_OPERATIONS = frozenset({Operation.query, Operation.search, Operation.search_with_body})


def load_extension_schemas(folder: Path | None) -> list[type[Extension]]:
    """Operator-defined User extensions: every ``*.json`` in ``folder`` is one SCIM schema document."""
    if folder is None:
        return []
    models: list[type[Extension]] = []
    for path in sorted(folder.glob("*.json")):
        schema = Schema.model_validate(json.loads(path.read_text()))
        models.append(Extension.from_schema(schema))
    return models


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


def build_provider(settings: Settings, extra: Iterable[type[Extension]] = ()) -> ScimProvider:
    """The hub's resource types: User with enterprise, customer and operator extensions; Group."""
    extensions: list[type[Extension]] = [EnterpriseUser, CustomerUser, *extra]
    user_model: Any = User.__class_getitem__(reduce(or_, extensions))
    return ScimProvider(
        models=[User, Group, *extensions],
        resource_types=[ResourceType.from_resource(user_model), ResourceType.from_resource(Group)],
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

    def patch_response(
        self, base_url: str, resource: Resource[Any], response_parameters: Any
    ) -> ScimResponse:
        # Many identity providers (Okta among them) expect the resource back, not 204.
        response = self.resource_response(
            self.publish(base_url, resource), ScimContext.RESOURCE_REPLACEMENT_RESPONSE, response_parameters
        )
        if resource.meta is not None and resource.meta.version:
            response.headers["ETag"] = resource.meta.version
        return response


class Hub:
    """The SCIM machinery bound to one store: provider, service, storage, handler and token checks."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or engine_for(settings.database_url)
        self.provider = build_provider(settings, load_extension_schemas(settings.schema_dir))
        self.service = HubService(self.provider, max_filter_length=settings.max_filter_length)
        self.storage = scim_storage.SqlStorage(self.provider, max_string_length=settings.max_string_length)
        self.handler = ScimHandler(self.service, self.storage)
        self.tokens = TokenVerifier(self.engine)

    def serve(self, request: ScimRequest) -> ScimResponse:
        """Authenticate and serve one SCIM request in one transaction; errors become SCIM error responses."""
        try:
            operation = self.service.match(request).operation
            if operation is not Operation.service_provider_config:
                request.subject = self._authenticate(request)
            write = request.method.upper() not in ("GET", "HEAD") and operation not in READ_OPERATIONS
            with (
                self.engine.begin() as conn,
                scim_storage.bind(conn, write=write),
            ):
                # Relays wake at commit through the outbox trigger (migration 0001); polling covers the rest.
                response = self.handler.handle(request)
        except SCIMException as exc:
            response = self.service.error_response(exc)
        except Exception as exc:
            log.exception("unexpected error serving a SCIM request", exc_info=exc)
            response = self.service.error_response(exc)
        response.headers.setdefault("Cache-Control", "no-cache")
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
    app = FastAPI(title="idhub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # A path the SCIM route cannot take (a newline in it) still gets a SCIM error, not FastAPI's.
        if request.url.path.startswith(SCIM_PREFIX) and exc.status_code == HTTPStatus.NOT_FOUND:
            return _to_response(hub.service.error_response(NotFoundException(detail="no such endpoint")))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    # -- telemetry: request id, access log and HTTP metrics per request; the Prometheus scrape ------------
    app.add_middleware(metrics.RequestTelemetry)
    scrape = metrics.hub_registry(engine)

    @app.get("/metrics", include_in_schema=False)
    def prometheus(request: Request) -> Response:
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

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]

    @app.api_route(SCIM_PREFIX, methods=methods, include_in_schema=False)
    @app.api_route(SCIM_PREFIX + "/{path:path}", methods=methods, include_in_schema=False)
    async def scim(request: Request, path: str = "") -> Response:
        limit = settings.max_body_bytes
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                error = hub.service.error_response(
                    PayloadTooLargeException(detail=f"the body exceeds {limit} bytes")
                )
                return _to_response(error)
        scim_request = ScimRequest(
            method=request.method,
            base_url=str(request.base_url).rstrip("/") + SCIM_PREFIX,
            path=("/" + path).removesuffix(".scim"),
            query=dict(request.query_params),
            headers=list(request.headers.items()),
            body=body,
        )
        response = await run_in_threadpool(hub.serve, scim_request)
        return _to_response(response)

    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory``: the app on the settings of the environment."""
    from orchestrator import settings as settings_module

    return create_app(settings_module.get())


def _to_response(response: ScimResponse) -> Response:
    status = int(response.status)
    content = (
        b""
        if response.body is None or status == HTTPStatus.NO_CONTENT
        else json.dumps(response.body).encode()
    )
    return Response(content=content, status_code=status, headers=response.headers)
