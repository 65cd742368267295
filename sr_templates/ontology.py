"""The chest radiograph sign ontology: the structured-output vocabulary, its codes, and its
English and Chinese terms.

This module is the one definition of the vocabulary. The keys of :data:`FINDINGS`,
:data:`SITES`, :data:`LANDMARKS`, :data:`ATTRIBUTES` and :data:`LATERALITY_TERMS` are the
terms the pre-read prompt offers (:mod:`workers.prompts` lists them in this order), and
their English and Chinese synonyms are what the answer parser and the follow-up matcher
understand; the codes come from :mod:`sr_templates.codes`.

Sites carry their own laterality (``right_middle_lobe`` is "Middle lobe of right lung" +
Right): the SR writes the anatomy code with a Laterality modifier (TID 1410 Finding Site,
CID 244), the DICOM way, rather than one code per side.

Lookups by English or Chinese term serve follow-up questions: :func:`lookup` resolves a
whole term ("结节" -> nodule, "右肺中叶" -> right middle lobe, "RML" -> right middle lobe)
and :func:`find_terms` finds every term mentioned in a sentence ("右肺中叶那个圆形影" ->
right middle lobe, round).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

from pydicom.sr.coding import Code

from sr_templates import codes as c
from sr_templates.model import Laterality

__all__ = [
    "ANSWER_LANGUAGES",
    "ATTRIBUTES",
    "ATTRIBUTE_NAMES",
    "FINDINGS",
    "LANDMARKS",
    "LATERALITIES",
    "LATERALITY_TERMS",
    "SITES",
    "AnswerLanguage",
    "ChestConcept",
    "ConceptKind",
    "Side",
    "TermMatch",
    "all_concepts",
    "answer_language",
    "attribute_value",
    "find_terms",
    "finding",
    "landmark",
    "laterality",
    "lookup",
    "site",
]

ConceptKind = Literal["finding", "site", "landmark", "attribute", "attribute_value", "laterality"]
Side = Laterality  # one definition: sr_templates.model

_KINDS: Final = ("finding", "site", "landmark", "attribute", "attribute_value", "laterality")
_SIDES: Final[tuple[Side, ...]] = ("right", "left", "bilateral", "none")
_SIDE_CODES: Final[dict[str, Code]] = {
    "right": c.LATERALITY_RIGHT,
    "left": c.LATERALITY_LEFT,
    "bilateral": c.LATERALITY_BILATERAL,
}
_HAN: Final = re.compile(r"[\u3400-\u9fff]")


@dataclass(frozen=True)
class ChestConcept:
    """One vocabulary term with its code and its English and Chinese terms.

    ``term`` is the vocabulary term the prompt offers ("right_middle_lobe"); ``en``/``zh``
    are the preferred English and Simplified Chinese terms; synonyms are matched by the
    lookups too. ``side`` is the concept's own laterality (sites and landmarks), written as
    a Laterality modifier. ``attribute`` names the attribute of an attribute value
    ("margin", "density", "shape"). ``category`` is the SEG Segmented Property Category
    (CID 7150) of a finding.
    """

    term: str
    kind: ConceptKind
    code: Code
    en: str
    zh: str
    side: Side = "none"
    attribute: str | None = None
    synonyms_en: tuple[str, ...] = ()
    synonyms_zh: tuple[str, ...] = ()
    category: Code | None = None

    def __post_init__(self) -> None:
        for name in ("term", "en", "zh"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"ChestConcept.{name} must be a non-empty string, got {value!r}")
        if self.kind not in _KINDS:
            raise ValueError(f"ChestConcept.kind {self.kind!r} is not one of {_KINDS}")
        if not isinstance(self.code, Code):
            raise TypeError(f"ChestConcept.code must be a pydicom Code, got {type(self.code)}")
        if self.side not in _SIDES:
            raise ValueError(f"ChestConcept.side {self.side!r} is not one of {_SIDES}")
        if (self.kind == "attribute_value") != (self.attribute is not None):
            raise ValueError("ChestConcept.attribute is set for attribute values, and only then")
        if not _HAN.search(self.zh) or any(not _HAN.search(s) for s in self.synonyms_zh):
            raise ValueError(f"ChestConcept {self.term!r}: zh terms must be Chinese")
        if self.kind == "finding" and self.category is None:
            raise ValueError(f"ChestConcept {self.term!r}: a finding needs a SEG category")

    @property
    def laterality_code(self) -> Code | None:
        """The CID 244 code of ``side``, or None when the concept has no side."""
        return _SIDE_CODES.get(self.side)

    @property
    def names_en(self) -> tuple[str, ...]:
        return (self.en, *self.synonyms_en)

    @property
    def names_zh(self) -> tuple[str, ...]:
        return (self.zh, *self.synonyms_zh)


def _table(items: Iterable[ChestConcept]) -> Mapping[str, ChestConcept]:
    table: dict[str, ChestConcept] = {}
    for item in items:
        if item.term in table:
            raise ValueError(f"duplicate vocabulary term {item.term!r}")
        table[item.term] = item
    return MappingProxyType(table)


_ABNORMAL = c.CATEGORY_MORPHOLOGICALLY_ABNORMAL


def _f(term: str, code: Code, en: str, zh: str, *, en_syn: tuple[str, ...] = (),
       zh_syn: tuple[str, ...] = (), category: Code = _ABNORMAL) -> ChestConcept:  # fmt: skip
    return ChestConcept(term, "finding", code, en, zh, synonyms_en=en_syn, synonyms_zh=zh_syn,
                        category=category)  # fmt: skip


def _s(term: str, code: Code, en: str, zh: str, side: Side = "none", *,
       en_syn: tuple[str, ...] = (), zh_syn: tuple[str, ...] = (),
       kind: ConceptKind = "site") -> ChestConcept:  # fmt: skip
    return ChestConcept(term, kind, code, en, zh, side=side, synonyms_en=en_syn,
                        synonyms_zh=zh_syn)  # fmt: skip


#: FINDING_TYPES -> concept.
FINDINGS: Final = _table([
    _f("nodule", c.FINDING_NODULE, "nodule", "结节",
       en_syn=("pulmonary nodule", "lung nodule", "nodular opacity"), zh_syn=("肺结节", "小结节")),
    _f("mass", c.FINDING_MASS, "mass", "肿块", en_syn=("lung mass", "pulmonary mass"),
       zh_syn=("团块", "肿物", "占位", "占位性病变")),
    _f("consolidation", c.FINDING_CONSOLIDATION, "consolidation", "实变",
       en_syn=("airspace consolidation", "airspace opacity", "air space opacity",
               "airspace disease", "infiltrate"),
       zh_syn=("实变影", "肺实变", "渗出影", "浸润影", "斑片影")),
    _f("ground_glass_opacity", c.FINDING_GROUND_GLASS_OPACITY, "ground-glass opacity",
       "磨玻璃影", en_syn=("ground glass opacity", "GGO", "hazy opacity"),
       zh_syn=("磨玻璃密度影", "毛玻璃影", "模糊影")),
    _f("reticular_opacity", c.FINDING_RETICULAR_OPACITY, "reticular opacity", "网状影",
       en_syn=("reticular pattern", "reticulation", "interstitial opacity",
               "interstitial pattern"),
       zh_syn=("网格影", "网状阴影", "间质性改变")),
    _f("atelectasis", c.FINDING_ATELECTASIS, "atelectasis", "肺不张",
       en_syn=("collapse",), zh_syn=("不张", "肺膨胀不全")),
    _f("pleural_effusion", c.FINDING_PLEURAL_EFFUSION, "pleural effusion", "胸腔积液",
       en_syn=("effusion", "pleural fluid"), zh_syn=("胸水", "积液")),
    _f("pneumothorax", c.FINDING_PNEUMOTHORAX, "pneumothorax", "气胸", en_syn=("PTX",)),
    _f("cardiomegaly", c.FINDING_CARDIOMEGALY, "cardiomegaly", "心影增大",
       en_syn=("enlarged heart", "enlarged cardiac silhouette", "cardiac enlargement"),
       zh_syn=("心脏增大", "心脏扩大", "心影扩大")),
    _f("hilar_enlargement", c.FINDING_HILAR_ENLARGEMENT, "hilar enlargement", "肺门增大",
       en_syn=("enlarged hilum", "hilar prominence"), zh_syn=("肺门影增大", "肺门增浓")),
    _f("widened_mediastinum", c.FINDING_WIDENED_MEDIASTINUM, "widened mediastinum", "纵隔增宽",
       en_syn=("mediastinal widening",), zh_syn=("纵隔影增宽",)),
    _f("rib_fracture", c.FINDING_RIB_FRACTURE, "rib fracture", "肋骨骨折",
       en_syn=("fractured rib", "fracture of rib")),
    _f("calcification", c.FINDING_CALCIFICATION, "calcification", "钙化",
       en_syn=("calcified lesion",), zh_syn=("钙化灶", "钙化影")),
    _f("hyperinflation", c.FINDING_HYPERINFLATION, "hyperinflation", "肺过度充气",
       en_syn=("emphysema", "hyperexpansion", "overinflation"),
       zh_syn=("过度充气", "肺气肿", "肺过度膨胀")),
    _f("support_device", c.FINDING_SUPPORT_DEVICE, "support device", "支持装置",
       en_syn=("lines and tubes", "catheter", "endotracheal tube", "chest tube",
               "central line", "nasogastric tube", "pacemaker"),
       zh_syn=("置管", "导管", "气管插管", "胸腔引流管", "中心静脉导管", "胃管", "起搏器"),
       category=c.CATEGORY_PHYSICAL_OBJECT),
    _f("other", c.FINDING_OTHER, "other finding", "其他所见", zh_syn=("其他异常",)),
])  # fmt: skip

#: SITES -> concept (anatomy + the site's own laterality).
SITES: Final = _table([
    _s("right_upper_zone", c.SITE_UPPER_ZONE_OF_LUNG, "right upper zone", "右上肺野", "right",
       en_syn=("right upper lung zone", "RUZ"), zh_syn=("右肺上野", "右上野", "右上肺")),
    _s("right_middle_zone", c.SITE_MIDDLE_ZONE_OF_LUNG, "right middle zone", "右中肺野", "right",
       en_syn=("right mid zone", "right middle lung zone", "RMZ"),
       zh_syn=("右肺中野", "右中野", "右中肺")),
    _s("right_lower_zone", c.SITE_LOWER_ZONE_OF_LUNG, "right lower zone", "右下肺野", "right",
       en_syn=("right lower lung zone", "RLZ"), zh_syn=("右肺下野", "右下野", "右下肺")),
    _s("left_upper_zone", c.SITE_UPPER_ZONE_OF_LUNG, "left upper zone", "左上肺野", "left",
       en_syn=("left upper lung zone", "LUZ"), zh_syn=("左肺上野", "左上野", "左上肺")),
    _s("left_middle_zone", c.SITE_MIDDLE_ZONE_OF_LUNG, "left middle zone", "左中肺野", "left",
       en_syn=("left mid zone", "left middle lung zone", "LMZ"),
       zh_syn=("左肺中野", "左中野", "左中肺")),
    _s("left_lower_zone", c.SITE_LOWER_ZONE_OF_LUNG, "left lower zone", "左下肺野", "left",
       en_syn=("left lower lung zone", "LLZ"), zh_syn=("左肺下野", "左下野", "左下肺")),
    _s("right_upper_lobe", c.SITE_UPPER_LOBE_OF_LUNG, "right upper lobe", "右肺上叶", "right",
       en_syn=("RUL",), zh_syn=("右上叶",)),
    _s("right_middle_lobe", c.SITE_MIDDLE_LOBE_OF_RIGHT_LUNG, "right middle lobe", "右肺中叶",
       "right", en_syn=("RML", "middle lobe"), zh_syn=("右中叶",)),
    _s("right_lower_lobe", c.SITE_LOWER_LOBE_OF_LUNG, "right lower lobe", "右肺下叶", "right",
       en_syn=("RLL",), zh_syn=("右下叶",)),
    _s("left_upper_lobe", c.SITE_UPPER_LOBE_OF_LUNG, "left upper lobe", "左肺上叶", "left",
       en_syn=("LUL",), zh_syn=("左上叶",)),
    _s("lingula", c.SITE_LINGULA, "lingula", "左肺舌段", "left",
       en_syn=("lingular segment",), zh_syn=("舌段", "舌叶")),
    _s("left_lower_lobe", c.SITE_LOWER_LOBE_OF_LUNG, "left lower lobe", "左肺下叶", "left",
       en_syn=("LLL",), zh_syn=("左下叶",)),
    _s("right_lung", c.SITE_LUNG, "right lung", "右肺", "right"),
    _s("left_lung", c.SITE_LUNG, "left lung", "左肺", "left"),
    _s("both_lungs", c.SITE_LUNG, "both lungs", "双肺", "bilateral",
       en_syn=("bilateral lungs",), zh_syn=("两肺", "双侧肺")),
    _s("right_hilum", c.SITE_HILUM_OF_LUNG, "right hilum", "右肺门", "right",
       en_syn=("right hilar region",)),
    _s("left_hilum", c.SITE_HILUM_OF_LUNG, "left hilum", "左肺门", "left",
       en_syn=("left hilar region",)),
    _s("mediastinum", c.SITE_MEDIASTINUM, "mediastinum", "纵隔"),
    _s("trachea", c.SITE_TRACHEA, "trachea", "气管"),
    _s("heart", c.SITE_HEART, "heart", "心脏", en_syn=("cardiac silhouette",), zh_syn=("心影",)),
    _s("right_pleura", c.SITE_PLEURA, "right pleura", "右侧胸膜", "right",
       en_syn=("right pleural space",), zh_syn=("右胸膜", "右侧胸腔")),
    _s("left_pleura", c.SITE_PLEURA, "left pleura", "左侧胸膜", "left",
       en_syn=("left pleural space",), zh_syn=("左胸膜", "左侧胸腔")),
    _s("right_costophrenic_angle", c.SITE_COSTOPHRENIC_ANGLE, "right costophrenic angle",
       "右肋膈角", "right", en_syn=("right CP angle",)),
    _s("left_costophrenic_angle", c.SITE_COSTOPHRENIC_ANGLE, "left costophrenic angle",
       "左肋膈角", "left", en_syn=("left CP angle",)),
    _s("right_hemidiaphragm", c.SITE_DIAPHRAGM, "right hemidiaphragm", "右侧膈肌", "right",
       en_syn=("right diaphragm",), zh_syn=("右膈", "右半膈", "右膈面")),
    _s("left_hemidiaphragm", c.SITE_DIAPHRAGM, "left hemidiaphragm", "左侧膈肌", "left",
       en_syn=("left diaphragm",), zh_syn=("左膈", "左半膈", "左膈面")),
    _s("right_ribs", c.SITE_RIB, "right ribs", "右侧肋骨", "right",
       en_syn=("right rib",), zh_syn=("右肋骨", "右肋")),
    _s("left_ribs", c.SITE_RIB, "left ribs", "左侧肋骨", "left",
       en_syn=("left rib",), zh_syn=("左肋骨", "左肋")),
    _s("right_clavicle", c.SITE_CLAVICLE, "right clavicle", "右锁骨", "right"),
    _s("left_clavicle", c.SITE_CLAVICLE, "left clavicle", "左锁骨", "left"),
    _s("spine", c.SITE_SPINE, "spine", "脊柱", en_syn=("thoracic spine",), zh_syn=("胸椎",)),
    _s("upper_abdomen", c.SITE_UPPER_ABDOMEN, "upper abdomen", "上腹部"),
])  # fmt: skip

#: LANDMARKS -> concept (reference structures the model boxes; not findings).
LANDMARKS: Final = _table([
    _s("right_hilum", c.SITE_HILUM_OF_LUNG, "right hilum", "右肺门", "right", kind="landmark"),
    _s("left_hilum", c.SITE_HILUM_OF_LUNG, "left hilum", "左肺门", "left", kind="landmark"),
    _s("carina", c.SITE_CARINA, "carina", "气管隆突", en_syn=("tracheal carina",),
       zh_syn=("隆突", "隆嵴"), kind="landmark"),
    _s("right_costophrenic_angle", c.SITE_COSTOPHRENIC_ANGLE, "right costophrenic angle",
       "右肋膈角", "right", kind="landmark"),
    _s("left_costophrenic_angle", c.SITE_COSTOPHRENIC_ANGLE, "left costophrenic angle",
       "左肋膈角", "left", kind="landmark"),
    _s("right_lung_apex", c.SITE_APEX_OF_LUNG, "right lung apex", "右肺尖", "right",
       en_syn=("right apex",), kind="landmark"),
    _s("left_lung_apex", c.SITE_APEX_OF_LUNG, "left lung apex", "左肺尖", "left",
       en_syn=("left apex",), kind="landmark"),
    _s("right_heart_border", c.SITE_HEART_BORDER, "right heart border", "右心缘", "right",
       en_syn=("right cardiac border",), kind="landmark"),
    _s("left_heart_border", c.SITE_HEART_BORDER, "left heart border", "左心缘", "left",
       en_syn=("left cardiac border",), kind="landmark"),
])  # fmt: skip

#: Attribute names of ATTRIBUTE_VALUES -> concept (the qualitative evaluation's name).
ATTRIBUTE_NAMES: Final = _table([
    ChestConcept("margin", "attribute", c.ATTRIBUTE_MARGIN, "margin", "边缘",
                 synonyms_en=("margins", "border", "edge"), synonyms_zh=("边界",)),
    ChestConcept("density", "attribute", c.ATTRIBUTE_DENSITY, "density", "密度",
                 synonyms_en=("attenuation",)),
    ChestConcept("shape", "attribute", c.ATTRIBUTE_SHAPE, "shape", "形态",
                 synonyms_en=("morphology",), synonyms_zh=("形状",)),
])  # fmt: skip


def _v(attribute: str, term: str, code: Code, en: str, zh: str, *,
       en_syn: tuple[str, ...] = (), zh_syn: tuple[str, ...] = ()) -> ChestConcept:  # fmt: skip
    return ChestConcept(term, "attribute_value", code, en, zh, attribute=attribute,
                        synonyms_en=en_syn, synonyms_zh=zh_syn)  # fmt: skip


#: ATTRIBUTE_VALUES: attribute -> value term -> concept.
ATTRIBUTES: Final[Mapping[str, Mapping[str, ChestConcept]]] = MappingProxyType({
    "margin": _table([
        _v("margin", "smooth", c.MARGIN_SMOOTH, "smooth", "光滑",
           en_syn=("smooth margin", "well defined", "well circumscribed", "circumscribed",
                   "sharp", "regular"),
           zh_syn=("边缘光滑", "清晰", "边缘清晰")),
        _v("margin", "lobulated", c.MARGIN_LOBULATED, "lobulated", "分叶",
           en_syn=("lobulated margin", "lobular"), zh_syn=("分叶状", "分叶征")),
        _v("margin", "spiculated", c.MARGIN_SPICULATED, "spiculated", "毛刺",
           en_syn=("spiculated margin", "spiculation"), zh_syn=("毛刺征", "毛刺状")),
        _v("margin", "ill_defined", c.MARGIN_ILL_DEFINED, "ill-defined", "边界不清",
           en_syn=("poorly defined", "indistinct", "ill defined", "blurred"),
           zh_syn=("边缘模糊", "边界模糊", "模糊")),
    ]),
    "density": _table([
        _v("density", "solid", c.DENSITY_SOLID, "solid", "实性",
           en_syn=("soft tissue", "soft tissue density")),
        _v("density", "part_solid", c.DENSITY_PART_SOLID, "part-solid", "部分实性",
           en_syn=("subsolid", "mixed density", "mixed"), zh_syn=("混杂密度", "混合密度", "混杂")),
        _v("density", "ground_glass", c.DENSITY_GROUND_GLASS, "ground-glass", "磨玻璃",
           en_syn=("ground glass", "non-solid", "GGO"), zh_syn=("磨玻璃密度", "毛玻璃")),
        _v("density", "calcified", c.DENSITY_CALCIFIED, "calcified", "钙化密度",
           en_syn=("calcific", "calcification"), zh_syn=("钙化性", "钙化")),
    ]),
    "shape": _table([
        _v("shape", "round", c.SHAPE_ROUND, "round", "圆形",
           en_syn=("rounded", "circular", "spherical"), zh_syn=("类圆形",)),
        _v("shape", "oval", c.SHAPE_OVAL, "oval", "椭圆形", en_syn=("ovoid", "elliptical"),
           zh_syn=("卵圆形", "椭圆")),
        _v("shape", "irregular", c.SHAPE_IRREGULAR, "irregular", "不规则",
           en_syn=("irregular shape",), zh_syn=("不规则形",)),
    ]),
})  # fmt: skip

#: LATERALITIES -> concept ("none" has no code: nothing is written).
LATERALITIES: Final = _table([
    ChestConcept("right", "laterality", c.LATERALITY_RIGHT, "right", "右侧", side="right",
                 synonyms_zh=("右",)),
    ChestConcept("left", "laterality", c.LATERALITY_LEFT, "left", "左侧", side="left",
                 synonyms_zh=("左",)),
    ChestConcept("bilateral", "laterality", c.LATERALITY_BILATERAL, "bilateral", "双侧",
                 side="bilateral", synonyms_en=("both",), synonyms_zh=("两侧", "双")),
])  # fmt: skip

#: Every laterality term the prompt offers, in its order: the sides and "none".
LATERALITY_TERMS: Final[tuple[Side, ...]] = _SIDES


def all_concepts() -> tuple[ChestConcept, ...]:
    """Every concept, in lookup priority order: findings, sites, landmarks, attributes,
    attribute values, lateralities."""
    values = [v for table in ATTRIBUTES.values() for v in table.values()]
    return (
        *FINDINGS.values(),
        *SITES.values(),
        *LANDMARKS.values(),
        *ATTRIBUTE_NAMES.values(),
        *values,
        *LATERALITIES.values(),
    )


# ----------------------------------------------------------------------------- lookups by term


def _get(table: Mapping[str, ChestConcept], term: str, what: str) -> ChestConcept:
    if not isinstance(term, str):
        raise TypeError(f"{what} must be a str, got {type(term).__name__}")
    try:
        return table[term]
    except KeyError:
        raise ValueError(f"{what} {term!r} is not one of {sorted(table)}") from None


def finding(term: str) -> ChestConcept:
    """The concept of a FINDING_TYPES term; ValueError naming ``finding`` otherwise."""
    return _get(FINDINGS, term, "finding")


def site(term: str) -> ChestConcept:
    """The concept of a SITES term; ValueError naming ``site`` otherwise."""
    return _get(SITES, term, "site")


def landmark(term: str) -> ChestConcept:
    """The concept of a LANDMARKS term; ValueError naming ``landmark`` otherwise."""
    return _get(LANDMARKS, term, "landmark")


def laterality(term: str) -> ChestConcept | None:
    """The concept of a LATERALITIES term; None for "none"."""
    if term == "none":
        return None
    return _get(LATERALITIES, term, "laterality")


def attribute_value(attribute: str, value: str) -> ChestConcept:
    """The concept of an ATTRIBUTE_VALUES value, e.g. ("margin", "spiculated")."""
    table = ATTRIBUTES.get(attribute) if isinstance(attribute, str) else None
    if table is None:
        raise ValueError(f"attribute {attribute!r} is not one of {sorted(ATTRIBUTES)}")
    return _get(table, value, f"{attribute} value")


def _norm_en(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


def _norm_zh(text: str) -> str:
    return "".join(text.split())


def _index() -> dict[str, list[ChestConcept]]:
    index: dict[str, list[ChestConcept]] = {}
    for concept in all_concepts():
        keys = {_norm_en(concept.term)}
        keys.update(_norm_en(name) for name in concept.names_en)
        keys.update(_norm_zh(name) for name in concept.names_zh)
        for key in keys:
            bucket = index.setdefault(key, [])
            if concept not in bucket:
                bucket.append(concept)
    return index


_INDEX: Final = _index()


def lookup(
    text: str, kind: ConceptKind | None = None, *, attribute: str | None = None
) -> ChestConcept | None:
    """The concept whose English or Chinese term (or synonym, or vocabulary term) is
    ``text``; None when there is none.

    English is matched case-insensitively with "_", "-" and runs of spaces equal;
    Chinese with spaces ignored. When a term names several concepts ("右肺门" is a site
    and a landmark, "GGO" a finding and a density) the first in :func:`all_concepts`
    order wins, unless ``kind`` says which one is wanted; ``attribute`` ("margin",
    "density", "shape") keeps only the values of that attribute.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if kind is not None and kind not in _KINDS:
        raise ValueError(f"kind {kind!r} is not one of {_KINDS}")
    if attribute is not None and attribute not in ATTRIBUTES:
        raise ValueError(f"attribute {attribute!r} is not one of {sorted(ATTRIBUTES)}")
    key = _norm_zh(text) if _HAN.search(text) else _norm_en(text)
    for concept in _INDEX.get(key, []):
        if kind is not None and concept.kind != kind:
            continue
        if attribute is not None and concept.attribute != attribute:
            continue
        return concept
    return None


@dataclass(frozen=True)
class TermMatch:
    """A term found in a text: ``text[start:end]`` names ``concepts`` (priority order)."""

    start: int
    end: int
    text: str
    concepts: tuple[ChestConcept, ...]


def _scan_names() -> list[tuple[str, bool, ChestConcept]]:
    """(name, is_chinese, concept) for every name worth finding inside a sentence."""
    names: list[tuple[str, bool, ChestConcept]] = []
    for concept in all_concepts():
        if concept.kind == "laterality":
            # single words ("right", "右") are too common to mean a side by themselves
            names.extend((n, True, concept) for n in concept.names_zh if len(n) > 1)
            continue
        names.extend((n, False, concept) for n in concept.names_en)
        names.extend((n, True, concept) for n in concept.names_zh)
    return names


def _en_pattern(name: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in _norm_en(name).split()]
    return re.compile(r"(?<![0-9a-z])" + r"[\s_-]+".join(words) + r"(?![0-9a-z])")


_SCAN: Final = [
    (name, is_zh, concept, None if is_zh else _en_pattern(name))
    for name, is_zh, concept in _scan_names()
]


def find_terms(text: str) -> list[TermMatch]:
    """Every ontology term mentioned in ``text``, in order of position.

    A match that lies inside a longer match is dropped ("右肺" inside "右肺中叶");
    overlapping matches are both kept ("右肺门增大": right hilum, hilar enlargement).
    English is matched case-insensitively on word boundaries, Chinese as substrings.
    ``start``/``end`` index ``text``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    lowered = text.lower()  # same length as text for the scripts the ontology uses
    spans: dict[tuple[int, int], list[ChestConcept]] = {}
    for name, is_zh, concept, pattern in _SCAN:
        if is_zh:
            start = lowered.find(name)
            while start >= 0:
                spans.setdefault((start, start + len(name)), []).append(concept)
                start = lowered.find(name, start + 1)
        else:
            assert pattern is not None
            for m in pattern.finditer(lowered):
                spans.setdefault((m.start(), m.end()), []).append(concept)
    keys = sorted(spans, key=lambda s: (s[0], -(s[1] - s[0])))
    kept = [s for s in keys if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in keys)]
    order = {concept: i for i, concept in enumerate(all_concepts())}
    return [
        TermMatch(
            start,
            end,
            text[start:end],
            tuple(sorted(dict.fromkeys(spans[(start, end)]), key=lambda x: order[x])),
        )
        for start, end in kept
    ]


# ----------------------------------------------------------------------------- answer languages

#: The languages the node answers follow-up questions in: those the ontology has names in.
AnswerLanguage = Literal["en", "zh"]
ANSWER_LANGUAGES: Final[tuple[AnswerLanguage, ...]] = ("en", "zh")
# The Chinese terms are Simplified: zh-TW / zh-HK readers would get the wrong script.
_ZH_TAGS: Final = ("zh", "zh-cn", "zh-hans", "zh-sg", "zh-hans-cn")


def answer_language(tag: str | None, question: str = "") -> AnswerLanguage | None:
    """The language to answer in: the tag given with the question (en, en-US, zh, zh-CN,
    zh-Hans ...), else the question's script. None for a tag the node cannot answer in
    (fr, zh-TW ...): the caller refuses the question with a clear error, never an answer
    mislabelled with the asked language."""
    if tag:
        t = tag.strip().lower().replace("_", "-")
        if t == "en" or t.startswith("en-"):
            return "en"
        if t in _ZH_TAGS:
            return "zh"
        return None
    return "zh" if _HAN.search(question) else "en"
