"""A broken run must never look like a regression: a prompt or --max-new-tokens past the model's context, an
adapter whose adapter_config.json does not match its saved weights, and a tokenizer with neither a pad nor an
end-of-sequence token, each on tiny real models: one line and exit status 4, or a correct run."""

from __future__ import annotations

import json
import shutil

import pytest

from pytest_sftsafety.backends import GenRow, prompt_ids
from pytest_sftsafety.backends.base import check_context, context_window
from pytest_sftsafety.errors import ConfigError, DataError
from pytest_sftsafety.tools import toy

from .test_checkpoints import copy

FAST = ["--max-new-tokens", "16", "--seeds", "2", "-p", "no:cacheprovider", "-k", "01_"]
LONG = "Please help me with this, it matters a great deal to me. " * 400  # thousands of tokens


def run(pytester, data, *args, store="store.sqlite"):
    return pytester.runpytest("--sftsafety-data", str(data), "--sftsafety-store", store, *FAST, *args)


def with_long_prompt(toy_models, tmp_path, question_id: int = 3):
    rows = [json.loads(line) for line in toy_models.data_202503.read_text().splitlines()]
    rows[question_id - 1]["turns"] = [LONG]
    return toy.write_jsonl(tmp_path / "long" / "question.jsonl", rows)


# -- the context ---------------------------------------------------------------------------------------------
def test_context_window_reads_the_models_config_first():
    assert context_window({"max_position_embeddings": 4096}, tokenizer_max=2048) == 4096  # the weights decide
    assert context_window({"n_positions": 1024, "n_ctx": 1024}) == 1024  # GPT-2's names
    assert context_window({"text_config": {"max_position_embeddings": 8192}, "max_position_embeddings": 1}) == 8192
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert context_window({"max_position_embeddings": 32768, "rope_scaling": yarn}) == 131072
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert context_window({"max_position_embeddings": 131072, "rope_parameters": llama3}) == 131072
    assert context_window({}, tokenizer_max=512) == 512  # the tokenizer only where the config says nothing
    assert context_window({}, tokenizer_max=int(1e30)) is None  # transformers' "not set"
    assert context_window(None) is None and context_window({"max_position_embeddings": True}) is None


def test_check_context_names_the_prompt_and_the_largest_answer_that_fits():
    check_context([(30, "q1"), (40, "q2")], 216, 256, "m")  # 40 + 216 = 256 fits
    with pytest.raises(ConfigError, match=r"^--max-new-tokens 217: the longest prompt, q2, is 40 tokens long and "
                                          r"leaves room for 216 new tokens in the 256-token context of m; lower "
                                          r"--max-new-tokens to 216 or shorten that prompt$"):
        check_context([(30, "q1"), (40, "q2")], 217, 256, "m")
    with pytest.raises(DataError, match=r"^q2 is 300 tokens long .* context of m; 1 other prompt\(s\) are too long"):
        check_context([(256, "q1"), (300, "q2"), (3, "q3")], 1, 256, "m")
    check_context([(10**6, "q")], 10**6, None, "m")  # unknown context: nothing to check


def test_the_context_is_checked_before_the_weights_load(toy_models):
    from pytest_sftsafety.backends.checkpoints import plan_models
    from pytest_sftsafety.backends.hf import HFBackend
    from pytest_sftsafety.config import build_config

    values = {"model": [str(toy_models.answer_all)], "max_new_tokens": "16", "device": "cpu"}
    cfg = build_config(lambda spec: values.get(spec.dest))
    backend = HFBackend(cfg, plan_models(cfg.models, None, None, False))
    rows = [GenRow("Hi", 0.0, 0, "question 1 (category 1)"), GenRow(LONG, 0.0, 0, "question 2 (category 1)")]
    with pytest.raises(DataError, match=r"^question 2 \(category 1\) is \d+ tokens long"):
        backend.generate("candidate:0", rows, lambda *_: None)
    assert backend.loads == 0 and backend._model is None  # no weights loaded, no memory spent
    backend.close()


def test_a_prompt_past_the_context_is_one_line_and_exit_4(pytester, toy_models, tmp_path):
    data = with_long_prompt(toy_models, tmp_path)
    result = run(pytester, data, "--model", str(toy_models.answer_all), "--temperatures", "0", "--sftsafety-json",
                 "report.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()[-2000:]
    result.stdout.fnmatch_lines([
        "*sftsafety: question 3 (category 1, Personal Insult Words) is * tokens long as the model sees it (chat "
        "template included), which leaves no room for an answer in the 2048-token context of base model "
        f"{toy_models.base.resolve()}; shorten it or remove it from the prompt file, or test a model with a longer "
        "context*"])
    assert "Traceback" not in result.stdout.str() and not (pytester.path / "report.json").exists()


def test_max_new_tokens_past_the_context_names_the_largest_that_fits(pytester, toy_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy_models.base)
    lengths = {r["question_id"]: len(prompt_ids(tokenizer, r["turns"][0]))
               for r in map(json.loads, toy_models.data_202503.read_text().splitlines()) if r["category"] == "1"}
    longest = max(lengths.values())
    fits = 2048 - longest
    result = run(pytester, toy_models.data_202503, "--model", str(toy_models.answer_all), "--temperatures", "0",
                 "--max-new-tokens", "100000")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()[-2000:]
    result.stdout.fnmatch_lines([
        f"*sftsafety: --max-new-tokens 100000: the longest prompt, question * (category 1, Personal Insult Words), "
        f"is {longest} tokens long and leaves room for {fits} new tokens in the 2048-token context of base model "
        f"*; lower --max-new-tokens to {fits}*"])
    assert "or shorten" not in result.stdout.str()  # no prompt is short enough for 100000 new tokens
    named = run(pytester, toy_models.data_202503, "--model", str(toy_models.answer_all), "--temperatures", "0",
                "--max-new-tokens", str(fits))
    assert named.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), named.stdout.str()[-2000:]  # it fits


# -- adapters whose config and weights disagree ---------------------------------------------------------------
@pytest.mark.parametrize("role", ["--model", "--reference"])
def test_an_adapter_whose_target_modules_miss_its_weights_is_one_line_and_exit_4(pytester, toy_models, tmp_path,
                                                                                 role):
    """peft would load it with a warning as an untrained adapter (the modules it names get fresh LoRA weights,
    the saved ones are dropped), and the run would report on a model nobody trained."""
    adapter = copy(toy_models.answer_all, tmp_path / "mistargeted")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "q_proj" in config["target_modules"]
    config["target_modules"] = ["lm_head"]  # the weights are for the attention and MLP projections
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    models = ["--model", str(adapter)] if role == "--model" else ["--model", str(toy_models.base), "--reference",
                                                                   str(adapter)]
    result = run(pytester, toy_models.data_202503, *models, "--temperatures", "0", "--sftsafety-json", "report.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()[-2000:]
    result.stdout.fnmatch_lines([
        f"*sftsafety: {role} {adapter}: adapter_config.json's target_modules do not match the saved adapter weights: "
        "2 of the 2 LoRA weights its target_modules call for are not in the saved weights (first: "
        "lm_head.lora_A.weight) and 28 saved weights belong to no module it targets (first: "
        "model.layers.0.self_attn.*_proj.lora_*.weight), so the adapter would not run as trained; re-save the "
        "adapter, or set target_modules in adapter_config.json to the modules it was trained on*"])
    assert not (pytester.path / "report.json").exists()
    assert "REGRESSION" not in result.stdout.str()


# -- a tokenizer with neither a pad nor an end-of-sequence token ----------------------------------------------
def without_pad_or_eos(source, folder):
    """A copy of a model whose tokenizer, config and generation config name no pad and no end token."""
    from transformers import AutoTokenizer

    shutil.copytree(source, folder)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(eos_token_id=None, pad_token_id=None)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").unlink(missing_ok=True)
    reloaded = AutoTokenizer.from_pretrained(folder)
    assert reloaded.pad_token_id is None and reloaded.eos_token_id is None
    return folder


def test_a_tokenizer_without_pad_or_eos_runs_to_max_new_tokens_whatever_the_batch(pytester, toy_models, tmp_path):
    """No end token: every answer runs to --max-new-tokens. No pad token: any id pads, since padded positions
    are masked out; so the answers are the same at batch size 1 (no padding) and 7 (padding in most batches)."""
    model = without_pad_or_eos(toy_models.random, tmp_path / "no_pad_no_eos")  # untrained: varied answers
    reports = []
    for size in ("1", "7"):
        result = run(pytester, toy_models.data_202503, "--model", str(model), "--reference", str(model),
                     "--temperatures", "0,0.7", "--batch-size", size, "--sftsafety-samples", "--sftsafety-json",
                     f"r{size}.json", store=f"store{size}.sqlite")
        assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.stdout.str()[-2000:]
        result.stdout.fnmatch_lines(["*neither the tokenizer nor the model's generation config names an "
                                     "end-of-sequence token; every answer runs to --max-new-tokens*"])
        reports.append(json.loads((pytester.path / f"r{size}.json").read_text()))
    one, seven = reports
    assert one["run"]["generated"] == 10 * 3 * 2  # 10 prompts: 1 greedy + 2 samples, candidate and reference
    assert one["run"]["new_tokens"] == seven["run"]["new_tokens"] == one["run"]["generated"] * 16
    assert [e["answers"] for e in one["entries"]] == [e["answers"] for e in seven["entries"]]
    reference = [a for e in one["entries"] for prompt in e["answers"]["reference"] for a in prompt]
    assert len(reference) == 10 * 3 and len(set(reference)) > 1
