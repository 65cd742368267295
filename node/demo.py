"""`medgemma-node demo`: a bundled synthetic chest study through the whole loop, in one process.

Starts a node on embedded defaults with the ``demo`` engine (non-clinical, labelled so),
sends a synthetic two-view chest study to it over DICOM (C-STORE, like a modality), waits
for the pre-read and prints where everything is.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts

from node.ledger import StudyState, StudySummary
from node.runtime import NodeRuntime
from node.settings import Settings, load_settings
from node.synthetic import make_two_view_study


class DemoError(Exception):
    pass


@dataclass(frozen=True)
class DemoOutcome:
    study: StudySummary
    spool_dir: Path
    data_dir: Path
    seconds: float
    fhir_base: str = ""
    fhir: FhirExchange | None = None


def send_datasets(host: str, port: int, called_ae: str, datasets: list[Dataset]) -> list[int]:
    """C-STORE datasets over one association; returns the status of each."""
    ae = AE(ae_title="MEDGEMMA-DEMO")
    ae.requested_contexts = StoragePresentationContexts[:127]
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise DemoError(f"could not associate with {called_ae} at {host}:{port}")
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


DEMO_SCOPES = ["system/*.read", "system/Communication.write"]


def demo_settings(data_dir: Path, port: int, token: str) -> Settings:
    """Embedded defaults, the demo engine, loopback only, a short quiet period, one token."""
    os.environ.setdefault("MEDGEMMA_NODE_ENGINE__NAME", "demo")
    return load_settings(
        None,
        dicom={"bind_address": "127.0.0.1", "port": port},
        api={"host": "127.0.0.1", "port": 0},
        storage={"data_dir": str(data_dir)},
        completion={"quiet_seconds": 1.0, "poll_seconds": 0.2},
        queue={"broker_url": ""},
        auth={
            "tokens": [
                {
                    "name": "demo-ris",
                    "sha256": hashlib.sha256(token.encode()).hexdigest(),
                    "scopes": DEMO_SCOPES,
                }
            ]
        },
    )


@dataclass(frozen=True)
class FhirExchange:
    report_id: str
    report_status: str
    conclusion: str
    question: str
    answer: str


def ask_like_a_ris(base: str, token: str, accession: str, question: str) -> FhirExchange:
    """Find the pre-read's DiagnosticReport by accession number and ask it a question."""
    import httpx

    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        found = client.get("/DiagnosticReport", params={"identifier": accession})
        found.raise_for_status()
        entries = found.json().get("entry", [])
        if not entries:
            raise DemoError(f"no DiagnosticReport with accession {accession}")
        report = entries[0]["resource"]
        asked = client.post(
            f"/DiagnosticReport/{report['id']}/$ask",
            json={
                "resourceType": "Parameters",
                "parameter": [{"name": "question", "valueString": question}],
            },
            headers={"Content-Type": "application/fhir+json", "Prefer": "respond-sync"},
        )
        if asked.status_code != 200:
            raise DemoError(f"$ask answered HTTP {asked.status_code}: {asked.text[:300]}")
        answers = [
            e["resource"]
            for e in asked.json().get("entry", [])
            if e["resource"]["resourceType"] == "Communication"
        ]
        text = " ".join(p.get("contentString", "") for a in answers for p in a.get("payload", []))
        return FhirExchange(
            report_id=report["id"],
            report_status=report["status"],
            conclusion=report.get("conclusion", ""),
            question=question,
            answer=text,
        )


def run_demo(settings: Settings, token: str, timeout: float = 300.0, seed: int = 7) -> DemoOutcome:
    started = time.monotonic()
    runtime = NodeRuntime(settings, embedded=True, api=True)
    try:
        _, port = runtime.start()
        api_host, api_port = runtime.start_api()
        fhir_base = f"http://{api_host}:{api_port}/fhir"
        images = make_two_view_study(seed=seed)
        statuses = send_datasets(
            "127.0.0.1", port, settings.dicom.ae_title, [i.dataset for i in images]
        )
        if any(s != 0 for s in statuses):
            raise DemoError(f"the node refused the demo study: statuses {statuses}")
        uid = str(images[0].dataset.StudyInstanceUID)
        deadline = time.monotonic() + timeout
        while True:
            study = runtime.ledger.get_study(uid)
            if study is not None and study.state in (
                StudyState.DONE,
                StudyState.FAILED,
                StudyState.SKIPPED,
            ):
                break
            if time.monotonic() > deadline:
                raise DemoError(
                    f"study {uid} not finished after {timeout:.0f}s "
                    f"(state {study.state.value if study else 'absent'})"
                )
            time.sleep(0.2)
        exchange = None
        if study.state is StudyState.DONE:
            exchange = ask_like_a_ris(
                fhir_base,
                token,
                str(images[0].dataset.AccessionNumber),
                "Is the margin of A1 regular? 这个结节边缘规则吗？",
            )
        return DemoOutcome(
            study=study,
            spool_dir=runtime.spool.root / uid,
            data_dir=settings.storage.data_path,
            seconds=time.monotonic() - started,
            fhir_base=fhir_base,
            fhir=exchange,
        )
    finally:
        runtime.stop()
