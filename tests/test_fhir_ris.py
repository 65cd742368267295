"""A RIS-like client against running nodes: a study arrives by C-STORE, is pre-read (demo
engine), its DiagnosticReport is found by accession, and questions are answered
asynchronously ($ask: 202 + poll) and synchronously (POST Communication with Prefer:
respond-sync, then a search by in-response-to), through a real Celery worker on Redis
(``scp`` + ``api`` + ``worker``) and in one process (``serve``)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.nodeproc import ServerProcess, http_ok
from node.fhir import codes
from node.runtime import NodeRuntime
from node.synthetic import SyntheticImage, make_chest_radiograph, write_study
from tests.conftest import make_settings, wait_for_state
from tests.peers import dcmtk, free_port, wait_for
from tests.test_fhir_api import Receiver, subscribe

TOKEN = "ris-token-for-tests"
RIS_SCOPES = ["system/DiagnosticReport.read", "system/Observation.read",
              "system/Communication.read", "system/Communication.write",
              "system/Subscription.write", "system/Subscription.read"]  # fmt: skip
TOKENS = [{"name": "ris", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
           "scopes": RIS_SCOPES}]  # fmt: skip
FHIR = {"Content-Type": "application/fhir+json"}
SMALL = {"rows": 512, "cols": 416}


def send_study(port: int, tmp_path: Path, seed: int) -> SyntheticImage:
    image = make_chest_radiograph(seed=seed, **SMALL)  # type: ignore[arg-type]
    paths = write_study(tmp_path / f"in-{seed}", [image])
    sent = subprocess.run(
        [dcmtk("storescu"), "-aec", "MEDGEMMA", "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    return image


def ask_and_poll(ris: httpx.Client, report_id: str, question: str) -> dict[str, Any]:
    """$ask without Prefer: 202 + Content-Location, polled until the answer Bundle."""
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "question", "valueString": question}]}  # fmt: skip
    accepted = ris.post(f"/DiagnosticReport/{report_id}/$ask", json=body, headers=FHIR)
    assert accepted.status_code == 202, accepted.text
    location = accepted.headers["content-location"]
    assert accepted.json()["issue"][0]["severity"] == "information"
    deadline = time.monotonic() + 60
    while True:
        polled = ris.get(location)
        if polled.status_code == 200:
            bundle: dict[str, Any] = polled.json()
            return bundle
        assert polled.status_code == 202, polled.text
        assert polled.headers["x-progress"] in ("queued", "running")
        assert time.monotonic() < deadline, "no answer within 60 s"
        time.sleep(0.1)


def ask_sync(ris: httpx.Client, report_id: str, question: str) -> dict[str, Any]:
    """A question as a Communication (a create) with Prefer: respond-sync: 201 once it is
    answered, so the search for its answer finds it at once."""
    body = {"resourceType": "Communication", "status": "completed", "language": "zh",
            "about": [{"reference": f"DiagnosticReport/{report_id}"}],
            "payload": [{"contentString": question}]}  # fmt: skip
    created = ris.post("/Communication", json=body, headers={**FHIR, "Prefer": "respond-sync"})
    assert created.status_code == 201, created.text
    answered = ris.get("/Communication", params={
        "in-response-to": f"Communication/{created.json()['id']}"})  # fmt: skip
    assert answered.status_code == 200, answered.text
    bundle: dict[str, Any] = answered.json()
    return bundle


def check_answer(bundle: dict[str, Any], report_id: str, words: str) -> dict[str, Any]:
    assert bundle["resourceType"] == "Bundle" and bundle["type"] in ("collection", "searchset")
    answer: dict[str, Any] = bundle["entry"][0]["resource"]
    assert answer["resourceType"] == "Communication" and answer["status"] == "completed"
    assert answer["inResponseTo"][0]["reference"].startswith("Communication/")
    assert answer["about"][0]["reference"] == f"DiagnosticReport/{report_id}"
    assert words in answer["payload"][0]["contentString"]
    text = answer["payload"][0]["contentString"]
    assert "DEMO - not for clinical use" in text or "演示（DEMO）" in text
    return answer


def find_report(ris: httpx.Client, accession: str, timeout: float = 30.0) -> dict[str, Any]:
    """The study's preliminary DiagnosticReport, found by accession (the worker writes it
    right after the ledger says done: wait for it)."""
    deadline = time.monotonic() + timeout
    while True:
        bundle = ris.get("/DiagnosticReport", params={
            "identifier": accession, "_include": "DiagnosticReport:result"}).json()  # fmt: skip
        reports = [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
        if (reports and reports[0]["status"] == "preliminary") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(reports) == 1, bundle
    report: dict[str, Any] = reports[0]
    assert report["status"] == "preliminary"
    assert "AI-generated, preliminary" in report["conclusion"]
    observations = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert len(observations) == len(report["result"]) >= 1
    return report


def start_api(
    node_process: Callable[..., ServerProcess], env: dict[str, str]
) -> tuple[ServerProcess, str]:
    """``medgemma-node api`` as the hospital runs it, with the RIS's token; returns the
    process and its FHIR base URL once ``/fhir/metadata`` answers."""
    port = free_port()
    env = {**env, "MEDGEMMA_NODE_API__PORT": str(port),
           "MEDGEMMA_NODE_AUTH__TOKENS": json.dumps(TOKENS),
           "MEDGEMMA_NODE_FHIR__SUBSCRIPTION_POLL_SECONDS": "0.1"}  # fmt: skip
    base = f"http://127.0.0.1:{port}/fhir"
    proc = node_process(
        ["api"], env=env, ready=lambda p: http_ok(f"{base}/metadata"), what="the FHIR API"
    )
    return proc, base


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_ris_reads_the_preread_and_asks_through_a_celery_worker(
    node_factory: Callable[..., NodeRuntime],
    worker_factory: Callable[[], ServerProcess],
    node_process: Callable[..., ServerProcess],
    redis_url: str,
    queues: dict[str, str],
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    worker = worker_factory()
    node = node_factory(embedded=False, queue={"broker_url": redis_url, **queues})
    env = {
        "MEDGEMMA_NODE_QUEUE__BROKER_URL": redis_url,
        "MEDGEMMA_NODE_QUEUE__PREREAD_QUEUE": queues["preread_queue"],
        "MEDGEMMA_NODE_QUEUE__FOLLOWUP_QUEUE": queues["followup_queue"],
        "MEDGEMMA_NODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
        "MEDGEMMA_NODE_ENGINE__NAME": "demo",
        "MEDGEMMA_NODE_FHIR__SUBSCRIPTION_ALLOWED_ENDPOINTS": json.dumps([receiver.url]),
    }
    api, base = start_api(node_process, env)
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=60) as ris:  # fmt: skip
            subscribe(ris, "Communication?category=answer", receiver.url, "application/fhir+json")
            image = send_study(node.scp.port, tmp_path, seed=61)
            uid = image.dataset.StudyInstanceUID
            study = wait_for_state(node, uid, {"done", "failed"}, timeout=90)
            assert study.state.value == "done", (study.reason, worker.describe())

            report = find_report(ris, str(image.dataset.AccessionNumber))
            bundle = ask_and_poll(ris, report["id"], "Is A1 larger than 5 mm?")
            answer = check_answer(bundle, report["id"], "A1 (")
            assert any(e["resource"]["resourceType"] == "Observation" for e in bundle["entry"])
            sync = check_answer(ask_sync(ris, report["id"], "左下肺野的结节是什么？"),
                                report["id"], "A2（左下肺野结节）")  # fmt: skip
            assert sync["language"] == "zh"
            # the Celery worker answered both, by task name, from the follow-up queue
            assert worker.output().count("medgemma.followup[") >= 2
            # the RIS was told of both answers (rest-hook PUT of each Communication)
            wait_for(lambda: {p for m, p, _, _ in receiver.calls if m == "PUT"} >= {
                f"/ris/hook/Communication/{answer['id']}",
                f"/ris/hook/Communication/{sync['id']}",
            }, 15, what="rest-hook PUTs of both answers")  # fmt: skip
    finally:
        api.stop()  # the node log is complete once the API has stopped
    log = (tmp_path / "var" / "logs" / "node.log").read_text()
    assert "GET /fhir/DiagnosticReport -> 200" in log
    assert str(image.dataset.PatientID) not in log
    assert str(image.dataset.AccessionNumber) not in log


def test_serve_answers_questions_with_its_in_process_worker(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api={"host": "127.0.0.1", "port": 0},
                             auth={"tokens": TOKENS})  # fmt: skip
    runtime = NodeRuntime(settings, embedded=True, api=True)  # what `serve` runs
    runtime.start()
    try:
        runtime.start_api()
        assert runtime.api is not None
        image = send_study(runtime.scp.port, tmp_path, seed=62)
        uid = image.dataset.StudyInstanceUID
        study = wait_for_state(runtime, uid, {"done", "failed"}, timeout=60)
        assert study.state.value == "done", study.reason
        with httpx.Client(base_url=runtime.api.base_url, timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as ris:  # fmt: skip
            report = find_report(ris, str(image.dataset.AccessionNumber))
            check_answer(ask_and_poll(ris, report["id"], "What is A2?"), report["id"], "A2")
            check_answer(ask_sync(ris, report["id"], "A1 的边缘如何？"), report["id"], "A1")
    finally:
        runtime.stop()


PATIENT_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.1"
ACCESSION_SYSTEM = "urn:oid:2.16.840.1.113883.3.9999.2"


def test_serve_with_a_config_file_writes_its_identifier_systems(
    node_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """``serve --config FILE``: the FHIR resources carry the file's fhir.patient_id_system
    and fhir.accession_system (the registered report when the study completes, and the
    preliminary one after the pre-read), not the built-in empty defaults."""
    dicom_port, api_port = free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f"""
[dicom]
bind_address = "127.0.0.1"
port = {dicom_port}
[storage]
data_dir = "{tmp_path / "var"}"
min_free_mb = 0
[completion]
quiet_seconds = 1
[engine]
name = "demo"
[api]
host = "127.0.0.1"
port = {api_port}
[[auth.tokens]]
name = "ris"
sha256 = "{TOKENS[0]["sha256"]}"
scopes = {json.dumps([*RIS_SCOPES, "system/ImagingStudy.read"])}
[fhir]
patient_id_system = "{PATIENT_SYSTEM}"
accession_system = "{ACCESSION_SYSTEM}"
"""
    )
    base = f"http://127.0.0.1:{api_port}/fhir"
    serve = node_process(
        ["serve"], config=config, ready=lambda p: http_ok(f"{base}/metadata"),
        what="serve --config's FHIR API",
    )  # fmt: skip
    image = send_study(dicom_port, tmp_path, seed=63)
    accession = str(image.dataset.AccessionNumber)
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=30) as ris:  # fmt: skip
        # the RIS searches with the hospital's accession system, as configured
        report = find_report(ris, f"{ACCESSION_SYSTEM}|{accession}", timeout=90)
        study_id = report["imagingStudy"][0]["reference"].split("/", 1)[1]
        study = ris.get(f"/ImagingStudy/{study_id}")
    assert study.status_code == 200, study.text
    serve.stop()
    patient = {"system": PATIENT_SYSTEM, "value": str(image.dataset.PatientID)}
    assert report["subject"]["identifier"] == patient
    assert study.json()["subject"]["identifier"] == patient
    for resource in (report, study.json()):
        (ident,) = [i for i in resource["identifier"] if i.get("type") == codes.ACCESSION_TYPE]
        assert (ident["system"], ident["value"]) == (ACCESSION_SYSTEM, accession)
