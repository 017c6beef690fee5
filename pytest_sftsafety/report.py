"""Terminal table and JSON report. Core module: stdlib, numpy and tabulate only."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from . import __version__
from .errors import SftSafetyError
from .stats import REGRESSION, refusal_rate

REPORT_SCHEMA = "pytest-sftsafety/report"
REPORT_VERSION = 1


def temperature_label(temperature: float) -> str:
    return f"T{temperature:g}"


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def aggregate_rows(entries: Sequence[Mapping[str, Any]], domains: Mapping[str, str]) -> list[dict[str, Any]]:
    """Domain and overall refusal rates per temperature: the unweighted mean of category rates,
    as SORRY-Bench reports its overall score."""
    rows = []
    temperatures = sorted({e["temperature"] for e in entries})
    groups = [(key, title) for key, title in domains.items()] + [("overall", "Overall")]
    for key, title in groups:
        for temperature in temperatures:
            chosen = [e for e in entries if e["temperature"] == temperature and key in ("overall", e["domain"])]
            if not chosen:
                continue
            rows.append({
                "group": key, "title": title, "temperature": temperature, "categories": len(chosen),
                "reference_refusal": _mean([e["reference"]["refusal_rate"] for e in chosen]),
                "candidate_refusal": _mean([e["candidate_refusal_rate"] for e in chosen]),
                "regressions": sum(e["verdict"] == REGRESSION for e in chosen),
            })
    return rows


def _rate(value: float) -> str:
    return f"{value:.2f}"


def _change(candidate: float, reference: float) -> str:
    return f"{candidate - reference + 0.0:+.2f}"  # + 0.0 turns -0.0 into 0.0


def render_table(report: Mapping[str, Any]) -> str:
    """The summary printed at the end of a run: one row per test, then domain and overall rows."""
    body = [[e["slug"], e["domain"], temperature_label(e["temperature"]), _rate(e["reference"]["refusal_rate"]),
             _rate(e["candidate_refusal_rate"]), _change(e["candidate_refusal_rate"], e["reference"]["refusal_rate"]),
             e["verdict"]] for e in report["entries"]]
    table = tabulate(body, headers=["category", "domain", "temp", "ref refusal", "cand refusal", "change",
                                    "verdict"], tablefmt="simple", disable_numparse=True)
    groups = [[r["title"], temperature_label(r["temperature"]), str(r["categories"]), _rate(r["reference_refusal"]),
               _rate(r["candidate_refusal"]), _change(r["candidate_refusal"], r["reference_refusal"]),
               str(r["regressions"])] for r in report["aggregates"]]
    summary = tabulate(groups, headers=["domain", "temp", "categories", "ref refusal", "cand refusal", "change",
                                        "regressions"], tablefmt="simple", disable_numparse=True)
    gate = report["summary"]
    head = (f"{report['suite']['title']}: {gate['tests']} tests, {gate['regressions']} regressions, "
            f"gate {gate['gate'].upper()} (margin {report['settings']['margin']:.2f}, judge {report['judge']})")
    return f"{head}\n\n{table}\n\n{summary}"


def build_report(*, suite: Any, prompts: Any, settings: Mapping[str, Any], models: Mapping[str, Any],
                 judge_id: str, cells: Mapping[Any, Any], nodeids: Mapping[Any, str],
                 run: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON report: one entry per (category, temperature) with per-sample outcomes."""
    entries = []
    for cell, result in cells.items():
        verdict = result.verdict
        entries.append({
            "id": nodeids.get(cell, ""),
            "category_id": result.category.id,
            "category": result.category.name,
            "slug": result.category.slug,
            "description": result.category.description,
            "domain": result.category.domain,
            "temperature": result.temperature,
            "samples_per_prompt": int(result.reference.shape[-1]),
            "question_ids": list(result.question_ids),
            "reference": {"refusal_rate": verdict.reference_refusal,
                          "outcomes": result.reference.astype(int).tolist()},
            "candidates": [{"model": model, "refusal_rate": refusal_rate(outcomes),
                            "outcomes": outcomes.astype(int).tolist()}
                           for model, outcomes in zip(models["candidates"], result.candidates, strict=True)],
            "candidate_refusal_rate": verdict.candidate_refusal,
            "drop": verdict.drop,
            "margin": verdict.margin,
            "verdict": verdict.status,
        })
    regressions = sum(e["verdict"] == REGRESSION for e in entries)
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
        "aggregates": aggregate_rows(entries, suite.domains),
        "summary": {"tests": len(entries), "regressions": regressions, "passed": len(entries) - regressions,
                    "gate": "fail" if regressions else "pass"},
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
