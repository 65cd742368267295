"""Turn raw pre-read model text into typed, validated findings and landmarks.

The answer JSON is found and decoded by :mod:`workers.lenient_json` (thinking traces,
"Final Answer:", fences, almost-JSON, truncated output); this module recognises it as a
pre-read and reads its values as vocabulary terms with :mod:`workers.chest_terms`, whose
vocabulary is :mod:`sr_templates.ontology`. It never raises on any ``str``: what it
cannot use becomes a warning, and when no JSON can be recovered the result is a text-only
pre-read (``structured=False``) whose narrative is the cleaned text.

Boxes are ``(y0, x0, y1, x1)`` integers in 0-1000 of the model-ready square image (the
padded frame), the MedGemma convention; mapping back to source pixels is done elsewhere.
:func:`workers.chest_terms.box_2d` documents how boxes are repaired (0-1 scaling,
clipping, swapped corners).

The readers of single values that follow-up answer parsers need are re-exported here:
:func:`attribute_value`, :func:`box_2d`, :func:`site`, :func:`landmark`,
:func:`finding_type`, :func:`box_iou`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sr_templates.ontology import Side
from workers import chest_terms
from workers.chest_terms import attribute_value, box_2d, box_iou, finding_type, landmark, site
from workers.lenient_json import extract_json

__all__ = [
    "DUPLICATE_IOU",
    "ParsedFinding",
    "ParsedLandmark",
    "ParsedPreread",
    "attribute_value",
    "box_2d",
    "box_iou",
    "finding_type",
    "landmark",
    "parse_preread",
    "site",
]

log = logging.getLogger(__name__)

DUPLICATE_IOU = 0.7
_MAX_OBJECTS = 64  # findings (and landmarks) read from one answer; a 4B model writes far fewer
# A finding type whose site goes without saying when the model gives none.
_DEFAULT_SITE = {"cardiomegaly": "heart", "widened_mediastinum": "mediastinum"}
# Keys a model writes for the box; the attribute keys it may write at the finding's top level.
_BOX_KEYS = ("box_2d", "box2d", "box", "bbox", "bounding_box", "boundingbox", "coordinates")
_TOP_LEVEL_ATTRIBUTE_KEYS = ("margin", "margins", "border", "edge", "density", "attenuation",
                             "shape", "morphology")  # fmt: skip


@dataclass(frozen=True)
class ParsedFinding:
    """One abnormal finding: vocabulary terms of :mod:`sr_templates.ontology`, box in 0-1000.

    label: the model's own wording (any language), kept verbatim.
    finding: one of ``FINDING_TYPES`` ("other" when the model's term is unknown).
    site: one of ``SITES`` or None when unknown.
    laterality: the patient's side, one of ``LATERALITY_TERMS``.
    box_2d: (y0, x0, y1, x1), 0-1000 of the padded square image, y0 < y1, x0 < x1.
    attributes: subset of ``ATTRIBUTE_VALUES`` (key -> allowed value).
    raw: the object as the model wrote it (after lenient decoding).
    """

    label: str
    finding: str
    site: str | None
    laterality: Side
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
    label = _label_of(obj)
    return chest_terms.landmark(label) is not None and chest_terms.finding_type(label) is None


def _finding(obj: Any, index: int, warnings: list[str]) -> ParsedFinding | None:
    what = f"finding {index + 1}"
    if not isinstance(obj, dict):
        warnings.append(f"{what}: not an object; dropped")
        return None
    box = chest_terms.box_2d(_box_value(obj), warnings, what)
    if box is None:
        return None
    label = _label_of(obj)
    raw_type = obj.get("finding", obj.get("finding_type", obj.get("type")))
    finding = chest_terms.finding_type(raw_type)
    if finding is None:
        finding = chest_terms.finding_type(label)
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
    site = chest_terms.site(raw_site)
    if site is None and raw_site not in (None, ""):
        warnings.append(f"{what}: site {raw_site!r} not in the vocabulary")
    if site is None:
        site = chest_terms.site(label) or _DEFAULT_SITE.get(finding)
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
) -> Side:
    """Site wins over the laterality field and the label; a disagreement is a warning."""
    field_lat = chest_terms.laterality(raw)
    if raw not in (None, "") and field_lat is None:
        warnings.append(f"{what}: laterality {raw!r} not understood")
    label_lat = chest_terms.side_of(label) if label else None
    site_lat = chest_terms.site_side(site)
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
        return field_lat
    return label_lat or "none"


def _attributes(obj: dict[str, Any], what: str, warnings: list[str]) -> dict[str, str]:
    source: dict[str, Any] = {}
    nested = obj.get("attributes")
    if isinstance(nested, dict):
        source.update(nested)
    elif nested not in (None, "", []):
        warnings.append(f"{what}: attributes not an object; ignored")
    for key in _TOP_LEVEL_ATTRIBUTE_KEYS:  # attributes written at the finding's top level
        if key in obj and key not in source:
            source[key] = obj[key]
    result: dict[str, str] = {}
    for key, value in source.items():
        canonical = chest_terms.attribute_name(str(key))
        if canonical is None:
            warnings.append(f"{what}: attribute {key!r} not in the vocabulary; dropped")
            continue
        term = chest_terms.attribute_value(canonical, value)
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
        name = chest_terms.landmark(label)
        if name is None:
            warnings.append(f"{what}: unknown landmark {label!r}; dropped")
            continue
        box = chest_terms.box_2d(_box_value(obj), warnings, f"{what} ({name})")
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


def _box_value(obj: dict[str, Any]) -> Any:
    lowered = {str(k).lower().replace(" ", "_"): v for k, v in obj.items()}
    for key in _BOX_KEYS:
        if key in lowered:
            return lowered[key]
    return None


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


# ---------------------------------------------------------------- entry point


def parse_preread(text: str) -> ParsedPreread:
    """Parse one pre-read answer. Never raises: problems become ``warnings``."""
    try:
        return _parse(text)
    except Exception as exc:  # a parser bug must not fail a pre-read: keep the text, say so
        log.exception("pre-read parser failed; keeping text only")
        cleaned = text if isinstance(text, str) else repr(text)
        return ParsedPreread((), (), cleaned.strip(), "", False, (f"parser error: {exc!r}",))


def _is_answer(value: Any) -> bool:
    return _interpret(value, []) is not None


def _parse(text: str) -> ParsedPreread:
    decoded = extract_json(text, accept=_is_answer)
    warnings = list(decoded.warnings)
    answer = _interpret(decoded.value, warnings) if decoded.found else None
    prose_findings = _section(decoded.text_outside, _FINDINGS_HEAD)
    prose_impression = _section(decoded.text_outside, _IMPRESSION_HEAD)

    if answer is None:
        if decoded.text:
            warnings.append("no JSON answer found; text-only result")
        else:
            warnings.append("empty answer")
        return ParsedPreread(
            findings=(),
            landmarks=(),
            findings_text=decoded.text,
            impression=prose_impression or "",
            structured=False,
            warnings=tuple(warnings),
        )

    if decoded.truncated:
        warnings.append(
            f"output truncated; kept the {len(answer.findings)} complete finding object(s) "
            f"before the cut, dropped {decoded.dropped_partial} partial object(s)"
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
