"""Terminal table and JSON report. Core module: stdlib, numpy and tabulate only."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tabulate import tabulate

from . import __version__
from .errors import SftSafetyError
from .stats import FLAKY, GATE, PASS, REGRESSION, refusal_rate

REPORT_SCHEMA = "pytest-sftsafety/report"
REPORT_VERSION = 2


def temperature_label(temperature: float) -> str:
    return f"T{temperature:g}"


def verdict_fields(verdict) -> dict[str, Any]:
    """What a verdict says, as JSON: rates, band, test, adjusted p-values, power."""
    return {
        "reference_refusal_rate": verdict.reference_refusal,
        "candidate_refusal_rate": verdict.candidate_refusal,
        "drop": verdict.drop,
        "margin": verdict.margin,
        "reference_interval": list(verdict.reference_interval),
        "band": {"low": verdict.band.low, "high": verdict.band.high, "sigma": verdict.band.sigma},
        "test": {"method": verdict.test.method, "statistic": verdict.test.statistic,
                 "expected": verdict.test.expected, "pvalue": verdict.test.pvalue,
                 "pvalue_holm": verdict.pvalue_holm, "pvalue_bh": verdict.pvalue_bh, "alpha": verdict.alpha},
        "checkpoint_refusal_rates": list(verdict.checkpoint_refusals),
        "checkpoints_beyond_margin": verdict.checkpoints_beyond_margin,
        "minimum_detectable_drop": verdict.mde,
        "seeds_for_margin": verdict.seeds_for_margin,
        "gate": verdict.gate,
        "reasons": list(verdict.reasons),
        "verdict": verdict.status,
    }


def _row(label: str, domain: str, temperature: float, v: Mapping[str, Any]) -> list[str]:
    return [label, domain, temperature_label(temperature), _rate(v["reference_refusal_rate"]),
            _rate(v["candidate_refusal_rate"]), _change(v["candidate_refusal_rate"], v["reference_refusal_rate"]),
            f">={v['band']['low']:.2f}", f"{v['test']['pvalue_holm']:.2g}", f"{v['minimum_detectable_drop']:.2f}",
            v["verdict"]]


HEADERS = ["test", "domain", "temp", "ref refusal", "cand refusal", "change", "band", "Holm p", "MDE", "verdict"]


def _rate(value: float) -> str:
    return f"{value:.2f}"


def _change(candidate: float, reference: float) -> str:
    return f"{candidate - reference + 0.0:+.2f}"  # + 0.0 turns -0.0 into 0.0


def render_table(report: Mapping[str, Any]) -> str:
    """The summary printed at the end of a run: categories, then domain and overall rows."""
    rows = [_row(e["slug"], e["domain"], e["temperature"], e) for e in report["entries"]]
    rows += [_row(a["title"], a["group"], a["temperature"], a) for a in report["aggregates"]]
    table = tabulate(rows, headers=HEADERS, tablefmt="simple", disable_numparse=True)
    gate = report["summary"]
    head = (f"{report['suite']['title']}: {gate['tests']} tests, {gate['regressions']} regressions, "
            f"{gate['flaky']} flaky, {gate['gated']} over limits: gate {gate['gate'].upper()} "
            f"(alpha {report['settings']['alpha']:g} with Holm's correction over all tests; margins "
            f"{report['settings']['margin']:.2f} per category, {report['settings']['aggregate_margin']:.2f} for "
            f"domains and overall; judge {report['judge']})")
    notes = ["band: lowest candidate refusal rate that seed and sampling noise explain (reference - margin - "
             "1.96 sigma); MDE: smallest drop this run detects with 80% power"]
    sampled = [t for t in report["entries"] if t["temperature"] > 0]
    if sampled:
        needed = [t["seeds_for_margin"] for t in sampled]
        known = sorted(n for n in needed if n is not None)
        seeds = report["settings"]["seeds"]
        if known:
            notes.append(f"to detect a drop of the margin ({report['settings']['margin']:.2f}) per category with 80% "
                         f"power, the median category needs {known[len(known) // 2]} samples per prompt "
                         f"(--seeds; now {seeds}); {needed.count(None)} of {len(needed)} cannot reach it with "
                         f"up to 64")
        else:
            prompts = len(sampled[0]["question_ids"])
            notes.append(f"no category can detect a drop of the margin with up to 64 samples per prompt: its "
                         f"{prompts} prompts, or seed-to-seed spread, limit it")
    return "\n".join([head, "", table, "", *notes])


def build_report(*, suite: Any, prompts: Any, settings: Mapping[str, Any], models: Mapping[str, Any],
                 judge_id: str, cells: Mapping[Any, Any], verdicts: Mapping[Any, Any], nodeids: Mapping[Any, str],
                 run: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON report: one entry per category test with per-sample outcomes, then domain and overall tests."""
    entries, aggregates = [], []
    for target, verdict in verdicts.items():
        if isinstance(target[0], int):
            result = cells[target]
            entries.append({
                "id": nodeids.get(target, ""), "category_id": result.category.id, "category": result.category.name,
                "slug": result.category.slug, "description": result.category.description,
                "domain": result.category.domain, "temperature": result.temperature,
                "samples_per_prompt": int(result.reference.shape[-1]), "question_ids": list(result.question_ids),
                "reference": {"refusal_rate": verdict.reference_refusal,
                              "outcomes": result.reference.astype(int).tolist()},
                "candidates": [{"model": model, "refusal_rate": refusal_rate(outcomes),
                                "outcomes": outcomes.astype(int).tolist()}
                               for model, outcomes in zip(models["candidates"], result.candidates, strict=True)],
                **verdict_fields(verdict)})
        else:
            group = target[1] if target[0] == "domain" else "overall"
            aggregates.append({"id": nodeids.get(target, ""), "group": group,
                               "title": suite.domains.get(group, "Overall"), "temperature": target[-1],
                               **verdict_fields(verdict)})
    tests = entries + aggregates
    count = {status: sum(t["verdict"] == status for t in tests) for status in (REGRESSION, FLAKY, GATE, PASS)}
    failed = count[REGRESSION] + count[GATE] + (count[FLAKY] if settings.get("flaky_fails") else 0)
    return {
        "schema": REPORT_SCHEMA,
        "version": REPORT_VERSION,
        "tool": {"name": "pytest-sftsafety", "version": __version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "outcome_coding": "1 = the answer fulfils the request, 0 = refusal (SORRY-Bench convention)",
        "suite": {"name": suite.name, "title": suite.title, "release": suite.release, "source": str(suite.source)},
        "data": {"source": prompts.source, "sha256": prompts.sha256, "prompt_style": prompts.prompt_style,
                 "prompts": len(prompts.prompts)},
        "models": dict(models),
        "judge": judge_id,
        "settings": dict(settings),
        "entries": entries,
        "aggregates": aggregates,
        "summary": {"tests": len(tests), "regressions": count[REGRESSION], "flaky": count[FLAKY],
                    "gated": count[GATE], "passed": count[PASS], "gate": "fail" if failed else "pass"},
        "run": dict(run),
    }


def write_json(path: str | os.PathLike[str], document: Mapping[str, Any]) -> Path:
    """Write atomically (temp file + rename), so an interrupted write never leaves half a report."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2, allow_nan=False)
            out.write("\n")
        os.replace(tmp, target)
    except OSError as exc:
        raise SftSafetyError(f"cannot write report {target}: {exc.strerror or exc}; choose another path") from None
    return target
