"""Sizes and distances from anchor geometry and the DICOM pixel spacing, never from model text.

Coordinates are source-image pixels, continuous, (row, col) (see sr_templates.model).
Spacing is (row spacing, column spacing) in mm per pixel, from ImagerPixelSpacing
(projection radiographs: at the detector, not corrected for magnification) or
PixelSpacing; rows and columns may differ (anisotropic pixels), so every length is
computed in mm space, never as pixels times one factor. Without spacing, every value is
in pixels and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sr_templates.model import Measurements, Region, Units

# Findings that are drawn as an ellipse inscribed in their box; others as the box itself.
ROUND_FINDINGS = frozenset({"nodule", "mass", "calcification"})

# Boundary points per ellipse when measuring the gap between regions: the error of the
# sampled boundary is below r * (1 - cos(pi / n)), 0.0005 mm for a 100 mm radius.
_ELLIPSE_POINTS = 1440


def _scale(spacing_mm: tuple[float, float] | None) -> tuple[float, float, Units]:
    if spacing_mm is None:
        return 1.0, 1.0, "px"
    sr, sc = spacing_mm
    if not (sr > 0 and sc > 0 and math.isfinite(sr) and math.isfinite(sc)):
        raise ValueError(f"pixel spacing {spacing_mm} must be positive and finite")
    return float(sr), float(sc), "mm"


def measure(
    region: Region, spacing_mm: tuple[float, float] | None, spacing_source: str = "none"
) -> Measurements:
    """Long/short axis (mm) and area (mm2) of an axis-aligned region.

    For an ellipse the axes are the box extents and the area is pi/4 * w * h; for a
    rectangle the axes are its sides and the area w * h.
    """
    sr, sc, units = _scale(spacing_mm)
    height = (region.row1 - region.row0) * sr
    width = (region.col1 - region.col0) * sc
    area = width * height * (math.pi / 4 if region.shape == "ellipse" else 1.0)
    # 0.01 mm (or px): far below what a radiograph resolves; the SR, FHIR and viewers then
    # all show the same digits
    return Measurements(
        long_axis=round(max(width, height), 2),
        short_axis=round(min(width, height), 2),
        area=round(area, 2),
        units=units,
        spacing_source=spacing_source if spacing_mm is not None else "none",
    )


def distance(
    a: tuple[float, float], b: tuple[float, float], spacing_mm: tuple[float, float] | None
) -> tuple[float, Units]:
    """Distance between two source-pixel points (row, col), in mm (or pixels without
    spacing)."""
    sr, sc, units = _scale(spacing_mm)
    return math.hypot((a[0] - b[0]) * sr, (a[1] - b[1]) * sc), units


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (row0, col0, row1, col1) boxes."""
    r0, c0 = max(a[0], b[0]), max(a[1], b[1])
    r1, c1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, r1 - r0) * max(0.0, c1 - c0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class RegionDistance:
    """How far apart two regions are.

    ``centres``: between the box centres; ``edges``: the shortest gap between the two
    outlines (0 when they touch or overlap). Both in ``units`` (mm, or px without pixel
    spacing). ``centre_line`` and ``edge_line`` are the two end points, (row, col) in
    source pixels, of the segment each value measures (for an SR line SCOORD).
    """

    centres: float
    edges: float
    units: Units
    centre_line: tuple[tuple[float, float], tuple[float, float]]
    edge_line: tuple[tuple[float, float], tuple[float, float]]
    overlap: bool


def _outline(region: Region, sr: float, sc: float) -> npt.NDArray[np.float64]:
    """Boundary points of a region in mm space, (row_mm, col_mm)."""
    r0, c0, r1, c1 = region.box
    shape = region.effective_shape
    if shape == "point":
        pts = np.array([region.center])
    elif shape == "ellipse":
        t = np.linspace(0.0, 2.0 * math.pi, _ELLIPSE_POINTS, endpoint=False)
        cr, cc = region.center
        pts = np.stack([cr + (r1 - r0) / 2 * np.sin(t), cc + (c1 - c0) / 2 * np.cos(t)], axis=1)
    else:
        n = 256  # per side; the nearest points of two boxes are found exactly below
        edge = np.linspace(0.0, 1.0, n, endpoint=False)
        top = np.stack([np.full(n, r0), c0 + (c1 - c0) * edge], axis=1)
        right = np.stack([r0 + (r1 - r0) * edge, np.full(n, c1)], axis=1)
        bottom = np.stack([np.full(n, r1), c1 - (c1 - c0) * edge], axis=1)
        left = np.stack([r1 - (r1 - r0) * edge, np.full(n, c0)], axis=1)
        pts = np.concatenate([top, right, bottom, left])
    return pts * np.array([sr, sc])


def _box_gap(
    a: Region, b: Region, sr: float, sc: float
) -> tuple[float, tuple[float, float], tuple[float, float]] | None:
    """Exact gap between two rectangles/points (axis-aligned) and its end points."""
    if a.effective_shape == "ellipse" or b.effective_shape == "ellipse":
        return None
    ar0, ac0, ar1, ac1 = a.box if a.effective_shape != "point" else (*a.center, *a.center)
    br0, bc0, br1, bc1 = b.box if b.effective_shape != "point" else (*b.center, *b.center)

    def span(lo0: float, hi0: float, lo1: float, hi1: float) -> tuple[float, float]:
        if hi0 < lo1:
            return hi0, lo1
        if hi1 < lo0:
            return lo0, hi1
        mid = (max(lo0, lo1) + min(hi0, hi1)) / 2  # overlapping extents
        return mid, mid

    pr_a, pr_b = span(ar0, ar1, br0, br1)
    pc_a, pc_b = span(ac0, ac1, bc0, bc1)
    gap = math.hypot((pr_a - pr_b) * sr, (pc_a - pc_b) * sc)
    return gap, (pr_a, pc_a), (pr_b, pc_b)


def region_distance(a: Region, b: Region, spacing_mm: tuple[float, float] | None) -> RegionDistance:
    """Distance between the centres and between the nearest edges of two regions.

    Computed in mm space (rows scaled by the row spacing, columns by the column spacing),
    so anisotropic pixels give true distances; ellipses use their exact outline sampled
    at 1440 points.
    """
    sr, sc, units = _scale(spacing_mm)
    centres, _ = distance(a.center, b.center, spacing_mm)
    overlap = (
        a.contains(*b.center)
        or b.contains(*a.center)
        or any(b.contains(r / sr, c / sc) for r, c in _outline(a, sr, sc)[::8])
        or any(a.contains(r / sr, c / sc) for r, c in _outline(b, sr, sc)[::8])
    )
    exact = _box_gap(a, b, sr, sc)
    if overlap:
        edges, pa, pb = 0.0, a.center, b.center
    elif exact is not None:
        edges, pa, pb = exact
    else:
        oa, ob = _outline(a, sr, sc), _outline(b, sr, sc)
        d2 = ((oa[:, None, :] - ob[None, :, :]) ** 2).sum(axis=2)
        i, j = np.unravel_index(int(np.argmin(d2)), d2.shape)
        edges = float(math.sqrt(d2[i, j]))
        pa = (float(oa[i, 0] / sr), float(oa[i, 1] / sc))
        pb = (float(ob[j, 0] / sr), float(ob[j, 1] / sc))
    return RegionDistance(
        centres=centres,
        edges=edges,
        units=units,
        centre_line=(a.center, b.center),
        edge_line=(pa, pb),
        overlap=overlap,
    )
