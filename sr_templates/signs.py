"""Typical chest radiograph signs of a few conditions, and a checklist of them for one finding.

A follow-up such as "If this were early lung cancer, which typical X-ray signs should it
show, and how many does this image show?" / "如果这是早期肺癌,典型X线表现应该有哪些?" is
answered from this curated table, not from model text:

- :data:`CONDITIONS`: early lung cancer, pneumonia, pulmonary tuberculosis, pneumothorax,
  pleural effusion and heart failure, each with English and Chinese names, synonyms for
  finding the condition in a question (:func:`find_condition`) and a code.
- Each :class:`Sign` has English and Chinese names, a code (SNOMED CT / DCM where a real one
  exists, the private scheme 99MGN otherwise; all in :mod:`sr_templates.codes`) and a rule
  that is data: which attribute values, finding types, sites, sizes or other findings of
  the study make the sign present or absent. Signs a single radiograph read by this node
  cannot show (growth against a prior study, CT signs, features the pre-read vocabulary
  does not record) are always "not assessable", with the reason.
- :func:`evaluate` checks every sign of a condition against one anchor's stored facts
  (:class:`SignFacts`) and gives a :class:`Checklist`: per sign present / absent /
  not assessable and the fact that decided it, plus the counts.
- :func:`render_checklist` writes the checklist in English or Chinese from these terms and
  the ontology's, with the counts and the statement that it is not a diagnosis.

These are typical radiographic signs, not diagnostic criteria: a sign present does not make
the condition present, and a sign absent does not exclude it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, TypeAlias, get_args

from pydicom.sr.coding import Code

from sr_templates import codes as c
from sr_templates import ontology

__all__ = [
    "CONDITIONS",
    "AttributeRule",
    "Checklist",
    "ChecklistItem",
    "Condition",
    "Evidence",
    "FindingRule",
    "Gap",
    "Language",
    "Limitation",
    "NotAssessableRule",
    "Rule",
    "Sign",
    "SignCounts",
    "SignFacts",
    "SignStatus",
    "SiteRule",
    "SizeRule",
    "StudyFindingRule",
    "evaluate",
    "find_condition",
    "find_conditions",
    "render_checklist",
]

SignStatus = Literal["present", "absent", "not_assessable"]
Language = Literal["en", "zh"]
Units = Literal["mm", "px"]
Axis = Literal["long", "short"]
#: Why a sign can never be assessed here: it needs another study to compare with, it is a
#: CT sign, or the pre-read vocabulary does not record it.
Limitation = Literal["comparison", "ct_feature", "not_recorded"]
#: Why a sign is not assessable for these facts: the fact is missing, its value does not
#: decide the sign, the size is in pixels only, or a :data:`Limitation`.
Gap = Literal["missing", "undecided", "pixels_only", "comparison", "ct_feature", "not_recorded"]
Fact = Literal["finding", "site", "attribute", "size", "study_findings", "limitation"]

_STATUSES: Final = get_args(SignStatus)
_LANGUAGES: Final = get_args(Language)
_UNITS: Final = get_args(Units)
_AXES: Final = get_args(Axis)
_LIMITATIONS: Final = get_args(Limitation)
_GAPS: Final = get_args(Gap)
_FACTS: Final = get_args(Fact)
_HAN: Final = re.compile(r"[\u3400-\u9fff]")


def _terms(value: Iterable[str], allowed: Iterable[str], what: str) -> frozenset[str]:
    """``value`` as a frozenset of vocabulary terms; TypeError/ValueError naming ``what``."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"{what} must be a set of terms, got {type(value).__name__}")
    terms = frozenset(value)
    known = set(allowed)
    unknown = sorted(t for t in terms if not isinstance(t, str) or t not in known)
    if unknown:
        raise ValueError(f"{what}: {unknown} not in the vocabulary {sorted(known)}")
    return terms


def _check_disjoint(present_if: AbstractSet[str], absent_if: AbstractSet[str], what: str) -> None:
    if not present_if:
        raise ValueError(f"{what}.present_if must name at least one term")
    both = present_if & absent_if
    if both:
        raise ValueError(f"{what}: {sorted(both)} are in both present_if and absent_if")


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class AttributeRule:
    """Present when the anchor's ``attribute`` ("margin", "density", "shape") has a value in
    ``present_if``, absent when in ``absent_if``; any other value does not decide the sign
    and a missing value makes it not assessable."""

    attribute: str
    present_if: AbstractSet[str]
    absent_if: AbstractSet[str] = frozenset()

    def __post_init__(self) -> None:
        if self.attribute not in ontology.ATTRIBUTES:
            raise ValueError(
                f"AttributeRule.attribute {self.attribute!r} is not one of "
                f"{sorted(ontology.ATTRIBUTES)}"
            )
        values = ontology.ATTRIBUTES[self.attribute]
        for name in ("present_if", "absent_if"):
            terms = _terms(getattr(self, name), values, f"AttributeRule.{name}")
            object.__setattr__(self, name, terms)
        _check_disjoint(self.present_if, self.absent_if, "AttributeRule")


@dataclass(frozen=True)
class FindingRule:
    """Present when the anchor's finding type is in ``present_if``, absent when in
    ``absent_if`` (ontology.FINDINGS terms)."""

    present_if: AbstractSet[str]
    absent_if: AbstractSet[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("present_if", "absent_if"):
            terms = _terms(getattr(self, name), ontology.FINDINGS, f"FindingRule.{name}")
            object.__setattr__(self, name, terms)
        _check_disjoint(self.present_if, self.absent_if, "FindingRule")


@dataclass(frozen=True)
class SiteRule:
    """Present when the anchor's site is in ``present_if``, absent when in ``absent_if``
    (ontology.SITES terms); other sites ("right lung", "pleura") do not decide it."""

    present_if: AbstractSet[str]
    absent_if: AbstractSet[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("present_if", "absent_if"):
            terms = _terms(getattr(self, name), ontology.SITES, f"SiteRule.{name}")
            object.__setattr__(self, name, terms)
        _check_disjoint(self.present_if, self.absent_if, "SiteRule")


@dataclass(frozen=True)
class SizeRule:
    """Present when the anchor's ``axis`` ("long" or "short") in millimetres lies within
    ``[min_mm, max_mm]`` (inclusive, either bound may be open), absent otherwise. A size in
    pixels only (no pixel spacing) or no size makes it not assessable."""

    min_mm: float | None = None
    max_mm: float | None = None
    axis: Axis = "long"

    def __post_init__(self) -> None:
        for name in ("min_mm", "max_mm"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"SizeRule.{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"SizeRule.{name} must be a finite number >= 0, got {value}")
        if self.min_mm is None and self.max_mm is None:
            raise ValueError("SizeRule needs min_mm, max_mm or both")
        if self.min_mm is not None and self.max_mm is not None and self.min_mm > self.max_mm:
            raise ValueError(f"SizeRule.min_mm {self.min_mm} is above max_mm {self.max_mm}")
        if self.axis not in _AXES:
            raise ValueError(f"SizeRule.axis {self.axis!r} is not one of {_AXES}")


@dataclass(frozen=True)
class StudyFindingRule:
    """Decided by whether the study reports any of ``findings``: ``when_found`` is the
    status when one is reported, the other of present/absent when none is. With
    ``include_anchor`` False only the study's other findings count ("solitary": no other
    nodule or mass)."""

    findings: AbstractSet[str]
    when_found: Literal["present", "absent"] = "present"
    include_anchor: bool = True

    def __post_init__(self) -> None:
        terms = _terms(self.findings, ontology.FINDINGS, "StudyFindingRule.findings")
        if not terms:
            raise ValueError("StudyFindingRule.findings must name at least one finding")
        object.__setattr__(self, "findings", terms)
        if self.when_found not in ("present", "absent"):
            raise ValueError(
                f"StudyFindingRule.when_found {self.when_found!r} is not 'present' or 'absent'"
            )
        if not isinstance(self.include_anchor, bool):
            raise TypeError("StudyFindingRule.include_anchor must be a bool")


@dataclass(frozen=True)
class NotAssessableRule:
    """A sign this node cannot assess from one radiograph; ``limitation`` says why."""

    limitation: Limitation

    def __post_init__(self) -> None:
        if self.limitation not in _LIMITATIONS:
            raise ValueError(
                f"NotAssessableRule.limitation {self.limitation!r} is not one of {_LIMITATIONS}"
            )


Rule: TypeAlias = (
    AttributeRule | FindingRule | SiteRule | SizeRule | StudyFindingRule | NotAssessableRule
)
_RULE_TYPES: Final = (
    AttributeRule,
    FindingRule,
    SiteRule,
    SizeRule,
    StudyFindingRule,
    NotAssessableRule,
)


# ----------------------------------------------------------------------------- signs, conditions


def _check_names(owner: str, en: str, zh: str, synonyms_zh: Iterable[str] = ()) -> None:
    for name, value in (("en", en), ("zh", zh)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{owner}.{name} must be a non-empty string, got {value!r}")
    if _HAN.search(en):
        raise ValueError(f"{owner}.en must be English, got {en!r}")
    if not _HAN.search(zh) or any(not _HAN.search(s) for s in synonyms_zh):
        raise ValueError(f"{owner}: zh names must be Chinese, got {zh!r}")


@dataclass(frozen=True)
class Sign:
    """One typical radiographic sign: ``key`` ("lung_cancer.spiculated_margin"), English and
    Chinese names, its code and the :data:`Rule` that checks it against an anchor."""

    key: str
    en: str
    zh: str
    code: Code
    rule: Rule

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not re.fullmatch(r"[a-z_]+\.[a-z0-9_]+", self.key):
            raise ValueError(f"Sign.key must look like 'condition.sign', got {self.key!r}")
        _check_names(f"Sign {self.key!r}", self.en, self.zh)
        if not isinstance(self.code, Code):
            raise TypeError(f"Sign {self.key!r}: code must be a pydicom Code")
        if not isinstance(self.rule, _RULE_TYPES):
            raise TypeError(f"Sign {self.key!r}: rule must be one of {_RULE_TYPES}")


@dataclass(frozen=True)
class Condition:
    """A condition whose typical chest radiograph signs are listed: English and Chinese
    names and synonyms (matched in questions by :func:`find_condition`), its code, signs."""

    key: str
    en: str
    zh: str
    code: Code | None
    signs: tuple[Sign, ...]
    synonyms_en: tuple[str, ...] = ()
    synonyms_zh: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not re.fullmatch(r"[a-z_]+", self.key):
            raise ValueError(f"Condition.key must be a lower-case term, got {self.key!r}")
        for name in ("signs", "synonyms_en", "synonyms_zh"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                raise TypeError(f"Condition {self.key!r}: {name} must be a tuple")
        _check_names(f"Condition {self.key!r}", self.en, self.zh, self.synonyms_zh)
        if any(not isinstance(s, str) or not s.strip() or _HAN.search(s) for s in self.synonyms_en):
            raise ValueError(f"Condition {self.key!r}: synonyms_en must be English")
        if self.code is not None and not isinstance(self.code, Code):
            raise TypeError(f"Condition {self.key!r}: code must be a pydicom Code or None")
        if not self.signs or any(not isinstance(s, Sign) for s in self.signs):
            raise ValueError(f"Condition {self.key!r}: signs must be a non-empty tuple of Sign")
        keys = [s.key for s in self.signs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"Condition {self.key!r}: duplicate sign keys")
        if any(not k.startswith(self.key + ".") for k in keys):
            raise ValueError(f"Condition {self.key!r}: sign keys must start with {self.key!r}.")

    @property
    def names_en(self) -> tuple[str, ...]:
        return (self.en, *self.synonyms_en)

    @property
    def names_zh(self) -> tuple[str, ...]:
        return (self.zh, *self.synonyms_zh)


# ----------------------------------------------------------------------------- the curated table

_UPPER: Final = frozenset(
    {"right_upper_zone", "left_upper_zone", "right_upper_lobe", "left_upper_lobe"}
)
_MIDDLE_LOWER: Final = frozenset({
    "right_middle_zone", "left_middle_zone", "right_lower_zone", "left_lower_zone",
    "right_middle_lobe", "lingula", "right_lower_lobe", "left_lower_lobe",
})  # fmt: skip
_BASAL: Final = frozenset({
    "right_lower_zone", "left_lower_zone", "right_lower_lobe", "left_lower_lobe",
    "right_costophrenic_angle", "left_costophrenic_angle",
    "right_hemidiaphragm", "left_hemidiaphragm",
})  # fmt: skip
#: Findings that are not a lung parenchymal opacity.
_NOT_PARENCHYMAL: Final = frozenset({
    "pneumothorax", "pleural_effusion", "cardiomegaly", "hilar_enlargement",
    "widened_mediastinum", "rib_fracture", "hyperinflation", "support_device",
})  # fmt: skip
_ALL_FINDINGS: Final = frozenset(ontology.FINDINGS)

_LUNG_CANCER: Final = Condition(
    "lung_cancer", "early lung cancer", "早期肺癌", c.CONDITION_LUNG_CANCER,
    synonyms_en=("lung cancer", "early-stage lung cancer", "early stage lung cancer",
                 "primary lung cancer", "lung carcinoma", "bronchogenic carcinoma",
                 "lung malignancy", "pulmonary malignancy", "malignant lung nodule",
                 "malignant pulmonary nodule", "lung adenocarcinoma"),
    synonyms_zh=("肺癌", "周围型肺癌", "原发性肺癌", "支气管肺癌", "肺恶性肿瘤", "肺部恶性肿瘤",
                 "恶性肺结节", "肺腺癌"),
    signs=(
        Sign("lung_cancer.nodule", "nodule (focal opacity up to 30 mm)",
             "结节影（30 mm以内的局灶性致密影）", c.FINDING_NODULE,
             FindingRule({"nodule"}, _ALL_FINDINGS - {"nodule", "other"})),
        Sign("lung_cancer.solitary", "solitary (no other nodule or mass)",
             "孤立性（无其他结节或肿块）", c.SIGN_SOLITARY,
             StudyFindingRule({"nodule", "mass"}, when_found="absent", include_anchor=False)),
        Sign("lung_cancer.size", "size 8-30 mm (long axis)", "大小8–30 mm（长径）",
             c.SIGN_NODULE_SIZE, SizeRule(min_mm=8.0, max_mm=30.0)),
        Sign("lung_cancer.spiculated_margin", "spiculated margin", "毛刺征",
             c.MARGIN_SPICULATED, AttributeRule("margin", {"spiculated"}, {"smooth"})),
        Sign("lung_cancer.lobulated_margin", "lobulated margin", "分叶征",
             c.MARGIN_LOBULATED, AttributeRule("margin", {"lobulated"}, {"smooth"})),
        Sign("lung_cancer.solid_component", "solid component (solid or part-solid density)",
             "含实性成分（实性或部分实性密度）", c.SIGN_SOLID_COMPONENT,
             AttributeRule("density", {"solid", "part_solid"}, {"ground_glass"})),
        Sign("lung_cancer.no_calcification",
             "no calcification (benign calcification argues against)",
             "无钙化（良性钙化不支持）", c.SIGN_NON_CALCIFIED,
             AttributeRule("density", {"solid", "part_solid", "ground_glass"}, {"calcified"})),
        Sign("lung_cancer.irregular_shape", "irregular shape", "形态不规则",
             c.SHAPE_IRREGULAR, AttributeRule("shape", {"irregular"}, {"round", "oval"})),
        Sign("lung_cancer.upper_location", "upper zone or upper lobe location",
             "位于上肺野或上叶", c.SIGN_UPPER_ZONE, SiteRule(_UPPER, _MIDDLE_LOWER)),
        Sign("lung_cancer.growth", "growth compared with a prior study", "与既往检查相比增大",
             c.SIGN_INTERVAL_GROWTH, NotAssessableRule("comparison")),
        Sign("lung_cancer.pleural_indentation", "pleural indentation (pleural tag)",
             "胸膜凹陷征", c.SIGN_PLEURAL_INDENTATION, NotAssessableRule("ct_feature")),
        Sign("lung_cancer.vacuole", "vacuole sign", "空泡征", c.SIGN_VACUOLE,
             NotAssessableRule("ct_feature")),
    ),
)  # fmt: skip

_PNEUMONIA: Final = Condition(
    "pneumonia", "pneumonia", "肺炎", c.CONDITION_PNEUMONIA,
    synonyms_en=("community-acquired pneumonia", "lobar pneumonia", "bronchopneumonia",
                 "lung infection", "chest infection", "pulmonary infection"),
    synonyms_zh=("肺部感染", "肺感染", "大叶性肺炎", "支气管肺炎", "社区获得性肺炎"),
    signs=(
        Sign("pneumonia.consolidation", "airspace consolidation or patchy opacity",
             "肺实变或斑片状影", c.FINDING_CONSOLIDATION,
             FindingRule({"consolidation", "ground_glass_opacity"},
                         _NOT_PARENCHYMAL | {"nodule", "mass", "calcification"})),
        Sign("pneumonia.ill_defined_margin", "ill-defined margin", "边缘模糊",
             c.MARGIN_ILL_DEFINED,
             AttributeRule("margin", {"ill_defined"}, {"smooth", "lobulated"})),
        Sign("pneumonia.air_bronchogram", "air bronchogram", "支气管充气征",
             c.SIGN_AIR_BRONCHOGRAM, NotAssessableRule("not_recorded")),
        Sign("pneumonia.silhouette_sign", "silhouette sign (loss of a heart or diaphragm border)",
             "轮廓征（心缘或膈面轮廓消失）", c.SIGN_SILHOUETTE, NotAssessableRule("not_recorded")),
        Sign("pneumonia.pleural_effusion", "parapneumonic pleural effusion", "类肺炎性胸腔积液",
             c.FINDING_PLEURAL_EFFUSION, StudyFindingRule({"pleural_effusion"})),
        Sign("pneumonia.resolution", "resolution on follow-up after treatment",
             "治疗后复查吸收", c.SIGN_RESOLUTION, NotAssessableRule("comparison")),
    ),
)  # fmt: skip

_TUBERCULOSIS: Final = Condition(
    "tuberculosis", "pulmonary tuberculosis", "肺结核", c.CONDITION_PULMONARY_TUBERCULOSIS,
    synonyms_en=("tuberculosis", "TB", "pulmonary TB"),
    synonyms_zh=("结核", "结核病", "继发性肺结核", "原发性肺结核"),
    signs=(
        Sign("tuberculosis.upper_location", "upper zone or apical location",
             "位于上肺野或肺尖", c.SIGN_UPPER_ZONE, SiteRule(_UPPER, _MIDDLE_LOWER)),
        Sign("tuberculosis.opacity", "patchy or nodular opacity", "斑片状或结节状影",
             c.SIGN_OPACITY,
             FindingRule({"consolidation", "ground_glass_opacity", "nodule"}, _NOT_PARENCHYMAL)),
        Sign("tuberculosis.cavitation", "cavitation", "空洞", c.SIGN_CAVITATION,
             NotAssessableRule("not_recorded")),
        Sign("tuberculosis.calcification", "calcification (healed foci)", "钙化灶（陈旧病灶）",
             c.FINDING_CALCIFICATION,
             AttributeRule("density", {"calcified"}, {"solid", "part_solid", "ground_glass"})),
        Sign("tuberculosis.pleural_effusion", "pleural effusion", "胸腔积液",
             c.FINDING_PLEURAL_EFFUSION, StudyFindingRule({"pleural_effusion"})),
        Sign("tuberculosis.hilar_enlargement", "hilar enlargement (lymphadenopathy)",
             "肺门增大（淋巴结肿大）", c.FINDING_HILAR_ENLARGEMENT,
             StudyFindingRule({"hilar_enlargement"})),
        Sign("tuberculosis.miliary_pattern", "miliary pattern", "粟粒样结节",
             c.SIGN_MILIARY_PATTERN, NotAssessableRule("not_recorded")),
        Sign("tuberculosis.satellite_lesions", "satellite lesions", "卫星灶",
             c.SIGN_SATELLITE_LESIONS, NotAssessableRule("not_recorded")),
    ),
)  # fmt: skip

_PNEUMOTHORAX: Final = Condition(
    "pneumothorax", "pneumothorax", "气胸", c.FINDING_PNEUMOTHORAX,
    synonyms_en=("tension pneumothorax", "spontaneous pneumothorax"),
    synonyms_zh=("张力性气胸", "自发性气胸"),
    signs=(
        Sign("pneumothorax.pleural_line", "visceral pleural line without lung markings beyond it",
             "可见脏层胸膜线，其外无肺纹理", c.FINDING_PNEUMOTHORAX,
             StudyFindingRule({"pneumothorax"})),
        Sign("pneumothorax.apical_location", "apical or upper zone location (erect film)",
             "位于肺尖或上肺野（立位片）", c.SIGN_UPPER_ZONE, SiteRule(_UPPER, _MIDDLE_LOWER)),
        Sign("pneumothorax.deep_sulcus", "deep sulcus sign (supine film)", "深沟征（仰卧位片）",
             c.SIGN_DEEP_SULCUS, NotAssessableRule("not_recorded")),
        Sign("pneumothorax.mediastinal_shift", "mediastinal shift to the other side (tension)",
             "纵隔向对侧移位（张力性）", c.SIGN_MEDIASTINAL_SHIFT,
             NotAssessableRule("not_recorded")),
    ),
)  # fmt: skip

_PLEURAL_EFFUSION: Final = Condition(
    "pleural_effusion", "pleural effusion", "胸腔积液", c.FINDING_PLEURAL_EFFUSION,
    synonyms_en=("hydrothorax", "pleural fluid"),
    synonyms_zh=("胸水", "胸膜腔积液"),
    signs=(
        Sign("pleural_effusion.effusion", "pleural fluid opacity", "胸腔积液影",
             c.FINDING_PLEURAL_EFFUSION, StudyFindingRule({"pleural_effusion"})),
        Sign("pleural_effusion.dependent_location",
             "dependent location (costophrenic angle, lung base)",
             "位于坠积部位（肋膈角、肺底）", c.SIGN_DEPENDENT_LOCATION, SiteRule(_BASAL, _UPPER)),
        Sign("pleural_effusion.meniscus", "meniscus sign (concave upper border)",
             "外高内低的弧形上缘（反抛物线征）", c.SIGN_MENISCUS,
             NotAssessableRule("not_recorded")),
        Sign("pleural_effusion.mediastinal_shift",
             "mediastinal shift away from a large effusion", "大量积液时纵隔向对侧移位",
             c.SIGN_MEDIASTINAL_SHIFT, NotAssessableRule("not_recorded")),
    ),
)  # fmt: skip

_HEART_FAILURE: Final = Condition(
    "heart_failure", "heart failure", "心力衰竭", c.CONDITION_HEART_FAILURE,
    synonyms_en=("congestive heart failure", "cardiac failure", "left heart failure",
                 "left ventricular failure", "CHF"),
    synonyms_zh=("心衰", "充血性心力衰竭", "左心衰竭", "左心衰"),
    signs=(
        Sign("heart_failure.cardiomegaly", "cardiomegaly", "心影增大",
             c.FINDING_CARDIOMEGALY, StudyFindingRule({"cardiomegaly"})),
        Sign("heart_failure.pleural_effusion", "pleural effusion", "胸腔积液",
             c.FINDING_PLEURAL_EFFUSION, StudyFindingRule({"pleural_effusion"})),
        Sign("heart_failure.hilar_congestion", "hilar enlargement (vascular congestion)",
             "肺门增大（肺淤血）", c.FINDING_HILAR_ENLARGEMENT,
             StudyFindingRule({"hilar_enlargement"})),
        Sign("heart_failure.upper_lobe_diversion", "upper lobe venous diversion",
             "上肺静脉扩张（血流再分布）", c.SIGN_UPPER_LOBE_DIVERSION,
             NotAssessableRule("not_recorded")),
        Sign("heart_failure.kerley_b_lines", "Kerley B lines", "克氏B线（间隔线）",
             c.SIGN_KERLEY_B_LINES, NotAssessableRule("not_recorded")),
        Sign("heart_failure.pulmonary_edema", "perihilar airspace edema (bat's wing)",
             "肺门周围肺泡性水肿（蝶翼征）", c.SIGN_PULMONARY_EDEMA,
             NotAssessableRule("not_recorded")),
    ),
)  # fmt: skip


def _table(items: Iterable[Condition]) -> Mapping[str, Condition]:
    table: dict[str, Condition] = {}
    for item in items:
        if item.key in table:
            raise ValueError(f"duplicate condition {item.key!r}")
        table[item.key] = item
    return MappingProxyType(table)


#: Condition key -> condition, in the order they are listed to users.
CONDITIONS: Final = _table(
    [_LUNG_CANCER, _PNEUMONIA, _TUBERCULOSIS, _PNEUMOTHORAX, _PLEURAL_EFFUSION, _HEART_FAILURE]
)


# ----------------------------------------------------------------------------- finding a condition


def _en_pattern(name: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in name.lower().replace("-", " ").split()]
    return re.compile(r"(?<![0-9a-z])" + r"[\s_-]+".join(words) + r"(?![0-9a-z])")


_SCAN: Final = tuple(
    (condition, name, None if _HAN.search(name) else _en_pattern(name))
    for condition in CONDITIONS.values()
    for name in (*condition.names_en, *condition.names_zh)
)


def _matches(question: str) -> list[tuple[int, int, Condition]]:
    """(start, end, condition) of every condition name in ``question``."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    lowered = question.lower()
    found: list[tuple[int, int, Condition]] = []
    for condition, name, pattern in _SCAN:
        if pattern is None:
            start = lowered.find(name)
            while start >= 0:
                found.append((start, start + len(name), condition))
                start = lowered.find(name, start + 1)
        else:
            found.extend((m.start(), m.end(), condition) for m in pattern.finditer(lowered))
    return found


def find_condition(question: str) -> Condition | None:
    """The condition named in ``question`` (English or Chinese, case-insensitive), or None.

    The longest name found wins ("early lung cancer" over "lung cancer", "张力性气胸" over
    "气胸"); between names of equal length, the earlier. English names match whole words
    only, so "lung" alone names no condition.
    """
    found = _matches(question)
    if not found:
        return None
    return min(found, key=lambda m: (-(m[1] - m[0]), m[0]))[2]


def find_conditions(question: str) -> tuple[Condition, ...]:
    """Every condition named in ``question``, in order of first mention (for asking which
    one is meant when a question names several)."""
    found = sorted(_matches(question), key=lambda m: (m[0], -(m[1] - m[0])))
    return tuple(dict.fromkeys(condition for _s, _e, condition in found))


# ----------------------------------------------------------------------------- facts and checklist


@dataclass(frozen=True)
class SignFacts:
    """What is stored about one anchor, in the pre-read vocabulary.

    ``finding``: an ontology.FINDINGS term; ``site``: an ontology.SITES term;
    ``attributes``: attribute -> value ("margin" -> "spiculated"), only those assessed;
    ``long_axis``/``short_axis``: the region's axes in ``units``, "mm" when the image has
    pixel spacing, "px" (image pixels) when it has none; ``other_findings``: the finding
    types of the study's other anchors (empty: the study reports no other finding).
    """

    finding: str | None
    site: str | None
    attributes: Mapping[str, str] = field(default_factory=dict)
    long_axis: float | None = None
    short_axis: float | None = None
    units: Units | None = None
    other_findings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.finding is not None:
            ontology.finding(self.finding)  # ValueError naming "finding"
        if self.site is not None:
            ontology.site(self.site)  # ValueError naming "site"
        if not isinstance(self.attributes, Mapping):
            raise TypeError(
                f"SignFacts.attributes must be a mapping, got {type(self.attributes).__name__}"
            )
        for attribute, value in self.attributes.items():
            ontology.attribute_value(attribute, value)  # ValueError naming the attribute
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))
        for name in ("long_axis", "short_axis"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"SignFacts.{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"SignFacts.{name} must be a finite number >= 0, got {value}")
        has_size = self.long_axis is not None or self.short_axis is not None
        if has_size and self.units not in _UNITS:
            raise ValueError(f"SignFacts.units must be one of {_UNITS} when a size is given")
        if not has_size and self.units is not None:
            raise ValueError("SignFacts.units is given without long_axis or short_axis")
        if isinstance(self.other_findings, str) or not isinstance(self.other_findings, Iterable):
            raise TypeError("SignFacts.other_findings must be a tuple of finding terms")
        others = tuple(self.other_findings)
        for term in others:
            ontology.finding(term)
        object.__setattr__(self, "other_findings", others)


@dataclass(frozen=True)
class Evidence:
    """The fact that decided a sign, in vocabulary terms (rendered in EN or ZH later).

    ``fact`` says which fact was read; ``value`` is its term (finding, site or attribute
    value; None when missing); ``attribute`` names the attribute; ``found`` lists the
    study's findings that matched a :class:`StudyFindingRule`; ``measured``/``units`` the
    size read; ``gap`` why the sign is not assessable (None when it was decided).
    """

    fact: Fact
    value: str | None = None
    attribute: str | None = None
    found: tuple[str, ...] = ()
    measured: float | None = None
    units: Units | None = None
    gap: Gap | None = None

    def __post_init__(self) -> None:
        if self.fact not in _FACTS:
            raise ValueError(f"Evidence.fact {self.fact!r} is not one of {_FACTS}")
        if self.gap is not None and self.gap not in _GAPS:
            raise ValueError(f"Evidence.gap {self.gap!r} is not one of {_GAPS}")
        if (self.fact == "attribute") != (self.attribute is not None):
            raise ValueError("Evidence.attribute is set for attribute facts, and only then")


@dataclass(frozen=True)
class ChecklistItem:
    """One sign, its status for the anchor, and the evidence for it."""

    sign: Sign
    status: SignStatus
    evidence: Evidence

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"ChecklistItem.status {self.status!r} is not one of {_STATUSES}")
        if (self.status == "not_assessable") != (self.evidence.gap is not None):
            raise ValueError(
                "ChecklistItem: a sign is not assessable exactly when evidence.gap is set"
            )


@dataclass(frozen=True)
class SignCounts:
    present: int
    absent: int
    not_assessable: int
    total: int


@dataclass(frozen=True)
class Checklist:
    """The signs of ``condition`` checked against one anchor's facts, in the table's order."""

    condition: Condition
    facts: SignFacts
    items: tuple[ChecklistItem, ...]

    def __post_init__(self) -> None:
        if [i.sign for i in self.items] != list(self.condition.signs):
            raise ValueError("Checklist.items must be the condition's signs, in order")

    @property
    def counts(self) -> SignCounts:
        statuses = [item.status for item in self.items]
        return SignCounts(
            present=statuses.count("present"),
            absent=statuses.count("absent"),
            not_assessable=statuses.count("not_assessable"),
            total=len(statuses),
        )


def _by_term(
    rule: AttributeRule | FindingRule | SiteRule,
    fact: Literal["attribute", "finding", "site"],
    value: str | None,
    attribute: str | None = None,
) -> tuple[SignStatus, Evidence]:
    if value is None:
        return "not_assessable", Evidence(fact, None, attribute, gap="missing")
    if value in rule.present_if:
        return "present", Evidence(fact, value, attribute)
    if value in rule.absent_if:
        return "absent", Evidence(fact, value, attribute)
    return "not_assessable", Evidence(fact, value, attribute, gap="undecided")


def _check(rule: Rule, facts: SignFacts) -> tuple[SignStatus, Evidence]:
    if isinstance(rule, AttributeRule):
        value = facts.attributes.get(rule.attribute)
        return _by_term(rule, "attribute", value, rule.attribute)
    if isinstance(rule, FindingRule):
        return _by_term(rule, "finding", facts.finding)
    if isinstance(rule, SiteRule):
        return _by_term(rule, "site", facts.site)
    if isinstance(rule, SizeRule):
        size = facts.long_axis if rule.axis == "long" else facts.short_axis
        if size is None:
            return "not_assessable", Evidence("size", gap="missing")
        if facts.units != "mm":
            return "not_assessable", Evidence("size", measured=size, units="px", gap="pixels_only")
        inside = (rule.min_mm is None or size >= rule.min_mm) and (
            rule.max_mm is None or size <= rule.max_mm
        )
        return ("present" if inside else "absent"), Evidence("size", measured=size, units="mm")
    if isinstance(rule, StudyFindingRule):
        pool = (facts.finding,) if rule.include_anchor and facts.finding else ()
        found = tuple(
            dict.fromkeys(t for t in (*pool, *facts.other_findings) if t in rule.findings)
        )
        otherwise: SignStatus = "absent" if rule.when_found == "present" else "present"
        return (rule.when_found if found else otherwise), Evidence("study_findings", found=found)
    return "not_assessable", Evidence("limitation", gap=rule.limitation)


def evaluate(condition: Condition, facts: SignFacts) -> Checklist:
    """Every sign of ``condition`` checked against ``facts``: present, absent or not
    assessable, with the deciding fact. Reads only the facts; never guesses a missing one."""
    if not isinstance(condition, Condition):
        raise TypeError(f"condition must be a Condition, got {type(condition).__name__}")
    if not isinstance(facts, SignFacts):
        raise TypeError(f"facts must be SignFacts, got {type(facts).__name__}")
    items = tuple(ChecklistItem(sign, *_check(sign.rule, facts)) for sign in condition.signs)
    return Checklist(condition, facts, items)


# ----------------------------------------------------------------------------- rendering

_STATUS_WORDS: Final[Mapping[Language, Mapping[SignStatus, str]]] = MappingProxyType({
    "en": {"present": "present", "absent": "absent", "not_assessable": "not assessable"},
    "zh": {"present": "符合", "absent": "不符合", "not_assessable": "无法评估"},
})  # fmt: skip
_AXIS_WORDS: Final[Mapping[Language, Mapping[Axis, str]]] = MappingProxyType({
    "en": {"long": "long axis", "short": "short axis"},
    "zh": {"long": "长径", "short": "短径"},
})  # fmt: skip
_LIMITATION_TEXT: Final[Mapping[Language, Mapping[Limitation, str]]] = MappingProxyType({
    "en": {
        "comparison": "needs comparison with another study (prior or follow-up); "
        "only the current study was read",
        "ct_feature": "usually assessed on CT; not recorded from a radiograph by this node",
        "not_recorded": "not recorded by this node's pre-read",
    },
    "zh": {
        "comparison": "需要与其他检查（既往或复查）对比，当前只读取了本次检查",
        "ct_feature": "通常需CT评估，本节点不从X线片记录此征象",
        "not_recorded": "本节点的预读不记录此征象",
    },
})  # fmt: skip
#: The statement every checklist ends with (EN uses the SR's own words, codes.AI_STATEMENT).
NOTICE: Final[Mapping[Language, str]] = MappingProxyType({
    "en": "These are typical radiographic signs, not diagnostic criteria: a sign present "
    "does not confirm the condition and a sign absent does not exclude it. "
    f"{c.AI_STATEMENT}.",
    "zh": "以上为典型X线表现，并非诊断标准：符合某条不能确诊，不符合也不能排除。"
    "本结果由人工智能生成，为初步结果，不是诊断。",
})  # fmt: skip


def _name(term: str, kind: Literal["finding", "site"], language: Language) -> str:
    concept = ontology.finding(term) if kind == "finding" else ontology.site(term)
    return concept.en if language == "en" else concept.zh


def _join(names: Iterable[str], language: Language, conjunction: Literal["and", "or"]) -> str:
    """ "a, b or c" / "a、b或c"."""
    *head, last = names
    if not head:
        return last
    if language == "zh":
        return "、".join(head) + ("或" if conjunction == "or" else "和") + last
    return ", ".join(head) + f" {conjunction} " + last


def _number(value: float, units: Units) -> str:
    return f"{value:.1f} mm" if units == "mm" else f"{value:.0f} px"


def _range(rule: SizeRule) -> str:
    if rule.min_mm is not None and rule.max_mm is not None:
        return f"{rule.min_mm:g}–{rule.max_mm:g} mm"
    if rule.min_mm is not None:
        return f"≥ {rule.min_mm:g} mm"
    return f"≤ {rule.max_mm:g} mm"


def _evidence_text(item: ChecklistItem, language: Language) -> str:
    ev, rule, en = item.evidence, item.sign.rule, language == "en"
    if ev.fact == "limitation":
        assert isinstance(rule, NotAssessableRule)
        return _LIMITATION_TEXT[language][rule.limitation]
    if ev.fact == "size":
        assert isinstance(rule, SizeRule)
        axis = _AXIS_WORDS[language][rule.axis]
        if ev.gap == "missing":
            return f"no {axis} measured" if en else f"未测量{axis}"
        assert ev.measured is not None and ev.units is not None
        if ev.gap == "pixels_only":
            if en:
                return (
                    f"{axis} {_number(ev.measured, 'px')} only: the image has no pixel "
                    "spacing, so the size in mm is unknown"
                )
            return f"{axis}仅有 {_number(ev.measured, 'px')}：图像无像素间距，无法换算为毫米"
        measured = _number(ev.measured, ev.units)
        if en:
            return f"{axis} {measured}; this sign: {_range(rule)}"
        return f"{axis} {measured}，本条范围 {_range(rule)}"
    if ev.fact == "study_findings":
        assert isinstance(rule, StudyFindingRule)
        others = not rule.include_anchor
        if ev.found:
            names = _join((_name(t, "finding", language) for t in ev.found), language, "and")
            if en:
                lead = (
                    "other findings of this study include" if others else "reported in this study"
                )
                return f"{lead}: {names}"
            return f"{'本次检查的其他所见包括' if others else '本次检查所见包括'}：{names}"
        wanted = sorted(rule.findings, key=list(ontology.FINDINGS).index)
        names = _join((_name(t, "finding", language) for t in wanted), language, "or")
        if en:
            return f"no {names} among the {'other ' if others else ''}findings of this study"
        return f"本次检查的{'其他' if others else ''}所见中无{names}"
    # finding, site, attribute
    if ev.fact == "attribute":
        assert ev.attribute is not None
        label_concept = ontology.ATTRIBUTE_NAMES[ev.attribute]
        label = label_concept.en if en else label_concept.zh
        value = None
        if ev.value is not None:
            concept = ontology.attribute_value(ev.attribute, ev.value)
            value = concept.en if en else concept.zh
    else:
        kind: Literal["finding", "site"] = "finding" if ev.fact == "finding" else "site"
        label = {"finding": ("finding", "病灶类型"), "site": ("site", "部位")}[kind][0 if en else 1]
        value = _name(ev.value, kind, language) if ev.value is not None else None
    if value is None:
        return f"{label} not recorded for this finding" if en else f"该病灶未记录{label}"
    if ev.gap == "undecided":
        return (
            f"{label}: {value}, which does not decide this sign"
            if en
            else (f"{label}：{value}，不能据此判断")
        )
    return f"{label}: {value}" if en else f"{label}：{value}"


def render_checklist(checklist: Checklist, language: Language) -> str:
    """The checklist as an answer in ``language`` ("en" or "zh"): a heading, one numbered
    line per sign (name, status, evidence), the counts and the not-a-diagnosis notice.

    Every word comes from this table and the ontology; every number from the facts.
    """
    if not isinstance(checklist, Checklist):
        raise TypeError(f"checklist must be a Checklist, got {type(checklist).__name__}")
    if language not in _LANGUAGES:
        raise ValueError(f"language {language!r} is not one of {_LANGUAGES}")
    en = language == "en"
    condition, counts = checklist.condition, checklist.counts
    if en:
        lines = [f"Typical chest X-ray signs of {condition.en}, checked against this finding:"]
    else:
        lines = [f"{condition.zh}的典型X线表现，逐条对照该病灶："]
    for number, item in enumerate(checklist.items, start=1):
        name = item.sign.en if en else item.sign.zh
        status = _STATUS_WORDS[language][item.status]
        evidence = _evidence_text(item, language)
        lines.append(f"{number}. {name}: {status} — {evidence}" if en else (
            f"{number}. {name}：{status} —— {evidence}"
        ))  # fmt: skip
    if en:
        lines.append(
            f"{counts.present} of {counts.total} signs present, {counts.absent} absent, "
            f"{counts.not_assessable} not assessable."
        )
    else:
        lines.append(
            f"共 {counts.total} 条：符合 {counts.present} 条，不符合 {counts.absent} 条，"
            f"无法评估 {counts.not_assessable} 条。"
        )
    lines.append(NOTICE[language])
    return "\n".join(lines)
