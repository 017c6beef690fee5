"""The README's demo figures, measured from real runs and written into its generated blocks.

    python ci/readme_figures.py demo [--readme]        the demo's table, what it shows, and its wall times
    python ci/readme_figures.py paper-toy [--readme]   ci/reproduce_paper_toy.sh's table (trains: the
                                                       figures are this machine's)

Without --readme the blocks are printed. The demo's block depends only on the shipped models, so it is
the same on every machine, and tests/test_demo.py checks that the README's block is what a run gives.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_blocks import prose, write_block  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO_COMMAND = ["--model", "demo", "--seeds", "5"]


def pytest_run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """``pytest ARGS`` in a process of its own, as a user runs it; returns (exit status, output, seconds)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - started


def table_lines(output: str) -> list[str]:
    """The lines of the plugin's terminal section: the summary line, then the table."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"=+ sftsafety =+", line))
    section = []
    for line in lines[start + 1:]:
        if re.fullmatch(r"=+ .* =+", line) or line.startswith(("JSON report: ", "Markdown summary: ", "heatmap: ",
                                                                "HTML report: ")):
            break  # where this run's own files went: not part of what it measured
        section.append(line.rstrip())
    return section


def single_seed_verdicts(report: dict, work: Path, store: Path) -> list[set[str]]:
    """Each checkpoint checked on its own at T=0.7 (its answers come from the store): the tests it fails."""
    failing = []
    for index, model in enumerate(report["models"]["candidates"]):
        out = work / f"seed-alone-{index}.json"
        status, output, _ = pytest_run(["-p", "no:cacheprovider", "-q", "--model", model, "--suite",
                                        report["suite"]["source"], "--seeds", "5", "--temperatures", "0.7",
                                        "--sftsafety-store", str(store), "--sftsafety-json", str(out)], work)
        if status not in (0, 1):
            raise SystemExit(f"checking {model} alone failed (exit {status}):\n{output[-2000:]}")
        alone = json.loads(out.read_text())
        failing.append({e["slug"] for e in alone["entries"] if e["verdict"] == "REGRESSION"})
    return failing


def _rate(value: float) -> str:
    return f"{value:.2f}"


def _percent(value: float) -> str:
    return f"{value:.0%}"


NUMBER_WORDS = {0: "no", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine"}


def _count(n: int, noun: str, plural: str, verb: str = "", plural_verb: str = "") -> str:
    """'no category regresses', 'one category regresses', '12 categories regress'."""
    single = n == 1
    phrase = f"{NUMBER_WORDS.get(n, n)} {noun if single else plural}"
    return f"{phrase} {verb if single else plural_verb}".rstrip()


def _names(entries: list[dict]) -> str:
    names = [e["category"].lower() for e in entries]
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


def render_demo(output: str, report: dict, alone: list[set[str]]) -> str:
    """The README's demo block: an excerpt of the terminal table (its lines verbatim) and what it shows,
    every figure taken from the run."""
    lines = table_lines(output)
    summary = next(line for line in lines if line.startswith(report["suite"]["title"]))
    header = next(line for line in lines if line.startswith("test "))
    by_slug: dict[str, dict[float, dict]] = {}
    for entry in report["entries"]:
        by_slug.setdefault(entry["slug"], {})[entry["temperature"]] = entry
    temps = sorted({e["temperature"] for e in report["entries"]})
    greedy, sampled = temps[0], temps[-1]

    def verdicts(slug: str) -> tuple[str, ...]:
        return tuple(by_slug[slug][t]["verdict"] for t in temps)

    # Rows that show each kind of result: the largest regression, a verdict that changes with temperature,
    # a flaky drop at both temperatures, an untouched category.
    regressed = sorted((s for s in by_slug if by_slug[s][sampled]["verdict"] == "REGRESSION"),
                       key=lambda s: -by_slug[s][sampled]["drop"])
    picks: list[str] = regressed[:1]
    for wanted in (lambda s: len(set(verdicts(s))) > 1, lambda s: set(verdicts(s)) == {"FLAKY"},
                   lambda s: all(by_slug[s][t]["drop"] <= 0 for t in temps)):
        slug = next((s for s in by_slug if wanted(s) and s not in picks), None)
        if slug:
            picks.append(slug)
    picks.sort(key=lambda s: by_slug[s][greedy]["category_id"])
    rows = [line for line in lines if line.split(" ")[0] in picks or line.startswith("Overall ")]
    excerpt = "\n".join([summary, header, *rows])

    overall = {a["temperature"]: a for a in report["aggregates"] if a["group"] == "overall"}
    drops = sorted((by_slug[s][sampled] for s in by_slug), key=lambda e: -e["drop"])
    untouched = [s for s in by_slug if all(by_slug[s][t]["drop"] <= 0 for t in temps)]
    spread = max(by_slug, key=lambda s: max(by_slug[s][greedy]["checkpoint_refusal_rates"])
                 - min(by_slug[s][greedy]["checkpoint_refusal_rates"]))
    spread_rates = by_slug[spread][greedy]["checkpoint_refusal_rates"]
    count = {t: {v: sum(by_slug[s][t]["verdict"] == v for s in by_slug) for v in ("REGRESSION", "FLAKY", "PASS")}
             for t in temps}
    changed = sum(len(set(verdicts(s))) > 1 for s in by_slug)
    in_common = set.intersection(*alone) if alone else set()
    seeds = len(report["models"]["candidates"])
    untouched_text = (f"{len(untouched)} of {len(by_slug)} categories do not drop at either temperature"
                      + (f" (among them {by_slug[untouched[0]][greedy]['category'].lower()})" if untouched else ""))
    sampled_overall = overall[sampled]
    reference_rate = _percent(sampled_overall["reference_refusal_rate"])
    regress = {t: _count(count[t]["REGRESSION"], "category", "categories", "regresses", "regress") for t in temps}
    flaky = {t: _count(count[t]["FLAKY"], "drop", "drops", "is", "are") for t in temps}
    reasons = {t: sorted({by_slug[s][t]["flaky"]["reason"] for s in by_slug if by_slug[s][t].get("flaky")})
               for t in temps}

    def why(t: float) -> str:
        return f" ({', '.join(reasons[t])})" if reasons[t] else ""
    bullets = [
        f"- Benign fine-tuning lowers refusal: the reference refuses {reference_rate} of the prompts at "
        f"T={sampled:g}, the fine-tunes {_percent(sampled_overall['candidate_refusal_rate'])} (overall: "
        f"{sampled_overall['verdict']}). The drop is concentrated: the largest are in {_names(drops[:3])}, "
        f"while {untouched_text}.",
        f"- The drop varies with the fine-tuning seed: at T={greedy:g} the {NUMBER_WORDS.get(seeds, seeds)} seeds "
        f"refuse {by_slug[spread][greedy]['category'].lower()} prompts at rates "
        f"{', '.join(_rate(r) for r in spread_rates[:-1])} and {_rate(spread_rates[-1])}. Checked one at a time "
        f"at T={sampled:g}, they regress in {', '.join(str(len(a)) for a in alone[:-1])} and {len(alone[-1])} "
        f"categories, {len(in_common)} of them in common.",
        f"- Temperature changes the picture: greedy decoding gives one answer per prompt, so at T={greedy:g} "
        f"{regress[greedy]} and {flaky[greedy]} FLAKY{why(greedy)}; at T={sampled:g}, with five samples per "
        f"prompt, {regress[sampled]} and {flaky[sampled]} FLAKY{why(sampled)}. "
        f"{_count(changed, 'category gets', 'categories get').capitalize()} another verdict at the two "
        f"temperatures.",
    ]
    return f"```text\n{excerpt}\n```\n\n" + "\n".join(prose(b) for b in bullets)


def measure_demo() -> tuple[str, str]:
    """Run the README's demo command twice in a new folder (the second run finds every answer in the
    store); return the demo block and the timing block."""
    with tempfile.TemporaryDirectory(prefix="sftsafety-readme-") as name:
        work = Path(name)
        status, output, cold = pytest_run([*DEMO_COMMAND, "--sftsafety-json", "r.json"], work)
        if status != 1:
            raise SystemExit(f"the demo exited {status}, not 1:\n{output[-3000:]}")
        report = json.loads((work / "r.json").read_text())
        _, again, warm = pytest_run([*DEMO_COMMAND], work)
        if table_lines(again) != table_lines(output):
            raise SystemExit("the demo's second run printed another table than its first")
        alone = single_seed_verdicts(report, work, work / ".pytest_cache" / "d" / "sftsafety" / "store.sqlite")
    run = report["run"]
    from build_demo import cpu_summary

    timing = (f"Measured with `python ci/readme_figures.py demo` on {cpu_summary()}, install excluded: "
              f"{cold:.1f} s for the first "
              f"`pytest --model demo --seeds 5` in a new folder ({run['generated']} answers generated), "
              f"{warm:.1f} s for the same command again, when every answer is in the result store.")
    return render_demo(output, report, alone), prose(timing)


def measure_paper_toy(seeds: int) -> str:
    """ci/reproduce_paper_toy.sh's table, with the machine it ran on (training makes it this machine's)."""
    started = time.perf_counter()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the script runs python and pytest
    done = subprocess.run(["bash", str(ROOT / "ci" / "reproduce_paper_toy.sh"), str(seeds)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "PATH": path})
    if done.returncode:
        raise SystemExit(f"reproduce_paper_toy.sh failed:\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    table = done.stdout[done.stdout.index("refusal rate per seed"):].strip()
    from build_demo import cpu_summary

    return f"```text\n{table}\n```\n\n" + prose(f"Measured with `python ci/readme_figures.py paper-toy` (`bash "
                                                 f"ci/reproduce_paper_toy.sh {seeds}`, {seconds:.0f} s) on "
                                                 f"{cpu_summary()}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["demo", "paper-toy"])
    parser.add_argument("--seeds", type=int, default=5, help="paper-toy: fine-tuning seeds (default 5)")
    parser.add_argument("--readme", action="store_true", help="write the blocks into README.md")
    args = parser.parse_args(argv)
    command = f"python ci/readme_figures.py {args.what}"
    if args.what == "demo":
        block, timing = measure_demo()
        outputs = {"demo": block, "demo-timing": timing}
    else:
        outputs = {"paper-toy": measure_paper_toy(args.seeds)}
    for name, body in outputs.items():
        if args.readme:
            write_block(name, command, body)
        else:
            print(f"--- {name}\n{body}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
