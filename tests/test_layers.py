"""The layers of the package: the core and the orchestration import neither torch nor pytest, and no
module imports another that imports it back, counting imports inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_sftsafety"
CORE = ["suite", "config", "store", "stats", "verdict", "report", "baseline", "data", "errors", "seeding",
        "provenance", "plot", "outputs", "sanitize"]
ORCHESTRATION = ["session", "runner", "distributed", "progress"]
HEAVY = ("torch", "pytest", "transformers", "peft", "_pytest", "vllm", "matplotlib")


@pytest.mark.parametrize("module", CORE + ORCHESTRATION)
def test_core_and_orchestration_load_no_heavy_library(module):
    code = (f"import sys, pytest_sftsafety.{module}; "
            f"print(' '.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"importing pytest_sftsafety.{module} loaded {done.stdout.strip()}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports, at the top or inside a function."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if not base.startswith("pytest_sftsafety"):
                continue
            names = [f"{base}.{alias.name}" for alias in node.names]
            out.update(name if (PACKAGE.parent / (name.replace(".", "/") + ".py")).exists() or
                       (PACKAGE.parent / name.replace(".", "/")).is_dir() else base for name in names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("pytest_sftsafety"))
    out.discard(here)
    return out


def test_no_import_cycles():
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    # A package's __init__ runs before its modules; an import of the package alone is not an edge back.
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        seen = {start}
        visit(start, [start])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])
