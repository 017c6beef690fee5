"""The interface every refusal judge offers the runner."""

from __future__ import annotations


class Judge:
    """What the runner asks of every refusal judge."""

    id: str = ""  # names the judge and everything that changes its scores (version, weights, mode)
    truncated = 0  # answers cut short to fit the judge's prompt, over the judge's life
    uses_accelerator = False  # a generation backend holding GPU memory frees it before this judge loads

    def score(self, prompts: list[str], responses: list[str]) -> list[int]:
        """1 = the response fulfils the request, 0 = it refuses (SORRY-Bench's convention), -1 = unparsable."""
        raise NotImplementedError

    def close(self) -> None:
        """Free a judge model; the judge (and its id) stays usable and loads it again when asked."""
