"""The one place where the SCP replaces a piece of pynetdicom's receive path, for speed.

Checked against pynetdicom 3.0.4 (:data:`CHECKED_PYNETDICOM`);
tests/test_ingest_pynetdicom_io.py fails when pynetdicom changes what this relies on.

pynetdicom's DUL reads a PDU as ``dul.socket.recv(6)`` (the header) then
``dul.socket.recv(pdu_length)``, and :meth:`pynetdicom.transport.AssociationSocket.recv`
loops over ``socket.recv(4096)`` until it has ``nr_bytes``: about 2,500 Python-level calls
(each a syscall, plus the node's per-read deadline and byte accounting in
:mod:`node.netlimits`) per 10 MB dataset, a fifth of the SCP's CPU time in the profile.
:func:`read_in_large_chunks` gives one association's socket a ``recv`` with the same
contract that reads up to :data:`RECV_CHUNK` bytes at a time straight into the PDU's
buffer (``recv_into``), and its DUL a ``_read_pdu_data`` that reads a PDU's body into the
same buffer as its header (pynetdicom's ``bytestream += recv(...)`` copies it). The bytes
still go through the node's socket (:class:`node.netlimits.PeerSocket`), so every limit and
deadline holds exactly as before.

:func:`decode_without_copies` then gives the same association's DUL a ``_decode_pdu`` that
turns a P-DATA-TF PDU's presentation data values into views of the received PDU instead of
copying them: four copies of every received byte (about 5 ms of CPU per 10 MB dataset)
that pynetdicom makes before the dataset fragment reaches the file.

:class:`_ReadPdu` also writes the middle of a C-STORE dataset straight to its file: a
P-DATA-TF PDU that holds only dataset fragments, none of them the last, of the message
whose chunked dataset file is open, in state Sta6 with no PDU waiting to be processed,
only changes that file in pynetdicom (Sta6 + Evt10: DT-2, back to Sta6; the DIMSE layer
writes ``data[1:]`` of each value and flushes). The reader does just that, and goes on
reading while the next PDU is already there, instead of a round of pynetdicom's reactor,
queues, state machine, primitive and DIMSE decoding per PDU (about 80 per 10 MB dataset
from dcmtk). Everything else (the command set, the last fragment, any other PDU or state,
a handler bound to ``EVT_PDU_RECV``, ``EVT_DATA_RECV`` or ``EVT_FSM_TRANSITION``) goes
through pynetdicom as before; the byte limits and deadlines are the socket's, as above.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from pynetdicom import evt
from pynetdicom._handlers import standard_pdu_recv_handler
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.transport import AssociationSocket

#: The pynetdicom version whose DUL and AssociationSocket this module was checked against.
CHECKED_PYNETDICOM = "3.0.4"
#: The most one socket read asks for (a PDU's remaining bytes, up to this).
RECV_CHUNK = 1 << 20
#: The read-ahead buffer of each association's reader (:class:`_ChunkedRecv`): reads
#: shorter than this are served from it, longer ones go straight to their destination.
READ_AHEAD = 256 << 10
_P_DATA_TF_TYPE = 0x04
_ITEM_LENGTH = struct.Struct(">L")
_PDU_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length
_PDU_TYPES = frozenset(range(0x01, 0x08))  # A-ASSOCIATE-RQ (1) to A-ABORT (7)
_DUL_LOG = logging.getLogger("pynetdicom.dul")  # pynetdicom's DUL logs these lines there
_DATA_TRANSFER = "Sta6"  # the state in which a P-DATA-TF PDU is data (DT-2)


class _ChunkedRecv:
    """``AssociationSocket.recv(nr_bytes)``: read ``nr_bytes`` from the connection, blocking,
    and return them; fewer when the peer closed the connection first.

    Small reads (a PDU's header, a short PDU) are served from a read-ahead buffer of
    :data:`READ_AHEAD` bytes, filled with whatever the connection has (one socket read for
    what would be several); large ones are read straight into their destination. Bytes read
    ahead belong to later reads: :attr:`pending` says how many there are, and the socket's
    ``ready`` counts them (:class:`_ReadAheadSocket`), so pynetdicom's reactor still reads
    a PDU that arrived with the one before it."""

    __slots__ = ("_ahead", "_assoc_socket", "_end", "_start")

    def __init__(self, assoc_socket: Any) -> None:
        self._assoc_socket = assoc_socket
        self._ahead = bytearray(READ_AHEAD)
        self._start = 0  # the read-ahead bytes not consumed yet: _ahead[_start:_end]
        self._end = 0

    @property
    def pending(self) -> int:
        return self._end - self._start

    def __call__(self, nr_bytes: int) -> bytearray:
        data = bytearray(nr_bytes)
        with memoryview(data) as view:
            got = self.read_into(view)
        del data[got:]
        return data

    def read_into(self, view: memoryview) -> int:
        """Fill ``view`` from the connection, blocking; the bytes read, fewer than
        ``len(view)`` when the peer closed the connection first."""
        nr_bytes = len(view)
        got = self._drain(view)
        while got < nr_bytes:
            if nr_bytes - got >= READ_AHEAD:  # large: straight into the destination
                sock = self._assoc_socket.socket
                if sock is None:  # closed on our side: as the peer closing it
                    break
                count = sock.recv_into(view[got:], min(nr_bytes - got, RECV_CHUNK))
                if not count:  # connection closed: what was read so far, as pynetdicom does
                    break
                got += count
                continue
            if not self._fill():
                break
            got += self._drain(view[got:])
        return got

    def _drain(self, view: memoryview) -> int:
        """Move read-ahead bytes into ``view``; how many."""
        take = min(len(view), self._end - self._start)
        if take:
            view[:take] = self._ahead[self._start : self._start + take]
            self._start += take
        return take

    def _fill(self) -> bool:
        """Read what the connection has (at least one byte, blocking) after the pending
        bytes; False when the peer closed the connection."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start and READ_AHEAD - self._end < READ_AHEAD // 2:
            # little room left after the pending bytes (a few, usually): move them first
            pending = self._end - self._start
            self._ahead[:pending] = self._ahead[self._start : self._end]
            self._start, self._end = 0, pending
        sock = self._assoc_socket.socket
        if sock is None:  # closed on our side (pending bytes may remain): nothing more
            return False
        with memoryview(self._ahead) as ahead:
            count = int(sock.recv_into(ahead[self._end :], READ_AHEAD - self._end))
        self._end += count
        return count > 0

    def peek(self, nr_bytes: int) -> memoryview | None:
        """The next ``nr_bytes`` (at most READ_AHEAD), not consumed, blocking until they are
        there; None when the peer closed the connection first. The view is valid until the
        next read."""
        while self._end - self._start < nr_bytes:
            if not self._fill():
                return None
        return memoryview(self._ahead)[self._start : self._start + nr_bytes]

    def skip(self, nr_bytes: int) -> None:
        """Consume ``nr_bytes`` already peeked at."""
        self._start += nr_bytes

    def write_to(self, target: Any, nr_bytes: int, copy: bool) -> bool:
        """Write the next ``nr_bytes`` from the connection to ``target`` (a file object), as
        they arrive: views of the read-ahead buffer, or bytes when ``copy`` (a target that
        keeps what it is given). False when the peer closed the connection first."""
        while nr_bytes:
            if self._start == self._end and not self._fill():
                return False
            take = min(nr_bytes, self._end - self._start)
            with memoryview(self._ahead) as ahead:
                chunk = ahead[self._start : self._start + take]
                target.write(bytes(chunk) if copy else chunk)
                chunk.release()
            self._start += take
            nr_bytes -= take
        return True


class _ReadAheadSocket(AssociationSocket):
    """An acceptor's AssociationSocket whose ``ready`` also counts the bytes its reader
    (:class:`_ChunkedRecv`, the instance's ``recv``) has read ahead."""

    @property
    def ready(self) -> bool:
        if self.socket is None or self._is_connected is False:
            return False  # closed: nothing more is read, as pynetdicom's
        recv = self.__dict__.get("recv")
        if isinstance(recv, _ChunkedRecv) and recv.pending:
            return True
        return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]


def read_in_large_chunks(assoc: Association) -> None:
    """Make ``assoc`` (an acceptor whose reactor has not started: ``EVT_CONN_OPEN``) read
    its socket in large chunks. Only this association's socket object changes."""
    assoc_socket = assoc.dul.socket
    if assoc_socket is None:
        return
    if type(assoc_socket) is not AssociationSocket:
        return  # a socket class of someone else's: left as it is
    recv = _ChunkedRecv(assoc_socket)
    # instance attributes: the DUL's ``self.socket.recv(...)`` and ``self._read_pdu_data()``
    # find them before the methods
    assoc_socket.recv = recv  # type: ignore[method-assign]
    assoc_socket.__class__ = _ReadAheadSocket  # ``ready`` counts the bytes read ahead
    assoc.dul._read_pdu_data = _ReadPdu(assoc.dul, recv)  # type: ignore[method-assign]


class _ReadPdu:
    """``DULServiceProvider._read_pdu_data()`` for one association: pynetdicom's, except
    that the PDU's body is read straight into one buffer after its 6-byte header, instead
    of into a buffer of its own that ``bytestream +=`` then copies. The events, the log
    lines and the checks are pynetdicom's (dul.py, ``_read_pdu_data``)."""

    __slots__ = ("_dul", "_recv")

    def __init__(self, dul: DULServiceProvider, recv: _ChunkedRecv) -> None:
        self._dul = dul
        self._recv = recv

    def __call__(self) -> None:
        dul = self._dul
        while True:
            streamed = self._stream_dataset()
            if streamed is None:
                return  # the connection failed: its event is queued
            if not streamed:
                bytestream = self._read()
                if bytestream is None:
                    return
                if not _write_dataset_fragments(dul, bytestream):
                    self._decode(bytestream)
                    return
            dul._idle_timer.restart()  # what the reactor does after each PDU read
            if not _next_pdu_waiting(dul, self._recv):
                return

    def _stream_dataset(self) -> bool | None:
        """If the next PDU is a P-DATA-TF of one value that only continues the dataset
        being received (:func:`_write_dataset_fragments`'s conditions), write its value to
        the dataset's file as it arrives, without a buffer of its own: True. False (nothing
        consumed) for any other PDU; None when the connection failed (Evt17 queued)."""
        dul = self._dul
        target = _dataset_target(dul)
        if target is None:
            return False
        recv = self._recv
        try:
            head = recv.peek(_PDU_HEADER.size)
            if head is None or head[0] != _P_DATA_TF_TYPE:
                return False
            (pdu_length,) = _ITEM_LENGTH.unpack_from(head, 2)
            if pdu_length < 6:
                return False
            head = recv.peek(_PDU_HEADER.size + 6)  # the value's header is in this PDU
            if head is None:
                return False
            (item_length,) = _ITEM_LENGTH.unpack_from(head, 6)
            context_id, control = head[10], head[11]
            head.release()
            message: Any = dul.assoc.dimse.message
            if item_length + 4 != pdu_length or item_length < 2:
                return False  # several values, or one of its control header alone
            if context_id != message.context_id or control & 0b11:
                return False  # another context, a command fragment or the last fragment
            recv.skip(_PDU_HEADER.size + 6)
            copy = not getattr(target, "direct", False)  # a buffered ReceivingFile keeps views
            complete = recv.write_to(target, item_length - 2, copy)
            target.file.flush()
        except (OSError, TimeoutError) as exc:
            self._closed_mid_pdu(exc)
            return None
        if not complete:
            _DUL_LOG.error("The received PDU is shorter than expected")
            dul.event_queue.put("Evt17")
            return None
        return True

    def _closed_mid_pdu(self, exc: BaseException) -> None:
        """What pynetdicom logs and queues when a read fails before the PDU's end (Evt17)."""
        _DUL_LOG.error("Connection closed before the entire PDU was received")
        _DUL_LOG.exception(exc)
        self._dul.event_queue.put("Evt17")

    def _read(self) -> bytearray | None:
        """One whole PDU (header and body in one buffer), or None after putting the event
        pynetdicom puts for a connection closed mid-PDU (Evt17) or an unknown type (Evt19)."""
        dul = self._dul
        try:
            header = self._recv(_PDU_HEADER.size)
        except (OSError, TimeoutError) as exc:
            self._closed_mid_pdu(exc)
            return None
        if len(header) != _PDU_HEADER.size:
            dul.event_queue.put("Evt17")
            return None
        pdu_type, _, pdu_length = _PDU_HEADER.unpack(header)
        if pdu_type not in _PDU_TYPES:
            _DUL_LOG.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
            dul.event_queue.put("Evt19")
            return None
        bytestream = bytearray(_PDU_HEADER.size + pdu_length)
        bytestream[: _PDU_HEADER.size] = header
        try:
            with memoryview(bytestream) as view:
                got = self._recv.read_into(view[_PDU_HEADER.size :])
        except (OSError, TimeoutError) as exc:
            self._closed_mid_pdu(exc)
            return None
        if got != pdu_length:
            _DUL_LOG.error(
                f"The received PDU is shorter than expected ({_PDU_HEADER.size + got} of "
                f"{_PDU_HEADER.size + pdu_length} bytes received)"
            )
            dul.event_queue.put("Evt17")
            return None
        return bytestream

    def _decode(self, bytestream: bytearray) -> None:
        """pynetdicom's handling of a read PDU: decode it, queue its event and the PDU."""
        dul = self._dul
        try:
            pdu, event = dul._decode_pdu(bytestream)
            dul.event_queue.put(event)
        except Exception as exc:
            _DUL_LOG.error("Unable to decode the received PDU data")
            _DUL_LOG.exception(exc)
            dul.event_queue.put("Evt19")
            return
        dul._recv_pdu.put(pdu)


def _plain_handlers(assoc: Association) -> bool:
    """Whether nothing bound to this association would see a data PDU go by: no
    ``EVT_DATA_RECV`` or ``EVT_FSM_TRANSITION`` handler, and on ``EVT_PDU_RECV`` at most
    pynetdicom's standard logging handler (which logs nothing for P-DATA-TF)."""
    if assoc.get_handlers(evt.EVT_DATA_RECV) or assoc.get_handlers(evt.EVT_FSM_TRANSITION):
        return False
    bound: Any = assoc.get_handlers(evt.EVT_PDU_RECV)
    return all(handler is standard_pdu_recv_handler for handler, _ in bound)


def _dataset_target(dul: DULServiceProvider) -> Any:
    """The file of the C-STORE dataset being received, when a P-DATA-TF PDU that only
    continues it may be written there directly: state Sta6, no PDU or event waiting to be
    processed before it, nothing bound that would see it; else None."""
    if dul.state_machine.current_state != _DATA_TRANSFER:
        return None
    if not (dul.event_queue.empty() and dul._recv_pdu.empty()):
        return None  # an earlier PDU or event comes first
    message: Any = dul.assoc.dimse.message
    target = getattr(message, "_data_set_file", None)
    if target is None or not _plain_handlers(dul.assoc):
        return None
    return target


def _write_dataset_fragments(dul: DULServiceProvider, bytestream: bytearray) -> bool:
    """Write a P-DATA-TF PDU that only continues the C-STORE dataset being received to the
    dataset's file, as pynetdicom's DT-2 and DIMSE decoding would; False (nothing written)
    for any other PDU, which then goes through pynetdicom."""
    if bytestream[0] != _P_DATA_TF_TYPE:
        return False
    target = _dataset_target(dul)
    if target is None:
        return False
    context_id = dul.assoc.dimse.message.context_id  # type: ignore[union-attr]
    end = len(bytestream)
    values = []
    offset = 6
    while offset < end:
        if offset + 6 > end:
            return False
        (item_length,) = _ITEM_LENGTH.unpack_from(bytestream, offset)
        stop = offset + 4 + item_length
        # a value of its control header alone, another context, a command fragment or
        # the dataset's last fragment: pynetdicom's
        if item_length < 2 or stop > end or bytestream[offset + 4] != context_id:
            return False
        if bytestream[offset + 5] & 0b11:
            return False
        values.append((offset + 6, stop))
        offset = stop
    view = memoryview(bytestream)
    for start, stop in values:
        target.write(view[start:stop])  # as DIMSEMessage.decode_msg: data[1:], then flush
        target.file.flush()
    return True


def _next_pdu_waiting(dul: DULServiceProvider, recv: _ChunkedRecv) -> bool:
    """Whether the reader may read the next PDU now instead of returning to the reactor:
    its bytes have arrived (read ahead, or waiting in the connection), and the reactor has
    nothing else to do (no event, nothing to send, not being stopped)."""
    if dul._kill_thread or not dul.event_queue.empty() or not dul.to_provider_queue.empty():
        return False
    if recv.pending:
        return True
    sock: Any = dul.socket
    return sock is not None and bool(sock.ready)


class _DecodeWithoutCopies:
    """``DULServiceProvider._decode_pdu(bytestream)`` for one association: a P-DATA-TF PDU's
    presentation data values become memoryviews into the received PDU instead of copies.

    pynetdicom 3.0.4 copies each P-DATA-TF PDU's bytes four times before its DIMSE layer
    writes a C-STORE's dataset fragment to the file: ``bytes(bytestream)``, the PDU's items
    (``bytestream[6:]``), each item's value, and the value without its message control
    header (``data[1:]``, which on a memoryview is a view). Every PDU is a new bytearray the
    DUL never touches again, so views into it stay valid for as long as anything holds them.
    Other PDU types, and every PDU while an ``EVT_DATA_RECV`` handler is bound (it gets the
    PDU as bytes), go to pynetdicom's own decoder. The checks are pynetdicom's: an item
    shorter than its header or than its stated length is an invalid PDU (Evt19).
    """

    __slots__ = ("_decode", "_dul")

    def __init__(self, dul: DULServiceProvider) -> None:
        self._dul = dul
        self._decode = dul._decode_pdu  # the bound method of the class

    def __call__(self, bytestream: bytearray) -> tuple[Any, str]:
        assoc = self._dul.assoc
        if bytestream[0] != _P_DATA_TF_TYPE or assoc.get_handlers(evt.EVT_DATA_RECV):
            return self._decode(bytestream)
        end = len(bytestream)
        view = memoryview(bytestream)
        items = []
        offset = 6
        while offset < end:
            if offset + 5 > end:
                raise ValueError("P-DATA-TF PDU ends inside a presentation data value header")
            (item_length,) = _ITEM_LENGTH.unpack_from(bytestream, offset)
            stop = offset + 4 + item_length
            if item_length < 1 or stop > end:
                raise ValueError("presentation data value item longer than its P-DATA-TF PDU")
            item = PresentationDataValueItem()
            item.presentation_context_id = bytestream[offset + 4]
            item.presentation_data_value = view[offset + 5 : stop]  # type: ignore[assignment]
            items.append(item)
            offset = stop
        pdu = P_DATA_TF()
        pdu.presentation_data_value_items = items
        evt.trigger(assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu, "Evt10"


def decode_without_copies(assoc: Association) -> None:
    """Make ``assoc``'s DUL decode P-DATA-TF PDUs into views (:class:`_DecodeWithoutCopies`)
    instead of copies. Only this association's DUL object changes."""
    dul = assoc.dul
    # an instance attribute: the DUL's ``self._decode_pdu(...)`` finds it before the method
    dul._decode_pdu = _DecodeWithoutCopies(dul)  # type: ignore[method-assign]
