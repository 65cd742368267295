"""DiagnosticReport: read, search, and ``$ask`` (a follow-up question about the pre-read)."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import Depends, Request, Response

from node.fhir.deps import Call, require
from node.fhir.questions import ask, plain_ask_parameters, question_from_parameters
from node.fhir.responses import FhirResponse
from node.fhir.routers.common import FHIR_RESPONSES, ResourceId, json_body, resource_router

router = resource_router("DiagnosticReport")

PREFER_HEADER: Final[dict[str, Any]] = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "description": "respond-sync (optionally wait=N seconds) to wait for the answer",
    "schema": {"type": "string", "enum": ["respond-async", "respond-sync, wait=0.2"]},
}

ASK_BODY: Final[dict[str, Any]] = {
    "required": True,
    "content": {
        "application/fhir+json": {
            "schema": {
                "type": "object",
                "required": ["resourceType", "parameter"],
                "properties": {
                    "resourceType": {"type": "string", "enum": ["Parameters"]},
                    "parameter": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {
                                    "type": "string",
                                    "enum": ["question", "anchor", "language"],
                                },
                                "valueString": {"type": "string"},
                                "valueCode": {"type": "string"},
                                "valueReference": {
                                    "type": "object",
                                    "properties": {"reference": {"type": "string"}},
                                },
                            },
                        },
                    },
                },
            },
            "example": {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "question", "valueString": "How large is A1?"},
                    {"name": "anchor", "valueString": "A1"},
                    {"name": "language", "valueCode": "en"},
                ],
            },
        }
    },
}


@router.post(
    "/DiagnosticReport/{resource_id}/$ask",
    response_class=FhirResponse,
    status_code=202,
    responses={**FHIR_RESPONSES, 200: {"description": "Bundle: the answer (respond-sync)"}},
    summary="ask a follow-up question",
    operation_id="ask_DiagnosticReport",
    openapi_extra={"requestBody": ASK_BODY, "parameters": [PREFER_HEADER]},
)
async def ask_report(
    resource_id: ResourceId,
    request: Request,
    call: Annotated[Call, Depends(require("Communication", "c"))],
) -> Response:
    """Ask a question about the pre-read: 202 + Content-Location, or the answer (sync)."""
    call.access.interaction = "operation"
    call.access.resource_type = "DiagnosticReport"
    params = await json_body(request, "Parameters", plain_ask_parameters)
    question = question_from_parameters(params)
    return await ask(request, call, resource_id, question)
