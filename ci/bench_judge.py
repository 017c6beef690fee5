"""Throughput of the SORRY-Bench judge: one forward pass per batch (logits mode) against greedy decoding
parsed as SORRY-Bench parses it (decode mode), on a tiny Mistral-shaped stand-in trained to the judge's
prompt. Both modes score the same answers; the script checks that they agree and prints the ratio.

    python ci/bench_judge.py [--answers 512] [--batch-sizes 8,32]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_sftsafety.judges.sorry_bench import SorryBenchJudge  # noqa: E402
from pytest_sftsafety.suite import load_suite  # noqa: E402
from pytest_sftsafety.tools import toy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=512)
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--readme", action="store_true", help="write the figures into README.md's block")
    args = parser.parse_args()
    ratios, agreement = [], []
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    questions = [r["turns"][0] for r in toy.placeholder_questions(load_suite("sorry_bench_202503"))]
    rng = random.Random(0)
    answers = list(toy.JUDGE_REFUSALS) + list(toy.JUDGE_COMPLIANCES)
    prompts = [rng.choice(questions) for _ in range(args.answers)]
    # Answers of a few sentences, as models write them.
    responses = [" ".join(rng.choice(answers) for _ in range(rng.randint(1, 4))) for _ in range(args.answers)]
    with tempfile.TemporaryDirectory() as tmp:
        built = time.perf_counter()
        folder = toy.build_judge_standin(Path(tmp) / "judge", questions[::20], seed=0)
        print(f"stand-in judge trained in {time.perf_counter() - built:.1f} s; {args.answers} answers, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"{'batch':>6} {'logits s':>9} {'decode s':>9} {'answers/s (logits)':>19} {'ratio':>6} {'agree':>6}")
        for size in (int(b) for b in args.batch_sizes.split(",")):
            seconds, scores = {}, {}
            for mode in ("logits", "decode"):
                judge = SorryBenchJudge(str(folder), mode=mode, device="cpu", batch_size=size)
                judge.score(prompts[:size], responses[:size])  # load and warm up outside the timing
                started = time.perf_counter()
                scores[mode] = judge.score(prompts, responses)
                seconds[mode] = time.perf_counter() - started
            agree = sum(a == b for a, b in zip(scores["logits"], scores["decode"], strict=True)) / args.answers
            print(f"{size:>6} {seconds['logits']:>9.2f} {seconds['decode']:>9.2f} "
                  f"{args.answers / seconds['logits']:>19.0f} {seconds['decode'] / seconds['logits']:>5.2f}x "
                  f"{agree:>6.1%}")
            ratios.append(seconds["decode"] / seconds["logits"])
            agreement.append(agree)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from readme_blocks import publish

    agree_text = "the modes agree on every answer" if min(agreement) == 1 else \
        f"the modes agree on {min(agreement):.1%} of the answers"
    publish("judge-modes", "python ci/bench_judge.py",
            f"On such a stand-in (CPU, {args.answers} answers, batch sizes {args.batch_sizes}), logits mode is "
            f"{min(ratios):.2f}x to {max(ratios):.2f}x as fast as decoding, since the judge answers in one or two "
            f"tokens and reading its long prompt dominates; {agree_text}, and logits mode cannot be unparsable.",
            args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
