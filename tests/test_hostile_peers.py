"""Hostile or broken peers (issue 11, items 5-7): slow-loris connections, oversize PDUs and
datasets, forged log lines. Raw sockets and real SCUs against a node; memory measured on a
node subprocess from /proc/<pid>/status."""

from __future__ import annotations

import socket
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    Verification,
)

from bench.nodeproc import ServerProcess, dicom_echo
from node.netlimits import peer_text
from node.runtime import NodeRuntime
from node.scp import StoreStatus
from node.synthetic import make_chest_radiograph, write_study
from tests.conftest import storescu
from tests.peers import free_port, wait_for

# A second loopback address: the "other host" that opens the hostile connections.
HOSTILE = "127.0.0.2"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_VR = b"1.2.840.10008.1.2"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(calling: bytes, called: bytes = b"MEDGEMMA") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification, with AE titles as raw bytes."""
    context = _item(
        0x20, bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION) + _item(0x40, IMPLICIT_VR)
    )
    user = _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.3.4"))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16)[:16]
        + calling.ljust(16)[:16]
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT)
        + context
        + user
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def node_memory_kib(pid: int, field: str) -> int:
    """VmRSS / VmHWM (peak) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def start_serve(
    node_process: Callable[..., ServerProcess], tmp_path: Path, **dicom: str
) -> tuple[ServerProcess, int]:
    port = free_port()
    env = {
        "MEDGEMMA_NODE_DICOM__PORT": str(port),
        "MEDGEMMA_NODE_DICOM__BIND_ADDRESS": "127.0.0.1",
        "MEDGEMMA_NODE_API__HOST": "127.0.0.1",
        "MEDGEMMA_NODE_API__PORT": str(free_port()),
        "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
        "MEDGEMMA_NODE_STORAGE__MIN_FREE_MB": "0",
        "MEDGEMMA_NODE_ENGINE__NAME": "demo",
    }
    env.update({f"MEDGEMMA_NODE_DICOM__{key.upper()}": value for key, value in dicom.items()})
    # ready on the log line: a C-ECHO would be refused when dicom.allowed_callers is set
    proc = node_process(
        ["serve"], env=env, ready=lambda p: p.log_has("listening on"), what="serve SCP"
    )
    return proc, port


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the node has closed ``sock`` (EOF or reset); sends one byte meanwhile,
    as a slow-loris peer would."""
    try:
        sock.send(b"\x00")
        sock.settimeout(0.05)
        return sock.recv(64) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_slow_loris_connections_hold_no_slot_beyond_the_bound(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    bound = 3.0
    node = node_factory(dicom={"acse_timeout": bound, "max_associations_per_host": 4})
    port = node.scp.port
    slow: list[socket.socket] = []
    opened = time.monotonic()
    for _ in range(node.settings.dicom.max_associations):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((HOSTILE, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(associate_rq(b"SLOW")[:7])  # the PDU header and one byte
        slow.append(sock)
    try:
        # a real sender from another host gets through at once
        started = time.monotonic()
        files = write_study(tmp_path / "real", [make_chest_radiograph(seed=5, rows=64, cols=64)])
        result = storescu(port, *files)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < bound
        # every slow connection is closed within the bound, although it keeps sending
        wait_for(
            lambda: all(closed_by_peer(s) for s in slow),
            timeout=bound + 5,
            interval=0.5,
            what="the slow connections to be closed",
        )
        assert time.monotonic() - opened < bound + 5
    finally:
        for sock in slow:
            sock.close()
    # and their slots are free again: the hostile host can associate once more
    ae = AE(ae_title="AGAIN")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGEMMA", bind_address=(HOSTILE, 0))
    assert assoc.is_established
    assoc.release()


def test_oversize_associate_rq_is_aborted_before_it_is_read(
    node_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    proc, port = start_serve(node_process, tmp_path)
    peak_before = node_memory_kib(proc.pid, "VmHWM")
    junk = bytes(1 << 20)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0))
        try:
            while sent < 300 << 20:
                sock.sendall(junk)
                sent += len(junk)
        except OSError:
            pass  # the node closed the connection
        try:
            reply = sock.recv(10)
        except ConnectionResetError:
            reply = b""
    # A-ABORT, source service provider, reason invalid PDU parameter value
    assert reply in (b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06", b""), reply
    assert sent < 300 << 20, "the node read 300 MiB of an A-ASSOCIATE-RQ"
    growth = node_memory_kib(proc.pid, "VmHWM") - peak_before
    assert growth < 64 * 1024, f"peak RSS grew by {growth} KiB"
    assert dicom_echo(port)()


def deflated_bomb(path: Path, inflated_bytes: int) -> pydicom.Dataset:
    """A deflated CR file whose dataset inflates to ``inflated_bytes`` (zero pixels)."""
    ds = make_chest_radiograph(seed=9, rows=64, cols=64).dataset
    del ds.PixelData
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    pixel_length = inflated_bytes - len(header.getvalue()) - 12
    pixel_length -= pixel_length % 2
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(f), meta)
        f.write(deflater.compress(header.getvalue()))
        f.write(deflater.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<L", pixel_length)))
        zeros = bytes(16 << 20)
        left = pixel_length
        while left > 0:
            f.write(deflater.compress(zeros[: min(left, len(zeros))]))
            left -= min(left, len(zeros))
        f.write(deflater.flush())
    return ds


def test_deflated_bomb_is_refused_with_out_of_resources_and_memory_stays_bounded(
    node_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    proc, port = start_serve(node_process, tmp_path, max_dataset_mb="64")
    bomb = tmp_path / "bomb.dcm"
    ds = deflated_bomb(bomb, 768 << 20)
    assert bomb.stat().st_size < 4 << 20
    peak_before = node_memory_kib(proc.pid, "VmHWM")
    ae = AE(ae_title="BOMBER")
    ae.add_requested_context(ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian)
    ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGEMMA")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(bomb)
    finally:
        assoc.release()
    assert int(status.Status) == StoreStatus.OUT_OF_RESOURCES
    assert "64 MB" in str(status.ErrorComment)
    growth = node_memory_kib(proc.pid, "VmHWM") - peak_before
    assert growth < 128 * 1024, f"peak RSS grew by {growth} KiB"
    spool = tmp_path / "var" / "spool"
    assert not list(spool.rglob(f"{ds.SOPInstanceUID}*"))
    # a deflated dataset within the limit is still stored
    small = tmp_path / "small.dcm"
    deflated_bomb(small, 1 << 20)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGEMMA")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(small).Status) == StoreStatus.SUCCESS
    finally:
        assoc.release()


def test_peer_text_cannot_forge_log_lines_and_bad_pdus_log_one_line(
    node_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    proc, port = start_serve(node_process, tmp_path)
    forged = b"X\r\nFORGED LINE"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(associate_rq(forged))
        reply = sock.recv(64)
    assert reply[:1] == b"\x07", reply  # A-ABORT: the A-ASSOCIATE-RQ is invalid
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 20) + b"\xff" * 20)  # undecodable
        sock.settimeout(10)
        try:
            sock.recv(64)
        except ConnectionResetError:
            pass
    log = tmp_path / "var" / "logs" / "node.log"

    def bad_pdu_lines() -> list[str]:
        return [line for line in log.read_text().splitlines() if "Unable to decode" in line]

    wait_for(lambda: len(bad_pdu_lines()) >= 2, timeout=10, what="both bad PDUs logged")
    lines = log.read_text().splitlines()
    assert not any(line.startswith("FORGED") for line in lines)
    (ae_line,) = [line for line in lines if "FORGED" in line]  # one line for the event
    assert "X\\r\\nFORGED LINE" in ae_line and "pynetdicom.dul" in ae_line
    assert len(bad_pdu_lines()) == 2
    assert "Traceback" not in log.read_text() and "Traceback" not in proc.output()


def test_peer_text_escapes_and_caps() -> None:
    assert peer_text("A\r\nB\x1b[31m") == "A\\r\\nB\\x1b[31m"
    assert peer_text(b"AE\n") == "AE\\n"
    assert peer_text("x" * 300, limit=10) == "x" * 10 + "...(+290 chars)"
