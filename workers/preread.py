"""The pre-read of one study version, as plain functions (tested without a broker).

choose the views -> decode + LUTs -> pad to square -> engine -> tolerant parse -> anchors
(geometry in source pixels, sizes from pixel spacing) -> ledger (result + anchor versions).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from node import __version__ as node_version
from node.db import process_owner
from node.dispatch import error_summary
from node.ledger import LedgerError, StudyLedger, StudyState, StudySummary
from node.rules import decide_study
from node.settings import EngineSettings, FhirSettings, Settings
from sr_templates.model import Anchor, PrereadResult, ViewRef
from workers.anchors import build_anchors
from workers.dialogue.turn import prefill_followups
from workers.engines.base import (
    Engine,
    EngineError,
    EngineRequest,
    TransientEngineError,
    prefix_metadata,
)
from workers.imaging import (
    DisplayImage,
    ImagingError,
    SquareTransform,
    ViewChoice,
    choose_views,
    load_display_image,
    to_model_image,
)
from workers.parsing import parse_preread
from workers.prompts import (
    CHEST_CHECK_VERSION,
    PROMPT_VERSION,
    build_chest_check_prompt,
    build_preread_prompt,
    parse_chest_check,
)

log = logging.getLogger("medgemma.preread")

#: A study version held by a run: (study UID, version).
RunKey = tuple[str, int]

DEMO_NOTICE = "DEMO - not for clinical use"
AI_NOTICE = "AI-generated, preliminary, not a diagnosis"


class TransientPrereadError(Exception):
    """Worth retrying (engine busy, GPU out of memory under load)."""


class PrereadFailure(Exception):
    """The study cannot be pre-read (no readable image, engine refused); not retried."""


class NotAChestRadiograph(Exception):
    """Asked first (``preread.ask_engine_if_unlabelled``), the engine did not say the image
    is a frontal chest radiograph: the study is skipped with this reason."""


@lru_cache(maxsize=4)
def _ledger(url: str, run_lease_seconds: float, max_run_seconds: float) -> StudyLedger:
    return StudyLedger(url, run_lease_seconds=run_lease_seconds, max_run_seconds=max_run_seconds)


def ledger_for(settings: Settings) -> StudyLedger:
    """The process-wide ledger; a started run holds its study version for
    ``queue.run_lease_seconds``, renewed by :class:`RunHeartbeat`, never beyond the task's
    hard time limit (after it, Celery has killed the task and another worker may take it)."""
    return _ledger(
        settings.storage.resolved_database_url(),
        float(settings.queue.run_lease_seconds),
        float(settings.queue.task_time_limit_seconds),
    )


class RunHeartbeat:
    """Renews the leases of a run's study versions (one, or a batch's) every quarter of
    ``run_lease_seconds`` while the run works, in a thread of the running process: when the
    process dies (a killed worker, a crashed node) the renewals stop and the reconciler
    re-sends every study of the run once its lease runs out.

    :meth:`hold` adds versions claimed later (a batch's other studies). :meth:`is_lost` is
    true for a version found no longer held by this owner (the process stalled past its
    lease and the study was re-sent): that study's outcome is then not recorded.
    :meth:`finished` stops renewing a version whose outcome is recorded.
    """

    def __init__(self, ledger: StudyLedger, runs: Sequence[RunKey], owner: str) -> None:
        self.ledger = ledger
        self.runs = list(runs)
        self.owner = owner
        self.interval = ledger.run_lease_seconds / 4
        self._lost: set[RunKey] = set()
        self._finished: set[RunKey] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        first = self.runs[0][0][-12:] if self.runs else "none"
        self._thread = threading.Thread(
            target=self._run, name=f"medgemma-lease-{first}", daemon=True
        )

    def __enter__(self) -> RunHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def is_lost(self, study_uid: str, version: int) -> bool:
        with self._lock:
            return (study_uid, version) in self._lost

    def hold(self, runs: Sequence[RunKey]) -> None:
        """Renew these versions too from now on (the other studies claimed for the batch)."""
        with self._lock:
            self.runs.extend(runs)

    def finished(self, study_uid: str, version: int) -> None:
        with self._lock:
            self._finished.add((study_uid, version))

    def _active(self) -> list[RunKey]:
        with self._lock:
            return [r for r in self.runs if r not in self._lost and r not in self._finished]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            active = self._active()
            if not active:
                continue
            try:
                renewed = self.ledger.renew_runs(active, self.owner)
            except Exception as exc:  # the database is away: the next beat tries again
                log.warning("leases of %d studies not renewed: %s", len(active), exc)
                continue
            with self._lock:
                lost = [r for r in active if r not in renewed and r not in self._finished]
                self._lost.update(lost)
            for study_uid, version in lost:
                log.warning(
                    "study %s v%d: this run no longer holds it (lease lost or run time "
                    "limit reached); its outcome will not be recorded",
                    study_uid,
                    version,
                )


_engines: dict[tuple[str, ...], Engine] = {}


def engine_for(settings: EngineSettings) -> Engine:
    """The process-wide engine for these settings, loaded on first use."""
    key = (
        settings.name,
        settings.model,
        settings.revision,
        settings.device,
        settings.server_url,
        str(settings.local_files_only),
        str(settings.demo_delay_seconds),
        str(settings.prefix_cache_studies),
    )
    if key not in _engines:
        from workers.engines.factory import make_engine

        log.info("loading engine %s (model %s, revision %s)", *key[:3])
        loading = time.monotonic()
        _engines[key] = make_engine(
            settings.name,
            model=settings.model,
            revision=settings.revision,
            local_files_only=settings.local_files_only,
            device=settings.device,
            server_url=settings.server_url,
            demo_delay_seconds=settings.demo_delay_seconds,
            prefix_cache_studies=settings.prefix_cache_studies,
        )
        log.info("engine %s loaded in %.1f s", settings.name, time.monotonic() - loading)
    return _engines[key]


#: Reports a pre-read's stage ("views chosen", "decoded", "engine", "parsed", ...).
Progress = Callable[[str], None]


def _no_progress(stage: str) -> None:
    pass


#: A stage is recorded in the ledger once the run has been in it this long.
STAGE_RECORD_AFTER_SECONDS = 0.25


class _StageRecorder:
    """Logs each stage of a run at once; records it in the ledger (``status`` and the
    metrics show it) once the run has stayed in it :data:`STAGE_RECORD_AFTER_SECONDS`.

    What status is for, a run that sits in a stage (model load, engine), is recorded a
    quarter second late; the stages a run passes through in milliseconds (views chosen,
    decoded, parsed, SR/SEG built with a fast engine) are not written at all, each of
    which would be a committed transaction on the study's way to its results. A late
    write of a stage the run has left is skipped; one after the run has ended changes
    nothing (``set_stage`` only touches a running version this owner holds).
    """

    def __init__(self, ledger: StudyLedger, study_uid: str, version: int, owner: str) -> None:
        self.ledger = ledger
        self.key = (study_uid, version)
        self.owner = owner
        self._lock = threading.Lock()
        self._current = 0  # number of the latest stage reported
        self._timer: threading.Timer | None = None

    def __call__(self, stage: str) -> None:
        log.info("pre-read of study %s v%d: %s", *self.key, stage)
        with self._lock:
            self._current += 1
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(
                STAGE_RECORD_AFTER_SECONDS, self._record, (self._current, stage)
            )
            self._timer.daemon = True
            self._timer.start()

    def stop(self) -> None:
        """The run has ended: a stage not recorded yet never is."""
        with self._lock:
            self._current += 1
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _record(self, number: int, stage: str) -> None:
        with self._lock:
            if number != self._current:
                return  # the run has moved on
            try:
                self.ledger.set_stage(*self.key, stage, self.owner)
            except Exception as exc:  # only status loses it
                log.warning("stage of study %s v%d not recorded: %s", *self.key, exc)


def stage_reporter(ledger: StudyLedger, study_uid: str, version: int, owner: str) -> Progress:
    """Log each stage of a run and, once the run has stayed in it a quarter second, record
    it in the ledger (``status`` shows it): see :class:`_StageRecorder`."""
    return _StageRecorder(ledger, study_uid, version, owner)


@dataclass(frozen=True)
class PreparedViews:
    """A study's images decoded and made model-ready, with its pre-read request.

    ``image``/``transform``: the frontal image as displayed and its map to model space
    (anchors are drawn back through it); ``prior``: the previous version's anchors.
    """

    frontal: ViewChoice
    lateral: ViewChoice | None
    image: DisplayImage
    transform: SquareTransform
    request: EngineRequest
    prior: tuple[Anchor, ...] = ()

    def chest_check_request(self) -> EngineRequest:
        """The engine request asking whether the frontal image is a frontal chest radiograph."""
        system, prompt = build_chest_check_prompt()
        return replace(self.request, prompt=prompt, system=system)


def study_views(
    ledger: StudyLedger, spool_root: Path, study_uid: str, version: int
) -> tuple[ViewChoice, ViewChoice | None, tuple[Anchor, ...]]:
    """(frontal, lateral, prior anchors) of a study version; PrereadFailure without a frontal."""
    instances = ledger.instances_of(study_uid, up_to_version=version)
    frontal, lateral = choose_views([spool_root / i.path for i in instances])
    if frontal is None:
        raise PrereadFailure("no CR/DX image in the study to read")
    prior: tuple[Anchor, ...] = ()
    if version > 1:
        previous = ledger.get_study(study_uid, version - 1)
        if previous is not None and previous.result is not None:
            prior = tuple(previous.result.anchors)
    return frontal, lateral, prior


def prepare_views(
    frontal: ViewChoice,
    lateral: ViewChoice | None = None,
    *,
    prior: Sequence[Anchor] = (),
    study_uid: str = "",
) -> PreparedViews:
    """Decode + LUTs -> square model images -> the pre-read request (PrereadFailure when an
    image cannot be decoded). ``study_uid`` names the study (lets the engine keep the
    frontal image's prefix for follow-ups)."""
    try:
        image = load_display_image(frontal.source)
        model_image, transform = to_model_image(image)
        images = [model_image]
        if lateral is not None:
            lateral_image, _ = to_model_image(load_display_image(lateral.source))
            images.append(lateral_image)
    except ImagingError as exc:
        raise PrereadFailure(f"cannot decode the image: {exc}") from exc
    system, prompt = build_preread_prompt(has_lateral=lateral is not None)
    request = EngineRequest(
        images=tuple(images),
        prompt=prompt,
        system=system,
        metadata=prefix_metadata(study_uid) if study_uid else {},
    )
    return PreparedViews(frontal, lateral, image, transform, request, tuple(prior))


def generate_each(engine: Engine, requests: list[EngineRequest]) -> list[str | Exception]:
    """One engine batch; per request its text, or the error that fails only that request.

    A batch that fails is run again one request at a time, so that a request the engine
    cannot take (or out of memory at this batch size) fails alone. Errors come back as
    TransientPrereadError (worth retrying) or PrereadFailure ("engine error: ...").
    """
    if not requests:
        return []
    try:
        texts = engine.generate(requests)
        if len(texts) != len(requests):
            raise EngineError(f"the engine answered {len(texts)} of {len(requests)} requests")
        return list(texts)
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        if len(requests) > 1:
            log.warning(
                "engine batch of %d failed (%s): running its requests one at a time",
                len(requests),
                error_summary(exc),
            )
            return [answer for request in requests for answer in generate_each(engine, [request])]
        if isinstance(exc, TransientEngineError):
            return [TransientPrereadError(str(exc))]
        if isinstance(exc, EngineError):
            return [PrereadFailure(f"engine error: {exc}")]
        return [exc]


def interpret(
    engine: Engine, prepared: PreparedViews, text: str, engine_seconds: float
) -> PrereadResult:
    """The result of the engine's answer: tolerant parse -> anchors on the frontal image in
    source pixels, with sizes from its pixel spacing, and the provenance."""
    parsed = parse_preread(text)
    image, frontal, lateral = prepared.image, prepared.frontal, prepared.lateral
    anchors = build_anchors(
        parsed,
        prepared.transform,
        source_sop_instance_uid=frontal.sop_instance_uid,
        spacing_mm=image.pixel_spacing_mm,
        spacing_source=image.spacing_source,
        prior=prepared.prior,
    )
    info = engine.info
    notice = f"{DEMO_NOTICE}. {AI_NOTICE}" if info.is_demo else AI_NOTICE
    result = PrereadResult(
        notice=notice,
        is_demo=info.is_demo,
        engine=info.name,
        model_id=info.model_id,
        model_revision=info.revision,
        prompt_version=PROMPT_VERSION,
        node_version=node_version,
        frontal=ViewRef(frontal.sop_instance_uid, frontal.reason),
        lateral=ViewRef(lateral.sop_instance_uid, lateral.reason) if lateral else None,
        anchors=tuple(anchors),
        structured=parsed.structured,
        parse_warnings=tuple(parsed.warnings),
        findings_text=parsed.findings_text,
        impression=parsed.impression,
        model_text=text,
        pixel_spacing_mm=image.pixel_spacing_mm,
        spacing_source=image.spacing_source,
        engine_seconds=round(engine_seconds, 3),
    )
    if result.truncated:
        # a cut-off answer must not read as a normal study
        notice += ". The model's answer was cut off: findings may be incomplete"
        result = replace(result, notice=notice)
    return result


def _answer(answer: str | Exception) -> str:
    if isinstance(answer, Exception):
        raise answer
    return answer


def analyse_study(
    ledger: StudyLedger,
    spool_root: Path,
    engine: Engine,
    study_uid: str,
    version: int,
    *,
    ask_engine: bool = False,
    progress: Progress = _no_progress,
) -> PrereadResult:
    """Read one study version and return its result (anchors, narrative, provenance).

    Anchors that match those of the previous version keep their ids and tracking UIDs.
    With ``ask_engine`` (a study whose header names no body part) the engine is first
    asked whether the frontal image is a frontal chest radiograph; anything but yes
    raises :class:`NotAChestRadiograph`.
    """
    frontal, lateral, prior = study_views(ledger, spool_root, study_uid, version)
    progress("views chosen")
    prepared = prepare_views(frontal, lateral, prior=prior, study_uid=study_uid)
    progress("decoded")
    if ask_engine:
        (answer,) = generate_each(engine, [prepared.chest_check_request()])
        confirm_chest_answer(_answer(answer), frontal)
    progress("engine")
    started = time.monotonic()
    (answer,) = generate_each(engine, [prepared.request])
    return interpret(engine, prepared, _answer(answer), time.monotonic() - started)


def confirm_chest_radiograph(engine: Engine, image: ViewChoice, *, study_uid: str = "") -> None:
    """Ask the engine whether ``image`` is a frontal chest radiograph; return on yes.

    study_uid: the study the image belongs to (lets the engine keep its image prefix).

    Raises :class:`NotAChestRadiograph` on no or an unclear answer, PrereadFailure when
    the image cannot be decoded, TransientPrereadError on a transient engine error.
    """
    prepared = prepare_views(image, study_uid=study_uid)
    (answer,) = generate_each(engine, [prepared.chest_check_request()])
    confirm_chest_answer(_answer(answer), image)


def confirm_chest_answer(text: str, image: ViewChoice) -> None:
    """Return when the chest check's answer is yes; else raise NotAChestRadiograph."""
    answer = parse_chest_check(text)
    log.info(
        "chest check (%s) of SOP instance %s: %s",
        CHEST_CHECK_VERSION,
        image.sop_instance_uid,
        {True: "yes", False: "no", None: "unclear"}[answer],
    )
    if answer is False:
        raise NotAChestRadiograph("the engine said it is not a frontal chest radiograph")
    if answer is None:
        raise NotAChestRadiograph(
            "the engine did not answer yes or no to: is this a frontal chest radiograph?"
        )


def analyse_views(
    engine: Engine,
    frontal: ViewChoice,
    lateral: ViewChoice | None = None,
    *,
    prior: Sequence[Anchor] = (),
    progress: Progress = _no_progress,
    study_uid: str = "",
) -> PrereadResult:
    """The result of reading a frontal image (and a lateral as second image).

    decode + LUTs -> square model images -> engine -> tolerant parse -> anchors on the
    frontal image in source pixels, with sizes from its pixel spacing. ``study_uid`` names
    the study (lets the engine keep the frontal image's prefix for follow-ups).
    """
    prepared = prepare_views(frontal, lateral, prior=prior, study_uid=study_uid)
    progress("decoded")
    progress("engine")
    started = time.monotonic()
    (answer,) = generate_each(engine, [prepared.request])
    return interpret(engine, prepared, _answer(answer), time.monotonic() - started)


def run_preread(
    settings: Settings, study_uid: str, version: int, engine: Engine | None = None
) -> str:
    """Run the pre-read of a study version, with up to ``queue.max_batch - 1`` other queued
    studies as one engine batch, and record each outcome in the ledger.

    Returns this study version's final state ("done", "failed", "skipped": the engine said
    the image of a study without body part information is not a chest radiograph) or "noop"
    when there was nothing to do (finished, or running elsewhere: a batch took it).
    Raises TransientPrereadError (the study stays running, its lease released) for the task
    to retry; the batch's other studies with a transient error are released likewise and
    taken by a later batch (or re-sent by the reconciler).
    While it runs, :class:`RunHeartbeat` renews every lease of the batch; a study whose
    lease was lost meanwhile (the run stalled, the study was re-sent and taken by another)
    records nothing.
    """
    ledger = ledger_for(settings)
    owner = process_owner()
    try:
        started = ledger.start_run(study_uid, version, owner=owner)
    except LedgerError as exc:
        log.warning("pre-read of %s v%d not started: %s", study_uid, version, exc)
        return "noop"
    if started is None:
        log.info("study %s v%d finished or running elsewhere: nothing to do", study_uid, version)
        return "noop"
    leader = _Member(started, stage_reporter(ledger, study_uid, version, owner))
    members = [leader]
    with RunHeartbeat(ledger, [leader.key], owner) as heartbeat:
        loaded: Engine | Exception | None = engine
        if loaded is None:
            leader.progress("model load")
            try:
                loaded = engine_for(settings.engine)
            except Exception as exc:  # fails this study alone; the others stay queued
                loaded = exc
        if settings.queue.max_batch > 1 and not isinstance(loaded, Exception):
            try:
                others = ledger.claim_runs(settings.queue.max_batch - 1, owner, exclude=[study_uid])
            except Exception:  # the batch is an optimisation: this study runs alone
                log.exception("no other queued studies claimed for the batch of %s", study_uid)
                others = []
            members += [
                _Member(s, stage_reporter(ledger, s.study_uid, s.version, owner)) for s in others
            ]
            heartbeat.hold([m.key for m in members[1:]])
        size = f" (batch of {len(members)}, with {study_uid} v{version})"
        for member in members:
            log.info(
                "pre-read of study %s v%d started%s",
                *member.key,
                size if len(members) > 1 else "",
            )
        try:
            _run_batch(settings, ledger, members, owner, loaded, heartbeat)
        finally:
            for member in members:  # the run is over: no stage of it is recorded later
                if isinstance(member.progress, _StageRecorder):
                    member.progress.stop()
    if leader.outcome == "transient":
        assert isinstance(leader.error, TransientPrereadError)
        raise leader.error
    return leader.outcome


@dataclass
class _Member:
    """One study version of a run's batch, held by this run until its outcome is set."""

    study: StudySummary
    progress: Progress
    ask_engine: bool = False
    prepared: PreparedViews | None = None
    result: PrereadResult | None = None
    outcome: str = ""  # done | failed | skipped | noop | transient
    error: Exception | None = None

    @property
    def key(self) -> RunKey:
        return (self.study.study_uid, self.study.version)


def _run_batch(
    settings: Settings,
    ledger: StudyLedger,
    members: list[_Member],
    owner: str,
    engine: Engine | Exception,
    heartbeat: RunHeartbeat,
) -> None:
    """Every member of the batch gets an outcome; an error of one study fails only it.
    ``engine``: the loaded engine, or why it could not be loaded (every member fails).

    views, decode -> one engine batch of chest checks (studies without body part) -> one
    engine batch of pre-reads -> parse, anchors -> per study SR/SEG, anchors, finish, FHIR.
    """

    def settle(member: _Member, exc: Exception) -> None:
        if isinstance(exc, SoftTimeLimitExceeded):
            raise exc  # the task fails its own study; the others' leases run out
        member.error = exc
        try:
            member.outcome = _settle(settings, ledger, owner, member, exc, heartbeat)
        except Exception:  # no longer renewed: the reconciler re-sends it
            log.exception("pre-read of study %s v%d: outcome not recorded", *member.key)
            member.outcome = "noop"

    def pending() -> list[_Member]:
        return [m for m in members if not m.outcome]

    if isinstance(engine, Exception):
        for member in members:
            settle(member, engine)
        return
    spool_root = settings.storage.spool_path
    for member in pending():
        uid, version = member.key
        try:
            member.ask_engine = decide_study(
                ledger, spool_root, member.study, settings.preread
            ).ask_engine
            frontal, lateral, prior = study_views(ledger, spool_root, uid, version)
            member.progress("views chosen")
            member.prepared = prepare_views(frontal, lateral, prior=prior, study_uid=uid)
            member.progress("decoded")
        except Exception as exc:
            settle(member, exc)

    checks = [m for m in pending() if m.ask_engine and m.prepared is not None]
    answers = generate_each(
        engine, [m.prepared.chest_check_request() for m in checks if m.prepared]
    )
    for member, answer in zip(checks, answers, strict=True):
        try:
            assert member.prepared is not None
            confirm_chest_answer(_answer(answer), member.prepared.frontal)
        except Exception as exc:
            settle(member, exc)

    reads = [m for m in pending() if m.prepared is not None]
    for member in reads:
        member.progress("engine")
    started = time.monotonic()
    answers = generate_each(engine, [m.prepared.request for m in reads if m.prepared])
    engine_seconds = time.monotonic() - started  # what each study of the batch waited
    for member, answer in zip(reads, answers, strict=True):
        try:
            assert member.prepared is not None
            member.result = interpret(engine, member.prepared, _answer(answer), engine_seconds)
            member.progress("parsed")
        except Exception as exc:
            settle(member, exc)

    for member in pending():
        try:
            member.outcome = _publish(settings, ledger, owner, member, heartbeat)
        except Exception as exc:
            settle(member, exc)
    for member in members:  # results are out: the describe follow-ups' prefixes, now
        if member.outcome == "done" and member.prepared and member.result:
            _prefill_followups(engine, member.key[0], member.prepared.image, member.result)


def _prefill_followups(
    engine: Engine, study_uid: str, image: DisplayImage, result: PrereadResult
) -> None:
    """Hook for workers.dialogue.turn.prefill_followups; never fails the study (it is done)."""
    try:
        prefill_followups(engine, study_uid, image, result)
    except Exception:
        log.exception("study %s: follow-up prefixes not prefilled", study_uid)


def _settle(
    settings: Settings,
    ledger: StudyLedger,
    owner: str,
    member: _Member,
    exc: Exception,
    heartbeat: RunHeartbeat,
) -> str:
    """Record the outcome of a study whose run ended in ``exc``; returns the outcome."""
    study_uid, version = member.key
    heartbeat.finished(study_uid, version)
    if isinstance(exc, NotAChestRadiograph):
        ledger.set_state(study_uid, version, StudyState.SKIPPED, str(exc))
        log.info("study %s v%d kept, not pre-read: %s", study_uid, version, exc)
        record_fhir(ledger, study_uid, version, settings.fhir)  # the registered report ends
        return "skipped"
    if isinstance(exc, TransientPrereadError):
        # the retry may land in another worker process: it must find the version free
        ledger.release_run(study_uid, version, owner)
        log.warning("pre-read of study %s v%d: transient error, released: %s", *member.key, exc)
        return "transient"
    if isinstance(exc, PrereadFailure | EngineError):
        if not _finish(ledger, study_uid, version, owner, ok=False, reason=str(exc)):
            return "noop"
        log.error("pre-read of study %s v%d failed: %s", study_uid, version, exc)
        record_fhir(ledger, study_uid, version, settings.fhir)  # a cancelled report says so
        return "failed"
    reason = f"internal error: {exc!r}"[:500]
    if not _finish(ledger, study_uid, version, owner, ok=False, reason=reason):
        return "noop"
    log.error(
        "pre-read of study %s v%d failed unexpectedly",
        study_uid,
        version,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    # cancelled with the reason, not registered
    record_fhir(ledger, study_uid, version, settings.fhir)
    return "failed"


def _publish(
    settings: Settings,
    ledger: StudyLedger,
    owner: str,
    member: _Member,
    heartbeat: RunHeartbeat,
) -> str:
    """SR/SEG, anchors, done and FHIR of a study read successfully; returns the outcome."""
    study_uid, version = member.key
    result = member.result
    assert result is not None
    if heartbeat.is_lost(study_uid, version) or _superseded(ledger, study_uid, version, owner):
        heartbeat.finished(study_uid, version)
        return "noop"
    try:
        from workers.results import publish_results

        result = replace(
            result, outputs=publish_results(settings, ledger, study_uid, version, result)
        )
        member.progress("SR/SEG built")
    except Exception as exc:
        heartbeat.finished(study_uid, version)
        reason = f"cannot build SR/SEG: {exc}"[:500]
        if not _finish(ledger, study_uid, version, owner, ok=False, reason=reason):
            return "noop"
        log.exception("SR/SEG of study %s v%d could not be built", study_uid, version)
        record_fhir(ledger, study_uid, version, settings.fhir)
        return "failed"
    # anchors before done: readers see both
    ledger.save_anchors(study_uid, version, result.anchors)
    heartbeat.finished(study_uid, version)
    if not _finish(ledger, study_uid, version, owner, ok=True, reason="", result=result):
        return "noop"
    record_fhir(ledger, study_uid, version, settings.fhir)
    log.info(
        "pre-read of study %s v%d done: %d findings, %d anchors, %s engine %.1f s%s",
        study_uid,
        version,
        len(result.findings),
        len(result.anchors),
        result.engine,
        result.engine_seconds,
        "" if result.structured else " (text-only: the answer had no parsable JSON)",
    )
    return "done"


def _superseded(ledger: StudyLedger, study_uid: str, version: int, owner: str) -> bool:
    """True (and logged) when ``owner`` no longer holds the run: its results are not sent."""
    if ledger.holds_run(study_uid, version, owner):
        return False
    log.warning(
        "pre-read of study %s v%d: this run lost its lease (it stalled and the study was "
        "re-sent); its result is not recorded",
        study_uid,
        version,
    )
    return True


def _finish(
    ledger: StudyLedger,
    study_uid: str,
    version: int,
    owner: str,
    *,
    ok: bool,
    reason: str,
    result: PrereadResult | None = None,
) -> bool:
    """Record the run's outcome; False (logged) when ``owner`` lost the run meanwhile."""
    try:
        ledger.finish(study_uid, version, ok=ok, reason=reason, result=result, owner=owner)
    except LedgerError as lost:
        log.warning("pre-read of study %s v%d: %s", study_uid, version, lost)
        return False
    return True


def record_fhir(ledger: StudyLedger, study_uid: str, version: int, fhir: FhirSettings) -> None:
    """Write the study's FHIR resources (idempotent); a failure here never fails the study."""
    from node.fhir.projection import identifier_systems, record_preread

    try:
        record_preread(ledger, study_uid, version, systems=identifier_systems(fhir))
    except Exception:
        log.exception("FHIR resources of study %s v%d not written", study_uid, version)


def fail_study(settings: Settings, study_uid: str, version: int, reason: str) -> None:
    try:
        ledger_for(settings).finish(study_uid, version, ok=False, reason=reason)
    except LedgerError as exc:
        log.warning("could not mark %s v%d failed: %s", study_uid, version, exc)


def run_preread_by_uid(settings: Settings) -> Callable[[str, int], str]:
    """The in-process worker's entry point (``serve``): bound to the node's settings."""

    def handler(study_uid: str, version: int) -> str:
        for attempt in range(3):
            try:
                return run_preread(settings, study_uid, version)
            except TransientPrereadError as exc:
                log.warning("transient error (attempt %d): %s", attempt + 1, exc)
                time.sleep(2**attempt)
        fail_study(settings, study_uid, version, "engine kept failing (transient errors)")
        return "failed"

    return handler
