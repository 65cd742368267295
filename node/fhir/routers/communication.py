"""Communication: read, search, and create (a follow-up question from the RIS).

A Communication the RIS posts must be ``about`` one DiagnosticReport and hold the question
in ``payload.contentString``. It is a create (what FHIR client libraries expect): 201 with
the question Communication, Location, ETag; ``Prefer: return=minimal | representation |
OperationOutcome``; ``Prefer: respond-sync`` waits for the answer before the 201. The
node's answers are Communications with category ``answer``, ``inResponseTo`` the question:
``GET Communication?in-response-to=Communication/{id}`` (or a Subscription) finds them;
``$ask`` keeps the answer Bundle and the asynchronous 202 + poll.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import Depends, Request, Response

from node.fhir.deps import Call, require
from node.fhir.questions import create_question, question_from_communication
from node.fhir.responses import FhirResponse
from node.fhir.routers.common import FHIR_RESPONSES, json_body, resource_router

router = resource_router("Communication")

CREATE_PREFER_HEADER: Final[dict[str, Any]] = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "description": (
        "return=representation (default: the question), return=minimal (no body), "
        "return=OperationOutcome; respond-sync (optionally wait=N seconds) answers once "
        "the question is answered"
    ),
    "schema": {
        "type": "string",
        "enum": ["return=representation", "return=minimal", "return=OperationOutcome",
                 "respond-sync, wait=0.2"],
    },
}  # fmt: skip

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
    status_code=201,
    responses={
        **FHIR_RESPONSES,
        201: {
            "description": "the question Communication (or none, or an OperationOutcome, as "
            "Prefer: return= asks); Location: Communication/[id]/_history/1"
        },
    },
    summary="ask a follow-up question as a Communication (create)",
    operation_id="create_Communication",
    openapi_extra={"requestBody": COMMUNICATION_BODY, "parameters": [CREATE_PREFER_HEADER]},
)
async def create_communication(
    request: Request, call: Annotated[Call, Depends(require("Communication", "c"))]
) -> Response:
    """A question about a DiagnosticReport: 201 + Location; the answer comes in response."""
    call.access.interaction = "create"
    call.access.resource_type = "Communication"
    comm = await json_body(request, "Communication")
    report_id, question = question_from_communication(comm)
    return await create_question(request, call, report_id, question, extra=comm)
