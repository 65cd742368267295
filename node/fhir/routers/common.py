"""What every resource router shares: reads, searches, request bodies, the read/search router."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Path, Request, Response

from node.fhir.deps import Call, base_url, require
from node.fhir.errors import FhirError, bad_request, not_found
from node.fhir.resources import ResourceInvalid, validate
from node.fhir.responses import FhirResponse, bundle_text, json_response, resource_response
from node.fhir.search import (
    CONTROL_PARAMS,
    SEARCH_PARAMS,
    Condition,
    parse_count,
    parse_offset,
    parse_query,
)
from node.fhir.store import FhirStore, StoredResource

ID_PATTERN: Final = r"^[A-Za-z0-9\-\.]{1,64}$"
_ID: Final = re.compile(ID_PATTERN)
_JSON_TYPES: Final = ("application/fhir+json", "application/json", "application/json+fhir")

ResourceId = Annotated[
    str, Path(description="Logical id of the resource", pattern=ID_PATTERN, max_length=64)
]


def check_id(resource_id: str) -> str:
    if not _ID.match(resource_id):
        raise bad_request(f"{resource_id[:80]!r} is not a FHIR id ([A-Za-z0-9-.]{{1,64}})")
    return resource_id


def read(store: FhirStore, resource_type: str, resource_id: str) -> StoredResource:
    stored = store.get(resource_type, check_id(resource_id))
    if stored is None:
        raise not_found(f"{resource_type}/{resource_id} is not known")
    return stored


async def json_body(request: Request, resource_type: str) -> dict[str, Any]:
    """The request body as a resource of ``resource_type``, validated with fhir.resources.

    415 for a body that is not FHIR JSON, 400 for invalid JSON, a wrong resourceType or a
    resource fhir.resources refuses.
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in _JSON_TYPES:
        raise FhirError(
            415,
            f"the body must be application/fhir+json (got {ctype or 'no Content-Type'})",
            code="not-supported",
        )
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("the body is not usable JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object (a FHIR resource)")
    if data.get("resourceType") != resource_type:
        raise bad_request(
            f"the body must be a {resource_type} resource, not {data.get('resourceType')!r}"
        )
    try:
        return validate(data)
    except ResourceInvalid as exc:
        raise bad_request(str(exc)) from None


def _query_items(request: Request) -> list[tuple[str, str]]:
    return list(request.query_params.multi_items())


def _lenient(request: Request) -> bool:
    return "handling=lenient" in request.headers.get("prefer", "").replace(" ", "").lower()


def include_targets(
    store: FhirStore, resource_type: str, includes: Sequence[str], page: Sequence[StoredResource]
) -> list[StoredResource]:
    """Resources named by ``_include=<Type>:<reference param>`` for a page of matches."""
    params = []
    for inc in includes:
        rtype, _, name = inc.partition(":")
        param = SEARCH_PARAMS.get(resource_type, {}).get(name)
        if rtype != resource_type or param is None or param.type != "reference":
            refs = [
                f"{resource_type}:{p.name}"
                for p in SEARCH_PARAMS.get(resource_type, {}).values()
                if p.type == "reference" and p.name not in ("subject", "patient")
            ]
            raise bad_request(
                f"_include={inc!r} is not supported; supported: {', '.join(sorted(set(refs)))}"
            )
        params.append(param.index)
    return store.referenced(resource_type, [p.id for p in page], params)


def searchset(
    request: Request,
    call: Call,
    resource_type: str,
    transform: Callable[[StoredResource], StoredResource] | None = None,
    where: Sequence[Condition] = (),
) -> Response:
    """Run a search from the query string and answer a searchset Bundle with paging links
    (blocking: call it in a database thread).

    ``transform`` rewrites each match before it is served (Subscription header masking);
    ``where`` are conditions the server adds (a Subscription: its owner's only).
    """
    store, settings, access = call.store, call.settings, call.access
    items = _query_items(request)
    conditions = [*parse_query(resource_type, items, lenient=_lenient(request)), *where]
    single = {k: v for k, v in items if k in CONTROL_PARAMS}
    for key in ("_count", "_offset"):
        if sum(1 for k, _ in items if k == key) > 1:
            raise bad_request(f"{key} may be given once")
    fmt = single.get("_format")
    if fmt is not None and fmt not in ("json", "application/json", "application/fhir+json"):
        raise FhirError(406, f"_format={fmt!r} is not supported: only JSON", code="not-supported")
    count = parse_count(single.get("_count"), settings.page_size, settings.max_page_size)
    offset = parse_offset(single.get("_offset"))
    includes = [v for k, v in items if k == "_include"]
    total, page = store.search(resource_type, conditions, count=count, offset=offset)
    included = include_targets(store, resource_type, includes, page) if includes else []
    # what is added to the matches is scope-checked like a direct read
    disclosed = call.readable(included)
    if transform is not None:
        page = [transform(p) for p in page]
    access.interaction = "search-type"
    access.resource_type = resource_type
    access.query = str(request.url.query)
    access.returned([*page, *disclosed.resources])
    base = base_url(request, settings)
    text = bundle_text(
        base, resource_type, items, total, page, count, offset, disclosed.resources,
        warning=disclosed.warning,
    )  # fmt: skip
    return json_response(text)


def search_parameters_openapi(resource_type: str) -> list[dict[str, Any]]:
    """OpenAPI query parameters of a search (from the search registry)."""
    out: list[dict[str, Any]] = []
    seen = set()
    for key, p in SEARCH_PARAMS[resource_type].items():
        if key in seen:
            continue
        seen.add(key)
        schema: dict[str, Any] = {"type": "string"}
        if p.type == "date":
            schema["example"] = "ge2024-01-01"
        out.append(
            {
                "name": key,
                "in": "query",
                "required": False,
                "description": p.documentation,
                "schema": schema,
            }
        )
    out.append(
        {
            "name": "_count",
            "in": "query",
            "required": False,
            "description": "Page size (0 = only the total)",
            "schema": {"type": "integer", "minimum": 0},
        }
    )
    out.append(
        {
            "name": "_offset",
            "in": "query",
            "required": False,
            "description": "Paging offset (as in the next links)",
            "schema": {"type": "integer", "minimum": 0},
        }
    )
    refs = [
        f"{resource_type}:{p.name}"
        for p in SEARCH_PARAMS[resource_type].values()
        if p.type == "reference" and p.name not in ("subject", "patient")
    ]
    if refs:
        out.append(
            {
                "name": "_include",
                "in": "query",
                "required": False,
                "description": "Also return referenced resources",
                "schema": {"type": "string", "enum": sorted(set(refs))},
            }
        )
    return out


FHIR_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    400: {"description": "OperationOutcome: invalid request"},
    401: {"description": "OperationOutcome: no or invalid bearer token"},
    403: {"description": "OperationOutcome: the token lacks the scope"},
    404: {"description": "OperationOutcome: not found"},
}


def resource_router(
    resource_type: str,
    *,
    transform: Callable[[StoredResource], StoredResource] | None = None,
) -> APIRouter:
    """A router with read (``GET /Type/{id}``) and search (``GET /Type``) of a type."""
    router = APIRouter(tags=[resource_type])
    # defaults, not Annotated aliases: annotations are strings here, resolved from globals
    read_scope = Depends(require(resource_type, "r"))
    search_scope = Depends(require(resource_type, "s"))

    async def read_route(resource_id: ResourceId, call: Call = read_scope) -> Response:
        call.access.interaction = "read"
        call.access.resource_type = resource_type
        stored = await call.ctx.read(read, call.store, resource_type, resource_id)
        call.access.returned([stored])
        return resource_response(transform(stored) if transform else stored)

    read_route.__doc__ = f"Read a {resource_type} by id."
    router.add_api_route(
        f"/{resource_type}/{{resource_id}}",
        read_route,
        methods=["GET"],
        response_class=FhirResponse,
        responses=FHIR_RESPONSES,
        summary=f"read {resource_type}",
        operation_id=f"read_{resource_type}",
    )

    async def search_route(request: Request, call: Call = search_scope) -> Response:
        return await call.ctx.read(searchset, request, call, resource_type, transform)

    search_route.__doc__ = f"Search {resource_type} (a searchset Bundle, paged)."
    router.add_api_route(
        f"/{resource_type}",
        search_route,
        methods=["GET"],
        response_class=FhirResponse,
        responses=FHIR_RESPONSES,
        summary=f"search {resource_type}",
        operation_id=f"search_{resource_type}",
        openapi_extra={"parameters": search_parameters_openapi(resource_type)},
    )
    return router
