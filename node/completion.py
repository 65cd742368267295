"""Study completion, the pre-read decision, queueing, and the reconciler.

A study version is complete when the association that sent it has ended and nothing new
arrived for ``completion.release_grace_seconds`` after it (``on_association_release``, the
common path; sooner, from ``completion.release_host_idle_seconds`` after the release on,
once the sender's host has no connection open to the node: it is not sending a next
association), or after a quiet period with no new instance (``quiet_seconds``: an
association that stays open, a caller in ``quiet_only_callers``, a node stopped before the
grace time ended). The completion thread sleeps until the next of these is due (at most
``poll_seconds``) and is woken by a release, so neither waits on a fixed poll. A complete
study is either skipped (not a chest radiograph, reason recorded) or queued for a pre-read. The
reconciler re-sends work stuck in complete, queued or running beyond a timeout (a lost
broker message), running work whose run lease ran out (a dead worker stops renewing it)
and, in ``serve``, at start what the node's previous process left queued or running; it
gives up after ``queue.max_attempts``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from node.db import utcnow
from node.dispatch import Dispatcher, DispatchError, preread_task_id
from node.ledger import LedgerError, StudyLedger, StudyState, StudySummary, run_owner_gone
from node.rules import decide_study
from node.settings import Settings

log = logging.getLogger("medgemma.completion")

#: While a released study waits for its sender's host to close its connections: how often
#: the completion thread looks (at most until the grace time ends).
_HOST_POLL_SECONDS = 0.02


@dataclass(frozen=True)
class _Released:
    """A study version whose association ended, waiting for its grace time."""

    due: float  # time.monotonic() when the grace time ends
    released: datetime  # when, UTC: an instance after it keeps the version open
    host: str | None  # the sender's address
    host_idle_from: float  # time.monotonic() from when its host having no connection will do


class StudyCoordinator:
    def __init__(self, settings: Settings, ledger: StudyLedger, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.ledger = ledger
        self.dispatcher = dispatcher
        self._stop = threading.Event()
        self._wake = threading.Event()  # a release to complete: look now, not at the next poll
        self._thread: threading.Thread | None = None
        self._released: dict[int, _Released] = {}  # by study version id
        self._released_lock = threading.Lock()
        #: connections the node has open from a host (the SCP's, or the receiving
        #: processes' parent's, count); None: a release always waits its grace time
        self.host_connections: Callable[[str], int] | None = None

    # --- completion --------------------------------------------------------------------

    def complete_quiet_studies(self) -> list[StudySummary]:
        done = self.ledger.complete_quiet_studies(self.settings.completion.quiet_seconds)
        self._route(done)
        return done

    def complete_on_release(self, study_ids: set[int], host: str | None = None) -> None:
        """SCP callback: an association from ``host`` that stored into these studies has
        ended.

        With ``release_grace_seconds`` 0 they complete here and now; otherwise the
        completion thread completes them once the grace time has passed, or sooner, from
        ``release_host_idle_seconds`` after the release on, as soon as ``host`` has no
        connection open to the node (it is not sending the next association), unless an
        instance arrived meanwhile (another association of the same sender, whose own end
        counts). Versions with an instance from a caller in ``quiet_only_callers`` are left
        to the quiet period.
        """
        completion = self.settings.completion
        if not completion.on_association_release:
            return
        released = utcnow()
        if completion.release_grace_seconds <= 0:
            self._route(
                self.ledger.complete_studies(
                    sorted(study_ids),
                    quiet_since=released,
                    except_callers=completion.quiet_only_callers,
                )
            )
            return
        now = time.monotonic()
        pending = _Released(
            due=now + completion.release_grace_seconds,
            released=released,
            host=host,
            host_idle_from=now + completion.release_host_idle_seconds,
        )
        with self._released_lock:
            for study_id in study_ids:
                self._released[study_id] = pending
        self._wake.set()

    def _host_idle(self, host: str | None) -> bool:
        """Whether ``host`` has no connection open to the node (False when unknown)."""
        if host is None or self.host_connections is None:
            return False
        return self.host_connections(host) == 0

    def complete_released_studies(self) -> list[StudySummary]:
        """Complete the released study versions whose grace time has passed, and those
        whose sender's host has closed its connections (:meth:`complete_on_release`)."""
        now = time.monotonic()
        by_release: dict[datetime, list[int]] = {}
        idle: dict[str | None, bool] = {}
        with self._released_lock:
            for study_id, pending in list(self._released.items()):
                if pending.due > now:
                    if pending.host_idle_from > now:
                        continue
                    if pending.host not in idle:
                        idle[pending.host] = self._host_idle(pending.host)
                    if not idle[pending.host]:
                        continue
                del self._released[study_id]
                by_release.setdefault(pending.released, []).append(study_id)
        done: list[StudySummary] = []
        for released, ids in by_release.items():
            done += self.ledger.complete_studies(
                sorted(ids),
                quiet_since=released,
                except_callers=self.settings.completion.quiet_only_callers,
            )
        self._route(done)
        return done

    def _next_wait(self) -> float:
        """Seconds until the next completion may be due: a grace time or a quiet period
        ending, at most ``poll_seconds`` (at least 10 ms, so a clock step cannot spin)."""
        completion = self.settings.completion
        wait = completion.poll_seconds
        now = time.monotonic()
        with self._released_lock:
            for pending in self._released.values():
                due = pending.due
                if pending.host is not None and self.host_connections is not None:
                    # its host's connections are looked at from host_idle_from on
                    due = min(due, max(pending.host_idle_from, now + _HOST_POLL_SECONDS))
                wait = min(wait, due - now)
        last = self.ledger.last_open_instance_at()
        if last is not None:
            quiet_ends = (last - utcnow()).total_seconds() + completion.quiet_seconds
            wait = min(wait, quiet_ends)
        return max(0.01, wait)

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
        next_reconcile = time.monotonic() + self.settings.queue.reconcile_interval_seconds
        wait = self.settings.completion.poll_seconds
        while True:
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.complete_released_studies()
                self.complete_quiet_studies()
                if time.monotonic() >= next_reconcile:
                    self.reconcile()
                    next_reconcile = (
                        time.monotonic() + self.settings.queue.reconcile_interval_seconds
                    )
                wait = self._next_wait()
            except Exception:
                log.exception("completion loop iteration failed; continuing")
                wait = self.settings.completion.poll_seconds

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
