"""One dialogue turn at a time, with scripted model answers where the demo engine is too
regular: a tighter box refines the outline, a place no anchor covers is localised into a
new anchor, model numbers never become facts, and a turn that cannot be answered is
stored as not-done, never completed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from node.fhir import resources as fr
from node.fhir.followups import create_followup, followup
from node.fhir.store import FhirStore
from node.runtime import NodeRuntime
from node.synthetic import Nodule, SyntheticImage, make_chest_radiograph
from sr_templates.model import Anchor, PrereadResult
from tests.conftest import send_study, wait_for_state
from tests.peers import wait_for
from workers.dialogue.prompts import followup_task
from workers.dialogue.turn import TransientTurnError, TurnFailed, TurnInput, answer_turn
from workers.engines.base import (
    EngineError,
    EngineInfo,
    EngineRequest,
    TransientEngineError,
    image_digest,
)
from workers.engines.demo import DemoEngine
from workers.followup import run_followup
from workers.imaging import choose_views, crop_source, load_display_image
from workers.preread import analyse_views

ROWS, COLS = 1250, 1024


@pytest.fixture(scope="module")
def study() -> tuple[SyntheticImage, PrereadResult]:
    image = make_chest_radiograph(
        seed=95, rows=ROWS, cols=COLS, pixel_spacing_mm=0.3,
        nodules=(Nodule(0.50 * ROWS, 0.27 * COLS, 18.0), Nodule(0.56 * ROWS, 0.77 * COLS, 15.0)),
    )  # fmt: skip
    frontal, _ = choose_views([image.dataset])
    assert frontal is not None
    return image, analyse_views(DemoEngine(), frontal)


class ScriptedEngine:
    """The demo engine, except for the follow-up tasks given a scripted answer."""

    info = EngineInfo(name="demo", model_id="scripted", revision="t1", is_demo=True)

    def __init__(
        self, answers: dict[str, str] | None = None, fail: bool = False, busy: int = 0
    ) -> None:
        self.answers = answers or {}
        self.fail = fail
        self.busy = busy  # this many calls answer "server busy" first
        self.requests: list[EngineRequest] = []
        self.demo = DemoEngine()

    def generate(self, requests: list[EngineRequest]) -> list[str]:
        if self.fail:
            raise EngineError("CUDA error: device-side assert triggered")
        if self.busy:
            self.busy -= 1
            raise TransientEngineError("503 Service Unavailable")
        self.requests.extend(requests)
        out = []
        for r in requests:
            task = followup_task(r.prompt)
            out.append(self.answers[task] if task in self.answers else self.demo.generate([r])[0])
        return out


def final_answer(obj: dict[str, Any]) -> str:
    return f"Reasoning first.\nFinal Answer:\n```json\n{json.dumps(obj)}\n```"


def turn(result: PrereadResult, image: SyntheticImage, engine: Any, question: str) -> Any:
    return answer_turn(
        TurnInput(
            question=question,
            language="en",
            result=result,
            turn=1,
            engine=engine,
            image=lambda: load_display_image(image.dataset),
        )
    )


def rmz_anchor(result: PrereadResult) -> Anchor:
    return next(a for a in result.findings if a.site == "right_middle_zone")


def test_a_tighter_box_gives_a_new_version_with_sizes_from_the_new_outline(
    study: tuple[SyntheticImage, PrereadResult],
) -> None:
    image, result = study
    a = rmz_anchor(result)
    _, crop_t = crop_source(load_display_image(image.dataset), a.region.box)
    r0, c0, r1, c1 = a.region.box
    h, w = (r1 - r0) * 0.15, (c1 - c0) * 0.15
    tighter = crop_t.box_to_model((r0 + h, c0 + w, r1 - h, c1 - w))
    engine = ScriptedEngine({"describe": final_answer({
        "margin": "spiculated", "shape": "irregular", "density": "part_solid", "box_2d": tighter,
        "explanation": "The lesion measures 45 mm with spiculated margins."})})  # fmt: skip
    out = turn(result, image, engine, f"Is the margin of {a.anchor_id} regular?")
    (request,) = engine.requests
    assert len(request.images) == 2  # the whole image and the full-resolution crop
    assert a.anchor_id in request.prompt and "box_2d" in request.prompt
    (new,) = out.anchors
    assert (new.anchor_id, new.tracking_uid, new.version) == (a.anchor_id, a.tracking_uid, 2)
    assert dict(new.attributes) == {"margin": "spiculated", "shape": "irregular",
                                    "density": "part_solid"}  # fmt: skip
    assert new.measurements is not None and a.measurements is not None
    assert new.measurements.long_axis < a.measurements.long_axis
    assert new.region.row0 > a.region.row0 and new.region.row1 < a.region.row1
    assert "not regular" in out.text and "refined" in out.text
    assert f"{new.measurements.long_axis:.1f} x" in out.text
    assert "45" not in out.text  # the model's number is not repeated as a fact


def test_a_box_on_another_lesion_does_not_move_the_anchor(
    study: tuple[SyntheticImage, PrereadResult],
) -> None:
    image, result = study
    a = rmz_anchor(result)
    engine = ScriptedEngine({"describe": final_answer(
        {"margin": "smooth", "box_2d": [0, 0, 40, 40]})})  # fmt: skip
    out = turn(result, image, engine, f"Describe {a.anchor_id}.")
    (new,) = out.anchors
    assert new.region == a.region and dict(new.attributes)["margin"] == "smooth"


def test_a_place_no_anchor_covers_is_localised_into_a_new_anchor(
    study: tuple[SyntheticImage, PrereadResult],
) -> None:
    image, result = study
    without_apex = result.with_anchors([x for x in result.anchors if x.site != "left_lung_apex"])
    a = rmz_anchor(result)
    out = turn(
        without_apex, image, DemoEngine(), f"How far is {a.anchor_id} from the left lung apex?"
    )
    new = [x for x in out.anchors if x.site == "left_lung_apex"]
    assert len(new) == 1 and new[0].kind == "landmark" and new[0].created_turn == 1
    assert new[0].anchor_id not in {x.anchor_id for x in without_apex.anchors}
    assert new[0].region.center[1] > COLS / 2  # the patient's left is the image's right
    (d,) = out.distances
    assert (d.from_anchor, d.to_anchor) == (a.anchor_id, new[0].anchor_id)
    assert out.resolved == (a.anchor_id, new[0].anchor_id)


def test_an_engine_failure_is_a_failed_turn_not_an_answer(
    study: tuple[SyntheticImage, PrereadResult],
) -> None:
    image, result = study
    with pytest.raises(TurnFailed, match="could not answer"):
        turn(result, image, ScriptedEngine(fail=True), "Is A1's margin regular?")


def ask_on_a_read_study(
    node: NodeRuntime, tmp_path: Path, seed: int, question_id: str, text: str
) -> tuple[FhirStore, str]:
    """Send a phantom study, wait for its pre-read, queue a follow-up question about it
    (as the FHIR API would) and return the store and the study UID."""
    image = make_chest_radiograph(seed=seed, rows=ROWS, cols=COLS, pixel_spacing_mm=0.3)
    uid = str(image.dataset.StudyInstanceUID)
    send_study(node, tmp_path / "in", [image])
    assert wait_for_state(node, uid, {"done", "failed"}, 120).state.value == "done"
    store = FhirStore(node.ledger)
    report = store.get("DiagnosticReport", fr.report_id(uid))
    assert report is not None
    question = {"resourceType": "Communication", "id": question_id, "status": "in-progress",
                "about": [{"reference": f"DiagnosticReport/{report.id}"}],
                "payload": [{"contentString": text}]}  # fmt: skip
    create_followup(store, question, report_id=report.id, study_uid=uid, language="en",
                    anchor_ref="")  # fmt: skip
    return store, uid


def test_a_failed_follow_up_is_stored_not_done_with_the_reason(
    node: NodeRuntime, tmp_path: Path
) -> None:
    store, uid = ask_on_a_read_study(
        node, tmp_path, 96, "q-failing-engine", "Is A1's margin regular?"
    )
    assert run_followup(node.settings, "q-failing-engine", store, ScriptedEngine(fail=True)) == (
        "failed"
    )
    job = followup(store, "q-failing-engine")
    assert job is not None and job.finished and "could not answer" in job.error
    answer = store.get("Communication", job.answer_id)
    assert answer is not None and answer.resource["status"] == "not-done"
    asked = store.get("Communication", "q-failing-engine")
    assert asked is not None and asked.resource["status"] == "not-done"
    # nothing was amended on a failed turn
    study_now = node.ledger.get_study(uid)
    assert study_now is not None and study_now.result is not None
    assert study_now.result.revision == 0


def test_an_amendment_whose_image_left_the_spool_is_not_done_and_not_stored(
    node: NodeRuntime, tmp_path: Path
) -> None:
    store, uid = ask_on_a_read_study(
        node, tmp_path, 97, "q-spool-gone", "How far is A1 from the right hilum?"
    )
    for path in (node.settings.storage.spool_path / uid).rglob("*.dcm"):
        path.unlink()  # e.g. removed by hand: the SR can no longer refer to its image
    assert run_followup(node.settings, "q-spool-gone", store, DemoEngine()) == "failed"
    job = followup(store, "q-spool-gone")
    assert job is not None and "no longer readable in the spool" in job.error
    study_now = node.ledger.get_study(uid)
    assert study_now is not None and study_now.result is not None
    assert study_now.result.revision == 0 and study_now.result.distances == ()


def test_a_busy_engine_is_retried_and_the_question_stays_open_until_answered(
    node: NodeRuntime, tmp_path: Path
) -> None:
    store, _uid = ask_on_a_read_study(node, tmp_path, 98, "q-busy", "Is the margin of A1 regular?")
    engine = ScriptedEngine(busy=1)
    with pytest.raises(TransientTurnError):
        run_followup(node.settings, "q-busy", store, engine)
    job = followup(store, "q-busy")
    assert job is not None and not job.finished  # not answered, not failed: retried
    assert run_followup(node.settings, "q-busy", store, engine) == "answered"
    job = followup(store, "q-busy")
    assert job is not None and job.finished and not job.error
    answer = store.get("Communication", job.answer_id)
    assert answer is not None and answer.resource["status"] == "completed"


class PrefillingEngine(DemoEngine):
    """The demo engine, keeping prefixes like the medgemma engine: it records the requests
    it was asked to prefill and those it was asked to answer."""

    def __init__(self) -> None:
        super().__init__()
        self.prefilled: list[EngineRequest] = []
        self.requests: list[EngineRequest] = []

    def prefill(self, requests: Any) -> int:
        made = list(requests())
        self.prefilled.extend(made)
        return len(made)

    def generate(self, requests: list[EngineRequest]) -> list[str]:
        self.requests.extend(requests)
        return super().generate(requests)


def test_the_pre_read_prefills_the_prefix_of_a_first_describe_follow_up(
    node: NodeRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = PrefillingEngine()
    monkeypatch.setattr("workers.preread.engine_for", lambda settings: engine)
    store, uid = ask_on_a_read_study(
        node, tmp_path, 99, "q-prefilled", "Is the margin of A1 regular?"
    )
    study_now = node.ledger.get_study(uid)
    assert study_now is not None and study_now.result is not None
    # after the results are out (the study is done first)
    wait_for(lambda: engine.prefilled, 10, 0.05, "follow-up prefixes prefilled")
    assert len(engine.prefilled) == len(study_now.result.findings) > 0
    engine.requests.clear()
    assert run_followup(node.settings, "q-prefilled", store, engine) == "answered"
    (asked,) = engine.requests
    # the anchor as stored in the ledger gives the request prefilled right after the
    # pre-read: the same images pixel for pixel, system text and study (the engine's key)
    prefilled = {image_digest(r.images[1]): r for r in engine.prefilled}
    same = prefilled[image_digest(asked.images[1])]
    assert image_digest(same.images[0]) == image_digest(asked.images[0])
    assert (same.system, same.prompt, same.metadata) == (asked.system, asked.prompt, asked.metadata)
