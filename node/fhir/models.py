"""Tables of the FHIR store, on :class:`node.db.Base` (same database as the ledger).

``fhir_resources`` keeps the current version of every resource as the JSON that is
served; ``fhir_resource_history`` the versions a resource had before its current one
(vread and ``_history``: a report's registered and preliminary versions once amended);
``fhir_search_index`` holds its search parameter values (rewritten with every version);
``fhir_followups`` is the durable state of each follow-up question;
``fhir_subscription_deliveries`` the durable rest-hook notifications (retried with backoff).
Timestamps are naive UTC like the ledger's.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from node.db import Base, utcnow
from node.delivery import DeliveryColumns


class FhirResourceRow(Base):
    __tablename__ = "fhir_resources"
    __table_args__ = (UniqueConstraint("resource_type", "resource_id", name="uq_fhir_resource"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(40), index=True)
    resource_id: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(Integer, default=1)
    last_updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    body: Mapped[str] = mapped_column(Text)  # the resource's JSON, meta included


class FhirHistoryRow(Base):
    """An earlier version of a resource, copied here when a new version replaces it."""

    __tablename__ = "fhir_resource_history"
    __table_args__ = (
        UniqueConstraint("resource_type", "resource_id", "version_id", name="uq_fhir_history"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(40))
    resource_id: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(Integer)
    last_updated: Mapped[datetime] = mapped_column(DateTime)
    body: Mapped[str] = mapped_column(Text)  # the version's JSON as it was served


class FhirIndexRow(Base):
    __tablename__ = "fhir_search_index"
    __table_args__ = (
        Index("ix_fhir_search_value", "resource_type", "param", "value"),
        Index("ix_fhir_search_date", "resource_type", "param", "date_start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    row_id: Mapped[int] = mapped_column(
        ForeignKey("fhir_resources.id", ondelete="CASCADE"), index=True
    )
    resource_type: Mapped[str] = mapped_column(String(40))
    param: Mapped[str] = mapped_column(String(64))
    system: Mapped[str] = mapped_column(String(256), default="")
    value: Mapped[str] = mapped_column(String(512), default="")
    date_start: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    date_end: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class FollowupState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    ANSWERED = "answered"
    FAILED = "failed"


class FollowupRow(Base):
    """One follow-up question: the question Communication, its report and its answer."""

    __tablename__ = "fhir_followups"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # = the question's id
    report_id: Mapped[str] = mapped_column(String(64), index=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True, default=FollowupState.QUEUED)
    language: Mapped[str] = mapped_column(String(16), default="")
    anchor_ref: Mapped[str] = mapped_column(String(160), default="")
    answer_id: Mapped[str] = mapped_column(String(64), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # to the queue
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # where it is sent: NULL not yet decided, "" the shared follow-up queue, else the Celery
    # node name of the worker that holds the study (node.affinity); decided once, and only
    # ever changed from a worker to "" (the fallback), so a stale message is recognised
    route: Mapped[str | None] = mapped_column(String(200), nullable=True)


class SubscriptionDeliveryRow(DeliveryColumns, Base):
    """One notification of one Subscription about one resource version (state, attempts,
    backoff and lease: :class:`node.delivery.DeliveryColumns`)."""

    __tablename__ = "fhir_subscription_deliveries"
    __table_args__ = (
        UniqueConstraint(
            "subscription_id", "resource_type", "resource_id", "version_id", name="uq_fhir_notify"
        ),
    )

    subscription_id: Mapped[str] = mapped_column(String(64), index=True)
    resource_type: Mapped[str] = mapped_column(String(40))
    resource_id: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(Integer)


#: The store's tables (created by FhirStore on the ledger's database).
FHIR_TABLES: tuple[type[Base], ...] = (
    FhirResourceRow,
    FhirHistoryRow,
    FhirIndexRow,
    FollowupRow,
    SubscriptionDeliveryRow,
)
