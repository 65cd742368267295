"""Random-weight Gemma 3 checkpoints built locally, for tests and benchmarks (no download).

``build_tiny_gemma3`` writes a ~0.5 MB Gemma3ForConditionalGeneration + Gemma3Processor that
loads through exactly the production path (``AutoProcessor`` / ``AutoModelForImageTextToText``
with ``local_files_only=True``). ``save_gemma3_checkpoint`` builds any size from config numbers
(the GPU benchmark uses it with the MedGemma 4B architecture).

It follows /work/shared/notes/tiny-gemma3.md: ``image_seq_length == mm_tokens_per_image``; a
square token grid whose side divides ``image_size // patch_size``; processor size equal to the
SigLIP image size; every special token at a fixed id of the base vocabulary and the config's
boi/eoi/image ids equal to the tokenizer's; named ``boi_token``/``eoi_token``/``image_token``;
``vocab_size >= len(tokenizer)``; the zero-initialised projector re-initialised so that images
matter; a Gemma 3 shaped chat template. The tokenizer is character level (BPE without merges,
byte fallback), so any text encodes; random-weight output is kept printable by suppressing
byte and control tokens in the generation config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaTokenizer,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

# Fixed ids 0..11: a token missing from the base vocabulary would be appended and shift ids.
CONTROL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "<unused94>",
    "<unused95>",
)
TOKEN_ID = {token: index for index, token in enumerate(CONTROL_TOKENS)}

# Decode-only pieces (BPE without merges never produces them when encoding) so that random
# output can look like the JSON MedGemma writes.
JSON_PIECES: tuple[str, ...] = (
    "```json\n",
    "\n```",
    '"box_2d"',
    '"label"',
    "Final▁Answer:",
    ":▁[",
    "],▁",
    '▁"',
    '",▁',
)

# The structure of the google/gemma-3 chat templates: BOS, a system message folded into the
# first user turn, <start_of_image> once per image (the processor expands it), role
# "assistant" written as "model".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "query_pre_attn_scalar": 32,
    "sliding_window": 16,
    "max_position_embeddings": 1024,
    "vocab_size": 384,
}
TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
TINY_MM_TOKENS = 4  # a 2x2 grid pooled from 4x4 patches


def build_gemma_tokenizer(vocab_size: int | None = None) -> GemmaTokenizer:
    """A character-level Gemma tokenizer; with ``vocab_size``, padded with filler tokens to it.

    Ids: control tokens 0..11 (see ``CONTROL_TOKENS``), byte-fallback tokens ``<0x00>``..
    ``<0xFF>``, then "▁" (space), newline, printable ASCII and a few JSON pieces.
    """
    vocab: dict[str, int] = dict(TOKEN_ID)
    pieces = [f"<0x{byte:02X}>" for byte in range(256)]
    pieces += ["▁", "\n", *(chr(code) for code in range(0x21, 0x7F)), *JSON_PIECES]
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size must be at least {len(vocab)}, got {vocab_size}")
        for filler in range(vocab_size - len(vocab)):
            vocab[f"<filler{filler}>"] = len(vocab)
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=[],
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    # Control tokens, as in the real tokenizer; the thinking markers are special here on
    # purpose, to prove the engine keeps them even then.
    tokenizer.add_special_tokens(
        {
            "extra_special_tokens": [
                AddedToken(token, special=True, normalized=False)
                for token in ("<start_of_turn>", "<end_of_turn>", "<unused94>", "<unused95>")
            ]
        },
        replace_extra_special_tokens=False,
    )
    tokenizer.padding_side = "left"
    return tokenizer


def save_gemma3_checkpoint(
    directory: Path,
    *,
    text: Mapping[str, Any],
    vision: Mapping[str, Any],
    mm_tokens_per_image: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    printable_only: bool = True,
    seed: int = 0,
) -> Path:
    """Build a random-weight Gemma 3 VLM from config numbers and save model + processor.

    text / vision: ``Gemma3TextConfig`` / ``SiglipVisionConfig`` keyword arguments.
    printable_only: suppress byte-fallback, control and unused ids in generation_config so
        random-weight text stays printable.
    Returns ``directory``.
    """
    vision_options = {"vision_use_head": False, **vision}
    image_size = int(vision_options["image_size"])
    patches_per_side = image_size // int(vision_options["patch_size"])
    tokens_per_side = math.isqrt(mm_tokens_per_image)
    if tokens_per_side**2 != mm_tokens_per_image or patches_per_side % tokens_per_side:
        raise ValueError(
            "mm_tokens_per_image must be a perfect square whose root divides "
            f"image_size // patch_size ({patches_per_side}), got {mm_tokens_per_image}"
        )

    vocab_size = int(text["vocab_size"])
    tokenizer = build_gemma_tokenizer(None if printable_only else vocab_size)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"text vocab_size {vocab_size} < tokenizer size {len(tokenizer)}")
    ids = {
        "pad_token_id": TOKEN_ID["<pad>"],
        "bos_token_id": TOKEN_ID["<bos>"],
        "eos_token_id": TOKEN_ID["<eos>"],
    }
    end_ids = [TOKEN_ID["<eos>"], TOKEN_ID["<end_of_turn>"]]
    top_level_ids: dict[str, Any] = {**ids, "eos_token_id": end_ids}
    config = Gemma3Config(
        text_config=Gemma3TextConfig(**{**ids, **text}),
        vision_config=SiglipVisionConfig(**vision_options),
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        # Top-level ids as in MedGemma's config.json (not typed on Gemma3Config in v5).
        **top_level_ids,
    )

    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Gemma3ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        # _init_weights zeroes the projector: the image would have no effect at all.
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.1)

    generation = model.generation_config
    # MedGemma's own generation_config samples; the engine must force greedy decoding.
    generation.do_sample, generation.top_k, generation.top_p = True, 64, 0.95
    generation.bos_token_id, generation.pad_token_id = ids["bos_token_id"], ids["pad_token_id"]
    generation.eos_token_id = end_ids
    if printable_only:
        allowed = set(end_ids) | {TOKEN_ID["<unused94>"], TOKEN_ID["<unused95>"]}
        bytes_ = range(len(CONTROL_TOKENS), len(CONTROL_TOKENS) + 256)
        unused = range(len(tokenizer), vocab_size)
        generation.suppress_tokens = sorted(
            {*(i for i in TOKEN_ID.values() if i not in allowed), *bytes_, *unused}
        )

    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=mm_tokens_per_image,
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_gemma3(directory: Path) -> Path:
    """Save a tiny random Gemma 3 (hidden 64, 2 layers, SigLIP 32, 32 px, 4 image tokens)."""
    return save_gemma3_checkpoint(
        directory, text=TINY_TEXT, vision=TINY_VISION, mm_tokens_per_image=TINY_MM_TOKENS
    )
