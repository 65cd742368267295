"""Which anchors a follow-up question is about, without a model.

:func:`resolve` reads a question (English or Chinese) against a study's anchors and the
anchor in focus (the one the conversation is about) and answers one of:

- :class:`Anchors` - the anchors the question names, in the order it names them
  (``scope="all"`` for a general question about the whole study);
- :class:`Clarify` - the candidates to ask the user about: never a silent guess;
- :class:`NewRegion` - a location no anchor covers, for the model to localise.

What a question may name, in the order the scanner looks for it:

1. explicit ids: "A2", "a2", "#2", "anchor 2"; an id is authoritative - words attached to
   it ("A1 right upper zone nodule", the tracking identifier; "is A2 in the left lung?")
   describe it and never name another anchor;
2. ordinals: "the second finding", "第二个发现" (among finding anchors, in anchor order),
   "the first nodule", "第一个结节" (among the nodules);
3. "the right one", "右边那个": the finding on that side, made unique by the focus (the
   one of the focus's finding type) or by being the only one there;
4. deixis: "this lesion", "that nodule", "这个病灶", "该病灶" and pronouns "it", "this",
   "它", "这" bind to the focus; a pronoun after another reference in the same question
   ("... A2 - is it calcified?") refers back to it and adds nothing;
5. descriptions: finding types, sites and landmarks, side words and shape words ("round
   shadow", "圆形影") from :mod:`sr_templates.ontology`; a site narrows through
   :func:`site_covers`.

Separators ("compared with", "from", "和", "距离", commas...) split descriptions, so
"the left lower zone nodule compared with A1" names two anchors. A question naming
nothing is general ("Is there anything abnormal?", "肺部是否有异常?": every finding)
when it says so, else it continues the conversation about the focus.

Only the standard library and sr_templates are imported: the ``resolve`` command runs
without a model or a database.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Final, Literal, Protocol, TypeAlias

from sr_templates import ontology

__all__ = [
    "ANCHOR_KINDS",
    "ROUND_FINDING_TYPES",
    "SIDES",
    "AnchorFacts",
    "Anchors",
    "Clarify",
    "ListedAnchor",
    "NewRegion",
    "Resolution",
    "parse_anchor_list",
    "resolution_json",
    "resolve",
    "site_covers",
]

ANCHOR_KINDS: Final = ("finding", "landmark", "region")
SIDES: Final = ("right", "left", "bilateral", "none")

#: Finding types a round or oval shape word ("round shadow", "圆形影") fits when the
#: anchor has no shape attribute of its own: focal lesions that are round by nature.
ROUND_FINDING_TYPES: Final = frozenset({"nodule", "mass"})
_ROUNDISH: Final = frozenset({"round", "oval"})


# ----------------------------------------------------------------------------- input


class AnchorFacts(Protocol):
    """What the resolver reads of an anchor (``sr_templates.model.Anchor`` has it all).

    ``finding`` is a pre-read finding term or None; ``site`` a pre-read site term, or for
    landmarks and regions the landmark (location) term; ``laterality`` is right, left,
    bilateral or none; ``attributes`` maps attribute -> value ("shape" -> "round").
    """

    @property
    def anchor_id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def finding(self) -> str | None: ...
    @property
    def site(self) -> str | None: ...
    @property
    def laterality(self) -> str: ...
    @property
    def attributes(self) -> Mapping[str, str]: ...


_ANCHOR_ID: Final = re.compile(r"A[1-9]\d{0,3}")


@dataclass(frozen=True)
class ListedAnchor:
    """One entry of an anchor file (``medgemma-node resolve --anchors FILE``)."""

    anchor_id: str
    kind: str = "finding"
    label: str = ""
    finding: str | None = None
    site: str | None = None
    laterality: str = "none"
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.anchor_id, str) or not _ANCHOR_ID.fullmatch(self.anchor_id):
            raise ValueError(f"anchor_id {self.anchor_id!r} must be 'A' and a number, e.g. 'A1'")
        for name in ("kind", "label", "laterality"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.kind not in ANCHOR_KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(ANCHOR_KINDS)}")
        if self.laterality not in SIDES:
            raise ValueError(f"laterality {self.laterality!r} is not one of {', '.join(SIDES)}")
        if self.finding is not None and self.finding not in ontology.FINDINGS:
            raise ValueError(f"finding {self.finding!r} is not a pre-read finding term")
        if self.kind == "finding" and self.finding is None:
            raise ValueError("a finding anchor needs a finding term, e.g. 'nodule'")
        if self.site is not None and _location_concept(self.site) is None:
            raise ValueError(f"site {self.site!r} is not a pre-read site or landmark term")
        if self.kind != "finding" and self.site is None:
            raise ValueError(f"a {self.kind} anchor needs its site (the landmark name)")
        if not isinstance(self.attributes, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.attributes.items()
        ):
            raise TypeError("attributes must map attribute names to string values")
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))


_FIELDS: Final = ("anchor_id", "kind", "label", "finding", "site", "laterality", "attributes")


def parse_anchor_list(data: object) -> tuple[ListedAnchor, ...]:
    """The anchors of an anchor file's JSON: a list of objects with anchor_id, kind
    (default "finding"), label, finding, site, laterality (default: the site's side) and
    optional attributes; other keys (a ledger anchor's region, tracking_uid...) are
    ignored. ValueError naming the entry and the rule otherwise."""
    if not isinstance(data, list):
        raise ValueError(f"the anchor file must hold a JSON list, not a {type(data).__name__}")
    anchors: list[ListedAnchor] = []
    seen: set[str] = set()
    for number, entry in enumerate(data, start=1):
        where = f"anchor {number}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a JSON object, not {type(entry).__name__}")
        if "anchor_id" in entry:
            where += f" ({entry['anchor_id']})"
        values = {k: entry[k] for k in _FIELDS if entry.get(k) is not None}
        if "laterality" not in values and isinstance(values.get("site"), str):
            concept = _location_concept(values["site"])
            values["laterality"] = concept.side if concept is not None else "none"
        try:
            anchor = ListedAnchor(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        if anchor.anchor_id in seen:
            raise ValueError(f"{where}: anchor_id {anchor.anchor_id} appears twice")
        seen.add(anchor.anchor_id)
        anchors.append(anchor)
    return tuple(anchors)


# ----------------------------------------------------------------------------- output


@dataclass(frozen=True)
class Anchors:
    """The anchors a question is about, in the order it names them.

    ``scope="all"`` marks a general question ("Is there anything abnormal in the
    lungs?"): ``ids`` are then every finding anchor of the study.
    """

    ids: tuple[str, ...]
    scope: Literal["named", "all"] = "named"


@dataclass(frozen=True)
class Clarify:
    """Ask the user which anchor is meant: ``candidates`` (ids), and why (English)."""

    candidates: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class NewRegion:
    """A location no anchor covers, for the model to localise as a new region anchor.

    ``term`` is a pre-read site or landmark term ("left_lung_apex"), ``text`` the
    question's words for it; ``anchors`` are the other anchors the question names
    ("How far is A1 from the left apex?" -> ("A1",)), in order.
    """

    term: str
    text: str
    anchors: tuple[str, ...] = ()


Resolution: TypeAlias = Anchors | Clarify | NewRegion


def resolution_json(resolution: Resolution) -> dict[str, object]:
    """The ``resolve`` command's JSON: {"anchors": [...]}, {"clarify": [...]} or
    {"new_region": "<term>"}."""
    if isinstance(resolution, Anchors):
        return {"anchors": list(resolution.ids)}
    if isinstance(resolution, Clarify):
        return {"clarify": list(resolution.candidates)}
    return {"new_region": resolution.term}


# ----------------------------------------------------------------------------- sites

# Where each site and landmark projects on a frontal chest radiograph, as areas per side
# (R./L. apex, upper, middle, lower zone, hilum, costophrenic angle...). Zones are thirds
# of the lung field; the apex lies in the upper zone. Lobes overlap zones: the right
# upper lobe projects to the upper and middle zones, the right middle lobe and lingula
# to the middle and lower zones (beside the heart border), the lower lobes to the middle
# (superior segment) and lower zones. Every area carries its side, so a right-sided
# location never covers a left-sided anchor.
_UPPER_R: Final = frozenset({"R.apex", "R.upper"})
_UPPER_L: Final = frozenset({"L.apex", "L.upper"})
_LUNG_R: Final = frozenset({"R.apex", "R.upper", "R.middle", "R.lower", "R.hilum"})
_LUNG_L: Final = frozenset({"L.apex", "L.upper", "L.middle", "L.lower", "L.hilum"})
_PROJECTION: Final[Mapping[str, frozenset[str]]] = MappingProxyType({
    "right_upper_zone": _UPPER_R,
    "right_middle_zone": frozenset({"R.middle"}),
    "right_lower_zone": frozenset({"R.lower"}),
    "left_upper_zone": _UPPER_L,
    "left_middle_zone": frozenset({"L.middle"}),
    "left_lower_zone": frozenset({"L.lower"}),
    "right_upper_lobe": _UPPER_R | {"R.middle"},
    "right_middle_lobe": frozenset({"R.middle", "R.lower"}),
    "right_lower_lobe": frozenset({"R.middle", "R.lower"}),
    "left_upper_lobe": _UPPER_L | {"L.middle"},
    "lingula": frozenset({"L.middle", "L.lower"}),
    "left_lower_lobe": frozenset({"L.middle", "L.lower"}),
    "right_lung": _LUNG_R,
    "left_lung": _LUNG_L,
    "both_lungs": _LUNG_R | _LUNG_L,
    "right_lung_apex": frozenset({"R.apex"}),
    "left_lung_apex": frozenset({"L.apex"}),
    "right_hilum": frozenset({"R.hilum"}),
    "left_hilum": frozenset({"L.hilum"}),
    "right_pleura": frozenset({"R.pleura", "R.cpa"}),
    "left_pleura": frozenset({"L.pleura", "L.cpa"}),
    "right_costophrenic_angle": frozenset({"R.cpa"}),
    "left_costophrenic_angle": frozenset({"L.cpa"}),
    "mediastinum": frozenset({"mediastinum", "trachea", "carina"}),
    "trachea": frozenset({"trachea", "carina"}),
    "carina": frozenset({"carina"}),
    "heart": frozenset({"heart", "R.heart_border", "L.heart_border"}),
    "right_heart_border": frozenset({"R.heart_border"}),
    "left_heart_border": frozenset({"L.heart_border"}),
})  # fmt: skip
_LOBES: Final = frozenset(
    {"right_upper_lobe", "right_middle_lobe", "right_lower_lobe", "left_upper_lobe",
     "lingula", "left_lower_lobe"}
)  # fmt: skip
# lobes are anatomy, not projections: one covers another only when it contains it
_LOBE_PARTS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {"left_upper_lobe": frozenset({"lingula"})}
)
_ZONES_AND_LOBES: Final = _LOBES | {
    f"{side}_{level}_zone" for side in ("right", "left") for level in ("upper", "middle", "lower")
}
_PARENCHYMA: Final = _ZONES_AND_LOBES | {"right_lung", "left_lung", "both_lungs"}


def _areas(term: str) -> frozenset[str]:
    return _PROJECTION.get(term, frozenset({term}))


def site_covers(question_site: str, anchor_site: str) -> bool:
    """Whether a location named in a question covers an anchor at ``anchor_site``.

    Covered: every area the anchor's site projects to lies in the question's location
    ("right lung" covers "right_upper_zone", "right middle lobe" covers
    "right_middle_zone"); or both are lung zones, lobes or lungs that overlap on the
    radiograph ("right middle zone" and an anchor in the right middle lobe). Two lobes
    are anatomy: one covers another only when it contains it (the lingula is part of
    the left upper lobe). A landmark (apex, hilum) covers only
    anchors at that landmark. Never across sides.
    """
    if question_site == anchor_site:
        return True
    if question_site in _LOBES and anchor_site in _LOBES:
        return anchor_site in _LOBE_PARTS.get(question_site, ())
    question, anchor = _areas(question_site), _areas(anchor_site)
    if anchor <= question:
        return True
    return question_site in _PARENCHYMA and anchor_site in _PARENCHYMA and bool(question & anchor)


def _location_concept(term: str) -> ontology.ChestConcept | None:
    return ontology.SITES.get(term) or ontology.LANDMARKS.get(term)


def _side_of(anchor: AnchorFacts) -> str:
    if anchor.laterality in ("right", "left", "bilateral"):
        return anchor.laterality
    concept = _location_concept(anchor.site) if anchor.site else None
    return concept.side if concept is not None else "none"


# ----------------------------------------------------------------------------- words

_HAN: Final = re.compile(r"[\u3400-\u9fff]")
_WORD: Final = re.compile(r"[a-z0-9]+|[\u3400-\u9fff]")


def _norm_en(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


def _en_alternation(forms: Iterable[str]) -> str:
    parts = {r"[\s-]+".join(re.escape(w) for w in form.split()) for form in forms}
    return "|".join(sorted(parts, key=len, reverse=True))


def _plurals(noun: str) -> tuple[str, ...]:
    if noun.endswith("y"):
        return (noun[:-1] + "ies",)
    if noun.endswith(("s", "x", "sh", "ch")):
        return (noun + "es",)
    return (noun + "s",)


def _finding_forms() -> dict[str, tuple[str, bool]]:
    """English name (normalised) -> (finding term, plural) for every finding name."""
    forms: dict[str, tuple[str, bool]] = {}
    for concept in ontology.FINDINGS.values():
        for name in (concept.term, *concept.names_en):
            norm = _norm_en(name)
            forms.setdefault(norm, (concept.term, False))
            for plural in _plurals(norm):
                forms.setdefault(plural, (concept.term, True))
    return forms


_EN_FINDING_FORMS: Final = _finding_forms()
_ZH_FINDING_NAMES: Final = sorted(
    {n for c in ontology.FINDINGS.values() for n in c.names_zh}, key=len, reverse=True
)
# words for "a lesion" that name no finding type
_EN_GENERIC: Final = ("lesion", "finding", "abnormality", "opacity", "shadow", "spot",
                      "area", "region", "thing", "density", "anchor")  # fmt: skip
_EN_GENERIC_FORMS: Final = {
    **{n: False for n in _EN_GENERIC},
    **{p: True for n in _EN_GENERIC for p in _plurals(n)},
}
_ZH_GENERIC: Final = ("病灶", "病变", "密度影", "阴影", "影", "发现", "异常", "区域", "部位")

_EN_FINDING_RE: Final = _en_alternation(_EN_FINDING_FORMS)
_EN_GENERIC_RE: Final = _en_alternation(_EN_GENERIC_FORMS)
_EN_SINGULAR_NOUN: Final = _en_alternation(
    [f for f, (_, plural) in _EN_FINDING_FORMS.items() if not plural] + [*_EN_GENERIC, "one"]
)
_ZH_NOUN: Final = "|".join(
    re.escape(n) if n != "影" else "影(?![像响])" for n in (*_ZH_FINDING_NAMES, *_ZH_GENERIC)
)

_EN_ORDINALS: Final = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6,
    "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10, "last": -1,
}  # fmt: skip
_ZH_DIGITS: Final = {"一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7,
                     "八": 8, "九": 9}  # fmt: skip

_ID_RE: Final = re.compile(
    r"(?<![A-Za-z0-9])[Aa]0*(?P<a>[1-9]\d{0,3})(?![0-9])"
    r"|[#＃]\s?0*(?P<hash>[1-9]\d{0,3})(?![0-9])"
    r"|\banchor\s+#?0*(?P<word>[1-9]\d{0,3})(?![0-9])",
    re.IGNORECASE,
)
_ORDINAL_RE: Final = re.compile(
    r"\b(?:the\s+)?(?P<en>" + "|".join(_EN_ORDINALS) + r"|\d{1,2}(?:st|nd|rd|th))\s+"
    r"(?P<en_noun>" + _EN_SINGULAR_NOUN + r")\b"
    r"|第\s*(?P<zh>[一二两三四五六七八九十]{1,3}|\d{1,2})\s*"
    r"(?:(?:个|处|项|条|枚)\s*(?P<zh_noun>" + _ZH_NOUN + r")?|(?P<zh_noun2>" + _ZH_NOUN + r"))"
    r"|最后(?:一个|一处)\s*(?P<zh_last>" + _ZH_NOUN + r")?",
    re.IGNORECASE,
)
_SIDE_ONE_RE: Final = re.compile(
    r"\bthe\s+(?P<en>right|left)(?:[\s-]+sided|\s+side)?\s+one\b"
    r"|\bthe\s+one\s+on\s+the\s+(?P<en2>right|left)\b"
    r"|(?P<zh>[右左])(?:边|侧|面)(?:的)?(?:那一个|那个|那处|这个|的)",
    re.IGNORECASE,
)
_DEIXIS_RE: Final = re.compile(
    r"\b(?:this|that|the\s+same)\s+(?P<en_noun>" + _EN_SINGULAR_NOUN + r")\b"
    r"|(?<![应因从如彼])(?:这一个|这一|这个|这处|那一个|那个|那处|这|该|此)\s*(?:个|处|枚)?\s*"
    r"(?P<zh_noun>" + _ZH_NOUN + r")",
    re.IGNORECASE,
)
_NOT_A_LESION: Final = (
    r"(?:image|film|study|x-?ray|radiograph|exam|examination|picture|scan|patient|case|"
    r"question|report|time|view|chest|lungs?)"
)
_PRONOUN_RE: Final = re.compile(
    r"\b(?P<it>it|its|it's|itself)\b"
    r"|\b(?P<this>this)\b(?!\s+" + _NOT_A_LESION + r"\b)"
    r"|\b(?P<that>that)\b(?=\s*(?:[?.!,;]|$))"
    r"|(?P<zh_it>它(?!们)|其(?![他余中实次]))"
    r"|(?P<zh_this>这个|这里|这儿|这处|此处|该处|这(?=是|为|会|可能|属于))",
    re.IGNORECASE,
)
_EN_SIDE_RE: Final = re.compile(r"\b(?P<side>right|left)(?:[\s-]+sided|\s+side)?\b", re.I)
_ZH_SIDE_RE: Final = re.compile(r"(?P<side>[右左])(?:边|面)")
_PLURAL_RE: Final = re.compile(
    r"\b(?:both|all|two|three|these|those|each|every|multiple|several)\b"
    r"|两个|两处|两枚|三个|所有|这些|那些|各个|全部|多个|多发|多处|几个",
    re.IGNORECASE,
)
_SEPARATOR_RE: Final = re.compile(
    r"\b(?:and|or|but|vs|versus|compared?|comparing|than|from|to|with|between|near|next|"
    r"beside|besides|adjacent|touch\w*|reach\w*|contact\w*|abut\w*|connect\w*|involv\w*|"
    r"toward\w*|plus|also|then|whereas|while)\b"
    r"|[,;:?.!()/，；：？。！（）、]|\s-\s|--"
    r"|和|与|及|跟|同|比|相比|对比|距离|离|到|至|靠近|邻近|接近|接触|相连|还是|或",
    re.IGNORECASE,
)
_EXISTENTIAL_RE: Final = re.compile(
    r"\b(?:is|are)\s+there\b|\bany(?:thing)?\b"
    r"|\bdo(?:es)?\s+(?:you|it|this|the\s+\w+)\s+(?:see|show|have)\b"
    r"|是否有|有没有|有无|是否存在|是否可见|可见|有(?![多几])[^?？。,，]{0,8}[吗么]",
    re.IGNORECASE,
)
_GENERAL_RE: Final = re.compile(
    r"\b(?:anything|abnormal\w*|findings|everything|overall|summar\w*|impression|wrong|"
    r"normal|unusual)\b|异常|所见|总结|概括|正常|哪些",
    re.IGNORECASE,
)
_MAX_GAP_WORDS: Final = 5  # words (or Han characters) between parts of one description


# ----------------------------------------------------------------------------- scanning


TokenKind = Literal["id", "ordinal", "side_one", "deixis", "pronoun"]
ElementKind = Literal["finding", "location", "shape", "side", "noun", "plural"]


@dataclass(frozen=True)
class _Token:
    """A reference that is not a description: an id, ordinal, deixis or pronoun."""

    kind: TokenKind
    start: int
    end: int
    text: str
    anchor_id: str = ""
    ordinal: int = 0  # 1-based; -1 = the last
    finding: str | None = None  # the finding type its noun names ("this nodule")
    side: str = ""
    demonstrative: bool = False  # "this", "这个": may introduce a description


@dataclass(frozen=True)
class _Element:
    """One word of a description."""

    kind: ElementKind
    start: int
    end: int
    text: str
    term: str = ""
    landmark: bool = False
    plural: bool = False


@dataclass
class _Description:
    elements: list[_Element]

    @property
    def start(self) -> int:
        return self.elements[0].start

    @property
    def end(self) -> int:
        return self.elements[-1].end

    def _terms(self, kind: ElementKind) -> list[str]:
        return list(dict.fromkeys(e.term for e in self.elements if e.kind == kind))

    @property
    def findings(self) -> list[str]:
        return self._terms("finding")

    @property
    def locations(self) -> list[_Element]:
        return [e for e in self.elements if e.kind == "location"]

    @property
    def shapes(self) -> list[str]:
        return self._terms("shape")

    @property
    def sides(self) -> list[str]:
        return self._terms("side")

    @property
    def has_noun(self) -> bool:
        return any(e.kind == "noun" for e in self.elements)

    @property
    def plural(self) -> bool:
        return any(e.kind == "plural" or e.plural for e in self.elements)

    @property
    def substantive(self) -> bool:
        return any(e.kind in ("finding", "location", "noun") for e in self.elements)

    @property
    def generic(self) -> bool:
        """Only a word for "a lesion": no finding, place, side or shape."""
        return all(e.kind in ("noun", "plural") for e in self.elements)

    @property
    def text(self) -> str:
        return " ".join(e.text for e in self.elements)


@dataclass
class _Mention:
    token: _Token | None = None
    description: _Description | None = None  # its own, or attached to the token


class _Claims:
    def __init__(self) -> None:
        self._spans: list[tuple[int, int]] = []

    def free(self, start: int, end: int) -> bool:
        return all(end <= s or start >= e for s, e in self._spans)

    def take(self, start: int, end: int) -> None:
        self._spans.append((start, end))


def _zh_number(text: str) -> int:
    if text.isdigit():
        return int(text)
    if text == "十":
        return 10
    if text.startswith("十"):
        return 10 + _ZH_DIGITS.get(text[1:], 0)
    if "十" in text:
        tens, _, ones = text.partition("十")
        return _ZH_DIGITS.get(tens, 0) * 10 + (_ZH_DIGITS.get(ones, 0) if ones else 0)
    return _ZH_DIGITS.get(text, 0)


def _noun_finding(noun: str | None) -> str | None:
    """The finding type a noun names ("nodules" -> nodule, "结节" -> nodule), or None."""
    if not noun:
        return None
    if _HAN.search(noun):
        concept = ontology.lookup(noun, "finding")
        return concept.term if concept is not None else None
    form = _EN_FINDING_FORMS.get(_norm_en(noun))
    return form[0] if form is not None else None


def _scan_tokens(question: str, claims: _Claims) -> list[_Token]:
    tokens: list[_Token] = []

    def add(token: _Token) -> None:
        if claims.free(token.start, token.end):
            claims.take(token.start, token.end)
            tokens.append(token)

    for m in _ID_RE.finditer(question):
        number = m["a"] or m["hash"] or m["word"]
        add(_Token("id", m.start(), m.end(), m[0], anchor_id=f"A{int(number)}"))
    for m in _ORDINAL_RE.finditer(question):
        if m["en"]:
            word = m["en"].lower()
            n = _EN_ORDINALS.get(word) or int(re.sub(r"\D", "", word))
            noun = m["en_noun"]
        elif m["zh"]:
            n, noun = _zh_number(m["zh"]), m["zh_noun"] or m["zh_noun2"]
        else:
            n, noun = -1, m["zh_last"]
        add(_Token("ordinal", m.start(), m.end(), m[0], ordinal=n, finding=_noun_finding(noun)))
    for m in _SIDE_ONE_RE.finditer(question):
        side_word = (m["en"] or m["en2"] or m["zh"]).lower()
        if m["zh"] and re.match(r"\s*的?\s*(?:" + _ZH_NOUN + ")", question[m.end() :]):
            continue  # "右边那个结节": a side and a noun, a description
        side = "right" if side_word in ("right", "右") else "left"
        add(_Token("side_one", m.start(), m.end(), m[0], side=side))
    for m in _DEIXIS_RE.finditer(question):
        noun = m["en_noun"] or m["zh_noun"]
        add(_Token("deixis", m.start(), m.end(), m[0], finding=_noun_finding(noun)))
    for m in _PRONOUN_RE.finditer(question):
        demonstrative = bool(m["this"] or m["that"] or m["zh_this"])
        add(_Token("pronoun", m.start(), m.end(), m[0], demonstrative=demonstrative))
    return tokens


def _scan_elements(question: str, claims: _Claims) -> list[_Element]:
    elements: list[_Element] = []

    def add(element: _Element) -> None:
        if claims.free(element.start, element.end):
            claims.take(element.start, element.end)
            elements.append(element)

    shapes: list[_Element] = []
    for match in ontology.find_terms(question):
        concepts = match.concepts
        finding = next((c for c in concepts if c.kind == "finding"), None)
        location = next((c for c in concepts if c.kind in ("site", "landmark")), None)
        shape_value = next((c for c in concepts if c.attribute == "shape"), None)
        side_value = next((c for c in concepts if c.kind == "laterality"), None)
        span = (match.start, match.end, match.text)
        if finding is not None:
            add(_Element("finding", *span, term=finding.term))
        elif location is not None:
            landmark = any(c.kind == "landmark" for c in concepts)
            add(_Element("location", *span, term=location.term, landmark=landmark))
        elif shape_value is not None:
            shapes.append(_Element("shape", *span, term=shape_value.term))
        elif side_value is not None:
            add(_Element("side", *span, term=side_value.side))
    for m in re.finditer(r"\b(?:" + _EN_FINDING_RE + r")\b", question, re.IGNORECASE):
        term, plural = _EN_FINDING_FORMS[_norm_en(m[0])]
        add(_Element("finding", m.start(), m.end(), m[0], term=term, plural=plural))
    for m in re.finditer(r"\b(?:" + _EN_GENERIC_RE + r")\b", question, re.IGNORECASE):
        plural = _EN_GENERIC_FORMS[_norm_en(m[0])]
        add(_Element("noun", m.start(), m.end(), m[0], plural=plural))
    for m in re.finditer(_ZH_NOUN, question):
        if _noun_finding(m[0]) is None:
            add(_Element("noun", m.start(), m.end(), m[0]))
    for side_re in (_EN_SIDE_RE, _ZH_SIDE_RE):
        for m in side_re.finditer(question):
            side = "right" if m["side"].lower() in ("right", "右") else "left"
            add(_Element("side", m.start(), m.end(), m[0], term=side))
    for m in _PLURAL_RE.finditer(question):
        add(_Element("plural", m.start(), m.end(), m[0]))
    # a shape word describes only when a noun follows: "round shadow", "圆形影";
    # "is it round?" asks about the shape
    for word in shapes:
        gap = re.match(r"[\s-]*(?:的)?\s*", question[word.end :])
        at = word.end + (gap.end() if gap else 0)
        if any(e.start == at and e.kind in ("finding", "noun") for e in elements):
            add(word)
    return sorted(elements, key=lambda e: e.start)


def _joinable(question: str, start: int, end: int) -> bool:
    """Whether the text between two parts lets them belong to one description."""
    gap = question[start:end]
    return not _SEPARATOR_RE.search(gap) and len(_WORD.findall(gap.lower())) <= _MAX_GAP_WORDS


def _immediate(question: str, start: int, end: int) -> bool:
    return re.fullmatch(r"[\s的]*", question[start:end]) is not None


def _mentions(question: str) -> list[_Mention]:
    claims = _Claims()
    tokens = _scan_tokens(question, claims)
    elements = _scan_elements(question, claims)
    items: list[_Token | _Element] = sorted([*tokens, *elements], key=lambda i: i.start)

    # descriptions: runs of elements with no separator and no token between them
    sequence: list[_Token | _Description] = []
    for item in items:
        last = sequence[-1] if sequence else None
        if isinstance(item, _Token):
            sequence.append(item)
        elif isinstance(last, _Description) and _joinable(question, last.end, item.start):
            last.elements.append(item)
        else:
            sequence.append(_Description([item]))

    # a description next to an id, ordinal or deixis (no separator between) belongs to it
    attached: dict[int, _Description] = {}
    absorbed: set[int] = set()
    for i, part in enumerate(sequence):
        if not isinstance(part, _Description) or not part.substantive:
            continue
        before = sequence[i - 1] if i > 0 else None
        after = sequence[i + 1] if i + 1 < len(sequence) else None
        if isinstance(before, _Token) and _joinable(question, before.end, part.start):
            if before.kind in ("id", "ordinal", "deixis") and id(before) not in attached:
                attached[id(before)] = part
                absorbed.add(id(part))
                continue
            if before.kind == "pronoun":
                if before.demonstrative and _immediate(question, before.end, part.start):
                    continue  # "this right upper zone nodule": the description speaks
                absorbed.add(id(part))  # "is it in the left lung?": says what "it" is
                continue
        if (
            isinstance(after, _Token)
            and after.kind in ("id", "ordinal", "deixis")
            and id(after) not in attached
            and _joinable(question, part.end, after.start)
        ):
            attached[id(after)] = part
            absorbed.add(id(part))

    mentions: list[_Mention] = []
    for part in sequence:
        if isinstance(part, _Token):
            mentions.append(_Mention(token=part, description=attached.get(id(part))))
        elif part.substantive and id(part) not in absorbed:
            mentions.append(_Mention(description=part))
    return mentions


# ----------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class _Context:
    anchors: Sequence[AnchorFacts]
    focus: AnchorFacts | None
    existential: bool

    @property
    def findings(self) -> list[AnchorFacts]:
        return [a for a in self.anchors if a.kind == "finding"]

    def by_id(self, anchor_id: str) -> AnchorFacts | None:
        return next((a for a in self.anchors if a.anchor_id == anchor_id), None)


def _ids(anchors: Iterable[AnchorFacts]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(a.anchor_id for a in anchors))


def _shape_fits(shape: str, anchor: AnchorFacts) -> bool:
    own = anchor.attributes.get("shape")
    if own:
        return own == shape or {own, shape} <= _ROUNDISH
    if anchor.finding is None:
        return False
    return (shape in _ROUNDISH) == (anchor.finding in ROUND_FINDING_TYPES)


def _side_fits(side: str, anchor: AnchorFacts) -> bool:
    return _side_of(anchor) in (side, "bilateral")


def _finding_fits(findings: Sequence[str], anchor: AnchorFacts) -> bool:
    return anchor.finding in findings


def _location_fits(locations: Sequence[str], anchor: AnchorFacts) -> bool:
    site = anchor.site
    return site is not None and all(site_covers(q, site) for q in locations)


def _facets(description: _Description) -> list[Callable[[AnchorFacts], bool]]:
    """One test per thing the description says: finding type, shape, place, side."""
    facets: list[Callable[[AnchorFacts], bool]] = []
    if description.findings:
        facets.append(partial(_finding_fits, description.findings))
    facets += [partial(_shape_fits, shape) for shape in description.shapes]
    locations = [e.term for e in description.locations]
    if locations:
        facets.append(partial(_location_fits, locations))
    facets += [partial(_side_fits, side) for side in description.sides]
    return facets


def _described_side(description: _Description) -> str:
    sides = set(description.sides)
    for element in description.locations:
        concept = _location_concept(element.term)
        if concept is not None:
            sides.add(concept.side)
    sides &= {"right", "left"}
    return sides.pop() if len(sides) == 1 else ""


def _everything(ctx: _Context) -> Anchors:
    return Anchors(_ids(ctx.findings), scope="all")


def _describe(
    description: _Description, ctx: _Context, noun_finding: str | None = None
) -> Resolution:
    """The anchors a description fits, or whom to ask, or the place to localise.

    Exact fits win (one, or all of them for a plural, an "is there" question or a bare
    place); else the place's own landmark or region anchor; else a place no anchor
    covers is a new region; else the anchors that fit in part, on the described side.
    """
    if noun_finding and noun_finding not in description.findings:
        end = description.end
        noun = _Element("finding", end, end, noun_finding, term=noun_finding)
        description = _Description([*description.elements, noun])
    findings = description.findings
    locations = [e.term for e in description.locations]
    what = description.text
    places = [a for a in ctx.anchors if a.kind != "finding" and a.site in locations[:1]]
    if places and not (findings or description.shapes or description.has_noun):
        return Anchors(_ids(places))  # a bare place ("the right hilum", "右肺门")
    pool = [a for a in ctx.anchors if a.kind == "finding" or (a.kind == "region" and not findings)]
    facets = _facets(description)
    exact = [a for a in pool if all(f(a) for f in facets)]
    # a place alone means everything there; a plural or "is there" means every fit
    many = (
        description.plural
        or ctx.existential
        or not (findings or description.shapes or description.has_noun)
    )
    if exact:
        if len(exact) == 1 or many:
            return Anchors(_ids(exact))
        return Clarify(_ids(exact), f"{len(exact)} anchors fit {what!r} equally")
    if places:
        return Anchors(_ids(places))  # "the nodule at the left apex", once it is localised
    if locations:
        covered = [a for a in ctx.anchors if _location_fits(locations, a)]
        if not covered:
            return NewRegion(description.locations[0].term, description.locations[0].text)
        there = [a for a in covered if a.kind != "landmark"]
        if ctx.existential and there:
            return Anchors(_ids(there))  # "is there a nodule in ...?": what is there
    elif ctx.existential:
        return _everything(ctx)
    side = _described_side(description)
    scored = [(sum(f(a) for f in facets), a) for a in pool if not side or _side_fits(side, a)]
    best = max((score for score, _ in scored), default=0)
    if best > 0:
        in_part = [a for score, a in scored if score == best]
        return Clarify(_ids(in_part), f"no anchor fits {what!r}; these fit it in part")
    return Clarify(_ids(ctx.findings), f"no anchor fits {what!r}")


def _focus_or_clarify(ctx: _Context, what: str) -> Resolution:
    if ctx.focus is not None:
        return Anchors((ctx.focus.anchor_id,))
    return Clarify(_ids(ctx.findings), f"{what!r} refers to the anchor in focus, and none is")


def _resolve_token(token: _Token, attached: _Description | None, ctx: _Context) -> Resolution:
    if token.kind == "id":
        if ctx.by_id(token.anchor_id) is not None:
            return Anchors((token.anchor_id,))
        return Clarify(_ids(ctx.findings), f"this study has no anchor {token.anchor_id}")
    if token.kind == "ordinal":
        pool = ctx.findings
        if token.finding:
            pool = [a for a in pool if a.finding == token.finding]
        if attached is not None:
            facets = _facets(attached)
            pool = [a for a in pool if all(f(a) for f in facets)]
        index = len(pool) - 1 if token.ordinal == -1 else token.ordinal - 1
        if 0 <= index < len(pool):
            return Anchors((pool[index].anchor_id,))
        return Clarify(
            _ids(pool or ctx.findings), f"{token.text!r}: there are {len(pool)} such anchors"
        )
    if token.kind == "side_one":
        side_pool = [a for a in ctx.findings if _side_of(a) == token.side]
        if ctx.focus is not None and ctx.focus.finding:
            same = [a for a in side_pool if a.finding == ctx.focus.finding]
            if len(same) == 1:
                return Anchors((same[0].anchor_id,))
        if len(side_pool) == 1:
            return Anchors((side_pool[0].anchor_id,))
        return Clarify(_ids(side_pool or ctx.findings), f"{token.text!r} fits more than one")
    if token.kind == "deixis":
        if attached is not None:  # "右上肺那个结节", "this nodule in the left lung"
            return _describe(attached, ctx, token.finding)
        focus = ctx.focus
        if focus is not None:
            if token.finding and focus.finding != token.finding:
                others = [a for a in ctx.findings if a.finding == token.finding]
                return Clarify(
                    _ids([focus, *others]),
                    f"{token.text!r}: the anchor in focus, {focus.anchor_id}, is not a "
                    f"{token.finding}",
                )
            return Anchors((focus.anchor_id,))
        if token.finding:
            fits = [a for a in ctx.findings if a.finding == token.finding]
            if len(fits) == 1:
                return Anchors((fits[0].anchor_id,))
            return Clarify(_ids(fits or ctx.findings), f"{token.text!r}: no anchor in focus")
        return _focus_or_clarify(ctx, token.text)
    return _focus_or_clarify(ctx, token.text)


def _combine(resolved: list[Resolution]) -> Resolution:
    clarify = [r for r in resolved if isinstance(r, Clarify)]
    if clarify:
        ids = tuple(dict.fromkeys(i for r in clarify for i in r.candidates))
        return Clarify(ids, "; ".join(r.reason for r in clarify))
    named = tuple(dict.fromkeys(i for r in resolved if isinstance(r, Anchors) for i in r.ids))
    regions = [r for r in resolved if isinstance(r, NewRegion)]
    if regions:
        return NewRegion(regions[0].term, regions[0].text, named)
    every = any(isinstance(r, Anchors) and r.scope == "all" for r in resolved)
    return Anchors(named, scope="all" if every else "named")


def resolve(
    question: str, anchors: Sequence[AnchorFacts], *, focus: str | None = None
) -> Resolution:
    """What ``question`` is about among ``anchors`` (in anchor order), with the anchor
    ``focus`` (an anchor id) in focus, if any.

    ValueError when ``focus`` is not one of the anchors; TypeError for a question that
    is not a string.
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    focus_anchor: AnchorFacts | None = None
    if focus is not None:
        focus_anchor = next((a for a in anchors if a.anchor_id == focus), None)
        if focus_anchor is None:
            known = ", ".join(a.anchor_id for a in anchors) or "none"
            raise ValueError(f"focus {focus!r} is not one of the anchors ({known})")
    ctx = _Context(anchors, focus_anchor, bool(_EXISTENTIAL_RE.search(question)))

    resolved: list[Resolution] = []
    for mention in _mentions(question):
        token, description = mention.token, mention.description
        if token is not None and token.kind == "pronoun":
            # "it" after another reference refers back to it and adds nothing
            if not resolved:
                resolved.append(_focus_or_clarify(ctx, token.text))
        elif token is not None:
            resolved.append(_resolve_token(token, description, ctx))
        elif description is None:
            continue
        elif description.generic and (description.plural or ctx.existential):
            resolved.append(_everything(ctx))  # "the findings", "是否有异常"
        elif description.generic:  # "the lesion": like "it", or any one finding
            if not resolved:
                by_focus = ctx.focus is not None
                what = description.text
                resolved.append(
                    _focus_or_clarify(ctx, what) if by_focus else _describe(description, ctx)
                )
        else:
            resolved.append(_describe(description, ctx))
    if resolved:
        return _combine(resolved)
    if ctx.existential or _GENERAL_RE.search(question):
        return _everything(ctx)
    if ctx.focus is not None:
        return Anchors((ctx.focus.anchor_id,))  # names nothing: still about the focus
    return Clarify(_ids(ctx.findings), "the question names no finding and none is in focus")
