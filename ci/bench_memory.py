"""Peak memory of a run with candidate and reference, against loading the model once, on CPU.

Each measurement runs in a fresh interpreter and reads its peak resident set size (ru_maxrss), so
both include the same libraries. The model is a random Llama-shaped model of about 100M parameters
(hidden 768, 12 layers) with a LoRA adapter; the run generates 44 categories x (greedy + 2 samples)
for the adapter and for the reference (the same base with the adapter switched off).

Usage: python ci/bench_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

LOAD_ONCE = """
import resource, sys, torch, peft
from transformers import AutoModelForCausalLM
from pytest_sftsafety.backends import hf  # what a run imports too
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, use_safetensors=True).eval()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

FULL_RUN = """
import resource, sys
sys.path.insert(0, sys.argv[3])
from _bench_models import sorry_bench_prompt_set
from pytest_sftsafety.backends.checkpoints import plan_models
from pytest_sftsafety.backends.hf import HFBackend
from pytest_sftsafety.config import build_config
from pytest_sftsafety.judges import make_judge
from pytest_sftsafety.runner import run
from pytest_sftsafety.store import Store

values = {"model": [sys.argv[1] + "/adapter"], "max_new_tokens": "32", "device": "cpu", "seeds": "2"}
cfg = build_config(lambda spec: values.get(spec.dest))
plan = plan_models(cfg.models, None, None, False)
prompt_set = sorry_bench_prompt_set()
cells = [(c.id, t) for c in prompt_set.suite.categories for t in cfg.temperatures]
result = run(cfg, prompt_set, cells, plan, lambda: HFBackend(cfg, plan), make_judge("keyword"),
             Store(sys.argv[2]))
assert result.stats.model_loads == 1, result.stats
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak(script: str, *args: str) -> int:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode:
        raise SystemExit(f"measurement failed:\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import argparse

    sys.path.insert(0, str(HERE))
    from _bench_models import random_model
    from readme_blocks import publish

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="write the figures into README.md's block")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sftsafety-mem-"))
    model_dir = random_model(work / "model", hidden=768, layers=12, adapter=True)
    params = json.loads((model_dir / "config.json").read_text())
    weights = (model_dir / "model.safetensors").stat().st_size
    once = peak(LOAD_ONCE, str(model_dir))
    full = peak(FULL_RUN, str(model_dir), str(work / "store.sqlite"), str(HERE))
    print(f"model: hidden {params['hidden_size']}, {params['num_hidden_layers']} layers, "
          f"{weights / 2**20:.0f} MiB of float32 weights")
    print(f"peak RSS, load the model once:                 {once / 2**20:8.0f} MiB")
    print(f"peak RSS, run candidate + reference (one load): {full / 2**20:8.0f} MiB")
    print(f"ratio: {full / once:.2f}x (target <= 1.2x)")
    publish("memory", "python ci/bench_memory.py",
            f"Peak memory (`python ci/bench_memory.py`): a run with candidate and reference of a "
            f"{params['num_hidden_layers']}-layer, {params['hidden_size']}-wide model with a LoRA adapter "
            f"({weights / 2**20:.0f} MiB of float32 weights) peaks at {full / 2**20:.0f} MiB resident, against "
            f"{once / 2**20:.0f} MiB for loading the model once: **{full / once:.2f}x** (the adapter is applied "
            f"to the one copy of the base weights; the rest is what generation itself holds).", args.readme)


if __name__ == "__main__":
    main()
