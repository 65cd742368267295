"""What no other route serves: unknown resource types (404) and interactions this server
does not support on a known type (405 with an ``Allow`` header naming the methods the
path does serve), both as OperationOutcome. Included last."""

from __future__ import annotations

from fastapi import APIRouter, Request

from node.fhir.errors import FhirError
from node.fhir.routers.metadata import INTERACTIONS

router = APIRouter(include_in_schema=False)

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

#: Paths under the base that are not resource types, and the methods they serve.
_OTHER_PATHS = {"metadata": ("GET",), ".well-known": ("GET",), "_async": ("GET",)}


def allowed_methods(resource_type: str, rest: str | None) -> list[str]:
    """The methods served at ``[base]/[type]`` (rest None) or ``[base]/[type]/[rest]``."""
    interactions = INTERACTIONS[resource_type]
    parts = [] if rest is None else rest.split("/")
    wanted: dict[str, bool] = {}
    if not parts:
        wanted = {"GET": "search-type" in interactions, "POST": "create" in interactions}
    elif parts == ["_search"]:
        wanted = {"POST": "search-type" in interactions}
    elif len(parts) == 1:
        wanted = {"GET": "read" in interactions, "DELETE": "delete" in interactions}
    elif len(parts) in (2, 3) and parts[1] == "_history":
        wanted = {"GET": "vread" in interactions}
    elif len(parts) == 2 and parts[1] == "$ask":
        wanted = {"POST": resource_type == "DiagnosticReport"}
    return [m for m, ok in wanted.items() if ok]


def _refuse(request: Request, resource_type: str, rest: str | None = None) -> FhirError:
    if resource_type in _OTHER_PATHS:
        methods = list(_OTHER_PATHS[resource_type])
        return FhirError(
            405,
            f"{request.method} {request.url.path} is not supported; {', '.join(methods)} is",
            code="not-supported",
            headers={"Allow": ", ".join(methods)},
        )
    if resource_type not in INTERACTIONS:
        known = ", ".join(sorted(INTERACTIONS))
        return FhirError(
            404,
            f"unknown or unsupported resource type {resource_type[:64]!r}; this server "
            f"serves {known} (see /fhir/metadata)",
            code="not-supported",
        )
    allowed = ", ".join(INTERACTIONS[resource_type])
    methods = allowed_methods(resource_type, rest)
    return FhirError(
        405,
        f"{request.method} {request.url.path} is not supported; {resource_type} supports: "
        f"{allowed} (see /fhir/metadata)",
        code="not-supported",
        headers={"Allow": ", ".join(methods)},
    )


@router.api_route("/{resource_type}", methods=_METHODS)
def type_level(resource_type: str, request: Request) -> None:
    raise _refuse(request, resource_type)


@router.api_route("/{resource_type}/{rest:path}", methods=_METHODS)
def instance_level(resource_type: str, rest: str, request: Request) -> None:
    raise _refuse(request, resource_type, rest)
