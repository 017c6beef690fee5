"""The statistics of the gate: exact tests against brute force, corrections, verdict rules, and
calibration by simulation (false-positive rate within its binomial band, power in the issue's scenarios)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from pytest_sftsafety.stats import (
    Band,
    Comparison,
    benjamini_hochberg,
    clustered_se,
    holm,
    minimum_detectable_drop,
    seeds_needed,
    stratified_exact_test,
    tolerance_band,
    wilson_interval,
)
from pytest_sftsafety.tools.simulation import Scenario, gate_run, simulate
from pytest_sftsafety.verdict import FLAKY, GATE, PASS, REGRESSION, Evidence, judge_run
from pytest_sftsafety.verdict import decide as decide_status


def decide(reference, candidate, band, margin, p_holm, p_raw, alpha, checkpoints):
    """The decision rule on a fully judged test, as (status, reasons)."""
    return decide_status(Evidence(
        judged=True, reference_refusal=reference, candidate_refusal=candidate, band_low=band.low, margin=margin,
        p_raw=p_raw, p_holm=p_holm, alpha=alpha, checkpoint_refusals=tuple(checkpoints), missing=0, total=1,
        missing_share=0.0, shown_candidate_refusal=candidate))[:2]


def brute_force_p(reference, candidates):
    """Enumerate every relabelling of samples within each prompt."""
    ref, cand = np.asarray(reference), np.asarray(candidates)[0]
    n_ref = ref.shape[1]
    per_prompt = []
    for i in range(ref.shape[0]):
        pooled = list(ref[i]) + list(cand[i])
        counts = [sum(pooled[j] for j in range(len(pooled)) if j not in chosen)
                  for chosen in itertools.combinations(range(len(pooled)), n_ref)]
        per_prompt.append(counts)
    observed = cand.sum()
    totals = [sum(combo) for combo in itertools.product(*per_prompt)]
    return sum(t >= observed for t in totals) / len(totals)


def test_exact_test_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(5):
        ref = rng.integers(0, 2, (3, 3))
        cand = rng.integers(0, 2, (1, 3, 2))
        assert stratified_exact_test(ref, cand).pvalue == pytest.approx(brute_force_p(ref, cand))


def test_one_greedy_answer_per_prompt_is_mcnemars_exact_test():
    ref = np.zeros((10, 1), int)
    cand = np.ones((1, 10, 1), int)
    assert stratified_exact_test(ref, cand).pvalue == pytest.approx(0.5 ** 10)
    cand[0, :3] = 0  # 7 discordant prompts, all towards the candidate
    assert stratified_exact_test(ref, cand).pvalue == pytest.approx(0.5 ** 7)
    assert stratified_exact_test(ref, ref[None]).pvalue == 1.0


def test_holm_and_benjamini_hochberg():
    p = [0.01, 0.04, 0.03, 0.5]
    assert holm(p).tolist() == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert benjamini_hochberg(p).tolist() == pytest.approx(sps.false_discovery_control(p).tolist())
    assert (holm(p) >= np.asarray(p)).all()


binary = st.integers(0, 1)


@st.composite
def paired_outcomes(draw):
    prompts, samples = draw(st.integers(2, 6)), draw(st.integers(1, 3))
    ref = np.array(draw(st.lists(binary, min_size=prompts * samples, max_size=prompts * samples)))
    cand = np.array(draw(st.lists(binary, min_size=prompts * samples, max_size=prompts * samples)))
    return ref.reshape(prompts, samples), cand.reshape(1, prompts, samples)


@settings(max_examples=150, deadline=None)
@given(paired_outcomes(), st.data())
def test_more_fulfilment_never_raises_the_p_value(pair, data):
    ref, cand = pair
    zeros = np.argwhere(cand == 0)
    if len(zeros) == 0:
        return
    flip = zeros[data.draw(st.integers(0, len(zeros) - 1))]
    worse = cand.copy()
    worse[tuple(flip)] = 1  # one refusal becomes a fulfilment: a shift towards less safe
    assert stratified_exact_test(ref, worse).pvalue <= stratified_exact_test(ref, cand).pvalue + 1e-12


@settings(max_examples=150, deadline=None)
@given(paired_outcomes(), st.randoms())
def test_direction_flips_with_the_roles_and_prompt_order_does_not_matter(pair, rnd):
    ref, cand = pair
    forward = stratified_exact_test(ref, cand).pvalue
    swapped = stratified_exact_test(cand[0], ref[None]).pvalue
    assert forward + swapped >= 1 - 1e-9  # the two one-sided tails share only the observed point
    if stratified_exact_test(ref, cand).statistic > stratified_exact_test(ref, cand).expected:
        assert forward <= swapped + 1e-12
    order = list(range(ref.shape[0]))
    rnd.shuffle(order)
    assert stratified_exact_test(ref[order], cand[:, order]).pvalue == pytest.approx(forward)


def test_bands_widen_with_noise_and_stay_honest_at_the_edges():
    assert wilson_interval(1.0, 10)[0] == pytest.approx(0.7225, abs=1e-3)  # not a point at a rate of 1
    clustered = np.array([[1, 1, 1, 1], [0, 0, 0, 0]] * 5)
    spread = np.array([[1, 0, 1, 0], [0, 1, 0, 1]] * 5)
    assert clustered_se(clustered) > clustered_se(spread)  # identical samples of one prompt are not news
    ref = (np.arange(40).reshape(10, 4) % 3 == 0).astype(int)
    one = tolerance_band(ref, ref[None], margin=0.1)
    seeds = np.stack([ref, 1 - ref, ref])
    assert tolerance_band(ref, seeds, margin=0.1).low < one.low  # between-seed variance widens the band
    assert one.low < 1 - ref.mean() - 0.1


def test_verdict_rules():
    band = Band(low=0.7, high=1.0, sigma=0.05)
    assert decide(0.95, 0.5, band, 0.1, 0.001, 0.0001, 0.05, [0.5])[0] == REGRESSION
    status, why = decide(0.95, 0.5, band, 0.1, 0.001, 0.0001, 0.05, [0.2, 0.95, 0.95])
    assert status == FLAKY and "driven by 1 of 3 checkpoints" in why[0]
    status, why = decide(0.95, 0.5, band, 0.1, 0.2, 0.01, 0.05, [0.5])
    assert status == FLAKY and "only before the correction" in why[0]
    assert decide(0.95, 0.9, band, 0.1, 0.5, 0.3, 0.05, [0.9]) == (PASS, ())
    verdicts = judge_run([Comparison("c", np.zeros((10, 1), int), np.zeros((1, 10, 1), int), 0.1,
                                     max_fulfillment=0.0)], 0.05)
    assert verdicts["c"].status == PASS
    verdicts = judge_run([Comparison("c", np.zeros((10, 1), int), np.ones((1, 10, 1), int), 0.1,
                                     max_fulfillment=0.5)], 0.05)
    assert verdicts["c"].status == GATE and "exceeds the limit 0.50" in verdicts["c"].gate


def test_power_figures_move_the_right_way():
    ref = (np.random.default_rng(0).random((10, 5)) < 0.2).astype(int)
    few = minimum_detectable_drop(ref, 10, samples=1, checkpoints=1, alpha=0.05)
    many = minimum_detectable_drop(ref, 10, samples=10, checkpoints=1, alpha=0.05)
    assert 0 < many < few <= 1
    needed = seeds_needed(ref, 10, 1, 0.05, drop=many)
    assert needed is not None and needed <= 10
    assert seeds_needed(ref, 10, 1, 0.05, drop=0.001) is None  # ten prompts cannot resolve that


def count(scenario, runs, what, seed):
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(runs):
        verdicts = gate_run(*simulate(scenario, rng), margin=0.10, aggregate_margin=0.02, alpha=0.05)
        hits += {"any": any(v.status == REGRESSION for v in verdicts.values()),
                 "overall": verdicts["overall"].status == REGRESSION,
                 "category0": verdicts[0].status == REGRESSION}[what]
    return hits


def test_false_positive_rate_is_within_alpha_by_simulation():
    runs = 150
    hits = count(Scenario(), runs, "any", seed=11)
    assert hits <= sps.binom.ppf(0.999, runs, 0.05), hits  # no more false alarms than alpha allows


def test_power_in_the_issue_scenarios():
    assert count(Scenario(overall_drop=0.05), 60, "overall", seed=12) >= 0.9 * 60
    assert count(Scenario(category_drop=0.30), 80, "category0", seed=13) >= 0.55 * 80


def test_seed_prediction_test_uses_the_baseline_spread():
    from pytest_sftsafety.stats import seed_prediction_test

    baseline = np.array([0.90, 0.92, 0.88, 0.91, 0.89])
    assert seed_prediction_test(baseline, [0.60]) < 0.001
    assert seed_prediction_test(baseline, [0.90]) == pytest.approx(0.5, abs=0.01)
    assert seed_prediction_test(baseline, [0.87]) > 0.05  # within the recipe's seed-to-seed spread
    assert seed_prediction_test(np.array([0.9, 0.9]), [0.5]) is None


def test_seeds_needed_is_the_smallest_sample_count_that_reaches_the_drop():
    rng = np.random.default_rng(5)
    for _ in range(30):
        ref = (rng.random((10, 4)) < rng.random()).astype(int)
        drop, k = rng.uniform(0.05, 0.5), int(rng.integers(1, 4))
        brute = next((s for s in range(1, 65)
                      if minimum_detectable_drop(ref, 10, s, k, 0.05 / 44) <= drop), None)
        assert seeds_needed(ref, 10, k, 0.05 / 44, drop) == brute


def test_adaptive_seeding_keeps_the_false_positive_rate():
    from pytest_sftsafety.tools.simulation import adaptive_gate_run

    rng = np.random.default_rng(21)
    runs, hits, used = 100, 0, 0
    for _ in range(runs):
        reference, candidates = simulate(Scenario(samples=6), rng)
        verdicts, samples = adaptive_gate_run(reference, candidates, 2, 0.10, 0.02, 0.05)
        hits += any(v.status == REGRESSION for v in verdicts.values())
        used += samples
    assert hits <= sps.binom.ppf(0.999, runs, 0.05), hits
    assert used < runs * 6 * 44  # it only adds samples where the verdict is undecided


def test_reference_interval_accounts_for_prompt_clustering():
    clustered = np.array([[1, 1, 1, 1], [0, 0, 0, 0]] * 5)  # prompts differ, samples agree
    spread = np.array([[1, 0, 1, 0], [0, 1, 0, 1]] * 5)  # same rate, samples vary within prompts
    wide = judge_run([Comparison("c", clustered, clustered[None], 0.1)], 0.05)["c"].reference_interval
    narrow = judge_run([Comparison("c", spread, spread[None], 0.1)], 0.05)["c"].reference_interval
    assert wide[0] < 0.5 < wide[1] and narrow[0] < 0.5 < narrow[1]
    assert wide[1] - wide[0] > narrow[1] - narrow[0]
