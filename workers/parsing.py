"""Turn raw pre-read model text into typed, validated findings and landmarks.

The parser is tolerant of what real model text looks like: reasoning around the answer,
a MedGemma 1.5 thinking trace (``<unused94>`` ... ``<unused95>``), "Final Answer:" or not,
fenced or bare JSON, Python-literal dicts, comments, trailing commas, output cut off by the
token limit, English synonyms and Chinese terms. It never raises on any ``str``: what it
cannot use becomes a warning, and when no JSON can be recovered the result is a text-only
pre-read (``structured=False``) whose narrative is the cleaned text.

Boxes are ``(y0, x0, y1, x1)`` integers in 0-1000 of the model-ready square image (the
padded frame), the MedGemma convention; mapping back to source pixels is done elsewhere.

Box normalisation heuristic: a box whose four values are all <= 1.0 (and not all zero) is
read as normalised to 0-1 and multiplied by 1000. A genuine 0-1000 box with every value
<= 1 would be at most one thousandth of the image wide, in the top-left corner, which is
not a plausible chest finding; the scaling is reported as a warning.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from workers.prompts import ATTRIBUTE_VALUES, FINDING_TYPES, LANDMARKS, SITES

log = logging.getLogger(__name__)

BOX_MAX = 1000
DUPLICATE_IOU = 0.7
_MAX_DEPTH = 40
_MAX_BARE_STARTS = 24
_MAX_SEQUENCE = 200  # consecutive top-level objects read as one list
_MAX_OBJECTS = 64  # findings (and landmarks) read from one answer; a 4B model writes far fewer


@dataclass(frozen=True)
class ParsedFinding:
    """One abnormal finding: vocabulary terms from :mod:`workers.prompts`, box in 0-1000.

    label: the model's own wording (any language), kept verbatim.
    finding: one of ``FINDING_TYPES`` ("other" when the model's term is unknown).
    site: one of ``SITES`` or None when unknown.
    laterality: the patient's side, one of ``LATERALITIES``.
    box_2d: (y0, x0, y1, x1), 0-1000 of the padded square image, y0 < y1, x0 < x1.
    attributes: subset of ``ATTRIBUTE_VALUES`` (key -> allowed value).
    raw: the object as the model wrote it (after lenient decoding).
    """

    label: str
    finding: str
    site: str | None
    laterality: str
    box_2d: tuple[int, int, int, int]
    attributes: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParsedLandmark:
    """An anatomical landmark: ``name`` is one of ``LANDMARKS``; box as for findings."""

    name: str
    box_2d: tuple[int, int, int, int]


@dataclass(frozen=True)
class ParsedPreread:
    """The whole pre-read.

    structured: False when no JSON answer could be recovered; then ``findings`` and
    ``landmarks`` are empty and ``findings_text`` is the whole cleaned text.
    warnings: one sentence per thing that was repaired, guessed or dropped.
    """

    findings: tuple[ParsedFinding, ...]
    landmarks: tuple[ParsedLandmark, ...]
    findings_text: str
    impression: str
    structured: bool
    warnings: tuple[str, ...]


# --------------------------------------------------------------------------- cleaning

_THINK_OPEN = "<unused94>"
_THINK_CLOSE = "<unused95>"
_SPECIAL_TOKENS = re.compile(
    r"<start_of_turn>(?:model|user)?|<end_of_turn>|<eos>|<bos>|<pad>|"
    r"<start_of_image>|<end_of_image>|<image_soft_token>|<unused\d+>"
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd\ufeff]")
_FINAL_ANSWER = re.compile(r"final\s*answer\s*\**\s*[:：]", re.IGNORECASE)


def _strip_thinking(text: str, warnings: list[str]) -> str:
    """Remove ``<unused94>…<unused95>`` traces; an unterminated trace ends at "Final Answer"
    when one follows, else the trace is dropped to the end of the text."""
    out: list[str] = []
    pos = 0
    while True:
        start = text.find(_THINK_OPEN, pos)
        if start < 0:
            out.append(text[pos:])
            break
        out.append(text[pos:start])
        end = text.find(_THINK_CLOSE, start)
        if end >= 0:
            pos = end + len(_THINK_CLOSE)
            continue
        rest = text[start + len(_THINK_OPEN) :]
        answers = list(_FINAL_ANSWER.finditer(rest))
        if answers:
            warnings.append("thinking trace not terminated; answer taken from 'Final Answer:'")
            out.append(rest[answers[-1].start() :])
        else:
            warnings.append("thinking trace not terminated and no answer after it")
        break
    # A stray closing tag: everything before it was a trace whose opening tag was lost.
    joined = "".join(out)
    if _THINK_CLOSE in joined:
        warnings.append("thinking trace closed without opening; text before it dropped")
        joined = joined.rsplit(_THINK_CLOSE, 1)[1]
    return joined


def _clean(text: str, warnings: list[str]) -> str:
    text = _strip_thinking(text, warnings)
    text = _SPECIAL_TOKENS.sub("", text)
    text = _CONTROL.sub("", text)
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


# ------------------------------------------------------------------ lenient decoding


class _SyntaxErr(Exception):
    pass


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_WORD = re.compile(r"[A-Za-z_\u4e00-\u9fff][A-Za-z0-9_\-\u4e00-\u9fff]*")
_CONSTANTS: dict[str, Any] = {
    "true": True,
    "false": False,
    "null": None,
    "none": None,
    "nan": None,
    "infinity": None,
    "undefined": None,
}
_CLOSING_QUOTE = {'"': '"', "'": "'", "“": "”", "‘": "’", "「": "」"}
_COMMAS = ",，、"
_COLONS = ":：="
_AFTER_STRING = ",:=}])\n\r#/\"'，：、；;"
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/"}


class _LenientDecoder:
    """A small recursive-descent reader for JSON as language models write it.

    Accepts JSON plus: single or typographic quotes, Python literals (True/False/None,
    tuples), unquoted keys and bare-word values, // # /* */ comments, trailing or missing
    commas, full-width commas and colons. At end of input it returns what it has with
    ``complete=False``: a list keeps only its complete elements, so a findings list cut
    mid-object keeps the objects before the cut.
    """

    def __init__(self, text: str, pos: int, stop: int) -> None:
        self.s = text if stop >= len(text) else text[:stop]
        self.i = pos
        self.n = len(self.s)
        self.dropped_partial = 0  # objects or lists cut by the end of input and dropped

    def _skip(self) -> None:
        s, n = self.s, self.n
        while self.i < n:
            c = s[self.i]
            if c.isspace():
                self.i += 1
            elif c == "#" or s.startswith("//", self.i):
                nl = s.find("\n", self.i)
                self.i = n if nl < 0 else nl + 1
            elif s.startswith("/*", self.i):
                end = s.find("*/", self.i + 2)
                self.i = n if end < 0 else end + 2
            else:
                return

    def value(self, depth: int = 0) -> tuple[Any, bool]:
        if depth > _MAX_DEPTH:
            raise _SyntaxErr("nested too deeply")
        self._skip()
        if self.i >= self.n:
            return None, False
        c = self.s[self.i]
        if c == "{":
            return self._object(depth)
        if c in "[(":
            return self._list(depth)
        if c in _CLOSING_QUOTE:
            return self._string()
        m = _NUMBER.match(self.s, self.i)
        if m:
            self.i = m.end()
            text = m.group()
            number: float | int
            try:
                number = int(text)
            except ValueError:
                number = float(text)
            return number, self.i < self.n  # a number at the very end may have been cut
        m = _WORD.match(self.s, self.i)
        if m:
            self.i = m.end()
            word = m.group()
            if word.lower() in _CONSTANTS:
                return _CONSTANTS[word.lower()], True
            return word, self.i < self.n
        raise _SyntaxErr(f"unexpected {c!r} at {self.i}")

    def _string(self) -> tuple[str, bool]:
        quote = self.s[self.i]
        closing = _CLOSING_QUOTE[quote]
        if quote == "“":
            closing = '”"'
        self.i += 1
        out: list[str] = []
        s, n = self.s, self.n
        while self.i < n:
            c = s[self.i]
            if c in closing and (c not in "\"'" or self._ends_string(self.i + 1)):
                self.i += 1
                return "".join(out), True
            if c == "\\" and self.i + 1 < n:
                e = s[self.i + 1]
                if e == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", s[self.i + 2 : self.i + 6]):
                    out.append(chr(int(s[self.i + 2 : self.i + 6], 16)))
                    self.i += 6
                    continue
                out.append(_ESCAPES.get(e, e))
                self.i += 2
                continue
            out.append(c)
            self.i += 1
        return "".join(out), False

    def _ends_string(self, j: int) -> bool:
        """A straight quote closes a string only before a delimiter; otherwise it is an
        unescaped quote inside the text (``"a "coin" lesion"``, ``'patient's'``)."""
        while j < self.n and self.s[j] in " \t":
            j += 1
        return j >= self.n or self.s[j] in _AFTER_STRING

    def _object(self, depth: int) -> tuple[dict[str, Any], bool]:
        self.i += 1
        obj: dict[str, Any] = {}
        while True:
            self._skip()
            if self.i >= self.n:
                return obj, False
            c = self.s[self.i]
            if c == "}":
                self.i += 1
                return obj, True
            if c in _COMMAS:
                self.i += 1
                continue
            key, complete = self.value(depth + 1)
            if not complete:
                return obj, False
            if isinstance(key, dict | list):
                raise _SyntaxErr("container used as a key")
            self._skip()
            if self.i >= self.n:
                return obj, False
            if self.s[self.i] not in _COLONS:
                raise _SyntaxErr(f"expected ':' at {self.i}")
            self.i += 1
            val, complete = self.value(depth + 1)
            obj[str(key)] = val
            if not complete:
                return obj, False

    def _list(self, depth: int) -> tuple[list[Any], bool]:
        self.i += 1
        items: list[Any] = []
        while True:
            self._skip()
            if self.i >= self.n:
                return items, False
            c = self.s[self.i]
            if c in "])":  # either closer: models mix tuples and lists
                self.i += 1
                return items, True
            if c in _COMMAS:
                self.i += 1
                continue
            if c == "}":
                raise _SyntaxErr(f"unbalanced '}}' at {self.i}")
            val, complete = self.value(depth + 1)
            if not complete:
                if isinstance(val, dict | list):
                    self.dropped_partial += 1
                return items, False
            items.append(val)


def _decode_at(text: str, pos: int, stop: int) -> tuple[Any, bool, int, int]:
    """Decode one value at ``pos`` reading no further than ``stop``; consecutive
    top-level objects become a list.

    Returns (value, complete, end offset, number of partial objects dropped at a cut).
    """
    dec = _LenientDecoder(text, pos, stop)
    value, complete = dec.value()
    if complete and isinstance(value, dict):
        seq = [value]
        while len(seq) < _MAX_SEQUENCE:
            save = dec.i
            dec._skip()
            if dec.i < dec.n and dec.s[dec.i] in _COMMAS:
                dec.i += 1
                dec._skip()
            if dec.i < dec.n and dec.s[dec.i] == "{":
                try:
                    nxt, ok = dec.value()
                except _SyntaxErr:
                    dec.i = save
                    break
                if ok and isinstance(nxt, dict):
                    seq.append(nxt)
                    continue
                complete = False
                dec.dropped_partial += 1
                break
            dec.i = save
            break
        if len(seq) > 1:
            value = seq
    return value, complete, dec.i, dec.dropped_partial


# ---------------------------------------------------------------- candidate search

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)


@dataclass(frozen=True)
class _Candidate:
    start: int  # where decoding starts, offset in the cleaned text
    stop: int  # where the input ends for it: a fence's end, else the end of the text
    fenced: bool
    after_final: bool


def _candidates(text: str) -> Iterator[_Candidate]:
    """Places where the answer JSON may start, most likely first."""
    finals = list(_FINAL_ANSWER.finditer(text))
    regions: list[tuple[int, bool]] = []
    if finals:
        regions.append((finals[-1].end(), True))
    regions.append((0, False))
    seen: set[int] = set()
    for region_start, after_final in regions:
        region = text[region_start:]
        fences = list(_FENCE.finditer(region))
        # json-labelled fences first, then unlabelled or other labels
        fences.sort(key=lambda m: (m.group(1).lower() != "json", m.start()))
        for m in fences:
            body_start = region_start + m.start(2)
            body = m.group(2)
            first = _first_open(body)
            if first is None:
                continue
            start = body_start + first
            if start not in seen:
                seen.add(start)
                yield _Candidate(start, region_start + m.end(2), True, after_final)
        count = 0
        for i in range(region_start, len(text)):
            if text[i] in "{[":
                if i not in seen:
                    seen.add(i)
                    yield _Candidate(i, len(text), False, after_final)
                count += 1
                if count >= _MAX_BARE_STARTS:
                    break


def _first_open(body: str) -> int | None:
    for i, c in enumerate(body):
        if c in "{[(":
            return i
        if not c.isspace() and i > 40:
            return None
    return None


# ---------------------------------------------------------------- vocabularies


def _norm_key(value: str) -> str:
    return re.sub(r"[\s_\-/]+", " ", value.strip().lower()).strip()


_FINDING_SYNONYMS: dict[str, str] = {
    **{_norm_key(f): f for f in FINDING_TYPES},
    "lung nodule": "nodule",
    "pulmonary nodule": "nodule",
    "nodular opacity": "nodule",
    "lung mass": "mass",
    "pulmonary mass": "mass",
    "opacity": "consolidation",
    "lung opacity": "consolidation",
    "airspace opacity": "consolidation",
    "air space opacity": "consolidation",
    "airspace disease": "consolidation",
    "infiltrate": "consolidation",
    "pneumonia": "consolidation",
    "ggo": "ground_glass_opacity",
    "ground glass": "ground_glass_opacity",
    "interstitial opacity": "reticular_opacity",
    "reticulation": "reticular_opacity",
    "effusion": "pleural_effusion",
    "pleural fluid": "pleural_effusion",
    "enlarged heart": "cardiomegaly",
    "cardiac enlargement": "cardiomegaly",
    "enlarged cardiac silhouette": "cardiomegaly",
    "ptx": "pneumothorax",
    "collapse": "atelectasis",
    "fracture": "rib_fracture",
    "emphysema": "hyperinflation",
    "device": "support_device",
    "tube": "support_device",
    "line": "support_device",
    "catheter": "support_device",
    "pacemaker": "support_device",
    "结节": "nodule",
    "肺结节": "nodule",
    "肿块": "mass",
    "实变": "consolidation",
    "磨玻璃影": "ground_glass_opacity",
    "胸腔积液": "pleural_effusion",
    "积液": "pleural_effusion",
    "气胸": "pneumothorax",
    "心脏增大": "cardiomegaly",
    "肺不张": "atelectasis",
    "钙化": "calcification",
}

# Substring rules, first match wins: specific terms before generic ones ("ground glass
# opacity" before "opacity", "calcified nodule" is a nodule).
_FINDING_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), f)
    for p, f in (
        (
            r"pacemaker|catheter|\btubes?\b|\bpicc\b|central line|\bport\b|\bwires?\b|"
            r"endotracheal|nasogastric|\bclips?\b|\bdevice|导管|置管|插管|起搏器|引流管",
            "support_device",
        ),
        (r"pneumothora|气胸", "pneumothorax"),
        (r"effusion|pleural fluid|积液", "pleural_effusion"),
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


def _finding_type(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    key = _norm_key(value)
    if key in _FINDING_SYNONYMS:
        return _FINDING_SYNONYMS[key]
    for pattern, finding in _FINDING_PATTERNS:
        if pattern.search(value):
            return finding
    return None


_SIDE_EN = re.compile(r"\b(right|rt|left|lt|bilateral|both)\b", re.IGNORECASE)
_LEVEL_EN = re.compile(r"\b(upper|mid|middle|lower)\b", re.IGNORECASE)
_SITE_ABBREV = {
    "rul": "right_upper_lobe",
    "rml": "right_middle_lobe",
    "rll": "right_lower_lobe",
    "lul": "left_upper_lobe",
    "lll": "left_lower_lobe",
    "ruz": "right_upper_zone",
    "rmz": "right_middle_zone",
    "rlz": "right_lower_zone",
    "luz": "left_upper_zone",
    "lmz": "left_middle_zone",
    "llz": "left_lower_zone",
}
# (pattern, structure) in priority order; "zone" is the default for a lung level.
_STRUCTURE_EN: tuple[tuple[re.Pattern[str], str], ...] = tuple(
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
_STRUCTURE_ZH: tuple[tuple[str, str], ...] = (
    ("肋膈角", "costophrenic_angle"),
    ("膈", "hemidiaphragm"),
    ("肺门", "hilum"),
    ("舌段", "lingula"),
    ("叶", "lobe"),
    ("肺野", "zone"),
    ("肺尖", "zone"),
    ("胸膜", "pleura"),
    ("肋骨", "ribs"),
    ("锁骨", "clavicle"),
    ("纵隔", "mediastinum"),
    ("气管", "trachea"),
    ("心", "heart"),
    ("脊柱", "spine"),
    ("肺", "zone"),
)
_UNSIDED = {"mediastinum", "trachea", "heart", "spine", "upper_abdomen", "lingula"}


def _side(text: str) -> str | None:
    """The patient's side a free-text phrase names: right, left, bilateral or None."""
    sides = {m.group(1).lower() for m in _SIDE_EN.finditer(text)}
    if "双" in text or "两" in text:
        sides.add("bilateral")
    if "右" in text:
        sides.add("right")
    if "左" in text:
        sides.add("left")
    norm = {"rt": "right", "lt": "left", "both": "bilateral"}
    sides = {norm.get(s, s) for s in sides}
    if "bilateral" in sides or {"right", "left"} <= sides:
        return "bilateral"
    if sides:
        return sides.pop()
    return None


def _site(value: Any) -> str | None:
    """Map a site phrase (EN, ZH, abbreviation or vocabulary term) to ``SITES``."""
    if not isinstance(value, str) or not value.strip():
        return None
    key = _norm_key(value).replace(" ", "_")
    if key in SITES:
        return key
    if key in _SITE_ABBREV:
        return _SITE_ABBREV[key]
    for token in re.findall(r"[a-z]+", value.lower()):
        if token in _SITE_ABBREV:
            return _SITE_ABBREV[token]
    structure = next((s for p, s in _STRUCTURE_EN if p.search(value)), None)
    if structure is None:
        structure = next((s for zh, s in _STRUCTURE_ZH if zh in value), None)
    if structure is None:
        return None
    if structure in _UNSIDED:
        return structure
    side = _side(value)
    if structure == "zone":
        level = _level(value)
        if side in ("right", "left") and level:
            return f"{side}_{level}_zone" if f"{side}_{level}_zone" in SITES else None
        if side == "bilateral":
            return "both_lungs"
        return f"{side}_lung" if side else None
    if structure == "lobe":
        level = _level(value)
        candidate = f"{side}_{level}_lobe"
        return candidate if candidate in SITES else None
    if side in ("right", "left"):
        candidate = f"{side}_{structure}"
        return candidate if candidate in SITES else None
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
    for zh, level in (("上", "upper"), ("中", "middle"), ("下", "lower")):
        if zh in text:
            return level
    return None


def _site_laterality(site: str | None) -> str | None:
    if site is None:
        return None
    if site.startswith("right_"):
        return "right"
    if site.startswith("left_") or site == "lingula":
        return "left"
    if site == "both_lungs":
        return "bilateral"
    return None


_LATERALITY_WORDS = {
    "right": "right", "r": "right", "rt": "right", "右": "right", "右侧": "right",
    "left": "left", "l": "left", "lt": "left", "左": "left", "左侧": "left",
    "bilateral": "bilateral", "both": "bilateral", "b": "bilateral", "双侧": "bilateral",
    "双": "bilateral", "两侧": "bilateral",
    "none": "none", "n/a": "none", "na": "none", "midline": "none", "central": "none",
    "unilateral": "none", "无": "none", "": "none",
}  # fmt: skip


def _laterality(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return _LATERALITY_WORDS.get(value.strip().lower())


_DEFAULT_SITE = {"cardiomegaly": "heart", "widened_mediastinum": "mediastinum"}

_LANDMARK_SYNONYMS: dict[str, str] = {
    **{_norm_key(lm): lm for lm in LANDMARKS},
    "carina": "carina",
    "tracheal carina": "carina",
    "隆突": "carina",
    "气管隆突": "carina",
    "右肺门": "right_hilum",
    "左肺门": "left_hilum",
    "右肋膈角": "right_costophrenic_angle",
    "左肋膈角": "left_costophrenic_angle",
    "右肺尖": "right_lung_apex",
    "左肺尖": "left_lung_apex",
    "右心缘": "right_heart_border",
    "左心缘": "left_heart_border",
}


def _landmark_name(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    key = _norm_key(value)
    if key in _LANDMARK_SYNONYMS:
        return _LANDMARK_SYNONYMS[key]
    side = _side(value)
    low = value.lower()
    if "carina" in low or "隆突" in value:
        return "carina"
    if side not in ("right", "left"):
        return None
    if re.search(r"heart|cardiac", low) or "心缘" in value:
        return f"{side}_heart_border"
    if re.search(r"costophrenic|\bcp\b", low) or "肋膈角" in value:
        return f"{side}_costophrenic_angle"
    if re.search(r"\bhil", low) or "肺门" in value:
        return f"{side}_hilum"
    if re.search(r"apex|apical", low) or "肺尖" in value:
        return f"{side}_lung_apex"
    return None


_ATTRIBUTE_SYNONYMS: dict[str, dict[str, str]] = {
    "margin": {
        "well defined": "smooth", "well circumscribed": "smooth", "circumscribed": "smooth",
        "sharp": "smooth", "regular": "smooth", "光滑": "smooth", "清晰": "smooth",
        "lobular": "lobulated", "分叶": "lobulated", "spiculation": "spiculated",
        "毛刺": "spiculated", "poorly defined": "ill_defined", "irregular": "ill_defined",
        "indistinct": "ill_defined", "blurred": "ill_defined", "模糊": "ill_defined",
        "边界不清": "ill_defined",
    },
    "density": {
        "soft tissue": "solid", "实性": "solid", "mixed": "part_solid",
        "subsolid": "part_solid", "部分实性": "part_solid", "混杂": "part_solid",
        "ggo": "ground_glass", "磨玻璃": "ground_glass", "calcific": "calcified",
        "calcification": "calcified", "钙化": "calcified",
    },
    "shape": {
        "circular": "round", "spherical": "round", "圆形": "round", "ovoid": "oval",
        "elliptical": "oval", "椭圆": "oval", "椭圆形": "oval", "不规则": "irregular",
    },
}  # fmt: skip
_ATTRIBUTE_KEYS = {"margin": "margin", "margins": "margin", "border": "margin",
                   "edge": "margin", "density": "density", "attenuation": "density",
                   "shape": "shape", "morphology": "shape"}  # fmt: skip


def _attribute_value(key: str, value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    norm = _norm_key(value)
    allowed = ATTRIBUTE_VALUES[key]
    as_term = norm.replace(" ", "_")
    if as_term in allowed:
        return as_term
    synonyms = _ATTRIBUTE_SYNONYMS[key]
    if norm in synonyms:
        return synonyms[norm]
    for word, term in synonyms.items():
        if word in value:
            return term
    return None


# ---------------------------------------------------------------- boxes

_BOX_KEYS = ("box_2d", "box2d", "box", "bbox", "bounding_box", "boundingbox", "coordinates")


def _box_value(obj: dict[str, Any]) -> Any:
    lowered = {k.lower().replace(" ", "_"): v for k, v in obj.items()}
    for key in _BOX_KEYS:
        if key in lowered:
            return lowered[key]
    return None


def _to_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        m = _NUMBER.search(value)
        if not m:
            return None
        number = float(m.group())
    else:
        return None
    return number if math.isfinite(number) else None


def _box(value: Any, what: str, warnings: list[str]) -> tuple[int, int, int, int] | None:
    """Validate a ``[y0, x0, y1, x1]`` box into 0-1000 integers, or None (with a warning)."""
    if isinstance(value, str):
        value = [m.group() for m in _NUMBER.finditer(value)]
    if isinstance(value, dict):
        keys = ("y0", "x0", "y1", "x1")
        value = [value.get(k) for k in keys] if all(k in value for k in keys) else None
    # one box wrapped in another list: [[y0, x0, y1, x1]] or ["y0, x0, y1, x1"]
    for _ in range(4):
        if not (isinstance(value, list | tuple) and len(value) == 1):
            break
        inner = value[0]
        if isinstance(inner, str):
            value = [m.group() for m in _NUMBER.finditer(inner)]
            break
        if not isinstance(inner, list | tuple):
            break
        value = inner
    if not isinstance(value, list | tuple) or len(value) != 4:
        warnings.append(f"{what}: no valid box_2d (need 4 numbers); dropped")
        return None
    numbers = [_to_number(v) for v in value]
    if any(v is None for v in numbers):
        warnings.append(f"{what}: box_2d has a non-numeric value; dropped")
        return None
    vals = [v for v in numbers if v is not None]
    if all(v <= 1.0 for v in vals) and any(v > 0 for v in vals):
        vals = [v * BOX_MAX for v in vals]
        warnings.append(f"{what}: box_2d looked normalised to 0-1; scaled to 0-1000")
    if any(v < 0 or v > BOX_MAX for v in vals):
        vals = [min(max(v, 0.0), float(BOX_MAX)) for v in vals]
        warnings.append(f"{what}: box_2d out of range; clipped to 0-1000")
    y0, x0, y1, x1 = (round(v) for v in vals)
    if y0 > y1 or x0 > x1:
        y0, y1 = min(y0, y1), max(y0, y1)
        x0, x1 = min(x0, x1), max(x0, x1)
        warnings.append(f"{what}: box_2d corners inverted; swapped")
    if y0 == y1 or x0 == x1:
        warnings.append(f"{what}: degenerate box_2d (zero area); dropped")
        return None
    return (y0, x0, y1, x1)


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two ``(y0, x0, y1, x1)`` boxes (any common unit)."""
    iy = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ix = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iy * ix
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------- interpretation

_FINDINGS_LIST_KEYS = ("findings", "abnormalities", "lesions", "objects", "detections",
                       "boxes", "results", "结果", "所见")  # fmt: skip
_LANDMARK_KEYS = ("landmarks", "anatomical_landmarks", "anatomy", "解剖标志")
_NARRATIVE_KEYS = ("findings_text", "findings_narrative", "narrative", "report", "text",
                   "description", "影像所见")  # fmt: skip
_IMPRESSION_KEYS = ("impression", "impressions", "conclusion", "summary", "印象", "结论")


@dataclass
class _Answer:
    findings: list[Any]
    landmarks: list[Any]
    findings_text: str | None
    impression: str | None


def _text_value(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(v.strip() for v in value)
    return None


def _has_box(obj: Any) -> bool:
    return isinstance(obj, dict) and _box_value(obj) is not None


def _interpret(value: Any, warnings: list[str], depth: int = 0) -> _Answer | None:
    """Recognise a decoded value as a pre-read answer, or None."""
    if depth > 2:
        return None
    if isinstance(value, dict):
        lowered = {str(k).strip().lower(): v for k, v in value.items()}
        answer = _Answer([], [], None, None)
        recognised = False
        for key in _FINDINGS_LIST_KEYS:
            if key in lowered:
                item = lowered[key]
                if isinstance(item, list) and item and all(isinstance(v, str) for v in item):
                    answer.findings_text = " ".join(v.strip() for v in item)
                    recognised = True
                    continue
                if isinstance(item, list):
                    answer.findings = item
                    recognised = True
                    break
                if isinstance(item, dict) and _has_box(item):
                    answer.findings = [item]
                    recognised = True
                    break
                if isinstance(item, dict) and item and all(_has_box(v) for v in item.values()):
                    # {"nodule 1": {...}, "nodule 2": {...}}: the keys are labels
                    answer.findings = [{"label": k, **v} for k, v in item.items()]
                    recognised = True
                    break
                if key == "findings" and _text_value(item) is not None:
                    answer.findings_text = _text_value(item)
                    recognised = True
        for key in _LANDMARK_KEYS:
            if key in lowered and isinstance(lowered[key], list | dict):
                item = lowered[key]
                answer.landmarks = item if isinstance(item, list) else _landmark_dict(item)
                recognised = True
                break
        for key in _NARRATIVE_KEYS:
            if key in lowered and _text_value(lowered[key]) is not None:
                answer.findings_text = _text_value(lowered[key])
                recognised = True
                break
        for key in _IMPRESSION_KEYS:
            if key in lowered and _text_value(lowered[key]) is not None:
                answer.impression = _text_value(lowered[key])
                recognised = True
                break
        if recognised:
            return answer
        if _has_box(value):
            return _Answer([value], [], None, None)
        for inner in value.values():  # {"preread": {...}} and similar wrappers
            if isinstance(inner, dict | list):
                found = _interpret(inner, warnings, depth + 1)
                if found is not None:
                    return found
        return None
    if isinstance(value, list):
        if not value:
            return _Answer([], [], None, None)
        dicts = [v for v in value if isinstance(v, dict)]
        if not dicts:
            return None
        if len(dicts) == 1 and not _has_box(dicts[0]):
            return _interpret(dicts[0], warnings, depth + 1)
        boxed = [d for d in dicts if _has_box(d)]
        if not boxed:
            return None
        warnings.append("answer was a top-level list of objects; read as findings/landmarks")
        answer = _Answer([], [], None, None)
        for d in dicts:
            if _is_landmark_object(d):
                answer.landmarks.append(d)
            else:
                answer.findings.append(d)
        return answer
    return None


def _landmark_dict(obj: dict[str, Any]) -> list[Any]:
    """``{"carina": [y0, x0, y1, x1], ...}`` or ``{"carina": {"box_2d": ...}}`` -> objects."""
    return [
        {"label": k, **v} if isinstance(v, dict) else {"label": k, "box_2d": v}
        for k, v in obj.items()
    ]


def _label_of(obj: dict[str, Any]) -> str:
    for key in ("label", "name", "landmark", "description", "标签", "名称"):
        value = obj.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _is_landmark_object(obj: dict[str, Any]) -> bool:
    kind = obj.get("kind", obj.get("type"))
    if isinstance(kind, str) and kind.strip().lower() in ("landmark", "anatomy", "解剖标志"):
        return True
    if "finding" in obj or "finding_type" in obj or "type" in obj:
        return False
    return _landmark_name(_label_of(obj)) is not None and _finding_type(_label_of(obj)) is None


def _finding(obj: Any, index: int, warnings: list[str]) -> ParsedFinding | None:
    what = f"finding {index + 1}"
    if not isinstance(obj, dict):
        warnings.append(f"{what}: not an object; dropped")
        return None
    box = _box(_box_value(obj), what, warnings)
    if box is None:
        return None
    label = _label_of(obj)
    raw_type = obj.get("finding", obj.get("finding_type", obj.get("type")))
    finding = _finding_type(raw_type)
    if finding is None:
        finding = _finding_type(label)
        if raw_type not in (None, "") and finding is not None:
            warnings.append(f"{what}: finding {raw_type!r} unknown; {finding!r} taken from label")
    if finding is None:
        finding = "other"
        if raw_type not in (None, "") or label:
            original = raw_type or label
            warnings.append(f"{what}: unknown finding type {original!r}; recorded as 'other'")
    if finding == "other" and isinstance(raw_type, str) and raw_type.strip() and not label:
        label = raw_type.strip()
    raw_site = obj.get("site", obj.get("location", obj.get("部位")))
    site = _site(raw_site)
    if site is None and raw_site not in (None, ""):
        warnings.append(f"{what}: site {raw_site!r} not in the vocabulary")
    if site is None:
        site = _site(label) or _DEFAULT_SITE.get(finding)
    laterality = _resolve_laterality(obj.get("laterality"), site, label, what, warnings)
    attributes = _attributes(obj, what, warnings)
    if not label:
        label = " ".join(part.replace("_", " ") for part in (site, finding) if part)
    return ParsedFinding(
        label=label,
        finding=finding,
        site=site,
        laterality=laterality,
        box_2d=box,
        attributes=attributes,
        raw=dict(obj),
    )


def _resolve_laterality(
    raw: Any, site: str | None, label: str, what: str, warnings: list[str]
) -> str:
    """Site wins over the laterality field and the label; a disagreement is a warning."""
    field_lat = _laterality(raw)
    if raw not in (None, "") and field_lat is None:
        warnings.append(f"{what}: laterality {raw!r} not understood")
    label_lat = _side(label) if label else None
    site_lat = _site_laterality(site)
    if site_lat is not None:
        if field_lat in ("right", "left", "bilateral") and field_lat != site_lat:
            warnings.append(
                f"{what}: laterality conflict ({field_lat!r} field vs site {site!r}); site kept"
            )
        if label_lat is not None and label_lat != site_lat:
            warnings.append(
                f"{what}: laterality conflict (label {label!r} vs site {site!r}); site kept"
            )
        return site_lat
    if field_lat not in (None, "none"):
        if label_lat is not None and label_lat != field_lat:
            warnings.append(f"{what}: laterality conflict (label {label!r} vs {field_lat!r})")
        return str(field_lat)
    return label_lat or "none"


def _attributes(obj: dict[str, Any], what: str, warnings: list[str]) -> dict[str, str]:
    source: dict[str, Any] = {}
    nested = obj.get("attributes")
    if isinstance(nested, dict):
        source.update(nested)
    elif nested not in (None, "", []):
        warnings.append(f"{what}: attributes not an object; ignored")
    for key in _ATTRIBUTE_KEYS:  # attributes written at the top level of the finding
        if key in obj and key not in source:
            source[key] = obj[key]
    result: dict[str, str] = {}
    for key, value in source.items():
        canonical = _ATTRIBUTE_KEYS.get(str(key).strip().lower())
        if canonical is None:
            warnings.append(f"{what}: attribute {key!r} not in the vocabulary; dropped")
            continue
        term = _attribute_value(canonical, value)
        if term is None:
            if value not in (None, ""):
                warnings.append(f"{what}: {canonical} {value!r} not in the vocabulary; dropped")
            continue
        result.setdefault(canonical, term)
    return result


def _landmarks(items: Iterable[Any], warnings: list[str]) -> tuple[ParsedLandmark, ...]:
    out: dict[str, ParsedLandmark] = {}
    for index, obj in enumerate(items):
        what = f"landmark {index + 1}"
        if not isinstance(obj, dict):
            warnings.append(f"{what}: not an object; dropped")
            continue
        label = _label_of(obj)
        name = _landmark_name(label)
        if name is None:
            warnings.append(f"{what}: unknown landmark {label!r}; dropped")
            continue
        box = _box(_box_value(obj), f"{what} ({name})", warnings)
        if box is None:
            continue
        if name in out:
            warnings.append(f"{what}: duplicate landmark {name!r}; first kept")
            continue
        out[name] = ParsedLandmark(name=name, box_2d=box)
    return tuple(out.values())


def _dedupe(findings: list[ParsedFinding], warnings: list[str]) -> list[ParsedFinding]:
    kept: list[ParsedFinding] = []
    for f in findings:
        twin = next(
            (
                k
                for k in kept
                if k.finding == f.finding
                and k.site == f.site
                and box_iou(k.box_2d, f.box_2d) > DUPLICATE_IOU
            ),
            None,
        )
        if twin is not None:
            warnings.append(f"duplicate finding {f.label!r} (same type, site, IoU > 0.7) dropped")
            continue
        kept.append(f)
    return kept


# ---------------------------------------------------------------- narrative from prose

_HEADING = r"(?:^|\n)[ \t>#*_-]*(?:{names})[ \t*_]*[:：][ \t*_]*"
_FINDINGS_HEAD = re.compile(_HEADING.format(names=r"findings|影像所见|所见|表现"), re.IGNORECASE)
_IMPRESSION_HEAD = re.compile(
    _HEADING.format(names=r"impression|conclusion|印象|结论|诊断意见"), re.IGNORECASE
)
_SECTION_END = re.compile(
    r"\n\s*\n|\n[ \t>#*_-]*(?:impression|conclusion|印象|结论|诊断意见|final\s*answer|"
    r"findings|影像所见|所见)[ \t*_]*[:：]|```",
    re.IGNORECASE,
)


def _section(text: str, head: re.Pattern[str]) -> str | None:
    m = head.search(text)
    if not m:
        return None
    rest = text[m.end() :]
    end = _SECTION_END.search(rest)
    body = rest[: end.start()] if end else rest
    body = body.strip().strip("*_").strip()
    return body or None


def _strip_fences(text: str) -> str:
    return _FENCE.sub("", text)


# ---------------------------------------------------------------- entry point


def parse_preread(text: str) -> ParsedPreread:
    """Parse one pre-read answer. Never raises: problems become ``warnings``."""
    try:
        return _parse(text)
    except Exception as exc:  # a parser bug must not fail a pre-read: keep the text, say so
        log.exception("pre-read parser failed; keeping text only")
        cleaned = text if isinstance(text, str) else repr(text)
        return ParsedPreread((), (), cleaned.strip(), "", False, (f"parser error: {exc!r}",))


def _parse(text: str) -> ParsedPreread:
    warnings: list[str] = []
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    elif not isinstance(text, str):
        text = str(text)
    cleaned = _clean(text, warnings)

    answer: _Answer | None = None
    complete = True
    dropped = 0
    span = (0, 0)
    first_error: str | None = None
    decoded_until = -1  # bare starts inside a value already decoded are not retried
    for cand in _candidates(cleaned):
        if not cand.fenced and cand.start < decoded_until:
            continue
        try:
            value, complete, end, dropped = _decode_at(cleaned, cand.start, cand.stop)
        except _SyntaxErr as exc:
            first_error = first_error or str(exc)
            continue
        attempt: list[str] = []
        found = _interpret(value, attempt)
        if found is None:
            decoded_until = max(decoded_until, end)
            continue
        if isinstance(value, list) and not value and not (cand.fenced or cand.after_final):
            continue  # a bare "[]" inside reasoning prose is not an answer
        answer = found
        if first_error is not None:
            warnings.append(f"malformed JSON ({first_error}); recovered the readable part")
        warnings.extend(attempt)
        span = (cand.start, end)
        break

    prose = _strip_fences(cleaned[: span[0]] + "\n" + cleaned[span[1] :])
    prose_findings = _section(prose, _FINDINGS_HEAD)
    prose_impression = _section(prose, _IMPRESSION_HEAD)

    if answer is None:
        if cleaned:
            warnings.append("no JSON answer found; text-only result")
        else:
            warnings.append("empty answer")
        return ParsedPreread(
            findings=(),
            landmarks=(),
            findings_text=cleaned,
            impression=prose_impression or "",
            structured=False,
            warnings=tuple(warnings),
        )

    if not complete:
        warnings.append(
            f"output truncated; kept the {len(answer.findings)} complete finding object(s) "
            f"before the cut, dropped {dropped} partial object(s)"
        )
    for kind, items in (("finding", answer.findings), ("landmark", answer.landmarks)):
        if len(items) > _MAX_OBJECTS:
            warnings.append(f"{len(items)} {kind} objects; only the first {_MAX_OBJECTS} read")
            del items[_MAX_OBJECTS:]
    findings: list[ParsedFinding] = []
    for index, obj in enumerate(answer.findings):
        parsed = _finding(obj, index, warnings)
        if parsed is not None:
            findings.append(parsed)
    findings = _dedupe(findings, warnings)
    landmarks = _landmarks(answer.landmarks, warnings)
    findings_text = answer.findings_text or prose_findings or ""
    impression = answer.impression or prose_impression or ""
    return ParsedPreread(
        findings=tuple(findings),
        landmarks=landmarks,
        findings_text=findings_text,
        impression=impression,
        structured=True,
        warnings=tuple(warnings),
    )
