"""Follow-up questions, the worker side, as plain functions (tested without a broker).

question id -> the question Communication and its DiagnosticReport (FHIR store) -> which
anchors it is about (an anchor reference given with the question, explicit ids such as
"A1", or finding/site terms in English or Chinese) -> the answer Communication
(inResponseTo the question, about the report and the anchors' Observations).

The anchored dialogue (crop, grounded single-turn prompt, geometry, refined anchors) is
not here yet: until it lands every answer says, in the question's language, that
follow-up questions are not supported yet, and names the anchors the question is about.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Final

from node.fhir import codes
from node.fhir import resources as fr
from node.fhir.followups import FollowupJob, finish_followup, followup, start_followup
from node.fhir.search import normalise_reference
from node.fhir.store import FhirStore, StoredResource
from node.ledger import StudyLedger
from node.settings import Settings
from workers.preread import ledger_for

log = logging.getLogger("medgemma.followup")

_EXPLICIT_ID: Final = re.compile(r"(?<![A-Za-z0-9])[Aa](\d{1,4})(?![0-9])")
_HAN: Final = re.compile(r"[\u3400-\u9fff]")

NOT_SUPPORTED_EN: Final = (
    "Follow-up questions are not supported by this node yet: the anchored dialogue that "
    "answers them is still being built, so no answer was generated."
)
NOT_SUPPORTED_ZH: Final = "本节点暂不支持追问：回答追问的锚定对话功能尚在开发中，因此未生成回答。"


@dataclass(frozen=True)
class AnchorRef:
    """An anchor a question is about, with the Observation that reports it (findings)."""

    anchor_id: str
    label: str
    observation_id: str | None
    label_zh: str = ""


@lru_cache(maxsize=4)
def _store(url: str) -> FhirStore:
    return FhirStore(_ledger(url))


@lru_cache(maxsize=4)
def _ledger(url: str) -> StudyLedger:
    return StudyLedger(url)


def store_for(settings: Settings) -> FhirStore:
    """The process-wide FHIR store on the node's database."""
    return _store(settings.storage.resolved_database_url())


def _anchor_id_of(observation: Mapping[str, Any]) -> str:
    for ident in observation.get("identifier", []):
        value = str(ident.get("value", ""))
        if re.fullmatch(r"A\d+", value):
            return value
    return ""


def resolve_anchors(
    question: str,
    anchor_ref: str,
    observations: Sequence[StoredResource],
    anchors: Sequence[Mapping[str, Any]],
) -> list[AnchorRef]:
    """The anchors a question is about, best evidence first.

    1. the anchor given with the question (``Observation/<id>``);
    2. explicit anchor ids in the text ("A1", "a2");
    3. finding / site / landmark terms (English or Chinese, via the chest ontology) that
       match the anchors' finding and site; a finding plus a site narrows to both.
    Unresolved questions give an empty list.
    """
    by_obs = {o.id: o for o in observations}
    obs_of = {_anchor_id_of(o.resource): o.id for o in observations}
    known = {str(a["anchor_id"]): a for a in anchors}
    for obs in observations:
        aid = _anchor_id_of(obs.resource)
        if aid and aid not in known:
            known[aid] = {"anchor_id": aid, "label": obs.resource.get("code", {}).get("text", "")}

    def ref(aid: str) -> AnchorRef:
        a = known.get(aid, {})
        return AnchorRef(aid, str(a.get("label", "")), obs_of.get(aid), _zh_label(a))

    if anchor_ref.startswith("Observation/"):
        oid = anchor_ref.split("/", 1)[1]
        given = by_obs.get(oid)
        if given is not None:
            aid = _anchor_id_of(given.resource)
            return [replace(ref(aid), observation_id=oid)]
    explicit = [f"A{int(m[1])}" for m in _EXPLICIT_ID.finditer(question)]
    hits = [ref(aid) for aid in dict.fromkeys(explicit) if aid in known]
    if hits:
        return hits
    return _descriptive(question, anchors, ref)


def _zh_label(anchor: Mapping[str, Any]) -> str:
    """The anchor's site and finding in Chinese (from the chest ontology), or ""."""
    try:
        from sr_templates import ontology
    except ImportError:
        return ""
    parts = []
    site = anchor.get("site")
    if site:
        for lookup in (ontology.site, ontology.landmark):
            try:
                parts.append(lookup(str(site)).zh)
                break
            except ValueError:
                continue
    finding = anchor.get("finding")
    if finding:
        try:
            parts.append(ontology.finding(str(finding)).zh)
        except ValueError:
            pass
    return "".join(parts)


def _descriptive(
    question: str, anchors: Sequence[Mapping[str, Any]], ref: Callable[[str], AnchorRef]
) -> list[AnchorRef]:
    try:
        from sr_templates.ontology import find_terms
    except ImportError:  # the ontology ships with the node; a missing one only loses this step
        return []
    findings: set[str] = set()
    sites: set[str] = set()
    for match in find_terms(question):
        for concept in match.concepts[:1]:
            if concept.kind == "finding":
                findings.add(concept.term)
            elif concept.kind in ("site", "landmark"):
                sites.add(concept.term)
    if not findings and not sites:
        return []
    out = []
    for a in anchors:
        finding_ok = not findings or a.get("finding") in findings
        site_ok = not sites or a.get("site") in sites
        if finding_ok and site_ok:
            out.append(ref(str(a["anchor_id"])))
    return out


def study_uid_of(store: FhirStore, report: StoredResource) -> str:
    """The Study Instance UID of a report's ImagingStudy ("" if it has none)."""
    for ref in report.resource.get("imagingStudy", []):
        kind, _, rid = normalise_reference(str(ref.get("reference", ""))).partition("/")
        study = store.get(kind, rid) if kind == "ImagingStudy" else None
        for ident in study.resource.get("identifier", []) if study else []:
            value = str(ident.get("value", ""))
            if ident.get("system") == codes.DICOM_UID and value.startswith("urn:oid:"):
                return value[len("urn:oid:") :]
    return ""


def _language(job: FollowupJob, question: Mapping[str, Any], text: str) -> str:
    lang = job.language or str(question.get("language") or "")
    if not lang:
        lang = "zh" if _HAN.search(text) else "en"
    return lang


def compose_answer(language: str, resolved: Sequence[AnchorRef], all_ids: Sequence[str]) -> str:
    """The "not supported yet" answer, naming what the question is about."""
    zh = language.lower().startswith("zh")
    if zh:
        text = NOT_SUPPORTED_ZH
        if resolved:
            names = "、".join(
                f"{a.anchor_id}（{a.label_zh or a.label}）"
                if a.label_zh or a.label
                else a.anchor_id
                for a in resolved
            )
            text += f"该问题涉及：{names}。"
        elif all_ids:
            text += f"未能确定该问题所指的病灶；本检查的锚点：{'、'.join(all_ids)}。"
        return text + "（AI 生成的初步结果，不是诊断。）"
    text = NOT_SUPPORTED_EN
    if resolved:
        names = ", ".join(
            f"{a.anchor_id} ({a.label})" if a.label else a.anchor_id for a in resolved
        )
        text += f" The question is about {names}."
    elif all_ids:
        text += (
            " The question could not be tied to a finding of this study; its anchors are "
            f"{', '.join(all_ids)} (name one, e.g. 'A1')."
        )
    return text


def answer_question(store: FhirStore, ledger: StudyLedger, job: FollowupJob) -> dict[str, Any]:
    """The answer Communication for a follow-up job (not stored)."""
    question_res = store.get("Communication", job.id)
    if question_res is None:
        raise LookupError(f"the question Communication/{job.id} is gone")
    question = question_res.resource
    text = next(
        (str(p["contentString"]) for p in question.get("payload", []) if "contentString" in p),
        "",
    )
    report = store.get("DiagnosticReport", job.report_id)
    study_uid = job.study_uid or (study_uid_of(store, report) if report else "")
    results = [
        normalise_reference(r["reference"])
        for r in (report.resource.get("result", []) if report else [])
    ]
    observations = store.get_many(
        (kind, rid) for kind, _, rid in (ref.partition("/") for ref in results)
    )
    study = ledger.get_study(study_uid) if study_uid else None
    result = (study.result if study else None) or {}
    anchors = ledger.anchors_of(study_uid) if study_uid else []
    resolved = resolve_anchors(text, job.anchor_ref, observations, anchors)
    all_ids = [str(a["anchor_id"]) for a in anchors] or [
        _anchor_id_of(o.resource) for o in observations
    ]
    language = _language(job, question, text)
    about = [fr.reference("DiagnosticReport", job.report_id)]
    about += [
        fr.reference("Observation", a.observation_id, f"{a.anchor_id} {a.label}".strip())
        for a in resolved
        if a.observation_id
    ]
    device = next(
        (
            normalise_reference(o.resource["device"]["reference"]).split("/", 1)[1]
            for o in observations
            if o.resource.get("device", {}).get("reference")
        ),
        None,
    )
    return fr.build_answer(
        answer_id=fr.resource_id("Communication", "answer", job.id),
        question=question,
        text=compose_answer(language, resolved, all_ids),
        about=about,
        device=device,
        status="completed",
        is_demo=bool(result.get("is_demo")),
        language=language,
        sent=fr.now_instant(),
    )


def _failure_answer(job: FollowupJob, store: FhirStore, reason: str) -> dict[str, Any]:
    question = store.get("Communication", job.id)
    return fr.build_answer(
        answer_id=fr.resource_id("Communication", "answer", job.id),
        question=question.resource if question else {"id": job.id},
        text=f"The question could not be answered: {reason}",
        about=[fr.reference("DiagnosticReport", job.report_id)],
        device=None,
        status="not-done",
        is_demo=False,
        language=None,
        sent=fr.now_instant(),
        reason=reason,
    )


def run_followup(settings: Settings, question_id: str, store: FhirStore | None = None) -> str:
    """Answer one follow-up question and store the answer.

    Returns "answered", "failed" (the answer says why, status not-done) or "noop" when
    the question is unknown or already answered (a redelivered task).
    """
    store = store or store_for(settings)
    job = start_followup(store, question_id)
    if job is None:
        log.info("follow-up %s already answered or unknown: nothing to do", question_id)
        return "noop"
    ledger = ledger_for(settings)
    try:
        answer = answer_question(store, ledger, job)
    except Exception as exc:
        log.exception("follow-up %s failed", question_id)
        reason = f"internal error in the follow-up worker ({type(exc).__name__})"
        finish_followup(
            store, job.id, answer=_failure_answer(job, store, reason), failed_reason=reason
        )
        return "failed"
    finish_followup(store, job.id, answer=answer)
    log.info(
        "follow-up %s answered: Communication/%s about %d resources",
        question_id,
        answer["id"],
        len(answer.get("about", [])),
    )
    return "answered"


def fail_followup(settings: Settings, question_id: str, reason: str) -> None:
    """Record a follow-up the worker gave up on (timeout): a not-done answer says why."""
    store = store_for(settings)
    job = followup(store, question_id)
    if job is None or job.finished:
        return
    failure = _failure_answer(job, store, reason)
    finish_followup(store, job.id, answer=failure, failed_reason=reason)


def run_followup_by_id(settings: Settings) -> Callable[[str], str]:
    """The in-process worker's entry point (``serve``): bound to the node's settings."""

    def handler(question_id: str) -> str:
        return run_followup(settings, question_id)

    return handler
