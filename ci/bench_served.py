"""Throughput of --backend openai against a local server, at 1, 8 and 32 requests in flight, measured in one run.

The server is tests/chat_server.py (the project's transformers backend behind an OpenAI-compatible API,
batching the requests that arrive together, as vLLM does) serving a random 4-layer Llama-shaped model and a
LoRA adapter on it. Each level sends the same rows (SORRY-Bench-shaped prompts at T=0.7 with their own
seeds, up to --tokens new tokens each) and checks that the answers are identical at every level: batching
on the server changes throughput, never an answer. For comparison, the same rows in this process with the
transformers backend.

Usage: python ci/bench_served.py [--rows 192] [--tokens 32] [--levels 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "ci"), str(ROOT)]
from _bench_models import random_model, sorry_bench_prompts  # noqa: E402

from pytest_sftsafety.backends import GenRow  # noqa: E402
from pytest_sftsafety.backends.served import OpenAIBackend, plan_served  # noqa: E402
from pytest_sftsafety.config import RunConfig  # noqa: E402
from pytest_sftsafety.seeding import sample_seed  # noqa: E402
from tests.chat_server import launch  # noqa: E402


def start_server(model: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    try:
        process, port = launch(["--base", str(model), "--lora", f"tuned={model / 'adapter'}", "--max-batch",
                                str(max_batch)])
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    return process, f"http://127.0.0.1:{port}"


def run_level(url: str, concurrency: int, rows: list[GenRow], tokens: int) -> tuple[float, list[str], int]:
    cfg = RunConfig(models=("tuned",), reference="base", backend="openai", endpoint=f"{url}/v1",
                    concurrency=concurrency, max_new_tokens=tokens)
    backend = OpenAIBackend(cfg, plan_served(cfg))
    backend.seed_check = "skipped"  # measured: the generation alone
    texts = [""] * len(rows)
    produced = 0

    def on_batch(indices, answers, counts):
        nonlocal produced
        for index, text in zip(indices, answers, strict=True):
            texts[index] = text
        produced += sum(counts)

    started = time.perf_counter()
    backend.generate("candidate:0", rows, on_batch)
    return time.perf_counter() - started, texts, produced


def run_in_process(model: Path, rows: list[GenRow], tokens: int) -> tuple[float, list[str]]:
    from pytest_sftsafety.backends.checkpoints import plan_models
    from pytest_sftsafety.backends.hf import HFBackend

    cfg = RunConfig(models=(str(model / "adapter"),), device="cpu", max_new_tokens=tokens)
    backend = HFBackend(cfg, plan_models(cfg.models, None, None, False))
    backend.generate("candidate:0", rows[:4], lambda *_: None)  # load and warm up
    texts = [""] * len(rows)

    def on_batch(indices, answers, counts):
        for index, text in zip(indices, answers, strict=True):
            texts[index] = text

    started = time.perf_counter()
    backend.generate("candidate:0", rows, on_batch)
    return time.perf_counter() - started, texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--readme", action="store_true", help="write the figures into README.md's block")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    prompts = sorry_bench_prompts()
    rows = [GenRow(prompts[i % len(prompts)], 0.7, sample_seed(0, str(i), 0)) for i in range(args.rows)]
    with tempfile.TemporaryDirectory() as tmp:
        model = random_model(Path(tmp) / "model", hidden=128, layers=4, adapter=True)
        server, url = start_server(model, max(levels))
        try:
            run_level(url, 4, rows[:8], args.tokens)  # warm-up
            results = {level: run_level(url, level, rows, args.tokens) for level in levels}
            with urllib.request.urlopen(f"{url}/stats", timeout=10) as response:
                stats = json.loads(response.read())
        finally:
            server.terminate()
            server.wait(30)
        local_seconds, local_texts = run_in_process(model, rows, args.tokens)
    first = results[levels[0]]
    print(f"--backend openai against tests/chat_server.py: {args.rows} answers at T=0.7, up to {args.tokens} "
          f"new tokens, random 4-layer 128-wide Llama + LoRA adapter, CPU")
    print(f"{'concurrency':>11}  {'seconds':>8}  {'answers/s':>9}  {'tokens/s':>8}  {'vs 1':>6}  same answers")
    for level in levels:
        seconds, texts, produced = results[level]
        print(f"{level:>11}  {seconds:>8.2f}  {args.rows / seconds:>9.1f}  {produced / seconds:>8.0f}  "
              f"{first[0] / seconds:>5.2f}x  {texts == first[1]}")
    print(f"{'in-process':>11}  {local_seconds:>8.2f}  {args.rows / local_seconds:>9.1f}  {'':>8}  "
          f"{first[0] / local_seconds:>5.2f}x  {local_texts == first[1]}   (--backend transformers, same rows)")
    print(f"server: {stats['requests']} requests, largest batch {stats['largest_batch']}, most in flight "
          f"{stats['max_in_flight']}")
    if any(results[level][1] != first[1] for level in levels) or local_texts != first[1]:
        raise SystemExit("answers changed with the concurrency or the backend")
    from readme_blocks import publish

    table = ["| requests in flight | seconds | answers/s | vs 1 |", "| --- | --- | --- | --- |"]
    table += [f"| {level} | {results[level][0]:.2f} | {args.rows / results[level][0]:.1f} | "
              f"{first[0] / results[level][0]:.2f}x |" for level in levels]
    publish("served", "python ci/bench_served.py", "\n".join(table) + (
        f"\n\n{args.rows} answers at T=0.7, up to {args.tokens} new tokens, on {os.cpu_count()} cores. The answers "
        f"were identical at every level, and identical to the transformers backend's for the same rows in this "
        f"process ({local_seconds:.2f} s there: one batched pass with a shared prefill and no HTTP). The server's "
        f"largest batch was {stats['largest_batch']} requests, with at most {stats['max_in_flight']} in flight."),
        args.readme)


if __name__ == "__main__":
    main()
