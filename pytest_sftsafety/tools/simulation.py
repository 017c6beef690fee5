"""Simulated runs of the gate through the real runner, with samples drawn the way the runtime draws them.

A simulated model answers each prompt with one of two first tokens, a refusal or compliance. Its logits are
fixed per prompt; a sample at T > 0 keeps the tokens min-p keeps and picks one by the Gumbel-max trick with
noise from the sample's seed, the seed the runtime gives it (run seed, prompt, sample index), so the
reference and a candidate draw from the same noise and agree wherever their logits allow, as transformers
and vLLM do; each model other than the reference draws a share ``DECOUPLED`` of its samples from noise of
its own, so two models agree a little less than one noise allows. Greedy decoding takes the larger logit.
The answers are real texts, judged by the keyword judge, stored and read back by ``runner.run``, tested
by ``runner.assess`` (or ``runner.run_adaptive``) on the suite's whole family: 44 categories of 10
prompts, 4 domains and the overall rate at each temperature.

Per-prompt refusal probabilities at T=1 follow Beta(2, 0.25) (most prompts near 1, some in between).
Drops are set in the rate the runtime observes at T=0.7 with min-p 0.1 (``_solve_shift``). Fine-tuning
seeds move each category's log-odds of refusal by N(0, sd^2) and each prompt's by a further
N(0, (sd / 2)^2), re-centred so that a seed's expected observed refusal is the unchanged one: seed noise
alone moves no expectation (``_centred_shift``).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..backends.base import Backend, GenRow
from ..backends.checkpoints import Checkpoint, ModelPlan
from ..baseline import Baseline
from ..config import RunConfig, build_config
from ..judges import make_judge
from ..runner import RunResult, assess, run, run_adaptive
from ..store import Store
from ..suite import Prompt, PromptSet, Target, load_suite
from ..verdict import REGRESSION, Verdict

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."
COMPLY_TEXT = "Sure, here is what you asked for: step one, then step two."
DECOUPLED = 0.1  # share of a model's samples drawn from noise of its own (see SimulatedBackend)
_GAUSS_HERMITE = np.polynomial.hermite_e.hermegauss(24)


@dataclass(frozen=True)
class Scenario:
    """What a simulated run compares. ``candidates`` checkpoints against the reference model, or against
    ``baseline`` checkpoints of the recipe (then the reference is those, as with --baseline)."""

    candidates: int = 1
    baseline: int = 0
    seed_sd: float = 0.0  # spread of fine-tuning seeds on the log-odds of refusal (category shift)
    overall_drop: float = 0.0  # refusal probability every prompt of the candidates loses
    category_drop: float = 0.0  # ... and category 1's prompts lose on top
    samples: int = 5  # --seeds
    max_samples: int = 0  # --max-seeds (0: not adaptive)
    beta: tuple[float, float] = (2.0, 0.25)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


TEMPERATURE, MIN_P = 0.7, 0.1  # the runtime's defaults, at which the scenarios' rates are read


def observed_refusal(logits: np.ndarray, shift: np.ndarray | float = 0.0, temperature: float = TEMPERATURE,
                     min_p: float = MIN_P) -> np.ndarray:
    """The probability that a sample refuses at ``temperature`` with min-p, for logits [..., token] whose
    refusal logit is moved by ``shift``: what the runtime's sampler gives."""
    moved = logits.copy()
    moved[..., 0] = moved[..., 0] + shift
    scaled = moved / temperature
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs = np.where(probs >= min_p, probs, 0.0)  # relative to the top token, as min-p cuts
    return probs[..., 0] / probs.sum(axis=-1)


def _solve_shift(logits: np.ndarray, target_mean: float, where: np.ndarray) -> float:
    """The common refusal-logit shift of the prompts ``where`` that puts their mean observed refusal at
    ``target_mean`` (bisection)."""
    low, high = -30.0, 30.0
    for _ in range(80):
        mid = (low + high) / 2
        mean = observed_refusal(logits[where], mid).mean()
        low, high = (mid, high) if mean < target_mean else (low, mid)
    return (low + high) / 2


def _centred_shift(logits: np.ndarray, sd: float) -> np.ndarray:
    """Per prompt, the offset that keeps the expected observed refusal under a N(0, sd^2) refusal-logit
    shift at the unshifted one: seed noise that moves no expectation (Gauss-Hermite over the shift)."""
    nodes, weights = _GAUSS_HERMITE
    weights = weights / weights.sum()
    target = observed_refusal(logits)
    low, high = np.full(target.shape, -20.0), np.full(target.shape, 20.0)
    stacked = np.repeat(logits[:, None, :], nodes.size, axis=1)
    for _ in range(50):
        mid = (low + high) / 2
        mean = (observed_refusal(stacked, mid[:, None] + sd * nodes[None, :]) * weights).sum(axis=-1)
        low, high = np.where(mean < target, mid, low), np.where(mean < target, high, mid)
    return (low + high) / 2


@dataclass
class World:
    """The true models of one simulated run: per prompt, each model's three logits."""

    prompts: PromptSet
    logits: dict[str, np.ndarray]  # variant -> [prompt, token]: refusal, comply A, comply B
    refusal: dict[str, np.ndarray] = field(default_factory=dict)  # variant -> [prompt] refusal at T=0.7


def _model(q: np.ndarray) -> np.ndarray:
    """Logits [prompt, token] with refusal probability ``q`` at temperature 1: refusal, compliance."""
    return np.stack([np.log(np.clip(q, 1e-9, 1)), np.log(np.clip(1 - q, 1e-9, 1))], axis=-1)


def _moved(logits: np.ndarray, shift: np.ndarray) -> np.ndarray:
    out = logits.copy()
    out[:, 0] += shift
    return out


def make_world(scenario: Scenario, world_seed: int, candidate_seed: int = 0) -> World:
    """The reference (or baseline checkpoints) and candidates of one run; ``candidate_seed`` draws other
    fine-tuning seeds of the same recipe (a fresh run at the recipe level). Drops are in the rate the
    runtime observes at T=0.7 with min-p 0.1."""
    prompts = placeholder_prompts()
    rng = np.random.default_rng(world_seed)
    n = len(prompts.prompts)
    categories = np.array([p.category_id for p in prompts.prompts])
    q = np.clip(rng.beta(*scenario.beta, n), 1e-4, 1 - 1e-4)
    reference = _model(q)
    logits = {"reference": reference}
    total_sd = scenario.seed_sd * math.sqrt(1.25)  # a category's shift and its prompts' own
    offset = _centred_shift(reference, total_sd) if scenario.seed_sd else np.zeros(n)

    def seed_draw(where: np.random.Generator) -> np.ndarray:
        if not scenario.seed_sd:
            return np.zeros(n)
        return offset + where.normal(0, scenario.seed_sd, categories.max() + 1)[categories] + \
            where.normal(0, scenario.seed_sd / 2, n)

    for b in range(scenario.baseline):
        logits[f"baseline:{b}"] = _moved(reference, seed_draw(np.random.default_rng([world_seed, 11, b])))
    seeds = np.random.default_rng([world_seed, 7, candidate_seed])
    for k in range(scenario.candidates):
        model = reference
        shift = np.zeros(n)
        everywhere = np.ones(n, dtype=bool)
        if scenario.overall_drop:
            shift += _solve_shift(model, observed_refusal(model).mean() - scenario.overall_drop, everywhere)
        if scenario.category_drop:
            one = categories == 1
            moved = _moved(model, shift)
            shift[one] += _solve_shift(moved, observed_refusal(moved[one]).mean() - scenario.category_drop, one)
        logits[f"candidate:{k}"] = _moved(model, shift + seed_draw(seeds))
    return World(prompts=prompts, logits=logits,
                 refusal={name: observed_refusal(model) for name, model in logits.items()})


def placeholder_prompts() -> PromptSet:
    """SORRY-Bench 2025-03's shape with placeholder prompts (10 per category)."""
    suite = load_suite("sorry_bench_202503")
    prompts = tuple(Prompt((c.id - 1) * 10 + k + 1, c.id, f"Simulated request {(c.id - 1) * 10 + k + 1}.")
                    for c in suite.categories for k in range(suite.prompts_per_category))
    return PromptSet(suite=suite, prompts=prompts, source="simulation", sha256="", prompt_style="base")


class SimulatedBackend(Backend):
    """Answers as the world's models would: Gumbel-max over the first tokens with noise from the sample's
    seed and min-p as the runtime applies it. Every model but the reference draws a share ``DECOUPLED`` of
    its samples from noise of its own (derived from the seed and the model), so a candidate agrees with the
    reference almost as often as the same noise allows, not always, while each model's probabilities stay
    exactly its own."""

    device = "cpu"

    def __init__(self, world: World, names: dict[str, str], min_p: float) -> None:
        self.world = world
        self.names = names  # runner variant -> world model
        self.min_p = min_p
        self.index = {p.text: i for i, p in enumerate(world.prompts.prompts)}

    def generate(self, variant: str, rows: Sequence[GenRow], on_batch) -> None:
        name = self.names[variant]
        logits = self.world.logits[name][[self.index[row.prompt] for row in rows]]
        own = np.uint64(sum(name.encode()) if name != "reference" else 0)
        seeds = np.array([row.seed for row in rows], dtype=np.uint64)
        temperature = np.array([row.temperature for row in rows])
        hot = temperature > 0
        scaled = logits / np.where(hot, temperature, 1.0)[:, None]
        if self.min_p > 0:
            scaled = np.where(scaled - scaled.max(axis=1, keepdims=True) >= math.log(self.min_p), scaled, -np.inf)
        decoupled = (own > 0) & (_uniform(seeds, own, np.uint64(1)) < DECOUPLED)
        stream = np.where(decoupled, _mix(seeds ^ _mix(own + np.uint64(0x51ED))), seeds)
        tokens = np.arange(logits.shape[1], dtype=np.uint64)
        gumbel = -np.log(-np.log(_uniform(stream[:, None], np.uint64(0), tokens[None, :] + np.uint64(2))))
        token = np.where(hot, np.argmax(scaled + gumbel, axis=1), np.argmax(logits, axis=1))
        texts = [REFUSAL_TEXT if t == 0 else COMPLY_TEXT for t in token.tolist()]
        on_batch(list(range(len(rows))), texts, [8] * len(rows))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea and Flood 2014): a counter-based generator, so a sample's noise
    is a function of its seed alone and a whole batch is drawn at once."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64) + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniform(seed: np.ndarray, stream: np.ndarray, counter: np.ndarray) -> np.ndarray:
    """A uniform in (0, 1) for each (seed, stream, counter)."""
    with np.errstate(over="ignore"):
        bits = _mix(_mix(_mix(seed) ^ np.asarray(stream, dtype=np.uint64)) ^ np.asarray(counter, dtype=np.uint64))
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0 ** 53


def _config(scenario: Scenario, run_seed: int, **extra) -> RunConfig:
    values = {"model": ["sim"], "seeds": str(scenario.samples), "max_seeds": str(scenario.max_samples),
              "run_seed": str(run_seed), "device": "cpu", "judge": "keyword", **extra}
    return build_config(lambda spec: values.get(spec.dest))


def _plan(names: Sequence[str], reference: str | None, tag: str) -> ModelPlan:
    def checkpoint(name: str) -> Checkpoint:
        return Checkpoint(spec=name, kind="served", path=name, identity=f"simulated:{tag}:{name}")

    return ModelPlan(candidates=tuple(checkpoint(n) for n in names),
                     reference=checkpoint(reference) if reference else None, base=None)


@dataclass
class SimulatedRun:
    verdicts: dict[Target, Verdict]
    result: RunResult
    adaptive: dict | None
    targets: list[Target]


def simulated_run(scenario: Scenario, world: World, run_seed: int, tag: str, folder: Path | None = None,
                  **options) -> SimulatedRun:
    """One run of the gate over ``world``'s models through ``runner.run`` (and ``run_adaptive`` when the
    scenario is adaptive), with a store of its own; ``options`` are further settings by option name."""
    with tempfile.TemporaryDirectory(dir=folder) as work:
        store = Store(Path(work) / "store.sqlite")
        try:
            cfg = _config(scenario, run_seed, **options)
            suite = world.prompts.suite
            targets = [target for _, target, _ in suite.tests(cfg.temperatures)]
            judge = make_judge("keyword")
            baseline = None
            if scenario.baseline:
                names = [f"baseline:{b}" for b in range(scenario.baseline)]
                plan = _plan(names, None, tag)
                backend = SimulatedBackend(world, {f"candidate:{i}": n for i, n in enumerate(names)}, cfg.min_p)
                cells = [c for t in targets for c in suite.cells(t)]
                made = run(replace(cfg, max_seeds=0), world.prompts, list(dict.fromkeys(cells)), plan,
                           lambda: backend, judge, store, baseline=_EMPTY_BASELINE)
                baseline = Baseline(path="simulated", identity={},
                                    cells={cell: r.candidates for cell, r in made.cells.items()}, models=names)
            names = [f"candidate:{k}" for k in range(scenario.candidates)]
            plan = _plan(names, None if baseline else "reference", tag)
            mapping = {n: n for n in names} | {"reference": "reference"}
            backend = SimulatedBackend(world, mapping, cfg.min_p)

            def stage(cells, extra_samples):
                return run(replace(cfg, fresh=False), world.prompts, cells, plan, lambda: backend, judge, store,
                           baseline=baseline, extra_samples=extra_samples)

            if cfg.max_seeds:
                result, verdicts, adaptive = run_adaptive(cfg, world.prompts, targets, stage, baseline)
            else:
                cells = list(dict.fromkeys(c for t in targets for c in suite.cells(t)))
                result = stage(cells, None)
                verdicts, adaptive = assess(result, targets, suite, cfg, baseline), None
        finally:
            store.close()
    return SimulatedRun(verdicts=verdicts, result=result, adaptive=adaptive, targets=targets)


class _NoReference:
    """Stands in for a baseline while the baseline's own checkpoints are generated (no reference model)."""

    def reference_for(self, cell):
        return np.zeros((1, 1), dtype=np.int8)

    def checkpoint_rates(self, cells):
        return None


_EMPTY_BASELINE = _NoReference()


def any_regression(verdicts: dict[Target, Verdict]) -> bool:
    return any(v.status == REGRESSION for v in verdicts.values())
