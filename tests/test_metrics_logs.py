"""`serve --log-format json`: a study and a question through the node; every log line is
JSON with study UIDs and request ids and no patient data; /metrics behind its token; the
pre-read stages in the log; `scp`'s own metrics listener."""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.nodeproc import ServerProcess, dicom_echo
from node.metrics import histogram
from node.runtime import NodeRuntime
from node.synthetic import make_chest_radiograph, make_two_view_study, write_study
from tests.conftest import wait_for_state
from tests.peers import dcmtk, free_port, wait_for

METRICS_TOKEN = "scrape-secret"


def _get(url: str, token: str | None = None, body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        headers.update({"Content-Type": "application/fhir+json", "Prefer": "respond-sync"})
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics")


def test_json_logs_metrics_and_stages_of_serve(
    node_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    port, api_port = free_port(), free_port()
    data = tmp_path / "var"
    env = {
        "MEDGEMMA_NODE_DICOM__PORT": str(port),
        "MEDGEMMA_NODE_DICOM__BIND_ADDRESS": "127.0.0.1",
        "MEDGEMMA_NODE_API__PORT": str(api_port),
        "MEDGEMMA_NODE_AUTH__REQUIRED": "false",
        "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(data),
        "MEDGEMMA_NODE_COMPLETION__QUIET_SECONDS": "1",
        "MEDGEMMA_NODE_ENGINE__NAME": "demo",
        "MEDGEMMA_NODE_METRICS__TOKEN_SHA256": hashlib.sha256(METRICS_TOKEN.encode()).hexdigest(),
    }
    serve = node_process(
        ["--log-format", "json", "serve"], env=env, ready=lambda p: dicom_echo(port),
        what="serve's SCP to answer C-ECHO",
    )  # fmt: skip
    images = make_two_view_study(seed=41, rows=512, cols=416)
    paths = write_study(tmp_path / "in", images)
    sent = subprocess.run(
        [dcmtk("storescu"), "-aec", "MEDGEMMA", "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    uid = str(images[0].dataset.StudyInstanceUID)
    base = f"http://127.0.0.1:{api_port}/fhir"

    def report_id() -> str | None:
        code, body = _get(f"{base}/DiagnosticReport?status=preliminary")
        entries = json.loads(body).get("entry", []) if code == 200 else []
        return str(entries[0]["resource"]["id"]) if entries else None

    rid = wait_for(report_id, 90, 0.5, "a preliminary DiagnosticReport")
    question = {
        "resourceType": "Parameters",
        "parameter": [{"name": "question", "valueString": "What are the findings?"}],
    }
    code, _ = _get(f"{base}/DiagnosticReport/{rid}/$ask", body=json.dumps(question).encode())
    assert code == 200

    # /metrics: the token, then what the node did
    assert _get(f"http://127.0.0.1:{api_port}/metrics")[0] == 401
    code, body = _get(f"http://127.0.0.1:{api_port}/metrics", token=METRICS_TOKEN)
    assert code == 200
    text = body.decode()
    assert _sample(text, 'medgemma_studies{state="done"}') == 1
    assert _sample(text, 'medgemma_cstore_instances_total{outcome="stored"}') == 2
    assert _sample(text, "medgemma_queue_wait_seconds_count") == 1
    assert _sample(text, 'medgemma_preread_seconds_count{outcome="done"}') == 1
    assert _sample(text, 'medgemma_followup_seconds_count{outcome="answered"}') == 1
    assert _sample(text, "medgemma_engine_seconds_count") == 1
    assert _sample(text, 'medgemma_outbox_deliveries{state="dead"}') == 0

    serve.stop()
    lines = (data / "logs" / "node.log").read_text(encoding="utf-8").splitlines()
    output = [ln for ln in serve.output().splitlines() if not ln.startswith("medgemma-node ")]
    records: list[dict[str, Any]] = []
    for line in lines + output:
        if line.strip():
            records.append(json.loads(line))  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    about = [r for r in records if r.get("study_uid") == uid]
    stages = {
        r["message"].rsplit(": ", 1)[-1] for r in about if "pre-read of study" in r["message"]
    }
    assert {"views chosen", "decoded", "engine", "parsed", "SR/SEG built"} <= stages
    assert any(r.get("request_id") and "$ask" in r["message"] for r in records)
    ds = images[0].dataset
    everything = "\n".join(lines + output)
    for private in (ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber):
        if str(private):
            assert str(private) not in everything, private


def test_scp_metrics_listener_counts_refused_and_stored(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> None:
    node = node_factory(metrics={"port": free_port()})
    images = make_two_view_study(seed=42, rows=512, cols=416)
    paths = write_study(tmp_path / "in", images)
    sent = subprocess.run(
        [dcmtk("storescu"), "-aec", "MEDGEMMA", "127.0.0.1", str(node.scp.port), *map(str, paths)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    wait_for_state(node, str(images[0].dataset.StudyInstanceUID), {"done"}, timeout=90)
    assert node.metrics is not None
    code, body = _get(f"http://127.0.0.1:{node.metrics.port}/metrics")
    assert code == 200  # no token configured
    text = body.decode()
    assert _sample(text, 'medgemma_cstore_instances_total{outcome="stored"}') == 2
    assert _sample(text, 'medgemma_studies{state="done"}') == 1
    assert _get(f"http://127.0.0.1:{node.metrics.port}/other")[0] == 404


def test_histogram_buckets_are_cumulative() -> None:
    counts, total = histogram([0.5, 3.0, 3.0, 700.0], (1.0, 5.0, 60.0))
    assert counts == [("1.0", 1.0), ("5.0", 3.0), ("60.0", 3.0), ("+Inf", 4.0)]
    assert total == 706.5


def test_a_celery_worker_writes_json_lines_when_asked(
    node_process: Callable[..., ServerProcess],
    node_factory: Callable[..., NodeRuntime],
    redis_url: str,
    queues: dict[str, str],
    tmp_path: Path,
) -> None:
    env = {
        "MEDGEMMA_NODE_QUEUE__BROKER_URL": redis_url,
        "MEDGEMMA_NODE_QUEUE__PREREAD_QUEUE": queues["preread_queue"],
        "MEDGEMMA_NODE_QUEUE__FOLLOWUP_QUEUE": queues["followup_queue"],
        "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
        "MEDGEMMA_NODE_ENGINE__NAME": "demo",
    }
    worker = node_process(
        ["--log-format", "json", "worker", "--concurrency", "1"],
        env=env, ready=lambda p: p.log_has(" ready."), what="Celery worker ready",
    )  # fmt: skip
    node = node_factory(embedded=False, queue={"broker_url": redis_url, **queues})
    pa = make_chest_radiograph(seed=131, rows=512, cols=416, patient_name="JSONWORKER^PAT")
    paths = write_study(tmp_path / "in", [pa])
    sent = subprocess.run([dcmtk("storescu"), "-aec", "MEDGEMMA", "127.0.0.1",
                           str(node.scp.port), *map(str, paths)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    uid = str(pa.dataset.StudyInstanceUID)
    assert wait_for_state(node, uid, {"done", "failed"}, 90).state.value == "done"
    text = worker.log.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    done = [r for r in records if "pre-read of study" in r.get("msg", r.get("message", ""))]
    assert done, text[-2000:]
    assert any(r.get("study_uid") == uid for r in done), done
    assert "JSONWORKER" not in text and str(pa.dataset.PatientID) not in text
