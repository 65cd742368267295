"""Anchors: every finding and landmark as an image region with a stable identity.

An anchor's tracking UID is minted once and kept across versions: it is the SR Tracking
Unique Identifier and the FHIR Observation identifier. Geometry is in source-image pixels
of the image the model read (``source_sop_instance_uid``); sizes come from that geometry
and the pixel spacing (workers.geometry), never from model text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from pydicom.uid import generate_uid

from workers.geometry import ROUND_FINDINGS, Measurements, Region, Shape, iou, measure
from workers.imaging import SquareTransform
from workers.parsing import ParsedPreread

AnchorKind = Literal["finding", "landmark", "region"]

# A finding of a new study version that overlaps a prior anchor of the same finding type
# this much keeps the prior anchor's id and tracking UID.
SAME_ANCHOR_IOU = 0.5


@dataclass(frozen=True)
class Anchor:
    anchor_id: str  # "A1", "A2", ... unique within a study
    tracking_uid: str
    label: str
    kind: AnchorKind
    finding: str | None  # a workers.prompts FINDING_TYPES term (findings), else None
    site: str | None  # a SITES term or landmark name
    laterality: str  # right | left | bilateral | none
    region: Region  # source pixels
    source_sop_instance_uid: str
    measurements: Measurements | None
    attributes: dict[str, str] = field(default_factory=dict)
    confidence: float | None = None  # MedGemma gives none; kept for engines that do
    version: int = 1
    created_turn: int = 0  # 0 = the pre-read; follow-up turns count from 1
    refined_turn: int | None = None

    def __post_init__(self) -> None:
        if not self.anchor_id.startswith("A") or not self.anchor_id[1:].isdigit():
            raise ValueError(f"anchor_id {self.anchor_id!r} must be 'A' followed by a number")
        if self.kind not in ("finding", "landmark", "region"):
            raise ValueError(f"anchor kind {self.kind!r} is not finding, landmark or region")

    @property
    def tracking_identifier(self) -> str:
        """The human-readable SR Tracking Identifier, e.g. 'A1 right lower zone nodule'."""
        return f"{self.anchor_id} {self.label}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["region"] = {
            "row0": round(self.region.row0, 2),
            "col0": round(self.region.col0, 2),
            "row1": round(self.region.row1, 2),
            "col1": round(self.region.col1, 2),
            "shape": self.region.shape,
        }
        data["measurements"] = self.measurements.as_dict() if self.measurements else None
        data["size_text"] = self.measurements.text() if self.measurements else ""
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Anchor:
        r = data["region"]
        m = data.get("measurements")
        return cls(
            anchor_id=data["anchor_id"],
            tracking_uid=data["tracking_uid"],
            label=data["label"],
            kind=data["kind"],
            finding=data.get("finding"),
            site=data.get("site"),
            laterality=data.get("laterality", "none"),
            region=Region(r["row0"], r["col0"], r["row1"], r["col1"], r["shape"]),
            source_sop_instance_uid=data["source_sop_instance_uid"],
            measurements=(
                Measurements(
                    m["long_axis"], m["short_axis"], m["area"], m["units"], m["spacing_source"]
                )
                if m
                else None
            ),
            attributes=dict(data.get("attributes") or {}),
            confidence=data.get("confidence"),
            version=int(data.get("version", 1)),
            created_turn=int(data.get("created_turn", 0)),
            refined_turn=data.get("refined_turn"),
        )


def _landmark_label(name: str) -> str:
    return name.replace("_", " ")


def _landmark_laterality(name: str) -> str:
    for side in ("right", "left"):
        if name.startswith(side + "_"):
            return side
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

    def identity(kind: AnchorKind, key: str | None, box: tuple[float, ...]) -> tuple[str, str, int]:
        nonlocal next_number
        best: Anchor | None = None
        best_iou = SAME_ANCHOR_IOU
        for p in prior:
            if p.tracking_uid in used_prior or p.kind != kind:
                continue
            p_key = p.finding if kind == "finding" else p.site
            overlap = iou(p.region.box, box)  # type: ignore[arg-type]
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
        shape: Shape = "ellipse" if f.finding in ROUND_FINDINGS else "rectangle"
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


def refine(anchor: Anchor, *, turn: int, **changes: Any) -> Anchor:
    """A new version of an anchor (same id and tracking UID) refined by a follow-up turn."""
    return replace(anchor, version=anchor.version + 1, refined_turn=turn, **changes)
