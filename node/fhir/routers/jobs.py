"""``GET /fhir/_async/{id}``: the status of an asynchronous follow-up question.

202 (``X-Progress: queued|running``, ``Retry-After``) while it runs; 200 with a collection
Bundle (the answer Communication first, then the report and Observations it is about)
when it is answered, or when it could not be (the answer then says why, status not-done).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from node.fhir.deps import Call, require
from node.fhir.errors import not_found
from node.fhir.followups import followup
from node.fhir.questions import job_response
from node.fhir.responses import FhirResponse
from node.fhir.routers.common import FHIR_RESPONSES, ResourceId, check_id

router = APIRouter(tags=["async"])


@router.get(
    "/_async/{resource_id}",
    response_class=FhirResponse,
    responses={**FHIR_RESPONSES, 202: {"description": "OperationOutcome: still running"}},
    summary="poll a follow-up question",
    operation_id="poll_async",
)
async def poll(
    resource_id: ResourceId,
    request: Request,
    call: Annotated[Call, Depends(require("Communication", "r"))],
) -> Response:
    """202 while the question is queued or running; 200 + the answer Bundle when done."""
    call.access.interaction = "read"
    call.access.resource_type = "Communication"
    job = await call.ctx.db(followup, call.store, check_id(resource_id))
    if job is None:
        raise not_found(f"no follow-up question {resource_id}")
    call.access.entities = [f"Communication/{job.id}"]
    return await call.ctx.db(job_response, request, call, job)
