"""The SCP against real peers: dcmtk echoscu/storescu, pynetdicom SCUs and a raw socket."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    Verification,
)

from node.runtime import NodeRuntime
from node.scp import StoreStatus
from node.synthetic import make_chest_radiograph, make_two_view_study, write_study
from tests.conftest import storescu, wait_for_state
from tests.peers import dcmtk

SMALL = {"rows": 256, "cols": 208}


def spool_files(runtime: NodeRuntime) -> list[Path]:
    return sorted(p for p in runtime.spool.root.rglob("*") if p.is_file())


def test_echoscu_gets_an_answer(node: NodeRuntime) -> None:
    result = subprocess.run(
        [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "MEDGEMMA", "127.0.0.1", str(node.scp.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_storescu_file_is_spooled_recorded_and_identical(node: NodeRuntime, tmp_path: Path) -> None:
    image = make_chest_radiograph(seed=1, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    result = storescu(node.scp.port, path)
    assert result.returncode == 0, result.stderr
    ds = image.dataset
    inst = node.ledger.find_instance(ds.SOPInstanceUID)
    assert inst is not None
    stored = node.spool.path_of(inst.path)
    assert stored == node.spool.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / (
        f"{ds.SOPInstanceUID}.dcm"
    )
    back = pydicom.dcmread(stored)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert (back.pixel_array == ds.pixel_array).all()
    assert not list(node.spool.root.rglob("*.part"))
    study = wait_for_state(node, ds.StudyInstanceUID, {"done"})
    assert study.instance_count == 1


def test_a_received_file_that_cannot_be_renamed_into_the_spool_is_copied(
    node: NodeRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receive directory on the spool's device but another mount (a bind mount: the
    rename fails with EXDEV): the file is copied into the spool instead, complete, private
    (0600) and with no partial file left, and the C-STORE is answered Success."""
    real_replace = os.replace
    receive_dir = str(node.spool.receive_dir)

    def replace(src: object, dst: object) -> None:
        if str(src).startswith(receive_dir):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr("node.spool.os.replace", replace)
    image = make_chest_radiograph(seed=2, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(node.scp.port, path).returncode == 0
    inst = node.ledger.find_instance(image.dataset.SOPInstanceUID)
    assert inst is not None
    stored = node.spool.path_of(inst.path)
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == inst.sha256
    assert stored.stat().st_mode & 0o777 == 0o600
    assert not list(node.spool.root.rglob("*.part"))


@pytest.mark.parametrize(
    ("syntax", "propose"),
    [
        (RLELossless, "-xr"),
        (JPEGLSLossless, "-xt"),
        (JPEG2000Lossless, "-xv"),
        (DeflatedExplicitVRLittleEndian, "-xd"),
        (ImplicitVRLittleEndian, "-xi"),
    ],
)
def test_transfer_syntax_is_stored_as_received(
    node: NodeRuntime, tmp_path: Path, syntax: str, propose: str
) -> None:
    image = make_chest_radiograph(seed=2, transfer_syntax=syntax, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    result = storescu(node.scp.port, path, extra=(propose,))
    assert result.returncode == 0, result.stderr
    inst = node.ledger.find_instance(image.dataset.SOPInstanceUID)
    assert inst is not None
    assert inst.transfer_syntax_uid == syntax
    stored = pydicom.dcmread(node.spool.path_of(inst.path))
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert (stored.pixel_array == image.dataset.pixel_array).all()


def test_fifty_images_over_one_association(node: NodeRuntime, tmp_path: Path) -> None:
    study_uid = generate_uid()
    images = [
        make_chest_radiograph(
            seed=100 + i, study_uid=study_uid, instance_number=i + 1, rows=128, cols=104
        )
        for i in range(50)
    ]
    paths = write_study(tmp_path / "in", images)
    result = storescu(node.scp.port, *paths)
    assert result.returncode == 0, result.stderr
    study = wait_for_state(node, study_uid, {"done"})
    assert study.instance_count == 50
    assert study.version == 1
    assert len(spool_files(node)) == 50


def test_unknown_calling_ae_is_rejected_and_nothing_stored(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    runtime = node_factory(dicom={"allowed_callers": ["PACS"]})
    (path,) = write_study(tmp_path / "in", [make_chest_radiograph(seed=3, **SMALL)])
    refused = storescu(runtime.scp.port, path, calling="INTRUDER")
    assert refused.returncode != 0
    assert "rejected" in (refused.stdout + refused.stderr).lower()
    assert spool_files(runtime) == []
    accepted = storescu(runtime.scp.port, path, calling="PACS")
    assert accepted.returncode == 0, accepted.stderr
    assert len(spool_files(runtime)) == 1


def test_ten_concurrent_associations(node_factory: Callable[..., NodeRuntime]) -> None:
    # a quiet period longer than any pause between the senders, even on a loaded machine
    node = node_factory(completion={"quiet_seconds": 5.0}, dicom={"max_associations_per_host": 10})
    study_uid = generate_uid()
    images = [
        make_chest_radiograph(seed=200 + i, study_uid=study_uid, rows=128, cols=104)
        for i in range(20)
    ]
    statuses: list[int] = []
    lock = threading.Lock()

    def send(chunk: list[Dataset]) -> None:
        ae = AE(ae_title="CONCURRENT")
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="MEDGEMMA")
        assert assoc.is_established
        for ds in chunk:
            status = assoc.send_c_store(ds)
            with lock:
                statuses.append(int(status.Status))
        assoc.release()

    threads = [
        threading.Thread(target=send, args=([im.dataset for im in images[i::10]],))
        for i in range(10)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [StoreStatus.SUCCESS] * 20
    study = wait_for_state(node, study_uid, {"done"})
    assert study.instance_count == 20


def test_duplicate_is_idempotent_and_changed_content_is_a_new_revision(
    node: NodeRuntime, tmp_path: Path
) -> None:
    image = make_chest_radiograph(seed=4, **SMALL)
    ds = image.dataset
    (path,) = write_study(tmp_path / "a", [image])
    assert storescu(node.scp.port, path).returncode == 0
    assert storescu(node.scp.port, path).returncode == 0
    assert len(spool_files(node)) == 1
    first = wait_for_state(node, ds.StudyInstanceUID, {"done"})

    ds.SeriesDescription = "CHEST PA corrected"
    (changed,) = write_study(tmp_path / "b", [ds])
    assert storescu(node.scp.port, changed).returncode == 0
    assert len(spool_files(node)) == 2
    inst = node.ledger.find_instance(ds.SOPInstanceUID)
    assert inst is not None and inst.revision == 2
    second = wait_for_state(node, ds.StudyInstanceUID, {"done"})
    assert second.version == first.version + 1  # the changed study is pre-read again


def test_late_instance_makes_a_new_study_version(node: NodeRuntime, tmp_path: Path) -> None:
    pa, lateral = make_two_view_study(seed=5, **SMALL)
    study_uid = pa.dataset.StudyInstanceUID
    (p1,) = write_study(tmp_path / "a", [pa])
    assert storescu(node.scp.port, p1).returncode == 0
    v1 = wait_for_state(node, study_uid, {"done"})
    (p2,) = write_study(tmp_path / "b", [lateral])
    assert storescu(node.scp.port, p2).returncode == 0
    v2 = wait_for_state(node, study_uid, {"done"}, timeout=30)
    assert (v1.version, v2.version) == (1, 2)
    assert len(node.ledger.instances_of(study_uid)) == 2


def _c_store_file(port: int, path: Path) -> int:
    """Send a file's bytes as they are (no decoding on our side) and return the status."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="RAWSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDGEMMA")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
        return int(status.Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def test_truncated_dataset_is_refused_and_nothing_kept(node: NodeRuntime, tmp_path: Path) -> None:
    (path,) = write_study(tmp_path / "in", [make_chest_radiograph(seed=6, **SMALL)])
    data = path.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 20000])
    assert _c_store_file(node.scp.port, truncated) == StoreStatus.CANNOT_UNDERSTAND
    assert spool_files(node) == []
    assert node.ledger.counts_by_state() == {}
    # the server is still up and takes a good file on the next association
    assert storescu(node.scp.port, path).returncode == 0


def test_dataset_without_sop_instance_uid_is_refused(node: NodeRuntime, tmp_path: Path) -> None:
    ds = make_chest_radiograph(seed=7, **SMALL).dataset
    del ds.SOPInstanceUID  # the file meta (and so the C-STORE request) still names one
    path = tmp_path / "no-sop.dcm"
    ds.preamble = b"\0" * 128
    ds.save_as(path, enforce_file_format=False)
    assert _c_store_file(node.scp.port, path) == StoreStatus.CANNOT_UNDERSTAND
    assert spool_files(node) == []


def test_file_without_preamble_is_stored(node: NodeRuntime, tmp_path: Path) -> None:
    image = make_chest_radiograph(seed=8, **SMALL)
    path = tmp_path / "nopreamble.dcm"
    image.dataset.save_as(path, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    result = storescu(node.scp.port, path)
    assert result.returncode == 0, result.stderr
    assert node.ledger.find_instance(image.dataset.SOPInstanceUID) is not None


def test_garbage_pdata_aborts_only_that_association(node: NodeRuntime, tmp_path: Path) -> None:
    ae = AE(ae_title="GARBAGE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="MEDGEMMA")
    assert assoc.is_established
    sock = assoc.dul.socket
    assert sock is not None and sock.socket is not None
    # P-DATA-TF (type 0x04) whose PDV item is nonsense
    garbage = bytes(range(256)) * 4
    sock.socket.sendall(b"\x04\x00" + len(garbage).to_bytes(4, "big") + garbage)
    for _ in range(50):
        if not assoc.is_established:
            break
        threading.Event().wait(0.1)
    assert not assoc.is_established  # the node aborted it
    (path,) = write_study(tmp_path / "in", [make_chest_radiograph(seed=9, **SMALL)])
    assert storescu(node.scp.port, path).returncode == 0  # and keeps serving
    assert len(spool_files(node)) == 1


def test_raw_socket_junk_before_association(node: NodeRuntime) -> None:
    with socket.create_connection(("127.0.0.1", node.scp.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        try:
            reply = s.recv(64)
        except (ConnectionResetError, TimeoutError):
            reply = b""
        assert not reply.startswith(b"HTTP")
    result = subprocess.run(
        [dcmtk("echoscu"), "-aec", "MEDGEMMA", "127.0.0.1", str(node.scp.port)],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0


def test_below_free_space_watermark_answers_out_of_resources(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    runtime = node_factory(storage={"min_free_mb": 2**40})  # a watermark no disk satisfies
    (path,) = write_study(tmp_path / "in", [make_chest_radiograph(seed=10, **SMALL)])
    assert _c_store_file(runtime.scp.port, path) == StoreStatus.OUT_OF_RESOURCES
    assert spool_files(runtime) == []
    assert runtime.ledger.instance_count() == 0


def test_non_chest_study_is_kept_and_skipped(node: NodeRuntime, tmp_path: Path) -> None:
    from node.synthetic import make_non_chest_radiograph

    image = make_non_chest_radiograph(**SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(node.scp.port, path).returncode == 0
    study = wait_for_state(node, image.dataset.StudyInstanceUID, {"skipped"})
    assert "not a chest study" in study.reason
    assert len(spool_files(node)) == 1


def test_complete_on_association_release(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    runtime = node_factory(completion={"quiet_seconds": 3600, "on_association_release": True})
    image = make_chest_radiograph(seed=11, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(runtime.scp.port, path).returncode == 0
    # with a one-hour quiet period, only the release can have completed it
    wait_for_state(runtime, image.dataset.StudyInstanceUID, {"done"}, timeout=15)


def test_association_limit_rejects_the_one_too_many(
    node_factory: Callable[..., NodeRuntime],
) -> None:
    runtime = node_factory(dicom={"max_associations": 2})
    ae = AE(ae_title="MANY")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", runtime.scp.port, ae_title="MEDGEMMA") for _ in range(2)]
    assert all(a.is_established for a in held)
    extra = ae.associate("127.0.0.1", runtime.scp.port, ae_title="MEDGEMMA")
    assert extra.is_rejected  # local limit exceeded, a transient rejection
    for a in held:
        a.release()
    again = ae.associate("127.0.0.1", runtime.scp.port, ae_title="MEDGEMMA")
    assert again.is_established
    again.release()


def test_host_allow_list_closes_unknown_hosts(
    node_factory: Callable[..., NodeRuntime],
) -> None:
    other = node_factory(dicom={"allowed_hosts": ["192.0.2.10"]})  # not loopback
    refused = subprocess.run(
        [dcmtk("echoscu"), "-aec", "MEDGEMMA", "127.0.0.1", str(other.scp.port)],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode != 0
    mine = node_factory(dicom={"allowed_hosts": ["127.0.0.1"]})
    allowed = subprocess.run(
        [dcmtk("echoscu"), "-aec", "MEDGEMMA", "127.0.0.1", str(mine.scp.port)],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert allowed.returncode == 0


def test_other_objects_of_a_chest_study_are_kept_and_the_study_is_read(
    node: NodeRuntime, tmp_path: Path
) -> None:
    from node.synthetic import make_secondary_capture

    image = make_chest_radiograph(seed=12, **SMALL)
    uid = image.dataset.StudyInstanceUID
    sc = make_secondary_capture(study_uid=uid)
    paths = write_study(tmp_path / "in", [image, sc])
    assert storescu(node.scp.port, *paths).returncode == 0
    study = wait_for_state(node, uid, {"done"})
    assert study.instance_count == 2
    classes = {i.sop_class_uid for i in node.ledger.instances_of(uid)}
    assert str(sc.SOPClassUID) in classes  # kept, though not pre-read


def test_resending_an_earlier_revision_keeps_no_extra_file(
    node: NodeRuntime, tmp_path: Path
) -> None:
    image = make_chest_radiograph(seed=13, **SMALL)
    ds = image.dataset
    (first,) = write_study(tmp_path / "a", [image])
    ds.SeriesDescription = "CHEST PA corrected"
    (second,) = write_study(tmp_path / "b", [ds])
    for path in (first, second, first):  # the original comes again after the correction
        assert storescu(node.scp.port, path).returncode == 0
    assert len(spool_files(node)) == 2  # revisions 1 and 2, no orphan third file
    assert node.ledger.instance_count() == 2


def test_same_new_instance_with_different_bytes_at_once_keeps_both(
    node: NodeRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two associations store the same new SOP instance with different bytes at the same
    moment: each is told Success, so each one's bytes must be kept, as revisions 1 and 2,
    each file matching its ledger row (before the instance lock, both became revision 1 and
    the second file replaced the first's acknowledged bytes)."""
    image = make_chest_radiograph(seed=14, **SMALL)
    ds = image.dataset
    original = str(ds.get("SeriesDescription", ""))
    (first,) = write_study(tmp_path / "a", [image])
    ds.SeriesDescription = "CHEST PA corrected"
    (second,) = write_study(tmp_path / "b", [ds])
    store_file = node.spool.store_file

    def slow_store(*args: object, **kwargs: object) -> object:
        time.sleep(0.5)  # both associations are inside the store step at once without a lock
        return store_file(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(node.spool, "store_file", slow_store)
    results: list[int] = []
    senders = [
        threading.Thread(target=lambda p=p: results.append(storescu(node.scp.port, p).returncode))
        for p in (first, second)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)
    assert results == [0, 0]
    assert node.ledger.instance_count() == 2
    latest = node.ledger.find_instance(str(ds.SOPInstanceUID))
    assert latest is not None and latest.revision == 2
    stored = spool_files(node)
    assert sorted(p.name for p in stored) == sorted(
        [f"{ds.SOPInstanceUID}.dcm", f"{ds.SOPInstanceUID}.r2.dcm"]
    )
    # each sender's content is in its own file: not one of them twice
    assert sorted(str(pydicom.dcmread(p).get("SeriesDescription", "")) for p in stored) == sorted(
        [original, "CHEST PA corrected"]
    )
    latest_file = node.spool.path_of(latest.path).read_bytes()
    assert hashlib.sha256(latest_file).hexdigest() == latest.sha256
