"""``GET /fhir/metadata``: the CapabilityStatement, listing exactly what this server does;
and the OperationDefinition of ``$ask``."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from node import __version__
from node.fhir import FHIR_JSON, FHIR_VERSION
from node.fhir.deps import Call, base_url, public
from node.fhir.errors import not_found
from node.fhir.responses import FhirResponse, json_response
from node.fhir.routers.common import ResourceId
from node.fhir.search import REVINCLUDES, SEARCH_PARAMS, SearchParam
from node.settings import AuthSettings

router = APIRouter(tags=["metadata"])

#: Interactions per resource type (everything else is refused: 404 or 405).
#: vread and history-instance wherever earlier versions are kept (not NO_HISTORY types).
INTERACTIONS: Final[dict[str, tuple[str, ...]]] = {
    "DiagnosticReport": ("read", "search-type", "vread", "history-instance"),
    "Observation": ("read", "search-type", "vread", "history-instance"),
    "ImagingStudy": ("read", "search-type", "vread", "history-instance"),
    "Communication": ("read", "search-type", "create", "vread", "history-instance"),
    "Device": ("read", "search-type", "vread", "history-instance"),
    "Provenance": ("read", "search-type", "vread", "history-instance"),
    "Subscription": ("read", "search-type", "create", "delete"),
    "AuditEvent": ("read", "search-type", "vread", "history-instance"),
    "OperationDefinition": ("read",),
}

ASK_OPERATION_ID: Final = "DiagnosticReport-ask"

SECURITY_TEXT: Final = (
    "Bearer tokens on every request but GET /metadata: static tokens (configured by their "
    "SHA-256) or JWTs from the configured issuer, checked against its JWKS. SMART backend "
    "scopes: system/<Type>.read|write|* or system/<Type>.<cruds>; system/*.read reads "
    "everything but AuditEvent, which needs system/AuditEvent.read. 401 without a valid "
    "token, 403 without the scope, both as OperationOutcome."
)
DOCUMENTATION: Final = (
    "medgemma-node: AI-generated, preliminary chest radiograph pre-reads (MedGemma), not a "
    "diagnosis. Follow-up questions: POST DiagnosticReport/[id]/$ask, asynchronous (202 + "
    "Content-Location [base]/_async/[id]: 202 while running, then 200 with a collection "
    "Bundle: the answer Communication and what it is about), or Prefer: respond-sync to "
    "wait; or POST Communication, a create (201 + Location; Prefer: return=minimal | "
    "representation | OperationOutcome; respond-sync waits for the answer), answered by a "
    "Communication found by Communication?in-response-to=Communication/[id]. Searches "
    "answer searchset Bundles paged with _count and next links; unknown parameters are a "
    "400 unless Prefer: handling=lenient."
)

SEARCH_DOCUMENTATION: Final = (
    "Searches: GET [type] or POST [type]/_search with a form body (Subscription: GET "
    "only). Next links are stable "
    "while resources are written (each carries the first page's snapshot and the last "
    "resource seen: no page repeats or skips one; what changed after the first page is "
    "found by the next poll with _lastUpdated=gt...). _sort: _lastUpdated or date, - for "
    "descending (default -_lastUpdated); _summary=count; _include and _revinclude as listed. "
    "With Prefer: handling=lenient unknown parameters are ignored and the self link shows "
    "only those applied. Reads and vreads honour If-None-Match (304)."
)


def _search_params(resource_type: str) -> list[dict[str, Any]]:
    """searchParam entries: base names, with modifier and chain forms in the documentation."""
    groups: dict[str, list[SearchParam]] = {}
    for p in dict.fromkeys(SEARCH_PARAMS.get(resource_type, {}).values()):
        base = p.name.split(":")[0].split(".")[0]
        groups.setdefault(base, []).append(p)
    out = []
    for base, params in groups.items():
        main = next((p for p in params if p.name == base), None)
        if main is None:  # only modifier forms (AuditEvent agent:identifier): list them
            out += [
                {"name": p.name, "type": p.type, "documentation": p.documentation} for p in params
            ]
            continue
        docs = [main.documentation]
        for p in params:
            if p is not main:
                forms = ", ".join((p.name, *p.aliases))
                docs.append(f"{forms}: {p.documentation}")
        if not main.standard:
            docs.append("(defined by this server, not by FHIR R4)")
        out.append(
            {
                "name": base,
                "type": "token" if main.type == "special" else main.type,
                "documentation": "; ".join(docs),
            }
        )
    return out


def capability_statement(base: str) -> dict[str, Any]:
    resources = []
    for rtype, interactions in INTERACTIONS.items():
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": code} for code in interactions],
            "versioning": "versioned",
            "readHistory": "vread" in interactions,
            "updateCreate": False,
        }
        if "search-type" in interactions:
            entry["searchParam"] = _search_params(rtype)
            includes = sorted(
                {
                    f"{rtype}:{p.name}"
                    for p in SEARCH_PARAMS.get(rtype, {}).values()
                    if p.type == "reference" and p.name not in ("subject", "patient")
                }
            )
            if includes:
                entry["searchInclude"] = includes
            if REVINCLUDES.get(rtype):
                entry["searchRevInclude"] = list(REVINCLUDES[rtype])
        if rtype == "DiagnosticReport":
            entry["operation"] = [
                {
                    "name": "ask",
                    "definition": f"{base}/OperationDefinition/{ASK_OPERATION_ID}",
                    "documentation": "Ask a follow-up question about the pre-read",
                }
            ]
        if rtype == "Subscription":
            entry["documentation"] = (
                "R4 rest-hook on DiagnosticReport and Communication (criteria such as "
                "DiagnosticReport?status=preliminary or Communication?category=answer); "
                "deliveries are durable and retried with backoff"
            )
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2025-01-01",
        "publisher": "medgemma-node",
        "kind": "instance",
        "software": {"name": "medgemma-node", "version": __version__},
        "implementation": {"description": "medgemma-node FHIR R4 API", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": [FHIR_JSON, "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": f"{DOCUMENTATION} {SEARCH_DOCUMENTATION}",
                "security": {"cors": False, "description": SECURITY_TEXT},
                "resource": resources,
            }
        ],
    }


def ask_operation_definition(base: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationDefinition",
        "id": ASK_OPERATION_ID,
        "url": f"{base}/OperationDefinition/{ASK_OPERATION_ID}",
        "name": "Ask",
        "status": "active",
        "kind": "operation",
        "code": "ask",
        "resource": ["DiagnosticReport"],
        "system": False,
        "type": False,
        "instance": True,
        "description": (
            "Ask a follow-up question about an AI pre-read. Answers are AI-generated and "
            "preliminary. 202 + Content-Location by default; Prefer: respond-sync waits."
        ),
        "parameter": [
            {"name": "question", "use": "in", "min": 1, "max": "1", "type": "string",
             "documentation": "The question (English or Chinese)"},
            {"name": "anchor", "use": "in", "min": 0, "max": "1", "type": "Reference",
             "documentation": "The finding asked about: Observation/[id] or an anchor id "
                              "(A1) as valueString"},
            {"name": "language", "use": "in", "min": 0, "max": "1", "type": "code",
             "documentation": "The answer's language (en, zh)"},
            {"name": "return", "use": "out", "min": 1, "max": "1", "type": "Bundle",
             "documentation": "collection: the answer Communication and what it is about"},
        ],
    }  # fmt: skip


@router.get(
    "/metadata",
    response_class=FhirResponse,
    summary="CapabilityStatement",
    operation_id="capabilities",
)
async def metadata(request: Request, call: Annotated[Call, Depends(public)]) -> Response:
    """The CapabilityStatement (no token needed)."""
    call.access.interaction = "capabilities"
    return json_response(capability_statement(base_url(request, call.settings)))


@router.get(
    "/OperationDefinition/{resource_id}",
    response_class=FhirResponse,
    summary="read OperationDefinition",
    operation_id="read_OperationDefinition",
)
async def operation_definition(
    resource_id: ResourceId, request: Request, call: Annotated[Call, Depends(public)]
) -> Response:
    """The OperationDefinition of $ask (no token needed)."""
    call.access.interaction = "read"
    if resource_id != ASK_OPERATION_ID:
        raise not_found(f"OperationDefinition/{resource_id} is not known")
    return json_response(ask_operation_definition(base_url(request, call.settings)))


#: SMART capabilities this server has (it is a resource server: clients get tokens from
#: the configured issuer; scopes are SMART v1 read/write/* and v2 cruds letters).
SMART_CAPABILITIES: Final = ("permission-v1", "permission-v2")


def smart_scopes() -> list[str]:
    """The system scopes the server understands (node.fhir.auth), per served type."""
    scopes = ["system/*.read", "system/*.rs"]
    for rtype, interactions in INTERACTIONS.items():
        if rtype == "OperationDefinition":
            continue
        scopes += [f"system/{rtype}.read", f"system/{rtype}.rs"]
        if "create" in interactions or "delete" in interactions:
            scopes += [f"system/{rtype}.write", f"system/{rtype}.*"]
    return scopes


def smart_configuration(settings: AuthSettings) -> dict[str, Any]:
    """SMART discovery (.well-known/smart-configuration): only what is configured and true."""
    out: dict[str, Any] = {
        "capabilities": list(SMART_CAPABILITIES),
        "scopes_supported": smart_scopes(),
    }
    if settings.jwt_issuer:
        out["issuer"] = settings.jwt_issuer
        out["grant_types_supported"] = ["client_credentials"]
        if settings.jwks_url:
            out["jwks_uri"] = settings.jwks_url
        if settings.token_endpoint:
            out["token_endpoint"] = settings.token_endpoint
    return out


async def smart_configuration_route(call: Annotated[Call, Depends(public)]) -> JSONResponse:
    """SMART App Launch discovery (no token needed)."""
    call.access.interaction = "capabilities"
    return JSONResponse(smart_configuration(call.ctx.settings.auth))


router.add_api_route(
    "/.well-known/smart-configuration",
    smart_configuration_route,
    methods=["GET"],
    summary="SMART configuration",
    operation_id="smart_configuration",
)
