"""Terminal table and JSON report. Core module: stdlib, numpy and tabulate only."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tabulate import tabulate

from . import __version__
from .errors import SftSafetyError, one_line, printable
from .sanitize import outgoing
from .suite import temperature_label
from .verdict import FAILING, summary

REPORT_SCHEMA = "pytest-sftsafety/report"
REPORT_VERSION = 5
READABLE_VERSIONS = (3, 4, REPORT_VERSION)  # older reports render and compare; their verdicts stay theirs


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined rate (nothing judged) is null."""
    return None if value is None or value != value else value


def verdict_fields(verdict) -> dict[str, Any]:
    """What a verdict says, as JSON: rates, the tests and their adjusted p-values, power, why it is FLAKY."""
    fields = _verdict_fields(verdict)
    fields["unparsable_judgments"] = verdict.unparsable
    fields["judgments"] = verdict.judgments
    fields["observed_refusal_rates"] = None if verdict.observed is None else {
        "reference": verdict.observed[0], "candidate": verdict.observed[1]}
    return _clean(fields)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _verdict_fields(verdict) -> dict[str, Any]:
    return {
        "reference_refusal_rate": verdict.reference_refusal,
        "candidate_refusal_rate": verdict.candidate_refusal,
        "drop": verdict.drop,
        "margin": verdict.margin,
        "reference_interval": list(verdict.reference_interval),
        "level": verdict.level,
        "test": {"method": verdict.test.method, "statistic": verdict.test.statistic,
                 "expected": verdict.test.expected, "pvalue": verdict.test.pvalue,
                 "pvalue_sampling": verdict.sampling_pvalue, "pvalue_seed": verdict.seed_pvalue,
                 "smallest_pvalue": verdict.test.min_pvalue, "testable": not math.isnan(verdict.pvalue_holm),
                 "pvalue_holm": verdict.pvalue_holm, "pvalue_bh": verdict.pvalue_bh, "alpha": verdict.alpha},
        "standard_error": verdict.standard_error,
        "checkpoint_refusal_rates": list(verdict.checkpoint_refusals),
        "checkpoints_beyond_margin": verdict.checkpoints_beyond_margin,
        "minimum_detectable_drop": verdict.mde if math.isfinite(verdict.mde) else None,
        "samples_for_twice_the_margin": verdict.seeds_for_margin,
        "gate": verdict.gate,
        "reasons": list(verdict.reasons),
        "flaky": None if verdict.flaky_reason is None else {
            "reason": verdict.flaky_reason, "rerun_probability": verdict.rerun_probability, "settle": verdict.settle},
        "verdict": verdict.status,
    }


def adjusted_label(test: Mapping[str, Any]) -> str:
    """The family-adjusted p-value, or n/t for a test that cannot reach significance."""
    value = test["test"]["pvalue_holm"]
    return "n/t" if value is None or value != value else f"{value:.2g}"


def verdict_label(test: Mapping[str, Any]) -> str:
    """The verdict, with a FLAKY test's chance that a fresh run flags it."""
    flaky = test.get("flaky")
    if test["verdict"] == "FLAKY" and flaky and flaky.get("rerun_probability") is not None:
        return f"FLAKY ({flaky['rerun_probability']:.2f})"
    if test["verdict"] == "REGRESSION" and test.get("gate"):
        return "REGRESSION+GATE"  # a regression that is over its absolute limit as well
    return str(test["verdict"])


def _row(label: str, domain: str, temperature: float, v: Mapping[str, Any]) -> list[str]:
    ref, cand = v["reference_refusal_rate"], v["candidate_refusal_rate"]
    return [one_line(label), one_line(domain), temperature_label(temperature), rate_label(ref), rate_label(cand),
            change_label(cand, ref), adjusted_label(v), rate_label(v["minimum_detectable_drop"]), verdict_label(v)]


HEADERS = ["test", "domain", "temp", "ref refusal", "cand refusal", "change", "adj p", "MDE", "verdict"]


def rate_label(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def change_label(candidate: float | None, reference: float | None) -> str:
    if candidate is None or reference is None:
        return "n/a"
    return f"{candidate - reference + 0.0:+.2f}"  # + 0.0 turns -0.0 into 0.0


def _answers(answers: Mapping[str, Any], candidates: list[str]) -> dict[str, Any]:
    """The models' answers, ``[prompt][sample]`` like the outcomes (only with --sftsafety-samples)."""
    return {"reference": answers.get("reference"),
            "candidates": [{"model": model, "answers": answers[f"candidate:{i}"]}
                           for i, model in enumerate(candidates)]}


def _toxicity(summary: Mapping[str, Any], candidates: list[str]) -> dict[str, Any]:
    """A cell's toxicity scores as the report shows them: per model, the mean, the highest and the share
    of answers scored 0.5 or more."""
    return {"scorer": summary["scorer"], "reference": summary.get("reference"),
            "candidates": [{"model": model, **summary[f"candidate:{i}"]} for i, model in enumerate(candidates)]}


def _toxicity_note(entries: list[Mapping[str, Any]]) -> str | None:
    scored = [e for e in entries if e.get("toxicity")]
    if not scored:
        return None

    def mean(values: list[float]) -> str:
        return f"{sum(values) / len(values):.3f}"

    candidate = mean([c["mean"] for e in scored for c in e["toxicity"]["candidates"] if c["mean"] is not None] or
                     [float("nan")])
    references = [e["toxicity"]["reference"]["mean"] for e in scored
                  if e["toxicity"]["reference"] and e["toxicity"]["reference"]["mean"] is not None]
    versus = f" vs reference {mean(references)}" if references else ""
    return (f"toxicity ({scored[0]['toxicity']['scorer']}) in {len({e['category_id'] for e in scored})} categories: "
            f"mean candidate score {candidate}{versus} (per category in the JSON report)")


# What a server's seed check means for the reader (--backend openai); "honoured" needs no note.
SEED_CHECK_NOTES = {
    "not reproducible": "the endpoint gave different answers for the same seed (it ignores per-request seeds, "
                        "or is not deterministic): the samples are valid draws but a re-run cannot reproduce them",
    "rejected": "the endpoint refused per-request seeds, so requests went without them: the samples are valid "
                "draws but a re-run cannot reproduce them",
    "unverified": "whether the endpoint honours per-request seeds could not be told (its answers to the seed "
                  "check did not depend on the seed)",
}


def backend_notes(report: Mapping[str, Any]) -> list[str]:
    """What a served endpoint did that the reader must know: seeds it did not honour, answers it withheld, and
    answers the run could keep only altered (lone surrogates replaced, a key redacted)."""
    run = report.get("run", {})
    notes = [SEED_CHECK_NOTES[run["seed_check"]]] if run.get("seed_check") in SEED_CHECK_NOTES else []
    if run.get("content_filtered"):
        notes.append(f"the endpoint's content filter withheld {run['content_filtered']} answers: they were judged as "
                     f"empty answers (usually refusals) and not stored; a filter in front of the model can hide "
                     f"a regression")
    if run.get("unencodable_answers"):
        notes.append(f"{run['unencodable_answers']} answers held lone surrogates (halves of UTF-16 pairs, not "
                     f"characters): they were stored and judged with U+FFFD in their place")
    if run.get("redacted_answers"):
        notes.append(f"{run['redacted_answers']} answers quoted a key or a credential in a URL (a server that echoes "
                     f"the request?): they were stored and judged with it redacted")
    return notes


def verdict_notes(report: Mapping[str, Any]) -> list[str]:
    """How to read the table: the tests, the family's correction and what the verdicts are about."""
    tests = [*report["entries"], *report["aggregates"]]
    if not tests or "level" not in tests[0]:  # a report of an earlier format
        return ["Holm p: p-value after Holm's correction over all tests; MDE: smallest drop detected with 80% power"]
    testable = sum(1 for t in tests if t["test"].get("testable", True))
    notes = [f"adj p: after Tarone's screen ({testable} of {len(tests)} tests can reach significance; n/t: cannot "
             f"with these samples) and Holm's correction; MDE: smallest drop caught with 80% power (n/a: none); "
             f"FLAKY (p): chance that a fresh run flags it"]
    coupling = report.get("run", {}).get("coupling")
    if coupling and coupling.get("paired"):
        notes.append(f"tests paired by prompt and sample (McNemar): reference and candidate draw each sample from one "
                     f"seed ({coupling['share']:.0%} of paired answers identical)")
    elif coupling:
        notes.append("tests with prompts as strata (exact Mantel-Haenszel): several checkpoints, a baseline, or "
                     "samples not drawn from shared seeds")
    if all(t["level"] == "checkpoint" for t in tests):
        notes.append("verdicts are about this checkpoint: without seed information (several --model checkpoints, a "
                     "--baseline or --seed-sd) a drop may be one fine-tuning seed's luck, not the recipe's")
    else:
        notes.append("verdicts are at the recipe level: a REGRESSION exceeds both sampling noise and the spread of the "
                     "recipe's fine-tuning seeds")
    return notes


def render_table(report: Mapping[str, Any]) -> str:
    """The summary printed at the end of a run: categories, then domain and overall rows."""
    rows = [_row(e["slug"], e["domain"], e["temperature"], e) for e in report["entries"]]
    rows += [_row(a["title"], a["group"], a["temperature"], a) for a in report["aggregates"]]
    table = tabulate(rows, headers=HEADERS, tablefmt="simple", disable_numparse=True)
    gate = report["summary"]
    unjudged = f", {gate['unjudged']} unjudged" if gate.get("unjudged") else ""
    head = (f"{one_line(report['suite']['title'])}: {gate['tests']} tests, {gate['regressions']} regressions, "
            f"{gate['flaky']} flaky, {gate['gated']} over limits{unjudged}: gate {gate['gate'].upper()} "
            f"(alpha {report['settings']['alpha']:g} over all tests; margins "
            f"{report['settings']['margin']:.2f} per category, {report['settings']['aggregate_margin']:.2f} for "
            f"domains and overall; judge {one_line(report['judge']['id'])})")
    notes = verdict_notes(report)
    error = report["judge"].get("error_rates")
    if error:
        notes.append(f"rates corrected for the judge's errors (Rogan-Gladen; sensitivity {error['sensitivity']:.3f}, "
                     f"specificity {error['specificity']:.3f}, from {error['source']}); p-values from the judged "
                     f"outcomes")
    unparsable = sum(e["unparsable_judgments"] for e in report["entries"])
    if unparsable:
        judgments = sum(e["judgments"] for e in report["entries"])
        notes.append(f"{unparsable} of {judgments} judgments unparsable: left out of rates and tests (counted per "
                     f"test in the JSON report)")
    toxicity = _toxicity_note(report["entries"])
    if toxicity:
        notes.append(toxicity)
    notes += backend_notes(report)
    truncated = report.get("run", {}).get("truncated_for_judge")
    if truncated:
        notes.append(f"{truncated} answers were longer than the judge's input allows and were cut, with a mark")
    decoded = report.get("run", {}).get("decoded_for_judge")
    if decoded:
        notes.append(f"{decoded} answers in the {report['data']['prompt_style']} cipher were judged decoded (the "
                     f"store keeps them as generated)")
    sampled = [t for t in report["entries"] if t["temperature"] > 0]
    if sampled and "samples_for_twice_the_margin" in sampled[0]:
        needed = [t["samples_for_twice_the_margin"] for t in sampled]
        known = sorted(n for n in needed if n is not None)
        seeds = report["settings"]["seeds"]
        twice = 2 * report["settings"]["margin"]
        if known:
            notes.append(f"to catch a drop of {twice:.2f} (twice the margin) per category with 80% power, the median "
                         f"category needs {known[len(known) // 2]} samples per prompt (--seeds; now {seeds}); "
                         f"{needed.count(None)} of {len(needed)} cannot with up to 64")
        else:
            prompts = len(sampled[0]["question_ids"])
            notes.append(f"no category can catch a drop of {twice:.2f} with up to 64 samples per prompt: its "
                         f"{prompts} prompts, or seed-to-seed spread, limit it")
    return printable("\n".join([head, "", table, "", *notes]))  # names in it come from user files


def build_report(*, suite: Any, prompts: Any, settings: Mapping[str, Any], models: Mapping[str, Any],
                 judge: Mapping[str, Any], cells: Mapping[Any, Any], verdicts: Mapping[Any, Any],
                 nodeids: Mapping[Any, str], run: Mapping[str, Any],
                 provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON report: one entry per category test with per-sample outcomes, then domain and overall tests."""
    entries, aggregates = [], []
    for target, verdict in verdicts.items():
        if not target.aggregate:
            result = cells[(target.category_id, target.temperature)]
            entries.append({
                "id": nodeids.get(target, ""), "category_id": result.category.id, "category": result.category.name,
                "slug": result.category.slug, "description": result.category.description,
                "domain": result.category.domain, "temperature": result.temperature,
                "samples_per_prompt": int(result.candidates.shape[-1]), "question_ids": list(result.question_ids),
                "reference": {"refusal_rate": _finite(verdict.reference_refusal),
                              "outcomes": result.reference.astype(int).tolist()},
                # Each checkpoint's rate as the verdict read it (judged prompts; corrected when asked).
                "candidates": [{"model": model, "refusal_rate": _finite(rate),
                                "outcomes": outcomes.astype(int).tolist()}
                               for model, outcomes, rate in zip(models["candidates"], result.candidates,
                                                                verdict.checkpoint_refusals or
                                                                [float("nan")] * len(result.candidates), strict=True)],
                **({"toxicity": _toxicity(result.toxicity, models["candidates"])} if result.toxicity else {}),
                **({"answers": _answers(result.answers, models["candidates"])} if result.answers else {}),
                **verdict_fields(verdict)})
        else:
            group = target.domain or "overall"
            aggregates.append({"id": nodeids.get(target, ""), "group": group,
                               "title": suite.domains.get(group, "Overall"), "temperature": target.temperature,
                               **verdict_fields(verdict)})
    tests = entries + aggregates
    return {
        "schema": REPORT_SCHEMA,
        "version": REPORT_VERSION,
        "tool": {"name": "pytest-sftsafety", "version": __version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "outcome_coding": "1 = the answer fulfils the request, 0 = refusal (SORRY-Bench convention), -1 = the "
                          "judge's answer could not be parsed (left out of rates and tests)",
        "suite": {"name": suite.name, "title": suite.title, "release": suite.release, "source": str(suite.source)},
        "data": {"source": prompts.source, "sha256": prompts.sha256, "prompt_style": prompts.prompt_style,
                 "prompts": len(prompts.prompts)},
        "models": dict(models),
        "judge": dict(judge),
        "settings": dict(settings),
        "entries": entries,
        "aggregates": aggregates,
        "summary": summary([t["verdict"] for t in tests], bool(settings.get("flaky_fails")),
                           [t.get("gate") is not None for t in tests]),
        "run": dict(run),
        "provenance": dict(provenance or {}),
    }


# -- Markdown ------------------------------------------------------------------------------------------

# Markdown's specials, plus @ (mentions notify people) and $ (math on GitHub).
_MD_SPECIAL = str.maketrans({c: f"\\{c}" for c in "\\`*_{}[]<>()#+!|~@$"})


def md_text(value: Any) -> str:
    """Text from reports (model paths, category names, reasons) made inert in Markdown: special characters
    escaped, line breaks flattened, control characters shown as escapes, so a file name cannot turn into
    markup, links or table cells, nor act on a terminal that shows the file."""
    return printable(one_line(value)).translate(_MD_SPECIAL)


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    head = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return head + ["| " + " | ".join(r) + " |" for r in rows]


def _md_row(test: Mapping[str, Any], name: str, with_reasons: bool = False) -> list[str]:
    ref, cand = test["reference_refusal_rate"], test["candidate_refusal_rate"]
    row = [md_text(name), md_text(test["domain"] if "domain" in test else test["group"]),
           temperature_label(test["temperature"]), rate_label(ref), rate_label(cand), change_label(cand, ref),
           adjusted_label(test), md_text(verdict_label(test))]
    return row + [md_text("; ".join(test["reasons"]) or "-")] if with_reasons else row


def render_markdown(report: Mapping[str, Any]) -> str:
    """The run as Markdown for pull requests and CI pages: the gate result first, then the regressions,
    the flaky and unjudged tests, then every test in a collapsed table."""
    gate = report["summary"]
    tests = [(e, e["slug"]) for e in report["entries"]] + [(a, a["title"]) for a in report["aggregates"]]
    headers = ["test", "domain", "temp", "ref refusal", "cand refusal", "change", "adj p", "verdict"]
    mark = "PASS" if gate["gate"] == "pass" else "FAIL"
    lines = [f"## pytest-sftsafety: gate {mark}", "",
             f"**{md_text(report['suite']['title'])}**: {gate['tests']} tests, {gate['regressions']} regressions, "
             f"{gate['flaky']} flaky, {gate['gated']} over limits, {gate.get('unjudged', 0)} unjudged, "
             f"{gate['passed']} passed. Candidates: {', '.join(md_text(m) for m in report['models']['candidates'])}; "
             f"reference: {md_text(report['models']['reference'])}; judge {md_text(report['judge']['id'])}; "
             f"alpha {report['settings']['alpha']:g} over all tests, margin "
             f"{report['settings']['margin']:.2f} per category."]
    lines += [f"\n> {md_text(note)}" for note in backend_notes(report) + verdict_notes(report)]
    for title, statuses, reasons in (("Regressions", ("REGRESSION",), False), ("Over limits", ("GATE",), True),
                                     ("Unjudged", ("UNJUDGED",), True), ("Flaky", ("FLAKY",), True)):
        chosen = [_md_row(t, name, reasons) for t, name in tests
                  if t["verdict"] in statuses or ("GATE" in statuses and t.get("gate"))]
        if chosen:
            lines += ["", f"### {title} ({len(chosen)})", "",
                      *_md_table(headers + (["why"] if reasons else []), chosen)]
    lines += ["", "<details><summary>All tests</summary>", "",
              *_md_table(headers, [_md_row(t, name) for t, name in tests]), "", "</details>", ""]
    return "\n".join(lines)


def write_text(path: str | os.PathLike[str], text: str | bytes, what: str, append: bool = False,
               private: bool = False) -> Path:
    """Write an output atomically (temp file + rename: an interruption never leaves half of it), or append
    to it; one line naming the path when that fails. Permissions are those of any new file (the umask
    applies), or owner-only when ``private`` (a report holding model answers). Text leaves as
    ``sanitize.outgoing`` makes it: valid UTF-8, with no key or URL credential in it."""
    target = Path(path)
    data = outgoing(text).encode("utf-8") if isinstance(text, str) else text
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if append:
            with target.open("ab") as out:
                out.write(data)
            return target
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}"
        handle = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600 if private else 0o666)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise SftSafetyError(f"cannot write {what} {target}: {exc.strerror or exc}; choose another path") from None
    return target


def write_json(path: str | os.PathLike[str], document: Mapping[str, Any]) -> Path:
    # Undefined rates become null; every string is cleaned before it is escaped (a key with characters JSON
    # escapes would no longer match the serialised text).
    text = json.dumps(_clean(outgoing(document)), indent=2, allow_nan=False) + "\n"
    private = any("answers" in entry for entry in document.get("entries", []))
    return write_text(path, text, "report", private=private)


# What differs between two runs that measured the same thing: wall times, model loads, which worker did
# what, and where this run's own files went.
VOLATILE_RUN = ("seconds", "model_loads", "workers", "store")


def comparable(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report minus what differs between any two runs of the same measurement (times, worker ids, paths
    of this run's files): two runs that agree on everything else measured the same."""
    out = {k: v for k, v in report.items() if k not in ("created", "run", "settings", "provenance")}
    out["run"] = {k: v for k, v in report["run"].items() if k not in VOLATILE_RUN}
    out["provenance"] = {k: v for k, v in report["provenance"].items() if k not in ("started", "wall_seconds")}
    out["settings"] = {k: v for k, v in report["settings"].items() if k not in ("json", "store")}
    return out


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A saved JSON report, checked to be one this version can render; one-line errors otherwise."""
    where = Path(path)
    try:
        document = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SftSafetyError(f"{where}: no such file; write a report with pytest --sftsafety-json PATH") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SftSafetyError(f"{where}: not a readable JSON report ({type(exc).__name__})") from None
    if not isinstance(document, dict) or document.get("schema") != REPORT_SCHEMA:
        raise SftSafetyError(f"{where}: not a pytest-sftsafety report (a baseline or other JSON file?)")
    if document.get("version") not in READABLE_VERSIONS:
        raise SftSafetyError(f"{where}: report format {document.get('version')} is not one this version reads "
                             f"({', '.join(map(str, READABLE_VERSIONS))}); re-run pytest with this version")
    missing = [key for key in ("created", "suite", "data", "models", "judge", "settings", "entries", "aggregates",
                               "summary") if key not in document]
    if missing:
        raise SftSafetyError(f"{where}: damaged report (no {', '.join(missing)}); write it again with pytest "
                             f"--sftsafety-json")
    # A report is outside text too (an older version, or another tool, may have written a lone surrogate as an
    # escape, or a key): cleaned as a new report is, before anything is printed or rendered from it.
    return outgoing(document)


def _tests_by_key(report: Mapping[str, Any]) -> dict[tuple[str, float], Mapping[str, Any]]:
    tests = {(e["slug"], e["temperature"]): e for e in report["entries"]}
    tests.update({(a["title"], a["temperature"]): a for a in report["aggregates"]})
    return tests


NEWLY_FAILING, NO_LONGER_FAILING, ONLY_IN_A, ONLY_IN_B = "newly failing", "no longer failing", "only in A", "only in B"


def compared_tests(before: Mapping[str, Any], after: Mapping[str, Any]
                   ) -> list[tuple[tuple[str, float], Any, Any, str]]:
    """Each test of either run: its key, its entry in A and in B (None where the run lacks it), and what
    changed: newly failing, no longer failing, only in one run (a test one run lacks neither newly fails
    nor stops failing), or nothing."""
    old, new = _tests_by_key(before), _tests_by_key(after)
    out = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            note = ONLY_IN_B if a is None else ONLY_IN_A
        else:
            note = (NEWLY_FAILING if b["verdict"] in FAILING and a["verdict"] not in FAILING else
                    NO_LONGER_FAILING if a["verdict"] in FAILING and b["verdict"] not in FAILING else "")
        out.append((key, a, b, note))
    return out


def render_comparison(before: Mapping[str, Any], after: Mapping[str, Any], markdown: bool = False) -> str:
    """Two runs side by side (e.g. the last release and this one): each test's candidate refusal rate and
    verdict in both, the change, and which tests newly fail or newly pass."""
    rows = []
    text = md_text if markdown else one_line
    for key, a, b, note in compared_tests(before, after):
        rate_a = a["candidate_refusal_rate"] if a else None
        rate_b = b["candidate_refusal_rate"] if b else None
        verdict_a, verdict_b = (a["verdict"] if a else "-"), (b["verdict"] if b else "-")
        rows.append([text(key[0]), temperature_label(key[1]), rate_label(rate_a), rate_label(rate_b),
                     change_label(rate_b, rate_a), text(verdict_a), text(verdict_b), note])
    headers = ["test", "temp", "refusal A", "refusal B", "change", "verdict A", "verdict B", ""]
    summary = [one_line(f"{label}: gate {run['summary']['gate'].upper()} ({run['created']}, "
                        f"{', '.join(run['models']['candidates'])})") for label, run in (("A", before), ("B", after))]
    measured_by = {"suite": ("suite", "name"), "prompts": ("data", "sha256"), "judge": ("judge", "id"),
                   "seeds": ("settings", "seeds"), "temperatures": ("settings", "temperatures"),
                   "margin": ("settings", "margin")}
    differ = [name for name, (part, key) in measured_by.items() if before[part].get(key) != after[part].get(key)]
    if differ:
        summary.append(f"note: the runs differ in {', '.join(differ)}, so their rates are not measured alike")
    only = sum(r[-1] in (ONLY_IN_A, ONLY_IN_B) for r in rows)
    summary += [f"{sum(r[-1] == NEWLY_FAILING for r in rows)} tests newly failing, "
                f"{sum(r[-1] == NO_LONGER_FAILING for r in rows)} no longer failing"
                + (f", {only} in one run only" if only else "")]
    if markdown:
        return "\n".join(["## pytest-sftsafety: two runs", "", *(f"- {md_text(line)}" for line in summary), "",
                          *_md_table(headers, rows), ""])
    return printable("\n".join([*summary, "", tabulate(rows, headers=headers, tablefmt="simple",
                                                        disable_numparse=True)]))
