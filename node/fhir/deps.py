"""FastAPI dependencies of the FHIR API (``Annotated[..., Depends(...)]``).

Each route takes one dependency, a :class:`Call`: the app's shared context, this
request's audit record and, for every route but the public ones, the authenticated
caller whose scopes were checked. One async dependency per request keeps FastAPI's
dependency resolution and thread hops off the hot path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import Request

from node.dispatch import Dispatcher
from node.fhir.audit import AccessRecord, AuditTrail
from node.fhir.auth import Access, Authenticator, Principal, forbidden
from node.fhir.followups import FollowupPublisher, QuestionWriter
from node.fhir.store import FhirStore
from node.settings import FhirSettings, Settings

T = TypeVar("T")

#: Threads that talk to the database at once (the store's connection pool is as large):
#: more would only queue on SQLite's lock and the GIL.
DB_THREADS = 4


@dataclass
class ApiContext:
    """What the routes of one app share: settings, store, queue, auth and audit."""

    settings: Settings
    store: FhirStore
    dispatcher: Dispatcher | None
    auth: Authenticator
    audit: AuditTrail | None
    db_limiter: CapacityLimiter
    writer: QuestionWriter | None = None  # group commit of new questions
    publisher: FollowupPublisher | None = None  # sends them to the work queue

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking store call (a write, or anything on a networked database) in the
        database threads."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.db_limiter)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read-only store call: on SQLite (WAL: readers never wait for writers; a
        read takes well under a millisecond) on the event loop, which is much cheaper than
        handing it to a thread and back; on other databases in the database threads."""
        if self.store.engine.dialect.name == "sqlite":
            return fn(*args)
        return await self.db(fn, *args)


@dataclass
class Call:
    """One request as a route sees it: context, audit record, caller."""

    ctx: ApiContext
    access: AccessRecord
    principal: Principal | None

    @property
    def store(self) -> FhirStore:
        return self.ctx.store

    @property
    def settings(self) -> FhirSettings:
        return self.ctx.settings.fhir


def access_record(request: Request) -> AccessRecord:
    """The audit record of this request (created by the gateway middleware)."""
    state = request.scope.setdefault("state", {})
    access = state.get("access")
    if not isinstance(access, AccessRecord):  # a request that did not pass the gateway
        access = AccessRecord("-", request.method, request.url.path)
        state["access"] = access
    return access


async def public(request: Request) -> Call:
    """A route anyone may call (the CapabilityStatement): no token needed."""
    return Call(request.app.state.ctx, access_record(request), None)


def require(resource_type: str, access: Access) -> Callable[[Request], Awaitable[Call]]:
    """A dependency: the caller must hold a bearer credential (401 otherwise) with a scope
    granting ``access`` on ``resource_type`` (403 otherwise).

    Checking a credential is CPU work on the event loop; only a JWKS URL's key refresh
    (every 5 minutes) does network I/O there.
    """

    async def check(request: Request) -> Call:
        ctx: ApiContext = request.app.state.ctx
        record = access_record(request)
        principal = ctx.auth.authenticate(request.headers.get("authorization"))
        record.agent = principal.name
        record.agent_kind = principal.kind
        if not principal.allows(resource_type, access):
            raise forbidden(principal, resource_type, access)
        return Call(ctx, record, principal)

    check.__name__ = f"require_{resource_type}_{access}"
    return check


def base_url(request: Request, settings: FhirSettings) -> str:
    """The FHIR base URL for links: fhir.base_url, or this request's origin + /fhir."""
    if settings.base_url:
        return settings.base_url
    return str(request.base_url).rstrip("/") + "/fhir"
