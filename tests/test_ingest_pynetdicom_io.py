"""node.pynetdicom_io against the installed pynetdicom: the SCP reads PDUs in large chunks
through the node's limited socket, and these tests fail when pynetdicom changes what the
replacement relies on (then re-check node/pynetdicom_io.py and update CHECKED_PYNETDICOM)."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.netlimits import PeerSocket
from node.pynetdicom_io import CHECKED_PYNETDICOM, RECV_CHUNK
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
