"""FHIR JSON responses: one resource (ETag, Last-Modified, Location), searchset and
collection Bundles (stored bodies are embedded as they are, never parsed again)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlencode

from fastapi import Response

from node.fhir import FHIR_JSON
from node.fhir.errors import operation_outcome
from node.fhir.resources import fast_id, now_instant
from node.fhir.store import StoredResource

__all__ = [
    "FhirResponse",
    "bundle_text",
    "collection_text",
    "history_text",
    "json_response",
    "resource_response",
]


class FhirResponse(Response):
    media_type = FHIR_JSON


def json_response(
    body: dict[str, Any] | str, status: int = 200, headers: dict[str, str] | None = None
) -> FhirResponse:
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return FhirResponse(content=text.encode(), status_code=status, headers=headers)


def resource_response(stored: StoredResource, status: int = 200, *, base: str = "") -> Response:
    headers = {
        "ETag": stored.etag,
        "Last-Modified": stored.last_updated.strftime("%a, %d %b %Y %H:%M:%S GMT"),
    }
    if status == 201 and base:
        headers["Location"] = (
            f"{base}/{stored.resource_type}/{stored.id}/_history/{stored.version_id}"
        )
    return FhirResponse(content=stored.body.encode(), status_code=status, headers=headers)


def _link(base: str, rtype: str, items: Iterable[tuple[str, str]], count: int, offset: int) -> str:
    kept = [(k, v) for k, v in items if k not in ("_count", "_offset")]
    kept += [("_count", str(count)), ("_offset", str(offset))]
    return f"{base}/{rtype}?{urlencode(kept)}"


def bundle_text(
    base: str,
    rtype: str,
    items: Sequence[tuple[str, str]],
    total: int,
    page: Sequence[StoredResource],
    count: int,
    offset: int,
    included: Sequence[StoredResource] = (),
    *,
    links: Sequence[tuple[str, str]] | None = None,
    warning: str = "",
) -> str:
    """A searchset Bundle as JSON text (stored resource bodies are embedded as they are).

    ``links``: (relation, url) pairs instead of offset links built from ``items``;
    ``warning``: an OperationOutcome entry (search mode outcome) saying what was left out."""
    entries = [_entry(base, r, "match") for r in page]
    entries += [_entry(base, r, "include") for r in included]
    if warning:
        outcome = operation_outcome(warning, code="suppressed", severity="warning")
        entries.append(
            json.dumps({"resource": outcome, "search": {"mode": "outcome"}}, ensure_ascii=False)
        )
    if links is not None:
        return _bundle("searchset", [{"relation": r, "url": u} for r, u in links], total, entries)
    links_ = [{"relation": "self", "url": _link(base, rtype, items, count, offset)}]
    if count > 0:
        links_.append({"relation": "first", "url": _link(base, rtype, items, count, 0)})
        if offset + count < total:
            links_.append(
                {"relation": "next", "url": _link(base, rtype, items, count, offset + count)}
            )
        if offset > 0:
            prev = max(0, offset - count)
            links_.append({"relation": "previous", "url": _link(base, rtype, items, count, prev)})
    return _bundle("searchset", links_, total, entries)


def _bundle(kind: str, links: list[dict[str, str]], total: int, entries: list[str]) -> str:
    head = json.dumps(
        {
            "resourceType": "Bundle",
            "id": fast_id(),
            "meta": {"lastUpdated": now_instant()},
            "type": kind,
            "total": total,
            "link": links,
        },
        ensure_ascii=False,
    )
    if not entries:
        return head
    return head[:-1] + ',"entry":[' + ",".join(entries) + "]}"


def history_text(base: str, versions: Sequence[StoredResource]) -> str:
    """A history Bundle of one resource's versions (newest first), each with the request
    that made it (create for version 1, update after) and its ETag."""
    entries = []
    for r in versions:
        url = f"{base}/{r.resource_type}/{r.id}"
        request = (
            {"method": "POST", "url": r.resource_type}
            if r.version_id == 1
            else {"method": "PUT", "url": f"{r.resource_type}/{r.id}"}
        )
        response = {
            "status": "201 Created" if r.version_id == 1 else "200 OK",
            "etag": r.etag,
            "lastModified": json.loads(r.body).get("meta", {}).get("lastUpdated", ""),
        }
        entries.append(
            f'{{"fullUrl":{json.dumps(url)},"resource":{r.body},'
            f'"request":{json.dumps(request)},"response":{json.dumps(response)}}}'
        )
    self_url = f"{base}/{versions[0].resource_type}/{versions[0].id}/_history" if versions else ""
    return _bundle("history", [{"relation": "self", "url": self_url}], len(versions), entries)


def _entry(base: str, r: StoredResource, mode: str) -> str:
    return (
        f'{{"fullUrl":{json.dumps(f"{base}/{r.resource_type}/{r.id}")},'
        f'"resource":{r.body},"search":{{"mode":"{mode}"}}}}'
    )


def collection_text(base: str, resources: Sequence[StoredResource], warning: str = "") -> str:
    """A collection Bundle of stored resources (the result of a follow-up question);
    ``warning``: a last entry, an OperationOutcome saying what was left out."""
    head = json.dumps(
        {
            "resourceType": "Bundle",
            "id": fast_id(),
            "meta": {"lastUpdated": now_instant()},
            "type": "collection",
        }
    )
    entries = [
        f'{{"fullUrl":{json.dumps(f"{base}/{r.resource_type}/{r.id}")},"resource":{r.body}}}'
        for r in resources
    ]
    if warning:
        outcome = operation_outcome(warning, code="suppressed", severity="warning")
        entries.append(json.dumps({"resource": outcome}, ensure_ascii=False))
    if not entries:
        return head
    return head[:-1] + ',"entry":[' + ",".join(entries) + "]}"
