"""The built-in demo: the paper's experiment in miniature, shipped with the package.

``pytest --model demo`` checks three benign LoRA fine-tunes of a toy aligned model against the model
with their adapters switched off, on a demo suite (SORRY-Bench 2025-03's categories, five mild prompts
each). The weights ship as package data (``demo_models/``, built by ``ci/build_demo.py`` and pinned by
sha256 in its ``MANIFEST.json``): training from scratch gives other weights on another CPU, so shipping
them is what makes every machine show the same answers and verdicts. Nothing is trained at run time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SftSafetyError

DEMO_SUITE = "sftsafety_demo"
SHIPPED = Path(__file__).resolve().parent.parent / "demo_models"


def closing_lines(exit_status: int) -> list[str]:
    """What a newcomer needs once the demo's table is printed: the exit status is the point, not a fault,
    and the command that checks their own adapter."""
    meaning = ("the demo's fine-tunes are built to regress, so exit status 1 (tests failed) is expected"
               if exit_status == 1 else f"the demo's fine-tunes are built to regress; this selection exited "
                                        f"{exit_status}")
    return [f"sftsafety demo: {meaning}.",
            "sftsafety demo: check your own adapter with: pytest --model path/to/adapter --seeds 5 "
            "--sftsafety-data path/to/sorry-bench/question.jsonl"]


def shipped_demo(folder: Path | None = None) -> Path:
    """The demo's folder, every file checked against the sha256 in its manifest (once per process)."""
    return _verified(folder or SHIPPED)


@functools.cache
def _verified(folder: Path) -> Path:
    fix = "reinstall pytest-sftsafety (or, in a checkout, `git checkout pytest_sftsafety/demo_models`)"
    try:
        manifest = json.loads((folder / "MANIFEST.json").read_text(encoding="utf-8"))
        expected = manifest["files"]
        names = list(expected.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SftSafetyError(f"the demo's files are missing or damaged ({folder / 'MANIFEST.json'}: "
                             f"{type(exc).__name__}); {fix}") from None
    for name, digest in names:
        try:
            found = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        except OSError:
            found = None
        if found != digest:
            raise SftSafetyError(f"the demo's file {folder / name} is {'missing' if found is None else 'changed'} "
                                 f"(its sha256 is pinned in MANIFEST.json); {fix}")
    return folder


def manifest(folder: Path | None = None) -> dict:
    """The recipe, the machine that built the weights, and every file's sha256."""
    return json.loads((shipped_demo(folder) / "MANIFEST.json").read_text(encoding="utf-8"))


def checkpoints(folder: Path | None = None) -> list[str]:
    """The demo's fine-tuned checkpoints (the last epoch of every seed)."""
    folder = shipped_demo(folder)
    return [str(folder / name) for name in manifest(folder)["checkpoints"]]


def demo_options(typed: Collection[str]) -> dict[str, Any]:
    """``--model demo``: the raw option values of the built-in demo's run (its fine-tunes on its suite). The
    demo brings its own suite, prompts and reference, so a project's settings for those are left out, and
    refused when given on the command line (``typed``)."""
    from ..config import OPTION_BY_DEST

    for dest in ("suite", "data", "reference", "base_model"):
        if dest in typed:
            raise ConfigError(f"--model demo brings its own suite, prompts and reference; drop "
                              f"{OPTION_BY_DEST[dest].flag}")
    folder = shipped_demo()
    return {"model": checkpoints(folder), "suite": str(folder / "suite.toml"), "data": None, "reference": None,
            "base_model": None}


def cache_root() -> Path:
    configured = os.environ.get("SFTSAFETY_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pytest-sftsafety"


def store_path() -> Path:
    """Where ``sftsafety demo`` keeps its answers (the package folder may be read-only)."""
    return cache_root() / "demo-store.sqlite"
