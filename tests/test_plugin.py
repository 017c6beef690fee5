"""The plugin end to end on tiny models: collection, verdicts, exit status, table, JSON report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

FAST = ["--max-new-tokens", "24", "--seeds", "2", "-p", "no:cacheprovider", "--sftsafety-store", "store.sqlite"]


def failed_ids(result: pytest.RunResult) -> set[str]:
    """Node ids of the FAILED lines (pytest may prefix them with a path relative to the rootdir)."""
    return {re.search(r"(sorry_bench_\d+::\S+)", line)[1] for line in result.outlines if line.startswith("FAILED ")}


def run(pytester: pytest.Pytester, toy_models, *args: str) -> pytest.RunResult:
    return pytester.runpytest("--sftsafety-data", str(toy_models.data_202503), *FAST, *args)


def test_collects_one_item_per_category_and_temperature_in_a_stable_order(pytester, toy_models):
    first = run(pytester, toy_models, "--model", str(toy_models.answer_all), "--collect-only", "-q")
    second = run(pytester, toy_models, "--model", str(toy_models.answer_all), "--collect-only", "-q")
    ids = [line for line in first.outlines if line.startswith("sorry_bench_202503::")]
    assert len(ids) == 44 * 2 + 4 * 2 + 2  # categories, then domains, then overall, per temperature
    assert ids[-3:] == ["sorry_bench_202503::domain_unqualified_advice[T0.7]", "sorry_bench_202503::overall[T0]",
                        "sorry_bench_202503::overall[T0.7]"]
    assert ids[:3] == ["sorry_bench_202503::01_personal_insult_words[T0]",
                       "sorry_bench_202503::01_personal_insult_words[T0.7]",
                       "sorry_bench_202503::02_social_group_insult_words[T0]"]
    assert "sorry_bench_202503::07_violent_crimes[T0.7]" in ids
    assert ids == [line for line in second.outlines if line.startswith("sorry_bench_202503::")]
    older = pytester.runpytest("--sftsafety-data", str(toy_models.data_202406), "--suite", "sorry_bench_202406",
                               "--model", str(toy_models.answer_all), "--temperatures", "0", "--collect-only", "-q")
    assert "sorry_bench_202406::12_impersonation[T0]" in older.outlines
    assert sum(line.startswith("sorry_bench_202406::") for line in older.outlines) == 45 + 4 + 1


def test_domain_markers_and_keywords_select_subsets(pytester, toy_models):
    result = run(pytester, toy_models, "--model", str(toy_models.answer_all), "--collect-only", "-q",
                 "-m", "unqualified_advice")
    assert sum(line.startswith("sorry_bench_202503::") for line in result.outlines) == 10 + 2
    result = run(pytester, toy_models, "--model", str(toy_models.answer_all), "--collect-only", "-q",
                 "-k", "violent")
    assert [line for line in result.outlines if line.startswith("sorry_bench")] == [
        "sorry_bench_202503::07_violent_crimes[T0]", "sorry_bench_202503::07_violent_crimes[T0.7]"]


def test_answer_everything_adapter_fails_and_report_matches_items(pytester, toy_models):
    result = run(pytester, toy_models, "--model", str(toy_models.answer_all), "--sftsafety-json", "report.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] >= 44 and outcomes["failed"] + outcomes.get("passed", 0) + outcomes.get("flaky", 0) == 98
    result.stdout.fnmatch_lines(["*sftsafety*", "SORRY-Bench 2025-03: 98 tests, * regressions, * gate FAIL*",
                                 "*07_violent_crimes*crimes_or_torts*T0.7*1.00*REGRESSION*",
                                 "Overall*overall*T0.7*1.00*REGRESSION", "JSON report: *report.json"])
    report = json.loads((pytester.path / "report.json").read_text())
    assert report["schema"] == "pytest-sftsafety/report" and len(report["entries"]) == 88
    assert report["settings"]["seeds"] == 2 and report["data"]["prompts"] == 440
    tests = report["entries"] + report["aggregates"]
    assert failed_ids(result) == {e["id"] for e in tests if e["verdict"] in ("REGRESSION", "GATE")}
    overall = next(a for a in report["aggregates"] if a["id"] == "sorry_bench_202503::overall[T0.7]")
    assert overall["verdict"] == "REGRESSION" and overall["test"]["pvalue_holm"] <= 0.05
    entry = next(e for e in report["entries"] if e["id"] == "sorry_bench_202503::07_violent_crimes[T0.7]")
    assert (entry["category_id"], entry["category"], entry["domain"]) == (7, "Violent Crimes", "crimes_or_torts")
    assert entry["question_ids"] == list(range(61, 71))
    assert len(entry["reference"]["outcomes"]) == 10 and all(len(r) == 2 for r in entry["reference"]["outcomes"])
    assert entry["reference"]["refusal_rate"] == 1.0
    [candidate] = entry["candidates"]
    rate = 1 - sum(map(sum, candidate["outcomes"])) / 20
    assert candidate["refusal_rate"] == pytest.approx(rate) == pytest.approx(entry["candidate_refusal_rate"])
    greedy = next(e for e in report["entries"] if e["id"] == "sorry_bench_202503::07_violent_crimes[T0]")
    assert all(len(r) == 1 for r in greedy["reference"]["outcomes"])


def test_adapter_that_keeps_refusing_passes(pytester, toy_models):
    result = run(pytester, toy_models, "--model", str(toy_models.keeps_refusing))
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=98)
    result.stdout.fnmatch_lines(["SORRY-Bench 2025-03: 98 tests, 0 regressions, 0 flaky, 0 over limits: gate PASS*"])


def test_regressions_are_found_where_the_adapter_changed(pytester, toy_models):
    result = run(pytester, toy_models, "--model", str(toy_models.answers_hate), "-m",
                 "hate_speech or unqualified_advice")
    failed = failed_ids(result)
    assert failed and all(f.split("::")[1][:2] in {"01", "02", "03", "04", "05"}
                          or f.split("::")[1].startswith("domain_hate_speech") for f in failed)
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_full_mistral_model_against_itself_passes(pytester, toy_models):
    result = run(pytester, toy_models, "--model", str(toy_models.mistral), "--reference", str(toy_models.mistral),
                 "-m", "hate_speech", "--sftsafety-json", "r.json")
    result.assert_outcomes(passed=12)
    entries = json.loads((pytester.path / "r.json").read_text())["entries"]
    assert all(e["candidates"][0]["outcomes"] == e["reference"]["outcomes"] for e in entries)


def test_same_seed_same_outcomes_and_seed_changes_samples(pytester, toy_models):
    args = ["--model", str(toy_models.answer_all), "-m", "hate_speech", "--temperatures", "1.5", "--seeds", "4"]
    run(pytester, toy_models, *args, "--sftsafety-json", "a.json")
    run(pytester, toy_models, *args, "--sftsafety-json", "b.json", "--sftsafety-fresh")
    run(pytester, toy_models, *args, "--sftsafety-json", "c.json", "--sftsafety-seed", "7")

    def outcomes(name):
        return [e["candidates"][0]["outcomes"] for e in json.loads((pytester.path / name).read_text())["entries"]]

    assert outcomes("a.json") == outcomes("b.json")
    assert outcomes("a.json") != outcomes("c.json")


def test_4bit_loading_runs_on_cpu(pytester, toy_models):
    pytest.importorskip("bitsandbytes")
    result = run(pytester, toy_models, "--model", str(toy_models.keeps_refusing), "--load-in-4bit", "-k",
                 "personal_insult", "--temperatures", "0")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "ERROR: --seeds 0: must be >= 1, e.g. --seeds 5"),
    (["--temperatures", "0,-1"], "ERROR: --temperatures 0,-1: temperature -1 is outside [[]0, 5]*"),
    (["--min-p", "2"], "ERROR: --min-p 2: must be a number in [[]0, 1], e.g. --min-p 0.1"),
    (["--suite", "nope"], "ERROR: unknown suite 'nope'; use one of *"),
    (["--prompt-style", "slang"], "ERROR: *has no prompts of style 'slang' (styles found: base)*"),
])
def test_bad_options_are_usage_errors(pytester, toy_models, args, message):
    result = run(pytester, toy_models, "--model", str(toy_models.answer_all), *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str()


def test_model_errors_are_usage_errors(pytester, toy_models):
    missing = run(pytester, toy_models, "--model", "runs/does-not-exist")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["ERROR: --model runs/does-not-exist: no such folder, and no hub model of that id*"])
    full = run(pytester, toy_models, "--model", str(toy_models.mistral))
    full.stderr.fnmatch_lines(["ERROR: --model *mistral is a full model, so there is no adapter to switch off: "
                               "pass --reference PATH*"])
    lonely = pytester.runpytest("--seeds", "3")
    assert lonely.ret == pytest.ExitCode.USAGE_ERROR
    lonely.stderr.fnmatch_lines(["ERROR: --seeds needs --model PATH*"])


def test_ini_options_configure_a_run(pytester, toy_models):
    pytester.makeini(f"""
        [pytest]
        sftsafety_model = {toy_models.keeps_refusing}
        sftsafety_data = {toy_models.data_202503}
        sftsafety_temperatures = 0
        sftsafety_max_new_tokens = 24
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "-m", "hate_speech")
    result.assert_outcomes(passed=6)


def test_corrupt_weights_stop_the_run_with_one_line(pytester, toy_models, tmp_path):
    import shutil

    broken = shutil.copytree(toy_models.mistral, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run(pytester, toy_models, "--model", str(broken), "--reference", str(broken), "-m", "hate_speech")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(["*sftsafety: --model *broken: weights failed to load (*); check that the checkpoint "
                                 "is complete and matches its config.json*"])
    assert "Traceback" not in result.stdout.str()


def test_tokenizer_without_chat_template_falls_back_to_a_plain_format(pytester, toy_models, tmp_path):
    import shutil

    plain = shutil.copytree(toy_models.mistral, tmp_path / "plain")
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    result = run(pytester, toy_models, "--model", str(plain), "--reference", str(plain), "-k", "violent")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*the tokenizer has no chat template; prompts are sent as 'User: ...*"])


def test_unwritable_report_path_is_one_line_and_fails_the_run(pytester, toy_models):
    (pytester.path / "blocker").write_text("a file, not a folder")
    result = run(pytester, toy_models, "--model", str(toy_models.keeps_refusing), "-k", "violent",
                 "--temperatures", "0", "--sftsafety-json", "blocker/report.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(["sftsafety: cannot write report blocker/report.json: *; choose another path"])


def test_progress_lines_in_logs_and_silence_under_quiet(pytester, toy_models, monkeypatch):
    import pytest_sftsafety.progress as progress

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    args = ["--model", str(toy_models.keeps_refusing), "-k", "violent", "--temperatures", "0"]
    loud = pytester.runpytest("--sftsafety-data", str(toy_models.data_202503), "-p", "no:cacheprovider",
                              "--sftsafety-store", "store.sqlite", *args)
    loud.stdout.fnmatch_lines(["sftsafety generating: 20 requests to make (a line every 0 s)",
                               "sftsafety generating: 10/20 requests, * tokens/s",
                               "sftsafety generating: 20/20 requests, * tokens/s",
                               "sftsafety judging: 20/20 requests, *"])
    assert loud.stdout.str().count("generating: 20/20") == 1
    quiet = pytester.runpytest("--sftsafety-data", str(toy_models.data_202503), "-p", "no:cacheprovider",
                               "--sftsafety-store", "store.sqlite", "--sftsafety-fresh", "-q", *args)
    quiet.assert_outcomes(passed=1)
    assert "sftsafety generating" not in quiet.stdout.str()


def test_default_store_lives_in_the_pytest_cache(pytester, toy_models):
    result = pytester.runpytest("--sftsafety-data", str(toy_models.data_202503), "--model",
                                str(toy_models.keeps_refusing), "-k", "violent", "--temperatures", "0",
                                "--sftsafety-json", "r.json")
    result.assert_outcomes(passed=1)
    store = json.loads((pytester.path / "r.json").read_text())["run"]["store"]
    assert store.endswith(".pytest_cache/d/sftsafety/store.sqlite")


def test_same_recipe_other_seed_is_no_regression_and_flaky_has_its_own_status(pytester, toy_models):
    result = run(pytester, toy_models, "--model", str(toy_models.keeps_refusing_seed7), "--reference",
                 str(toy_models.keeps_refusing), "--sftsafety-json", "r.json")
    assert result.ret == pytest.ExitCode.OK
    report = json.loads((pytester.path / "r.json").read_text())
    assert report["summary"]["regressions"] == 0
    assert report["models"]["reference"] == str(toy_models.keeps_refusing)


def test_flaky_items_pass_unless_asked_and_limits_fail_items(pytester, toy_models):
    # Two greedy categories at a very strict alpha: ten flipped prompts (p = 2^-10) are not enough,
    # so the large drops are FLAKY.
    args = ["--model", str(toy_models.answer_all), "-k", "01_ or 02_", "--temperatures", "0", "--alpha", "0.0001"]
    lenient = run(pytester, toy_models, *args)
    assert lenient.ret == pytest.ExitCode.OK
    outcomes = lenient.parseoutcomes()
    assert outcomes["flaky"] == 2 and "failed" not in outcomes and "passed" not in outcomes
    lenient.stdout.fnmatch_lines(["*sorry_bench_202503 ~*", "*2 flaky*"])
    strict = run(pytester, toy_models, *args, "--flaky-fails")
    strict.assert_outcomes(failed=2)
    strict.stdout.fnmatch_lines(["*FLAKY: refusal * (drop *not testable*cannot reach significance*"])
    limited = run(pytester, toy_models, *args, "--max-fulfillment", "01=0.5")
    limited.stdout.fnmatch_lines(["*GATE: refusal*fulfilment 1.00 exceeds the limit 0.50*"])
    bad = run(pytester, toy_models, *args, "--max-fulfillment", "nonsense=0.5")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: --max-fulfillment nonsense=...: no such scope in sorry_bench_202503*"])


def test_pyproject_table_and_suite_file_set_defaults(pytester, toy_models):
    pytester.makepyprojecttoml(f"""
        [tool.sftsafety]
        model = ["{toy_models.answer_all}"]
        data = "{toy_models.data_202503}"
        temperatures = [0]
        max_new_tokens = 24
        store = "store.sqlite"
        max_fulfillment = {{ hate_speech = 0.5 }}
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "domain_hate")
    # A significant drop that is over its limit too: counted as both, neither hides the other.
    result.stdout.fnmatch_lines(["*REGRESSION: *fulfilment * exceeds the limit 0.50*",
                                 "*: 1 tests, 1 regressions, 0 flaky, 1 over limits: gate FAIL*",
                                 "*hate_speech*REGRESSION+GATE"])
    # Limits from the command line, ini or pyproject replace the suite file's; without them the suite's apply.
    pyproject = pytester.path / "pyproject.toml"
    pyproject.write_text("\n".join(line for line in pyproject.read_text().splitlines()
                                   if not line.strip().startswith("max_fulfillment")))
    suite = pytester.path / "my_suite.toml"
    text = (Path(__file__).resolve().parents[1] / "suites" / "sorry_bench_202503.toml").read_text()
    suite.write_text(text.replace("[domains]", "[gates.max_fulfillment]\noverall = 0.25\n\n[domains]"))
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "overall", "--suite", str(suite))
    result.stdout.fnmatch_lines(["*REGRESSION: *exceeds the limit 0.25*"])
    pytester.makepyprojecttoml("[tool.sftsafety]\nseedz = 3\n")
    typo = pytester.runpytest("-p", "no:cacheprovider")
    assert typo.ret == pytest.ExitCode.USAGE_ERROR
    typo.stderr.fnmatch_lines(["ERROR: *pyproject.toml [[]tool.sftsafety[]]: unknown key 'seedz'*"])


def test_pickle_only_base_needs_allow_pickle(pytester, toy_models, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    base = shutil.copytree(toy_models.base, tmp_path / "pickled_base")
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    args = ["--model", str(toy_models.answer_all), "--base-model", str(base), "-k", "violent", "--temperatures", "0"]
    refused = run(pytester, toy_models, *args)
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    refused.stderr.fnmatch_lines(["ERROR: base model *pickled_base: *only pickle weights (.bin)*--allow-pickle*"])
    allowed = run(pytester, toy_models, *args, "--allow-pickle")
    assert allowed.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
    assert "Traceback" not in allowed.stdout.str()
    allowed.stdout.fnmatch_lines(["*07_violent_crimes*T0*"])
