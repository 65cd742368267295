"""The demo engine on synthetic chest radiographs: deterministic, labelled, finds the nodules.

Pipeline under test, as in a real pre-read: node.synthetic phantom -> workers.imaging
(display LUTs, centred square, 896 x 896) -> DemoEngine -> parse_preread -> boxes mapped
back to source pixels with the image's SquareTransform.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import numpy.typing as npt
import pytest

from node.synthetic import Nodule, SyntheticImage, make_chest_radiograph
from workers.engines.base import Engine, EngineRequest
from workers.engines.demo import DEMO_LABEL, DemoEngine
from workers.imaging import SquareTransform, load_display_image, to_model_image
from workers.parsing import ParsedPreread, box_iou, parse_preread
from workers.prompts import LANDMARKS, build_preread_prompt

RGB = npt.NDArray[np.uint8]


@functools.lru_cache(maxsize=16)
def _phantom(**kw: object) -> tuple[SyntheticImage, RGB, SquareTransform]:
    si = make_chest_radiograph(**kw)  # type: ignore[arg-type]
    model_image, transform = to_model_image(load_display_image(si.dataset))
    return si, model_image, transform


def _preread(image: RGB, has_lateral: bool = False) -> tuple[str, ParsedPreread]:
    system, prompt = build_preread_prompt(has_lateral=has_lateral)
    (text,) = DemoEngine().generate([EngineRequest(images=(image,), prompt=prompt, system=system)])
    return text, parse_preread(text)


def _rounded(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    return (round(box[0]), round(box[1]), round(box[2]), round(box[3]))


def test_engine_info_says_demo() -> None:
    engine = DemoEngine()
    assert isinstance(engine, Engine)
    assert engine.info.name == "demo"
    assert engine.info.is_demo is True
    assert engine.info.model_id == "medgemma-node/demo-blob-detector"
    assert engine.info.revision


def test_same_image_gives_identical_text() -> None:
    _, image, _ = _phantom(seed=0)
    first, _ = _preread(image)
    second, _ = _preread(image.copy())
    assert first == second
    # a batch answers in order and each answer equals the single-request answer
    _, other, _ = _phantom(seed=0, nodules=())
    _, prompt = build_preread_prompt(False)
    batch = DemoEngine().generate(
        [
            EngineRequest(images=(image,), prompt=prompt),
            EngineRequest(images=(other,), prompt=prompt),
        ]
    )
    assert batch[0] == first
    assert batch[1] == _preread(other)[0]


def test_answer_is_labelled_demo_and_parses_cleanly() -> None:
    _, image, _ = _phantom(seed=0)
    text, parsed = _preread(image)
    assert "Final Answer:" in text and "```json" in text
    assert parsed.structured
    assert parsed.warnings == ()
    assert DEMO_LABEL in parsed.findings_text
    assert DEMO_LABEL in parsed.impression
    assert {lm.name for lm in parsed.landmarks} == set(LANDMARKS)


@pytest.mark.parametrize(
    "kw",
    [
        {"seed": 0},
        {"seed": 1, "photometric": "MONOCHROME1"},
        {"seed": 2, "modality": "DX"},
        {"seed": 3, "rows": 2048, "cols": 2500},  # landscape: padded above and below
        {"seed": 4, "rows": 1200, "cols": 1000, "bits_stored": 10},
        {"seed": 5, "view_position": "AP"},
    ],
    ids=["pa", "monochrome1", "dx", "landscape", "small", "ap"],
)
def test_finds_the_phantom_nodules(kw: dict[str, object]) -> None:
    si, image, transform = _phantom(**kw)
    _, parsed = _preread(image)
    assert parsed.structured
    assert len(si.nodules) == 2
    assert len(parsed.findings) == len(si.nodules), [f.box_2d for f in parsed.findings]
    for nodule in si.nodules:
        truth = _rounded(nodule.bbox())
        truth_model = tuple(transform.box_to_model(nodule.bbox()))
        best = max(parsed.findings, key=lambda f: box_iou(f.box_2d, truth_model))  # type: ignore[arg-type]
        assert box_iou(best.box_2d, truth_model) >= 0.5  # type: ignore[arg-type]
        source = _rounded(transform.box_to_source(best.box_2d))
        assert box_iou(source, truth) >= 0.5, (source, truth)
        assert best.finding == "nodule"
    # default nodules: patient's right upper zone (image left), left lower zone (image right)
    by_col = sorted(parsed.findings, key=lambda f: f.box_2d[1])
    assert (by_col[0].site, by_col[0].laterality) == ("right_upper_zone", "right")
    assert (by_col[1].site, by_col[1].laterality) == ("left_lower_zone", "left")
    assert by_col[0].label == "right upper zone nodule"


def test_finds_a_nodule_placed_elsewhere() -> None:
    nodule = Nodule(center_row=1550.0, center_col=600.0, radius_px=45.0, contrast=0.25)
    _, image, transform = _phantom(seed=7, nodules=(nodule,))
    _, parsed = _preread(image)
    assert len(parsed.findings) == 1
    found = parsed.findings[0]
    assert box_iou(_rounded(transform.box_to_source(found.box_2d)), _rounded(nodule.bbox())) >= 0.5
    assert (found.site, found.laterality) == ("right_lower_zone", "right")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_false_positives_on_a_normal_phantom(seed: int) -> None:
    _, image, _ = _phantom(seed=seed, nodules=())
    _, parsed = _preread(image)
    assert parsed.structured
    assert parsed.findings == ()
    assert len(parsed.landmarks) == len(LANDMARKS)


def test_landmarks_follow_the_lung_geometry() -> None:
    si, image, transform = _phantom(seed=0, nodules=())
    _, parsed = _preread(image)
    boxes = {lm.name: lm.box_2d for lm in parsed.landmarks}

    def centre(name: str) -> tuple[float, float]:
        y0, x0, y1, x1 = boxes[name]
        return (y0 + y1) / 2, (x0 + x1) / 2

    # patient's right is image left
    for pair in ("hilum", "lung_apex", "costophrenic_angle", "heart_border"):
        assert centre(f"right_{pair}")[1] < centre(f"left_{pair}")[1], pair
    for side in ("right", "left"):
        apex, hilum, angle = (
            centre(f"{side}_{n}") for n in ("lung_apex", "hilum", "costophrenic_angle")
        )
        assert apex[0] < hilum[0] < angle[0]
    carina = centre("carina")
    assert centre("right_hilum")[1] < carina[1] < centre("left_hilum")[1]
    assert carina[0] < min(centre("right_hilum")[0], centre("left_hilum")[0])
    # apices and costophrenic angles lie near the phantom's lung-field corners
    for (r0, _, r1, _), side in zip(si.lung_fields, ("right", "left"), strict=True):
        apex_row = transform.box_to_source(boxes[f"{side}_lung_apex"])[0]
        angle_row = transform.box_to_source(boxes[f"{side}_costophrenic_angle"])[2]
        height = r1 - r0
        assert abs(apex_row - r0) < 0.1 * height
        assert abs(angle_row - r1) < 0.15 * height


def test_other_prompts_get_an_empty_labelled_answer() -> None:
    _, image, _ = _phantom(seed=0)
    (text,) = DemoEngine().generate(
        [EngineRequest(images=(image,), prompt="How far is the nodule from the hilum?")]
    )
    parsed = parse_preread(text)
    assert parsed.structured
    assert parsed.findings == () and parsed.landmarks == ()
    assert DEMO_LABEL in parsed.findings_text
    assert "only supports" in parsed.findings_text


def test_lateral_second_image_is_ignored() -> None:
    _, image, _ = _phantom(seed=0)
    lateral = np.zeros_like(image)
    text_one, _ = _preread(image)
    system, prompt = build_preread_prompt(has_lateral=True)
    (text_two,) = DemoEngine().generate(
        [EngineRequest(images=(image, lateral), prompt=prompt, system=system)]
    )
    assert text_two == text_one


@pytest.mark.parametrize("fill", ["black", "white", "noise", "tiny"])
def test_images_without_a_chest_give_no_findings(fill: str) -> None:
    rng = np.random.default_rng(0)
    image: RGB
    if fill == "black":
        image = np.zeros((896, 896, 3), dtype=np.uint8)
    elif fill == "white":
        image = np.full((896, 896, 3), 255, dtype=np.uint8)
    elif fill == "noise":
        image = rng.integers(0, 256, (896, 896, 3), dtype=np.uint8)
    else:
        image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    _, parsed = _preread(image)
    assert parsed.structured
    assert parsed.findings == ()
    assert DEMO_LABEL in parsed.impression


def test_fast_enough_on_cpu() -> None:
    _, image, _ = _phantom(seed=0)
    _preread(image)  # warm-up
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        _preread(image)
        best = min(best, time.perf_counter() - started)
    assert best < 1.0
