"""Read a model's free-text values as terms of the chest vocabulary, and boxes as 0-1000.

The vocabulary and every synonym come from :mod:`sr_templates.ontology`: a value that is
a term, an English or Chinese name or a synonym of a concept there reads as that concept.
What this module adds is reading phrases the ontology cannot list: English word stems
with their inflections ("nodular", "effusions", "hilar"), the patient's side written as
"rt"/"lt"/"右"/"左", lung levels ("upper", "apical", "上"), and composing a site from side
+ level + structure ("left apical" -> ``left_upper_zone``, "右下肺" -> ``right_lower_zone``).
The Chinese structure words are the ontology's own Chinese site and landmark names with
their side and level characters removed.

Used by the pre-read parser (:mod:`workers.parsing`) and by follow-up answer parsers.
Boxes are ``(y0, x0, y1, x1)`` integers in 0-1000 of the model-ready square image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, Final

from sr_templates import ontology
from sr_templates.ontology import Side
from workers.lenient_json import NUMBER

__all__ = [
    "BOX_MAX",
    "attribute_name",
    "attribute_value",
    "box_2d",
    "box_iou",
    "finding_type",
    "landmark",
    "laterality",
    "side_of",
    "site",
    "site_side",
]

BOX_MAX = 1000


def _norm_key(value: str) -> str:
    return re.sub(r"[\s_\-/]+", " ", value.strip().lower()).strip()


# ---------------------------------------------------------------- findings

# Free-text stems, first match wins: specific before generic ("ground glass opacity" is
# not consolidation, "calcified nodule" is a nodule). Each names an ontology finding (a
# test checks it); exact terms and synonyms are matched through the ontology first.
_FINDING_STEMS: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple(
    (re.compile(p, re.IGNORECASE), f)
    for p, f in (
        # a bare "line(s)" as the finding type is a line (catheter); inside a phrase it may
        # be a pleural line, so only the whole value counts
        (
            r"pacemaker|catheter|\btubes?\b|\bpicc\b|central line|^\s*lines?\s*$|\bport\b|"
            r"\bwires?\b|endotracheal|nasogastric|\bclips?\b|\bdevice|导管|置管|插管|起搏器|"
            r"引流管",
            "support_device",
        ),
        (r"pneumothora|\bptx\b|气胸", "pneumothorax"),
        (r"effusion|pleural fluid|积液|胸水", "pleural_effusion"),
        (
            r"cardiomegaly|enlarged heart|heart (?:is )?enlarge|cardiac enlarge|"
            r"enlarged cardiac|心脏增大|心影增大|心脏扩大|心影扩大",
            "cardiomegaly",
        ),
        (
            r"hilar (?:enlarge|promin|fullness|mass|adenopath)|enlarged hil|"
            r"肺门(?:影)?(?:增大|增浓|增宽|饱满)",
            "hilar_enlargement",
        ),
        (r"widen\w* mediastin|mediastin\w* widen|纵隔增宽|纵隔影增宽", "widened_mediastinum"),
        (r"fractur|骨折", "rib_fracture"),
        (r"hyperinflat|hyperexpan|over-?inflat|emphysem|肺气肿|过度充气", "hyperinflation"),
        (r"ground[\s_-]*glass|\bggo\b|磨玻璃|毛玻璃", "ground_glass_opacity"),
        (r"reticul|interstitial|网状|网格|间质", "reticular_opacity"),
        (r"atelecta|collapse|不张", "atelectasis"),
        (r"nodul|结节", "nodule"),
        (r"\bmass|肿块|占位", "mass"),
        (r"calcif|钙化", "calcification"),
        (
            r"consolidat|air-?\s?space|infiltrat|pneumonia|opacit|实变|渗出|浸润|斑片",
            "consolidation",
        ),
    )
)


def finding_type(raw: Any) -> str | None:
    """The ``FINDINGS`` term a finding type or label names ("lung nodule", "肺结节",
    "bilateral pleural effusions" -> ``pleural_effusion``); None when none."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    concept = ontology.lookup(raw, kind="finding")
    if concept is not None:
        return concept.term
    for pattern, term in _FINDING_STEMS:
        if pattern.search(raw):
            return term
    return None


# ---------------------------------------------------------------- sides and levels

_SIDE_EN = re.compile(r"\b(right|rt|left|lt|bilateral|both)\b", re.IGNORECASE)
_SIDE_WORDS: Final[dict[str, Side]] = {
    "right": "right", "rt": "right", "left": "left", "lt": "left", "bilateral": "bilateral",
    "both": "bilateral",
}  # fmt: skip
_LEVEL_EN = re.compile(r"\b(upper|mid|middle|lower)\b", re.IGNORECASE)
_LEVEL_ZH = (("上", "upper"), ("中", "middle"), ("下", "lower"))
_SIDE_LEVEL_ZH = re.compile(r"[右左双两侧上中下]")


def side_of(text: str) -> Side | None:
    """The patient's side a free-text phrase names: right, left, bilateral or None."""
    sides: set[Side] = {_SIDE_WORDS[m.group(1).lower()] for m in _SIDE_EN.finditer(text)}
    if "双" in text or "两" in text:
        sides.add("bilateral")
    if "右" in text:
        sides.add("right")
    if "左" in text:
        sides.add("left")
    if "bilateral" in sides or {"right", "left"} <= sides:
        return "bilateral"
    if sides:
        return sides.pop()
    return None


def _level(text: str) -> str | None:
    m = _LEVEL_EN.search(text)
    if m:
        word = m.group(1).lower()
        return "middle" if word == "mid" else word
    low = text.lower()
    if re.search(r"\bapex\b|\bapical\b", low) or "肺尖" in text:
        return "upper"
    if re.search(r"\bbase\b|\bbasal\b", low):
        return "lower"
    for zh, level in _LEVEL_ZH:
        if zh in text:
            return level
    return None


# ("no side" words the model writes in the laterality field; not ontology concepts)
_NO_SIDE = frozenset({"none", "n/a", "na", "midline", "central", "unilateral", "无", ""})
_SIDE_LETTERS: Final[dict[str, Side]] = {
    "r": "right", "rt": "right", "l": "left", "lt": "left", "b": "bilateral",
}  # fmt: skip


def laterality(raw: Any) -> Side | None:
    """A laterality field ("Right", "lt", "双侧", "none") as a ``LATERALITY_TERMS`` term;
    None when it is not understood."""
    if not isinstance(raw, str):
        return None
    key = raw.strip().lower()
    if key in _NO_SIDE:
        return "none"
    if key in _SIDE_LETTERS:
        return _SIDE_LETTERS[key]
    concept = ontology.lookup(key, kind="laterality")
    return concept.side if concept is not None else None


def site_side(site_term: str | None) -> Side | None:
    """The side a ``SITES`` term carries (``lingula`` -> left); None for midline sites."""
    if site_term is None or site_term not in ontology.SITES:
        return None
    side = ontology.SITES[site_term].side
    return None if side == "none" else side


# ---------------------------------------------------------------- sites

# English structure words, in priority order; "zone" stands for a lung level.
_STRUCTURE_EN: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple(
    (re.compile(p, re.IGNORECASE), s)
    for p, s in (
        (r"costophrenic|\bcp\s*angle|\bcpa\b", "costophrenic_angle"),
        (r"hemidiaphragm|diaphragm", "hemidiaphragm"),
        (r"\bhil(?:um|ar|a)\b", "hilum"),
        (r"lingula", "lingula"),
        (r"\blobe\b", "lobe"),
        (r"\bzone\b|\bfield\b|\blung\b|\bapex\b|\bapical\b|\bbase\b|\bbasal\b", "zone"),
        (r"pleura", "pleura"),
        (r"\bribs?\b", "ribs"),
        (r"clavic", "clavicle"),
        (r"mediastin", "mediastinum"),
        (r"trachea", "trachea"),
        (r"\bheart\b|cardiac", "heart"),
        (r"\bspine\b|vertebr", "spine"),
        (r"abdom", "upper_abdomen"),
    )
)


def _structure_of(concept: ontology.ChestConcept) -> str:
    """The structure of a sided site or landmark: its term without side and level
    ("right_upper_zone" -> "zone", "left_costophrenic_angle" -> "costophrenic_angle");
    a midline concept's structure is its own term."""
    if concept.side not in ("right", "left"):
        return "zone" if concept.term == "both_lungs" else concept.term
    rest = concept.term.removeprefix(f"{concept.side}_")
    if rest.endswith("_zone") or rest == "lung":
        return "zone"
    if rest.endswith("_lobe"):
        return "lobe"
    return rest


def _zh_structures(concepts: Iterable[ontology.ChestConcept]) -> tuple[tuple[str, str], ...]:
    """(Chinese structure word, structure), longest word first: each Chinese name of the
    concepts with its side and level characters removed ("右肺上叶" -> "肺叶": lobe)."""
    words: dict[str, str] = {}
    for concept in concepts:
        for name in concept.names_zh:
            word = _SIDE_LEVEL_ZH.sub("", name)
            if word:
                words.setdefault(word, _structure_of(concept))
    return tuple(sorted(words.items(), key=lambda item: -len(item[0])))


_SITE_STRUCTURES_ZH: Final = _zh_structures(ontology.SITES.values())
_LANDMARK_STRUCTURES_ZH: Final = _zh_structures(ontology.LANDMARKS.values())
_ABBREVIATION = re.compile(r"[a-z]{2,4}")


def site(raw: Any) -> str | None:
    """The ``SITES`` term a site phrase names: a term, name or synonym of the ontology
    ("RML", "右肺中叶"), a sided abbreviation inside a phrase ("RUL opacity"), or a
    composition of side, level and structure ("left apical", "右下肺"); None when none."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    concept = ontology.lookup(raw, kind="site")
    if concept is not None:
        return concept.term
    for token in re.findall(r"[a-z]+", raw.lower()):
        if _ABBREVIATION.fullmatch(token):  # "RUL opacity": a lobe or zone abbreviation
            concept = ontology.lookup(token, kind="site")
            if concept is not None:
                return concept.term
    structure = next((s for p, s in _STRUCTURE_EN if p.search(raw)), None)
    if structure is None:
        bare = _SIDE_LEVEL_ZH.sub("", raw)
        structure = next((s for zh, s in _SITE_STRUCTURES_ZH if zh in bare), None)
    if structure is None:
        return None
    if structure in ontology.SITES:  # midline sites and the lingula
        return structure
    side = side_of(raw)
    if structure == "zone":
        level = _level(raw)
        if side in ("right", "left") and level:
            candidate = f"{side}_{level}_zone"
            return candidate if candidate in ontology.SITES else None
        if side == "bilateral":
            return "both_lungs"
        return f"{side}_lung" if side else None
    if structure == "lobe":
        candidate = f"{side}_{_level(raw)}_lobe"
        return candidate if candidate in ontology.SITES else None
    if side in ("right", "left"):
        candidate = f"{side}_{structure}"
        return candidate if candidate in ontology.SITES else None
    return None


# ---------------------------------------------------------------- landmarks

_LANDMARK_EN: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple(
    (re.compile(p, re.IGNORECASE), s)
    for p, s in (
        (r"heart|cardiac", "heart_border"),
        (r"costophrenic|\bcp\b", "costophrenic_angle"),
        (r"\bhil", "hilum"),
        (r"apex|apical", "lung_apex"),
    )
)
_MIDLINE_LANDMARK_NAMES: Final = tuple(
    (name.lower(), concept.term)
    for concept in ontology.LANDMARKS.values()
    if concept.side == "none"
    for name in (*concept.names_en, *concept.names_zh)
)


def landmark(raw: Any) -> str | None:
    """The ``LANDMARKS`` term a landmark label names ("carina", "右肺门",
    "left heart border", "right apical region"); None when none."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    concept = ontology.lookup(raw, kind="landmark")
    if concept is not None:
        return concept.term
    low = raw.lower()
    for name, term in _MIDLINE_LANDMARK_NAMES:
        if name in low:
            return term
    side = side_of(raw)
    if side not in ("right", "left"):
        return None
    structure = next((s for p, s in _LANDMARK_EN if p.search(raw)), None)
    if structure is None:
        bare = _SIDE_LEVEL_ZH.sub("", raw)
        structure = next((s for zh, s in _LANDMARK_STRUCTURES_ZH if zh in bare), None)
    candidate = f"{side}_{structure}"
    return candidate if structure is not None and candidate in ontology.LANDMARKS else None


# ---------------------------------------------------------------- attributes


def attribute_name(raw: Any) -> str | None:
    """The attribute ("margin", "density", "shape") a key names ("margins", "边缘")."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    concept = ontology.lookup(raw, kind="attribute")
    return concept.term if concept is not None else None


def _name_pattern(name: str) -> re.Pattern[str]:
    """An ontology name inside a phrase: English on word boundaries, Chinese anywhere."""
    if not name.isascii():
        return re.compile(re.escape(name))
    words = [re.escape(w) for w in _norm_key(name).split()]
    return re.compile(r"(?<![a-z0-9])" + r"[\s_\-/]+".join(words) + r"(?![a-z0-9])")


def _value_names(
    values: Iterable[ontology.ChestConcept],
) -> tuple[tuple[re.Pattern[str], str], ...]:
    """(pattern, value term) for every name of the values, longest name first, so that
    "part-solid" wins over "solid" and "部分实性" over "实性"."""
    names = [(n, v.term) for v in values for n in (v.term, *v.names_en, *v.names_zh)]
    names.sort(key=lambda item: -len(item[0]))
    return tuple((_name_pattern(n), term) for n, term in names)


_VALUE_NAMES: Final = {
    name: _value_names(values.values()) for name, values in ontology.ATTRIBUTES.items()
}


def attribute_value(name: str, raw: Any) -> str | None:
    """The ``ATTRIBUTES[name]`` term a value names: a term, name or synonym of one of the
    attribute's values ("well circumscribed" -> smooth), else the value with the longest
    name inside the phrase ("边缘光滑锐利" -> smooth, "part-solid nodule" -> part_solid);
    None when none. ``name`` must be an attribute ("margin", "density", "shape")."""
    patterns = _VALUE_NAMES.get(name)
    if patterns is None:
        raise ValueError(f"attribute {name!r} is not one of {sorted(ontology.ATTRIBUTES)}")
    if not isinstance(raw, str) or not raw.strip():
        return None
    concept = ontology.lookup(raw, kind="attribute_value", attribute=name)
    if concept is not None:
        return concept.term
    low = raw.lower()
    return next((term for pattern, term in patterns if pattern.search(low)), None)


# ---------------------------------------------------------------- boxes


def _to_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        m = NUMBER.search(value)
        if not m:
            return None
        number = float(m.group())
    else:
        return None
    return number if math.isfinite(number) else None


def box_2d(
    raw: Any, warnings: list[str] | None = None, what: str = "box_2d"
) -> tuple[int, int, int, int] | None:
    """A ``[y0, x0, y1, x1]`` box as 0-1000 integers, or None.

    Accepts four numbers as a list, a string ("612, 238, 688, 310"), a dict with
    y0/x0/y1/x1, or one of those wrapped in a one-element list. Boxes whose values are
    all <= 1 (and not all 0) are read as normalised to 0-1 and scaled by 1000 (a genuine
    0-1000 box that small would be one thousandth of the image, in a corner); values out
    of range are clipped and inverted corners swapped. A box with zero area is None.
    Each repair or refusal adds a sentence starting with ``what`` to ``warnings``.
    """
    notes: list[str] = warnings if warnings is not None else []
    value = raw
    if isinstance(value, str):
        value = [m.group() for m in NUMBER.finditer(value)]
    if isinstance(value, dict):
        keys = ("y0", "x0", "y1", "x1")
        value = [value.get(k) for k in keys] if all(k in value for k in keys) else None
    # one box wrapped in another list: [[y0, x0, y1, x1]] or ["y0, x0, y1, x1"]
    for _ in range(4):
        if not (isinstance(value, list | tuple) and len(value) == 1):
            break
        inner = value[0]
        if isinstance(inner, str):
            value = [m.group() for m in NUMBER.finditer(inner)]
            break
        if not isinstance(inner, list | tuple):
            break
        value = inner
    if not isinstance(value, list | tuple) or len(value) != 4:
        notes.append(f"{what}: no valid box_2d (need 4 numbers); dropped")
        return None
    numbers = [_to_number(v) for v in value]
    if any(v is None for v in numbers):
        notes.append(f"{what}: box_2d has a non-numeric value; dropped")
        return None
    vals = [v for v in numbers if v is not None]
    if all(v <= 1.0 for v in vals) and any(v > 0 for v in vals):
        vals = [v * BOX_MAX for v in vals]
        notes.append(f"{what}: box_2d looked normalised to 0-1; scaled to 0-1000")
    if any(v < 0 or v > BOX_MAX for v in vals):
        vals = [min(max(v, 0.0), float(BOX_MAX)) for v in vals]
        notes.append(f"{what}: box_2d out of range; clipped to 0-1000")
    y0, x0, y1, x1 = (round(v) for v in vals)
    if y0 > y1 or x0 > x1:
        y0, y1 = min(y0, y1), max(y0, y1)
        x0, x1 = min(x0, x1), max(x0, x1)
        notes.append(f"{what}: box_2d corners inverted; swapped")
    if y0 == y1 or x0 == x1:
        notes.append(f"{what}: degenerate box_2d (zero area); dropped")
        return None
    return (y0, x0, y1, x1)


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two ``(y0, x0, y1, x1)`` boxes (any common unit)."""
    iy = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ix = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iy * ix
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
