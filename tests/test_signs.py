"""The chest X-ray sign checklists: finding a condition in a question, checking its typical
signs against one anchor's facts, and the EN/ZH answer (issue 9, turn 4)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import pytest
from pydicom.sr.coding import Code

from sr_templates import codes, ontology
from sr_templates.signs import (
    CONDITIONS,
    NOTICE,
    AttributeRule,
    Condition,
    FindingRule,
    NotAssessableRule,
    Sign,
    SignCounts,
    SignFacts,
    SiteRule,
    SizeRule,
    StudyFindingRule,
    evaluate,
    find_condition,
    find_conditions,
    render_checklist,
)

HAN = re.compile(r"[\u3400-\u9fff]")

#: A spiculated, solid 15 mm nodule in the right upper zone; shape not assessed.
SUSPICIOUS = SignFacts(
    finding="nodule",
    site="right_upper_zone",
    attributes={"margin": "spiculated", "density": "solid"},
    long_axis=15.0,
    short_axis=11.0,
    units="mm",
)
#: A smooth, round, calcified 5 mm nodule in the right lower zone, with a second nodule.
BENIGN_LOOKING = SignFacts(
    finding="nodule",
    site="right_lower_zone",
    attributes={"margin": "smooth", "density": "calcified", "shape": "round"},
    long_axis=5.0,
    short_axis=4.5,
    units="mm",
    other_findings=("nodule",),
)


def statuses(condition_key: str, facts: SignFacts) -> dict[str, str]:
    checklist = evaluate(CONDITIONS[condition_key], facts)
    return {item.sign.key.split(".", 1)[1]: item.status for item in checklist.items}


# ----------------------------------------------------------------------------- finding a condition


@pytest.mark.parametrize(
    ("question", "key"),
    [
        (
            "If this were early lung cancer, which typical X-ray signs should it show, "
            "and how many does this image show?",
            "lung_cancer",
        ),
        ("如果这是早期肺癌,典型X线表现应该有哪些?当前影像符合几条?", "lung_cancer"),
        ("Could this be LUNG CANCER?", "lung_cancer"),
        ("Is it an early-stage lung cancer?", "lung_cancer"),
        ("Would a bronchogenic carcinoma look like this?", "lung_cancer"),
        ("会是周围型肺癌吗?", "lung_cancer"),
        ("Does this look like pneumonia?", "pneumonia"),
        ("是肺炎吗?", "pneumonia"),
        ("这是肺部感染吗", "pneumonia"),
        ("Could it be TB?", "tuberculosis"),
        ("Signs of pulmonary-TB here?", "tuberculosis"),
        ("Tuberculosis?", "tuberculosis"),
        ("是不是肺结核?", "tuberculosis"),
        ("Is there a tension pneumothorax?", "pneumothorax"),
        ("有没有气胸", "pneumothorax"),
        ("Typical signs of pleural effusion?", "pleural_effusion"),
        ("有胸水吗", "pleural_effusion"),
        ("Could this be CHF?", "heart_failure"),
        ("是心衰吗", "heart_failure"),
    ],
)
def test_finds_the_condition_named_in_english_and_chinese(question: str, key: str) -> None:
    found = find_condition(question)
    assert found is not None and found.key == key


@pytest.mark.parametrize(
    "question",
    [
        "lung",
        "Is there anything abnormal in the lungs?",
        "肺部是否有异常?",
        "Is the lung nodule cancerous?",
        "右肺中叶那个圆形影,边缘是否规则?",
        "这个结节边缘规则吗",
        "Is there a pericardial effusion?",
        "Follow-up date TBD",
        "",
    ],
)
def test_names_no_condition_where_none_is_named(question: str) -> None:
    assert find_condition(question) is None
    assert find_conditions(question) == ()


def test_longest_name_wins_and_every_named_condition_is_listed_in_order() -> None:
    question = "Pneumonia or early lung cancer?"
    found = find_condition(question)
    assert found is not None and found.key == "lung_cancer"  # "early lung cancer" is longest
    assert [c.key for c in find_conditions(question)] == ["pneumonia", "lung_cancer"]
    assert [c.key for c in find_conditions("肺炎还是肺结核?")] == ["pneumonia", "tuberculosis"]
    # "肺癌" inside "周围型肺癌" and "结核" inside "肺结核" are one mention each
    assert len(find_conditions("周围型肺癌")) == 1
    assert len(find_conditions("肺结核")) == 1
    with pytest.raises(TypeError, match="question"):
        find_condition(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the table


def test_every_condition_and_sign_has_names_a_code_from_codes_py_and_a_valid_rule() -> None:
    code_constants = [v for v in vars(codes).values() if isinstance(v, Code)]
    assert set(CONDITIONS) == {
        "lung_cancer",
        "pneumonia",
        "tuberculosis",
        "pneumothorax",
        "pleural_effusion",
        "heart_failure",
    }
    for condition in CONDITIONS.values():
        assert condition.code is not None and any(condition.code is v for v in code_constants)
        # every name finds its own condition
        for name in (*condition.names_en, *condition.names_zh):
            assert find_condition(f"is it {name}?") is condition, name
        assert 4 <= len(condition.signs) <= 12
        for sign in condition.signs:
            assert sign.en and not HAN.search(sign.en), sign.key
            assert HAN.search(sign.zh), sign.key
            assert set(re.findall(r"[A-Za-z]{2,}", sign.zh)) <= {"mm", "CT"}, sign.key
            # one definition of every code: codes.py (whose sources test_sr_templates checks)
            assert any(sign.code is v for v in code_constants), sign.key
            rule = sign.rule
            if isinstance(rule, AttributeRule):
                values = set(ontology.ATTRIBUTES[rule.attribute])
                assert set(rule.present_if) | set(rule.absent_if) <= values
            elif isinstance(rule, FindingRule):
                assert set(rule.present_if) | set(rule.absent_if) <= set(ontology.FINDINGS)
            elif isinstance(rule, SiteRule):
                assert set(rule.present_if) | set(rule.absent_if) <= set(ontology.SITES)
            elif isinstance(rule, StudyFindingRule):
                assert set(rule.findings) <= set(ontology.FINDINGS)
            elif isinstance(rule, SizeRule):
                # the names state the rule's own range
                for bound in (rule.min_mm, rule.max_mm):
                    assert bound is not None and f"{bound:g}" in sign.en and f"{bound:g}" in sign.zh
            else:
                assert isinstance(rule, NotAssessableRule)
    # signs shared between conditions share their code, not a copy of it
    effusions = [s for c in CONDITIONS.values() for s in c.signs if s.key.endswith("effusion")]
    assert len(effusions) == 4 and all(s.code is codes.FINDING_PLEURAL_EFFUSION for s in effusions)


def test_invalid_rules_signs_and_conditions_are_refused_naming_the_argument() -> None:
    with pytest.raises(ValueError, match=r"AttributeRule\.attribute 'colour'"):
        AttributeRule("colour", {"red"})
    with pytest.raises(ValueError, match=r"AttributeRule.present_if: \['spiky'\]"):
        AttributeRule("margin", {"spiky"})
    with pytest.raises(ValueError, match="in both present_if and absent_if"):
        AttributeRule("margin", {"smooth"}, {"smooth"})
    with pytest.raises(ValueError, match="at least one term"):
        FindingRule(set())
    with pytest.raises(TypeError, match="set of terms"):
        SiteRule("right_upper_zone")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_mm 30 is above max_mm 8"):
        SizeRule(min_mm=30, max_mm=8)
    with pytest.raises(ValueError, match="needs min_mm, max_mm or both"):
        SizeRule()
    with pytest.raises(ValueError, match="limitation 'later'"):
        NotAssessableRule("later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="zh names must be Chinese"):
        Sign("x.y", "cavity", "cavity", codes.SIGN_CAVITATION, NotAssessableRule("not_recorded"))
    with pytest.raises(TypeError, match="code must be a pydicom Code"):
        Condition("x", "x", "某病", "123", ())  # type: ignore[arg-type]
    sign = CONDITIONS["pneumothorax"].signs[0]
    with pytest.raises(ValueError, match="sign keys must start with 'other'"):
        Condition("other", "other", "其他", None, (sign,))


def test_sign_facts_are_validated_against_the_prereads_vocabulary() -> None:
    with pytest.raises(ValueError, match="finding 'tumour'"):
        SignFacts("tumour", None)
    with pytest.raises(ValueError, match="site 'upper_zone'"):
        SignFacts("nodule", "upper_zone")
    with pytest.raises(ValueError, match="margin value 'spiky'"):
        SignFacts("nodule", None, {"margin": "spiky"})
    with pytest.raises(ValueError, match="units must be one of"):
        SignFacts("nodule", None, long_axis=12.0)
    with pytest.raises(ValueError, match="units is given without"):
        SignFacts("nodule", None, units="mm")
    with pytest.raises(ValueError, match="finite number >= 0"):
        SignFacts("nodule", None, long_axis=math.nan, units="mm")
    with pytest.raises(TypeError, match="long_axis must be a number"):
        SignFacts("nodule", None, long_axis=True, units="mm")
    with pytest.raises(ValueError, match="finding 'ggo'"):
        SignFacts("nodule", None, other_findings=("ggo",))
    # the stored attributes cannot be changed behind the checklist's back
    attributes = {"margin": "smooth"}
    facts = SignFacts("nodule", None, attributes)
    attributes["margin"] = "spiculated"
    assert facts.attributes["margin"] == "smooth"
    assert isinstance(facts.attributes, Mapping)
    with pytest.raises(TypeError):
        facts.attributes["margin"] = "lobulated"  # type: ignore[index]


# ----------------------------------------------------------------------------- evaluation


def test_spiculated_solid_upper_zone_nodule_of_15_mm() -> None:
    assert statuses("lung_cancer", SUSPICIOUS) == {
        "nodule": "present",
        "solitary": "present",  # no other finding in the study
        "size": "present",  # 8 <= 15 <= 30
        "spiculated_margin": "present",
        "lobulated_margin": "not_assessable",  # one margin value: spiculated does not decide
        "solid_component": "present",
        "no_calcification": "present",
        "irregular_shape": "not_assessable",  # shape not assessed
        "upper_location": "present",
        "growth": "not_assessable",
        "pleural_indentation": "not_assessable",
        "vacuole": "not_assessable",
    }
    checklist = evaluate(CONDITIONS["lung_cancer"], SUSPICIOUS)
    assert checklist.counts == SignCounts(present=7, absent=0, not_assessable=5, total=12)
    size = next(i for i in checklist.items if i.sign.key == "lung_cancer.size")
    assert (size.evidence.fact, size.evidence.measured, size.evidence.units) == ("size", 15.0, "mm")
    margin = next(i for i in checklist.items if i.sign.key == "lung_cancer.spiculated_margin")
    assert (margin.evidence.attribute, margin.evidence.value) == ("margin", "spiculated")


def test_smooth_round_calcified_5_mm_nodule_with_a_second_nodule() -> None:
    assert statuses("lung_cancer", BENIGN_LOOKING) == {
        "nodule": "present",
        "solitary": "absent",  # the study reports another nodule
        "size": "absent",  # 5 < 8
        "spiculated_margin": "absent",
        "lobulated_margin": "absent",
        "solid_component": "not_assessable",  # calcified: judged by "no calcification"
        "no_calcification": "absent",
        "irregular_shape": "absent",
        "upper_location": "absent",
        "growth": "not_assessable",
        "pleural_indentation": "not_assessable",
        "vacuole": "not_assessable",
    }
    checklist = evaluate(CONDITIONS["lung_cancer"], BENIGN_LOOKING)
    assert checklist.counts == SignCounts(present=1, absent=7, not_assessable=4, total=12)
    solitary = next(i for i in checklist.items if i.sign.key == "lung_cancer.solitary")
    assert solitary.evidence.found == ("nodule",)
    # the same facts for tuberculosis: calcification is a sign of healed foci there
    assert statuses("tuberculosis", BENIGN_LOOKING)["calcification"] == "present"


def test_missing_facts_make_signs_not_assessable_never_guessed() -> None:
    facts = SignFacts("nodule", None)
    checklist = evaluate(CONDITIONS["lung_cancer"], facts)
    assert checklist.counts == SignCounts(present=2, absent=0, not_assessable=10, total=12)
    gaps = {i.sign.key.split(".")[1]: i.evidence.gap for i in checklist.items}
    assert gaps["spiculated_margin"] == gaps["irregular_shape"] == "missing"
    assert gaps["size"] == gaps["upper_location"] == "missing"
    assert gaps["growth"] == "comparison" and gaps["vacuole"] == "ct_feature"
    assert gaps["nodule"] is None  # decided: present
    # no finding type at all
    assert statuses("pneumonia", SignFacts(None, "right_lower_zone"))["consolidation"] == (
        "not_assessable"
    )


def test_size_in_pixels_only_is_not_assessable_and_says_why() -> None:
    facts = SignFacts("nodule", "left_upper_zone", long_axis=120.4, short_axis=90.0, units="px")
    checklist = evaluate(CONDITIONS["lung_cancer"], facts)
    size = next(i for i in checklist.items if i.sign.key == "lung_cancer.size")
    assert size.status == "not_assessable"
    assert (size.evidence.gap, size.evidence.measured, size.evidence.units) == (
        "pixels_only",
        120.4,
        "px",
    )
    english, chinese = render_checklist(checklist, "en"), render_checklist(checklist, "zh")
    assert "long axis 120 px only: the image has no pixel spacing" in english
    assert "长径仅有 120 px：图像无像素间距" in chinese
    assert " mm;" not in english  # no millimetre number made up from pixels


def test_study_level_signs_read_the_anchor_and_the_other_findings() -> None:
    facts = SignFacts("hilar_enlargement", "right_hilum", other_findings=("cardiomegaly",))
    assert statuses("heart_failure", facts) == {
        "cardiomegaly": "present",
        "pleural_effusion": "absent",
        "hilar_congestion": "present",
        "upper_lobe_diversion": "not_assessable",
        "kerley_b_lines": "not_assessable",
        "pulmonary_edema": "not_assessable",
    }
    effusion = SignFacts("pleural_effusion", "left_costophrenic_angle", long_axis=60.0, units="mm")
    assert statuses("pleural_effusion", effusion) == {
        "effusion": "present",
        "dependent_location": "present",
        "meniscus": "not_assessable",
        "mediastinal_shift": "not_assessable",
    }
    # an anchor high in the chest is not a dependent location; a pleura site does not decide
    assert statuses("pleural_effusion", SignFacts("pleural_effusion", "left_upper_zone"))[
        "dependent_location"
    ] == ("absent")
    assert statuses("pleural_effusion", SignFacts("pleural_effusion", "left_pleura"))[
        "dependent_location"
    ] == ("not_assessable")


def test_evaluate_refuses_what_is_not_a_condition_or_facts() -> None:
    with pytest.raises(TypeError, match="condition must be a Condition"):
        evaluate("lung_cancer", SUSPICIOUS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="facts must be SignFacts"):
        evaluate(CONDITIONS["lung_cancer"], {"finding": "nodule"})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- rendering


def test_english_answer_lists_every_sign_with_status_evidence_counts_and_notice() -> None:
    facts = SignFacts(
        "nodule", "right_upper_zone", {"margin": "spiculated", "density": "solid"}, 12.34, 9.0, "mm"
    )
    checklist = evaluate(CONDITIONS["lung_cancer"], facts)
    text = render_checklist(checklist, "en")
    lines = text.splitlines()
    assert (
        lines[0] == "Typical chest X-ray signs of early lung cancer, checked against this finding:"
    )
    assert len(lines) == 1 + 12 + 2
    for number, item in enumerate(checklist.items, start=1):
        assert lines[number].startswith(f"{number}. {item.sign.en}: ")
    assert "3. size 8-30 mm (long axis): present — long axis 12.3 mm; this sign: 8–30 mm" in text
    assert "4. spiculated margin: present — margin: spiculated" in text
    assert "8. irregular shape: not assessable — shape not recorded for this finding" in text
    assert "needs comparison with another study" in text
    assert "7 of 12 signs present, 0 absent, 5 not assessable." in text
    assert lines[-1] == NOTICE["en"] and "not a diagnosis" in lines[-1]
    assert not HAN.search(text)


def test_chinese_answer_is_chinese_with_counts_and_notice() -> None:
    text = render_checklist(evaluate(CONDITIONS["lung_cancer"], BENIGN_LOOKING), "zh")
    assert text.splitlines()[0] == "早期肺癌的典型X线表现，逐条对照该病灶："
    assert "3. 大小8–30 mm（长径）：不符合 —— 长径 5.0 mm，本条范围 8–30 mm" in text
    assert "4. 毛刺征：不符合 —— 边缘：光滑" in text
    assert "2. 孤立性（无其他结节或肿块）：不符合 —— 本次检查的其他所见包括：结节" in text
    assert "共 12 条：符合 1 条，不符合 7 条，无法评估 4 条。" in text
    assert text.splitlines()[-1] == NOTICE["zh"] and "不是诊断" in NOTICE["zh"]


@pytest.mark.parametrize("key", sorted(CONDITIONS))
@pytest.mark.parametrize(
    "facts",
    [
        SUSPICIOUS,
        BENIGN_LOOKING,
        SignFacts(None, None),
        SignFacts(
            "consolidation",
            "right_lower_zone",
            {"margin": "ill_defined"},
            80.0,
            60.0,
            "px",
            ("pleural_effusion", "hilar_enlargement"),
        ),
    ],
    ids=["suspicious", "benign-looking", "nothing-known", "pixels-and-other-findings"],
)
def test_chinese_answers_hold_no_english_names(key: str, facts: SignFacts) -> None:
    checklist = evaluate(CONDITIONS[key], facts)
    text = render_checklist(checklist, "zh")
    english_names = [s.en for s in CONDITIONS[key].signs] + [CONDITIONS[key].en]
    english_names += [c.en for c in ontology.all_concepts()]
    for name in english_names:
        assert not re.search(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])", text), name
    # the only Latin letters left are units and the modality names
    assert set(re.findall(r"[A-Za-z]{2,}", text)) <= {"mm", "px", "CT"}
    counts = checklist.counts
    assert (
        f"共 {counts.total} 条：符合 {counts.present} 条，不符合 {counts.absent} 条，"
        f"无法评估 {counts.not_assessable} 条。"
    ) in text
    assert NOTICE["zh"] in text
    english = render_checklist(checklist, "en")
    assert f"{counts.present} of {counts.total} signs present" in english
    assert NOTICE["en"] in english and not HAN.search(english)


def test_unsupported_language_is_refused() -> None:
    checklist = evaluate(CONDITIONS["pneumonia"], SUSPICIOUS)
    with pytest.raises(ValueError, match="language 'fr'"):
        render_checklist(checklist, "fr")  # type: ignore[arg-type]
