"""Versioned prompts of the follow-up turns: describe a region, localise a structure, and
judge whether a lesion is connected to a structure.

Each follow-up is a grounded single turn, not a growing chat (MedGemma was evaluated on
single-turn tasks): the whole frontal image, for describe and relation a full-resolution
crop around the anchor (:func:`workers.imaging.crop_source`, resized to the model's input
size), and the anchor's facts as text (:class:`AnchorBrief`). The model is always asked in
English for one fenced json block after "Final Answer:"; the user-facing answer is composed
elsewhere from the parsed result (:mod:`workers.dialogue.answers`) in the question's
language.

Coordinates follow the MedGemma convention: ``box_2d = [y0, x0, y1, x1]``, integers in
0-1000 of the image they refer to (the padded square of the whole image, or the crop).
Left and right are the patient's. The vocabularies come from :mod:`sr_templates.ontology`.

The system text is the pre-read's (:data:`workers.prompts.READER_SYSTEM`), word for word:
Gemma 3 puts it in front of the first image, so a follow-up's prompt starts with exactly
the tokens of its study's pre-read up to the end of the whole image, and the engine reuses
the pre-read's work on them. What a follow-up is (:data:`FOLLOWUP_CONTEXT`) is said after
the images, under the task line.

Every stored follow-up records :data:`FOLLOWUP_PROMPT_VERSION`; change it whenever the
wording, a vocabulary or a schema here changes. Each prompt holds one task line that no
other prompt contains; engines recognise the task by it (:func:`followup_task`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

from sr_templates import ontology
from workers.prompts import READER_SYSTEM

__all__ = [
    "DESCRIBE_TASK_LINE",
    "FOLLOWUP_PROMPT_VERSION",
    "FOLLOWUP_SCHEMAS",
    "LOCALISE_TASK_LINE",
    "RELATION_TASK_LINE",
    "RELATION_VALUES",
    "AnchorBrief",
    "FollowupTask",
    "build_describe_prompt",
    "build_localise_prompt",
    "build_relation_prompt",
    "followup_task",
    "localise_target",
    "target_name",
]

FOLLOWUP_PROMPT_VERSION: Final = "followup-2026.12.2"

FollowupTask = Literal["describe", "localise", "relation"]

DESCRIBE_TASK_LINE: Final = "Task: describe one region of a chest radiograph."
LOCALISE_TASK_LINE: Final = "Task: localise one anatomical structure on a chest radiograph."
RELATION_TASK_LINE: Final = "Task: relation of one lesion to an anatomical structure."

#: The answers a relation prompt allows, in the order the prompt lists them.
RELATION_VALUES: Final[tuple[str, ...]] = ("yes", "no", "uncertain")

_TASK_LINES: Final[tuple[tuple[str, FollowupTask], ...]] = (
    (DESCRIBE_TASK_LINE, "describe"),
    (LOCALISE_TASK_LINE, "localise"),
    (RELATION_TASK_LINE, "relation"),
)

# The pre-read's system text, word for word: Gemma 3 puts it in front of the first image,
# so only an identical one lets a follow-up reuse the pre-read's image prefix.
FOLLOWUP_SYSTEM: Final = READER_SYSTEM
#: Said after the images (the system text is shared with the pre-read).
FOLLOWUP_CONTEXT: Final = (
    "This radiograph has had a preliminary AI read; you are answering a follow-up question "
    "about it."
)

_LATERALITY_RULE: Final = (
    "Left and right are the PATIENT's left and right, not the viewer's: on a frontal image "
    "the patient's right side is on the left of the image, and the patient's left is where "
    "the heart is."
)
_NO_NUMBERS_RULE: Final = (
    "Never state sizes, distances or other measurements: they are computed from the boxes."
)
_MAX_EARLIER: Final = 6  # earlier answers quoted in a prompt, most recent last
_MAX_QUOTED_CHARS: Final = 300

Box = tuple[int, int, int, int]


def followup_task(prompt: str) -> FollowupTask | None:
    """The follow-up task whose task line ``prompt`` contains; None for any other prompt."""
    if not isinstance(prompt, str):
        return None
    for line, task in _TASK_LINES:
        if line in prompt:
            return task
    return None


# ------------------------------------------------------------------------------ facts


def _check_box(name: str, value: Any) -> Box:
    if (
        not isinstance(value, tuple | list)
        or len(value) != 4
        or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
    ):
        raise TypeError(f"AnchorBrief.{name} must be 4 ints [y0, x0, y1, x1], got {value!r}")
    y0, x0, y1, x1 = value
    if not (0 <= y0 < y1 <= 1000 and 0 <= x0 < x1 <= 1000):
        raise ValueError(
            f"AnchorBrief.{name} must satisfy 0 <= y0 < y1 <= 1000 and 0 <= x0 < x1 <= 1000, "
            f"got {tuple(value)!r}"
        )
    return (y0, x0, y1, x1)


@dataclass(frozen=True)
class AnchorBrief:
    """What a follow-up prompt states about one anchor (all of it known to the node).

    anchor_id: the anchor's id in the dialogue ("A1").
    label: the anchor's label as first written (any language; quoted, not trusted).
    finding: a FINDINGS term of :mod:`sr_templates.ontology`, or None (a landmark/region).
    site: a SITES or LANDMARKS term, or None.
    laterality: "right" | "left" | "bilateral" | "none".
    box_2d_whole: the anchor's box on the whole image, [y0, x0, y1, x1] in 0-1000 of the
        padded square the model sees.
    box_2d_crop: the same box in 0-1000 of the crop sent as the second image; None when
        no crop is sent (the prompt then states the whole-image box only).
    size_text: the anchor's size from geometry, already worded ("14 x 12 mm"); "" unknown.
    attributes: attribute name -> value term already stored (ATTRIBUTES vocabulary).
    earlier: earlier answers about this anchor, oldest first (sentences, quoted).
    """

    anchor_id: str
    label: str
    finding: str | None
    site: str | None
    laterality: str
    box_2d_whole: Box
    box_2d_crop: Box | None
    size_text: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    earlier: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.anchor_id, str) or not self.anchor_id.strip():
            raise ValueError(
                f"AnchorBrief.anchor_id must be a non-empty str, got {self.anchor_id!r}"
            )
        if not isinstance(self.label, str):
            raise TypeError(f"AnchorBrief.label must be a str, got {type(self.label).__name__}")
        if self.finding is not None and self.finding not in ontology.FINDINGS:
            raise ValueError(
                f"AnchorBrief.finding {self.finding!r} is not a FINDINGS term of the ontology"
            )
        if (
            self.site is not None
            and self.site not in ontology.SITES
            and self.site not in ontology.LANDMARKS
        ):
            raise ValueError(
                f"AnchorBrief.site {self.site!r} is not a SITES or LANDMARKS term of the ontology"
            )
        if self.laterality not in ontology.LATERALITY_TERMS:
            raise ValueError(
                f"AnchorBrief.laterality {self.laterality!r} is not one of "
                f"{ontology.LATERALITY_TERMS}"
            )
        object.__setattr__(self, "box_2d_whole", _check_box("box_2d_whole", self.box_2d_whole))
        if self.box_2d_crop is not None:
            object.__setattr__(self, "box_2d_crop", _check_box("box_2d_crop", self.box_2d_crop))
        if not isinstance(self.size_text, str):
            raise TypeError("AnchorBrief.size_text must be a str")
        attributes: dict[str, str] = {}
        for name, value in dict(self.attributes).items():
            ontology.attribute_value(name, value)  # ValueError naming the attribute
            attributes[name] = value
        object.__setattr__(self, "attributes", MappingProxyType(attributes))
        earlier = tuple(self.earlier)
        if any(not isinstance(e, str) for e in earlier):
            raise TypeError("AnchorBrief.earlier must hold str answers")
        object.__setattr__(self, "earlier", earlier)


def _quoted(text: str) -> str:
    """One line of untrusted text, quoted: no newlines or fences, at most 300 characters."""
    flat = " ".join(text.replace("```", "'''").split())
    if len(flat) > _MAX_QUOTED_CHARS:
        flat = flat[: _MAX_QUOTED_CHARS - 3].rstrip() + "..."
    return f'"{flat}"'


def _box_text(box: Box) -> str:
    return f"[{box[0]}, {box[1]}, {box[2]}, {box[3]}]"


def _site_name(term: str) -> str:
    concept = ontology.LANDMARKS.get(term) or ontology.SITES.get(term)
    return concept.en if concept is not None else term.replace("_", " ")


def _facts_block(facts: AnchorBrief) -> str:
    """The anchor's facts, one per line, in the wording every follow-up prompt uses."""
    lines = [f"Region {facts.anchor_id}, first labelled {_quoted(facts.label)}:"]
    if facts.finding is not None:
        lines.append(f"- finding: {ontology.FINDINGS[facts.finding].en}")
    if facts.site is not None:
        lines.append(f"- site: {_site_name(facts.site)}")
    if facts.laterality != "none":
        lines.append(f"- side: the patient's {facts.laterality}")
    lines.append(
        f"- box on the FIRST image (the whole radiograph): box_2d {_box_text(facts.box_2d_whole)}"
    )
    if facts.box_2d_crop is not None:
        lines.append(f"- box on the SECOND image (the crop): box_2d {_box_text(facts.box_2d_crop)}")
    if facts.size_text.strip():
        lines.append(f"- size measured from that box: {' '.join(facts.size_text.split())}")
    if facts.attributes:
        described = ", ".join(
            f"{name} {ontology.ATTRIBUTES[name][value].en}"
            for name, value in facts.attributes.items()
        )
        lines.append(f"- recorded so far: {described}")
    earlier = facts.earlier[-_MAX_EARLIER:]
    if earlier:
        lines.append("- earlier answers about this region (oldest first):")
        lines.extend(f"  {_quoted(answer)}" for answer in earlier)
    return "\n".join(lines)


_TWO_IMAGES: Final = (
    "You are given two images of the same frontal (PA or AP) chest radiograph: the FIRST is "
    "the whole image; the SECOND is a full-resolution crop centred on one region of it."
)


def _vocabulary(name: str) -> str:
    return ", ".join(f'"{term}"' for term in ontology.ATTRIBUTES[name])


# ------------------------------------------------------------------------------ describe


def build_describe_prompt(facts: AnchorBrief) -> tuple[str, str]:
    """``(system, prompt)`` asking for the margin, shape and density of the lesion in the
    anchor's region and a tighter ``box_2d`` of it in 0-1000 of the SECOND image (the crop).

    Images to send, in order: the whole frontal model image, the crop model image.
    """
    prompt = f"""{DESCRIBE_TASK_LINE}
{FOLLOWUP_CONTEXT}
{_TWO_IMAGES}

{_facts_block(facts)}

Look mainly at the SECOND image and describe the lesion in this region:
  "margin": exactly one of {_vocabulary("margin")};
  "shape": exactly one of {_vocabulary("shape")};
  "density": exactly one of {_vocabulary("density")};
  "box_2d": [y0, x0, y1, x1], the smallest box around the lesion on the SECOND image
    (the crop), where (y0, x0) is the top-left and (y1, x1) the bottom-right corner;
    integers normalised to 0-1000 of the second image;
  "explanation": one or two sentences on what you see.

Rules:
- {_LATERALITY_RULE}
- {_NO_NUMBERS_RULE}
- Use null for a property you cannot judge, and "box_2d": null when you cannot see a lesion.

Reason briefly first. Then write "Final Answer:" followed by exactly ONE fenced json block
containing a single object:
```json
{{"margin": "...", "shape": "...", "density": "...", "box_2d": [y0, x0, y1, x1],
 "explanation": "..."}}
```"""
    return FOLLOWUP_SYSTEM, prompt


# ------------------------------------------------------------------------------ localise


def target_name(target: str) -> str:
    """The English name of a LANDMARKS or SITES term ("right_hilum" -> "right hilum");
    ValueError naming ``target`` for any other value."""
    if not isinstance(target, str):
        raise TypeError(f"target must be a str, got {type(target).__name__}")
    concept = ontology.LANDMARKS.get(target) or ontology.SITES.get(target)
    if concept is None:
        raise ValueError(f"target {target!r} is not a LANDMARKS or SITES term of the ontology")
    return concept.en


_WHERE: Final = re.compile(r"^Where is the (?P<name>[^?\n]+)\?$", re.MULTILINE)


def build_localise_prompt(target: str) -> tuple[str, str]:
    """``(system, prompt)`` asking where one structure is, MedGemma's own localisation
    convention: one object per call, reasoning, "Final Answer:", one fenced json list of
    ``{"box_2d": [y0, x0, y1, x1], "label": ...}`` in 0-1000 of the padded square.

    target: a LANDMARKS or SITES term ("right_hilum", "left_lung_apex", "left_upper_zone").
    Images to send: the whole frontal model image only.
    """
    name = target_name(target)
    prompt = f"""{LOCALISE_TASK_LINE}
{FOLLOWUP_CONTEXT}
You are given one frontal (PA or AP) chest radiograph.

Where is the {name}?

{_LATERALITY_RULE}
Give the smallest box around the {name}: "box_2d" is [y0, x0, y1, x1], where (y0, x0) is
the top-left and (y1, x1) the bottom-right corner, integers normalised to 0-1000 of the
image as given. If you cannot see it, give an empty list [].

Reason briefly first. Then write "Final Answer:" followed by exactly ONE fenced json block
containing a list:
```json
[{{"box_2d": [y0, x0, y1, x1], "label": "{name}"}}]
```"""
    return FOLLOWUP_SYSTEM, prompt


def localise_target(prompt: str) -> str | None:
    """The LANDMARKS or SITES term a localise prompt asks for; None for any other prompt."""
    if followup_task(prompt) != "localise":
        return None
    match = _WHERE.search(prompt)
    if match is None:
        return None
    name = match.group("name").strip()
    for table in (ontology.LANDMARKS, ontology.SITES):
        for term, concept in table.items():
            if concept.en == name:
                return term
    return None


# ------------------------------------------------------------------------------ relation


def build_relation_prompt(facts: AnchorBrief, landmark: str) -> tuple[str, str]:
    """``(system, prompt)`` asking whether the anchor's lesion is connected to (contiguous
    with) ``landmark``, a LANDMARKS or SITES term ("right_hilum"). Answer: one object
    ``{"connected": "yes" | "no" | "uncertain", "explanation": ...}``.

    Images to send, in order: the whole frontal model image, the crop around the lesion.
    """
    name = target_name(landmark)
    choices = ", ".join(f'"{value}"' for value in RELATION_VALUES)
    prompt = f"""{RELATION_TASK_LINE}
{FOLLOWUP_CONTEXT}
{_TWO_IMAGES}

{_facts_block(facts)}

Is the lesion in this region connected to, or contiguous with, the {name}?
  "connected": exactly one of {choices}: "yes" when the lesion touches or merges with
    the {name}, or a band of opacity joins them; "no" when aerated lung separates them
    all the way; "uncertain" when the images do not show it;
  "explanation": one or two sentences on what you see between them.

Rules:
- {_LATERALITY_RULE}
- {_NO_NUMBERS_RULE}

Reason briefly first. Then write "Final Answer:" followed by exactly ONE fenced json block
containing a single object:
```json
{{"connected": "...", "explanation": "..."}}
```"""
    return FOLLOWUP_SYSTEM, prompt


# ------------------------------------------------------------------------------ schemas

_BOX_SCHEMA: Final[dict[str, Any]] = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 1000},
    "minItems": 4,
    "maxItems": 4,
}


def _nullable_enum(name: str) -> dict[str, Any]:
    return {"enum": [*ontology.ATTRIBUTES[name], None]}


#: Small JSON schemas of each task's answer value, for servers that constrain decoding
#: (vLLM ``response_format``). They constrain the whole output, which leaves no room for
#: the reasoning the prompts ask for: use them where that trade is measured to pay.
FOLLOWUP_SCHEMAS: Final[Mapping[FollowupTask, Mapping[str, Any]]] = MappingProxyType(
    {
        "describe": {
            "title": "followup_describe",
            "type": "object",
            "properties": {
                "margin": _nullable_enum("margin"),
                "shape": _nullable_enum("shape"),
                "density": _nullable_enum("density"),
                "box_2d": {"anyOf": [_BOX_SCHEMA, {"type": "null"}]},
                "explanation": {"type": "string", "maxLength": 600},
            },
            "required": ["margin", "shape", "density", "box_2d", "explanation"],
            "additionalProperties": False,
        },
        "localise": {
            "title": "followup_localise",
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"box_2d": _BOX_SCHEMA, "label": {"type": "string"}},
                "required": ["box_2d", "label"],
                "additionalProperties": False,
            },
            "maxItems": 2,
        },
        "relation": {
            "title": "followup_relation",
            "type": "object",
            "properties": {
                "connected": {"enum": list(RELATION_VALUES)},
                "explanation": {"type": "string", "maxLength": 600},
            },
            "required": ["connected", "explanation"],
            "additionalProperties": False,
        },
    }
)
