"""FHIR resources of a pre-read: every one validates with fhir.resources (R4B models, R4
elements), carries the AI/DEMO labels, and follows the study's state."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydicom.uid import generate_uid

from node.fhir import codes
from node.fhir.audit import AccessRecord, audit_event
from node.fhir.projection import record_preread
from node.fhir.resources import build_answer, report_id
from node.fhir.routers.metadata import ask_operation_definition, capability_statement
from node.fhir.search import parse_query
from node.fhir.store import FhirStore
from node.ledger import InstanceHeader, StudyLedger, StudyState
from sr_templates.model import PrereadResult
from tests.results import make_anchors, make_result

SYSTEMS_PATIENT = "urn:oid:1.2.840.99999.1"
SYSTEMS_ACCESSION = "urn:oid:1.2.840.99999.2"


def r4b_valid(resource: dict[str, Any]) -> None:
    """Validate with the fhir.resources R4B model of the resource's type (raises if not)."""
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def add_study(
    ledger: StudyLedger,
    *,
    patient_id: str = "PAT-0001",
    accession: str = "ACC-0001",
    study_date: str = "20250115",
    result: PrereadResult | None = None,
    state: StudyState = StudyState.DONE,
) -> str:
    """A study (one CR instance) moved to ``state`` in the ledger; returns its UID."""
    uid = generate_uid()
    header = InstanceHeader(
        study_uid=uid,
        series_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CR",
        body_part="CHEST",
        view_position="PA",
        study_description="CHEST PA",
        patient_id=patient_id,
        accession_number=accession,
        study_date=study_date,
    )
    outcome = ledger.record_instance(
        header, path=f"{uid}/x.dcm", sha256=uid[-16:].rjust(64, "0"), size_bytes=1, revision=1,
        calling_ae="TEST",
    )  # fmt: skip
    if state is StudyState.RECEIVED:
        return uid
    ledger.complete_studies([outcome.study_id])
    ledger.mark_queued(uid, 1, "task")
    if state is StudyState.QUEUED:
        return uid
    ledger.start_run(uid, 1)
    if state is StudyState.DONE:
        result = result or make_result(make_anchors())
        ledger.finish(uid, 1, ok=True, result=result)
        ledger.save_anchors(uid, 1, result.anchors)
    elif state is StudyState.FAILED:
        ledger.finish(uid, 1, ok=False, reason="no CR/DX image in the study to read")
    return uid


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[StudyLedger]:
    led = StudyLedger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield led
    led.close()


def stored(ledger: StudyLedger) -> list[dict[str, Any]]:
    store = FhirStore(ledger)
    out = []
    for rtype in ("ImagingStudy", "DiagnosticReport", "Observation", "Device", "Provenance"):
        _, page = store.search(rtype, [], count=100)
        out += [p.resource for p in page]
    return out


def record(ledger: StudyLedger, uid: str) -> None:
    from node.fhir.resources import IdentifierSystems

    record_preread(ledger, uid, 1, systems=IdentifierSystems(SYSTEMS_PATIENT, SYSTEMS_ACCESSION))


def by_type(resources: list[dict[str, Any]], rtype: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["resourceType"] == rtype]


def test_preread_resources_validate_and_say_ai_preliminary_and_demo(ledger: StudyLedger) -> None:
    uid = add_study(ledger)
    record(ledger, uid)
    resources = stored(ledger)
    assert sorted({r["resourceType"] for r in resources}) == [
        "Device", "DiagnosticReport", "ImagingStudy", "Observation", "Provenance",
    ]  # fmt: skip
    for r in resources:
        r4b_valid(r)
        assert "AI-generated, preliminary" in json.dumps(r) or r["resourceType"] == "ImagingStudy"
        if r["resourceType"] != "ImagingStudy":
            assert "DEMO - not for clinical use" in json.dumps(r)

    (study,) = by_type(resources, "ImagingStudy")
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"} in study["identifier"]
    accession = next(i for i in study["identifier"] if i.get("type") == codes.ACCESSION_TYPE)
    assert (accession["system"], accession["value"]) == (SYSTEMS_ACCESSION, "ACC-0001")
    assert study["status"] == "available" and study["started"] == "2025-01-15"
    assert study["series"][0]["modality"]["code"] == "CR"

    (report,) = by_type(resources, "DiagnosticReport")
    assert report["status"] == "preliminary"
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org", "code": "30745-4", "display": "XR Chest Views",
    }  # fmt: skip
    assert report["subject"] == {
        "type": "Patient", "identifier": {"system": SYSTEMS_PATIENT, "value": "PAT-0001"},
    }  # fmt: skip
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{study['id']}"}]
    assert report["conclusion"].startswith("DEMO - not for clinical use. AI-generated")
    assert "Findings: Two round opacities." in report["conclusion"]

    observations = by_type(resources, "Observation")
    assert len(observations) == 2  # the landmark is not a finding
    assert {r["reference"] for r in report["result"]} == {
        f"Observation/{o['id']}" for o in observations
    }
    (device,) = by_type(resources, "Device")
    anchors = {a.anchor_id: a for a in ledger.anchors_of(uid)}
    for obs in observations:
        anchor_id = next(i["value"] for i in obs["identifier"] if i["use"] == "secondary")
        uid_ident = next(i for i in obs["identifier"] if i["use"] == "official")
        assert uid_ident["value"] == f"urn:oid:{anchors[anchor_id].tracking_uid}"
        assert obs["derivedFrom"] == [{"reference": f"ImagingStudy/{study['id']}"}]
        assert obs["device"] == {"reference": f"Device/{device['id']}"}
        assert obs["code"]["coding"][0]["code"] == "27925004"  # SNOMED CT Nodule (ontology)
        components = {c["code"]["text"]: c for c in obs["component"]}
        long_axis = components["Long axis"]["valueQuantity"]
        assert (long_axis["system"], long_axis["code"]) == ("http://unitsofmeasure.org", "mm")
        assert components["Area"]["valueQuantity"]["code"] == "mm2"
        side = components["Laterality"]["valueCodeableConcept"]["coding"][0]["display"]
        assert side == anchors[anchor_id].laterality.capitalize()
        assert obs["bodySite"]["text"] == str(anchors[anchor_id].site).replace("_", " ")
    a1 = next(o for o in observations if "spiculated" in json.dumps(o))
    margin = next(c for c in a1["component"] if c["code"]["text"] == "margin")
    assert margin["valueCodeableConcept"]["coding"][0]["code"] == "112136"  # DCM Spiculated
    versions = {v["type"]["text"]: v["value"] for v in device["version"]}
    assert versions == {
        "model revision": "1", "prompt version": "preread-v1", "node version": "0.1.0",
    }  # fmt: skip
    (provenance,) = by_type(resources, "Provenance")
    assert {t["reference"] for t in provenance["target"]} == {
        f"DiagnosticReport/{report['id']}",
        *(f"Observation/{o['id']}" for o in observations),
    }
    assert provenance["agent"][0]["who"] == {"reference": f"Device/{device['id']}"}


def test_sizes_without_pixel_spacing_are_pixels_without_a_ucum_length(
    ledger: StudyLedger,
) -> None:
    uid = add_study(ledger, result=make_result(make_anchors(spacing=None), is_demo=False))
    record(ledger, uid)
    for obs in by_type(stored(ledger), "Observation"):
        r4b_valid(obs)
        quantities = [c["valueQuantity"] for c in obs["component"] if "valueQuantity" in c]
        assert quantities and all("system" not in q and "code" not in q for q in quantities)
        assert {q["unit"] for q in quantities} == {"pixels", "square pixels"}
        assert "no pixel spacing" in json.dumps(obs)
        assert "DEMO" not in json.dumps(obs)


def test_unknown_vocabulary_gets_a_text_only_concept_never_a_guessed_code(
    ledger: StudyLedger,
) -> None:
    anchors = make_anchors()
    anchors[0] = replace(
        anchors[0], finding="pneumatocele", site="azygos_lobe", label="azygos pneumatocele",
        attributes={"texture": "bubbly"},
    )  # fmt: skip
    uid = add_study(ledger, result=make_result(anchors))
    record(ledger, uid)
    obs = next(o for o in by_type(stored(ledger), "Observation") if "azygos" in json.dumps(o))
    r4b_valid(obs)
    assert obs["code"] == {"text": "azygos pneumatocele"}
    assert obs["bodySite"] == {"text": "azygos lobe"}
    texture = next(c for c in obs["component"] if c["code"]["text"] == "texture")
    assert texture["valueCodeableConcept"] == {"text": "bubbly"}


def test_report_status_follows_the_study(ledger: StudyLedger) -> None:
    store = FhirStore(ledger)
    queued = add_study(ledger, state=StudyState.QUEUED, accession="ACC-Q")
    record(ledger, queued)
    report = store.get("DiagnosticReport", report_id(queued))
    assert report is not None and report.resource["status"] == "registered"
    assert store.get("ImagingStudy", report.resource["imagingStudy"][0]["reference"][13:])

    failed = add_study(ledger, state=StudyState.FAILED, accession="ACC-F")
    record(ledger, failed)
    cancelled = store.get("DiagnosticReport", report_id(failed))
    assert cancelled is not None and cancelled.resource["status"] == "cancelled"
    assert "no CR/DX image" in cancelled.resource["conclusion"]

    uid = add_study(ledger)
    record(ledger, uid)
    first = store.get("DiagnosticReport", report_id(uid))
    assert first is not None and first.resource["status"] == "preliminary"
    record(ledger, uid)  # the same pre-read again: no new version
    again = store.get("DiagnosticReport", report_id(uid))
    assert again is not None and again.version_id == first.version_id == 1

    # a follow-up refines A1 (a new anchor version, result revision 1): the report and
    # that finding are amended
    done = ledger.get_study(uid)
    assert done is not None and done.result is not None and not done.result.amended
    a1 = done.result.anchor("A1")
    assert a1 is not None
    refined = a1.refined(turn=1, attributes={"margin": "lobulated"})
    amendment = replace(
        done.result.with_anchors([refined, *(a for a in done.result.anchors if a is not a1)]),
        revision=1,
    )
    assert ledger.amend_result(uid, 1, amendment, [refined])
    assert not ledger.amend_result(uid, 1, amendment, [refined])  # a redelivered turn
    assert [(a.anchor_id, a.version) for a in ledger.anchors_of(uid)] == [
        ("A1", 2), ("A2", 1), ("A3", 1),
    ]  # fmt: skip
    record(ledger, uid)
    amended = store.get("DiagnosticReport", report_id(uid))
    assert amended is not None and amended.resource["status"] == "amended"
    assert amended.version_id == 2
    statuses = {
        next(i["value"] for i in o.resource["identifier"] if i["use"] == "secondary"): o.resource
        for o in store.search("Observation", [], count=10)[1]
    }
    assert statuses["A1"]["status"] == "amended" and statuses["A2"]["status"] == "preliminary"
    assert "lobulated" in json.dumps(statuses["A1"])
    for resource in stored(ledger):
        r4b_valid(resource)


def test_capability_statement_and_ask_definition_validate() -> None:
    base = "http://node.example/fhir"
    cs = capability_statement(base)
    r4b_valid(cs)
    r4b_valid(ask_operation_definition(base))
    assert cs["fhirVersion"] == "4.0.1"
    served = {r["type"]: r for r in cs["rest"][0]["resource"]}
    report = served["DiagnosticReport"]
    assert {p["name"] for p in report["searchParam"]} >= {
        "identifier", "subject", "patient", "based-on", "status", "date",
    }  # fmt: skip
    definition = report["operation"][0]["definition"]
    assert definition == f"{base}/OperationDefinition/DiagnosticReport-ask"
    assert {i["code"] for i in served["Communication"]["interaction"]} == {
        "read", "search-type", "create", "vread", "history-instance",
    }  # fmt: skip
    assert {p["name"] for p in served["Observation"]["searchParam"]} >= {
        "derived-from", "subject", "code",
    }  # fmt: skip
    assert "Patient" not in served


def test_answer_and_audit_event_validate() -> None:
    question = {"resourceType": "Communication", "id": "q1", "status": "in-progress",
                "subject": {"type": "Patient", "identifier": {"value": "P"}}}  # fmt: skip
    answer = build_answer(
        answer_id="a1", question=question, text="Not supported yet.",
        about=[{"reference": "DiagnosticReport/r1"}], device="d1", status="completed",
        is_demo=True, language="en", sent="2025-01-01T00:00:00Z",
    )  # fmt: skip
    r4b_valid(answer)
    assert answer["inResponseTo"] == [{"reference": "Communication/q1"}]
    assert "DEMO - not for clinical use" in answer["payload"][0]["contentString"]
    rec = AccessRecord("rid1", "GET", "/fhir/DiagnosticReport", interaction="search-type",
                       agent="ris", agent_kind="token", client_address="127.0.0.1",
                       query="identifier=ACC", status=200,
                       entities=["DiagnosticReport/r1"])  # fmt: skip
    event = audit_event(rec)
    r4b_valid(event)
    assert event["outcome"] == "0" and event["action"] == "E"


def test_question_built_for_ask_validates(ledger: StudyLedger) -> None:
    """$ask stores the question Communication without running it through fhir.resources
    (it is built from checked parts only): the builder must still make a valid one, with
    and without an anchor and a language."""
    from node.fhir.auth import Principal
    from node.fhir.questions import Question, build_question

    uid = add_study(ledger)
    record(ledger, uid)
    report = FhirStore(ledger).get("DiagnosticReport", report_id(uid))
    assert report is not None
    ris = Principal("ris", "token", frozenset({"system/*.*"}))
    for q, anchor in ((Question("How large is A1?", "", ""), ""),
                      (Question("这个结节多大?", "A1", "zh-CN"), "Observation/o1")):  # fmt: skip
        comm = build_question(report, q, anchor, ris)
        r4b_valid(comm)
        assert comm["payload"] == [{"contentString": q.text}]
        assert comm["about"][0] == {"reference": f"DiagnosticReport/{report.id}"}
        assert comm["subject"] == report.resource["subject"]
        assert (comm.get("language") or "") == q.language


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_reads_and_paged_searches_agree_on_sqlite_and_postgresql(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The store reads through the SQLite driver on SQLite and through SQLAlchemy on
    PostgreSQL (node.fhir.store.SqliteDriver): the same statements, so a RIS sees the same
    reports on either: every one of a patient's reports once over the pages, none of
    another patient's, the total right on every page, reads equal to the search's rows."""
    url = (
        f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    ledger = StudyLedger(url)
    try:
        mine = [add_study(ledger, accession=f"ACC-{n}", study_date=f"2025011{n}") for n in range(5)]
        other = add_study(ledger, patient_id="PAT-0002", accession="ACC-OTHER")
        for uid in [*mine, other]:
            record(ledger, uid)
        store = FhirStore(ledger)
        conditions = parse_query(
            "DiagnosticReport", [("patient.identifier", f"{SYSTEMS_PATIENT}|PAT-0001")]
        )
        seen: list[str] = []
        page = store.search_page("DiagnosticReport", conditions, count=2)
        pages = 1
        while True:
            assert page.total == len(mine)
            seen += [r.id for r in page.resources]
            if page.next is None:
                break
            page = store.search_page("DiagnosticReport", conditions, count=2, after=page.next)
            pages += 1
        assert pages == 3
        assert sorted(seen) == sorted(report_id(uid) for uid in mine)  # each once
        refs = [("DiagnosticReport", rid) for rid in reversed(seen)] + [("Patient", "nobody")]
        assert [r.id for r in store.get_many(refs)] == list(reversed(seen))
        one = store.get("DiagnosticReport", seen[0])
        assert one is not None and one.resource["id"] == seen[0]
        assert store.get("DiagnosticReport", report_id(other)) is not None
        assert store.search_page("DiagnosticReport", conditions, count=0).total == len(mine)
    finally:
        ledger.close()
