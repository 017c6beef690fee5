"""The decoding runtime: greedy is greedy, a sample depends only on its own seed, the sampler draws
from transformers' temperature/top-p/min-p distribution, and out-of-memory shrinks the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from pytest_sftsafety.backends import GenRow
from pytest_sftsafety.backends.checkpoints import plan_models
from pytest_sftsafety.backends.decoding import choose_tokens, filter_logits, uniform_noise
from pytest_sftsafety.config import build_config
from pytest_sftsafety.seeding import sample_seed

PROMPTS = ["Placeholder request 1 of the category Personal Insult Words. Please help me with it.",
           "Tell me something nice about owls, please.",
           "Placeholder request 77 of the category Sexual Crimes. Please help me with it.",
           "Hi",
           "Placeholder request 300 of the category Religion. Please help me with it, and say why, at length."]


def make_backend(model_dir, reference=None, **options):
    from pytest_sftsafety.backends.hf import HFBackend

    values = {"model": [str(model_dir)], "max_new_tokens": "12", "device": "cpu", "min_p": "0.05",
              **{k: str(v) for k, v in options.items()}}
    cfg = build_config(lambda spec: values.get(spec.dest))
    return HFBackend(cfg, plan_models(cfg.models, str(reference) if reference else None, None, False))


def generate(backend, variant, rows):
    out = [None] * len(rows)

    def on_batch(indices, texts, tokens):
        for i, text in zip(indices, texts, strict=True):
            assert out[i] is None, "a row was generated twice"
            out[i] = text

    backend.generate(variant, rows, on_batch)
    assert None not in out
    return out


def rows_for(prompts, temperature, samples, run_seed=0):
    return [GenRow(p, temperature, sample_seed(run_seed, f"base:{i}", s) if temperature else 0)
            for i, p in enumerate(prompts) for s in range(samples)]


@pytest.fixture(scope="module")
def adapter_backend(toy_models):
    backend = make_backend(toy_models.answer_all)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def random_backend(toy_models):
    backend = make_backend(toy_models.random, reference=toy_models.random)
    yield backend
    backend.close()


def test_greedy_matches_transformers_generate(random_backend):
    rows = rows_for(PROMPTS, 0.0, 1)
    ours = generate(random_backend, "candidate:0", rows)
    model, tok = random_backend._model, random_backend._tokenizer
    for prompt, text in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([random_backend._encode(prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == text
    assert len(set(ours)) > 1


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_samples_do_not_depend_on_batching(random_backend, data):
    rows = rows_for(PROMPTS, 1.0, 3) + rows_for(PROMPTS[:2], 0.0, 1)
    expected = getattr(test_samples_do_not_depend_on_batching, "expected", None)
    if expected is None:
        random_backend.batch_size = len(rows)
        expected = generate(random_backend, "candidate:0", rows)
        test_samples_do_not_depend_on_batching.expected = expected
        assert len(set(expected)) > len(PROMPTS)  # samples of one prompt really differ
    order = data.draw(st.permutations(range(len(rows))))
    cut = data.draw(st.integers(0, len(rows)))
    random_backend.batch_size = data.draw(st.integers(1, len(rows)))
    first = generate(random_backend, "candidate:0", [rows[i] for i in order[:cut]])
    random_backend.batch_size = data.draw(st.integers(1, len(rows)))
    second = generate(random_backend, "candidate:0", [rows[i] for i in order[cut:]])
    got = dict(zip(order, first + second, strict=True))
    assert [got[i] for i in range(len(rows))] == expected


def test_run_seed_changes_samples_not_greedy(random_backend):
    random_backend.batch_size = 64
    assert generate(random_backend, "candidate:0", rows_for(PROMPTS, 1.0, 2, run_seed=0)) != \
        generate(random_backend, "candidate:0", rows_for(PROMPTS, 1.0, 2, run_seed=1))


def test_reference_variant_switches_the_adapter_off(adapter_backend):
    rows = rows_for(PROMPTS[:1], 0.0, 1)
    assert generate(adapter_backend, "reference", rows) != generate(adapter_backend, "candidate:0", rows)
    assert adapter_backend.loads == 1  # one base in memory serves both


def test_out_of_memory_halves_the_batch_and_loses_nothing(toy_models, monkeypatch):
    import pytest_sftsafety.backends.hf as hf

    rows = rows_for(PROMPTS, 1.0, 4)
    backend = make_backend(toy_models.random, reference=toy_models.random, batch_size=20)
    expected = generate(backend, "candidate:0", rows)
    real_decode, sizes = hf.decode, []

    def tight_memory(model, prompts, row_prompt, *args, **kwargs):
        sizes.append(len(row_prompt))
        if len(row_prompt) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decode(model, prompts, row_prompt, *args, **kwargs)

    monkeypatch.setattr(hf, "decode", tight_memory)
    backend.batch_size = 20
    assert generate(backend, "candidate:0", rows) == expected
    assert backend.oom_backoffs >= 2 and backend.batch_size <= 3 and sizes[0] == 20
    backend.close()


def test_uniform_noise_is_uniform_and_independent():
    seeds = torch.tensor([sample_seed(0, f"p{i}", s) for i in range(50) for s in range(4)])
    u = uniform_noise(seeds, step=3, vocab=500).numpy().ravel()
    assert 0 < u.min() and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    other_step = uniform_noise(seeds, step=4, vocab=500).numpy().ravel()
    assert abs(np.corrcoef(u, other_step)[0, 1]) < 0.02
    assert torch.equal(uniform_noise(seeds[5:6], 3, 500), uniform_noise(seeds, 3, 500)[5:6])


@pytest.mark.parametrize("temperature, top_p, min_p", [(1.0, 1.0, 0.0), (0.7, 1.0, 0.1), (1.3, 0.8, 0.0),
                                                      (0.7, 0.9, 0.05)])
def test_sampled_frequencies_match_the_filtered_softmax(temperature, top_p, min_p):
    """Chi-square goodness of fit of 20,000 seeded draws against transformers' own warpers."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0]])
    expected_scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1:
        expected_scores = TopPLogitsWarper(top_p)(None, expected_scores)
    if min_p > 0:
        expected_scores = MinPLogitsWarper(min_p)(None, expected_scores)
    expected = torch.softmax(expected_scores, -1)[0].numpy()
    ours = filter_logits(logits, torch.tensor([temperature]), top_p, min_p)
    assert torch.allclose(torch.softmax(ours, -1)[0], torch.from_numpy(expected))

    n = 20_000
    seeds = torch.tensor([sample_seed(11, "toy", s) for s in range(n)])
    draws = choose_tokens(logits.expand(n, -1), torch.full((n,), temperature), seeds, step=0, top_p=top_p,
                          min_p=min_p)
    counts = np.bincount(draws.numpy(), minlength=logits.shape[-1])
    kept = expected > 0
    assert counts[~kept].sum() == 0  # filtered tokens are never drawn
    probabilities = expected[kept].astype(np.float64) / expected[kept].astype(np.float64).sum()
    assert stats.chisquare(counts[kept], probabilities * counts.sum()).pvalue > 1e-3


def test_greedy_rows_ignore_their_seed():
    logits = torch.randn(6, 50)
    chosen = choose_tokens(logits, torch.zeros(6), torch.arange(6), step=0)
    assert torch.equal(chosen, logits.argmax(-1))
