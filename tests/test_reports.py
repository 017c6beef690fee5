"""Reports: golden table and Markdown on a fixed report, schema validation of real reports, provenance,
the step summary, JUnit properties under xdist, answers kept only when asked and never with redaction,
and the report/compare commands."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_sftsafety.report import load_report, md_text, render_comparison, render_markdown, render_table
from pytest_sftsafety.tools.cli import main as cli_main

DATA = Path(__file__).resolve().parent / "data"
FIXED = DATA / "report_v3.json"
SCHEMA = Path(__file__).resolve().parents[1] / "pytest_sftsafety" / "schemas" / "report-v5.schema.json"
RUN = ["--max-new-tokens", "24", "--seeds", "2", "-p", "no:cacheprovider", "--sftsafety-store", "store.sqlite"]


def validate(document: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(document, json.loads(SCHEMA.read_text()),
                        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("render, golden", [(render_table, "report_v3.table.txt"),
                                            (render_markdown, "report_v3.md")])
def test_table_and_markdown_match_their_golden_files(render, golden):
    """To accept an intended change: SFTSAFETY_UPDATE_GOLDEN=1 pytest tests/test_reports.py, then review the diff."""
    text = render(load_report(FIXED))
    if os.environ.get("SFTSAFETY_UPDATE_GOLDEN"):
        (DATA / golden).write_text(text, encoding="utf-8")
    assert text == (DATA / golden).read_text(encoding="utf-8")


def test_markdown_puts_the_gate_first_and_makes_names_inert():
    report = load_report(FIXED)
    report["models"]["candidates"] = ["runs/<img src=x onerror=alert(1)>|*x*"]
    text = render_markdown(report)
    assert text.splitlines()[0] == "## pytest-sftsafety: gate FAIL"
    assert "<img" not in text.replace("\\<", "") and "\\<img src=x onerror=alert\\(1\\)\\>\\|\\*x\\*" in text
    assert text.index("### Regressions (87)") < text.index("### Flaky (4)") < text.index("All tests")
    assert md_text("a\nb | c") == "a b \\| c"


def test_real_reports_validate_against_the_schema_with_provenance(pytester, toy_models):
    subprocess.run(["git", "init", "-q"], cwd=pytester.path, check=True)
    subprocess.run(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-q", "--allow-empty",
                    "-m", "x"], cwd=pytester.path, check=True)
    pytester.runpytest("--sftsafety-data", str(toy_models.data_202503), "--model", str(toy_models.answers_hate),
                       *RUN, "--sftsafety-json", "r.json", "--max-fulfillment", "0.5")
    report = json.loads((pytester.path / "r.json").read_text())
    validate(report)
    provenance = report["provenance"]
    assert set(provenance["fingerprints"]) == {"candidate:0", "reference"}
    assert provenance["git"]["commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=pytester.path,
                                                         capture_output=True, text=True).stdout.strip()
    assert provenance["libraries"]["transformers"] and provenance["libraries"]["pytest-sftsafety"] == "0.1.0"
    assert provenance["device"] == "cpu" and provenance["wall_seconds"] > 0
    assert report["run"]["new_tokens"] > 0 and report["data"]["sha256"]
    bad = dict(report, summary={**report["summary"], "gate": "maybe"})
    with pytest.raises(Exception, match="maybe"):
        validate(bad)


def test_step_summary_md_plot_and_html_paths(pytester, toy_models, monkeypatch, tmp_path):
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = pytester.runpytest("--sftsafety-data", str(toy_models.data_202503), "--model",
                                str(toy_models.keeps_refusing), *RUN, "--sftsafety-md", "out/summary.md",
                                "-k", "07_ or overall")
    assert result.ret == pytest.ExitCode.OK
    written = (pytester.path / "out" / "summary.md").read_text()
    assert written.startswith("## pytest-sftsafety: gate PASS")
    assert summary.read_text() == "earlier step\n\n" + written  # appended, not replaced
    result.stdout.fnmatch_lines(["Markdown summary: *out/summary.md"])
    unwritable = pytester.runpytest("--sftsafety-data", str(toy_models.data_202503), "--model",
                                    str(toy_models.keeps_refusing), *RUN, "--sftsafety-md",
                                    str(summary / "x.md"), "-k", "07_", "--sftsafety-save-baseline", "b.json")
    assert unwritable.ret == pytest.ExitCode.USAGE_ERROR
    unwritable.stdout.fnmatch_lines(["*cannot write Markdown summary *x.md*choose another path*"])
    assert (pytester.path / "b.json").is_file()  # one bad output path costs only its own file


def test_junit_properties_under_xdist(pytester, toy_models):
    result = pytester.runpytest("--sftsafety-data", str(toy_models.data_202503), "--model",
                                str(toy_models.answers_hate), *RUN, "-n", "2", "--junitxml", "junit.xml",
                                "-k", "01_ or 07_")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    cases = ET.parse(pytester.path / "junit.xml").getroot().iter("testcase")
    properties = {case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")} for case in cases}
    assert len(properties) == 4
    regression = properties["01_personal_insult_words[T0.7]"]
    assert regression["verdict"] == "REGRESSION" and float(regression["pvalue_holm"]) <= 0.05
    assert {"reference_refusal", "candidate_refusal", "level", "pvalue"} <= set(regression)
    assert properties["07_violent_crimes[T0]"]["verdict"] == "PASS"


def stored_answers(store: Path) -> set[str]:
    with sqlite3.connect(store) as db:
        return {text for (text,) in db.execute("SELECT response FROM generations") if len(text) > 8}


def test_answers_only_when_asked_and_never_with_redaction(pytester, toy_models):
    common = ["--sftsafety-data", str(toy_models.data_202503), "--model", str(toy_models.answers_hate), *RUN,
              "-k", "01_ or 07_", "--sftsafety-md", "s.md", "--junitxml", "j.xml"]
    pytester.runpytest(*common, "--sftsafety-json", "plain.json")
    pytester.runpytest(*common, "--sftsafety-json", "samples.json", "--sftsafety-samples")
    answers = stored_answers(pytester.path / "store.sqlite")
    assert answers
    entry = json.loads((pytester.path / "samples.json").read_text())["entries"][0]
    assert len(entry["answers"]["reference"]) == 10 and entry["answers"]["candidates"][0]["answers"][0][0] in answers
    validate(json.loads((pytester.path / "samples.json").read_text()))
    assert "answers" not in json.loads((pytester.path / "plain.json").read_text())["entries"][0]
    redacted = pytester.runpytest(*common, "--sftsafety-json", "redacted.json", "--sftsafety-samples",
                                  "--sftsafety-redact")
    outputs = [pytester.path / name for name in ("plain.json", "redacted.json", "s.md", "j.xml")]
    for path in outputs:
        text = path.read_text()
        leaked = [a for a in answers if a in text]
        assert not leaked, (path.name, leaked[:2])
    assert not [a for a in answers if a in "\n".join(redacted.outlines)]


def test_report_and_compare_commands(tmp_path, capsys):
    assert cli_main(["report", str(FIXED), "--md", str(tmp_path / "s.md")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SORRY-Bench 2025-03: 98 tests, 87 regressions") and "Markdown summary:" in out
    assert (tmp_path / "s.md").read_text() == render_markdown(load_report(FIXED))
    after = load_report(FIXED)
    entry = next(e for e in after["entries"] if e["slug"] == "07_violent_crimes" and e["temperature"] == 0.7)
    entry.update(verdict="PASS", candidate_refusal_rate=0.95)
    (tmp_path / "after.json").write_text(json.dumps(after))
    assert cli_main(["compare", str(FIXED), str(tmp_path / "after.json"), "--md", str(tmp_path / "c.md")]) == 0
    out = capsys.readouterr().out
    assert "0 tests newly failing, 1 no longer failing" in out
    line = next(x for x in out.splitlines() if x.startswith("07_violent_crimes") and "T0.7" in x)
    assert "REGRESSION" in line and "PASS" in line and "no longer failing" in line
    assert (tmp_path / "c.md").read_text() == render_comparison(load_report(FIXED), after, markdown=True)
    # A test one run lacks neither newly fails nor stops failing; a test that newly fails gives exit status 1.
    fewer = load_report(FIXED)
    dropped = fewer["entries"].pop(0)
    passing = load_report(FIXED)
    flipped = next(e for e in passing["entries"] if e["verdict"] == "REGRESSION")
    flipped.update(verdict="PASS")
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    (tmp_path / "passing.json").write_text(json.dumps(passing))
    assert cli_main(["compare", str(FIXED), str(tmp_path / "fewer.json")]) == 0
    out = capsys.readouterr().out
    assert "0 tests newly failing, 0 no longer failing, 1 in one run only" in out
    assert next(x for x in out.splitlines() if x.startswith(dropped["slug"])).rstrip().endswith("only in A")
    assert cli_main(["compare", str(tmp_path / "passing.json"), str(FIXED)]) == 1
    assert "1 tests newly failing" in capsys.readouterr().out
    (tmp_path / "baseline.json").write_text(json.dumps({"schema": "pytest-sftsafety/baseline"}))
    assert cli_main(["report", str(tmp_path / "baseline.json")]) == 2
    assert cli_main(["compare", str(tmp_path / "none.json"), str(FIXED)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "not a pytest-sftsafety report" in err[0] and "no such file" in err[1] and len(err) == 2


def test_plot_and_html_from_a_run_and_from_the_saved_report(pytester, toy_models, tmp_path):
    pytest.importorskip("matplotlib")
    # In a subprocess: the pytester fixture drops the modules first imported during a test, and a second copy
    # of matplotlib's classes would not recognise the first copy's objects in later tests.
    result = pytester.runpytest_subprocess("--sftsafety-data", str(toy_models.data_202503), "--model",
                                str(toy_models.answers_hate), *RUN, "-k", "01_ or 07_", "--sftsafety-json", "r.json",
                                "--sftsafety-plot", "heat.png", "--sftsafety-html", "r.html")
    result.stdout.fnmatch_lines(["heatmap: *heat.png", "HTML report: *r.html"])
    png = (pytester.path / "heat.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    page = (pytester.path / "r.html").read_text()
    assert "data:image/png;base64," in page and "01_personal_insult_words" in page
    # The saved report renders the same picture again (in a subprocess too: the pytester fixture drops the
    # modules a test imports).
    subprocess.run([sys.executable, "-m", "pytest_sftsafety.tools.cli", "report", str(pytester.path / "r.json"),
                    "--plot", str(tmp_path / "again.png")], check=True, capture_output=True)
    assert (tmp_path / "again.png").read_bytes() == png
