"""Several receiving processes behind one port (dicom.receiver_processes, node/receivers.py):
real storescu senders, completion on release through the parent, shared counters, logs,
the parent's host checks, and a receiver killed in the middle of an association."""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from bench.nodeproc import ServerProcess, dicom_echo
from node.ledger import Instance, StudyState
from node.metrics import ScpCollector
from node.receivers import receiver_dicom
from node.runtime import NodeRuntime
from node.scp import StoreStatus
from node.synthetic import make_chest_radiograph, write_study
from tests.conftest import make_settings, storescu, wait_for_state
from tests.peers import dcmtk, free_port, wait_for

SMALL = {"rows": 128, "cols": 104}


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeRuntime]]:
    started: list[NodeRuntime] = []

    def start(dicom: dict[str, object] | None = None, **sections: object) -> NodeRuntime:
        dicom = {"receiver_processes": 2, **(dicom or {})}
        runtime = NodeRuntime(make_settings(tmp_path, dicom=dicom, **sections), embedded=True)
        started.append(runtime)
        runtime.start()
        return runtime

    yield start
    for runtime in started:
        runtime.stop()


def stored_sops(runtime: NodeRuntime) -> list[tuple[str, int]]:
    with runtime.ledger.db.transaction() as s:
        rows = s.execute(select(Instance.sop_instance_uid, Instance.revision)).all()
    return sorted((str(uid), int(rev)) for uid, rev in rows)


def spool_files(runtime: NodeRuntime) -> list[Path]:
    return sorted(p for p in runtime.spool.root.rglob("*.dcm") if p.is_file())


def cstore_counts() -> dict[str, float]:
    (family,) = ScpCollector().collect()
    return {s.labels["outcome"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_a_released_study_completes_once_its_sender_has_no_connection_open(
    start_node: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    """The parent, which accepts every connection, tells completion that the sender's host
    has none open: the study completes without the grace time (an hour here)."""
    node = start_node(completion={"quiet_seconds": 3600.0, "release_grace_seconds": 3600.0})
    image = make_chest_radiograph(seed=77, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(node.dicom_port, path).returncode == 0
    study = wait_for_state(node, str(image.dataset.StudyInstanceUID), {"done", "failed"}, 60)
    assert study.state is StudyState.DONE, study.reason


def test_four_senders_over_two_receivers(
    start_node: Callable[..., NodeRuntime], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # receivers log at the level the parent had at their start
    # a quiet period out of reach: only completion on release (through the parent) completes
    node = start_node(completion={"quiet_seconds": 120.0, "release_grace_seconds": 0.2})
    pool = node.receivers
    assert pool is not None and all(pool.pids())
    assert os.getpid() not in pool.pids()
    studies = []
    senders = []
    for n in range(4):
        study_uid = generate_uid()
        images = [
            make_chest_radiograph(
                seed=10 * n + i, study_uid=study_uid, instance_number=i + 1, **SMALL
            )
            for i in range(3)
        ]
        paths = write_study(tmp_path / f"in-{n}", images)
        studies.append(study_uid)
        senders.append(
            subprocess.Popen(
                [
                    dcmtk("storescu"),
                    "-aet",
                    "STORESCU",
                    "-aec",
                    "MEDGEMMA",
                    "127.0.0.1",
                    str(node.dicom_port),
                    *map(str, paths),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for sender in senders:
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, out
    for study_uid in studies:
        assert wait_for_state(node, study_uid, {"done"}, timeout=60).instance_count == 3
    assert len(stored_sops(node)) == 12 and len(spool_files(node)) == 12
    # every receiver took connections; each connection's end reached the parent
    assert all(n >= 1 for n in pool.handed_connections()), pool.handed_connections()
    wait_for(lambda: pool.open_connections() == [0, 0], 10, 0.05, "connections closed")
    assert cstore_counts() == {"stored": 12.0, "duplicate": 0.0, "refused": 0.0}
    # the receivers' log lines are written by the parent's handlers, with their process
    stored = [r for r in caplog.records if r.getMessage().startswith("stored ")]
    assert len(stored) == 12
    assert {r.processName for r in stored} == {"medgemma-rx-0", "medgemma-rx-1"}
    # stopping the node stops its receivers and closes the port
    pids, port = pool.pids(), node.dicom_port
    node.stop()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert storescu(port, *paths[:1]).returncode != 0


def test_the_parent_refuses_hosts_not_allowed(
    start_node: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    node = start_node(dicom={"allowed_hosts": ["192.0.2.1"]})
    (path,) = write_study(tmp_path / "in", [make_chest_radiograph(seed=1, **SMALL)])
    assert storescu(node.dicom_port, path).returncode != 0
    assert stored_sops(node) == []
    assert node.receivers is not None and node.receivers.handed_connections() == [0, 0]


def test_a_killed_receiver_loses_nothing_it_answered(
    start_node: Callable[..., NodeRuntime], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # one connection per host: the sender's second association needs the slot of the
    # connection the killed receiver held
    node = start_node(dicom={"max_associations_per_host": 1})
    pool = node.receivers
    assert pool is not None
    study_uid = generate_uid()
    images = [
        make_chest_radiograph(seed=200 + i, study_uid=study_uid, instance_number=i + 1, **SMALL)
        for i in range(40)
    ]
    paths = write_study(tmp_path / "in", images)
    answered: list[str] = []
    ended = threading.Event()

    def send_slowly() -> None:
        ae = AE(ae_title="STORESCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        for image in images[:1]:
            ae.add_requested_context(
                image.dataset.SOPClassUID, image.dataset.file_meta.TransferSyntaxUID
            )
        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="MEDGEMMA")
        try:
            assert assoc.is_established
            for image in images:
                if not assoc.is_established:  # aborted: the receiver is gone
                    return
                status = assoc.send_c_store(image.dataset)
                if not assoc.is_established or "Status" not in status:
                    return
                if status.Status == 0x0000:
                    answered.append(image.sop_instance_uid)
                time.sleep(0.05)
            assoc.release()
        finally:
            ended.set()

    sender = threading.Thread(target=send_slowly, daemon=True)
    sender.start()
    wait_for(lambda: len(answered) >= 3, 60, 0.01, "three files answered")
    (busy,) = [i for i, n in enumerate(pool.open_connections()) if n == 1]
    killed = pool.pids()[busy]
    assert killed is not None
    killed_at = time.time()
    os.kill(killed, signal.SIGKILL)
    assert ended.wait(30), "the sender's association did not end"
    sender.join(5)
    assert 3 <= len(answered) < len(images)  # it ended mid-association
    # started again; the dead receiver's connection gave its host slot back
    wait_for(lambda: all(pool.pids()) and killed not in pool.pids(), 120, 0.1, "receiver replaced")
    assert pool.open_connections()[busy] == 0
    assert not list(node.spool.receive_dir.glob(f"rx-{killed}-*"))  # its partial files
    # every file answered Success is in the spool and the ledger
    kept = {uid for uid, _ in stored_sops(node)}
    assert set(answered) <= kept
    # the sender sends everything again: nothing missing, nothing doubled
    again = storescu(node.dicom_port, *paths)
    assert again.returncode == 0, again.stderr
    assert stored_sops(node) == sorted((image.sop_instance_uid, 1) for image in images)
    assert len(spool_files(node)) == len(images)
    # the receivers' log lines still reach the node's log after the kill
    assert any(
        r.created > killed_at and r.processName.startswith("medgemma-rx-") for r in caplog.records
    )
    counts = cstore_counts()
    # (one fewer when the kill fell between a file's commit and its count)
    assert len(images) - 1 <= counts["stored"] <= len(images)
    assert counts["duplicate"] >= len(answered)


def test_tls_through_a_receiver(start_node: Callable[..., NodeRuntime], tmp_path: Path) -> None:
    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    node = start_node(
        dicom={"tls": {"enabled": True, "cert_file": str(cert), "key_file": str(key)}}
    )
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    ds = make_chest_radiograph(seed=41, **SMALL).dataset
    assoc = ae.associate(
        "127.0.0.1", node.dicom_port, ae_title="MEDGEMMA", tls_args=(client, "127.0.0.1")
    )
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
    assoc.release()
    assert node.ledger.find_instance(ds.SOPInstanceUID) is not None
    # a plain association to the TLS port gets nowhere
    plain = AE(ae_title="PLAIN")
    plain.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    plain.acse_timeout = plain.network_timeout = 5
    assert not plain.associate("127.0.0.1", node.dicom_port, ae_title="MEDGEMMA").is_established


def test_zero_means_one_receiver_per_core_and_the_association_cap_is_shared(
    tmp_path: Path,
) -> None:
    cores = len(os.sched_getaffinity(0))
    dicom = make_settings(tmp_path, dicom={"receiver_processes": 0}).dicom
    assert dicom.receiving_processes == cores
    three = make_settings(tmp_path, dicom={"receiver_processes": 3, "max_associations": 16})
    assert receiver_dicom(three.dicom).max_associations == 6  # 3 x 6 >= 16


def receiver_pids(parent: int) -> list[int]:
    """The receiving processes of a node process (spawned interpreters, its children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except OSError:
        return True


def test_serve_with_receivers_stops_them_and_they_outlive_no_parent(
    node_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    def serve(name: str) -> tuple[ServerProcess, int]:
        port = free_port()
        env = {
            "MEDGEMMA_NODE_DICOM__PORT": str(port),
            "MEDGEMMA_NODE_DICOM__BIND_ADDRESS": "127.0.0.1",
            "MEDGEMMA_NODE_DICOM__RECEIVER_PROCESSES": "2",
            "MEDGEMMA_NODE_API__HOST": "127.0.0.1",
            "MEDGEMMA_NODE_API__PORT": str(free_port()),
            "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / name),
            "MEDGEMMA_NODE_STORAGE__MIN_FREE_MB": "0",
            "MEDGEMMA_NODE_ENGINE__NAME": "demo",
        }
        proc = node_process(["serve"], env=env, ready=lambda p: dicom_echo(port), what=name)
        return proc, port

    (path,) = write_study(tmp_path / "in", [make_chest_radiograph(seed=5, **SMALL)])
    # SIGTERM (what the operator's service manager sends): the node and its receivers end
    first, port = serve("term")
    receivers = receiver_pids(first.pid)
    assert len(receivers) == 2
    assert storescu(port, path).returncode == 0
    assert "2 receiving processes" in first.output()
    assert first.stop() == 0
    assert all(gone(pid) for pid in receivers)
    # the node process killed outright: its receivers notice and end by themselves
    second, port = serve("kill")
    receivers = receiver_pids(second.pid)
    assert len(receivers) == 2
    os.kill(second.pid, signal.SIGKILL)
    wait_for(lambda: all(gone(pid) for pid in receivers), 30, 0.1, "receivers ended")


def test_the_per_host_limit_holds_across_receivers(
    start_node: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    node = start_node(dicom={"max_associations_per_host": 2})
    pool = node.receivers
    assert pool is not None

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", node.dicom_port), timeout=10)

    held = [connect(), connect()]  # one in each receiver, neither sends anything yet
    wait_for(lambda: pool.open_connections() == [1, 1], 10, 0.05, "both handed over")
    third = connect()
    assert third.recv(1) == b""  # closed by the node process at once: the host has 2 open
    third.close()
    held.pop().close()  # its receiver reports the end; the slot is free again
    wait_for(lambda: sum(pool.open_connections()) == 1, 10, 0.05, "the end reported")
    (path,) = write_study(tmp_path / "in", [make_chest_radiograph(seed=7, **SMALL)])
    assert storescu(node.dicom_port, path).returncode == 0
    held.pop().close()
