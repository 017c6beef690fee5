"""Generation backends. Heavy libraries are imported inside backend modules, never here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenRow:
    """One generation: the user prompt, its temperature and the seed of this sample."""

    prompt: str
    temperature: float
    seed: int


# Bump when decoding changes what a (model, prompt, settings, seed) produces: stored results are keyed by it.
ENGINE_VERSION = "decode-v1"

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
