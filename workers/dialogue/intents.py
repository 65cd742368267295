"""What a follow-up question asks for, in English or Chinese, by keyword.

A question may ask several things at once ("How far is this lesion from the right hilum?
Is it connected to hilar structures?" is a distance and a relation). Which anchors it is
about is workers.dialogue.resolve's job; this module only names the tasks:

- ``overview``: what the pre-read found ("Is there anything abnormal in the lungs?")
- ``attributes``: margin, shape, density (asks the model on a full-resolution crop)
- ``distance``: how far between two anchors (geometry and pixel spacing only)
- ``relation``: whether a lesion is connected to a structure (asks the model)
- ``checklist``: the typical signs of a condition (sr_templates.signs)
- ``size``: how big, or a comparison of sizes (geometry only)
"""

from __future__ import annotations

import re
from typing import Final, Literal

from sr_templates import signs

__all__ = ["INTENTS", "Intent", "detect_intents"]

Intent = Literal["overview", "attributes", "distance", "relation", "checklist", "size"]
INTENTS: Final = ("overview", "attributes", "distance", "relation", "checklist", "size")

_EN: Final[dict[str, tuple[str, ...]]] = {
    "overview": (
        r"anything (abnormal|wrong|unusual)",
        r"\babnormal(ities|ity)?\b",
        r"\bwhat (did you|do you) (find|see)\b",
        r"\bany findings?\b",
        r"\bis (it|the study|the image|the x-?ray) normal\b",
    ),
    "attributes": (
        r"\bmargins?\b",
        r"\bborders?\b",
        r"\boutline\b",
        r"\b(ir)?regular\b",
        r"\bsmooth\b",
        r"\bspiculat",
        r"\blobulat",
        r"\bill[- ]defined\b",
        r"\bwell[- ]defined\b",
        r"\bshape\b",
        r"\bdensity\b",
        r"\bdense\b",
        r"\bsolid\b",
        r"\bdescribe\b",
        r"\bwhat does (it|this|that) look like\b",
    ),
    "distance": (r"\bhow far\b", r"\bdistance\b", r"\bhow close\b"),
    "relation": (
        r"\bconnect(ed|s|ion)?\b",
        r"\bcontiguous\b",
        r"\battached\b",
        r"\bin contact\b",
        r"\binvolv(e|es|ing)\b",
        r"\bextend(s|ing)? (to|into)\b",
    ),
    "checklist": (
        r"\bsigns?\b",
        r"\bfeatures?\b",
        r"\bcriteria\b",
        r"\btypical\b",
        r"\bhow many\b.*\b(show|present|fit|match)",
    ),
    "size": (
        r"\bhow (big|large|small)\b",
        r"\bsizes?\b",
        r"\bbigger\b",
        r"\blarger\b",
        r"\bsmaller\b",
        r"\bcompared?\b",
        r"\bdiameter\b",
        r"\bmeasure(s|ment)?\b",
    ),
}
_ZH: Final[dict[str, tuple[str, ...]]] = {
    "overview": ("异常", "有什么发现", "有无发现", "是否正常", "有没有问题"),
    "attributes": (
        "边缘",
        "边界",
        "轮廓",
        "规则",
        "光滑",
        "毛刺",
        "分叶",
        "形态",
        "形状",
        "密度",
        "实性",
        "描述",
    ),
    "distance": ("距离", "多远", "相距", "远近"),
    "relation": ("相连", "连接", "相通", "相接", "累及", "延伸", "关系"),
    "checklist": ("征象", "表现", "特征", "符合几条", "几条", "符合"),
    "size": ("多大", "大小", "尺寸", "直径", "比较", "相比", "更大", "更小"),
}
_EN_RE: Final = {k: re.compile("|".join(v), re.IGNORECASE) for k, v in _EN.items()}


def detect_intents(question: str) -> tuple[Intent, ...]:
    """The tasks a question asks for, in INTENTS order; () when none is recognised.

    A checklist needs a named condition (sr_templates.signs): "signs" alone is not one.
    """
    found: list[Intent] = []
    for intent in INTENTS:
        hit = bool(_EN_RE[intent].search(question)) or any(w in question for w in _ZH[intent])
        if intent == "checklist":
            hit = signs.find_condition(question) is not None
        if hit:
            found.append(intent)
    if "checklist" in found:
        # "which signs ... how many does this image show" is one checklist, not an overview
        found = [i for i in found if i not in ("overview", "size", "attributes")]
    if "distance" in found and "relation" in found and not _asks_relation(question):
        found.remove("relation")
    return tuple(found)


def _asks_relation(question: str) -> bool:
    """ "关系" alone ("距离关系") is not a connection question; a verb of contact is."""
    strong = ("相连", "连接", "相通", "相接", "累及")
    return bool(_EN_RE["relation"].search(question)) or any(w in question for w in strong)
