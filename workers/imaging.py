"""Chest radiograph imaging for the model: pick the views, decode, display, square, crop.

The pipeline for one image is::

    stored pixels --decode--> Modality LUT --> VOI (LUT | window | percentiles)
        --> MONOCHROME1 inversion --> padding shown black      = DisplayImage (0..1)
    DisplayImage --pad to a centred square--> resize to 896 x 896 RGB uint8 = model image

Coordinate conventions (used everywhere in this module and by its callers):

* **Source pixels** are continuous ``(row, col)`` coordinates on the stored image:
  pixel ``(r, c)`` (integer indices into ``pixels[r, c]``) covers the half-open square
  ``[r, r + 1) x [c, c + 1)``, so its centre is ``(r + 0.5, c + 0.5)`` and the whole
  image spans ``[0, rows] x [0, cols]``. ``row`` grows downwards, ``col`` to the right.
* **Padded square**: the image is centred on a square of ``side = max(rows, cols)``
  source pixels. Source row 0 sits at padded row ``pad_top = (side - rows) // 2`` and
  source column 0 at padded column ``pad_left = (side - cols) // 2`` (when the padding
  is odd the extra pixel goes to the bottom / right). Padding is black (0 in display
  space). Centred padding keeps the chest in the middle of the model's field of view.
* **Model space** is MedGemma's box scale: ``(y, x)`` in 0..1000 of the padded square,
  0 at its top / left *edge* and 1000 at its bottom / right *edge*. A box is
  ``[y0, x0, y1, x1]``. The model image is the padded square resized to ``model_size``
  pixels, so model pixel ``(i, j)`` covers ``[i, i + 1) x [j, j + 1)`` in units of
  ``side / model_size`` padded source pixels.

Between source pixels and model space the map is an exact affine transform
(:class:`SquareTransform`), the same for points and box edges, so boxes travel both
ways without drift. Crops for follow-up questions (:func:`crop_source`) use the same
class with the crop's origin in place of the padding.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.sr.codedict import codes
from pydicom.uid import (
    UID,
    DigitalXRayImageStorageForProcessing,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from node.rules import ImageHeader, is_grey, radiograph_refusal

__all__ = [
    "MODEL_IMAGE_SIZE",
    "DisplayImage",
    "ImagingError",
    "SquareTransform",
    "ViewChoice",
    "choose_views",
    "classify_view",
    "crop_source",
    "load_display_image",
    "to_model_image",
]

log = logging.getLogger(__name__)

#: MedGemma's input side in pixels (256 image tokens).
MODEL_IMAGE_SIZE: Final = 896
#: The model-space scale: box coordinates run 0..MODEL_SCALE over the padded square.
MODEL_SCALE: Final = 1000

# The percentiles of the robust window used when the image carries no VOI information.
_PERCENTILE_WINDOW: Final = (1.0, 99.0)
# Pixels sampled (at most, about) to estimate that window: plenty for two percentiles.
_PERCENTILE_SAMPLE: Final = 250_000
# Decoding plugins to try first: pyjpegls (CharLS) decodes JPEG-LS about 4x faster than
# pylibjpeg-libjpeg, which pydicom would otherwise try first.
_PREFERRED_PLUGINS: Final[dict[str, str]] = {
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
}
# Slack when rounding model-space box edges outward, so exact integers stay integers.
_ROUND_EPS: Final = 1e-6

FloatImage = npt.NDArray[np.float32]
RGBImage = npt.NDArray[np.uint8]
BoxRC = tuple[float, float, float, float]
# Decoded stored values: any integer dtype (or float for Float Pixel Data), 2-D or RGB.
StoredArray = npt.NDArray[Any]


class ImagingError(Exception):
    """An image cannot be read or decoded.

    The message names the transfer syntax and the SOP Instance UID (or the file name
    when the file is not readable DICOM at all), never patient data.
    """


# --------------------------------------------------------------------------------------
# View choice

# View codes (DICOM CID 4010 "DX View"), by (coding scheme, code value). SCT values
# come from pydicom's code dictionary; the SRT values are the legacy SNOMED-RT codes
# older modalities still send.
_VIEW_CODES: Final[dict[tuple[str, str], str]] = {
    ("SCT", codes.SCT.PosteroAnterior.value): "PA",  # 272479007
    ("SRT", "R-10214"): "PA",
    ("SCT", codes.SCT.AnteroPosterior.value): "AP",  # 399348003
    ("SRT", "R-10206"): "AP",
    ("SCT", codes.SCT.LeftLateral.value): "LL",  # 399173006
    ("SRT", "R-10236"): "LL",
    ("SCT", codes.SCT.RightLateral.value): "RL",  # 399198007
    ("SRT", "R-10232"): "RL",
    ("SCT", codes.SCT.LateralProjection.value): "LAT",  # 399067008
    ("SRT", "R-102CD"): "LAT",
    ("SCT", codes.SCT.Frontal.value): "FRONTAL",  # 399033003
}
# Code Meanings (lower case, letters only) for codes from other or unknown schemes.
_VIEW_MEANINGS: Final[dict[str, str]] = {
    "posteroanterior": "PA",
    "pa": "PA",
    "anteroposterior": "AP",
    "ap": "AP",
    "leftlateral": "LL",
    "rightlateral": "RL",
    "lateral": "LAT",
    "frontal": "FRONTAL",
}
_VIEW_POSITIONS: Final[dict[str, str]] = {
    "PA": "PA",
    "AP": "AP",
    "LL": "LL",
    "RL": "RL",
    "LAT": "LAT",
    "LATERAL": "LAT",
}
# Rank inside each kind: lower is preferred.
_FRONTAL_RANK: Final = {"PA": 0, "AP": 1, "FRONTAL": 2}
_LATERAL_RANK: Final = {"LL": 0, "RL": 1, "LAT": 2}
_TEXT_FRONTAL: Final = frozenset({"PA", "AP", "FRONTAL"})
_TEXT_LATERAL: Final = frozenset({"LAT", "LATERAL", "LL", "RL"})


@dataclass(frozen=True)
class ViewChoice:
    """One image chosen for reading.

    ``path`` is the file it came from (``None`` for an in-memory dataset without a
    file name; then ``dataset`` holds it). ``view`` is ``"frontal"`` or ``"lateral"``;
    ``reason`` says which attribute decided (e.g. ``"ViewPosition PA"``,
    ``"ViewCodeSequence SCT 399348003 (antero-posterior)"``, ``"view unknown"``).
    """

    path: Path | None
    view: str
    sop_instance_uid: str
    reason: str
    dataset: Dataset | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.view not in ("frontal", "lateral"):
            raise ValueError(f"ViewChoice.view must be 'frontal' or 'lateral', got {self.view!r}")
        if self.path is None and self.dataset is None:
            raise ValueError("ViewChoice needs a path or a dataset")

    @property
    def source(self) -> Path | Dataset:
        """What :func:`load_display_image` reads: the in-memory dataset, else the file."""
        if self.dataset is not None:
            return self.dataset
        assert self.path is not None  # guaranteed by __post_init__
        return self.path


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _view_from_code(ds: Dataset) -> tuple[str, str] | None:
    """The view named by the first ViewCodeSequence item, with the reason; else None."""
    seq = ds.get("ViewCodeSequence")
    if not seq:
        return None
    item = seq[0]
    scheme = _text(item, "CodingSchemeDesignator").upper()
    value = _text(item, "CodeValue")
    meaning = _text(item, "CodeMeaning")
    view = _VIEW_CODES.get((scheme, value))
    if view is None:
        view = _VIEW_MEANINGS.get(re.sub(r"[^a-z]", "", meaning.lower()))
    if view is None:
        return None
    return view, f"ViewCodeSequence {scheme} {value} ({meaning})"


def _view_from_text(ds: Dataset) -> tuple[str, str] | None:
    """A frontal or lateral view named in Series Description / Protocol Name, if only one is."""
    for keyword in ("SeriesDescription", "ProtocolName"):
        tokens = set(re.split(r"[^A-Z]+", _text(ds, keyword).upper()))
        frontal, lateral = tokens & _TEXT_FRONTAL, tokens & _TEXT_LATERAL
        if frontal and not lateral:
            view = "PA" if "PA" in frontal else "AP" if "AP" in frontal else "FRONTAL"
            return view, f"{keyword} names {view}"
        if lateral and not frontal:
            view = "LL" if "LL" in lateral else "RL" if "RL" in lateral else "LAT"
            return view, f"{keyword} names {view}"
    return None


def classify_view(ds: Dataset) -> tuple[str, str, str]:
    """Classify one radiograph's projection from its header.

    Returns ``(kind, view, reason)``: ``kind`` is ``"frontal"``, ``"lateral"``,
    ``"other"`` (a named projection that is neither, e.g. an oblique or decubitus) or
    ``"unknown"``; ``view`` is ``PA``, ``AP``, ``FRONTAL``, ``LL``, ``RL``, ``LAT``, the
    raw View Position for ``other``, or ``""``. Sources in order: View Position, View
    Code Sequence (SCT/SRT codes, then Code Meaning), then Series Description / Protocol
    Name when they name exactly one of frontal or lateral.
    """
    position = _text(ds, "ViewPosition").upper()
    found: tuple[str, str] | None = None
    if position in _VIEW_POSITIONS:
        found = _VIEW_POSITIONS[position], f"ViewPosition {position}"
    elif position:
        # A named projection we do not read as frontal or lateral (RLD, LLO, ...),
        # unless the view code says otherwise.
        found = _view_from_code(ds)
        if found is None:
            return "other", position, f"ViewPosition {position}"
    else:
        found = _view_from_code(ds) or _view_from_text(ds)
    if found is None:
        return "unknown", "", "view unknown"
    view, reason = found
    kind = "frontal" if view in _FRONTAL_RANK else "lateral"
    return kind, view, reason


def _order_key(ds: Dataset) -> tuple[int, int, str]:
    """Deterministic order: Series Number, then Instance Number, then SOP Instance UID."""

    def number(keyword: str) -> int:
        try:
            return int(ds.get(keyword))
        except (TypeError, ValueError):
            return 2**31

    return number("SeriesNumber"), number("InstanceNumber"), _text(ds, "SOPInstanceUID")


def _sop_class(ds: Dataset) -> str:
    sop_class = _text(ds, "SOPClassUID")
    meta = getattr(ds, "file_meta", None)
    if not sop_class and meta is not None:
        sop_class = _text(meta, "MediaStorageSOPClassUID")
    return sop_class


def choose_views(
    sources: Iterable[Dataset | str | os.PathLike[str]],
) -> tuple[ViewChoice | None, ViewChoice | None]:
    """Choose the frontal image to read and, when present, a lateral as the second image.

    ``sources`` are datasets or DICOM file paths of one study (only headers are read
    from files). Only readable chest radiograph images are candidates (the one rule,
    :func:`node.rules.radiograph_refusal`: CR/DX images, and Secondary Captures with
    Modality CR/DX, one frame, grey); other instances and unreadable files are skipped
    (the latter with a warning).

    Frontal preference: PA > AP > generic frontal, explicit attributes (View Position,
    View Code Sequence) before descriptions; then images whose view is not stated (the
    first becomes the frontal with reason ``"view unknown"``); then other projections.
    Lateral preference: LL > RL > LAT. Within a rank DX For Presentation / CR come before
    DX For Processing, then the order is Series Number, Instance Number, SOP Instance
    UID. Returns ``(frontal, lateral)``; either may be ``None`` (a study with only a
    lateral returns ``(None, lateral)``).
    """
    frontal: list[tuple[tuple[object, ...], ViewChoice]] = []
    lateral: list[tuple[tuple[object, ...], ViewChoice]] = []
    seen: set[str] = set()
    for source in sources:
        if isinstance(source, Dataset):
            ds = source
            filename = getattr(ds, "filename", None)
            path = Path(filename) if isinstance(filename, str | os.PathLike) and filename else None
            keep: Dataset | None = ds
        else:
            path = Path(source)
            keep = None
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except Exception as exc:  # any unreadable file: skip it, say so
                log.warning(
                    "choose_views: skipping %s, not readable DICOM (%s)",
                    path.name,
                    type(exc).__name__,
                )
                continue
        if radiograph_refusal(ImageHeader.of(ds)) is not None:
            continue
        sop_uid = _text(ds, "SOPInstanceUID")
        if sop_uid in seen:
            continue
        seen.add(sop_uid)
        kind, view, reason = classify_view(ds)
        processing = int(_sop_class(ds) == DigitalXRayImageStorageForProcessing)
        order = _order_key(ds)
        if kind == "lateral":
            key: tuple[object, ...] = (
                0 if reason.startswith("View") else 1,
                _LATERAL_RANK[view],
                processing,
                order,
            )
            lateral.append((key, ViewChoice(path, "lateral", sop_uid, reason, keep)))
            continue
        if kind == "frontal":
            key = (0 if reason.startswith("View") else 1, _FRONTAL_RANK[view], processing, order)
        elif kind == "unknown":
            key = (2, 0, processing, order)
        else:
            key = (3, 0, processing, order)
            reason = f"view unknown: no frontal view named, using {reason}"
        frontal.append((key, ViewChoice(path, "frontal", sop_uid, reason, keep)))
    best_frontal = min(frontal, key=lambda kv: kv[0])[1] if frontal else None
    best_lateral = min(lateral, key=lambda kv: kv[0])[1] if lateral else None
    return best_frontal, best_lateral


# --------------------------------------------------------------------------------------
# Display image


@dataclass(frozen=True)
class DisplayImage:
    """A radiograph as displayed: brightness after all LUTs, MONOCHROME2 sense.

    ``pixels``: shape ``(rows, cols)``, float32 in 0..1 (0 = black) or uint8 (0..255);
    read-only. ``pixel_spacing_mm``: ``(row spacing, column spacing)`` in millimetres
    between pixel centres, from ``spacing_source`` (``"PixelSpacing"``,
    ``"ImagerPixelSpacing"`` or ``"none"``, then ``None``). ``voi_source`` says how
    brightness was mapped (``"VOILUTSequence"``, ``"window"``, ``"percentile"``,
    ``"none"`` for colour images).
    """

    pixels: npt.NDArray[np.float32] | npt.NDArray[np.uint8]
    pixel_spacing_mm: tuple[float, float] | None
    spacing_source: str
    sop_instance_uid: str
    rows: int
    cols: int
    transfer_syntax_uid: str = ""
    photometric_interpretation: str = ""
    voi_source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.pixels, np.ndarray) or self.pixels.ndim != 2:
            raise TypeError("DisplayImage.pixels must be a 2-D numpy array")
        if self.pixels.dtype not in (np.float32, np.uint8):
            raise TypeError(
                f"DisplayImage.pixels must be float32 or uint8, got {self.pixels.dtype}"
            )
        if self.pixels.shape != (self.rows, self.cols):
            raise ValueError(
                f"DisplayImage.pixels has shape {self.pixels.shape}, "
                f"expected (rows, cols) = ({self.rows}, {self.cols})"
            )
        if self.spacing_source not in ("PixelSpacing", "ImagerPixelSpacing", "none"):
            raise ValueError(
                f"DisplayImage.spacing_source must be PixelSpacing, "
                f"ImagerPixelSpacing or none, got {self.spacing_source!r}"
            )
        if (self.pixel_spacing_mm is None) != (self.spacing_source == "none"):
            raise ValueError(
                "DisplayImage.pixel_spacing_mm must be None exactly when spacing_source is 'none'"
            )

    def as_float(self) -> FloatImage:
        """The pixels as float32 in 0..1 (a view when they already are)."""
        if self.pixels.dtype == np.float32:
            return self.pixels.astype(np.float32, copy=False)
        return self.pixels.astype(np.float32) / np.float32(255.0)


def _pixel_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str]:
    """(row, col) spacing in mm and its source.

    Pixel Spacing comes first: on DX/CR it is present when the image is calibrated in
    the patient plane; Imager Pixel Spacing (at the detector, uncorrected for
    magnification) is used otherwise.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            pair = [float(v) for v in value]
        except (TypeError, ValueError):
            continue
        if len(pair) == 2 and all(math.isfinite(v) and v > 0.0 for v in pair):
            return (pair[0], pair[1]), keyword
        log.warning("ignoring invalid %s on %s", keyword, _text(ds, "SOPInstanceUID"))
    return None, "none"


def _syntax_name(ds: Dataset) -> tuple[UID | None, str]:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        return None, "unknown transfer syntax"
    uid = UID(str(ts))
    return uid, f"{uid.name} ({uid})" if uid.name != uid else str(uid)


def _decode_with(decoder: Decoder, ds: Dataset, preferred: str) -> StoredArray:
    """Decode frame 0 with the preferred plugin if installed, else (or on failure) any."""
    if preferred and preferred in decoder.available_plugins:
        try:
            arr, _meta = decoder.as_array(ds, index=0, decoding_plugin=preferred)
            return arr
        except Exception as exc:  # another plugin may still read the stream
            log.debug("decoding plugin %s failed (%s); trying the others", preferred, exc)
    arr, _meta = decoder.as_array(ds, index=0)
    return arr


def _decode(ds: Dataset) -> StoredArray:
    """Decode the first frame of Pixel Data as stored values (YBR converted to RGB)."""
    sop = _text(ds, "SOPInstanceUID") or "(no SOP Instance UID)"
    ts, ts_name = _syntax_name(ds)
    if ts is None:
        raise ImagingError(
            f"SOP instance {sop}: no Transfer Syntax UID in the file meta, cannot decode its pixels"
        )
    if "PixelData" not in ds:
        raise ImagingError(f"SOP instance {sop} ({ts_name}) has no Pixel Data")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise ImagingError(
            f"SOP instance {sop}: transfer syntax {ts_name} is not supported for decoding"
        ) from exc
    if not decoder.is_available:
        raise ImagingError(
            f"SOP instance {sop}: no decoder installed for {ts_name}; install "
            f"pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, "
            f"pylibjpeg-rle and pyjpegls"
        )
    try:
        arr = _decode_with(decoder, ds, _PREFERRED_PLUGINS.get(ts, ""))
    except Exception as exc:  # decoders raise many types; the message says what failed
        # pydicom lists each plugin's failure on its own line: keep them, on one line.
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        detail = detail[:400] or type(exc).__name__
        raise ImagingError(
            f"SOP instance {sop}: cannot decode pixel data ({ts_name}): {detail}"
        ) from exc
    rows, cols = int(ds.Rows), int(ds.Columns)
    if arr.shape[:2] != (rows, cols):
        raise ImagingError(
            f"SOP instance {sop} ({ts_name}): decoded {arr.shape}, expected {rows} x {cols}"
        )
    return arr


def _padding_mask(stored: StoredArray, ds: Dataset) -> npt.NDArray[np.bool_] | None:
    """Pixels equal to Pixel Padding Value (or within the padding range), in stored values."""
    if "PixelPaddingValue" not in ds:
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    bits = int(ds.get("BitsAllocated", 16))

    def stored_value(keyword: str) -> int:
        raw = ds[keyword].value
        if isinstance(raw, bytes | bytearray):
            value = int.from_bytes(raw[:2], "little", signed=signed)
        else:
            value = int(raw[0] if isinstance(raw, Sequence) else raw)
        # The ambiguous US/SS VR may have been read with the wrong sign.
        if not signed and value < 0:
            value += 1 << bits
        elif signed and value >= 1 << (bits - 1):
            value -= 1 << bits
        return value

    low = high = stored_value("PixelPaddingValue")
    if "PixelPaddingRangeLimit" in ds:
        limit = stored_value("PixelPaddingRangeLimit")
        low, high = min(low, limit), max(low, limit)
    if low == high:
        mask = stored == low
    else:
        mask = (stored >= low) & (stored <= high)
    return mask if mask.any() else None


def _lut(item: Dataset, ds: Dataset) -> tuple[int, FloatImage]:
    """(first mapped input value, LUT entries as float32) of a Modality/VOI LUT item."""
    # The third value (bits per entry) is not used: the output range comes from the data.
    n_entries, first, _bits = (int(v) for v in item.LUTDescriptor)
    n_entries = n_entries or 65536
    if int(ds.get("PixelRepresentation", 0)) == 1 and first >= 32768:
        first -= 65536  # the first-mapped value is signed for signed data
    elem = item["LUTData"]
    if isinstance(elem.value, bytes | bytearray):
        little = getattr(ds, "original_encoding", (None, True))[1] is not False
        data = np.frombuffer(elem.value, dtype="<u2" if little else ">u2")
    else:
        values = elem.value
        data = np.asarray(list(values) if isinstance(values, Sequence) else [values])
    data = data[:n_entries].astype(np.float32)
    if data.size == 0:
        raise ValueError("empty LUT Data")
    return first, data


def _apply_lut(values: FloatImage, first: int, data: FloatImage) -> FloatImage:
    idx = np.rint(values)
    idx -= first
    np.clip(idx, 0, data.size - 1, out=idx)
    return data[idx.astype(np.intp)]


def _modality(stored: StoredArray, ds: Dataset) -> FloatImage:
    """Modality LUT: Modality LUT Sequence if present, else Rescale Slope/Intercept."""
    if ds.get("ModalityLUTSequence"):
        out = apply_modality_lut(stored, ds)
        return np.asarray(out, dtype=np.float32)
    values = stored.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    """The first (Window Center, Window Width) pair, if both are present and usable."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    try:
        c = float(
            center[0] if isinstance(center, Sequence) and not isinstance(center, str) else center
        )
        w = float(width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width)
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(c) and math.isfinite(w)) or w <= 0.0:
        return None
    return c, w


def _apply_window(values: FloatImage, center: float, width: float, function: str) -> FloatImage:
    """Window to 0..1 per PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID); in place."""
    if function == "SIGMOID":
        values -= np.float32(center)
        values *= np.float32(-4.0 / width)
        np.exp(values, out=values)
        values += np.float32(1.0)
        np.reciprocal(values, out=values)
        return values
    if function == "LINEAR_EXACT":
        values -= np.float32(center - width / 2.0)
        values *= np.float32(1.0 / width)
    elif width <= 1.0:
        return (values > np.float32(center - 0.5)).astype(np.float32)
    else:
        values -= np.float32(center - 0.5 - (width - 1.0) / 2.0)
        values *= np.float32(1.0 / (width - 1.0))
    np.clip(values, 0.0, 1.0, out=values)
    return values


def _percentile_window(values: FloatImage, padding: npt.NDArray[np.bool_] | None) -> FloatImage:
    """Map the 1st..99th percentile of the non-padding pixels to 0..1; in place."""
    step = max(1, int(math.sqrt(values.size / _PERCENTILE_SAMPLE)))
    sample = values[::step, ::step]
    if padding is not None:
        sample = sample[~padding[::step, ::step]]
    if sample.size == 0:
        return np.zeros_like(values)
    low, high = (float(v) for v in np.percentile(sample, _PERCENTILE_WINDOW))
    if high <= low:
        high = low + 1.0
    values -= np.float32(low)
    values *= np.float32(1.0 / (high - low))
    np.clip(values, 0.0, 1.0, out=values)
    return values


def _read(source: Dataset | str | os.PathLike[str]) -> Dataset:
    if isinstance(source, Dataset):
        return source
    path = Path(source)
    try:
        return dcmread(path)
    except Exception as exc:  # not DICOM, truncated header, unreadable file
        raise ImagingError(
            f"cannot read {path.name} as DICOM: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc


def load_display_image(source: Dataset | str | os.PathLike[str]) -> DisplayImage:
    """Decode a radiograph and map it to displayed brightness (float32, 0 = black .. 1).

    Steps: decode the first frame (any transfer syntax pydicom and the installed
    plugins decode: native little/big endian, deflated, JPEG baseline/extended/lossless,
    JPEG-LS, JPEG 2000, RLE); Modality LUT (sequence, else Rescale Slope/Intercept);
    VOI: the first VOI LUT Sequence item, else the first Window Center/Width (with VOI
    LUT Function LINEAR, LINEAR_EXACT or SIGMOID), else the 1st..99th percentile of the
    non-padding pixels; MONOCHROME1 is inverted; pixels equal to Pixel Padding Value (or
    within Pixel Padding Range Limit), in stored values, are excluded from the
    percentile window and shown black (0). A VOI LUT's output is scaled by its entries'
    minimum..maximum. Colour images (RGB/YBR) become luminance with no LUTs when
    they are grey (:func:`node.rules.is_grey`); a coloured one raises :class:`ImagingError`.

    Raises :class:`ImagingError` (naming the transfer syntax and SOP Instance UID) when
    the file cannot be read or its pixels cannot be decoded.
    """
    ds = _read(source)
    sop = _text(ds, "SOPInstanceUID")
    ts, _ts_name = _syntax_name(ds)
    stored = _decode(ds)
    photometric = _text(ds, "PhotometricInterpretation").upper()
    spacing, spacing_source = _pixel_spacing(ds)

    if stored.ndim == 3:
        # Colour (secondary captures, scanned films): luminance, no grayscale LUTs.
        bits = int(ds.get("BitsStored", 8))
        if not is_grey(stored, (1 << bits) - 1):
            raise ImagingError(
                f"SOP instance {sop} ({photometric}) is a colour image (its channels differ), "
                "not a grey radiograph"
            )
        rgb = stored[..., :3].astype(np.float32)
        luma = rgb @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
        luma *= np.float32(1.0 / ((1 << bits) - 1))
        np.clip(luma, 0.0, 1.0, out=luma)
        luma.setflags(write=False)
        return DisplayImage(
            luma,
            spacing,
            spacing_source,
            sop,
            luma.shape[0],
            luma.shape[1],
            str(ts or ""),
            photometric,
            "none",
        )

    padding = _padding_mask(stored, ds)
    values = _modality(stored, ds)
    del stored

    voi_source = "percentile"
    try:
        if ds.get("VOILUTSequence"):
            first, data = _lut(ds.VOILUTSequence[0], ds)
            low, high = float(data.min()), float(data.max())
            values = _apply_lut(values, first, data)
            values -= np.float32(low)
            values *= np.float32(1.0 / (high - low) if high > low else 0.0)
            voi_source = "VOILUTSequence"
    except (AttributeError, ValueError, TypeError, KeyError) as exc:
        log.warning("SOP instance %s: unusable VOI LUT Sequence (%s); using the window", sop, exc)
    if voi_source == "percentile":
        window = _first_window(ds)
        function = _text(ds, "VOILUTFunction").upper() or "LINEAR"
        if window is not None and function in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            values = _apply_window(values, window[0], window[1], function)
            voi_source = "window"
        else:
            if window is not None or "WindowCenter" in ds:
                log.warning(
                    "SOP instance %s: unusable window (VOI LUT Function %r); using "
                    "the %g-%g percentile window",
                    sop,
                    function,
                    *_PERCENTILE_WINDOW,
                )
            values = _percentile_window(values, padding)

    if photometric == "MONOCHROME1":
        np.subtract(np.float32(1.0), values, out=values)
    if padding is not None:
        values[padding] = 0.0
    values = np.ascontiguousarray(values, dtype=np.float32)
    values.setflags(write=False)
    return DisplayImage(
        values,
        spacing,
        spacing_source,
        sop,
        values.shape[0],
        values.shape[1],
        str(ts or ""),
        photometric,
        voi_source,
    )


# --------------------------------------------------------------------------------------
# Square transform, model image, crops


@dataclass(frozen=True)
class SquareTransform:
    """The exact affine map between source pixels and model space (0..1000).

    A square of ``side`` source pixels is placed so that source row 0 / column 0 lie at
    square row ``pad_top`` / column ``pad_left``; the square is shown to the model as a
    ``model_size`` x ``model_size`` image and boxes are expressed in 0..1000 of it. For
    the whole image (:func:`to_model_image`) the square is the centred padded square and
    ``pad_top``/``pad_left`` are >= 0; for a crop (:func:`crop_source`) they are minus
    the crop's origin (so usually negative) and ``side`` is the crop's side.

    Coordinates are continuous (see the module docstring): source ``(row, col)`` in
    pixels with pixel ``(r, c)`` covering ``[r, r+1) x [c, c+1)``; model ``(y, x)``
    with 0 at the square's top/left edge and 1000 at its bottom/right edge::

        y = (row + pad_top) * 1000 / side        row = y * side / 1000 - pad_top
        x = (col + pad_left) * 1000 / side       col = x * side / 1000 - pad_left
    """

    src_rows: int
    src_cols: int
    side: int
    pad_top: int
    pad_left: int
    model_size: int = MODEL_IMAGE_SIZE

    def __post_init__(self) -> None:
        for name in ("src_rows", "src_cols", "side", "pad_top", "pad_left", "model_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(
                    f"SquareTransform.{name} must be an int, got {type(value).__name__}"
                )
        for name in ("src_rows", "src_cols", "side", "model_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SquareTransform.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def centred(cls, rows: int, cols: int, model_size: int = MODEL_IMAGE_SIZE) -> SquareTransform:
        """The transform of a ``rows`` x ``cols`` image centred on its padded square."""
        side = max(rows, cols)
        return cls(rows, cols, side, (side - rows) // 2, (side - cols) // 2, model_size)

    @property
    def model_px_per_source_px(self) -> float:
        """Model-image pixels per source pixel (``model_size / side``)."""
        return self.model_size / self.side

    def to_model(self, row: float, col: float) -> tuple[float, float]:
        """Source pixel coordinates -> model ``(y, x)`` in 0..1000 (not clipped)."""
        scale = MODEL_SCALE / self.side
        return (row + self.pad_top) * scale, (col + self.pad_left) * scale

    def to_source(self, y: float, x: float) -> tuple[float, float]:
        """Model ``(y, x)`` in 0..1000 -> continuous source ``(row, col)`` (not clipped)."""
        scale = self.side / MODEL_SCALE
        return y * scale - self.pad_top, x * scale - self.pad_left

    def to_model_pixel(self, row: float, col: float) -> tuple[float, float]:
        """Source pixel coordinates -> continuous model-image pixel coordinates."""
        scale = self.model_size / self.side
        return (row + self.pad_top) * scale, (col + self.pad_left) * scale

    def box_to_source(self, box_2d: Sequence[float]) -> BoxRC:
        """A model box ``[y0, x0, y1, x1]`` (0..1000) -> ``(row0, col0, row1, col1)``.

        Source pixels, continuous, clipped to the image ``[0, rows] x [0, cols]``; the
        corners are sorted, so a box given upside down still comes out with
        ``row0 <= row1`` and ``col0 <= col1``. A box wholly in the padding clips to zero
        size.
        """
        if len(box_2d) != 4:
            raise ValueError(f"box_2d must be [y0, x0, y1, x1], got {len(box_2d)} values")
        y0, x0, y1, x1 = (float(v) for v in box_2d)
        r0, c0 = self.to_source(min(y0, y1), min(x0, x1))
        r1, c1 = self.to_source(max(y0, y1), max(x0, x1))
        return (
            min(max(r0, 0.0), float(self.src_rows)),
            min(max(c0, 0.0), float(self.src_cols)),
            min(max(r1, 0.0), float(self.src_rows)),
            min(max(c1, 0.0), float(self.src_cols)),
        )

    def box_to_model(self, box_rc: Sequence[float]) -> list[int]:
        """A source box ``(row0, col0, row1, col1)`` -> model ``[y0, x0, y1, x1]`` ints.

        Edges are rounded outward (floor the first corner, ceil the second) so the
        integer box always contains the source box, and clipped to 0..1000. Integer
        model boxes survive ``box_to_source`` then ``box_to_model`` unchanged (when not
        clipped by the image edge).
        """
        if len(box_rc) != 4:
            raise ValueError(f"box_rc must be (row0, col0, row1, col1), got {len(box_rc)} values")
        r0, c0, r1, c1 = (float(v) for v in box_rc)
        y0, x0 = self.to_model(min(r0, r1), min(c0, c1))
        y1, x1 = self.to_model(max(r0, r1), max(c0, c1))

        def clip(v: int) -> int:
            return min(max(v, 0), MODEL_SCALE)

        return [
            clip(math.floor(y0 + _ROUND_EPS)),
            clip(math.floor(x0 + _ROUND_EPS)),
            clip(math.ceil(y1 - _ROUND_EPS)),
            clip(math.ceil(x1 - _ROUND_EPS)),
        ]


def _render_square(pixels: FloatImage, transform: SquareTransform) -> RGBImage:
    """Place ``pixels`` on the transform's black square, resize, return RGB uint8."""
    side = transform.side
    square = np.zeros((side, side), dtype=np.float32)
    # Intersection of the source image with the square, in source pixel indices.
    r0, c0 = max(0, -transform.pad_top), max(0, -transform.pad_left)
    r1 = min(transform.src_rows, side - transform.pad_top)
    c1 = min(transform.src_cols, side - transform.pad_left)
    if r1 > r0 and c1 > c0:
        square[
            r0 + transform.pad_top : r1 + transform.pad_top,
            c0 + transform.pad_left : c1 + transform.pad_left,
        ] = pixels[r0:r1, c0:c1]
    size = transform.model_size
    if side != size:
        # PIL maps pixel areas edge to edge (output pixel i covers [i, i+1) * side/size),
        # which is exactly the SquareTransform's convention.
        resized = Image.fromarray(square, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        square = np.asarray(resized, dtype=np.float32)
    gray = np.clip(square * np.float32(255.0) + np.float32(0.5), 0.0, 255.0).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def to_model_image(
    img: DisplayImage, size: int = MODEL_IMAGE_SIZE
) -> tuple[RGBImage, SquareTransform]:
    """The model input: ``img`` centred on a black square, resized to ``size`` x ``size``.

    Returns a ``(size, size, 3)`` RGB uint8 array (the three channels equal) and the
    :class:`SquareTransform` between its 0..1000 box space and ``img``'s source pixels.
    Resampling is bicubic (antialiased when shrinking).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    transform = SquareTransform.centred(img.rows, img.cols, size)
    return _render_square(img.as_float(), transform), transform


def crop_source(
    img: DisplayImage,
    box_rc: Sequence[float],
    margin_fraction: float = 0.15,
    out_size: int = MODEL_IMAGE_SIZE,
    min_side: int = 224,
) -> tuple[RGBImage, SquareTransform]:
    """A square crop around a source region, from the full-resolution image.

    ``box_rc`` is ``(row0, col0, row1, col1)`` in source pixels (continuous). The crop
    is the square of side ``max(ceil(max(h, w) * (1 + 2 * margin_fraction)), min_side)``
    source pixels centred on the box (``h``, ``w`` the box's height and width), its
    origin rounded to whole pixels; where it overhangs the image it is black. It is
    resized to ``out_size`` (up-sampled when the region is small, so the model sees it
    at full source detail) and returned as ``(out_size, out_size, 3)`` RGB uint8 with the
    :class:`SquareTransform` between the crop's 0..1000 box space and source pixels
    (``side`` = the crop side, ``pad_top``/``pad_left`` = minus the crop's origin).
    """
    if len(box_rc) != 4:
        raise ValueError(f"box_rc must be (row0, col0, row1, col1), got {len(box_rc)} values")
    r0, c0, r1, c1 = (float(v) for v in box_rc)
    r0, r1 = min(r0, r1), max(r0, r1)
    c0, c1 = min(c0, c1), max(c0, c1)
    if not all(math.isfinite(v) for v in (r0, c0, r1, c1)):
        raise ValueError(f"box_rc must be finite, got {tuple(box_rc)!r}")
    if r1 <= 0 or c1 <= 0 or r0 >= img.rows or c0 >= img.cols:
        raise ValueError(f"box_rc {tuple(box_rc)!r} lies outside the {img.rows} x {img.cols} image")
    if not 0.0 <= margin_fraction <= 10.0:
        raise ValueError(f"margin_fraction must be in [0, 10], got {margin_fraction!r}")
    if isinstance(out_size, bool) or not isinstance(out_size, int) or out_size < 1:
        raise ValueError(f"out_size must be a positive int, got {out_size!r}")
    extent = max(r1 - r0, c1 - c0) * (1.0 + 2.0 * margin_fraction)
    side = max(math.ceil(extent - _ROUND_EPS), int(min_side), 1)
    top = math.floor((r0 + r1) / 2.0 - side / 2.0 + 0.5)
    left = math.floor((c0 + c1) / 2.0 - side / 2.0 + 0.5)
    transform = SquareTransform(img.rows, img.cols, side, -top, -left, out_size)
    return _render_square(img.as_float(), transform), transform
