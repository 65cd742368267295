"""The durable outbox: results (SR, SEG) leave the node through it, with retries and backoff.

A worker writes a result file under ``<data_dir>/results`` and adds one outbox row per
configured destination in the same ledger. The node's sender (in ``scp`` and ``serve``)
delivers due rows by C-STORE (or STOW-RS), retries failures with exponential backoff and
moves a row to ``dead`` after ``outbox.max_attempts``; ``status`` lists those. A re-sent
file keeps its SOP Instance UID, so the PACS sees one instance, never a duplicate.

    pending -> delivered
        \\-> (failure) pending, next attempt later ... -> dead
"""

from __future__ import annotations

import enum
import logging
import threading
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from sqlalchemy import DateTime, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.orm import Mapped, mapped_column

from node.ledger import Base, StudyLedger, utcnow
from node.settings import Destination, OutboxSettings

log = logging.getLogger("medgemma.outbox")


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


class OutboxRow(Base):
    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_dest"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # sr | seg
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    destination: Mapped[str] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16), index=True, default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


@dataclass(frozen=True)
class Delivery:
    id: int
    study_uid: str
    study_version: int
    kind: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    destination: str
    state: DeliveryState
    attempts: int
    last_error: str

    @classmethod
    def of(cls, r: OutboxRow) -> Delivery:
        return cls(
            r.id,
            r.study_uid,
            r.study_version,
            r.kind,
            r.sop_instance_uid,
            r.sop_class_uid,
            r.path,
            r.destination,
            DeliveryState(r.state),
            r.attempts,
            r.last_error,
        )


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Exponential backoff after ``attempts`` failed tries: base, 2 base, 4 base ... <= cap."""
    return float(min(cap, base * 2 ** (attempts - 1)))


class RetriedDelivery(Protocol):
    """A durable delivery row: the outbox's and the FHIR rest-hook's share these columns."""

    state: str
    attempts: int
    last_error: str
    next_attempt_at: datetime


def record_failed_attempt(
    row: RetriedDelivery, error: str, *, max_attempts: int, base: float, cap: float
) -> DeliveryState:
    """Count a failed attempt on ``row``: retry later with backoff, or dead-letter it."""
    row.attempts += 1
    row.last_error = error[:1000]
    if row.attempts >= max_attempts:
        row.state = DeliveryState.DEAD.value
    else:
        delay = backoff_seconds(row.attempts, base, cap)
        row.next_attempt_at = utcnow() + timedelta(seconds=delay)
    return DeliveryState(row.state)


class DeliveryError(Exception):
    """One delivery attempt failed; the message says how (refused, status, unreachable)."""


class Outbox:
    """Outbox rows in the ledger's database."""

    def __init__(self, ledger: StudyLedger, settings: OutboxSettings) -> None:
        self.ledger = ledger
        self.settings = settings

    def enqueue(
        self,
        *,
        study_uid: str,
        study_version: int,
        kind: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        path: Path,
        destinations: list[Destination],
    ) -> int:
        """One pending row per destination; an already queued (SOP, destination) is kept as is."""
        added = 0
        with self.ledger._tx() as s:
            for dest in destinations:
                key = dest.key
                exists = s.execute(
                    select(OutboxRow.id).where(
                        OutboxRow.sop_instance_uid == sop_instance_uid,
                        OutboxRow.destination == key,
                    )
                ).first()
                if exists:
                    continue
                s.add(
                    OutboxRow(
                        study_uid=study_uid,
                        study_version=study_version,
                        kind=kind,
                        sop_class_uid=sop_class_uid,
                        sop_instance_uid=sop_instance_uid,
                        path=str(path),
                        destination=key,
                        state=DeliveryState.PENDING.value,
                        next_attempt_at=utcnow(),
                    )
                )
                added += 1
        return added

    def due(self, limit: int = 20) -> list[Delivery]:
        with self.ledger._tx() as s:
            rows = s.execute(
                select(OutboxRow)
                .where(
                    OutboxRow.state == DeliveryState.PENDING.value,
                    OutboxRow.next_attempt_at <= utcnow(),
                )
                .order_by(OutboxRow.next_attempt_at, OutboxRow.id)
                .limit(limit)
            ).scalars()
            return [Delivery.of(r) for r in rows]

    def mark_delivered(self, delivery_id: int) -> None:
        with self.ledger._tx() as s:
            row = s.get(OutboxRow, delivery_id)
            if row is not None:
                row.state = DeliveryState.DELIVERED.value
                row.attempts += 1
                row.delivered_at = utcnow()
                row.last_error = ""

    def mark_failed(self, delivery_id: int, error: str) -> DeliveryState:
        """Count a failed attempt: retry later with exponential backoff, or dead-letter it."""
        with self.ledger._tx() as s:
            row = s.get(OutboxRow, delivery_id)
            if row is None:
                return DeliveryState.DEAD
            return record_failed_attempt(
                row,
                error,
                max_attempts=self.settings.max_attempts,
                base=self.settings.backoff_base_seconds,
                cap=self.settings.backoff_max_seconds,
            )

    def retry_dead(self) -> int:
        """Give dead deliveries another round (an operator's action after fixing the PACS)."""
        with self.ledger._tx() as s:
            rows = s.execute(
                select(OutboxRow).where(OutboxRow.state == DeliveryState.DEAD.value)
            ).scalars()
            n = 0
            for row in rows:
                row.state = DeliveryState.PENDING.value
                row.attempts = 0
                row.next_attempt_at = utcnow()
                n += 1
            return n

    def deliveries(
        self, *, study_uid: str | None = None, state: DeliveryState | None = None
    ) -> list[Delivery]:
        with self.ledger._tx() as s:
            q = select(OutboxRow)
            if study_uid is not None:
                q = q.where(OutboxRow.study_uid == study_uid)
            if state is not None:
                q = q.where(OutboxRow.state == state.value)
            return [Delivery.of(r) for r in s.execute(q.order_by(OutboxRow.id)).scalars()]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in DeliveryState}
        for d in self.deliveries():
            out[d.state.value] += 1
        return out


def send_dicom(dest: Destination, path: Path, calling_ae: str, timeout: float = 30.0) -> None:
    """C-STORE one file to a DICOM destination, in its stored transfer syntax."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ds = dcmread(path)
    ts = ds.file_meta.TransferSyntaxUID
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    syntaxes = list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    ae.add_requested_context(ds.SOPClassUID, syntaxes)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        how = "rejected the association" if assoc.is_rejected else "is unreachable"
        raise DeliveryError(f"{dest.key} {how}")
    try:
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise DeliveryError(f"{dest.key}: no C-STORE response (connection lost or timed out)")
    # Success (0000) and Warning (B000, B007, B006) mean the PACS kept the instance.
    if code != 0x0000 and (code >> 12) != 0xB:
        comment = getattr(status, "ErrorComment", "")
        raise DeliveryError(f"{dest.key}: C-STORE failed with status 0x{code:04X} {comment}")


def send_stow(dest: Destination, path: Path, timeout: float = 30.0) -> None:
    """STOW-RS one file to a DICOMweb destination (``{url}/studies``)."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        dest.url.rstrip("/") + "/studies",
        data=body,
        method="POST",
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status not in (200, 202):
                raise DeliveryError(f"{dest.key}: STOW-RS answered HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"{dest.key}: STOW-RS answered HTTP {exc.code}") from exc
    except OSError as exc:
        raise DeliveryError(f"{dest.key} is unreachable ({exc})") from exc


class OutboxSender:
    """Background delivery of due outbox rows (one thread in the node process)."""

    def __init__(self, outbox: Outbox, destinations: list[Destination], calling_ae: str) -> None:
        self.outbox = outbox
        self.destinations = {d.key: d for d in destinations}
        self.calling_ae = calling_ae
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def deliver_due(self) -> int:
        """One pass over the due rows; returns how many were delivered."""
        delivered = 0
        for d in self.outbox.due():
            dest = self.destinations.get(d.destination)
            try:
                if dest is None:
                    raise DeliveryError(f"destination {d.destination} is no longer configured")
                path = Path(d.path)
                if not path.is_file():
                    raise DeliveryError(f"result file {path} is missing")
                if dest.kind == "dicomweb":
                    send_stow(dest, path)
                else:
                    send_dicom(dest, path, self.calling_ae)
            except DeliveryError as exc:
                state = self.outbox.mark_failed(d.id, str(exc))
                log.warning(
                    "%s %s of study %s to %s failed (attempt %d)%s: %s",
                    d.kind.upper(),
                    d.sop_instance_uid,
                    d.study_uid,
                    d.destination,
                    d.attempts + 1,
                    ", dead-lettered" if state is DeliveryState.DEAD else ", will retry",
                    exc,
                )
                continue
            except Exception as exc:
                self.outbox.mark_failed(d.id, f"internal error: {exc!r}")
                log.exception("delivery %d failed unexpectedly", d.id)
                continue
            self.outbox.mark_delivered(d.id)
            delivered += 1
            log.info(
                "%s %s of study %s v%d delivered to %s",
                d.kind.upper(),
                d.sop_instance_uid,
                d.study_uid,
                d.study_version,
                d.destination,
            )
        return delivered

    def start(self, poll_seconds: float) -> None:
        def loop() -> None:
            while not self._stop.wait(poll_seconds):
                try:
                    self.deliver_due()
                except Exception:
                    log.exception("outbox pass failed; continuing")

        self._thread = threading.Thread(target=loop, name="medgemma-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
