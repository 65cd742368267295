"""FHIR code systems and coded concepts of the node's resources.

Clinical concepts (findings, sites, laterality, attribute values, measurements, units)
come from the chest sign ontology in :mod:`sr_templates` (the same codes the SR writes),
turned into FHIR Codings here; nothing clinical is coded in this module. What is here:

* the DICOM coding-scheme designator -> FHIR ``system`` URI table;
* the report's procedure code (LOINC, see :data:`REPORT_CODE`) and category;
* FHIR/HL7 infrastructure codes (identifier types, Observation category, provenance);
* the node's private code systems (the 99MGN chest concepts, the kind of a Communication),
  named by OIDs under the project's UUID-derived root (``sr_templates.codes.UID_ROOT``).

A vocabulary term the ontology does not know becomes a text-only CodeableConcept (never a
guessed code).
"""

from __future__ import annotations

import logging
from typing import Any, Final

from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code

from sr_templates import codes as sr_codes
from sr_templates import ontology

log = logging.getLogger("medgemma.fhir")

SNOMED: Final = "http://snomed.info/sct"
LOINC: Final = "http://loinc.org"
UCUM: Final = "http://unitsofmeasure.org"
DICOM_DCM: Final = "http://dicom.nema.org/resources/ontology/DCM"
RADLEX: Final = "http://radlex.org"
DICOM_UID: Final = "urn:dicom:uid"
URI: Final = "urn:ietf:rfc:3986"
V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074: Final = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_OPERATION: Final = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PROVENANCE_PARTICIPANT: Final = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
AUDIT_EVENT_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION: Final = "http://hl7.org/fhir/restful-interaction"
SECURITY_SOURCE_TYPE: Final = "http://terminology.hl7.org/CodeSystem/security-source-type"
AUDIT_ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
TRANSLATION_EXT: Final = "http://hl7.org/fhir/StructureDefinition/translation"
XHTML: Final = "http://www.w3.org/1999/xhtml"

#: The 99MGN private scheme (sr_templates.codes.PRIVATE_SCHEME) as a FHIR system: an OID
#: under the project's own root, so it cannot collide with anyone's.
PRIVATE_CHEST_SYSTEM: Final = f"urn:oid:{sr_codes.UID_ROOT}1"
#: Private code system of Communication.category: "question" (from the RIS) or "answer".
COMMUNICATION_KIND_SYSTEM: Final = f"urn:oid:{sr_codes.UID_ROOT}2"
#: meta.tag system of a Subscription's owner (code: token:<name> or jwt:<subject>); not served
SUBSCRIPTION_OWNER_SYSTEM: Final = f"urn:oid:{sr_codes.UID_ROOT}3"

SCHEME_SYSTEMS: Final[dict[str, str]] = {
    "SCT": SNOMED,
    "SRT": SNOMED,
    "LN": LOINC,
    "UCUM": UCUM,
    "DCM": DICOM_DCM,
    "RADLEX": RADLEX,
    sr_codes.PRIVATE_SCHEME: PRIVATE_CHEST_SYSTEM,
}

#: DiagnosticReport.code: LOINC 30745-4 "XR Chest Views" (Radiology Playbook: XR, chest, no
#: number of views). Not 36643-5 "XR Chest 2 Views" or 24648-8 "XR Chest PA upright": those
#: say how many / which views were taken, and the node reads single-view and two-view
#: studies alike without knowing what was ordered (the SR's procedure code, SNOMED CT
#: 413815006 "Chest imaging", is chosen for the same reason).
REPORT_CODE: Final[dict[str, Any]] = {
    "coding": [{"system": LOINC, "code": "30745-4", "display": "XR Chest Views"}],
    "text": "Chest radiograph, AI pre-read (preliminary)",
}
#: DiagnosticReport.category: HL7 v2 table 0074 "RAD" (Radiology).
REPORT_CATEGORY: Final[dict[str, Any]] = {
    "coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]
}
OBSERVATION_IMAGING: Final[dict[str, Any]] = {
    "coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]
}
ACCESSION_TYPE: Final[dict[str, Any]] = {
    "coding": [{"system": V2_0203, "code": "ACSN", "display": "Accession ID"}]
}

# DICOM concept names taken from pydicom's code dictionary (DICOM PS3.16), exactly.
TRACKING_UID_TYPE: Final = dicom_codes.DCM.TrackingUniqueIdentifier  # 112040
TRACKING_ID_TYPE: Final = dicom_codes.DCM.TrackingIdentifier  # 112039
LATERALITY: Final = dicom_codes.SCT.Laterality  # 272741003 (TID 1410 laterality modifier)

COMMUNICATION_QUESTION: Final[dict[str, Any]] = {
    "coding": [
        {
            "system": COMMUNICATION_KIND_SYSTEM,
            "code": "question",
            "display": "Follow-up question about an AI pre-read",
        }
    ]
}
COMMUNICATION_ANSWER: Final[dict[str, Any]] = {
    "coding": [
        {
            "system": COMMUNICATION_KIND_SYSTEM,
            "code": "answer",
            "display": "AI answer to a follow-up question",
        }
    ]
}


def coding(code: Code) -> dict[str, Any]:
    """A FHIR Coding for a DICOM-style code (scheme designator -> system URI)."""
    system = SCHEME_SYSTEMS.get(code.scheme_designator)
    if system is None:
        raise ValueError(f"no FHIR system for coding scheme {code.scheme_designator!r}")
    return {"system": system, "code": str(code.value), "display": code.meaning}


def translation(zh: str) -> dict[str, Any]:
    """The core ``translation`` extension of a string element: its Chinese (zh) wording."""
    return {
        "extension": [
            {
                "url": TRANSLATION_EXT,
                "extension": [
                    {"url": "lang", "valueCode": "zh"},
                    {"url": "content", "valueString": zh},
                ],
            }
        ]
    }


def concept(code: Code, text: str | None = None, *, zh: str | None = None) -> dict[str, Any]:
    """A CodeableConcept with one Coding; ``text`` (default the meaning) and its ``zh``."""
    out: dict[str, Any] = {"coding": [coding(code)], "text": text or code.meaning}
    if zh:
        out["_text"] = translation(zh)
    return out


def text_concept(text: str) -> dict[str, Any]:
    """A text-only CodeableConcept: for a term the ontology has no code for."""
    return {"text": text}


def _from_ontology(c: ontology.ChestConcept, text: str | None = None) -> dict[str, Any]:
    # the Chinese term translates the ontology's English term, so only that text gets it
    if text and text != c.en:
        return concept(c.code, text)
    return concept(c.code, c.en, zh=c.zh)


def finding_concept(term: str | None, label: str) -> dict[str, Any]:
    """Observation.code of a finding: the ontology's code and terms for ``term``.

    ``label`` (the anchor's label) is the text only when the ontology does not know ``term``.
    """
    if term:
        try:
            return _from_ontology(ontology.finding(term))
        except (ValueError, TypeError):
            # TODO(codes): a finding term outside the ontology stays text-only until
            # sr_templates maps it; never a guessed code.
            log.warning("finding term %r has no code in the ontology: text only", term)
    return text_concept(label or (term or "finding").replace("_", " "))


def site_concept(term: str | None) -> dict[str, Any] | None:
    """Observation.bodySite: the ontology's anatomy code of a site or landmark term."""
    if not term:
        return None
    for lookup in (ontology.site, ontology.landmark):
        try:
            return _from_ontology(lookup(term))
        except (ValueError, TypeError):
            continue
    # TODO(codes): a site outside the ontology stays text-only (no guessed code).
    log.warning("site term %r has no code in the ontology: text only", term)
    return text_concept(term.replace("_", " "))


def laterality_concept(side: str | None) -> dict[str, Any] | None:
    """The CID 244 laterality value (Right/Left/Bilateral) of a side; None for "none"."""
    if not side or side == "none":
        return None
    try:
        c = ontology.laterality(side)
    except (ValueError, TypeError):
        return text_concept(side)
    return None if c is None else _from_ontology(c)


def attribute_concepts(name: str, value: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(component code, component value) of a qualitative attribute, e.g. margin=spiculated."""
    try:
        name_cc = _from_ontology(ontology.ATTRIBUTE_NAMES[name])
    except KeyError:
        name_cc = text_concept(name.replace("_", " "))
    try:
        value_cc = _from_ontology(ontology.attribute_value(name, value))
    except (ValueError, TypeError):
        # TODO(codes): attribute values outside the ontology are text-only.
        value_cc = text_concept(str(value).replace("_", " "))
    return name_cc, value_cc


MEASUREMENT_CODES: Final[dict[str, Code]] = {
    "long_axis": sr_codes.MEASUREMENT_LONG_AXIS,
    "short_axis": sr_codes.MEASUREMENT_SHORT_AXIS,
    "area": sr_codes.MEASUREMENT_AREA,
}
UCUM_UNITS: Final[dict[str, Code]] = {"mm": sr_codes.UNIT_MM, "mm2": sr_codes.UNIT_MM2}
