"""The node as a user runs it: `medgemma-node serve`, a PACS (Orthanc) pushing, `status`."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.nodeproc import ServerProcess, dicom_echo, node_argv, node_environment
from node.runtime import NodeRuntime
from node.synthetic import make_two_view_study, write_study
from tests.conftest import node_cli, wait_for_state
from tests.peers import OrthancPeer, dcmtk, free_port, wait_for

SMALL = {"rows": 512, "cols": 416}


def test_orthanc_pushes_a_study_to_the_node(
    node_factory: Callable[..., NodeRuntime], orthanc: OrthancPeer, tmp_path: Path
) -> None:
    node = node_factory()
    images = make_two_view_study(seed=31, **SMALL)
    for path in write_study(tmp_path / "in", images):
        orthanc.upload(path)
    orthanc.add_modality("medgemma", "MEDGEMMA", "127.0.0.1", node.scp.port)
    (study_id,) = [s for s in orthanc.studies()]
    orthanc.store_to_modality("medgemma", [study_id])
    uid = images[0].dataset.StudyInstanceUID
    study = wait_for_state(node, uid, {"done"})
    assert study.instance_count == 2
    assert {s.view_position for s in node.ledger.series_of(uid, 1)} == {"PA", "LL"}


@pytest.fixture
def serve(node_process: Callable[..., ServerProcess], tmp_path: Path) -> ServerProcess:
    """``medgemma-node serve`` (demo engine), ready when its SCP answers C-ECHO."""
    port = free_port()
    env = {
        "MEDGEMMA_NODE_DICOM__PORT": str(port),
        "MEDGEMMA_NODE_DICOM__BIND_ADDRESS": "127.0.0.1",
        "MEDGEMMA_NODE_API__HOST": "127.0.0.1",
        "MEDGEMMA_NODE_API__PORT": str(free_port()),
        "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
        "MEDGEMMA_NODE_COMPLETION__QUIET_SECONDS": "1",
        "MEDGEMMA_NODE_ENGINE__NAME": "demo",
    }
    proc: ServerProcess = node_process(
        ["serve"], env=env, ready=lambda p: dicom_echo(port), what="serve's SCP to answer C-ECHO"
    )
    return proc


def status_of(serve: ServerProcess) -> dict[str, Any]:
    """``medgemma-node status --json`` against the serve process's settings."""
    result = node_cli(serve.env, "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def test_serve_storescu_then_status_shows_done(serve: ServerProcess, tmp_path: Path) -> None:
    images = make_two_view_study(seed=32, **SMALL)
    paths = write_study(tmp_path / "in", images)
    port = serve.env["MEDGEMMA_NODE_DICOM__PORT"]
    sent = subprocess.run(
        [dcmtk("storescu"), "-aec", "MEDGEMMA", "127.0.0.1", port, *map(str, paths)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    uid = images[0].dataset.StudyInstanceUID

    def done() -> dict[str, Any] | None:
        status = status_of(serve)
        states = {row["study_uid"]: row["state"] for row in status["latest"]}
        return status if states.get(uid) == "done" else None

    try:
        status = wait_for(done, 60, 0.5, f"status to show study {uid} done")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {serve.describe()}") from None
    assert status is not None  # wait_for returns only a truthy value
    assert status["scp"]["listening"] is True
    assert status["counts"]["done"] == 1

    text = node_cli(serve.env, "status", "--study", uid)
    assert text.returncode == 0
    assert "LISTENING" in text.stdout
    assert f"done     v1    2 inst  {uid}" in text.stdout
    assert "version 1: done" in text.stdout
    # no patient data in the log
    log = (Path(serve.env["MEDGEMMA_NODE_STORAGE__DATA_DIR"]) / "logs" / "node.log").read_text()
    ds = images[0].dataset
    assert uid in log
    assert str(ds.PatientID) not in log and str(ds.PatientName) not in log
    assert str(ds.AccessionNumber) not in log


def test_status_says_when_the_scp_is_down(tmp_path: Path) -> None:
    env = {
        "MEDGEMMA_NODE_DICOM__PORT": str(free_port()),
        "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
    }
    result = node_cli(env, "status")
    assert result.returncode == 1
    assert "SCP:      DOWN" in result.stdout
    assert "no ledger at" in result.stdout


def test_serve_refuses_a_busy_port_clearly(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        env = {
            "MEDGEMMA_NODE_DICOM__PORT": str(s.getsockname()[1]),
            "MEDGEMMA_NODE_DICOM__BIND_ADDRESS": "127.0.0.1",
            "MEDGEMMA_NODE_API__PORT": str(free_port()),
            "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
        }
        result = node_cli(env, "serve")
    assert result.returncode == 2
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_demo_command_runs_the_whole_loop(tmp_path: Path) -> None:
    result = node_cli(
        {}, "--log-level", "WARNING", "demo", "--data-dir", str(tmp_path / "demo"), timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "version 1: done" in out
    assert "DEMO - not for clinical use" in out
    assert "right middle zone nodule" in out and " mm" in out
    sr = next(line.split()[1] for line in out.splitlines() if line.startswith("SR "))
    seg = next(line.split()[1] for line in out.splitlines() if line.startswith("SEG "))
    assert Path(sr).is_file() and Path(seg).is_file()
    # the conversation: four turns in English, the same four in Chinese, all answered; the
    # refined anchor and the measured distance amended the report
    assert "/fhir/DiagnosticReport/" in out and "(amended)" in out
    assert out.count("answer (completed, about DiagnosticReport/") == 8
    assert "between their centres" in out and "中心间" in out
    assert "4 of 12 signs present" in out and "共 12 条" in out
    assert "A1 to A3 right hilum distance:" in out
    # it ends with the review page's address and the run's token, and exits (no --keep-running)
    assert re.search(r"^review +http://127\.0\.0\.1:\d+/review \(token \S+;", out, re.M), out


def test_demo_keep_running_stays_up_until_ctrl_c(tmp_path: Path) -> None:
    """`demo --keep-running` keeps its node up (the review page answers with the printed
    token) until SIGINT, then stops cleanly."""
    argv = node_argv(["--log-level", "WARNING", "demo", "--keep-running",
                      "--data-dir", str(tmp_path / "demo")])  # fmt: skip
    proc = subprocess.Popen(argv, env=node_environment({}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:  # printed once the demo is done and the node is held
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        out = "".join(lines)
        found = re.search(r"^review +(http://\S+/review) \(token (\S+);", out, re.M)
        assert found, out
        url, token = found.groups()
        time.sleep(2)
        assert proc.poll() is None, "the demo exited although --keep-running was given"
        listed = httpx.get(url + "/api/studies", headers={"Authorization": f"Bearer {token}"})
        assert listed.status_code == 200 and listed.json()["studies"][0]["state"] == "done"
        proc.send_signal(signal.SIGINT)
        rest, errors = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out + rest + errors
    assert "node       stopped" in rest
    assert "Traceback" not in errors
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)
