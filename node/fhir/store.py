"""The FHIR store: resources in the node's database, their search index, follow-up state,
and the durable Subscription notifications.

Writers are the workers (:func:`record_preread` after a pre-read, the follow-up worker's
answers) and the API (questions, Subscriptions, AuditEvents); readers are the API routes.
Every write of a resource is one transaction that also rewrites its search index and, for
DiagnosticReport and Communication, queues a notification for each active Subscription
whose criteria the new version matches, so a notification is never lost between the write
and the sender.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property, lru_cache
from typing import Any, Final

from sqlalchemy import (
    and_,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from node.fhir import resources as fr
from node.fhir.errors import FhirError, bad_request
from node.fhir.models import (
    FHIR_TABLE_NAMES,
    DeliveryState,
    FhirIndexRow,
    FhirResourceRow,
    FollowupRow,
    FollowupState,
    SubscriptionDeliveryRow,
)
from node.fhir.search import Condition, IndexValue, index_values, parse_query
from node.ledger import Base, Study, StudyLedger, make_engine, utcnow
from node.outbox import record_failed_attempt

log = logging.getLogger("medgemma.fhir")

#: Resource types whose writes are matched against Subscription criteria.
SUBSCRIBABLE: Final = ("DiagnosticReport", "Communication")
#: Elements that change on every write without changing the content (kept when equal).
_VOLATILE: Final = ("meta", "issued", "recorded")


#: The columns of a StoredResource, in its field order (reads skip ORM objects).
_COLUMNS: Final = (
    FhirResourceRow.resource_type,
    FhirResourceRow.resource_id,
    FhirResourceRow.version_id,
    FhirResourceRow.last_updated,
    FhirResourceRow.body,
)


def _iso(ts: datetime) -> str:
    """A naive-UTC timestamp as a FHIR instant."""
    return ts.replace(tzinfo=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dumps(resource: Mapping[str, Any]) -> str:
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class StoredResource:
    """The current version of a stored resource; ``body`` is its JSON as served."""

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    body: str

    @cached_property
    def resource(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'

    @classmethod
    def of(cls, row: FhirResourceRow) -> StoredResource:
        return cls(row.resource_type, row.resource_id, row.version_id, row.last_updated, row.body)


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


@dataclass(frozen=True)
class Delivery:
    """One pending (or dead) Subscription notification."""

    id: int
    subscription_id: str
    resource_type: str
    resource_id: str
    version_id: int
    state: DeliveryState
    attempts: int
    last_error: str


class FhirStore:
    """FHIR resources in the node's database (the ledger's, or its own URL)."""

    def __init__(self, target: StudyLedger | Engine | str, *, pool_size: int = 0) -> None:
        """On a ledger's (or a given) engine, or a database URL: its own engine, whose
        connection pool keeps ``pool_size`` connections (0: the ledger's defaults)."""
        self._owns_engine = isinstance(target, str)
        if isinstance(target, StudyLedger):
            self.engine = target.engine
        elif isinstance(target, str):
            self.engine = make_engine(target, pool_size=max(pool_size, 0))
        else:
            self.engine = target
        Base.metadata.create_all(
            self.engine, tables=[Base.metadata.tables[name] for name in FHIR_TABLE_NAMES]
        )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = threading.Lock()  # one writer per process; SQLite serialises anyway

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # --- resources --------------------------------------------------------------------

    def get(self, resource_type: str, resource_id: str) -> StoredResource | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(*_COLUMNS).where(
                    FhirResourceRow.resource_type == resource_type,
                    FhirResourceRow.resource_id == resource_id,
                )
            ).first()
            return StoredResource(*row) if row else None

    def put(self, resource: Mapping[str, Any]) -> StoredResource:
        """Create or update one resource (it must have an id); see :meth:`put_many`."""
        return self.put_many([resource])[0]

    def put_many(
        self, resources: Sequence[Mapping[str, Any]], *, notify: bool = True
    ) -> list[StoredResource]:
        """Write resources in one transaction: a new version only when the content changed.

        Each new version of a DiagnosticReport or Communication queues a notification for
        every active Subscription it matches (``notify=False`` skips that: AuditEvents).
        """
        for attempt in range(3):
            try:
                with self._write_lock, self._tx() as s:
                    return [self._put(s, r, notify) for r in resources]
            except IntegrityError:  # a concurrent writer created the same id first
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _put(
        self, s: Session, resource: Mapping[str, Any], notify: bool, *, new: bool = False
    ) -> StoredResource:
        """Write one resource in session ``s`` (Core statements: this is the hot path of
        $ask). ``new``: the id was just minted (uuid4), so there is no version to compare."""
        rtype = str(resource["resourceType"])
        rid = str(resource["id"])
        old = None
        if not new:
            old = s.execute(
                select(FhirResourceRow.id, FhirResourceRow.version_id, FhirResourceRow.body)
                .where(FhirResourceRow.resource_type == rtype, FhirResourceRow.resource_id == rid)
                .with_for_update()
            ).first()
        if old is not None:
            content = {k: v for k, v in resource.items() if k not in _VOLATILE}
            previous = json.loads(old.body)
            if {k: v for k, v in previous.items() if k not in _VOLATILE} == content:
                return StoredResource(rtype, rid, old.version_id, _parse_iso(previous), old.body)
        now = utcnow()
        version = 1 if old is None else old.version_id + 1
        meta = dict(resource.get("meta") or {})
        meta.update(versionId=str(version), lastUpdated=_iso(now))
        body = {"resourceType": rtype, "id": rid, "meta": meta}
        body.update((k, v) for k, v in resource.items() if k not in ("resourceType", "id", "meta"))
        text = _dumps(body)
        if old is None:
            row_id = s.execute(
                insert(FhirResourceRow).returning(FhirResourceRow.id),
                {
                    "resource_type": rtype,
                    "resource_id": rid,
                    "version_id": version,
                    "last_updated": now,
                    "body": text,
                },
            ).scalar_one()
        else:
            row_id = old.id
            s.execute(
                update(FhirResourceRow)
                .where(FhirResourceRow.id == row_id)
                .values(version_id=version, last_updated=now, body=text)
            )
            s.execute(delete(FhirIndexRow).where(FhirIndexRow.row_id == row_id))
        index_rows = [_index_row(row_id, rtype, v) for v in index_values(body)]
        if index_rows:
            s.execute(insert(FhirIndexRow), index_rows)
        if notify and rtype in SUBSCRIBABLE:
            self._queue_notifications(s, row_id, rtype, rid, version)
        return StoredResource(rtype, rid, version, now, text)

    def insert_new(self, resources: Sequence[Mapping[str, Any]]) -> int:
        """Insert resources that are new by construction (AuditEvents: fresh uuid4 ids) in
        two bulk statements: no version check, no Subscription matching."""
        if not resources:
            return 0
        now = utcnow()
        rows = []
        values: list[list[Any]] = []
        for resource in resources:
            meta = dict(resource.get("meta") or {})
            meta.update(versionId="1", lastUpdated=_iso(now))
            body = {"resourceType": resource["resourceType"], "id": resource["id"], "meta": meta}
            body.update(
                (k, v) for k, v in resource.items() if k not in ("resourceType", "id", "meta")
            )
            rows.append(
                {
                    "resource_type": str(resource["resourceType"]),
                    "resource_id": str(resource["id"]),
                    "version_id": 1,
                    "last_updated": now,
                    "body": _dumps(body),
                }
            )
            values.append(index_values(body))
        with self._write_lock, self._tx() as s:
            ids = (
                s.execute(
                    insert(FhirResourceRow).returning(
                        FhirResourceRow.id, sort_by_parameter_order=True
                    ),
                    rows,
                )
                .scalars()
                .all()
            )
            index_rows = [
                _index_row(row_id, str(row["resource_type"]), v)
                for row_id, row, vals in zip(ids, rows, values, strict=True)
                for v in vals
            ]
            if index_rows:
                s.execute(insert(FhirIndexRow), index_rows)
        return len(rows)

    def delete(self, resource_type: str, resource_id: str) -> bool:
        with self._write_lock, self._tx() as s:
            row = s.execute(
                select(FhirResourceRow).where(
                    FhirResourceRow.resource_type == resource_type,
                    FhirResourceRow.resource_id == resource_id,
                )
            ).scalar_one_or_none()
            if row is None:
                return False
            s.execute(delete(FhirIndexRow).where(FhirIndexRow.row_id == row.id))
            s.delete(row)
            if resource_type == "Subscription":
                s.execute(
                    delete(SubscriptionDeliveryRow).where(
                        SubscriptionDeliveryRow.subscription_id == resource_id,
                        SubscriptionDeliveryRow.state == DeliveryState.PENDING.value,
                    )
                )
            return True

    # --- search -----------------------------------------------------------------------

    def search(
        self,
        resource_type: str,
        conditions: Sequence[Condition],
        *,
        count: int,
        offset: int = 0,
    ) -> tuple[int, list[StoredResource]]:
        """(total, one page of matches), newest first."""
        where = [FhirResourceRow.resource_type == resource_type]
        where.extend(_condition_clause(resource_type, c) for c in conditions)
        with self._tx() as s:
            rows: Sequence[Any] = []
            if count > 0:
                rows = s.execute(
                    select(*_COLUMNS)
                    .where(*where)
                    .order_by(FhirResourceRow.last_updated.desc(), FhirResourceRow.id.desc())
                    .offset(offset)
                    .limit(count)
                ).all()
            if 0 < len(rows) < count or (offset == 0 and count > 0 and not rows):
                total = offset + len(rows)  # the last page: nothing to count
            else:
                total = int(
                    s.execute(
                        select(func.count()).select_from(FhirResourceRow).where(*where)
                    ).scalar_one()
                )
            return total, [StoredResource(*r) for r in rows]

    def get_many(self, refs: Iterable[tuple[str, str]]) -> list[StoredResource]:
        """Stored resources for (type, id) pairs, in the given order; missing ones skipped."""
        wanted = list(dict.fromkeys(refs))
        if not wanted:
            return []
        with self._tx() as s:
            rows = s.execute(
                select(FhirResourceRow).where(
                    or_(
                        *(
                            and_(
                                FhirResourceRow.resource_type == t,
                                FhirResourceRow.resource_id == i,
                            )
                            for t, i in wanted
                        )
                    )
                )
            ).scalars()
            found = {(r.resource_type, r.resource_id): StoredResource.of(r) for r in rows}
        return [found[k] for k in wanted if k in found]

    # --- subscriptions ----------------------------------------------------------------

    def _queue_notifications(
        self, s: Session, row_id: int, rtype: str, rid: str, version: int
    ) -> None:
        subs = s.execute(
            select(FhirResourceRow.resource_id, FhirResourceRow.body).where(
                FhirResourceRow.resource_type == "Subscription",
                FhirResourceRow.id.in_(
                    select(FhirIndexRow.row_id).where(
                        FhirIndexRow.resource_type == "Subscription",
                        FhirIndexRow.param == "status",
                        FhirIndexRow.value == "active",
                    )
                ),
            )
        ).all()
        for sub_id, sub_body in subs:
            criteria = str(json.loads(sub_body).get("criteria", ""))
            try:
                ctype, conditions = parse_criteria(criteria)
            except FhirError:
                continue  # refused at creation; an old row with bad criteria matches nothing
            if ctype != rtype:
                continue
            hit = s.execute(
                select(FhirResourceRow.id).where(
                    FhirResourceRow.id == row_id,
                    *(_condition_clause(ctype, c) for c in conditions),
                )
            ).first()
            if hit is None:
                continue
            s.add(
                SubscriptionDeliveryRow(
                    subscription_id=sub_id,
                    resource_type=rtype,
                    resource_id=rid,
                    version_id=version,
                    state=DeliveryState.PENDING.value,
                    next_attempt_at=utcnow(),
                )
            )
            log.info(
                "notification queued: Subscription/%s <- %s/%s/_history/%d",
                sub_id,
                rtype,
                rid,
                version,
            )

    def due_deliveries(self, limit: int = 20) -> list[Delivery]:
        with self._tx() as s:
            rows = s.execute(
                select(SubscriptionDeliveryRow)
                .where(
                    SubscriptionDeliveryRow.state == DeliveryState.PENDING.value,
                    SubscriptionDeliveryRow.next_attempt_at <= utcnow(),
                )
                .order_by(SubscriptionDeliveryRow.next_attempt_at, SubscriptionDeliveryRow.id)
                .limit(limit)
            ).scalars()
            return [_delivery(r) for r in rows]

    def mark_delivered(self, delivery_id: int) -> None:
        with self._tx() as s:
            row = s.get(SubscriptionDeliveryRow, delivery_id)
            if row is not None:
                row.state = DeliveryState.DELIVERED.value
                row.attempts += 1
                row.last_error = ""
                row.delivered_at = utcnow()

    def mark_failed(
        self, delivery_id: int, error: str, *, max_attempts: int, base: float, cap: float
    ) -> DeliveryState:
        """Count a failed attempt: retry with exponential backoff, or dead-letter it."""
        with self._tx() as s:
            row = s.get(SubscriptionDeliveryRow, delivery_id)
            if row is None:
                return DeliveryState.DEAD
            return record_failed_attempt(row, error, max_attempts=max_attempts, base=base, cap=cap)

    def deliveries(self, state: DeliveryState | None = None, limit: int = 100) -> list[Delivery]:
        with self._tx() as s:
            q = select(SubscriptionDeliveryRow)
            if state is not None:
                q = q.where(SubscriptionDeliveryRow.state == state.value)
            rows = s.execute(q.order_by(SubscriptionDeliveryRow.id.desc()).limit(limit)).scalars()
            return [_delivery(r) for r in rows]

    def deliveries_by_id(self, ids: Sequence[int]) -> list[Delivery]:
        if not ids:
            return []
        with self._tx() as s:
            rows = s.execute(
                select(SubscriptionDeliveryRow)
                .where(SubscriptionDeliveryRow.id.in_(list(ids)))
                .order_by(SubscriptionDeliveryRow.id)
            ).scalars()
            return [_delivery(r) for r in rows]

    def delivery_counts(self) -> dict[str, int]:
        with self._tx() as s:
            rows = s.execute(
                select(SubscriptionDeliveryRow.state, func.count()).group_by(
                    SubscriptionDeliveryRow.state
                )
            ).all()
        counts = {d.value: 0 for d in DeliveryState}
        counts.update({str(state): int(n) for state, n in rows})
        return counts

    # --- follow-up questions ----------------------------------------------------------

    def create_followup(
        self,
        question: Mapping[str, Any],
        *,
        report_id: str,
        study_uid: str,
        language: str,
        anchor_ref: str,
    ) -> FollowupJob:
        """Store the question Communication and its queued follow-up job, together."""
        (job,) = self.create_followups(
            [NewQuestion(question, report_id, study_uid, language, anchor_ref)]
        )
        return job

    def create_followups(self, items: Sequence[NewQuestion]) -> list[FollowupJob]:
        """Store several new questions and their jobs in one transaction (one commit)."""
        jobs = []
        now = utcnow()
        with self._write_lock, self._tx() as s:
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
                self._put(s, item.question, True, new=True)
                s.execute(
                    insert(FollowupRow),
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

    def mark_sent(self, job_ids: Sequence[str]) -> None:
        """Record that these questions were handed to the work queue."""
        if not job_ids:
            return
        with self._tx() as s:
            s.execute(
                update(FollowupRow)
                .where(FollowupRow.id.in_(list(job_ids)), FollowupRow.sent_at.is_(None))
                .values(sent_at=utcnow())
            )

    def unsent_followups(self, older_than_seconds: float, limit: int = 500) -> list[str]:
        """Queued questions never handed to the work queue (a broker outage, a restart)."""
        cutoff = utcnow() - timedelta(seconds=older_than_seconds)
        with self._tx() as s:
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

    def followup(self, job_id: str) -> FollowupJob | None:
        with self._tx() as s:
            row = s.get(FollowupRow, job_id)
            return FollowupJob.of(row) if row else None

    def start_followup(self, job_id: str) -> FollowupJob | None:
        """Move a job to running (a redelivered one too); None when it is finished or unknown.

        This is what makes a redelivered follow-up task idempotent.
        """
        with self._tx() as s:
            row = s.get(FollowupRow, job_id)
            if row is None or row.state in (FollowupState.ANSWERED, FollowupState.FAILED):
                return None
            row.state = FollowupState.RUNNING.value
            row.attempts += 1
            row.updated_at = utcnow()
            return FollowupJob.of(row)

    def finish_followup(
        self,
        job_id: str,
        *,
        answer: Mapping[str, Any],
        amended: Sequence[Mapping[str, Any]] = (),
        failed_reason: str = "",
    ) -> FollowupJob:
        """Store the answer (and amended resources), mark the question completed, and the
        job answered (or failed with ``failed_reason``), in one transaction."""
        with self._write_lock, self._tx() as s:
            row = s.get(FollowupRow, job_id)
            if row is None:
                raise KeyError(f"no follow-up {job_id}")
            for resource in amended:
                self._put(s, resource, True)
            self._put(s, answer, True)
            question = s.execute(
                select(FhirResourceRow).where(
                    FhirResourceRow.resource_type == "Communication",
                    FhirResourceRow.resource_id == job_id,
                )
            ).scalar_one_or_none()
            if question is not None:
                q = json.loads(question.body)
                q["status"] = "completed" if not failed_reason else "not-done"
                if failed_reason:
                    q["statusReason"] = {"text": failed_reason[:500]}
                self._put(s, q, True)
            now = utcnow()
            row.state = (FollowupState.FAILED if failed_reason else FollowupState.ANSWERED).value
            row.answer_id = str(answer["id"])
            row.error = failed_reason[:1000]
            row.updated_at = now
            row.finished_at = now
            return FollowupJob.of(row)

    def followup_counts(self) -> dict[str, int]:
        with self._tx() as s:
            rows = s.execute(
                select(FollowupRow.state, func.count()).group_by(FollowupRow.state)
            ).all()
        return {str(state): int(n) for state, n in rows}

    def report_for_study(self, study_uid: str) -> StoredResource | None:
        return self.get("DiagnosticReport", fr.report_id(study_uid))


def _index_row(row_id: int, rtype: str, v: IndexValue) -> dict[str, Any]:
    return {
        "row_id": row_id,
        "resource_type": rtype,
        "param": v.param,
        "system": v.system[:256],
        "value": v.value[:512],
        "date_start": v.start,
        "date_end": v.end,
    }


def _parse_iso(resource: Mapping[str, Any]) -> datetime:
    """meta.lastUpdated of a stored resource as naive UTC."""
    text = str((resource.get("meta") or {}).get("lastUpdated", ""))
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=None)
    except ValueError:
        return utcnow()


def _delivery(r: SubscriptionDeliveryRow) -> Delivery:
    return Delivery(
        r.id,
        r.subscription_id,
        r.resource_type,
        r.resource_id,
        r.version_id,
        DeliveryState(r.state),
        r.attempts,
        r.last_error,
    )


def parse_criteria(criteria: str) -> tuple[str, list[Condition]]:
    """``Type?param=value&...`` -> (Type, conditions); FhirError for anything unsupported."""
    rtype, _, query = criteria.strip().partition("?")
    if rtype not in SUBSCRIBABLE:
        raise bad_request(
            f"Subscription.criteria must start with one of {', '.join(SUBSCRIBABLE)}, not {rtype!r}"
        )
    items = urllib.parse.parse_qsl(query, keep_blank_values=True)
    return rtype, parse_query(rtype, items)


# --------------------------------------------------------------------------- SQL of a search


def _condition_clause(resource_type: str, cond: Condition) -> ColumnElement[bool]:
    param = cond.param
    if param.index == "_id":
        return FhirResourceRow.resource_id.in_([v for _, v, _ in cond.alternatives])
    matches: list[ColumnElement[bool]] = []
    for head, value, kind in cond.alternatives:
        if kind == "date":
            start, end = _date_bounds(value)
            matches.append(_date_match(head, start, end))
        elif kind == "reference":
            matches.append(FhirIndexRow.value == value)
        elif kind == "id":
            matches.append(FhirIndexRow.value.like(f"%/{_escape_like(value)}", escape="\\"))
        elif kind == "system":
            matches.append(and_(FhirIndexRow.system == head, FhirIndexRow.value == value))
        elif kind == "system-only":
            matches.append(FhirIndexRow.system == head)
        else:
            matches.append(FhirIndexRow.value == value)
    return FhirResourceRow.id.in_(
        select(FhirIndexRow.row_id).where(
            FhirIndexRow.resource_type == resource_type,
            FhirIndexRow.param == param.index,
            or_(*matches) if matches else false(),
        )
    )


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _date_bounds(text: str) -> tuple[datetime, datetime]:
    from node.fhir.search import date_range

    return date_range(text)


def _date_match(prefix: str, start: datetime, end: datetime) -> ColumnElement[bool]:
    """FHIR date prefixes over ranges: the resource's [start, end) against the value's."""
    s, e = FhirIndexRow.date_start, FhirIndexRow.date_end
    if prefix == "eq":
        return and_(s >= start, e <= end)
    if prefix == "ne":
        return or_(s < start, e > end)
    if prefix == "gt":
        return e > end
    if prefix == "lt":
        return s < start
    if prefix == "ge":
        return e > start
    return s < end  # le


# --------------------------------------------------------------------------- pre-reads


def study_facts(ledger: StudyLedger, study_uid: str, version: int) -> fr.StudyFacts:
    """The header facts of one study version (patient, accession, date, series, result)."""
    with Session(ledger.engine) as s:
        study = s.execute(
            select(Study).where(Study.study_uid == study_uid, Study.version == version)
        ).scalar_one_or_none()
        if study is None:
            raise KeyError(f"unknown study {study_uid} version {version}")
        head = (
            study.state,
            study.patient_id,
            study.accession_number,
            study.study_date,
            study.study_description,
            study.result,
            study.reason,
        )
    instances = ledger.instances_of(study_uid, up_to_version=version)
    by_series: dict[str, list[tuple[str, str]]] = {}
    for inst in instances:
        by_series.setdefault(inst.series_uid, []).append(
            (inst.sop_instance_uid, inst.sop_class_uid)
        )
    seen: dict[str, fr.SeriesFacts] = {}
    for v in range(1, version + 1):
        try:
            listed = ledger.series_of(study_uid, v)
        except Exception:  # a version without rows (never happens in practice)
            continue
        for series in listed:
            seen[series.series_uid] = fr.SeriesFacts(
                series.series_uid,
                series.modality,
                series.body_part,
                series.view_position,
                series.series_description,
                tuple(by_series.get(series.series_uid, ())),
            )
    state, patient_id, accession, date, description, result, reason = head
    return fr.StudyFacts(
        study_uid=study_uid,
        version=version,
        state=state,
        patient_id=patient_id,
        accession_number=accession,
        study_date=date,
        study_description=description,
        series=tuple(seen.values()),
        result=result,
        reason=reason,
    )


def _current_anchors(
    ledger: StudyLedger, study_uid: str, result: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The result's anchors, each replaced by a newer version from the ledger if refined."""
    latest = {a["tracking_uid"]: a for a in ledger.anchors_of(study_uid)}
    out = []
    for a in result.get("anchors", []):
        newer = latest.get(a.get("tracking_uid"))
        if newer is not None and int(newer.get("version", 1)) > int(a.get("version", 1)):
            out.append(dict(newer))
        else:
            out.append(dict(a))
    return out


def build_preread_resources(
    facts: fr.StudyFacts, anchors: Sequence[Mapping[str, Any]], systems: fr.IdentifierSystems
) -> fr.PrereadBundle | None:
    """The resources for a study's state: registered, preliminary/amended, cancelled;
    None for a study that is not read (skipped)."""
    state = facts.state
    if state == "skipped":
        return None
    issued = fr.now_instant()
    study = fr.build_imaging_study(facts, systems)
    if state != "done" or not facts.result:
        status = "cancelled" if state == "failed" else "registered"
        report = fr.build_report(
            facts, systems, status=status, results=(), issued=issued, reason=facts.reason
        )
        return fr.PrereadBundle(imaging_study=study, device=None, report=report)
    result = facts.result
    is_demo = bool(result.get("is_demo"))
    device = fr.build_device(result)
    observations: list[dict[str, Any]] = []
    shown: list[tuple[str, str]] = []
    amended = False
    for anchor in anchors:
        if anchor.get("kind") != "finding":
            continue
        refined = anchor.get("refined_turn") is not None
        amended = amended or refined
        obs = fr.build_observation(
            anchor,
            facts=facts,
            systems=systems,
            device=str(device["id"]),
            status="amended" if refined else "preliminary",
            is_demo=is_demo,
            issued=issued,
        )
        observations.append(obs)
        shown.append((str(obs["id"]), f"{anchor['anchor_id']} {anchor.get('label', '')}".strip()))
    status = "amended" if amended else "preliminary"
    report = fr.build_report(facts, systems, status=status, results=shown, issued=issued)
    provenance = fr.build_provenance(
        provenance_id=fr.resource_id("Provenance", facts.study_uid, str(facts.version), status),
        targets=[report, *observations],
        device=str(device["id"]),
        source=f"ImagingStudy/{study['id']}",
        activity="UPDATE" if amended else "CREATE",
        recorded=issued,
        is_demo=is_demo,
    )
    return fr.PrereadBundle(study, device, observations, report, provenance)


def record_preread(
    ledger_or_url: StudyLedger | str,
    study_uid: str,
    version: int,
    *,
    systems: fr.IdentifierSystems | None = None,
    store: FhirStore | None = None,
) -> None:
    """Write (or update) the FHIR resources of a study version from the ledger.

    Call it after a successful pre-read (workers/preread.py): it writes the ImagingStudy,
    the model Device, one Observation per finding anchor, the preliminary DiagnosticReport
    and a Provenance, and queues Subscription notifications. For a study still being read
    it writes a ``registered`` report, for a failed one a ``cancelled`` report; a skipped
    (not chest) study gets none. Idempotent: unchanged content makes no new version.

    ``systems`` defaults to the configured ``fhir.patient_id_system``/``accession_system``.
    """
    if systems is None:
        from node.settings import get_settings

        cfg = get_settings().fhir
        systems = fr.IdentifierSystems(cfg.patient_id_system, cfg.accession_system)
    ledger = StudyLedger(ledger_or_url) if isinstance(ledger_or_url, str) else ledger_or_url
    own_store = store is None and isinstance(ledger_or_url, str)
    if store is not None:
        fhir = store
    elif own_store:
        fhir = FhirStore(ledger)
    else:
        fhir = _store_on(ledger.engine)
    try:
        facts = study_facts(ledger, study_uid, version)
        anchors = _current_anchors(ledger, study_uid, facts.result) if facts.result else []
        bundle = build_preread_resources(facts, anchors, systems)
        if bundle is None:
            log.info("study %s v%d is not read (skipped): no FHIR resources", study_uid, version)
            return
        stored = fhir.put_many(bundle.all())
        report = next(r for r in stored if r.resource_type == "DiagnosticReport")
        log.info(
            "FHIR resources of study %s v%d: DiagnosticReport/%s v%d (%s), %d Observations",
            study_uid,
            version,
            report.id,
            report.version_id,
            bundle.report["status"],
            len(bundle.observations),
        )
    finally:
        if own_store:
            fhir.close()
        if isinstance(ledger_or_url, str):
            ledger.close()


@lru_cache(maxsize=8)
def _store_on(engine: Engine) -> FhirStore:
    """One FhirStore per ledger engine (a worker records many pre-reads)."""
    return FhirStore(engine)


def new_id() -> str:
    return str(uuid.uuid4())


__all__ = [
    "SUBSCRIBABLE",
    "Delivery",
    "FhirStore",
    "FollowupJob",
    "NewQuestion",
    "StoredResource",
    "build_preread_resources",
    "new_id",
    "parse_criteria",
    "record_preread",
    "study_facts",
]
