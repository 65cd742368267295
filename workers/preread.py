"""The pre-read of one study version, as plain functions (tested without a broker).

choose the views -> decode + LUTs -> pad to square -> engine -> tolerant parse -> anchors
(geometry in source pixels, sizes from pixel spacing) -> ledger (result + anchor versions).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from node import __version__ as node_version
from node.db import process_owner
from node.ledger import LedgerError, StudyLedger, StudyState, StudySummary
from node.rules import decide_study
from node.settings import EngineSettings, FhirSettings, Settings
from sr_templates.model import Anchor, PrereadResult, ViewRef
from workers.anchors import build_anchors
from workers.engines.base import (
    Engine,
    EngineError,
    EngineRequest,
    TransientEngineError,
    prefix_metadata,
)
from workers.imaging import (
    ImagingError,
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
    """Renews a run's lease every quarter of ``run_lease_seconds`` while the run works, in
    a thread of the running process: when the process dies (a killed worker, a crashed
    node) the renewals stop and the reconciler re-sends the study once the lease runs out.

    ``lost`` is set when a renewal finds the version no longer held by this owner (the
    process stalled past its lease and the study was re-sent): the run's outcome is then
    not recorded.
    """

    def __init__(self, ledger: StudyLedger, study_uid: str, version: int, owner: str) -> None:
        self.ledger = ledger
        self.study_uid = study_uid
        self.version = version
        self.owner = owner
        self.interval = ledger.run_lease_seconds / 4
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"medgemma-lease-{study_uid[-12:]}", daemon=True
        )

    def __enter__(self) -> RunHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                renewed = self.ledger.renew_run(self.study_uid, self.version, self.owner)
            except Exception as exc:  # the database is away: the next beat tries again
                log.warning(
                    "lease of study %s v%d not renewed: %s", self.study_uid, self.version, exc
                )
                continue
            if not renewed:
                log.warning(
                    "study %s v%d: this run no longer holds it (lease lost or run time "
                    "limit reached); its outcome will not be recorded",
                    self.study_uid,
                    self.version,
                )
                self.lost.set()
                return


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


def stage_reporter(ledger: StudyLedger, study_uid: str, version: int, owner: str) -> Progress:
    """Log each stage of a run and record it in the ledger (``status`` shows it)."""

    def report(stage: str) -> None:
        log.info("pre-read of study %s v%d: %s", study_uid, version, stage)
        ledger.set_stage(study_uid, version, stage, owner)

    return report


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
    instances = ledger.instances_of(study_uid, up_to_version=version)
    frontal, lateral = choose_views([spool_root / i.path for i in instances])
    if frontal is None:
        raise PrereadFailure("no CR/DX image in the study to read")
    progress("views chosen")
    if ask_engine:
        confirm_chest_radiograph(engine, frontal, study_uid=study_uid)
    prior: Sequence[Anchor] = ()
    if version > 1:
        previous = ledger.get_study(study_uid, version - 1)
        if previous is not None and previous.result is not None:
            prior = previous.result.anchors
    return analyse_views(
        engine, frontal, lateral, prior=prior, progress=progress, study_uid=study_uid
    )


def confirm_chest_radiograph(engine: Engine, image: ViewChoice, *, study_uid: str = "") -> None:
    """Ask the engine whether ``image`` is a frontal chest radiograph; return on yes.

    study_uid: the study the image belongs to (lets the engine keep its image prefix).

    Raises :class:`NotAChestRadiograph` on no or an unclear answer, PrereadFailure when
    the image cannot be decoded, TransientPrereadError on a transient engine error.
    """
    try:
        model_image, _ = to_model_image(load_display_image(image.source))
    except ImagingError as exc:
        raise PrereadFailure(f"cannot decode the image: {exc}") from exc
    system, prompt = build_chest_check_prompt()
    try:
        (text,) = engine.generate(
            [
                EngineRequest(
                    images=(model_image,),
                    prompt=prompt,
                    system=system,
                    metadata=prefix_metadata(study_uid) if study_uid else {},
                )
            ]
        )
    except TransientEngineError as exc:
        raise TransientPrereadError(str(exc)) from exc
    except EngineError as exc:
        raise PrereadFailure(f"engine error: {exc}") from exc
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
    try:
        image = load_display_image(frontal.source)
        model_image, transform = to_model_image(image)
        images = [model_image]
        if lateral is not None:
            lateral_image, _ = to_model_image(load_display_image(lateral.source))
            images.append(lateral_image)
    except ImagingError as exc:
        raise PrereadFailure(f"cannot decode the image: {exc}") from exc
    progress("decoded")

    system, prompt = build_preread_prompt(has_lateral=lateral is not None)
    progress("engine")
    started = time.monotonic()
    try:
        (text,) = engine.generate(
            [
                EngineRequest(
                    images=tuple(images),
                    prompt=prompt,
                    system=system,
                    metadata=prefix_metadata(study_uid) if study_uid else {},
                )
            ]
        )
    except TransientEngineError as exc:
        raise TransientPrereadError(str(exc)) from exc
    except EngineError as exc:
        raise PrereadFailure(f"engine error: {exc}") from exc
    engine_seconds = time.monotonic() - started
    parsed = parse_preread(text)
    progress("parsed")
    anchors = build_anchors(
        parsed,
        transform,
        source_sop_instance_uid=frontal.sop_instance_uid,
        spacing_mm=image.pixel_spacing_mm,
        spacing_source=image.spacing_source,
        prior=prior,
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


def run_preread(
    settings: Settings, study_uid: str, version: int, engine: Engine | None = None
) -> str:
    """Run the pre-read of a study version and record the outcome in the ledger.

    Returns the final state ("done", "failed", "skipped": the engine said the image of a
    study without body part information is not a chest radiograph) or "noop" when there
    was nothing to do.
    Raises TransientPrereadError (the study stays running) for the task to retry.
    While it runs, :class:`RunHeartbeat` renews its lease; a run that lost its lease
    meanwhile (it stalled, the study was re-sent and taken by another) records nothing
    and returns "noop".
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
    log.info("pre-read of study %s v%d started", study_uid, version)
    with RunHeartbeat(ledger, study_uid, version, owner):
        return _run_started(settings, ledger, started, owner, engine)


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


def _run_started(
    settings: Settings,
    ledger: StudyLedger,
    started: StudySummary,
    owner: str,
    engine: Engine | None,
) -> str:
    """The body of :func:`run_preread` once ``owner`` holds the run of ``started``."""
    study_uid, version = started.study_uid, started.version
    progress = stage_reporter(ledger, study_uid, version, owner)
    try:
        if engine is None:
            progress("model load")
            engine = engine_for(settings.engine)
        spool_root = settings.storage.spool_path
        ask_engine = decide_study(ledger, spool_root, started, settings.preread).ask_engine
        result = analyse_study(
            ledger,
            spool_root,
            engine,
            study_uid,
            version,
            ask_engine=ask_engine,
            progress=progress,
        )
    except NotAChestRadiograph as exc:
        ledger.set_state(study_uid, version, StudyState.SKIPPED, str(exc))
        log.info("study %s v%d kept, not pre-read: %s", study_uid, version, exc)
        record_fhir(ledger, study_uid, version, settings.fhir)  # the registered report ends
        return "skipped"
    except TransientPrereadError:
        # the retry may land in another worker process: it must find the version free
        ledger.release_run(study_uid, version, owner)
        raise
    except (PrereadFailure, EngineError) as exc:
        if not _finish(ledger, study_uid, version, owner, ok=False, reason=str(exc)):
            return "noop"
        log.error("pre-read of study %s v%d failed: %s", study_uid, version, exc)
        record_fhir(ledger, study_uid, version, settings.fhir)  # a cancelled report says so
        return "failed"
    except Exception as exc:
        reason = f"internal error: {exc!r}"[:500]
        if not _finish(ledger, study_uid, version, owner, ok=False, reason=reason):
            return "noop"
        log.exception("pre-read of study %s v%d failed unexpectedly", study_uid, version)
        # cancelled with the reason, not registered
        record_fhir(ledger, study_uid, version, settings.fhir)
        return "failed"
    if _superseded(ledger, study_uid, version, owner):
        return "noop"
    try:
        from workers.results import publish_results

        result = replace(
            result, outputs=publish_results(settings, ledger, study_uid, version, result)
        )
        progress("SR/SEG built")
    except Exception as exc:
        reason = f"cannot build SR/SEG: {exc}"[:500]
        if not _finish(ledger, study_uid, version, owner, ok=False, reason=reason):
            return "noop"
        log.exception("SR/SEG of study %s v%d could not be built", study_uid, version)
        record_fhir(ledger, study_uid, version, settings.fhir)
        return "failed"
    # anchors before done: readers see both
    ledger.save_anchors(study_uid, version, result.anchors)
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
