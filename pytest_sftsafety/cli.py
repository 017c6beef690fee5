"""The ``sftsafety`` command: tools around the pytest plugin."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import SftSafetyError


def _finetune_parser(sub) -> None:
    from .finetune import Recipe

    defaults = Recipe(base="", data="")
    p = sub.add_parser("finetune", help="LoRA fine-tunes of a base model on benign instruction data, several "
                                        "seeds, a checkpoint per epoch (the paper's recipe by default)")
    p.add_argument("--base", required=True, help="base model: a folder or a hub id")
    p.add_argument("--data", required=True, help="Alpaca (instruction/input/output) or Dolly "
                                                 "(instruction/context/response) data: .jsonl, .json, .csv, "
                                                 ".parquet or a hub dataset id")
    p.add_argument("--out", required=True, type=Path, help="folder for seed*/epoch-*/ adapters")
    p.add_argument("--seeds", type=int, default=len(defaults.seeds), help="train seeds 1..N (default 5)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs, a checkpoint each (default 5)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="examples per step (default 64)")
    p.add_argument("--micro-batch-size", type=int, default=defaults.micro_batch_size,
                   help="examples per forward pass; the rest is gradient accumulation (default 8)")
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="default 2e-5")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay (default 0)")
    p.add_argument("--lora-r", type=int, default=defaults.lora_r, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha, help="LoRA alpha (default 32)")
    p.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout, help="default 0.05")
    p.add_argument("--no-4bit", action="store_true", help="train on a full-precision base (default: 4-bit nf4)")
    p.add_argument("--max-examples", type=int, default=None, help="use the first N examples (the paper: 14624)")
    p.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per example (default 512)")
    p.add_argument("--filter-safety", action="store_true",
                   help="drop examples whose prompt or answer contains a safety-related phrase")
    p.add_argument("--filter-phrases", type=Path, help="your own phrase list for the filter (one per line, matched "
                                                          "as whole words); implies --filter-safety")
    p.add_argument("--format", default="auto", choices=("auto", "alpaca", "dolly"), help="data format")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")


def _run_finetune(args: argparse.Namespace) -> int:
    from .finetune import SAFETY_PHRASES, Recipe, finetune

    phrases = SAFETY_PHRASES
    if args.filter_phrases:
        args.filter_safety = True  # a phrase list asks for the filter
        try:
            phrases = tuple(line.strip().lower() for line in args.filter_phrases.read_text(encoding="utf-8")
                            .splitlines() if line.strip())
        except OSError as exc:
            raise SftSafetyError(f"--filter-phrases {args.filter_phrases}: {exc.strerror or exc}") from None
    if args.seeds < 1:
        raise SftSafetyError(f"--seeds {args.seeds}: give at least 1")
    recipe = Recipe(base=args.base, data=args.data, seeds=tuple(range(1, args.seeds + 1)), epochs=args.epochs,
                    batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                    learning_rate=args.learning_rate, weight_decay=args.weight_decay, lora_r=args.lora_r,
                    lora_alpha=args.lora_alpha,
                    lora_dropout=args.lora_dropout, load_in_4bit=not args.no_4bit, max_examples=args.max_examples,
                    max_length=args.max_length, filter_safety=args.filter_safety, data_format=args.format,
                    device=args.device)
    finals = finetune(recipe, args.out, phrases=phrases)
    print(f"trained {len(finals)} seed(s); evaluate with:\n  pytest --model '{args.out}/seed*/epoch-{args.epochs}'")
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="build the demo models (once) and run `pytest --model demo --seeds 5` on "
                                    "them; other arguments (e.g. --sftsafety-json r.json, -q) go to pytest")
    p.set_defaults(pytest_args=[])


def _run_demo(args: argparse.Namespace) -> int:
    import tempfile

    import pytest

    from . import demo

    folder = demo.demo_dir(build=True, notice=lambda message: print(f"sftsafety demo: {message}", file=sys.stderr,
                                                                        flush=True))
    extra = [a for a in args.pytest_args if a != "--"]
    defaults = [] if any(a.startswith("--seeds") for a in extra) else ["--seeds", "5"]
    # Rooted in an empty folder, so pytest collects the demo suite and nothing of the current project
    # (relative paths in the options still mean the current folder); the store lives with the demo
    # models, so a second run takes every answer from it.
    with tempfile.TemporaryDirectory(prefix="sftsafety-demo-") as empty:
        ini = Path(empty) / "pytest.ini"
        ini.write_text("[pytest]\n", encoding="utf-8")
        # The checkpoints by path: a folder named demo in the current directory must not stand in for them.
        models = [arg for checkpoint in demo.checkpoints(folder) for arg in ("--model", checkpoint)]
        return int(pytest.main(["-c", str(ini), "--rootdir", empty, *models, "--suite", str(folder / "suite.toml"),
                                *defaults, "-p",
                                "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning",
                                "--sftsafety-store", str(folder / "store.sqlite"), *extra, empty]))


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="sftsafety", description="pytest-sftsafety tools")
    sub = parser.add_subparsers(dest="command", required=True)
    _finetune_parser(sub)
    _demo_parser(sub)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.pytest_args = rest  # demo: everything else goes to pytest
    try:
        import warnings

        warnings.simplefilter("ignore", FutureWarning)  # deprecation chatter from the model libraries
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one weight-loading bar per seed is noise here
        return {"finetune": _run_finetune, "demo": _run_demo}[args.command](args)
    except SftSafetyError as exc:
        print(f"sftsafety {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sftsafety {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
