"""Spool retention: remove the files of studies the node is done with.

The PACS is the archive; the node's spool and results only serve the pre-read, its
delivery and follow-up questions. A study is *eligible* when

- every version is finished (done, failed, skipped): none received, complete, queued or
  running;
- every SR/SEG delivery of it is delivered or dropped (none pending or dead);
- no follow-up question about it is open (queued or running);
- it still has files (instances not yet purged).

Two rules remove eligible studies: by age (last activity older than ``retention.days``)
and, when free space on the spool's disk falls below ``retention.emergency_free_mb``, the
oldest first until it is free again. Removal deletes the study's instance files and its
SR/SEG files (``<data_dir>/results/<study>``); the ledger rows stay, marked with
``purged_at`` (studies and instances), so the study's history, results, anchors and FHIR
resources remain. An instance of the study received later opens a new version as usual;
it is pre-read from the instances received since the purge (the earlier images are gone),
and an identical re-sent instance is stored again rather than taken for a duplicate.

Runs as a thread in the node process (``scp``/``serve``) every
``retention.interval_seconds``; ``medgemma-node retention --dry-run|--now`` runs one pass.
Each pass is recorded in ``<data_dir>/retention-state.json`` for ``status``. Logs name
study UIDs and counts only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from node.datadir import private_dirs
from node.db import utcnow
from node.delivery import DeliveryState
from node.fhir.models import FollowupRow, FollowupState
from node.ledger import Instance, StudyLedger, StudyState
from node.ledger import Study as StudyRow
from node.outbox import OutboxRow
from node.settings import Settings
from node.spool import write_file_atomically

log = logging.getLogger("medgemma.retention")

#: States of a study version that is still in work: its files are never removed.
IN_WORK: tuple[str, ...] = (
    StudyState.RECEIVED.value,
    StudyState.COMPLETE.value,
    StudyState.QUEUED.value,
    StudyState.RUNNING.value,
)
#: Delivery states that still need the result file (not yet delivered).
UNDELIVERED: tuple[str, ...] = (DeliveryState.PENDING.value, DeliveryState.DEAD.value)
OPEN_FOLLOWUPS: tuple[str, ...] = (FollowupState.QUEUED.value, FollowupState.RUNNING.value)


def results_path(settings: Settings, study_uid: str) -> Path:
    """Where a study's SR/SEG files are written (``<data_dir>/results/<study>``)."""
    return settings.storage.results_path / study_uid


def retention_state_path(data_dir: Path) -> Path:
    return data_dir / "retention-state.json"


@dataclass(frozen=True)
class Candidate:
    """An eligible study: its last activity (naive UTC) and the bytes of its spool files."""

    study_uid: str
    last_activity: datetime
    spool_bytes: int
    instances: int


@dataclass
class RetentionPass:
    """What one pass did (or, dry, would do)."""

    started_at: str
    dry_run: bool
    reason: str  # "age", "emergency", "age+emergency" or "" (nothing removed)
    studies: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    eligible: int = 0  # eligible studies before the pass
    free_mb_before: int = 0
    free_mb_after: int = 0
    next_run: str | None = None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SpoolRetention:
    """Finds eligible studies and removes their files (one pass, or a thread)."""

    def __init__(
        self,
        settings: Settings,
        ledger: StudyLedger,
        *,
        free_bytes: Callable[[], int] | None = None,
    ) -> None:
        """``free_bytes``: free space of the spool's disk (default: ``shutil.disk_usage``)."""
        self.settings = settings
        self.ledger = ledger
        self.db = ledger.db
        self.db.create_tables([OutboxRow, FollowupRow])
        self.spool_root = settings.storage.spool_path
        self._free_bytes = free_bytes or self._disk_free
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _disk_free(self) -> int:
        root = self.spool_root if self.spool_root.exists() else self.settings.storage.data_path
        return shutil.disk_usage(root if root.exists() else Path.cwd()).free

    # --- eligibility ------------------------------------------------------------------

    def candidates(self) -> list[Candidate]:
        """Eligible studies, least recently active first."""
        with self.db.transaction() as s:
            files = {
                uid: (int(n), int(size or 0))
                for uid, n, size in s.execute(
                    select(Instance.study_uid, func.count(), func.sum(Instance.size_bytes))
                    .where(Instance.purged_at.is_(None))
                    .group_by(Instance.study_uid)
                )
            }
            if not files:
                return []
            busy: set[str] = set(
                s.execute(
                    select(StudyRow.study_uid).where(StudyRow.state.in_(IN_WORK)).distinct()
                ).scalars()
            )
            busy.update(
                s.execute(
                    select(OutboxRow.study_uid).where(OutboxRow.state.in_(UNDELIVERED)).distinct()
                ).scalars()
            )
            busy.update(
                s.execute(
                    select(FollowupRow.study_uid)
                    .where(FollowupRow.state.in_(OPEN_FOLLOWUPS))
                    .distinct()
                ).scalars()
            )
            activity: dict[str, datetime] = {}
            for uid, updated, last_instance in s.execute(
                select(
                    StudyRow.study_uid,
                    func.max(StudyRow.updated_at),
                    func.max(StudyRow.last_instance_at),
                ).group_by(StudyRow.study_uid)
            ):
                activity[uid] = max(t for t in (updated, last_instance) if t is not None)
            for uid, asked in s.execute(
                select(FollowupRow.study_uid, func.max(FollowupRow.updated_at)).group_by(
                    FollowupRow.study_uid
                )
            ):
                if uid in activity and asked is not None:
                    activity[uid] = max(activity[uid], asked)
        out = [
            Candidate(uid, activity[uid], size, n)
            for uid, (n, size) in files.items()
            if uid not in busy and uid in activity
        ]
        return sorted(out, key=lambda c: (c.last_activity, c.study_uid))

    def due_by_age(self, candidates: Iterable[Candidate], now: datetime) -> list[Candidate]:
        days = self.settings.retention.days
        if days <= 0:
            return []
        cutoff = now - timedelta(days=days)
        return [c for c in candidates if c.last_activity <= cutoff]

    # --- removal ----------------------------------------------------------------------

    def purge(self, study_uid: str) -> tuple[int, int] | None:
        """Remove one study's files if it is (still) eligible: (files, bytes), else None.

        The ledger marks come first, in one transaction that checks again that no version
        is in work; then the marked instances' files and the results directory go. Only
        files the marks name are removed from the spool: an instance arriving meanwhile
        opens a new version whose files stay.
        """
        now = utcnow()
        with self.db.transaction() as s:
            if s.execute(
                select(func.count())
                .select_from(StudyRow)
                .where(StudyRow.study_uid == study_uid, StudyRow.state.in_(IN_WORK))
            ).scalar_one():
                return None
            if s.execute(
                select(func.count())
                .select_from(OutboxRow)
                .where(OutboxRow.study_uid == study_uid, OutboxRow.state.in_(UNDELIVERED))
            ).scalar_one():
                return None
            if s.execute(
                select(func.count())
                .select_from(FollowupRow)
                .where(FollowupRow.study_uid == study_uid, FollowupRow.state.in_(OPEN_FOLLOWUPS))
            ).scalar_one():
                return None
            rows = s.execute(
                select(Instance.id, Instance.path, Instance.size_bytes).where(
                    Instance.study_uid == study_uid, Instance.purged_at.is_(None)
                )
            ).all()
            if not rows:
                return None
            s.execute(
                update(Instance).where(Instance.id.in_([r.id for r in rows])).values(purged_at=now)
            )
            s.execute(
                update(StudyRow)
                .where(StudyRow.study_uid == study_uid, StudyRow.purged_at.is_(None))
                .values(purged_at=now)
            )
        files = removed_bytes = 0
        for row in rows:
            size = _remove_file(self.spool_root / row.path)
            if size is not None:
                files += 1
                removed_bytes += size
        _prune_empty_dirs(self.spool_root / study_uid, stop=self.spool_root)
        results = results_path(self.settings, study_uid)
        if results.is_dir():
            for path in sorted(results.rglob("*")):
                if path.is_file():
                    size = _remove_file(path)
                    if size is not None:
                        files += 1
                        removed_bytes += size
            _prune_empty_dirs(results, stop=results.parent)
        return files, removed_bytes

    def run_once(self, *, dry_run: bool = False) -> RetentionPass:
        """One pass: by age, then (free space below the watermark) oldest first."""
        now = utcnow()
        free = self._free_bytes()
        candidates = self.candidates()
        report = RetentionPass(
            started_at=_iso(now),
            dry_run=dry_run,
            reason="",
            eligible=len(candidates),
            free_mb_before=free // 2**20,
        )
        reasons: list[str] = []
        chosen: set[str] = set()
        for c in self.due_by_age(candidates, now):
            if self._take(c, report, dry_run):
                chosen.add(c.study_uid)
                free += c.spool_bytes if dry_run else 0
        if chosen:
            reasons.append("age")
        watermark = self.settings.retention.emergency_free_mb * 2**20
        if watermark and (free if dry_run else self._free_bytes()) < watermark:
            log.warning(
                "retention: %d MiB free, below retention.emergency_free_mb (%d MiB): removing "
                "eligible studies oldest first",
                free // 2**20,
                self.settings.retention.emergency_free_mb,
            )
            emergency = False
            for c in candidates:
                if c.study_uid in chosen:
                    continue
                current = free if dry_run else self._free_bytes()
                if current >= watermark:
                    break
                if self._take(c, report, dry_run):
                    chosen.add(c.study_uid)
                    emergency = True
                    free += c.spool_bytes if dry_run else 0
            if emergency:
                reasons.append("emergency")
            if (free if dry_run else self._free_bytes()) < watermark:
                log.warning(
                    "retention: still below retention.emergency_free_mb after removing every "
                    "eligible study (%d eligible); studies in work or undelivered are kept",
                    len(candidates),
                )
        report.reason = "+".join(reasons)
        report.free_mb_after = (free if dry_run else self._free_bytes()) // 2**20
        if report.studies and not dry_run:
            log.info(
                "retention (%s): removed %d studies, %d files, %.1f MiB; %d MiB free",
                report.reason,
                len(report.studies),
                report.files,
                report.bytes / 2**20,
                report.free_mb_after,
            )
        return report

    def _take(self, c: Candidate, report: RetentionPass, dry_run: bool) -> bool:
        if dry_run:
            report.studies.append(c.study_uid)
            report.files += c.instances
            report.bytes += c.spool_bytes
            return True
        done = self.purge(c.study_uid)
        if done is None:
            return False
        files, size = done
        report.studies.append(c.study_uid)
        report.files += files
        report.bytes += size
        log.info(
            "retention: removed study %s (%d files, %d bytes; last activity %s UTC)",
            c.study_uid,
            files,
            size,
            f"{c.last_activity:%Y-%m-%d %H:%M:%S}",
        )
        return True

    # --- the node's thread --------------------------------------------------------------

    def run_and_record(self) -> RetentionPass:
        """One pass, recorded in ``retention-state.json`` with the next run's time."""
        try:
            report = self.run_once()
        except Exception as exc:
            log.exception("retention pass failed; the next one runs as scheduled")
            report = RetentionPass(
                started_at=_iso(utcnow()), dry_run=False, reason="", error=f"{exc!r}"[:300]
            )
        interval = self.settings.retention.interval_seconds
        report.next_run = _iso(utcnow() + timedelta(seconds=interval))
        write_retention_state(self.settings.storage.data_path, report)
        return report

    def start(self) -> None:
        interval = self.settings.retention.interval_seconds

        def loop() -> None:
            self.run_and_record()
            while not self._stop.wait(interval):
                self.run_and_record()

        self._thread = threading.Thread(target=loop, name="medgemma-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def write_retention_state(data_dir: Path, report: RetentionPass) -> None:
    """Record the last pass for ``status`` (atomic: a reader never sees half a file)."""
    payload = json.dumps(report.to_json(), indent=2).encode()
    try:
        private_dirs(data_dir)
        write_file_atomically(retention_state_path(data_dir), lambda f: f.write(payload))
    except OSError as exc:
        log.warning("retention state not written to %s: %s", data_dir, exc.strerror or exc)


def read_retention_state(data_dir: Path) -> dict[str, Any] | None:
    """The last recorded pass, or None (never ran, unreadable)."""
    try:
        data = json.loads(retention_state_path(data_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _iso(t: datetime) -> str:
    return f"{t.isoformat(timespec='seconds')}Z"


def _remove_file(path: Path) -> int | None:
    """Remove one file; its size, or None when it was already gone."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("retention: cannot remove %s: %s", path, exc.strerror or exc)
        return None
    return size


def _prune_empty_dirs(top: Path, *, stop: Path) -> None:
    """Remove empty directories under and including ``top`` (never ``stop`` or above)."""
    if not top.is_dir():
        return
    for directory, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
        path = Path(directory)
        if path == stop:
            continue
        try:
            path.rmdir()
        except OSError:
            pass  # not empty (a new version's file): kept
