"""Which studies get a pre-read: chest radiographs (CR/DX) by header, configurable in node.toml.

Also the one definition of a *readable chest radiograph image* (:func:`radiograph_refusal`):
the routing rules apply it to the headers of a study's images, and the reader
(``workers.imaging.choose_views``) to each image it considers, so a study the rules queue
always has an image the reader takes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from node.ledger import SeriesSummary, StudyLedger, StudySummary
from node.settings import PrereadSettings

log = logging.getLogger("medgemma.rules")

#: CR and DX image SOP classes: read whatever their Modality says.
RADIOGRAPH_SOP_CLASSES: Final[frozenset[str]] = frozenset(
    {
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
    }
)
#: Secondary Capture SOP classes (digitised films, public dataset exports): read when
#: their Modality is a radiograph's and they hold one grey frame.
SECONDARY_CAPTURE_SOP_CLASSES: Final[frozenset[str]] = frozenset(
    {
        SecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)
#: The Modality a Secondary Capture must carry to be read as a radiograph.
RADIOGRAPH_MODALITIES: Final[frozenset[str]] = frozenset({"CR", "DX"})
GREY_PHOTOMETRIC: Final[frozenset[str]] = frozenset({"MONOCHROME1", "MONOCHROME2"})
#: Colour encodings read when the image is grey (:func:`is_grey`): scanned films are
#: often stored as RGB or as JPEG in YBR with equal channels.
COLOUR_PHOTOMETRIC: Final[frozenset[str]] = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422"})

# A colour image is grey when at most this fraction of its pixels has channels that
# differ by more than _GREY_TOLERANCE of the full range (lossy JPEG leaves small
# differences; an annotation or a photograph leaves large ones).
_GREY_TOLERANCE: Final = 0.06
_MAX_COLOUR_FRACTION: Final = 0.005
_COLOUR_SAMPLE: Final = 250_000


@dataclass(frozen=True)
class ImageHeader:
    """The header facts that decide whether an image is a readable chest radiograph."""

    sop_class_uid: str
    modality: str
    series_uid: str = ""
    photometric: str = ""
    frames: int = 1
    has_pixels: bool = True  # Rows and Columns present

    @classmethod
    def of(cls, ds: Dataset) -> ImageHeader:
        """The facts of one dataset (read with or without its pixels)."""
        sop_class = _text(ds, "SOPClassUID")
        meta = getattr(ds, "file_meta", None)
        if not sop_class and meta is not None:
            sop_class = _text(meta, "MediaStorageSOPClassUID")
        try:
            frames = int(ds.get("NumberOfFrames") or 1)
        except (TypeError, ValueError):
            frames = 1
        return cls(
            sop_class_uid=sop_class,
            modality=_text(ds, "Modality").upper(),
            series_uid=_text(ds, "SeriesInstanceUID"),
            photometric=_text(ds, "PhotometricInterpretation").upper(),
            frames=frames,
            has_pixels="Rows" in ds and "Columns" in ds,
        )


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def radiograph_refusal(image: ImageHeader) -> str | None:
    """Why ``image`` is not a readable chest radiograph image; None when it is one.

    Readable: a CR or DX image, or a Secondary Capture whose Modality is CR or DX; with
    Rows/Columns, a single frame, and MONOCHROME1/2 (CR/DX any photometric
    interpretation; Secondary Capture also RGB / YBR_FULL(_422), read when the pixels
    turn out grey, :func:`is_grey`).
    """
    if image.sop_class_uid in RADIOGRAPH_SOP_CLASSES:
        kind = image.modality or "CR/DX"
    elif image.sop_class_uid in SECONDARY_CAPTURE_SOP_CLASSES:
        if image.modality not in RADIOGRAPH_MODALITIES:
            return f"Secondary Capture with Modality {image.modality or '(empty)'}, not CR/DX"
        if image.photometric not in GREY_PHOTOMETRIC | COLOUR_PHOTOMETRIC:
            return (
                f"Secondary Capture with Photometric Interpretation "
                f"{image.photometric or '(empty)'}, not MONOCHROME1/2 or grey RGB"
            )
        kind = f"{image.modality} Secondary Capture"
    else:
        return f"SOP class {image.sop_class_uid or '(none)'} is not a CR/DX image"
    if not image.has_pixels:
        return f"{kind} without Rows/Columns"
    if image.frames != 1:
        return f"{kind} with {image.frames} frames, not one"
    return None


def is_grey(rgb: npt.NDArray[np.generic], max_value: int) -> bool:
    """Whether a colour image (rows, cols, 3 or more) is grey: its channels (nearly) equal.

    ``max_value`` is the largest stored value (255 for 8 bits).
    """
    step = max(1, int((rgb.shape[0] * rgb.shape[1] / _COLOUR_SAMPLE) ** 0.5))
    sample = np.asarray(rgb[::step, ::step, :3], dtype=np.float32)
    spread = sample.max(axis=2) - sample.min(axis=2)
    coloured = float(np.mean(spread > _GREY_TOLERANCE * max_value))
    return coloured <= _MAX_COLOUR_FRACTION


def image_headers(ledger: StudyLedger, spool_root: Path, study: StudySummary) -> list[ImageHeader]:
    """The image headers of a study version's instances (read from the spool, no pixels)."""
    series = {s.series_uid for s in ledger.series_of(study.study_uid, study.version)}
    headers = []
    for inst in ledger.instances_of(study.study_uid, up_to_version=study.version):
        if inst.series_uid not in series:
            continue
        try:
            ds = dcmread(spool_root / inst.path, stop_before_pixels=True)
        except Exception as exc:  # stored, so readable; a vanished file is not a radiograph
            log.warning("SOP instance %s: header not readable (%s)", inst.sop_instance_uid, exc)
            continue
        headers.append(ImageHeader.of(ds))
    return headers


@dataclass(frozen=True)
class PrereadDecision:
    preread: bool
    reason: str  # shown by `status`; says which rule matched or why none did
    # the header says nothing about the body part: the engine is asked first whether the
    # image is a frontal chest radiograph (preread.ask_engine_if_unlabelled)
    ask_engine: bool = False


def _has_cjk(term: str) -> bool:
    return any("\u3400" <= ch <= "\u9fff" for ch in term)


def _matches(text: str, terms: Sequence[str]) -> str | None:
    """The first term found in text: whole words for Latin terms, substrings for CJK terms."""
    if not text:
        return None
    folded = text.casefold()
    for term in terms:
        t = term.strip().casefold()
        if not t:
            continue
        if _has_cjk(t):
            if t in folded:
                return term
        elif re.search(rf"(?<![0-9a-z]){re.escape(t)}(?![0-9a-z])", folded):
            return term
    return None


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def decide_preread(
    series: Sequence[SeriesSummary],
    study_description: str,
    rules: PrereadSettings,
    images: Sequence[ImageHeader] | None = None,
) -> PrereadDecision:
    """Pre-read a study when a series has a pre-read modality and a chest indication.

    The chest indication is a configured term in BodyPartExamined, SeriesDescription,
    ProtocolName or StudyDescription, or a chest view position (PA, AP, LL, ...) on a
    series whose body part is empty. A BodyPartExamined naming another region wins over a
    chest term in the study description. When ``images`` (the headers of the study's
    images) are given, only series holding a readable chest radiograph image
    (:func:`radiograph_refusal`) count. A study whose series carry no body part
    information at all is skipped, or, with ``rules.ask_engine_if_unlabelled``, queued
    for the engine to say whether it is a frontal chest radiograph.
    """
    modalities = {m.upper() for m in rules.modalities}
    eligible = [s for s in series if s.modality.upper() in modalities]
    if not eligible:
        found = sorted({s.modality or "?" for s in series})
        return PrereadDecision(
            False,
            f"no {'/'.join(sorted(modalities))} series (modalities: {', '.join(found)})",
        )
    if images is not None:
        refusals = {
            image.series_uid: refusal
            for image in images
            if (refusal := radiograph_refusal(image)) is not None
        }
        readable = {image.series_uid for image in images if radiograph_refusal(image) is None}
        if not any(s.series_uid in readable for s in eligible):
            why = sorted({refusals[s.series_uid] for s in eligible if s.series_uid in refusals})
            return PrereadDecision(
                False,
                "no readable chest radiograph image" + (f" ({'; '.join(why)})" if why else ""),
            )
        eligible = [s for s in eligible if s.series_uid in readable]
    views = {v.upper() for v in rules.chest_view_positions}
    for s in eligible:
        for field, value in (
            ("BodyPartExamined", s.body_part),
            ("SeriesDescription", s.series_description),
            ("ProtocolName", s.protocol_name),
        ):
            term = _matches(value, rules.chest_terms)
            if term:
                return PrereadDecision(True, f"{s.modality} {field} matches {term!r}")
    body_parts = sorted({s.body_part for s in eligible if s.body_part})
    if body_parts:
        return PrereadDecision(
            False, f"not a chest study (BodyPartExamined: {', '.join(body_parts)})"
        )
    term = _matches(study_description, rules.chest_terms)
    if term:
        return PrereadDecision(True, f"StudyDescription matches {term!r}")
    for s in eligible:
        if s.view_position.upper() in views:
            return PrereadDecision(True, f"{s.modality} ViewPosition {s.view_position}")
    fields = {
        "BodyPartExamined": False,
        "ViewPosition": any(s.view_position for s in eligible),
        "SeriesDescription": any(s.series_description for s in eligible),
        "ProtocolName": any(s.protocol_name for s in eligible),
        "StudyDescription": bool(study_description.strip()),
    }
    empty = [name for name, present in fields.items() if not present]
    present = [name for name, found in fields.items() if found]
    if present:
        return PrereadDecision(
            False,
            f"not a chest study (no chest term or view in {_join(present)}; empty: {_join(empty)})",
        )
    if rules.ask_engine_if_unlabelled:
        return PrereadDecision(
            True,
            f"no body part information ({_join(empty)} empty): the engine is asked "
            "whether it is a frontal chest radiograph",
            ask_engine=True,
        )
    return PrereadDecision(False, f"not a chest study ({_join(empty)} are empty)")


def decide_study(
    ledger: StudyLedger, spool_root: Path, study: StudySummary, rules: PrereadSettings
) -> PrereadDecision:
    """The decision for a stored study version: its series, description and image headers."""
    series = ledger.series_of(study.study_uid, study.version)
    images = None
    modalities = {m.upper() for m in rules.modalities}
    if any(s.modality.upper() in modalities for s in series):
        images = image_headers(ledger, spool_root, study)
    return decide_preread(series, study.study_description, rules, images)
