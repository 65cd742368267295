"""The follow-up job queue: the durable state of every follow-up question.

A question Communication is stored together with its ``queued`` job (one transaction:
:func:`create_followups`, group-committed by :class:`QuestionWriter` in the API), handed by
name to the work queue by :class:`FollowupPublisher` (which retries through a broker
outage and re-sends questions never handed over), moved to ``running`` by the worker
(:func:`start_followup`, which makes a redelivered task idempotent) and finished with its
answer (:func:`finish_followup`: answer, amended resources, question status and job state
in one transaction).

    queued -> running -> answered | failed

Routing (``queue.followup_affinity``): the publisher sends a question to the worker that
holds its study's image prefix (:mod:`node.affinity`) when that worker is alive and idle,
else to the shared follow-up queue. The choice is recorded on the job before the message
is sent (``route``) and travels in the message; a job whose worker has not started it
within ``queue.followup_affinity_wait_seconds``, or whose worker is gone (queued or
running), is re-routed to the shared queue once (:func:`reroute_followups`), and a worker
that later takes the first message finds the route changed and does nothing
(:func:`start_followup` is a conditional update): answered once, never lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, cast

from sqlalchemy import Table, bindparam, func, insert, select, update

from node.affinity import WorkerRegistry
from node.db import utcnow
from node.delivery import backoff_seconds
from node.dispatch import Dispatcher, DispatchError
from node.fhir import codes
from node.fhir.models import FollowupRow, FollowupState
from node.fhir.search import normalise_reference
from node.fhir.store import FhirStore, StoredResource

log = logging.getLogger("medgemma.fhir.followups")


@dataclass(frozen=True)
class FollowupJob:
    """The durable state of one follow-up question (its id is the question's id)."""

    id: str
    report_id: str
    study_uid: str
    state: FollowupState
    language: str
    anchor_ref: str
    answer_id: str
    error: str
    attempts: int
    route: str | None = None  # None: not yet sent; "": the shared queue; else a worker

    @classmethod
    def of(cls, row: FollowupRow) -> FollowupJob:
        return cls(
            row.id,
            row.report_id,
            row.study_uid,
            FollowupState(row.state),
            row.language,
            row.anchor_ref,
            row.answer_id,
            row.error,
            row.attempts,
            row.route,
        )

    @property
    def finished(self) -> bool:
        return self.state in (FollowupState.ANSWERED, FollowupState.FAILED)


@dataclass(frozen=True)
class NewQuestion:
    """A question Communication to store with its follow-up job."""

    question: Mapping[str, Any]
    report_id: str
    study_uid: str
    language: str
    anchor_ref: str


def study_uid_of(store: FhirStore, report: StoredResource) -> str:
    """The Study Instance UID of a report's ImagingStudy ("" if it has none): what a
    follow-up is routed by (to the worker holding the study's image work) and answered on."""
    for ref in report.resource.get("imagingStudy", []):
        kind, _, rid = normalise_reference(str(ref.get("reference", ""))).partition("/")
        study = store.get(kind, rid) if kind == "ImagingStudy" else None
        for ident in study.resource.get("identifier", []) if study else []:
            value = str(ident.get("value", ""))
            if value.startswith("urn:oid:") and ident.get("system") == codes.DICOM_UID:
                return value[len("urn:oid:") :]
    return ""


def create_followup(
    store: FhirStore,
    question: Mapping[str, Any],
    *,
    report_id: str,
    study_uid: str,
    language: str,
    anchor_ref: str,
) -> FollowupJob:
    """Store the question Communication and its queued follow-up job, together."""
    (job,) = create_followups(
        store, [NewQuestion(question, report_id, study_uid, language, anchor_ref)]
    )
    return job


_INSERT_JOB: Final = insert(cast(Table, FollowupRow.__table__))


def create_followups(store: FhirStore, items: Sequence[NewQuestion]) -> list[FollowupJob]:
    """Store several new questions and their jobs in one transaction (one commit)."""
    jobs = []
    now = utcnow()
    with store.writing() as w:
        for item in items:
            job = FollowupJob(
                id=str(item.question["id"]),
                report_id=item.report_id,
                study_uid=item.study_uid,
                state=FollowupState.QUEUED,
                language=item.language[:16],
                anchor_ref=item.anchor_ref[:160],
                answer_id="",
                error="",
                attempts=0,
            )
            w.put(item.question, new=True)
            w.session.connection().execute(
                _INSERT_JOB,
                {
                    "id": job.id,
                    "report_id": job.report_id,
                    "study_uid": job.study_uid,
                    "state": job.state.value,
                    "language": job.language,
                    "anchor_ref": job.anchor_ref,
                    "answer_id": "",
                    "error": "",
                    "attempts": 0,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            jobs.append(job)
    return jobs


def mark_sent(store: FhirStore, job_ids: Sequence[str]) -> None:
    """Record that these questions were handed to the work queue."""
    if not job_ids:
        return
    # as the process's single writer: the question and audit writers wait on its lock
    # instead of meeting SQLite's busy timeout (sleeps of up to 100 ms)
    with store.writing() as w:
        w.session.connection().execute(  # Core: no ORM session synchronisation
            update(_JOBS)
            .where(_JOBS.c.id.in_(list(job_ids)), _JOBS.c.sent_at.is_(None))
            .values(sent_at=utcnow())
        )


def unsent_followups(store: FhirStore, older_than_seconds: float, limit: int = 500) -> list[str]:
    """Queued questions never handed to the work queue (a broker outage, a restart)."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    with store.db.transaction() as s:
        rows = s.execute(
            select(FollowupRow.id)
            .where(
                FollowupRow.state == FollowupState.QUEUED.value,
                FollowupRow.sent_at.is_(None),
                FollowupRow.created_at <= cutoff,
            )
            .order_by(FollowupRow.created_at)
            .limit(limit)
        ).scalars()
        return list(rows)


#: One job's columns in FollowupJob's field order (built once; no ORM object per read).
_FOLLOWUP: Final = select(
    FollowupRow.id, FollowupRow.report_id, FollowupRow.study_uid, FollowupRow.state,
    FollowupRow.language, FollowupRow.anchor_ref, FollowupRow.answer_id, FollowupRow.error,
    FollowupRow.attempts, FollowupRow.route,
).where(FollowupRow.id == bindparam("job_id"))  # fmt: skip


def followup(store: FhirStore, job_id: str) -> FollowupJob | None:
    rows = store.rows(_FOLLOWUP, {"job_id": job_id})
    if not rows:
        return None
    job_id, report_id, study_uid, state, *rest = rows[0]
    return FollowupJob(job_id, report_id, study_uid, FollowupState(state), *rest)


def start_followup(store: FhirStore, job_id: str, route: str = "") -> FollowupJob | None:
    """Move a job to running (a redelivered one too); None when it is finished or unknown,
    or when ``route`` (where the message was sent: "" the shared queue, else a worker) is
    not the job's route: a stale message of a job re-routed since.

    This is what makes a redelivered follow-up task idempotent. One conditional UPDATE, so
    that it and :func:`reroute_followups` cannot both succeed on the same job.
    """
    with store.db.transaction() as s:
        result: Any = s.execute(
            update(FollowupRow)
            .where(
                FollowupRow.id == job_id,
                FollowupRow.state.not_in(_FINISHED),
                func.coalesce(FollowupRow.route, "") == route,
            )
            .values(
                state=FollowupState.RUNNING.value,
                attempts=FollowupRow.attempts + 1,
                updated_at=utcnow(),
            )
        )
        started = int(result.rowcount)
        if not started:
            return None
        row = s.get(FollowupRow, job_id)
        return FollowupJob.of(row) if row else None


_FINISHED: Final = (FollowupState.ANSWERED.value, FollowupState.FAILED.value)


def assign_route(store: FhirStore, job_id: str, wanted: str) -> str:
    """Where to send a job: ``wanted`` ("" = the shared queue, else a worker) when its
    route is not decided yet and it is queued, else the route it already has."""
    return assign_routes(store, {job_id: wanted}).get(job_id, "")


def assign_routes(store: FhirStore, wanted: Mapping[str, str]) -> dict[str, str]:
    """:func:`assign_route` of several jobs (job id: wanted route) in one transaction (one
    commit), as the store's single writer (no SQLite busy waits against the question and
    audit writers)."""
    if not wanted:
        return {}
    with store.writing() as w:
        conn = w.session.connection()  # Core statements: no ORM session synchronisation
        conn.execute(_ASSIGN_ROUTE, [{"job": j, "new_route": r} for j, r in wanted.items()])
        rows = conn.execute(
            select(_JOBS.c.id, _JOBS.c.route).where(_JOBS.c.id.in_(list(wanted)))
        ).all()
    return {job_id: route or "" for job_id, route in rows}


_JOBS: Final = cast(Table, FollowupRow.__table__)
#: A job's route, set when it is not decided yet and the job is queued.
_ASSIGN_ROUTE: Final = (
    update(_JOBS)
    .where(
        _JOBS.c.id == bindparam("job"),
        _JOBS.c.route.is_(None),
        _JOBS.c.state == FollowupState.QUEUED.value,
    )
    .values(route=bindparam("new_route"))
)


def reroute_followups(
    store: FhirStore, wait_seconds: float, gone: Callable[[str], bool], limit: int = 100
) -> list[str]:
    """Move to the shared queue the jobs sent to a worker that did not start them within
    ``wait_seconds`` or is ``gone`` (queued, or running when it went: queued again); they
    become unsent (the caller publishes them; else the unsent sweep finds them). Each move
    is conditional on the job being unchanged."""
    cutoff = utcnow() - timedelta(seconds=wait_seconds)
    with store.db.transaction() as s:
        rows = s.execute(
            select(FollowupRow.id, FollowupRow.state, FollowupRow.route, FollowupRow.sent_at)
            .where(
                FollowupRow.state.in_([FollowupState.QUEUED.value, FollowupState.RUNNING.value]),
                FollowupRow.route.is_not(None),
                FollowupRow.route != "",
            )
            .limit(limit)
        ).all()
    moved: list[str] = []
    for job_id, state, route, sent_at in rows:
        route = str(route)
        late = state == FollowupState.QUEUED.value and sent_at is not None and sent_at <= cutoff
        if not late and not gone(route):
            continue
        with store.db.transaction() as s:
            result: Any = s.execute(
                update(FollowupRow)
                .where(
                    FollowupRow.id == job_id,
                    FollowupRow.state == state,
                    FollowupRow.route == route,
                )
                .values(
                    route="", sent_at=None, state=FollowupState.QUEUED.value, updated_at=utcnow()
                )
            )
            changed = int(result.rowcount)
        if changed:
            log.info(
                "follow-up %s re-sent to the shared queue: worker %s %s",
                job_id,
                route,
                "did not start it in time" if late else "is gone",
            )
            moved.append(job_id)
    return moved


def finish_followup(
    store: FhirStore,
    job_id: str,
    *,
    answer: Mapping[str, Any],
    amended: Sequence[Mapping[str, Any]] = (),
    failed_reason: str = "",
) -> FollowupJob:
    """Store the answer (and amended resources), mark the question completed, and the
    job answered (or failed with ``failed_reason``), in one transaction."""
    with store.writing() as w:
        row = w.session.get(FollowupRow, job_id)
        if row is None:
            raise KeyError(f"no follow-up {job_id}")
        for resource in amended:
            w.put(resource)
        w.put(answer)
        question = w.get("Communication", job_id)
        if question is not None:
            q = dict(question.resource)
            q["status"] = "completed" if not failed_reason else "not-done"
            if failed_reason:
                q["statusReason"] = {"text": failed_reason[:500]}
            w.put(q)
        now = utcnow()
        row.state = (FollowupState.FAILED if failed_reason else FollowupState.ANSWERED).value
        row.answer_id = str(answer["id"])
        row.error = failed_reason[:1000]
        row.updated_at = now
        row.finished_at = now
        return FollowupJob.of(row)


def followup_counts(store: FhirStore) -> dict[str, int]:
    """Follow-up jobs by state."""
    with store.db.transaction() as s:
        rows = s.execute(select(FollowupRow.state, func.count()).group_by(FollowupRow.state)).all()
    return {str(state): int(n) for state, n in rows}


class QuestionWriter:
    """Group commit of new questions: one transaction (one fsync) for every question that
    arrived while the previous batch was being written, so concurrent questions do not
    queue one by one on the database's single writer."""

    def __init__(self, store: FhirStore, max_batch: int = 64) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.Queue[tuple[NewQuestion, Future[FollowupJob]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="fhir-questions", daemon=True)
        self._thread.start()

    def submit(self, item: NewQuestion) -> Future[FollowupJob]:
        future: Future[FollowupJob] = Future()
        self._queue.put((item, future))
        return future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            self._write(batch)

    def _write(self, batch: list[tuple[NewQuestion, Future[FollowupJob]]]) -> None:
        try:
            jobs = create_followups(self.store, [item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            for one in batch:  # one bad question must not fail the others
                self._write([one])
            return
        for (_, future), job in zip(batch, jobs, strict=True):
            future.set_result(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


@dataclass(frozen=True)
class FollowupRouting:
    """How the publisher routes questions to the worker holding their study (see the
    module docstring): the registry, the follow-up queue a holder must consume, and how
    long a worker has to start a question before it goes to the shared queue."""

    registry: WorkerRegistry
    queue: str
    wait_seconds: float

    @property
    def check_seconds(self) -> float:
        return min(2.0, self.wait_seconds / 2)

    def holder(self, study_uid: str) -> str:
        try:
            return self.registry.holder(study_uid, self.queue)
        except Exception:  # no routing is better than no sending
            log.exception("could not look up the worker holding a study")
            return ""

    def gone(self, worker: str) -> bool:
        return not self.registry.alive(worker)


class FollowupPublisher:
    """Hands stored questions to the work queue from a background thread.

    A question is accepted (202) once it is committed; sending it by name to the queue
    happens here, so a broker outage delays answers instead of refusing questions: a
    failed send is retried with backoff (1 s doubling to 30 s), and questions never sent
    (an outage, a restart) are found in the store and sent again. Questions are sent in
    batches: those accepted within ``gather_seconds`` of the first go together.
    """

    SWEEP_SECONDS: Final = 30.0

    def __init__(
        self,
        store: FhirStore,
        dispatcher: Dispatcher,
        *,
        retry_base: float = 1.0,
        unsent_after: float = 10.0,
        routing: FollowupRouting | None = None,
        gather_seconds: float = 0.05,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.gather_seconds = gather_seconds
        self.retry_base = retry_base
        self.unsent_after = unsent_after  # seconds: younger ones are still being published
        self.routing = routing
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fhir-followups", daemon=True)
        self._thread.start()

    def publish(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._pending:
                return
            self._pending.add(job_id)
        self._queue.put(job_id)

    def _run(self) -> None:
        failures = 0
        next_sweep = next_reroute = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.SWEEP_SECONDS
                self._sweep()
            if self.routing is not None and time.monotonic() >= next_reroute:
                next_reroute = time.monotonic() + self.routing.check_seconds
                self._reroute(self.routing)
            try:
                first = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if first is None:
                return
            # let the questions of the next moments join this batch: one route commit and
            # one sent-mark commit per batch, not two per question (and no wake-up each)
            self._stop.wait(self.gather_seconds)
            batch = [first]
            while len(batch) < 100:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._stop.set()
                    break
                batch.append(nxt)
            sent, unsent = self._send(batch)
            if sent:
                try:
                    mark_sent(self.store, sent)
                except Exception:
                    log.exception("could not record %d sent follow-ups", len(sent))
            with self._lock:
                self._pending.difference_update(sent)
            if unsent:
                failures += 1
                delay = backoff_seconds(failures, self.retry_base, 30.0)
                for job_id in unsent:
                    self._queue.put(job_id)
                self._stop.wait(delay)
            else:
                failures = 0

    def _send(self, batch: list[str]) -> tuple[list[str], list[str]]:
        sent: list[str] = []
        routes = self._routes(batch)
        for i, job_id in enumerate(batch):
            try:
                route = routes.get(job_id, "")
                if route:
                    self.dispatcher.send_followup(job_id, route)
                else:
                    self.dispatcher.send_followup(job_id)
            except DispatchError as exc:
                log.warning(
                    "%d follow-up question(s) wait for the queue (%s); retrying",
                    len(batch) - i,
                    exc,
                )
                return sent, batch[i:]
            sent.append(job_id)
            log.info("follow-up %s queued%s", job_id, f" for worker {route}" if route else "")
        return sent, []

    def _routes(self, batch: Sequence[str]) -> dict[str, str]:
        """The jobs' routes, decided (and recorded, in one commit) before their first send."""
        if self.routing is None:
            return {}
        routes: dict[str, str] = {}
        wanted: dict[str, str] = {}
        for job in filter(None, (followup(self.store, job_id) for job_id in batch)):
            if job.route is not None:
                routes[job.id] = job.route
            else:
                wanted[job.id] = self.routing.holder(job.study_uid) if job.study_uid else ""
        routes.update(assign_routes(self.store, wanted))
        return routes

    def _reroute(self, routing: FollowupRouting) -> None:
        try:
            moved = reroute_followups(self.store, routing.wait_seconds, routing.gone)
        except Exception:
            log.exception("could not look for follow-ups to re-route")
            return
        for job_id in moved:
            self.publish(job_id)

    def _sweep(self) -> None:
        try:
            unsent = unsent_followups(self.store, self.unsent_after)
        except Exception:
            log.exception("could not look for unsent follow-up questions")
            return
        for job_id in unsent:
            self.publish(job_id)

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=10)


__all__ = [
    "FollowupJob",
    "FollowupPublisher",
    "FollowupRouting",
    "NewQuestion",
    "QuestionWriter",
    "assign_route",
    "assign_routes",
    "create_followup",
    "create_followups",
    "finish_followup",
    "followup",
    "followup_counts",
    "mark_sent",
    "reroute_followups",
    "start_followup",
    "unsent_followups",
]
