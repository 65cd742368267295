"""`medgemma-node demo`: a bundled synthetic chest study through the whole loop, in one process.

Starts a node on embedded defaults with the ``demo`` engine (non-clinical, labelled so),
sends a synthetic two-view chest study to it over DICOM (C-STORE, like a modality), waits
for the pre-read, then holds the anchored follow-up conversation through FHIR as a RIS
would (four turns in English, the same four in Chinese) and prints where everything is.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts

from node.ledger import StudyState, StudySummary
from node.runtime import NodeRuntime
from node.settings import Settings, load_settings
from node.synthetic import Nodule, make_two_view_study

#: The four turns of the anchored dialogue, in English and in Chinese: the findings, the
#: margin of the right middle lobe's round shadow (a refined anchor: amended SR + new SEG),
#: its distance from the right hilum (geometry, a line in the SR), and the signs of early
#: lung cancer checked against what is stored about it.
CONVERSATION: tuple[tuple[str, str], ...] = (
    ("en", "Is there anything abnormal in the lungs?"),
    ("en", "The round shadow in the right middle lobe - is its margin regular?"),
    ("en", "How far is this lesion from the right hilum? Is it connected to hilar structures?"),
    (
        "en",
        "If this were early lung cancer, which typical X-ray signs should it show, and how "
        "many does this image show?",
    ),
    ("zh", "肺部是否有异常?"),
    ("zh", "右肺中叶那个圆形影,边缘是否规则?"),
    ("zh", "这个病灶距离右肺门有多远?是否与肺门结构相连?"),
    ("zh", "如果这是早期肺癌,典型X线表现应该有哪些?当前影像符合几条?"),
)
ROWS, COLS = 2500, 2048
#: The bundled study's PA nodules: one in the right middle zone, one in the left lower zone.
DEMO_NODULES = (
    Nodule(0.50 * ROWS, 0.27 * COLS, 36.9),
    Nodule(0.56 * ROWS, 0.77 * COLS, 29.5),
)


class DemoError(Exception):
    pass


@dataclass(frozen=True)
class DemoOutcome:
    study: StudySummary
    spool_dir: Path
    data_dir: Path
    seconds: float
    fhir_base: str = ""
    review_url: str = ""  # the review page (node/review) of the demo's node
    fhir: FhirExchange | None = None
    turns: tuple[Turn, ...] = ()


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


def demo_settings(data_dir: Path, port: int, token: str, api_port: int = 0) -> Settings:
    """Embedded defaults, the demo engine, loopback only, a short quiet period, one token;
    ``port`` (DICOM) and ``api_port`` (FHIR API and review page) 0 for any free port."""
    os.environ.setdefault("MEDGEMMA_NODE_ENGINE__NAME", "demo")
    return load_settings(
        None,
        dicom={"bind_address": "127.0.0.1", "port": port},
        api={"host": "127.0.0.1", "port": api_port},
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


@dataclass(frozen=True)
class Turn:
    """One question of the demo conversation and the node's answer Communication."""

    language: str
    question: str
    status: str
    answer: str
    about: tuple[str, ...]


def _find_report(client: Any, accession: str, timeout: float = 30.0) -> dict[str, Any]:
    """The study's DiagnosticReport by accession, once it is past "registered" (the worker
    writes the FHIR resources right after the ledger says done)."""
    deadline = time.monotonic() + timeout
    while True:
        found = client.get("/DiagnosticReport", params={"identifier": accession})
        found.raise_for_status()
        entries = found.json().get("entry", [])
        if entries and entries[0]["resource"]["status"] != "registered":
            report: dict[str, Any] = entries[0]["resource"]
            return report
        if time.monotonic() > deadline:
            state = entries[0]["resource"]["status"] if entries else "absent"
            raise DemoError(f"no read DiagnosticReport with accession {accession} ({state})")
        time.sleep(0.2)


def converse_like_a_ris(
    base: str, token: str, accession: str, conversation: tuple[tuple[str, str], ...]
) -> tuple[FhirExchange, tuple[Turn, ...]]:
    """Find the pre-read's DiagnosticReport by accession and hold the conversation:
    English questions through $ask, Chinese ones as POST Communication (respond-sync: the
    201 comes once answered, and the answer is found by in-response-to)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    sync = {"Content-Type": "application/fhir+json", "Prefer": "respond-sync"}
    turns: list[Turn] = []
    with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
        report = _find_report(client, accession)
        first = FhirExchange(report["id"], report["status"], report.get("conclusion", ""))
        for language, question in conversation:
            if language == "en":
                body: dict[str, Any] = {
                    "resourceType": "Parameters",
                    "parameter": [
                        {"name": "question", "valueString": question},
                        {"name": "language", "valueCode": language},
                    ],
                }
                asked = client.post(
                    f"/DiagnosticReport/{report['id']}/$ask", json=body, headers=sync
                )
            else:
                body = {
                    "resourceType": "Communication",
                    "status": "completed",
                    "language": language,
                    "about": [{"reference": f"DiagnosticReport/{report['id']}"}],
                    "payload": [{"contentString": question}],
                }
                created = client.post("/Communication", json=body, headers=sync)
                if created.status_code != 201:
                    raise DemoError(
                        f"the question answered HTTP {created.status_code}: {created.text[:300]}"
                    )
                # a create: the 201 came once answered (respond-sync); search the answer
                asked = client.get(
                    "/Communication",
                    params={"in-response-to": f"Communication/{created.json()['id']}"},
                )
            if asked.status_code != 200 or not asked.json().get("entry"):
                raise DemoError(
                    f"the question answered HTTP {asked.status_code}: {asked.text[:300]}"
                )
            answer = asked.json()["entry"][0]["resource"]
            turns.append(
                Turn(
                    language=language,
                    question=question,
                    status=str(answer.get("status")),
                    answer=" ".join(p.get("contentString", "") for p in answer.get("payload", [])),
                    about=tuple(str(a.get("reference")) for a in answer.get("about", [])),
                )
            )
        after = _find_report(client, accession)
    return replace(first, report_status=after["status"]), tuple(turns)


def run_demo(
    settings: Settings,
    token: str,
    timeout: float = 300.0,
    seed: int = 7,
    *,
    while_up: Callable[[DemoOutcome], None] | None = None,
) -> DemoOutcome:
    """The whole loop on a node of its own; ``while_up`` is called with the outcome while
    the node is still up (``demo --keep-running`` prints it there and waits for Ctrl-C)."""
    started = time.monotonic()
    runtime = NodeRuntime(settings, embedded=True, api=True)
    try:
        _, port = runtime.start()
        api_host, api_port = runtime.start_api()
        fhir_base = f"http://{api_host}:{api_port}/fhir"
        images = make_two_view_study(seed=seed, nodules=DEMO_NODULES)
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
        exchange: FhirExchange | None = None
        turns: tuple[Turn, ...] = ()
        if study.state is StudyState.DONE:
            exchange, turns = converse_like_a_ris(
                fhir_base, token, str(images[0].dataset.AccessionNumber), CONVERSATION
            )
            study = runtime.ledger.get_study(uid) or study  # amended by the conversation
        outcome = DemoOutcome(
            study=study,
            spool_dir=runtime.spool.root / uid,
            data_dir=settings.storage.data_path,
            seconds=time.monotonic() - started,
            fhir_base=fhir_base,
            review_url=f"http://{api_host}:{api_port}/review",
            fhir=exchange,
            turns=turns,
        )
        if while_up is not None:
            while_up(outcome)
        return outcome
    finally:
        runtime.stop()
