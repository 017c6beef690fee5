"""Generation speed on the SORRY-Bench shape, on CPU, measured in one run.

440 prompts x (1 greedy + 5 samples at T=0.7, min-p 0.1), up to 64 new tokens, tiny random
Llama-shaped model. Compares:
  - the project's runtime (one batched pass, shared prefill, per-row seeds) against the naive loop of
    SORRY-Bench's transformers path (one `generate` call per prompt and sample), and checks that the
    greedy answers are identical;
  - a warm re-run served from the result store against the cold run (candidate and reference).

Usage: python ci/bench_generation.py [--naive-fraction F]   (F < 1 times a random subset of the naive
calls and scales it up; the default times them all)
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _bench_models import random_model, sorry_bench_prompt_set, sorry_bench_prompts  # noqa: E402
from readme_blocks import publish  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from pytest_sftsafety.backends import GenRow  # noqa: E402
from pytest_sftsafety.backends.checkpoints import plan_models  # noqa: E402
from pytest_sftsafety.backends.hf import HFBackend  # noqa: E402
from pytest_sftsafety.config import build_config  # noqa: E402
from pytest_sftsafety.seeding import sample_seed  # noqa: E402

SAMPLES, TEMPERATURE, MIN_P, NEW_TOKENS = 5, 0.7, 0.1, 64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--naive-fraction", type=float, default=1.0)
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--skip-naive", action="store_true", help="time the runtime only")
    parser.add_argument("--readme", action="store_true", help="write the figures into README.md's block")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="sftsafety-bench-"))
    model_dir = random_model(work / "model")
    prompts = sorry_bench_prompts()
    values = {"model": [str(model_dir)], "reference": str(model_dir), "max_new_tokens": str(NEW_TOKENS),
              "device": "cpu", "min_p": str(MIN_P), "seeds": str(SAMPLES), "temperatures": f"0,{TEMPERATURE}",
              "batch_size": args.batch_size}
    cfg = build_config(lambda spec: values.get(spec.dest))
    plan = plan_models(cfg.models, cfg.reference, None, False)

    rows = [GenRow(p, 0.0, 0) for p in prompts] + [GenRow(p, TEMPERATURE, sample_seed(0, f"base:{i + 1}", s))
                                                   for i, p in enumerate(prompts) for s in range(SAMPLES)]
    backend = HFBackend(cfg, plan)
    texts: list[str | None] = [None] * len(rows)
    tokens = 0

    def on_batch(indices, outputs, counts):
        nonlocal tokens
        tokens += sum(counts)
        for i, text in zip(indices, outputs, strict=True):
            texts[i] = text

    backend._ensure_checkpoint(plan.candidates[0], "--model", "candidate:0")  # load outside the timing
    start = time.perf_counter()
    backend.generate("candidate:0", rows, on_batch)
    ours = time.perf_counter() - start
    backend.close()
    if args.skip_naive:
        print(f"runtime: {ours:.2f} s ({tokens / ours:,.0f} tokens/s), batch size {args.batch_size}")
        return

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    calls = [(i, p, None) for i, p in enumerate(prompts)] + [
        (len(prompts) + i * SAMPLES + s, p, s) for i, p in enumerate(prompts) for s in range(SAMPLES)]
    timed = calls if args.naive_fraction >= 1 else random.Random(0).sample(calls, int(len(calls) * args.naive_fraction))
    timed_greedy = [c for c in timed if c[2] is None]
    naive_greedy: dict[int, str] = {}
    start = time.perf_counter()
    for index, prompt, sample in timed:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            if sample is None:
                out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
                naive_greedy[index] = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            else:
                torch.manual_seed(sample)
                model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=TEMPERATURE,
                               min_p=MIN_P, top_p=1.0, top_k=0, pad_token_id=tok.pad_token_id)
    naive = (time.perf_counter() - start) * len(calls) / len(timed)
    same = sum(naive_greedy[i] == texts[i] for i, _, _ in timed_greedy)

    from pytest_sftsafety.judges import make_judge
    from pytest_sftsafety.runner import run
    from pytest_sftsafety.store import Store

    prompt_set = sorry_bench_prompt_set()
    cells = [(c.id, t) for c in prompt_set.suite.categories for t in cfg.temperatures]
    store = Store(work / "store.sqlite")
    start = time.perf_counter()
    cold_result = run(cfg, prompt_set, cells, plan, lambda: HFBackend(cfg, plan), make_judge("keyword"), store)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    warm_result = run(cfg, prompt_set, cells, plan, lambda: HFBackend(cfg, plan), make_judge("keyword"), store)
    warm = time.perf_counter() - start
    assert warm_result.stats.generated == 0 and warm_result.stats.model_loads == 0

    print(f"shape: {len(prompts)} prompts x (1 greedy + {SAMPLES} samples at T={TEMPERATURE}, min-p {MIN_P}), "
          f"{NEW_TOKENS} new tokens max; {len(rows)} generations, {tokens} new tokens (runtime)")
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"runtime (batched, shared prefill):  {ours:8.2f} s  ({tokens / ours:,.0f} tokens/s)")
    label = ("naive loop (all calls)" if len(timed) == len(calls)
             else f"naive loop ({len(timed)} of {len(calls)} calls, scaled)")
    print(f"{label}: {naive:8.2f} s")
    print(f"speed-up: {naive / ours:.1f}x   greedy answers identical: {same}/{len(timed_greedy)}")
    print(f"cold run, candidate + reference, generate + judge + store: {cold:.2f} s "
          f"({cold_result.stats.generations} generations)")
    print(f"warm re-run from the store: {warm:.3f} s   speed-up {cold / warm:.0f}x")
    naive_how = "" if len(timed) == len(calls) else f" ({len(timed)} of its {len(calls)} calls timed, scaled)"
    publish("generation", "python ci/bench_generation.py", "\n".join([
        f"| measure (tiny random Llama, CPU, {torch.get_num_threads()} threads) | result |",
        "| --- | --- |",
        f"| SORRY-Bench shape: {len(prompts)} prompts x (greedy + {SAMPLES} samples at T={TEMPERATURE}, min-p "
        f"{MIN_P}), {NEW_TOKENS} new tokens | {ours:.1f} s batched vs {naive:.1f} s for one `generate` call per "
        f"prompt and sample{naive_how}: **{naive / ours:.1f}x**; greedy answers identical "
        f"{same}/{len(timed_greedy)} |",
        f"| warm re-run from the store vs cold run (candidate + reference, generate + judge), inside one process | "
        f"{warm:.3f} s vs {cold:.2f} s: **{cold / warm:.0f}x** |",
    ]), args.readme)


if __name__ == "__main__":
    main()
