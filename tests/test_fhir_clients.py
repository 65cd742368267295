"""The RIS flow through the two common Python FHIR client libraries, fhirclient
(SMART on FHIR) and fhirpy, against a running node (``serve``'s runtime: SCP, FHIR API,
in-process worker, demo engine; studies sent by storescu): read the DiagnosticReport,
search with ``_include`` and paging (following ``next`` links), create a question
Communication (``create()`` / ``save()`` end with its id), and read the answer by
``Communication?in-response-to=``. Before them, the create and patient-search behaviour
the libraries rely on, as plain HTTP: 201 + Location + ETag, ``Prefer: return=``, and
``patient=Patient/[id]`` resolved against the patient identifier, never a silent empty
result."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
from fhirclient.models.communication import Communication as FcCommunication
from fhirclient.models.diagnosticreport import DiagnosticReport as FcDiagnosticReport
from fhirclient.server import FHIRServer
from fhirpy import AsyncFHIRClient, SyncFHIRClient

from node.fhir import codes
from node.runtime import NodeRuntime
from node.synthetic import make_chest_radiograph
from tests.conftest import make_settings, send_study, wait_for_state
from tests.test_fhir_resources import r4b_valid

TOKEN = "client-libraries-test-token"
SCOPES = ["system/DiagnosticReport.read", "system/Observation.read",
          "system/ImagingStudy.read", "system/Communication.read",
          "system/Communication.write"]  # fmt: skip
TOKENS = [{"name": "ris", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "scopes": SCOPES}]
FHIR = {"Content-Type": "application/fhir+json"}
PATIENT_SYSTEM = "urn:oid:1.2.3.4"
#: accession -> patient ID of the studies sent
STUDIES = {"ACC-CL-1": "PAT-CL-1", "ACC-CL-2": "PAT-CL-1", "ACC-CL-3": "PAT-CL-2"}

T = TypeVar("T")


@dataclass
class RisNode:
    runtime: NodeRuntime
    base: str  # the FHIR base URL
    reports: dict[str, dict[str, Any]]  # accession -> preliminary DiagnosticReport

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=60,
                            headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip


@pytest.fixture(scope="module")
def ris_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RisNode]:
    tmp = tmp_path_factory.mktemp("fhir-clients")
    settings = make_settings(
        tmp,
        api={"host": "127.0.0.1", "port": 0},
        auth={"tokens": TOKENS},
        fhir={"patient_id_system": PATIENT_SYSTEM, "respond_sync_timeout_seconds": 30},
    )
    runtime = NodeRuntime(settings, embedded=True, api=True)  # what `serve` runs
    runtime.start()
    runtime.start_api()
    try:
        assert runtime.api is not None
        uids = {}
        for seed, (accession, patient) in enumerate(STUDIES.items(), start=41):
            image = make_chest_radiograph(seed=seed, rows=512, cols=416, patient_id=patient,
                                          accession_number=accession)  # fmt: skip
            send_study(runtime, tmp / accession, [image])
            uids[accession] = str(image.dataset.StudyInstanceUID)
        for uid in uids.values():
            study = wait_for_state(runtime, uid, {"done", "failed"}, 120)
            assert study.state.value == "done", study.reason
        node = RisNode(runtime, runtime.api.base_url, {})
        with node.client() as c:
            for accession in STUDIES:
                node.reports[accession] = eventually(
                    lambda a=accession: preliminary_report(c, a), "a preliminary report"
                )
        yield node
    finally:
        runtime.stop()


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 60.0) -> T:
    """The first truthy result of ``probe`` (the worker writes resources after the ledger)."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.1)


def preliminary_report(c: httpx.Client, accession: str) -> dict[str, Any] | None:
    bundle = c.get("/DiagnosticReport", params={"identifier": accession}).json()
    reports = [e["resource"] for e in bundle.get("entry", [])]
    return reports[0] if reports and reports[0]["status"] == "preliminary" else None


def question(report_id: str, text: str) -> dict[str, Any]:
    return {"resourceType": "Communication", "status": "in-progress", "language": "en",
            "about": [{"reference": f"DiagnosticReport/{report_id}"}],
            "payload": [{"contentString": text}]}  # fmt: skip


def answers_to(c: httpx.Client, question_id: str) -> list[dict[str, Any]]:
    bundle = c.get("/Communication", params={"in-response-to": f"Communication/{question_id}"})
    assert bundle.status_code == 200, bundle.text
    return [e["resource"] for e in bundle.json().get("entry", [])]


def check_answer(answer: dict[str, Any], question_id: str, report_id: str) -> None:
    assert answer["category"][0]["coding"][0]["code"] == "answer"
    assert answer["inResponseTo"] == [{"reference": f"Communication/{question_id}"}]
    assert answer["about"][0]["reference"] == f"DiagnosticReport/{report_id}"
    assert "DEMO - not for clinical use" in answer["payload"][0]["contentString"]


# ----------------------------------------------------------------------------- create


def test_post_communication_is_a_create_201_with_the_question_and_its_location(
    ris_node: RisNode,
) -> None:
    report = ris_node.reports["ACC-CL-1"]
    with ris_node.client() as c:
        r = c.post("/Communication", json=question(report["id"], "Is there a nodule?"),
                   headers=FHIR)  # fmt: skip
        assert r.status_code == 201, r.text
        created = r.json()
        r4b_valid(created)
        qid = created["id"]
        assert created["resourceType"] == "Communication"
        assert created["category"][0] == codes.COMMUNICATION_QUESTION
        assert created["about"] == [{"reference": f"DiagnosticReport/{report['id']}"}]
        assert created["meta"]["versionId"] == "1"
        assert r.headers["location"] == f"{ris_node.base}/Communication/{qid}/_history/1"
        assert r.headers["content-location"] == r.headers["location"]
        assert r.headers["etag"] == 'W/"1"'
        assert c.get(f"/Communication/{qid}").json()["payload"] == created["payload"]
        # the answer: a Communication in response to the question, found by search
        (answer,) = eventually(lambda: answers_to(c, qid), "answer")
        check_answer(answer, qid, report["id"])


def test_prefer_return_minimal_and_operation_outcome(ris_node: RisNode) -> None:
    report = ris_node.reports["ACC-CL-2"]
    with ris_node.client() as c:
        minimal = c.post("/Communication", json=question(report["id"], "Any effusion?"),
                         headers={**FHIR, "Prefer": "return=minimal"})  # fmt: skip
        assert minimal.status_code == 201, minimal.text
        assert minimal.content == b""
        assert "/Communication/" in minimal.headers["location"]
        assert minimal.headers["etag"] == 'W/"1"'
        qid = minimal.headers["location"].split("/Communication/")[1].split("/")[0]
        assert c.get(f"/Communication/{qid}").status_code == 200

        outcome = c.post("/Communication", json=question(report["id"], "Any effusion?"),
                         headers={**FHIR, "Prefer": "return=OperationOutcome"})  # fmt: skip
        assert outcome.status_code == 201, outcome.text
        body = outcome.json()
        r4b_valid(body)
        assert body["resourceType"] == "OperationOutcome"
        qid2 = outcome.headers["location"].split("/Communication/")[1].split("/")[0]
        assert f"in-response-to=Communication/{qid2}" in body["issue"][0]["diagnostics"]
        assert body["issue"][0]["severity"] == "information"


def test_respond_sync_creates_the_question_once_it_is_answered(ris_node: RisNode) -> None:
    report = ris_node.reports["ACC-CL-3"]
    with ris_node.client() as c:
        r = c.post("/Communication", json=question(report["id"], "Is the heart enlarged?"),
                   headers={**FHIR, "Prefer": "respond-sync"})  # fmt: skip
        assert r.status_code == 201, r.text
        created = r.json()
        qid = created["id"]
        # waited for: the question is completed and its answer is there at once
        assert created["status"] == "completed"
        assert r.headers["location"] == f"{ris_node.base}/Communication/{qid}/_history/1"
        assert r.headers["etag"] == f'W/"{created["meta"]["versionId"]}"'
        (answer,) = answers_to(c, qid)
        check_answer(answer, qid, report["id"])


# ----------------------------------------------------------------------------- patient search


def test_patient_and_subject_references_search_by_the_patient_identifier(
    ris_node: RisNode,
) -> None:
    with ris_node.client() as c:

        def found(rtype: str, **params: str) -> set[str]:
            r = c.get(f"/{rtype}", params=params)
            assert r.status_code == 200, r.text
            return {e["resource"]["id"] for e in r.json().get("entry", [])}

        first = {ris_node.reports[a]["id"] for a in ("ACC-CL-1", "ACC-CL-2")}
        assert found("DiagnosticReport", patient="Patient/PAT-CL-1") == first
        assert found("DiagnosticReport", subject="Patient/PAT-CL-1") == first
        assert found("DiagnosticReport", patient="PAT-CL-1") == first
        absolute = f"{ris_node.base}/Patient/PAT-CL-2"
        assert found("DiagnosticReport", subject=absolute) == {ris_node.reports["ACC-CL-3"]["id"]}
        assert found("DiagnosticReport", patient="Patient/PAT-CL-9") == set()
        # the same on the other resource types with a subject
        observations = found("Observation", patient="Patient/PAT-CL-2")
        assert observations and observations == {
            r["reference"].split("/")[1] for r in ris_node.reports["ACC-CL-3"]["result"]
        }
        (study,) = found("ImagingStudy", subject="Patient/PAT-CL-2")
        assert ris_node.reports["ACC-CL-3"]["imagingStudy"][0]["reference"].endswith(study)
        asked = c.post("/Communication", headers=FHIR, json=question(
            ris_node.reports["ACC-CL-3"]["id"], "Is the trachea central?"))  # fmt: skip
        assert asked.status_code == 201, asked.text
        assert asked.json()["id"] in found("Communication", patient="Patient/PAT-CL-2")
        assert asked.json()["id"] not in found("Communication", patient="Patient/PAT-CL-1")

        # a subject that is not a Patient: a clear 400, not an empty Bundle
        refused = c.get("/DiagnosticReport", params={"subject": "Group/ward-3"})
        assert refused.status_code == 400, refused.text
        outcome = refused.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert "Patient" in outcome["issue"][0]["diagnostics"]


# ----------------------------------------------------------------------------- the libraries


def test_fhirclient_reads_searches_pages_and_asks(ris_node: RisNode) -> None:
    server = FHIRServer(None, base_uri=ris_node.base)
    server.session.headers["Authorization"] = f"Bearer {TOKEN}"
    report = ris_node.reports["ACC-CL-1"]

    read = FcDiagnosticReport.read(report["id"], server)
    assert read.status == "preliminary" and read.id == report["id"]
    assert "AI-generated, preliminary" in read.conclusion

    # one report a page, its Observations included, every page through the next links
    search = FcDiagnosticReport.where({"_count": "1"}).include("result")
    pages = list(search.perform_iter(server))
    assert len(pages) == len(STUDIES)
    seen = set()
    for page in pages:
        matches = [e.resource for e in page.entry if e.search.mode == "match"]
        included = [e.resource for e in page.entry if e.search.mode == "include"]
        assert len(matches) == 1 and page.total == len(STUDIES)
        assert {f"Observation/{o.id}" for o in included} == {r.reference for r in matches[0].result}
        seen.add(matches[0].id)
    assert seen == {r["id"] for r in ris_node.reports.values()}

    asked = FcCommunication(question(report["id"], "Where is the nodule?"))
    created = asked.create(server)
    assert created is not None and created["id"], created
    qid = created["id"]

    def answered() -> list[Any]:
        bundle = FcCommunication.where({"in-response-to": f"Communication/{qid}"})
        return list(bundle.perform_resources_iter(server))

    (answer,) = eventually(answered, "answer")
    check_answer(answer.as_json(), qid, report["id"])


def test_fhirpy_reads_searches_pages_and_asks(ris_node: RisNode) -> None:
    client = SyncFHIRClient(ris_node.base, authorization=f"Bearer {TOKEN}")
    report = ris_node.reports["ACC-CL-2"]

    read = client.reference("DiagnosticReport", report["id"]).to_resource()
    assert read["status"] == "preliminary" and read.id == report["id"]

    search = client.resources("DiagnosticReport").include("DiagnosticReport", "result").limit(1)
    reports = list(search)  # iterating follows the next links
    assert sorted(r.id for r in reports) == sorted(r["id"] for r in ris_node.reports.values())
    first_page = search.fetch_raw()
    kinds = [e["resource"]["resourceType"] for e in first_page["entry"]]
    assert kinds[0] == "DiagnosticReport" and "Observation" in kinds

    asked = client.resource("Communication", **question(report["id"], "How big is it?"))
    asked.save()
    assert asked.id, asked.serialize()
    assert asked["category"][0] == codes.COMMUNICATION_QUESTION

    def answered() -> list[Any]:
        return (
            client.resources("Communication")
            .search(**{"in-response-to": f"Communication/{asked.id}"})
            .fetch_all()
        )

    (answer,) = eventually(answered, "answer")
    check_answer(answer.serialize(), asked.id, report["id"])


def test_fhirpy_async_client_creates_and_finds_the_answer(ris_node: RisNode) -> None:
    report = ris_node.reports["ACC-CL-3"]

    async def ris() -> tuple[str, list[Any]]:
        client = AsyncFHIRClient(ris_node.base, authorization=f"Bearer {TOKEN}")
        asked = client.resource("Communication", **question(report["id"], "Is it calcified?"))
        await asked.save()
        assert asked.id
        search = client.resources("Communication").search(
            **{"in-response-to": f"Communication/{asked.id}"}
        )
        deadline = time.monotonic() + 60
        while not (found := await search.fetch_all()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return str(asked.id), found

    qid, answers = asyncio.run(ris())
    (answer,) = answers
    check_answer(answer.serialize(), qid, report["id"])
