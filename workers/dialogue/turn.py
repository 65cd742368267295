"""One follow-up turn: resolve the question to anchors, do what it asks, compose the answer.

Plain functions, no database and no broker (workers.followup stores what a turn gives):

question -> intents (workers.dialogue.intents) and anchors (workers.dialogue.resolve,
with the anchor in focus from the earlier turns) -> for each intent:

- overview: the pre-read findings with sites and sizes;
- attributes: a grounded single-turn prompt (the whole image, a full-resolution crop of
  the anchor, the anchor's facts and earlier answers about it) asks the model for margin,
  shape, density and a tighter box; the anchor gets a new version (same tracking UID)
  when an attribute or the outline changes;
- distance: centres and nearest edges in mm from the two regions and the pixel spacing;
- relation: the model is asked whether the lesion is connected to the structure;
- checklist: the condition's typical signs checked against the anchor's stored facts;
- size: sizes from geometry.

A location no anchor covers is localised by the model and becomes a new anchor. An
ambiguous question gets a clarifying answer listing the candidates, never a guess. What
the turn could not produce raises TurnFailed: the caller stores a not-done answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydicom.uid import generate_uid

from sr_templates import ontology, signs
from sr_templates.model import Anchor, AnchorDistance, PrereadResult, Region
from workers.dialogue import compose
from workers.dialogue.answers import parse_describe, parse_localise, parse_relation
from workers.dialogue.intents import Intent, detect_intents
from workers.dialogue.prompts import (
    FOLLOWUP_SCHEMAS,
    AnchorBrief,
    FollowupTask,
    build_describe_prompt,
    build_localise_prompt,
    build_relation_prompt,
)
from workers.dialogue.resolve import Anchors, Clarify, NewRegion, resolve
from workers.engines.base import (
    Engine,
    EngineError,
    EngineRequest,
    TransientEngineError,
    prefill,
    prefix_metadata,
)
from workers.geometry import ROUND_FINDINGS, iou, measure, region_distance
from workers.imaging import DisplayImage, SquareTransform, crop_source, to_model_image

__all__ = [
    "TransientTurnError",
    "TurnFailed",
    "TurnInput",
    "TurnOutput",
    "anchor_brief",
    "answer_turn",
    "describe_crop",
    "followup_request",
    "prefill_followups",
]

# A box the model returns on the crop replaces the anchor's outline only when it is
# really different (IoU below this) and still on the same lesion (IoU above the floor).
REFINE_MAX_IOU = 0.9
REFINE_MIN_IOU = 0.3


class TurnFailed(Exception):
    """The turn could not produce an answer (engine error, nothing to localise)."""


class TransientTurnError(Exception):
    """The engine is busy or out of memory for now: the turn is worth running again."""


@dataclass(frozen=True)
class EarlierTurn:
    """What a new turn needs of an earlier one."""

    question: str
    answer: str
    resolved: tuple[str, ...]
    focus: str | None


@dataclass(frozen=True)
class TurnInput:
    question: str
    language: compose.Language
    result: PrereadResult  # current: anchors at their latest versions
    turn: int  # this turn's number (1 = the first follow-up)
    engine: Engine
    image: Callable[[], DisplayImage]  # the frontal image the anchors are drawn on
    earlier: Sequence[EarlierTurn] = ()
    anchor_hint: str | None = None  # an anchor id given with the question (FHIR)
    study_uid: str = ""  # lets the engine reuse the study's whole-image prefix


@dataclass
class TurnOutput:
    outcome: Literal["answered", "clarify"]
    text: str
    resolved: tuple[str, ...]
    focus: str | None
    intents: tuple[Intent, ...]
    anchors: tuple[Anchor, ...] = ()  # new anchor versions and new anchors
    distances: tuple[AnchorDistance, ...] = ()
    model_outputs: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def amends(self) -> bool:
        """The turn changed what the SR/SEG say: an amended pair goes to the PACS."""
        return bool(self.anchors or self.distances)


class _Turn:
    """The working state of one turn."""

    def __init__(self, inp: TurnInput) -> None:
        self.inp = inp
        self.lang = inp.language
        self.anchors: dict[str, Anchor] = {a.anchor_id: a for a in inp.result.anchors}
        self.changed: dict[str, Anchor] = {}
        self.distances: list[AnchorDistance] = []
        self.outputs: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self._image: DisplayImage | None = None
        self._whole: tuple[Any, SquareTransform] | None = None

    # --- images and the engine -------------------------------------------------------

    def image(self) -> DisplayImage:
        if self._image is None:
            started = time.monotonic()
            self._image = self.inp.image()
            self.timings["image_s"] = round(time.monotonic() - started, 3)
        return self._image

    def whole(self) -> tuple[Any, SquareTransform]:
        if self._whole is None:
            self._whole = to_model_image(self.image())
        return self._whole

    def ask(self, task: FollowupTask, images: tuple[Any, ...], system: str, prompt: str) -> str:
        started = time.monotonic()
        request = followup_request(self.inp.study_uid, task, images, system, prompt)
        try:
            (text,) = self.inp.engine.generate([request])
        except TransientEngineError as exc:
            raise TransientTurnError(f"the model is busy ({task}): {exc}") from exc
        except EngineError as exc:
            raise TurnFailed(f"the model could not answer ({task}): {exc}") from exc
        seconds = round(time.monotonic() - started, 3)
        self.outputs.append({"task": task, "text": text, "seconds": seconds})
        self.timings[f"{task}_s"] = self.timings.get(f"{task}_s", 0.0) + seconds
        return text

    def facts(self, a: Anchor, crop_transform: SquareTransform | None) -> AnchorBrief:
        _, whole_t = self.whole()
        earlier = tuple(
            f"Q: {t.question} A: {t.answer}" for t in self.inp.earlier if a.anchor_id in t.resolved
        )[-3:]
        return anchor_brief(a, whole_t, crop_transform, earlier)

    # --- anchors ---------------------------------------------------------------------

    def current(self, anchor_id: str) -> Anchor:
        return self.changed.get(anchor_id) or self.anchors[anchor_id]

    def update(self, a: Anchor) -> None:
        self.changed[a.anchor_id] = a

    def all_anchors(self) -> list[Anchor]:
        merged = dict(self.anchors)
        merged.update(self.changed)
        return sorted(merged.values(), key=lambda x: x.number)

    def spacing(self) -> tuple[tuple[float, float] | None, str]:
        r = self.inp.result
        return r.pixel_spacing_mm, r.spacing_source

    def localise(self, term: str) -> Anchor:
        """Ask the model where ``term`` is; the box becomes a new anchor."""
        model_image, transform = self.whole()
        system, prompt = build_localise_prompt(term)
        parsed = parse_localise(self.ask("localise", (model_image,), system, prompt))
        if not parsed.boxes:
            raise TurnFailed(f"the model could not localise the {term.replace('_', ' ')}")
        _label, box = parsed.boxes[0]
        rc = transform.box_to_source(box)
        if rc[2] - rc[0] <= 0 or rc[3] - rc[1] <= 0:
            raise TurnFailed(
                f"the model's box for the {term.replace('_', ' ')} is outside the image"
            )
        is_landmark = term in ontology.LANDMARKS
        region = Region(*rc, shape="rectangle")
        spacing, source = self.spacing()
        number = 1 + max((a.number for a in self.all_anchors()), default=0)
        side = (
            "right" if term.startswith("right_") else "left" if term.startswith("left_") else "none"
        )
        anchor = Anchor(
            anchor_id=f"A{number}",
            tracking_uid=generate_uid(),
            label=term.replace("_", " "),
            kind="landmark" if is_landmark else "region",
            finding=None,
            site=term,
            laterality=side,  # type: ignore[arg-type]
            region=region,
            source_sop_instance_uid=self.inp.result.frontal.sop_instance_uid,
            measurements=None if is_landmark else measure(region, spacing, source),
            created_turn=self.inp.turn,
        )
        self.update(anchor)
        return anchor

    # --- the intents -----------------------------------------------------------------

    def describe(self, a: Anchor) -> str:
        crop, crop_t = describe_crop(self.image(), a)
        model_image, _ = self.whole()
        system, prompt = build_describe_prompt(self.facts(a, crop_t))
        parsed = parse_describe(self.ask("describe", (model_image, crop), system, prompt))
        attributes = {k: v for k, v in parsed.attributes.items() if k in ontology.ATTRIBUTES}
        changes: dict[str, Any] = {}
        if attributes and dict(a.attributes) | attributes != dict(a.attributes):
            changes["attributes"] = dict(a.attributes) | attributes
        refined_size = None
        if parsed.box_2d is not None:
            rc = crop_t.box_to_source(parsed.box_2d)
            overlap = iou(rc, a.region.box)
            if rc[2] > rc[0] and rc[3] > rc[1] and REFINE_MIN_IOU <= overlap < REFINE_MAX_IOU:
                shape = "ellipse" if a.finding in ROUND_FINDINGS else a.region.shape
                region = Region(*rc, shape=shape)
                spacing, source = self.spacing()
                changes["region"] = region
                changes["measurements"] = measure(region, spacing, source)
                refined_size = changes["measurements"]
        if changes:
            self.update(a.refined(turn=self.inp.turn, **changes))
        return compose.attributes_text(a, attributes, refined_size, self.lang)

    def distance(self, a: Anchor, b: Anchor) -> str:
        spacing, _ = self.spacing()
        d = region_distance(a.region, b.region, spacing)
        measured = AnchorDistance(
            tracking_uid=_pair_uid(a, b),
            from_anchor=a.anchor_id,
            from_tracking_uid=a.tracking_uid,
            to_anchor=b.anchor_id,
            to_tracking_uid=b.tracking_uid,
            to_label=b.label,
            centres=d.centres,
            edges=d.edges,
            units=d.units,
            line=d.centre_line,
            source_sop_instance_uid=self.inp.result.frontal.sop_instance_uid,
            turn=self.inp.turn,
        )
        known = {x.tracking_uid: x for x in self.inp.result.distances}.get(measured.tracking_uid)
        if known is None or (known.centres, known.edges) != (measured.centres, measured.edges):
            self.distances.append(measured)  # new or changed: the SR is amended
        return compose.distance_text(measured, a, b, self.lang)

    def relation(self, a: Anchor, structure: Anchor) -> str:
        box = _union(a.region.box, structure.region.box)
        crop, crop_t = crop_source(self.image(), box)
        model_image, _ = self.whole()
        system, prompt = build_relation_prompt(
            self.facts(a, crop_t), structure.site or structure.label
        )
        parsed = parse_relation(self.ask("relation", (model_image, crop), system, prompt))
        return compose.relation_text(a, structure, parsed.connected, parsed.explanation, self.lang)

    def checklist(self, a: Anchor, question: str) -> str:
        condition = signs.find_condition(question)
        if condition is None:
            raise TurnFailed("the question names no condition the node has a sign checklist for")
        m = a.measurements
        others = tuple(
            x.finding
            for x in self.all_anchors()
            if x.kind == "finding" and x.anchor_id != a.anchor_id and x.finding
        )
        facts = signs.SignFacts(
            finding=a.finding,
            site=a.site if a.site in ontology.SITES else None,
            attributes=dict(a.attributes),
            long_axis=m.long_axis if m else None,
            short_axis=m.short_axis if m else None,
            units=m.units if m else None,
            other_findings=others,
        )
        checklist = signs.evaluate(condition, facts)
        head = compose.anchor_name(a, self.lang) + (": " if self.lang == "en" else "：")
        return head + signs.render_checklist(checklist, self.lang)


def followup_request(
    study_uid: str, task: FollowupTask, images: tuple[Any, ...], system: str, prompt: str
) -> EngineRequest:
    """The engine request of one follow-up task; every one sends the study's whole frontal
    image first (then a crop), named as the study's prefix so an engine may reuse it."""
    return EngineRequest(
        images=images,
        prompt=prompt,
        system=system,
        json_schema=FOLLOWUP_SCHEMAS[task],
        metadata=prefix_metadata(study_uid) if study_uid else {},
    )


def anchor_brief(
    a: Anchor,
    whole_transform: SquareTransform,
    crop_transform: SquareTransform | None,
    earlier: tuple[str, ...] = (),
) -> AnchorBrief:
    """What a follow-up prompt states about an anchor (its boxes in the images sent)."""
    return AnchorBrief(
        anchor_id=a.anchor_id,
        label=a.label,
        finding=a.finding,
        site=a.site,
        laterality=a.laterality,
        box_2d_whole=_box4(whole_transform.box_to_model(a.region.box)),
        box_2d_crop=_box4(crop_transform.box_to_model(a.region.box)) if crop_transform else None,
        size_text=a.size_text,
        attributes=dict(a.attributes),
        earlier=earlier,
    )


def describe_crop(image: DisplayImage, anchor: Anchor) -> tuple[Any, SquareTransform]:
    """The crop a describe turn sends for ``anchor`` (the second image), with its transform."""
    return crop_source(image, anchor.region.box)


def prefill_followups(
    engine: Engine, study_uid: str, image: DisplayImage, result: PrereadResult
) -> int:
    """Let the engine compute now (after the pre-read, before any question) the prefixes
    of the first describe follow-up on each of the study's findings (its whole image and
    the finding's crop), so that question computes only its text; returns how many it
    computed (0 for an engine that keeps nothing). ``image``: the frontal image the
    anchors are drawn on, as displayed."""
    findings = [a for a in result.anchors if a.kind == "finding"]
    if not findings or not study_uid:
        return 0

    def requests() -> list[EngineRequest]:
        whole, whole_t = to_model_image(image)
        made = []
        for a in findings:
            crop, crop_t = describe_crop(image, a)
            system, prompt = build_describe_prompt(anchor_brief(a, whole_t, crop_t))
            made.append(followup_request(study_uid, "describe", (whole, crop), system, prompt))
        return made

    return prefill(engine, requests)


def _box4(box: Sequence[int]) -> tuple[int, int, int, int]:
    y0, x0, y1, x1 = box
    return (y0, x0, y1, x1)


def _pair_uid(a: Anchor, b: Anchor) -> str:
    """The same pair of anchors always gives the same measurement group UID."""
    return str(
        generate_uid(entropy_srcs=["medgemma-node distance", a.tracking_uid, b.tracking_uid])
    )


def _union(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float, float, float]:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def answer_turn(inp: TurnInput) -> TurnOutput:
    """Answer one follow-up question (see the module docstring). Raises TurnFailed."""
    started = time.monotonic()
    t = _Turn(inp)
    intents = detect_intents(inp.question)
    focus = inp.anchor_hint or _last_focus(inp.earlier)
    resolution = resolve(inp.question, t.all_anchors(), focus=focus)
    if isinstance(resolution, NewRegion):
        t.localise(resolution.term)
        resolution = resolve(inp.question, t.all_anchors(), focus=focus)
        if isinstance(resolution, NewRegion):
            raise TurnFailed(
                f"the {resolution.term.replace('_', ' ')} could not be tied to an anchor"
            )
    if inp.anchor_hint and isinstance(resolution, Clarify):
        resolution = Anchors((inp.anchor_hint,))
    if isinstance(resolution, Clarify):
        candidates = [t.current(i) for i in resolution.candidates if i in t.anchors]
        # the resolver's reason is English: a Chinese clarifying question lists candidates only
        reason = resolution.reason if inp.language == "en" else ""
        text = compose.clarify_text(candidates, reason, inp.language)
        return _output(t, "clarify", text, tuple(resolution.candidates), focus, intents, started)

    ids = tuple(i for i in resolution.ids if i in t.anchors or i in t.changed)
    named = [t.current(i) for i in ids]
    findings = [a for a in named if a.kind == "finding"]
    primary = findings[0] if findings else (named[0] if named else None)
    parts: list[str] = []
    overview = "overview" in intents or resolution.scope == "all"
    if overview and not (set(intents) - {"overview", "size"}):
        result_findings = [a for a in t.all_anchors() if a.kind == "finding"]
        parts.append(compose.overview_text(result_findings, inp.language, inp.result.truncated))
        new_focus = result_findings[0].anchor_id if len(result_findings) == 1 else focus
        ids = tuple(a.anchor_id for a in result_findings)
        return _output(t, "answered", "\n".join(parts), ids, new_focus, intents, started)
    if primary is None:
        raise TurnFailed("the question could not be tied to an anchor of this study")
    for intent in intents:
        if intent == "attributes":
            parts.append(t.describe(t.current(primary.anchor_id)))
        elif intent in ("distance", "relation"):
            other = next((a for a in named if a.anchor_id != primary.anchor_id), None)
            if other is None:
                raise TurnFailed(
                    "a distance or a connection needs two anchors: name the second one"
                )
            a, b = t.current(primary.anchor_id), t.current(other.anchor_id)
            parts.append(t.distance(a, b) if intent == "distance" else t.relation(a, b))
        elif intent == "checklist":
            if primary.kind != "finding":
                raise TurnFailed("a sign checklist needs a finding anchor")
            parts.append(t.checklist(t.current(primary.anchor_id), inp.question))
        elif intent == "size":
            parts.append(compose.size_text([t.current(a.anchor_id) for a in named], inp.language))
    if not parts:
        # no task recognised: what is known of the anchors it names
        parts.append(compose.size_text([t.current(a.anchor_id) for a in named], inp.language))
        parts += [
            compose.attributes_text(t.current(a.anchor_id), dict(a.attributes), None, inp.language)
            for a in findings
            if a.attributes
        ]
    text = "\n".join(p for p in parts if p)
    if not text:
        names = ", ".join(compose.anchor_name(a, inp.language) for a in named)
        text = names
    return _output(t, "answered", text, ids, primary.anchor_id, intents, started)


def _last_focus(earlier: Sequence[EarlierTurn]) -> str | None:
    for e in reversed(earlier):
        if e.focus:
            return e.focus
    return None


def _output(
    t: _Turn,
    outcome: Literal["answered", "clarify"],
    text: str,
    resolved: tuple[str, ...],
    focus: str | None,
    intents: tuple[Intent, ...],
    started: float,
) -> TurnOutput:
    t.timings["total_s"] = round(time.monotonic() - started, 3)
    return TurnOutput(
        outcome=outcome,
        text=text,
        resolved=resolved,
        focus=focus,
        intents=intents,
        anchors=tuple(sorted(t.changed.values(), key=lambda a: a.number)),
        distances=tuple(t.distances),
        model_outputs=t.outputs,
        timings=t.timings,
    )
