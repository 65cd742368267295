"""The pre-read pipeline: synthetic study -> SCP -> worker (demo engine) -> anchors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import JPEG2000Lossless

from node.runtime import NodeRuntime
from node.settings import load_settings
from node.synthetic import SyntheticImage, make_chest_radiograph, make_two_view_study
from sr_templates.model import PrereadResult
from tests.conftest import send_study, wait_for_state
from tests.peers import wait_for
from workers.engines.base import EngineError, EngineInfo, EngineRequest, TransientEngineError
from workers.geometry import iou
from workers.preread import STAGE_RECORD_AFTER_SECONDS, TransientPrereadError, run_preread

SIZE = {"rows": 1250, "cols": 1024}


def assert_matches_phantom(result: PrereadResult, image: SyntheticImage) -> None:
    """Each phantom nodule has one finding anchor with IoU >= 0.5 and the right size."""
    findings = result.findings
    assert len(findings) == len(image.nodules), findings
    spacing = float(image.dataset.ImagerPixelSpacing[0])
    for nodule in image.nodules:
        best = max(findings, key=lambda a: iou(a.region.box, nodule.bbox()))
        assert iou(best.region.box, nodule.bbox()) >= 0.5, (best.region.box, nodule.bbox())
        m = best.measurements
        assert m is not None and m.units == "mm"
        # the size is geometry x spacing: within 20% of the phantom's diameter
        assert m.long_axis == pytest.approx(nodule.diameter_mm(spacing), rel=0.2)


@pytest.mark.parametrize(
    ("options", "flags"),
    [
        ({"modality": "CR", "photometric": "MONOCHROME2"}, ()),
        ({"modality": "DX", "photometric": "MONOCHROME1", "bits_stored": 16}, ()),
        ({"modality": "CR", "transfer_syntax": JPEG2000Lossless}, ("-xv",)),
    ],
)
def test_preread_anchors_match_the_phantom_nodules(
    node: NodeRuntime, tmp_path: Path, options: dict[str, object], flags: tuple[str, ...]
) -> None:
    image = make_chest_radiograph(seed=51, **SIZE, **options)  # type: ignore[arg-type]
    send_study(node, tmp_path / "in", [image], *flags)
    study = wait_for_state(node, image.dataset.StudyInstanceUID, {"done", "failed"}, 60)
    assert study.state.value == "done", study.reason
    result = study.result
    assert result is not None
    assert result.is_demo and result.notice.startswith("DEMO - not for clinical use")
    assert result.prompt_version and result.model_id
    assert_matches_phantom(result, image)
    # every landmark the prompt asks for is an anchor too, with its own tracking UID
    landmarks = {a.site for a in result.anchors if a.kind == "landmark"}
    assert {"right_hilum", "left_hilum", "carina"} <= landmarks
    uids = [a.tracking_uid for a in result.anchors]
    assert len(set(uids)) == len(uids)
    # the anchors are in the ledger with their versions, equal to the result's
    stored = node.ledger.anchors_of(image.dataset.StudyInstanceUID)
    assert [a.tracking_uid for a in stored] == uids
    assert stored == list(result.anchors)


def test_two_view_study_reads_pa_with_lateral(node: NodeRuntime, tmp_path: Path) -> None:
    pa, lateral = make_two_view_study(seed=52, **SIZE)
    send_study(node, tmp_path / "in", [lateral, pa])
    study = wait_for_state(node, pa.dataset.StudyInstanceUID, {"done"}, 60)
    assert study.result is not None
    assert study.result.frontal.sop_instance_uid == pa.dataset.SOPInstanceUID
    assert study.result.lateral is not None
    assert study.result.lateral.sop_instance_uid == lateral.dataset.SOPInstanceUID
    # anchors are on the frontal image, where the phantom's PA nodules are
    assert {a.source_sop_instance_uid for a in study.result.findings} == {pa.dataset.SOPInstanceUID}
    assert_matches_phantom(study.result, pa)


def test_no_pixel_spacing_gives_pixels_and_says_so(node: NodeRuntime, tmp_path: Path) -> None:
    image = make_chest_radiograph(seed=53, pixel_spacing_mm=None, **SIZE)
    send_study(node, tmp_path / "in", [image])
    study = wait_for_state(node, image.dataset.StudyInstanceUID, {"done"}, 60)
    assert study.result is not None
    assert study.result.findings
    for anchor in study.result.findings:
        assert anchor.measurements is not None and anchor.measurements.units == "px"
        assert "no pixel spacing" in anchor.size_text


def test_new_study_version_keeps_tracking_uids(node: NodeRuntime, tmp_path: Path) -> None:
    pa, lateral = make_two_view_study(seed=54, **SIZE)
    send_study(node, tmp_path / "1" / "in", [pa])
    v1 = wait_for_state(node, pa.dataset.StudyInstanceUID, {"done"}, 60)
    send_study(node, tmp_path / "2" / "in", [lateral])
    v2 = wait_for_state(node, pa.dataset.StudyInstanceUID, {"done"}, 60)
    assert v2.version == 2
    assert v1.result is not None and v2.result is not None
    before = {a.anchor_id: a.tracking_uid for a in v1.result.anchors}
    after = {a.anchor_id: (a.tracking_uid, a.version) for a in v2.result.anchors}
    assert {k: v[0] for k, v in after.items()} == before
    assert {v[1] for v in after.values()} == {2}
    versions = node.ledger.anchors_of(pa.dataset.StudyInstanceUID, all_versions=True)
    assert len(versions) == 2 * len(before)


class ScriptedEngine:
    """An engine that answers with a recorded text (or raises), for the pipeline's edges."""

    def __init__(self, answer: str | Exception) -> None:
        self.answer = answer
        self.info = EngineInfo("medgemma", "google/medgemma-4b-it", "recorded", is_demo=False)
        self.calls = 0

    def generate(self, requests: list[EngineRequest]) -> list[str]:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return [self.answer for _ in requests]


@pytest.fixture
def queued_study(
    node_factory: Callable[..., NodeRuntime], tmp_path: Path
) -> tuple[NodeRuntime, str]:
    # a node whose in-process worker never runs: a broker URL nobody listens on
    node = node_factory(embedded=False, queue={"broker_url": "redis://127.0.0.1:9/0"})
    image = make_chest_radiograph(seed=55, rows=512, cols=416)
    send_study(node, tmp_path / "in", [image])
    uid = image.dataset.StudyInstanceUID
    wait_for_state(node, uid, {"queued"})
    return node, uid


def test_unparsable_answer_gives_a_text_only_result(queued_study: tuple[NodeRuntime, str]) -> None:
    node, uid = queued_study
    settings = load_settings(None, **{"storage": node.settings.storage.model_dump()})
    engine = ScriptedEngine("The heart size is normal. No focal consolidation.")
    assert run_preread(settings, uid, 1, engine=engine) == "done"
    study = node.ledger.get_study(uid)
    assert study is not None and study.result is not None
    assert study.result.structured is False
    assert study.result.anchors == ()
    assert "heart size is normal" in study.result.findings_text
    assert study.result.notice == "AI-generated, preliminary, not a diagnosis"


def test_engine_error_fails_the_study_with_the_reason(
    queued_study: tuple[NodeRuntime, str],
) -> None:
    node, uid = queued_study
    settings = load_settings(None, **{"storage": node.settings.storage.model_dump()})
    engine = ScriptedEngine(EngineError("model directory /models/x does not exist"))
    assert run_preread(settings, uid, 1, engine=engine) == "failed"
    study = node.ledger.get_study(uid)
    assert study is not None and study.state.value == "failed"
    assert "model directory /models/x does not exist" in study.reason


def test_transient_engine_error_is_raised_for_retry(
    queued_study: tuple[NodeRuntime, str],
) -> None:
    node, uid = queued_study
    settings = load_settings(None, **{"storage": node.settings.storage.model_dump()})
    with pytest.raises(TransientPrereadError):
        run_preread(settings, uid, 1, engine=ScriptedEngine(TransientEngineError("busy")))
    assert node.ledger.get_study(uid).state.value == "running"  # type: ignore[union-attr]
    # the retry finds it running and completes it
    engine = ScriptedEngine('Final Answer:\n```json\n{"findings": [], "landmarks": []}\n```')
    assert run_preread(settings, uid, 1, engine=engine) == "done"


def test_truncated_answer_says_findings_may_be_incomplete(
    queued_study: tuple[NodeRuntime, str],
) -> None:
    node, uid = queued_study
    settings = load_settings(None, **{"storage": node.settings.storage.model_dump()})
    cut = 'Final Answer:\n```json\n{"findings": [{"box_2d": [100, 120, 180, 200], "label": "nod'
    assert run_preread(settings, uid, 1, engine=ScriptedEngine(cut)) == "done"
    study = node.ledger.get_study(uid)
    assert study is not None and study.result is not None
    assert study.result.truncated
    assert "findings may be incomplete" in study.result.notice


class HeldEngine(ScriptedEngine):
    """Answers once ``release`` is set: a pre-read that sits in its engine stage."""

    def __init__(self, answer: str) -> None:
        super().__init__(answer)
        self.release = threading.Event()

    def generate(self, requests: list[EngineRequest]) -> list[str]:
        assert self.release.wait(30), "the test never released the engine"
        return super().generate(requests)


def test_status_shows_the_stage_a_run_sits_in(queued_study: tuple[NodeRuntime, str]) -> None:
    """While the engine works, the study's stage (``status``) says so; once the run is
    done no stage is left behind, not even one recorded after it ended."""
    node, uid = queued_study
    settings = load_settings(None, **{"storage": node.settings.storage.model_dump()})
    engine = HeldEngine('Final Answer:\n```json\n{"findings": [], "landmarks": []}\n```')
    outcome: list[str] = []
    run = threading.Thread(target=lambda: outcome.append(run_preread(settings, uid, 1, engine)))
    run.start()
    try:
        wait_for(
            lambda: (s := node.ledger.get_study(uid)) is not None and s.stage == "engine",
            10,
            0.02,
            "the engine stage in the ledger",
        )
    finally:
        engine.release.set()
        run.join(30)
    assert outcome == ["done"]
    time.sleep(STAGE_RECORD_AFTER_SECONDS * 2)  # any stage timer still pending has fired
    study = node.ledger.get_study(uid)
    assert study is not None and study.state.value == "done" and study.stage is None
