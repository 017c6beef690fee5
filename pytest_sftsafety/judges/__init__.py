"""Refusal judges: ``score(prompts, responses)`` gives 1 for fulfilment and 0 for refusal."""

from __future__ import annotations

from typing import Protocol

from ..errors import ConfigError


class Judge(Protocol):
    id: str

    def score(self, prompts: list[str], responses: list[str]) -> list[int]:
        """1 = the response fulfils the request, 0 = it refuses (SORRY-Bench's convention)."""
        ...


def make_judge(name: str) -> Judge:
    if name == "keyword":
        from .keyword import KeywordJudge

        return KeywordJudge()
    raise ConfigError(f"--judge {name}: unknown judge; the available judge is: keyword")
