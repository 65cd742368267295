"""parse_preread over a corpus of model answers, plus never-raises properties and the prompt.

Each file in tests/data/model_texts/ is one answer as a model might write it; what the
parser must make of it is in the CASES table below (not in the files), so a reader sees
every expectation in one place.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sr_templates import ontology
from workers import chest_terms
from workers.lenient_json import extract_json, strip_thinking
from workers.parsing import (
    ParsedPreread,
    attribute_value,
    box_2d,
    finding_type,
    landmark,
    parse_preread,
    site,
)
from workers.prompts import (
    ATTRIBUTE_VALUES,
    FINDING_TYPES,
    LANDMARKS,
    LATERALITIES,
    PROMPT_VERSION,
    SITES,
    build_preread_prompt,
    is_preread_prompt,
)

TEXTS = Path(__file__).parent / "data" / "model_texts"

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Expect:
    """What one corpus file must parse to.

    findings: (finding, site, laterality) per finding, in order.
    boxes: box_2d per finding, in order (checked when given).
    landmarks: landmark names (as a set) or None to skip; landmark_boxes: name -> box.
    warnings: substrings that must each occur in some warning; clean: no warnings at all.
    """

    findings: tuple[tuple[str, str | None, str], ...] = ()
    boxes: tuple[Box, ...] | None = None
    landmarks: frozenset[str] | None = None
    landmark_boxes: dict[str, Box] = field(default_factory=dict)
    structured: bool = True
    warnings: tuple[str, ...] = ()
    clean: bool = False
    labels: tuple[str, ...] | None = None
    attributes: tuple[dict[str, str], ...] | None = None
    findings_text: str | None = None  # exact
    findings_text_has: str | None = None
    impression: str | None = None  # exact


RLZ = ("nodule", "right_lower_zone", "right")
LUZ = ("nodule", "left_upper_zone", "left")
ALL_LANDMARKS = frozenset(LANDMARKS)

CASES: dict[str, Expect] = {
    "well_formed": Expect(
        findings=(RLZ,),
        boxes=((612, 238, 688, 310),),
        landmarks=ALL_LANDMARKS,
        landmark_boxes={"carina": (330, 470, 370, 530), "left_hilum": (398, 575, 478, 660)},
        clean=True,
        attributes=({"margin": "smooth", "density": "solid", "shape": "round"},),
        impression="Right lower zone pulmonary nodule; CT suggested for characterisation.",
    ),
    "thinking_trace": Expect(
        findings=(
            ("consolidation", "left_lower_zone", "left"),
            ("pleural_effusion", "left_costophrenic_angle", "left"),
        ),
        boxes=((560, 600, 760, 820), (740, 760, 840, 880)),
        landmarks=frozenset({"carina"}),
        clean=True,
        findings_text=(
            "Left lower zone airspace consolidation with a small left pleural effusion."
        ),
    ),
    "unterminated_trace": Expect(
        findings=(("cardiomegaly", "heart", "none"),),
        warnings=("not terminated",),
        impression="Cardiomegaly.",
    ),
    "unterminated_trace_no_answer": Expect(
        structured=False, warnings=("not terminated",), findings_text=""
    ),
    "no_fence": Expect(
        findings=(("mass", "right_upper_zone", "right"),),
        landmarks=frozenset({"right_hilum"}),
        attributes=({"margin": "spiculated", "shape": "irregular"},),
        clean=True,
    ),
    "no_final_answer": Expect(
        findings=(("pneumothorax", "left_upper_zone", "left"),),
        boxes=((150, 640, 420, 900),),
        clean=True,
        impression="Left pneumothorax.",
    ),
    "trailing_commas": Expect(
        findings=(RLZ, LUZ),
        boxes=((600, 150, 700, 260), (300, 700, 380, 790)),
        clean=True,
        impression="Bilateral pulmonary nodules.",
    ),
    "single_quotes": Expect(
        findings=(("calcification", "left_lower_zone", "left"),),
        boxes=((610, 620, 690, 700),),
        landmarks=frozenset({"carina"}),
        attributes=({"density": "calcified"},),
        clean=True,
        findings_text="Small calcified granuloma in the left lower zone.",
    ),
    "truncated_mid_object": Expect(
        findings=(RLZ, LUZ),
        boxes=((600, 150, 700, 260), (300, 700, 380, 790)),
        warnings=("truncated", "dropped 1 partial"),
    ),
    "truncated_mid_string": Expect(
        findings=(("consolidation", "right_middle_zone", "right"),),
        landmarks=frozenset({"right_hilum"}),
        warnings=("truncated",),
        findings_text="Patchy consolidation in the right middle zone, likely infec",
    ),
    "out_of_range_boxes": Expect(
        findings=(("pneumothorax", "left_upper_zone", "left"),),
        boxes=((0, 850, 140, 1000),),
        landmark_boxes={"right_costophrenic_angle": (780, 60, 1000, 210)},
        warnings=("out of range; clipped",),
    ),
    "inverted_boxes": Expect(
        findings=(RLZ,),
        boxes=((600, 220, 700, 310),),
        warnings=("inverted; swapped", "degenerate box_2d (zero area); dropped"),
    ),
    "normalised_boxes": Expect(
        findings=(RLZ,),
        boxes=((610, 238, 688, 310),),
        landmark_boxes={"carina": (330, 470, 370, 530)},
        warnings=("normalised to 0-1; scaled",),
    ),
    "string_float_boxes": Expect(
        findings=(RLZ, ("nodule", "left_upper_lobe", "left")),
        boxes=((612, 238, 689, 310), (300, 700, 380, 790)),
        clean=True,
    ),
    "duplicates": Expect(
        findings=(RLZ, ("consolidation", "right_lower_zone", "right"), LUZ),
        boxes=((600, 150, 700, 260), (600, 150, 700, 260), (300, 700, 380, 790)),
        landmarks=frozenset({"carina"}),
        landmark_boxes={"carina": (330, 470, 370, 530)},
        warnings=("duplicate finding", "duplicate landmark"),
    ),
    "chinese_labels": Expect(
        findings=(
            ("nodule", "right_middle_lobe", "right"),
            ("consolidation", "left_lower_lobe", "left"),
            ("pleural_effusion", "left_costophrenic_angle", "left"),
            ("cardiomegaly", "heart", "none"),
            ("calcification", "right_upper_zone", "right"),
        ),
        labels=("右肺中叶结节", "左肺下叶实变", "左侧胸腔积液", "心脏增大", "右上肺野钙化灶"),
        attributes=({"margin": "smooth", "shape": "round"}, {}, {}, {}, {}),
        landmarks=frozenset({"right_hilum", "carina"}),
        clean=True,
        impression="考虑左下肺炎，右肺中叶结节建议CT随访。",
    ),
    "top_level_list": Expect(
        findings=(RLZ, ("consolidation", "left_lower_zone", "left")),
        boxes=((612, 238, 688, 310), (560, 600, 760, 820)),
        landmarks=frozenset({"right_hilum", "carina"}),
        labels=("right lower zone nodule", "left lower zone opacity"),
        warnings=("top-level list",),
    ),
    "empty_findings": Expect(
        landmarks=frozenset({"carina"}),
        clean=True,
        impression="No acute cardiopulmonary abnormality.",
    ),
    "pure_prose": Expect(
        structured=False,
        warnings=("no JSON answer",),
        findings_text_has="Findings: The lungs are clear bilaterally.",
        impression="No acute cardiopulmonary process.",
    ),
    "garbage_emoji": Expect(
        findings=(RLZ,), boxes=((600, 150, 700, 260),), labels=("right lower zone nodule 😀",)
    ),
    "extra_keys": Expect(
        findings=(RLZ,),
        attributes=({"margin": "smooth", "density": "solid"},),
        landmarks=frozenset({"carina"}),
        warnings=("attribute 'texture' not in the vocabulary",),
    ),
    "nested_fences": Expect(
        findings=(("nodule", "left_lower_zone", "left"),),
        boxes=((640, 660, 700, 720),),
        clean=True,
    ),
    "comments_and_python": Expect(
        findings=(RLZ, LUZ), boxes=((600, 150, 700, 260), (300, 700, 380, 790)), clean=True
    ),
    "laterality_conflict": Expect(
        findings=(RLZ, LUZ),
        labels=("left lower zone nodule", "nodule"),
        warnings=("laterality conflict ('left' field", "laterality conflict (label"),
    ),
    "synonyms_unknown": Expect(
        findings=(
            ("pleural_effusion", "right_costophrenic_angle", "right"),
            ("cardiomegaly", "heart", "none"),
            ("consolidation", "right_upper_lobe", "right"),
            ("nodule", None, "none"),
            ("other", "trachea", "none"),
        ),
        labels=(
            "right effusion",
            "enlarged heart",
            "RUL opacity",
            "lung nodule",
            "tracheal deviation",
        ),
        landmarks=frozenset(),
        warnings=("unknown finding type 'tracheal shift'", "unknown landmark 'aortic knob'"),
    ),
    "prose_findings_sections": Expect(
        findings=(LUZ,),
        findings_text="There is a small nodule in the left upper zone. The heart is normal.",
        impression="Left upper zone nodule.",
        clean=True,
    ),
    "sequence_of_objects": Expect(findings=(RLZ, LUZ), warnings=("top-level list",)),
    "empty": Expect(structured=False, warnings=("empty answer",), findings_text=""),
    "unescaped_quote": Expect(
        findings=(RLZ, LUZ), labels=('right lower zone "coin" lesion', "left upper zone nodule")
    ),
    "malformed_middle": Expect(
        findings=(RLZ,), boxes=((600, 150, 700, 260),), warnings=("malformed JSON",)
    ),
}


def _read(name: str) -> str:
    return (TEXTS / f"{name}.txt").read_bytes().decode("utf-8", errors="replace")


def _check_invariants(result: ParsedPreread) -> None:
    """What every result satisfies, whatever the input."""
    assert isinstance(result, ParsedPreread)
    assert isinstance(result.findings_text, str) and isinstance(result.impression, str)
    assert all(isinstance(w, str) for w in result.warnings)
    # the catch-all in parse_preread is a safety net; reaching it means a parser bug
    assert not any(w.startswith("parser error") for w in result.warnings), result.warnings
    if not result.structured:
        assert result.findings == () and result.landmarks == ()
    for f in result.findings:
        assert f.finding in FINDING_TYPES
        assert f.site is None or f.site in SITES
        assert f.laterality in LATERALITIES
        assert isinstance(f.label, str) and f.label
        y0, x0, y1, x1 = f.box_2d
        assert all(isinstance(v, int) for v in f.box_2d)
        assert 0 <= y0 < y1 <= 1000 and 0 <= x0 < x1 <= 1000
        for key, value in f.attributes.items():
            assert value in ATTRIBUTE_VALUES[key]
    names = [lm.name for lm in result.landmarks]
    assert len(names) == len(set(names))
    for lm in result.landmarks:
        assert lm.name in LANDMARKS
        y0, x0, y1, x1 = lm.box_2d
        assert 0 <= y0 < y1 <= 1000 and 0 <= x0 < x1 <= 1000


def test_corpus_and_table_match() -> None:
    files = {p.stem for p in TEXTS.glob("*.txt")}
    assert files == set(CASES)
    assert len(files) >= 20


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_case(name: str) -> None:
    expect = CASES[name]
    result = parse_preread(_read(name))
    _check_invariants(result)
    assert result.structured is expect.structured, result.warnings
    got = tuple((f.finding, f.site, f.laterality) for f in result.findings)
    assert got == expect.findings
    if expect.boxes is not None:
        assert tuple(f.box_2d for f in result.findings) == expect.boxes
    if expect.labels is not None:
        assert tuple(f.label for f in result.findings) == expect.labels
    if expect.attributes is not None:
        assert tuple(f.attributes for f in result.findings) == expect.attributes
    landmarks = {lm.name: lm.box_2d for lm in result.landmarks}
    if expect.landmarks is not None:
        assert set(landmarks) == expect.landmarks
    for lm_name, box in expect.landmark_boxes.items():
        assert landmarks[lm_name] == box
    for needle in expect.warnings:
        assert any(needle in w for w in result.warnings), (needle, result.warnings)
    if expect.clean:
        assert result.warnings == ()
    if expect.findings_text is not None:
        assert result.findings_text == expect.findings_text
    if expect.findings_text_has is not None:
        assert expect.findings_text_has in result.findings_text
    if expect.impression is not None:
        assert result.impression == expect.impression


def test_thinking_trace_is_not_in_the_narrative() -> None:
    result = parse_preread(_read("thinking_trace"))
    assert "<unused" not in result.findings_text
    assert "Let me look" not in result.findings_text + result.impression


def test_raw_keeps_the_model_object_but_nothing_is_trusted_from_it() -> None:
    (finding,) = parse_preread(_read("extra_keys")).findings
    assert finding.raw["size_mm"] == 14  # kept for audit
    assert "size_mm" not in finding.attributes


def test_pure_prose_keeps_the_whole_cleaned_text() -> None:
    text = _read("pure_prose")
    assert parse_preread(text).findings_text == text.strip()


@pytest.mark.parametrize(
    ("text", "box"),
    [
        ('{"findings": [{"box_2d": [0.1, 0.2, 0.3, 0.4], "label": "mass"}]}', (100, 200, 300, 400)),
        (
            '{"findings": [{"box_2d": [100, 200, 300, 400.6], "label": "mass"}]}',
            (100, 200, 300, 401),
        ),
        (
            '{"findings": [{"box_2d": [[100, 200, 300, 400]], "label": "mass"}]}',
            (100, 200, 300, 400),
        ),
        ('{"findings": [{"bbox": "100 200 300 400", "label": "mass"}]}', (100, 200, 300, 400)),
    ],
    ids=["normalised", "float", "wrapped", "string"],
)
def test_box_forms(text: str, box: Box) -> None:
    (finding,) = parse_preread(text).findings
    assert finding.box_2d == box
    assert finding.finding == "mass"


@pytest.mark.parametrize(
    "box",
    ["[1, 2, 3]", '["a", "b", "c", "d"]', "null", "[NaN, 1, 2, 3]", "[true, 1, 2, 3]", '["12"]'],
)
def test_unusable_boxes_are_dropped_with_a_warning(box: str) -> None:
    result = parse_preread(f'{{"findings": [{{"box_2d": {box}, "label": "nodule"}}]}}')
    assert result.structured
    assert result.findings == ()
    assert result.warnings


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("lung nodule", "nodule"),
        ("Pleural Effusion", "pleural_effusion"),
        ("effusion", "pleural_effusion"),
        ("enlarged heart", "cardiomegaly"),
        ("opacity", "consolidation"),
        ("ground-glass opacity", "ground_glass_opacity"),
        ("肺结节", "nodule"),
        ("结节", "nodule"),
        ("实变", "consolidation"),
        ("胸腔积液", "pleural_effusion"),
        ("气胸", "pneumothorax"),
        ("心脏增大", "cardiomegaly"),
        ("肺不张", "atelectasis"),
        ("肿块", "mass"),
        ("钙化", "calcification"),
        ("pacemaker", "support_device"),
        ("bronchiectasis", "other"),
    ],
)
def test_finding_vocabulary(term: str, expected: str) -> None:
    text = f'{{"findings": [{{"box_2d": [100, 100, 200, 200], "finding": "{term}"}}]}}'
    (finding,) = parse_preread(text).findings
    assert finding.finding == expected
    if expected == "other":
        assert finding.label == term  # the original term survives as the label


@pytest.mark.parametrize(
    ("site", "expected", "laterality"),
    [
        ("right upper zone", "right_upper_zone", "right"),
        ("Left-Lower-Zone", "left_lower_zone", "left"),
        ("RML", "right_middle_lobe", "right"),
        ("right middle lobe", "right_middle_lobe", "right"),
        ("右肺中叶", "right_middle_lobe", "right"),
        ("左肺下叶", "left_lower_lobe", "left"),
        ("左上肺野", "left_upper_zone", "left"),
        ("右肺门", "right_hilum", "right"),
        ("left CP angle", "left_costophrenic_angle", "left"),
        ("both lungs", "both_lungs", "bilateral"),
        ("mediastinum", "mediastinum", "none"),
        ("somewhere", None, "none"),
    ],
)
def test_site_vocabulary_and_laterality(site: str, expected: str | None, laterality: str) -> None:
    obj = f'{{"box_2d": [100, 100, 200, 200], "finding": "nodule", "site": "{site}"}}'
    (finding,) = parse_preread(f'{{"findings": [{obj}]}}').findings
    assert finding.site == expected
    assert finding.laterality == laterality


def test_laterality_from_label_when_no_site() -> None:
    (finding,) = parse_preread(
        '[{"box_2d": [100, 100, 200, 200], "label": "left apical pneumothorax"}]'
    ).findings
    assert (finding.finding, finding.site, finding.laterality) == (
        "pneumothorax",
        "left_upper_zone",
        "left",
    )


def test_fence_closed_before_the_object_is_read_up_to_the_fence() -> None:
    text = (
        "Final Answer:\n```json\n"
        '{"findings": [{"box_2d": [100, 200, 300, 400], "label": "mass"}]\n```\nDone.'
    )
    result = parse_preread(text)
    assert result.structured
    assert [f.finding for f in result.findings] == ["mass"]
    assert any("truncated" in w for w in result.warnings)


def test_too_many_objects_are_capped() -> None:
    items = ",".join(f'{{"box_2d": [{i}, 0, {i + 1}, 10], "label": "nodule"}}' for i in range(500))
    result = parse_preread(f'{{"findings": [{items}]}}')
    assert len(result.findings) == 64
    assert any("only the first 64" in w for w in result.warnings)


def test_objects_keyed_by_label() -> None:
    text = (
        '{"findings": {"right lower zone nodule": {"box_2d": [600, 150, 700, 260]}},'
        ' "landmarks": {"carina": [330, 470, 370, 530], "right hilum": {"box_2d": [1, 2, 3, 4]}}}'
    )
    result = parse_preread(text)
    assert [(f.label, f.finding, f.site) for f in result.findings] == [
        ("right lower zone nodule", "nodule", "right_lower_zone")
    ]
    assert {lm.name: lm.box_2d for lm in result.landmarks} == {
        "carina": (330, 470, 370, 530),
        "right_hilum": (1, 2, 3, 4),
    }


def test_bare_empty_list_in_reasoning_is_not_an_answer() -> None:
    result = parse_preread("I considered [] options and found nothing to report.")
    assert not result.structured


def test_final_answer_wins_over_examples_in_the_reasoning() -> None:
    text = (
        'For example {"findings": [{"box_2d": [1, 1, 900, 900], "label": "mass"}]} would be '
        "wrong here.\nFinal Answer:\n```json\n"
        '{"findings": [], "findings_text": "Normal.", "impression": "Normal."}\n```'
    )
    result = parse_preread(text)
    assert result.structured and result.findings == ()
    assert result.impression == "Normal."


# ------------------------------------------------------------------ never raises

_ALPHABET = (
    "{}[]()\"',:;`#/*\\ \n\t0123456789.-+eE"
    "abcdefghijklmnopqrstuvwxyz_ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "结节实变右左肺叶，：“”😀\x00\x7f\ufffd"
)
_TOKENS = ["<unused94>", "<unused95>", "Final Answer:", "```json", "```", "box_2d",
           "findings", "landmarks", "true", "None", "NaN", "1e309", "-0.0"]  # fmt: skip


def _mutations(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        pos = rng.randrange(len(chars) + 1)
        if op < 0.35 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif op < 0.7:
            chars.insert(pos, rng.choice(_ALPHABET))
        elif op < 0.85:
            chars[pos:pos] = list(rng.choice(_TOKENS))
        elif chars:
            i, j = sorted(rng.randrange(len(chars)) for _ in range(2))
            chars[i:j] = chars[i:j][::-1]
    return "".join(chars)


def test_never_raises_on_truncations_of_the_corpus() -> None:
    for name in sorted(CASES):
        text = _read(name)
        full = parse_preread(text)
        for cut in range(0, len(text) + 1, 7):
            result = parse_preread(text[:cut])
            _check_invariants(result)
            if full.structured and expect_prefix_monotone(name):
                assert len(result.findings) <= len(full.findings)


def expect_prefix_monotone(name: str) -> bool:
    """Prefixes never hold more findings than the whole answer (dedup/merge aside)."""
    return name not in {"duplicates", "inverted_boxes", "malformed_middle", "top_level_list"}


def test_never_raises_on_mutations_and_random_text() -> None:
    rng = random.Random(0)
    corpus = [_read(name) for name in sorted(CASES)]
    for _ in range(3000):
        choice = rng.random()
        if choice < 0.6:
            text = _mutations(rng, rng.choice(corpus))
        elif choice < 0.8:
            text = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 300)))
        else:
            raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
            text = raw.decode("utf-8", errors=rng.choice(["replace", "ignore", "surrogateescape"]))
        _check_invariants(parse_preread(text))


@pytest.mark.parametrize(
    "text",
    [
        "[" * 5000,
        "{" * 5000,
        '{"a":' * 3000,
        "```json\n" + "[" * 100000,
        '{"findings": [' + '{"box_2d": [1, 2, 3, 4], "label": "n"},' * 3000 + "]}",
        "\x00" * 1000,
        "Final Answer:" * 1000,
        "<unused94>" * 100 + "<unused95>" * 50,
    ],
    ids=["lists", "objects", "keys", "deep-fence", "many", "nul", "final", "traces"],
)
def test_never_raises_on_pathological_input(text: str) -> None:
    _check_invariants(parse_preread(text))


# ------------------------------------------------------------------ the prompt


@pytest.mark.parametrize("has_lateral", [False, True])
def test_prompt_names_the_whole_vocabulary(has_lateral: bool) -> None:
    system, user = build_preread_prompt(has_lateral)
    assert system and user
    for term in (*FINDING_TYPES, *SITES, *LANDMARKS, *LATERALITIES):
        assert f'"{term}"' in user, term
    for values in ATTRIBUTE_VALUES.values():
        for value in values:
            assert f'"{value}"' in user
    assert "Final Answer:" in user and "```json" in user
    assert "[y0, x0, y1, x1]" in user and "0-1000" in user
    assert "PATIENT's left and right" in user
    assert "Never state sizes" in user
    assert is_preread_prompt(user)
    assert ("lateral view" in user) is has_lateral


def test_prompt_version_is_pinned() -> None:
    assert PROMPT_VERSION == "preread-2026.12.1"
    assert not is_preread_prompt("How far is it from the hilum?")


# ------------------------------------------------------------------ vocabulary round trips


def _one_finding(**fields: object) -> str:
    return json.dumps({"findings": [{"box_2d": [100, 100, 200, 200], **fields}]})


def test_every_term_the_prompt_offers_reads_back_as_itself() -> None:
    for term in FINDING_TYPES:
        (f,) = parse_preread(_one_finding(finding=term)).findings
        assert f.finding == term
    for term in SITES:
        (f,) = parse_preread(_one_finding(finding="nodule", site=term)).findings
        assert (f.site, f.laterality) == (term, ontology.site(term).side)
    for term in LATERALITIES:
        (f,) = parse_preread(_one_finding(finding="nodule", laterality=term)).findings
        assert f.laterality == term
    for name, values in ATTRIBUTE_VALUES.items():
        for value in values:
            (f,) = parse_preread(_one_finding(finding="nodule", attributes={name: value})).findings
            assert f.attributes == {name: value}
    boxes = [{"box_2d": [10 * i, 10, 10 * i + 5, 20], "label": t} for i, t in enumerate(LANDMARKS)]
    result = parse_preread(json.dumps({"findings": [], "landmarks": boxes}))
    assert [lm.name for lm in result.landmarks] == list(LANDMARKS)
    assert result.warnings == ()


def test_every_ontology_name_reads_as_its_concept() -> None:
    """English (any case) and Chinese names and synonyms: what the ontology lists, the
    parser understands, so one synonym added there serves answers and follow-ups."""
    for concept in ontology.all_concepts():
        for name in (*concept.names_en, *(n.upper() for n in concept.names_en), *concept.names_zh):
            if concept.kind == "finding":
                assert finding_type(name) == concept.term, name
            elif concept.kind == "site":
                assert site(name) == concept.term, name
            elif concept.kind == "landmark":
                assert landmark(name) == concept.term, name
            elif concept.kind == "attribute":
                assert chest_terms.attribute_name(name) == concept.term, name
            elif concept.kind == "attribute_value":
                assert concept.attribute is not None
                assert attribute_value(concept.attribute, name) == concept.term, name
            else:
                assert chest_terms.laterality(name) == concept.side, name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bilateral pleural effusions", "pleural_effusion"),
        ("nodular opacities", "nodule"),
        ("PICC line tip in the SVC", "support_device"),
        ("line", "support_device"),
        ("visceral pleural line with absent markings beyond", None),
        ("ground-glass nodule", "ground_glass_opacity"),
        ("右下肺斑片状渗出", "consolidation"),
        ("fractured left 5th rib", "rib_fracture"),
    ],
)
def test_finding_type_reads_inflected_free_text(text: str, expected: str | None) -> None:
    assert finding_type(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("RUL opacity", "right_upper_lobe"),
        ("left apical", "left_upper_zone"),
        ("右下肺", "right_lower_zone"),
        ("右侧肋膈角区", "right_costophrenic_angle"),
        ("rt hilar region", "right_hilum"),
        ("right lower zone, projected over the heart", "right_lower_zone"),
        ("behind the heart", "heart"),
    ],
)
def test_site_reads_side_level_and_structure(text: str, expected: str) -> None:
    assert site(text) == expected


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("density", "part-solid nodule", "part_solid"),
        ("density", "部分实性结节", "part_solid"),
        ("margin", "边缘光滑锐利", "smooth"),
        ("margin", "well circumscribed", "smooth"),
        ("margin", "irregular", None),  # an irregular margin is not a smooth one
        ("shape", "卵圆形", "oval"),
        ("shape", "irregular shape", "irregular"),
        ("shape", 12, None),
    ],
)
def test_attribute_value_reads_one_attribute(name: str, text: object, expected: str | None) -> None:
    assert attribute_value(name, text) == expected


def test_attribute_value_refuses_an_unknown_attribute() -> None:
    with pytest.raises(ValueError, match="attribute 'size'"):
        attribute_value("size", "large")


def test_box_2d_reads_and_reports_repairs() -> None:
    warnings: list[str] = []
    assert box_2d("[0.612, 0.238, 0.688, 0.31]", warnings, "refined box") == (612, 238, 688, 310)
    assert warnings == ["refined box: box_2d looked normalised to 0-1; scaled to 0-1000"]
    assert box_2d({"y0": 700, "x0": 310, "y1": 600, "x1": 220}) == (600, 220, 700, 310)
    assert box_2d([[-5, 10, 1200, 20]]) == (0, 10, 1000, 20)
    assert box_2d([5, 5, 5, 9]) is None
    assert box_2d("near the hilum") is None


# ------------------------------------------------------------------ lenient JSON


def test_extract_json_reads_a_follow_up_answer_behind_a_thinking_trace() -> None:
    text = (
        "<unused94>thought\nThe margin looks {spiky}.<unused95>"
        "The nodule is spiculated.\nFinal Answer:\n```json\n"
        "{'margin': 'spiculated', shape: \"round\", // model comment\n}\n```"
    )
    decoded = extract_json(text)
    assert decoded.found and not decoded.truncated
    assert decoded.value == {"margin": "spiculated", "shape": "round"}
    assert decoded.warnings == ()
    assert "spiky" not in decoded.text
    assert decoded.text_outside.strip().startswith("The nodule is spiculated.")


def test_extract_json_keeps_complete_elements_of_a_truncated_list() -> None:
    decoded = extract_json('[{"box_2d": [1, 2, 3, 4]}, {"box_2d": [5, 6')
    assert decoded.found and decoded.truncated
    assert decoded.value == [{"box_2d": [1, 2, 3, 4]}]
    assert decoded.dropped_partial == 1


def test_extract_json_skips_values_it_is_told_not_to_accept() -> None:
    text = 'e.g. {"example": 1} then {"box_2d": [1, 2, 3, 4]}'
    decoded = extract_json(text, accept=lambda v: isinstance(v, dict) and "box_2d" in v)
    assert decoded.value == {"box_2d": [1, 2, 3, 4]}
    assert not extract_json("no json here").found


def test_strip_thinking_reports_an_unterminated_trace() -> None:
    warnings: list[str] = []
    assert strip_thinking("a<unused94>b<unused95>c") == "ac"
    assert strip_thinking("<unused94>thinking... Final Answer: {}", warnings) == "Final Answer: {}"
    assert warnings == ["thinking trace not terminated; answer taken from 'Final Answer:'"]
