"""TID 1500 Measurement Report (Comprehensive 3D SR) of one pre-read, built with highdicom.

Layout (see README.md for why)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")      TID 1500
      HAS CONCEPT MOD  Language of Content Item and Descendants  en-US
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID/Name/Manufacturer/Model
      HAS CONCEPT MOD  Procedure reported = (413815006, SCT, "Chest imaging (procedure)")
      CONTAINS         Image Library: every source image of the study
      CONTAINS         CONTAINER (126010, DCM, "Imaging Measurements")  - only with findings
        CONTAINS       CONTAINER (125007, DCM, "Measurement Group")      TID 1410, per finding
          Tracking Identifier "A1 right upper zone nodule", Tracking Unique Identifier
          Finding, Finding Site (+ Laterality), Algorithm Identification (TID 4019)
          Image Region SCOORD (ELLIPSE / closed POLYLINE / POINT) SELECTED FROM the image
          Long axis, Short axis, Area (NUM, mm / mm2 or {pixels} / {pixels^2})
          Qualitative evaluations: Margins, Lesion Density, Shape
      CONTAINS         CONTAINER (C0034375, UMLS, "Qualitative Evaluations")  TID 1500 row 12
        TEXT Finding (the narrative), TEXT Impression, TEXT Comment (AI statement, provenance)

Completion Flag PARTIAL, Verification Flag UNVERIFIED: the report is preliminary and no
person has verified it.

OHIF: the groups are standard TID 1410 (SCOORD at group level, NUM siblings), which OHIF
3.x draws read-only (outline + values, "not compatible" badge), not its own
tracked-measurement convention (Tracking Identifier "Cornerstone3DTools@^0.1.0:<Tool>",
SCOORD under the first NUM), which would put a viewer tool name where the readable
tracking identifier belongs and make OHIF recompute the sizes instead of showing ours.
Every group has 112039 and 112040, without which OHIF crashes. README.md has the reasons.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Final

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageContentItem,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
    UIDRefContentItem,
)
from highdicom.sr.enum import GraphicTypeValues, RelationshipTypeValues
from highdicom.sr.value_types import CodeContentItem
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    generate_uid,
)
from pydicom.valuerep import PersonName

from sr_templates import codes as c
from sr_templates.model import AnchorDistance, PrereadResult
from sr_templates.records import ReportedFinding, reported_findings
from sr_templates.series import DEFAULT_NODE, device_uid, series_uid

__all__ = [
    "COMPREHENSIVE_3D_SR",
    "DEFAULT_MANUFACTURER",
    "SR_SERIES_DESCRIPTION",
    "build_measurement_report",
    "coding_scheme_identification",
]

COMPREHENSIVE_3D_SR: Final = Comprehensive3DSRStorage
DEFAULT_MANUFACTURER: Final = "medgemma-node"
SR_SERIES_DESCRIPTION: Final = "MedGemma pre-read (AI, preliminary)"
_MODALITIES: Final[dict[str, Code]] = {
    ComputedRadiographyImageStorage: c.MODALITY_CR,
    DigitalXRayImageStorageForPresentation: c.MODALITY_DX,
    DigitalXRayImageStorageForProcessing: c.MODALITY_DX,
}
# A Secondary Capture of a radiograph (digitised film) is described by its Modality.
_MODALITY_NAMES: Final[dict[str, Code]] = {"CR": c.MODALITY_CR, "DX": c.MODALITY_DX}


def _source_by_uid(source_datasets: Sequence[Dataset]) -> dict[str, Dataset]:
    if isinstance(source_datasets, Dataset) or not isinstance(source_datasets, Sequence):
        raise TypeError("source_datasets must be a list of pydicom Datasets")
    if not source_datasets:
        raise ValueError("source_datasets must hold at least the frontal image")
    by_uid: dict[str, Dataset] = {}
    study_uids = set()
    for i, ds in enumerate(source_datasets):
        if not isinstance(ds, Dataset):
            raise TypeError(f"source_datasets[{i}] must be a pydicom Dataset")
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
            if keyword not in ds:
                raise ValueError(f"source_datasets[{i}] has no {keyword}")
        by_uid[str(ds.SOPInstanceUID)] = ds
        study_uids.add(str(ds.StudyInstanceUID))
    if len(study_uids) != 1:
        raise ValueError(f"source_datasets must be images of one study, got {len(study_uids)}")
    return by_uid


def _image_library(datasets: Sequence[Dataset]) -> ContainerContentItem:
    """TID 1600 Image Library with TID 1602/1603 descriptors of every source image.

    Written here rather than with highdicom's ImageLibrary, which (0.28.2) requires Imager
    Pixel Spacing and a two-valued Patient Orientation on every CR/DX image; both may be
    absent (CR without spacing). Descriptors that the image lacks are left out.
    """
    acq = RelationshipTypeValues.HAS_ACQ_CONTEXT
    groups: dict[tuple[str, str], list[ImageContentItem]] = {}
    for ds in datasets:
        modality = _MODALITIES.get(str(ds.SOPClassUID)) or _MODALITY_NAMES.get(
            str(ds.get("Modality", "")).strip().upper()
        )
        if modality is None:
            raise ValueError(f"source image {ds.SOPInstanceUID} is not a CR or DX image")
        item = ImageContentItem(
            name=c.IMAGE_SOURCE,
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=str(ds.SOPInstanceUID),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        descriptors = ContentSequence()
        descriptors.append(CodeContentItem(c.MODALITY, modality, acq))
        for name, value in ((c.PIXEL_DATA_ROWS, ds.Rows),
                            (c.PIXEL_DATA_COLUMNS, ds.Columns)):  # fmt: skip
            descriptors.append(
                NumContentItem(name, int(value), unit=c.UNIT_PIXELS, relationship_type=acq)
            )
        orientation = ds.get("PatientOrientation")
        if orientation is not None and len(orientation) == 2 and all(orientation):
            descriptors.append(TextContentItem(c.PATIENT_ORIENTATION_ROW, orientation[0], acq))
            descriptors.append(TextContentItem(c.PATIENT_ORIENTATION_COLUMN, orientation[1], acq))
        spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
        if spacing is not None and len(spacing) == 2:
            for name, value in ((c.HORIZONTAL_PIXEL_SPACING, spacing[1]),
                                (c.VERTICAL_PIXEL_SPACING, spacing[0])):  # fmt: skip
                descriptors.append(
                    NumContentItem(name, float(value), unit=c.UNIT_MM, relationship_type=acq)
                )
        item.ContentSequence = descriptors
        key = (modality.value, str(ds.get("FrameOfReferenceUID", "")))
        groups.setdefault(key, []).append(item)
    library = ContainerContentItem(
        name=c.IMAGE_LIBRARY, relationship_type=RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = ContentSequence()
    for (_modality, frame_of_reference), items in groups.items():
        group = ContainerContentItem(
            name=c.IMAGE_LIBRARY_GROUP,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        group.ContentSequence = ContentSequence()
        if frame_of_reference:
            group.ContentSequence.append(
                UIDRefContentItem(c.FRAME_OF_REFERENCE_UID, frame_of_reference, acq)
            )
        group.ContentSequence.extend(items)
        library.ContentSequence.append(group)
    return library


def _algorithm(record: PrereadResult) -> AlgorithmIdentification:
    """TID 4019: name = model id, version = model revision, parameters = the prompt and
    node versions (as "key=value")."""
    return AlgorithmIdentification(
        name=record.model_id,
        version=record.model_revision,
        parameters=[f"{k}={v}" for k, v in record.algorithm_parameters.items()],
    )


def _measurements(finding: ReportedFinding) -> list[Measurement]:
    m = finding.measurements
    if m is None:
        return []
    if m.units == "mm":
        length, area = c.UNIT_MM, c.UNIT_MM2
    else:
        length, area = c.UNIT_PIXELS, c.UNIT_SQUARE_PIXELS
    return [
        Measurement(name=c.MEASUREMENT_LONG_AXIS, value=m.long_axis, unit=length),
        Measurement(name=c.MEASUREMENT_SHORT_AXIS, value=m.short_axis, unit=length),
        Measurement(name=c.MEASUREMENT_AREA, value=m.area, unit=area),
    ]


def _group(
    finding: ReportedFinding, source: Dataset, algorithm: AlgorithmIdentification
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    graphic_type, points = finding.region.graphic()
    region = ImageRegion(
        graphic_type=graphic_type,
        graphic_data=points,
        source_image=SourceImageForRegion(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
        ),
    )
    sites = []
    if finding.site is not None:
        sites.append(
            FindingSite(anatomic_location=finding.site.code, laterality=finding.laterality_code)
        )
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=finding.tracking_uid, identifier=finding.tracking_identifier
        ),
        referenced_region=region,
        finding_type=finding.finding.code,
        algorithm_id=algorithm,
        finding_sites=sites or None,
        measurements=_measurements(finding) or None,
        qualitative_evaluations=[
            QualitativeEvaluation(name=name.code, value=value.code)
            for name, value in finding.attributes
        ]
        or None,
    )


def _distance_group(
    distance: AnchorDistance, source: Dataset, algorithm: AlgorithmIdentification
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """A distance between two anchors: a TID 1410 group whose region is the measured
    centre-to-centre line (an open two-point POLYLINE) with the centre distance and the
    nearest-edge gap as NUMs."""
    (r0, c0), (r1, c1) = distance.line
    region = ImageRegion(
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=np.array([[c0, r0], [c1, r1]], dtype=np.float64),
        source_image=SourceImageForRegion(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
        ),
    )
    unit = c.UNIT_MM if distance.units == "mm" else c.UNIT_PIXELS
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=distance.tracking_uid, identifier=distance.tracking_identifier
        ),
        referenced_region=region,
        algorithm_id=algorithm,
        measurements=[
            Measurement(name=c.MEASUREMENT_DISTANCE, value=distance.centres, unit=unit),
            Measurement(name=c.MEASUREMENT_EDGE_DISTANCE, value=distance.edges, unit=unit),
        ],
    )


def _statement(record: PrereadResult) -> str:
    parts = []
    if record.is_demo:
        parts.append(f"{c.DEMO_STATEMENT}.")
    parts.append(f"{c.AI_STATEMENT}.")
    parts.append(
        f"Model {record.model_id} (revision {record.model_revision}), prompt "
        f"{record.prompt_version}, medgemma-node {record.node_version}."
    )
    units = {f.measurements.units for f in reported_findings(record) if f.measurements is not None}
    if "px" in units:
        parts.append("The image has no pixel spacing: sizes are in pixels.")
    if "mm" in units:
        parts.append(
            "Sizes are computed from the outlined regions and the image's pixel spacing "
            "(Imager Pixel Spacing is at the detector, not corrected for magnification), "
            "never taken from the model's text."
        )
    return " ".join(parts)


def _narrative(record: PrereadResult) -> ContainerContentItem:
    container = ContainerContentItem(
        name=c.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    items = ContentSequence()
    contains = RelationshipTypeValues.CONTAINS
    if record.findings_text:
        items.append(TextContentItem(c.NARRATIVE_FINDING, record.findings_text, contains))
    if record.impression:
        items.append(TextContentItem(c.NARRATIVE_IMPRESSION, record.impression, contains))
    items.append(TextContentItem(c.NARRATIVE_COMMENT, _statement(record), contains))
    container.ContentSequence = items
    return container


def _root(
    record: PrereadResult,
    sources: dict[str, Dataset],
    source_datasets: Sequence[Dataset],
    *,
    manufacturer: str,
) -> ContentSequence:
    """The TID 1500 root container and its content (see the module docstring)."""
    root = ContainerContentItem(name=c.REPORT_TITLE, template_id="1500")
    content = ContentSequence()
    content.extend(LanguageOfContentItemAndDescendants(CodedConcept.from_code(c.LANGUAGE_EN_US)))
    device = DeviceObserverIdentifyingAttributes(
        uid=device_uid(record.model_id, record.model_revision),
        name="MedGemma pre-read",
        manufacturer_name=manufacturer,
        model_name=record.model_id,
    )
    content.extend(
        ObservationContext(
            observer_device_context=ObserverContext(
                observer_type=CodedConcept.from_code(c.OBSERVER_TYPE_DEVICE),
                observer_identifying_attributes=device,
            )
        )
    )
    content.append(
        CodeContentItem(
            name=c.PROCEDURE_REPORTED,
            value=c.PROCEDURE_CHEST_IMAGING,
            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    content.append(_image_library(source_datasets))
    if reported_findings(record) or record.distances:
        algorithm = _algorithm(record)
        measurements = ContainerContentItem(
            name=c.IMAGING_MEASUREMENTS, relationship_type=RelationshipTypeValues.CONTAINS
        )
        groups = ContentSequence()
        for finding in reported_findings(record):
            source = sources.get(finding.source_sop_instance_uid)
            if source is None:
                raise ValueError(
                    f"anchor {finding.anchor_id} refers to image "
                    f"{finding.source_sop_instance_uid}, which is not in source_datasets"
                )
            groups.extend(_group(finding, source, algorithm))
        for distance in record.distances:
            source = sources.get(distance.source_sop_instance_uid)
            if source is None:
                raise ValueError(
                    f"distance {distance.tracking_identifier} refers to image "
                    f"{distance.source_sop_instance_uid}, which is not in source_datasets"
                )
            groups.extend(_distance_group(distance, source, algorithm))
        measurements.ContentSequence = groups
        content.append(measurements)
    content.append(_narrative(record))
    root.ContentSequence = content
    return ContentSequence([root], is_root=True)


def coding_scheme_identification(dataset: Dataset) -> None:
    """Declare the private coding scheme (99MGN) in ``dataset`` when its content uses it
    (Coding Scheme Identification Sequence, SOP Common module)."""
    item = Dataset()
    item.CodingSchemeDesignator = c.PRIVATE_SCHEME
    item.CodingSchemeName = c.PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = c.PRIVATE_SCHEME_ORGANIZATION
    existing = [
        x for x in dataset.get("CodingSchemeIdentificationSequence", [])
        if x.CodingSchemeDesignator != c.PRIVATE_SCHEME
    ]  # fmt: skip
    dataset.CodingSchemeIdentificationSequence = [*existing, item]


#: Type 2 Patient and General Study attributes highdicom copies from the source images.
#: Real files leave some out (a CR without Patient ID): the SR/SEG get them empty.
PATIENT_STUDY_TYPE2: Final = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def with_empty_type2(source: Dataset) -> Dataset:
    """``source``, or a copy of it (same element objects) in which every
    :data:`PATIENT_STUDY_TYPE2` attribute it lacks is present and empty."""
    missing = [keyword for keyword in PATIENT_STUDY_TYPE2 if keyword not in source]
    if not missing:
        return source
    completed = Dataset()
    for elem in source:
        completed.add(elem)
    meta = getattr(source, "file_meta", None)
    if meta is not None:
        completed.file_meta = meta
    for keyword in missing:
        setattr(completed, keyword, "")
    return completed


def detach_from_sources(dataset: Dataset, sources: Sequence[Dataset]) -> None:
    """Give ``dataset`` its own copies of data elements it shares with ``sources``.

    highdicom puts the source images' patient and study element objects themselves into
    the new SR/SEG, so that changing one (``sr.PatientName = ...``) would change the
    source image too.
    """
    for source in sources:
        for tag in list(dataset.keys()):
            if tag in source and dataset[tag] is source[tag]:
                dataset[tag] = copy.deepcopy(source[tag])


def use_utf8(dataset: Dataset) -> None:
    """Specific Character Set ISO_IR 192 (UTF-8) for the whole object.

    highdicom copies the source image's character set (often ISO_IR 100, Latin-1), in
    which a model's narrative or label ("右上肺野结节", "≥ 5 mm") cannot be encoded; the
    values are Python strings, so the patient and study attributes copied from the image
    are simply written in UTF-8 as well.
    """
    dataset.SpecificCharacterSet = "ISO_IR 192"
    _fresh_person_names(dataset)


def _fresh_person_names(dataset: Dataset) -> None:
    """Person names rebuilt from their text: a PersonName made from a str keeps the bytes
    of its first encoding (e.g. Latin-1, when the source image was saved) and would write
    those bytes again under ISO_IR 192 (pydicom 3.0)."""
    for elem in dataset:
        if elem.VR == "PN" and elem.value is not None:
            if elem.VM > 1:
                elem.value = [PersonName(str(v)) for v in elem.value]
            elif elem.value != "":
                elem.value = PersonName(str(elem.value))
        elif elem.VR == "SQ":
            for item in elem.value:
                _fresh_person_names(item)


def _uses_private_scheme(value: Any) -> bool:
    if isinstance(value, Dataset):
        if value.get("CodingSchemeDesignator") == c.PRIVATE_SCHEME:
            return True
        return any(_uses_private_scheme(elem.value) for elem in value if elem.VR == "SQ")
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return any(_uses_private_scheme(item) for item in value)
    return False


def build_measurement_report(
    result: PrereadResult,
    source_datasets: list[Dataset],
    *,
    series_number: int,
    instance_number: int,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    predecessor: Dataset | None = None,
    manufacturer: str = DEFAULT_MANUFACTURER,
    institution_name: str | None = None,
    node: str = DEFAULT_NODE,
) -> Dataset:
    """The TID 1500 Measurement Report (Comprehensive 3D SR) of a pre-read result.

    result: a pre-read result (``sr_templates.model.PrereadResult``).
    source_datasets: the study's images (at least every image an anchor refers to; the
        frontal image). They go into the image library and the evidence; pixel data are
        not needed.
    series_number / instance_number: Series and Instance Number (see
        :func:`sr_templates.series.series_number`; the study version is a good instance
        number).
    sop_instance_uid: None gives a new random UID under ``codes.UID_ROOT``; pass
        :func:`sr_templates.series.derived_uid` for a redelivery-safe UID.
    series_instance_uid: None gives :func:`sr_templates.series.series_uid` ("sr") of the
        study, the same for every version.
    predecessor: the SR this one amends: listed in the Predecessor Documents Sequence.
        The amended result's anchors keep their tracking UIDs (workers.anchors), so each
        finding keeps its Tracking Unique Identifier across versions.

    One standard TID 1410 measurement group per finding anchor (read-only in OHIF, see
    the module docstring); landmarks are not written (README.md).
    A result without findings gives a report with the narrative only. Every report says
    it is AI-generated and preliminary, and DEMO when the engine was the demo engine.
    """
    if not isinstance(result, PrereadResult):
        raise TypeError(f"result must be a PrereadResult, got {type(result).__name__}")
    record = result
    source_datasets = [with_empty_type2(ds) for ds in source_datasets]
    sources = _source_by_uid(source_datasets)
    for name, value in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    study_uid = str(source_datasets[0].StudyInstanceUID)
    if predecessor is not None:
        if not isinstance(predecessor, Dataset):
            raise TypeError("predecessor must be a pydicom Dataset (the SR being amended)")
        if str(predecessor.get("StudyInstanceUID", "")) != study_uid:
            raise ValueError("predecessor must be an SR of the same study")
        if predecessor.get("Modality") != "SR":
            raise ValueError("predecessor must be an SR document (Modality SR)")
    content = _root(record, sources, source_datasets, manufacturer=manufacturer)
    # highdicom deep-copies the content tree, parses the copy back into content items and
    # walks it for references, for ``sr.content`` and a check that _root meets by
    # construction (every image it references is one of ``sources``): a third of the
    # report's build time. It gets the root container without its items, which go into
    # the document afterwards; the result is returned as a plain Dataset (no ``content``
    # view that would not show them).
    shell = Dataset()
    for elem in content[0]:
        if elem.keyword != "ContentSequence":
            shell.add(elem)
    shell.ContentSequence = []
    built = hd.sr.Comprehensive3DSR(
        evidence=list(source_datasets),
        content=shell,
        series_instance_uid=series_instance_uid or series_uid("sr", study_uid, node=node),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(prefix=c.UID_ROOT),
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=False,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        previous_versions=[predecessor] if predecessor is not None else None,
    )
    sr = Dataset(built)
    sr.file_meta = built.file_meta
    sr.ContentSequence = content[0].ContentSequence
    detach_from_sources(sr, source_datasets)
    use_utf8(sr)
    description = SR_SERIES_DESCRIPTION
    if record.is_demo:
        description = f"DEMO {description}"
    sr.SeriesDescription = description
    sr.ManufacturerModelName = "medgemma-node"
    sr.SoftwareVersions = record.node_version
    if _uses_private_scheme(sr.ContentSequence):
        coding_scheme_identification(sr)
    return sr
