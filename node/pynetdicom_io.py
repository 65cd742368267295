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
buffer (``recv_into``). The bytes still go through the node's socket
(:class:`node.netlimits.PeerSocket`), so every limit and deadline holds exactly as before.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.association import Association

#: The pynetdicom version whose DUL and AssociationSocket this module was checked against.
CHECKED_PYNETDICOM = "3.0.4"
#: The most one socket read asks for (a PDU's remaining bytes, up to this).
RECV_CHUNK = 1 << 20


class _ChunkedRecv:
    """``AssociationSocket.recv(nr_bytes)``: read ``nr_bytes`` from the connection, blocking,
    and return them; fewer when the peer closed the connection first."""

    __slots__ = ("_assoc_socket",)

    def __init__(self, assoc_socket: Any) -> None:
        self._assoc_socket = assoc_socket

    def __call__(self, nr_bytes: int) -> bytearray:
        sock = self._assoc_socket.socket
        data = bytearray(nr_bytes)
        got = 0
        with memoryview(data) as view:
            while got < nr_bytes:
                count = sock.recv_into(view[got:], min(nr_bytes - got, RECV_CHUNK))
                if not count:  # connection closed: what was read so far, as pynetdicom does
                    break
                got += count
        del data[got:]
        return data


def read_in_large_chunks(assoc: Association) -> None:
    """Make ``assoc`` (an acceptor whose reactor has not started: ``EVT_CONN_OPEN``) read
    its socket in large chunks. Only this association's socket object changes."""
    assoc_socket = assoc.dul.socket
    if assoc_socket is None:
        return
    # an instance attribute: the DUL's ``self.socket.recv(...)`` finds it before the method
    assoc_socket.recv = _ChunkedRecv(assoc_socket)  # type: ignore[method-assign]
