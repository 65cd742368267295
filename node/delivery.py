"""Durable, retried deliveries with leased claims: one mechanism for every outgoing message.

The DICOM outbox (SR/SEG to a PACS) and the FHIR rest-hook notifications keep one row per
delivery with the columns of ``DeliveryColumns``. A sender *claims* due rows for a while
(a lease), sends them, then marks each delivered or failed; only the lease holder may do so.
Two senders (threads or processes, on SQLite or PostgreSQL) never hold the same row, and a
row whose sender died is claimable again once its lease has run out.

    pending --claim--> pending (leased) --mark_delivered--> delivered
                                        \\--mark_failed--> pending (next attempt later) | dead
                                        \\--release--> pending (no attempt counted)
    dead --replay (operator)--> pending, attempts 0;  dead | pending --drop (operator)--> dropped
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import ColumnElement, DateTime, Integer, String, Text, and_, or_, select, update
from sqlalchemy.orm import Mapped, mapped_column

from node.db import Database, utcnow

__all__ = [
    "DeliveryColumns",
    "DeliveryState",
    "RetriedDelivery",
    "backoff_seconds",
    "claim_due",
    "mark_delivered",
    "mark_failed",
    "record_failed_attempt",
    "release",
]


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"  # gave up after max_attempts; an operator may replay it
    DROPPED = "dropped"  # an operator decided it is not to be sent (never claimed again)


class DeliveryColumns:
    """Columns every delivery table has (mix into a model of ``node.db.Base``).

    Times are naive UTC. ``lease_owner``/``lease_until`` are set while a sender holds the row.
    """

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class RetriedDelivery(Protocol):
    """A durable delivery row: what ``record_failed_attempt`` reads and writes."""

    state: str
    attempts: int
    last_error: str
    next_attempt_at: datetime


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Exponential backoff in seconds after ``attempts`` failed tries: base, 2 base, ... <= cap."""
    return float(min(cap, base * 2 ** (attempts - 1)))


def record_failed_attempt(
    row: RetriedDelivery, error: str, *, max_attempts: int, base: float, cap: float
) -> DeliveryState:
    """Count a failed attempt on ``row``: retry after ``backoff_seconds``, or dead-letter it."""
    row.attempts += 1
    row.last_error = error[:1000]
    if row.attempts >= max_attempts:
        row.state = DeliveryState.DEAD.value
    else:
        delay = backoff_seconds(row.attempts, base, cap)
        row.next_attempt_at = utcnow() + timedelta(seconds=delay)
    return DeliveryState(row.state)


def _claimable(row_class: Any, now: datetime) -> ColumnElement[bool]:
    return and_(
        row_class.state == DeliveryState.PENDING.value,
        row_class.next_attempt_at <= now,
        or_(row_class.lease_until.is_(None), row_class.lease_until < now),
    )


def claim_due(
    db: Database,
    row_class: type[DeliveryColumns],
    *,
    owner: str,
    lease_seconds: float,
    limit: int,
    now: datetime | None = None,
) -> list[int]:
    """Lease up to ``limit`` due pending rows to ``owner`` for ``lease_seconds`` seconds.

    Returns the ids this owner now holds (in no particular order). PostgreSQL: ``SELECT ... FOR
    UPDATE SKIP LOCKED`` then an update; SQLite: one conditional ``UPDATE ... RETURNING``
    (SQLite serialises writers, so the condition is evaluated by one claimer at a time).
    ``now`` (naive UTC) is for tests.
    """
    if lease_seconds <= 0 or limit <= 0:
        raise ValueError("claim_due needs lease_seconds > 0 and limit > 0")
    now = now or utcnow()
    table: Any = row_class
    values = {"lease_owner": owner, "lease_until": now + timedelta(seconds=lease_seconds)}
    oldest = select(table.id).where(_claimable(table, now))
    oldest = oldest.order_by(table.next_attempt_at, table.id).limit(limit)
    with db.transaction() as s:
        if db.dialect == "postgresql":
            ids = list(s.execute(oldest.with_for_update(skip_locked=True)).scalars())
            if ids:
                s.execute(update(table).where(table.id.in_(ids)).values(**values))
            return ids
        stmt = (
            update(table)
            .where(table.id.in_(oldest.scalar_subquery()), _claimable(table, now))
            .values(**values)
            .returning(table.id)
        )
        return list(s.execute(stmt).scalars())


def _held(row_class: Any, row_id: int, owner: str) -> ColumnElement[bool]:
    return and_(row_class.id == row_id, row_class.lease_owner == owner)


def mark_delivered(db: Database, row_class: type[DeliveryColumns], row_id: int, owner: str) -> bool:
    """Record a successful delivery of a row ``owner`` holds and end the lease.

    False (nothing changed) when ``owner`` does not hold the row: its lease ran out and
    another sender took it.
    """
    table: Any = row_class
    with db.transaction() as s:
        result: Any = s.execute(
            update(table)
            .where(_held(table, row_id, owner))
            .values(
                state=DeliveryState.DELIVERED.value,
                attempts=table.attempts + 1,
                delivered_at=utcnow(),
                last_error="",
                lease_owner=None,
                lease_until=None,
            )
        )
        return bool(result.rowcount)


def mark_failed(
    db: Database,
    row_class: type[DeliveryColumns],
    row_id: int,
    owner: str,
    error: str,
    *,
    max_attempts: int,
    base: float,
    cap: float,
) -> DeliveryState | None:
    """Count a failed attempt on a row ``owner`` holds and end the lease.

    The row is retried after ``backoff_seconds(attempts, base, cap)`` seconds, or dead after
    ``max_attempts``. Returns its new state, or None when ``owner`` does not hold the row.
    """
    table: Any = row_class
    with db.transaction() as s:
        row = s.execute(select(table).where(_held(table, row_id, owner))).scalar_one_or_none()
        if row is None:
            return None
        s.expunge(row)  # compute the new values on a copy; the update below re-checks the lease
        state = record_failed_attempt(row, error, max_attempts=max_attempts, base=base, cap=cap)
        result: Any = s.execute(
            update(table)
            .where(_held(table, row_id, owner))
            .values(
                state=row.state,
                attempts=row.attempts,
                last_error=row.last_error,
                next_attempt_at=row.next_attempt_at,
                lease_owner=None,
                lease_until=None,
            )
        )
        return state if result.rowcount else None


def release(
    db: Database, row_class: type[DeliveryColumns], row_ids: Sequence[int], owner: str
) -> int:
    """End ``owner``'s leases on these rows without counting an attempt (a sender stopping).

    Returns how many rows were released.
    """
    table: Any = row_class
    with db.transaction() as s:
        result: Any = s.execute(
            update(table)
            .where(table.id.in_(list(row_ids)), table.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
        )
        return int(result.rowcount)
