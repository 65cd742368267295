"""node.pynetdicom_io against the installed pynetdicom: the SCP reads PDUs in large chunks
through the node's limited socket, and these tests fail when pynetdicom changes what the
replacement relies on (then re-check node/pynetdicom_io.py and update CHECKED_PYNETDICOM)."""

from __future__ import annotations

import hashlib
import inspect
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from pydicom import dcmread
from pynetdicom import AE, dul, evt, fsm
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

import node.scp as node_scp
import node.spool as node_spool
from node.netlimits import PeerSocket
from node.pynetdicom_io import (
    CHECKED_PYNETDICOM,
    RECV_CHUNK,
    decode_without_copies,
    read_in_large_chunks,
)
from node.runtime import NodeRuntime
from node.synthetic import make_chest_radiograph, write_study
from tests.conftest import storescu


def test_the_installed_pynetdicom_is_the_one_checked() -> None:
    assert pynetdicom.__version__ == CHECKED_PYNETDICOM, (
        "pynetdicom changed: re-check node/pynetdicom_io.py (the DUL's reads, "
        "AssociationSocket.recv, when EVT_CONN_OPEN fires) and update CHECKED_PYNETDICOM"
    )


def test_what_the_replacement_relies_on_is_still_there() -> None:
    # the DUL reads every PDU through its AssociationSocket's recv(nr_bytes)
    reader = inspect.getsource(DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in reader and "self.socket.recv(pdu_length)" in reader
    assert list(inspect.signature(AssociationSocket.recv).parameters) == ["self", "nr_bytes"]
    # an acceptor's socket is set before EVT_CONN_OPEN, and its reactor starts after it
    handle = inspect.getsource(RequestHandler.handle)
    assert handle.index("_create_association()") < handle.index("EVT_CONN_OPEN")
    assert handle.index("EVT_CONN_OPEN") < handle.index("assoc.start()")
    assert "assoc.set_socket(sock)" in inspect.getsource(RequestHandler._create_association)
    # the DUL reads a PDU by calling self._read_pdu_data(), whose events and checks the
    # node's reader repeats (unknown type: Evt19; cut short: Evt17; undecodable: Evt19)
    assert "self._read_pdu_data()" in inspect.getsource(DULServiceProvider._is_transport_event)
    assert "pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)" in reader
    assert reader.count('self.event_queue.put("Evt17")') == 4
    assert reader.count('self.event_queue.put("Evt19")') == 2
    assert "self._recv_pdu.put(pdu)" in reader
    # the DUL decodes each PDU it read through self._decode_pdu, in its own thread, and
    # never touches the bytestream again; P-DATA-TF is PDU type 4, event Evt10
    assert "self._decode_pdu(bytestream)" in reader
    assert reader.index("self._decode_pdu(bytestream)") > reader.index("recv(pdu_length)")
    assert dul._PDU_TYPES[b"\x04"] == (P_DATA_TF, "Evt10")
    decoder = inspect.getsource(DULServiceProvider._decode_pdu)
    assert "EVT_DATA_RECV" in decoder and "EVT_PDU_RECV" in decoder
    # the DIMSE layer reads a value's control header as data[0] and the rest as data[1:]
    dimse = inspect.getsource(DIMSEMessage.decode_msg)
    assert "data[0]" in dimse and "write(data[1:])" in dimse
    # what the direct write of a dataset's middle relies on: in Sta6 a P-DATA-TF (Evt10) is
    # DT-2, which stays in Sta6 and hands the PDU's values to the DIMSE layer; that writes a
    # dataset fragment of a chunked C-STORE to message._data_set_file and flushes it, and
    # keeps the context of the command set; the reactor restarts the idle timer after a read
    assert fsm.TRANSITION_TABLE[("Evt10", "Sta6")] == "DT-2"
    dt_2 = inspect.getsource(fsm.DT_2)
    assert "dimse.receive_primitive" in dt_2 and 'return "Sta6"' in dt_2
    assert "self._data_set_file.write(data[1:])" in dimse
    assert "self._data_set_file.file.flush()" in dimse
    assert "self.context_id = context_id" in dimse
    assert "self.message.decode_msg(primitive" in inspect.getsource(
        DIMSEServiceProvider.receive_primitive
    )
    reactor = inspect.getsource(DULServiceProvider.run_reactor)
    assert "self._is_transport_event():" in reactor and "self._idle_timer.restart()" in reactor


def _p_data_tf(*values: tuple[int, bytes]) -> bytes:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[cx, value] for cx, value in values]  # type: ignore[misc]
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def test_p_data_values_are_views_of_the_pdu_and_equal_to_pynetdicoms_decoding() -> None:
    assoc = Association(AE(), "acceptor")
    decode_without_copies(assoc)
    encoded = _p_data_tf((1, b"\x00" + bytes(range(256)) * 40), (3, b"\x03command"), (5, b"\x02"))
    pdu, event = assoc.dul._decode_pdu(bytearray(encoded))
    theirs, their_event = DULServiceProvider._decode_pdu(assoc.dul, bytearray(encoded))
    assert (event, pdu) == (their_event, theirs)
    assert isinstance(pdu, P_DATA_TF) and isinstance(theirs, P_DATA_TF)
    values = pdu.to_primitive().presentation_data_value_list
    assert values == theirs.to_primitive().presentation_data_value_list
    assert all(isinstance(value, memoryview) for _, value in values)


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda pdu: pdu[:-1], id="value shorter than its length"),
        pytest.param(lambda pdu: pdu + b"\x00\x00", id="item header cut"),
        pytest.param(lambda pdu: pdu[:6] + b"\x00\x00\x00\x00\x01", id="zero-length item"),
    ],
)
def test_a_malformed_p_data_pdu_is_refused_as_pynetdicom_refuses_it(cut: Any) -> None:
    assoc = Association(AE(), "acceptor")
    decode_without_copies(assoc)
    malformed = bytearray(cut(_p_data_tf((1, b"\x02data"))))
    with pytest.raises(Exception):  # noqa: B017 (any exception: the DUL makes it Evt19)
        DULServiceProvider._decode_pdu(assoc.dul, bytearray(malformed))
    with pytest.raises(ValueError):
        assoc.dul._decode_pdu(malformed)


def test_a_bound_data_recv_handler_still_gets_every_pdu_as_bytes() -> None:
    seen: list[bytes] = []
    assoc = Association(AE(), "acceptor")
    assoc.bind(evt.EVT_DATA_RECV, lambda event: seen.append(event.data))
    decode_without_copies(assoc)
    encoded = _p_data_tf((1, b"\x02data"))
    pdu, event = assoc.dul._decode_pdu(bytearray(encoded))
    assert seen == [encoded] and event == "Evt10"
    assert isinstance(pdu, P_DATA_TF)
    assert pdu.presentation_data_value_items[0].presentation_data_value == b"\x02data"


def test_a_large_dataset_is_read_in_large_chunks_through_the_limited_socket(
    node: NodeRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []
    recv, recv_into = PeerSocket.recv, PeerSocket.recv_into

    def counting_recv(self: PeerSocket, bufsize: int = 1024, flags: int = 0, /) -> bytes:
        asked.append(bufsize)
        return recv(self, bufsize, flags)

    def counting_recv_into(
        self: PeerSocket, buffer: Any, nbytes: int | None = None, flags: int = 0
    ) -> int:
        asked.append(len(buffer) if nbytes is None else nbytes)
        return recv_into(self, buffer, nbytes, flags)

    monkeypatch.setattr(PeerSocket, "recv", counting_recv)
    monkeypatch.setattr(PeerSocket, "recv_into", counting_recv_into)
    image = make_chest_radiograph(seed=7, rows=1024, cols=1024)  # 2 MiB of pixels
    (path,) = write_study(tmp_path / "in", [image])
    result = storescu(node.scp.port, path)
    assert result.returncode == 0, result.stderr

    inst = node.ledger.find_instance(image.dataset.SOPInstanceUID)
    assert inst is not None
    stored = node.spool.path_of(inst.path).read_bytes()
    # the hash computed while receiving is the hash of the bytes stored
    assert inst.sha256 == hashlib.sha256(stored).hexdigest()
    assert inst.size_bytes == len(stored)
    # storescu's PDUs (16 KiB by default) are each asked for whole, not 4 KiB at a time
    assert max(asked) > 4096 and max(asked) <= RECV_CHUNK
    assert len(asked) < len(stored) // 4096


def _connected_acceptor() -> tuple[Association, socket.socket]:
    """An acceptor association whose DUL reads from a loopback connection (no reactor
    running), with the node's replacements, and the peer's end of the connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    assoc = Association(AE(), "acceptor")
    assoc.set_socket(AssociationSocket(assoc, client_socket=ours))
    read_in_large_chunks(assoc)
    decode_without_copies(assoc)
    assert _events(assoc) == ["Evt5"]  # the transport connection indication
    return assoc, peer


def _events(assoc: Association) -> list[str]:
    events = []
    while not assoc.dul.event_queue.empty():
        events.append(assoc.dul.event_queue.get_nowait())
    return events


def test_the_pdu_reader_reads_a_pdu_whole_and_refuses_what_pynetdicom_refuses() -> None:
    assoc, peer = _connected_acceptor()
    with peer:
        encoded = _p_data_tf((1, b"\x02" + b"d" * 300_000))
        peer.sendall(encoded[:1000])
        threading.Timer(0.2, peer.sendall, [encoded[1000:]]).start()  # the rest comes later
        assoc.dul._read_pdu_data()
        assert _events(assoc) == ["Evt10"]
        pdu = assoc.dul._recv_pdu.get_nowait()
        assert isinstance(pdu, P_DATA_TF) and pdu.encode() == encoded

        peer.sendall(b"\x09\x00\x00\x00\x00\x00")  # unknown PDU type
        assoc.dul._read_pdu_data()
        assert _events(assoc) == ["Evt19"]

        # a P-DATA-TF of 6 bytes whose one item says it has 10
        peer.sendall(b"\x04\x00" + (6).to_bytes(4, "big") + (10).to_bytes(4, "big") + b"\x01\x02")
        assoc.dul._read_pdu_data()
        assert _events(assoc) == ["Evt19"]

        peer.sendall(_p_data_tf((1, b"\x02" + b"d" * 1000))[:500])  # then the peer goes
    assoc.dul._read_pdu_data()
    assert _events(assoc) == ["Evt17"]
    assert assoc.dul._recv_pdu.empty()
    assoc.dul.socket.close()  # type: ignore[union-attr]


def _sent_and_stored(node: NodeRuntime, tmp_path: Path, seed: int) -> tuple[Any, Any, Path]:
    """storescu one 2 MiB image to the node in PDUs of at most 16 KiB (about 130 of them);
    the dataset sent and the dataset stored."""
    image = make_chest_radiograph(seed=seed, rows=1024, cols=1024)
    (path,) = write_study(tmp_path / f"in-{seed}", [image])
    result = storescu(node.scp.port, path, extra=("--max-send-pdu", "16384"))
    assert result.returncode == 0, result.stderr
    inst = node.ledger.find_instance(image.dataset.SOPInstanceUID)
    assert inst is not None
    stored = node.spool.path_of(inst.path)
    assert inst.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    return dcmread(path), dcmread(stored), stored


def test_the_middle_of_a_dataset_goes_straight_to_its_file(
    node: NodeRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    primitives: list[int] = []
    receive = DIMSEServiceProvider.receive_primitive

    def counting(self: DIMSEServiceProvider, primitive: P_DATA) -> None:
        primitives.append(len(primitive.presentation_data_value_list))
        receive(self, primitive)

    monkeypatch.setattr(DIMSEServiceProvider, "receive_primitive", counting)
    sent, stored, _ = _sent_and_stored(node, tmp_path, seed=11)
    # pynetdicom's DIMSE layer sees the command set and the dataset's last fragment, not
    # the 130 PDUs between them; the stored dataset is the one sent, byte for byte
    assert 2 <= len(primitives) <= 4
    assert stored.PixelData == sent.PixelData
    assert stored.SOPInstanceUID == sent.SOPInstanceUID


def test_a_bound_pdu_recv_handler_sees_every_pdu_of_the_dataset(
    node: NodeRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    original = node_scp.read_in_large_chunks

    def with_handler(assoc: Association) -> None:
        assoc.bind(evt.EVT_PDU_RECV, lambda event: seen.append(type(event.pdu).__name__))
        original(assoc)

    monkeypatch.setattr(node_scp, "read_in_large_chunks", with_handler)
    sent, stored, _ = _sent_and_stored(node, tmp_path, seed=12)
    assert seen.count("P_DATA_TF") > 100  # every PDU through pynetdicom, as without the node
    assert stored.PixelData == sent.PixelData


def _release_read_ahead(assoc: Association, peer: socket.socket) -> AssociationSocket:
    """The peer sends a P-DATA-TF and an A-RELEASE-RQ in one segment; the reader reads the
    first (Evt10) and, with it, the second ahead: the socket is ready."""
    peer.sendall(_p_data_tf((1, b"\x02" + b"d" * 100)) + bytes(A_RELEASE_RQ().encode()))
    time.sleep(0.2)  # both have arrived
    assoc.dul._read_pdu_data()
    assert _events(assoc) == ["Evt10"]
    socket_ = assoc.dul.socket
    assert socket_ is not None and socket_.ready  # the release request, read ahead
    return socket_


def test_a_pdu_read_ahead_with_the_one_before_it_is_still_read() -> None:
    """Two PDUs in one segment: the reader takes both off the connection at once; the
    socket stays ready while the second waits in the reader, so the reactor reads it."""
    assoc, peer = _connected_acceptor()
    with peer:
        socket_ = _release_read_ahead(assoc, peer)
        assoc.dul._read_pdu_data()
        assert _events(assoc) == ["Evt12"]
        assert not socket_.ready
    assoc.dul.socket.close()  # type: ignore[union-attr]


def test_a_dataset_received_with_buffered_writes_is_stored_whole(
    node: NodeRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # where O_DIRECT is refused, the file keeps what it is given: the reader hands it copies
    monkeypatch.setattr(node_spool, "_direct_io", lambda fd: False)
    sent, stored, _ = _sent_and_stored(node, tmp_path, seed=13)
    assert stored.PixelData == sent.PixelData


def test_bytes_read_ahead_are_not_read_once_the_connection_is_closed() -> None:
    assoc, peer = _connected_acceptor()
    with peer:
        socket_ = _release_read_ahead(assoc, peer)
        socket_.close()  # as pynetdicom closes it (Evt17), the release request unread
        assert _events(assoc) == ["Evt17"]
        assert not socket_.ready  # the reactor reads nothing more, as it would not before
