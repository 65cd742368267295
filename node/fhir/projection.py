"""The projection of a pre-read into FHIR resources: the ledger's study version (header
facts, result, current anchors) -> ImagingStudy, model Device, one Observation per finding
anchor, DiagnosticReport and Provenance, written to the store.

Callers pass the identifier systems of the node's settings (``fhir.patient_id_system``,
``fhir.accession_system``: :func:`identifier_systems`); nothing here reads settings itself,
so a node started with ``--config FILE`` writes the systems of that file.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from node.fhir import resources as fr
from node.fhir.store import FhirStore
from node.ledger import Study, StudyLedger
from node.settings import FhirSettings
from sr_templates.model import PrereadResult

log = logging.getLogger("medgemma.fhir")


def identifier_systems(settings: FhirSettings) -> fr.IdentifierSystems:
    """The Identifier.system of PatientID and AccessionNumber configured for this node."""
    return fr.IdentifierSystems(settings.patient_id_system, settings.accession_system)


def study_facts(ledger: StudyLedger, study_uid: str, version: int) -> fr.StudyFacts:
    """The header facts of one study version (patient, accession, date, series, result)."""
    with Session(ledger.engine) as s:
        study = s.execute(
            select(Study).where(Study.study_uid == study_uid, Study.version == version)
        ).scalar_one_or_none()
        if study is None:
            raise KeyError(f"unknown study {study_uid} version {version}")
        head = (
            study.state,
            study.patient_id,
            study.accession_number,
            study.study_date,
            study.study_description,
            study.result,
            study.reason,
        )
    instances = ledger.instances_of(study_uid, up_to_version=version)
    by_series: dict[str, list[tuple[str, str]]] = {}
    for inst in instances:
        by_series.setdefault(inst.series_uid, []).append(
            (inst.sop_instance_uid, inst.sop_class_uid)
        )
    seen: dict[str, fr.SeriesFacts] = {}
    for v in range(1, version + 1):
        try:
            listed = ledger.series_of(study_uid, v)
        except Exception:  # a version without rows (never happens in practice)
            continue
        for series in listed:
            seen[series.series_uid] = fr.SeriesFacts(
                series.series_uid,
                series.modality,
                series.body_part,
                series.view_position,
                series.series_description,
                tuple(by_series.get(series.series_uid, ())),
            )
    state, patient_id, accession, date, description, raw_result, reason = head
    return fr.StudyFacts(
        study_uid=study_uid,
        version=version,
        state=state,
        patient_id=patient_id,
        accession_number=accession,
        study_date=date,
        study_description=description,
        series=tuple(seen.values()),
        result=PrereadResult.from_json(raw_result) if raw_result else None,
        reason=reason,
    )


def build_preread_resources(
    facts: fr.StudyFacts, systems: fr.IdentifierSystems, *, reported: bool = False
) -> fr.PrereadBundle | None:
    """The resources for a study's state: registered, preliminary/amended, cancelled;
    None for a study that is not read (skipped) and was never reported. ``reported``: a
    report was already written (the study was queued, then skipped by the worker): it is
    cancelled with the reason rather than left registered."""
    state = facts.state
    if state == "skipped" and not reported:
        return None
    issued = fr.now_instant()
    study = fr.build_imaging_study(facts, systems)
    if state != "done" or not facts.result:
        status = "cancelled" if state in ("failed", "skipped") else "registered"
        report = fr.build_report(
            facts, systems, status=status, results=(), issued=issued, reason=facts.reason
        )
        return fr.PrereadBundle(imaging_study=study, device=None, report=report)
    result = facts.result
    is_demo = result.is_demo
    device = fr.build_device(result)
    observations: list[dict[str, Any]] = []
    shown: list[tuple[str, str]] = []
    amended = result.amended
    for anchor in result.findings:
        refined = anchor.refined_turn is not None
        obs = fr.build_observation(
            anchor,
            facts=facts,
            systems=systems,
            device=str(device["id"]),
            status="amended" if refined else "preliminary",
            is_demo=is_demo,
            issued=issued,
        )
        observations.append(obs)
        shown.append((str(obs["id"]), anchor.tracking_identifier))
    status = "amended" if amended else "preliminary"
    report = fr.build_report(facts, systems, status=status, results=shown, issued=issued)
    provenance = fr.build_provenance(
        provenance_id=fr.resource_id("Provenance", facts.study_uid, str(facts.version), status),
        targets=[report, *observations],
        device=str(device["id"]),
        source=f"ImagingStudy/{study['id']}",
        activity="UPDATE" if amended else "CREATE",
        recorded=issued,
        is_demo=is_demo,
    )
    return fr.PrereadBundle(study, device, observations, report, provenance)


def record_preread(
    ledger_or_url: StudyLedger | str,
    study_uid: str,
    version: int,
    *,
    systems: fr.IdentifierSystems,
    store: FhirStore | None = None,
) -> None:
    """Write (or update) the FHIR resources of a study version from the ledger.

    Call it after a successful pre-read (workers/preread.py): it writes the ImagingStudy,
    the model Device, one Observation per finding anchor, the preliminary DiagnosticReport
    and a Provenance, and queues Subscription notifications. For a study still being read
    it writes a ``registered`` report, for a failed one a ``cancelled`` report; a skipped
    (not chest) study gets none. Idempotent: unchanged content makes no new version.

    ``systems``: the node's identifier systems (:func:`identifier_systems` of its settings).
    """
    ledger = StudyLedger(ledger_or_url) if isinstance(ledger_or_url, str) else ledger_or_url
    own_store = store is None and isinstance(ledger_or_url, str)
    if store is not None:
        fhir = store
    elif own_store:
        fhir = FhirStore(ledger)
    else:
        fhir = _store_on(ledger.engine)
    try:
        facts = study_facts(ledger, study_uid, version)
        reported = fhir.get("DiagnosticReport", fr.report_id(study_uid)) is not None
        bundle = build_preread_resources(facts, systems, reported=reported)
        if bundle is None:
            log.info("study %s v%d is not read (skipped): no FHIR resources", study_uid, version)
            return
        stored = fhir.put_many(bundle.all())
        report = next(r for r in stored if r.resource_type == "DiagnosticReport")
        log.info(
            "FHIR resources of study %s v%d: DiagnosticReport/%s v%d (%s), %d Observations",
            study_uid,
            version,
            report.id,
            report.version_id,
            bundle.report["status"],
            len(bundle.observations),
        )
    finally:
        if own_store:
            fhir.close()
        if isinstance(ledger_or_url, str):
            ledger.close()


@lru_cache(maxsize=8)
def _store_on(engine: Engine) -> FhirStore:
    """One FhirStore per ledger engine (a worker records many pre-reads)."""
    return FhirStore(engine)


__all__ = [
    "build_preread_resources",
    "identifier_systems",
    "record_preread",
    "study_facts",
]
