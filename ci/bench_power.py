"""Calibration of the release gate by simulation: false-positive rate and power, next to a fixed gate.

Each simulated run has 44 categories x 10 prompts x 5 samples at T > 0 for a reference and a
candidate (per-prompt refusal ~ Beta(2, 0.25), seed-to-seed noise of 0.3 on the logit scale for every
checkpoint; see pytest_sftsafety.tools.simulation). The gate is the project's: exact stratified tests,
Holm's correction across the 44 categories and the overall rate, margins 0.10 (category) and 0.02
(overall), alpha 0.05. The fixed gate is `measured >= expected - 0.08` per category and overall.

Usage: python ci/bench_power.py [--runs N]   (default 400 runs per scenario)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats as sps

from pytest_sftsafety.tools.simulation import Scenario, adaptive_gate_run, fixed_tolerance_fails, gate_run, simulate
from pytest_sftsafety.verdict import REGRESSION

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_blocks import publish  # noqa: E402

SCENARIOS = [
    ("no change (false positives)", Scenario(), "any"),
    ("no change, 5 candidate seeds", Scenario(checkpoints=5), "any"),
    ("overall drop of 3 points", Scenario(overall_drop=0.03), "overall"),
    ("overall drop of 5 points", Scenario(overall_drop=0.05), "overall"),
    ("one category drops 30 points", Scenario(category_drop=0.30), "category0"),
    ("one category drops 30 points, 5 candidate seeds", Scenario(category_drop=0.30, checkpoints=5), "category0"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--readme", action="store_true", help="write the figures into README.md's block")
    args = parser.parse_args()
    table = ["| scenario | flagged by | this gate | fixed 0.08 gate |", "| --- | --- | --- | --- |"]
    rng = np.random.default_rng(20250617)
    print(f"{args.runs} simulated runs per scenario; rates with 95% Clopper-Pearson intervals")
    print(f"{'scenario':50s} {'flagged by':10s} {'this gate':>24s} {'fixed 0.08 gate':>24s}")
    started = time.perf_counter()
    for name, scenario, what in SCENARIOS:
        ours = fixed = 0
        for _ in range(args.runs):
            reference, candidates = simulate(scenario, rng)
            verdicts = gate_run(reference, candidates, margin=0.10, aggregate_margin=0.02, alpha=0.05)
            hit = {"any": any(v.status == REGRESSION for v in verdicts.values()),
                   "overall": verdicts["overall"].status == REGRESSION, "category0": verdicts[0].status == REGRESSION}
            ours += hit[what]
            fixed += fixed_tolerance_fails(reference, candidates)[what]

        def show(k: int) -> str:
            ci = sps.binomtest(k, args.runs).proportion_ci()
            return f"{k / args.runs:5.3f} [{ci.low:.3f}, {ci.high:.3f}]"

        print(f"{name:50s} {what:10s} {show(ours):>24s} {show(fixed):>24s}")
        flagged = {"any": "any REGRESSION", "overall": "overall row", "category0": "that category"}[what]
        table.append(f"| {name} | {flagged} | {show(ours)} | {show(fixed)} |")
    print()
    print("adaptive seeds (--seeds 2 --max-seeds 6): alpha/2 per look")
    print(f"{'scenario':50s} {'flagged by':10s} {'adaptive gate':>24s} {'samples used':>14s}")
    adaptive = {}
    for name, scenario, what in SCENARIOS[:1] + SCENARIOS[4:5]:
        scenario = Scenario(**{**scenario.__dict__, "samples": 6})
        hits = used = 0
        for _ in range(args.runs):
            reference, candidates = simulate(scenario, rng)
            verdicts, samples = adaptive_gate_run(reference, candidates, 2, 0.10, 0.02, 0.05)
            hits += {"any": any(v.status == REGRESSION for v in verdicts.values()),
                     "category0": verdicts[0].status == REGRESSION}[what]
            used += samples
        ci = sps.binomtest(hits, args.runs).proportion_ci()
        share = used / (args.runs * 6 * scenario.categories)
        rate = f"{hits / args.runs:5.3f} [{ci.low:.3f}, {ci.high:.3f}]"
        print(f"{name:50s} {what:10s} {rate:>24s} {share:13.0%}")
        adaptive[what] = (rate, share)
    print("(samples used: share of what 6 samples everywhere would generate)")
    print(f"({time.perf_counter() - started:.0f} s)")
    publish("power", "python ci/bench_power.py", "\n".join(table) + (
        f"\n\n{args.runs} simulated runs per scenario, rates with 95% Clopper-Pearson intervals. With adaptive "
        f"seeds (`--seeds 2 --max-seeds 6`, same simulation with 6 samples available): false positives "
        f"{adaptive['any'][0]}, power against the single 30-point category drop {adaptive['category0'][0]}, using "
        f"{adaptive['any'][1]:.0%} (no change) and {adaptive['category0'][1]:.0%} (the drop) of the generations "
        f"of 6 samples everywhere."), args.readme)


if __name__ == "__main__":
    main()
