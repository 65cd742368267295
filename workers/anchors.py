"""Anchors: every finding and landmark as an image region with a stable identity.

An anchor's tracking UID is minted once and kept across versions: it is the SR Tracking
Unique Identifier and the FHIR Observation identifier. Geometry is in source-image pixels
of the image the model read (``source_sop_instance_uid``); sizes come from that geometry
and the pixel spacing (workers.geometry), never from model text.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.uid import generate_uid

from sr_templates.model import Anchor, AnchorKind, Laterality, Region, RegionShape
from workers.geometry import ROUND_FINDINGS, iou, measure
from workers.imaging import SquareTransform
from workers.parsing import ParsedPreread

__all__ = ["SAME_ANCHOR_IOU", "Anchor", "build_anchors"]

# A finding of a new study version that overlaps a prior anchor of the same finding type
# this much keeps the prior anchor's id and tracking UID.
SAME_ANCHOR_IOU = 0.5


def _landmark_label(name: str) -> str:
    return name.replace("_", " ")


def _landmark_laterality(name: str) -> Laterality:
    if name.startswith("right_"):
        return "right"
    if name.startswith("left_"):
        return "left"
    return "none"


def build_anchors(
    parsed: ParsedPreread,
    transform: SquareTransform,
    *,
    source_sop_instance_uid: str,
    spacing_mm: tuple[float, float] | None,
    spacing_source: str,
    prior: Sequence[Anchor] = (),
) -> list[Anchor]:
    """Anchors for the findings, then the landmarks, of one pre-read.

    A finding or landmark that matches a ``prior`` anchor (same finding type or landmark
    name, boxes overlapping with IoU >= SAME_ANCHOR_IOU) keeps its id and tracking UID
    with the version increased; new ones get the next free ids and new UIDs.
    """
    anchors: list[Anchor] = []
    used_prior: set[str] = set()
    next_number = 1 + max((int(a.anchor_id[1:]) for a in prior), default=0)

    def identity(
        kind: AnchorKind, key: str | None, box: tuple[float, float, float, float]
    ) -> tuple[str, str, int]:
        nonlocal next_number
        best: Anchor | None = None
        best_iou = SAME_ANCHOR_IOU
        for p in prior:
            if p.tracking_uid in used_prior or p.kind != kind:
                continue
            p_key = p.finding if kind == "finding" else p.site
            overlap = iou(p.region.box, box)
            if p_key == key and overlap >= best_iou:
                best, best_iou = p, overlap
        if best is not None:
            used_prior.add(best.tracking_uid)
            return best.anchor_id, best.tracking_uid, best.version + 1
        anchor_id = f"A{next_number}"
        next_number += 1
        return anchor_id, generate_uid(), 1

    for f in parsed.findings:
        box = transform.box_to_source(f.box_2d)
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            continue  # wholly in the padding: nothing of the image is marked
        shape: RegionShape = "ellipse" if f.finding in ROUND_FINDINGS else "rectangle"
        region = Region(*box, shape=shape)
        anchor_id, uid, version = identity("finding", f.finding, box)
        anchors.append(
            Anchor(
                anchor_id=anchor_id,
                tracking_uid=uid,
                label=f.label or f.finding,
                kind="finding",
                finding=f.finding,
                site=f.site,
                laterality=f.laterality,
                region=region,
                source_sop_instance_uid=source_sop_instance_uid,
                measurements=measure(region, spacing_mm, spacing_source),
                attributes=dict(f.attributes),
                version=version,
            )
        )
    for lm in parsed.landmarks:
        box = transform.box_to_source(lm.box_2d)
        if box[2] - box[0] < 0 or box[3] - box[1] < 0:
            continue
        region = Region(*box, shape="rectangle")
        anchor_id, uid, version = identity("landmark", lm.name, box)
        anchors.append(
            Anchor(
                anchor_id=anchor_id,
                tracking_uid=uid,
                label=_landmark_label(lm.name),
                kind="landmark",
                finding=None,
                site=lm.name,
                laterality=_landmark_laterality(lm.name),
                region=region,
                source_sop_instance_uid=source_sop_instance_uid,
                measurements=None,
                version=version,
            )
        )
    return sorted(anchors, key=lambda a: int(a.anchor_id[1:]))
