"""FHIR JSON responses: one resource (ETag, Last-Modified, Location), searchset and
collection Bundles (stored bodies are embedded as they are, never parsed again)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlencode

from fastapi import Response

from node.fhir import FHIR_JSON
from node.fhir.resources import fast_id, now_instant
from node.fhir.store import StoredResource

__all__ = [
    "FhirResponse",
    "bundle_text",
    "collection_text",
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
) -> str:
    """A searchset Bundle as JSON text (stored resource bodies are embedded as they are)."""
    links = [{"relation": "self", "url": _link(base, rtype, items, count, offset)}]
    if count > 0:
        links.append({"relation": "first", "url": _link(base, rtype, items, count, 0)})
        if offset + count < total:
            links.append(
                {"relation": "next", "url": _link(base, rtype, items, count, offset + count)}
            )
        if offset > 0:
            prev = max(0, offset - count)
            links.append({"relation": "previous", "url": _link(base, rtype, items, count, prev)})
    head = json.dumps(
        {
            "resourceType": "Bundle",
            "id": fast_id(),
            "meta": {"lastUpdated": now_instant()},
            "type": "searchset",
            "total": total,
            "link": links,
        },
        ensure_ascii=False,
    )
    entries = [_entry(base, r, "match") for r in page]
    entries += [_entry(base, r, "include") for r in included]
    if not entries:
        return head
    return head[:-1] + ',"entry":[' + ",".join(entries) + "]}"


def _entry(base: str, r: StoredResource, mode: str) -> str:
    return (
        f'{{"fullUrl":{json.dumps(f"{base}/{r.resource_type}/{r.id}")},'
        f'"resource":{r.body},"search":{{"mode":"{mode}"}}}}'
    )


def collection_text(base: str, resources: Sequence[StoredResource]) -> str:
    """A collection Bundle of stored resources (the result of a follow-up question)."""
    head = json.dumps(
        {
            "resourceType": "Bundle",
            "id": fast_id(),
            "meta": {"lastUpdated": now_instant()},
            "type": "collection",
        }
    )
    if not resources:
        return head
    entries = [
        f'{{"fullUrl":{json.dumps(f"{base}/{r.resource_type}/{r.id}")},"resource":{r.body}}}'
        for r in resources
    ]
    return head[:-1] + ',"entry":[' + ",".join(entries) + "]}"
