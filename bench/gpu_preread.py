"""GPU pre-read benchmark: a MedGemma-4B-sized Gemma 3 with random weights, through MedGemmaEngine.

No download: the model is built from the published architecture numbers with random weights
(speed does not depend on the weights), saved with a character-level tokenizer padded to the
real vocabulary size, and loaded through ``workers.engines.medgemma.MedGemmaEngine`` -- the
same processor/model/generate path that real MedGemma weights take. Greedy decoding with
``min_new_tokens = max_new_tokens = N`` (through the engine's ``generation_kwargs``
passthrough) so random weights cannot stop early.

Measured per batch size B (each repeat runs the whole engine call, image preprocessing
included; the best repeat is kept, the first acting as warm-up):
  prep_s         chat template + tokenisation + image preprocessing of the batch (CPU)
  ttft_s         engine.generate with 1 new token: time to the first token of every request
  decode_tok_s   B * (N - 1) / (t_N - t_1): generated tokens per second, whole batch
  per_seq_tok_s  (N - 1) / (t_N - t_1): tokens per second seen by one request
  studies_per_h  B * 3600 / t_N, one pre-read (one study, one image) per request
  peak_gpu_gb    (CUDA) torch.cuda.max_memory_allocated over the batch's calls
  peak_rss_gb    (CPU, where peak GPU memory does not exist) the whole process's peak resident
                 set (VmHWM, reset before the batch): interpreter, torch, model and batch
The peer of each figure is measured in the same run: vLLM against transformers at the same
batch size (``ratios.vllm_over_transformers``) when vllm imports and CUDA is there, and each
engine against itself at batch 1 (``ratios.vs_batch1``). Without vllm (or without CUDA) the
report says so (``vllm_measured: false`` and the reason); it is never left out silently.

Follow-up prefix cache (``--followup-cache``, instead of the batch measurements): the real
sequence, per round and follow-up kind (describe: whole image + crop; localise: whole image
only), on a new study each time, time to the first token of
  preread_ttft_s        the study's pre-read (project prompt, study metadata: it stores the
                        prefix that ends with the image)
  <kind>_first_ttft_s   the study's FIRST follow-up (project prompt, same system text and
                        image: it reuses the pre-read's prefix)
  <kind>_control_ttft_s the same follow-up on an unseen study and image (an unseen prefix:
                        computed and stored, through the same code path)
  <kind>_plain_ttft_s   the same follow-up without study metadata (the cache not used)
  preread_plain_ttft_s  the pre-read without study metadata (what storing the prefix costs)
  describe_second_ttft_s  a second describe question on the same anchor (the same crop,
                        the first answer among its facts): it reuses the prefix that ends
                        with the crop, which the first one stored
  describe_prefilled_ttft_s  the first describe of another study whose describe prefix
                        (whole image + crop) was prefilled after its pre-read, as
                        workers.preread does (``engine.prefill``)
  prefill_crop_s        what that prefill took (worker time after the results are out)
  preprocess_896px_image_s  CPU time to pre-process one 896 px image as MedGemma's processor
                        does (a follow-up whose images are all held skips it)
Medians over the rounds after an untimed warm-up round, with each over the pre-read, over
the control and over plain, and the load average before and after (the machine may be
shared).

Usage:
  python bench/gpu_preread.py [--tiny] [--batch 1 8 32] [--new-tokens N] [--out FILE]
  python bench/gpu_preread.py --tiny --followup-cache [--repeats 7]
``--tiny`` builds a tiny config on the CPU: a smoke check of this script in seconds.
Results: a table on stdout and JSON in bench/out/gpu_preread.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

# MedGemma 4B = the Gemma 3 4B architecture. Numbers from google/gemma-3-4b-it's config.json
# on the Hugging Face Hub (medgemma-4b-it shares it): text hidden 2560, intermediate 10240,
# 34 layers, sliding_window 1024, rope_scaling linear x8 on global layers; the rest are
# transformers' Gemma3TextConfig defaults written out here (8 heads, 4 KV heads, head_dim 256,
# query_pre_attn_scalar 256, vocab 262208, rope theta 1e6 global / 1e4 local, 5 local : 1
# global layers). Vision: SigLIP so400m -- hidden 1152, intermediate 4304, 27 layers,
# 16 heads, 896 px, patch 14, no pooling head; 256 tokens per image (64x64 patches pooled 4x4).
# Cross-checked: transformers builds 4.30e9 parameters from these, the published size.
MEDGEMMA_4B_TEXT: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2560,
    "intermediate_size": 10_240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 1024,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
}
MEDGEMMA_4B_VISION: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
}
MEDGEMMA_4B_MM_TOKENS = 256

IMAGE_SIDE = 896  # what workers.imaging hands the engine
CHARS_PER_REAL_TOKEN = 3.8  # the real Gemma tokenizer on English + JSON text (estimate)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 2 when no CUDA device is available without --tiny."""
    args = _parse(argv)
    import torch
    import transformers

    from bench.tiny_gemma import TINY_MM_TOKENS, TINY_TEXT, TINY_VISION, save_gemma3_checkpoint
    from workers.engines.base import EngineRequest, TransientEngineError
    from workers.engines.medgemma import MedGemmaEngine

    if args.tiny:
        device, dtype = "cpu", torch.float32
        if args.cpu_threads:
            torch.set_num_threads(args.cpu_threads)
        text, vision, mm_tokens = TINY_TEXT, TINY_VISION, TINY_MM_TOKENS
    elif torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
        text, vision, mm_tokens = MEDGEMMA_4B_TEXT, MEDGEMMA_4B_VISION, MEDGEMMA_4B_MM_TOKENS
    else:
        print("CUDA is not available: run with --tiny for a CPU smoke check", file=sys.stderr)
        return 2

    system, prompt = preread_prompt(args.prompt_tokens)
    report: dict[str, Any] = {
        "model": "random-weight Gemma 3 " + ("(tiny)" if args.tiny else "(MedGemma 4B shape)"),
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "new_tokens": args.new_tokens,
        "prompt_text_tokens": len(system) + len(prompt),
        "image_tokens": mm_tokens,
        "text_config": text,
        "vision_config": vision,
    }

    with tempfile.TemporaryDirectory(prefix="gpu-preread-") as tmp:
        directory = Path(tmp) / "model"
        started = time.perf_counter()
        save_gemma3_checkpoint(
            directory,
            text=text,
            vision=vision,
            mm_tokens_per_image=mm_tokens,
            device=device,
            dtype=dtype,
            printable_only=False,
        )
        report["build_and_save_s"] = round(time.perf_counter() - started, 2)
        report["checkpoint_gb"] = round(sum(f.stat().st_size for f in directory.iterdir()) / 1e9, 3)
        _release(torch)

        started = time.perf_counter()
        engine = MedGemmaEngine(
            str(directory), "random-weights", device=device, prefix_cache_studies=4
        )
        report["load_and_warm_s"] = round(time.perf_counter() - started, 2)
        report["parameters"] = sum(p.numel() for p in engine.model.parameters())

        if args.followup_cache:
            report["followup_cache"] = _followup_cache(engine, args, system, prompt)
            _print_followup(report)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(f"\nresults written to {args.out}")
            return 0

        rng = np.random.default_rng(0)
        results = []
        for batch in args.batch:
            requests = [
                EngineRequest(
                    images=(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), np.uint8),),
                    prompt=prompt,
                    system=system,
                    max_new_tokens=args.new_tokens,
                )
                for _ in range(batch)
            ]
            try:
                results.append(
                    measure_batch(engine, requests, args.new_tokens, args.repeats, torch)
                )
            except TransientEngineError as exc:  # out of memory at this batch size
                results.append({"batch": batch, "error": str(exc)[:200]})
                _release(torch)
        report["transformers_results"] = results
        del engine
        _release(torch)

        report["vllm_results"] = _vllm(directory, args, system, prompt, device)
        report["vllm_measured"] = not isinstance(report["vllm_results"], str)
        report["ratios"] = _ratios(report)

    _print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults written to {args.out}")
    return 0


def measure_batch(
    engine: Any, requests: list[Any], new_tokens: int, repeats: int, torch: Any
) -> dict[str, Any]:
    """Best-of-``repeats`` timings of one batch through engine.prepare / engine.generate."""
    prep, first, full = [], [], []
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        rss_reset = _reset_peak_rss()
    one = [_with_budget(request, 1) for request in requests]
    engine.generate(one, generation_kwargs={"min_new_tokens": 1})  # untimed: first-shape costs
    for _ in range(repeats):
        started = time.perf_counter()
        inputs = engine.prepare(requests)
        prep.append(time.perf_counter() - started)
        started = time.perf_counter()
        engine.generate(one, generation_kwargs={"min_new_tokens": 1})
        first.append(time.perf_counter() - started)
        started = time.perf_counter()
        engine.generate(requests, generation_kwargs={"min_new_tokens": new_tokens})
        full.append(time.perf_counter() - started)
    batch = len(requests)
    t_1, t_n = min(first), min(full)
    result: dict[str, Any] = {
        "batch": batch,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "prep_s": round(min(prep), 4),
        **_rates(batch, new_tokens, t_1, t_n),
        # the machine's 1-minute load average after the batch: on a shared CPU, other work
        # slows the runs (the best repeat is kept, which removes some of it)
        "load1_after": round(os.getloadavg()[0], 2),
    }
    if engine.device.type == "cuda":
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    else:  # None where the counter could not be reset: a lifetime peak would mislead
        result["peak_rss_gb"] = _peak_rss_gb() if rss_reset else None
    return result


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set (VmHWM; Linux ``clear_refs`` 5); False if not."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_gb() -> float | None:
    """This process's peak resident set since the last reset, in GB (10^9 bytes)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / 1e9, 3)
    return None


def _ratios(report: dict[str, Any]) -> dict[str, Any]:
    """Each engine against itself at batch 1, and vLLM against transformers per batch size.

    studies_per_h and ttft_s as ratios (studies/h above 1: more; TTFT above 1: slower).
    """
    engines = {"transformers": report["transformers_results"]}
    if report["vllm_measured"]:
        engines["vllm"] = report["vllm_results"]
    rows = {
        name: {row["batch"]: row for row in results if "error" not in row}
        for name, results in engines.items()
    }
    vs_batch1: dict[str, dict[int, dict[str, float]]] = {}
    for name, by_batch in rows.items():
        if 1 in by_batch:
            one = by_batch[1]
            vs_batch1[name] = {
                batch: {
                    "studies_per_h": round(row["studies_per_h"] / one["studies_per_h"], 2),
                    "ttft_s": round(row["ttft_s"] / one["ttft_s"], 2),
                }
                for batch, row in by_batch.items()
            }
    ratios: dict[str, Any] = {"vs_batch1": vs_batch1}
    if "vllm" in rows:
        ratios["vllm_over_transformers"] = {
            batch: {
                "studies_per_h": round(row["studies_per_h"] / ours["studies_per_h"], 2),
                "ttft_s": round(row["ttft_s"] / ours["ttft_s"], 2),
            }
            for batch, row in rows["vllm"].items()
            if (ours := rows["transformers"].get(batch)) is not None
        }
    else:
        ratios["vllm_over_transformers"] = "not measured: " + str(report["vllm_results"])
    return ratios


def _followup_cache(
    engine: Any, args: argparse.Namespace, system: str, prompt: str
) -> dict[str, Any]:
    """Median TTFTs of the real sequence: a study's pre-read, then its follow-ups (which
    reuse the prefix the pre-read stored and, for a crop, the crop's features or the prefix
    that ends with it), against a control on an unseen prefix."""
    import os

    from workers.engines.base import EngineRequest, prefix_metadata

    prompts = {task: _followup_prompt(task) for task in ("describe", "describe_again", "localise")}
    rng = np.random.default_rng(1)

    def image() -> Any:
        return rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), np.uint8)

    def followup(task: str, whole: Any, crop: Any, study: str) -> Any:
        f_system, f_prompt = prompts[task]
        return EngineRequest(
            images=(whole,) if task == "localise" else (whole, crop),
            prompt=f_prompt,
            system=f_system,
            max_new_tokens=1,
            metadata=prefix_metadata(study) if study else {},
        )

    def preread(whole: Any, study: str) -> Any:
        metadata = prefix_metadata(study) if study else {}
        return EngineRequest(
            images=(whole,), prompt=prompt, system=system, max_new_tokens=1, metadata=metadata
        )

    def ttft(request: Any) -> float:
        started = time.perf_counter()
        engine.generate([request], generation_kwargs={"min_new_tokens": 1})
        if engine.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - started

    def prefill(study: str, whole: Any, crop: Any) -> float:
        started = time.perf_counter()
        engine.prefill(lambda: [followup("describe", whole, crop, study)])
        if engine.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - started

    names = ["preread", "preread_plain", "prefill_crop"]
    for task in ("describe", "localise"):
        names += [f"{task}_first", f"{task}_control", f"{task}_plain"]
    names += ["describe_second", "describe_prefilled"]
    times: dict[str, list[float]] = {name: [] for name in names}
    cache = engine.prefix_cache
    load_before = os.getloadavg()
    counts_before = (cache.hits, cache.misses, cache.feature_hits, cache.feature_misses)
    for repeat in range(args.repeats + 1):  # the first round is an untimed warm-up
        round_times: dict[str, float] = {}
        for task in ("describe", "localise"):
            # a new study per task and round: its pre-read stores the prefix, its first
            # follow-up finds it; the control is the same follow-up of an unseen study
            study, whole, crop = f"1.2.826.0.1.{repeat}.{task}", image(), image()
            round_times["preread"] = ttft(preread(whole, study))
            round_times[f"{task}_first"] = ttft(followup(task, whole, crop, study))
            if task == "describe":  # a second question on the same anchor (the same crop)
                round_times["describe_second"] = ttft(
                    followup("describe_again", whole, crop, study)
                )
            control = followup(task, image(), crop, f"{study}.control")
            round_times[f"{task}_control"] = ttft(control)
            round_times[f"{task}_plain"] = ttft(followup(task, whole, crop, ""))
            round_times["preread_plain"] = ttft(preread(whole, ""))
            if repeat:
                times["preread"].append(round_times["preread"])
                times["preread_plain"].append(round_times["preread_plain"])
        # the worker's path: the pre-read, the prefix of a describe on its finding (whole
        # image + crop) prefilled right after it (as workers.preread does once the results
        # are out), then the first describe
        study, whole, crop = f"1.2.826.0.1.{repeat}.prefilled", image(), image()
        ttft(preread(whole, study))
        round_times["prefill_crop"] = prefill(study, whole, crop)
        round_times["describe_prefilled"] = ttft(followup("describe", whole, crop, study))
        if repeat:
            for name in names[2:]:
                times[name].append(round_times[name])
    medians = {f"{name}_ttft_s": float(np.median(values)) for name, values in times.items()}
    medians["prefill_crop_s"] = medians.pop("prefill_crop_ttft_s")
    medians["preprocess_896px_image_s"] = _preprocess_seconds(engine, image(), args.repeats)
    counts = (cache.hits, cache.misses, cache.feature_hits, cache.feature_misses)
    deltas = [now - before for now, before in zip(counts, counts_before, strict=True)]
    result: dict[str, Any] = {
        "repeats": args.repeats,
        **{name: round(value, 4) for name, value in medians.items()},
        "preread_over_plain": round(medians["preread_ttft_s"] / medians["preread_plain_ttft_s"], 3),
        "cache_hits": deltas[0],
        "cache_misses": deltas[1],
        "crop_feature_hits": deltas[2],
        "crop_feature_misses": deltas[3],
        "followup_text_tokens": {task: len(p[0]) + len(p[1]) for task, p in prompts.items()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    preread_s = medians["preread_ttft_s"]
    for task in ("describe", "localise"):
        first = medians[f"{task}_first_ttft_s"]
        result[f"{task}_first_over_preread"] = round(first / preread_s, 3)
        result[f"{task}_first_over_control"] = round(first / medians[f"{task}_control_ttft_s"], 3)
        result[f"{task}_first_over_plain"] = round(first / medians[f"{task}_plain_ttft_s"], 3)
    control = medians["describe_control_ttft_s"]
    for name in ("describe_second", "describe_prefilled"):
        result[f"{name}_over_preread"] = round(medians[f"{name}_ttft_s"] / preread_s, 3)
        result[f"{name}_over_control"] = round(medians[f"{name}_ttft_s"] / control, 3)
    return result


def _preprocess_seconds(engine: Any, image: Any, repeats: int) -> float:
    """Median CPU time of pre-processing one 896 px image the way MedGemma's processor
    does (the engine's image processor class at MedGemma's input size; the tiny model's
    own resizes to 32 px): what a follow-up whose images are all held no longer pays."""
    from PIL import Image

    processor = type(engine.processor.image_processor)(
        size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    )
    picture = Image.fromarray(image)
    seconds = []
    for _ in range(max(repeats, 3)):
        started = time.perf_counter()
        processor(images=[picture], return_tensors="pt")
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def _followup_prompt(task: str) -> tuple[str, str]:
    """(system, prompt) of the project's describe or localise follow-up, cut to the length
    the real Gemma tokenizer would give it (the bench tokenizer spends one token a character).
    ``describe_again``: the describe prompt of a second question on the same anchor (the
    first question and its answer among the anchor's facts).

    The system text is not cut: it is the pre-read's (Gemma 3 puts it before the image), so
    the follow-up's prefix is the pre-read's.
    """
    from workers.dialogue.prompts import AnchorBrief, build_describe_prompt, build_localise_prompt

    if task == "localise":
        system, prompt = build_localise_prompt("right_hilum")
    else:
        earlier = (
            ("Q: Is the margin of A1 regular? A: A1 (nodule): margin smooth, shape round.",)
            if task == "describe_again"
            else ()
        )
        facts = AnchorBrief(
            anchor_id="A1",
            label="nodule",
            finding="nodule",
            site="right_upper_zone",
            laterality="right",
            box_2d_whole=(200, 180, 260, 240),
            box_2d_crop=(400, 400, 600, 600),
            size_text="11 x 11 mm",
            earlier=earlier,
        )
        system, prompt = build_describe_prompt(facts)
    real_tokens = round((len(system) + len(prompt)) / CHARS_PER_REAL_TOKEN)
    return system, prompt[: max(real_tokens - len(system), 16)]


def _print_followup(report: dict[str, Any]) -> None:
    result = report["followup_cache"]
    print(f"model: {report['model']} on {report['device']} ({report['dtype']})")
    print(f"follow-up prefix cache, median time to first token of {result['repeats']} rounds:")
    for name, value in result.items():
        if name.endswith(("_ttft_s", "_crop_s", "_image_s")):
            print(f"  {name:32} {value:.4f}")
    for name, value in result.items():
        if "_over_" in name:
            print(f"  {name:32} {value:.3f}")
    print(f"  prefix cache hits/misses         {result['cache_hits']}/{result['cache_misses']}")
    print(
        f"  crop features hits/misses        {result['crop_feature_hits']}/"
        f"{result['crop_feature_misses']}"
    )
    print(
        f"  load average before/after        {result['load_average_before']} / "
        f"{result['load_average_after']}"
    )


def _rates(batch: int, new_tokens: int, t_1: float, t_n: float) -> dict[str, Any]:
    """TTFT, decode rates and studies/hour from the 1-token and N-token batch times (seconds).

    Decode rates are None when timing noise makes t_N <= t_1 (tiny models on a busy CPU).
    """
    decode_s = t_n - t_1
    return {
        "ttft_s": round(t_1, 4),
        "total_s": round(t_n, 4),
        "decode_tok_s": round(batch * (new_tokens - 1) / decode_s, 1) if decode_s > 0 else None,
        "per_seq_tok_s": round((new_tokens - 1) / decode_s, 1) if decode_s > 0 else None,
        "studies_per_h": round(batch * 3600 / t_n, 1),
    }


def _vllm(
    directory: Path, args: argparse.Namespace, system: str, prompt: str, device: str
) -> list[dict[str, Any]] | str:
    """The same batches through vLLM's offline engine when vllm is importable."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        print("vllm not installed: vLLM NOT measured")
        return "vllm not installed: vLLM not measured"
    if device != "cuda":
        print("vllm needs CUDA: vLLM NOT measured")
        return "vllm needs CUDA: vLLM not measured"
    from workers.engines.vllm import png_data_url

    try:
        llm = LLM(
            model=str(directory),
            dtype="bfloat16",
            max_model_len=4096,
            limit_mm_per_prompt={"image": 1},
            max_num_seqs=max(args.batch),
            seed=0,
        )
        rng = np.random.default_rng(0)
        first = SamplingParams(temperature=0, max_tokens=1)
        full = SamplingParams(
            temperature=0,
            max_tokens=args.new_tokens,
            min_tokens=args.new_tokens,
            ignore_eos=True,
        )
        results = []
        for batch in args.batch:
            conversations = [
                [
                    {"role": "system", "content": system},
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {
                                    "url": png_data_url(
                                        rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), np.uint8)
                                    )
                                },
                            },
                            {"type": "text", "text": prompt},
                        ],
                    },
                ]
                for _ in range(batch)
            ]
            t_1s, t_ns = [], []
            llm.chat(conversations, first, use_tqdm=False)  # untimed warm-up
            for _ in range(args.repeats):
                started = time.perf_counter()
                llm.chat(conversations, first, use_tqdm=False)
                t_1s.append(time.perf_counter() - started)
                started = time.perf_counter()
                llm.chat(conversations, full, use_tqdm=False)
                t_ns.append(time.perf_counter() - started)
            rates = _rates(batch, args.new_tokens, min(t_1s), min(t_ns))
            results.append({"batch": batch, **rates, "gpu_in_use_gb": _gpu_in_use_gb()})
        return results
    except Exception as exc:  # report and keep the transformers numbers
        print(f"vllm failed: {exc!r}")
        return f"vllm failed: {exc!r}"[:500]


def _gpu_in_use_gb() -> float | None:
    """Memory in use on the whole device (GB): vLLM's engine runs in another process and
    reserves ``gpu_memory_utilization`` of the device up front, so this is its reservation,
    not a peak of what the batch needed."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return round((total - free) / 1e9, 2)


def preread_prompt(text_tokens: int) -> tuple[str, str]:
    """(system, prompt) of about ``text_tokens`` tokens of the char-level bench tokenizer.

    The project's pre-read prompt, cut to the length the real Gemma tokenizer would give it,
    because the bench tokenizer spends one token per character.
    """
    try:
        from workers.prompts import build_preread_prompt

        system, prompt = build_preread_prompt(False)
    except ImportError:
        system, prompt = "You are a radiologist.", "List every abnormal finding as JSON. " * 100
    budget = max(text_tokens - len(system), 16)
    return system, prompt[:budget]


def default_prompt_tokens() -> int:
    """The estimated real-tokenizer length of the project's pre-read prompt."""
    try:
        from workers.prompts import build_preread_prompt

        system, prompt = build_preread_prompt(False)
    except ImportError:
        return 800
    return round((len(system) + len(prompt)) / CHARS_PER_REAL_TOKEN)


def _with_budget(request: Any, max_new_tokens: int) -> Any:
    """A copy of an EngineRequest with another max_new_tokens."""
    from dataclasses import replace

    return replace(request, max_new_tokens=max_new_tokens)


def _release(torch: Any) -> None:
    """Return freed memory to the allocator so the next stage starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _print_table(report: dict[str, Any]) -> None:
    """The results as a fixed-width table."""
    print(
        f"\n{report['model']} on {report['device']} ({report['dtype']}, "
        f"{report['cpu_threads']} CPU threads), "
        f"{report['parameters'] / 1e6:,.1f} M parameters; torch {report['torch']}, "
        f"transformers {report['transformers']}"
    )
    print(
        f"prompt: {report['prompt_text_tokens']} text + {report['image_tokens']} image tokens; "
        f"{report['new_tokens']} new tokens forced; build+save {report['build_and_save_s']} s "
        f"({report['checkpoint_gb']} GB), load+warm {report['load_and_warm_s']} s"
    )
    header = (
        f"{'engine':<13}{'batch':>6}{'prep_s':>9}{'ttft_s':>9}{'total_s':>9}"
        f"{'decode_tok/s':>14}{'per_seq_tok/s':>15}{'studies/h':>11}{'x_b1':>7}{'peak_GB':>9}"
        f"{'load1':>7}"
    )
    print(header)
    print("-" * len(header))
    vs_batch1 = report["ratios"]["vs_batch1"]
    for engine, rows in (
        ("transformers", report["transformers_results"]),
        ("vllm", report["vllm_results"]),
    ):
        if isinstance(rows, str):
            print(f"{engine:<13}{rows}")
            continue
        for row in rows:
            if "error" in row:
                print(f"{engine:<13}{row['batch']:>6}  {row['error']}")
                continue
            x_b1 = vs_batch1.get(engine, {}).get(row["batch"], {}).get("studies_per_h")
            peak = next((row[k] for k in PEAK_KEYS if row.get(k) is not None), None)
            print(
                f"{engine:<13}{row['batch']:>6}{row.get('prep_s', float('nan')):>9.3f}"
                f"{row['ttft_s']:>9.3f}{row['total_s']:>9.3f}{_num(row['decode_tok_s']):>14}"
                f"{_num(row['per_seq_tok_s']):>15}{row['studies_per_h']:>11.1f}"
                f"{_num(x_b1, 2):>7}{_num(peak, 2):>9}{_num(row.get('load1_after'), 2):>7}"
            )
    print(
        "x_b1: studies/h over the same engine's at batch 1. peak_GB: torch's peak allocation "
        "(CUDA),\nthe process's peak RSS (CPU), or for vLLM the device memory in use "
        "(its up-front reservation).\nload1: the machine's 1-minute load average after "
        "the batch (other work on a shared machine)."
    )
    versus = report["ratios"]["vllm_over_transformers"]
    if isinstance(versus, str):
        print(f"vLLM / transformers: {versus}")
    else:
        for batch, ratio in versus.items():
            print(
                f"vLLM / transformers at batch {batch}: studies/h {ratio['studies_per_h']:.2f}, "
                f"TTFT {ratio['ttft_s']:.2f}"
            )


PEAK_KEYS = ("peak_gpu_gb", "peak_rss_gb", "gpu_in_use_gb")


def _num(value: float | None, decimals: int = 1) -> str:
    """``decimals`` decimals, or "n/a"."""
    return "n/a" if value is None else f"{value:.{decimals}f}"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke check)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens forced per request")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help="text tokens of the prompt (default: the real pre-read prompt's)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="torch intra-op threads with --tiny (default: torch's choice). On a shared CPU, "
        "threads that wait for each other can make small steps many times slower",
    )
    parser.add_argument(
        "--followup-cache",
        action="store_true",
        help="measure the follow-up prefix cache (TTFT against an unseen-prefix control) only",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gpu_preread.json")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or min(args.batch) < 1:
        parser.error("--new-tokens must be >= 2, --repeats and every --batch >= 1")
    if args.prompt_tokens is None:
        args.prompt_tokens = default_prompt_tokens()
    return args


if __name__ == "__main__":
    sys.exit(main())
