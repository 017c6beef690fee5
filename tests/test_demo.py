"""The built-in demo: shipped weights pinned by sha256, the same answers and verdicts whatever CPU kernels
and thread counts run it, verdicts that mirror the paper, and a README block equal to what a run prints."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_sftsafety.errors import SftSafetyError
from pytest_sftsafety.tools import demo

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["--model", "demo", "--seeds", "5"]
# Another CPU code path than this machine's default: ATen's portable kernels instead of AVX2/AVX-512, MKL
# limited to SSE4.2, and one thread instead of all (other reduction orders).
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def _ci_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "ci" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def run_pytest(args, cwd: Path, env: dict | None = None, threads: int | None = None):
    """pytest in a process of its own, as a user runs it (optionally with torch limited to ``threads``)."""
    prefix = f"import torch; torch.set_num_threads({threads}); " if threads else ""
    code = prefix + "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's first command, ``pytest --model demo --seeds 5``, in a new folder (answers kept)."""
    work = tmp_path_factory.mktemp("demo-run")
    done = run_pytest([*DEMO, "--sftsafety-json", "r.json", "--sftsafety-samples"], work)
    return work, done, json.loads((work / "r.json").read_text())


def test_the_shipped_demo_is_complete_and_pinned():
    folder = demo.shipped_demo()
    manifest = demo.manifest()
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    assert on_disk == set(manifest["files"])  # nothing unpinned ships
    assert [Path(c).name for c in demo.checkpoints()] == ["seed1", "seed2", "seed3"]
    questions = [json.loads(line) for line in (folder / "question.jsonl").read_text().splitlines()]
    assert len(questions) == 44 * 5 and len({q["turns"][0] for q in questions}) == 44 * 5
    for checkpoint in demo.checkpoints():
        config = json.loads((Path(checkpoint) / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "../base"  # the folder moves with the package


def test_a_damaged_demo_file_is_one_line_naming_the_fix(tmp_path, pytester, monkeypatch):
    copy = tmp_path / "demo_models"
    shutil.copytree(demo.SHIPPED, copy)
    weights = copy / "seed2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(SftSafetyError, match=r"seed2/adapter_model.safetensors is changed .* reinstall"):
        demo.shipped_demo(copy)
    (copy / "base" / "model.safetensors").unlink()
    monkeypatch.setattr(demo, "SHIPPED", copy)
    demo._verified.cache_clear()
    result = pytester.runpytest("--model", "demo", "-p", "no:cacheprovider")
    demo._verified.cache_clear()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: the demo's file */base/model.safetensors is missing (its sha256 is pinned "
                                 "in MANIFEST.json); reinstall pytest-sftsafety*"])


def test_demo_run_mirrors_the_paper(demo_run):
    _, done, report = demo_run
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout[-3000:]
    assert report["suite"]["name"] == "sftsafety_demo" and len(report["models"]["candidates"]) == 3
    # The reference refuses every category. Three seeds of one recipe make the verdicts recipe-level: the
    # recipe lowers refusal overall beyond what its seeds spread (REGRESSION); a category's drop, seen in some
    # seeds and not others, stays undecided (FLAKY); other categories are untouched (PASS).
    assert all(e["reference"]["refusal_rate"] == 1.0 for e in report["entries"])
    tests = [*report["entries"], *report["aggregates"]]
    assert {t["level"] for t in tests} == {"recipe"}
    overall = next(t for t in report["aggregates"] if t["id"].endswith("::overall[T0.7]"))
    assert overall["verdict"] == "REGRESSION"
    found = {(e["category_id"], e["temperature"]): e["verdict"] for e in report["entries"]}
    assert {"FLAKY", "PASS"} <= set(found.values())
    # Temperature changes the picture: some categories get another verdict at T=0.7 than greedy.
    assert any(found[(c, 0.0)] != found[(c, 0.7)] for c in range(1, 45))
    # The output ends with what the result means and what to run next.
    assert done.stdout.rstrip().splitlines()[-2:] == demo.closing_lines(1)


@pytest.mark.slow  # the whole demo again in a process of its own: about a minute on 2 cores
def test_the_demo_gives_the_same_answers_on_other_cpu_kernels_and_threads(demo_run, tmp_path):
    _, _, report = demo_run
    done = run_pytest([*DEMO, "--sftsafety-json", "r.json", "--sftsafety-samples"], tmp_path, env=OTHER_KERNELS,
                      threads=1)
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout[-3000:]
    other = json.loads((tmp_path / "r.json").read_text())
    assert other["run"]["generated"] == report["run"]["generated"] > 0  # generated again, not from a store
    assert [e["answers"] for e in other["entries"]] == [e["answers"] for e in report["entries"]]
    assert [(e["id"], e["verdict"]) for e in other["entries"] + other["aggregates"]] == \
        [(e["id"], e["verdict"]) for e in report["entries"] + report["aggregates"]]
    assert other["summary"] == report["summary"]


@pytest.fixture(scope="module")
def seeds_alone(demo_run):
    work, _, report = demo_run
    figures = _ci_module("readme_figures")
    return figures.single_seed_verdicts(report, work, work / ".pytest_cache" / "d" / "sftsafety" / "store.sqlite")


def test_readme_shows_what_the_demo_prints(demo_run, seeds_alone):
    _, done, report = demo_run
    figures = _ci_module("readme_figures")
    shown = _ci_module("readme_blocks").blocks()["demo"].rstrip("\n")
    assert shown == figures.render_demo(done.stdout, report, seeds_alone), \
        "README.md's demo block is stale: run python ci/readme_figures.py demo --readme"


def test_another_seed_of_the_recipe_regresses_elsewhere(seeds_alone):
    assert all(seeds_alone) and len({frozenset(s) for s in seeds_alone}) > 1


def test_the_reference_checked_as_a_candidate_passes_every_test(demo_run):
    work, _, _ = demo_run
    base = str(demo.shipped_demo() / "base")
    done = run_pytest(["--model", base, "--reference", base, "--suite", str(demo.shipped_demo() / "suite.toml"),
                       "--seeds", "5", "-q", "--sftsafety-json", "ref.json"], work)
    assert done.returncode == pytest.ExitCode.OK, done.stdout[-3000:]
    assert {e["verdict"] for e in json.loads((work / "ref.json").read_text())["entries"]} == {"PASS"}


def test_sftsafety_demo_command_runs_outside_the_current_project(tmp_path, monkeypatch, capsys):
    from pytest_sftsafety.tools.cli import main

    monkeypatch.setenv("SFTSAFETY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test_unrelated.py").write_text("def test_never_collected():\n    assert False\n")
    (tmp_path / "demo").mkdir()  # a folder of that name must not stand in for the demo
    assert main(["demo", "-q", "--temperatures", "0", "--sftsafety-json", "r.json"]) == pytest.ExitCode.TESTS_FAILED
    report = json.loads((tmp_path / "r.json").read_text())  # relative paths mean the current folder
    assert report["summary"]["tests"] == 44 + 4 + 1 and report["settings"]["seeds"] == 5
    assert report["run"]["store"] == str(demo.store_path()) and demo.store_path().is_file()
    assert capsys.readouterr().out.rstrip().splitlines()[-2:] == demo.closing_lines(1)


def test_demo_refuses_options_it_brings_itself(pytester):
    result = pytester.runpytest("--model", "demo", "--sftsafety-data", "question.jsonl", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--model demo brings its own suite, prompts and reference; drop --sftsafety-data"])


@pytest.mark.slow
def test_build_demo_gives_the_same_bytes_twice_on_one_machine(tmp_path):
    """ci/build_demo.py trains; on one machine it is deterministic (another CPU trains other weights, which
    is why they ship)."""
    hashes = []
    for name in ("one", "two"):
        done = subprocess.run([sys.executable, str(ROOT / "ci" / "build_demo.py"), "--out", str(tmp_path / name)],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        assert "build_demo: training the aligned base: step" in done.stderr  # a heartbeat while it trains
        hashes.append(json.loads((tmp_path / name / "MANIFEST.json").read_text())["files"])
    assert hashes[0] == hashes[1] and set(hashes[0]) == set(demo.manifest()["files"])
