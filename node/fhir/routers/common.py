"""What every resource router shares: reads, searches, request bodies, the read/search router."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Final
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Path, Request, Response

from node.fhir.deps import Call, base_url, require
from node.fhir.errors import FhirError, bad_request, not_found
from node.fhir.resources import ResourceInvalid, validate
from node.fhir.responses import (
    FhirResponse,
    bundle_text,
    history_text,
    json_response,
    resource_response,
)
from node.fhir.search import (
    CONTROL_PARAMS,
    REVINCLUDES,
    SEARCH_PARAMS,
    SORT_KEYS,
    Condition,
    Cursor,
    applied_items,
    parse_count,
    parse_offset,
    parse_query,
    parse_revinclude,
    parse_sort,
    parse_summary,
)
from node.fhir.store import NO_HISTORY, FhirStore, StoredResource

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


async def json_body(
    request: Request, resource_type: str, plain: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any]:
    """The request body as a resource of ``resource_type``, validated with fhir.resources.

    415 for a body that is not FHIR JSON, 400 for invalid JSON, a wrong resourceType or a
    resource fhir.resources refuses. ``plain``: a cheaper check of a shape known to be
    valid (a body it passes skips the model; others are validated by it).
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
    if plain is not None and plain(data):
        return data
    try:
        return validate(data)
    except ResourceInvalid as exc:
        raise bad_request(str(exc)) from None


def _query_items(request: Request) -> list[tuple[str, str]]:
    return list(request.query_params.multi_items())


async def form_items(request: Request) -> list[tuple[str, str]]:
    """The parameters of ``POST [type]/_search``: the query string and the
    application/x-www-form-urlencoded body (415 for another body)."""
    raw = await request.body()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if raw and ctype != "application/x-www-form-urlencoded":
        raise FhirError(
            415,
            "POST _search takes an application/x-www-form-urlencoded body "
            f"(got {ctype or 'no Content-Type'})",
            code="not-supported",
        )
    try:
        body = parse_qsl(raw.decode(), keep_blank_values=True)
    except UnicodeDecodeError:
        raise bad_request("the _search body is not UTF-8 form data") from None
    return _query_items(request) + body


def not_modified(request: Request, stored: StoredResource) -> Response | None:
    """304 when If-None-Match names the resource's current ETag (or is ``*``)."""
    wanted = request.headers.get("if-none-match")
    if not wanted:
        return None
    tags = {t.strip().removeprefix("W/") for t in wanted.split(",")}
    if "*" in tags or stored.etag.removeprefix("W/") in tags:
        return Response(status_code=304, headers={"ETag": stored.etag})
    return None


def revinclude_sources(
    store: FhirStore, resource_type: str, values: Sequence[str], page: Sequence[StoredResource]
) -> list[StoredResource]:
    """Resources named by ``_revinclude=<Type>:<reference param>``: those that reference a
    match of the page (Provenance of a report, answers about it)."""
    out: list[StoredResource] = []
    for value in values:
        source, index = parse_revinclude(resource_type, value)
        out += store.referencing(source, index, page)
    return list({(r.resource_type, r.id): r for r in out}.values())


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
    items: list[tuple[str, str]] | None = None,
) -> Response:
    """Run a search from the query string (or ``items``: POST _search) and answer a
    searchset Bundle with paging links (blocking: call it in a database thread).

    The self link shows the parameters applied (not those ``handling=lenient`` ignored);
    next links carry a :class:`~node.fhir.search.Cursor` (keyset paging within a snapshot).

    ``transform`` rewrites each match before it is served (Subscription header masking);
    ``where`` are conditions the server adds (a Subscription: its owner's only).
    """
    store, settings, access = call.store, call.settings, call.access
    items = _query_items(request) if items is None else items
    applied = applied_items(resource_type, items)
    conditions = [*parse_query(resource_type, items, lenient=_lenient(request)), *where]
    single = {k: v for k, v in items if k in CONTROL_PARAMS}
    for key in ("_count", "_offset", "_sort", "_summary", "_cursor"):
        if sum(1 for k, _ in items if k == key) > 1:
            raise bad_request(f"{key} may be given once")
    fmt = single.get("_format")
    if fmt is not None and fmt not in ("json", "application/json", "application/fhir+json"):
        raise FhirError(406, f"_format={fmt!r} is not supported: only JSON", code="not-supported")
    count = parse_count(single.get("_count"), settings.page_size, settings.max_page_size)
    if parse_summary(single.get("_summary")):
        count = 0
    sort = parse_sort(resource_type, single.get("_sort"))
    after = Cursor.decode(single["_cursor"], len(sort)) if "_cursor" in single else None
    offset = parse_offset(single.get("_offset"))
    includes = [v for k, v in items if k == "_include"]
    revincludes = [v for k, v in items if k == "_revinclude"]
    found = store.search_page(
        resource_type, conditions, count=count, sort=sort, offset=offset, after=after
    )
    page = found.resources
    included = include_targets(store, resource_type, includes, page) if includes else []
    included += revinclude_sources(store, resource_type, revincludes, page)
    # what is added to the matches is scope-checked like a direct read
    disclosed = call.readable(included)
    if transform is not None:
        page = [transform(p) for p in page]
    access.interaction = "search-type"
    access.resource_type = resource_type
    access.query = urlencode(items)
    access.returned([*page, *disclosed.resources])
    base = base_url(request, settings)

    def url(params: list[tuple[str, str]]) -> str:
        return f"{base}/{resource_type}" + (f"?{urlencode(params)}" if params else "")

    links = [("self", url(applied))]
    if count > 0:
        paging = [(k, v) for k, v in applied if k not in ("_count", "_offset", "_cursor")]
        paging.append(("_count", str(count)))
        links.append(("first", url(paging)))
        if found.next is not None:
            links.append(("next", url([*paging, ("_cursor", found.next.encode())])))
    text = bundle_text(
        base, resource_type, items, found.total, page, count, offset, disclosed.resources,
        links=links, warning=disclosed.warning,
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
            "description": "Paging offset",
            "schema": {"type": "integer", "minimum": 0},
        }
    )
    sorts = [k for k in SORT_KEYS if k == "_lastUpdated" or k in SEARCH_PARAMS[resource_type]]
    out.append(
        {
            "name": "_sort",
            "in": "query",
            "required": False,
            "description": "Sort order (- for descending); default -_lastUpdated",
            "schema": {"type": "string", "enum": sorts + [f"-{k}" for k in sorts]},
        }
    )
    out.append(
        {
            "name": "_summary",
            "in": "query",
            "required": False,
            "description": "count: only the total",
            "schema": {"type": "string", "enum": ["count", "false"]},
        }
    )
    if REVINCLUDES.get(resource_type):
        out.append(
            {
                "name": "_revinclude",
                "in": "query",
                "required": False,
                "description": "Also return resources that reference the matches",
                "schema": {"type": "string", "enum": list(REVINCLUDES[resource_type])},
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
    search_where: Callable[[Call], Sequence[Condition]] | None = None,
) -> APIRouter:
    """A router with read (``GET /Type/{id}``, If-None-Match: 304), vread and history
    (``GET /Type/{id}/_history[/{vid}]``, not for types in ``NO_HISTORY``) and search
    (``GET /Type``, ``POST /Type/_search``) of a type.

    ``search_where``: conditions the server adds to every search of this caller."""
    router = APIRouter(tags=[resource_type])
    # defaults, not Annotated aliases: annotations are strings here, resolved from globals
    read_scope = Depends(require(resource_type, "r"))
    search_scope = Depends(require(resource_type, "s"))
    shown = transform or (lambda stored: stored)

    async def read_route(
        resource_id: ResourceId, request: Request, call: Call = read_scope
    ) -> Response:
        call.access.interaction = "read"
        call.access.resource_type = resource_type
        stored = await call.ctx.read(read, call.store, resource_type, resource_id)
        call.access.returned([stored])
        return not_modified(request, stored) or resource_response(shown(stored))

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

    if resource_type not in NO_HISTORY:

        async def vread_route(
            resource_id: ResourceId,
            version_id: Annotated[int, Path(ge=1, le=2**31 - 1)],
            request: Request,
            call: Call = read_scope,
        ) -> Response:
            call.access.interaction = "vread"
            call.access.resource_type = resource_type
            stored = await call.ctx.read(
                call.store.version, resource_type, check_id(resource_id), version_id
            )
            if stored is None:
                await call.ctx.read(read, call.store, resource_type, resource_id)  # 404 if none
                raise not_found(f"{resource_type}/{resource_id} has no version {version_id}")
            call.access.returned([stored])
            return not_modified(request, stored) or resource_response(shown(stored))

        vread_route.__doc__ = f"Read one version of a {resource_type}."
        router.add_api_route(
            f"/{resource_type}/{{resource_id}}/_history/{{version_id}}",
            vread_route,
            methods=["GET"],
            response_class=FhirResponse,
            responses=FHIR_RESPONSES,
            summary=f"vread {resource_type}",
            operation_id=f"vread_{resource_type}",
        )

        async def history_route(
            resource_id: ResourceId, request: Request, call: Call = read_scope
        ) -> Response:
            call.access.interaction = "history-instance"
            call.access.resource_type = resource_type
            versions = await call.ctx.read(call.store.history, resource_type, resource_id)
            if not versions:
                raise not_found(f"{resource_type}/{resource_id} is not known")
            call.access.returned(versions)
            base = base_url(request, call.settings)
            return json_response(history_text(base, [shown(v) for v in versions]))

        history_route.__doc__ = f"The versions of a {resource_type}, newest first."
        router.add_api_route(
            f"/{resource_type}/{{resource_id}}/_history",
            history_route,
            methods=["GET"],
            response_class=FhirResponse,
            responses=FHIR_RESPONSES,
            summary=f"history {resource_type}",
            operation_id=f"history_{resource_type}",
        )

    async def search_route(request: Request, call: Call = search_scope) -> Response:
        where = search_where(call) if search_where else ()
        return await call.ctx.read(searchset, request, call, resource_type, transform, where)

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

    async def post_search_route(request: Request, call: Call = search_scope) -> Response:
        items = await form_items(request)
        where = search_where(call) if search_where else ()
        return await call.ctx.read(searchset, request, call, resource_type, transform, where, items)

    post_search_route.__doc__ = (
        f"Search {resource_type} with the parameters in an application/x-www-form-urlencoded "
        "body (same result as GET)."
    )
    router.add_api_route(
        f"/{resource_type}/_search",
        post_search_route,
        methods=["POST"],
        response_class=FhirResponse,
        responses=FHIR_RESPONSES,
        summary=f"search {resource_type} (POST)",
        operation_id=f"search_post_{resource_type}",
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {"type": "object", "additionalProperties": {"type": "string"}}
                    }
                },
            }
        },
    )
    return router
