"""Build the configured engine: ``medgemma`` (transformers), ``vllm`` (server) or ``demo``.

Each engine module is imported only when chosen, so a vLLM or demo worker never imports
torch or transformers.
"""

from __future__ import annotations

from node.settings import EngineSettings
from workers.engines.base import Engine, EngineError

ENGINE_NAMES = ("medgemma", "vllm", "demo")


def make_engine(
    name: str,
    *,
    model: str = EngineSettings.model_fields["model"].default,
    revision: str = "",
    local_files_only: bool = True,
    device: str = "auto",
    server_url: str = "",
    demo_delay_seconds: float = 0.0,
    prefix_cache_studies: int = EngineSettings.model_fields["prefix_cache_studies"].default,
) -> Engine:
    """The engine named ``name`` (the ``[engine]`` settings), loaded and ready to generate.

    medgemma: the process-wide cached engine for (model, revision, device).
    vllm: a client of the OpenAI-compatible server at ``server_url`` (checked now).
    demo: the deterministic, non-clinical stand-in; model settings are ignored
    (``demo_delay_seconds``: it sleeps that long before each answer, for fault tests).
    Raises EngineError when the engine cannot run, with the fix in the message.
    """
    if name == "medgemma":
        from workers.engines.medgemma import get_engine

        return get_engine(
            model,
            revision,
            local_files_only=local_files_only,
            device=device,
            prefix_cache_studies=prefix_cache_studies,
        )
    if name == "vllm":
        if not server_url:
            raise EngineError(
                "engine.name is vllm but engine.server_url is empty: set it to the server's "
                "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"
            )
        from workers.engines.vllm import VllmEngine

        return VllmEngine(server_url, model, revision=revision)
    if name == "demo":
        from workers.engines.demo import DemoEngine

        return DemoEngine(delay_seconds=demo_delay_seconds)
    raise EngineError(f"engine.name {name!r} is not one of {', '.join(ENGINE_NAMES)}")
