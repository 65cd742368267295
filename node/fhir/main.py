"""Builds the FHIR API app: routers under ``/fhir``, the gateway middleware, error handlers.

The gateway (a plain ASGI middleware) gives every request an id (``X-Request-ID``),
refuses bodies over ``fhir.max_request_bytes`` (413) and clients that do not accept JSON
(406), logs one line per request (request id, method, path, status, time; never the
query string, which can hold patient identifiers) and records an AuditEvent (both written
by the audit trail's thread, off the event loop). Every
error leaves as an OperationOutcome (see :mod:`node.fhir.errors`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

from anyio import CapacityLimiter
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node import __version__
from node.affinity import WorkerRegistry
from node.dispatch import Dispatcher
from node.fhir import FHIR_JSON
from node.fhir.audit import AccessRecord, AuditTrail, log_access
from node.fhir.auth import Authenticator
from node.fhir.deps import DB_THREADS, ApiContext
from node.fhir.errors import FhirError, outcome_body
from node.fhir.followups import FollowupPublisher, FollowupRouting, QuestionWriter
from node.fhir.resources import fast_id
from node.fhir.routers import (
    audit_event,
    communication,
    device,
    diagnostic_report,
    fallback,
    imaging_study,
    jobs,
    metadata,
    observation,
    provenance,
    subscription,
)
from node.fhir.store import FhirStore
from node.logfmt import log_context
from node.metrics import CONTENT_TYPE, render_metrics, token_allows
from node.review.routes import REVIEW_API, ReviewSources, review_router
from node.settings import Settings

log = logging.getLogger("medgemma.fhir.api")

PREFIX: Final = "/fhir"
NOT_AUDITED: Final = (
    f"{PREFIX}/metadata",
    f"{PREFIX}/openapi.json",
    f"{PREFIX}/.well-known/smart-configuration",
)
_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ACCEPTABLE: Final = ("*/*", "application/*", FHIR_JSON, "application/json",
                      "application/json+fhir", "application/fhir+*")  # fmt: skip


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        content=outcome_body(message, code=code),
        status_code=status,
        media_type=FHIR_JSON,
        headers=headers,
    )


def _accepts_json(accept: str) -> bool:
    if not accept.strip():
        return True
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in _ACCEPTABLE or "json" in media:
            return True
    return False


class BodyTooLarge(FhirError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"the request body is larger than {limit} bytes (fhir.max_request_bytes)",
            code="too-long",
        )  # fmt: skip


class FhirGateway:
    """Request ids, size and Accept checks, one log line and an AuditEvent per request."""

    def __init__(self, app: ASGIApp, *, max_body: int, audit: AuditTrail | None) -> None:
        self.app = app
        self.max_body = max_body
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else fast_id().replace("-", "")[:16]
        path = scope.get("path", "")
        client = scope.get("client") or ("", 0)
        access = AccessRecord(rid, scope["method"], path, client_address=str(client[0] or ""))
        scope.setdefault("state", {})["access"] = access
        started = time.perf_counter()
        status = [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", rid)
            await send(message)

        received = [0]

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        try:
            with log_context(request_id=rid):
                early = self._precheck(headers, scope)
                if early is not None:
                    await early(scope, receive, send_with_id)
                else:
                    await self.app(scope, limited_receive, send_with_id)
        finally:
            access.status = status[0] or 500
            access.ms = (time.perf_counter() - started) * 1000
            access.audited = path.startswith((PREFIX, REVIEW_API)) and path not in NOT_AUDITED
            if self.audit is not None:  # its thread writes the log line and the AuditEvent
                self.audit.record(access)
            else:
                log_access(access)

    def _precheck(self, headers: dict[str, str], scope: Scope) -> Response | None:
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return _error(413, BodyTooLarge(self.max_body).message, "too-long")
        # /metrics answers Prometheus text whatever a scraper accepts
        if scope.get("path") != "/metrics" and not _accepts_json(headers.get("accept", "")):
            return _error(
                406,
                f"this server answers {FHIR_JSON} only; the Accept header excludes it",
                "not-supported",
            )
        return None


async def _fhir_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FhirError)
    return _error(exc.status, exc.message, exc.code, exc.headers or None)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return _error(404, f"nothing is served at {request.url.path}", "not-found")
    if exc.status_code == 405:
        return _error(405, f"{request.method} is not supported on {request.url.path}",
                      "not-supported", dict(exc.headers or {}))  # fmt: skip
    return _error(exc.status_code, str(exc.detail), "processing")


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}"
        for err in list(exc.errors())[:5]
    )
    return _error(400, f"invalid request: {problems}", "invalid")


async def _unexpected(request: Request, exc: Exception) -> Response:
    access = request.scope.get("state", {}).get("access")
    rid = access.request_id if isinstance(access, AccessRecord) else "-"
    log.error("%s internal error: %s", rid, type(exc).__name__, exc_info=exc)
    return _error(
        500,
        f"internal error (request {rid}); the node's log has the details",
        "exception",
    )


def _document_bearer_auth(app: FastAPI) -> None:
    """Declare bearer authentication in the OpenAPI document (checked by node.fhir.deps)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A static token or a JWT with SMART system scopes",
                }
            }
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _metrics_route(request: Request) -> Response:
    """Prometheus metrics (node.metrics); a bearer token when metrics.token_sha256 is set."""
    ctx: ApiContext = request.app.state.ctx
    if not token_allows(ctx.settings.metrics, request.headers.get("authorization")):
        return Response(
            "a bearer token is required (metrics.token_sha256)\n",
            status_code=401,
            media_type="text/plain",
            headers={"WWW-Authenticate": "Bearer"},
        )
    body = await run_in_threadpool(render_metrics, ctx.store.db)
    return Response(body, media_type=CONTENT_TYPE)


def followup_routing(settings: Settings, store: FhirStore) -> FollowupRouting | None:
    """Follow-ups to the worker holding their study (``queue.followup_affinity``), with
    Celery workers only: the embedded worker of ``serve`` is one process."""
    queue = settings.queue
    if not queue.followup_affinity or not queue.broker_url:
        return None
    registry = WorkerRegistry(
        store.db.engine, queue.worker_heartbeat_seconds, queue.task_time_limit_seconds
    )
    return FollowupRouting(registry, queue.followup_queue, queue.followup_affinity_wait_seconds)


def create_app(
    settings: Settings,
    *,
    store: FhirStore,
    dispatcher: Dispatcher | None,
    audit: bool = True,
    authenticator: Authenticator | None = None,
) -> FastAPI:
    """The FHIR API of one node, on ``store`` (and ``dispatcher`` for follow-ups)."""
    trail = AuditTrail(store) if audit else None
    review = ReviewSources(settings)  # the review page's ledger, opened on first use
    ctx = ApiContext(
        settings=settings,
        store=store,
        dispatcher=dispatcher,
        auth=authenticator or Authenticator(settings.auth),
        audit=trail,
        db_limiter=CapacityLimiter(DB_THREADS),
        writer=QuestionWriter(store) if dispatcher is not None else None,
        publisher=FollowupPublisher(store, dispatcher, routing=followup_routing(settings, store))
        if dispatcher is not None
        else None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if trail is not None:
            trail.flush()
        review.close()

    app = FastAPI(
        title="medgemma-node FHIR R4 API",
        version=__version__,
        description=(
            "AI-generated, preliminary chest radiograph pre-reads (not a diagnosis) and "
            "follow-up questions, as FHIR R4 resources (application/fhir+json)."
        ),
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    _document_bearer_auth(app)
    app.state.audit = trail
    for module in (
        metadata,
        diagnostic_report,
        observation,
        imaging_study,
        communication,
        device,
        provenance,
        subscription,
        audit_event,
        jobs,
        fallback,
    ):
        app.include_router(module.router, prefix=PREFIX)
    app.include_router(review_router(settings, review))  # /review: the page and its data
    app.add_api_route(  # SMART discovery at the root too (clients look in both places)
        "/.well-known/smart-configuration",
        metadata.smart_configuration_route,
        methods=["GET"],
        include_in_schema=False,
    )
    app.add_api_route("/metrics", _metrics_route, methods=["GET"], include_in_schema=False)
    handlers: dict[Any, Any] = {
        FhirError: _fhir_error,
        StarletteHTTPException: _http_error,
        RequestValidationError: _validation_error,
        Exception: _unexpected,
    }
    for exc_type, handler in handlers.items():
        app.add_exception_handler(exc_type, handler)
    app.add_middleware(
        FhirGateway,
        max_body=settings.fhir.max_request_bytes,
        audit=trail,
    )
    return app
