"""Typed pre-read results built by hand, for tests that need a result without a worker run
(the ledger, the FHIR projection and API). Built from sr_templates.model, the one
definition of a result, with sizes from workers.geometry.measure as the worker computes
them."""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.uid import generate_uid

from sr_templates.model import Anchor, Laterality, PrereadResult, Region, ViewRef
from workers.geometry import measure

__all__ = ["finding_anchor", "make_anchors", "make_result"]


def finding_anchor(
    n: int,
    term: str,
    site: str,
    side: Laterality,
    box: tuple[float, float, float, float],
    *,
    sop: str,
    spacing: tuple[float, float] | None = (0.2, 0.2),
    attributes: dict[str, str] | None = None,
) -> Anchor:
    """Finding anchor ``A<n>``: an ellipse over ``box`` (row0, col0, row1, col1) in source
    pixels of ``sop``, measured with ``spacing`` (mm per pixel; None: pixels)."""
    region = Region(*box, shape="ellipse")
    return Anchor(
        anchor_id=f"A{n}",
        tracking_uid=generate_uid(),
        label=f"{site.replace('_', ' ')} {term}",
        kind="finding",
        finding=term,
        site=site,
        laterality=side,
        region=region,
        source_sop_instance_uid=sop,
        measurements=measure(region, spacing, "ImagerPixelSpacing" if spacing else "none"),
        attributes=attributes or {},
    )


def make_anchors(
    *, spacing: tuple[float, float] | None = (0.2, 0.2), sop: str | None = None
) -> list[Anchor]:
    """Two finding anchors (A1 spiculated right upper zone nodule, A2 left lower zone
    nodule) and one landmark (A3 right hilum), on one image."""
    sop = sop or generate_uid()
    hilum = Anchor(
        anchor_id="A3",
        tracking_uid=generate_uid(),
        label="right hilum",
        kind="landmark",
        finding=None,
        site="right_hilum",
        laterality="right",
        region=Region(400, 300, 460, 360, shape="rectangle"),
        source_sop_instance_uid=sop,
    )
    return [
        finding_anchor(1, "nodule", "right_upper_zone", "right", (200, 200, 260, 250), sop=sop,
                       spacing=spacing, attributes={"margin": "spiculated"}),
        finding_anchor(2, "nodule", "left_lower_zone", "left", (700, 600, 740, 640), sop=sop,
                       spacing=spacing),
        hilum,
    ]  # fmt: skip


def make_result(anchors: Sequence[Anchor] = (), *, is_demo: bool = True) -> PrereadResult:
    """A demo-engine-like result holding ``anchors``; the frontal view is the image of the
    first anchor (a new UID when there is none), its pixel spacing 0.2 mm unless the
    anchors are measured in pixels."""
    frontal = anchors[0].source_sop_instance_uid if anchors else generate_uid()
    in_pixels = any(a.measurements and a.measurements.units == "px" for a in anchors)
    notice = "AI-generated, preliminary, not a diagnosis"
    return PrereadResult(
        notice=f"DEMO - not for clinical use. {notice}" if is_demo else notice,
        is_demo=is_demo,
        engine="demo" if is_demo else "medgemma",
        model_id="demo/blob-detector" if is_demo else "google/medgemma-4b-it",
        model_revision="1",
        prompt_version="preread-v1",
        node_version="0.1.0",
        frontal=ViewRef(frontal, "ViewPosition PA"),
        anchors=tuple(anchors),
        findings_text="Two round opacities.",
        impression="Two nodules.",
        pixel_spacing_mm=None if in_pixels else (0.2, 0.2),
        spacing_source="none" if in_pixels else "ImagerPixelSpacing",
    )
