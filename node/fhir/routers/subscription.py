"""Subscription (R4 rest-hook): create, read, search, delete.

Criteria are searches on DiagnosticReport or Communication with the parameters the
server supports (``DiagnosticReport?status=preliminary``, ``Communication?category=answer``);
the channel is ``rest-hook`` to an http(s) endpoint (within
``fhir.subscription_allowed_endpoints`` when that is set). With an empty payload the
endpoint gets an empty POST; with ``application/fhir+json`` a PUT of the resource to
``[endpoint]/[type]/[id]``. The server activates a Subscription on creation; deliveries
that keep failing end dead (``medgemma-node status``) and set the Subscription to error.
Channel header values (credentials for the endpoint) are never served back.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any, Final

from fastapi import Depends, Request, Response

from node.fhir.deps import Call, base_url, require
from node.fhir.errors import not_found, unprocessable
from node.fhir.resources import ResourceInvalid, validate
from node.fhir.responses import FhirResponse, resource_response
from node.fhir.routers.common import (
    FHIR_RESPONSES,
    ResourceId,
    check_id,
    json_body,
    resource_router,
)
from node.fhir.store import StoredResource, new_id
from node.fhir.subscriptions import parse_criteria
from node.settings import FhirSettings

PAYLOADS: Final = ("", "application/fhir+json", "application/json")


def mask_headers(stored: StoredResource) -> StoredResource:
    """The Subscription with channel header values replaced by ***."""
    data = json.loads(stored.body)
    channel = data.get("channel") or {}
    if channel.get("header"):
        channel["header"] = [f"{h.partition(':')[0]}: ***" for h in channel["header"]]
        return replace(stored, body=json.dumps(data, ensure_ascii=False, separators=(",", ":")))
    return stored


router = resource_router("Subscription", transform=mask_headers)

SUBSCRIPTION_BODY: Final[dict[str, Any]] = {
    "required": True,
    "content": {
        "application/fhir+json": {
            "schema": {
                "type": "object",
                "required": ["resourceType", "status", "criteria", "reason", "channel"],
                "properties": {
                    "resourceType": {"type": "string", "enum": ["Subscription"]},
                    "status": {"type": "string", "enum": ["requested", "active"]},
                    "reason": {"type": "string"},
                    "criteria": {
                        "type": "string",
                        "example": "DiagnosticReport?status=preliminary",
                    },
                    "channel": {
                        "type": "object",
                        "required": ["type"],
                        "properties": {
                            "type": {"type": "string", "enum": ["rest-hook"]},
                            "endpoint": {"type": "string"},
                            "payload": {"type": "string"},
                            "header": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                },
            }
        }
    },
}


def check_subscription(sub: dict[str, Any], settings: FhirSettings) -> dict[str, Any]:
    """The Subscription as stored (active, server id); FhirError for what is not supported."""
    parse_criteria(str(sub.get("criteria", "")))
    channel = sub.get("channel") or {}
    if channel.get("type") != "rest-hook":
        raise unprocessable(f"only rest-hook channels are supported, not {channel.get('type')!r}")
    endpoint = str(channel.get("endpoint") or "")
    if not endpoint.startswith(("http://", "https://")):
        raise unprocessable("channel.endpoint must be an http(s) URL")
    allowed = settings.subscription_allowed_endpoints
    if allowed and not any(endpoint.startswith(prefix) for prefix in allowed):
        raise unprocessable(
            "channel.endpoint is not allowed on this node (fhir.subscription_allowed_endpoints)"
        )
    if str(channel.get("payload") or "") not in PAYLOADS:
        raise unprocessable(
            f"channel.payload must be empty or application/fhir+json, not {channel['payload']!r}"
        )
    for header in channel.get("header", []):
        if ":" not in header or "\n" in header or "\r" in header:
            raise unprocessable("each channel.header must be one 'Name: value' line")
    if sub.get("status") not in ("requested", "active"):
        raise unprocessable("a new Subscription's status must be requested (or active)")
    stored = dict(sub)
    stored.pop("meta", None)
    stored.update(id=new_id(), status="active")
    stored.pop("error", None)
    try:
        return validate(stored)
    except ResourceInvalid as exc:
        raise unprocessable(str(exc)) from None


@router.post(
    "/Subscription",
    response_class=FhirResponse,
    status_code=201,
    responses=FHIR_RESPONSES,
    summary="create Subscription",
    operation_id="create_Subscription",
    openapi_extra={"requestBody": SUBSCRIPTION_BODY},
)
async def create_subscription(
    request: Request, call: Annotated[Call, Depends(require("Subscription", "c"))]
) -> Response:
    """Create a rest-hook Subscription; the server makes it active."""
    call.access.interaction = "create"
    call.access.resource_type = "Subscription"
    sub = check_subscription(await json_body(request, "Subscription"), call.settings)
    stored = await call.ctx.db(call.store.put, sub)
    call.access.entities = [f"Subscription/{stored.id}"]
    return resource_response(mask_headers(stored), 201, base=base_url(request, call.settings))


@router.delete(
    "/Subscription/{resource_id}",
    status_code=204,
    responses=FHIR_RESPONSES,
    summary="delete Subscription",
    operation_id="delete_Subscription",
)
async def delete_subscription(
    resource_id: ResourceId, call: Annotated[Call, Depends(require("Subscription", "d"))]
) -> Response:
    """Delete a Subscription (its pending deliveries are dropped)."""
    call.access.interaction = "delete"
    call.access.resource_type = "Subscription"
    call.access.entities = [f"Subscription/{resource_id}"]
    if not await call.ctx.db(call.store.delete, "Subscription", check_id(resource_id)):
        raise not_found(f"Subscription/{resource_id} is not known")
    return Response(status_code=204)
