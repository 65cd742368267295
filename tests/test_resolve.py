"""Which anchors a follow-up question is about: the resolution table through the real
`medgemma-node resolve` command, edge cases of resolve() itself, and the command's errors.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sr_templates import ontology
from sr_templates.model import Anchor, Region
from workers.dialogue.resolve import (
    Anchors,
    Clarify,
    NewRegion,
    parse_anchor_list,
    resolve,
    site_covers,
)

# A pre-read of a chest radiograph: two nodules on opposite sides, a consolidation on
# the right, both hila as landmarks.
STUDY = [
    {"anchor_id": "A1", "kind": "finding", "label": "right upper zone nodule",
     "finding": "nodule", "site": "right_upper_zone", "laterality": "right",
     "attributes": {"shape": "round", "margin": "smooth"}},
    {"anchor_id": "A2", "kind": "finding", "label": "left lower zone nodule",
     "finding": "nodule", "site": "left_lower_zone", "laterality": "left"},
    {"anchor_id": "A3", "kind": "finding", "label": "right lower zone consolidation",
     "finding": "consolidation", "site": "right_lower_zone", "laterality": "right"},
    {"anchor_id": "A4", "kind": "landmark", "label": "right hilum", "site": "right_hilum",
     "laterality": "right"},
    {"anchor_id": "A5", "kind": "landmark", "label": "left hilum", "site": "left_hilum",
     "laterality": "left"},
]  # fmt: skip

# The study of the issue's conversation: a round nodule the pre-read put in the right
# middle zone (the right middle lobe projects there), no left hilum landmark; kind and
# laterality left to their defaults.
RML_STUDY = [
    {"anchor_id": "A1", "label": "right middle zone nodule", "finding": "nodule",
     "site": "right_middle_zone", "attributes": {"shape": "round"}},
    {"anchor_id": "A2", "label": "right lower zone consolidation", "finding": "consolidation",
     "site": "right_lower_zone"},
    {"anchor_id": "A3", "label": "left costophrenic angle pleural effusion",
     "finding": "pleural_effusion", "site": "left_costophrenic_angle"},
    {"anchor_id": "A4", "kind": "landmark", "label": "right hilum", "site": "right_hilum"},
]  # fmt: skip

FINDINGS = ["A1", "A2", "A3"]


def anchors(*ids: str) -> dict[str, list[str]]:
    return {"anchors": list(ids)}


def clarify(*ids: str) -> dict[str, list[str]]:
    return {"clarify": list(ids)}


def new_region(term: str) -> dict[str, str]:
    return {"new_region": term}


# (anchor file, focus, question, expected output)
TABLE: list[tuple[str, str | None, str, dict[str, Any]]] = [
    # explicit ids, the tracking identifier, "#2"
    ("study", None, "How big is a2?", anchors("A2")),
    ("study", None, "What about #3?", anchors("A3")),
    ("study", None, "Tell me about A1 right upper zone nodule", anchors("A1")),
    ("study", None, "Is A2 in the left lung?", anchors("A2")),
    ("study", None, "Compare A3 with A1", anchors("A3", "A1")),
    ("study", None, "A1和A2哪个大?", anchors("A1", "A2")),
    ("study", None, "A9 是什么?", clarify(*FINDINGS)),
    # ordinals: among findings (landmarks are not findings), or among one finding type
    ("study", None, "What is the second finding?", anchors("A2")),
    ("study", None, "第二个发现是什么?", anchors("A2")),
    ("study", None, "the last finding", anchors("A3")),
    ("study", None, "Is the first nodule calcified?", anchors("A1")),
    ("study", None, "第二个结节多大?", anchors("A2")),
    ("study", None, "Is the second one bigger than the first one?", anchors("A2", "A1")),
    ("study", None, "How big is the third nodule?", clarify("A1", "A2")),
    # descriptions: a site narrows; a side word narrows; shapes need a noun
    ("study", None, "右上肺那个结节边缘规则吗?", anchors("A1")),
    ("study", None, "右上肺野有结节吗?", anchors("A1")),
    ("study", None, "Is the right upper zone nodule round?", anchors("A1")),
    ("study", None, "How big is the right nodule?", anchors("A1")),
    ("study", None, "左侧结节多大?", anchors("A2")),
    ("study", None, "右边的结节多大?", anchors("A1")),
    ("study", None, "What is in the right lung?", anchors("A1", "A3")),
    ("study", None, "Are the nodules calcified?", anchors("A1", "A2")),
    ("study", None, "What is the distance between the two nodules?", anchors("A1", "A2")),
    # comparisons: both anchors, in the order named
    ("study", None, "How big is the left lower zone nodule compared with A1?", anchors("A2", "A1")),
    ("study", None, "左下肺野的结节和A1相比有多大?", anchors("A2", "A1")),
    ("study", None, "左肺结节距离右肺门多远?", anchors("A2", "A4")),
    (
        "study",
        None,
        "How far is the left lower zone nodule from the left hilum?",
        anchors("A2", "A5"),
    ),
    # left/right traps and partial fits: never across sides, never a silent guess
    ("study", None, "Is the nodule smooth?", clarify("A1", "A2")),
    ("study", None, "Is the right lower zone nodule solid?", clarify("A1", "A3")),
    ("study", None, "How big is the right mass?", clarify("A1", "A3")),
    ("study", None, "Is the left lower zone consolidation getting worse?", clarify("A2")),
    ("study", None, "Is the left upper zone nodule calcified?", new_region("left_upper_zone")),
    (
        "study",
        None,
        "The round shadow in the right middle lobe - is its margin regular?",
        clarify("A1", "A3"),
    ),
    ("study", None, "How big is the pneumothorax?", clarify(*FINDINGS)),
    # general questions: every finding
    ("study", None, "Is there anything abnormal in the lungs?", anchors(*FINDINGS)),
    ("study", None, "肺部是否有异常?", anchors(*FINDINGS)),
    ("study", None, "What are the findings?", anchors(*FINDINGS)),
    ("study", None, "Is there a pneumothorax?", anchors(*FINDINGS)),
    # deixis and pronouns bind to the focus; a later pronoun refers back
    ("study", "A2", "Is it growing?", anchors("A2")),
    ("study", None, "Is it growing?", clarify(*FINDINGS)),
    ("study", None, "Is this bigger than A1?", clarify(*FINDINGS)),
    ("study", "A1", "这个病灶边缘清楚吗?", anchors("A1")),
    ("study", "A3", "它有钙化吗?", anchors("A3")),
    ("study", "A3", "这个结节多大?", clarify("A3", "A1", "A2")),
    ("study", None, "那个结节多大?", clarify("A1", "A2")),
    ("study", "A1", "How big is it and is it bigger than A2?", anchors("A1", "A2")),
    (
        "study",
        "A1",
        "How far is this lesion from the right hilum? Is it connected to hilar structures?",
        anchors("A1", "A4"),
    ),
    ("study", "A1", "这个病灶距离右肺门有多远?是否与肺门结构相连?", anchors("A1", "A4")),
    (
        "study",
        "A1",
        "If this were early lung cancer, which typical X-ray signs should it show, "
        "and how many does this image show?",
        anchors("A1"),
    ),
    ("study", "A1", "如果这是早期肺癌,典型X线表现应该有哪些?当前影像符合几条?", anchors("A1")),
    # "the right one": unique through the focus's finding type, or by being alone there
    ("study", "A2", "What about the right one?", anchors("A1")),
    ("study", "A2", "右边那个呢?", anchors("A1")),
    ("study", "A1", "Is the left one bigger?", anchors("A2")),
    ("study", None, "What about the right one?", clarify("A1", "A3")),
    ("study", None, "右侧的那个多大?", clarify("A1", "A3")),
    # landmarks, and places no anchor covers
    ("study", None, "右肺门有什么?", anchors("A4")),
    ("study", None, "Is there anything at the left apex?", new_region("left_lung_apex")),
    ("study", None, "左肺尖有没有病变?", new_region("left_lung_apex")),
    ("study", "A2", "How far is A1 from the left apex?", new_region("left_lung_apex")),
    # lobes project to zones: the right middle lobe covers the right middle zone
    (
        "rml",
        None,
        "The round shadow in the right middle lobe - is its margin regular?",
        anchors("A1"),
    ),
    ("rml", None, "右肺中叶那个圆形影,边缘是否规则?", anchors("A1")),
    ("rml", None, "Is the RML nodule solid?", anchors("A1")),
    ("rml", None, "右上肺野那个结节多大?", new_region("right_upper_zone")),
    ("rml", "A1", "这个病灶距离左肺门有多远?", new_region("left_hilum")),
    ("rml", None, "Is the left pleural effusion large?", anchors("A3")),
    ("rml", None, "Is the right effusion large?", clarify("A1", "A2")),
    ("rml", "A1", "How big is the lesion?", anchors("A1")),
]


def _command() -> list[str]:
    script = Path(sys.executable).with_name("medgemma-node")
    return [str(script)] if script.exists() else [sys.executable, "-m", "node.cli"]


def run_resolve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_command(), "resolve", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def anchor_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("anchors")
    files = {}
    for name, data in (("study", STUDY), ("rml", RML_STUDY)):
        files[name] = folder / f"{name}.json"
        files[name].write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return files


@pytest.fixture(scope="module")
def table_runs(anchor_files: dict[str, Path]) -> dict[int, subprocess.CompletedProcess[str]]:
    """Every row of TABLE through the command (a few processes at a time)."""

    def run(row: tuple[str, str | None, str, dict[str, Any]]) -> subprocess.CompletedProcess[str]:
        name, focus, question, _ = row
        focus_args = ["--focus", focus] if focus else []
        return run_resolve("--anchors", str(anchor_files[name]), *focus_args, question)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(enumerate(pool.map(run, TABLE)))


@pytest.mark.parametrize(
    "index", range(len(TABLE)), ids=[f"{r[0]}:{r[1] or '-'}:{r[2][:40]}" for r in TABLE]
)
def test_resolution_table(index: int, table_runs: dict[int, subprocess.CompletedProcess[str]]):
    _, _, question, expected = TABLE[index]
    result = table_runs[index]
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"{question!r}: one JSON object expected, got {result.stdout!r}"
    assert json.loads(lines[0]) == expected, question


def test_table_covers_the_cases_of_the_issue() -> None:
    questions = [row[2] for row in TABLE]
    assert len(questions) >= 40 and len(set(questions)) >= 40
    assert sum(1 for q in questions if any("\u4e00" <= ch <= "\u9fff" for ch in q)) >= 15
    kinds = {next(iter(row[3])) for row in TABLE}
    assert kinds == {"anchors", "clarify", "new_region"}


# ----------------------------------------------------------------------------- resolve()


def model_anchor(anchor_id: str, kind: str, finding: str | None, site: str, side: str,
                 **attributes: str) -> Anchor:  # fmt: skip
    return Anchor(
        anchor_id=anchor_id,
        tracking_uid=f"2.25.{100 + int(anchor_id[1:])}",
        label=f"{site.replace('_', ' ')} {finding or ''}".strip(),
        kind=kind,  # type: ignore[arg-type]
        finding=finding,
        site=site,
        laterality=side,  # type: ignore[arg-type]
        region=Region(100.0, 100.0, 140.0, 150.0, "ellipse"),
        source_sop_instance_uid="1.2.3.4",
        attributes=attributes,
    )


@pytest.fixture
def model_anchors() -> list[Anchor]:
    return [
        model_anchor("A1", "finding", "nodule", "right_middle_zone", "right", shape="round"),
        model_anchor("A2", "finding", "nodule", "left_lower_zone", "left"),
        model_anchor("A3", "landmark", None, "right_hilum", "right"),
    ]


def test_resolve_reads_the_typed_anchor_model(model_anchors: list[Anchor]) -> None:
    assert resolve("右肺中叶那个圆形影,边缘是否规则?", model_anchors) == Anchors(("A1",))
    assert resolve("How far is it from the right hilum?", model_anchors, focus="A1") == Anchors(
        ("A1", "A3")
    )


def test_a_new_region_keeps_the_other_anchors_and_is_found_once_localised(
    model_anchors: list[Anchor],
) -> None:
    question = "How far is A1 from the left apex?"
    first = resolve(question, model_anchors)
    assert first == NewRegion("left_lung_apex", "left apex", ("A1",))
    # the dialogue localises the place as a region anchor and resolves again
    localised = [*model_anchors, model_anchor("A4", "region", None, "left_lung_apex", "left")]
    assert resolve(question, localised) == Anchors(("A1", "A4"))
    assert resolve("左肺尖有没有病变?", localised) == Anchors(("A4",))
    assert resolve("Is there a nodule at the left apex?", localised) == Anchors(("A4",))


def test_general_questions_are_marked_as_about_everything(model_anchors: list[Anchor]) -> None:
    general = resolve("Is there anything abnormal in the lungs?", model_anchors)
    assert general == Anchors(("A1", "A2"), scope="all")
    assert resolve("A2?", model_anchors) == Anchors(("A2",), scope="named")
    assert resolve("肺部是否有异常?", []) == Anchors((), scope="all")


def test_clarify_says_why(model_anchors: list[Anchor]) -> None:
    no_focus = resolve("Is it growing?", model_anchors)
    assert isinstance(no_focus, Clarify) and "focus" in no_focus.reason
    assert no_focus.candidates == ("A1", "A2")  # findings only, never the landmark
    two = resolve("Is the nodule smooth?", model_anchors)
    assert isinstance(two, Clarify) and two.candidates == ("A1", "A2")
    assert "equally" in two.reason
    assert resolve("Is it growing?", []) == Clarify((), no_focus.reason)


def test_the_focus_must_be_one_of_the_anchors(model_anchors: list[Anchor]) -> None:
    with pytest.raises(ValueError, match="focus 'A7' is not one of the anchors"):
        resolve("Is it growing?", model_anchors, focus="A7")
    with pytest.raises(TypeError, match="question must be a str"):
        resolve(b"A1", model_anchors)  # type: ignore[arg-type]


@dataclass(frozen=True)
class OtherAnchor:
    """Not ListedAnchor nor the model: resolve() reads any object with these facts."""

    anchor_id: str
    finding: str | None
    site: str | None
    laterality: str
    kind: str = "finding"
    label: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


def test_any_object_with_the_facts_will_do() -> None:
    facts = [
        OtherAnchor("A1", "mass", "left_upper_lobe", "left"),
        OtherAnchor("A2", "mass", "right_upper_lobe", "right"),
    ]
    assert resolve("左肺上叶的肿块", facts) == Anchors(("A1",))
    assert resolve("the left upper zone mass", facts) == Anchors(("A1",))  # lobe <-> zone
    assert resolve("Is the right lower lobe mass bigger?", facts) == NewRegion(
        "right_lower_lobe", "right lower lobe"
    )


def test_site_coverage_never_crosses_sides() -> None:
    places = {**ontology.SITES, **ontology.LANDMARKS}
    sided = [(t, c.side) for t, c in places.items() if c.side in ("right", "left")]
    for question, q_side in sided:
        for anchor, a_side in sided:
            if q_side != a_side:
                assert not site_covers(question, anchor), (question, anchor)


@pytest.mark.parametrize(
    ("question", "anchor", "covers"),
    [
        ("right_middle_lobe", "right_middle_zone", True),  # the lobe projects there
        ("right_middle_zone", "right_middle_lobe", True),
        ("right_middle_lobe", "right_lower_zone", True),
        ("right_middle_lobe", "right_upper_zone", False),
        ("right_middle_lobe", "right_lower_lobe", False),  # two lobes are distinct
        ("right_upper_zone", "right_lung_apex", True),
        ("right_lung_apex", "right_upper_zone", False),  # a landmark covers itself only
        ("right_lung", "right_hilum", True),
        ("right_hilum", "right_lung", False),
        ("both_lungs", "left_lower_zone", True),
        ("lingula", "left_lower_zone", True),
        ("left_upper_lobe", "lingula", True),
        ("mediastinum", "trachea", True),
        ("right_pleura", "right_costophrenic_angle", True),
        ("right_costophrenic_angle", "right_lower_zone", False),
    ],
)
def test_site_coverage_table(question: str, anchor: str, covers: bool) -> None:
    assert site_covers(question, anchor) is covers


def test_anchor_file_defaults_and_rules() -> None:
    parsed = parse_anchor_list(RML_STUDY)
    assert [a.kind for a in parsed] == ["finding", "finding", "finding", "landmark"]
    assert [a.laterality for a in parsed] == ["right", "right", "left", "right"]  # from the site
    assert parsed[0].attributes == {"shape": "round"}
    # a ledger anchor's extra keys are ignored
    assert parse_anchor_list([{**STUDY[0], "tracking_uid": "2.25.1", "region": {}}])[0].site == (
        "right_upper_zone"
    )
    bad = [
        ({"anchor_id": "A1"}, "anchor 1 \\(A1\\): a finding anchor needs a finding term"),
        ({"anchor_id": "B1", "finding": "nodule"}, "anchor_id 'B1' must be 'A' and a number"),
        ({"anchor_id": "A1", "kind": "lesion", "finding": "nodule"}, "kind 'lesion'"),
        ({"anchor_id": "A1", "finding": "nodule", "site": "right_elbow"}, "site 'right_elbow'"),
        ({"anchor_id": "A1", "kind": "landmark"}, "needs its site"),
        ({"anchor_id": "A1", "finding": "nodule", "laterality": "up"}, "laterality 'up'"),
        ({"anchor_id": "A1", "finding": "nodule", "attributes": {"shape": 1}}, "attributes"),
    ]
    for entry, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_anchor_list([entry])
    with pytest.raises(ValueError, match="anchor 2 \\(A1\\): anchor_id A1 appears twice"):
        parse_anchor_list([STUDY[0], STUDY[0]])
    with pytest.raises(ValueError, match="must hold a JSON list"):
        parse_anchor_list({"anchors": STUDY})


# ----------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the anchor file .*: No such file or directory"),
        ("[{", "is not JSON: "),
        ('{"A1": "nodule"}', "must hold a JSON list, not a dict"),
        ('[{"anchor_id": "A1", "finding": "nodul"}]', "anchor 1 \\(A1\\): finding 'nodul'"),
    ],
)
def test_a_bad_anchor_file_is_one_line_and_exit_2(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "anchors.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = run_resolve("--anchors", str(path), "Is it growing?")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("medgemma-node resolve: "), result.stderr
    assert re.search(message, lines[0]), lines[0]


def test_an_unknown_focus_is_one_line_and_exit_2(anchor_files: dict[str, Path]) -> None:
    result = run_resolve("--anchors", str(anchor_files["study"]), "--focus", "A9", "Is it big?")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "medgemma-node resolve: --focus: focus 'A9' is not one of the anchors (A1, A2, A3, A4, A5)"
    )


def test_focus_and_unquoted_words(anchor_files: dict[str, Path]) -> None:
    result = run_resolve(
        "--anchors", str(anchor_files["study"]), "--focus", "a2", "Is", "it", "growing?"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"anchors": ["A2"]}
