"""Communication: read, search, and create (a follow-up question from the RIS).

A Communication the RIS posts must be ``about`` one DiagnosticReport and hold the question
in ``payload.contentString``; it is answered like ``$ask`` (202 + Content-Location, or the
answer Bundle with ``Prefer: respond-sync``). The node's answers are Communications with
category ``answer``, ``inResponseTo`` the question.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import Depends, Request, Response

from node.fhir.deps import Call, require
from node.fhir.questions import ask, question_from_communication
from node.fhir.responses import FhirResponse
from node.fhir.routers.common import FHIR_RESPONSES, json_body, resource_router
from node.fhir.routers.diagnostic_report import PREFER_HEADER

router = resource_router("Communication")

COMMUNICATION_BODY: Final[dict[str, Any]] = {
    "required": True,
    "content": {
        "application/fhir+json": {
            "schema": {
                "type": "object",
                "required": ["resourceType", "status", "about", "payload"],
                "properties": {
                    "resourceType": {"type": "string", "enum": ["Communication"]},
                    "status": {"type": "string", "enum": ["completed", "in-progress"]},
                    "language": {"type": "string"},
                    "about": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"reference": {"type": "string"}},
                        },
                    },
                    "payload": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"contentString": {"type": "string"}},
                        },
                    },
                },
            }
        }
    },
}


@router.post(
    "/Communication",
    response_class=FhirResponse,
    status_code=202,
    responses={**FHIR_RESPONSES, 200: {"description": "Bundle: the answer (respond-sync)"}},
    summary="ask a follow-up question as a Communication",
    operation_id="create_Communication",
    openapi_extra={"requestBody": COMMUNICATION_BODY, "parameters": [PREFER_HEADER]},
)
async def create_communication(
    request: Request, call: Annotated[Call, Depends(require("Communication", "c"))]
) -> Response:
    """A question about a DiagnosticReport: 202 + Content-Location, or the answer (sync)."""
    call.access.interaction = "create"
    call.access.resource_type = "Communication"
    comm = await json_body(request, "Communication")
    report_id, question = question_from_communication(comm)
    return await ask(request, call, report_id, question, extra=comm)
