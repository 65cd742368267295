"""The review page's routes, mounted on the FHIR API app (``api`` and ``serve``).

- ``GET /review`` and ``GET /review/static/{name}``: the page itself (HTML, JavaScript, CSS),
  public like ``/fhir/metadata``: it holds no data. The safety banner (AI-generated,
  preliminary; DEMO with the demo engine) is written into the HTML here.
- ``GET /review/api/studies``: the latest studies (scope ImagingStudy search).
- ``GET /review/api/studies/{uid}``: the current typed result of a study
  (:class:`sr_templates.model.PrereadResult` from the ledger) as the page draws it: anchors
  with their region shape, box and version, distances with their line, the narrative, the
  DiagnosticReport id the follow-up thread hangs on (scope DiagnosticReport read).
- ``GET /review/api/studies/{uid}/image.png``: the frontal image the model read, windowed
  by the model's own display pipeline and scaled down to ``size`` pixels (scope
  ImagingStudy read).

The data routes take the API's bearer token and scopes (``node.fhir.deps.require``), are
audited like FHIR reads, and answer errors as OperationOutcomes. Follow-up questions go
through the FHIR API itself (``$ask``), exactly as a RIS asks them.

The image: node/ never imports workers/, so the display pipeline
(``workers.imaging.load_display_image``: decode, Modality LUT, VOI LUT or window or
percentiles, MONOCHROME1, padding) is loaded by name, as ``serve`` loads the worker's entry
points. One definition of how a radiograph is displayed; the PNG shows what the model saw.
"""

from __future__ import annotations

import html
import importlib
import io
import re
import threading
from pathlib import Path
from typing import Annotated, Any, Final

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydicom import dcmread

from node.fhir.deps import Call, require
from node.fhir.errors import FhirError, bad_request, not_found
from node.fhir.resources import notice_text, report_conclusion, report_id
from node.ledger import StudyLedger, StudySummary
from node.settings import Settings
from sr_templates.model import Anchor, AnchorDistance, PrereadResult

__all__ = ["DISPLAY_PIPELINE", "REVIEW_API", "REVIEW_PATH", "ReviewSources", "review_router"]

REVIEW_PATH: Final = "/review"
REVIEW_API: Final = "/review/api"
STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
#: The page's files (an allow-list: nothing else under static/ is served).
STATIC_FILES: Final = {
    "review.js": "text/javascript; charset=utf-8",
    "review.css": "text/css; charset=utf-8",
}
#: Loaded by name: node/ never imports workers/ (see the module docstring).
DISPLAY_PIPELINE: Final = "workers.imaging"
_UID: Final = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: No caching of patient data by the browser or a proxy.
_PRIVATE: Final = {"Cache-Control": "no-store"}


class ReviewSources:
    """The ledger the data routes read, opened on first use (an API whose database has no
    studies yet, or a test app on a store alone, never creates ledger tables it does not
    read)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ledger: StudyLedger | None = None
        self._lock = threading.Lock()

    @property
    def ledger(self) -> StudyLedger:
        with self._lock:
            if self._ledger is None:
                self._ledger = StudyLedger(self.settings.storage.resolved_database_url())
            return self._ledger

    def close(self) -> None:
        with self._lock:
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None


def _checked_uid(uid: str) -> str:
    if len(uid) > 64 or not _UID.match(uid):
        raise bad_request(f"{uid[:70]!r} is not a DICOM UID (digits and dots, at most 64)")
    return uid


def _study_or_404(ledger: StudyLedger, uid: str) -> StudySummary:
    study = ledger.get_study(_checked_uid(uid))
    if study is None:
        raise not_found(f"no study {uid} on this node")
    return study


def _anchor_json(anchor: Anchor) -> dict[str, Any]:
    region = anchor.region
    return {
        "anchor_id": anchor.anchor_id,
        "tracking_uid": anchor.tracking_uid,
        "tracking_identifier": anchor.tracking_identifier,
        "label": anchor.label,
        "kind": anchor.kind,
        "finding": anchor.finding,
        "site": anchor.site,
        "laterality": anchor.laterality,
        "shape": region.effective_shape,
        "box": {k: getattr(region, k) for k in ("row0", "col0", "row1", "col1")},
        "size_text": anchor.size_text,
        "attributes": dict(anchor.attributes),
        "version": anchor.version,
        "refined_turn": anchor.refined_turn,
        "sop_instance_uid": anchor.source_sop_instance_uid,
    }


def _distance_json(distance: AnchorDistance) -> dict[str, Any]:
    units = distance.units
    return {
        "tracking_identifier": distance.tracking_identifier,
        "from_anchor": distance.from_anchor,
        "to_anchor": distance.to_anchor,
        "centres": distance.centres,
        "edges": distance.edges,
        "units": units,
        "text": f"{distance.centres:.1f} {units} (edges {distance.edges:.1f} {units})",
        "line": [list(distance.line[0]), list(distance.line[1])],
        "sop_instance_uid": distance.source_sop_instance_uid,
    }


def _frontal_file(settings: Settings, ledger: StudyLedger, result: PrereadResult) -> Path:
    """The spool file of the image the model read (404 when it is gone, e.g. by retention)."""
    sop = result.frontal.sop_instance_uid
    instance = ledger.find_instance(sop)
    path = settings.storage.spool_path / instance.path if instance is not None else None
    if path is None or not path.is_file():
        raise not_found(f"the image {sop} is no longer in the node's spool")
    return path


def _image_size(path: Path) -> tuple[int, int]:
    """(rows, columns) of the image, from its header."""
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
    return int(ds.Rows), int(ds.Columns)


def study_view(settings: Settings, ledger: StudyLedger, uid: str) -> dict[str, Any]:
    """What the page shows of one study: state, narrative, anchors, distances, image size."""
    study = _study_or_404(ledger, uid)
    result = study.result
    view: dict[str, Any] = {
        "study_uid": study.study_uid,
        "version": study.version,
        "state": study.state.value,
        "reason": study.reason,
        "accession_number": study.accession_number,
        "study_description": study.study_description,
        "report_id": report_id(study.study_uid),
        "is_demo": bool(result and result.is_demo) or settings.engine.name == "demo",
        "notice": result.notice if result else notice_text(settings.engine.name == "demo"),
        "narrative": "",
        "model": None,
        "revision": None,
        "image": None,
        "anchors": [],
        "distances": [],
    }
    if result is None:
        return view
    view["narrative"] = report_conclusion(result, result.is_demo)
    view["model"] = {
        k: getattr(result, k) for k in ("engine", "model_id", "model_revision", "prompt_version")
    }
    view["revision"] = result.revision
    view["anchors"] = [_anchor_json(a) for a in result.anchors]
    view["distances"] = [_distance_json(d) for d in result.distances]
    try:
        rows, cols = _image_size(_frontal_file(settings, ledger, result))
    except FhirError:
        return view  # the anchors and the narrative without the image
    view["image"] = {
        "sop_instance_uid": result.frontal.sop_instance_uid,
        "rows": rows,
        "cols": cols,
        "pixel_spacing_mm": list(result.pixel_spacing_mm) if result.pixel_spacing_mm else None,
    }
    return view


def render_png(path: Path, max_side: int) -> bytes:
    """The radiograph at ``path`` as an 8-bit grey PNG, as the model's display pipeline shows
    it, scaled down (never up) so its longer side is at most ``max_side`` pixels."""
    imaging = importlib.import_module(DISPLAY_PIPELINE)
    try:
        display = imaging.load_display_image(path)
    except imaging.ImagingError as exc:
        raise FhirError(422, f"the image cannot be displayed: {exc}", code="processing") from None
    grey = np.clip(display.as_float() * 255.0 + 0.5, 0, 255).astype(np.uint8)
    image = Image.fromarray(grey, mode="L")
    scale = max_side / max(display.rows, display.cols)
    if scale < 1:
        size = (max(1, round(display.cols * scale)), max(1, round(display.rows * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=6)
    return out.getvalue()


def _page(settings: Settings) -> str:
    text = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    is_demo = settings.engine.name == "demo"
    return text.replace("{{NOTICE}}", html.escape(notice_text(is_demo))).replace(
        "{{DEMO}}", "demo" if is_demo else ""
    )


def review_router(settings: Settings, sources: ReviewSources) -> APIRouter:
    """The page and its data routes (see the module docstring)."""
    router = APIRouter(include_in_schema=False)
    # defaults, not Annotated aliases: annotations are strings here, resolved from globals
    studies_scope = Depends(require("ImagingStudy", "s"))
    image_scope = Depends(require("ImagingStudy", "r"))
    report_scope = Depends(require("DiagnosticReport", "r"))

    @router.get(REVIEW_PATH)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page(settings), headers={"Cache-Control": "no-cache"})

    @router.get(f"{REVIEW_PATH}/static/{{name}}")
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise not_found(f"the review page has no file {name[:80]!r}")
        return Response((STATIC_DIR / name).read_bytes(), media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "no-cache"})  # fmt: skip

    @router.get(f"{REVIEW_API}/studies")
    async def studies(
        call: Call = studies_scope,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> JSONResponse:
        def listing() -> list[dict[str, Any]]:
            return [
                {
                    "study_uid": s.study_uid,
                    "version": s.version,
                    "state": s.state.value,
                    "reason": s.reason,
                    "accession_number": s.accession_number,
                    "study_description": s.study_description,
                    "instance_count": s.instance_count,
                    "updated_at": s.updated_at.isoformat(timespec="seconds") + "Z",
                    "findings": len(s.result.findings) if s.result else 0,
                    "is_demo": bool(s.result and s.result.is_demo),
                }
                for s in sources.ledger.latest_studies(limit)
            ]

        found = await call.ctx.db(listing)
        return JSONResponse({"studies": found}, headers=_PRIVATE)

    @router.get(f"{REVIEW_API}/studies/{{uid}}")
    async def study(uid: str, call: Call = report_scope) -> JSONResponse:
        view = await call.ctx.db(study_view, settings, sources.ledger, uid)
        report = await call.ctx.db(call.store.get, "DiagnosticReport", view["report_id"])
        if report is not None:  # audited as a read of the report (and so of its patient)
            call.access.returned([report])
        return JSONResponse(view, headers=_PRIVATE)

    @router.get(f"{REVIEW_API}/studies/{{uid}}/image.png")
    async def image(
        uid: str,
        call: Call = image_scope,
        size: Annotated[int, Query(ge=64, le=4096)] = 1024,
    ) -> Response:
        def render() -> bytes:
            ledger = sources.ledger
            result = _study_or_404(ledger, uid).result
            if result is None:
                raise not_found(f"study {uid} has no pre-read yet: no image was read")
            return render_png(_frontal_file(settings, ledger, result), size)

        png = await anyio.to_thread.run_sync(render)
        return Response(png, media_type="image/png", headers=_PRIVATE)

    return router
