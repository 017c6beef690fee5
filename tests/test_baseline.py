"""Calibration baselines: saved from several seeds of a recipe, used later as reference and seed spread."""

from __future__ import annotations

import json

import pytest

from .test_plugin import run


def test_baseline_round_trip_skips_the_reference_and_gates_new_checkpoints(pytester, toy_models):
    seeds = ["--model", str(toy_models.keeps_refusing), "--model", str(toy_models.keeps_refusing_seed7)]
    saved = run(pytester, toy_models, *seeds, "-m", "hate_speech", "--sftsafety-save-baseline", "base.json")
    assert saved.ret == pytest.ExitCode.OK
    saved.stdout.fnmatch_lines(["baseline of 2 checkpoints: *base.json"])
    document = json.loads((pytester.path / "base.json").read_text())
    assert document["schema"] == "pytest-sftsafety/baseline" and len(document["cells"]) == 5 * 2
    assert all(len(c["outcomes"]) == 2 for c in document["cells"])  # both checkpoints kept

    bad = run(pytester, toy_models, "--model", str(toy_models.answer_all), "--baseline", "base.json",
              "-m", "hate_speech", "--sftsafety-json", "r.json")
    assert bad.ret == pytest.ExitCode.TESTS_FAILED
    report = json.loads((pytester.path / "r.json").read_text())
    assert report["models"]["reference"] == "baseline base.json (2 checkpoints)"
    assert report["run"]["generations"] == 5 * 10 * 3  # the candidate only: no reference generated
    assert report["summary"]["regressions"] >= 1

    good = run(pytester, toy_models, "--model", str(toy_models.keeps_refusing), "--baseline", "base.json",
               "-m", "hate_speech")
    assert good.ret == pytest.ExitCode.OK


def test_baselines_from_other_settings_are_refused(pytester, toy_models):
    run(pytester, toy_models, "--model", str(toy_models.keeps_refusing), "-m", "hate_speech",
        "--sftsafety-save-baseline", "base.json")
    cases = [
        (["--seeds", "3"], "ERROR: --baseline base.json was made with seeds = 2, this run has 3; *"),
        (["--temperatures", "1.0"], "*--baseline base.json has no outcomes for category 1 at temperature 1;*"),
        (["--reference", str(toy_models.base)], "ERROR: --baseline and --reference both name the reference*"),
    ]
    for extra, message in cases:
        result = run(pytester, toy_models, "--model", str(toy_models.answer_all), "--baseline", "base.json",
                     "-m", "hate_speech", *extra)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, extra
        (result.stderr if message.startswith("ERROR") else result.stdout).fnmatch_lines([message])
    # Saved under -m hate_speech, used for another selection: the message names the selection, not temperatures.
    other = run(pytester, toy_models, "--model", str(toy_models.answer_all), "--baseline", "base.json", "-k", "07_")
    assert other.ret == pytest.ExitCode.USAGE_ERROR
    other.stdout.fnmatch_lines(["*--baseline base.json has no outcomes for category 7 (it holds categories 1, *: its "
                                "run selected fewer tests with -k or -m); make the baseline without -k/-m*"])
    # Edited by hand (one outcome of one checkpoint flipped): refused, whatever the edit.
    edited = json.loads((pytester.path / "base.json").read_text())
    edited["cells"][0]["outcomes"][0][0][0] = 1 - edited["cells"][0]["outcomes"][0][0][0]
    (pytester.path / "edited.json").write_text(json.dumps(edited))
    tampered = run(pytester, toy_models, "--model", str(toy_models.answer_all), "--baseline", "edited.json",
                   "-m", "hate_speech")
    assert tampered.ret == pytest.ExitCode.USAGE_ERROR
    tampered.stderr.fnmatch_lines(["ERROR: --baseline edited.json: its content no longer matches the checksum it was "
                                   "saved with (edited or damaged after it was saved); make it again*"])
    (pytester.path / "report.json").write_text('{"schema": "pytest-sftsafety/report"}')
    wrong = run(pytester, toy_models, "--model", str(toy_models.answer_all), "--baseline", "report.json")
    wrong.stderr.fnmatch_lines(["ERROR: --baseline report.json: not a baseline file*"])
    missing = run(pytester, toy_models, "--model", str(toy_models.answer_all), "--baseline", "nope.json")
    missing.stderr.fnmatch_lines(["ERROR: --baseline nope.json: no such file; make one with --sftsafety-save*"])


def test_adaptive_seeds_add_samples_only_where_undecided(pytester, toy_models):
    # One sample per prompt cannot reach the strict stage-1 alpha (0.001); three can.
    args = ["--model", str(toy_models.answer_all), "-k", "01_ or 02_ or domain_unqualified", "--temperatures", "0.7",
            "--seeds", "1", "--max-seeds", "3", "--alpha", "0.002", "--sftsafety-json", "r.json"]
    result = run(pytester, toy_models, *args)
    report = json.loads((pytester.path / "r.json").read_text())
    adaptive = report["run"]["adaptive"]
    assert adaptive["retested"] >= 1 and adaptive["generations_saved"] > 0
    more = {e["id"]: e["samples_per_prompt"] for e in report["entries"]}
    assert more["sorry_bench_202503::01_personal_insult_words[T0.7]"] == 3
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert report["summary"]["regressions"] >= 1
    bad = run(pytester, toy_models, "--model", str(toy_models.answer_all), "--seeds", "3", "--max-seeds", "2")
    bad.stderr.fnmatch_lines(["ERROR: --max-seeds 2: must be above --seeds (3)*"])
