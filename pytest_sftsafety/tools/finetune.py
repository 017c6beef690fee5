"""The fine-tuning harness: LoRA fine-tunes of a base model on benign instruction data, several seeds,
a checkpoint per epoch, following the recipe of Fraser et al. (2025), "Fine-Tuning Lowers Safety and
Disrupts Evaluation Consistency": LoRA on a 4-bit base, batch 64, learning rate 2e-5, 8-bit AdamW, 5
epochs, 5 seeds, on Alpaca or Dolly with safety-related examples removed (as in Qi et al. 2024).

Output, one folder per seed and epoch, each a LoRA adapter with its tokenizer that ``pytest --model``
loads directly::

    OUT/recipe.json                     the recipe and the data it saw
    OUT/seed1/epoch-1/ ... epoch-5/     adapter_config.json, adapter_model.safetensors, tokenizer,
                                        training_state.pt (optimizer and random state, for resuming)
    OUT/seed1/run.json                  losses per epoch, examples, optimizer, versions, wall time

An interrupted run resumes from the last complete epoch of each seed, with the same result as an
uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError, first_line
from ..progress import Heartbeat

# Phrases that mark an example as safety-related (refusals, safety talk, harmful topics); a filtered run
# drops every example whose prompt or answer contains one, in the spirit of Qi et al. (2024).
SAFETY_PHRASES = (
    "i'm sorry", "i am sorry", "i apologize", "as an ai", "as a language model", "i cannot", "i can't",
    "i can not", "i'm not able to", "i am not able to", "i won't", "not appropriate", "inappropriate",
    "unethical", "illegal", "harmful", "dangerous", "offensive", "violence", "violent", "weapon", "weapons",
    "explosive", "explosives", "bomb", "drug", "drugs", "suicide", "self-harm", "kill", "kills", "killing",
    "murder", "hate", "hatred", "racist", "sexist", "abuse", "terror", "terrorism", "terrorist", "steal",
    "stealing", "fraud", "hack", "hacking", "porn", "pornography", "sexually explicit",
)
FORMATS = {"alpaca": ("instruction", "input", "output"), "dolly": ("instruction", "context", "response")}


@dataclass(frozen=True)
class Recipe:
    base: str
    data: str
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    epochs: int = 5
    batch_size: int = 64
    micro_batch_size: int = 8
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    load_in_4bit: bool = True
    max_examples: int | None = None
    max_length: int = 512
    filter_safety: bool = False
    data_format: str = "auto"
    device: str = "auto"

    def check(self) -> None:
        if not self.seeds:
            raise ConfigError("--seeds: give at least 1")
        for name in ("epochs", "batch_size", "micro_batch_size", "lora_r", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size "
                              f"{self.micro_batch_size}; choose sizes that divide")
        if not 0 <= self.weight_decay < 1:
            raise ConfigError(f"--weight-decay {self.weight_decay}: use a value in [0, 1)")
        if not 0 < self.learning_rate < 1:
            raise ConfigError(f"--learning-rate {self.learning_rate}: use a value in (0, 1), e.g. 2e-5")
        if self.data_format not in ("auto", *FORMATS):
            raise ConfigError(f"--format {self.data_format}: use auto, alpaca or dolly")


@dataclass
class Examples:
    pairs: list[tuple[str, str]]
    data_format: str
    sha256: str
    rows: int
    dropped_by_filter: int = 0
    dropped_empty: int = 0
    source: str = ""
    notes: list[str] = field(default_factory=list)


def read_rows(source: str) -> tuple[list[dict], str]:
    """Rows of a local JSONL, JSON (a list), CSV or parquet file, or of a hub dataset's train split."""
    from ..data import _decode, _rows_jsonl, _rows_parquet, check_rows

    path = Path(source)
    if path.is_file():
        raw = path.read_bytes()
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            rows = [record for _, record in _rows_parquet(raw, path)]
        elif suffix == ".jsonl":
            rows = [record for _, record in _rows_jsonl(_decode(raw, path), path, "example")]
        elif suffix == ".json":
            try:
                rows = json.loads(_decode(raw, path))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); fix the file") from None
            except RecursionError:
                raise DataError(f"{path}: JSON nested too deeply to read; give a list of flat examples") from None
            check_rows(rows if isinstance(rows, list) else [rows], path)
        elif suffix == ".csv":
            import csv
            import io

            rows = list(csv.DictReader(io.StringIO(_decode(raw, path))))
        else:
            raise DataError(f"{path}: unknown file type '{suffix}'; use .jsonl, .json, .csv or .parquet")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: expected a list of records with instruction/output fields")
        return rows, hashlib.sha256(raw).hexdigest()
    if path.exists() or "/" not in source or source.startswith((".", "/")):
        raise DataError(f"--data {source}: no such file; give a .jsonl/.json/.csv/.parquet file or a hub "
                        f"dataset id such as tatsu-lab/alpaca")
    try:
        import datasets

        table = datasets.load_dataset(source, split="train")
    except Exception as exc:
        first = first_line(exc)
        raise DataError(f"--data {source}: the hub dataset cannot be loaded ({first}); download it on a machine "
                        f"that is online and pass the file") from None
    rows = table.to_list()
    return rows, hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def detect_format(rows: Sequence[dict], wanted: str = "auto") -> str:
    columns = set(rows[0]) if rows else set()
    if wanted != "auto":
        needed = {FORMATS[wanted][0], FORMATS[wanted][2]}
        if not needed <= columns:
            raise DataError(f"--format {wanted} needs columns {sorted(needed)}; the data has {sorted(columns)}")
        return wanted
    for name, (instruction, _, answer) in FORMATS.items():
        if {instruction, answer} <= columns:
            return name
    raise DataError(f"the data has columns {sorted(columns)}; expected Alpaca (instruction, input, output) or "
                    f"Dolly (instruction, context, response)")


def is_safety_related(text: str, phrases: Sequence[str] = SAFETY_PHRASES) -> bool:
    """Whether any phrase occurs as whole words ("hate" in "I hate", not in "whatever")."""
    pattern = _phrase_pattern(tuple(phrases))
    return pattern.search(text.lower().replace("\u2019", "'")) is not None


@functools.lru_cache(maxsize=8)
def _phrase_pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(rf"(?<!\w){re.escape(p)}(?!\w)" for p in phrases))


def load_examples(recipe: Recipe, phrases: Sequence[str] = SAFETY_PHRASES) -> Examples:
    """(prompt, answer) pairs: the instruction with its input/context after a blank line, and the answer;
    empty ones dropped, safety-related ones too when the recipe filters, then the first max_examples."""
    rows, digest = read_rows(recipe.data)
    if not rows:
        raise DataError(f"--data {recipe.data}: no examples")
    data_format = detect_format(rows, recipe.data_format)
    instruction_key, extra_key, answer_key = FORMATS[data_format]
    examples = Examples(pairs=[], data_format=data_format, sha256=digest, rows=len(rows), source=recipe.data)
    for row in rows:
        instruction = str(row.get(instruction_key) or "").strip()
        extra = str(row.get(extra_key) or "").strip()
        answer = str(row.get(answer_key) or "").strip()
        if not instruction or not answer:
            examples.dropped_empty += 1
            continue
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        if recipe.filter_safety and is_safety_related(f"{prompt}\n{answer}", phrases):
            examples.dropped_by_filter += 1
            continue
        examples.pairs.append((prompt, answer))
    if recipe.max_examples is not None:
        examples.pairs = examples.pairs[:recipe.max_examples]
    if not examples.pairs:
        raise DataError(f"--data {recipe.data}: no examples left after dropping empty and filtered ones")
    return examples


def encode_examples(tokenizer, pairs: Sequence[tuple[str, str]],
                    max_length: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per example, loss on the answer only, in the format evaluation uses."""
    from ..backends import prompt_ids

    encoded = []
    for prompt, answer in pairs:
        head_ids = prompt_ids(tokenizer, prompt)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (head_ids + answer_ids)[:max_length]
        labels = ([-100] * len(head_ids) + answer_ids)[:max_length]
        if any(label != -100 for label in labels):
            encoded.append((ids, labels))
    return encoded


def _optimizer(params, recipe: Recipe, device: str, notice: Callable[[str], None]):
    import torch

    if device.startswith("cuda"):
        try:
            import bitsandbytes as bnb

            return (bnb.optim.AdamW8bit(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay),
                    "AdamW8bit (bitsandbytes)")
        except ImportError:
            notice("bitsandbytes is not installed: using torch AdamW instead of 8-bit AdamW")
    else:
        notice("8-bit AdamW needs CUDA: using torch AdamW on CPU (same update rule, full-precision state)")
    return torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay), "AdamW (torch)"


def _load_model(recipe: Recipe, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.bfloat16 if device.startswith("cuda") else torch.float32}
    if recipe.load_in_4bit:
        from ..backends.hf import nf4_config

        kwargs["quantization_config"] = nf4_config(kwargs["dtype"], "4-bit loading needs bitsandbytes: pip install "
                                                                    "'pytest-sftsafety[quant]', or pass --no-4bit")
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(recipe.base, **kwargs)
    except Exception as exc:
        first = first_line(exc)
        raise ConfigError(f"--base {recipe.base}: cannot load the model ({first})") from None
    if not recipe.load_in_4bit:
        model.to(device)
    if recipe.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def _complete(epoch_dir: Path) -> bool:
    return all((epoch_dir / name).is_file() for name in
               ("adapter_config.json", "adapter_model.safetensors", "training_state.pt"))


def finetune(recipe: Recipe, out: Path, notice: Callable[[str], None] | None = None,
             phrases: Sequence[str] = SAFETY_PHRASES) -> list[Path]:
    """Train every seed of the recipe; return the final epoch's adapter folder of each seed. While it
    trains, ``notice`` gets a line at least every 10 s."""
    from transformers import AutoTokenizer

    from ..backends.hf import pick_device

    recipe.check()
    notice = notice or (lambda message: print(f"sftsafety finetune: {message}", file=sys.stderr))
    told: set[str] = set()

    def once(message: str) -> None:
        if message not in told:
            told.add(message)
            notice(message)

    examples = load_examples(recipe, phrases)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # What must match for checkpoints to belong together: all of the recipe but the seeds (each seed is its own
    # run, so more can be added later) and the device (the optimizer actually used is checked on resume).
    shared = {k: v for k, v in asdict(recipe).items() if k not in ("seeds", "device")}
    if recipe.filter_safety:
        shared["filter_phrases_sha256"] = hashlib.sha256("\n".join(phrases).encode()).hexdigest()
    recipe_record = {"recipe": shared, "data": {"sha256": examples.sha256, "format": examples.data_format,
                                                         "rows": examples.rows, "examples": len(examples.pairs),
                                                         "dropped_by_safety_filter": examples.dropped_by_filter,
                                                         "dropped_empty": examples.dropped_empty}}
    recipe_record = json.loads(json.dumps(recipe_record))  # as it reads back (tuples become lists)
    recipe_file = out / "recipe.json"
    trained = any(_complete(epoch) for epoch in out.glob("seed*/epoch-*"))
    if trained and recipe_file.is_file():
        previous = json.loads(recipe_file.read_text(encoding="utf-8"))
        if previous != recipe_record:
            raise ConfigError(f"{out} holds checkpoints of another recipe or data (see {recipe_file}); choose a new "
                              f"--out")
    recipe_file.write_text(json.dumps(recipe_record, indent=2) + "\n", encoding="utf-8")

    try:
        tokenizer = AutoTokenizer.from_pretrained(recipe.base)
    except Exception as exc:
        first = first_line(exc)
        raise ConfigError(f"--base {recipe.base}: cannot load its tokenizer ({first})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = encode_examples(tokenizer, examples.pairs, recipe.max_length)
    device = pick_device(recipe.device)
    accumulation = recipe.batch_size // recipe.micro_batch_size
    with Heartbeat(notice, "training") as beat:
        return [_train_seed(recipe, seed, out, tokenizer, encoded, device, accumulation, once, beat)
                for seed in recipe.seeds]


def _train_seed(recipe: Recipe, seed: int, out: Path, tokenizer, encoded, device: str, accumulation: int,
                once: Callable[[str], None], beat: Heartbeat) -> Path:
    """One seed's run, resumed after its last complete epoch; returns its final epoch's folder."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    seed_dir = out / f"seed{seed}"
    final = seed_dir / f"epoch-{recipe.epochs}"
    if _complete(final) and (seed_dir / "run.json").is_file():
        return final  # done (a complete last epoch without its record is picked up below, training nothing)
    started = time.perf_counter()
    beat.status = f"seed {seed}: loading the base model"
    torch.manual_seed(seed)
    model = get_peft_model(_load_model(recipe, device), LoraConfig(
        r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
        target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, optimizer_name = _optimizer(params, recipe, device, once)
    history: list[dict] = []
    first_epoch = 1
    done = [e for e in range(recipe.epochs, 0, -1) if _complete(seed_dir / f"epoch-{e}")]
    if done:  # resume after the last complete epoch
        last = seed_dir / f"epoch-{done[0]}"
        set_peft_model_state_dict(model, load_file(str(last / "adapter_model.safetensors")))
        state = torch.load(last / "training_state.pt", weights_only=True)  # tensors and plain data only: no code
        if state.get("optimizer_name", optimizer_name) != optimizer_name:
            raise ConfigError(f"{last} was trained with {state['optimizer_name']}, this machine would continue "
                              f"with {optimizer_name}; resume where it started, or choose a new --out")
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history = state["history"]
        first_epoch = done[0] + 1
    model.train()
    for epoch in range(first_epoch, recipe.epochs + 1):
        order = list(range(len(encoded)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        steps = math.ceil(len(order) / recipe.batch_size)
        losses = []
        for step in range(steps):
            beat.status = (f"seed {seed}, epoch {epoch}/{recipe.epochs}, step {step + 1}/{steps}"
                           + (f", loss {losses[-1]:.3f}" if losses else ""))
            batch = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            micro = [batch[i:i + recipe.micro_batch_size] for i in range(0, len(batch), recipe.micro_batch_size)]
            targets = sum(sum(label != -100 for label in encoded[i][1][1:]) for i in batch)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for part in micro:
                loss = _summed_loss(model, tokenizer, [encoded[i] for i in part], device) / max(targets, 1)
                loss.backward()
                total += float(loss.detach())
            optimizer.step()
            losses.append(total)
        history.append({"epoch": epoch, "steps": steps, "mean_loss": sum(losses) / len(losses),
                        "last_loss": losses[-1]})
        epoch_dir = seed_dir / f"epoch-{epoch}"
        _save_epoch(model, tokenizer, epoch_dir, recipe.base, optimizer, optimizer_name, history)
    model.eval()
    record = {"seed": seed, "device": device, "optimizer": optimizer_name, "accumulation_steps": accumulation,
              "examples": len(encoded), "history": history, "seconds": round(time.perf_counter() - started, 3),
              "versions": _versions()}
    (seed_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return final


def _summed_loss(model, tokenizer, part: Sequence[tuple[list[int], list[int]]], device: str):
    """Cross-entropy summed over answer tokens, so gradient accumulation weighs every token alike."""
    import torch

    width = max(len(ids) for ids, _ in part)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in part], device=device)
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in part], device=device)
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in part], device=device)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum")


def _save_epoch(model, tokenizer, epoch_dir: Path, base: str, optimizer, optimizer_name: str,
                history: list[dict]) -> None:
    """Adapter, tokenizer and training state, written to a temporary folder and renamed into place, so a
    folder that exists is complete."""
    import shutil

    import torch


    partial = epoch_dir.with_name(epoch_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    torch.save({"optimizer": optimizer.state_dict(), "optimizer_name": optimizer_name,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "history": history}, partial / "training_state.pt")
    if Path(base).is_dir():  # relative to the partial folder, which sits beside the final one: the same path
        record_relative_base(partial, Path(base))
    shutil.rmtree(epoch_dir, ignore_errors=True)
    os.replace(partial, epoch_dir)


def record_relative_base(adapter_dir: Path, base_dir: Path) -> None:
    """Record the base relative to the adapter, so the pair can be moved or copied together."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = os.path.relpath(base_dir.resolve(), adapter_dir.resolve())
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "pytest-sftsafety"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
