"""Faults (issue 11 items 8, 9): a sender killed mid-C-STORE, `serve` killed mid-pre-read, a
whole Celery worker killed mid-pre-read. Each test kills a real process (SIGKILL) and then
asserts from the file system, the ledger and the outbox that nothing is left behind, nothing
is lost and nothing is done twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.nodeproc import ServerProcess, dicom_echo
from node.ledger import InstanceHeader, LedgerError, StudyLedger, StudyState
from node.outbox import Outbox
from node.runtime import NodeRuntime
from node.settings import OutboxSettings
from node.synthetic import make_chest_radiograph, write_study
from tests.conftest import storescu, wait_for_state
from tests.peers import dcmtk, free_port, wait_for

SMALL = {"rows": 256, "cols": 208}
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()] if directory.exists() else []


def _large_cr(path: Path, megabytes: int) -> int:
    """A CR whose Pixel Data is ``megabytes`` MiB of zeros; returns the file size."""
    side = int((megabytes * 2**20 / 2) ** 0.5)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(side * side * 2)
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def _serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "MEDGEMMA_NODE_DICOM__PORT": str(free_port()),
        "MEDGEMMA_NODE_DICOM__BIND_ADDRESS": "127.0.0.1",
        "MEDGEMMA_NODE_API__HOST": "127.0.0.1",
        "MEDGEMMA_NODE_API__PORT": str(free_port()),
        "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
        "MEDGEMMA_NODE_STORAGE__MIN_FREE_MB": "0",
        "MEDGEMMA_NODE_COMPLETION__QUIET_SECONDS": "1",
        "MEDGEMMA_NODE_ENGINE__NAME": "demo",
        **extra,
    }


def _start_serve(node_process: Callable[..., ServerProcess], env: dict[str, str]) -> ServerProcess:
    port = int(env["MEDGEMMA_NODE_DICOM__PORT"])
    proc: ServerProcess = node_process(
        ["serve"], env=env, ready=lambda p: dicom_echo(port), what="serve's SCP to answer C-ECHO"
    )
    return proc


def _kill_group(proc: ServerProcess) -> None:
    """SIGKILL the process and everything in its group (a crash: no cleanup runs)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.process.wait(10)


def test_a_sender_killed_mid_transfer_leaves_nothing_in_tmpdir_and_leftovers_go_at_start(
    node_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = _serve_env(tmp_path, TMPDIR=str(tmpdir))
    serve = _start_serve(node_process, env)
    receiving = tmp_path / "var" / "receiving"
    big = tmp_path / "in" / "big.dcm"
    big.parent.mkdir()
    size = _large_cr(big, 160)

    sender = subprocess.Popen(
        [dcmtk("storescu"), "-aec", "MEDGEMMA", "127.0.0.1", env["MEDGEMMA_NODE_DICOM__PORT"],
         str(big)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # the node has begun writing the dataset (wherever it writes it): kill the sender
        wait_for(
            lambda: any(p.stat().st_size > 0 for p in _files(tmpdir) + _files(receiving)),
            30, 0.01, "the node to start writing the received dataset",
        )  # fmt: skip
        sender.kill()
    finally:
        sender.wait(10)
    partial = wait_for(lambda: _files(receiving), 10, 0.05, "a partial file in receiving/")
    time.sleep(1)  # the node notices the closed connection
    assert dicom_echo(int(env["MEDGEMMA_NODE_DICOM__PORT"]))()  # still serving
    assert _files(tmpdir) == [], "received data written to $TMPDIR"
    assert 0 < sum(p.stat().st_size for p in partial) < size  # cut mid-transfer
    assert _files(tmp_path / "var" / "spool") == []  # nothing acknowledged, nothing stored

    serve.stop()
    again = _start_serve(node_process, env)
    assert _files(receiving) == []
    assert "removed 1 partial received datasets (" in again.output()
    assert "MiB) left in" in again.output()


def test_serve_killed_mid_preread_reruns_at_restart_once(
    node_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    destination = [{"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]
    env = _serve_env(
        tmp_path,
        MEDGEMMA_NODE_ENGINE__DEMO_DELAY_SECONDS="120",
        MEDGEMMA_NODE_DESTINATIONS=json.dumps(destination),
    )
    serve = _start_serve(node_process, env)
    image = make_chest_radiograph(seed=91, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(int(env["MEDGEMMA_NODE_DICOM__PORT"]), path).returncode == 0
    uid = image.dataset.StudyInstanceUID
    ledger = StudyLedger(f"sqlite:///{tmp_path / 'var' / 'ledger.sqlite3'}")
    try:

        def in_state(state: StudyState) -> Callable[[], bool]:
            return lambda: (s := ledger.get_study(uid)) is not None and s.state is state

        wait_for(in_state(StudyState.RUNNING), 30, 0.1, "the pre-read to start")
        _kill_group(serve)  # mid-pre-read: the demo engine sleeps for 120 s
        running = ledger.get_study(uid)
        assert running is not None and running.state is StudyState.RUNNING

        env["MEDGEMMA_NODE_ENGINE__DEMO_DELAY_SECONDS"] = "0"
        restarted_at = time.monotonic()
        again = _start_serve(node_process, env)
        wait_for(in_state(StudyState.DONE), 20, 0.1, f"study done after the restart: {again}")
        assert time.monotonic() - restarted_at < 20
        done = ledger.get_study(uid)
        assert done is not None and done.attempts == running.attempts + 1
        assert f"study {uid} v1 was running when the node stopped: re-sent now" in again.output()
        assert again.output().count(f"pre-read of study {uid} v1 started") == 1
        outbox = Outbox(ledger, OutboxSettings())
        rows = outbox.deliveries(study_uid=uid)
        assert sorted(r.kind for r in rows) == ["seg", "sr"], rows  # one pair, no duplicate
        results = _files(tmp_path / "var" / "results")
        assert len([p for p in results if p.name.startswith("sr-")]) == 1, results
    finally:
        ledger.close()


def test_celery_worker_killed_mid_preread_is_resent_within_its_lease(
    node_factory: Callable[..., NodeRuntime],
    node_process: Callable[..., ServerProcess],
    redis_url: str,
    queues: dict[str, str],
    tmp_path: Path,
) -> None:
    lease = 4
    node = node_factory(
        embedded=False,
        queue={
            "broker_url": redis_url,
            "run_lease_seconds": lease,
            "reconcile_interval_seconds": 0.5,
            **queues,
        },
    )

    def worker(delay: float, name: str) -> ServerProcess:
        env = {
            "MEDGEMMA_NODE_QUEUE__BROKER_URL": redis_url,
            "MEDGEMMA_NODE_QUEUE__PREREAD_QUEUE": queues["preread_queue"],
            "MEDGEMMA_NODE_QUEUE__FOLLOWUP_QUEUE": queues["followup_queue"],
            "MEDGEMMA_NODE_QUEUE__RUN_LEASE_SECONDS": str(lease),
            "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
            "MEDGEMMA_NODE_ENGINE__NAME": "demo",
            "MEDGEMMA_NODE_ENGINE__DEMO_DELAY_SECONDS": str(delay),
        }
        command = ["worker", "--concurrency", "1", "--hostname", f"{name}@%h"]
        proc: ServerProcess = node_process(
            command, env=env, ready=lambda p: p.log_has(" ready."), what=f"worker {name} ready"
        )
        return proc

    first = worker(120, "first")
    image = make_chest_radiograph(seed=92, **SMALL)
    (path,) = write_study(tmp_path / "in", [image])
    assert storescu(node.scp.port, path).returncode == 0
    uid = image.dataset.StudyInstanceUID
    running = wait_for_state(node, uid, {"running"}, timeout=60)
    second = worker(0, "second")  # idle on the same queue
    time.sleep(lease)  # the first worker renews its lease meanwhile: not re-sent
    assert node.ledger.get_study(uid).attempts == running.attempts  # type: ignore[union-attr]
    assert f"pre-read of study {uid} v1 started" not in second.output()

    _kill_group(first)  # the whole worker: main process and pool child
    killed_at = time.monotonic()
    done = wait_for_state(node, uid, {"done"}, timeout=60)
    assert time.monotonic() - killed_at < lease + 30, "not re-sent within about a minute"
    assert done.attempts == running.attempts + 1
    wait_for(lambda: "succeeded in" in second.output(), 10, 0.1, "the second worker's ack")
    assert second.output().count(f"pre-read of study {uid} v1 started") == 1
    assert done.result is not None and done.result.outputs is not None
    sr_files = [p for p in _files(tmp_path / "var" / "results") if p.name.startswith("sr-")]
    assert len(sr_files) == 1, sr_files


def test_a_stalled_worker_cannot_overwrite_the_run_that_took_over(tmp_path: Path) -> None:
    ledger = StudyLedger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}", run_lease_seconds=0.5)
    try:
        header = InstanceHeader("1.2.3", "1.2.3.1", "1.2.3.1.1", CR_STORAGE, "1.2.840.10008.1.2")
        ledger.record_instance(
            header, path="x.dcm", sha256="0" * 64, size_bytes=1, revision=1, calling_ae="A"
        )
        ledger.complete_quiet_studies(0)
        ledger.mark_queued("1.2.3", 1, "t")
        assert ledger.start_run("1.2.3", 1, owner="w1") is not None
        assert ledger.renew_run("1.2.3", 1, owner="w1")  # the heartbeat keeps it
        assert ledger.holds_run("1.2.3", 1, owner="w1")
        time.sleep(0.6)  # w1 stalls: no renewal, the lease runs out
        (stuck,) = ledger.stuck_studies(older_than_seconds=3600)  # re-sent at once, not in 1 h
        assert stuck.study_uid == "1.2.3"
        ledger.mark_queued("1.2.3", 1, "t")  # the reconciler re-sends it
        assert ledger.start_run("1.2.3", 1, owner="w2") is not None
        # w1 wakes up: it can neither renew nor finish over w2's run
        assert not ledger.renew_run("1.2.3", 1, owner="w1")
        with pytest.raises(LedgerError, match="no longer run by w1"):
            ledger.finish("1.2.3", 1, ok=False, reason="stale", owner="w1")
        study = ledger.get_study("1.2.3")
        assert study is not None and study.state is StudyState.RUNNING
        assert study.run_owner == "w2" and study.reason == ""
        ledger.finish("1.2.3", 1, ok=True, owner="w2")
        assert ledger.get_study("1.2.3").state is StudyState.DONE  # type: ignore[union-attr]
    finally:
        ledger.close()
