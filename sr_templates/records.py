"""The parts of a pre-read result that become SR and SEG content, validated.

A pre-read result (``workers.preread.analyse_study``) is a JSON-able dict whose
``"anchors"`` are ``Anchor.to_json()`` dicts. This module reads it into small frozen
records that cannot be invalid, without importing :mod:`workers` (the GPU side depends
on this package, not the other way round): :class:`PrereadRecord` holds the provenance
and narrative, :class:`ReportedFinding` one finding anchor with its ontology concepts.

Geometry is in source-image pixels, continuous, ``(row, col)``; pixel ``(r, c)`` covers
``[r, r+1) x [c, c+1)`` - the convention of ``workers.geometry`` and of DICOM SCOORD,
whose 2D graphic data are ``(column, row)`` with ``(0, 0)`` the top left corner of the
top left pixel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydicom.sr.coding import Code

from sr_templates import ontology
from sr_templates.ontology import ChestConcept

__all__ = ["FindingMeasurements", "FindingRegion", "PrereadRecord", "ReportedFinding"]

RegionShape = Literal["ellipse", "rectangle", "point"]
GraphicType = Literal["ELLIPSE", "POLYLINE", "POINT"]
_SHAPES: Final = ("ellipse", "rectangle", "point")


def _number(data: Mapping[str, Any], key: str, what: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what}[{key!r}] must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{what}[{key!r}] must be finite, got {value!r}")
    return float(value)


def _text(data: Mapping[str, Any], key: str, what: str, *, allow_empty: bool = False) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise TypeError(f"{what}[{key!r}] must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{what}[{key!r}] must not be empty")
    return value


@dataclass(frozen=True)
class FindingRegion:
    """An axis-aligned region in source pixels: an ellipse inscribed in the box, the box
    itself (rectangle), or a point at the box centre."""

    row0: float
    col0: float
    row1: float
    col1: float
    shape: RegionShape

    def __post_init__(self) -> None:
        for name in ("row0", "col0", "row1", "col1"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"FindingRegion.{name} must be a number")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"FindingRegion.{name} must be finite and >= 0, got {value!r}")
        if self.row1 < self.row0 or self.col1 < self.col0:
            raise ValueError(f"FindingRegion box {self.box} is inverted")
        if self.shape not in _SHAPES:
            raise ValueError(f"FindingRegion.shape {self.shape!r} is not one of {_SHAPES}")

    @classmethod
    def from_json(cls, data: object) -> FindingRegion:
        if not isinstance(data, Mapping):
            raise TypeError(f"anchor region must be a mapping, got {type(data).__name__}")
        shape = data.get("shape")
        if shape not in _SHAPES:
            raise ValueError(f"anchor region shape {shape!r} is not one of {_SHAPES}")
        return cls(
            _number(data, "row0", "region"),
            _number(data, "col0", "region"),
            _number(data, "row1", "region"),
            _number(data, "col1", "region"),
            shape,
        )

    @property
    def box(self) -> tuple[float, float, float, float]:
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


@dataclass(frozen=True)
class FindingMeasurements:
    """Long axis, short axis and area of a region: mm and mm2, or pixels and square pixels
    when the image has no pixel spacing."""

    long_axis: float
    short_axis: float
    area: float
    units: Literal["mm", "px"]

    def __post_init__(self) -> None:
        for name in ("long_axis", "short_axis", "area"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"FindingMeasurements.{name} must be finite and >= 0")
        if self.units not in ("mm", "px"):
            raise ValueError(f"FindingMeasurements.units {self.units!r} is not 'mm' or 'px'")

    @classmethod
    def from_json(cls, data: object) -> FindingMeasurements:
        if not isinstance(data, Mapping):
            raise TypeError(f"anchor measurements must be a mapping, got {type(data).__name__}")
        units = data.get("units")
        if units not in ("mm", "px"):
            raise ValueError(f"anchor measurements units {units!r} is not 'mm' or 'px'")
        return cls(
            _number(data, "long_axis", "measurements"),
            _number(data, "short_axis", "measurements"),
            _number(data, "area", "measurements"),
            units,
        )


@dataclass(frozen=True)
class ReportedFinding:
    """One finding anchor as the SR and SEG write it.

    ``side`` is the laterality written with the finding site: the site's own side when it
    has one, else the anchor's laterality. ``attributes`` are (attribute, value) concepts
    in ATTRIBUTE_VALUES order.
    """

    anchor_id: str
    tracking_uid: str
    label: str
    finding: ChestConcept
    site: ChestConcept | None
    side: Literal["right", "left", "bilateral", "none"]
    region: FindingRegion
    source_sop_instance_uid: str
    measurements: FindingMeasurements | None
    attributes: tuple[tuple[ChestConcept, ChestConcept], ...]
    version: int

    @property
    def tracking_identifier(self) -> str:
        """The SR Tracking Identifier and SEG segment label, e.g. 'A1 right upper zone nodule'."""
        return f"{self.anchor_id} {self.label}"

    @property
    def laterality_code(self) -> Code | None:
        """The CID 244 code of ``side`` (None for "none")."""
        concept = ontology.laterality(self.side)
        return concept.code if concept is not None else None

    @classmethod
    def from_anchor(cls, data: Mapping[str, Any]) -> ReportedFinding:
        """Read an ``Anchor.to_json()`` dict of kind "finding"; TypeError/ValueError name
        the offending key."""
        if not isinstance(data, Mapping):
            raise TypeError(f"anchor must be a mapping, got {type(data).__name__}")
        if data.get("kind") != "finding":
            raise ValueError(f"anchor kind {data.get('kind')!r} is not 'finding'")
        anchor_id = _text(data, "anchor_id", "anchor")
        if not (anchor_id.startswith("A") and anchor_id[1:].isdigit()):
            raise ValueError(f"anchor['anchor_id'] {anchor_id!r} is not 'A' and a number")
        finding = ontology.finding(_text(data, "finding", "anchor"))
        site_term = data.get("site")
        site = ontology.site(site_term) if site_term is not None else None
        laterality = data.get("laterality", "none")
        if laterality not in ("right", "left", "bilateral", "none"):
            raise ValueError(f"anchor['laterality'] {laterality!r} is not a laterality")
        side = site.side if site is not None and site.side != "none" else laterality
        raw_attributes = data.get("attributes") or {}
        if not isinstance(raw_attributes, Mapping):
            raise TypeError("anchor['attributes'] must be a mapping")
        attributes = tuple(
            (ontology.ATTRIBUTE_NAMES[name], ontology.attribute_value(name, raw_attributes[name]))
            for name in ontology.ATTRIBUTES
            if name in raw_attributes
        )
        unknown = set(raw_attributes) - set(ontology.ATTRIBUTES)
        if unknown:
            raise ValueError(f"anchor['attributes'] has unknown attributes {sorted(unknown)}")
        measurements = data.get("measurements")
        version = data.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"anchor['version'] must be an int >= 1, got {version!r}")
        label = data.get("label") or finding.en
        if not isinstance(label, str):
            raise TypeError("anchor['label'] must be a str")
        return cls(
            anchor_id=anchor_id,
            tracking_uid=_text(data, "tracking_uid", "anchor"),
            label=" ".join(label.split()),
            finding=finding,
            site=site,
            side=side,
            region=FindingRegion.from_json(data.get("region")),
            source_sop_instance_uid=_text(data, "source_sop_instance_uid", "anchor"),
            measurements=(
                FindingMeasurements.from_json(measurements) if measurements is not None else None
            ),
            attributes=attributes,
            version=version,
        )


@dataclass(frozen=True)
class PrereadRecord:
    """Provenance, narrative and finding anchors of one pre-read result.

    Landmark and region anchors are not findings: they are left out here (see README.md,
    "Landmarks").
    """

    findings: tuple[ReportedFinding, ...]
    findings_text: str
    impression: str
    model_id: str
    model_revision: str
    prompt_version: str
    node_version: str
    is_demo: bool

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> PrereadRecord:
        """Read a ``workers.preread.analyse_study`` result; errors name the key."""
        if not isinstance(result, Mapping):
            raise TypeError(f"result must be a mapping, got {type(result).__name__}")
        anchors = result.get("anchors")
        if not isinstance(anchors, list | tuple):
            raise TypeError(f"result['anchors'] must be a list, got {type(anchors).__name__}")
        findings = tuple(
            ReportedFinding.from_anchor(a)
            for a in anchors
            if isinstance(a, Mapping) and a.get("kind") == "finding"
        )
        uids = [f.tracking_uid for f in findings]
        if len(set(uids)) != len(uids):
            raise ValueError("result['anchors'] has findings with the same tracking UID")
        is_demo = result.get("is_demo")
        if not isinstance(is_demo, bool):
            raise TypeError(f"result['is_demo'] must be a bool, got {type(is_demo).__name__}")
        return cls(
            findings=findings,
            findings_text=_text(result, "findings_text", "result", allow_empty=True).strip(),
            impression=_text(result, "impression", "result", allow_empty=True).strip(),
            model_id=_text(result, "model_id", "result"),
            model_revision=_text(result, "model_revision", "result"),
            prompt_version=_text(result, "prompt_version", "result"),
            node_version=_text(result, "node_version", "result"),
            is_demo=is_demo,
        )

    @property
    def algorithm_parameters(self) -> dict[str, str]:
        """Algorithm Parameters of TID 4019 / the SEG's Algorithm Identification."""
        return {"prompt_version": self.prompt_version, "node_version": self.node_version}
