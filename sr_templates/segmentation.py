"""Binary DICOM Segmentation of one pre-read: one segment per finding anchor.

Each finding's region (an ellipse inscribed in its box, or the box) is rasterised in the
pixels of the frontal image it was drawn on: a pixel belongs to the segment when its
centre lies in the region. The SEG references that image, belongs to the same study and
has its own series (SEG series number 9002, series UID derived from the study).

CR/DX images have no Frame of Reference, and highdicom then writes a SEG that OHIF
cannot open (notes/ohif.md): the shared functional groups lack Pixel Measures and
Plane Orientation, which highdicom refuses to take without a Frame of Reference. They
are added after construction: Pixel Measures (Pixel Spacing = the image's Imager Pixel
Spacing or Pixel Spacing, Slice Thickness 1) and Plane Orientation (1\\0\\0\\0\\1\\0).
Patient Orientation (Type 2C, required without a Frame of Reference) is copied from the
image; highdicom leaves it out. Each segment has a display colour (OHIF warns without).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from sr_templates import codes as c
from sr_templates.model import PrereadResult
from sr_templates.records import ReportedFinding, reported_findings
from sr_templates.report import (
    DEFAULT_MANUFACTURER,
    coding_scheme_identification,
    detach_from_sources,
    use_utf8,
    with_empty_type2,
)
from sr_templates.series import DEFAULT_NODE, series_uid

__all__ = ["SEG_CONTENT_LABEL", "SEG_SERIES_DESCRIPTION", "build_segmentation"]

SEG_SERIES_DESCRIPTION: Final = "MedGemma pre-read regions (AI, preliminary)"
SEG_CONTENT_LABEL: Final = "MEDGEMMA_PREREAD"
_LO_MAX: Final = 64  # Segment Label is LO
#: Segment display colours (RGB, written as Recommended Display CIELab Value), in turn:
#: distinct on a grey radiograph; without them OHIF warns and picks its own.
_PALETTE: Final = (
    (230, 60, 60),
    (60, 200, 90),
    (70, 130, 240),
    (240, 200, 40),
    (40, 210, 220),
    (220, 80, 220),
    (250, 140, 30),
    (150, 100, 240),
)


def _spacing(source: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    return None


def _description(
    number: int, finding: ReportedFinding, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    label = finding.tracking_identifier[:_LO_MAX]
    category = finding.finding.category
    assert category is not None  # every finding concept has one (ontology validates)
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=category,
        segmented_property_type=finding.finding.code,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=finding.tracking_uid,
        tracking_id=label,
        anatomic_regions=[finding.site.code] if finding.site is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*_PALETTE[(number - 1) % len(_PALETTE)]),
    )


def _add_laterality(segment: Dataset, finding: ReportedFinding) -> None:
    """Laterality of the anatomic region as an Anatomic Region Modifier (CID 244)."""
    code = finding.laterality_code
    if code is None or "AnatomicRegionSequence" not in segment:
        return
    modifier = Dataset()
    modifier.CodeValue = code.value
    modifier.CodingSchemeDesignator = code.scheme_designator
    modifier.CodeMeaning = code.meaning
    segment.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [modifier]


def _content_description(record: PrereadResult) -> str:
    """Content Description (LO, 64 characters): the AI statement, DEMO first when a demo."""
    if record.is_demo:
        return f"{c.DEMO_STATEMENT}; AI-generated, preliminary"
    return c.AI_STATEMENT


def _make_ohif_compatible(seg: Dataset, source: Dataset) -> None:
    """Pixel Measures, Plane Orientation and Patient Orientation for a CR/DX source."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = Dataset()
    spacing = _spacing(source)
    if spacing is not None:
        measures.PixelSpacing = [f"{spacing[0]:.6g}", f"{spacing[1]:.6g}"]
    measures.SliceThickness = "1"
    shared.PixelMeasuresSequence = [measures]
    orientation = Dataset()
    orientation.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    shared.PlaneOrientationSequence = [orientation]
    if "PatientOrientation" in source:
        seg.PatientOrientation = source.PatientOrientation
    else:
        seg.PatientOrientation = ""


def _segment_pixels(
    findings: Sequence[ReportedFinding], rows: int, cols: int
) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | npt.NDArray[np.bool_]:
    """The segments' pixels in the cheapest form highdicom takes, for one frame.

    Segments that do not overlap (the usual case): a label map, ``(1, rows, cols)`` with
    pixel value n in segment n. highdicom then checks it with one ``max()`` and writes
    segment n's frame as ``label == n``: the same bits as a stack of masks, whose
    overlap check sums every pixel over the segments (most of the SEG's build time at
    2500 x 2048). Overlapping segments cannot be one label map: the stack of masks,
    ``(1, rows, cols, segments)``.
    """
    dtype = np.uint8 if len(findings) <= np.iinfo(np.uint8).max else np.uint16
    labels = np.zeros((rows, cols), dtype=dtype)
    masks = [f.region.mask(rows, cols) for f in findings]
    for number, mask in enumerate(masks, 1):
        if labels[mask].any():  # overlaps an earlier segment
            return np.stack(masks, axis=-1)[np.newaxis]
        labels[mask] = number
    return labels[np.newaxis]


def build_segmentation(
    result: PrereadResult,
    source_dataset: Dataset,
    *,
    series_number: int,
    instance_number: int,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    manufacturer: str = DEFAULT_MANUFACTURER,
    node: str = DEFAULT_NODE,
) -> Dataset | None:
    """The binary SEG of a pre-read result's findings on ``source_dataset``, or None.

    source_dataset: the frontal image the anchors were drawn on (its attributes only;
        pixel data are not decoded). Anchors on another image are an error.
    series_number / instance_number / sop_instance_uid / series_instance_uid: as for
        :func:`sr_templates.report.build_measurement_report` (series UID default:
        :func:`sr_templates.series.series_uid` ("seg") of the study).

    Segment n is the n-th finding anchor: label and tracking ID = the anchor's tracking
    identifier ("A1 right upper zone nodule"), tracking UID = the anchor's tracking UID,
    property type = the finding's code, category from the ontology, anatomic region = the
    finding site with its laterality. Returns None when the result has no finding anchors:
    a SEG must hold at least one segment, and an empty one would tell the reader nothing.
    """
    if not isinstance(result, PrereadResult):
        raise TypeError(f"result must be a PrereadResult, got {type(result).__name__}")
    record = result
    if not isinstance(source_dataset, Dataset):
        raise TypeError("source_dataset must be a pydicom Dataset (the frontal image)")
    for name, value in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not reported_findings(record):
        return None
    source_uid = str(source_dataset.SOPInstanceUID)
    for finding in reported_findings(record):
        if finding.source_sop_instance_uid != source_uid:
            raise ValueError(
                f"anchor {finding.anchor_id} is on image {finding.source_sop_instance_uid}, "
                f"not on source_dataset {source_uid}"
            )
    source_dataset = with_empty_type2(source_dataset)
    rows, cols = int(source_dataset.Rows), int(source_dataset.Columns)
    masks = _segment_pixels(reported_findings(record), rows, cols)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=record.model_id,
        family=c.ALGORITHM_FAMILY_AI,
        version=record.model_revision,
        parameters=record.algorithm_parameters,
    )
    descriptions = [
        _description(i, finding, algorithm)
        for i, finding in enumerate(reported_findings(record), 1)
    ]
    study_uid = str(source_dataset.StudyInstanceUID)
    seg = hd.seg.Segmentation(
        source_images=[source_dataset],
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or series_uid("seg", study_uid, node=node),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(prefix=c.UID_ROOT),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name="medgemma-node",
        software_versions=record.node_version,
        device_serial_number=node,
        content_description=_content_description(record),
        content_label=SEG_CONTENT_LABEL,
        content_creator_name="MedGemma^PreRead",
    )
    detach_from_sources(seg, [source_dataset])
    use_utf8(seg)
    for segment, finding in zip(seg.SegmentSequence, reported_findings(record), strict=True):
        _add_laterality(segment, finding)
    _make_ohif_compatible(seg, source_dataset)
    description = SEG_SERIES_DESCRIPTION
    if record.is_demo:
        description = f"DEMO {description}"
    seg.SeriesDescription = description
    if any(f.finding.code.scheme_designator == c.PRIVATE_SCHEME or (
        f.site is not None and f.site.code.scheme_designator == c.PRIVATE_SCHEME
    ) for f in reported_findings(record)):  # fmt: skip
        coding_scheme_identification(seg)
    return seg
