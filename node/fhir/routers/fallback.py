"""What no other route serves: unknown resource types (404) and interactions this server
does not support on a known type (405), both as OperationOutcome. Included last."""

from __future__ import annotations

from fastapi import APIRouter, Request

from node.fhir.errors import FhirError
from node.fhir.routers.metadata import INTERACTIONS

router = APIRouter(include_in_schema=False)

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def _refuse(request: Request, resource_type: str) -> FhirError:
    if resource_type not in INTERACTIONS:
        known = ", ".join(sorted(INTERACTIONS))
        return FhirError(
            404,
            f"unknown or unsupported resource type {resource_type[:64]!r}; this server "
            f"serves {known} (see /fhir/metadata)",
            code="not-supported",
        )
    allowed = ", ".join(INTERACTIONS[resource_type])
    return FhirError(
        405,
        f"{request.method} {request.url.path} is not supported; {resource_type} supports: "
        f"{allowed} (see /fhir/metadata)",
        code="not-supported",
    )


@router.api_route("/{resource_type}", methods=_METHODS)
def type_level(resource_type: str, request: Request) -> None:
    raise _refuse(request, resource_type)


@router.api_route("/{resource_type}/{rest:path}", methods=_METHODS)
def instance_level(resource_type: str, rest: str, request: Request) -> None:
    raise _refuse(request, resource_type)
