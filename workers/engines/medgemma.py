"""MedGemma through Hugging Face transformers: the default engine of a GPU worker.

The model is loaded once per process (``get_engine`` caches it), in bfloat16 on CUDA and
float32 on CPU, from a local directory or from the local Hugging Face cache at a pinned
revision (``local_files_only=True`` by default: the weights are gated and large, so the
operator downloads them once). A missing model is an ``EngineError`` that says how to provide
it; there is never a silent fallback to another model.

Prompts follow the Gemma 3 chat structure: one user turn whose content is a list of
``{"type": "image"}`` items followed by one ``{"type": "text"}`` item; a system instruction is
sent as a system message, which the Gemma 3 chat template folds into the first user turn.
Decoding is greedy. Only the newly generated text is returned.

Special tokens in the output: control tokens (``<end_of_turn>``, ``<eos>``, padding) are
dropped, but the MedGemma 1.5 thinking-trace markers ``<unused94>`` / ``<unused95>`` are kept
in the text even when the tokenizer marks them special, so that the output parser can find and
strip the trace. This is done on token ids (``decode_new_tokens``), not by editing the text.

Follow-up prefix cache: a request whose ``metadata`` names its study (``study_uid``) and
says that its first image is the shared prefix (``prefix_images="1"``) runs from a KV cache
of its prompt up to the end of its last image: the deepest prefix its study holds (up to
the end of the whole image, or further: whole image + an anchor's crop) is extended image
by image, each level stored, and generation continues from a deep copy of it with the full
input ids, computing only the text after the images. Gemma 3 takes pixel values only in
the first forward pass, so a cached prefix holds its images; a later image's vision
features come from the study's feature cache when held (keyed by a SHA-256 of its pixels).
A prefix is matched on its token ids AND the SHA-256 of each of its images' pixels (image
placeholder tokens are the same for every image), so a request whose prefix differs (another
image, another system text) computes its own. The pre-read and the follow-ups send the same
system text (``workers.prompts.READER_SYSTEM``), so the first follow-up after a pre-read
hits the prefix the pre-read stored; a second question on the same anchor (the same crop)
hits the prefix that ends with the crop. ``prefill`` computes the prefixes of requests that
will come (the worker prefills each finding's describe prefix once a pre-read's results are
out), so even the first describe computes only its text. At most ``prefix_cache_studies``
studies are kept (least recently used evicted, with everything they hold; per study
``PREFIXES_PER_STUDY`` whole-image prefixes, ``DEEP_PREFIXES_PER_STUDY`` longer ones and
``IMAGES_PER_STUDY`` images' features); 0 turns the cache off. A batch of such requests (the
pre-reads of a worker batch) runs the same way, its rows' caches stacked into one, when its
prompts tokenise to equal lengths (the same text and image count); otherwise it runs in full
and stores nothing. Greedy output is the same with and without the cache (float32; bfloat16
on a GPU may differ in the last bits, as batching does).
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from node.settings import EngineSettings
from workers.engines.base import (
    EngineError,
    EngineInfo,
    EngineRequest,
    TransientEngineError,
    image_digest,
    shares_prefix,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL: str = EngineSettings.model_fields["model"].default  # one default: settings
THINKING_MARKERS: tuple[str, ...] = ("<unused94>", "<unused95>")
"""MedGemma 1.5 wraps a thinking trace in these; they stay in the returned text."""

PREFIXES_PER_STUDY = 3
"""Whole-image prefixes kept per study: one per system text before the image (the chest
check's, and the one the pre-read and its follow-ups share, ``workers.prompts.READER_SYSTEM``),
and a spare."""
DEEP_PREFIXES_PER_STUDY = 4
"""Prefixes kept per study that go on past the whole image (whole image + an anchor's crop:
a second question on the same anchor computes only its text; or + the lateral)."""
IMAGES_PER_STUDY = 16
"""Vision features of later images (anchors' crops) kept per study: 256 x 2560 values each
for MedGemma 4B (1.3 MB in bfloat16)."""
END_OF_IMAGE_TOKEN = "<end_of_image>"

_WARMUP_PROMPT = "Describe the image."
_SNAPSHOT_COMMIT = re.compile(r"[\\/]snapshots[\\/]([0-9a-f]{40})[\\/]")

_ENGINES: dict[tuple[str, str, str], MedGemmaEngine] = {}
_ENGINES_LOCK = threading.Lock()


def how_to_provide(model: str, revision: str) -> str:
    """The sentence an operator reads when the model is missing: how to get it onto the machine."""
    repo_id = model if _looks_like_repo_id(model) else DEFAULT_MODEL
    pinned = revision or "<commit>"
    return (
        f"download it once with `hf download {repo_id} --revision {pinned}` after accepting the "
        f"licence on https://huggingface.co/{repo_id} (the weights are gated), or set "
        "engine.model to a local directory that holds the checkpoint"
    )


def get_engine(
    model: str = DEFAULT_MODEL,
    revision: str = "",
    local_files_only: bool = True,
    device: str = "auto",
    prefix_cache_studies: int = EngineSettings.model_fields["prefix_cache_studies"].default,
) -> MedGemmaEngine:
    """The process-wide engine for (model, revision, device), loaded and warmed on first use;
    its prefix cache keeps ``prefix_cache_studies`` studies (the latest call's value)."""
    key = (model, revision, device)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = MedGemmaEngine(
                model,
                revision,
                local_files_only=local_files_only,
                device=device,
                prefix_cache_studies=prefix_cache_studies,
            )
            _ENGINES[key] = engine
        else:
            engine.prefix_cache.resize(prefix_cache_studies)
        return engine


PrefixKey = tuple[tuple[int, ...], tuple[str, ...]]
"""A cached prefix: its token ids and the SHA-256 of each of its images' pixels, in order."""


class PrefixCache:
    """Per study, KV caches of prompt prefixes and vision features of single images; the
    least recently used study is evicted first, with everything it holds.

    max_studies: the most studies kept (0 = nothing is kept). Each study keeps up to
    ``per_study`` prefixes that end with its whole image, up to ``deep_per_study`` that
    also hold later images (the whole image and an anchor's crop), and the vision
    features of up to ``images_per_study`` later images (each the most recently used).
    ``hits``/``misses`` count lookups that found a prefix (of any depth) or none;
    ``feature_hits``/``feature_misses`` count later images taken from the cache or encoded,
    ``stored`` the prefixes computed and stored.
    Not thread-safe: the engine's lock guards it.
    """

    def __init__(
        self,
        max_studies: int,
        per_study: int = PREFIXES_PER_STUDY,
        deep_per_study: int = DEEP_PREFIXES_PER_STUDY,
        images_per_study: int = IMAGES_PER_STUDY,
    ) -> None:
        if max_studies < 0 or min(per_study, deep_per_study, images_per_study) < 1:
            raise ValueError("max_studies must be >= 0 and the per-study bounds >= 1")
        self.max_studies = max_studies
        self.per_study = per_study
        self.deep_per_study = deep_per_study
        self.images_per_study = images_per_study
        self.hits = 0
        self.misses = 0
        self.feature_hits = 0
        self.feature_misses = 0
        self.stored = 0
        self._studies: OrderedDict[str, _StudyEntries] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_studies > 0

    def studies(self) -> list[str]:
        """The studies held, least recently used first."""
        return list(self._studies)

    def longest(self, study: str, prefixes: Sequence[PrefixKey]) -> tuple[int, Any | None]:
        """The deepest of ``prefixes`` (shortest first) that ``study`` holds, as (its index,
        its cache), or (-1, None); counted as one hit or one miss."""
        entries = self._studies.get(study)
        for depth in range(len(prefixes) - 1, -1, -1):
            cache = None if entries is None else entries.prefixes.get(prefixes[depth])
            if cache is not None:
                assert entries is not None
                self.hits += 1
                self._studies.move_to_end(study)
                entries.prefixes.move_to_end(prefixes[depth])
                return depth, cache
        self.misses += 1
        return -1, None

    def get(self, study: str, prefix: PrefixKey) -> Any | None:
        """The cache of exactly this prefix for ``study``, or None (counted)."""
        return self.longest(study, [prefix])[1]

    def put(self, study: str, prefix: PrefixKey, cache: Any) -> None:
        if not self.enabled:
            return
        entries = self._entries(study)
        entries.prefixes[prefix] = cache
        self.stored += 1
        entries.prefixes.move_to_end(prefix)
        deep = len(prefix[1]) > 1
        bound = self.deep_per_study if deep else self.per_study
        kept = [key for key in entries.prefixes if (len(key[1]) > 1) == deep]
        for key in kept[: max(0, len(kept) - bound)]:
            del entries.prefixes[key]
        self._evict()

    def features(self, study: str, digest: str) -> Any | None:
        """The vision features of the image with this pixel digest in ``study``, or None
        (counted)."""
        entries = self._studies.get(study)
        found = None if entries is None else entries.images.get(digest)
        if found is None:
            self.feature_misses += 1
            return None
        assert entries is not None
        self.feature_hits += 1
        entries.images.move_to_end(digest)
        return found

    def has_features(self, study: str, digest: str) -> bool:
        entries = self._studies.get(study)
        return entries is not None and digest in entries.images

    def put_features(self, study: str, digest: str, features: Any) -> None:
        if not self.enabled:
            return
        entries = self._entries(study)
        entries.images[digest] = features
        entries.images.move_to_end(digest)
        while len(entries.images) > self.images_per_study:
            entries.images.popitem(last=False)
        self._evict()

    def resize(self, max_studies: int) -> None:
        if max_studies < 0:
            raise ValueError("max_studies must be >= 0")
        self.max_studies = max_studies
        self._evict()

    def clear(self) -> None:
        self._studies.clear()

    def _entries(self, study: str) -> _StudyEntries:
        entries = self._studies.get(study)
        if entries is None:
            entries = self._studies[study] = _StudyEntries()
        self._studies.move_to_end(study)
        return entries

    def _evict(self) -> None:
        while len(self._studies) > self.max_studies:
            self._studies.popitem(last=False)


@dataclass
class _StudyEntries:
    """What one study holds: prefix KV caches and single images' vision features."""

    prefixes: OrderedDict[PrefixKey, Any] = field(default_factory=OrderedDict)
    images: OrderedDict[str, Any] = field(default_factory=OrderedDict)


def clear_engine_cache() -> None:
    """Forget every cached engine (tests; a worker keeps its engine for its whole life)."""
    with _ENGINES_LOCK:
        _ENGINES.clear()


class MedGemmaEngine:
    """Greedy image+text generation with a Gemma 3 vision-language checkpoint (MedGemma 4B).

    model: a Hugging Face repo id (looked up in the local cache when ``local_files_only``) or a
        local directory holding config.json, the processor files and the safetensors weights.
    revision: the pinned commit (or tag) of a repo id; recorded in ``info`` when no commit hash
        can be resolved from the cache. Ignored by transformers for a local directory.
    device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    prefix_cache_studies: studies whose image prefix is kept as a KV cache (0 = off); see the
        module docstring.
    """

    def __init__(
        self,
        model: str,
        revision: str,
        local_files_only: bool = True,
        device: str = "auto",
        prefix_cache_studies: int = 0,
    ) -> None:
        started = time.perf_counter()
        self._lock = threading.Lock()
        self.prefix_cache = PrefixCache(prefix_cache_studies)
        self.processor, self.model, self.device = _load(model, revision, local_files_only, device)
        self.dtype = self.model.dtype
        self._drop_ids = droppable_token_ids(self.processor.tokenizer)
        self._end_of_image_id = _token_id(self.processor.tokenizer, END_OF_IMAGE_TOKEN)
        self.info = EngineInfo(
            name="medgemma",
            model_id=model,
            revision=_resolved_revision(self.model, model, revision),
        )
        self._warm_up()
        logger.info(
            "loaded %s (revision %s) on %s as %s in %.1f s",
            model,
            self.info.revision or "unpinned",
            self.device,
            str(self.dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )

    def held_studies(self) -> list[str]:
        """The studies whose image prefix this process keeps (``workers.engines.base``)."""
        with self._lock:
            return self.prefix_cache.studies() if self.prefix_cache.enabled else []

    @property
    def image_size(self) -> int:
        """The side, in pixels, that the processor resizes every image to (896 for MedGemma)."""
        size = self.processor.image_processor.size
        return int(size["height"] if isinstance(size, Mapping) else size.height)

    def prepare(self, requests: Sequence[EngineRequest]) -> Any:
        """Chat-template, tokenise (left-padded) and pre-process; tensors on the model's device."""
        conversations = [_conversation(request) for request in requests]
        return self._templated(conversations).to(self.device, dtype=self.dtype)

    def _templated(self, conversations: list[Any], **processor_kwargs: Any) -> Any:
        """The chat template applied and tokenised (left-padded), images pre-processed."""
        return self.processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, **processor_kwargs},
            # Prompt text (a RIS question, say) cannot write control tokens such as <end_of_turn>.
            sanitize_control_tokens=True,
        )

    def layout(self, requests: Sequence[EngineRequest]) -> Any | None:
        """What ``prepare`` gives except the images' pixel values (token ids, attention
        mask, token types), without pre-processing the images: the prefix path encodes
        only the images it does not hold, and pre-processing one 896 px image takes tens
        of milliseconds of CPU. None when the token layout depends on the images
        (pan-and-scan)."""
        from PIL import Image

        image_processor = self.processor.image_processor
        if getattr(image_processor, "do_pan_and_scan", False):
            return None
        conversations = [_conversation(request) for request in requests]
        for conversation in conversations:
            for item in conversation[-1]["content"]:
                if item["type"] == "image":  # same placeholder tokens, nothing to resize
                    item["image"] = Image.new("RGB", (1, 1))
        patch = int(getattr(self.model.config.vision_config, "patch_size", 14))
        inputs = self._templated(conversations, size={"height": patch, "width": patch})
        inputs.pop("pixel_values", None)
        return inputs.to(self.device)

    def pixel_values(self, images: Sequence[npt.NDArray[np.uint8]]) -> Any:
        """The processor's pixel values of these images, on the model's device and dtype."""
        pil = [_to_pil(image, index) for index, image in enumerate(images)]
        pixels = self.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, dtype=self.dtype)

    def generate(
        self,
        requests: list[EngineRequest],
        *,
        generation_kwargs: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Greedy-decode one text per request, in order; several requests run as one batch.

        generation_kwargs: extra ``model.generate`` arguments for benchmarks (for example
            ``min_new_tokens`` so random weights do not stop early); sampling stays off.
        """
        if not requests:
            return []
        import torch

        max_new_tokens = max(request.max_new_tokens for request in requests)
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens, **(generation_kwargs or {})}
        options["do_sample"] = False
        with self._lock:
            try:
                with torch.inference_mode():
                    output: Any = None
                    inputs: Any = None
                    if self.prefix_cache.enabled and all(shares_prefix(r) for r in requests):
                        inputs = self.layout(requests)
                        if inputs is not None:
                            output = self._generate_from_prefixes(requests, inputs, options)
                    if output is None:
                        inputs = self.prepare(requests)
                        output = self.model.generate(**inputs, **options)
                    prompt_length = int(inputs["input_ids"].shape[1])
            except torch.cuda.OutOfMemoryError as exc:
                torch.cuda.empty_cache()
                raise TransientEngineError(
                    f"out of GPU memory generating a batch of {len(requests)}: {exc}"
                ) from exc
        new_tokens = output[:, prompt_length:].tolist()
        # Greedy decoding of a row does not depend on the longer budget of its neighbours.
        return [
            decode_new_tokens(
                self.processor.tokenizer, row[: request.max_new_tokens], self._drop_ids
            )
            for row, request in zip(new_tokens, requests, strict=True)
        ]

    def _generate_from_prefixes(
        self, requests: Sequence[EngineRequest], inputs: Any, options: Mapping[str, Any]
    ) -> Any | None:
        """Generate from each request's cached prefix up to the end of its last image
        (computed and stored on a miss), the rows' caches stacked into one batch; None
        when the prompts do not split that way (pan-and-scan crops, no image, rows of
        different lengths or image counts): the caller then runs them in full."""
        caches = self._prefixes(requests, inputs)
        if caches is None:
            return None
        return self.model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            token_type_ids=inputs["token_type_ids"],
            cache=stacked_cache(caches),
            **options,
        )

    def _prefixes(self, requests: Sequence[EngineRequest], inputs: Any) -> list[Any] | None:
        """Each request's KV cache of its prompt up to the end of its last image: the
        deepest prefix its study holds, extended image by image (each level stored; a
        later image's vision features from the study's cache when held); None when the
        prompts do not split that way."""
        ids = inputs["input_ids"]
        rows: list[list[int]] = ids.tolist()
        end_of_image = self._end_of_image_id
        if end_of_image is None or "token_type_ids" not in inputs:
            return None
        if len(rows) > 1 and not bool(inputs["attention_mask"].all()):
            return None  # left padding: the prefixes would not line up
        per_row = len(requests[0].images)
        if any(len(r.images) != per_row for r in requests) or any(
            row.count(end_of_image) != per_row for row in rows
        ):
            return None  # rows of different shapes
        ends = [index + 1 for index, token in enumerate(rows[0]) if token == end_of_image]
        if any([i + 1 for i, t in enumerate(row) if t == end_of_image] != ends for row in rows):
            return None
        caches = []
        for index, request in enumerate(requests):
            study = request.metadata["study_uid"]
            digests = tuple(image_digest(image) for image in request.images)
            keys = [(tuple(rows[index][:end]), digests[: n + 1]) for n, end in enumerate(ends)]
            depth, cache = self.prefix_cache.longest(study, keys)
            if cache is None:  # nothing held: the prefix that ends with the whole image
                cache = self.model(
                    input_ids=ids[index : index + 1, : ends[0]],
                    attention_mask=inputs["attention_mask"][index : index + 1, : ends[0]],
                    token_type_ids=inputs["token_type_ids"][index : index + 1, : ends[0]],
                    pixel_values=self.pixel_values(request.images[:1]),
                    use_cache=True,
                ).cache
                self.prefix_cache.put(study, keys[0], cache)
                depth = 0
            for later in range(depth + 1, per_row):  # the other images: a crop, a lateral
                image = request.images[later]
                cache = self.model(
                    input_ids=ids[index : index + 1, ends[later - 1] : ends[later]],
                    attention_mask=inputs["attention_mask"][index : index + 1, : ends[later]],
                    token_type_ids=inputs["token_type_ids"][index : index + 1, : ends[later]],
                    cache=copy.deepcopy(cache),  # the stored shorter prefix stays as it is
                    mm_encoder_outputs={"image": self._features(study, digests[later], image)},
                    use_cache=True,
                ).cache
                self.prefix_cache.put(study, keys[later], cache)
            caches.append(cache)
        return caches

    def _features(self, study: str, digest: str, image: npt.NDArray[np.uint8]) -> Any:
        """The vision features of one image from the study's cache, pre-processed,
        encoded and stored on a miss."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        features = self.prefix_cache.features(study, digest)
        if features is None:
            encoded = self.model.get_image_features(
                pixel_values=self.pixel_values([image]), return_dict=True
            )
            features = encoded.pooler_output
            self.prefix_cache.put_features(study, digest, features)
        return BaseModelOutputWithPooling(pooler_output=features)

    def prefill(self, requests: Callable[[], Sequence[EngineRequest]]) -> int:
        """Compute and keep, without generating, the prefixes of requests that will come
        later (a study's describe follow-ups: whole image and an anchor's crop, so the
        first question about the anchor computes only its text). ``requests`` makes them,
        called only when the cache is on; only those naming their study
        (``prefix_metadata``) count, at most ``deep_per_study`` of a study. Returns how
        many requests had a prefix computed (0 when all were held already)."""
        if not self.prefix_cache.enabled:
            return 0
        import torch

        chosen: list[EngineRequest] = []
        per_study: dict[str, int] = {}
        for request in requests():
            if shares_prefix(request):
                study = request.metadata["study_uid"]
                per_study[study] = per_study.get(study, 0) + 1
                if per_study[study] <= self.prefix_cache.deep_per_study:
                    chosen.append(request)
        computed = 0
        with self._lock, torch.inference_mode():
            for request in chosen:  # one at a time: rows need not tokenise alike
                stored = self.prefix_cache.stored
                inputs = self.layout([request])
                if inputs is not None:
                    self._prefixes([request], inputs)
                computed += self.prefix_cache.stored > stored
        return computed

    def _warm_up(self) -> None:
        """One tiny generation so that the first study does not pay for lazy initialisation."""
        black = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)
        self.generate([EngineRequest(images=(black,), prompt=_WARMUP_PROMPT, max_new_tokens=1)])


def stacked_cache(caches: Sequence[Any]) -> Any:
    """One batch cache from single-row caches of equal length (new tensors: the stored
    caches are never extended by the generation that continues from them)."""
    import torch

    stacked = copy.deepcopy(caches[0])
    if len(caches) > 1:
        for index, layer in enumerate(stacked.layers):
            layer.keys = torch.cat([c.layers[index].keys for c in caches], dim=0)
            layer.values = torch.cat([c.layers[index].values for c in caches], dim=0)
    return stacked


def decode_new_tokens(
    tokenizer: Any, token_ids: Sequence[int], drop_ids: frozenset[int] | None = None
) -> str:
    """Text of generated tokens without control tokens; the thinking markers stay verbatim.

    ``skip_special_tokens=True`` would also remove ``<unused94>``/``<unused95>`` when the
    tokenizer marks them special, so control tokens are filtered by id instead.
    drop_ids: precomputed ``droppable_token_ids(tokenizer)`` (computed when None).
    """
    drop = droppable_token_ids(tokenizer) if drop_ids is None else drop_ids
    kept = [token for token in token_ids if token not in drop]
    text: str = tokenizer.decode(
        kept, skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return text


def droppable_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that ``skip_special_tokens=True`` would drop, except the thinking markers."""
    special = {int(token_id) for token_id in tokenizer.all_special_ids}
    special.update(
        int(token_id)
        for token_id, token in tokenizer.added_tokens_decoder.items()
        if getattr(token, "special", False)
    )
    vocab = tokenizer.get_vocab()
    keep = {vocab[marker] for marker in THINKING_MARKERS if marker in vocab}
    return frozenset(special - keep)


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a token the vocabulary really holds, else None."""
    vocab = tokenizer.get_vocab()
    return int(vocab[token]) if token in vocab else None


def _conversation(request: EngineRequest) -> list[dict[str, Any]]:
    """The Gemma 3 chat messages of one request: optional system turn, then one user turn."""
    if not request.images:
        raise ValueError("EngineRequest.images: at least one image is required")
    content: list[dict[str, Any]] = [
        {"type": "image", "image": _to_pil(image, index)}
        for index, image in enumerate(request.images)
    ]
    content.append({"type": "text", "text": request.prompt})
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
    messages.append({"role": "user", "content": content})
    return messages


def _to_pil(image: npt.NDArray[np.uint8], index: int) -> Any:
    """A PIL RGB image from a uint8 (H, W, 3) array; the processor resizes it to its own size."""
    from PIL import Image

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError(f"EngineRequest.images[{index}] must be a uint8 numpy array")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"EngineRequest.images[{index}] must have shape (S, S, 3), got {image.shape}"
        )
    return Image.fromarray(np.ascontiguousarray(image))


def _load(model: str, revision: str, local_files_only: bool, device: str) -> tuple[Any, Any, Any]:
    """Processor, model (eval mode, on its device) and the torch device, or an EngineError."""
    try:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
    except ImportError as exc:
        raise EngineError(
            "the medgemma engine needs torch and transformers: "
            "install the worker extra (pip install 'medgemma-node[worker]')"
        ) from exc

    how = how_to_provide(model, revision)
    if not _looks_like_repo_id(model) and not Path(model).expanduser().is_dir():
        raise EngineError(f"MedGemma model directory {model!r} does not exist: {how}")
    source = str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model

    target = _resolve_device(device, torch)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    options: dict[str, Any] = {"local_files_only": local_files_only}
    if revision:
        options["revision"] = revision
    where = "the local Hugging Face cache" if local_files_only else "Hugging Face"
    try:
        processor = AutoProcessor.from_pretrained(source, **options)
        network = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, **options)
    except OSError as exc:
        raise EngineError(
            f"MedGemma model {model!r} (revision {revision or 'unpinned'}) was not found in "
            f"{where} or is incomplete ({exc}): {how}"
        ) from exc
    processor.tokenizer.padding_side = "left"  # batched generation appends on the right
    # Without accelerate, device_map is unavailable: load on the CPU, then move once.
    network = network.to(target).eval()
    return processor, network, target


def _resolve_device(device: str, torch: Any) -> Any:
    """A torch.device for "auto" | "cpu" | "cuda[:N]"; EngineError when CUDA is asked but absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise EngineError(
            f"engine.device {device!r} is not a torch device (auto, cpu, cuda:N)"
        ) from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(
            f"engine.device is {device!r} but CUDA is not available to torch "
            f"{torch.__version__}: install a CUDA build of torch or set engine.device to cpu"
        )
    return target


def _resolved_revision(network: Any, model: str, revision: str) -> str:
    """The commit hash the weights came from when it can be known, else the configured revision."""
    commit = getattr(network.config, "_commit_hash", None)  # older transformers set it
    if isinstance(commit, str) and commit:
        return commit
    local = Path(model).expanduser()
    if local.is_dir():  # a snapshot folder of a Hugging Face cache names its commit
        match = _SNAPSHOT_COMMIT.search(f"{local.resolve()}/")
        return match.group(1) if match else revision
    if _looks_like_repo_id(model):
        try:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(model, "config.json", revision=revision or None)
        except (ImportError, ValueError):
            path = None
        if isinstance(path, str):
            match = _SNAPSHOT_COMMIT.search(path)
            if match:
                return match.group(1)
    return revision


def _looks_like_repo_id(model: str) -> bool:
    """True for "namespace/name" or "name"; False for anything written as a filesystem path."""
    if model.startswith(("/", "./", "../", "~", "\\")) or ":" in model:
        return False
    parts = model.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not any(part in {".", ".."} for part in parts)
