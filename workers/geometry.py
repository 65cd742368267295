"""Sizes and distances from anchor geometry and the DICOM pixel spacing, never from model text.

Coordinates are source-image pixels, continuous, (row, col); pixel (r, c) covers
[r, r+1) x [c, c+1). Spacing is (row spacing, column spacing) in mm per pixel, from
ImagerPixelSpacing (projection radiographs: at the detector, not corrected for
magnification) or PixelSpacing. Without spacing, every value is in pixels and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Shape = Literal["ellipse", "rectangle", "point"]

# Findings that are drawn as an ellipse inscribed in their box; others as the box itself.
ROUND_FINDINGS = frozenset({"nodule", "mass", "calcification"})


@dataclass(frozen=True)
class Region:
    """An axis-aligned region in source pixels: an ellipse inscribed in the box, or the box."""

    row0: float
    col0: float
    row1: float
    col1: float
    shape: Shape

    def __post_init__(self) -> None:
        if self.row1 < self.row0 or self.col1 < self.col0:
            raise ValueError(f"region box {self.box} is inverted")
        if self.shape not in ("ellipse", "rectangle", "point"):
            raise ValueError(f"region shape {self.shape!r} is not ellipse, rectangle or point")

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.row0, self.col0, self.row1, self.col1)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.row0 + self.row1) / 2, (self.col0 + self.col1) / 2)

    def contains(self, row: float, col: float) -> bool:
        if not (self.row0 <= row <= self.row1 and self.col0 <= col <= self.col1):
            return False
        if self.shape != "ellipse":
            return True
        cr, cc = self.center
        hr, hc = (self.row1 - self.row0) / 2, (self.col1 - self.col0) / 2
        if hr == 0 or hc == 0:
            return False
        return ((row - cr) / hr) ** 2 + ((col - cc) / hc) ** 2 <= 1.0


@dataclass(frozen=True)
class Measurements:
    """Long axis, short axis and area of a region; units "mm" or "px"."""

    long_axis: float
    short_axis: float
    area: float
    units: Literal["mm", "px"]
    spacing_source: str

    @property
    def area_units(self) -> str:
        return "mm2" if self.units == "mm" else "px2"

    def text(self) -> str:
        note = "" if self.units == "mm" else " (no pixel spacing in the image: pixels)"
        return (
            f"{self.long_axis:.1f} x {self.short_axis:.1f} {self.units}, "
            f"area {self.area:.0f} {self.area_units}{note}"
        )

    def as_dict(self) -> dict[str, float | str]:
        return {
            "long_axis": round(self.long_axis, 2),
            "short_axis": round(self.short_axis, 2),
            "area": round(self.area, 1),
            "units": self.units,
            "area_units": self.area_units,
            "spacing_source": self.spacing_source,
        }


def measure(
    region: Region, spacing_mm: tuple[float, float] | None, spacing_source: str = "none"
) -> Measurements:
    """Long/short axis (mm) and area (mm2) of an axis-aligned region.

    For an ellipse the axes are the box extents and the area is pi/4 * w * h; for a
    rectangle the axes are its sides and the area w * h.
    """
    if spacing_mm is None:
        sr, sc, units = 1.0, 1.0, "px"
    else:
        sr, sc = spacing_mm
        units = "mm"
        if sr <= 0 or sc <= 0:
            raise ValueError(f"pixel spacing {spacing_mm} must be positive")
    height = (region.row1 - region.row0) * sr
    width = (region.col1 - region.col0) * sc
    area = width * height * (math.pi / 4 if region.shape == "ellipse" else 1.0)
    return Measurements(
        long_axis=max(width, height),
        short_axis=min(width, height),
        area=area,
        units=units,  # type: ignore[arg-type]
        spacing_source=spacing_source if spacing_mm is not None else "none",
    )


def distance(
    a: tuple[float, float], b: tuple[float, float], spacing_mm: tuple[float, float] | None
) -> tuple[float, str]:
    """Distance between two source-pixel points, in mm (or pixels without spacing)."""
    sr, sc = spacing_mm if spacing_mm is not None else (1.0, 1.0)
    d = math.hypot((a[0] - b[0]) * sr, (a[1] - b[1]) * sc)
    return d, "mm" if spacing_mm is not None else "px"


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (row0, col0, row1, col1) boxes."""
    r0, c0 = max(a[0], b[0]), max(a[1], b[1])
    r1, c1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, r1 - r0) * max(0.0, c1 - c0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ellipse_points(region: Region) -> list[tuple[float, float]]:
    """The 4 SCOORD ELLIPSE points (major axis ends, then minor axis ends), as (col, row)."""
    cr, cc = region.center
    hr, hc = (region.row1 - region.row0) / 2, (region.col1 - region.col0) / 2
    horizontal = [(cc - hc, cr), (cc + hc, cr)]
    vertical = [(cc, cr - hr), (cc, cr + hr)]
    return horizontal + vertical if hc >= hr else vertical + horizontal


def rectangle_points(region: Region) -> list[tuple[float, float]]:
    """A closed POLYGON around the box (first point repeated last), as (col, row)."""
    r0, c0, r1, c1 = region.box
    return [(c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0)]
