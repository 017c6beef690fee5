"""Wall time of a full SORRY-Bench 2025-03 run over pytest-xdist workers against one process, on CPU.

Two model shapes: the toy aligned model with its LoRA adapter (short answers: start-up dominates), and
a random Llama-shaped model with an adapter that writes 64-token answers (decoding dominates). Each
run is a fresh `pytest` process with its own empty store: 440 prompts x (greedy + 5 samples at
T=0.7) for the adapter and the reference. The reports of the runs must be identical apart from
timings and worker ids; the script fails otherwise.

Usage: python ci/bench_xdist.py [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_sftsafety.report import comparable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def timed_run(folder: Path, model: Path, data: Path, workers: int, max_new_tokens: int, tag: str) -> tuple[float, dict]:
    report = folder / f"{tag}.json"
    for leftover in folder.glob(f"{tag}.sqlite*"):  # every run starts from an empty store
        leftover.unlink()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--model", str(model), "--seeds", "5",
           "--sftsafety-data", str(data), "--max-new-tokens", str(max_new_tokens), "--sftsafety-store",
           str(folder / f"{tag}.sqlite"), "--sftsafety-json", str(report)]
    if workers:
        cmd += ["-n", str(workers)]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"{tag}: pytest exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall, json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="build and keep the models here (reused when present)")
    parser.add_argument("--readme", action="store_true", help="write the figures into README.md's block")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="sftsafety-xdist-"))
    folder.mkdir(parents=True, exist_ok=True)

    from _bench_models import random_model, sorry_bench_prompts

    from pytest_sftsafety.suite import load_suite
    from pytest_sftsafety.tools import toy

    if not (folder / "toy" / "adapter" / "adapter_config.json").is_file():
        toy.build_example(folder / "toy")
    data = folder / "toy" / "question.jsonl"
    assert len(sorry_bench_prompts()) == len(toy.placeholder_questions(load_suite("sorry_bench_202503")))
    random_dir = random_model(folder / "random", hidden=128, layers=4, adapter=True)
    shapes = [("toy aligned model + adapter, up to 256 new tokens", folder / "toy" / "adapter", 256),
              ("random 4-layer model + adapter, 64 new tokens", random_dir / "adapter", 64)]

    print(f"CPU cores: {len(os.sched_getaffinity(0))}; full 2025-03 shape, --seeds 5, temperatures 0 and 0.7, "
          f"adapter and reference")
    table = [f"| model (CPU, {len(os.sched_getaffinity(0))} cores) | one process (s) | -n {args.workers} (s) | ratio "
             f"| generation per worker (s) | reports |", "| --- | --- | --- | --- | --- | --- |"]
    print("\n".join(table))
    for label, model, tokens in shapes:
        tag = model.parent.name
        single_s, single = timed_run(folder, model, data, 0, tokens, f"{tag}-single")
        multi_s, multi = timed_run(folder, model, data, args.workers, tokens, f"{tag}-n{args.workers}")
        same = comparable(single) == comparable(multi)
        if not same:
            raise SystemExit(f"{label}: the -n {args.workers} report differs from the single-process report")
        per_worker = ", ".join(f"{w} {v['seconds']:.1f}" for w, v in sorted(multi["run"]["workers"].items()))
        loads = {w: v["model_loads"] for w, v in multi["run"]["workers"].items()}
        assert len(loads) == args.workers and all(n == 1 for n in loads.values()), (loads, multi["run"])
        table.append(f"| {label} | {single_s:.1f} (generation {single['run']['seconds']:.1f}) | {multi_s:.1f} | "
                     f"{single_s / multi_s:.2f}x | {per_worker} | identical |")
        print(table[-1])
    from readme_blocks import publish

    publish("xdist", "python ci/bench_xdist.py", "\n".join(table), args.readme)


if __name__ == "__main__":
    main()
