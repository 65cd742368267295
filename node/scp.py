"""The DICOM SCP: the AE, its presentation contexts, and the C-ECHO / C-STORE handlers.

The C-STORE handler saves, records and answers; it never decodes pixels or runs inference.
A success status is sent only after the file is fsynced in the spool and its row is
committed in the ledger.
"""

from __future__ import annotations

import logging
import mmap
import os
import socketserver
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    HEVCM10P51,
    HEVCMP51,
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    MPEG2MPHL,
    MPEG2MPHLF,
    MPEG2MPML,
    MPEG2MPMLF,
    MPEG4HP41,
    MPEG4HP41BD,
    MPEG4HP41BDF,
    MPEG4HP41F,
    MPEG4HP42STEREO,
    MPEG4HP42STEREOF,
    MPEG4HP422D,
    MPEG4HP422DF,
    MPEG4HP423D,
    MPEG4HP423DF,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import Status
from pynetdicom.transport import ThreadedAssociationServer

from node.ledger import InstanceHeader, StudyLedger
from node.netlimits import (
    HostSlots,
    InflateError,
    InflateLimitExceeded,
    PeerLimits,
    PeerSocket,
    TlsPeerSocket,
    admit_host,
    inflate_limited,
    install_pynetdicom_log_filter,
    limit_connection,
    peer_text,
)
from node.pynetdicom_io import decode_without_copies, read_in_large_chunks
from node.settings import DicomSettings, TlsSettings
from node.spool import (
    DISK_FULL,
    OutOfSpace,
    ReceivingFile,
    Spool,
    SpoolError,
    is_valid_uid,
    sha256_of,
)

log = logging.getLogger("medgemma.scp")


class StoreStatus(IntEnum):
    """C-STORE response statuses (PS3.4 Table B.2-1 and PS3.7 C.4), used by name only."""

    SUCCESS = int(Status.SUCCESS)
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


#: Deflated Image Frame Compression (SEG files use it): pydicom 3.0 does not know the UID
#: yet. Its dataset is explicit VR little endian; its frames are encapsulated.
DEFLATED_IMAGE_FRAME_COMPRESSION = UID("1.2.840.10008.1.2.8.1")

# Stored as received, never transcoded or decoded here (the reader decodes what it can and
# says which syntax it cannot). Refused (README "Transfer syntaxes"): JPEG XL (pydicom 3.0
# does not know it), JPIP (pixel data by reference) and SMPTE ST 2110 (network video).
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    JPEG2000MCLossless,
    JPEG2000MC,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    DEFLATED_IMAGE_FRAME_COMPRESSION,
    MPEG2MPML,
    MPEG2MPMLF,
    MPEG2MPHL,
    MPEG2MPHLF,
    MPEG4HP41,
    MPEG4HP41F,
    MPEG4HP41BD,
    MPEG4HP41BDF,
    MPEG4HP422D,
    MPEG4HP422DF,
    MPEG4HP423D,
    MPEG4HP423DF,
    MPEG4HP42STEREO,
    MPEG4HP42STEREOF,
    HEVCMP51,
    HEVCM10P51,
]

# Large values (pixel data) are not loaded while the header is checked.
_DEFER_SIZE = 4096

# Receive datasets straight to a temporary file instead of memory; the handler moves it.
_config.STORE_RECV_CHUNKED_DATASET = True

# pynetdicom makes that file with tempfile.NamedTemporaryFile, in $TMPDIR, and leaves it
# there when the transfer stops half-way; a write error there (disk full) aborts the
# association. Our AEs receive into their spool's receive directory instead (on the spool's
# disk, emptied at start) through a ReceivingFile, whose write errors the C-STORE handler
# answers with Out of Resources; other AEs keep the default.
_receive_dirs: weakref.WeakKeyDictionary[AE, Path] = weakref.WeakKeyDictionary()
_named_temporary_file = dimse_messages.NamedTemporaryFile
# path -> the file a dataset is being received into, while pynetdicom holds it
_receiving: weakref.WeakValueDictionary[str, ReceivingFile] = weakref.WeakValueDictionary()


def _receive_file(*args: Any, **kwargs: Any) -> Any:
    """A ReceivingFile in the receive directory of the AE whose association this is
    (pynetdicom calls it in the association's DUL thread, which knows its association)."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    ae = getattr(assoc, "ae", None)
    directory = _receive_dirs.get(ae) if isinstance(ae, AE) else None
    if directory is None:
        return _named_temporary_file(*args, **kwargs)
    # the process id in the name: a receiving process's partial files can be removed when
    # it dies (node.receivers), without waiting for the next start
    prefix = f"rx-{os.getpid()}-"
    receiving = ReceivingFile(directory, prefix=prefix, suffix=kwargs.get("suffix", ".dcm"))
    _receiving[str(Path(receiving.name))] = receiving
    return receiving


dimse_messages.NamedTemporaryFile = _receive_file


def storage_contexts() -> list[PresentationContext]:
    """Every storage SOP class pynetdicom knows, each with the accepted transfer syntaxes."""
    contexts = []
    for cx in AllStoragePresentationContexts:
        pc = PresentationContext()
        pc.abstract_syntax = cx.abstract_syntax
        pc.transfer_syntax = list(ACCEPTED_TRANSFER_SYNTAXES)
        contexts.append(pc)
    verification = PresentationContext()
    verification.abstract_syntax = Verification
    verification.transfer_syntax = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    contexts.append(verification)
    return contexts


def make_ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """A server TLS context from configuration, or None when TLS is off."""
    if not tls.enabled:
        return None
    if not tls.cert_file or not tls.key_file:
        raise ValueError("dicom.tls.enabled needs dicom.tls.cert_file and dicom.tls.key_file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        context.load_verify_locations(cafile=tls.ca_file)
    if tls.require_client_cert:
        if not tls.ca_file:
            raise ValueError("dicom.tls.require_client_cert needs dicom.tls.ca_file")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _HostCheckingServer(ThreadedAssociationServer):
    """Closes connections from hosts outside ``allowed_hosts``, and those beyond a host's
    share of slots, before any PDU is read; puts the peer limits (node.netlimits) on the
    others; does TLS handshakes in the connection's thread, within ``limits``."""

    allowed_hosts: frozenset[str] = frozenset()
    limits: PeerLimits | None = None
    slots: HostSlots | None = None
    idle_timeout: float | None = None

    def __init__(self, *args: Any, handed: Any = None, **kwargs: Any) -> None:
        # handed: serve the connections this object's accept() returns (a receiving
        # process, node.receivers) instead of binding a port
        self.handed = handed
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.handed is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()
        self.socket = self.handed

    def server_activate(self) -> None:
        if self.handed is None:
            super().server_activate()

    def get_request(self) -> tuple[Any, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()
        sock: Any = PeerSocket.adopt(client)
        if self.ssl_context is not None:
            # the handshake happens in process_request_thread: here it would block the accept loop
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        if not admit_host(host, self.allowed_hosts, self.slots):
            return False
        if self.slots is not None:
            slots = self.slots
            on_close = lambda: slots.release(host)  # noqa: E731
        else:
            on_close = None
        if self.limits is not None:
            limit_connection(request, self.limits, host, self.idle_timeout, on_close)
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            timeout = self.limits.associate_seconds if self.limits is not None else None
            try:
                request.settimeout(timeout)
                request.do_handshake()
                request.settimeout(self.idle_timeout)
            except (OSError, ValueError) as exc:
                log.warning(
                    "TLS handshake with %s failed: %s",
                    client_address[0],
                    peer_text(f"{type(exc).__name__}: {exc}"),
                )
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def shutdown(self) -> None:
        """Stop serving and close the socket.

        Made by ``AE.make_server``, this server is not in the AE's own server list, which the
        inherited ``shutdown`` would try to remove it from.
        """
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def _end_unassociated_connection(event: evt.Event) -> None:
    """End the association of a connection the peer closed before its A-ASSOCIATE-RQ was
    complete (a load balancer's TCP health check, a port probe, a peer gone mid-request).

    pynetdicom's acceptor thread waits ``acse_timeout`` for the request and counts against
    ``max_associations`` meanwhile: 16 probes locked every sender out for 30 s. Its DUL
    (state Sta2, transport open, nothing received) only closes the socket; the ``None``
    put in the thread's queue is what it reads when that wait times out, so it ends now.
    """
    dul = event.assoc.dul
    if event.assoc.is_acceptor and dul.state_machine.current_state == "Sta2":
        queue: Any = dul.to_user_queue  # holds primitives; None is its "nothing came"
        queue.put(None)


def _read_large_chunks(event: evt.Event) -> None:
    """A new connection reads its PDUs in large chunks and decodes its P-DATA PDUs
    without copying their values (node.pynetdicom_io)."""
    read_in_large_chunks(event.assoc)
    decode_without_copies(event.assoc)


def _failure(status: StoreStatus, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = int(status)
    ds.ErrorComment = comment[:64]  # LO: 64 characters
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


@dataclass
class StoreCounters:
    stored: int = 0
    duplicates: int = 0
    refused: int = 0


class StorageSCP:
    """The node's DICOM listener. ``on_release`` gets the study ids an association touched
    and the peer's address, when the association ends."""

    def __init__(
        self,
        settings: DicomSettings,
        spool: Spool,
        ledger: StudyLedger,
        on_release: Callable[[set[int], str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.ledger = ledger
        self.on_release = on_release
        self.counters = StoreCounters()
        self._touched: dict[int, set[int]] = {}
        self._touched_lock = threading.Lock()
        self._server: _HostCheckingServer | None = None
        self._thread: threading.Thread | None = None

        ae = AE(ae_title=settings.ae_title)
        ae.supported_contexts = storage_contexts()
        ae.maximum_associations = settings.max_associations
        ae.acse_timeout = settings.acse_timeout
        ae.dimse_timeout = settings.dimse_timeout
        ae.network_timeout = settings.network_timeout
        ae.maximum_pdu_size = settings.maximum_pdu_size
        ae.require_calling_aet = list(settings.allowed_callers)
        self.ae = ae
        _receive_dirs[ae] = spool.receive_dir
        self.limits = PeerLimits(
            associate_seconds=settings.acse_timeout,
            pdu_seconds=settings.network_timeout,
            max_pdata_bytes=settings.maximum_pdu_size,
            max_dataset_bytes=settings.max_dataset_mb * 2**20,
        )
        install_pynetdicom_log_filter()

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, handed: Any = None, slots: HostSlots | None = None) -> tuple[str, int]:
        """Start listening (non-blocking). Returns the bound (host, port).

        A receiving process (node.receivers) passes ``handed``, whose ``accept()`` returns
        the connections its parent hands over, and ``slots``, its per-host accounting."""
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_association_end),
            (evt.EVT_ABORTED, self._on_association_end),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, _end_unassociated_connection),
            (evt.EVT_CONN_OPEN, _read_large_chunks),
        ]
        ssl_context = make_ssl_context(self.settings.tls)
        if ssl_context is not None:
            ssl_context.sslsocket_class = TlsPeerSocket
        server = self.ae.make_server(
            (self.settings.bind_address, self.settings.port),
            ssl_context=ssl_context,
            evt_handlers=handlers,
            server_class=_HostCheckingServer,
            handed=handed,
        )
        assert isinstance(server, _HostCheckingServer)
        server.allowed_hosts = frozenset(self.settings.allowed_hosts)
        server.limits = self.limits
        server.slots = slots or HostSlots(self.settings.max_associations_per_host)
        server.idle_timeout = self.settings.network_timeout
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="medgemma-scp", daemon=True
        )
        self._thread.start()
        host, port = server.server_address[:2]
        log.info(
            "DICOM SCP %s %s %s:%d (max %d associations%s%s)",
            self.settings.ae_title,
            "listening on"
            if handed is None
            else "receiving connections the node process accepts on",
            host,
            port,
            self.settings.max_associations,
            ", TLS" if self.settings.tls.enabled else "",
            f", callers {self.settings.allowed_callers}" if self.settings.allowed_callers else "",
        )
        return str(host), int(port)

    def stop(self) -> None:
        """Stop accepting, then abort the associations still open."""
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.ae.shutdown()
        self._server = None
        self._thread = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return int(self._server.server_address[1])

    def host_connections(self, host: str) -> int:
        """Connections from ``host`` open now (accepted and not yet closed; 0 when the SCP
        is not running)."""
        server = self._server
        if server is None or server.slots is None:
            return 0
        return server.slots.open_connections(host)

    # --- handlers ----------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        log.info("C-ECHO from %s", peer_text(event.assoc.requestor.ae_title))
        return int(Status.SUCCESS)

    def _on_rejected(self, event: evt.Event) -> None:
        log.warning(
            "association from %s (%s) rejected (calling AE not allowed or too many associations)",
            peer_text(event.assoc.requestor.ae_title),
            event.assoc.requestor.address,
        )

    def _on_association_end(self, event: evt.Event) -> None:
        with self._touched_lock:
            touched = self._touched.pop(id(event.assoc), set())
        if touched and self.on_release is not None:
            try:
                self.on_release(touched, str(event.assoc.requestor.address))
            except Exception:
                log.exception("completing studies on association release failed")

    def _on_store(self, event: evt.Event) -> int | Dataset:
        started = time.monotonic()
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        request: Any = event.request
        rq_sop = str(request.AffectedSOPInstanceUID or "")
        path = Path(event.dataset_path)
        receiving = _receiving.get(str(path))
        # the digest also writes what is still in memory of a file written in blocks
        # (node.spool.ReceivingFile), so a full disk can show here first
        digest = receiving.digest() if receiving is not None else None
        if receiving is not None and receiving.error is not None:
            self.counters.refused += 1
            return self._receive_failed(receiving.error, calling_ae, rq_sop)
        try:
            rq_class = str(request.AffectedSOPClassUID or "")
            syntax = str(event.context.transfer_syntax)
            status = self._store(path, calling_ae, rq_class, rq_sop, digest, syntax)
        except Exception as exc:
            # Any unexpected failure: the sender gets a failure and may retry; nothing is lost.
            # One line (the traceback only at DEBUG): the message may quote what the peer sent.
            log.error(
                "C-STORE of SOP instance %s from %s failed: %s",
                peer_text(rq_sop),
                peer_text(calling_ae),
                peer_text(f"{type(exc).__name__}: {exc}"),
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            self.counters.refused += 1
            return _failure(StoreStatus.PROCESSING_FAILURE, "internal error while storing")
        if isinstance(status, Dataset):
            self.counters.refused += 1
        else:
            study_id = status
            with self._touched_lock:
                self._touched.setdefault(id(event.assoc), set()).add(study_id)
            log.debug(
                "stored %s in %.1f ms", peer_text(rq_sop), (time.monotonic() - started) * 1000
            )
            return int(Status.SUCCESS)
        return status

    def _receive_failed(self, error: OSError, calling_ae: str, rq_sop: str) -> Dataset:
        """The answer to a C-STORE whose dataset could not be written while it arrived
        (the partial file is already deleted, the rest of the dataset was dropped)."""
        log.error(
            "C-STORE of %s from %s refused: writing the received dataset into %s failed: %s",
            peer_text(rq_sop),
            peer_text(calling_ae),
            self.spool.receive_dir,
            error.strerror or type(error).__name__,
        )
        if error.errno in DISK_FULL:
            return _failure(StoreStatus.OUT_OF_RESOURCES, "out of disk space on the node")
        return _failure(StoreStatus.OUT_OF_RESOURCES, "cannot write the received dataset")

    def _store(
        self,
        path: Path,
        calling_ae: str,
        rq_class: str,
        rq_sop: str,
        digest: tuple[str, int] | None,
        transfer_syntax: str,
    ) -> int | Dataset:
        """Store one received file. Returns the study row id, or a failure status dataset.

        ``digest``: (SHA-256, size) computed while the file was received
        (:meth:`node.spool.ReceivingFile.digest`); used when the file still has that size,
        else the file is hashed here. ``transfer_syntax``: the presentation context's, which
        pynetdicom wrote into the file meta.
        """
        who, sop = peer_text(calling_ae), peer_text(rq_sop)
        limit = self.limits.max_dataset_bytes
        try:
            inflated = _inflated_copy(path, limit, transfer_syntax)
        except InflateLimitExceeded:
            log.warning(
                "C-STORE of %s from %s refused: deflated dataset inflates to more than %d MB "
                "(dicom.max_dataset_mb)",
                sop,
                who,
                self.settings.max_dataset_mb,
            )
            return _failure(
                StoreStatus.OUT_OF_RESOURCES,
                f"inflated dataset over {self.settings.max_dataset_mb} MB limit",
            )
        except (InflateError, OSError, ValueError) as exc:
            log.warning(
                "C-STORE of %s from %s refused: deflated dataset cannot be inflated (%s)",
                sop,
                who,
                peer_text(exc),
            )
            return _failure(StoreStatus.CANNOT_UNDERSTAND, "deflated dataset cannot be inflated")
        try:
            readable = path if inflated is None else inflated
            ds = dcmread(readable, defer_size=_DEFER_SIZE)
            ts = str(ds.file_meta.TransferSyntaxUID) if inflated is None else _DEFLATED
            _check_complete(ds, readable)
            header = InstanceHeader(
                study_uid=_text(ds, "StudyInstanceUID"),
                series_uid=_text(ds, "SeriesInstanceUID"),
                sop_instance_uid=_text(ds, "SOPInstanceUID"),
                sop_class_uid=_text(ds, "SOPClassUID"),
                transfer_syntax_uid=ts,
                modality=_text(ds, "Modality"),
                body_part=_text(ds, "BodyPartExamined"),
                view_position=_text(ds, "ViewPosition"),
                study_description=_text(ds, "StudyDescription"),
                series_description=_text(ds, "SeriesDescription"),
                protocol_name=_text(ds, "ProtocolName"),
                patient_id=_text(ds, "PatientID"),
                accession_number=_text(ds, "AccessionNumber"),
                study_date=_text(ds, "StudyDate"),
            )
        except Exception as exc:
            log.warning(
                "C-STORE of %s from %s refused: dataset cannot be parsed (%s)",
                sop,
                who,
                type(exc).__name__,
            )
            return _failure(StoreStatus.CANNOT_UNDERSTAND, "dataset cannot be parsed")
        finally:
            if inflated is not None:
                inflated.unlink(missing_ok=True)

        for keyword, value in (
            ("StudyInstanceUID", header.study_uid),
            ("SeriesInstanceUID", header.series_uid),
            ("SOPInstanceUID", header.sop_instance_uid),
        ):
            if not value:
                log.warning("C-STORE of %s from %s refused: no %s", sop, who, keyword)
                return _failure(StoreStatus.CANNOT_UNDERSTAND, f"missing {keyword}")
            if not is_valid_uid(value):
                log.warning("C-STORE of %s from %s refused: bad %s", sop, who, keyword)
                return _failure(StoreStatus.CANNOT_UNDERSTAND, f"invalid {keyword}")
        if header.sop_instance_uid != rq_sop or (rq_class and header.sop_class_uid != rq_class):
            log.warning(
                "C-STORE from %s refused: dataset SOP instance/class differ from the request (%s)",
                who,
                sop,
            )
            return _failure(
                StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOP Instance/Class UID differ from the C-STORE request",
            )

        if digest is not None and digest[1] == path.stat().st_size:
            sha256, size = digest
        else:
            sha256, size = sha256_of(path)
        # one SOP instance at a time across the node's associations and receiving processes:
        # its revision is decided, its file stored and its row committed under the lock
        with self.spool.instance_lock(header.sop_instance_uid):
            identical, latest_revision = self.ledger.lookup_instance(
                header.sop_instance_uid, sha256
            )
            if identical is not None:
                self.counters.duplicates += 1
                log.info(
                    "duplicate of %s (study %s) from %s: identical, already stored",
                    header.sop_instance_uid,
                    header.study_uid,
                    who,
                )
                return identical.study_id
            revision = latest_revision + 1
            try:
                relative = self.spool.relative_path(
                    header.study_uid, header.series_uid, header.sop_instance_uid, revision
                )
                self.spool.store_file(path, relative, sha256, size)
            except OutOfSpace as exc:
                log.error("C-STORE of %s refused: %s", header.sop_instance_uid, exc)
                return _failure(StoreStatus.OUT_OF_RESOURCES, "out of disk space on the node")
            except SpoolError as exc:
                log.error("C-STORE of %s failed: %s", header.sop_instance_uid, exc)
                return _failure(StoreStatus.OUT_OF_RESOURCES, "cannot write to the spool")
            outcome = self.ledger.record_instance(
                header,
                path=relative,
                sha256=sha256,
                size_bytes=size,
                revision=revision,
                calling_ae=calling_ae,
            )
        self.counters.stored += 1
        if revision > 1:
            log.warning(
                "SOP instance %s re-sent with different content: kept as revision %d "
                "(study %s version %d)",
                header.sop_instance_uid,
                revision,
                header.study_uid,
                outcome.study_version,
            )
        else:
            log.info(
                "stored %s (study %s v%d, %s, %d bytes) from %s",
                header.sop_instance_uid,
                header.study_uid,
                outcome.study_version,
                peer_text(header.modality or "?", limit=16),
                size,
                who,
            )
        return outcome.study_id


class IncompleteDataset(ValueError):
    pass


_DEFLATED = str(DeflatedExplicitVRLittleEndian)
# preamble, "DICM", then (0002,0000) File Meta Information Group Length: 12 bytes
_GROUP_LENGTH_END = 128 + 4 + 12


def _inflated_copy(path: Path, limit: int, transfer_syntax: str) -> Path | None:
    """For a received deflated dataset, a copy with the dataset inflated (Explicit VR
    Little Endian), written next to it, at most ``limit`` inflated bytes; None for any other
    transfer syntax (``transfer_syntax``, the presentation context's: the file is not read
    for it). pydicom would inflate the whole dataset in memory, however large.

    The file meta was written by pynetdicom (with its group length); the dataset after it is
    what the peer sent.
    """
    if transfer_syntax != _DEFLATED:
        return None
    meta = read_file_meta_info(path)
    if str(meta.get("TransferSyntaxUID", "")) != _DEFLATED:
        return None
    offset = _GROUP_LENGTH_END + int(meta.FileMetaInformationGroupLength)
    copy = path.with_name(path.name + ".inflated")
    try:
        explicit = FileMetaDataset(meta)
        explicit.TransferSyntaxUID = ExplicitVRLittleEndian
        with copy.open("wb") as f:
            f.write(b"\0" * 128 + b"DICM")
            write_file_meta_info(DicomFileLike(f), explicit)
        inflate_limited(path, offset, copy, limit)
    except BaseException:
        copy.unlink(missing_ok=True)
        raise
    return copy


def _check_complete(ds: Dataset, path: Path) -> None:
    """Raise IncompleteDataset when the received data stops before the dataset ends.

    pydicom skips large values (defer_size) and drops an encapsulated Pixel Data element
    whose sequence delimiter is missing, so a truncated stream would otherwise pass.
    """
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts == DeflatedExplicitVRLittleEndian:
        return  # _store reads an inflated copy (_inflated_copy) and checks that instead
    size = path.stat().st_size
    for tag in list(ds.keys()):
        elem = ds.get_item(tag, keep_deferred=True)
        offset = getattr(elem, "value_tell", None)
        length = getattr(elem, "length", None)
        if offset is not None and length is not None and length != 0xFFFFFFFF:
            if offset + length > size:
                raise IncompleteDataset(f"element {elem.tag} ends past the end of the data")
    if "PixelData" not in ds and _is_encapsulated(ts) and _has_undelimited_pixel_data(path):
        raise IncompleteDataset("encapsulated Pixel Data is truncated (no sequence delimiter)")


def _is_encapsulated(ts: UID | None) -> bool:
    if ts is None:
        return False
    if ts == DEFLATED_IMAGE_FRAME_COMPRESSION:
        return True
    return ts.is_transfer_syntax and ts.is_encapsulated


# An encapsulated Pixel Data element's header (explicit VR little endian, undefined length).
_ENCAPSULATED_PIXEL_DATA = (
    b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff",
    b"\xe0\x7f\x10\x00OW\x00\x00\xff\xff\xff\xff",
)


def _has_undelimited_pixel_data(path: Path) -> bool:
    """Whether the file holds an encapsulated Pixel Data element pydicom dropped (its
    sequence delimiter is missing: the stream was cut); a header-only file holds none."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return any(data.find(marker) >= 0 for marker in _ENCAPSULATED_PIXEL_DATA)
