"""The ``sftsafety`` command: tools around the pytest plugin."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import SftSafetyError, one_line, printable


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
    p = sub.add_parser("demo", help="run `pytest --model demo --seeds 5` (the shipped demo models) outside the "
                                    "current project; other arguments (e.g. --sftsafety-json r.json, -q) go to "
                                    "pytest")
    p.set_defaults(pytest_args=[])


def _run_demo(args: argparse.Namespace) -> int:
    import tempfile

    import pytest

    from . import demo

    folder = demo.shipped_demo()
    extra = [a for a in args.pytest_args if a != "--"]
    defaults = [] if any(a.startswith("--seeds") for a in extra) else ["--seeds", "5"]
    store = demo.store_path()
    store.parent.mkdir(parents=True, exist_ok=True)
    # Rooted in an empty folder, so pytest collects the demo suite and nothing of the current project
    # (relative paths in the options still mean the current folder); the store lives in the cache, so a
    # second run takes every answer from it.
    with tempfile.TemporaryDirectory(prefix="sftsafety-demo-") as empty:
        ini = Path(empty) / "pytest.ini"
        ini.write_text("[pytest]\n", encoding="utf-8")
        # The checkpoints by path: a folder named demo in the current directory must not stand in for them.
        models = [arg for checkpoint in demo.checkpoints(folder) for arg in ("--model", checkpoint)]
        status = int(pytest.main(["-c", str(ini), "--rootdir", empty, *models, "--suite", str(folder / "suite.toml"),
                                  *defaults, "-p", "no:cacheprovider", "-W",
                                  "ignore::pytest.PytestAssertRewriteWarning", "--sftsafety-store", str(store),
                                  *extra, empty]))
    if status in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        print("\n".join(demo.closing_lines(status)))
    return status


def _judge_agreement_parser(sub) -> None:
    from ..judges import JudgeOptions

    defaults = JudgeOptions()
    p = sub.add_parser("judge-agreement", help="how well a refusal judge agrees with human labels: Cohen's kappa, "
                                               "accuracy, sensitivity, specificity and the confusion matrix")
    p.add_argument("--judge", required=True, help="keyword, learned, sorry-bench[:PATH] or api:MODEL")
    p.add_argument("--labels", required=True, type=Path, action="append",
                   help="labelled responses (.csv, .jsonl, .json, .parquet): XSTest completion files as they are, "
                        "SORRY-Bench human judgments, or prompt/response/label columns; repeatable")
    p.add_argument("--questions", type=Path, help="SORRY-Bench question file, for human-judgment rows without "
                                                  "their prompt")
    p.add_argument("--json", type=Path, help="also write the figures as JSON (input for pytest --judge-error)")
    p.add_argument("--by-source", action="store_true", help="a row per model that wrote the responses, too")
    p.add_argument("--judge-mode", default=defaults.judge_mode, choices=("logits", "decode"),
                   help="sorry-bench judge: logits (default) or decode")
    p.add_argument("--judge-4bit", action="store_true", help="sorry-bench judge: load in 4-bit nf4")
    p.add_argument("--judge-batch-size", type=int, default=defaults.judge_batch_size, help="default 8")
    p.add_argument("--judge-endpoint", help="api judge: base URL (default $OPENAI_BASE_URL)")
    p.add_argument("--judge-api-key-env", default=defaults.judge_api_key_env,
                   help="api judge: environment variable with the key (default OPENAI_API_KEY)")
    p.add_argument("--judge-concurrency", type=int, default=defaults.judge_concurrency, help="api judge: default 8")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")


def _run_judge_agreement(args: argparse.Namespace) -> int:
    import hashlib
    import time

    from tabulate import tabulate

    from ..config import check_judge
    from ..judges import JudgeOptions, make_judge
    from .agreement import agreement, read_labels

    if args.judge_batch_size < 1 or args.judge_concurrency < 1:
        raise SftSafetyError("--judge-batch-size and --judge-concurrency must be at least 1")
    check_judge(args.judge)
    rows = [row for path in args.labels for row in read_labels(path, args.questions)]
    judge = make_judge(args.judge, JudgeOptions(
        judge_mode=args.judge_mode, judge_4bit=args.judge_4bit, judge_batch_size=args.judge_batch_size,
        judge_endpoint=args.judge_endpoint, judge_api_key_env=args.judge_api_key_env,
        judge_concurrency=args.judge_concurrency, device=args.device))
    started = time.perf_counter()
    scores = judge.score([r.prompt for r in rows], [r.response for r in rows])
    seconds = time.perf_counter() - started
    groups = {"all": list(range(len(rows)))}
    if args.by_source:
        for index, row in enumerate(rows):
            groups.setdefault(row.source or "?", []).append(index)
    results = {name: agreement([rows[i].label for i in idx], [scores[i] for i in idx]) for name, idx in groups.items()}

    def ci(pair: tuple[float, float]) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    table = [[printable(one_line(name)), a.rows, a.unparsable, f"{a.kappa:.3f} {ci(a.kappa_interval)}",
              f"{a.accuracy:.3f}",
              f"{a.sensitivity:.3f} {ci(a.sensitivity_interval)}", f"{a.specificity:.3f} {ci(a.specificity_interval)}"]
             for name, a in results.items()]
    print(printable(f"judge {judge.id} on {', '.join(str(p) for p in args.labels)} ({len(rows)} rows, "
                    f"{seconds:.1f} s)"))
    print("1 = fulfils the request (positive), 0 = refuses; sensitivity: fulfilments recognised, specificity: "
          "refusals recognised; 95% intervals")
    print(tabulate(table, headers=["rows", "n", "unparsable", "kappa", "accuracy", "sensitivity", "specificity"],
                   tablefmt="github", disable_numparse=True))
    c = results["all"].confusion
    print(tabulate([["human 1 (fulfils)", c["human_1_judge_1"], c["human_1_judge_0"]],
                    ["human 0 (refuses)", c["human_0_judge_1"], c["human_0_judge_0"]]],
                   headers=["", "judge 1", "judge 0"], tablefmt="github"))
    if args.json:
        from ..report import write_json

        digest = hashlib.sha256(b"".join(p.read_bytes() for p in args.labels)).hexdigest()
        write_json(args.json, {"schema": "pytest-sftsafety/judge-agreement", "version": 1, "judge": judge.id,
                               "judge_name": args.judge, "labels": [str(p) for p in args.labels],
                               "labels_sha256": digest, "seconds": round(seconds, 3),
                               **results["all"].as_dict(),
                               "by_source": {k: v.as_dict() for k, v in results.items() if k != "all"}})
        print(f"wrote {args.json}; pass it to pytest as --judge-error {args.json}")
    return 0


def _report_parsers(sub) -> None:
    p = sub.add_parser("report", help="re-render a saved JSON report: the table, and Markdown, heatmap or HTML")
    p.add_argument("report", type=Path, help="a report written by pytest --sftsafety-json")
    p.add_argument("--md", help="write the Markdown summary to PATH")
    p.add_argument("--plot", help="write the heatmap PNG to PATH (needs matplotlib)")
    p.add_argument("--html", help="write the HTML report to PATH")
    p = sub.add_parser("compare", help="two saved reports side by side (e.g. the last release and this run); exit "
                                       "status 1 when a test newly fails")
    p.add_argument("before", type=Path, help="report A (e.g. the last release)")
    p.add_argument("after", type=Path, help="report B (e.g. this run)")
    p.add_argument("--md", help="also write the comparison as Markdown to PATH")


def _damaged(paths: list):
    """A report with the right top-level keys but entries of another shape: one line, not a traceback."""
    from contextlib import contextmanager

    @contextmanager
    def guard():
        try:
            yield
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise SftSafetyError(f"{' or '.join(map(str, paths))}: damaged report ({type(exc).__name__}: {exc}); "
                                 f"write it again with pytest --sftsafety-json") from None

    return guard()


def _run_report(args: argparse.Namespace) -> int:
    from ..outputs import write_outputs
    from ..report import load_report, render_table

    document = load_report(args.report)
    with _damaged([args.report]):
        print(render_table(document))
        write_outputs(document, markdown=args.md, plot=args.plot, html=args.html)
    for label, path in (("Markdown summary", args.md), ("heatmap", args.plot), ("HTML report", args.html)):
        if path:
            print(printable(f"{label}: {path}"))
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from ..report import NEWLY_FAILING, compared_tests, load_report, render_comparison, write_text

    before, after = load_report(args.before), load_report(args.after)
    with _damaged([args.before, args.after]):
        print(render_comparison(before, after))
        if args.md:
            write_text(args.md, render_comparison(before, after, markdown=True), "comparison")
        # As diff does: 1 when a test newly fails, so a script can act on it.
        return int(any(note == NEWLY_FAILING for *_, note in compared_tests(before, after)))


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="sftsafety", description="pytest-sftsafety tools")
    sub = parser.add_subparsers(dest="command", required=True)
    _finetune_parser(sub)
    _demo_parser(sub)
    _judge_agreement_parser(sub)
    _report_parsers(sub)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.pytest_args = rest  # demo: everything else goes to pytest
    try:
        import warnings

        warnings.simplefilter("ignore", FutureWarning)  # deprecation chatter from the model libraries
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one weight-loading bar per seed is noise here
        return {"finetune": _run_finetune, "demo": _run_demo, "judge-agreement": _run_judge_agreement,
                "report": _run_report, "compare": _run_compare}[args.command](args)
    except SftSafetyError as exc:
        print(f"sftsafety {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sftsafety {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
