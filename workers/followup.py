"""Follow-up questions, the worker side, as plain functions (tested without a broker).

question id -> the question Communication and its DiagnosticReport (FHIR store) -> the
study's finished pre-read (its current result: anchors at their latest versions,
distances) and the earlier turns of the conversation -> one dialogue turn
(workers.dialogue.turn: resolve, crop, ask the model, geometry, compose) -> when the turn
refined an anchor, added one or measured a distance: a new result revision in the ledger,
an amended SR and a new SEG to the PACS (workers.results) and amended FHIR resources ->
the turn in the dialogue log -> the answer Communication (inResponseTo the question,
about the report and the anchors' Observations, in the question's language).

An answer that could not be produced is stored as a not-done Communication saying why,
never as completed. Questions and answers are patient data: never logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import lru_cache
from typing import Any

from node.fhir import resources as fr
from node.fhir.followups import (
    FollowupJob,
    finish_followup,
    followup,
    start_followup,
    study_uid_of,
)
from node.fhir.store import FhirStore
from node.ledger import StudyLedger, StudySummary
from node.settings import Settings
from node.turns import DialogueLog, Turn
from sr_templates import ontology
from sr_templates.model import AnchorDistance, PrereadResult
from workers.dialogue import compose
from workers.dialogue.prompts import FOLLOWUP_PROMPT_VERSION
from workers.dialogue.turn import (
    EarlierTurn,
    TransientTurnError,
    TurnFailed,
    TurnInput,
    TurnOutput,
    answer_turn,
)
from workers.engines.base import Engine
from workers.imaging import DisplayImage, load_display_image
from workers.preread import engine_for, ledger_for, record_fhir

log = logging.getLogger("medgemma.followup")


@lru_cache(maxsize=4)
def _store(ledger: StudyLedger) -> FhirStore:
    return FhirStore(ledger)


@lru_cache(maxsize=4)
def _dialogue_log(ledger: StudyLedger) -> DialogueLog:
    return DialogueLog(ledger.engine)


def store_for(settings: Settings) -> FhirStore:
    """The process-wide FHIR store on the node's database."""
    return _store(ledger_for(settings))


def dialogue_log_for(settings: Settings) -> DialogueLog:
    """The process-wide dialogue log on the node's database."""
    return _dialogue_log(ledger_for(settings))


def _question_text(question: Mapping[str, Any]) -> str:
    return next(
        (str(p["contentString"]) for p in question.get("payload", []) if "contentString" in p),
        "",
    )


def _finished_version(ledger: StudyLedger, study_uid: str) -> StudySummary:
    """The newest version of the study with a finished pre-read."""
    for v in reversed(ledger.study_versions(study_uid)):
        if v.state.value == "done" and v.result is not None:
            return v
    raise TurnFailed("the study has no finished pre-read to ask about yet")


def _anchor_hint(result: PrereadResult, anchor_ref: str) -> str | None:
    """The anchor id of an anchor given with the question ("A1" or "Observation/<id>")."""
    if not anchor_ref:
        return None
    if anchor_ref.startswith("Observation/"):
        oid = anchor_ref.split("/", 1)[1]
        for a in result.anchors:
            if fr.observation_id(a.tracking_uid) == oid:
                return a.anchor_id
        return None
    return anchor_ref if result.anchor(anchor_ref) is not None else None


def _image_loader(
    settings: Settings, ledger: StudyLedger, study: StudySummary
) -> Callable[[], DisplayImage]:
    """Loads the frontal image the anchors are drawn on, from the spool, when first asked."""
    assert study.result is not None
    frontal = study.result.frontal.sop_instance_uid

    def load() -> DisplayImage:
        for inst in ledger.instances_of(study.study_uid, up_to_version=study.version):
            if inst.sop_instance_uid == frontal:
                return load_display_image(settings.storage.spool_path / inst.path)
        raise TurnFailed("the image the findings are drawn on is no longer in the spool")

    return load


def _merge_distances(
    old: tuple[AnchorDistance, ...], new: tuple[AnchorDistance, ...]
) -> tuple[AnchorDistance, ...]:
    """A pair measured again replaces its earlier value (same tracking UID)."""
    by_uid = {d.tracking_uid: d for d in old}
    for d in new:
        by_uid[d.tracking_uid] = d
    return tuple(by_uid.values())


def _amend(
    settings: Settings, ledger: StudyLedger, study: StudySummary, out: TurnOutput
) -> PrereadResult:
    """Store the turn's anchors and distances as the next result revision, then send the
    amended SR and the new SEG and update the FHIR resources.

    The SR/SEG are built first (in memory): a result that cannot be written to the PACS is
    never stored as amended. The ledger then takes the revision (refused when another turn
    took it first), and only then are files written and queued.
    """
    from workers.results import ResultsError, build_results, store_results

    assert study.result is not None
    current = study.result
    anchors = {a.anchor_id: a for a in current.anchors}
    anchors.update({a.anchor_id: a for a in out.anchors})
    amended = replace(
        current.with_anchors(list(anchors.values())),
        distances=_merge_distances(current.distances, out.distances),
        revision=current.revision + 1,
    )
    try:
        built = build_results(settings, ledger, study.study_uid, study.version, amended)
    except ResultsError as exc:
        raise TurnFailed(f"the amended SR/SEG could not be built: {exc}") from exc
    if not ledger.amend_result(study.study_uid, study.version, amended, out.anchors):
        raise TurnFailed(
            "another follow-up changed this study at the same moment; please ask again"
        )
    amended = replace(amended, outputs=store_results(settings, ledger, built))
    ledger.record_outputs(study.study_uid, study.version, amended)
    record_fhir(ledger, study.study_uid, study.version, settings.fhir)
    return amended


def _answer(
    job: FollowupJob,
    question: Mapping[str, Any],
    result: PrereadResult,
    out_text: str,
    resolved: tuple[str, ...],
    language: str,
) -> dict[str, Any]:
    """The answer Communication; ``out_text`` is the answer ending with its footer."""
    about = [fr.reference("DiagnosticReport", job.report_id)]
    for anchor_id in resolved:
        a = result.anchor(anchor_id)
        if a is not None and a.kind == "finding":
            about.append(
                fr.reference(
                    "Observation", fr.observation_id(a.tracking_uid), a.tracking_identifier
                )
            )
    return fr.build_answer(
        answer_id=fr.resource_id("Communication", "answer", job.id),
        question=question,
        text=out_text.rsplit("\n\n", 1)[0],
        about=about,
        device=fr.device_id(result),
        status="completed",
        is_demo=result.is_demo,
        language=language,
        sent=fr.now_instant(),
        footer=out_text.rsplit("\n\n", 1)[-1],
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


def answer_question(
    settings: Settings, store: FhirStore, job: FollowupJob, engine: Engine | None = None
) -> dict[str, Any]:
    """Run the dialogue turn of a follow-up job and return its answer Communication.

    Stores the turn, and an amended result (SR, SEG, FHIR) when the turn changed one.
    Raises TurnFailed when no answer can be produced.
    """
    question_res = store.get("Communication", job.id)
    if question_res is None:
        raise TurnFailed(f"the question Communication/{job.id} is gone")
    question = question_res.resource
    text = _question_text(question)
    language = ontology.answer_language(job.language or str(question.get("language") or ""), text)
    if language is None:
        raise TurnFailed(
            f"language {job.language!r} is not supported: answers are written in "
            f"{', '.join(ontology.ANSWER_LANGUAGES)}"
        )
    report = store.get("DiagnosticReport", job.report_id)
    study_uid = job.study_uid or (study_uid_of(store, report) if report else "")
    if not study_uid:
        raise TurnFailed("the question's report has no imaging study")
    ledger = ledger_for(settings)
    study = _finished_version(ledger, study_uid)
    assert study.result is not None
    dialogue = dialogue_log_for(settings)
    stored = dialogue.turn_for_question(job.id)
    if stored is not None:  # a redelivered task whose turn was already stored
        return _answer(job, question, study.result, stored.answer, stored.resolved, stored.language)
    turns = dialogue.turns_of(study_uid)
    inp = TurnInput(
        question=text,
        language=language,
        result=study.result,
        turn=dialogue.next_turn_number(study_uid),
        engine=engine or engine_for(settings.engine),
        image=_image_loader(settings, ledger, study),
        earlier=tuple(EarlierTurn(t.question, t.answer, t.resolved, t.focus) for t in turns),
        anchor_hint=_anchor_hint(study.result, job.anchor_ref),
        study_uid=study_uid,
    )
    out = answer_turn(inp)
    result = _amend(settings, ledger, study, out) if out.amends else study.result
    footer = compose.notice(language, result.is_demo, result.model_id, FOLLOWUP_PROMPT_VERSION)
    body = f"{out.text}\n\n{footer}"
    dialogue.record(
        Turn(
            study_uid=study_uid,
            study_version=study.version,
            turn=inp.turn,
            question_id=job.id,
            question=text,
            language=language,
            outcome=out.outcome,
            resolved=out.resolved,
            focus=out.focus,
            intents=out.intents,
            prompt_version=FOLLOWUP_PROMPT_VERSION,
            model_outputs=tuple(out.model_outputs),
            answer=body,
            timings=out.timings,
        )
    )
    log.info(
        "follow-up %s on study %s: turn %d %s, anchors %s, intents %s, %d model calls%s",
        job.id,
        study_uid,
        inp.turn,
        out.outcome,
        ",".join(out.resolved) or "-",
        ",".join(out.intents) or "-",
        len(out.model_outputs),
        f", result revision {result.revision}" if out.amends else "",
    )
    return _answer(job, question, result, body, out.resolved, language)


def run_followup(
    settings: Settings,
    question_id: str,
    store: FhirStore | None = None,
    engine: Engine | None = None,
    *,
    route: str = "",
) -> str:
    """Answer one follow-up question and store the answer.

    route: where the message was sent ("" the shared queue, else this worker's name).
    Returns "answered", "failed" (the answer says why, status not-done) or "noop" when
    the question is unknown or already answered (a redelivered task), or was re-sent to
    the shared queue after this message was sent here (node.fhir.followups). Raises
    TransientTurnError when the engine is busy: the caller retries, then gives up with
    :func:`fail_followup`.
    """
    store = store or store_for(settings)
    job = start_followup(store, question_id, route)
    if job is None:
        log.info("follow-up %s already answered, unknown or re-routed: nothing to do", question_id)
        return "noop"
    try:
        answer = answer_question(settings, store, job, engine)
    except TransientTurnError:
        raise  # the job stays running; the task (or the in-process handler) tries again
    except TurnFailed as exc:
        reason = str(exc)
        log.warning("follow-up %s not answered: %s", question_id, reason)
        finish_followup(
            store, job.id, answer=_failure_answer(job, store, reason), failed_reason=reason
        )
        return "failed"
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
        for attempt in range(3):
            try:
                return run_followup(settings, question_id)
            except TransientTurnError as exc:
                log.warning(
                    "follow-up %s: transient error (attempt %d): %s", question_id, attempt + 1, exc
                )
                time.sleep(2**attempt)
        fail_followup(settings, question_id, "the model kept failing (transient errors)")
        return "failed"

    return handler
