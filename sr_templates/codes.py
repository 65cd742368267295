"""Every coded concept and UID root the node writes into DICOM, in one place.

Sources, in order of preference (see README.md for the table):

1. pydicom's DICOM code dictionary (``pydicom.sr.codedict.codes``), which is generated
   from DICOM PS3.16 and which highdicom uses too. Codes taken from it are built with
   :func:`_dict_code`, which looks the code up by keyword and fails at import time if
   the dictionary does not hold it, so the code value and meaning here are exactly the
   dictionary's. The CID tables named in the comments are those the dictionary lists
   for the code (CID 6102/6104 chest findings, CID 6119/6120 border shape/definition,
   CID 244 laterality, CID 7151 segmented property types, ...).
2. SNOMED CT codes that pydicom's dictionary lacks: only those in :data:`SCT_ALLOW_LIST`,
   each with the public source it was checked against. No SNOMED CT number here is
   made up; where none was found the concept is private (3.).
3. The private coding scheme :data:`PRIVATE_SCHEME` ("99MGN", medgemma-node), declared
   in every SR and SEG through the Coding Scheme Identification Sequence. Private codes
   are for chest radiograph vocabulary that neither dictionary covers (hilar enlargement,
   widened mediastinum, hyperinflation, support device, lingula, costophrenic angle,
   heart border, solid / part-solid density) and for the radiographic signs of
   :mod:`sr_templates.signs` that have no standard code (``SIGN_*`` with scheme 99MGN).

UIDs: :data:`UID_ROOT` is a UUID-derived OID arc (ITU-T X.667 / ISO/IEC 9834-8, "2.25."
followed by the decimal value of a UUID generated once for this project), so the node
needs no registered organisation root and its UIDs cannot collide with anyone else's.
"""

from __future__ import annotations

from typing import Final

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "AI_STATEMENT",
    "DEMO_STATEMENT",
    "PRIVATE_SCHEME",
    "PRIVATE_SCHEME_NAME",
    "PRIVATE_SCHEME_ORGANIZATION",
    "SCT_ALLOW_LIST",
    "SEG_SERIES_NUMBER",
    "SR_SERIES_NUMBER",
    "UID_ROOT",
    "UNIT_MM",
    "UNIT_MM2",
    "UNIT_PIXELS",
    "UNIT_SQUARE_PIXELS",
]


def _dict_code(scheme: str, keyword: str) -> Code:
    """The code pydicom's dictionary holds under ``scheme``/``keyword``.

    Raises AttributeError at import time when the dictionary does not have it, so a
    dictionary change cannot silently change a code written into reports.
    """
    code: Code = getattr(getattr(codes, scheme), keyword)
    return code


# ----------------------------------------------------------------------------- UIDs

#: Root of every UID the node derives (SR/SEG series and instances, device observer):
#: "2.25." + the decimal form of UUID 4ffea8fb-b162-4014-a589-54cb25f22691, then ".".
#: 45 characters, leaving 19 digits for pydicom.uid.generate_uid's hashed suffix.
UID_ROOT: Final = "2.25.106331282455056028819045717221968062097."

#: Series numbers of the node's result series in a study (the same for every study, so
#: the PACS shows them at a stable place after the acquired series).
SR_SERIES_NUMBER: Final = 9001
SEG_SERIES_NUMBER: Final = 9002

# ----------------------------------------------------------------------------- text

#: Statements every SR carries (the same words as workers.preread.AI_NOTICE / DEMO_NOTICE;
#: tests/test_sr_templates.py checks they stay equal).
AI_STATEMENT: Final = "AI-generated, preliminary, not a diagnosis"
DEMO_STATEMENT: Final = "DEMO - not for clinical use"

# ----------------------------------------------------------------------------- private scheme

PRIVATE_SCHEME: Final = "99MGN"
PRIVATE_SCHEME_NAME: Final = "medgemma-node chest radiograph concepts"
PRIVATE_SCHEME_ORGANIZATION: Final = "medgemma-node project"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# ----------------------------------------------------------------------------- SNOMED CT allow-list

#: SNOMED CT codes used although pydicom's dictionary does not hold them: code value ->
#: (meaning written, where it was checked). Every other SCT code must be in the dictionary
#: (tests/test_sr_templates.py enforces both).
SCT_ALLOW_LIST: Final[dict[str, tuple[str, str]]] = {
    # morphologic abnormality, like Nodule 27925004 and Mass 4147007 (also morphologies)
    "9656002": (
        "Consolidation",
        "HL7 FHIR core example BodyStructure 'right-lung-consolidation' "
        "(https://build.fhir.org/bodystructure-example-right-lung-consolidation.json): "
        "morphology 9656002 'Consolidation'",
    ),
    "46621007": (
        "Atelectasis",
        "SNOMED CT International 46621007 |Atelectasis (disorder)|; the same code in public "
        "FHIR ConceptMaps (MedDRA 10003598 'Atelectasis' -> SCT 46621007, equivalent) and "
        "chest X-ray label maps (NIH ChestX-ray14 'Atelectasis')",
    ),
    # Not 287272002: pydicom lists it as 'Cardiomegaly' (CID 12248/12249, fetal findings)
    # but also as 'Enlarged septal foramen of heart (disorder)'; 8186001 is unambiguous.
    "8186001": (
        "Cardiomegaly",
        "SNOMED CT International 8186001 |Cardiomegaly (disorder)|; the same code in public "
        "chest X-ray label maps (NIH ChestX-ray14 / CheXpert 'Cardiomegaly')",
    ),
    "33737001": (
        "Fracture of rib",
        "SNOMED CT International 33737001 |Fracture of rib (disorder)|; Synthea's "
        "SNOMED->ICD-10-CM map gives it S22.39XA 'Fracture of one rib'",
    ),
    # conditions of the sign checklists (sr_templates.signs)
    "233604007": (
        "Pneumonia",
        "SNOMED CT International 233604007 |Pneumonia (disorder)|; OHDSI Covid-19 phenotype "
        "vocabulary (OHDSI/Covid-19 Vocabulary/Wiki/phenotypes/Pneumonia.md: SNOMED "
        "233604007 'Pneumonia', OMOP concept 255848)",
    ),
    "154283005": (
        "Pulmonary tuberculosis",
        "SNOMED CT International 154283005 |Pulmonary tuberculosis (disorder)|; the same code "
        "and display in public FHIR value sets (WHO SMART HIV opportunistic infections: "
        "$SCT#154283005 'Pulmonary tuberculosis') and ICD-10 A15 maps",
    ),
}


def _allowed_sct(value: str) -> Code:
    meaning, _source = SCT_ALLOW_LIST[value]
    return Code(value, "SCT", meaning)


# ----------------------------------------------------------------------------- findings

# CID numbers in comments: those pydicom's dictionary lists for the code.
# CID 6102, CID 6104 ("Abnormal Opacity Finding or Feature")
FINDING_NODULE: Final = _dict_code("SCT", "Nodule")  # 27925004
FINDING_MASS: Final = _dict_code("SCT", "Mass")  # 4147007
FINDING_CONSOLIDATION: Final = _allowed_sct("9656002")
FINDING_GROUND_GLASS_OPACITY: Final = _dict_code("DCM", "GroundGlassOpacity")  # 112120
# CID 6102, 6103, 6106
FINDING_RETICULAR_OPACITY: Final = _dict_code("DCM", "ReticularPattern")  # 112113
FINDING_ATELECTASIS: Final = _allowed_sct("46621007")
FINDING_PLEURAL_EFFUSION: Final = _dict_code("SCT", "PleuralEffusion")  # 60046008
# CID 6102, 6105 ("Abnormal Lucency Finding or Feature")
FINDING_PNEUMOTHORAX: Final = _dict_code("SCT", "Pneumothorax")  # 36118008
FINDING_CARDIOMEGALY: Final = _allowed_sct("8186001")
FINDING_HILAR_ENLARGEMENT: Final = _private("F-HILAR-ENLARGE", "Hilar enlargement")
FINDING_WIDENED_MEDIASTINUM: Final = _private("F-MEDIAST-WIDEN", "Widened mediastinum")
FINDING_RIB_FRACTURE: Final = _allowed_sct("33737001")
# CID 6335, 6336, 6338
FINDING_CALCIFICATION: Final = _dict_code("SCT", "PathologicCalcification")  # 18115005
FINDING_HYPERINFLATION: Final = _private("F-HYPERINFLATION", "Hyperinflation of lungs")
FINDING_SUPPORT_DEVICE: Final = _private("F-SUPPORT-DEVICE", "Support device (line or tube)")
FINDING_OTHER: Final = _dict_code("SCT", "ImagingFinding")  # 365853002

# ----------------------------------------------------------------------------- anatomy (sites)

# Lung: CID 6100, 6129; zones and lobes: CID 6124, 6126. Laterality is a modifier.
SITE_LUNG: Final = _dict_code("SCT", "Lung")  # 39607008
SITE_UPPER_ZONE_OF_LUNG: Final = _dict_code("SCT", "UpperZoneOfLung")  # 281392002
SITE_MIDDLE_ZONE_OF_LUNG: Final = _dict_code("SCT", "MiddleZoneOfLung")  # 281393007
SITE_LOWER_ZONE_OF_LUNG: Final = _dict_code("SCT", "LowerZoneOfLung")  # 281394001
SITE_UPPER_LOBE_OF_LUNG: Final = _dict_code("SCT", "UpperLobeOfLung")  # 45653009
SITE_MIDDLE_LOBE_OF_RIGHT_LUNG: Final = _dict_code("SCT", "MiddleLobeOfRightLung")  # 72481006
SITE_LOWER_LOBE_OF_LUNG: Final = _dict_code("SCT", "LowerLobeOfLung")  # 90572001
SITE_LINGULA: Final = _private("S-LINGULA", "Lingula of left lung")
# CID 6102, 6109, 6111, 6129
SITE_HILUM_OF_LUNG: Final = _dict_code("SCT", "HilumOfLung")  # 46750007
SITE_MEDIASTINUM: Final = _dict_code("SCT", "Mediastinum")  # 72410000
SITE_TRACHEA: Final = _dict_code("SCT", "Trachea")  # 44567001
SITE_HEART: Final = _dict_code("SCT", "Heart")  # 80891009
SITE_PLEURA: Final = _dict_code("SCT", "Pleura")  # 3120008
SITE_COSTOPHRENIC_ANGLE: Final = _private("S-COSTOPHRENIC", "Costophrenic angle")
SITE_DIAPHRAGM: Final = _dict_code("SCT", "Diaphragm")  # 5798000
# CID 6102, 6114
SITE_RIB: Final = _dict_code("SCT", "Rib")  # 113197003
SITE_CLAVICLE: Final = _dict_code("SCT", "Clavicle")  # 51299004
SITE_SPINE: Final = _dict_code("SCT", "Spine")  # 421060004
# CID 6129, 8134
SITE_UPPER_ABDOMEN: Final = _dict_code("SCT", "UpperAbdomen")  # 80581009
# landmarks: Carina CID 6102, 6111; Apex of lung CID 4
SITE_CARINA: Final = _dict_code("SCT", "Carina")  # 28700002
SITE_APEX_OF_LUNG: Final = _dict_code("SCT", "ApexOfLung")  # 86598002
SITE_HEART_BORDER: Final = _private("S-HEART-BORDER", "Border of cardiac silhouette")

# ----------------------------------------------------------------------------- laterality (CID 244)

LATERALITY_RIGHT: Final = _dict_code("SCT", "Right")  # 24028007
LATERALITY_LEFT: Final = _dict_code("SCT", "Left")  # 7771000
LATERALITY_BILATERAL: Final = _dict_code("SCT", "Bilateral")  # 51440002

# ----------------------------------------------------------------------------- qualitative

#: Concept names of the qualitative evaluations (TID 1410 row "Qualitative Evaluation").
ATTRIBUTE_MARGIN: Final = _dict_code("DCM", "Margins")  # 111037 (TID 4006 "Margins")
ATTRIBUTE_DENSITY: Final = _dict_code("DCM", "LesionDensity")  # 111035 "Lesion Density"
ATTRIBUTE_SHAPE: Final = _dict_code("SCT", "Shape")  # 300842002 (CID 6333)

# margin values
MARGIN_SMOOTH: Final = _dict_code("SCT", "Smooth")  # 82280004 (CID 3715)
MARGIN_LOBULATED: Final = _dict_code("DCM", "Lobulated")  # 112135 (CID 6119)
MARGIN_SPICULATED: Final = _dict_code("DCM", "Spiculated")  # 112136 (CID 6119)
MARGIN_ILL_DEFINED: Final = _dict_code("SCT", "PoorlyDefined")  # 300841009 (CID 6120)
# density values
DENSITY_SOLID: Final = _private("D-SOLID", "Solid")
DENSITY_PART_SOLID: Final = _private("D-PART-SOLID", "Part-solid")
DENSITY_GROUND_GLASS: Final = _dict_code("DCM", "GroundGlassOpacity")  # 112120
DENSITY_CALCIFIED: Final = _dict_code("SCT", "Calcified")  # 237897009 (CID 3712)
# shape values (CID 6119 / CID 6004)
SHAPE_ROUND: Final = _dict_code("SCT", "RoundShape")  # 42700002
SHAPE_OVAL: Final = _dict_code("SCT", "OvoidShape")  # 84360004
SHAPE_IRREGULAR: Final = _dict_code("SCT", "Irregular")  # 49608001

# ----------------------------------------------------------------------------- SEG categories
# CID 7150 "Segmentation Property Categories"

CATEGORY_MORPHOLOGICALLY_ABNORMAL: Final = _dict_code("SCT", "MorphologicallyAbnormalStructure")
CATEGORY_PHYSICAL_OBJECT: Final = _dict_code("SCT", "PhysicalObject")  # 260787004
CATEGORY_ANATOMICAL_STRUCTURE: Final = _dict_code("SCT", "AnatomicalStructure")  # 91723000

# ----------------------------------------------------------------------------- report structure

#: TID 1500 root and containers, TID 1410 rows, narrative items.
REPORT_TITLE: Final = _dict_code("DCM", "ImagingMeasurementReport")  # 126000 (CID 7021)
IMAGING_MEASUREMENTS: Final = _dict_code("DCM", "ImagingMeasurements")  # 126010
#: TID 1500 row 12 "Qualitative Evaluations" container (UMLS C0034375). Not in pydicom's
#: dictionary; the concept is the one DICOM PS3.16 TID 1500 names, also used by dcmjs
#: (TID1500 builder) and the HL7 "DICOM SR to FHIR" implementation guide.
QUALITATIVE_EVALUATIONS: Final = Code("C0034375", "UMLS", "Qualitative Evaluations")
NARRATIVE_FINDING: Final = _dict_code("DCM", "Finding")  # 121071 (CID 7002)
NARRATIVE_IMPRESSION: Final = _dict_code("DCM", "Impression")  # 121073 (CID 7002)
NARRATIVE_COMMENT: Final = _dict_code("DCM", "Comment")  # 121106
#: Procedure reported (TID 1500 row 4, CID 100 is extensible): SNOMED CT "Chest imaging".
#: Chosen over LOINC Radiology Playbook codes such as 36643-5 "XR Chest 2 Views", which
#: encode the number of views: the node reads single-view and two-view studies alike and
#: cannot know what was ordered. The modality (CR/DX) is in the image library.
PROCEDURE_CHEST_IMAGING: Final = _dict_code("SCT", "ChestImaging")  # 413815006

#: TID 1204 language of the report (RFC 5646; the value highdicom uses by default).
LANGUAGE_EN_US: Final = Code("en-US", "RFC5646", "English (United States)")
#: TID 1001/1002 observation context: the algorithm is a device observer (CID 270).
OBSERVER_TYPE_DEVICE: Final = _dict_code("DCM", "Device")  # 121007
PROCEDURE_REPORTED: Final = _dict_code("DCM", "ProcedureReported")  # 121058
#: TID 1600-1603 image library
IMAGE_LIBRARY: Final = _dict_code("DCM", "ImageLibrary")  # 111028
IMAGE_LIBRARY_GROUP: Final = _dict_code("DCM", "ImageLibraryGroup")  # 126200
IMAGE_SOURCE: Final = _dict_code("SCT", "Source")  # 260753009
MODALITY: Final = _dict_code("DCM", "Modality")  # 121139
MODALITY_CR: Final = _dict_code("DCM", "ComputedRadiography")  # CR (CID 29)
MODALITY_DX: Final = _dict_code("DCM", "DigitalRadiography")  # DX (CID 29)
PIXEL_DATA_ROWS: Final = _dict_code("DCM", "PixelDataRows")  # 110910
PIXEL_DATA_COLUMNS: Final = _dict_code("DCM", "PixelDataColumns")  # 110911
PATIENT_ORIENTATION_ROW: Final = _dict_code("DCM", "PatientOrientationRow")  # 111044
PATIENT_ORIENTATION_COLUMN: Final = _dict_code("DCM", "PatientOrientationColumn")  # 111043
HORIZONTAL_PIXEL_SPACING: Final = _dict_code("DCM", "HorizontalPixelSpacing")  # 111026
VERTICAL_PIXEL_SPACING: Final = _dict_code("DCM", "VerticalPixelSpacing")  # 111066
FRAME_OF_REFERENCE_UID: Final = _dict_code("DCM", "FrameOfReferenceUID")  # 112227
#: SEG Algorithm Family (CID 7162)
ALGORITHM_FAMILY_AI: Final = _dict_code("DCM", "ArtificialIntelligence")  # 123110

# ----------------------------------------------------------------------------- measurements

MEASUREMENT_LONG_AXIS: Final = _dict_code("SCT", "LongAxis")  # 103339001 (CID 7470)
MEASUREMENT_SHORT_AXIS: Final = _dict_code("SCT", "ShortAxis")  # 103340004 (CID 7470)
MEASUREMENT_AREA: Final = _dict_code("SCT", "Area")  # 42798000 (CID 7471)

UNIT_MM: Final = _dict_code("UCUM", "Millimeter")  # mm
UNIT_MM2: Final = _dict_code("UCUM", "SquareMillimeter")  # mm2
#: Sizes of images without pixel spacing: UCUM annotations ("{...}" is a valid UCUM unit
#: of dimension 1 with a label), so a reader sees that the number counts pixels.
#: "{pixels}"/"Pixels" is the unit highdicom itself writes for Pixel Data Rows/Columns in
#: the TID 1600 image library; "{pixels^2}" follows it for areas.
UNIT_PIXELS: Final = Code("{pixels}", "UCUM", "Pixels")
UNIT_SQUARE_PIXELS: Final = Code("{pixels^2}", "UCUM", "square pixels")

#: Distances between two anchors measured by a follow-up turn (TID 1410 group with a line
#: SCOORD): centre to centre is DCM "Distance"; the gap between the nearest edges of the
#: two outlines has no standard concept, so it is a private one.
MEASUREMENT_DISTANCE: Final = _dict_code("DCM", "Distance")  # 121206
MEASUREMENT_EDGE_DISTANCE: Final = _private("M-EDGE-DISTANCE", "Distance between nearest edges")

# ----------------------------------------------------------------------------- conditions and signs
# The sign checklists of sr_templates.signs. Pneumothorax and pleural effusion as conditions
# use FINDING_PNEUMOTHORAX / FINDING_PLEURAL_EFFUSION (the same SNOMED CT concepts).

CONDITION_LUNG_CANCER: Final = _dict_code("SCT", "LungCancer")  # 93880001 (CID 638/639)
CONDITION_PNEUMONIA: Final = _allowed_sct("233604007")
CONDITION_PULMONARY_TUBERCULOSIS: Final = _allowed_sct("154283005")
CONDITION_HEART_FAILURE: Final = _dict_code("SCT", "HeartFailure")  # 84114007 (CID 3201)

SIGN_NON_CALCIFIED: Final = _dict_code("SCT", "NonCalcified")  # 17589002 (CID 3802)
SIGN_OPACITY: Final = _dict_code("DCM", "Opacity")  # 112001 (CID 6102/6104)
SIGN_AIR_BRONCHOGRAM: Final = _dict_code("DCM", "AirBronchogram")  # 112071 (CID 6102/6105)
SIGN_SILHOUETTE: Final = _dict_code("DCM", "SilhouetteSign")  # 112152 (CID 6123)
SIGN_MILIARY_PATTERN: Final = _dict_code("DCM", "MiliaryPattern")  # 112129 (CID 6102/6106)
SIGN_KERLEY_B_LINES: Final = _dict_code("DCM", "KerleyBLine")  # 112110 (CID 6102/6103)
SIGN_PULMONARY_EDEMA: Final = _dict_code("SCT", "PulmonaryEdema")  # 19242006 (CID 3700)
SIGN_SOLITARY: Final = _private("SG-SOLITARY", "Solitary lesion")
SIGN_NODULE_SIZE: Final = _private("SG-NODULE-SIZE", "Nodule size in the typical range")
SIGN_SOLID_COMPONENT: Final = _private("SG-SOLID-PART", "Solid component")
SIGN_UPPER_ZONE: Final = _private("SG-UPPER-ZONE", "Upper zone or upper lobe location")
SIGN_INTERVAL_GROWTH: Final = _private("SG-GROWTH", "Growth compared with a prior study")
SIGN_PLEURAL_INDENTATION: Final = _private("SG-PLEURAL-TAG", "Pleural indentation")
SIGN_VACUOLE: Final = _private("SG-VACUOLE", "Vacuole sign")
SIGN_RESOLUTION: Final = _private("SG-RESOLUTION", "Resolution on follow-up imaging")
SIGN_CAVITATION: Final = _private("SG-CAVITATION", "Cavitation")
SIGN_SATELLITE_LESIONS: Final = _private("SG-SATELLITE", "Satellite lesions")
SIGN_DEEP_SULCUS: Final = _private("SG-DEEP-SULCUS", "Deep sulcus sign")
SIGN_MEDIASTINAL_SHIFT: Final = _private("SG-MEDIAST-SHIFT", "Contralateral mediastinal shift")
SIGN_DEPENDENT_LOCATION: Final = _private("SG-DEPENDENT", "Dependent (basal) location")
SIGN_MENISCUS: Final = _private("SG-MENISCUS", "Meniscus sign")
SIGN_UPPER_LOBE_DIVERSION: Final = _private("SG-UL-DIVERSION", "Upper lobe venous diversion")
