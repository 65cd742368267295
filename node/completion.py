"""Study completion, the pre-read decision, queueing, and the reconciler.

A study version is complete after a quiet period with no new instance (and, when
configured, when the sending association is released). A complete study is either
skipped (not a chest radiograph, reason recorded) or queued for a pre-read. The
reconciler re-sends work stuck in complete, queued or running beyond a timeout (a lost
broker message), running work whose run lease ran out (a dead worker stops renewing it)
and, in ``serve``, at start what the node's previous process left queued or running; it
gives up after ``queue.max_attempts``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from node.dispatch import Dispatcher, DispatchError, preread_task_id
from node.ledger import LedgerError, StudyLedger, StudyState, StudySummary, run_owner_gone
from node.rules import decide_study
from node.settings import Settings

log = logging.getLogger("medgemma.completion")


class StudyCoordinator:
    def __init__(self, settings: Settings, ledger: StudyLedger, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.ledger = ledger
        self.dispatcher = dispatcher
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- completion --------------------------------------------------------------------

    def complete_quiet_studies(self) -> list[StudySummary]:
        done = self.ledger.complete_quiet_studies(self.settings.completion.quiet_seconds)
        self._route(done)
        return done

    def complete_on_release(self, study_ids: set[int]) -> None:
        """SCP callback: an association that stored into these studies has ended."""
        if self.settings.completion.on_association_release:
            self._route(self.ledger.complete_studies(sorted(study_ids)))

    def _route(self, studies: Iterable[StudySummary]) -> None:
        for study in studies:
            decision = decide_study(
                self.ledger, self.settings.storage.spool_path, study, self.settings.preread
            )
            if not decision.preread:
                self.ledger.set_state(
                    study.study_uid, study.version, StudyState.SKIPPED, decision.reason
                )
                log.info(
                    "study %s v%d kept, not pre-read: %s",
                    study.study_uid,
                    study.version,
                    decision.reason,
                )
                continue
            log.info(
                "study %s v%d complete (%d instances): pre-read (%s)",
                study.study_uid,
                study.version,
                study.instance_count,
                decision.reason,
            )
            self.enqueue(study)

    def enqueue(self, study: StudySummary) -> None:
        """Mark queued first (so a fast worker finds it queued), then hand it to the broker."""
        task_id = preread_task_id(study.study_uid, study.version)
        self.ledger.mark_queued(study.study_uid, study.version, task_id)
        try:  # the RIS sees a registered DiagnosticReport while the pre-read waits
            from node.fhir.projection import identifier_systems, record_preread

            systems = identifier_systems(self.settings.fhir)
            record_preread(self.ledger, study.study_uid, study.version, systems=systems)
        except Exception:
            log.exception("FHIR resources of study %s not written", study.study_uid)
        try:
            self.dispatcher.send_preread(study.study_uid, study.version)
        except DispatchError as exc:
            # on the study too, not only in the log: status and the RIS operator see why
            reason = f"queued; broker unreachable: {exc.cause}, retrying"
            self.ledger.note_queued(study.study_uid, study.version, task_id, reason)
            log.error(
                "study %s v%d stays queued, the reconciler will re-send it: %s",
                study.study_uid,
                study.version,
                exc,
            )

    # --- reconciler --------------------------------------------------------------------

    def reconcile(
        self, older_than_seconds: float | None = None, *, skip: frozenset[int] = frozenset()
    ) -> list[StudySummary]:
        """Re-send stuck work; fail studies that used up their attempts. Returns re-sent ones.

        ``skip``: study version ids (StudySummary.id) handled already."""
        bound = (
            self.settings.queue.requeue_after_seconds
            if older_than_seconds is None
            else older_than_seconds
        )
        resent: list[StudySummary] = []
        for study in self.ledger.stuck_studies(bound):
            if study.id in skip:
                continue
            if self._resend(study):
                resent.append(study)
        return resent

    def recover_runs(self) -> list[StudySummary]:
        """At the start of ``serve``: re-send at once what the previous process left.

        Its in-process queue is gone, so queued versions are sent again (no new attempt:
        they never ran); a running version whose owner cannot be running any more (this
        host's previous process, :func:`node.ledger.run_owner_gone`) is released and
        re-queued as a new attempt, so a study that crashes the node every time is given
        up after ``queue.max_attempts``. Runs of other hosts keep their lease.
        """
        recovered: list[StudySummary] = []
        for study in self.ledger.studies_in_state(StudyState.QUEUED):
            try:
                self.dispatcher.send_preread(study.study_uid, study.version)
            except DispatchError as exc:
                log.error("study %s v%d not re-sent: %s", study.study_uid, study.version, exc)
                continue
            recovered.append(study)
        for study in self.ledger.studies_in_state(StudyState.RUNNING):
            if not run_owner_gone(study.run_owner):
                continue
            if study.run_owner is not None:
                self.ledger.release_run(study.study_uid, study.version, owner=study.run_owner)
            log.warning(
                "study %s v%d was running when the node stopped: re-sent now",
                study.study_uid,
                study.version,
            )
            if self._resend(study):
                recovered.append(study)
        return recovered

    def _resend(self, study: StudySummary) -> bool:
        """Route, re-queue or give up on one stuck version; True when it was sent again."""
        try:
            if study.state is StudyState.COMPLETE:
                self._route([study])  # lost between completion and queueing
                return True
            if study.attempts >= self.settings.queue.max_attempts:
                self.ledger.finish(
                    study.study_uid,
                    study.version,
                    ok=False,
                    reason=(
                        f"gave up after {study.attempts} attempts (stuck in {study.state.value})"
                    ),
                )
                log.error(
                    "study %s v%d failed: stuck in %s after %d attempts",
                    study.study_uid,
                    study.version,
                    study.state.value,
                    study.attempts,
                )
                return False
            log.warning(
                "study %s v%d stuck in %s: re-queueing (attempt %d)",
                study.study_uid,
                study.version,
                study.state.value,
                study.attempts + 1,
            )
            self.enqueue(study)
            return True
        except LedgerError as exc:  # changed under us (a worker finished it meanwhile)
            log.info("reconciler skipped study %s: %s", study.study_uid, exc)
            return False

    # --- background loop ---------------------------------------------------------------

    def start(self, *, recover_runs: bool = False) -> None:
        """Reconcile now (work lost while the node was down), then in the background.

        ``recover_runs`` (``serve``): first re-send what this node's previous process left
        queued or running (:meth:`recover_runs`)."""
        recovered = self.recover_runs() if recover_runs else []
        self.reconcile(skip=frozenset(s.id for s in recovered))
        self._thread = threading.Thread(target=self._loop, name="medgemma-completion", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        poll = self.settings.completion.poll_seconds
        next_reconcile = time.monotonic() + self.settings.queue.reconcile_interval_seconds
        while not self._stop.wait(poll):
            try:
                self.complete_quiet_studies()
                if time.monotonic() >= next_reconcile:
                    self.reconcile()
                    next_reconcile = (
                        time.monotonic() + self.settings.queue.reconcile_interval_seconds
                    )
            except Exception:
                log.exception("completion loop iteration failed; continuing")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
