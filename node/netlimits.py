"""Limits on what a DICOM peer can make the node hold, and what of its text reaches the log.

A peer is anyone who can open a TCP connection to the SCP: the calling AE title is only
checked once a whole A-ASSOCIATE-RQ has been read, so every bound here holds before it.

- Time: an A-ASSOCIATE-RQ must be complete ``acse_timeout`` seconds after the connection
  opened, and every later PDU ``network_timeout`` seconds after its first byte (pynetdicom's
  own timers do not run while a read blocks; a peer sending one byte a minute held a slot
  forever). A TLS handshake gets ``acse_timeout`` too, in the connection's own thread.
- Connections: at most ``max_associations_per_host`` open connections per peer address.
- Bytes: the PDU length is checked from the header, before anything is read into memory:
  P-DATA-TF at most the maximum length the node announced, any other PDU at most
  :data:`MAX_CONTROL_PDU`; a command set at most :data:`MAX_COMMAND_SET`; a C-STORE dataset
  at most ``max_dataset_mb``, any other message's dataset at most :data:`MAX_OTHER_DATASET`.
  A breach is answered with A-ABORT (invalid PDU parameter value) and the connection closed.
- Log text: :func:`peer_text` is how any string a peer sent (AE titles, UIDs, values, error
  texts that quote them) is written into a log line; :func:`install_pynetdicom_log_filter`
  makes pynetdicom's own lines single lines without tracebacks.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("medgemma.scp")

PDU_HEADER = 6
A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
# 128 presentation contexts of 20 transfer syntaxes each are about 70 KiB.
MAX_CONTROL_PDU = 1 << 20
# A command set is some 200 bytes.
MAX_COMMAND_SET = 64 << 10
# The SCP answers only C-STORE and C-ECHO; pynetdicom keeps other datasets in memory.
MAX_OTHER_DATASET = 1 << 20
C_STORE_RQ = 0x0001
_PDV_HEADER = 6  # item length (4), presentation context ID (1), message control header (1)
# A-ABORT, source 2 (service provider), reason 6 (invalid PDU parameter value): PS3.8 9.3.8.
A_ABORT_INVALID_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])
_PEER_TEXT_LIMIT = 200


def peer_text(value: object, limit: int = _PEER_TEXT_LIMIT) -> str:
    """``value`` as text fit for one log line: control and other unprintable characters
    written as escapes (``\\r``, ``\\n``, ``\\x1b``), at most ``limit`` characters."""
    text = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
    if len(text) > limit:
        text = f"{text[:limit]}...(+{len(text) - limit} chars)"
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


# --- limits on one connection ------------------------------------------------------------


class PeerLimitExceeded(OSError):
    """A peer broke a limit; the message says which, in one line. An OSError so that
    pynetdicom's reader treats it as a closed connection."""


class PduTimeout(PeerLimitExceeded, TimeoutError):
    """A PDU (or the A-ASSOCIATE-RQ) was not complete in time."""


@dataclass(frozen=True)
class PeerLimits:
    """What one connection may cost. Seconds and bytes."""

    associate_seconds: float  # connection opened -> A-ASSOCIATE-RQ complete
    pdu_seconds: float  # first byte of a PDU -> its last byte
    max_pdata_bytes: int  # the maximum PDU length the node announced
    max_dataset_bytes: int  # one C-STORE dataset as received

    def __post_init__(self) -> None:
        for name in ("associate_seconds", "pdu_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PeerLimits.{name} must be > 0 seconds")
        for name in ("max_pdata_bytes", "max_dataset_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"PeerLimits.{name} must be >= 1 byte")


def _command_field(command_set: bytes) -> int | None:
    """(0000,0100) Command Field of an encoded command set (implicit VR little endian)."""
    pos = 0
    while pos + 8 <= len(command_set):
        group, element, length = struct.unpack_from("<HHL", command_set, pos)
        pos += 8
        if (group, element) == (0x0000, 0x0100) and length == 2 and pos + 2 <= len(command_set):
            return int(struct.unpack_from("<H", command_set, pos)[0])
        pos += length
    return None


class PeerStream:
    """Follows the PDUs (and the P-DATA message fragments) a peer sends, byte by byte, and
    raises :class:`PeerLimitExceeded` as soon as a header announces too much."""

    def __init__(self, limits: PeerLimits, host: str, opened_at: float) -> None:
        self.limits = limits
        self.host = host
        self.opened_at = opened_at
        self.pdus = 0  # complete PDUs so far
        self._header = bytearray()
        self._pdu_type = 0
        self._pdu_left = 0
        self._pdu_deadline = 0.0
        # P-DATA-TF: the PDV item being read, and the message it belongs to
        self._pdv_header = bytearray()
        self._pdv_left = 0
        self._pdv_is_command = False
        self._pdv_last = False
        self._command = bytearray()
        self._command_bytes = 0
        self._command_done = False
        self._dataset_bytes = 0
        self._dataset_limit = MAX_OTHER_DATASET

    @property
    def between_pdus(self) -> bool:
        return not self._header and self._pdu_left == 0

    def seconds_left(self, now: float) -> float:
        """Time left for the PDU being read; a new PDU starts at ``now``."""
        if self.between_pdus:
            self._pdu_deadline = now + self.limits.pdu_seconds
        deadline = self._pdu_deadline
        if self.pdus == 0:
            deadline = min(deadline, self.opened_at + self.limits.associate_seconds)
        return deadline - now

    def timeout_message(self) -> str:
        if self.pdus == 0:
            return (
                f"A-ASSOCIATE-RQ from {self.host} not complete "
                f"{self.limits.associate_seconds:g} s after the connection opened"
            )
        return f"PDU from {self.host} not complete {self.limits.pdu_seconds:g} s after it began"

    def feed(self, data: bytes | memoryview) -> None:
        """Account for ``data``, the next bytes the peer sent."""
        pos = 0
        while pos < len(data):
            if self._pdu_left == 0:
                take = min(PDU_HEADER - len(self._header), len(data) - pos)
                self._header += data[pos : pos + take]
                pos += take
                if len(self._header) == PDU_HEADER:
                    self._start_pdu()
                continue
            take = min(self._pdu_left, len(data) - pos)
            if self._pdu_type == P_DATA_TF:
                self._feed_pdata(data[pos : pos + take])
            pos += take
            self._pdu_left -= take
            if self._pdu_left == 0:
                self._end_pdu()

    def _start_pdu(self) -> None:
        pdu_type, _, length = struct.unpack(">BBL", self._header)
        limit = self.limits.max_pdata_bytes if pdu_type == P_DATA_TF else MAX_CONTROL_PDU
        if length > limit:
            name = "A-ASSOCIATE-RQ" if pdu_type == A_ASSOCIATE_RQ else f"PDU type 0x{pdu_type:02X}"
            raise PeerLimitExceeded(
                f"{name} of {length} bytes from {self.host} exceeds the limit of {limit} bytes"
            )
        self._pdu_type = pdu_type
        self._pdu_left = length
        if length == 0:
            self._end_pdu()

    def _end_pdu(self) -> None:
        self._header.clear()
        self.pdus += 1

    def _feed_pdata(self, data: bytes | memoryview) -> None:
        pos = 0
        while pos < len(data):
            if self._pdv_left == 0:
                take = min(_PDV_HEADER - len(self._pdv_header), len(data) - pos)
                self._pdv_header += data[pos : pos + take]
                pos += take
                if len(self._pdv_header) == _PDV_HEADER:
                    self._start_pdv()
                continue
            take = min(self._pdv_left, len(data) - pos)
            self._message_bytes(data[pos : pos + take])
            pos += take
            self._pdv_left -= take
            if self._pdv_left == 0:
                self._end_pdv()

    def _start_pdv(self) -> None:
        length, _, control = struct.unpack(">LBB", self._pdv_header)
        self._pdv_is_command = bool(control & 1)
        self._pdv_last = bool(control & 2)
        self._pdv_left = max(0, length - 2)  # the length counts context ID and control byte
        if self._pdv_left == 0:
            self._end_pdv()

    def _message_bytes(self, chunk: bytes | memoryview) -> None:
        if self._pdv_is_command:
            self._command_bytes += len(chunk)
            if self._command_bytes > MAX_COMMAND_SET:
                raise PeerLimitExceeded(
                    f"command set from {self.host} exceeds {MAX_COMMAND_SET} bytes"
                )
            self._command += chunk
            return
        self._dataset_bytes += len(chunk)
        if self._dataset_bytes > self._dataset_limit:
            what = "C-STORE dataset" if self._dataset_limit != MAX_OTHER_DATASET else "dataset"
            raise PeerLimitExceeded(
                f"{what} from {self.host} exceeds the limit of {self._dataset_limit} bytes"
            )

    def _end_pdv(self) -> None:
        self._pdv_header.clear()
        if not self._pdv_last:
            return
        if self._pdv_is_command:
            store = _command_field(bytes(self._command)) == C_STORE_RQ
            self._dataset_limit = self.limits.max_dataset_bytes if store else MAX_OTHER_DATASET
            self._command.clear()
            self._command_bytes = 0
            self._dataset_bytes = 0
        else:
            self._dataset_bytes = 0


class _LimitedRecv:
    """What the node's accepted sockets (plain and TLS) add: a deadline on every read, the
    byte limits of :class:`PeerStream`, and a callback when the socket is closed."""

    peer_stream: PeerStream | None = None
    idle_timeout: float | None = None
    on_close: Any = None  # Callable[[], None] | None

    def recv(self, bufsize: int = 1024, flags: int = 0, /) -> bytes:
        stream = self.peer_stream
        if stream is None:
            return super().recv(bufsize, flags)  # type: ignore[misc]
        self._before_read(stream)
        try:
            data: bytes = super().recv(bufsize, flags)  # type: ignore[misc]
        except TimeoutError:
            raise PduTimeout(stream.timeout_message()) from None
        finally:
            self.settimeout(self.idle_timeout)  # type: ignore[attr-defined]
        self._account(stream, memoryview(data))
        return data

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        """As :meth:`recv`, into ``buffer`` (no copy of the bytes read)."""
        args = (buffer,) if nbytes is None else (buffer, nbytes, flags)
        stream = self.peer_stream
        if stream is None:
            return int(super().recv_into(*args))  # type: ignore[misc]
        self._before_read(stream)
        try:
            count = int(super().recv_into(*args))  # type: ignore[misc]
        except TimeoutError:
            raise PduTimeout(stream.timeout_message()) from None
        finally:
            self.settimeout(self.idle_timeout)  # type: ignore[attr-defined]
        self._account(stream, memoryview(buffer)[:count])
        return count

    def _before_read(self, stream: PeerStream) -> None:
        left = stream.seconds_left(time.monotonic())
        if left <= 0:
            raise PduTimeout(stream.timeout_message())
        self.settimeout(left)  # type: ignore[attr-defined]

    def _account(self, stream: PeerStream, data: memoryview) -> None:
        """Feed what was read to the byte limits (a view: its slices copy nothing)."""
        try:
            stream.feed(data)
        except PeerLimitExceeded:
            self._send_abort()
            raise

    def _send_abort(self) -> None:
        try:
            self.settimeout(1.0)  # type: ignore[attr-defined]
            self.sendall(A_ABORT_INVALID_PARAMETER)  # type: ignore[attr-defined]
        except OSError:
            pass  # the peer may be gone already; the connection is closed either way

    def close(self) -> None:
        callback, self.on_close = self.on_close, None
        try:
            super().close()  # type: ignore[misc]
        finally:
            if callback is not None:
                callback()


class PeerSocket(_LimitedRecv, socket.socket):
    """An accepted plain TCP connection with the peer limits."""

    @classmethod
    def adopt(cls, sock: socket.socket) -> PeerSocket:
        """Take over an accepted socket (``sock`` is detached and must not be used)."""
        timeout = sock.gettimeout()
        adopted = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        adopted.settimeout(timeout)
        return adopted


class TlsPeerSocket(_LimitedRecv, ssl.SSLSocket):
    """An accepted TLS connection with the peer limits (``SSLContext.sslsocket_class``)."""


def limit_connection(
    sock: socket.socket,
    limits: PeerLimits,
    host: str,
    idle_timeout: float | None,
    on_close: Any = None,
) -> None:
    """Put ``limits`` on an accepted :class:`PeerSocket` or :class:`TlsPeerSocket`."""
    if not isinstance(sock, _LimitedRecv):
        raise TypeError(f"limit_connection needs a PeerSocket or TlsPeerSocket, not {sock!r}")
    sock.peer_stream = PeerStream(limits, host, time.monotonic())
    sock.idle_timeout = idle_timeout
    sock.on_close = on_close
    sock.settimeout(idle_timeout)


class HostSlots:
    """Open connections per peer address, at most ``per_host`` each."""

    def __init__(self, per_host: int) -> None:
        if per_host < 1:
            raise ValueError("HostSlots per_host must be >= 1")
        self.per_host = per_host
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, host: str) -> bool:
        with self._lock:
            count = self._open.get(host, 0)
            if count >= self.per_host:
                return False
            self._open[host] = count + 1
            return True

    def release(self, host: str) -> None:
        with self._lock:
            count = self._open.get(host, 0) - 1
            if count > 0:
                self._open[host] = count
            else:
                self._open.pop(host, None)

    def open_connections(self, host: str) -> int:
        with self._lock:
            return self._open.get(host, 0)


def admit_host(host: str, allowed: frozenset[str], slots: HostSlots | None) -> bool:
    """Whether a new connection from ``host`` may go on: ``host`` is in ``allowed`` (when
    that is not empty) and, with ``slots``, a slot of the host was taken (the caller releases
    it when the connection ends). A refusal is logged; the caller closes the connection."""
    if allowed and host not in allowed:
        log.warning("refused connection from host %s: not in dicom.allowed_hosts", host)
        return False
    if slots is not None and not slots.acquire(host):
        log.warning(
            "refused connection from host %s: it has %d connections open "
            "(dicom.max_associations_per_host)",
            host,
            slots.per_host,
        )
        return False
    return True


# --- deflated datasets -------------------------------------------------------------------


class InflateLimitExceeded(ValueError):
    """A deflated dataset inflates to more than the limit."""


class InflateError(ValueError):
    """A deflated dataset is not a complete deflate stream."""


def inflate_limited(source: Path, offset: int, target: Path, limit: int) -> int:
    """Inflate the raw deflate stream in ``source`` from byte ``offset`` into ``target``,
    appending, never holding more than one chunk in memory. Returns the inflated size.

    Raises :class:`InflateLimitExceeded` past ``limit`` bytes (nothing more is written) and
    :class:`InflateError` for a stream that is corrupt or ends early.
    """
    chunk = 1 << 20
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with source.open("rb") as src, target.open("ab") as dst:
        src.seek(offset)
        pending = b""
        while not inflater.eof:
            if not pending:
                pending = src.read(chunk)
                if not pending:
                    break
            try:
                out = inflater.decompress(pending, chunk)
            except zlib.error as exc:
                raise InflateError(f"deflate stream is corrupt ({exc})") from None
            pending = inflater.unconsumed_tail
            total += len(out)
            if total > limit:
                raise InflateLimitExceeded(f"inflates to more than {limit} bytes")
            dst.write(out)
    if not inflater.eof:
        raise InflateError("deflate stream ends early")
    return total


# --- pynetdicom's log lines --------------------------------------------------------------

# pynetdicom logs these, then the exception with its traceback: one event, one line here.
_PYNETDICOM_LEADS = frozenset(
    {
        "Connection closed before the entire PDU was received",
        "Unable to decode the received PDU data",
    }
)


class OneLineFilter(logging.Filter):
    """pynetdicom's records as single lines: peer text escaped, no traceback, the line it
    logs before an exception merged with the exception."""

    def __init__(self) -> None:
        super().__init__()
        self._lead = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "pynetdicom.utils" and message.startswith("Invalid '"):
            return False  # an invalid AE title or UID: raised next, and logged with the PDU
        if message in _PYNETDICOM_LEADS and not record.exc_info:
            self._lead.text = message
            return False
        lead = getattr(self._lead, "text", None)
        self._lead.text = None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            detail = f"{type(exc).__name__}: {exc}"
            message = detail if message == str(exc) else f"{message} ({detail})"
            record.exc_info = None
            record.exc_text = None
        if lead:
            message = f"{lead}: {message}"
        record.msg = peer_text(message, limit=1000)
        record.args = None
        return True


_filter_lock = threading.Lock()
_installed: set[str] = set()


def install_pynetdicom_log_filter() -> None:
    """Attach :class:`OneLineFilter` to every pynetdicom logger (a filter on the parent
    logger does not see its children's records). Idempotent."""
    import pynetdicom  # noqa: F401  (its modules create their loggers on import)

    with _filter_lock:
        names = [
            name
            for name in list(logging.Logger.manager.loggerDict)
            if name == "pynetdicom" or name.startswith("pynetdicom.")
        ]
        shared = OneLineFilter()
        for name in names:
            if name not in _installed:
                logging.getLogger(name).addFilter(shared)
                _installed.add(name)
