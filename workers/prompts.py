"""Versioned prompts for MedGemma, and the vocabularies they ask for.

Every result stores :data:`PROMPT_VERSION`; change it whenever a prompt's wording or a
vocabulary changes, so that stored results can be traced to the text that produced them.

The vocabulary tuples here (:data:`FINDING_TYPES`, :data:`SITES`, :data:`LANDMARKS`,
:data:`LATERALITIES`, :data:`ATTRIBUTE_VALUES`) are read from :mod:`sr_templates.ontology`,
the one definition of the vocabulary (with codes, English and Chinese terms), in the
order the prompt lists them; :mod:`workers.parsing` validates against the same tables and
the demo engine emits only their terms.

Coordinates follow the MedGemma convention: ``box_2d = [y0, x0, y1, x1]``, integers
normalised to 0-1000 of the image as the model sees it (padded to square, so 0-1000 spans
the padded square, not the original detector area). Left and right are the patient's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from sr_templates import ontology
from workers.lenient_json import strip_thinking

PROMPT_VERSION = "preread-2026.12.1"

FINDING_TYPES: tuple[str, ...] = tuple(ontology.FINDINGS)
SITES: tuple[str, ...] = tuple(ontology.SITES)
LANDMARKS: tuple[str, ...] = tuple(ontology.LANDMARKS)
LATERALITIES: tuple[str, ...] = ontology.LATERALITY_TERMS
ATTRIBUTE_VALUES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {name: tuple(values) for name, values in ontology.ATTRIBUTES.items()}
)

# A sentence only the pre-read prompt contains: engines and tests recognise the task by it.
PREREAD_TASK_LINE = "Task: structured pre-read of a chest radiograph."

READER_SYSTEM = (
    "You are an expert thoracic radiologist reading chest radiographs. Your output is "
    "AI-generated, preliminary, and is reviewed by a radiologist; describe only what is "
    "visible, say when the image is normal, and say when you cannot tell."
)
"""The one system text of the pre-read and of every follow-up prompt.

Gemma 3's chat template puts the system text in front of the first image, so the prompt
prefix that ends with a study's frontal image is the same for its pre-read and its
follow-ups only when their system texts are identical: the engine then reuses the
pre-read's image work for the first follow-up (``workers.engines.medgemma``). What differs
between the tasks is said in the user text, after the images (the task line and the
context sentence under it)."""

PREREAD_CONTEXT = "You are assisting with a preliminary read of this study."


def _quoted(values: tuple[str, ...]) -> str:
    return ", ".join(f'"{v}"' for v in values)


def _attribute_lines() -> str:
    return "\n".join(f'    "{key}": {_quoted(vals)}' for key, vals in ATTRIBUTE_VALUES.items())


def build_preread_prompt(has_lateral: bool) -> tuple[str, str]:
    """Return ``(system, user)`` for the pre-read of one chest radiograph study.

    has_lateral: True when a lateral view is sent as the second image; boxes always refer
    to the first (frontal) image.
    """
    if has_lateral:
        images = (
            "You are given two images of the same study: the first is the frontal (PA or AP) "
            "chest radiograph, the second is the lateral view. Use the lateral view to "
            "confirm and localise findings, but give every box on the FIRST (frontal) image."
        )
    else:
        images = "You are given one frontal (PA or AP) chest radiograph."
    user = f"""{PREREAD_TASK_LINE}
{PREREAD_CONTEXT}
{images}

Report:
(a) every abnormal finding, each as a JSON object with these keys:
  "box_2d": [y0, x0, y1, x1], the smallest box around the finding, where (y0, x0) is the
    top-left and (y1, x1) the bottom-right corner, so y0 < y1 and x0 < x1; integers
    normalised to 0-1000 of the image as given (a box starting at 15% of the image width
    has x0 = 150);
  "label": a short description, e.g. "right lower zone nodule";
  "finding": exactly one of {_quoted(FINDING_TYPES)};
  "site": exactly one of {_quoted(SITES)};
  "laterality": one of {_quoted(LATERALITIES)};
  "attributes" (optional, only what is visible): an object with any of
{_attribute_lines()}
(b) these anatomical landmarks, each as {{"box_2d": [y0, x0, y1, x1], "label": name}} with
  name exactly one of {_quoted(LANDMARKS)}; leave out a landmark you cannot see;
(c) a short narrative: "findings_text" (what you see, as in the Findings section of a
  report) and "impression" (one or two sentences).

Rules:
- Left and right are the PATIENT's left and right, not the viewer's: on a PA frontal
  image the patient's right side is on the left of the image, and the cardiac apex
  points to the patient's left.
- Never state sizes, distances or other measurements: they are computed from the boxes.
- If there are no abnormal findings, "findings" is an empty list [] and the narrative
  says the study is normal.
- Use "other" for a finding type that is not in the list, and describe it in "label".

You may reason briefly first. Then write "Final Answer:" followed by exactly ONE fenced
json block containing a single object:
```json
{{"findings": [{{"box_2d": [y0, x0, y1, x1], "label": "...", "finding": "...",
   "site": "...", "laterality": "...", "attributes": {{}}}}],
 "landmarks": [{{"box_2d": [y0, x0, y1, x1], "label": "..."}}],
 "findings_text": "...",
 "impression": "..."}}
```"""
    return READER_SYSTEM, user


def is_preread_prompt(prompt: str) -> bool:
    """True when ``prompt`` is (or contains) the user text of :func:`build_preread_prompt`."""
    return PREREAD_TASK_LINE in prompt


# ------------------------------------------------------------------ chest check

#: Version of the chest check prompt (logged with its answer; the pre-read has its own).
CHEST_CHECK_VERSION = "chest-check-2026.12.1"
# A sentence only the chest check prompt contains: engines and tests recognise it by it.
CHEST_CHECK_TASK_LINE = "Task: is this image a frontal chest radiograph?"

CHEST_CHECK_SYSTEM = (
    "You are an expert radiologist sorting incoming radiographs by body part and view."
)


def build_chest_check_prompt() -> tuple[str, str]:
    """Return ``(system, user)`` for the yes/no question asked of one image whose header
    names no body part (``preread.ask_engine_if_unlabelled``): is it a frontal (PA or AP)
    chest radiograph?"""
    user = f"""{CHEST_CHECK_TASK_LINE}
You are given one radiograph whose header does not say which body part it shows.
Is it a frontal (PA or AP) radiograph of the chest, showing both lungs?
Answer "yes" or "no". You may reason briefly first; then write "Final Answer:" followed by
exactly one word, yes or no."""
    return CHEST_CHECK_SYSTEM, user


def is_chest_check_prompt(prompt: str) -> bool:
    """True when ``prompt`` is (or contains) the user text of :func:`build_chest_check_prompt`."""
    return CHEST_CHECK_TASK_LINE in prompt


def parse_chest_check(text: str) -> bool | None:
    """The answer to the chest check: True (yes), False (no) or None (neither, or both).

    Reads the words after the last "Final Answer:" when there is one, else the whole text
    (thinking traces removed).
    """
    answer = strip_thinking(text)
    marker = answer.lower().rfind("final answer:")
    if marker >= 0:
        answer = answer[marker + len("final answer:") :]
    words = set(re.findall(r"[a-z]+", answer.lower()))
    yes, no = "yes" in words, "no" in words
    return None if yes == no else yes
