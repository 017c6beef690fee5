"""Refusal judges: ``score(prompts, responses)`` gives 1 for fulfilment, 0 for refusal and -1
(``UNPARSABLE``) when the judge's answer cannot be read. Heavy libraries load inside the judges."""

from __future__ import annotations

import functools
from dataclasses import field, fields, make_dataclass

from ..config import RunConfig
from ..errors import ConfigError
from ..stats import UNPARSABLE
from .base import Judge

__all__ = ["UNPARSABLE", "Judge", "JudgeOptions", "make_judge"]


# What the judges need of the run settings: the same fields and defaults as RunConfig, for callers that
# judge outside a run (``sftsafety judge-agreement``).
JUDGE_FIELDS = ("judge_mode", "judge_4bit", "judge_batch_size", "judge_endpoint", "judge_api_key_env",
                "judge_concurrency", "device", "dtype", "trust_remote_code")
JudgeOptions = make_dataclass("JudgeOptions", [(f.name, f.type, field(default=f.default)) for f in fields(RunConfig)
                                               if f.name in JUDGE_FIELDS], frozen=True)


@functools.cache
def _offline(cls: type) -> type:
    """An offline judge class with the Judge interface. keyword.py and learned.py stay plain classes: their
    source is the learned judge's features, hashed into its id, so an edit there would change every stored
    judgment's key."""
    return type(cls.__name__, (cls, Judge), {"__module__": cls.__module__, "__doc__": cls.__doc__})


def make_judge(name: str, options: JudgeOptions | None = None, hash_cache: dict | None = None) -> Judge:
    """The judge a --judge value names. ``options`` is a JudgeOptions or a RunConfig; ``hash_cache`` keeps
    the sha256 of a judge model's files between runs (the store's file-hash table)."""
    opts = options or JudgeOptions()
    kind, _, arg = name.partition(":")
    if name == "keyword":
        from .keyword import KeywordJudge

        return _offline(KeywordJudge)()
    if name == "learned":
        from .learned import LearnedJudge

        return _offline(LearnedJudge)()
    if kind == "sorry-bench":
        from .sorry_bench import HUB_JUDGE, SorryBenchJudge

        return SorryBenchJudge(arg.strip() or HUB_JUDGE, mode=opts.judge_mode, device=opts.device, dtype=opts.dtype,
                               load_in_4bit=opts.judge_4bit, batch_size=opts.judge_batch_size,
                               trust_remote_code=opts.trust_remote_code, hash_cache=hash_cache)
    if kind == "api" and arg.strip():
        from .api import make_api_judge

        return make_api_judge(arg.strip(), endpoint=opts.judge_endpoint, key_env=opts.judge_api_key_env,
                              concurrency=opts.judge_concurrency)
    raise ConfigError(f"--judge {name}: unknown judge; use learned, keyword, sorry-bench[:PATH] or api:MODEL")
