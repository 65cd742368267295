"""The study ledger: the durable record of every study, series and instance the node holds.

Each study version moves through the states below; every transition is one committed
transaction with a timestamp and, where it matters, a reason. The ledger is the source of
truth for the reconciler (lost broker, lost worker) and for ``medgemma-node status``.

    received -> complete -> queued -> running -> done | failed
                        \\-> skipped (not a chest radiograph study)

A study version is *open* while it is ``received``. An instance that arrives for a study
whose latest version is no longer open starts a new version, which is pre-read again.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    case,
    func,
    insert,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from node.db import (
    Base,
    Database,
    insert_new,
    make_engine,
    process_owner,
    table_of,
    utcnow,
)
from node.settings import QueueSettings
from sr_templates.model import Anchor, PrereadResult

log = logging.getLogger("medgemma.ledger")


class StudyState(enum.StrEnum):
    RECEIVED = "received"
    COMPLETE = "complete"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


ALLOWED_TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    StudyState.RECEIVED: frozenset({StudyState.COMPLETE}),
    StudyState.COMPLETE: frozenset({StudyState.QUEUED, StudyState.SKIPPED, StudyState.FAILED}),
    # queued -> queued is the reconciler re-sending a lost task
    StudyState.QUEUED: frozenset({StudyState.QUEUED, StudyState.RUNNING, StudyState.FAILED}),
    # running -> queued: the reconciler re-queues work whose worker was lost (lease expired).
    # A run taken over after an expired lease stays running: that is start_run's, not a
    # transition.
    # running -> skipped: the engine said the image is not a frontal chest radiograph
    # (preread.ask_engine_if_unlabelled)
    StudyState.RUNNING: frozenset(
        {StudyState.DONE, StudyState.FAILED, StudyState.QUEUED, StudyState.SKIPPED}
    ),
    StudyState.DONE: frozenset(),
    StudyState.FAILED: frozenset({StudyState.QUEUED}),  # an operator's retry
    StudyState.SKIPPED: frozenset(),
}


class LedgerError(Exception):
    """A request the ledger refuses (unknown study, forbidden state transition)."""


class Study(Base):
    """One version of a study. (study_uid, version) is unique."""

    __tablename__ = "studies"
    __table_args__ = (UniqueConstraint("study_uid", "version", name="uq_study_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), index=True, default=StudyState.RECEIVED.value)
    reason: Mapped[str] = mapped_column(Text, default="")
    # header facts used by the rules and (later) the FHIR resources; never logged
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_description: Mapped[str] = mapped_column(String(128), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    task_id: Mapped[str] = mapped_column(String(64), default="")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    last_instance_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # the worker running this version and until when (naive UTC); None when no run holds it
    run_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    run_lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # what the running pre-read is doing now (``set_stage``: "model load", "views chosen",
    # "decoded", "engine", "parsed", "SR/SEG built"); None when no run is at work
    stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # seconds the engine took for the pre-read (the result's engine_seconds), for metrics
    engine_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # when spool retention removed this version's files (node.retention); rows are kept
    purged_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (UniqueConstraint("study_id", "series_uid", name="uq_series_in_study"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(128), default="")
    protocol_name: Mapped[str] = mapped_column(String(128), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)


class Instance(Base):
    """One stored file. A re-sent SOP instance with different bytes is a new revision."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "revision", name="uq_sop_revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the spool root
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # its file was removed by spool retention: no longer read, and the same bytes sent
    # again are stored anew (a new revision) rather than taken for a duplicate
    purged_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class AnchorRow(Base):
    """One version of one anchor (the worker's JSON record; see workers.anchors.Anchor)."""

    __tablename__ = "anchors"
    __table_args__ = (UniqueConstraint("tracking_uid", "version", name="uq_anchor_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    anchor_id: Mapped[str] = mapped_column(String(16))
    tracking_uid: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


#: The tables StudyLedger creates (and upgrades) when it opens a database.
LEDGER_TABLES: tuple[type[Base], ...] = (Study, Series, Instance, AnchorRow)


@dataclass(frozen=True)
class InstanceHeader:
    """The header facts of one received instance that the ledger records."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    study_description: str = ""
    series_description: str = ""
    protocol_name: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""


@dataclass(frozen=True)
class StudySummary:
    """A detached, read-only view of one study version."""

    id: int
    study_uid: str
    version: int
    state: StudyState
    reason: str
    instance_count: int
    attempts: int
    task_id: str
    accession_number: str
    patient_id: str
    study_description: str
    updated_at: datetime
    last_instance_at: datetime
    result: PrereadResult | None
    run_owner: str | None = None  # who runs it (hostname:pid) while running, else None
    run_lease_until: datetime | None = None  # naive UTC
    stage: str | None = None  # the running pre-read's current stage
    purged_at: datetime | None = None  # when retention removed its files (naive UTC)

    @classmethod
    def of(cls, s: Study) -> StudySummary:
        return cls(
            id=s.id,
            study_uid=s.study_uid,
            version=s.version,
            state=StudyState(s.state),
            reason=s.reason,
            instance_count=s.instance_count,
            attempts=s.attempts,
            task_id=s.task_id,
            accession_number=s.accession_number,
            patient_id=s.patient_id,
            study_description=s.study_description,
            updated_at=s.updated_at,
            last_instance_at=s.last_instance_at,
            result=_load_result(s.study_uid, s.version, s.result),
            run_owner=s.run_owner,
            run_lease_until=s.run_lease_until,
            stage=s.stage,
            purged_at=s.purged_at,
        )


def _load_result(study_uid: str, version: int, data: dict[str, Any] | None) -> PrereadResult | None:
    """The stored result, typed; a row that cannot be read is logged and shown as none."""
    if not data:
        return None
    try:
        return PrereadResult.from_json(data)
    except (TypeError, ValueError) as exc:
        log.warning("study %s v%d: stored result unreadable: %s", study_uid, version, exc)
        return None


@dataclass(frozen=True)
class SeriesSummary:
    series_uid: str
    modality: str
    body_part: str
    view_position: str
    series_description: str
    protocol_name: str
    instance_count: int


@dataclass(frozen=True)
class InstanceSummary:
    study_id: int  # the ledger row of the study version it arrived in
    sop_instance_uid: str
    revision: int
    sop_class_uid: str
    transfer_syntax_uid: str
    series_uid: str
    path: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class RecordOutcome:
    """What record_instance did: a new instance, a new revision, or an idempotent duplicate."""

    study_id: int
    study_version: int
    revision: int
    duplicate: bool  # same SOP instance, same bytes: nothing new was recorded


class StudyLedger:
    """All reads and writes of study state. Each method is one transaction."""

    def __init__(
        self,
        url: str,
        *,
        run_lease_seconds: float | None = None,
        max_run_seconds: float | None = None,
    ) -> None:
        """Open (creating or upgrading) the ledger tables at ``url``.

        ``run_lease_seconds``: how long a started (or renewed, :meth:`renew_run`) run holds
        its study version (default: ``queue.run_lease_seconds``). ``max_run_seconds``: no
        lease reaches beyond this after the run started (default:
        ``queue.task_time_limit_seconds``, after which Celery has killed the task).
        """
        self.url = url
        self.engine = make_engine(url)
        self.db = Database(self.engine)
        self.db.create_tables(LEDGER_TABLES)
        fields = QueueSettings.model_fields
        self.run_lease_seconds = float(run_lease_seconds or fields["run_lease_seconds"].default)
        self.max_run_seconds = float(max_run_seconds or fields["task_time_limit_seconds"].default)
        # serialises version creation inside one process; the unique constraint covers others
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    # --- instances ---------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> InstanceSummary | None:
        """The latest revision of a SOP instance, or None."""
        with self.db.transaction() as s:
            row = s.execute(
                select(Instance, Series.series_uid)
                .join(Series, Series.id == Instance.series_id)
                .where(Instance.sop_instance_uid == sop_instance_uid)
                .order_by(Instance.revision.desc())
                .limit(1)
            ).first()
            if row is None:
                return None
            inst, series_uid = row
            return _instance_summary(inst, series_uid)

    def lookup_instance(
        self, sop_instance_uid: str, sha256: str
    ) -> tuple[InstanceSummary | None, int]:
        """(the revision holding exactly these bytes or None, the latest revision number or 0).

        Once per C-STORE, so a plain read (SQL expression, no ORM session): the SCP's hot path.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(_LOOKUP, {"sop": sop_instance_uid}).all()
        identical = next(
            (
                InstanceSummary(
                    r.study_id,
                    r.sop_instance_uid,
                    r.revision,
                    r.sop_class_uid,
                    r.transfer_syntax_uid,
                    r.series_uid,
                    r.path,
                    r.sha256,
                    r.size_bytes,
                )
                for r in rows
                if r.sha256 == sha256 and r.purged_at is None
            ),
            None,
        )
        return identical, max((r.revision for r in rows), default=0)

    def record_instance(
        self,
        header: InstanceHeader,
        *,
        path: str,
        sha256: str,
        size_bytes: int,
        revision: int,
        calling_ae: str,
    ) -> RecordOutcome:
        """Record a stored instance in the open version of its study (creating one if needed).

        One transaction of SQL expressions (no ORM unit of work): it runs once per C-STORE,
        before the response.
        """
        for attempt in range(3):
            try:
                with self._lock, self.engine.begin() as conn:
                    return _record(conn, header, path, sha256, size_bytes, revision, calling_ae)
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # --- study state -------------------------------------------------------------------

    def _transition(
        self, s: Session, study: Study, new: StudyState, reason: str | None = None
    ) -> None:
        old = StudyState(study.state)
        if new not in ALLOWED_TRANSITIONS[old]:
            raise LedgerError(
                f"study {study.study_uid} v{study.version}: {old.value} -> {new.value} "
                "is not an allowed transition"
            )
        now = utcnow()
        study.state = new.value
        study.updated_at = now
        if reason is not None:
            study.reason = reason
        if new is StudyState.COMPLETE:
            study.completed_at = now
        elif new is StudyState.QUEUED:
            study.queued_at = now
        elif new is StudyState.RUNNING:
            study.started_at = now
        elif new in (StudyState.DONE, StudyState.FAILED, StudyState.SKIPPED):
            study.finished_at = now
        if new is not StudyState.RUNNING:
            study.stage = None  # a stage belongs to a run at work

    def _get(self, s: Session, study_uid: str, version: int) -> Study:
        study = s.execute(
            select(Study).where(Study.study_uid == study_uid, Study.version == version)
        ).scalar_one_or_none()
        if study is None:
            raise LedgerError(f"unknown study {study_uid} version {version}")
        return study

    def complete_quiet_studies(self, quiet_seconds: float) -> list[StudySummary]:
        """Close every open study version that received nothing for ``quiet_seconds``."""
        cutoff = utcnow() - timedelta(seconds=quiet_seconds)
        with self._lock, self.db.transaction() as s:
            rows = (
                s.execute(
                    select(Study).where(
                        Study.state == StudyState.RECEIVED.value, Study.last_instance_at <= cutoff
                    )
                )
                .scalars()
                .all()
            )
            for study in rows:
                self._transition(s, study, StudyState.COMPLETE)
            return [StudySummary.of(x) for x in rows]

    def complete_studies(
        self,
        study_ids: Sequence[int],
        *,
        quiet_since: datetime | None = None,
        except_callers: Sequence[str] = (),
    ) -> list[StudySummary]:
        """Close the given open study versions now (``complete on association release``).

        ``quiet_since`` (naive UTC): only versions that received nothing after it (another
        association went on sending into the study). ``except_callers``: not versions that
        received an instance from one of these calling AE titles (they wait for the quiet
        period).
        """
        conditions = [Study.id.in_(list(study_ids)), Study.state == StudyState.RECEIVED.value]
        if quiet_since is not None:
            conditions.append(Study.last_instance_at <= quiet_since)
        if except_callers:
            from_listed = select(Instance.study_id).where(
                Instance.calling_ae.in_(list(except_callers))
            )
            conditions.append(Study.id.not_in(from_listed))
        with self._lock, self.db.transaction() as s:
            rows = s.execute(select(Study).where(*conditions)).scalars().all()
            for study in rows:
                self._transition(s, study, StudyState.COMPLETE)
            return [StudySummary.of(x) for x in rows]

    def last_open_instance_at(self) -> datetime | None:
        """The oldest ``last_instance_at`` of an open (received) study version, naive UTC:
        the next quiet-period completion is due ``quiet_seconds`` after it."""
        with self.db.transaction() as s:
            return s.execute(
                select(func.min(Study.last_instance_at)).where(
                    Study.state == StudyState.RECEIVED.value
                )
            ).scalar_one_or_none()

    def set_state(
        self, study_uid: str, version: int, new: StudyState, reason: str | None = None
    ) -> StudySummary:
        with self.db.transaction() as s:
            study = self._get(s, study_uid, version)
            self._transition(s, study, new, reason)
            return StudySummary.of(study)

    def mark_queued(self, study_uid: str, version: int, task_id: str) -> StudySummary:
        """Queue a study version (again); refused while a worker's run lease on it is live."""
        with self.db.transaction() as s:
            study = self._get(s, study_uid, version)
            if study.state == StudyState.RUNNING.value and _lease_live(study, utcnow()):
                raise LedgerError(
                    f"study {study_uid} v{version} is running under a live lease "
                    f"(until {study.run_lease_until:%Y-%m-%d %H:%M:%S} UTC); not re-queued"
                )
            self._transition(s, study, StudyState.QUEUED, "")
            study.task_id = task_id
            study.attempts += 1
            study.run_owner = None
            study.run_lease_until = None
            return StudySummary.of(study)

    def note_queued(self, study_uid: str, version: int, task_id: str, reason: str) -> bool:
        """Set the reason of a version still queued under ``task_id`` (e.g. why its task has
        not reached the broker yet), keeping its state and last-change time, so the reconciler
        re-sends it on its usual schedule. False when it has moved on (a worker took it)."""
        with self.db.transaction() as s:
            result: Any = s.execute(
                update(Study)
                .where(
                    Study.study_uid == study_uid,
                    Study.version == version,
                    Study.state == StudyState.QUEUED.value,
                    Study.task_id == task_id,
                )
                .values(reason=reason)
            )
            return bool(result.rowcount)

    def start_run(
        self,
        study_uid: str,
        version: int,
        owner: str | None = None,
        lease_seconds: float | None = None,
    ) -> StudySummary | None:
        """Claim a queued study version for one run: running, leased to ``owner``.

        ``owner`` defaults to this process (``hostname:pid``); ``lease_seconds`` to the
        ledger's ``run_lease_seconds``. Returns None when there is nothing to run: the version
        is finished (done, skipped, failed) or another owner's lease on it is still live (a
        re-sent task while the first still runs). After the lease runs out (the worker died)
        the version can be claimed again; the holder itself may claim it again at any time.
        Raises LedgerError for a version not yet queued.
        """
        owner = owner or process_owner()
        now = utcnow()
        lease = min(lease_seconds or self.run_lease_seconds, self.max_run_seconds)
        until = now + timedelta(seconds=lease)
        startable = (StudyState.QUEUED.value, StudyState.RUNNING.value)
        with self.db.transaction() as s:
            # one conditional UPDATE: two workers can never both see the version as free
            claimed: Any = s.execute(
                update(Study)
                .where(
                    Study.study_uid == study_uid,
                    Study.version == version,
                    Study.state.in_(startable),
                    or_(_lease_free(now), Study.run_owner == owner),
                )
                .values(
                    state=StudyState.RUNNING.value,
                    reason="",
                    run_owner=owner,
                    run_lease_until=until,
                    started_at=now,
                    updated_at=now,
                )
            )
            study = self._get(s, study_uid, version)
            if claimed.rowcount:
                return StudySummary.of(study)
            state = StudyState(study.state)
            if state in (StudyState.DONE, StudyState.SKIPPED, StudyState.FAILED):
                return None
            if state is StudyState.RUNNING:
                log.info(
                    "study %s v%d already runs under another lease (until %s UTC); not started",
                    study_uid,
                    version,
                    study.run_lease_until,
                )
                return None
            raise LedgerError(
                f"study {study_uid} v{version} is {state.value}, not queued; refusing to run"
            )

    def claim_runs(
        self,
        limit: int,
        owner: str | None = None,
        *,
        exclude: Sequence[str] = (),
        lease_seconds: float | None = None,
    ) -> list[StudySummary]:
        """Claim up to ``limit`` more study versions waiting for a worker, for one batch.

        Waiting: queued, or running with a released lease (a transient error gave it back
        for a retry); oldest queued first. Each is taken with the same conditional UPDATE
        as :meth:`start_run`, so two workers never claim the same version. Left out: studies
        in ``exclude`` (the batch's own) and a version while an earlier version of its study
        is not finished (its anchors are the later one's prior anchors), one version per
        study. Versions whose lease ran out (a dead worker) are the reconciler's: re-sent as
        a new attempt, not claimed here. The claimed versions' own broker messages later
        find them finished or leased and do nothing.
        """
        if limit <= 0:
            return []
        owner = owner or process_owner()
        now = utcnow()
        until = now + timedelta(
            seconds=min(lease_seconds or self.run_lease_seconds, self.max_run_seconds)
        )
        waiting = or_(
            and_(Study.state == StudyState.QUEUED.value, _lease_free(now)),
            and_(Study.state == StudyState.RUNNING.value, Study.run_lease_until.is_(None)),
        )
        taken: set[str] = set(exclude)
        claimed: list[StudySummary] = []
        with self.db.transaction() as s:
            candidates = s.execute(
                select(Study.id, Study.study_uid, Study.version)
                .where(waiting)
                .order_by(Study.queued_at, Study.id)
                .limit(limit * 4 + len(taken))
            ).all()
        unfinished = (
            StudyState.RECEIVED.value,
            StudyState.COMPLETE.value,
            StudyState.QUEUED.value,
            StudyState.RUNNING.value,
        )
        for row_id, study_uid, version in candidates:
            if len(claimed) >= limit:
                break
            if study_uid in taken:
                continue
            with self.db.transaction() as s:
                earlier = s.execute(
                    select(func.count())
                    .select_from(Study)
                    .where(
                        Study.study_uid == study_uid,
                        Study.version < version,
                        Study.state.in_(unfinished),
                    )
                ).scalar_one()
                if earlier:
                    continue
                result: Any = s.execute(
                    update(Study)
                    .where(Study.id == row_id, waiting)
                    .values(
                        state=StudyState.RUNNING.value,
                        reason="",
                        run_owner=owner,
                        run_lease_until=until,
                        started_at=now,
                        updated_at=now,
                    )
                )
                if not result.rowcount:
                    continue  # another worker took it meanwhile
                taken.add(study_uid)
                claimed.append(StudySummary.of(self._get(s, study_uid, version)))
        return claimed

    def release_run(self, study_uid: str, version: int, owner: str | None = None) -> bool:
        """End ``owner``'s lease on a running version early, so a retry anywhere may claim it.

        For a run that stops without an outcome (a transient error the task retries). The
        version stays running. False when ``owner`` (default: this process) held no lease.
        """
        owner = owner or process_owner()
        with self.db.transaction() as s:
            result: Any = s.execute(
                update(Study)
                .where(
                    Study.study_uid == study_uid,
                    Study.version == version,
                    Study.run_owner == owner,
                )
                .values(run_owner=None, run_lease_until=None)
            )
            return bool(result.rowcount)

    def renew_run(self, study_uid: str, version: int, owner: str | None = None) -> bool:
        """Extend ``owner``'s lease on a running version by ``run_lease_seconds`` from now
        (the running task's heartbeat), never beyond ``max_run_seconds`` after it started.

        False when ``owner`` (default: this process) no longer holds it (the reconciler
        re-sent the version after the lease ran out, or the run is over) or the run has
        reached ``max_run_seconds``: the lease then runs out and the run may be taken over.
        """
        return (study_uid, version) in self.renew_runs([(study_uid, version)], owner)

    def renew_runs(
        self, runs: Sequence[tuple[str, int]], owner: str | None = None
    ) -> set[tuple[str, int]]:
        """:meth:`renew_run` for every (study UID, version) of a batch, in one transaction;
        returns those ``owner`` still holds (renewed)."""
        owner = owner or process_owner()
        now = utcnow()
        renewed: set[tuple[str, int]] = set()
        with self.db.transaction() as s:
            for study_uid, version in runs:
                study = s.execute(
                    select(Study)
                    .where(Study.study_uid == study_uid, Study.version == version)
                    .with_for_update()
                ).scalar_one_or_none()
                if (
                    study is None
                    or study.state != StudyState.RUNNING.value
                    or study.run_owner != owner
                ):
                    continue
                cap = (study.started_at or now) + timedelta(seconds=self.max_run_seconds)
                until = min(now + timedelta(seconds=self.run_lease_seconds), cap)
                if until > now:
                    study.run_lease_until = until
                    renewed.add((study_uid, version))
        return renewed

    def holds_run(self, study_uid: str, version: int, owner: str | None = None) -> bool:
        """Whether ``owner`` (default: this process) runs the version under a live lease."""
        owner = owner or process_owner()
        with self.db.transaction() as s:
            study = self._get(s, study_uid, version)
            return (
                study.state == StudyState.RUNNING.value
                and study.run_owner == owner
                and _lease_live(study, utcnow())
            )

    def finish(
        self,
        study_uid: str,
        version: int,
        *,
        ok: bool,
        reason: str = "",
        result: PrereadResult | None = None,
        owner: str | None = None,
    ) -> StudySummary:
        """Record the outcome of a version: done (``ok``) or failed, and end its run lease.

        Finishing a version already finished with the same outcome changes nothing (a second
        run, or the reconciler, got there too); a different outcome is a LedgerError. With
        ``owner`` (a run's own outcome), a version that owner no longer holds is a LedgerError
        and is left as it is: a worker that stalled past its lease, while the version was
        re-sent and taken by another, must not overwrite that run.
        """
        outcome = StudyState.DONE if ok else StudyState.FAILED
        with self.db.transaction() as s:
            study = self._get(s, study_uid, version)
            if study.state == outcome.value:
                return StudySummary.of(study)
            if owner is not None and study.run_owner != owner:
                raise LedgerError(
                    f"study {study_uid} v{version} is no longer run by {owner} "
                    f"(now {study.state}, run by {study.run_owner or 'nobody'}): "
                    "outcome not recorded"
                )
            self._transition(s, study, outcome, reason)
            if result is not None:
                study.result = result.to_json()
                study.engine_seconds = result.engine_seconds
            study.run_owner = None
            study.run_lease_until = None
            study.stage = None
            return StudySummary.of(study)

    def set_stage(self, study_uid: str, version: int, stage: str, owner: str | None = None) -> bool:
        """Record what the run of a version held by ``owner`` (default: this process) is
        doing now (shown by ``status``); False when it no longer holds the run."""
        owner = owner or process_owner()
        with self.db.transaction() as s:
            result: Any = s.execute(
                update(Study)
                .where(
                    Study.study_uid == study_uid,
                    Study.version == version,
                    Study.state == StudyState.RUNNING.value,
                    Study.run_owner == owner,
                )
                .values(stage=stage[:32])
            )
            return bool(result.rowcount)

    def save_anchors(self, study_uid: str, study_version: int, anchors: Sequence[Anchor]) -> int:
        """Record anchor versions; a (tracking UID, version) already kept is skipped.

        Returns how many were added.
        """
        with self.db.transaction() as s:
            return self._save_anchors(s, study_uid, study_version, anchors)

    @staticmethod
    def _save_anchors(
        s: Session, study_uid: str, study_version: int, anchors: Sequence[Anchor]
    ) -> int:
        rows = [
            {
                "study_uid": study_uid,
                "study_version": study_version,
                "anchor_id": a.anchor_id,
                "tracking_uid": a.tracking_uid,
                "version": a.version,
                "kind": a.kind,
                "label": a.label,
                "data": a.to_json(),
                "created_at": utcnow(),
            }
            for a in anchors
        ]
        return insert_new(s, AnchorRow, rows, keys=("tracking_uid", "version"))

    def amend_result(
        self, study_uid: str, version: int, result: PrereadResult, anchors: Sequence[Anchor]
    ) -> bool:
        """Store a follow-up amendment of a finished version: its new anchor versions and
        the result at ``result.revision``, in one transaction.

        False (nothing written) when the stored result is already at that revision or a
        later one: a redelivered turn, or another turn that got there first.
        """
        with self.db.transaction() as s:
            study = self._get(s, study_uid, version)
            if study.state != StudyState.DONE.value or not study.result:
                raise LedgerError(f"study {study_uid} v{version} has no finished result to amend")
            if int(study.result.get("revision") or 0) >= result.revision:
                return False
            self._save_anchors(s, study_uid, version, anchors)
            study.result = result.to_json()
            return True

    def record_outputs(self, study_uid: str, version: int, result: PrereadResult) -> bool:
        """Store where the SR/SEG of ``result``'s revision went (``result.outputs``); False
        when the stored result has moved on to another revision."""
        with self.db.transaction() as s:
            study = self._get(s, study_uid, version)
            if not study.result or int(study.result.get("revision") or 0) != result.revision:
                return False
            study.result = result.to_json()
            return True

    def anchors_of(self, study_uid: str, *, all_versions: bool = False) -> list[Anchor]:
        """The anchors of a study: the latest version of each, or every version."""
        with self.db.transaction() as s:
            rows = list(
                s.execute(
                    select(AnchorRow).where(AnchorRow.study_uid == study_uid).order_by(AnchorRow.id)
                ).scalars()
            )
            anchors = [Anchor.from_json(r.data) for r in rows]
        if all_versions:
            return anchors
        latest: dict[str, Anchor] = {}
        for a in anchors:
            if a.tracking_uid not in latest or a.version >= latest[a.tracking_uid].version:
                latest[a.tracking_uid] = a
        return sorted(latest.values(), key=lambda a: a.number)

    # --- reads -------------------------------------------------------------------------

    def get_study(self, study_uid: str, version: int | None = None) -> StudySummary | None:
        with self.db.transaction() as s:
            q = select(Study).where(Study.study_uid == study_uid)
            if version is not None:
                q = q.where(Study.version == version)
            row = s.execute(q.order_by(Study.version.desc()).limit(1)).scalar_one_or_none()
            return StudySummary.of(row) if row else None

    def study_versions(self, study_uid: str) -> list[StudySummary]:
        with self.db.transaction() as s:
            rows = s.execute(
                select(Study).where(Study.study_uid == study_uid).order_by(Study.version)
            ).scalars()
            return [StudySummary.of(r) for r in rows]

    def series_of(self, study_uid: str, version: int) -> list[SeriesSummary]:
        """Series of one study version (the header facts the pre-read rules look at)."""
        with self.db.transaction() as s:
            study = self._get(s, study_uid, version)
            rows = s.execute(select(Series).where(Series.study_id == study.id)).scalars()
            return [
                SeriesSummary(
                    r.series_uid,
                    r.modality,
                    r.body_part,
                    r.view_position,
                    r.series_description,
                    r.protocol_name,
                    r.instance_count,
                )
                for r in rows
            ]

    def instances_of(
        self, study_uid: str, up_to_version: int | None = None
    ) -> list[InstanceSummary]:
        """Every stored instance of a study (latest revision of each SOP instance).

        Instances whose files spool retention removed are left out: a version received
        after a purge is read from the instances received since.
        """
        with self.db.transaction() as s:
            q = (
                select(Instance, Series.series_uid)
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Instance.study_id)
                .where(Instance.study_uid == study_uid, Instance.purged_at.is_(None))
            )
            if up_to_version is not None:
                q = q.where(Study.version <= up_to_version)
            latest: dict[str, InstanceSummary] = {}
            for inst, series_uid in s.execute(q.order_by(Instance.revision)):
                latest[inst.sop_instance_uid] = _instance_summary(inst, series_uid)
            return list(latest.values())

    def stuck_studies(self, older_than_seconds: float) -> list[StudySummary]:
        """Studies in complete, queued or running whose last change is older than the bound,
        and running ones whose run lease ran out (their worker stopped renewing it: dead).

        A running version whose run lease is still live is not stuck: its worker is at it.
        One whose lease was released (a retry is on its way) waits for the bound.
        """
        now = utcnow()
        cutoff = now - timedelta(seconds=older_than_seconds)
        states = [StudyState.COMPLETE.value, StudyState.QUEUED.value, StudyState.RUNNING.value]
        leased = and_(Study.state == StudyState.RUNNING.value, not_(_lease_free(now)))
        expired = and_(
            Study.state == StudyState.RUNNING.value,
            Study.run_lease_until.is_not(None),
            Study.run_lease_until < now,
        )
        with self.db.transaction() as s:
            rows = s.execute(
                select(Study).where(
                    or_(
                        and_(Study.state.in_(states), Study.updated_at <= cutoff, not_(leased)),
                        expired,
                    )
                )
            ).scalars()
            return [StudySummary.of(r) for r in rows]

    def studies_in_state(self, state: StudyState) -> list[StudySummary]:
        with self.db.transaction() as s:
            rows = s.execute(select(Study).where(Study.state == state.value)).scalars()
            return [StudySummary.of(r) for r in rows]

    def counts_by_state(self) -> dict[str, int]:
        with self.db.transaction() as s:
            rows = s.execute(select(Study.state, func.count()).group_by(Study.state)).all()
            return {state: int(n) for state, n in rows}

    def latest_studies(self, limit: int = 10) -> list[StudySummary]:
        with self.db.transaction() as s:
            rows = s.execute(
                select(Study).order_by(Study.updated_at.desc(), Study.id.desc()).limit(limit)
            ).scalars()
            return [StudySummary.of(r) for r in rows]

    def instance_count(self) -> int:
        with self.db.transaction() as s:
            return int(s.execute(select(func.count()).select_from(Instance)).scalar_one())


_I, _S, _SE = table_of(Instance), table_of(Study), table_of(Series)
# every revision of one SOP instance, with its series UID (lookup_instance)
_LOOKUP = (
    select(
        _I.c.study_id,
        _I.c.sop_instance_uid,
        _I.c.revision,
        _I.c.sop_class_uid,
        _I.c.transfer_syntax_uid,
        _SE.c.series_uid,
        _I.c.path,
        _I.c.sha256,
        _I.c.size_bytes,
        _I.c.purged_at,
    )
    .join(_SE, _SE.c.id == _I.c.series_id)
    .where(_I.c.sop_instance_uid == bindparam("sop"))
)


def _keep_or(column: Any, value: Any) -> Any:
    """SQL for ``column or value``: a header fact is kept from the study's first instance."""
    return case((column == "", value), else_=column)


# record_instance's statements, built once: a statement built per call costs SQLAlchemy
# its construction and cache key every time (about a third of the SCP's ledger time).
# Parameters of INSERT and UPDATE statements are named b_<column> (SQLAlchemy reserves the
# column names there).
_RECORDED = (
    select(_I.c.revision, _S.c.id, _S.c.version)
    .join(_S, _S.c.id == _I.c.study_id)
    .where(
        _I.c.sop_instance_uid == bindparam("sop"),
        _I.c.sha256 == bindparam("sha256"),
        _I.c.purged_at.is_(None),
    )
)
_LATEST_VERSION = (
    select(_S.c.id, _S.c.version, _S.c.state)
    .where(_S.c.study_uid == bindparam("study_uid"))
    .order_by(_S.c.version.desc())
    .limit(1)
    .with_for_update()
)
_NEW_VERSION = (
    insert(_S)
    .values(
        study_uid=bindparam("b_study_uid"),
        version=bindparam("b_version"),
        state=StudyState.RECEIVED.value,
        patient_id=bindparam("b_patient_id"),
        accession_number=bindparam("b_accession_number"),
        study_date=bindparam("b_study_date"),
        study_description=bindparam("b_study_description"),
        instance_count=1,
        created_at=bindparam("b_now"),
        updated_at=bindparam("b_now"),
        last_instance_at=bindparam("b_now"),
    )
    .returning(_S.c.id)
)
_COUNT_IN_VERSION = (
    update(_S)
    .where(_S.c.id == bindparam("b_study_id"))
    .values(
        patient_id=_keep_or(_S.c.patient_id, bindparam("b_patient_id")),
        accession_number=_keep_or(_S.c.accession_number, bindparam("b_accession_number")),
        study_date=_keep_or(_S.c.study_date, bindparam("b_study_date")),
        study_description=_keep_or(_S.c.study_description, bindparam("b_study_description")),
        instance_count=_S.c.instance_count + 1,
        last_instance_at=bindparam("b_now"),
        updated_at=bindparam("b_now"),
    )
)
_COUNT_IN_SERIES = (
    update(_SE)
    .where(_SE.c.study_id == bindparam("b_study_id"), _SE.c.series_uid == bindparam("b_series_uid"))
    .values(instance_count=_SE.c.instance_count + 1)
    .returning(_SE.c.id)
)
_NEW_SERIES = (
    insert(_SE)
    .values(
        study_id=bindparam("b_study_id"),
        series_uid=bindparam("b_series_uid"),
        modality=bindparam("b_modality"),
        body_part=bindparam("b_body_part"),
        view_position=bindparam("b_view_position"),
        series_description=bindparam("b_series_description"),
        protocol_name=bindparam("b_protocol_name"),
        instance_count=1,
    )
    .returning(_SE.c.id)
)
_NEW_INSTANCE = insert(_I).values(
    study_id=bindparam("b_study_id"),
    series_id=bindparam("b_series_id"),
    study_uid=bindparam("b_study_uid"),
    sop_instance_uid=bindparam("b_sop"),
    revision=bindparam("b_revision"),
    sop_class_uid=bindparam("b_sop_class_uid"),
    transfer_syntax_uid=bindparam("b_transfer_syntax_uid"),
    path=bindparam("b_path"),
    sha256=bindparam("b_sha256"),
    size_bytes=bindparam("b_size_bytes"),
    calling_ae=bindparam("b_calling_ae"),
    received_at=bindparam("b_now"),
)


def _record(
    conn: Connection,
    h: InstanceHeader,
    path: str,
    sha256: str,
    size_bytes: int,
    revision: int,
    calling_ae: str,
) -> RecordOutcome:
    """record_instance's transaction: the study version and series rows (created or
    counted up) and the instance row, unless these exact bytes are already recorded."""
    now = utcnow()
    existing = conn.execute(_RECORDED, {"sop": h.sop_instance_uid, "sha256": sha256}).first()
    if existing is not None:
        return RecordOutcome(existing.id, existing.version, existing.revision, duplicate=True)

    study = {
        "b_study_uid": h.study_uid,
        "b_patient_id": h.patient_id[:64],
        "b_accession_number": h.accession_number[:64],
        "b_study_date": h.study_date[:8],
        "b_study_description": h.study_description[:128],
        "b_now": now,
    }
    latest = conn.execute(_LATEST_VERSION, {"study_uid": h.study_uid}).first()
    if latest is None or latest.state != StudyState.RECEIVED.value:
        version = 1 if latest is None else latest.version + 1
        study_id = conn.execute(_NEW_VERSION, {**study, "b_version": version}).scalar_one()
    else:
        study_id, version = latest.id, latest.version
        conn.execute(_COUNT_IN_VERSION, {**study, "b_study_id": study_id})

    series = {"b_study_id": study_id, "b_series_uid": h.series_uid}
    series_id = conn.execute(_COUNT_IN_SERIES, series).scalar_one_or_none()
    if series_id is None:
        series_id = conn.execute(
            _NEW_SERIES,
            {
                **series,
                "b_modality": h.modality[:16],
                "b_body_part": h.body_part[:64],
                "b_view_position": h.view_position[:16],
                "b_series_description": h.series_description[:128],
                "b_protocol_name": h.protocol_name[:128],
            },
        ).scalar_one()
    conn.execute(
        _NEW_INSTANCE,
        {
            "b_study_id": study_id,
            "b_series_id": series_id,
            "b_study_uid": h.study_uid,
            "b_sop": h.sop_instance_uid,
            "b_revision": revision,
            "b_sop_class_uid": h.sop_class_uid,
            "b_transfer_syntax_uid": h.transfer_syntax_uid,
            "b_path": path,
            "b_sha256": sha256,
            "b_size_bytes": size_bytes,
            "b_calling_ae": calling_ae[:16],
            "b_now": now,
        },
    )
    return RecordOutcome(study_id, version, revision, duplicate=False)


def run_owner_gone(owner: str | None) -> bool:
    """Whether the process named by a run owner (``hostname:pid``, node.db.process_owner)
    cannot be running anything: no owner, this very process (before it started any run),
    or a process of this host that no longer exists. False for other hosts' owners: only
    their lease says when they are gone."""
    if owner is None or owner == process_owner():
        return True
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists (another user's)
    return False


def _lease_free(now: datetime) -> ColumnElement[bool]:
    """No run holds the version at ``now`` (never leased, released, or the lease ran out)."""
    return or_(Study.run_lease_until.is_(None), Study.run_lease_until < now)


def _lease_live(study: Study, now: datetime) -> bool:
    return study.run_lease_until is not None and study.run_lease_until >= now


def _instance_summary(inst: Instance, series_uid: str) -> InstanceSummary:
    return InstanceSummary(
        study_id=inst.study_id,
        sop_instance_uid=inst.sop_instance_uid,
        revision=inst.revision,
        sop_class_uid=inst.sop_class_uid,
        transfer_syntax_uid=inst.transfer_syntax_uid,
        series_uid=series_uid,
        path=inst.path,
        sha256=inst.sha256,
        size_bytes=inst.size_bytes,
    )
