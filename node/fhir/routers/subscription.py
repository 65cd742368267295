"""Subscription (R4 rest-hook): create, read, search, delete - each client its own.

Criteria are searches on DiagnosticReport or Communication with the parameters the
server supports (``DiagnosticReport?status=preliminary``, ``Communication?category=answer``);
the channel is ``rest-hook`` to an endpoint that ``fhir.subscription_allowed_endpoints``
allows (https; link-local, loopback and private addresses refused unless allowed:
:mod:`node.fhir.channel`). With an empty payload the endpoint gets an empty POST; with
``application/fhir+json`` a PUT of the resource to ``[endpoint]/[type]/[id]``. The server
activates a Subscription on creation; deliveries that keep failing end dead
(``medgemma-node status``) and set the Subscription to error.

A Subscription belongs to the client that created it (token name or JWT subject, kept as
a meta.tag that is never served): another client gets 404 on read and delete and does not
find it in searches. Channel header values are stored encrypted and served as ``***``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any, Final

import anyio.to_thread
from fastapi import APIRouter, Depends, Request, Response

from node.fhir.auth import Principal, forbidden
from node.fhir.channel import (
    ChannelKeyError,
    EndpointRefused,
    HeaderCipher,
    Resolver,
    check_endpoint,
    mask,
    resolve_host,
)
from node.fhir.codes import SUBSCRIPTION_OWNER_SYSTEM
from node.fhir.deps import Call, base_url, require
from node.fhir.errors import FhirError, not_found, unprocessable
from node.fhir.resources import ResourceInvalid, validate
from node.fhir.responses import FhirResponse, resource_response
from node.fhir.routers.common import (
    FHIR_RESPONSES,
    ResourceId,
    check_id,
    json_body,
    read,
    search_parameters_openapi,
    searchset,
)
from node.fhir.search import Condition, SearchParam
from node.fhir.store import FhirStore, StoredResource, new_id
from node.fhir.subscriptions import channel_cipher, parse_criteria
from node.settings import FhirSettings

PAYLOADS: Final = ("", "application/fhir+json", "application/json")

#: The index of meta.tag, read by the server's owner condition (not a client parameter).
_OWNER_PARAM: Final = SearchParam("_tag", "token", "_tag", "meta.tag (the owner)", standard=False)


def owner_of(principal: Principal) -> str:
    """The owner code of what this caller creates: ``token:<name>``, ``jwt:<subject>``."""
    return f"{principal.kind}:{principal.name}"


def _owner(stored: StoredResource) -> str | None:
    for tag in (stored.resource.get("meta") or {}).get("tag", []):
        if tag.get("system") == SUBSCRIPTION_OWNER_SYSTEM:
            return str(tag.get("code"))
    return None


def served(stored: StoredResource) -> StoredResource:
    """The Subscription as a client sees it: header values ``***``, no owner tag."""
    data = json.loads(stored.body)
    channel = data.get("channel") or {}
    if channel.get("header"):
        channel["header"] = mask(channel["header"])
    meta = data.get("meta") or {}
    tags = [t for t in meta.get("tag", []) if t.get("system") != SUBSCRIPTION_OWNER_SYSTEM]
    if tags:
        meta["tag"] = tags
    else:
        meta.pop("tag", None)
    return replace(stored, body=json.dumps(data, ensure_ascii=False, separators=(",", ":")))


def read_owned(store: FhirStore, resource_id: str, principal: Principal) -> StoredResource:
    """The caller's own Subscription; 404 for one another client owns (existence does not
    leak)."""
    stored = read(store, "Subscription", resource_id)
    if _owner(stored) != owner_of(principal):
        raise not_found(f"Subscription/{resource_id} is not known")
    return stored


def _principal(call: Call) -> Principal:
    assert call.principal is not None, "Subscription routes require a caller"
    return call.principal


router = APIRouter(tags=["Subscription"])


@router.get(
    "/Subscription/{resource_id}",
    response_class=FhirResponse,
    responses=FHIR_RESPONSES,
    summary="read Subscription",
    operation_id="read_Subscription",
)
async def read_subscription(
    resource_id: ResourceId, call: Annotated[Call, Depends(require("Subscription", "r"))]
) -> Response:
    """Read one of the caller's Subscriptions (header values masked)."""
    call.access.interaction = "read"
    call.access.resource_type = "Subscription"
    stored = await call.ctx.read(read_owned, call.store, resource_id, _principal(call))
    call.access.entities = [f"Subscription/{stored.id}"]
    return resource_response(served(stored))


@router.get(
    "/Subscription",
    response_class=FhirResponse,
    responses=FHIR_RESPONSES,
    summary="search Subscription",
    operation_id="search_Subscription",
    openapi_extra={"parameters": search_parameters_openapi("Subscription")},
)
async def search_subscription(
    request: Request, call: Annotated[Call, Depends(require("Subscription", "s"))]
) -> Response:
    """Search the caller's Subscriptions (a searchset Bundle, paged)."""
    mine = Condition(_OWNER_PARAM, ((SUBSCRIPTION_OWNER_SYSTEM, owner_of(_principal(call)),
                                     "system"),))  # fmt: skip
    return await call.ctx.read(searchset, request, call, "Subscription", served, [mine])


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


def check_subscription(
    sub: dict[str, Any],
    settings: FhirSettings,
    *,
    owner: str,
    cipher: HeaderCipher,
    resolve: Resolver = resolve_host,
) -> dict[str, Any]:
    """The Subscription as stored (active, server id, owner tag, header values encrypted);
    FhirError for what is not supported or not allowed (blocking: resolves the endpoint)."""
    parse_criteria(str(sub.get("criteria", "")))
    channel = dict(sub.get("channel") or {})
    if channel.get("type") != "rest-hook":
        raise unprocessable(f"only rest-hook channels are supported, not {channel.get('type')!r}")
    try:
        check_endpoint(str(channel.get("endpoint") or ""), settings, resolve)
    except EndpointRefused as exc:
        raise unprocessable(str(exc)) from None
    if str(channel.get("payload") or "") not in PAYLOADS:
        raise unprocessable(
            f"channel.payload must be empty or application/fhir+json, not {channel['payload']!r}"
        )
    for header in channel.get("header", []):
        if ":" not in header or "\n" in header or "\r" in header:
            raise unprocessable("each channel.header must be one 'Name: value' line")
    if sub.get("status") not in ("requested", "active"):
        raise unprocessable("a new Subscription's status must be requested (or active)")
    if channel.get("header"):
        try:
            channel["header"] = cipher.seal(channel["header"])
        except ChannelKeyError as exc:
            raise FhirError(500, str(exc), code="exception") from None
    stored = dict(sub, channel=channel)
    stored.update(
        id=new_id(),
        status="active",
        meta={"tag": [{"system": SUBSCRIPTION_OWNER_SYSTEM, "code": owner}]},
    )
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
    body = await json_body(request, "Subscription")
    # a payload streams the resources the criteria match: only to a client that may read them
    watched, _ = parse_criteria(str(body.get("criteria", "")))
    if (body.get("channel") or {}).get("payload") and not _principal(call).allows(watched, "r"):
        raise forbidden(_principal(call), watched, "r")
    sub = await anyio.to_thread.run_sync(
        lambda: check_subscription(
            body,
            call.settings,
            owner=owner_of(_principal(call)),
            cipher=channel_cipher(call.ctx.settings),
        )
    )
    stored = await call.ctx.db(call.store.put, sub)
    call.access.entities = [f"Subscription/{stored.id}"]
    return resource_response(served(stored), 201, base=base_url(request, call.settings))


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
    """Delete one of the caller's Subscriptions (its pending deliveries are dropped)."""
    call.access.interaction = "delete"
    call.access.resource_type = "Subscription"
    call.access.entities = [f"Subscription/{resource_id}"]
    await call.ctx.read(read_owned, call.store, check_id(resource_id), _principal(call))
    if not await call.ctx.db(call.store.delete, "Subscription", resource_id):
        raise not_found(f"Subscription/{resource_id} is not known")
    return Response(status_code=204)
