"""Which worker holds a study's image work, so that its follow-ups can be sent there.

The transformers engine keeps a study's image prefix (its KV cache) in the memory of the
worker process that read it (``workers.engines.medgemma``). A follow-up that reaches
another worker computes it again. This module is the shared record that lets the node
send a follow-up to the worker that holds the study, where that is cheap, and notice
when that worker has gone:

- ``worker_presence``: one row per Celery worker (its node name), written by the worker
  itself: a heartbeat every ``queue.worker_heartbeat_seconds``, the queues it consumes,
  and since when it runs a task (``busy_since``, NULL when idle). A clean stop deletes
  the row; a killed worker stops beating and is taken for gone after three beats.
- ``study_affinity``: the worker that last ran a study (its pre-read or a follow-up) with
  an engine that keeps per-process prefixes.

Nothing here is a guarantee: a follow-up sent to a worker is re-sent to the shared queue
when that worker does not take it in time or is gone (``node.fhir.followups``), so the
record may be stale without losing a question.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, String, delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from node.db import Base, Database, insert_new, utcnow

__all__ = ["StudyAffinityRow", "WorkerPresenceRow", "WorkerRegistry"]

BEATS_BEFORE_GONE = 3
"""A worker whose last heartbeat is older than this many intervals is taken for gone."""


class WorkerPresenceRow(Base):
    __tablename__ = "worker_presence"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # Celery node name
    queues: Mapped[str] = mapped_column(String(1000), default="")  # ",a,b," (consumed)
    seen_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    busy_since: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class StudyAffinityRow(Base):
    __tablename__ = "study_affinity"

    study_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    worker: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class WorkerRegistry:
    """Worker heartbeats and study affinities in the node's database.

    heartbeat_seconds: how often a worker beats; one that missed ``BEATS_BEFORE_GONE``
        beats is gone. busy_limit_seconds: a task running longer than this is taken to
        have died with its process (its ``busy_since`` is ignored): the task hard limit.
    """

    def __init__(
        self, engine: Engine, heartbeat_seconds: float = 10.0, busy_limit_seconds: float = 900.0
    ) -> None:
        self.db = Database(engine)
        self.db.create_tables([WorkerPresenceRow, StudyAffinityRow])
        self.heartbeat_seconds = heartbeat_seconds
        self.busy_limit_seconds = busy_limit_seconds

    # --- written by workers ----------------------------------------------------------

    def beat(self, name: str, queues: list[str] | tuple[str, ...] = ()) -> None:
        """Say that worker ``name`` is alive and consumes ``queues``."""
        now = utcnow()
        listed = "," + ",".join(queues) + ","
        with self.db.transaction() as s:
            result: Any = s.execute(
                update(WorkerPresenceRow)
                .where(WorkerPresenceRow.name == name)
                .values(seen_at=now, queues=listed)
            )
            changed = int(result.rowcount)
            if not changed:
                row = {"name": name, "queues": listed, "seen_at": now, "started_at": now}
                insert_new(s, WorkerPresenceRow, [row], keys=("name",))

    def set_busy(self, name: str, busy: bool) -> None:
        """Worker ``name`` starts (True) or ends (False) a task."""
        with self.db.transaction() as s:
            s.execute(
                update(WorkerPresenceRow)
                .where(WorkerPresenceRow.name == name)
                .values(busy_since=utcnow() if busy else None)
            )

    def leave(self, name: str) -> None:
        """Worker ``name`` stops: it is gone at once (its follow-ups go to the shared queue)."""
        with self.db.transaction() as s:
            s.execute(delete(WorkerPresenceRow).where(WorkerPresenceRow.name == name))

    def note_study(self, study_uid: str, worker: str) -> None:
        """Worker ``worker`` now holds ``study_uid``'s image work."""
        now = utcnow()
        with self.db.transaction() as s:
            result: Any = s.execute(
                update(StudyAffinityRow)
                .where(StudyAffinityRow.study_uid == study_uid)
                .values(worker=worker, updated_at=now)
            )
            changed = int(result.rowcount)
            if not changed:
                row = {"study_uid": study_uid, "worker": worker, "updated_at": now}
                insert_new(s, StudyAffinityRow, [row], keys=("study_uid",))

    def forget_study(self, study_uid: str, worker: str) -> None:
        """Worker ``worker`` no longer holds ``study_uid`` (evicted); another's claim stays."""
        with self.db.transaction() as s:
            s.execute(
                delete(StudyAffinityRow).where(
                    StudyAffinityRow.study_uid == study_uid, StudyAffinityRow.worker == worker
                )
            )

    # --- read by the node ------------------------------------------------------------

    def alive(self, name: str) -> bool:
        """Worker ``name`` beat within the last ``BEATS_BEFORE_GONE`` intervals."""
        with self.db.transaction() as s:
            seen = s.execute(
                select(WorkerPresenceRow.seen_at).where(WorkerPresenceRow.name == name)
            ).scalar_one_or_none()
        return seen is not None and seen >= self._alive_after()

    def holder(self, study_uid: str, queue: str) -> str:
        """The worker to send ``study_uid``'s follow-up to, or "" for the shared queue.

        Only a worker that holds the study, is alive, consumes ``queue`` and is idle right
        now: a busy one would keep the question waiting behind its task, which costs more
        than computing the prefix again elsewhere.
        """
        with self.db.transaction() as s:
            row = s.execute(
                select(WorkerPresenceRow)
                .join(StudyAffinityRow, StudyAffinityRow.worker == WorkerPresenceRow.name)
                .where(StudyAffinityRow.study_uid == study_uid)
            ).scalar_one_or_none()
            if row is None or row.seen_at < self._alive_after():
                return ""
            if f",{queue}," not in row.queues:
                return ""
            stale = utcnow() - timedelta(seconds=self.busy_limit_seconds)
            if row.busy_since is not None and row.busy_since > stale:
                return ""
            return row.name

    def _alive_after(self) -> datetime:
        return utcnow() - timedelta(seconds=BEATS_BEFORE_GONE * self.heartbeat_seconds)
