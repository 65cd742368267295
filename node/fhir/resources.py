"""FHIR resources of a pre-read, built from the ledger's facts and validated before storing.

Every builder returns a plain dict (FHIR JSON) that :func:`validate` has checked against
the ``fhir.resources`` R4B model of its type; only elements that also exist in R4 4.0.1
are used. Ids are derived from DICOM UIDs (uuid5), so writing the same pre-read twice
gives the same resources (a new ``meta.versionId`` only when the content changed).

Every resource the node writes says it is AI-generated and preliminary (narrative,
notes, conclusion), names the model through a Device, and carries the DEMO label when
the demo engine wrote it.
"""

from __future__ import annotations

import html
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from pydantic import ValidationError

from node.fhir import codes
from sr_templates.model import Anchor, PrereadResult

AI_NOTICE: Final = "AI-generated, preliminary, not a diagnosis"
DEMO_NOTICE: Final = "DEMO - not for clinical use"
NOT_A_REPORT: Final = "It does not replace a radiologist's report."

_NAMESPACE: Final = uuid.UUID("0b8f6a52-3c1e-4f0e-9a51-6d8b2f1c7e42")


class ResourceInvalid(ValueError):
    """A resource that fhir.resources refuses; the message lists the first problems."""


def resource_id(kind: str, *parts: str) -> str:
    """A stable FHIR id (uuid5) for ``kind`` and the identifying ``parts``."""
    return str(uuid.uuid5(_NAMESPACE, "/".join((kind, *parts))))


_ids = random.Random()


#: uuid4's version and variant bits (as uuid.UUID(int=..., version=4) sets them)
_V4_CLEAR: Final = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET: Final = (0x4000 << 64) | (0x8000 << 48)


def fast_id() -> str:
    """A random uuid4-shaped id for Bundles, AuditEvents and request ids: not a secret, so
    no system-entropy call (which costs a GIL hand-off under load), and formatted directly
    (a uuid.UUID object per id cost more than the rest)."""
    h = f"{_ids.getrandbits(128) & _V4_CLEAR | _V4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def now_instant() -> str:
    """The current time as a FHIR instant (UTC, milliseconds)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def validate(resource: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``resource`` with its fhir.resources R4B model; return it as a dict.

    Raises ResourceInvalid with a readable message (element paths and reasons).
    """
    from fhir.resources.R4B import get_fhir_model_class

    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        raise ResourceInvalid("resourceType is missing")
    try:
        model = get_fhir_model_class(rtype)
    except (KeyError, ValueError, AttributeError) as exc:
        raise ResourceInvalid(f"unknown resourceType {rtype!r}") from exc
    try:
        model.model_validate(dict(resource))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or rtype}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise ResourceInvalid(f"invalid {rtype}: {problems}") from None
    except Exception as exc:  # untrusted input may trip any check of the models
        raise ResourceInvalid(f"invalid {rtype}: {type(exc).__name__}: {exc}") from None
    return dict(resource)


def narrative(*paragraphs: str, bold_first: bool = True) -> dict[str, Any]:
    """A generated Narrative: one XHTML paragraph per text, the first in bold."""
    parts = []
    for i, text in enumerate(p for p in paragraphs if p):
        escaped = html.escape(text)
        parts.append(f"<p><b>{escaped}</b></p>" if i == 0 and bold_first else f"<p>{escaped}</p>")
    return {"status": "generated", "div": f'<div xmlns="{codes.XHTML}">{"".join(parts)}</div>'}


def notice_text(is_demo: bool) -> str:
    """The safety label every resource carries: AI-generated, preliminary (and DEMO)."""
    return f"{DEMO_NOTICE}. {AI_NOTICE}" if is_demo else AI_NOTICE


def reference(resource_type: str, rid: str, display: str | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"reference": f"{resource_type}/{rid}"}
    if display:
        ref["display"] = display
    return ref


# --------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class SeriesFacts:
    series_uid: str
    modality: str
    body_part: str
    view_position: str
    description: str
    instances: tuple[tuple[str, str], ...]  # (SOP Instance UID, SOP Class UID)


@dataclass(frozen=True)
class StudyFacts:
    """What the ledger knows of one study version (header facts, never logged)."""

    study_uid: str
    version: int
    state: str
    patient_id: str
    accession_number: str
    study_date: str  # YYYYMMDD or ""
    study_description: str
    series: tuple[SeriesFacts, ...] = ()
    result: PrereadResult | None = None
    reason: str = ""  # why a failed pre-read failed


@dataclass(frozen=True)
class IdentifierSystems:
    """Identifier.system of PatientID and AccessionNumber (empty = no system)."""

    patient_id: str = ""
    accession: str = ""


@dataclass
class PrereadBundle:
    """The resources of one pre-read, in the order they are stored."""

    imaging_study: dict[str, Any]
    device: dict[str, Any] | None
    observations: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] | None = None

    def all(self) -> list[dict[str, Any]]:
        out = [self.imaging_study]
        if self.device is not None:
            out.append(self.device)
        out.extend(self.observations)
        out.append(self.report)
        if self.provenance is not None:
            out.append(self.provenance)
        return out


def _fhir_date(dicom_date: str) -> str | None:
    """DICOM DA (YYYYMMDD) -> FHIR date (YYYY-MM-DD); None when absent or malformed."""
    d = dicom_date.strip()
    if len(d) != 8 or not d.isdigit():
        return None
    try:
        datetime(int(d[:4]), int(d[4:6]), int(d[6:]))
    except ValueError:
        return None
    return f"{d[:4]}-{d[4:6]}-{d[6:]}"


def patient_reference(patient_id: str, systems: IdentifierSystems) -> dict[str, Any]:
    """An identifier reference to the patient (the node keeps no Patient resources)."""
    if not patient_id:
        return {"type": "Patient", "display": "patient without a PatientID in the DICOM header"}
    ident: dict[str, Any] = {"value": patient_id}
    if systems.patient_id:
        ident["system"] = systems.patient_id
    return {"type": "Patient", "identifier": ident}


def accession_identifier(accession: str, systems: IdentifierSystems) -> dict[str, Any]:
    ident: dict[str, Any] = {"type": codes.ACCESSION_TYPE, "value": accession}
    if systems.accession:
        ident["system"] = systems.accession
    return ident


def study_uid_identifier(study_uid: str) -> dict[str, Any]:
    return {"system": codes.DICOM_UID, "value": f"urn:oid:{study_uid}"}


def imaging_study_id(study_uid: str) -> str:
    return resource_id("ImagingStudy", study_uid)


def report_id(study_uid: str) -> str:
    return resource_id("DiagnosticReport", study_uid)


def observation_id(tracking_uid: str) -> str:
    return resource_id("Observation", tracking_uid)


def device_id(result: PrereadResult) -> str:
    return resource_id(
        "Device",
        result.model_id,
        result.model_revision,
        result.prompt_version,
        result.node_version,
        str(result.is_demo),
    )


# --------------------------------------------------------------------------- builders


def build_imaging_study(facts: StudyFacts, systems: IdentifierSystems) -> dict[str, Any]:
    """ImagingStudy from the DICOM header facts: identifiers, series, instances."""
    identifiers = [study_uid_identifier(facts.study_uid)]
    if facts.accession_number:
        identifiers.append(accession_identifier(facts.accession_number, systems))
    modalities = sorted({s.modality for s in facts.series if s.modality})
    series = []
    for s in facts.series:
        entry: dict[str, Any] = {"uid": s.series_uid}
        if s.modality:
            entry["modality"] = {"system": codes.DICOM_DCM, "code": s.modality}
        else:
            entry["modality"] = {"system": codes.DICOM_DCM, "code": "OT"}
        if s.description:
            entry["description"] = s.description
        entry["numberOfInstances"] = len(s.instances)
        if s.instances:
            entry["instance"] = [
                {"uid": sop, "sopClass": {"system": codes.URI, "code": f"urn:oid:{cls}"}}
                for sop, cls in s.instances
            ]
        series.append(entry)
    done = facts.state == "done"
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": imaging_study_id(facts.study_uid),
        "identifier": identifiers,
        # registered: known, images still arriving or being read; available: read
        "status": "available" if done or facts.state in ("failed", "skipped") else "registered",
        "subject": patient_reference(facts.patient_id, systems),
        "numberOfSeries": len(series),
        "numberOfInstances": sum(len(s.instances) for s in facts.series),
    }
    if modalities:
        resource["modality"] = [{"system": codes.DICOM_DCM, "code": m} for m in modalities]
    started = _fhir_date(facts.study_date)
    if started:
        resource["started"] = started
    if facts.study_description:
        resource["description"] = facts.study_description
    if series:
        resource["series"] = series
    return validate(resource)


def build_device(result: PrereadResult) -> dict[str, Any]:
    """The model as a Device: name, revision, prompt version, node version, safety note."""
    is_demo = result.is_demo
    model_id = result.model_id
    versions = [
        ("model revision", result.model_revision),
        ("prompt version", result.prompt_version),
        ("node version", result.node_version),
    ]
    engine = result.engine
    resource: dict[str, Any] = {
        "resourceType": "Device",
        "id": device_id(result),
        "status": "active",
        "deviceName": [
            {"name": model_id, "type": "model-name"},
            {
                "name": "medgemma-node AI pre-read" + (" (DEMO engine)" if is_demo else ""),
                "type": "user-friendly-name",
            },
        ],
        "type": {"text": "AI model (vision-language) for chest radiograph pre-reads"},
        "version": [
            {"type": {"text": what}, "value": str(value)} for what, value in versions if value
        ],
        "note": [{"text": f"{notice_text(is_demo)}. {NOT_A_REPORT}"}],
        "text": narrative(
            notice_text(is_demo),
            f"Model {model_id}"
            + "".join(f", {what} {value}" for what, value in versions if value)
            + (f", engine {engine}" if engine else ""),
        ),
    }
    if engine:
        resource["property"] = [{"type": {"text": "engine"}, "valueCode": [{"text": engine}]}]
    return validate(resource)


def _quantity(value: float, units: str) -> dict[str, Any]:
    """A Quantity in UCUM mm / mm2; in pixels (no UCUM length) when there is no spacing."""
    code = codes.UCUM_UNITS.get(units)
    if code is not None:
        return {
            "value": value,
            "unit": str(code.value),
            "system": codes.UCUM,
            "code": str(code.value),
        }
    square = units in ("px2", "pixels2")
    return {"value": value, "unit": "square pixels" if square else "pixels"}


def build_observation(
    anchor: Anchor,
    *,
    facts: StudyFacts,
    systems: IdentifierSystems,
    device: str | None,
    status: str,
    is_demo: bool,
    issued: str,
) -> dict[str, Any]:
    """One finding anchor as an Observation: code, site + laterality, measurements,
    attributes; identified by the anchor's tracking UID and anchor id."""
    tracking_uid = anchor.tracking_uid
    anchor_id = anchor.anchor_id
    label = anchor.label or anchor.finding or "finding"
    components: list[dict[str, Any]] = []
    side = codes.laterality_concept(anchor.laterality)
    if side is not None:
        components.append({"code": codes.concept(codes.LATERALITY), "valueCodeableConcept": side})
    m = anchor.measurements
    size_note = ""
    if m is not None:
        sizes = {"long_axis": m.long_axis, "short_axis": m.short_axis, "area": m.area}
        for key, size in sizes.items():
            components.append(
                {
                    "code": codes.concept(codes.MEASUREMENT_CODES[key]),
                    "valueQuantity": _quantity(
                        round(size, 2), m.area_units if key == "area" else m.units
                    ),
                }
            )
        if m.units != "mm":
            size_note = (
                "Sizes are in pixels: the image has no pixel spacing, so no length in "
                "millimetres can be given."
            )
    for name, value in sorted(anchor.attributes.items()):
        name_cc, value_cc = codes.attribute_concepts(name, value)
        components.append({"code": name_cc, "valueCodeableConcept": value_cc})

    notice = notice_text(is_demo)
    size_text = anchor.size_text
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": observation_id(tracking_uid),
        "identifier": [
            {
                "use": "official",
                "type": codes.concept(codes.TRACKING_UID_TYPE),
                "system": codes.DICOM_UID,
                "value": f"urn:oid:{tracking_uid}",
            },
            {
                "use": "secondary",
                "type": codes.concept(codes.TRACKING_ID_TYPE),
                "value": anchor_id,
            },
        ],
        "status": status,
        "category": [codes.OBSERVATION_IMAGING],
        "code": codes.finding_concept(anchor.finding, label),
        "subject": patient_reference(facts.patient_id, systems),
        "issued": issued,
        "derivedFrom": [reference("ImagingStudy", imaging_study_id(facts.study_uid))],
        "note": [{"text": f"{notice}. {NOT_A_REPORT}"}],
        "text": narrative(
            notice,
            f"{anchor_id} {label}" + (f": {size_text}" if size_text else ""),
            size_note,
        ),
    }
    effective = _fhir_date(facts.study_date)
    if effective:
        resource["effectiveDateTime"] = effective
    site = codes.site_concept(anchor.site)
    if site is not None:
        resource["bodySite"] = site
    if device:
        resource["device"] = reference("Device", device)
    if components:
        resource["component"] = components
    if size_note:
        resource["note"].append({"text": size_note})
    return validate(resource)


def report_conclusion(result: PrereadResult | None, is_demo: bool) -> str:
    """The narrative of the pre-read (findings, impression) after the safety label."""
    parts = [f"{notice_text(is_demo)}. {NOT_A_REPORT}"]
    if result is not None:
        findings = result.findings_text.strip()
        impression = result.impression.strip()
        if findings:
            parts.append(f"Findings: {findings}")
        if impression:
            parts.append(f"Impression: {impression}")
    return "\n".join(parts)


def build_report(
    facts: StudyFacts,
    systems: IdentifierSystems,
    *,
    status: str,
    results: Sequence[tuple[str, str]],
    issued: str,
    reason: str = "",
) -> dict[str, Any]:
    """The DiagnosticReport of a study: the AI pre-read with its Observations.

    ``results`` are (Observation id, display) pairs; ``status`` follows the study:
    registered (being read), preliminary (read), amended (refined by a follow-up),
    cancelled (the pre-read failed; ``reason`` says why).
    """
    result = facts.result
    is_demo = bool(result and result.is_demo)
    identifiers: list[dict[str, Any]] = [
        {"system": codes.URI, "value": f"urn:uuid:{report_id(facts.study_uid)}"}
    ]
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id(facts.study_uid),
        "identifier": identifiers,
        "status": status,
        "category": [codes.REPORT_CATEGORY],
        "code": codes.REPORT_CODE,
        "subject": patient_reference(facts.patient_id, systems),
        "issued": issued,
        "imagingStudy": [reference("ImagingStudy", imaging_study_id(facts.study_uid))],
    }
    if facts.accession_number:
        acc = accession_identifier(facts.accession_number, systems)
        identifiers.append(acc)
        resource["basedOn"] = [{"type": "ServiceRequest", "identifier": acc}]
    effective = _fhir_date(facts.study_date)
    if effective:
        resource["effectiveDateTime"] = effective
    if results:
        resource["result"] = [reference("Observation", oid, shown) for oid, shown in results]
    if status == "registered":
        conclusion = (
            f"{AI_NOTICE}: the AI pre-read of this study has not finished yet. {NOT_A_REPORT}"
        )
    elif status == "cancelled":
        conclusion = f"The AI pre-read of this study could not be made: {reason or 'failed'}."
    else:
        conclusion = report_conclusion(result, is_demo)
    resource["conclusion"] = conclusion
    resource["text"] = narrative(*conclusion.split("\n"))
    return validate(resource)


def build_provenance(
    *,
    provenance_id: str,
    targets: Sequence[Mapping[str, Any]],
    device: str | None,
    source: str,
    activity: str,
    recorded: str,
    is_demo: bool,
) -> dict[str, Any]:
    """Provenance of what the model wrote: targets, the model Device as author, the source."""
    agent: dict[str, Any] = {
        "type": {
            "coding": [
                {"system": codes.PROVENANCE_PARTICIPANT, "code": "author", "display": "Author"}
            ]
        },
    }
    agent["who"] = (
        reference("Device", device) if device else {"display": "medgemma-node (no model ran)"}
    )
    resource: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": provenance_id,
        "target": [reference(str(t["resourceType"]), str(t["id"])) for t in targets],
        "recorded": recorded,
        "activity": {
            "coding": [
                {
                    "system": codes.DATA_OPERATION,
                    "code": activity,
                    "display": {"CREATE": "create", "UPDATE": "revise"}.get(activity, activity),
                }
            ]
        },
        "agent": [agent],
        "entity": [{"role": "source", "what": {"reference": source}}],
        "text": narrative(notice_text(is_demo), f"Written by medgemma-node ({activity.lower()})."),
    }
    return validate(resource)


def build_answer(
    *,
    answer_id: str,
    question: Mapping[str, Any],
    text: str,
    about: Sequence[dict[str, Any]],
    device: str | None,
    status: str,
    is_demo: bool,
    language: str | None,
    sent: str,
    reason: str = "",
    footer: str = "",
) -> dict[str, Any]:
    """The answer Communication: inResponseTo the question, about the report and anchors.

    ``footer`` is the safety statement in the answer's language (it must say AI-generated,
    preliminary, not a diagnosis, and name the model and prompt version); without one the
    English statement is appended."""
    notice = notice_text(is_demo)
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "id": answer_id,
        "status": status,
        "category": [codes.COMMUNICATION_ANSWER],
        "inResponseTo": [reference("Communication", str(question["id"]))],
        "about": list(about),
        "sent": sent,
        "payload": [{"contentString": f"{text}\n\n{footer or f'({notice}. {NOT_A_REPORT})'}"}],
        "note": [{"text": notice}],
        "text": narrative(notice, text),
    }
    if question.get("subject"):
        resource["subject"] = question["subject"]
    if device:
        resource["sender"] = reference("Device", device)
    if language:
        resource["language"] = language
    if reason:
        resource["statusReason"] = {"text": reason}
    return validate(resource)
