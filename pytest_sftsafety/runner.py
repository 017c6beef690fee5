"""Plan every generation a process needs, run it in one pass per variant, judge, and build verdicts."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .backends import GenRow
from .config import RunConfig
from .seeding import sample_seed
from .stats import Verdict, tolerance_verdict
from .suite import Category, PromptSet

Cell = tuple[int, float]  # (category id, temperature)


@dataclass
class CellResult:
    """Outcomes and verdict of one (category, temperature) test."""

    category: Category
    temperature: float
    question_ids: list[int]
    reference: np.ndarray  # [prompt, sample] of 1 = fulfilment, 0 = refusal
    candidates: np.ndarray  # [checkpoint, prompt, sample]
    reference_texts: list[list[str]]
    candidate_texts: list[list[list[str]]]
    verdict: Verdict


@dataclass
class RunResult:
    cells: dict[Cell, CellResult]
    variants: list[str]
    generations: int
    seconds: float
    model_loads: int
    judge_id: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Slot:
    cell: Cell
    prompt_index: int
    sample: int


def run(cfg: RunConfig, prompts: PromptSet, cells: Sequence[Cell], backend_factory: Callable[[], object],
        judge) -> RunResult:
    """Generate and judge everything ``cells`` need for the candidates and the reference."""
    started = time.perf_counter()
    variants = [f"candidate:{i}" for i in range(len(cfg.models))] + ["reference"]
    slots: list[_Slot] = []
    rows: list[GenRow] = []
    slots_of: dict[Cell, list[int]] = {cell: [] for cell in cells}
    for cell in cells:
        category_id, temperature = cell
        for p_index, prompt in enumerate(prompts.by_category[category_id]):
            for sample in range(cfg.samples_at(temperature)):
                slots_of[cell].append(len(slots))
                slots.append(_Slot(cell, p_index, sample))
                rows.append(GenRow(prompt.text, temperature, sample_seed(cfg.run_seed, prompt.key, sample)))

    backend = backend_factory()
    texts: dict[str, list[str]] = {}
    try:
        for variant in variants:
            texts[variant] = backend.generate(variant, rows)
    finally:
        backend.close()
    scores = {v: judge.score([r.prompt for r in rows], texts[v]) for v in variants}

    results: dict[Cell, CellResult] = {}
    for cell in cells:
        category_id, temperature = cell
        n_prompts = len(prompts.by_category[category_id])
        n_samples = cfg.samples_at(temperature)
        outcome = np.zeros((len(variants), n_prompts, n_samples), dtype=np.int8)
        answer = [[["" for _ in range(n_samples)] for _ in range(n_prompts)] for _ in variants]
        for index in slots_of[cell]:
            slot = slots[index]
            for v_index, variant in enumerate(variants):
                outcome[v_index, slot.prompt_index, slot.sample] = scores[variant][index]
                answer[v_index][slot.prompt_index][slot.sample] = texts[variant][index]
        reference, candidates = outcome[-1], outcome[:-1]
        results[cell] = CellResult(
            category=prompts.suite.category(category_id), temperature=temperature,
            question_ids=[p.question_id for p in prompts.by_category[category_id]],
            reference=reference, candidates=candidates, reference_texts=answer[-1],
            candidate_texts=answer[:-1], verdict=tolerance_verdict(reference, candidates, cfg.margin))
    return RunResult(cells=results, variants=variants, generations=len(rows) * len(variants),
                     seconds=time.perf_counter() - started, model_loads=getattr(backend, "loads", 0),
                     judge_id=judge.id)
