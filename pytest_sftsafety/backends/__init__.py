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
