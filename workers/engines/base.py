"""The one small protocol every engine implements.

An engine takes model-ready square images (uint8 RGB, ``ModelImage.size`` pixels a side,
already padded and resized by ``workers.imaging``) and a prompt, and returns raw model
text. It never returns numbers that the node trusts: parsing, geometry and measurements
happen outside the engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt


class EngineError(Exception):
    """The engine cannot run (missing model, unreachable server); the message says how to fix it."""


class TransientEngineError(EngineError):
    """A failure worth retrying (server busy, CUDA OOM under load)."""


@dataclass(frozen=True)
class EngineRequest:
    """One single-turn request: images (first = primary) plus the user prompt.

    images: uint8 arrays of shape (S, S, 3), RGB, S = the model's input size (896 for MedGemma).
    system: optional system instruction (folded into the first user turn for Gemma 3).
    json_schema: optional JSON schema of the answer; an engine that can constrain decoding
        to it does (vLLM ``response_format``), the others ignore it. Its "title", when
        given, names the schema.
    metadata: what the request belongs to. ``study_uid`` names the study and
        ``prefix_images="1"`` says the first image is the study's whole image, shared with
        its other requests: an engine may then reuse the work on that prefix (see
        ``prefix_metadata``); others ignore both.
    """

    images: tuple[npt.NDArray[np.uint8], ...]
    prompt: str
    system: str = ""
    max_new_tokens: int = 1024
    metadata: dict[str, str] = field(default_factory=dict)
    json_schema: Mapping[str, Any] | None = None


def image_digest(image: npt.NDArray[np.uint8]) -> str:
    """SHA-256 (hex) of an image's shape and pixels: the same image, the same digest."""
    pixels = np.ascontiguousarray(image)
    return hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()


def shares_prefix(request: EngineRequest) -> bool:
    """The request says its first image is its study's whole image (``prefix_metadata``)."""
    metadata = request.metadata
    return bool(metadata.get("study_uid")) and metadata.get("prefix_images") == "1"


def prefix_metadata(study_uid: str) -> dict[str, str]:
    """The metadata of a request whose first image is ``study_uid``'s whole image."""
    return {"study_uid": study_uid, "prefix_images": "1"}


def held_studies(engine: object) -> list[str]:
    """The studies whose image prefix ``engine`` keeps in this process (least recently used
    first); [] for an engine that keeps none (the demo engine; vLLM keeps its cache in the
    server, shared by every worker)."""
    held = getattr(engine, "held_studies", None)
    return list(held()) if callable(held) else []


def prefill(engine: object, requests: Callable[[], Sequence[EngineRequest]]) -> int:
    """Let ``engine`` compute now, without generating, the prefixes of requests that will
    come later (a study's describe follow-ups: its whole image and an anchor's crop), so
    that those requests compute only their text; returns how many prefixes it computed.
    ``requests`` makes them, called only when the engine keeps such work: 0 for one that
    keeps none in this process (the demo engine; vLLM, whose caches are in the server;
    medgemma with its prefix cache off)."""
    fill = getattr(engine, "prefill", None)
    return int(fill(requests)) if callable(fill) else 0


@dataclass(frozen=True)
class EngineInfo:
    """What every output names: the model, its revision, and whether it is the demo engine."""

    name: str  # medgemma | vllm | demo
    model_id: str
    revision: str
    is_demo: bool = False


@runtime_checkable
class Engine(Protocol):
    info: EngineInfo

    def generate(self, requests: list[EngineRequest]) -> list[str]:
        """Greedy-decode one text per request, in order. Batches when len(requests) > 1."""
        ...
