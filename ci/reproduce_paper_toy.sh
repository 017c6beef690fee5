#!/usr/bin/env bash
# The paper's experiment in miniature, on CPU in about a minute: fine-tune the demo's toy aligned model
# on the demo's benign instruction set with N seeds (sftsafety finetune), evaluate every seed at T=0 and
# T=0.7 with repeated samples, calibrate bands on the seeds (a baseline), check one seed against it, and
# print per-seed and per-sample spreads of the refusal rate as in Fraser et al. (2025), Tables 1-2.
#
# Usage: bash ci/reproduce_paper_toy.sh [SEEDS (default 5)] [WORK_DIR (default: a new temp folder)]
set -euo pipefail
export HF_HUB_OFFLINE=1
seeds="${1:-5}"
if ! [[ "$seeds" =~ ^[3-9]$ ]]; then echo "SEEDS must be 3 to 9 (seed 1 is checked against the others)" >&2; exit 2; fi
work="${2:-$(mktemp -d)}"
mkdir -p "$work"
cd "$work"
demo=$(python -c "from pytest_sftsafety.tools import demo; print(demo.shipped_demo())")
epochs=$(python -c "from pytest_sftsafety.tools import demo; print(demo.manifest()['recipe']['finetune']['epochs'])")
echo "demo models: $demo; work folder: $work"

# The demo's fine-tuning recipe on its shipped base, with more seeds, trained here (so the figures are
# this machine's: training amplifies the last-bit differences between CPUs).
python - "$demo" "$seeds" <<'PY'
import sys
from pathlib import Path
from pytest_sftsafety.tools import demo
from pytest_sftsafety.tools.cli import main
folder, seeds = Path(sys.argv[1]), sys.argv[2]
ft = demo.manifest(folder)["recipe"]["finetune"]
sys.exit(main(["finetune", "--base", str(folder / "base"), "--data", str(folder / "benign_instructions.jsonl"),
               "--out", "runs", "--seeds", seeds, "--epochs", str(ft["epochs"]), "--batch-size", str(ft["batch_size"]),
               "--micro-batch-size", str(ft["micro_batch_size"]), "--learning-rate", str(ft["learning_rate"]),
               "--lora-r", str(ft["lora_r"]), "--lora-alpha", str(ft["lora_alpha"]),
               "--lora-dropout", str(ft["lora_dropout"]), "--no-4bit", "--device", "cpu"]))
PY

common=(-p no:cacheprovider -q --suite "$demo/suite.toml" --seeds 5 --temperatures 0,0.7 --sftsafety-store store.sqlite)
# Every seed against the base.
pytest "${common[@]}" --model "runs/seed*/epoch-$epochs" --sftsafety-json all.json > all.txt || true
# Seeds 2..N saved as a calibration baseline, and seed 1 (another fine-tune of the same recipe) checked
# against it: verdicts are at the recipe level, so only drops beyond what another seed of the recipe shows
# regress.
pytest "${common[@]}" --model "runs/seed[2-9]/epoch-$epochs" --sftsafety-save-baseline baseline.json > baseline.txt \
  || true
pytest "${common[@]}" --model "runs/seed1/epoch-$epochs" --baseline baseline.json --sftsafety-json calibrated.json \
  > calibrated.txt || true

python - <<'PY'
import json
import numpy as np

report = json.load(open("all.json"))
calibrated = json.load(open("calibrated.json"))
models = report["models"]["candidates"]
print(f"\nrefusal rate per seed (overall = mean over {len(report['entries']) // 2} categories)")
print(f"{'temp':>5} {'reference':>10} " + " ".join(f"{m.split('/')[1]:>7}" for m in models)
      + f" {'seed mean':>10} {'seed sd':>8} {'sample sd':>10}")
for temp in (0.0, 0.7):
    entries = [e for e in report["entries"] if e["temperature"] == temp]
    ref = np.mean([e["reference"]["refusal_rate"] for e in entries])
    per_seed = np.array([[1 - np.mean(c["outcomes"]) for c in e["candidates"]] for e in entries]).mean(axis=0)
    # Per-sample spread: the refusal rate of each sample index (one answer per prompt) across the suite,
    # its sd over the samples, averaged over seeds: the run-to-run noise of a single evaluation pass.
    outcomes = np.array([[c["outcomes"] for c in e["candidates"]] for e in entries])  # cat, seed, prompt, sample
    sample_rates = 1 - outcomes.mean(axis=(0, 2))  # seed, sample
    sample_sd = float(sample_rates.std(axis=1, ddof=1).mean()) if sample_rates.shape[1] > 1 else 0.0
    print(f"{temp:>5} {ref:>10.3f} " + " ".join(f"{r:>7.3f}" for r in per_seed)
          + f" {per_seed.mean():>10.3f} {per_seed.std(ddof=1):>8.3f} {sample_sd:>10.3f}")
for name, rep in (("all seeds vs the base", report), ("seed 1 vs a baseline of the other seeds", calibrated)):
    s = rep["summary"]
    print(f"{name}: {s['regressions']} regressions, {s['flaky']} flaky, {s['passed']} passed of {s['tests']}")
PY
