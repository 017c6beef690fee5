"""Calibration baselines: the outcomes of several fine-tuning seeds of one recipe, saved once and
used later as the reference and as the recipe's seed-to-seed spread, so a CI run with one new checkpoint
is judged at the recipe level (a drop beyond what the recipe's seeds spread) without generating the
reference again.

Core module: stdlib and numpy only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import ConfigError
from .report import write_json
from .stats import refusal_rate

BASELINE_SCHEMA = "pytest-sftsafety/baseline"
BASELINE_VERSION = 2  # 2: a sha256 of the content, so a file edited by hand is refused
# Settings a baseline must share with the run that uses it: anything that changes what is measured.
# The run seed too: a baseline's checkpoints draw their samples from the same seeds, so their spread holds
# none of the sampling noise a run with other seeds would add.
MATCHING = ("suite", "prompt_style", "data_sha256", "judge", "seeds", "min_p", "top_p", "max_new_tokens", "engine",
            "run_seed")


@dataclass(frozen=True)
class Baseline:
    path: str
    identity: dict[str, Any]
    cells: dict[tuple[int, float], np.ndarray]  # [checkpoint, prompt, sample] fulfilment outcomes
    models: list[str]

    def reference_for(self, cell: tuple[int, float]) -> np.ndarray:
        """The checkpoints' samples of each prompt pooled: [prompt, checkpoint * sample]."""
        outcomes = self.cells[cell]
        return np.moveaxis(outcomes, 0, 1).reshape(outcomes.shape[1], -1)

    def checkpoint_rates(self, cells: list[tuple[int, float]]) -> np.ndarray:
        """Refusal rate of each calibration checkpoint over the given cells (prompts weighted equally)."""
        stacked = np.concatenate([self.cells[c] for c in cells], axis=1)
        return np.array([refusal_rate(checkpoint) for checkpoint in stacked])


def identity(settings: Mapping[str, Any], suite_name: str, data_sha256: str, judge_id: str, engine: str) -> dict:
    return {"suite": suite_name, "prompt_style": settings["prompt_style"], "data_sha256": data_sha256,
            "judge": judge_id, "seeds": settings["seeds"], "min_p": settings["min_p"], "top_p": settings["top_p"],
            "max_new_tokens": settings["max_new_tokens"], "engine": engine, "run_seed": settings["run_seed"]}


def save(path: str | Path, ident: Mapping[str, Any], models: list[str], cells: Mapping[tuple[int, float], Any]) -> None:
    """Write the candidates' outcomes of a run (its checkpoints are the recipe's seeds) as a baseline."""
    document = {
        "schema": BASELINE_SCHEMA, "version": BASELINE_VERSION, "tool_version": __version__,
        "identity": dict(ident), "models": list(models),
        "cells": [_cell(cell, result.candidates, 1 if cell[1] == 0 else int(ident["seeds"]))
                  for cell, result in cells.items()],
    }
    document["sha256"] = content_sha256(document)
    write_json(path, document)


def content_sha256(document: Mapping[str, Any]) -> str:
    """The sha256 of what a baseline measured and under which settings (canonical JSON: sorted keys, no
    spaces), so that an edit by hand, which would change the verdicts it feeds, is seen."""
    content = {key: document.get(key) for key in ("identity", "models", "cells")}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cell(cell: tuple[int, float], candidates: np.ndarray, samples: int) -> dict:
    # Adaptive runs may hold more samples in some cells; a baseline keeps the --seeds every cell has.
    outcomes = candidates[..., :samples]
    return {"category_id": cell[0], "temperature": cell[1], "outcomes": outcomes.astype(int).tolist(),
            "checkpoint_refusal_rates": [refusal_rate(checkpoint) for checkpoint in outcomes]}


def load(path: str | Path) -> Baseline:
    where = f"--baseline {path}"
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; make one with --sftsafety-save-baseline PATH") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{where}: not a readable baseline ({type(exc).__name__}); make it again with "
                          f"--sftsafety-save-baseline") from None
    if not isinstance(document, dict) or document.get("schema") != BASELINE_SCHEMA:
        raise ConfigError(f"{where}: not a baseline file (a JSON report is not one); make one with "
                          f"--sftsafety-save-baseline PATH")
    if document.get("version") != BASELINE_VERSION:
        raise ConfigError(f"{where}: baseline format {document.get('version')} is not {BASELINE_VERSION}; make "
                          f"it again with this version's --sftsafety-save-baseline")
    try:
        unchanged = document.get("sha256") == content_sha256(document)
    except (TypeError, ValueError):  # not JSON that a baseline could hold
        unchanged = False
    if not unchanged:
        raise ConfigError(f"{where}: its content no longer matches the checksum it was saved with (edited or "
                          f"damaged after it was saved); make it again with --sftsafety-save-baseline")
    try:
        cells = {(int(c["category_id"]), float(c["temperature"])): np.asarray(c["outcomes"], dtype=np.int8)
                 for c in document["cells"]}
        bad = [cell for cell, arr in cells.items() if arr.ndim != 3]
        if bad:
            raise ValueError(f"outcomes of {bad[0]} are not [checkpoint][prompt][sample]")
        odd = [cell for cell, arr in cells.items() if not np.isin(arr, (-1, 0, 1)).all()]
        if odd:
            raise ValueError(f"outcomes of {odd[0]} are not 1, 0 or -1")
        return Baseline(path=str(path), identity=dict(document["identity"]), cells=cells,
                        models=list(document.get("models", [])))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"{where}: damaged baseline ({exc}); make it again with --sftsafety-save-baseline") \
            from None


def check_compatible(baseline: Baseline, ident: Mapping[str, Any], cells: list[tuple[int, float]]) -> None:
    """Refuse a baseline made with other settings: its seed noise would not be this run's."""
    for key in MATCHING:
        if baseline.identity.get(key) != ident.get(key):
            raise ConfigError(f"--baseline {baseline.path} was made with {key} = {baseline.identity.get(key)!r}, "
                              f"this run has {ident.get(key)!r}; run with the baseline's settings or make a new "
                              f"baseline with --sftsafety-save-baseline")
    missing = [cell for cell in cells if cell not in baseline.cells]
    if missing:
        category, temperature = missing[0]
        its_temperatures = {t for _, t in baseline.cells}
        if temperature in its_temperatures:
            # The temperature is there for other categories: the baseline's run selected fewer tests.
            held = sorted({c for c, _ in baseline.cells})
            shown = ", ".join(map(str, held[:8])) + (", ..." if len(held) > 8 else "")
            raise ConfigError(f"--baseline {baseline.path} has no outcomes for category {category} (it holds "
                              f"categories {shown}: its run selected fewer tests with -k or -m); make the baseline "
                              f"without -k/-m, or select only tests it covers")
        raise ConfigError(f"--baseline {baseline.path} has no outcomes for category {category} at temperature "
                          f"{temperature:g}; make the baseline with the same --temperatures and suite")
