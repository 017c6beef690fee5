"""Shared set-up for the benchmark scripts: a tokenizer and random Llama-shaped models, built offline."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pytest_sftsafety.suite import load_suite  # noqa: E402
from pytest_sftsafety.tools import toy  # noqa: E402
from pytest_sftsafety.tools.finetune import record_relative_base  # noqa: E402


def sorry_bench_prompts() -> list[str]:
    """440 placeholder prompts in the SORRY-Bench 2025-03 shape."""
    return [row["turns"][0] for row in toy.placeholder_questions(load_suite("sorry_bench_202503"))]


def sorry_bench_prompt_set():
    """The same prompts as a validated-shape prompt set of the 2025-03 suite, for the runner."""
    from pytest_sftsafety.suite import Prompt, PromptSet

    suite = load_suite("sorry_bench_202503")
    prompts = tuple(Prompt(i + 1, i // 10 + 1, text) for i, text in enumerate(sorry_bench_prompts()))
    return PromptSet(suite=suite, prompts=prompts, source="placeholder", sha256="", prompt_style="base")


def random_model(out_dir: Path, hidden: int = 64, layers: int = 2, adapter: bool = False) -> Path:
    """A random Llama-shaped model (varied outputs, rare end-of-sequence) with a trained BPE tokenizer,
    and optionally a LoRA adapter with non-zero weights in ``out_dir/adapter``."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    tokenizer = toy.train_tokenizer(sorry_bench_prompts() + toy.benign_prompts(200), out_dir)
    model = toy.new_model(tokenizer, hidden=hidden, layers=layers, seed=0, init_std=0.2)
    model.save_pretrained(out_dir)
    if adapter:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "v_proj"])
        get_peft_model(model, lora).save_pretrained(out_dir / "adapter")
        record_relative_base(out_dir / "adapter", out_dir)
    return out_dir
