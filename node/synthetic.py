"""Synthetic chest radiographs (CR/DX) for tests, the demo and benchmarks.

Everything here is generated from numbers: no patient data, no downloads. The images
are labelled synthetic in the Patient's Name, Patient ID, Image Comments and the
equipment attributes, so a file that escapes a test run cannot be mistaken for a
clinical image.

Coordinates are source pixels of the stored image: ``row`` grows towards the
patient's feet, ``col`` towards the patient's left on a PA/AP view (Patient
Orientation ``L\\F``) and towards the patient's back on a lateral view (``P\\F``).
Sizes in millimetres use the Imager Pixel Spacing, which is the same in both
directions.

The pixels are a phantom: body outline, two lung fields that are darker than the
mediastinum and soft tissue, a heart shadow, diaphragm domes, ribs, clavicles,
smooth parenchymal texture and fine quantum noise, with nodules as brighter round
blobs with soft edges. All intensities are first built as a *displayed* image
(0 = black, 1 = white); MONOCHROME2 stores it as is, MONOCHROME1 stores it
inverted, so a conforming viewer shows the same picture for both.

The anatomy is cached per image size and view, so many instances of one size cost
one phantom plus per-instance texture, noise and nodules (about 0.1 s for
2500 x 2048 on one core, uncompressed).

Command line::

    python -m node.synthetic OUTDIR [--count N] [--syntax explicit|implicit|deflated|rle|jpegls|j2k]
        [--modality CR|DX] [--two-view] [--seed S] [--rows R --cols C] [--per-study K]

writes N files (N distinct SOP instances), prints one path per line on stdout and
a summary line on stderr.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypedDict, Unpack

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from node import __version__

__all__ = [
    "CR_IMAGE_STORAGE",
    "DX_FOR_PRESENTATION_STORAGE",
    "DX_FOR_PROCESSING_STORAGE",
    "SECONDARY_CAPTURE_STORAGE",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "SYNTAX_BY_NAME",
    "ChestImageOptions",
    "Nodule",
    "SyntheticImage",
    "default_nodules",
    "main",
    "make_chest_radiograph",
    "make_non_chest_radiograph",
    "make_secondary_capture",
    "make_two_view_study",
    "write_study",
]

CR_IMAGE_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.1")
DX_FOR_PRESENTATION_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_FOR_PROCESSING_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
SECONDARY_CAPTURE_STORAGE: Final = UID("1.2.840.10008.5.1.4.1.1.7")

#: Command-line names of the transfer syntaxes the generator writes (all lossless).
SYNTAX_BY_NAME: Final[dict[str, UID]] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "j2k": JPEG2000Lossless,
}
SUPPORTED_TRANSFER_SYNTAXES: Final[frozenset[UID]] = frozenset(SYNTAX_BY_NAME.values())
_NATIVE_SYNTAXES: Final = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)

# Used as the first UID entropy source so synthetic UIDs never collide with other
# deterministic pydicom UIDs built from the same numbers.
_UID_NAMESPACE: Final = "medgemma-node/synthetic/v1"
_STUDY_DATE: Final = "20250115"
_STUDY_TIME: Final = "091500"
_MANUFACTURER: Final = "medgemma-node synthetic phantom"
_SYNTHETIC_COMMENT: Final = "SYNTHETIC PHANTOM IMAGE - NOT A PATIENT - NOT FOR CLINICAL USE"

_LATERAL_VIEWS: Final = frozenset({"LL", "RL"})
_FRONTAL_VIEWS: Final = frozenset({"PA", "AP"})
_VIEW_CODES: Final[dict[str, Code]] = {
    "PA": codes.SCT.PosteroAnterior,
    "AP": codes.SCT.AnteroPosterior,
    "LL": codes.SCT.LeftLateral,
    "RL": codes.SCT.RightLateral,
}
# Patient Orientation (row direction, column direction) in the conventional display:
# frontal views as if facing the patient, laterals with the patient facing the viewer's
# left (sternum on the left, spine on the right).
_PATIENT_ORIENTATION: Final[dict[str, tuple[str, str]]] = {
    "PA": ("L", "F"),
    "AP": ("L", "F"),
    "LL": ("P", "F"),
    "RL": ("P", "F"),
}


@dataclass(frozen=True)
class _BodyPart:
    """A non-chest body part: its description, code and whether it is paired."""

    description: str
    code: Code
    paired: bool
    limb: bool


_NON_CHEST_PARTS: Final[dict[str, _BodyPart]] = {
    "KNEE": _BodyPart("KNEE", codes.SCT.Knee, paired=True, limb=True),
    "HAND": _BodyPart("HAND", codes.SCT.Hand, paired=True, limb=True),
    "PELVIS": _BodyPart("PELVIS", codes.SCT.Pelvis, paired=False, limb=False),
    "SKULL": _BodyPart("SKULL", codes.SCT.Skull, paired=False, limb=False),
    "ABDOMEN": _BodyPart("ABDOMEN", codes.SCT.Abdomen, paired=False, limb=False),
}

FloatArray = npt.NDArray[np.float32]
StoredPixels = npt.NDArray[np.uint8] | npt.NDArray[np.uint16]
Box = tuple[float, float, float, float]


# --------------------------------------------------------------------------------------
# Ground truth


@dataclass(frozen=True)
class Nodule:
    """A round, brighter-than-lung blob: ground truth for a synthetic nodule.

    ``center_row``/``center_col``/``radius_px`` are in source pixels of the stored
    image. ``contrast`` is the peak brightness added at the centre, as a fraction
    of the full displayed range (0 = black .. 1 = white); the disk of radius
    ``radius_px`` holds the nodule and its soft edge falls off within about
    ``0.15 * radius_px`` around that circle.
    """

    center_row: float
    center_col: float
    radius_px: float
    label: str = "nodule"
    contrast: float = 0.2

    def __post_init__(self) -> None:
        for name in ("center_row", "center_col", "radius_px", "contrast"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"Nodule.{name} must be a number, got {type(value).__name__}")
            if not np.isfinite(value):
                raise ValueError(f"Nodule.{name} must be finite, got {value!r}")
        if not isinstance(self.label, str) or not self.label:
            raise ValueError("Nodule.label must be a non-empty string")
        if self.radius_px < 1.0:
            raise ValueError(f"Nodule.radius_px must be >= 1 pixel, got {self.radius_px!r}")
        if not 0.0 < self.contrast <= 1.0:
            raise ValueError(f"Nodule.contrast must be in (0, 1], got {self.contrast!r}")

    def bbox(self) -> Box:
        """The nodule's bounding box ``(row0, col0, row1, col1)`` in source pixels."""
        r = self.radius_px
        return (self.center_row - r, self.center_col - r, self.center_row + r, self.center_col + r)

    def diameter_mm(self, pixel_spacing_mm: float) -> float:
        """The nodule's diameter in millimetres for an isotropic pixel spacing in mm."""
        return 2.0 * self.radius_px * pixel_spacing_mm


@dataclass(frozen=True)
class SyntheticImage:
    """A generated instance and its ground truth.

    ``dataset`` is complete (with ``file_meta``), ready for ``save_as`` or C-STORE.
    ``nodules`` and ``lung_fields`` (``(row0, col0, row1, col1)`` per lung, one box
    for a lateral view, none for a non-chest image) are in source pixels.
    """

    dataset: Dataset
    nodules: tuple[Nodule, ...]
    lung_fields: tuple[Box, ...]
    view_position: str = field(default="")

    @property
    def sop_instance_uid(self) -> str:
        """The SOP Instance UID of ``dataset``."""
        return str(self.dataset.SOPInstanceUID)


# --------------------------------------------------------------------------------------
# Phantom geometry (fractions of rows/cols, so every size has the same anatomy)


def _nodule_radius(rows: int, cols: int) -> float:
    return round(0.018 * min(rows, cols), 1)


def default_nodules(
    rows: int = 2500, cols: int = 2048, view_position: str = "PA"
) -> tuple[Nodule, ...]:
    """The nodules used when ``make_chest_radiograph(nodules=None)``; source pixels.

    They do not depend on the seed. Frontal (PA/AP) views: one in the right upper
    zone (screen left) at (0.34 * rows, 0.27 * cols) and one in the left lower zone
    (screen right, lateral to the heart) at (0.56 * rows, 0.77 * cols). Lateral views:
    the same two at the same heights, at 0.55 * cols and 0.68 * cols. Radius
    ``0.018 * min(rows, cols)`` pixels for the first, 0.8 times that for the second
    (36.9 px, 11 mm diameter, and 29.5 px at
    2500 x 2048 and 0.15 mm).
    """
    view = view_position.upper()
    radius = _nodule_radius(rows, cols)
    if view in _LATERAL_VIEWS:
        cols_frac = (0.55, 0.68)
    elif view in _FRONTAL_VIEWS:
        cols_frac = (0.27, 0.77)
    else:
        raise ValueError(f"view_position must be one of PA, AP, LL, RL, got {view_position!r}")
    return (
        Nodule(round(0.34 * rows, 1), round(cols_frac[0] * cols, 1), radius),
        Nodule(round(0.56 * rows, 1), round(cols_frac[1] * cols, 1), round(radius * 0.8, 1)),
    )


def _smoothstep(x: FloatArray) -> FloatArray:
    np.clip(x, 0.0, 1.0, out=x)
    return x * x * (np.float32(3.0) - np.float32(2.0) * x)


def _window(
    shape: tuple[int, int], r0: float, r1: float, c0: float, c1: float
) -> tuple[slice, slice, FloatArray, FloatArray]:
    """Slices clipped to the image and the pixel-centre coordinates inside them."""
    rows, cols = shape
    ra, rb = max(0, int(np.floor(r0))), min(rows, int(np.ceil(r1)) + 1)
    ca, cb = max(0, int(np.floor(c0))), min(cols, int(np.ceil(c1)) + 1)
    rr = np.arange(ra, max(ra, rb), dtype=np.float32)
    cc = np.arange(ca, max(ca, cb), dtype=np.float32)
    return slice(ra, max(ra, rb)), slice(ca, max(ca, cb)), rr, cc


def _ellipse_weight(
    shape: tuple[int, int],
    center: tuple[float, float],
    semi: tuple[float, float],
    edge: float,
) -> tuple[slice, slice, FloatArray]:
    """Weight (0..1) of an ellipse with a soft edge ``edge`` pixels wide, on its bbox.

    ``center`` is (row, col) and ``semi`` the semi-axes (rows, cols), in pixels.
    """
    (cr, cc), (ar, ac) = center, semi
    sr, sc, rr, ccs = _window(shape, cr - ar - edge, cr + ar + edge, cc - ac - edge, cc + ac + edge)
    dr = ((rr - np.float32(cr)) / np.float32(ar)) ** 2
    dc = ((ccs - np.float32(cc)) / np.float32(ac)) ** 2
    e = np.sqrt(dr[:, None] + dc[None, :])
    # (1 - e) * min semi-axis approximates the signed distance to the outline in pixels.
    w = _smoothstep((np.float32(1.0) - e) * np.float32(min(ar, ac) / edge) + np.float32(0.5))
    return sr, sc, w


def _add_ellipse(
    img: FloatArray,
    center: tuple[float, float],
    semi: tuple[float, float],
    amplitude: float,
    edge: float,
) -> tuple[slice, slice, FloatArray]:
    """Add ``amplitude`` inside a soft-edged ellipse; returns its slices and weight map."""
    sr, sc, w = _ellipse_weight(img.shape, center, semi, edge)
    img[sr, sc] += np.float32(amplitude) * w
    return sr, sc, w


def _add_segment(
    img: FloatArray,
    p0: tuple[float, float],
    p1: tuple[float, float],
    half_width: float,
    amplitude: float,
) -> None:
    """Add a bright bar (a bone such as a clavicle) from ``p0`` to ``p1`` (row, col)."""
    (r0, c0), (r1, c1) = p0, p1
    pad = half_width * 2
    sr, sc, rr, cc = _window(
        img.shape, min(r0, r1) - pad, max(r0, r1) + pad, min(c0, c1) - pad, max(c0, c1) + pad
    )
    vr, vc = r1 - r0, c1 - c0
    length2 = vr * vr + vc * vc
    t = ((rr[:, None] - r0) * vr + (cc[None, :] - c0) * vc) / np.float32(length2)
    np.clip(t, 0.0, 1.0, out=t)
    d = np.hypot(rr[:, None] - (r0 + t * vr), cc[None, :] - (c0 + t * vc))
    w = _smoothstep((np.float32(half_width) - d) / np.float32(half_width * 0.6) + np.float32(0.5))
    img[sr, sc] += np.float32(amplitude) * w


@dataclass(frozen=True)
class _Phantom:
    """Cached anatomy for one size and view (arrays are read-only)."""

    display: FloatArray  # displayed brightness, 0 = black .. 1 = white
    texture_gain: FloatArray  # how strongly parenchymal texture shows per pixel
    lung_fields: tuple[Box, ...]


def _lung(
    shape: tuple[int, int],
    center: tuple[float, float],
    semi: tuple[float, float],
    dome_apex_row: float,
    dome_center_col: float,
    dome_drop: float,
    edge: float,
) -> tuple[slice, slice, FloatArray]:
    """Weight map of one lung: an ellipse cut at the bottom by a diaphragm dome.

    The dome is ``row = dome_apex_row + dome_drop * ((col - dome_center_col) / semi_col)^2``
    (pixels), so the costophrenic recesses lie lower than the dome's apex.
    """
    sr, sc, w = _ellipse_weight(shape, center, semi, edge)
    rr = np.arange(sr.start, sr.stop, dtype=np.float32)
    cc = np.arange(sc.start, sc.stop, dtype=np.float32)
    u = (cc - np.float32(dome_center_col)) / np.float32(semi[1])
    dome = np.float32(dome_apex_row) + np.float32(dome_drop) * u * u
    below = _smoothstep((dome[None, :] - rr[:, None]) / np.float32(edge) + np.float32(0.5))
    return sr, sc, w * below


def _ribs(
    rr: FloatArray, cc: FloatArray, rows: int, cols: int, midline: float, lateral: bool
) -> FloatArray:
    """Rib-like bands (0..1): thin arcs that run down away from the spine."""
    period = 0.075 * rows
    if lateral:
        u = (cc - np.float32(midline)) / np.float32(0.45 * cols)
        sag = np.float32(-0.05 * rows) * u
    else:
        u = (cc - np.float32(midline)) / np.float32(0.35 * cols)
        sag = np.float32(0.07 * rows) * u * u
    phase = (rr[:, None] - sag[None, :]) * np.float32(2 * np.pi / period)
    band = np.cos(phase)
    np.clip(band, 0.0, 1.0, out=band)
    band *= band
    band *= band
    return band


@functools.lru_cache(maxsize=4)
def _chest_phantom(rows: int, cols: int, lateral: bool) -> _Phantom:
    """Build the chest anatomy for one size and view; cached, returns read-only arrays."""
    shape = (rows, cols)
    edge = max(2.0, 0.012 * min(rows, cols))
    img = np.full(shape, 0.05, dtype=np.float32)  # direct exposure (air) is nearly black
    lung_w = np.zeros(shape, dtype=np.float32)

    _add_ellipse(img, (0.60 * rows, 0.50 * cols), (0.64 * rows, 0.47 * cols), 0.48, edge * 2)
    if not lateral:
        # mediastinum + spine: a vertical bright band over the whole trunk
        sr, sc, _rr, cc = _window(shape, 0.0, rows, 0.36 * cols, 0.64 * cols)
        band = _smoothstep(
            (np.float32(0.075 * cols) - np.abs(cc - np.float32(0.5 * cols))) / np.float32(edge * 2)
            + np.float32(0.5)
        )
        img[sr, sc] += np.float32(0.12) * band[None, :]
        lungs = [
            _lung(
                shape,
                (0.46 * rows, 0.30 * cols),
                (0.30 * rows, 0.16 * cols),
                0.68 * rows,
                0.33 * cols,
                0.10 * rows,
                edge,
            ),
            _lung(
                shape,
                (0.47 * rows, 0.70 * cols),
                (0.29 * rows, 0.155 * cols),
                0.71 * rows,
                0.67 * cols,
                0.10 * rows,
                edge,
            ),
        ]
    else:
        # thoracic spine posteriorly (screen right), sternum anteriorly (screen left)
        _add_segment(
            img, (0.12 * rows, 0.83 * cols), (0.95 * rows, 0.85 * cols), 0.035 * cols, 0.14
        )
        _add_segment(
            img, (0.25 * rows, 0.17 * cols), (0.52 * rows, 0.15 * cols), 0.012 * cols, 0.08
        )
        lungs = [
            _lung(
                shape,
                (0.46 * rows, 0.52 * cols),
                (0.31 * rows, 0.27 * cols),
                0.68 * rows,
                0.45 * cols,
                0.08 * rows,
                edge,
            ),
        ]
    for sr, sc, w in lungs:
        np.maximum(lung_w[sr, sc], w, out=lung_w[sr, sc])
    # The heart hides the lung behind it: soft tissue there, slightly denser.
    heart_center = (0.62 * rows, 0.37 * cols) if lateral else (0.61 * rows, 0.56 * cols)
    heart_semi = (0.14 * rows, 0.14 * cols) if lateral else (0.13 * rows, 0.15 * cols)
    sr, sc, heart = _add_ellipse(img, heart_center, heart_semi, 0.05, edge)
    lung_w[sr, sc] *= np.float32(1.0) - heart
    img -= np.float32(0.30) * lung_w

    rr_all = np.arange(rows, dtype=np.float32)
    cc_all = np.arange(cols, dtype=np.float32)
    for sr, sc, _w in lungs:
        ribs = _ribs(
            rr_all[sr], cc_all[sc], rows, cols, 0.5 * cols if not lateral else 0.85 * cols, lateral
        )
        img[sr, sc] += np.float32(0.05) * ribs * lung_w[sr, sc]

    if not lateral:
        # clavicles
        _add_segment(
            img, (0.17 * rows, 0.13 * cols), (0.14 * rows, 0.44 * cols), 0.011 * rows, 0.07
        )
        _add_segment(
            img, (0.17 * rows, 0.87 * cols), (0.14 * rows, 0.56 * cols), 0.011 * rows, 0.07
        )

    fields: list[Box] = []
    for sr, sc, _w in lungs:
        m = lung_w[sr, sc] > 0.5
        r_idx = np.flatnonzero(m.any(axis=1))
        c_idx = np.flatnonzero(m.any(axis=0))
        fields.append(
            (
                float(sr.start + r_idx[0]),
                float(sc.start + c_idx[0]),
                float(sr.start + r_idx[-1] + 1),
                float(sc.start + c_idx[-1] + 1),
            )
        )

    gain = np.float32(0.012) + np.float32(0.03) * lung_w
    img.flags.writeable = False
    gain.flags.writeable = False
    return _Phantom(img, gain, tuple(fields))


@functools.lru_cache(maxsize=4)
def _non_chest_phantom(rows: int, cols: int, limb: bool) -> FloatArray:
    """A knee-like limb (two long bones and a joint space) or a trunk with bones."""
    shape = (rows, cols)
    edge = max(2.0, 0.01 * min(rows, cols))
    img = np.full(shape, 0.05, dtype=np.float32)
    if limb:
        _add_ellipse(img, (0.5 * rows, 0.5 * cols), (0.75 * rows, 0.30 * cols), 0.40, edge * 2)
        # femur and tibia; their rounded ends leave a joint space between them
        _add_segment(img, (-0.1 * rows, 0.5 * cols), (0.36 * rows, 0.5 * cols), 0.12 * cols, 0.30)
        _add_segment(img, (0.60 * rows, 0.5 * cols), (1.1 * rows, 0.5 * cols), 0.11 * cols, 0.30)
        _add_ellipse(img, (0.40 * rows, 0.5 * cols), (0.06 * rows, 0.07 * cols), 0.10, edge)
    else:
        _add_ellipse(img, (0.5 * rows, 0.5 * cols), (0.46 * rows, 0.46 * cols), 0.45, edge * 2)
        _add_segment(img, (0.3 * rows, 0.2 * cols), (0.7 * rows, 0.35 * cols), 0.05 * cols, 0.3)
        _add_segment(img, (0.3 * rows, 0.8 * cols), (0.7 * rows, 0.65 * cols), 0.05 * cols, 0.3)
        _add_segment(img, (0.1 * rows, 0.5 * cols), (0.9 * rows, 0.5 * cols), 0.04 * cols, 0.2)
    img.flags.writeable = False
    return img


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int, cell_px: float) -> FloatArray:
    """Zero-mean, unit-ish smooth noise: a coarse random grid, bilinearly upsampled.

    Separable linear interpolation as two small matrix products keeps it cheap at
    full size (about 10 ms for 2500 x 2048).
    """
    gr, gc = max(2, int(rows / cell_px) + 2), max(2, int(cols / cell_px) + 2)
    grid = rng.standard_normal((gr, gc), dtype=np.float32)
    return np.asarray(
        _interp_matrix(rows, gr) @ grid @ _interp_matrix(cols, gc).T, dtype=np.float32
    )


@functools.lru_cache(maxsize=16)
def _interp_matrix(n_out: int, n_in: int) -> FloatArray:
    pos = np.linspace(0.0, n_in - 1.0, n_out, dtype=np.float64)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 2)
    frac = (pos - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    idx = np.arange(n_out)
    m[idx, i0] = 1.0 - frac
    m[idx, i0 + 1] = frac
    m.flags.writeable = False
    return m


def _add_nodule(img: FloatArray, nodule: Nodule) -> None:
    """Add a soft-edged dome: brightest at the centre, gone ~0.15 radii past the rim."""
    radius = nodule.radius_px
    soft = max(1.0, 0.15 * radius)
    sr, sc, rr, cc = _window(
        img.shape,
        nodule.center_row - radius - 2 * soft,
        nodule.center_row + radius + 2 * soft,
        nodule.center_col - radius - 2 * soft,
        nodule.center_col + radius + 2 * soft,
    )
    d = np.hypot(
        (rr - np.float32(nodule.center_row))[:, None], (cc - np.float32(nodule.center_col))[None, :]
    )
    rim = _smoothstep((np.float32(radius) - d) / np.float32(2 * soft) + np.float32(0.5))
    dome = np.float32(1.0) - (d / np.float32(radius + soft)) ** 2
    np.clip(dome, 0.0, 1.0, out=dome)
    np.sqrt(dome, out=dome)
    img[sr, sc] += np.float32(nodule.contrast) * rim * (np.float32(0.55) + np.float32(0.45) * dome)


def _render(
    base: FloatArray,
    texture_gain: FloatArray | None,
    nodules: Sequence[Nodule],
    rng: np.random.Generator,
    *,
    bits_stored: int,
    photometric: str,
) -> StoredPixels:
    """Texture + nodules + quantum noise on a cached base -> stored pixels.

    uint8 for ``bits_stored`` <= 8 (Bits Allocated 8), uint16 otherwise.
    """
    rows, cols = base.shape
    img = _smooth_noise(rng, rows, cols, cell_px=max(4.0, min(rows, cols) / 60))
    if texture_gain is not None:
        img *= texture_gain
    else:
        img *= np.float32(0.012)
    img += base
    for nodule in nodules:
        _add_nodule(img, nodule)
    noise = rng.standard_normal((rows, cols), dtype=np.float32)
    noise *= np.float32(0.006)
    img += noise
    max_value = (1 << bits_stored) - 1
    np.clip(img, 0.0, 1.0, out=img)
    img *= np.float32(max_value)
    np.rint(img, out=img)
    stored: StoredPixels = img.astype(np.uint8) if bits_stored <= 8 else img.astype(np.uint16)
    if photometric == "MONOCHROME1":
        np.subtract(stored.dtype.type(max_value), stored, out=stored)
    return stored


# --------------------------------------------------------------------------------------
# Dataset assembly


def _uid(*parts: object) -> UID:
    """A deterministic UID from the given parts (different parts, different UID)."""
    return generate_uid(entropy_srcs=[_UID_NAMESPACE, *(str(p) for p in parts)])


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _check_choice(name: str, value: str, allowed: Iterable[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _check_transfer_syntax(transfer_syntax: str) -> UID:
    uid = UID(str(transfer_syntax))
    if uid not in SUPPORTED_TRANSFER_SYNTAXES:
        names = ", ".join(f"{n} ({u})" for n, u in SYNTAX_BY_NAME.items())
        raise ValueError(f"transfer_syntax must be one of {names}; got {transfer_syntax!r}")
    return uid


def _check_size(rows: int, cols: int) -> None:
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 64 <= value <= 65535:
            raise ValueError(f"{name} must be between 64 and 65535 pixels, got {value}")


def _base_dataset(
    *,
    sop_class: UID,
    sop_instance_uid: str,
    study_uid: str,
    series_uid: str,
    modality: str,
    patient_id: str,
    patient_name: str,
    accession_number: str,
    study_description: str,
    series_description: str,
    series_number: int,
    instance_number: int,
) -> Dataset:
    """Patient, General Study, General Series, General Equipment and SOP Common."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceCreationDate = _STUDY_DATE
    ds.InstanceCreationTime = _STUDY_TIME
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = _STUDY_DATE
    ds.SeriesDate = _STUDY_DATE
    ds.ContentDate = _STUDY_DATE
    ds.StudyTime = _STUDY_TIME
    ds.SeriesTime = _STUDY_TIME
    ds.ContentTime = _STUDY_TIME
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = "Synthetic Test Site"
    ds.ReferringPhysicianName = ""
    ds.StationName = "SYNTH01"
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "node.synthetic"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "NO"
    ds.PatientComments = "Synthetic phantom, not a real patient"
    ds.DeviceSerialNumber = "SYN-0001"
    ds.SoftwareVersions = f"medgemma-node {__version__}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImageComments = _SYNTHETIC_COMMENT
    return ds


def _file_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # _set_pixels sets the real one
    meta.ImplementationClassUID = _uid("implementation")
    meta.ImplementationVersionName = f"MGNODE_{__version__}"[:16]
    ds.file_meta = meta


def _set_pixels(ds: Dataset, pixels: StoredPixels, transfer_syntax: UID) -> None:
    """Store ``pixels`` in ``ds`` encoded in ``transfer_syntax`` (lossless only)."""
    if transfer_syntax in _NATIVE_SYNTAXES:
        ds.PixelData = pixels.tobytes()
        # Implicit VR Little Endian always reads Pixel Data as OW
        wide = ds.BitsAllocated > 8 or transfer_syntax == ImplicitVRLittleEndian
        ds["PixelData"].VR = "OW" if wide else "OB"
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        return
    ds.compress(transfer_syntax, pixels, generate_instance_uid=False)


def _set_image_pixel(
    ds: Dataset, rows: int, cols: int, bits_allocated: int, bits_stored: int, photometric: str
) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0


def _set_window(
    ds: Dataset, bits_stored: int, photometric: str, center: float, width: float
) -> None:
    """Window Center/Width in stored values for a displayed-brightness window (0..1)."""
    max_value = (1 << bits_stored) - 1
    stored_center = center * max_value
    if photometric == "MONOCHROME1":
        stored_center = max_value - stored_center
    ds.WindowCenter = round(stored_center)
    ds.WindowWidth = round(width * max_value)
    ds.WindowCenterWidthExplanation = "SYNTHETIC DEFAULT"
    ds.VOILUTFunction = "LINEAR"


def _make_radiograph_dataset(
    *,
    pixels: StoredPixels,
    modality: str,
    bits_stored: int,
    photometric: str,
    pixel_spacing_mm: float | None,
    transfer_syntax: UID,
    view_position: str,
    body_part: str,
    anatomy_code: Code,
    laterality: str | None,
    patient_orientation: tuple[str, str],
    study_uid: str,
    series_uid: str,
    sop_instance_uid: str,
    patient_id: str,
    patient_name: str,
    accession_number: str,
    study_description: str,
    protocol_name: str,
    for_processing: bool,
    instance_number: int,
    series_number: int,
) -> Dataset:
    """A CR Image or DX Image (For Presentation / For Processing) dataset."""
    rows, cols = pixels.shape
    if modality == "CR":
        sop_class = CR_IMAGE_STORAGE
    elif for_processing:
        sop_class = DX_FOR_PROCESSING_STORAGE
    else:
        sop_class = DX_FOR_PRESENTATION_STORAGE
    ds = _base_dataset(
        sop_class=sop_class,
        sop_instance_uid=sop_instance_uid,
        study_uid=study_uid,
        series_uid=series_uid,
        modality=modality,
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
        study_description=study_description,
        series_description=f"{body_part} {view_position}",
        series_number=series_number,
        instance_number=instance_number,
    )
    ds.AcquisitionDate = _STUDY_DATE
    ds.AcquisitionTime = _STUDY_TIME
    ds.BodyPartExamined = body_part
    ds.ProtocolName = protocol_name
    ds.ViewPosition = view_position
    if laterality is not None:
        ds.Laterality = laterality
    ds.KVP = 120 if body_part == "CHEST" else 65
    ds.DistanceSourceToDetector = 1800 if body_part == "CHEST" else 1150
    ds.ExposureTime = 8
    ds.XRayTubeCurrent = 320
    ds.Exposure = 3
    if pixel_spacing_mm is not None:
        ds.ImagerPixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.PatientOrientation = list(patient_orientation)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.AnatomicRegionSequence = DicomSequence([_code_item(anatomy_code)])

    if modality == "CR":
        ds.PlateType = "SYNTHETIC"
        ds.PhosphorType = "SYNTHETIC"
    else:
        intent = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
        ds.PresentationIntentType = intent
        ds.ImageLaterality = laterality or "U"
        # DX Positioning: the view as a code as well as a string
        view_item = _code_item(_VIEW_CODES[view_position])
        view_item.ViewModifierCodeSequence = DicomSequence()
        ds.ViewCodeSequence = DicomSequence([view_item])
        ds.PositionerType = "COLUMN"
        ds.DetectorType = "SCINTILLATOR"
        ds.DetectorConfiguration = "AREA"
        ds.DetectorID = "SYN-DET-1"
        ds.AcquisitionContextSequence = DicomSequence()
        # Stored values grow with attenuation (less beam) on MONOCHROME2 and the
        # reverse on MONOCHROME1, hence the sign flips with the photometric interpretation.
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"

    _set_image_pixel(ds, rows, cols, 8 * pixels.itemsize, bits_stored, photometric)
    if not for_processing:
        _set_window(ds, bits_stored, photometric, center=0.42, width=0.80)
    _file_meta(ds)
    _set_pixels(ds, pixels, transfer_syntax)
    return ds


def _check_common(
    *,
    modality: str,
    bits_stored: int,
    photometric: str,
    pixel_spacing_mm: float | None,
    seed: int,
    instance_number: int,
    for_processing: bool,
) -> None:
    _check_choice("modality", modality, ("CR", "DX"))
    _check_choice("photometric", photometric, ("MONOCHROME1", "MONOCHROME2"))
    if isinstance(bits_stored, bool) or not isinstance(bits_stored, int):
        raise TypeError(f"bits_stored must be an int, got {type(bits_stored).__name__}")
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be between 8 and 16, got {bits_stored}")
    if pixel_spacing_mm is None:
        if modality == "DX":
            raise ValueError("pixel_spacing_mm is required for DX (Imager Pixel Spacing is Type 1)")
    elif not (isinstance(pixel_spacing_mm, int | float) and 0.0 < pixel_spacing_mm < 10.0):
        raise ValueError(f"pixel_spacing_mm must be in (0, 10) mm, got {pixel_spacing_mm!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if (
        isinstance(instance_number, bool)
        or not isinstance(instance_number, int)
        or instance_number < 1
    ):
        raise ValueError(f"instance_number must be a positive int, got {instance_number!r}")
    if for_processing and modality != "DX":
        raise ValueError("for_processing=True needs modality='DX' (CR has no For Processing class)")


# --------------------------------------------------------------------------------------
# Public constructors


def make_chest_radiograph(
    *,
    modality: str = "CR",
    rows: int = 2500,
    cols: int = 2048,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    pixel_spacing_mm: float | None = 0.15,
    transfer_syntax: str = ExplicitVRLittleEndian,
    view_position: str = "PA",
    nodules: Sequence[Nodule] | None = None,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    patient_id: str = "SYN0001",
    patient_name: str = "SYNTHETIC^CHEST",
    accession_number: str = "ACC0001",
    body_part: str = "CHEST",
    study_description: str = "CHEST PA",
    for_processing: bool = False,
    instance_number: int = 1,
    series_number: int | None = None,
) -> SyntheticImage:
    """A synthetic chest radiograph (CR, or DX For Presentation / For Processing).

    ``rows``/``cols`` are pixels; ``pixel_spacing_mm`` is the Imager Pixel Spacing in mm
    (both directions; ``None`` omits it, CR only). ``nodules`` are in source pixels and
    must have their centres inside the image; ``None`` uses :func:`default_nodules`,
    ``()`` gives a normal chest. ``view_position`` is PA, AP, LL or RL. Pixels depend on
    ``seed`` and ``instance_number`` only (besides the geometry); UIDs that are not
    given are derived from the seed, patient, accession, description, view and
    instance number, so a call is reproducible and a different seed or instance number
    gives different UIDs. The transfer syntax does not change the UIDs: it is the
    same instance, encoded differently.
    """
    _check_size(rows, cols)
    _check_common(
        modality=modality,
        bits_stored=bits_stored,
        photometric=photometric,
        pixel_spacing_mm=pixel_spacing_mm,
        seed=seed,
        instance_number=instance_number,
        for_processing=for_processing,
    )
    view = _check_choice("view_position", view_position, ("PA", "AP", "LL", "RL"))
    syntax = _check_transfer_syntax(transfer_syntax)
    lateral = view in _LATERAL_VIEWS
    chosen = tuple(default_nodules(rows, cols, view) if nodules is None else nodules)
    for i, nodule in enumerate(chosen):
        if not isinstance(nodule, Nodule):
            raise TypeError(f"nodules[{i}] must be a Nodule, got {type(nodule).__name__}")
        if not (0 <= nodule.center_row < rows and 0 <= nodule.center_col < cols):
            raise ValueError(
                f"nodules[{i}] centre ({nodule.center_row}, {nodule.center_col}) is outside "
                f"the {rows} x {cols} image"
            )

    phantom = _chest_phantom(rows, cols, lateral)
    view_index = ("PA", "AP", "LL", "RL").index(view)
    rng = np.random.default_rng([seed, instance_number, view_index])
    pixels = _render(
        phantom.display,
        phantom.texture_gain,
        chosen,
        rng,
        bits_stored=bits_stored,
        photometric=photometric,
    )

    study = study_uid or _uid("study", seed, patient_id, accession_number, study_description)
    series_key = (modality, view, body_part, for_processing)
    series = series_uid or _uid("series", study, *series_key)
    sop = sop_instance_uid or _uid(
        "instance",
        series,
        seed,
        instance_number,
        rows,
        cols,
        bits_stored,
        photometric,
        pixel_spacing_mm,
        chosen,
    )
    ds = _make_radiograph_dataset(
        pixels=pixels,
        modality=modality,
        bits_stored=bits_stored,
        photometric=photometric,
        pixel_spacing_mm=pixel_spacing_mm,
        transfer_syntax=syntax,
        view_position=view,
        body_part=body_part,
        anatomy_code=codes.SCT.Chest,
        laterality=None,
        patient_orientation=_PATIENT_ORIENTATION[view],
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
        study_description=study_description,
        protocol_name=f"CHEST {view}",
        for_processing=for_processing,
        instance_number=instance_number,
        series_number=series_number if series_number is not None else (2 if lateral else 1),
    )
    return SyntheticImage(ds, chosen, phantom.lung_fields, view)


class ChestImageOptions(TypedDict, total=False):
    """Keyword arguments that :func:`make_two_view_study` passes to both views."""

    rows: int
    cols: int
    bits_stored: int
    photometric: str
    pixel_spacing_mm: float | None
    patient_name: str
    body_part: str
    for_processing: bool
    instance_number: int


def make_two_view_study(
    *,
    seed: int = 0,
    modality: str = "CR",
    transfer_syntax: str = ExplicitVRLittleEndian,
    nodules: Sequence[Nodule] | None = None,
    lateral_nodules: Sequence[Nodule] | None = None,
    study_uid: str | None = None,
    patient_id: str = "SYN0001",
    accession_number: str = "ACC0001",
    study_description: str = "CHEST 2 VIEWS",
    **kw: Unpack[ChestImageOptions],
) -> list[SyntheticImage]:
    """A PA and a left lateral (``LL``) chest view: one study, two series (1 and 2).

    ``nodules`` go on the PA view and ``lateral_nodules`` on the lateral (``None``:
    the default nodules of each view, which lie at the same heights, in source
    pixels). Other keyword arguments go to :func:`make_chest_radiograph` for both.
    """
    study = study_uid or _uid("study", seed, patient_id, accession_number, study_description)
    return [
        make_chest_radiograph(
            seed=seed,
            modality=modality,
            transfer_syntax=transfer_syntax,
            view_position=view,
            nodules=view_nodules,
            series_number=series_number,
            study_uid=study,
            patient_id=patient_id,
            accession_number=accession_number,
            study_description=study_description,
            **kw,
        )
        for view, view_nodules, series_number in (("PA", nodules, 1), ("LL", lateral_nodules, 2))
    ]


def make_non_chest_radiograph(
    *,
    body_part: str = "KNEE",
    modality: str = "CR",
    rows: int = 1200,
    cols: int = 960,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    pixel_spacing_mm: float | None = 0.15,
    transfer_syntax: str = ExplicitVRLittleEndian,
    view_position: str = "AP",
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    patient_id: str = "SYN0002",
    patient_name: str = "SYNTHETIC^EXTREMITY",
    accession_number: str = "ACC0002",
    study_description: str | None = None,
    for_processing: bool = False,
    instance_number: int = 1,
) -> SyntheticImage:
    """A radiograph of another body part (KNEE, HAND, PELVIS, SKULL, ABDOMEN).

    Study Description and Protocol Name name the body part (e.g. ``KNEE AP``), never
    the chest, so a chest filter must skip it. Sizes in pixels, spacing in mm.
    """
    part = _check_choice("body_part", body_part, tuple(_NON_CHEST_PARTS))
    info = _NON_CHEST_PARTS[part]
    _check_size(rows, cols)
    _check_common(
        modality=modality,
        bits_stored=bits_stored,
        photometric=photometric,
        pixel_spacing_mm=pixel_spacing_mm,
        seed=seed,
        instance_number=instance_number,
        for_processing=for_processing,
    )
    view = _check_choice("view_position", view_position, ("AP", "PA", "LL", "RL"))
    syntax = _check_transfer_syntax(transfer_syntax)
    description = study_description or f"{info.description} {view}"
    if "CHEST" in description.upper() or "THORAX" in description.upper():
        raise ValueError(
            f"study_description of a non-chest image must not name the chest, got {description!r}"
        )

    base = _non_chest_phantom(rows, cols, info.limb)
    rng = np.random.default_rng([seed, instance_number, 100 + tuple(_NON_CHEST_PARTS).index(part)])
    pixels = _render(base, None, (), rng, bits_stored=bits_stored, photometric=photometric)
    study = study_uid or _uid("study", seed, patient_id, accession_number, description)
    series = series_uid or _uid("series", study, modality, view, part, for_processing)
    sop = sop_instance_uid or _uid(
        "instance",
        series,
        seed,
        instance_number,
        rows,
        cols,
        bits_stored,
        photometric,
        pixel_spacing_mm,
    )
    laterality = "R" if info.paired else None
    ds = _make_radiograph_dataset(
        pixels=pixels,
        modality=modality,
        bits_stored=bits_stored,
        photometric=photometric,
        pixel_spacing_mm=pixel_spacing_mm,
        transfer_syntax=syntax,
        view_position=view,
        body_part=part,
        anatomy_code=info.code,
        laterality=laterality,
        patient_orientation=("L", "F") if view in _FRONTAL_VIEWS else ("P", "F"),
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
        study_description=description,
        protocol_name=description,
        for_processing=for_processing,
        instance_number=instance_number,
        series_number=1,
    )
    return SyntheticImage(ds, (), (), view)


def make_secondary_capture(
    *,
    study_uid: str,
    seed: int = 0,
    rows: int = 256,
    cols: int = 256,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    patient_id: str = "SYN0001",
    patient_name: str = "SYNTHETIC^CHEST",
    accession_number: str = "ACC0001",
    study_description: str = "CHEST PA",
    instance_number: int = 1,
    series_number: int = 99,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """A small 8-bit Secondary Capture (a scanned request form, say) in ``study_uid``.

    It belongs to the study but is not a radiograph, so a pre-read keeps it and does
    not read it. Pass the study's patient/accession values if they are not the defaults.
    """
    _check_size(rows, cols)
    if not study_uid:
        raise ValueError("study_uid is required: a secondary capture joins an existing study")
    syntax = _check_transfer_syntax(transfer_syntax)
    rng = np.random.default_rng([seed, instance_number, 999])
    r = np.linspace(0.0, 1.0, rows, dtype=np.float32)[:, None]
    c = np.linspace(0.0, 1.0, cols, dtype=np.float32)[None, :]
    page = np.full((rows, cols), 0.92, dtype=np.float32)
    page -= 0.6 * ((np.abs(np.sin(r * 40.0)) > 0.97) & (c > 0.1) & (c < 0.9))  # "text lines"
    page += rng.normal(0.0, 0.02, (rows, cols)).astype(np.float32)
    pixels = np.rint(np.clip(page, 0.0, 1.0) * 255.0).astype(np.uint8)

    series = series_uid or _uid("series", study_uid, "SC", series_number)
    sop = sop_instance_uid or _uid("instance", series, seed, instance_number, rows, cols)
    ds = _base_dataset(
        sop_class=SECONDARY_CAPTURE_STORAGE,
        sop_instance_uid=sop,
        study_uid=study_uid,
        series_uid=series,
        modality="OT",
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
        study_description=study_description,
        series_description="SCANNED DOCUMENT",
        series_number=series_number,
        instance_number=instance_number,
    )
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "SD"
    ds.PatientOrientation = ""
    ds.Laterality = ""
    ds.BurnedInAnnotation = "YES"
    ds.LossyImageCompression = "00"
    _set_image_pixel(ds, rows, cols, 8, 8, "MONOCHROME2")
    _file_meta(ds)
    _set_pixels(ds, pixels, syntax)
    return ds


def write_study(directory: Path, images: Iterable[SyntheticImage | Dataset]) -> list[Path]:
    """Write each image as a DICOM file (preamble + file meta) in ``directory``.

    Files are named ``<Modality>.<SOPInstanceUID>.dcm``; the directory is created if
    needed and existing files of the same name are replaced. Returns the paths in order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for item in images:
        ds = item.dataset if isinstance(item, SyntheticImage) else item
        if not isinstance(ds, Dataset):
            raise TypeError(f"images must hold SyntheticImage or Dataset, got {type(ds).__name__}")
        path = directory / f"{ds.Modality}.{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------
# Command line


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m node.synthetic",
        description="Write synthetic chest radiographs (not patients; not for clinical use).",
    )
    parser.add_argument("outdir", type=Path, help="directory for the .dcm files")
    parser.add_argument(
        "--count",
        type=int,
        default=1,
        help="number of files (distinct SOP instances) to write; default 1",
    )
    parser.add_argument(
        "--syntax",
        choices=tuple(SYNTAX_BY_NAME),
        default="explicit",
        help="transfer syntax of the files; default explicit",
    )
    parser.add_argument("--modality", choices=("CR", "DX"), default="CR")
    parser.add_argument(
        "--two-view", action="store_true", help="PA + lateral studies (two files per study)"
    )
    parser.add_argument(
        "--per-study",
        type=int,
        default=1,
        metavar="K",
        help="PA instances per study when not --two-view; default 1",
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed; study i uses seed + i")
    parser.add_argument("--rows", type=int, default=2500, help="pixels; default 2500")
    parser.add_argument("--cols", type=int, default=2048, help="pixels; default 2048")
    parser.add_argument("--bits", type=int, default=12, help="Bits Stored; default 12")
    parser.add_argument(
        "--photometric", choices=("MONOCHROME1", "MONOCHROME2"), default="MONOCHROME2"
    )
    return parser


def _generate(args: argparse.Namespace) -> list[Path]:
    syntax = SYNTAX_BY_NAME[args.syntax]
    per_study = 2 if args.two_view else args.per_study
    paths: list[Path] = []
    study_index = 0
    while len(paths) < args.count:
        seed = args.seed + study_index
        patient_id, accession = f"SYN{seed + 1:04d}", f"ACC{seed + 1:06d}"
        n = min(per_study, args.count - len(paths))
        images: list[SyntheticImage]
        if args.two_view:
            images = make_two_view_study(
                seed=seed,
                modality=args.modality,
                transfer_syntax=syntax,
                rows=args.rows,
                cols=args.cols,
                bits_stored=args.bits,
                photometric=args.photometric,
                patient_id=patient_id,
                accession_number=accession,
            )[:n]
        else:
            images = [
                make_chest_radiograph(
                    seed=seed,
                    modality=args.modality,
                    transfer_syntax=syntax,
                    rows=args.rows,
                    cols=args.cols,
                    bits_stored=args.bits,
                    photometric=args.photometric,
                    instance_number=i + 1,
                    patient_id=patient_id,
                    accession_number=accession,
                )
                for i in range(n)
            ]
        paths.extend(write_study(args.outdir, images))
        study_index += 1
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m node.synthetic``; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.per_study < 1:
        parser.error("--per-study must be at least 1")
    started = time.perf_counter()
    try:
        paths = _generate(args)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write to {args.outdir}: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    elapsed = time.perf_counter() - started
    print(f"wrote {len(paths)} files to {args.outdir} in {elapsed:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
