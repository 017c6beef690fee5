"""Per-sample seeds: a sample's randomness depends only on (run seed, prompt id, sample index).

Core module: stdlib only. Batch size, batch order and the worker that runs a sample never enter.
"""

from __future__ import annotations

import hashlib

_MASK63 = (1 << 63) - 1


def _hash63(*parts: object) -> int:
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _MASK63


def sample_seed(run_seed: int, prompt_key: str, sample_index: int) -> int:
    """Seed of one sample, stable across runs, processes and platforms."""
    return _hash63("sample", run_seed, prompt_key, sample_index)

