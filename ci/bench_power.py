"""Calibration of the release gate by simulation through the real runner.

Every simulated run goes through ``runner.run`` (or ``runner.run_adaptive``) and ``runner.assess`` on the
default family of 98 tests (44 categories, 4 domains and the overall rate at T=0 and T=0.7, 5 samples per
prompt at T=0.7, min-p 0.1), with answers drawn the way the runtime draws them: Gumbel-max over the same
noise for the reference and the candidate, so their samples are coupled (see
pytest_sftsafety/tools/simulation.py). Rates come with 95% Clopper-Pearson intervals.

Measured:
  - false alarms: any REGRESSION in a run with no change (checkpoint level), and with fine-tuning seed
    noise only (sd 0.3, 0.6, 1.0 on the log-odds), against a baseline of 4 seeds or with 3 candidate seeds;
  - power against an overall drop of 3 points and a 30-point drop in one category;
  - adaptive seeding (--seeds 2 --max-seeds 6): generations used against 6 samples everywhere, false alarms;
  - FLAKY's stated chance that a fresh run flags it, against fresh runs (binned);
  - the reported MDE against the drop the simulation catches with 80% power (overall row, one category);
  - on real models, the shipped demo's three fine-tuning seeds of one recipe: each against the base model it
    was tuned from, and each against a baseline of the other two (leave one seed out), with the coupling
    the engine gives (the share of identical answers drawn with one seed).

Usage: python ci/bench_power.py [--runs 400] [--workers 2] [--readme]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sps

from pytest_sftsafety.suite import CATEGORY, OVERALL, Target
from pytest_sftsafety.tools.simulation import Scenario, any_regression, make_world, simulated_run
from pytest_sftsafety.verdict import FLAKY, RECIPE, REGRESSION

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_blocks import publish  # noqa: E402
from readme_figures import pytest_run  # noqa: E402

HOT = 0.7
OVERALL_ROW = Target(OVERALL, HOT)
CATEGORY_ROW = Target(CATEGORY, HOT, category_id=1)
MIN_BIN = 30  # FLAKY tests a calibration bin needs before its gap counts
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else None


@dataclass(frozen=True)
class Job:
    scenario: Scenario
    world_seed: int
    rerun: bool = False  # also run the same test once more, as a fresh run would


def one(job: Job) -> dict:
    """One simulated run (and its fresh re-run when asked): what the table needs of it."""
    world = make_world(job.scenario, job.world_seed)
    first = simulated_run(job.scenario, world, run_seed=0, tag=f"w{job.world_seed}", folder=SHM)
    out = {"any": any_regression(first.verdicts),
           "overall": first.verdicts[OVERALL_ROW].status == REGRESSION,
           "category": first.verdicts[CATEGORY_ROW].status == REGRESSION,
           "overall_mde": first.verdicts[OVERALL_ROW].mde, "category_mde": first.verdicts[CATEGORY_ROW].mde,
           "adaptive": first.adaptive, "flaky": []}
    flaky = {t: v for t, v in first.verdicts.items() if v.status == FLAKY and v.rerun_probability is not None}
    if job.rerun and flaky:
        recipe = any(v.level == RECIPE for v in flaky.values())
        # A fresh run: another run seed, and at the recipe level another fine-tuning seed of the candidates.
        fresh_world = make_world(job.scenario, job.world_seed, candidate_seed=1) if recipe else world
        again = simulated_run(job.scenario, fresh_world, run_seed=1, tag=f"w{job.world_seed}r", folder=SHM)
        # Greedy rows at the checkpoint level state 0 by construction (their answers come back the same): kept apart.
        out["flaky"] = [(v.rerun_probability, again.verdicts[t].status == REGRESSION,
                         t.temperature == 0 and v.level != RECIPE) for t, v in flaky.items()]
    return out


def rate(hits: int, runs: int) -> str:
    ci = sps.binomtest(hits, runs).proportion_ci()
    return f"{hits / runs:.3f} [{ci.low:.3f}, {ci.high:.3f}]"


def drop_at_power(drops: list[float], powers: list[float], target: float = 0.8) -> float | None:
    """The drop at which the simulated power crosses ``target``, by linear interpolation."""
    points = list(zip(drops, powers, strict=True))
    for (d0, p0), (d1, p1) in zip(points, points[1:], strict=False):
        if p0 < target <= p1:
            return d0 + (target - p0) * (d1 - d0) / (p1 - p0)
    return None


def demo_seeds() -> list[str]:
    """The demo's seeds through pytest as a user runs it, sharing one store (answers are generated once):
    each seed against the base, then against a baseline saved from the other two seeds."""
    import json

    from pytest_sftsafety.tools import demo

    models = demo.checkpoints()
    suite = str(demo.shipped_demo() / "suite.toml")
    lines = ["| demo seed | against the base: regressions, flaky (level) | identical answers of one seed (base, seed) "
             "| against a baseline of the other two seeds: regressions, flaky (level) |",
             "| --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory(prefix="sftsafety-power-") as name:
        work = Path(name)
        common = ["-p", "no:cacheprovider", "-q", "--suite", suite, "--seeds", "5",
                  "--sftsafety-store", str(work / "store.sqlite")]

        def run(args: list[str], report: str) -> dict:
            status, output, _ = pytest_run([*common, *args, "--sftsafety-json", str(work / report)], work)
            if status not in (0, 1):
                raise SystemExit(f"pytest {' '.join(args)} failed (exit {status}):\n{output[-3000:]}")
            return json.loads((work / report).read_text())

        def counts(report: dict) -> str:
            tests = [*report["entries"], *report["aggregates"]]
            levels = sorted({t["level"] for t in tests})
            return (f"{report['summary']['regressions']} of {len(tests)}, {report['summary']['flaky']} "
                    f"({', '.join(levels)})")

        for k, model in enumerate(models):
            against_base = run(["--model", model], f"base-{k}.json")
            coupling = against_base["run"]["coupling"]
            others = [m for m in models if m != model]
            calibration = [arg for m in others for arg in ("--model", m)]
            run([*calibration, "--sftsafety-save-baseline", str(work / f"b{k}.json")], f"calibration-{k}.json")
            left_out = run(["--model", model, "--baseline", str(work / f"b{k}.json")], f"loo-{k}.json")
            lines.append(f"| {k} | {counts(against_base)} | {coupling['share']:.0%} of {coupling['pairs']} | "
                         f"{counts(left_out)} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400, help="simulated runs per row (default 400)")
    parser.add_argument("--curve-runs", type=int, default=150, help="runs per point of the power curves")
    parser.add_argument("--workers", type=int, default=max(1, len(os.sched_getaffinity(0))))
    parser.add_argument("--readme", action="store_true", help="write the figures into README.md's block")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    real = demo_seeds()
    n = args.runs
    rows = [
        ("no change, checkpoint level", Scenario(), "any", "<= 0.05", True),
        *[(f"seed noise only, sd {sd}, against a baseline of 4 seeds", Scenario(baseline=4, seed_sd=sd), "any",
           "<= 0.05", False) for sd in (0.3, 0.6, 1.0)],
        *[(f"seed noise only, sd {sd}, 3 candidate seeds", Scenario(candidates=3, seed_sd=sd), "any", "<= 0.05",
           sd == 0.6) for sd in (0.3, 0.6, 1.0)],
        ("overall drop of 3 points: the overall row (T=0.7)", Scenario(overall_drop=0.03), "overall", ">= 0.90", True),
        ("one category drops 30 points: that category (T=0.7)", Scenario(category_drop=0.30), "category", ">= 0.90",
         True),
    ]
    table = ["| scenario (98 tests, 5 samples per prompt at T=0.7) | flagged | target | measured |",
             "| --- | --- | --- | --- |"]
    flaky_pairs: list[tuple[float, bool]] = []
    mdes = {}
    with tempfile.TemporaryDirectory(), ProcessPoolExecutor(args.workers) as pool:
        for label, scenario, what, target, rerun in rows:
            results = list(pool.map(one, [Job(scenario, 1000 * len(table) + i, rerun) for i in range(n)], chunksize=4))
            hits = sum(r[what] for r in results)
            flagged = {"any": "any REGRESSION", "overall": "the row is REGRESSION",
                       "category": "the row is REGRESSION"}[what]
            table.append(f"| {label} | {flagged} | {target} | {rate(hits, n)} |")
            print(table[-1], flush=True)
            for r in results:
                flaky_pairs += r["flaky"]
            if label.startswith("no change"):
                mdes = {"overall": float(np.median([r["overall_mde"] for r in results])),
                        "category": float(np.median([r["category_mde"] for r in results]))}
        # Adaptive seeding through run_adaptive.
        for label, scenario, what in (("no change", Scenario(samples=2, max_samples=6), "any"),
                                      ("one category drops 30 points", Scenario(samples=2, max_samples=6,
                                                                               category_drop=0.30), "category")):
            results = list(pool.map(one, [Job(scenario, 90_000 + 1000 * len(table) + i) for i in range(n)],
                                    chunksize=4))
            used = sum(r["adaptive"]["generations_used"] for r in results)
            full = sum(r["adaptive"]["generations_at_max_seeds"] for r in results)
            hits = sum(r[what] for r in results)
            target = "<= 0.05" if what == "any" else "(power)"
            flagged = "any REGRESSION" if what == "any" else "the row is REGRESSION"
            table.append(f"| adaptive `--seeds 2 --max-seeds 6`, {label} | {flagged}; generations {used / full:.0%} "
                         f"of 6 samples everywhere (target <= 60%) | {target} | {rate(hits, n)} |")
            print(table[-1], flush=True)
        # Power curves for the MDE check.
        curves = {}
        for kind, make, drops in (("overall", lambda d: Scenario(overall_drop=d), [0.005, 0.01, 0.015, 0.02, 0.03]),
                                  ("category", lambda d: Scenario(category_drop=d), [0.1, 0.15, 0.2, 0.25, 0.3])):
            powers = []
            for d in drops:
                results = list(pool.map(one, [Job(make(d), 500_000 + int(d * 1e4) * 1000 + i, rerun=True)
                                              for i in range(args.curve_runs)], chunksize=4))
                powers.append(sum(r[kind] for r in results) / args.curve_runs)
                for r in results:
                    flaky_pairs += r["flaky"]
            curves[kind] = (drops, powers)
            print(kind, list(zip(drops, powers, strict=True)), flush=True)
    calibration = ["| stated chance a fresh run flags it | FLAKY tests | stated (mean) | fresh runs that flagged it |",
                   "| --- | --- | --- | --- |"]
    worst = 0.0
    estimated = [(p, hit) for p, hit, fixed in flaky_pairs if not fixed]
    for low, high in ((0.0, 0.1), (0.1, 0.3), (0.3, 0.6), (0.6, 1.01)):
        chosen = [(p, hit) for p, hit in estimated if low <= p < high]
        if not chosen:
            continue
        stated = float(np.mean([p for p, _ in chosen]))
        hits = sum(hit for _, hit in chosen)
        if len(chosen) >= MIN_BIN:
            worst = max(worst, abs(stated - hits / len(chosen)))
        calibration.append(f"| {low:.2f} to {min(high, 1):.2f} | {len(chosen)} | {stated:.3f} | "
                           f"{rate(hits, len(chosen))} |")
    fixed = [hit for _, hit, is_fixed in flaky_pairs if is_fixed]
    calibration.append(f"| 0: greedy at the checkpoint level (the same answers come back; only the other tests, "
                       f"through the family's correction, can change) | {len(fixed)} | 0 | "
                       f"{rate(sum(fixed), len(fixed)) if fixed else 'n/a'} |")
    power_lines = []
    for kind in ("overall", "category"):
        drops, powers = curves[kind]
        at80 = drop_at_power(drops, powers)
        ratio = f"{mdes[kind] / at80:.2f}x" if at80 else "n/a"
        power_lines.append(f"| {'overall row' if kind == 'overall' else 'one category'} (T=0.7) | "
                           f"{mdes[kind]:.3f} | {'n/a' if at80 is None else f'{at80:.3f}'} | {ratio} |")
    body = "\n".join([
        *table, "", *calibration, "",
        f"Largest gap between a bin's stated chance and its fresh runs (bins of {MIN_BIN} or more): {worst:.3f} "
        f"(target <= 0.10). The FLAKY tests come from the rows above and from the power curves' runs below, each "
        f"run once more with another run seed (at the recipe level, other fine-tuning seeds too).", "",
        "| test | reported MDE (median, no change) | drop caught with 80% power (simulated) | ratio |",
        "| --- | --- | --- | --- |", *power_lines, "",
        "On real models, the shipped demo (one recipe, three fine-tuning seeds; pytest as a user runs it, "
        "5 samples per prompt):", "", *real, "",
        f"{n} simulated runs per row ({args.curve_runs} per point of the power curves), through the real runner; "
        f"{time.perf_counter() - started:.0f} s on {args.workers} processes.",
    ])
    publish("power", "python ci/bench_power.py", body, args.readme)


if __name__ == "__main__":
    main()
