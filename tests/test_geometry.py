"""Sizes and distances from geometry and pixel spacing, against values computed by hand.

Anisotropic spacing on purpose: rows and columns have different mm per pixel, so a
distance is only right when every axis is scaled by its own spacing.
"""

from __future__ import annotations

import math

import pytest

from sr_templates.model import Region
from workers.geometry import distance, measure, region_distance

ROW_MM, COL_MM = 0.5, 0.2  # mm per pixel down the rows, across the columns


def test_box_to_box_distance_scales_rows_and_columns_separately() -> None:
    a = Region(0, 0, 10, 10, "rectangle")  # centre (5, 5)
    b = Region(20, 30, 30, 40, "rectangle")  # centre (25, 35)
    d = region_distance(a, b, (ROW_MM, COL_MM))
    # centres: 20 rows x 0.5 = 10 mm, 30 columns x 0.2 = 6 mm
    assert d.centres == pytest.approx(math.sqrt(10**2 + 6**2))
    # nearest edges: rows 10 -> 20 (5 mm), columns 10 -> 30 (4 mm)
    assert d.edges == pytest.approx(math.sqrt(5**2 + 4**2))
    assert d.units == "mm" and not d.overlap
    assert d.centre_line == ((5, 5), (25, 35))
    assert d.edge_line == ((10, 10), (20, 30))


def test_ellipse_to_point_edge_distance_follows_the_anisotropic_outline() -> None:
    # a circle of radius 10 px is, in mm, an ellipse: 5 mm down the rows, 2 mm across
    circle = Region(90, 90, 110, 110, "ellipse")
    right = Region(100, 150, 100, 150, "point")  # 50 px to the right of the centre
    below = Region(150, 100, 150, 100, "point")  # 50 px below the centre
    d_right = region_distance(circle, right, (ROW_MM, COL_MM))
    assert d_right.centres == pytest.approx(50 * COL_MM)
    assert d_right.edges == pytest.approx(40 * COL_MM, abs=1e-3)
    d_below = region_distance(circle, below, (ROW_MM, COL_MM))
    assert d_below.centres == pytest.approx(50 * ROW_MM)
    assert d_below.edges == pytest.approx(40 * ROW_MM, abs=1e-3)


def test_ellipse_to_ellipse_gap_along_a_diagonal() -> None:
    a = Region(0, 0, 20, 20, "ellipse")  # circle r = 10 px at (10, 10)
    b = Region(40, 40, 60, 60, "ellipse")  # circle r = 10 px at (50, 50)
    d = region_distance(a, b, (1.0, 1.0))
    assert d.centres == pytest.approx(40 * math.sqrt(2))
    assert d.edges == pytest.approx(40 * math.sqrt(2) - 20, abs=1e-3)


def test_touching_or_overlapping_regions_have_no_gap() -> None:
    a = Region(0, 0, 20, 20, "ellipse")
    b = Region(15, 15, 40, 40, "rectangle")
    d = region_distance(a, b, (ROW_MM, COL_MM))
    assert d.overlap and d.edges == 0.0
    assert d.centres == pytest.approx(math.hypot(17.5 * ROW_MM, 17.5 * COL_MM))


def test_without_spacing_everything_is_in_pixels() -> None:
    d = region_distance(Region(0, 0, 10, 10, "rectangle"), Region(0, 20, 10, 30, "rectangle"), None)
    assert d.units == "px" and d.centres == 20 and d.edges == 10
    assert distance((0, 0), (3, 4), None) == (5.0, "px")


def test_measure_uses_both_spacings_for_axes_and_area() -> None:
    m = measure(Region(0, 0, 20, 50, "ellipse"), (ROW_MM, COL_MM), "ImagerPixelSpacing")
    # 20 rows x 0.5 = 10 mm high, 50 columns x 0.2 = 10 mm wide: a 10 mm circle
    assert (m.long_axis, m.short_axis, m.units) == (10, 10, "mm")
    assert m.area == pytest.approx(math.pi / 4 * 100, abs=0.005)  # sizes are kept to 0.01
    box = measure(Region(0, 0, 20, 10, "rectangle"), (ROW_MM, COL_MM))
    assert (box.long_axis, box.short_axis, box.area) == (10, 2, pytest.approx(20))


def test_bad_spacing_is_refused() -> None:
    with pytest.raises(ValueError, match="spacing"):
        region_distance(Region(0, 0, 1, 1, "rectangle"), Region(2, 2, 3, 3, "rectangle"), (0, 1))
