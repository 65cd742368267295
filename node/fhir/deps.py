"""FastAPI dependencies of the FHIR API (``Annotated[..., Depends(...)]``).

Each route takes one dependency, a :class:`Call`: the app's shared context, this
request's audit record and, for every route but the public ones, the authenticated
caller whose scopes were checked. One async dependency per request keeps FastAPI's
dependency resolution and thread hops off the hot path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import Request

from node.dispatch import Dispatcher
from node.fhir.audit import AccessRecord, AuditTrail
from node.fhir.auth import Access, Authenticator, Principal, forbidden, scope_needed
from node.fhir.followups import FollowupPublisher, QuestionWriter
from node.fhir.store import FhirStore, StoredResource
from node.settings import FhirSettings, Settings

T = TypeVar("T")

_INTERACTIONS: Final[dict[str, str]] = {
    "c": "create", "r": "read", "s": "search-type", "u": "update", "d": "delete",
}  # fmt: skip
#: An id worth naming in an AuditEvent (the routes refuse others with a 400 anyway).
_TRIED_ID: Final = re.compile(r"^[A-Za-z0-9\-\.]{1,64}$")

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

    def readable(self, resources: Iterable[StoredResource]) -> Disclosure:
        """Of resources a response would carry besides what was asked for (``_include``
        targets, the report and Observations of an answer Bundle), those the caller's
        scopes let it read, as a direct read would; the others are left out, by type."""
        kept: list[StoredResource] = []
        withheld: set[str] = set()
        for r in resources:
            if self.principal is not None and self.principal.allows(r.resource_type, "r"):
                kept.append(r)
            else:
                withheld.add(r.resource_type)
        return Disclosure(kept, tuple(sorted(withheld)))


@dataclass(frozen=True)
class Disclosure:
    """What a response may carry of some resources (:meth:`Call.readable`)."""

    resources: list[StoredResource]
    withheld: tuple[str, ...]  # resource types left out: the token may not read them

    @property
    def warning(self) -> str:
        """What the response's OperationOutcome says: the types left out and the scopes
        they need; "" when nothing was left out."""
        if not self.withheld:
            return ""
        needs = ", ".join(scope_needed(t, "r") for t in self.withheld)
        return (
            f"{', '.join(self.withheld)} resources were left out of this response: the "
            f"token's scopes do not grant reading them (needs {needs})"
        )


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
        # what was tried, so a refused access (401/403) is audited with it too
        record.interaction = _INTERACTIONS[access]
        record.resource_type = resource_type
        tried = request.path_params.get("resource_id")
        if isinstance(tried, str) and access != "c" and _TRIED_ID.match(tried):
            record.entities = [f"{resource_type}/{tried}"]
        principal = ctx.auth.authenticate(request.headers.get("authorization"))
        record.agent = principal.name
        record.agent_kind = principal.kind
        if not principal.allows(resource_type, access):
            raise forbidden(principal, resource_type, access)
        return Call(ctx, record, principal)

    check.__name__ = f"require_{resource_type}_{access}"
    return check


def base_url(request: Request, settings: FhirSettings) -> str:
    """The FHIR base URL for links and Location headers.

    ``fhir.base_url`` when configured; else, for a request that came through one of
    ``fhir.trusted_proxies``, the origin its ``Forwarded`` or ``X-Forwarded-Host`` /
    ``X-Forwarded-Proto`` headers name; else the address the API listens on (the local end
    of the connection). Never the Host header: a client must not choose where the links
    it is given (and passes on) point.
    """
    if settings.base_url:
        return settings.base_url
    origin = None
    if _from_trusted_proxy(request, tuple(settings.trusted_proxies)):
        origin = _forwarded_origin(request)
    return (origin or _own_origin(request)) + "/fhir"


@lru_cache(maxsize=8)
def _networks(
    proxies: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def _from_trusted_proxy(request: Request, proxies: tuple[str, ...]) -> bool:
    if not proxies or request.client is None:
        return False
    try:
        peer = ipaddress.ip_address(request.client.host)
    except ValueError:
        return False
    return any(peer in net for net in _networks(proxies))


#: A host name or IP literal with an optional port, as a proxy may pass it on.
_HOST: Final = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$"
)


def _last(values: Sequence[str]) -> str:
    """The last comma-separated item of a header (the hop next to us), unquoted."""
    items = [v.strip() for value in values for v in value.split(",")]
    return items[-1].strip('"') if items else ""


def _forwarded_origin(request: Request) -> str | None:
    """``proto://host`` from the last Forwarded element, or X-Forwarded-Host/-Proto (what
    the proxy next to us set); None when absent or not a plausible host and scheme."""
    host = proto = ""
    forwarded = request.headers.getlist("forwarded")
    if forwarded:
        element = [e for value in forwarded for e in value.split(",")][-1]
        for pair in element.split(";"):
            key, _, value = pair.partition("=")
            key, value = key.strip().lower(), value.strip().strip('"')
            if key == "host":
                host = value
            elif key == "proto":
                proto = value.lower()
    if not host:
        host = _last(request.headers.getlist("x-forwarded-host"))
        proto = proto or _last(request.headers.getlist("x-forwarded-proto")).lower()
    proto = proto or request.url.scheme
    if not host or len(host) > 255 or not _HOST.match(host) or proto not in ("http", "https"):
        return None
    return f"{proto}://{host}"


def _own_origin(request: Request) -> str:
    """``scheme://address:port`` of the socket the request arrived on (the API's own
    listening address; its host part is never taken from the request's headers)."""
    scheme = "https" if request.url.scheme == "https" else "http"
    server = request.scope.get("server")
    if not server:  # a Unix socket: no address to name
        return f"{scheme}://localhost"
    host, port = str(server[0]), server[1]
    if ":" in host:
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"
