"""The anchored follow-up dialogue end to end, as a RIS and a PACS see it.

storescu -> node (``serve``'s runtime: SCP, FHIR API, in-process worker, demo engine) ->
pre-read -> four follow-up turns through FHIR ($ask in English, POST Communication in
Chinese) -> answer Communications about the anchors' Observations, an amended
DiagnosticReport, and amended SRs + new SEGs in Orthanc that keep the tracking UIDs and
carry the distance as a line SCOORD; every SR and SEG clean under dciodvfy.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import pydicom
import pytest
from fhir.resources.R4B import get_fhir_model_class

from node.ledger import StudySummary
from node.runtime import NodeRuntime
from node.synthetic import Nodule, SyntheticImage, make_chest_radiograph
from node.turns import DialogueLog
from sr_templates import codes as c
from sr_templates.model import PrereadResult
from tests.conftest import make_settings, send_study, wait_for_state
from tests.peers import OrthancPeer, dciodvfy_errors, dsrdump_ok, wait_for
from tests.test_results_e2e import SEG_CLASS, SR_CLASS, orthanc_objects
from workers.geometry import region_distance

TOKEN = "dialogue-test-token"
SCOPES = ["system/DiagnosticReport.read", "system/Observation.read",
          "system/Communication.read", "system/Communication.write"]  # fmt: skip
TOKENS = [{"name": "ris", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "scopes": SCOPES}]
FHIR = {"Content-Type": "application/fhir+json"}
ROWS, COLS = 1250, 1024

QUESTIONS = {
    "en": (
        "Is there anything abnormal in the lungs?",
        "The round shadow in the right middle lobe - is its margin regular?",
        "How far is this lesion from the right hilum? Is it connected to hilar structures?",
        "If this were early lung cancer, which typical X-ray signs should it show, and how "
        "many does this image show?",
    ),
    "zh": (
        "肺部是否有异常?",
        "右肺中叶那个圆形影,边缘是否规则?",
        "这个病灶距离右肺门有多远?是否与肺门结构相连?",
        "如果这是早期肺癌,典型X线表现应该有哪些?当前影像符合几条?",
    ),
}


def chest(seed: int, accession: str) -> SyntheticImage:
    """A PA chest with a nodule in the right middle zone and one in the left lower zone."""
    nodules = (Nodule(0.50 * ROWS, 0.27 * COLS, 18.0), Nodule(0.56 * ROWS, 0.77 * COLS, 15.0))
    return make_chest_radiograph(seed=seed, rows=ROWS, cols=COLS, pixel_spacing_mm=0.3,
                                 nodules=nodules, accession_number=accession)  # fmt: skip


@pytest.fixture
def runtime(orthanc: OrthancPeer, tmp_path: Path) -> Iterator[NodeRuntime]:
    settings = make_settings(
        tmp_path,
        api={"host": "127.0.0.1", "port": 0},
        auth={"tokens": TOKENS},
        destinations=[{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        outbox={"poll_seconds": 0.2},
    )
    node = NodeRuntime(settings, embedded=True, api=True)  # what `serve` runs
    node.start()
    node.start_api()
    yield node
    node.stop()


def ris_client(node: NodeRuntime) -> httpx.Client:
    assert node.api is not None
    return httpx.Client(base_url=node.api.base_url, timeout=120,
                        headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip


def find_report(ris: httpx.Client, accession: str) -> dict[str, Any]:
    def preliminary() -> dict[str, Any] | None:
        bundle = ris.get("/DiagnosticReport", params={"identifier": accession}).json()
        reports = [e["resource"] for e in bundle.get("entry", [])]
        return reports[0] if reports and reports[0]["status"] == "preliminary" else None

    report: dict[str, Any] = wait_for(preliminary, 30, 0.2, "a preliminary DiagnosticReport")
    return report


def ask(ris: httpx.Client, report_id: str, question: str, language: str) -> dict[str, Any]:
    """English through $ask, Chinese as a POST Communication (a create: 201, then the
    answer by in-response-to); both respond-sync."""
    sync = {**FHIR, "Prefer": "respond-sync"}
    if language == "en":
        body: dict[str, Any] = {"resourceType": "Parameters", "parameter": [
            {"name": "question", "valueString": question},
            {"name": "language", "valueCode": "en"}]}  # fmt: skip
        response = ris.post(f"/DiagnosticReport/{report_id}/$ask", json=body, headers=sync)
    else:
        body = {"resourceType": "Communication", "status": "completed", "language": "zh-CN",
                "about": [{"reference": f"DiagnosticReport/{report_id}"}],
                "payload": [{"contentString": question}]}  # fmt: skip
        created = ris.post("/Communication", json=body, headers=sync)
        assert created.status_code == 201, created.text
        # respond-sync: the 201 came once the question was answered; search its answer
        question_ref = f"Communication/{created.json()['id']}"
        response = ris.get("/Communication", params={"in-response-to": question_ref})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()["entry"][0]["resource"]
    get_fhir_model_class("Communication").model_validate(answer)
    return answer


def text_of(answer: dict[str, Any]) -> str:
    return str(answer["payload"][0]["contentString"])


def about(answer: dict[str, Any]) -> list[str]:
    return [str(a["reference"]) for a in answer["about"]]


def current(node: NodeRuntime, uid: str) -> PrereadResult:
    study = node.ledger.get_study(uid)
    assert study is not None and study.result is not None
    return study.result


def assert_chinese(text: str) -> None:
    """A Chinese answer: Han characters, and no English vocabulary of the findings."""
    assert re.search(r"[\u4e00-\u9fff]", text), text
    model_words = re.sub(r"模型的英文说明：“.*?”", "", text)  # quoted model words are English
    for english in ("nodule", "right middle", "hilum", "margin", "signs present"):
        assert english not in model_words, (english, text)


@pytest.mark.parametrize("language", ["en", "zh"])
def test_four_turn_conversation_through_fhir_amends_sr_and_seg_in_the_pacs(
    runtime: NodeRuntime, orthanc: OrthancPeer, tmp_path: Path, language: str
) -> None:
    image = chest(seed=91 if language == "en" else 92, accession=f"ACC-DLG-{language}")
    uid = str(image.dataset.StudyInstanceUID)
    send_study(runtime, tmp_path / "in", [image])
    study: StudySummary = wait_for_state(runtime, uid, {"done", "failed"}, 120)
    assert study.state.value == "done", study.reason
    pre = current(runtime, uid)
    findings = {a.site: a for a in pre.findings}
    assert set(findings) == {"right_middle_zone", "left_lower_zone"}, pre.anchors
    rmz, llz = findings["right_middle_zone"], findings["left_lower_zone"]
    hilum = next(a for a in pre.landmarks if a.site == "right_hilum")
    obs = {
        a.anchor_id: f"Observation/{runtime_observation_id(a.tracking_uid)}" for a in pre.findings
    }
    q1, q2, q3, q4 = QUESTIONS[language]

    with ris_client(runtime) as ris:
        report = find_report(ris, f"ACC-DLG-{language}")

        # 1. the findings, each with its anchor id, site and size from geometry
        a1 = ask(ris, report["id"], q1, language)
        t1 = text_of(a1)
        assert a1["status"] == "completed" and a1["language"].startswith(language)
        for a in (rmz, llz):
            assert a.anchor_id in t1 and obs[a.anchor_id] in about(a1)
            assert a.measurements is not None
            assert f"{a.measurements.long_axis:.1f}" in t1
        assert ("right middle zone" in t1) if language == "en" else ("右中肺野" in t1)

        # 2. the right middle lobe's round shadow: the model reads margin/shape/density on a
        # full-resolution crop; the anchor gets version 2, same tracking UID
        a2 = ask(ris, report["id"], q2, language)
        t2 = text_of(a2)
        assert about(a2)[1:] == [obs[rmz.anchor_id]], about(a2)
        assert rmz.anchor_id in t2 and llz.anchor_id not in t2
        assert ("regular" in t2) if language == "en" else ("规则" in t2)
        after2 = current(runtime, uid)
        refined = after2.anchor(rmz.anchor_id)
        assert refined is not None and refined.tracking_uid == rmz.tracking_uid
        assert refined.version == rmz.version + 1 and refined.refined_turn == 2
        assert set(refined.attributes) == {"margin", "shape", "density"}
        assert after2.revision == 1
        amended = ris.get(f"/DiagnosticReport/{report['id']}").json()
        assert amended["status"] == "amended"

        # 3. "this lesion" is the anchor in focus; the distance comes from geometry
        a3 = ask(ris, report["id"], q3, language)
        t3 = text_of(a3)
        assert about(a3)[1:] == [obs[rmz.anchor_id]]
        assert rmz.anchor_id in t3 and hilum.anchor_id in t3
        after3 = current(runtime, uid)
        (distance,) = after3.distances
        assert (distance.from_tracking_uid, distance.to_tracking_uid) == (
            rmz.tracking_uid, hilum.tracking_uid)  # fmt: skip
        expected = region_distance(refined.region, hilum.region, pre.pixel_spacing_mm)
        assert distance.centres == pytest.approx(expected.centres)
        assert distance.edges == pytest.approx(expected.edges)
        assert f"{expected.centres:.1f} mm" in t3 and f"{expected.edges:.1f} mm" in t3
        assert 0 < distance.edges < distance.centres

        # 4. the sign checklist of early lung cancer against the anchor's stored facts
        a4 = ask(ris, report["id"], q4, language)
        t4 = text_of(a4)
        assert about(a4)[1:] == [obs[rmz.anchor_id]]
        counts = re.search(r"(\d+) of (\d+) signs present" if language == "en"
                           else r"共 (\d+) 条：符合 (\d+) 条", t4)  # fmt: skip
        assert counts, t4
        assert ("not diagnostic criteria" in t4) if language == "en" else ("并非诊断标准" in t4)
        assert ("spiculated margin: absent" in t4) if language == "en" else ("毛刺征：不符合" in t4)

        answers = [a1, a2, a3, a4]
        for answer in answers:
            text = text_of(answer)
            # the safety statement in the answer's language, naming model and prompt version
            notice = "DEMO - not for clinical use" if language == "en" else "演示（DEMO）"
            assert notice in text and "followup-" in text, text
            assert ("not a diagnosis" in text) if language == "en" else ("不是诊断" in text)
            if language == "zh":
                assert_chinese(text)

    # the dialogue log keeps each turn: language, anchors, prompt version, model output
    turns = DialogueLog(runtime.ledger.engine).turns_of(uid)
    assert [t.turn for t in turns] == [1, 2, 3, 4]
    assert [t.resolved[:1] for t in turns[1:]] == [(rmz.anchor_id,)] * 3
    assert turns[2].resolved[:2] == (rmz.anchor_id, hilum.anchor_id)
    assert {t.language for t in turns} == {language}
    assert [o["task"] for o in turns[1].model_outputs] == ["describe"]
    assert all(t.prompt_version.startswith("followup-") for t in turns)

    # the PACS: the pre-read SR + SEG, then one amended pair per amending turn (2 and 3)
    def three(sop_class: str) -> list[Path] | None:
        found = orthanc_objects(orthanc, uid, sop_class)
        return found if len(found) == 3 else None

    srs: list[Path] = wait_for(lambda: three(SR_CLASS), 90, 0.3, "3 SRs in Orthanc")
    segs: list[Path] = wait_for(lambda: three(SEG_CLASS), 90, 0.3, "3 SEGs in Orthanc")
    for path in [*srs, *segs]:
        assert dciodvfy_errors(path) == [], path
    for path in srs:
        ok, output = dsrdump_ok(path)
        assert ok, output
    by_number = sorted((pydicom.dcmread(p).InstanceNumber, p) for p in srs)
    assert [n for n, _ in by_number] == [1, 1001, 1002]
    last = hd.sr.srread(by_number[-1][1])
    groups = last.content.get_planar_roi_measurement_groups()
    finding_uids = {str(g.tracking_uid) for g in groups} - {distance.tracking_uid}
    assert finding_uids == {rmz.tracking_uid, llz.tracking_uid}
    (line,) = [g for g in groups if str(g.tracking_uid) == distance.tracking_uid]
    assert line.roi is not None and line.roi.graphic_type.value == "POLYLINE"
    assert len(line.roi.value) == 2  # an open line from centre to centre
    values = {m.name.value: m.value for m in line.get_measurements()}
    assert float(values[c.MEASUREMENT_DISTANCE.value]) == pytest.approx(distance.centres, rel=1e-4)
    assert float(values[c.MEASUREMENT_EDGE_DISTANCE.value]) == pytest.approx(
        distance.edges, rel=1e-4
    )
    # each amended SR names the one before it; the SEGs keep the segment tracking UIDs
    previous = pydicom.dcmread(by_number[1][1])
    ref = pydicom.dcmread(by_number[2][1]).PredecessorDocumentsSequence[0]
    assert ref.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        previous.SOPInstanceUID
    )
    for path in segs:
        seg = hd.seg.segread(path)
        tracked = {str(seg.get_segment_description(n).tracking_uid) for n in seg.segment_numbers}
        assert tracked == {rmz.tracking_uid, llz.tracking_uid}


def runtime_observation_id(tracking_uid: str) -> str:
    from node.fhir.resources import observation_id

    return observation_id(tracking_uid)


def test_unsupported_language_is_refused_and_ambiguity_gets_a_question_back(
    runtime: NodeRuntime, tmp_path: Path
) -> None:
    image = chest(seed=93, accession="ACC-DLG-AMB")
    uid = str(image.dataset.StudyInstanceUID)
    send_study(runtime, tmp_path / "in", [image])
    assert wait_for_state(runtime, uid, {"done", "failed"}, 120).state.value == "done"
    with ris_client(runtime) as ris:
        report = find_report(ris, "ACC-DLG-AMB")
        body = {"resourceType": "Parameters", "parameter": [
            {"name": "question", "valueString": "La marge est-elle régulière ?"},
            {"name": "language", "valueCode": "fr"}]}  # fmt: skip
        refused = ris.post(f"/DiagnosticReport/{report['id']}/$ask", json=body, headers=FHIR)
        assert refused.status_code == 422
        outcome = refused.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert "not supported" in outcome["issue"][0]["diagnostics"]
        # "the nodule" fits both nodules: a clarifying question listing both, not a guess
        answer = ask(ris, report["id"], "Is the nodule's margin smooth?", "en")
        text = text_of(answer)
        assert text.startswith("Which one do you mean?"), text
        result = current(runtime, uid)
        for a in result.findings:
            assert a.anchor_id in text
            assert a.version == 1  # nothing was refined on a guess
        # a pronoun with nothing in focus is not guessed either
        assert "Which one" in text_of(ask(ris, report["id"], "Is it calcified?", "en"))
