"""The typed pre-read result: one definition of result, anchor, region and measurements.

Every part of the node speaks this model: the worker builds it (workers.anchors,
workers.preread), the ledger stores its JSON (``Study.result``, one ``AnchorRow`` per
anchor version), the SR/SEG builders (sr_templates.report, .segmentation) and the FHIR
projection (node.fhir) read it, and the follow-up dialogue refines it. It lives here
because sr_templates imports nothing else of ours, so node/ and workers/ may both use it.

Classes are frozen and validate in ``__init__``, so an invalid anchor cannot exist:
``TypeError`` for a wrong type, ``ValueError`` for a wrong value, and the message names
the field. ``to_json``/``from_json`` round-trip without loss; ``from_json`` also reads the
rows written before this model existed (missing optional keys take their defaults).

Geometry is in source-image pixels of the image the model read, continuous, ``(row,
col)``; pixel ``(r, c)`` covers ``[r, r+1) x [c, c+1)`` - the convention of DICOM SCOORD,
whose 2D graphic data are ``(column, row)`` with ``(0, 0)`` the top left corner of the top
left pixel. Sizes are in mm from the pixel spacing, or in pixels (and say so) without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Literal, cast

import numpy as np
import numpy.typing as npt

__all__ = [
    "ANCHOR_KINDS",
    "LATERALITIES",
    "Anchor",
    "AnchorDistance",
    "AnchorKind",
    "GraphicType",
    "Laterality",
    "Measurements",
    "OutputRef",
    "PrereadResult",
    "Region",
    "RegionShape",
    "ResultOutputs",
    "Units",
    "ViewRef",
]

AnchorKind = Literal["finding", "landmark", "region"]
RegionShape = Literal["ellipse", "rectangle", "point"]
GraphicType = Literal["ELLIPSE", "POLYLINE", "POINT"]
Laterality = Literal["right", "left", "bilateral", "none"]
Units = Literal["mm", "px"]

ANCHOR_KINDS: Final = ("finding", "landmark", "region")
LATERALITIES: Final = ("right", "left", "bilateral", "none")
_SHAPES: Final = ("ellipse", "rectangle", "point")


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return float(value)


def _text(value: object, what: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{what} must not be empty")
    return value


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Region:
    """An axis-aligned region in source pixels: an ellipse inscribed in the box, the box
    itself (rectangle), or a point at the box centre."""

    row0: float
    col0: float
    row1: float
    col1: float
    shape: RegionShape

    def __post_init__(self) -> None:
        for name in ("row0", "col0", "row1", "col1"):
            value = _number(getattr(self, name), f"Region.{name}")
            if value < 0:
                raise ValueError(f"Region.{name} must be >= 0, got {value!r}")
        if self.row1 < self.row0 or self.col1 < self.col0:
            raise ValueError(f"Region box {self.box} is inverted")
        if self.shape not in _SHAPES:
            raise ValueError(f"Region.shape {self.shape!r} is not one of {_SHAPES}")

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(row0, col0, row1, col1) in source pixels."""
        return (self.row0, self.col0, self.row1, self.col1)

    @property
    def center(self) -> tuple[float, float]:
        """(row, col) of the box centre."""
        return ((self.row0 + self.row1) / 2, (self.col0 + self.col1) / 2)

    @property
    def effective_shape(self) -> RegionShape:
        """The shape as drawn: a box without width or height is drawn as its centre point."""
        if self.shape == "point" or self.row1 == self.row0 or self.col1 == self.col0:
            return "point"
        return self.shape

    def contains(self, row: float, col: float) -> bool:
        """Whether the source-pixel point (row, col) lies in the region."""
        if not (self.row0 <= row <= self.row1 and self.col0 <= col <= self.col1):
            return False
        if self.effective_shape == "point":
            return (row, col) == self.center
        if self.shape != "ellipse":
            return True
        cr, cc = self.center
        hr, hc = (self.row1 - self.row0) / 2, (self.col1 - self.col0) / 2
        return ((row - cr) / hr) ** 2 + ((col - cc) / hc) ** 2 <= 1.0

    def graphic(self) -> tuple[GraphicType, npt.NDArray[np.float64]]:
        """SCOORD graphic type and data, as ``(column, row)`` points in source pixels.

        ELLIPSE: the major axis end points, then the minor axis end points (PS3.3
        C.18.6.1.2); POLYLINE: the box, closed (first point repeated last: 2D SCOORD has no
        POLYGON, a closed POLYLINE is an area); POINT: centre.
        """
        cr, cc = self.center
        shape = self.effective_shape
        if shape == "point":
            return "POINT", np.array([[cc, cr]], dtype=np.float64)
        if shape == "ellipse":
            hr, hc = (self.row1 - self.row0) / 2, (self.col1 - self.col0) / 2
            horizontal = [[cc - hc, cr], [cc + hc, cr]]
            vertical = [[cc, cr - hr], [cc, cr + hr]]
            points = horizontal + vertical if hc >= hr else vertical + horizontal
            return "ELLIPSE", np.array(points, dtype=np.float64)
        r0, c0, r1, c1 = self.box
        closed = [[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]]
        return "POLYLINE", np.array(closed, dtype=np.float64)

    def mask(self, rows: int, cols: int) -> npt.NDArray[np.bool_]:
        """The pixels of a ``rows x cols`` image whose centre lies in the region.

        Never empty for a region that touches the image: a region too thin to hold a
        pixel centre (or a point) marks the pixel that holds its centre.
        """
        out = np.zeros((rows, cols), dtype=bool)
        r_lo, r_hi = max(0, math.floor(self.row0)), min(rows, math.ceil(self.row1))
        c_lo, c_hi = max(0, math.floor(self.col0)), min(cols, math.ceil(self.col1))
        if r_lo < r_hi and c_lo < c_hi and self.effective_shape != "point":
            rr = np.arange(r_lo, r_hi, dtype=np.float64) + 0.5
            cc = np.arange(c_lo, c_hi, dtype=np.float64) + 0.5
            inside_r = (rr >= self.row0) & (rr <= self.row1)
            inside_c = (cc >= self.col0) & (cc <= self.col1)
            window = inside_r[:, None] & inside_c[None, :]
            if self.shape == "ellipse":
                cr, ccen = self.center
                hr, hc = (self.row1 - self.row0) / 2, (self.col1 - self.col0) / 2
                dist = ((rr[:, None] - cr) / hr) ** 2 + ((cc[None, :] - ccen) / hc) ** 2
                window &= dist <= 1.0
            out[r_lo:r_hi, c_lo:c_hi] = window
        if not out.any():
            r = min(rows - 1, max(0, math.floor(self.center[0])))
            c = min(cols - 1, max(0, math.floor(self.center[1])))
            out[r, c] = True
        return out

    def to_json(self) -> dict[str, Any]:
        # unrounded: JSON keeps a float exactly, so the ledger round-trips without loss
        return {
            "row0": self.row0,
            "col0": self.col0,
            "row1": self.row1,
            "col1": self.col1,
            "shape": self.shape,
        }

    @classmethod
    def from_json(cls, data: object) -> Region:
        d = _mapping(data, "region")
        shape = d.get("shape")
        if shape not in _SHAPES:
            raise ValueError(f"region['shape'] {shape!r} is not one of {_SHAPES}")
        return cls(
            _number(d.get("row0"), "region['row0']"),
            _number(d.get("col0"), "region['col0']"),
            _number(d.get("row1"), "region['row1']"),
            _number(d.get("col1"), "region['col1']"),
            cast(RegionShape, shape),
        )


@dataclass(frozen=True)
class Measurements:
    """Long axis, short axis and area of a region: mm and mm2, or pixels and square pixels
    when the image has no pixel spacing (``units`` says which). ``spacing_source`` names
    the attribute the spacing came from (ImagerPixelSpacing, PixelSpacing) or "none"."""

    long_axis: float
    short_axis: float
    area: float
    units: Units
    spacing_source: str = "none"

    def __post_init__(self) -> None:
        for name in ("long_axis", "short_axis", "area"):
            if _number(getattr(self, name), f"Measurements.{name}") < 0:
                raise ValueError(f"Measurements.{name} must be >= 0")
        if self.units not in ("mm", "px"):
            raise ValueError(f"Measurements.units {self.units!r} is not 'mm' or 'px'")

    @property
    def area_units(self) -> str:
        return "mm2" if self.units == "mm" else "px2"

    def text(self) -> str:
        """'12.0 x 10.0 mm, area 94 mm2' (or pixels, saying why)."""
        note = "" if self.units == "mm" else " (no pixel spacing in the image: pixels)"
        return (
            f"{self.long_axis:.1f} x {self.short_axis:.1f} {self.units}, "
            f"area {self.area:.0f} {self.area_units}{note}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "long_axis": self.long_axis,
            "short_axis": self.short_axis,
            "area": self.area,
            "units": self.units,
            "area_units": self.area_units,
            "spacing_source": self.spacing_source,
        }

    @classmethod
    def from_json(cls, data: object) -> Measurements:
        d = _mapping(data, "measurements")
        units = d.get("units")
        if units not in ("mm", "px"):
            raise ValueError(f"measurements['units'] {units!r} is not 'mm' or 'px'")
        return cls(
            _number(d.get("long_axis"), "measurements['long_axis']"),
            _number(d.get("short_axis"), "measurements['short_axis']"),
            _number(d.get("area"), "measurements['area']"),
            cast(Units, units),
            str(d.get("spacing_source") or "none"),
        )


# --------------------------------------------------------------------------- anchors


def _frozen_attributes(value: Mapping[str, str]) -> Mapping[str, str]:
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("Anchor.attributes must map str to str")
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class Anchor:
    """A finding, landmark or localised region of an image, with a stable identity.

    ``anchor_id`` ("A1") names it within a study; ``tracking_uid`` is minted once and
    kept across versions: it is the SR Tracking Unique Identifier, the SEG segment's
    tracking UID and the FHIR Observation identifier. ``version`` grows when a study
    version or a follow-up turn refines it (``refined_turn``). ``finding``, ``site`` and
    ``attributes`` use the vocabulary of sr_templates.ontology; landmarks carry their
    landmark name as ``site``. ``measurements`` come from ``region`` and the pixel
    spacing, never from model text.
    """

    anchor_id: str
    tracking_uid: str
    label: str
    kind: AnchorKind
    finding: str | None
    site: str | None
    laterality: Laterality
    region: Region
    source_sop_instance_uid: str
    measurements: Measurements | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    confidence: float | None = None  # MedGemma gives none; kept for engines that do
    version: int = 1
    created_turn: int = 0  # 0 = the pre-read; follow-up turns count from 1
    refined_turn: int | None = None

    def __post_init__(self) -> None:
        aid = _text(self.anchor_id, "Anchor.anchor_id")
        if not (aid.startswith("A") and aid[1:].isdigit()):
            raise ValueError(f"Anchor.anchor_id {aid!r} must be 'A' followed by a number")
        _text(self.tracking_uid, "Anchor.tracking_uid")
        _text(self.source_sop_instance_uid, "Anchor.source_sop_instance_uid")
        _text(self.label, "Anchor.label", allow_empty=True)
        if self.kind not in ANCHOR_KINDS:
            raise ValueError(f"Anchor.kind {self.kind!r} is not one of {ANCHOR_KINDS}")
        if self.kind == "finding" and not self.finding:
            raise ValueError("Anchor.finding is required for a finding anchor")
        if self.laterality not in LATERALITIES:
            raise ValueError(f"Anchor.laterality {self.laterality!r} is not one of {LATERALITIES}")
        if not isinstance(self.region, Region):
            raise TypeError("Anchor.region must be a Region")
        if self.measurements is not None and not isinstance(self.measurements, Measurements):
            raise TypeError("Anchor.measurements must be Measurements or None")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"Anchor.version must be an int >= 1, got {self.version!r}")
        object.__setattr__(self, "attributes", _frozen_attributes(self.attributes))

    @property
    def number(self) -> int:
        """The number of the anchor id (A12 -> 12), for ordering."""
        return int(self.anchor_id[1:])

    @property
    def tracking_identifier(self) -> str:
        """The SR Tracking Identifier and SEG segment label, e.g. 'A1 right upper zone nodule'."""
        return f"{self.anchor_id} {' '.join(self.label.split())}".strip()

    @property
    def size_text(self) -> str:
        return self.measurements.text() if self.measurements else ""

    def refined(self, *, turn: int, **changes: Any) -> Anchor:
        """A new version (same id and tracking UID) refined by follow-up turn ``turn``."""
        return replace(self, version=self.version + 1, refined_turn=turn, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "anchor_id": self.anchor_id,
            "tracking_uid": self.tracking_uid,
            "label": self.label,
            "kind": self.kind,
            "finding": self.finding,
            "site": self.site,
            "laterality": self.laterality,
            "region": self.region.to_json(),
            "source_sop_instance_uid": self.source_sop_instance_uid,
            "measurements": self.measurements.to_json() if self.measurements else None,
            "size_text": self.size_text,  # for readers of the raw JSON; derived, not read back
            "attributes": dict(self.attributes),
            "confidence": self.confidence,
            "version": self.version,
            "created_turn": self.created_turn,
            "refined_turn": self.refined_turn,
        }

    @classmethod
    def from_json(cls, data: object) -> Anchor:
        """Read ``to_json()`` output (or a row written before this model); errors name
        the key."""
        d = _mapping(data, "anchor")
        m = d.get("measurements")
        raw_attributes = d.get("attributes") or {}
        confidence = d.get("confidence")
        refined_turn = d.get("refined_turn")
        return cls(
            anchor_id=_text(d.get("anchor_id"), "anchor['anchor_id']"),
            tracking_uid=_text(d.get("tracking_uid"), "anchor['tracking_uid']"),
            label=str(d.get("label") or d.get("finding") or d.get("site") or ""),
            kind=cast(AnchorKind, d.get("kind", "finding")),
            finding=d.get("finding"),
            site=d.get("site"),
            laterality=cast(Laterality, d.get("laterality") or "none"),
            region=Region.from_json(d.get("region")),
            source_sop_instance_uid=_text(
                d.get("source_sop_instance_uid"), "anchor['source_sop_instance_uid']"
            ),
            measurements=Measurements.from_json(m) if m is not None else None,
            attributes=dict(_mapping(raw_attributes, "anchor['attributes']")),
            confidence=None if confidence is None else _number(confidence, "confidence"),
            version=int(d.get("version", 1)),
            created_turn=int(d.get("created_turn") or 0),
            refined_turn=None if refined_turn is None else int(refined_turn),
        )


@dataclass(frozen=True)
class AnchorDistance:
    """A distance between two anchors, measured by a follow-up turn from their geometry.

    ``centres`` is between the two regions' centres, ``edges`` the shortest gap between
    their outlines (0 when they touch or overlap), both in ``units`` (mm from the pixel
    spacing, or px). ``line`` is the measured centre-to-centre segment, two (row, col)
    points in source pixels of ``source_sop_instance_uid``: the SR draws it as a line
    SCOORD. ``tracking_uid`` identifies the SR measurement group; a later turn measuring
    the same pair again replaces the value under the same UID.
    """

    tracking_uid: str
    from_anchor: str
    from_tracking_uid: str
    to_anchor: str
    to_tracking_uid: str
    to_label: str
    centres: float
    edges: float
    units: Units
    line: tuple[tuple[float, float], tuple[float, float]]
    source_sop_instance_uid: str
    turn: int = 0

    def __post_init__(self) -> None:
        for name in ("tracking_uid", "from_tracking_uid", "to_tracking_uid"):
            _text(getattr(self, name), f"AnchorDistance.{name}")
        for name in ("centres", "edges"):
            if _number(getattr(self, name), f"AnchorDistance.{name}") < 0:
                raise ValueError(f"AnchorDistance.{name} must be >= 0")
        if self.units not in ("mm", "px"):
            raise ValueError(f"AnchorDistance.units {self.units!r} is not 'mm' or 'px'")
        (r0, c0), (r1, c1) = self.line
        for v in (r0, c0, r1, c1):
            _number(v, "AnchorDistance.line")

    @property
    def tracking_identifier(self) -> str:
        """'A1 to A4 right hilum distance': the SR group's Tracking Identifier."""
        return f"{self.from_anchor} to {self.to_anchor} {self.to_label} distance".strip()

    def to_json(self) -> dict[str, Any]:
        return {
            "tracking_uid": self.tracking_uid,
            "from_anchor": self.from_anchor,
            "from_tracking_uid": self.from_tracking_uid,
            "to_anchor": self.to_anchor,
            "to_tracking_uid": self.to_tracking_uid,
            "to_label": self.to_label,
            "centres": self.centres,
            "edges": self.edges,
            "units": self.units,
            "line": [list(self.line[0]), list(self.line[1])],
            "source_sop_instance_uid": self.source_sop_instance_uid,
            "turn": self.turn,
        }

    @classmethod
    def from_json(cls, data: object) -> AnchorDistance:
        d = _mapping(data, "distance")
        line = d.get("line")
        if not isinstance(line, list | tuple) or len(line) != 2:
            raise ValueError("distance['line'] must be two (row, col) points")
        (r0, c0), (r1, c1) = line
        units = d.get("units")
        if units not in ("mm", "px"):
            raise ValueError(f"distance['units'] {units!r} is not 'mm' or 'px'")
        return cls(
            tracking_uid=_text(d.get("tracking_uid"), "distance['tracking_uid']"),
            from_anchor=str(d.get("from_anchor") or ""),
            from_tracking_uid=_text(d.get("from_tracking_uid"), "distance['from_tracking_uid']"),
            to_anchor=str(d.get("to_anchor") or ""),
            to_tracking_uid=_text(d.get("to_tracking_uid"), "distance['to_tracking_uid']"),
            to_label=str(d.get("to_label") or ""),
            centres=_number(d.get("centres"), "distance['centres']"),
            edges=_number(d.get("edges"), "distance['edges']"),
            units=cast(Units, units),
            line=((float(r0), float(c0)), (float(r1), float(c1))),
            source_sop_instance_uid=str(d.get("source_sop_instance_uid") or ""),
            turn=int(d.get("turn") or 0),
        )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ViewRef:
    """An image the model read and why it was chosen ("ViewPosition PA", ...)."""

    sop_instance_uid: str
    reason: str = ""

    def to_json(self) -> dict[str, str]:
        return {"sop_instance_uid": self.sop_instance_uid, "reason": self.reason}

    @classmethod
    def from_json(cls, data: object) -> ViewRef:
        d = _mapping(data, "view")
        return cls(
            _text(d.get("sop_instance_uid"), "view['sop_instance_uid']"), str(d.get("reason") or "")
        )


@dataclass(frozen=True)
class OutputRef:
    """A DICOM object the node wrote for a result (SR or SEG)."""

    path: str
    sop_instance_uid: str
    series_instance_uid: str

    def to_json(self) -> dict[str, str]:
        return {
            "path": self.path,
            "sop_instance_uid": self.sop_instance_uid,
            "series_instance_uid": self.series_instance_uid,
        }

    @classmethod
    def from_json(cls, data: object) -> OutputRef:
        d = _mapping(data, "output")
        return cls(
            str(d.get("path") or ""),
            _text(d.get("sop_instance_uid"), "output['sop_instance_uid']"),
            str(d.get("series_instance_uid") or ""),
        )


@dataclass(frozen=True)
class ResultOutputs:
    """The SR (always) and SEG (when there are findings) of a result."""

    sr: OutputRef | None = None
    seg: OutputRef | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "sr": self.sr.to_json() if self.sr else None,
            "seg": self.seg.to_json() if self.seg else None,
        }

    @classmethod
    def from_json(cls, data: object) -> ResultOutputs:
        d = _mapping(data, "outputs")
        sr, seg = d.get("sr"), d.get("seg")
        return cls(
            OutputRef.from_json(sr) if sr else None, OutputRef.from_json(seg) if seg else None
        )


@dataclass(frozen=True)
class PrereadResult:
    """The outcome of reading one study version: provenance, narrative, anchors.

    ``notice`` is the statement every output carries (AI-generated, preliminary; DEMO for
    the demo engine; cut-off answers say findings may be incomplete). ``model_text`` is
    the engine's raw answer, kept for audit. ``structured`` is False when the answer had
    no parsable JSON (a text-only result).
    """

    notice: str
    is_demo: bool
    engine: str
    model_id: str
    model_revision: str
    prompt_version: str
    node_version: str
    frontal: ViewRef
    anchors: tuple[Anchor, ...] = ()
    lateral: ViewRef | None = None
    structured: bool = True
    parse_warnings: tuple[str, ...] = ()
    findings_text: str = ""
    impression: str = ""
    model_text: str = ""
    pixel_spacing_mm: tuple[float, float] | None = None
    spacing_source: str = "none"
    engine_seconds: float = 0.0
    outputs: ResultOutputs | None = None
    distances: tuple[AnchorDistance, ...] = ()
    revision: int = 0  # 0 = the pre-read; each follow-up amendment adds one

    def __post_init__(self) -> None:
        if not isinstance(self.is_demo, bool):
            raise TypeError(f"PrereadResult.is_demo must be a bool, got {self.is_demo!r}")
        for name in ("model_id", "model_revision", "prompt_version", "node_version"):
            _text(getattr(self, name), f"PrereadResult.{name}")
        object.__setattr__(self, "anchors", tuple(self.anchors))
        object.__setattr__(self, "parse_warnings", tuple(self.parse_warnings))
        object.__setattr__(self, "distances", tuple(self.distances))
        if (
            isinstance(self.revision, bool)
            or not isinstance(self.revision, int)
            or self.revision < 0
        ):
            raise ValueError(f"PrereadResult.revision must be an int >= 0, got {self.revision!r}")
        for a in self.anchors:
            if not isinstance(a, Anchor):
                raise TypeError("PrereadResult.anchors must hold Anchor objects")
        uids = [a.tracking_uid for a in self.anchors]
        if len(set(uids)) != len(uids):
            raise ValueError("PrereadResult.anchors has two anchors with the same tracking UID")
        ids = [a.anchor_id for a in self.anchors]
        if len(set(ids)) != len(ids):
            raise ValueError("PrereadResult.anchors has two anchors with the same anchor id")

    @property
    def findings(self) -> tuple[Anchor, ...]:
        return tuple(a for a in self.anchors if a.kind == "finding")

    @property
    def landmarks(self) -> tuple[Anchor, ...]:
        return tuple(a for a in self.anchors if a.kind == "landmark")

    @property
    def amended(self) -> bool:
        """A follow-up turn refined an anchor, added one or measured a distance."""
        return self.revision > 0 or any(a.refined_turn is not None for a in self.anchors)

    @property
    def truncated(self) -> bool:
        """The model's answer was cut off: findings may be incomplete."""
        return any("truncated" in w for w in self.parse_warnings)

    @property
    def algorithm_parameters(self) -> dict[str, str]:
        """Algorithm Parameters of TID 4019 / the SEG's Algorithm Identification."""
        return {"prompt_version": self.prompt_version, "node_version": self.node_version}

    def anchor(self, anchor_id: str) -> Anchor | None:
        return next((a for a in self.anchors if a.anchor_id == anchor_id), None)

    def with_anchors(self, anchors: Sequence[Anchor]) -> PrereadResult:
        """The same result with ``anchors`` (e.g. refined by a follow-up), in id order."""
        return replace(self, anchors=tuple(sorted(anchors, key=lambda a: a.number)))

    def to_json(self) -> dict[str, Any]:
        return {
            "notice": self.notice,
            "is_demo": self.is_demo,
            "engine": self.engine,
            "model_id": self.model_id,
            "model_revision": self.model_revision,
            "prompt_version": self.prompt_version,
            "node_version": self.node_version,
            "structured": self.structured,
            "parse_warnings": list(self.parse_warnings),
            "findings_text": self.findings_text,
            "impression": self.impression,
            "model_text": self.model_text,
            "frontal": self.frontal.to_json(),
            "lateral": self.lateral.to_json() if self.lateral else None,
            "pixel_spacing_mm": list(self.pixel_spacing_mm) if self.pixel_spacing_mm else None,
            "spacing_source": self.spacing_source,
            "engine_seconds": self.engine_seconds,
            "anchors": [a.to_json() for a in self.anchors],
            "outputs": self.outputs.to_json() if self.outputs else None,
            "distances": [d.to_json() for d in self.distances],
            "revision": self.revision,
        }

    @classmethod
    def from_json(cls, data: object) -> PrereadResult:
        """Read ``to_json()`` output (or a ledger row written before this model)."""
        d = _mapping(data, "result")
        anchors = d.get("anchors") or []
        if not isinstance(anchors, list | tuple):
            raise TypeError(f"result['anchors'] must be a list, got {type(anchors).__name__}")
        spacing = d.get("pixel_spacing_mm")
        lateral, outputs = d.get("lateral"), d.get("outputs")
        is_demo = d.get("is_demo", False)
        return cls(
            notice=str(d.get("notice") or ""),
            is_demo=is_demo if isinstance(is_demo, bool) else bool(is_demo),
            engine=str(d.get("engine") or ""),
            model_id=_text(d.get("model_id"), "result['model_id']"),
            model_revision=_text(d.get("model_revision"), "result['model_revision']"),
            prompt_version=_text(d.get("prompt_version"), "result['prompt_version']"),
            node_version=_text(d.get("node_version"), "result['node_version']"),
            frontal=ViewRef.from_json(d.get("frontal")),
            anchors=tuple(Anchor.from_json(a) for a in anchors),
            lateral=ViewRef.from_json(lateral) if lateral else None,
            structured=bool(d.get("structured", True)),
            parse_warnings=tuple(str(w) for w in d.get("parse_warnings") or ()),
            findings_text=str(d.get("findings_text") or ""),
            impression=str(d.get("impression") or ""),
            model_text=str(d.get("model_text") or ""),
            pixel_spacing_mm=(
                (_number(spacing[0], "pixel_spacing_mm"), _number(spacing[1], "pixel_spacing_mm"))
                if spacing
                else None
            ),
            spacing_source=str(d.get("spacing_source") or "none"),
            engine_seconds=float(d.get("engine_seconds") or 0.0),
            outputs=ResultOutputs.from_json(outputs) if outputs else None,
            distances=tuple(AnchorDistance.from_json(x) for x in d.get("distances") or ()),
            revision=int(d.get("revision") or 0),
        )
