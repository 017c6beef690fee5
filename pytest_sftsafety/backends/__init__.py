"""Generation backends: ``make_backend`` picks one; heavy libraries are imported inside backend modules,
never here. What they share lives in ``base``."""

from __future__ import annotations

from .base import (
    ENGINE_VERSION,
    PLAIN_FORMAT,
    SERVED_ENGINE,
    Backend,
    BatchCallback,
    GenRow,
    check_pinned_gpus,
    engine_label,
    prompt_ids,
    share_cpu_threads,
    vllm_version,
)

__all__ = ["ENGINE_VERSION", "PLAIN_FORMAT", "SERVED_ENGINE", "Backend", "BatchCallback", "GenRow",
           "check_pinned_gpus", "engine_label", "make_backend", "prompt_ids", "share_cpu_threads", "vllm_version"]


def make_backend(cfg, plan) -> Backend:
    """The backend ``cfg.backend`` names, for the models of ``plan`` (heavy imports happen here)."""
    if cfg.backend == "openai":
        from .served import OpenAIBackend

        return OpenAIBackend(cfg, plan)
    if cfg.backend == "vllm":
        from .vllm_engine import VLLMBackend

        return VLLMBackend(cfg, plan)
    from .hf import HFBackend

    return HFBackend(cfg, plan)
