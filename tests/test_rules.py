"""Which studies are pre-read: chest CR/DX by header, in English and local terms."""

from __future__ import annotations

import pytest

from node.ledger import SeriesSummary
from node.rules import decide_preread
from node.settings import PrereadSettings


def series(
    modality: str = "CR", body_part: str = "", view: str = "", desc: str = "", protocol: str = ""
) -> SeriesSummary:
    return SeriesSummary("1.2", modality, body_part, view, desc, protocol, 1)


@pytest.mark.parametrize(
    ("s", "study_description", "expected"),
    [
        (series(body_part="CHEST"), "", True),
        (series(body_part="chest"), "", True),
        (series(modality="DX", body_part="THORAX"), "", True),
        (series(body_part="", protocol="Thorax p.a."), "", True),
        (series(body_part="", desc="胸部正位"), "", True),
        (series(body_part=""), "胸片", True),
        (series(body_part="", view="PA"), "", True),
        (series(body_part="", desc="Rö Lunge"), "LUNGS", True),
        (series(body_part="KNEE"), "", False),
        (series(body_part="KNEE", view="PA"), "", False),
        (series(body_part="HAND"), "CHEST", False),  # the body part wins
        (series(modality="CT", body_part="CHEST"), "", False),
        (series(body_part="", desc="SPATIAL"), "", False),  # "PA" inside a word is no match
    ],
)
def test_decide_preread(s: SeriesSummary, study_description: str, expected: bool) -> None:
    decision = decide_preread([s], study_description, PrereadSettings())
    assert decision.preread is expected, decision.reason
    assert decision.reason


def test_reason_names_what_was_found() -> None:
    d = decide_preread([series(modality="MR", body_part="BRAIN")], "", PrereadSettings())
    assert d.reason == "no CR/DX series (modalities: MR)"
    d = decide_preread([series(body_part="KNEE")], "", PrereadSettings())
    assert d.reason == "not a chest study (BodyPartExamined: KNEE)"


def test_rules_are_configurable() -> None:
    rules = PrereadSettings(modalities=["DX"], chest_terms=["TORSO"])
    assert not decide_preread([series(body_part="CHEST")], "", rules).preread
    assert decide_preread([series(modality="DX", body_part="TORSO")], "", rules).preread
