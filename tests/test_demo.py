"""The built-in demo: a reproducible, cached build whose verdicts mirror the paper's findings."""

from __future__ import annotations

import json
import time

import pytest

from pytest_sftsafety import demo

ARGS = ["-p", "no:cacheprovider", "-q", "--sftsafety-store", "store.sqlite"]


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-cache")
    folder = demo.demo_dir(build=True, root=root)
    return root, folder


def verdicts(report, kind="entries"):
    return {(e["category_id"], e["temperature"]): e["verdict"] for e in report[kind]}


def test_the_build_is_bit_reproducible_and_cached(demo_cache, tmp_path):
    root, folder = demo_cache
    record = json.loads((folder / "complete.json").read_text())
    assert len(record["weights"]) == 1 + 3 * demo.RECIPE["finetune"]["epochs"]  # base + every epoch of 3 seeds
    again = demo.build_demo(tmp_path / "again")
    assert again["weights"] == record["weights"] == demo.weight_hashes(folder)
    started = time.monotonic()
    assert demo.demo_dir(build=True, root=root) == folder  # the cache is used: no second build
    assert time.monotonic() - started < 2
    questions = [json.loads(line) for line in (folder / "question.jsonl").read_text().splitlines()]
    assert len(questions) == 44 * 5 and len({q["turns"][0] for q in questions}) == 44 * 5


def test_demo_run_mirrors_the_paper(pytester, demo_cache, monkeypatch):
    root, _ = demo_cache
    monkeypatch.setenv("SFTSAFETY_CACHE", str(root))
    result = pytester.runpytest("--model", "demo", "--seeds", "5", *ARGS, "--sftsafety-json", "r.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    report = json.loads((pytester.path / "r.json").read_text())
    assert report["suite"]["name"] == "sftsafety_demo" and len(report["models"]["candidates"]) == 3
    # The reference refuses every category; fine-tuning lowers refusal in some (REGRESSION), seed and
    # sampling noise leave other drops undecided (FLAKY), others are untouched (PASS).
    assert all(e["reference"]["refusal_rate"] == 1.0 for e in report["entries"])
    found = verdicts(report)
    statuses = set(found.values())
    assert {"REGRESSION", "FLAKY", "PASS"} <= statuses
    # Temperature changes the picture: some categories get another verdict at T=0.7 than greedy.
    assert any(found[(c, 0.0)] != found[(c, 0.7)] for c in range(1, 45))

    # The reference itself, checked as a candidate, passes every test.
    folder = demo.demo_dir(build=False, root=root)
    reference = pytester.runpytest("--model", str(folder / "base"), "--reference", str(folder / "base"), "--suite",
                                   str(folder / "suite.toml"), "--seeds", "5", *ARGS, "--sftsafety-json", "ref.json")
    assert reference.ret == pytest.ExitCode.OK
    assert set(verdicts(json.loads((pytester.path / "ref.json").read_text())).values()) == {"PASS"}


def test_another_seed_of_the_recipe_regresses_elsewhere(pytester, demo_cache):
    _, folder = demo_cache
    seeds = demo.checkpoints(folder)
    outcomes = []
    for index, checkpoint in enumerate(seeds[:2]):
        pytester.runpytest("--model", checkpoint, "--suite", str(folder / "suite.toml"), "--seeds", "5", *ARGS,
                           "--temperatures", "0.7", "--sftsafety-json", f"seed{index}.json")
        report = json.loads((pytester.path / f"seed{index}.json").read_text())
        outcomes.append({c: v for (c, _), v in verdicts(report).items() if v != "PASS"})
    assert outcomes[0] and outcomes[1] and outcomes[0] != outcomes[1]


def test_sftsafety_demo_command_runs_outside_the_current_project(demo_cache, tmp_path, monkeypatch):
    from pytest_sftsafety.cli import main

    root, _ = demo_cache
    monkeypatch.setenv("SFTSAFETY_CACHE", str(root))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test_unrelated.py").write_text("def test_never_collected():\n    assert False\n")
    (tmp_path / "demo").mkdir()  # a folder of that name must not stand in for the demo
    assert main(["demo", "-q", "--temperatures", "0", "--sftsafety-json", "r.json"]) == pytest.ExitCode.TESTS_FAILED
    report = json.loads((tmp_path / "r.json").read_text())  # relative paths mean the current folder
    assert report["summary"]["tests"] == 44 + 4 + 1 and report["settings"]["seeds"] == 5


def test_demo_refuses_options_it_brings_itself(pytester, demo_cache, monkeypatch):
    root, _ = demo_cache
    monkeypatch.setenv("SFTSAFETY_CACHE", str(root))
    result = pytester.runpytest("--model", "demo", "--sftsafety-data", "question.jsonl", *ARGS)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--model demo brings its own suite, prompts and reference; drop --sftsafety-data"])
