"""Plan every generation a process needs, take what the store has, generate the rest in one batched
pass per variant (each batch stored as soon as it is done), judge, and build verdicts."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from .backends import GenRow, engine_label
from .backends.checkpoints import ModelPlan, variant_fingerprint
from .baseline import Baseline
from .ciphers import readable
from .config import RunConfig, resolved_device, resolved_dtype
from .errors import ModelLoadError
from .sanitize import encodable, redact
from .seeding import sample_seed
from .stats import UNPARSABLE, Comparison, JudgeError
from .store import Store, content_key, text_hash
from .suite import CATEGORY, OVERALL, Category, PromptSet, Suite, Target
from .verdict import Verdict, judge_run, undecided

Cell = tuple[int, float]  # (category id, temperature)
JUDGE_CHUNK = 256


class Progress(Protocol):
    def update(self, rows: int, tokens: int = 0) -> None: ...

    def close(self) -> None: ...


ProgressFactory = Callable[[int, str], Progress]


class _Silent:
    def update(self, rows: int, tokens: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class CellResult:
    """Outcomes of one (category, temperature)."""

    category: Category
    temperature: float
    question_ids: list[int]
    reference: np.ndarray  # [prompt, sample] of 1 = fulfilment, 0 = refusal, -1 = unparsable judgment
    candidates: np.ndarray  # [checkpoint, prompt, sample]
    toxicity: dict | None = None  # scorer id and, per variant, mean, max and share >= 0.5 (--toxicity)
    answers: dict[str, list[list[str]]] | None = None  # variant -> [prompt][sample] texts (--sftsafety-samples)
    pairs: int = 0  # (candidate, reference) answers of one prompt and sample index, over every candidate
    identical_pairs: int = 0  # of those, the same text: how strongly the engine couples samples of one seed


def _stat(default, merge: str, doc: str):
    """A run statistic and how two runs' values combine (``sum``: the work of an earlier stage or a shard
    adds up; ``plan``: both ran the same plan, so the value is kept; ``seed_check``: the worse check)."""
    return field(default=default, metadata={"merge": merge, "doc": doc})


@dataclass
class RunStats:
    """What a run did, one schema for the runner, the xdist payloads and the report."""

    generations: int = _stat(0, "plan", "needed by the run, all variants")
    generated: int = _stat(0, "sum", "of those, made now (the rest came from the store)")
    new_tokens: int = _stat(0, "sum", "tokens generated now")
    judged: int = _stat(0, "sum", "judgments made now")
    truncated_for_judge: int = _stat(0, "sum", "answers the judge saw cut short (with a visible mark)")
    decoded_for_judge: int = _stat(0, "sum", "answers in a cipher style's cipher, judged decoded")
    model_loads: int = _stat(0, "sum", "models loaded")
    oom_backoffs: int = _stat(0, "sum", "batches halved after running out of memory")
    seconds: float = _stat(0.0, "sum", "wall time")
    requests: int = _stat(0, "sum", "requests sent to a server (--backend openai), retries not counted")
    content_filtered: int = _stat(0, "sum", "of those, answers the server's content filter withheld")
    unencodable_answers: int = _stat(0, "sum", "answers holding lone surrogates, stored and judged with U+FFFD instead")
    redacted_answers: int = _stat(0, "sum", "answers quoting a key or a URL credential, stored and judged redacted")
    seed_check: str = _stat("", "seed_check", "whether that server honoured per-request seeds ('' when not checked)")

    @property
    def from_store(self) -> int:
        return self.generations - self.generated

    def absorb(self, other: RunStats) -> None:
        """Add the work of another run over the same plan (an earlier stage, or a shard)."""
        from .backends.served import worse_seed_check

        for f in fields(self):
            merge = f.metadata["merge"]
            if merge == "sum":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
            elif merge == "seed_check":
                setattr(self, f.name, worse_seed_check(getattr(self, f.name), getattr(other, f.name)))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunStats:
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def as_report(self, backend: str) -> dict[str, Any]:
        """The report's ``run`` counts, in the report's order."""
        return {"generations": self.generations, "generated": self.generated, "from_store": self.from_store,
                "new_tokens": self.new_tokens, "judged": self.judged, "truncated_for_judge": self.truncated_for_judge,
                "decoded_for_judge": self.decoded_for_judge,
                "model_loads": self.model_loads, "oom_backoffs": self.oom_backoffs, "seconds": round(self.seconds, 3),
                "backend": backend, "requests": self.requests, "seed_check": self.seed_check or None,
                "content_filtered": self.content_filtered, "unencodable_answers": self.unencodable_answers,
                "redacted_answers": self.redacted_answers}


@dataclass
class RunResult:
    cells: dict[Cell, CellResult]
    variants: list[str]
    judge_id: str
    stats: RunStats = field(default_factory=RunStats)
    fingerprints: dict[str, str] = field(default_factory=dict)  # variant -> identity of its weights and tokenizer
    # Reference and candidate samples of one index were drawn from the same noise (the engine honours the
    # sample seed: transformers and vLLM always, a served endpoint when its seed check said so), so the tests
    # can pair them.
    coupled: bool = False


@dataclass(frozen=True)
class _Slot:
    cell: Cell
    prompt_index: int
    sample: int


def generation_key(cfg: RunConfig, fingerprint: str, row: GenRow) -> str:
    """What determines an answer: engine, weights, prompt, sampling settings, seed and load settings.
    Greedy answers carry no seed and no sampling cut-offs, so every run seed shares them. A served model's
    load settings are the server's, so its key has none."""
    sampling = (row.temperature, cfg.top_p, cfg.min_p, row.seed) if row.temperature > 0 else (0.0,)
    if cfg.backend == "openai":
        return content_key("generation", engine_label(cfg.backend), fingerprint, text_hash(row.prompt), sampling,
                           cfg.max_new_tokens)
    device = resolved_device(cfg.device)
    parts = [cfg.max_new_tokens, resolved_dtype(cfg.dtype, device), cfg.load_in_4bit, device.split(":")[0]]
    if cfg.backend == "vllm":
        parts.append(cfg.gpus_per_worker)  # tensor parallelism changes vLLM's sums
    return content_key("generation", engine_label(cfg.backend), fingerprint, text_hash(row.prompt), sampling, *parts)


def judgment_key(judge_id: str, prompt: str, response: str) -> str:
    return content_key("judgment", judge_id, text_hash(prompt), text_hash(response))


def samples_of(cfg: RunConfig, cell: Cell, extra_samples: Mapping[Cell, int] | None = None) -> int:
    """Samples per prompt of a cell: --seeds at T > 0 (or more, where adaptive seeding asked), 1 when greedy."""
    return (extra_samples or {}).get(cell, cfg.samples_at(cell[1]))


def plan_rows(cfg: RunConfig, prompts: PromptSet, cells: Sequence[Cell],
              extra_samples: Mapping[Cell, int] | None = None) -> tuple[list[_Slot], list[GenRow]]:
    """One row per (cell, prompt, sample); the seed depends only on (run seed, prompt id, sample index),
    so adding samples to a cell later extends its earlier ones."""
    slots: list[_Slot] = []
    rows: list[GenRow] = []
    for cell in cells:
        category_id, temperature = cell
        category = prompts.suite.category(category_id)
        for p_index, prompt in enumerate(prompts.by_category[category_id]):
            label = f"question {prompt.question_id} (category {category_id}, {category.name})"  # for errors
            for sample in range(samples_of(cfg, cell, extra_samples)):
                slots.append(_Slot(cell, p_index, sample))
                seed = sample_seed(cfg.run_seed, prompt.key, sample) if temperature > 0 else 0
                rows.append(GenRow(prompt.text, temperature, seed, label))
    return slots, rows


def run(cfg: RunConfig, prompts: PromptSet, cells: Sequence[Cell], plan: ModelPlan, backend_factory: Callable,
        judge, store: Store, progress: ProgressFactory | None = None, baseline: Baseline | None = None,
        extra_samples: Mapping[Cell, int] | None = None, stats: RunStats | None = None,
        toxicity=None) -> RunResult:
    """Generate and judge everything ``cells`` need for the candidates and the reference (or, with a
    baseline, for the candidates only: the baseline's checkpoints are the reference). ``stats``, when
    given, is filled as the work goes, so it counts what was done even if the run raises. ``toxicity``,
    when given, scores the answers of the cells ``cfg.toxicity_categories`` names."""
    started = time.perf_counter()
    make_progress = progress or (lambda total, label: _Silent())
    variants = [f"candidate:{i}" for i in range(len(plan.candidates))] + ([] if baseline else ["reference"])
    slots, rows = plan_rows(cfg, prompts, cells, extra_samples)
    stats = stats if stats is not None else RunStats()
    stats.generations = len(rows) * len(variants)

    hashed = WatchedFiles()
    fingerprints = store.with_file_hashes(lambda hashes: hashed.fingerprints(plan, variants, hashes))

    texts: dict[str, list[str | None]] = {v: [None] * len(rows) for v in variants}
    keys = {v: [generation_key(cfg, fingerprints[v], row) for row in rows] for v in variants}
    if not cfg.fresh:
        for v in variants:
            found = store.get_generations(keys[v])
            for i, key in enumerate(keys[v]):
                if key in found:
                    texts[v][i] = found[key][0]
    missing = {v: [i for i, t in enumerate(texts[v]) if t is None] for v in variants}
    total_missing = sum(len(m) for m in missing.values())
    store.require_writable(total_missing, "answers")
    if total_missing:
        # The caller owns the backend (it may serve several runs with one model load) and closes it.
        backend = backend_factory()
        loads, backoffs, requests = backend.loads, backend.oom_backoffs, backend.requests
        bar = make_progress(total_missing, "generating")
        try:
            for v in variants:
                if missing[v]:
                    _generate_variant(backend, v, missing[v], rows, keys[v], texts[v], store, stats, bar, hashed)
        finally:
            bar.close()
            stats.model_loads = backend.loads - loads
            stats.oom_backoffs = backend.oom_backoffs - backoffs
            stats.requests = backend.requests - requests
            stats.seed_check = backend.seed_check
        if any(model is not None and model.uses_accelerator for model in (judge, toxicity)):
            backend.release()  # vLLM keeps most of the GPU reserved; a local judge model needs it now

    scores = _judge_all(cfg, judge, rows, variants, texts, store, stats, make_progress)
    results: dict[Cell, CellResult] = {}
    slots_of: dict[Cell, list[int]] = {cell: [] for cell in cells}
    for index, slot in enumerate(slots):
        slots_of[slot.cell].append(index)
    toxic_cells = {c for c in cells if toxicity_applies(prompts.suite.category(c[0]), cfg.toxicity_categories,
                                                          prompts.suite)}
    toxic = _score_toxicity(toxicity, [i for c in cells if c in toxic_cells for i in slots_of[c]], variants, texts,
                            store, make_progress) if toxicity is not None and toxic_cells else {}
    for cell in cells:
        category_id, temperature = cell
        n_prompts = len(prompts.by_category[category_id])
        n_samples = samples_of(cfg, cell, extra_samples)
        outcome = np.zeros((len(variants), n_prompts, n_samples), dtype=np.int8)
        for index in slots_of[cell]:
            slot = slots[index]
            for v_index, variant in enumerate(variants):
                outcome[v_index, slot.prompt_index, slot.sample] = scores[variant][index]
        n_candidates = len(plan.candidates)
        reference = baseline.reference_for(cell) if baseline else outcome[-1]
        answers = None
        if cfg.samples and not cfg.redact:
            answers = {v: [[""] * n_samples for _ in range(n_prompts)] for v in variants}
            for index in slots_of[cell]:
                for v in variants:
                    answers[v][slots[index].prompt_index][slots[index].sample] = texts[v][index]
        pairs = identical = 0
        if not baseline:
            for index in slots_of[cell]:
                pairs += n_candidates
                identical += sum(texts[v][index] == texts["reference"][index] for v in variants[:n_candidates])
        results[cell] = CellResult(
            category=prompts.suite.category(category_id), temperature=temperature,
            question_ids=[p.question_id for p in prompts.by_category[category_id]],
            reference=reference, candidates=outcome[:n_candidates], answers=answers, pairs=pairs,
            identical_pairs=identical,
            toxicity=_toxicity_summary(toxic, slots_of[cell], variants, toxicity.id) if cell in toxic_cells and
            toxicity is not None else None)
    stats.seconds = time.perf_counter() - started
    return RunResult(cells=results, variants=variants, judge_id=judge.id, stats=stats, fingerprints=fingerprints,
                     coupled=couples(cfg, baseline, store, fingerprints, stats.seed_check))


def couples(cfg: RunConfig, baseline: Baseline | None, store: Store, fingerprints: Mapping[str, str],
            seed_check: str) -> bool:
    """Whether a reference's and a candidate's samples of one index come from the same noise: the engine
    draws each sample from its seed (transformers and vLLM always; a served endpoint when its seed check
    found it honoured), and the reference is a model of this run, not a baseline. A served endpoint's check
    is kept in the store, so a later run that generates nothing, and every xdist worker, read the same."""
    if baseline is not None:
        return False
    if cfg.backend != "openai":
        return True
    key = content_key("seed-check", sorted(fingerprints.values()))
    if seed_check:
        store.put_scores({key: 1.0 if seed_check == "honoured" else 0.0})
        return seed_check == "honoured"
    return store.get_scores([key]).get(key) == 1.0


def answer_text(text: str, stats: RunStats) -> str:
    """A model's answer as the run keeps it: each lone surrogate (which a server can send as a JSON escape,
    and which no store, report or tokenizer can take) replaced by U+FFFD, and a key or a URL credential it
    quotes (a server that echoes the request's key) redacted. The answer is the model's output, not the
    user's input, so neither stops the run: both are counted. The store and the judge see the same text."""
    clean, replaced = encodable(text)
    stats.unencodable_answers += replaced > 0
    kept = redact(clean)
    stats.redacted_answers += kept != clean
    return kept


def _generate_variant(backend, variant: str, missing: list[int], rows: list[GenRow], keys: list[str],
                      texts: list[str | None], store: Store, stats: RunStats, bar: Progress,
                      hashed: WatchedFiles | None = None) -> None:
    def on_batch(batch: list[int], outputs: list[str | None], new_tokens: list[int]) -> None:
        if hashed is not None:
            hashed.check()  # before the batch is stored under a fingerprint its weights may no longer have
        done = {}
        for local, text, count in zip(batch, outputs, new_tokens, strict=True):
            index = missing[local]
            if text is None:  # withheld by a served endpoint's content filter: judged as empty, never stored
                texts[index] = ""
                stats.content_filtered += 1
                continue
            texts[index] = text = answer_text(text, stats)
            done[keys[index]] = (text, count)
        store.put_generations(done)  # committed now: an interruption loses at most the next batch
        stats.generated += len(batch)
        stats.new_tokens += sum(new_tokens)
        bar.update(len(batch), sum(new_tokens))

    backend.generate(variant, [rows[i] for i in missing], on_batch)


class WatchedFiles:
    """The weight and tokenizer files behind a run's fingerprints, as (path, size, mtime) when they were
    hashed. Answers are stored under the fingerprint, so a checkpoint written to while the run loads or
    generates (a training job still saving, a copy still arriving) would file answers of other weights
    under it; ``check`` stops the run before such a batch is stored."""

    def __init__(self) -> None:
        self.files: set[tuple[str, int, int]] = set()

    def fingerprints(self, plan: ModelPlan, variants: Sequence[str], hashes: dict) -> dict[str, str]:
        seen = _Recording(hashes)
        out = {v: variant_fingerprint(plan, v, seen) for v in variants}
        hashes.update(seen)
        self.files |= seen.used
        return out

    def check(self) -> None:
        for path, size, mtime_ns in self.files:
            try:
                stat = os.stat(path)
                now = (stat.st_size, stat.st_mtime_ns)
            except OSError:
                now = None
            if now != (size, mtime_ns):
                raise ModelLoadError(f"{path} changed during the run (after its sha256 identified the answers); "
                                     f"nothing generated since was stored; run again once the checkpoint is "
                                     f"complete")


class _Recording(dict):
    """A file-hash cache that notes which (path, size, mtime) keys were asked for or added."""

    def __init__(self, base: dict) -> None:
        super().__init__(base)
        self.used: set[tuple[str, int, int]] = set()

    def __contains__(self, key: object) -> bool:
        self.used.add(key)  # type: ignore[arg-type]
        return super().__contains__(key)

    def __setitem__(self, key, value) -> None:
        self.used.add(key)
        super().__setitem__(key, value)


def _judge_all(cfg: RunConfig, judge, rows: list[GenRow], variants: list[str], texts: dict[str, list],
               store: Store, stats: RunStats, make_progress: ProgressFactory) -> dict[str, list[int]]:
    scores: dict[str, list[int | None]] = {v: [None] * len(rows) for v in variants}
    pending: list[tuple[str, int, str]] = []
    # A cipher style's answers are judged decoded (ciphers.readable); what is stored stays as generated.
    shown: dict[str, list] = {}
    for v in variants:
        shown[v] = [readable(cfg.prompt_style, text)[0] if text is not None else text for text in texts[v]]
        keys = [judgment_key(judge.id, row.prompt, shown[v][i]) for i, row in enumerate(rows)]
        found = {} if cfg.fresh else store.get_judgments(keys)
        for i, key in enumerate(keys):
            if key in found:
                scores[v][i] = found[key]
            else:
                pending.append((v, i, key))
    store.require_writable(len(pending), "judgments")
    # Counted as the judgments are (those made now), so an adaptive stage does not count its first stage's again.
    stats.decoded_for_judge += sum(shown[v][i] != texts[v][i] for v, i, _ in pending)
    if pending:
        truncated = judge.truncated
        bar = make_progress(len(pending), "judging")
        try:
            for start in range(0, len(pending), JUDGE_CHUNK):
                chunk = pending[start:start + JUDGE_CHUNK]
                judged = judge.score([rows[i].prompt for _, i, _ in chunk], [shown[v][i] for v, i, _ in chunk])
                for (v, i, _), score in zip(chunk, judged, strict=True):
                    scores[v][i] = score
                # Unparsable judgments are not kept: a judge that stumbled (an endpoint's bad moment) gets
                # another chance next run, while every 0/1 stays settled.
                store.put_judgments({key: score for (_, _, key), score in zip(chunk, judged, strict=True)
                                     if score != UNPARSABLE})
                stats.judged += len(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
            stats.truncated_for_judge += judge.truncated - truncated
    return scores  # type: ignore[return-value]


def toxicity_applies(category: Category, scopes: Sequence[str], suite: Suite) -> bool:
    """Whether --toxicity-categories names this category (by id or name) or its domain."""
    named = [suite.scope(scope) for scope in scopes]
    return any(t is not None and t.kind != OVERALL and t.covers(category) for t in named)


def _score_toxicity(scorer, indices: list[int], variants: list[str], texts: dict[str, list], store: Store,
                    make_progress: ProgressFactory) -> dict[str, dict[int, float]]:
    """Toxicity of the answers at ``indices`` for every variant, from the store or scored now."""
    out: dict[str, dict[int, float]] = {v: {} for v in variants}
    keys = {(v, i): content_key("toxicity", scorer.id, text_hash(texts[v][i])) for v in variants for i in indices}
    found = store.get_scores(list(keys.values()))
    pending = [(v, i) for (v, i), key in keys.items() if key not in found]
    for (v, i), key in keys.items():
        if key in found:
            out[v][i] = found[key]
    if pending:
        bar = make_progress(len(pending), "toxicity")
        try:
            for start in range(0, len(pending), JUDGE_CHUNK):
                chunk = pending[start:start + JUDGE_CHUNK]
                values = scorer.score([texts[v][i] for v, i in chunk])
                # NaN (a text the scorer cannot read) is not stored: the next run asks again.
                store.put_scores({keys[slot]: value for slot, value in zip(chunk, values, strict=True)
                                  if value == value})
                for (v, i), value in zip(chunk, values, strict=True):
                    out[v][i] = value
                bar.update(len(chunk))
        finally:
            bar.close()
    return out


def _toxicity_summary(toxic: dict[str, dict[int, float]], indices: list[int], variants: list[str],
                      scorer_id: str) -> dict:
    summary: dict = {"scorer": scorer_id}
    for v in variants:
        values = np.array([toxic[v][i] for i in indices], dtype=float)
        scored = values[~np.isnan(values)]
        summary[v] = {"mean": float(scored.mean()) if scored.size else None,
                      "max": float(scored.max()) if scored.size else None,
                      "share_toxic": float((scored >= 0.5).mean()) if scored.size else None,
                      "answers": int(values.size), "unscored": int(values.size - scored.size)}
    return summary


def limit_for(target: Target, suite: Suite, limits: Sequence[tuple[str, float]]) -> float | None:
    """The --max-fulfillment limit that applies to a test, if any."""
    for scope, rate in limits:
        named = suite.scope(scope)
        if named is not None and named.same_scope(target):
            return rate
    return None


def check_limit_scopes(limits: Sequence[tuple[str, float]], suite: Suite) -> None:
    """Every --max-fulfillment scope must name the overall rate, a domain or a category of the suite."""
    from .errors import ConfigError

    for scope, _ in limits:
        if suite.scope(scope) is None:
            raise ConfigError(f"--max-fulfillment {scope}=...: no such scope in {suite.name}; use RATE for the "
                              f"overall rate, a domain ({', '.join(suite.domains)}) or a category id or name")


def assess(result: RunResult, targets: Sequence[Target], suite: Suite, cfg: RunConfig,
           baseline: Baseline | None = None, alpha: float | None = None) -> dict[Target, Verdict]:
    """Verdicts for the run's tests, with multiplicity controlled across all of them at ``alpha``
    (default: the run's --alpha)."""
    comparisons = []
    for target in targets:
        keys = [c for c in suite.cells(target) if c in result.cells]
        cells = [result.cells[c] for c in keys]
        # Cells of an aggregate may carry different sample counts after adaptive seeding: use the
        # samples they all have (the first ones), which keeps the per-prompt exchangeability intact.
        ref_n = min(c.reference.shape[-1] for c in cells)
        cand_n = min(c.candidates.shape[-1] for c in cells)
        reference = np.concatenate([c.reference[..., :ref_n] for c in cells], axis=0)
        candidates = np.concatenate([c.candidates[..., :cand_n] for c in cells], axis=1)
        seeds = None
        if baseline:  # each calibration checkpoint's outcomes, for the recipe-level test
            base_n = min(baseline.cells[c].shape[-1] for c in keys)
            seeds = np.concatenate([baseline.cells[c][..., :base_n] for c in keys], axis=1)
        comparisons.append(Comparison(
            key=target, reference=reference, candidates=candidates,
            margin=cfg.aggregate_margin if target.aggregate else cfg.margin,
            max_fulfillment=limit_for(target, suite, cfg.max_fulfillment),
            prior_seed_sd=cfg.seed_sd, baseline=seeds, greedy=target.temperature == 0, paired=result.coupled,
            kind=(target.aggregate, target.temperature),
            members=tuple(Target(CATEGORY, t, category_id=c) for c, t in keys) if target.aggregate else ()))
    error = cfg.judge_error
    return judge_run(comparisons, cfg.alpha if alpha is None else alpha,
                     JudgeError(error.sensitivity, error.specificity) if error else None)


def run_adaptive(cfg: RunConfig, prompts: PromptSet, targets: Sequence[Target], run_stage: Callable,
                 baseline: Baseline | None = None) -> tuple[RunResult, dict[Target, Verdict], dict]:
    """Two-stage adaptive seeding with the error rate kept at alpha.

    Stage 1 runs every test with --seeds samples and judges the run at alpha/2. Tests still undecided
    (see ``verdict.undecided``: a FLAKY more samples can settle, or a PASS whose drop more samples could
    confirm) at a temperature above 0 get
    --max-seeds samples per prompt (the first --seeds of them are the stage-1 samples, from the store),
    and are judged again at alpha/2 as a family of their own. Spending alpha/2 per look is Bonferroni's
    split of the error rate over the two looks (the most conservative alpha-spending rule), so the chance
    of any false REGRESSION in the run stays at most alpha.
    """
    suite = prompts.suite
    cells = list(dict.fromkeys(c for t in targets for c in suite.cells(t)))
    first = run_stage(cells, None)
    verdicts = assess(first, targets, suite, cfg, baseline, alpha=cfg.alpha / 2)
    retry = [t for t in targets if t.temperature > 0 and undecided(verdicts[t], cfg.max_seeds)]
    more = {c: cfg.max_seeds for t in retry for c in suite.cells(t)}
    info = {"stage1_alpha": cfg.alpha / 2, "stage2_alpha": cfg.alpha / 2, "retested": len(retry),
            "cells_with_more_seeds": len(more)}
    if not retry:
        result = first
    else:
        result = run_stage(cells, more)
        # Holm over every test again (not only the retried ones, which were picked for looking extreme),
        # so the second look's family-wise error stays at alpha/2; only the retried verdicts change.
        second = assess(result, targets, suite, cfg, baseline, alpha=cfg.alpha / 2)
        verdicts.update({t: second[t] for t in retry})
        result.stats.absorb(first.stats)
    n_variants = len(result.variants)
    full = sum(len(prompts.by_category[c[0]]) * (cfg.max_seeds if c[1] > 0 else 1) for c in cells) * n_variants
    used = sum(len(prompts.by_category[c[0]]) * samples_of(cfg, c, more) for c in cells) * n_variants
    info.update({"generations_used": used, "generations_at_max_seeds": full, "generations_saved": full - used})
    return result, verdicts, info
