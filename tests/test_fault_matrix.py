"""The fault and load matrix (issue 11, "the suite"): faults injected into running nodes,
load from many peers at once, and malformed input, each test asserting from the ledger,
the spool and the PACS (Orthanc) that every instance acknowledged with Success is stored
exactly once and every study's SR/SEG reached the PACS exactly once. The last test reads
every log the suite's nodes wrote for the test data's patient name, ID, birth date and
accession number. Outcomes: docs/reliability.md ("Fault and load matrix").

Sized for a 2-core CI machine (the whole file in about 3-4 minutes): 64 x 64 images for
the load and the SIGKILL cases, 256 x 208 where a study is pre-read. Crash recovery of a
pre-read (``serve`` killed mid-pre-read, dead workers) is in tests/test_faults_recovery.py,
the broker-error reason and the outbox replay command in tests/test_faults_ops.py.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    Verification,
)

from bench.nodeproc import ServerProcess, dicom_echo
from node.ledger import StudyLedger, StudyState, StudySummary
from node.outbox import DeliveryState
from node.runtime import NodeRuntime
from node.scp import StoreStatus
from node.settings import Settings, load_settings
from node.spool import Spool, sha256_of
from node.synthetic import (
    SyntheticImage,
    make_chest_radiograph,
    make_non_chest_radiograph,
    write_study,
)
from tests.conftest import make_settings, storescu, wait_for_state
from tests.peers import OrthancFactory, OrthancPeer, free_port, wait_for
from tests.test_hostile_peers import associate_rq

pytestmark = pytest.mark.faults

# Distinctive test data: none of it may appear in any log line of the suite.
PATIENT_NAME = "FAULTMATRIX^ZELDA^QUINCE"
PATIENT_ID = "FMX7Q31PID"
ACCESSION = "FMXACC9042"
BIRTH_DATE = "19310417"
PHI_VALUES = ("FAULTMATRIX", "ZELDA", "QUINCE", PATIENT_ID, ACCESSION, BIRTH_DATE, "1931-04-17")

TINY = {"rows": 64, "cols": 64}
SMALL = {"rows": 256, "cols": 208}
PACS_AET = "PACS"
FAILURE_STATUSES = {
    StoreStatus.OUT_OF_RESOURCES,
    StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    StoreStatus.CANNOT_UNDERSTAND,
    StoreStatus.PROCESSING_FAILURE,
}

# Every directory a test of this file wrote logs under (subprocess output, node.log), and
# the file the in-process nodes' log records go to; the last test reads them all.
LOG_ROOTS: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def in_process_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every log record of the nodes running in this process, at INFO, in one file (not
    those of the tests' HTTP clients: node subprocesses log their own httpx requests)."""
    directory = tmp_path_factory.mktemp("in-process-log")
    LOG_ROOTS.append(directory)
    path = directory / "in-process.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # the tests' own HTTP clients (the RIS side) log the URLs they request, accession and all
    handler.addFilter(lambda record: not record.name.startswith(("httpx", "httpcore")))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # as the CLI sets it
    yield path
    root.removeHandler(handler)
    root.setLevel(level)
    handler.close()


@pytest.fixture(autouse=True)
def logged_tmp_path(tmp_path: Path) -> Path:
    LOG_ROOTS.append(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- helpers


def chest(seed: int, instance: int = 1, study_uid: str | None = None, **size: Any) -> Dataset:
    """A chest CR of the distinctive test patient (birth date set too)."""
    image = make_chest_radiograph(
        seed=seed, instance_number=instance, study_uid=study_uid, patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME, accession_number=ACCESSION, **(size or SMALL),
    )  # fmt: skip
    image.dataset.PatientBirthDate = BIRTH_DATE
    return image.dataset


def tiny_study(seed: int, count: int, *, chest_images: bool = True) -> list[Dataset]:
    """``count`` 64 x 64 CR images of one study (chest: pre-read; knee: skipped by the rules)."""
    study_uid = str(generate_uid())
    if chest_images:
        return [chest(seed, n + 1, study_uid, **TINY) for n in range(count)]
    images: list[SyntheticImage] = [
        make_non_chest_radiograph(
            seed=seed,
            instance_number=n + 1,
            study_uid=study_uid,
            patient_id=PATIENT_ID,
            patient_name=PATIENT_NAME,
            accession_number=ACCESSION,
            **TINY,
        )
        for n in range(count)
    ]
    for image in images:
        image.dataset.PatientBirthDate = BIRTH_DATE
    return [image.dataset for image in images]


def scu(calling: str = "FAULTSCU", timeout: float = 30) -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


def store_each(port: int, datasets: list[Dataset], timeout: float = 30) -> dict[str, int]:
    """C-STORE each dataset over one association; SOP Instance UID -> status (-1: no
    answer); those not sent after an abort are left out."""
    statuses: dict[str, int] = {}
    assoc = scu(timeout=timeout).associate("127.0.0.1", port, ae_title="MEDGEMMA")
    assert assoc.is_established
    try:
        for ds in datasets:
            if not assoc.is_established:
                break  # aborted by the node: the rest are not in the result
            answer = assoc.send_c_store(ds)
            statuses[str(ds.SOPInstanceUID)] = int(answer.Status) if "Status" in answer else -1
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def spool_files(spool_root: Path) -> dict[str, Path]:
    """Relative path -> file of every file under the spool."""
    return {str(p.relative_to(spool_root)): p for p in spool_root.rglob("*") if p.is_file()}


def assert_stored_exactly_once(ledger: StudyLedger, spool_root: Path, sops: set[str]) -> None:
    """Each SOP instance has one ledger row (revision 1) whose spool file is complete
    (the recorded SHA-256) and parses; no spool file lacks a ledger row (no orphan), none
    is partial (``*.part``)."""
    files = spool_files(spool_root)
    assert not [name for name in files if name.endswith(".part")], files
    recorded: dict[str, str] = {}
    for sop in sops:
        inst = ledger.find_instance(sop)
        assert inst is not None, f"acknowledged SOP instance {sop} is not in the ledger"
        assert inst.revision == 1, f"{sop} stored as revision {inst.revision}"
        assert inst.path in files, f"{sop}: {inst.path} is not in the spool"
        assert sha256_of(files[inst.path]) == (inst.sha256, inst.size_bytes)
        assert str(pydicom.dcmread(files[inst.path]).SOPInstanceUID) == sop
        recorded[inst.path] = sop
    assert set(files) == set(recorded), f"orphan files: {sorted(set(files) - set(recorded))}"


def pacs_destination(port: int) -> dict[str, Any]:
    return {"ae_title": PACS_AET, "host": "127.0.0.1", "port": port}


def assert_results_once(ledger: StudyLedger, pacs: OrthancPeer, study: StudySummary) -> None:
    """One pre-read run of the study, one SR and one SEG for it in the outbox (delivered)
    and in the PACS."""
    assert study.state is StudyState.DONE, study.reason
    assert study.result is not None and study.result.outputs.sr and study.result.outputs.seg
    from node.outbox import Outbox
    from node.settings import OutboxSettings

    rows = Outbox(ledger, OutboxSettings()).deliveries(study_uid=study.study_uid)
    assert sorted(r.kind for r in rows) == ["seg", "sr"], rows
    assert all(r.state is DeliveryState.DELIVERED for r in rows), rows
    outputs = study.result.outputs
    assert {r.sop_instance_uid for r in rows} == {
        outputs.sr.sop_instance_uid,
        outputs.seg.sop_instance_uid,
    }
    for row in rows:
        instance = pacs.find_instance(row.sop_instance_uid)
        assert instance is not None, f"{row.kind} of {study.study_uid} is not in the PACS"
        assert pacs.instance_tags(instance)["StudyInstanceUID"] == study.study_uid


def pacs_result_count(pacs: OrthancPeer) -> Counter[str]:
    """Modality -> number of instances the PACS holds."""
    return Counter(pacs.instance_tags(i).get("Modality", "") for i in pacs.instances())


def serve_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {
        "MEDGEMMA_NODE_DICOM__PORT": str(port),
        "MEDGEMMA_NODE_DICOM__BIND_ADDRESS": "127.0.0.1",
        "MEDGEMMA_NODE_API__HOST": "127.0.0.1",
        "MEDGEMMA_NODE_API__PORT": str(free_port()),
        "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
        "MEDGEMMA_NODE_STORAGE__MIN_FREE_MB": "0",
        "MEDGEMMA_NODE_ENGINE__NAME": "demo",
    }
    env.update(extra)
    return env


def settings_of(env: dict[str, str]) -> Settings:
    """The settings a node subprocess started with ``env`` runs with."""
    return load_settings(
        None, storage={"data_dir": env["MEDGEMMA_NODE_STORAGE__DATA_DIR"], "min_free_mb": 0}
    )


# --------------------------------------------------------------------------- faults


def test_sigkill_of_serve_mid_association_keeps_every_acknowledged_instance(
    node_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    port = free_port()
    receive_tmp = tmp_path / "receive-tmp"  # where pynetdicom receives (TMPDIR)
    receive_tmp.mkdir()
    env = serve_env(tmp_path, port, TMPDIR=str(receive_tmp),
                    MEDGEMMA_NODE_COMPLETION__QUIET_SECONDS="2")  # fmt: skip
    serve = node_process(["serve"], env=env, ready=lambda p: dicom_echo(port), what="serve")
    study = tiny_study(seed=301, count=50)
    statuses: dict[str, int] = {}
    killed = threading.Event()

    def kill() -> None:
        os.killpg(serve.pid, signal.SIGKILL)
        killed.set()

    assoc = scu().associate("127.0.0.1", port, ae_title="MEDGEMMA")
    assert assoc.is_established
    for n, ds in enumerate(study):
        answer = assoc.send_c_store(ds)
        statuses[str(ds.SOPInstanceUID)] = int(answer.Status) if "Status" in answer else -1
        if n == 24:  # halfway: killed while the next instances are in flight
            threading.Timer(0.003, kill).start()
        if not assoc.is_established:
            break
    assert killed.wait(5)
    serve.process.wait(10)
    acknowledged = {sop for sop, status in statuses.items() if status == StoreStatus.SUCCESS}
    assert 25 <= len(acknowledged) < 50, statuses

    serve = node_process(["serve"], env=env, ready=lambda p: dicom_echo(port), what="restart")
    settings = settings_of(env)
    ledger = StudyLedger(settings.storage.resolved_database_url())
    try:
        stored = {i.sop_instance_uid for i in ledger.instances_of(str(study[0].StudyInstanceUID))}
        assert acknowledged <= stored
        assert_stored_exactly_once(ledger, settings.storage.spool_path, stored)
        leftovers = list(receive_tmp.iterdir()) + list(
            Spool(settings.storage.spool_path).receive_dir.iterdir()
        )
        assert not leftovers, f"partial received files left behind: {leftovers}"

        # resending the whole study is idempotent: each instance stored once, no revision 2
        paths = write_study(tmp_path / "resend", study)
        sent = storescu(port, *paths)
        assert sent.returncode == 0, sent.stderr
        every = {str(ds.SOPInstanceUID) for ds in study}
        assert_stored_exactly_once(ledger, settings.storage.spool_path, every)
        assert ledger.instance_count() == 50
        uid = str(study[0].StudyInstanceUID)

        def finished() -> list[StudySummary]:
            versions = ledger.study_versions(uid)
            terminal = {StudyState.DONE, StudyState.FAILED, StudyState.SKIPPED}
            return versions if all(v.state in terminal for v in versions) else []

        versions = wait_for(finished, 60, 0.2, f"every version of {uid} finished")
        assert sum(v.instance_count for v in versions) == 50
        assert [v.state for v in versions] == [StudyState.DONE] * len(versions), versions
        assert all(v.attempts == 1 for v in versions), versions
    finally:
        ledger.close()


class PrivateRedis:
    """A Redis server of one test only (no persistence), so it can be killed and started
    again empty without touching the Redis other tests share."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """(Re)start it on the same port, empty: a running one is killed first."""
        self.stop()
        with (self.directory / "redis.log").open("ab") as out:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.directory)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        wait_for(client.ping, 10, 0.05, "the private Redis", ignore=(redis.RedisError,))
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    yield server
    server.stop()


def worker_env(
    tmp_path: Path, broker: str, queues: dict[str, str], pacs_port: int
) -> dict[str, str]:
    import json

    return {
        "MEDGEMMA_NODE_QUEUE__BROKER_URL": broker,
        "MEDGEMMA_NODE_QUEUE__PREREAD_QUEUE": queues["preread_queue"],
        "MEDGEMMA_NODE_QUEUE__FOLLOWUP_QUEUE": queues["followup_queue"],
        "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
        "MEDGEMMA_NODE_ENGINE__NAME": "demo",
        "MEDGEMMA_NODE_DESTINATIONS": json.dumps([pacs_destination(pacs_port)]),
    }


def start_worker(node_process: Callable[..., ServerProcess], env: dict[str, str]) -> ServerProcess:
    command = ["worker", "--concurrency", "1", "--hostname", f"fmx-{secrets.token_hex(3)}@%h"]
    return node_process(command, env=env, ready=lambda p: p.log_has(" ready."), what="worker")


def test_redis_restarted_empty_while_a_study_is_queued(
    node_factory: Callable[..., NodeRuntime],
    node_process: Callable[..., ServerProcess],
    private_redis: PrivateRedis,
    orthanc_factory: OrthancFactory,
    queues: dict[str, str],
    tmp_path: Path,
) -> None:
    private_redis.start()
    broker = private_redis.url
    pacs = orthanc_factory(aet=PACS_AET)
    node = node_factory(
        embedded=False,
        queue={"broker_url": broker, "requeue_after_seconds": 3, "max_attempts": 20,
               "reconcile_interval_seconds": 0.5, **queues},
        destinations=[pacs_destination(pacs.dicom_port)],
    )  # fmt: skip
    ds = chest(seed=302)
    uid = str(ds.StudyInstanceUID)
    assert storescu(node.scp.port, *write_study(tmp_path / "in", [ds])).returncode == 0
    wait_for_state(node, uid, {"queued"})
    client = redis.Redis(port=private_redis.port)
    wait_for(lambda: client.llen(queues["preread_queue"]) >= 1, 10, 0.05, "the message in Redis")

    private_redis.start()  # killed and started again, empty
    assert client.llen(queues["preread_queue"]) == 0
    client.close()
    worker = start_worker(node_process, worker_env(tmp_path, broker, queues, pacs.dicom_port))
    done = wait_for_state(node, uid, {"done", "failed"}, timeout=90)
    assert done.attempts >= 2, done  # the reconciler re-sent it
    assert worker.output().count(f"pre-read of study {uid} v1 started") == 1, worker.describe()
    wait_for(
        lambda: all(r.state is DeliveryState.DELIVERED
                    for r in node.outbox.deliveries(study_uid=uid)),
        30, 0.2, "SR and SEG delivered",
    )  # fmt: skip
    assert_results_once(node.ledger, pacs, node.ledger.get_study(uid) or done)
    assert pacs_result_count(pacs) == {"SR": 1, "SEG": 1}


def test_pacs_down_then_back_gets_each_result_once(
    node_factory: Callable[..., NodeRuntime], orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    pacs_port = free_port()  # nothing listens there yet: connections are refused
    node = node_factory(
        destinations=[pacs_destination(pacs_port)],
        outbox={"backoff_base_seconds": 0.3, "backoff_max_seconds": 1, "poll_seconds": 0.1},
    )
    ds = chest(seed=303)
    uid = str(ds.StudyInstanceUID)
    assert storescu(node.scp.port, *write_study(tmp_path / "in", [ds])).returncode == 0
    wait_for_state(node, uid, {"done"}, timeout=60)

    def failed_twice() -> bool:
        rows = node.outbox.deliveries(study_uid=uid)
        return len(rows) == 2 and all(r.attempts >= 2 for r in rows)

    wait_for(failed_twice, 20, 0.1, "two failed attempts of SR and SEG")
    rows = node.outbox.deliveries(study_uid=uid)
    assert all(r.state is DeliveryState.PENDING and r.last_error for r in rows), rows

    pacs = orthanc_factory(aet=PACS_AET, extra_config={"DicomPort": pacs_port})
    wait_for(
        lambda: all(r.state is DeliveryState.DELIVERED
                    for r in node.outbox.deliveries(study_uid=uid)),
        20, 0.1, "SR and SEG delivered once the PACS is back",
    )  # fmt: skip
    attempts = {r.id: r.attempts for r in node.outbox.deliveries(study_uid=uid)}
    time.sleep(1.5)  # a few more sender polls: nothing is sent again
    assert {r.id: r.attempts for r in node.outbox.deliveries(study_uid=uid)} == attempts
    assert_results_once(node.ledger, pacs, node.ledger.get_study(uid))  # type: ignore[arg-type]
    assert pacs_result_count(pacs) == {"SR": 1, "SEG": 1}


def test_two_workers_on_one_queue_preread_each_study_once(
    node_factory: Callable[..., NodeRuntime],
    node_process: Callable[..., ServerProcess],
    orthanc_factory: OrthancFactory,
    redis_url: str,
    queues: dict[str, str],
    tmp_path: Path,
) -> None:
    pacs = orthanc_factory(aet=PACS_AET)
    env = worker_env(tmp_path, redis_url, queues, pacs.dicom_port)
    workers = [start_worker(node_process, env), start_worker(node_process, env)]
    node = node_factory(
        embedded=False,
        queue={"broker_url": redis_url, **queues},
        destinations=[pacs_destination(pacs.dicom_port)],
        completion={"on_association_release": True},
    )
    studies = [chest(seed=310 + n) for n in range(10)]
    for n, ds in enumerate(studies):
        assert storescu(node.scp.port, *write_study(tmp_path / f"in-{n}", [ds])).returncode == 0
    uids = [str(ds.StudyInstanceUID) for ds in studies]
    for uid in uids:
        assert wait_for_state(node, uid, {"done", "failed"}, timeout=120).state.value == "done"
    wait_for(lambda: node.outbox.counts()["delivered"] == 20, 30, 0.2, "20 results delivered")
    output = "".join(w.output() for w in workers)
    for uid in uids:
        study = node.ledger.get_study(uid)
        assert study is not None and study.attempts == 1, study
        assert output.count(f"pre-read of study {uid} v1 started") == 1
        assert_results_once(node.ledger, pacs, study)
    assert pacs_result_count(pacs) == {"SR": 10, "SEG": 10}
    # both workers took work from the one queue
    assert all("pre-read of study" in w.output() for w in workers), [
        w.output().count("pre-read of study") for w in workers
    ]


# --------------------------------------------------------------------------- load


def echo_seconds(port: int) -> float:
    """Seconds one C-ECHO association took; AssertionError when it was not answered.

    Not ``bench.nodeproc.dicom_echo``: its TCP probe gives up after 1 s, and a connect can
    take longer while 20 senders connect at once (pynetdicom listens with a backlog of 5)."""
    started = time.monotonic()
    ae = AE(ae_title="ECHOPROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGEMMA")
    assert assoc.is_established, "C-ECHO association not accepted"
    try:
        status = assoc.send_c_echo()
        assert "Status" in status and int(status.Status) == 0, "C-ECHO not answered"
    finally:
        assoc.release()
    return time.monotonic() - started


def test_connections_closed_before_associating_free_their_slots(
    node_factory: Callable[..., NodeRuntime],
) -> None:
    """As many connections as there are association slots, closed by the peer before
    (a load balancer's TCP health check) or during (a peer gone) the A-ASSOCIATE-RQ: each
    slot is free again as soon as the node has seen its connection close, long before
    dicom.acse_timeout (60 s here) would have freed it. The wait is polled: under CI's load
    the node's connection threads were once still starting 1 s after the last close."""
    node = node_factory(dicom={"acse_timeout": 60})
    request = associate_rq(b"PROBE")
    for n in range(node.settings.dicom.max_associations):
        with socket.create_connection(("127.0.0.1", node.scp.port), timeout=5) as probe:
            if n % 2:
                probe.sendall(request[: 6 + n])  # the header and part of the request
    wait_for(
        lambda: not node.scp.ae.active_associations,
        timeout=15,
        interval=0.1,
        what="every association slot to be free again",
    )
    assert echo_seconds(node.scp.port) < 5


def test_twenty_concurrent_associations_of_fifty_images(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    """Knee images (skipped by the rules): the load is on receiving and storing. Each
    study is one version: complete on its association's release, never cut by the quiet
    period (the default, 5 s) while its association still sends. Under this load on 2 cores
    one association's instances are up to 1.6-1.9 s apart here (the receive code of before
    and after issue 13's second round alike), and were over 2 s apart once in CI."""
    node = node_factory(
        dicom={"max_associations": 24, "max_associations_per_host": 24},
        completion={"quiet_seconds": 5},
    )
    studies = [tiny_study(seed=400 + n, count=50, chest_images=False) for n in range(20)]
    files = [write_study(tmp_path / f"in-{n}", study) for n, study in enumerate(studies)]
    senders = [
        subprocess.Popen(
            [
                "/usr/bin/storescu",
                "-aet",
                f"LOAD{n}",
                "-aec",
                "MEDGEMMA",
                "127.0.0.1",
                str(node.scp.port),
                *map(str, paths),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n, paths in enumerate(files)
    ]
    echoes: list[float] = []
    while any(s.poll() is None for s in senders):
        echoes.append(echo_seconds(node.scp.port))
        time.sleep(0.2)
    outputs = [s.communicate(timeout=60)[0] for s in senders]
    assert [s.returncode for s in senders] == [0] * 20, outputs
    # answered throughout the load; the first probe meets the 20 associations' negotiations
    # (130 presentation contexts each) on 2 cores: 2.4 s here, once 5.1 s in CI
    assert echoes and max(echoes) < 10, echoes
    print(f"C-ECHO during the load: {len(echoes)} probes, slowest {max(echoes):.2f} s")

    every = {str(ds.SOPInstanceUID) for study in studies for ds in study}
    assert len(every) == 1000
    assert_stored_exactly_once(node.ledger, node.spool.root, every)
    assert node.ledger.instance_count() == 1000
    assert node.scp.counters.stored == 1000 and node.scp.counters.duplicates == 0
    for study in studies:
        skipped = wait_for_state(node, str(study[0].StudyInstanceUID), {"skipped"}, timeout=30)
        assert skipped.instance_count == 50 and skipped.version == 1


def test_fifty_fhir_clients_search_and_ask(tmp_path: Path) -> None:
    import hashlib

    token = "fault-matrix-ris"
    scopes = ["system/DiagnosticReport.read", "system/Observation.read",
              "system/Communication.read", "system/Communication.write"]  # fmt: skip
    tokens = [{"name": "ris", "sha256": hashlib.sha256(token.encode()).hexdigest(),
               "scopes": scopes}]  # fmt: skip
    settings = make_settings(tmp_path, api={"host": "127.0.0.1", "port": 0},
                             auth={"tokens": tokens})  # fmt: skip
    runtime = NodeRuntime(settings, embedded=True, api=True)  # what `serve` runs
    runtime.start()
    try:
        runtime.start_api()
        assert runtime.api is not None
        ds = chest(seed=501)
        assert storescu(runtime.scp.port, *write_study(tmp_path / "in", [ds])).returncode == 0
        wait_for_state(runtime, str(ds.StudyInstanceUID), {"done"}, timeout=60)
        base = runtime.api.base_url
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as ris:
            wait_for(
                lambda: any(e["resource"]["status"] == "preliminary" for e in ris.get(
                    "/DiagnosticReport", params={"identifier": ACCESSION}).json().get("entry", [])),
                30, 0.2, "the preliminary report",
            )  # fmt: skip
        statuses: Counter[int] = Counter()
        lock = threading.Lock()

        def client(n: int) -> str:
            """One RIS client: search, read, ask, poll; returns the question's id."""

            def call(response: httpx.Response) -> httpx.Response:
                with lock:
                    statuses[response.status_code] += 1
                return response

            with httpx.Client(base_url=base, headers=headers, timeout=60) as c:
                bundle = call(c.get("/DiagnosticReport", params={"identifier": ACCESSION}))
                report = bundle.json()["entry"][0]["resource"]
                call(c.get(f"/DiagnosticReport/{report['id']}"))
                body = {
                    "resourceType": "Parameters",
                    "parameter": [
                        {"name": "question", "valueString": f"Is A1 larger than {n % 9 + 1} mm?"}
                    ],
                }
                asked = call(
                    c.post(
                        f"/DiagnosticReport/{report['id']}/$ask",
                        json=body,
                        headers={"Content-Type": "application/fhir+json"},
                    )
                )
                assert asked.status_code == 202, asked.text
                location = asked.headers["content-location"]
                deadline = time.monotonic() + 120
                while (polled := call(c.get(location))).status_code == 202:
                    assert time.monotonic() < deadline, "no answer in 120 s"
                    time.sleep(0.2)
                assert polled.status_code == 200, polled.text
                answer = polled.json()["entry"][0]["resource"]
                assert answer["status"] == "completed", answer
                return str(answer["inResponseTo"][0]["reference"])

        with ThreadPoolExecutor(max_workers=50) as pool:
            questions = list(pool.map(client, range(50)))
        assert len(set(questions)) == 50
        assert not [code for code in statuses if code >= 500], statuses
        with httpx.Client(base_url=base, headers=headers, timeout=30) as ris:
            for question in questions:
                answers = ris.get("/Communication", params={"in-response-to": question}).json()
                assert len(answers.get("entry", [])) == 1, (question, answers)
        print(f"FHIR responses by status: {dict(statuses)}")
    finally:
        runtime.stop()


# --------------------------------------------------------------------------- input


def encode_element(tag: int, vr: str, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element; ``length`` overrides the true length."""
    size = len(value) if length is None else length
    group, element = tag >> 16, tag & 0xFFFF
    if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"):
        return struct.pack("<HH2sHL", group, element, vr.encode(), 0, size) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), size & 0xFFFF) + value


def raw_file(path: Path, sop: str, body: bytes) -> Path:
    """A file with a CR file meta and ``body`` as its dataset, byte for byte."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.999.77"
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(f), meta)
        f.write(body)
    return path


def uid_elements(sop: str, study: str | None = None) -> dict[int, bytes]:
    def ui(tag: int, uid: str) -> bytes:
        value = uid.encode() + (b"\0" if len(uid) % 2 else b"")
        return encode_element(tag, "UI", value)

    return {
        0x00080016: ui(0x00080016, str(ComputedRadiographyImageStorage)),
        0x00080018: ui(0x00080018, sop),
        0x0020000D: ui(0x0020000D, study or str(generate_uid())),
        0x0020000E: ui(0x0020000E, str(generate_uid())),
    }


def c_store_raw(port: int, path: Path) -> int:
    """Send a file's dataset bytes as they are; the status (-1: no answer, association gone)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = scu("RAWSCU").associate("127.0.0.1", port, ae_title="MEDGEMMA")
        assert assoc.is_established
        answer = assoc.send_c_store(path)
        if assoc.is_established:
            assoc.release()
        return int(answer.Status) if "Status" in answer else -1
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def malformed_corpus(directory: Path) -> dict[str, Path]:
    """Name -> file of each malformed input (all proposing CR, explicit VR little endian)."""
    directory.mkdir()
    corpus: dict[str, Path] = {}

    def body_of(elements: dict[int, bytes]) -> bytes:
        return b"".join(elements[tag] for tag in sorted(elements))

    good = chest(seed=601, **TINY)
    good_path = write_study(directory / "good", [good])[0]
    data = good_path.read_bytes()
    cut = directory / "truncated.dcm"
    cut.write_bytes(data[: len(data) - len(good.PixelData) // 2])
    corpus["truncated in Pixel Data"] = cut

    sop = str(generate_uid())
    elements = uid_elements(sop)
    elements[0x00280010] = encode_element(0x00280010, "DA", b"20250101")  # Rows (US) as DA
    elements[0x00100010] = encode_element(0x00100010, "UL", b"\x01\x02\x03")  # PN as UL, 3 bytes
    corpus["wrong VRs"] = raw_file(directory / "wrong-vr.dcm", sop, body_of(elements))

    sop = str(generate_uid())
    elements = uid_elements(sop)
    elements[0x0040A160] = encode_element(0x0040A160, "UT", b"x" * 64, length=0xFFFFFFF0)
    corpus["a 4 GiB value length"] = raw_file(directory / "huge.dcm", sop, body_of(elements))

    sop = str(generate_uid())
    elements = uid_elements(sop)
    elements[0x00100010] = encode_element(0x00100010, "PN", b"AB", length=0xFFFF)
    corpus["a value longer than the dataset"] = raw_file(
        directory / "overlong.dcm", sop, body_of(elements)
    )

    sop = str(generate_uid())
    elements = uid_elements(sop)
    depth = 3000
    item, end_item, end_seq = (
        b"\xfe\xff\x00\xe0\xff\xff\xff\xff",
        b"\xfe\xff\x0d\xe0" + bytes(4),
        (b"\xfe\xff\xdd\xe0" + bytes(4)),
    )
    nested = (encode_element(0x00081140, "SQ", b"", length=0xFFFFFFFF) + item) * depth
    nested += (end_item + end_seq) * depth
    elements[0x00081140] = nested
    corpus[f"sequences nested {depth} deep"] = raw_file(
        directory / "deep.dcm", sop, body_of(elements)
    )

    sop = str(generate_uid())
    corpus["no SOP Instance UID in the dataset"] = raw_file(
        directory / "no-sop.dcm", sop,
        body_of({k: v for k, v in uid_elements(sop).items() if k != 0x00080018}),
    )  # fmt: skip
    return corpus


def send_garbage_pdus(port: int) -> None:
    """Raw connections sending what is not DICOM: random bytes, an unknown PDU type after
    an association request, a P-DATA-TF before any association; each closed by the node."""
    payloads = [
        secrets.token_bytes(64),
        associate_rq(b"GARBAGE") + struct.pack(">BBL", 0x09, 0, 16) + secrets.token_bytes(16),
        struct.pack(">BBL", 0x04, 0, 12) + struct.pack(">L", 8) + b"\x01\x03" + bytes(6),
        b"\x01\x00" + b"\xff" * 4 + secrets.token_bytes(32),
    ]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(payload)
            sock.settimeout(10)
            try:
                while sock.recv(4096):
                    pass  # whatever the node answers (A-ABORT, A-ASSOCIATE-RJ), then EOF
            except (ConnectionResetError, TimeoutError):
                pass


# Attributes the generated datasets draw from (keyword tags and VRs), plus any tag at all.
GENERATED_TAGS: list[tuple[int, str]] = [
    (0x00080060, "CS"), (0x00080020, "DA"), (0x00080050, "SH"), (0x00081030, "LO"),
    (0x00100010, "PN"), (0x00100020, "LO"), (0x00100030, "DA"), (0x00180015, "CS"),
    (0x00185101, "CS"), (0x00200013, "IS"), (0x00280002, "US"), (0x00280004, "CS"),
    (0x00280010, "US"), (0x00280011, "US"), (0x00280100, "US"), (0x00280101, "US"),
    (0x00281050, "DS"), (0x00281051, "DS"), (0x00181164, "DS"), (0x7FE00010, "OB"),
    (0x00081140, "SQ"), (0x00400275, "SQ"), (0x00091010, "LO"), (0x00290010, "UN"),
]  # fmt: skip
VRS = ["AE", "CS", "DA", "DS", "IS", "LO", "OB", "OW", "PN", "SH", "SQ", "UL", "UN", "US",
       "UT", "UI", "FD"]  # fmt: skip


@st.composite
def generated_datasets(draw: st.DrawFn) -> tuple[str, bytes]:
    """(SOP Instance UID, dataset bytes): the UIDs (sometimes bad or missing) plus random
    attributes, known or not, each with a random VR (right or wrong) and random bytes."""
    sop = str(generate_uid())
    elements = uid_elements(sop)
    for tag in draw(st.sets(st.sampled_from(sorted(elements)), max_size=2)):
        choice = draw(st.sampled_from(["drop", "junk", "empty"]))
        if choice == "drop" and tag != 0x00080018:
            del elements[tag]
        elif choice == "junk":
            elements[tag] = encode_element(tag, "UI", draw(st.binary(max_size=80)))
        else:
            elements[tag] = encode_element(tag, "UI", b"")
    known = st.sampled_from(GENERATED_TAGS).map(lambda tv: (tv[0], tv[1]))
    anything = st.tuples(
        st.integers(0x0008, 0x7FE0).map(lambda g: g << 16), st.integers(0x0010, 0xFFFF)
    ).map(lambda ge: (ge[0] | ge[1], "??"))
    for tag, vr in draw(st.lists(st.one_of(known, anything), max_size=12)):
        vr = draw(st.sampled_from(VRS)) if vr == "??" or draw(st.booleans()) else vr
        value = draw(st.one_of(st.binary(max_size=96), st.text(max_size=40).map(str.encode)))
        if len(value) % 2:
            value += b" "
        elements.setdefault(tag, encode_element(tag, vr, value))
    order = sorted(elements) if draw(st.booleans()) else draw(st.permutations(list(elements)))
    return sop, b"".join(elements[tag] for tag in order)


def assert_answered(node: NodeRuntime, sop: str, status: int) -> None:
    """Success with the instance complete in the ledger and the spool, or a failure
    status with nothing of it kept."""
    stored = node.ledger.find_instance(sop)
    if status == StoreStatus.SUCCESS:
        assert stored is not None, f"{sop} acknowledged but not in the ledger"
        path = node.spool.root / stored.path
        assert sha256_of(path) == (stored.sha256, stored.size_bytes)
    else:
        assert status in FAILURE_STATUSES, f"{sop}: status {status:#06x}"
        assert stored is None, f"{sop} refused ({status:#06x}) but in the ledger"


def test_malformed_and_generated_input_never_stops_the_node(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    node = node_factory(completion={"quiet_seconds": 1})
    port = node.scp.port
    outcomes: dict[str, int] = {}
    for name, path in malformed_corpus(tmp_path / "corpus").items():
        sop = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
        outcomes[name] = status = c_store_raw(port, path)
        assert_answered(node, sop, status)
    print("malformed corpus:", {k: f"{v:#06x}" for k, v in outcomes.items()})

    # no preamble, no file meta, implicit VR (as old archives write): storescu sends it
    bare = chest(seed=602, **TINY)
    bare_path = tmp_path / "bare.dcm"
    del bare.file_meta
    bare.save_as(bare_path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    sent = storescu(port, bare_path)
    assert sent.returncode == 0, sent.stderr
    assert node.ledger.find_instance(str(bare.SOPInstanceUID)) is not None

    send_garbage_pdus(port)
    assert dicom_echo(port)(), "the node stopped answering after the garbage PDUs"

    generated: Counter[str] = Counter()
    directory = tmp_path / "generated"
    directory.mkdir()

    @hypothesis_settings(
        max_examples=40, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )  # fmt: skip
    @given(generated_datasets())
    def node_answers(example: tuple[str, bytes]) -> None:
        sop, body = example
        status = c_store_raw(port, raw_file(directory / f"{sop}.dcm", sop, body))
        generated[f"{status:#06x}"] += 1
        assert_answered(node, sop, status)

    node_answers()
    print("generated datasets:", dict(generated))
    assert dicom_echo(port)(), "the node stopped answering after the generated datasets"
    assert not list(node.spool.root.rglob("*.part"))

    good = chest(seed=603)
    assert storescu(port, *write_study(tmp_path / "good", [good])).returncode == 0
    done = wait_for_state(node, str(good.StudyInstanceUID), {"done", "failed"}, timeout=60)
    assert done.state is StudyState.DONE, done.reason


def full_disk_node(tmp_path: Path, data: Path, postgres_url: str, min_free_mb: int) -> NodeRuntime:
    """A node with its data directory at ``data`` and its ledger in PostgreSQL (off the
    full disk); a long quiet period, so no study completes and no pre-read writes."""
    storage = {"data_dir": str(data), "database_url": postgres_url, "min_free_mb": min_free_mb}
    settings = make_settings(tmp_path, storage=storage, completion={"quiet_seconds": 600})
    node = NodeRuntime(settings, embedded=True)
    node.start()
    return node


def full_disk_study() -> list[Dataset]:
    """16 CR images of 106 KB each (1.7 MB)."""
    uid = str(generate_uid())
    return [chest(seed=701, instance=n + 1, study_uid=uid) for n in range(16)]


def test_free_space_below_the_watermark_refuses_with_out_of_resources(
    tmp_path: Path, postgres_url: str
) -> None:
    """storage.min_free_mb above the free space: every C-STORE answered A700, nothing kept."""
    data = tmp_path / "var"
    data.mkdir()
    free_mb = shutil.disk_usage(data).free // 2**20
    node = full_disk_node(tmp_path, data, postgres_url, min_free_mb=free_mb + 1024)
    try:
        study = full_disk_study()
        statuses = store_each(node.scp.port, study)
        assert statuses == {str(ds.SOPInstanceUID): StoreStatus.OUT_OF_RESOURCES for ds in study}
        assert node.ledger.instance_count() == 0
        assert spool_files(node.spool.root) == {}
        assert not [p for p in data.rglob("*") if p.is_file() and "spool" in p.parts]
        assert not list(node.spool.receive_dir.iterdir()), "received files left behind"
        assert dicom_echo(node.scp.port)()
    finally:
        node.stop()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root may mount one here); skipped, saying why, where it cannot."""
    data = tmp_path / "full"
    data.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(data)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): "
                    "test_free_space_below_the_watermark_refuses_with_out_of_resources "
                    "covers the refusal")  # fmt: skip
    yield data
    # lazily: a file the node still holds open must not fail the teardown
    subprocess.run(["umount", "-l", str(data)], check=True)


def test_data_directory_filling_up_during_a_store(
    tmp_path: Path, small_tmpfs: Path, postgres_url: str
) -> None:
    """A 1 MiB tmpfs as the data directory: each image gets Success and is complete in the
    ledger and the spool, or gets A700 and leaves nothing behind; the association goes on
    and so do later ones."""
    node = full_disk_node(tmp_path, small_tmpfs, postgres_url, min_free_mb=0)
    try:
        study = full_disk_study()
        statuses = store_each(node.scp.port, study, timeout=5)
        acknowledged = {sop for sop, s in statuses.items() if s == StoreStatus.SUCCESS}
        assert acknowledged, statuses
        assert_stored_exactly_once(node.ledger, node.spool.root, acknowledged)
        unanswered = [
            str(ds.SOPInstanceUID) for ds in study if str(ds.SOPInstanceUID) not in statuses
        ]
        assert not unanswered and set(statuses.values()) == {
            StoreStatus.SUCCESS,
            StoreStatus.OUT_OF_RESOURCES,
        }, statuses
        for sop, status in statuses.items():
            assert_answered(node, sop, status)
        assert not list(node.spool.receive_dir.iterdir()), "received files left behind"

        # a later association, the disk still full: A700 saying why, the association kept
        assoc = scu(timeout=5).associate("127.0.0.1", node.scp.port, ae_title="MEDGEMMA")
        assert assoc.is_established
        answer = assoc.send_c_store(chest(seed=702))
        assert answer.Status == StoreStatus.OUT_OF_RESOURCES, answer
        assert answer.ErrorComment == "out of disk space on the node"
        assert assoc.is_established
        assoc.release()
        assert not list(node.spool.receive_dir.iterdir()), "received files left behind"
        assert dicom_echo(node.scp.port)()
    finally:
        node.stop()


# --------------------------------------------------------------------------- logs


def test_no_log_line_of_the_suite_holds_patient_data() -> None:
    """Every log the suite's nodes wrote (node.log, subprocess stdout/stderr, in-process
    records) is free of the test patient's name, ID, birth date and accession number."""
    logs = sorted(
        {p for root in LOG_ROOTS if root.exists() for p in root.rglob("*.log*") if p.is_file()}
    )
    if len(LOG_ROOTS) <= 1:
        pytest.skip("reads the logs of the other tests of this file: run the whole file")
    assert any(p.name == "in-process.log" and p.stat().st_size for p in logs), logs
    findings = []
    lines = 0
    for path in logs:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            lines += 1
            upper = line.upper()
            for value in PHI_VALUES:
                if value.upper() in upper:
                    findings.append(f"{path}:{number}: {value}: {line[:200]}")
    assert lines > 100, f"only {lines} log lines in {len(logs)} files"
    assert not findings, "\n".join(findings[:20])
    print(f"{lines} log lines in {len(logs)} files, no patient data")
