"""The transformers backend: greedy is greedy, samples depend on their own seed, not on the batch."""

from __future__ import annotations

import pytest

from pytest_sftsafety.backends import GenRow
from pytest_sftsafety.backends.checkpoints import plan_models
from pytest_sftsafety.config import build_config
from pytest_sftsafety.seeding import sample_seed


@pytest.fixture(scope="module")
def backend(toy_models):
    from pytest_sftsafety.backends.hf import HFBackend

    cfg = build_config(lambda spec: {"model": [str(toy_models.answer_all)], "max_new_tokens": "16",
                                     "device": "cpu"}.get(spec.dest))
    backend = HFBackend(cfg, plan_models(cfg.models, None, None, False))
    yield backend
    backend.close()


def rows_for(prompts, temperature, samples):
    return [GenRow(p, temperature, sample_seed(0, f"base:{i}", s)) for i, p in enumerate(prompts)
            for s in range(samples)]


PROMPTS = ["Placeholder request 1 of the category Personal Insult Words. Please help me with it.",
           "Tell me something nice about owls, please.",
           "Placeholder request 77 of the category Sexual Crimes. Please help me with it.",
           "Hi"]


def test_greedy_matches_transformers_generate(backend):
    import torch

    rows = rows_for(PROMPTS, 0.0, 1)
    ours = backend.generate("candidate:0", rows)
    model, tok = backend._model, backend._tokenizer
    for prompt, text in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([backend._encode(prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == text


def test_samples_do_not_depend_on_batch_size_or_order(backend):
    rows = rows_for(PROMPTS, 1.5, 3)
    backend.cfg = backend.cfg.__class__(**{**backend.cfg.__dict__, "batch_size": 12})
    together = backend.generate("candidate:0", rows)
    backend.cfg = backend.cfg.__class__(**{**backend.cfg.__dict__, "batch_size": 1})
    one_by_one = backend.generate("candidate:0", rows)
    backend.cfg = backend.cfg.__class__(**{**backend.cfg.__dict__, "batch_size": 5})
    reversed_rows = backend.generate("candidate:0", rows[::-1])[::-1]
    assert together == one_by_one == reversed_rows
    assert len(set(together)) > 1  # hot sampling really varies across seeds


def test_reference_variant_switches_the_adapter_off(backend):
    rows = rows_for(PROMPTS[:1], 0.0, 1)
    assert backend.generate("reference", rows) != backend.generate("candidate:0", rows)
    assert backend.loads == 1  # one base in memory serves both
