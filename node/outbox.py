"""The durable outbox: results (SR, SEG) leave the node through it, with retries and backoff.

A worker writes a result file under ``<data_dir>/results`` and adds one outbox row per
configured destination in the same ledger. The node's sender (in ``scp`` and ``serve``)
delivers due rows by C-STORE (or STOW-RS), retries failures with exponential backoff and
moves a row to ``dead`` after ``outbox.max_attempts``; ``status`` lists those, and an
operator lists, replays or drops them with ``medgemma-node outbox``. A re-sent file keeps its
SOP Instance UID, so the PACS sees one instance, never a duplicate.

    pending -> delivered
        \\-> (failure) pending, next attempt later ... -> dead
    dead -> (outbox replay) pending, attempts 0 -> delivered once: the leased claim keeps it single
    dead | pending -> (outbox drop) dropped, with who and when; the SR/SEG file is kept
"""

from __future__ import annotations

import logging
import socket
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
from sqlalchemy import DateTime, String, Text, UniqueConstraint, and_, or_, select, update
from sqlalchemy.orm import Mapped, mapped_column

from node import delivery, wakeup
from node.db import Base, insert_new, process_owner, utcnow
from node.delivery import DeliveryColumns, DeliveryState

# node/fhir still imports these two from here; drop them once it imports node.delivery.
from node.delivery import backoff_seconds as backoff_seconds
from node.delivery import record_failed_attempt as record_failed_attempt
from node.ledger import StudyLedger
from node.settings import Destination, OutboxSettings

log = logging.getLogger("medgemma.outbox")

#: Seconds one C-STORE or STOW-RS attempt may take (connect, send, answer).
SEND_TIMEOUT_SECONDS = 30.0


class OutboxRow(DeliveryColumns, Base):
    """One result file to deliver to one destination; (SOP instance, destination) is unique."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_dest"),)

    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_version: Mapped[int] = mapped_column()
    kind: Mapped[str] = mapped_column(String(16))  # sr | seg
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    destination: Mapped[str] = mapped_column(String(256))
    # who dropped it (``outbox drop --by``, default user@host) and when (naive UTC)
    dropped_by: Mapped[str] = mapped_column(String(256), default="")
    dropped_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


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
    created_at: datetime | None = None
    delivered_at: datetime | None = None
    dropped_by: str = ""
    dropped_at: datetime | None = None

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
            r.created_at,
            r.delivered_at,
            r.dropped_by or "",
            r.dropped_at,
        )

    def to_json(self) -> dict[str, Any]:
        """The row for ``outbox list --json``: times as ISO 8601 UTC, empty ones null."""

        def when(t: datetime | None) -> str | None:
            return f"{t.isoformat(timespec='seconds')}Z" if t is not None else None

        return {
            "id": self.id,
            "state": self.state.value,
            "kind": self.kind,
            "study_uid": self.study_uid,
            "study_version": self.study_version,
            "sop_instance_uid": self.sop_instance_uid,
            "destination": self.destination,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "path": self.path,
            "created_at": when(self.created_at),
            "delivered_at": when(self.delivered_at),
            "dropped_by": self.dropped_by,
            "dropped_at": when(self.dropped_at),
        }


@dataclass(frozen=True)
class OperatorOutcome:
    """What ``Outbox.replay`` or ``Outbox.drop`` did: the ids changed, and why others were not."""

    changed: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)


def _utc(t: datetime | None) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S} UTC" if t is not None else "time unknown"


class DeliveryError(Exception):
    """One delivery attempt failed; the message says how (refused, status, unreachable)."""


class Outbox:
    """Outbox rows in the ledger's database.

    ``due`` leases rows to this outbox's ``owner``; ``mark_delivered``/``mark_failed`` only
    change rows it holds, so two senders (threads or processes) never send one row twice.
    """

    def __init__(
        self, ledger: StudyLedger, settings: OutboxSettings, *, owner: str | None = None
    ) -> None:
        self.ledger = ledger
        self.db = ledger.db
        self.settings = settings
        self.owner = owner or f"{process_owner()}/{uuid.uuid4().hex[:8]}"
        self.db.create_tables([OutboxRow])

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
        """One pending row per destination; an already queued (SOP, destination) is kept as is.

        Returns how many rows were added.
        """
        rows = [
            {
                "study_uid": study_uid,
                "study_version": study_version,
                "kind": kind,
                "sop_class_uid": sop_class_uid,
                "sop_instance_uid": sop_instance_uid,
                "path": str(path),
                "destination": dest.key,
                "state": DeliveryState.PENDING.value,
                "next_attempt_at": utcnow(),
            }
            for dest in destinations
        ]
        with self.db.transaction() as s:
            return insert_new(s, OutboxRow, rows, keys=("sop_instance_uid", "destination"))

    def due(self, limit: int = 20) -> list[Delivery]:
        """Claim up to ``limit`` due rows for this outbox, oldest first.

        The lease covers sending all of them one after another; a sender that dies leaves
        them to another after that time.
        """
        lease = limit * (SEND_TIMEOUT_SECONDS + 5.0)
        ids = delivery.claim_due(
            self.db, OutboxRow, owner=self.owner, lease_seconds=lease, limit=limit
        )
        if not ids:
            return []
        with self.db.transaction() as s:
            rows = s.execute(
                select(OutboxRow)
                .where(OutboxRow.id.in_(ids))
                .order_by(OutboxRow.next_attempt_at, OutboxRow.id)
            ).scalars()
            return [Delivery.of(r) for r in rows]

    def mark_delivered(self, delivery_id: int) -> bool:
        """Record a delivery this outbox claimed; False when its lease was lost to another."""
        return delivery.mark_delivered(self.db, OutboxRow, delivery_id, self.owner)

    def mark_failed(self, delivery_id: int, error: str) -> DeliveryState | None:
        """Count a failed attempt: retry later with exponential backoff, or dead-letter it.

        None when this outbox no longer holds the row (its lease ran out and another took it).
        """
        return delivery.mark_failed(
            self.db,
            OutboxRow,
            delivery_id,
            self.owner,
            error,
            max_attempts=self.settings.max_attempts,
            base=self.settings.backoff_base_seconds,
            cap=self.settings.backoff_max_seconds,
        )

    def release(self, delivery_ids: list[int]) -> int:
        """Give claimed rows back unsent (no attempt counted); returns how many."""
        return delivery.release(self.db, OutboxRow, delivery_ids, self.owner)

    def retry_dead(self) -> int:
        """Give every dead delivery another round; returns how many."""
        return len(self.replay(all_dead=True).changed)

    def replay(self, ids: Sequence[int] = (), *, all_dead: bool = False) -> OperatorOutcome:
        """Send dead (or dropped) deliveries again: pending, due now, attempts reset.

        ``all_dead``: every dead row; else the rows ``ids``. One conditional update, so a row
        is replayed once however often this runs at the same time; the senders' leased
        claims then deliver it once. Pending and delivered rows are refused (with why).
        """
        replayable = (DeliveryState.DEAD.value, DeliveryState.DROPPED.value)
        if all_dead:
            which = OutboxRow.state == DeliveryState.DEAD.value
        else:
            which = and_(OutboxRow.id.in_(list(ids)), OutboxRow.state.in_(replayable))
        with self.db.transaction() as s:
            result: Any = s.execute(
                update(OutboxRow)
                .where(which)
                .values(
                    state=DeliveryState.PENDING.value,
                    attempts=0,
                    last_error="",
                    next_attempt_at=utcnow(),
                    lease_owner=None,
                    lease_until=None,
                    dropped_by="",
                    dropped_at=None,
                )
                .returning(OutboxRow.id)
            )
            changed = sorted(result.scalars())
        return OperatorOutcome(changed, self._refusals(ids, changed, dropping=False))

    def drop(self, ids: Sequence[int], *, by: str) -> OperatorOutcome:
        """Give up on dead or pending deliveries for good: ``dropped``, with ``by`` and the time.

        The result file stays where it is (the node never deletes an SR/SEG); a row a sender
        holds right now is refused (try again when its attempt has ended).
        """
        now = utcnow()
        droppable = (DeliveryState.DEAD.value, DeliveryState.PENDING.value)
        with self.db.transaction() as s:
            result: Any = s.execute(
                update(OutboxRow)
                .where(
                    OutboxRow.id.in_(list(ids)),
                    OutboxRow.state.in_(droppable),
                    or_(OutboxRow.lease_until.is_(None), OutboxRow.lease_until < now),
                )
                .values(
                    state=DeliveryState.DROPPED.value,
                    dropped_by=by[:256],
                    dropped_at=now,
                    lease_owner=None,
                    lease_until=None,
                )
                .returning(OutboxRow.id)
            )
            changed = sorted(result.scalars())
        return OperatorOutcome(changed, self._refusals(ids, changed, dropping=True))

    def _refusals(
        self, ids: Sequence[int], changed: list[int], *, dropping: bool
    ) -> dict[int, str]:
        """Why each of ``ids`` not in ``changed`` was left as it is."""
        rest = [i for i in dict.fromkeys(ids) if i not in set(changed)]
        if not rest:
            return {}
        with self.db.transaction() as s:
            rows = {
                r.id: Delivery.of(r)
                for r in s.execute(select(OutboxRow).where(OutboxRow.id.in_(rest))).scalars()
            }
        why: dict[int, str] = {}
        for i in rest:
            d = rows.get(i)
            if d is None:
                why[i] = "no such delivery"
            elif d.state is DeliveryState.DELIVERED:
                why[i] = f"already delivered ({_utc(d.delivered_at)})"
            elif d.state is DeliveryState.DROPPED:
                why[i] = f"already dropped by {d.dropped_by} ({_utc(d.dropped_at)})"
            elif d.state is DeliveryState.PENDING and dropping:
                why[i] = "a sender is delivering it right now; try again in a minute"
            elif d.state is DeliveryState.PENDING:
                why[i] = f"pending: the node is still trying it ({d.attempts} attempts so far)"
            else:
                why[i] = f"it is {d.state.value}"
        return why

    def deliveries(
        self, *, study_uid: str | None = None, state: DeliveryState | None = None
    ) -> list[Delivery]:
        """Rows oldest first, of one study and/or in one state."""
        with self.db.transaction() as s:
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


def send_dicom(
    dest: Destination, path: Path, calling_ae: str, timeout: float = SEND_TIMEOUT_SECONDS
) -> None:
    """C-STORE one file to a DICOM destination, in its stored transfer syntax."""
    error = send_dicom_files(dest, [path], calling_ae, timeout)[0]
    if error is not None:
        raise error


def send_dicom_files(
    dest: Destination,
    paths: Sequence[Path],
    calling_ae: str,
    timeout: float = SEND_TIMEOUT_SECONDS,
    *,
    on_answer: Callable[[int, DeliveryError | None], None] | None = None,
) -> list[DeliveryError | None]:
    """C-STORE files to a DICOM destination over one association, each in its stored
    transfer syntax; returns, per file, None (the PACS kept it) or why not.

    ``on_answer(index, outcome)`` is called as soon as the PACS has answered a file, so a
    caller can record it before the next file goes (the ledger follows the PACS closely).

    One association for a study's SR and SEG instead of one each: association set-up and
    release are most of the cost of a small C-STORE. A file that cannot be read fails
    alone; an association that is refused or lost fails the files it did not store.
    """
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    outcome: list[DeliveryError | None] = [None] * len(paths)
    datasets: dict[int, Any] = {}
    for i, path in enumerate(paths):
        try:
            datasets[i] = dcmread(path)
        except Exception as exc:  # a damaged file must not hold up the others
            outcome[i] = DeliveryError(f"result file {path} is not readable: {exc}")
    if not datasets:
        return outcome
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    contexts = dict.fromkeys(
        (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets.values()
    )
    for sop_class, ts in contexts:
        syntaxes = list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        how = "rejected the association" if assoc.is_rejected else "is unreachable"
        for i in datasets:
            outcome[i] = DeliveryError(f"{dest.key} {how}")
        return outcome
    _no_delay(assoc)
    try:
        for i, ds in datasets.items():
            if not assoc.is_established:
                outcome[i] = DeliveryError(f"{dest.key}: the association ended before this file")
                continue
            outcome[i] = _store_outcome(dest, assoc.send_c_store(ds))
            if on_answer is not None:
                on_answer(i, outcome[i])
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


def _no_delay(assoc: Any) -> None:
    """Turn Nagle's algorithm off on the association's socket: the last, short PDU of a
    data set otherwise waits for the PACS's delayed ACK (an ad-hoc loopback test: SR + SEG to
    Orthanc in about 0.19 s instead of 0.25 s). Best effort: pynetdicom has no option for it."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # TLS wrappers and test doubles may refuse it
        pass


def _store_outcome(dest: Destination, status: Any) -> DeliveryError | None:
    code = getattr(status, "Status", None)
    if code is None:
        return DeliveryError(f"{dest.key}: no C-STORE response (connection lost or timed out)")
    # Success and Warning (coercion, elements discarded ...) mean the PACS kept the instance.
    if code_to_category(int(code)) not in (STATUS_SUCCESS, STATUS_WARNING):
        comment = getattr(status, "ErrorComment", "")
        return DeliveryError(f"{dest.key}: C-STORE failed with status 0x{code:04X} {comment}")
    return None


def send_stow(dest: Destination, path: Path, timeout: float = SEND_TIMEOUT_SECONDS) -> None:
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
    """Background delivery of due outbox rows (one thread in the node process).

    The thread sleeps until woken (:mod:`node.wakeup`: a worker of this process or, through
    Redis, of another committed new rows) or ``poll_seconds`` have passed (retries,
    a lost wake-up). A study's files to one DICOM destination go over one association.
    """

    def __init__(
        self,
        outbox: Outbox,
        destinations: list[Destination],
        calling_ae: str,
        *,
        broker_url: str = "",
    ) -> None:
        self.outbox = outbox
        self.destinations = {d.key: d for d in destinations}
        self.calling_ae = calling_ae
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._remote: wakeup.RemoteWakeups | None = None
        if broker_url and wakeup.is_redis(broker_url):
            self._remote = wakeup.RemoteWakeups(broker_url, self._wake)

    def deliver_due(self) -> int:
        """One pass over the due rows; returns how many were delivered."""
        claimed = self.outbox.due()
        outcomes: dict[int, Exception | None] = {}
        dicom: dict[str, list[Delivery]] = {}
        for d in claimed:
            dest = self.destinations.get(d.destination)
            if dest is None:
                error = f"destination {d.destination} is no longer configured"
                outcomes[d.id] = DeliveryError(error)
            elif not Path(d.path).is_file():
                outcomes[d.id] = DeliveryError(f"result file {d.path} is missing")
            elif dest.kind == "dicomweb":
                try:
                    send_stow(dest, Path(d.path))
                    outcomes[d.id] = None
                except Exception as exc:
                    outcomes[d.id] = exc
            else:
                dicom.setdefault(dest.key, []).append(d)
        delivered = sum(self._settle(d, outcomes[d.id]) for d in claimed if d.id in outcomes)
        for key, rows in dicom.items():
            delivered += self._send_dicom(self.destinations[key], rows)
        return delivered

    def _send_dicom(self, dest: Destination, rows: list[Delivery]) -> int:
        """Send ``rows`` over one association, recording each as the PACS answers it;
        returns how many were delivered."""
        settled: dict[int, bool] = {}

        def answered(i: int, outcome: DeliveryError | None) -> None:
            settled[i] = self._settle(rows[i], outcome)

        sent: list[Exception | None]
        try:
            paths = [Path(d.path) for d in rows]
            sent = list(send_dicom_files(dest, paths, self.calling_ae, on_answer=answered))
        except Exception as exc:
            sent = [exc] * len(rows)
        for i, (d, outcome) in enumerate(zip(rows, sent, strict=True)):
            if i not in settled:  # refused association, unreadable file, an exception
                settled[i] = self._settle(d, outcome)
        return sum(settled.values())

    def _settle(self, d: Delivery, exc: Exception | None) -> bool:
        """Record one claimed row's attempt; True when it was delivered."""
        if isinstance(exc, DeliveryError):
            state = self.outbox.mark_failed(d.id, str(exc))
            if state is None:
                log.warning("delivery %d was taken over by another sender meanwhile", d.id)
                return False
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
            return False
        if exc is not None:
            self.outbox.mark_failed(d.id, f"internal error: {exc!r}")
            log.error("delivery %d failed unexpectedly: %r", d.id, exc)
            return False
        if not self.outbox.mark_delivered(d.id):
            log.warning("delivery %d was taken over by another sender meanwhile", d.id)
            return False
        log.info(
            "%s %s of study %s v%d delivered to %s",
            d.kind.upper(),
            d.sop_instance_uid,
            d.study_uid,
            d.study_version,
            d.destination,
        )
        return True

    def wake(self) -> None:
        """Look for due rows now instead of at the next poll."""
        self._wake.set()

    def start(self, poll_seconds: float) -> None:
        def loop() -> None:
            while True:
                self._wake.wait(poll_seconds)
                self._wake.clear()
                if self._stop.is_set():
                    return
                try:
                    self.deliver_due()
                except Exception:
                    log.exception("outbox pass failed; continuing")

        wakeup.listen(self._wake)
        if self._remote is not None:
            self._remote.start()
        self._thread = threading.Thread(target=loop, name="medgemma-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        wakeup.unlisten(self._wake)
        if self._remote is not None:
            self._remote.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
