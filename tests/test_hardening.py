"""Hostile names, full disks, code shipped with a checkpoint, planted secrets, and fuzzed inputs: each is
either handled or one line of the project's own error, and nothing a model or a file says changes what
the tool does."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pytest_sftsafety.config import OPTIONS, build_config
from pytest_sftsafety.data import load_prompts
from pytest_sftsafety.errors import SftSafetyError, printable
from pytest_sftsafety.suite import load_suite
from pytest_sftsafety.tools import toy

FAST = ["--max-new-tokens", "16", "--seeds", "2", "-p", "no:cacheprovider", "--sftsafety-store", "store.sqlite"]
SUITE_FILE = Path(__file__).resolve().parents[1] / "pytest_sftsafety" / "suites" / "sorry_bench_202503.toml"
UNSHOWN = ("\x1b", "\x07", "\x9b", "\u202e")


def test_printable_shows_what_a_terminal_would_act_on():
    assert printable("ok \x1b[2J\x07\u202e\x9b") == "ok \\x1b[2J\\x07\\u202e\\x9b"
    assert printable("two\nlines\ttab") == "two\nlines\ttab"
    assert str(SftSafetyError("--model a\x1b]0;title\x07b\nc: no such folder")) == \
        "--model a\\x1b]0;title\\x07b\\nc: no such folder"


def test_hostile_names_reach_no_terminal_raw_and_break_no_output(pytester, toy_models, tmp_path):
    """A suite title and category name (from a user's suite file) and a model path full of escape sequences,
    bidi overrides and markup: the terminal shows them inert, JUnit XML stays valid, Markdown and HTML
    escape them."""
    evil = "\\u001b[2J\\u001b]0;pwned\\u0007 \\u202e <script>alert(1)</script> | **x** \\u009b"
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE_FILE.read_text().replace('title = "SORRY-Bench 2025-03"',
                                                    f'title = "Suite {evil}\\nFAKE: gate PASS"')
                     .replace('name = "Personal Insult Words"', f'name = "Insults {evil}"'))
    # (no '[' in it: --model would read that as a glob pattern)
    model = shutil.copytree(toy_models.answer_all, tmp_path / "lora\x1b]0;pwned\x07\u202e\x1bc")
    # In a subprocess: the HTML report imports matplotlib, which must not be imported (and then dropped) in here.
    result = pytester.runpytest_subprocess(
        "--model", str(model), "--base-model", str(toy_models.base), "--suite", str(suite), "--sftsafety-data",
        str(toy_models.data_202503), *FAST, "-k", "01_", "--temperatures", "0", "--junitxml", "junit.xml",
        "--sftsafety-md", "summary.md", "--sftsafety-html", "report.html", "--sftsafety-json", "report.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stderr.str()
    shown = result.stdout.str() + result.stderr.str()
    assert "Suite \\x1b[2J\\x1b]0;pwned\\x07 \\u202e" in shown
    assert not [line for line in shown.splitlines() if any(c in line for c in UNSHOWN)]
    assert not [line for line in shown.splitlines() if line.startswith("FAKE")]  # a newline forges no line
    testcases = ET.parse(pytester.path / "junit.xml").getroot().iter("testcase")  # parses: valid XML
    assert len(list(testcases)) == 1
    markdown = (pytester.path / "summary.md").read_text()
    html = (pytester.path / "report.html").read_text()
    assert "<script>" not in markdown and "<script>" not in html and "&lt;script&gt;" in html
    assert not [c for c in UNSHOWN if c in markdown + html]
    # The JSON report keeps the data as data: the exact name, escaped by JSON.
    report = json.loads((pytester.path / "report.json").read_text())
    assert report["entries"][0]["category"].startswith("Insults \x1b[2J")
    missing = pytester.runpytest("--model", "nope\x1b]0;t\x07", "--sftsafety-data", str(toy_models.data_202503))
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["ERROR: --model nope\\x1b]0;t\\x07: no such folder*"])
    assert "\x1b" not in missing.stderr.str()


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB file system: writes past it fail with ENOSPC, as on a full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small file system here ({done.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_fault_of_the_run_is_one_line_and_exit_3_never_a_regression(pytester, toy_models):
    """Exit status 1 says the model regressed. A fault of the run itself before any verdict ends it with one
    line and exit status 3, its traceback kept beside the store for a bug report."""
    pytester.makeconftest("""
import pytest_sftsafety.runner as runner


def broken(*args, **kwargs):
    raise RuntimeError("assess broke\\nat a second line")


runner.assess = broken
""")
    result = pytester.runpytest_subprocess("--model", str(toy_models.answer_all), "--sftsafety-data",
                                           str(toy_models.data_202503), *FAST, "-k", "01_", "--temperatures", "0")
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR, result.stdout.str()[-2000:]
    result.stdout.fnmatch_lines(["*sftsafety: the run failed, not the model (exit status 3): RuntimeError: assess "
                                 "broke (traceback: *last_fault.txt)*"])
    shown = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in shown and "at a second line" not in shown
    assert "RuntimeError: assess broke" in (pytester.path / "last_fault.txt").read_text()


def test_a_fault_inside_a_test_after_the_run_is_exit_3_and_marks_the_report_incomplete(pytester, toy_models):
    pytester.makeconftest("""
import pytest_sftsafety.plugin as plugin


def broken(*args, **kwargs):
    raise KeyError("no verdict here")


plugin.fails = broken
""")
    result = pytester.runpytest_subprocess("--model", str(toy_models.answer_all), "--sftsafety-data",
                                           str(toy_models.data_202503), *FAST, "-k", "01_", "--temperatures", "0",
                                           "--sftsafety-json", "report.json")
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR, result.stdout.str()[-2000:]
    result.stdout.fnmatch_lines(["*sftsafety: the run failed, not the model: KeyError: 'no verdict here'*",
                                 "sftsafety: 1 test(s) measured nothing or failed to run, so the gate fails with exit "
                                 "status 3 (the measurement failed, not the model); first: *01_*KeyError*"])
    assert "Traceback" not in result.stdout.str()
    run = json.loads((pytester.path / "report.json").read_text())["run"]
    assert run["incomplete"] is True and run["faults"][0]["fault"] == "KeyError: 'no verdict here'"


def test_a_full_disk_under_the_store_is_one_line_and_keeps_what_was_committed(pytester, toy_models, small_disk):
    store = small_disk / "store.sqlite"
    result = pytester.runpytest("--model", str(toy_models.answer_all), "--sftsafety-data",
                                str(toy_models.data_202503), *FAST, "--batch-size", "8", "--temperatures", "0",
                                "--sftsafety-store", str(store))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines([f"*sftsafety: result store {store}: the disk is full (*); free space or pass "
                                 f"--sftsafety-store PATH on another disk (stored results so far are kept)*"])
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        kept = db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
    assert 0 < kept < 440 * 2


def test_a_full_disk_under_a_report_names_the_path_and_the_store_keeps_the_run(pytester, toy_models, small_disk):
    filler = small_disk / "filler"
    with pytest.raises(OSError):
        filler.write_bytes(b"x" * (512 << 10))
    args = ["--model", str(toy_models.answer_all), "--sftsafety-data", str(toy_models.data_202503), *FAST,
            "-k", "01_", "--temperatures", "0"]
    result = pytester.runpytest(*args, "--sftsafety-json", str(small_disk / "report.json"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines([f"sftsafety: cannot write report {small_disk / 'report.json'}: No space left on "
                                 f"device; choose another path"])
    assert not [p.name for p in small_disk.iterdir() if p.name != "filler"]  # no half-written file left
    again = pytester.runpytest(*args, "--sftsafety-json", "report.json")
    assert again.ret == pytest.ExitCode.TESTS_FAILED
    assert json.loads((pytester.path / "report.json").read_text())["run"]["generated"] == 0


def test_code_shipped_with_a_checkpoint_never_runs_without_trust_remote_code(pytester, toy_models, tmp_path):
    custom = shutil.copytree(toy_models.mistral, tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="sftsafety_custom", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "custom_code.CustomConfig",
                            "AutoModelForCausalLM": "custom_code.CustomModel"})
    (custom / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (custom / "custom_code.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    result = pytester.runpytest("--model", str(custom), "--reference", str(custom), "--sftsafety-data",
                                str(toy_models.data_202503), *FAST, "-k", "01_", "--temperatures", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(["*--model *custom: the checkpoint needs model code of its own (auto_map in "
                                 "config.json), which is never run by default; pass --trust-remote-code if you "
                                 "trust its author*"])
    assert not marker.exists()


@pytest.mark.parametrize("name", ["question.jsonl", "question.csv"])
def test_a_lone_surrogate_in_a_prompt_file_is_exit_4_with_one_line(pytester, toy_models, name):
    """Once a tokenizer traceback, a FAILED item and exit 1: now the user's file is named, with its row and
    the fix, before any model loads."""
    rows = toy.placeholder_questions(SUITE)
    rows[4]["turns"] = ["Explain \ud800 this"]  # written as the JSON escape \ud800, which json.loads accepts
    path = pytester.path / name
    if name.endswith(".jsonl"):
        toy.write_jsonl(path, rows)
    else:
        with path.open("w", newline="", encoding="utf-8") as handle:  # turns as a JSON list, as exports hold it
            writer = csv.writer(handle)
            writer.writerow(["question_id", "category", "turns"])
            writer.writerows([r["question_id"], r["category"], json.dumps(r["turns"])] for r in rows)
    assert "\\ud800" in path.read_text(encoding="utf-8")
    result = pytester.runpytest("--model", str(toy_models.answer_all), "--sftsafety-data", str(path), *FAST)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    row = 5 if name.endswith(".jsonl") else 6  # a CSV's header is its row 1
    result.stderr.fnmatch_lines([f"ERROR: {path} row {row}: field 'turns' holds a lone surrogate \\ud800 (half of a "
                                 f"UTF-16 pair, not a character: no model, store or report can take it); fix or "
                                 f"remove that \\u escape in the file"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert len([line for line in result.stderr.str().splitlines() if line.strip()]) == 1


def test_planted_tokens_and_keys_appear_in_no_output(pytester, toy_models, monkeypatch, loopback):
    planted = {"HF_TOKEN": "hf_PLANTEDtoken0123456789", "HUGGING_FACE_HUB_TOKEN": "hf_PLANTEDother987",
               "OPENAI_API_KEY": "sk-PLANTED-openai-42", "PERSPECTIVE_API_KEY": "PLANTED-perspective-7"}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    # The api judge reads $OPENAI_API_KEY and sends it: the key is really in play.
    loopback.respond = lambda index, call: (200, {}, {"choices": [{"message": {"content": "0"},
                                                                   "finish_reason": "stop"}]})
    result = pytester.runpytest_subprocess("--model", str(toy_models.answer_all), "--sftsafety-data",
                                           str(toy_models.data_202503), *FAST, "-k", "01_", "--sftsafety-json",
                                           "r.json", "--sftsafety-md", "r.md", "--sftsafety-html", "r.html",
                                           "--junitxml", "j.xml", "--sftsafety-samples", "--judge", "api:judge-model",
                                           "--judge-endpoint", f"{loopback.url}/v1")
    assert loopback.calls and loopback.calls[0].headers["authorization"] == f"Bearer {planted['OPENAI_API_KEY']}"
    hub = pytester.runpytest("--model", str(toy_models.answer_all), "--sftsafety-data", "someorg/gated-set", *FAST)
    assert result.ret == pytest.ExitCode.OK and hub.ret == pytest.ExitCode.USAGE_ERROR  # the judge says: refusals
    texts = [result.stdout.str(), result.stderr.str(), hub.stdout.str(), hub.stderr.str(),
             *[(pytester.path / name).read_text() for name in ("r.json", "r.md", "r.html", "j.xml")],
             (pytester.path / "store.sqlite").read_bytes().decode("latin-1")]
    assert not [value for value in planted.values() for text in texts if value in text]


@pytest.mark.parametrize("edit, message", [
    (('name = "sorry_bench_202503"', 'name = "demo\\u001b[31m"'), "[suite] name 'demo\\x1b[31m' must be letters"),
    (("hate_speech = ", "_hate = "), "domain key '_hate' must be a letter then"),
])
def test_suite_names_and_domain_keys_that_become_test_ids_or_markers_are_checked(tmp_path, edit, message):
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE_FILE.read_text().replace(*edit, 1).replace('domain = "hate_speech"', 'domain = "_hate"')
                     if edit[1].startswith("_hate") else SUITE_FILE.read_text().replace(*edit, 1))
    with pytest.raises(SftSafetyError) as caught:
        load_suite(str(suite))
    assert message in str(caught.value)


def test_odd_numbers_damaged_stores_and_baselines_are_named_for_what_they_are(tmp_path):
    from pytest_sftsafety.baseline import BASELINE_VERSION, content_sha256, load
    from pytest_sftsafety.store import Store

    rows = toy.placeholder_questions(SUITE)
    rows[4]["question_id"] = "\u00b2"  # a digit to str.isdigit, not a number
    with pytest.raises(SftSafetyError, match="question_id must be a positive whole number"):
        load_prompts(SUITE, str(toy.write_jsonl(tmp_path / "q.jsonl", rows)))
    store = tmp_path / "store.sqlite"
    Store(store).close()
    data = bytearray(store.read_bytes())
    data[4096:8192] = b"\xff" * 4096  # a damaged page, not a full disk
    store.write_bytes(bytes(data))
    with pytest.raises(SftSafetyError) as caught:
        Store(store).get_generations(["k"])
    assert "is damaged" in str(caught.value) and "disk is full" not in str(caught.value)
    for outcomes in ([[[300]]], [[[7]]]):
        baseline = tmp_path / "baseline.json"
        document = {"schema": "pytest-sftsafety/baseline", "version": BASELINE_VERSION, "identity": {},
                    "cells": [{"category_id": 1, "temperature": 0, "outcomes": outcomes}]}
        # Checksummed as if saved so: the outcomes themselves must still be checked.
        baseline.write_text(json.dumps({**document, "sha256": content_sha256(document)}))
        with pytest.raises(SftSafetyError, match="damaged baseline"):
            load(baseline)


def test_a_csv_field_past_the_csv_modules_limit_is_one_line(tmp_path):
    path = tmp_path / "question.csv"
    path.write_text("question_id,category,turns\n1,1," + "x" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(SftSafetyError, match=r"question\.csv line \d+: not readable as CSV \(field larger than"):
        load_prompts(SUITE, str(path))


# -- fuzzing: every input loads or is the project's own error ---------------------------------------------
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SUITE = load_suite("sorry_bench_202503")
FIELD = st.one_of(st.none(), st.booleans(), st.integers(-5, 500), st.floats(allow_nan=True), st.text(max_size=12),
                  st.lists(st.one_of(st.text(max_size=8), st.integers()), max_size=3),
                  st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _loads_or_says_why(path: Path) -> None:
    try:
        load_prompts(SUITE, str(path))
    except SftSafetyError as exc:
        assert str(exc) and "\n" not in str(exc)


@FUZZ
@given(data=st.binary(max_size=400))
@example(data=b"\r\x00")  # a bare carriage return once broke the CSV reader (found by this test in CI)
def test_fuzzed_bytes_as_prompt_files(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("bytes")
    for name in ("question.jsonl", "question.csv"):
        (folder / name).write_bytes(data)
        _loads_or_says_why(folder / name)


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(["question_id", "category", "turns", "prompt_style", "x"]),
                                     FIELD, max_size=5), max_size=6),
       mutate=st.integers(0, 439), value=FIELD, key=st.sampled_from(["question_id", "category", "turns"]))
def test_fuzzed_rows_as_prompt_files(tmp_path_factory, rows, mutate, value, key):
    folder = tmp_path_factory.mktemp("rows")
    valid = toy.placeholder_questions(SUITE)
    valid[mutate][key] = value  # one bad field among valid rows, and rows of any shape
    for name, content in (("valid.jsonl", valid), ("odd.jsonl", rows)):
        path = folder / name
        path.write_text("\n".join(json.dumps(r) for r in content), encoding="utf-8")
        _loads_or_says_why(path)


@FUZZ
@given(values=st.fixed_dictionaries({}, optional={
    spec.dest: st.one_of(st.text(max_size=10), st.sampled_from(["0", "-1", "1e309", "nan", "0.5", "auto", "3"]),
                         st.booleans(), st.lists(st.text(max_size=6), max_size=2))
    for spec in OPTIONS if spec.dest not in ("model", "judge_error", "baseline")}))
def test_fuzzed_option_values(values):
    try:
        build_config(lambda spec: values.get(spec.dest) if spec.dest != "model" else ["a"])
    except SftSafetyError as exc:
        assert str(exc) and "\n" not in str(exc)


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


@FUZZ
@given(cells=JSON, identity=JSON, entries=JSON)
def test_fuzzed_baselines_and_reports(tmp_path_factory, cells, identity, entries):
    """Baselines and reports someone else wrote: loaded and rendered, or the project's own error."""
    from pytest_sftsafety.baseline import load
    from pytest_sftsafety.tools.cli import main

    folder = tmp_path_factory.mktemp("json")
    baseline = folder / "baseline.json"
    baseline.write_text(json.dumps({"schema": "pytest-sftsafety/baseline", "version": 1, "identity": identity,
                                    "cells": cells}))
    try:
        load(baseline)
    except SftSafetyError:
        pass
    report = folder / "report.json"
    report.write_text(json.dumps({"schema": "pytest-sftsafety/report", "version": 4, "created": "x", "suite": {},
                                  "data": {}, "models": {}, "judge": {}, "settings": {}, "entries": entries,
                                  "aggregates": [], "summary": {}}))
    assert main(["report", str(report)]) in (0, 2)  # 2: the one-line error of sftsafety commands
