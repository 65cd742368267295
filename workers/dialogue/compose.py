"""Answers in the question's language, composed from structured facts and the ontology.

The model is asked in English for structured output; what the user reads is written
here, in English or Simplified Chinese, from the anchors' stored facts (vocabulary terms
-> ontology names), the geometry (every number) and the model's structured values. The
model's own English explanation may be quoted, marked as the model's words, with any
number in it removed: numbers in answers come from geometry, never from model text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from sr_templates import ontology
from sr_templates.model import Anchor, AnchorDistance, Measurements

__all__ = [
    "Language",
    "anchor_name",
    "attributes_text",
    "clarify_text",
    "distance_text",
    "finding_line",
    "notice",
    "overview_text",
    "quote_model",
    "relation_text",
    "size_text",
]

Language = ontology.AnswerLanguage


def _term_name(term: str | None, language: Language) -> str:
    if not term:
        return ""
    for lookup in (ontology.site, ontology.landmark, ontology.finding):
        try:
            concept = lookup(term)
        except ValueError:
            continue
        return concept.en if language == "en" else concept.zh
    return term.replace("_", " ")


def _size(m: Measurements | None, language: Language) -> str:
    if m is None:
        return ""
    if language == "en":
        text = f"{m.long_axis:.1f} x {m.short_axis:.1f} {m.units}"
        return text + (" (pixels: the image has no pixel spacing)" if m.units == "px" else "")
    text = f"{m.long_axis:.1f} × {m.short_axis:.1f} {m.units}"
    return text + ("（像素：图像无像素间距）" if m.units == "px" else "")


def anchor_name(a: Anchor, language: Language) -> str:
    """ "A1 (right upper zone nodule)" / "A1（右上肺野结节）"."""
    if language == "en":
        what = a.label or _term_name(a.finding or a.site, "en")
        return f"{a.anchor_id} ({what})" if what else a.anchor_id
    parts = [_term_name(a.site, "zh")] if a.site else []
    if a.finding:
        parts.append(_term_name(a.finding, "zh"))
    what = "".join(parts)
    return f"{a.anchor_id}（{what}）" if what else a.anchor_id


def finding_line(a: Anchor, language: Language) -> str:
    """One finding with its site and its size from geometry."""
    size = _size(a.measurements, language)
    if language == "en":
        return f"{anchor_name(a, 'en')}" + (f", {size}" if size else "")
    return f"{anchor_name(a, 'zh')}" + (f"，大小 {size}" if size else "")


def overview_text(findings: Sequence[Anchor], language: Language, truncated: bool) -> str:
    if language == "en":
        if not findings:
            text = "The pre-read marked no abnormal finding in the lungs."
        else:
            lines = [f"The pre-read marked {len(findings)} finding(s):"]
            lines += [f"- {finding_line(a, 'en')}" for a in findings]
            lines.append("Sizes are computed from the outlined regions and the pixel spacing.")
            text = "\n".join(lines)
        if truncated:
            text += "\nThe model's answer was cut off: findings may be incomplete."
        return text
    if not findings:
        text = "预读未标出肺部异常。"
    else:
        lines = [f"预读共标出 {len(findings)} 处发现："]
        lines += [f"- {finding_line(a, 'zh')}" for a in findings]
        lines.append("大小由标出区域和像素间距计算得出。")
        text = "\n".join(lines)
    if truncated:
        text += "\n模型回答被截断：发现可能不完整。"
    return text


_REGULAR: Final = {"smooth": True, "lobulated": False, "spiculated": False, "ill_defined": False}


def attributes_text(
    a: Anchor, attributes: dict[str, str], refined: Measurements | None, language: Language
) -> str:
    """The model's reading of margin/shape/density of an anchor, and a refined outline."""
    en = language == "en"
    if not attributes:
        return (
            f"{anchor_name(a, 'en')}: the model gave no usable reading of its margin, shape "
            "or density on the full-resolution crop."
            if en
            else f"{anchor_name(a, 'zh')}：模型未能在全分辨率局部图像上"
            "给出可用的边缘、形态或密度判读。"
        )
    parts = []
    for name in ("margin", "shape", "density"):
        if name not in attributes:
            continue
        value = ontology.attribute_value(name, attributes[name])
        label = ontology.ATTRIBUTE_NAMES[name]
        parts.append(f"{label.en.lower()} {value.en.lower()}" if en else f"{label.zh}{value.zh}")
    text = (
        f"{anchor_name(a, 'en')}: {', '.join(parts)} (read by the model on a full-resolution "
        "crop of the region)."
        if en
        else f"{anchor_name(a, 'zh')}：{'，'.join(parts)}（模型在该区域的全分辨率局部图像上判读）。"
    )
    margin = attributes.get("margin")
    if margin in _REGULAR:
        if en:
            text += " The margin is " + ("regular." if _REGULAR[margin] else "not regular.")
        else:
            text += "边缘" + ("规则。" if _REGULAR[margin] else "不规则。")
    if refined is not None:
        size = _size(refined, language)
        text += (
            f" Its outline was refined on the crop: now {size} (from the new outline and the "
            "pixel spacing); the amended SR and SEG carry it."
            if en
            else f"病灶轮廓已在局部图像上细化：现为 {size}（由新轮廓和像素间距计算）；"
            "已发送修订的 SR 和 SEG。"
        )
    return text


def distance_text(d: AnchorDistance, a: Anchor, b: Anchor, language: Language) -> str:
    if language == "en":
        text = (
            f"Distance from {anchor_name(a, 'en')} to {anchor_name(b, 'en')}: "
            f"{d.centres:.1f} {d.units} between their centres, {d.edges:.1f} {d.units} "
            "between their nearest edges"
        )
        if d.edges == 0:
            text += " (the outlines touch or overlap)"
        text += ". Computed from the outlines and the pixel spacing"
        text += (
            " (ImagerPixelSpacing is at the detector, not corrected for magnification)."
            if d.units == "mm"
            else "; the image has no pixel spacing, so the values are in pixels."
        )
        return text
    text = (
        f"{anchor_name(a, 'zh')}与{anchor_name(b, 'zh')}的距离：中心间 {d.centres:.1f} {d.units}，"
        f"最近边缘间 {d.edges:.1f} {d.units}"
    )
    if d.edges == 0:
        text += "（轮廓相接或重叠）"
    text += "。由轮廓和像素间距计算" + (
        "（探测器平面像素间距，未校正放大率）。"
        if d.units == "mm"
        else "；图像无像素间距，数值为像素。"
    )
    return text


_CONNECTED_EN: Final = {
    "yes": "the model judges it connected to",
    "no": "the model judges it not connected to",
    "uncertain": "the model cannot tell whether it is connected to",
}
_CONNECTED_ZH: Final = {
    "yes": "模型判断其与",
    "no": "模型判断其不与",
    "uncertain": "模型无法判断其是否与",
}


def relation_text(
    a: Anchor, structure: Anchor, connected: str | None, explanation: str, language: Language
) -> str:
    if connected not in ("yes", "no", "uncertain"):
        connected = "uncertain"
    quoted = quote_model(explanation)
    if language == "en":
        text = f"{anchor_name(a, 'en')}: {_CONNECTED_EN[connected]} {anchor_name(structure, 'en')}."
        return text + (f' The model\'s words: "{quoted}"' if quoted else "")
    text = f"{anchor_name(a, 'zh')}：{_CONNECTED_ZH[connected]}{anchor_name(structure, 'zh')}相连。"
    return text + (f"模型的英文说明：“{quoted}”" if quoted else "")


def size_text(anchors: Sequence[Anchor], language: Language) -> str:
    lines = [finding_line(a, language) for a in anchors if a.measurements is not None]
    if not lines:
        return ""
    if language == "en":
        return "Sizes from the outlined regions and the pixel spacing: " + "; ".join(lines) + "."
    return "由标出区域和像素间距计算的大小：" + "；".join(lines) + "。"


def clarify_text(candidates: Sequence[Anchor], reason: str, language: Language) -> str:
    """A clarifying question listing the candidates: never a silent guess."""
    if language == "en":
        if not candidates:
            return (
                "Which finding do you mean? This study has no finding the question could "
                "refer to; name one by its anchor id (e.g. A1)."
            )
        names = "; ".join(finding_line(a, "en") for a in candidates)
        example = candidates[0].anchor_id
        return (
            f"Which one do you mean? {reason} Candidates: {names}. "
            f"Please name one (e.g. {example})."
        ).replace("  ", " ")
    if not candidates:
        return "请问您指的是哪个病灶？本检查没有可对应的发现；请用锚点编号（如 A1）指明。"
    names = "；".join(finding_line(a, "zh") for a in candidates)
    return f"请问您指的是哪一个？候选：{names}。请指明其一（如 {candidates[0].anchor_id}）。"


_NUMBER: Final = re.compile(
    r"[-+]?\d+(?:[.,]\d+)?\s*(?:mm|cm|millimet(?:er|re)s?|centimet(?:er|re)s?|%)?", re.IGNORECASE
)


def quote_model(text: str, limit: int = 300) -> str:
    """The model's explanation for quoting: one line, numbers removed (never facts)."""
    one = " ".join(text.split())
    one = _NUMBER.sub("[…]", one)
    return one[:limit].rstrip() + ("…" if len(one) > limit else "")


def notice(language: Language, is_demo: bool, model_id: str, prompt_version: str) -> str:
    """The safety statement every answer ends with, in the answer's language."""
    if language == "en":
        demo = "DEMO - not for clinical use. " if is_demo else ""
        return (
            f"({demo}AI-generated, preliminary, not a diagnosis; it does not replace a "
            f"radiologist's report. Model {model_id}, prompt {prompt_version}.)"
        )
    demo = "演示（DEMO）- 不可用于临床。" if is_demo else ""
    return (
        f"（{demo}AI 生成的初步结果，不是诊断，不能替代放射科医师的报告。"
        f"模型 {model_id}，提示词版本 {prompt_version}。）"
    )
