"""Which studies get a pre-read: chest radiographs (CR/DX) by header, configurable in node.toml."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from node.ledger import SeriesSummary
from node.settings import PrereadSettings


@dataclass(frozen=True)
class PrereadDecision:
    preread: bool
    reason: str  # shown by `status`; says which rule matched or why none did


def _has_cjk(term: str) -> bool:
    return any("\u3400" <= ch <= "\u9fff" for ch in term)


def _matches(text: str, terms: Sequence[str]) -> str | None:
    """The first term found in text: whole words for Latin terms, substrings for CJK terms."""
    if not text:
        return None
    folded = text.casefold()
    for term in terms:
        t = term.strip().casefold()
        if not t:
            continue
        if _has_cjk(t):
            if t in folded:
                return term
        elif re.search(rf"(?<![0-9a-z]){re.escape(t)}(?![0-9a-z])", folded):
            return term
    return None


def decide_preread(
    series: Sequence[SeriesSummary], study_description: str, rules: PrereadSettings
) -> PrereadDecision:
    """Pre-read a study when a series has a pre-read modality and a chest indication.

    The chest indication is a configured term in BodyPartExamined, SeriesDescription,
    ProtocolName or StudyDescription, or a chest view position (PA, AP, LL, ...) on a
    series whose body part is empty. A BodyPartExamined naming another region wins over a
    chest term in the study description.
    """
    modalities = {m.upper() for m in rules.modalities}
    eligible = [s for s in series if s.modality.upper() in modalities]
    if not eligible:
        found = sorted({s.modality or "?" for s in series})
        return PrereadDecision(
            False,
            f"no {'/'.join(sorted(modalities))} series (modalities: {', '.join(found)})",
        )
    views = {v.upper() for v in rules.chest_view_positions}
    for s in eligible:
        for field, value in (
            ("BodyPartExamined", s.body_part),
            ("SeriesDescription", s.series_description),
            ("ProtocolName", s.protocol_name),
        ):
            term = _matches(value, rules.chest_terms)
            if term:
                return PrereadDecision(True, f"{s.modality} {field} matches {term!r}")
    body_parts = sorted({s.body_part for s in eligible if s.body_part})
    if not body_parts:
        term = _matches(study_description, rules.chest_terms)
        if term:
            return PrereadDecision(True, f"StudyDescription matches {term!r}")
        for s in eligible:
            if s.view_position.upper() in views:
                return PrereadDecision(True, f"{s.modality} ViewPosition {s.view_position}")
    return PrereadDecision(
        False,
        "not a chest study"
        + (f" (BodyPartExamined: {', '.join(body_parts)})" if body_parts else ""),
    )
