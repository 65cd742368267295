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
says that its first image is the shared prefix (``prefix_images="1"``) runs in two steps:
the prompt tokens up to the end of the first image (system text included: Gemma 3 folds it
in front of the image) are looked up in a per-study KV cache, computed once on a miss, and
generation continues from a deep copy of that cache with the full input ids; only the other
images are encoded. Gemma 3 takes pixel values only in the first forward pass, so the cached
prefix holds the whole image. The match is made on the prefix's token ids AND a SHA-256 of the
first image's pixels (image placeholder tokens are the same for every image): a request whose
prefix differs from every cached prefix of its study (another image, another system text)
computes its own. The pre-read and the follow-ups send the same system text
(``workers.prompts.READER_SYSTEM``), so the first follow-up after a pre-read already hits
the prefix the pre-read stored. At most ``prefix_cache_studies`` studies are kept (least
recently used evicted, ``PREFIXES_PER_STUDY`` prefixes each); 0 turns the cache off. A
batch of such requests (the pre-reads of a worker batch) runs the same way, its rows'
prefix caches stacked into one, when its prompts tokenise to equal lengths (the same text
and image count); otherwise it runs in full and stores nothing. Greedy output is the same
with and without the cache.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
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
"""Prefixes kept per study: one per system text before the image (the chest check's, and the
one the pre-read and its follow-ups share, ``workers.prompts.READER_SYSTEM``), and a spare."""
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


PrefixKey = tuple[tuple[int, ...], str]
"""A cached prefix: its token ids and the SHA-256 of its image's pixels."""


class PrefixCache:
    """KV caches of prompt prefixes per study, least recently used study evicted first.

    max_studies: the most studies kept (0 = nothing is kept). Each study keeps up to
    ``per_study`` prefixes (the most recent). Not thread-safe: the engine's lock guards it.
    """

    def __init__(self, max_studies: int, per_study: int = PREFIXES_PER_STUDY) -> None:
        if max_studies < 0 or per_study < 1:
            raise ValueError("max_studies must be >= 0 and per_study >= 1")
        self.max_studies = max_studies
        self.per_study = per_study
        self.hits = 0
        self.misses = 0
        self._studies: OrderedDict[str, OrderedDict[PrefixKey, Any]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_studies > 0

    def studies(self) -> list[str]:
        """The studies held, least recently used first."""
        return list(self._studies)

    def get(self, study: str, prefix: PrefixKey) -> Any | None:
        """The cache of exactly these prefix tokens for ``study``, or None (counted)."""
        entries = self._studies.get(study)
        cache = None if entries is None else entries.get(prefix)
        if cache is None:
            self.misses += 1
            return None
        self.hits += 1
        self._studies.move_to_end(study)
        entries.move_to_end(prefix)  # type: ignore[union-attr]
        return cache

    def put(self, study: str, prefix: PrefixKey, cache: Any) -> None:
        if not self.enabled:
            return
        entries = self._studies.setdefault(study, OrderedDict())
        entries[prefix] = cache
        entries.move_to_end(prefix)
        self._studies.move_to_end(study)
        while len(entries) > self.per_study:
            entries.popitem(last=False)
        self._evict()

    def resize(self, max_studies: int) -> None:
        if max_studies < 0:
            raise ValueError("max_studies must be >= 0")
        self.max_studies = max_studies
        self._evict()

    def clear(self) -> None:
        self._studies.clear()

    def _evict(self) -> None:
        while len(self._studies) > self.max_studies:
            self._studies.popitem(last=False)


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
        inputs = self.processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True},
            # Prompt text (a RIS question, say) cannot write control tokens such as <end_of_turn>.
            sanitize_control_tokens=True,
        )
        return inputs.to(self.device, dtype=self.dtype)

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
            inputs = self.prepare(requests)
            prompt_length = int(inputs["input_ids"].shape[1])
            try:
                with torch.inference_mode():
                    output = None
                    if self.prefix_cache.enabled and all(shares_prefix(r) for r in requests):
                        output = self._generate_from_prefixes(requests, inputs, options)
                    if output is None:
                        output = self.model.generate(**inputs, **options)
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
        """Generate from each request's cached image prefix (computed and stored on a miss),
        the rows' caches stacked into one batch; None when the prompts do not split that way
        (pan-and-scan crops, no image, rows of different lengths or image counts): the caller
        then runs them in full."""
        import torch

        ids = inputs["input_ids"]
        rows: list[list[int]] = ids.tolist()
        pixel_values = inputs.get("pixel_values")
        end_of_image = self._end_of_image_id
        if end_of_image is None or pixel_values is None or "token_type_ids" not in inputs:
            return None
        if len(rows) > 1 and not bool(inputs["attention_mask"].all()):
            return None  # left padding: the prefixes would not line up
        per_row = len(requests[0].images)
        if (
            any(len(r.images) != per_row for r in requests)
            or any(row.count(end_of_image) != per_row for row in rows)
            or int(pixel_values.shape[0]) != per_row * len(rows)
        ):
            return None  # pan-and-scan crops or rows of different shapes
        end = rows[0].index(end_of_image) + 1
        if any(row.index(end_of_image) + 1 != end for row in rows):
            return None
        caches = []
        for index, request in enumerate(requests):
            study = request.metadata["study_uid"]
            key = (tuple(rows[index][:end]), image_digest(request.images[0]))
            cache = self.prefix_cache.get(study, key)
            if cache is None:
                first = index * per_row
                cache = self.model(
                    input_ids=ids[index : index + 1, :end],
                    attention_mask=inputs["attention_mask"][index : index + 1, :end],
                    token_type_ids=inputs["token_type_ids"][index : index + 1, :end],
                    pixel_values=pixel_values[first : first + 1],
                    use_cache=True,
                ).cache
                self.prefix_cache.put(study, key, cache)
            caches.append(cache)
        extra: dict[str, Any] = {}
        if per_row > 1:  # the other images (a crop, a lateral) are encoded now
            others = torch.cat(
                [pixel_values[i * per_row + 1 : (i + 1) * per_row] for i in range(len(rows))]
            )
            extra["mm_encoder_outputs"] = {
                "image": self.model.get_image_features(pixel_values=others, return_dict=True)
            }
        return self.model.generate(
            input_ids=ids,
            attention_mask=inputs["attention_mask"],
            token_type_ids=inputs["token_type_ids"],
            cache=stacked_cache(caches),
            **extra,
            **options,
        )

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
