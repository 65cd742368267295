"""`python -m workers.preflight`: check, before a worker starts, that its engine can run.

`medgemma-node worker` runs this first, so a missing model or an unreachable vLLM server
is one clear message at start (exit 2), not a failed study later. The medgemma check
looks for the checkpoint without loading it (the pool's processes load and warm it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from node.settings import EngineSettings, get_settings
from workers.engines.base import EngineError


def check_engine(engine: EngineSettings) -> str:
    """A one-line description of the engine that will run; EngineError with the fix if none."""
    if engine.name == "demo":
        return "demo engine (deterministic, non-clinical; every output says DEMO)"
    if engine.name == "vllm":
        from workers.engines.factory import make_engine

        made = make_engine("vllm", model=engine.model, revision=engine.revision,
                           server_url=engine.server_url)  # fmt: skip
        return f"vllm server {engine.server_url} serving {made.info.model_id}"
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise EngineError(
            "the medgemma engine needs torch and transformers: pip install 'medgemma-node[worker]'"
        ) from exc
    from workers.engines.medgemma import how_to_provide

    local = Path(engine.model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise EngineError(
                f"{local} holds no config.json: {how_to_provide(engine.model, engine.revision)}"
            )
        return f"medgemma from {local}"
    if engine.model.startswith(("/", ".", "~")):
        raise EngineError(
            f"MedGemma model directory {engine.model!r} does not exist: "
            f"{how_to_provide(engine.model, engine.revision)}"
        )
    if engine.local_files_only:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(
            engine.model, "config.json", revision=engine.revision or None
        )
        if not isinstance(found, str):
            raise EngineError(
                f"MedGemma model {engine.model!r} (revision {engine.revision}) is not in the "
                f"local Hugging Face cache: {how_to_provide(engine.model, engine.revision)}"
            )
    return f"medgemma {engine.model} ({engine.revision})"


def main() -> int:
    try:
        print(f"medgemma-node worker: {check_engine(get_settings().engine)}", flush=True)
    except EngineError as exc:
        print(f"medgemma-node worker: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
