"""Read the model's answers to the follow-up prompts of :mod:`workers.dialogue.prompts`.

As tolerant as the pre-read parser and sharing its readers: the answer JSON is found by
:func:`workers.lenient_json.extract_json` (MedGemma 1.5 thinking trace between
``<unused94>`` and ``<unused95>`` stripped, "Final Answer:", code fences, almost-JSON, text
cut off by the token limit), vocabulary values are read by :mod:`workers.chest_terms`
(English or Chinese terms and synonyms of :mod:`sr_templates.ontology`), boxes are
validated to 0-1000 integers. Nothing here raises on any ``str``: a value that cannot be
read is left out and a warning says why; an answer without readable JSON has
``structured=False``.

The ``explanation`` of every answer is the model's own prose, to be quoted as such: the
node never takes a number from it as a fact (sizes and distances come from geometry).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from sr_templates import ontology
from workers import chest_terms
from workers.lenient_json import DecodedAnswer, extract_json

__all__ = [
    "DescribeAnswer",
    "LocaliseAnswer",
    "RelationAnswer",
    "parse_describe",
    "parse_localise",
    "parse_relation",
]

Box = tuple[int, int, int, int]
Connected = Literal["yes", "no", "uncertain"]

_MAX_EXPLANATION: Final = 1000  # characters kept of the model's explanation
_MAX_BOXES: Final = 8  # a localisation asks for one object; a few more are tolerated
_BOX_KEYS: Final = ("box_2d", "box2d", "box", "bbox", "bounding_box", "boundingbox")
_EXPLANATION_KEYS: Final = ("explanation", "reason", "reasoning", "rationale", "description",
                            "comment", "解释", "说明", "理由")  # fmt: skip
_LABEL_KEYS: Final = ("label", "name", "object", "structure", "标签", "名称")
_CONNECTED_KEYS: Final = ("connected", "contiguous", "connection", "is_connected", "answer",
                          "相连", "是否相连", "连接")  # fmt: skip
_CUT_OFF: Final = "the answer was cut off (token limit); values after the cut are missing"

# Relation words, most specific first: a negated phrase before the word it negates.
_UNCERTAIN_WORDS: Final = ("uncertain", "unclear", "indeterminate", "unknown", "cannot",
                           "can't", "not sure", "possibly", "maybe", "equivocal", "不确定",
                           "无法", "不能确定", "难以", "可能")  # fmt: skip
_NO_WORDS: Final = ("no", "not connected", "not contiguous", "separate", "separated",
                    "false", "否", "不相连", "不连", "无", "未相连", "没有")  # fmt: skip
_YES_WORDS: Final = ("yes", "connected", "contiguous", "true", "touches", "是", "相连",
                     "连", "有")  # fmt: skip


@dataclass(frozen=True)
class DescribeAnswer:
    """The model's description of one region.

    attributes: attribute name -> value term, only values of the ontology's ATTRIBUTES
        vocabulary ("margin": "smooth"); a property the model left out, set to null or
        named outside the vocabulary is absent.
    box_2d: the lesion's box, ``(y0, x0, y1, x1)`` in 0-1000 of the SECOND image sent
        (the crop); None when the model gave none or an unreadable one.
    explanation: the model's own words (never a source of numbers).
    structured: True when an answer object was found in the text.
    warnings: one sentence per repair or dropped value.
    """

    attributes: dict[str, str] = field(default_factory=dict)
    box_2d: Box | None = None
    explanation: str = ""
    structured: bool = False
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class LocaliseAnswer:
    """The model's boxes for a localisation request.

    boxes: ``(label, (y0, x0, y1, x1))`` in the model's order, boxes in 0-1000 of the
        image sent (the padded square); the label as the model wrote it ("" when none).
        Empty when the model found nothing (or nothing readable).
    explanation: the model's reasoning around the answer (never a source of numbers).
    """

    boxes: tuple[tuple[str, Box], ...] = ()
    explanation: str = ""
    structured: bool = False
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RelationAnswer:
    """Whether the lesion is connected to the structure: "yes", "no", "uncertain", or None
    when the answer could not be read."""

    connected: Connected | None = None
    explanation: str = ""
    structured: bool = False
    warnings: tuple[str, ...] = ()


# ------------------------------------------------------------------------------ helpers


def _norm(key: Any) -> str:
    return " ".join(str(key).strip().lower().replace("_", " ").replace("-", " ").split())


def _lookup(obj: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[bool, Any]:
    """(found, value) of the first of ``keys`` present in ``obj`` (keys compared loosely)."""
    by_norm = {_norm(k): v for k, v in obj.items()}
    for key in keys:
        if _norm(key) in by_norm:
            return True, by_norm[_norm(key)]
    return False, None


def _text(value: Any) -> str:
    """A value as one line of prose, capped; "" for None."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        value = " ".join(_text(v) for v in value)
    flat = " ".join(str(value).split())
    if len(flat) > _MAX_EXPLANATION:
        flat = flat[: _MAX_EXPLANATION - 3].rstrip() + "..."
    return flat


def _first_object(value: Any, wanted: Callable[[Mapping[str, Any]], bool]) -> dict[str, Any] | None:
    """The answer object: ``value`` itself, or the first wanted object in a list of them."""
    if isinstance(value, dict):
        return value if wanted(value) else None
    if isinstance(value, list):
        return next((v for v in value if isinstance(v, dict) and wanted(v)), None)
    return None


_FINAL_ANSWER: Final = re.compile(r"final\s*answer\s*\**\s*[:：]", re.IGNORECASE)


def _prose(decoded: DecodedAnswer) -> str:
    """The model's prose around the answer, without the "Final Answer:" marker."""
    return _text(_FINAL_ANSWER.sub(" ", decoded.text_outside if decoded.found else decoded.text))


def _as_text(text: Any) -> str:
    """Any input as text: bytes decoded as UTF-8, None as "", other objects as their str."""
    if isinstance(text, bytes):
        return text.decode("utf-8", "replace")
    if text is None:
        return ""
    return text if isinstance(text, str) else str(text)


# ------------------------------------------------------------------------------ describe


def _attribute_keys(obj: Mapping[str, Any]) -> dict[str, Any]:
    """attribute name -> raw value for the keys of ``obj`` that name an attribute, also
    inside a nested "attributes" object."""
    found: dict[str, Any] = {}
    nested = _lookup(obj, ("attributes", "properties", "features", "属性"))[1]
    for source in (nested if isinstance(nested, dict) else {}, obj):
        for key, value in source.items():
            name = chest_terms.attribute_name(str(key))
            if name is not None and name not in found:
                found[name] = value
    return found


def _is_describe_object(obj: Mapping[str, Any]) -> bool:
    return bool(_attribute_keys(obj)) or _lookup(obj, _BOX_KEYS)[0]


def _parse_describe(text: str) -> DescribeAnswer:
    decoded = extract_json(text, accept=lambda v: _first_object(v, _is_describe_object) is not None)
    warnings = list(decoded.warnings)
    obj = _first_object(decoded.value, _is_describe_object) if decoded.found else None
    if obj is None:
        warnings.append("no answer object with margin, shape, density or box_2d was found")
        return DescribeAnswer(explanation=_prose(decoded), warnings=tuple(warnings))
    if decoded.truncated:
        warnings.append(_CUT_OFF)
    attributes: dict[str, str] = {}
    for name, raw in _attribute_keys(obj).items():
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "null", "none")):
            continue
        term = chest_terms.attribute_value(name, raw) if isinstance(raw, str) else None
        if term is None:
            allowed = ", ".join(ontology.ATTRIBUTES[name])
            warnings.append(f"{name} {_text(raw)[:60]!r} is not one of {allowed}; dropped")
        else:
            attributes[name] = term
    has_box, raw_box = _lookup(obj, _BOX_KEYS)
    box = chest_terms.box_2d(raw_box, warnings, "box_2d") if has_box and raw_box else None
    explanation = _text(_lookup(obj, _EXPLANATION_KEYS)[1]) or _prose(decoded)
    return DescribeAnswer(attributes, box, explanation, True, tuple(warnings))


def parse_describe(text: str) -> DescribeAnswer:
    """The margin, shape and density (vocabulary values only) and the crop box of a
    describe answer; never raises."""
    return _parse_describe(_as_text(text))


# ------------------------------------------------------------------------------ localise


def _is_box_list(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def _box_items(value: Any) -> list[Any] | None:
    """The list of box objects in a localise answer, or None when it holds none."""
    if _is_box_list(value):
        return [{"box_2d": value}]
    if isinstance(value, dict):
        if _lookup(value, _BOX_KEYS)[0]:
            return [value]
        for inner in value.values():  # {"objects": [...]} or {"right hilum": {...}}
            items = _box_items(inner)
            if items is not None:
                return items
        return None
    if isinstance(value, list):
        if not value:
            return []
        items = [v for v in value if (isinstance(v, dict) and _lookup(v, _BOX_KEYS)[0])
                 or _is_box_list(v)]  # fmt: skip
        return items or None
    return None


def _parse_localise(text: str) -> LocaliseAnswer:
    decoded = extract_json(text, accept=lambda v: _box_items(v) is not None)
    warnings = list(decoded.warnings)
    items = _box_items(decoded.value) if decoded.found else None
    explanation = _prose(decoded)
    if items is None:
        warnings.append("no list of box_2d objects was found")
        return LocaliseAnswer(explanation=explanation, warnings=tuple(warnings))
    if decoded.truncated:
        warnings.append(_CUT_OFF)
    if len(items) > _MAX_BOXES:
        warnings.append(f"{len(items)} boxes given; the first {_MAX_BOXES} kept")
    boxes: list[tuple[str, Box]] = []
    for index, item in enumerate(items[:_MAX_BOXES]):
        obj = item if isinstance(item, dict) else {"box_2d": item}
        box = chest_terms.box_2d(_lookup(obj, _BOX_KEYS)[1], warnings, f"box {index + 1}")
        if box is not None:
            boxes.append((_text(_lookup(obj, _LABEL_KEYS)[1]), box))
    return LocaliseAnswer(tuple(boxes), explanation, True, tuple(warnings))


def parse_localise(text: str) -> LocaliseAnswer:
    """The labelled boxes of a localisation answer (0-1000 of the image); never raises."""
    return _parse_localise(_as_text(text))


# ------------------------------------------------------------------------------ relation


def _word_pattern(word: str) -> re.Pattern[str]:
    if word.isascii():
        return re.compile(r"(?<![a-z])" + re.escape(word) + r"(?![a-z])")
    return re.compile(re.escape(word))


_RELATION_WORDS: Final[tuple[tuple[tuple[str, ...], Connected], ...]] = (
    (_UNCERTAIN_WORDS, "uncertain"),
    (_NO_WORDS, "no"),
    (_YES_WORDS, "yes"),
)
_RELATION_PATTERNS: Final[tuple[tuple[re.Pattern[str], Connected], ...]] = tuple(
    (_word_pattern(word), answer) for words, answer in _RELATION_WORDS for word in words
)


def _connected(raw: Any) -> Connected | None:
    """yes / no / uncertain from a bool or a word or phrase (English or Chinese)."""
    if isinstance(raw, bool):
        return "yes" if raw else "no"
    if not isinstance(raw, str) or not raw.strip():
        return None
    value = _norm(raw)
    return next((answer for pattern, answer in _RELATION_PATTERNS if pattern.search(value)), None)


def _is_relation_object(obj: Mapping[str, Any]) -> bool:
    return _lookup(obj, _CONNECTED_KEYS)[0]


def _parse_relation(text: str) -> RelationAnswer:
    decoded = extract_json(text, accept=lambda v: _first_object(v, _is_relation_object) is not None)
    warnings = list(decoded.warnings)
    obj = _first_object(decoded.value, _is_relation_object) if decoded.found else None
    if obj is None:
        warnings.append('no answer object with "connected" was found')
        return RelationAnswer(explanation=_prose(decoded), warnings=tuple(warnings))
    if decoded.truncated:
        warnings.append(_CUT_OFF)
    raw = _lookup(obj, _CONNECTED_KEYS)[1]
    connected = _connected(raw)
    if connected is None:
        warnings.append(f"connected {_text(raw)[:60]!r} is not one of yes, no, uncertain; dropped")
    explanation = _text(_lookup(obj, _EXPLANATION_KEYS)[1]) or _prose(decoded)
    return RelationAnswer(connected, explanation, True, tuple(warnings))


def parse_relation(text: str) -> RelationAnswer:
    """Whether the lesion is connected to the structure; never raises."""
    return _parse_relation(_as_text(text))
