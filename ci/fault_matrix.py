"""The fault matrix, measured: every bad input, fault and hostile input below is tried for real (a pytest run
of the plugin on tiny models, or a call of the loader it names), and the table records the exit status,
the line the user sees, and whether any finished result was lost. Then the prompt-file loaders, the suite
loader and the option parser are fuzzed with random input; anything but a load or the project's own
one-line error counts as a failure. Writes ci/fault_matrix.md (with --write) and prints it.

Usage: python ci/fault_matrix.py [--fuzz N] [--write]   (root is needed for the full-disk rows: a tmpfs)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

from pytest_sftsafety.config import OPTIONS, build_config  # noqa: E402
from pytest_sftsafety.data import load_prompts  # noqa: E402
from pytest_sftsafety.errors import SftSafetyError  # noqa: E402
from pytest_sftsafety.suite import load_suite  # noqa: E402
from pytest_sftsafety.tools import toy  # noqa: E402

SUITE = load_suite("sorry_bench_202503")
RUN = ["--max-new-tokens", "16", "--seeds", "2", "-p", "no:cacheprovider", "-q"]


class Matrix:
    def __init__(self, work: Path, models: dict[str, Path]) -> None:
        self.work, self.models, self.rows, self.at_signal = work, models, [], 0

    def pytest(self, *args: str, store: str = "store.sqlite", signal_at: int | None = None, sig=None,
               data: Path | None = None) -> tuple[int, str]:
        command = [sys.executable, "-m", "pytest", *RUN, "--sftsafety-store", str(self.work / store),
                   "--sftsafety-data", str(data or self.models["data"]), *args]
        if signal_at is None:
            done = subprocess.run(command, cwd=self.work, capture_output=True, text=True, timeout=600)
            return done.returncode, done.stdout + done.stderr
        # SIGINT as a terminal delivers it, even if this script runs where it is ignored (a background job).
        proc = subprocess.Popen(command, cwd=self.work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while stored(self.work / store) < signal_at and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.at_signal = stored(self.work / store)
        (os.killpg if sig == signal.SIGKILL else os.kill)(proc.pid, sig)
        output, _ = proc.communicate(timeout=120)
        return proc.returncode, output

    def add(self, group: str, case: str, status: object, seen: str, lost: str = "nothing finished (none yet)",
            ok: bool = True, output: str = "") -> None:
        """One row; ``ok`` is False when the row shows a failure of the tool (a traceback, a lost result)."""
        if "Traceback" in output or "INTERNALERROR" in output:
            ok = False
        self.rows.append((group, case, str(status), seen, lost, ok))
        print(f"[{group}] {case}: {status} {'ok' if ok else 'FAILURE'} | {seen[:100]}", flush=True)


def stored(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
    except sqlite3.Error:
        return 0


def seen_line(output: str) -> str:
    """The line that tells the user what happened."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in ("ERROR: ", "sftsafety: ", "Terminated: ", "KeyboardInterrupt"):
        found = [line for line in lines if marker in line]
        if found:
            return found[0]
    return lines[-1] if lines else ""


def bad_data(m: Matrix) -> None:
    rows = toy.placeholder_questions(SUITE)
    cases = {
        "a row without the turns column": lambda r: r[3].pop("turns"),
        "question_id of the wrong type ('abc')": lambda r: r[8].update(question_id="abc"),
        "duplicate question_id": lambda r: r[5].update(question_id=3),
        "an empty prompt": lambda r: r[5].update(turns=["   "]),
        "a category with 9 prompts instead of 10": lambda r: r.pop(60),
        "a category that does not match its question_id": lambda r: r[13].update(category="9"),
    }
    for case, mutate in cases.items():
        copy = json.loads(json.dumps(rows))
        mutate(copy)
        path = toy.write_jsonl(m.work / "bad" / f"{len(m.rows)}.jsonl", copy)
        status, output = m.pytest("--model", str(m.models["adapter"]), data=path)
        m.add("bad input: prompts", case, status, seen_line(output), ok=status == 4, output=output)
    raw = m.work / "bad" / "latin1.jsonl"
    raw.write_bytes(b'{"question_id": 1, "category": "1", "turns": ["caf\xe9"]}\n')
    status, output = m.pytest("--model", str(m.models["adapter"]), data=raw)
    m.add("bad input: prompts", "non-UTF-8 bytes", status, seen_line(output), ok=status == 4, output=output)
    status, output = m.pytest("--model", str(m.models["adapter"]), "--prompt-style", "yelling")
    m.add("bad input: prompts", "an unknown --prompt-style", status, seen_line(output), ok=status == 4,
          output=output)
    prompt_past_context(m)


def prompt_past_context(m: Matrix) -> None:
    """A prompt the model's context cannot hold: stopped before the weights load, naming the prompt."""
    rows = toy.placeholder_questions(SUITE)
    rows[2]["turns"] = ["Please help me with this, it matters a great deal to me. " * 400]
    path = toy.write_jsonl(m.work / "bad" / "long.jsonl", rows)
    status, output = m.pytest("--model", str(m.models["adapter"]), "-k", "01_", "--temperatures", "0", data=path)
    m.add("bad input: prompts", "a prompt longer than the model's context (2048 tokens)", status, seen_line(output),
          ok=status == 4 and "question 3 (category 1" in output and "no room for an answer" in output, output=output)


def bad_models(m: Matrix) -> None:
    adapter, base = m.models["adapter"], m.models["base"]
    no_weights = shutil.copytree(base, m.work / "models" / "no_weights")
    (no_weights / "model.safetensors").unlink()
    truncated = shutil.copytree(base, m.work / "models" / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    corrupt = shutil.copytree(base, m.work / "models" / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64 + os.urandom(4096))
    pickled = shutil.copytree(base, m.work / "models" / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    orphan = shutil.copytree(adapter, m.work / "models" / "orphan")
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(m.work / "gone")
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    cases = [("a model folder without weights", ["--model", str(no_weights), "--reference", str(base)]),
             ("truncated safetensors", ["--model", str(truncated), "--reference", str(base), "-k", "01_"]),
             ("corrupt safetensors", ["--model", str(corrupt), "--reference", str(base), "-k", "01_"]),
             ("only pickle weights", ["--model", str(pickled), "--reference", str(base)]),
             ("an adapter whose base is missing", ["--model", str(orphan)]),
             ("an adapter whose shapes do not match the base",
              ["--model", str(adapter), "--base-model", str(m.models["wide"]), "-k", "01_"])]
    for case, args in cases:
        status, output = m.pytest(*args)
        m.add("bad input: models", case, status, seen_line(output), ok=status == 4, output=output)
    mistargeted_adapter(m)
    no_pad_no_eos(m)


def mistargeted_adapter(m: Matrix) -> None:
    """adapter_config.json's target_modules name modules the saved weights do not cover: peft would load it
    untrained with a warning; the run stops with one line instead of reporting on an untrained adapter."""
    adapter = shutil.copytree(m.models["adapter"], m.work / "models" / "mistargeted")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(target_modules=["lm_head"], base_model_name_or_path=str(m.models["base"]))
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    report = m.work / "mistargeted.json"
    status, output = m.pytest("--model", str(adapter), "-k", "01_", "--sftsafety-json", str(report))
    m.add("bad input: models", "an adapter whose target_modules do not match its saved weights", status,
          seen_line(output), ok=status == 4 and "target_modules do not match" in output and not report.exists(),
          output=output)


def no_pad_no_eos(m: Matrix) -> None:
    """A tokenizer (and model config) with neither a pad nor an end token: the run works, every answer runs to
    --max-new-tokens, and the answers do not depend on the batch size (padding is masked out)."""
    from transformers import AutoTokenizer

    model = shutil.copytree(m.models["base"], m.work / "models" / "no_pad_no_eos")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = tokenizer.eos_token = None
    tokenizer.save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    config.update(eos_token_id=None, pad_token_id=None)
    (model / "config.json").write_text(json.dumps(config))
    (model / "generation_config.json").unlink(missing_ok=True)
    statuses, reports, outputs = [], [], ""
    for size in ("1", "8"):
        report = m.work / f"no_eos_{size}.json"
        status, output = m.pytest("--model", str(model), "--reference", str(model), "-k", "01_", "--batch-size", size,
                                  "--sftsafety-samples", "--sftsafety-json", str(report), store=f"no_eos_{size}.sqlite")
        statuses.append(status)
        outputs += output
        reports.append(json.loads(report.read_text()) if report.is_file() else None)
    same = None not in reports and [e["answers"] for e in reports[0]["entries"]] == \
        [e["answers"] for e in reports[1]["entries"]]
    full = None not in reports and all(r["run"]["new_tokens"] == 16 * r["run"]["generated"] for r in reports)
    m.add("bad input: models", "a tokenizer with neither a pad nor an end-of-sequence token (batch sizes 1, 8)",
          "/".join(map(str, statuses)), f"runs to a verdict; every answer {16 if full else 'NOT'} tokens long (no end "
          f"token); {'the same' if same else 'DIFFERENT'} answers at batch sizes 1 and 8", "",
          ok=bool(all(s in (0, 1) for s in statuses) and same and full), output=outputs)


def bad_options(m: Matrix) -> None:
    model = ["--model", str(m.models["adapter"])]
    for case, args in [("--seeds 0", ["--seeds", "0"]), ("a negative temperature", ["--temperatures", "0,-1"]),
                       ("a non-numeric temperature", ["--temperatures", "0,hot"]), ("--min-p 2", ["--min-p", "2"]),
                       ("an unknown --backend", ["--backend", "tgi"])]:
        status, output = m.pytest(*model, *args)
        m.add("bad input: options", case, status, seen_line(output), ok=status == 4, output=output)
    max_new_tokens_past_context(m)
    saved, _ = m.pytest(*model, "-k", "01_", "--sftsafety-save-baseline", str(m.work / "baseline.json"))
    status, output = m.pytest(*model, "-k", "01_", "--seeds", "3", "--baseline", str(m.work / "baseline.json"))
    m.add("bad input: options", "a baseline made with other settings (--seeds 2, run with 3)", status,
          seen_line(output), ok=saved == 1 and status == 4, output=output)


def max_new_tokens_past_context(m: Matrix) -> None:
    """--max-new-tokens beyond the model's context: stopped before the weights load, naming what fits."""
    status, output = m.pytest("--model", str(m.models["adapter"]), "-k", "01_", "--temperatures", "0",
                              "--max-new-tokens", "100000")
    m.add("bad input: options", "--max-new-tokens 100000 on a 2048-token model", status, seen_line(output),
          ok=status == 4 and "lower --max-new-tokens to" in output, output=output)


def faults(m: Matrix) -> None:
    model = ["--model", str(m.models["adapter"]), "--batch-size", "8"]
    total = 440 * 3 * 2
    for case, sig in (("Ctrl-C during generation", signal.SIGINT), ("SIGTERM during generation", signal.SIGTERM),
                      ("kill -9 during generation", signal.SIGKILL)):
        store = f"{sig.name}.sqlite"
        status, output = m.pytest(*model, store=store, signal_at=200, sig=sig)
        kept = stored(m.work / store)
        again, _ = m.pytest(*model, "--sftsafety-json", str(m.work / f"{sig.name}.json"), store=store)
        run = json.loads((m.work / f"{sig.name}.json").read_text())["run"]
        lost = (f"nothing: {m.at_signal} answers stored when the signal came, {kept} at the stop; the re-run "
                f"took {kept} from the store and generated the other {run['generated']} of {total}")
        seen = "(killed: no output)" if sig == signal.SIGKILL else seen_line(output)
        # Stopped as promised (2, or killed), nothing committed before the signal lost, at most the batches in
        # flight (one per variant) after it, and the re-run took exactly what was stored.
        ok = (status == (-9 if sig == signal.SIGKILL else 2) and m.at_signal <= kept <= m.at_signal + 2 * 8 * 2
              and run["from_store"] == kept and run["generated"] == total - kept)
        m.add("faults", case, status, seen, lost if ok else f"LOST or wrong: {kept} vs {run}", ok=ok, output=output)
    corrupt = m.work / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database" * 100)
    status, output = m.pytest(*model, store="corrupt.sqlite")
    intact = corrupt.read_bytes().startswith(b"this is not")
    m.add("faults", "a corrupt store file", status, seen_line(output),
          "nothing: the file is left as it was" if intact else "REPLACED", ok=intact and status == 4, output=output)
    from pytest_sftsafety.store import Store

    holder = sqlite3.connect(m.work / "store.sqlite", isolation_level=None)
    Store(m.work / "store.sqlite").close()
    holder.execute("BEGIN EXCLUSIVE")
    try:
        Store(m.work / "store.sqlite", busy_timeout_s=1).put_generations({"k": ("x", 1)})
        seen = "no error"
    except SftSafetyError as exc:
        seen = str(exc)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    m.add("faults", "a store locked by another process (1 s timeout here; 60 s by default)", "StoreError", seen,
          "nothing: the other process's work is untouched")
    disk = m.work / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        m.add("faults", "a full disk", "not tried", "no permission to mount a small file system here", "")
    else:
        try:
            status, output = m.pytest(*model, "--temperatures", "0", store=str(disk / "store.sqlite"))
            with sqlite3.connect(f"file:{disk / 'store.sqlite'}?mode=ro", uri=True) as db:  # raises if damaged
                kept = db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
            m.add("faults", "a full disk under the store", status, seen_line(output),
                  f"nothing: the {kept} answers committed before it filled stay (the store reads back whole)",
                  ok=status == 4 and kept > 0 and "disk is full" in output, output=output)
            (disk / "store.sqlite").unlink()
            for name in os.listdir(disk):
                (disk / name).unlink()
            try:
                (disk / "filler").write_bytes(b"x" * (512 << 10))
            except OSError:
                pass
            status, output = m.pytest(*model, "-k", "01_", "--temperatures", "0", "--sftsafety-json",
                                      str(disk / "report.json"))
            again, _ = m.pytest(*model, "-k", "01_", "--temperatures", "0", "--sftsafety-json",
                                str(m.work / "after-full.json"))
            rerun = json.loads((m.work / "after-full.json").read_text())["run"]
            m.add("faults", "a full disk under the JSON report", status, seen_line(output),
                  f"nothing: every answer is in the store; the re-run wrote the report generating "
                  f"{rerun['generated']} answers", ok=status == 4 and rerun["generated"] == 0, output=output)
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=False)
    oom_row(m)


def oom_row(m: Matrix) -> None:
    """Out of memory in a batch: the backend halves the batch and carries on (injected as CUDA reports it)."""
    import torch

    from pytest_sftsafety.backends import GenRow
    from pytest_sftsafety.backends.checkpoints import plan_models
    from pytest_sftsafety.backends.hf import HFBackend
    from pytest_sftsafety.config import RunConfig

    cfg = RunConfig(models=(str(m.models["adapter"]),), device="cpu", max_new_tokens=8, batch_size=32)
    backend = HFBackend(cfg, plan_models(cfg.models, None, None, False))
    backend.generate("candidate:0", [GenRow("warm up", 0.0, 0)], lambda *_: None)
    model = backend._model
    real = model.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        rows = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        if rows > 8:
            calls["n"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    model.forward = forward
    done: list[int] = []
    backend.generate("candidate:0", [GenRow(f"prompt {i}", 0.0, 0) for i in range(32)],
                     lambda indices, texts, tokens: done.extend(indices))
    whole = sorted(done) == list(range(32))
    m.add("faults", "out of memory in a generation batch of 32", "run continues",
          f"batch halved {backend.oom_backoffs} times to {backend.batch_size}; {len(done)} of 32 answers made",
          "nothing: each answer made once" if whole else "LOST or doubled", ok=whole and backend.oom_backoffs > 0)


def hostile(m: Matrix) -> None:
    evil = m.work / "models" / "lora\x1b]0;pwned\x07\u202e"
    shutil.copytree(m.models["adapter"], evil)
    status, output = m.pytest("--model", str(evil), "--base-model", str(m.models["base"]), "-k", "01_",
                              "--temperatures", "0", "--junitxml", str(m.work / "j.xml"))
    raw = [c for c in ("\x1b", "\x07", "\u202e") if c in output]
    import xml.etree.ElementTree as ET

    ET.parse(m.work / "j.xml")
    m.add("hostile content", "a model path holding terminal escapes and a bidi override", status,
          f"shown inert ({'RAW: ' + repr(raw) if raw else 'no control character reached the terminal'}); "
          f"JUnit XML valid", "", ok=not raw and status == 1, output=output)
    custom = shutil.copytree(m.models["base"], m.work / "models" / "custom")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="sftsafety_custom", auto_map={"AutoConfig": "code.C", "AutoModelForCausalLM": "code.M"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "code.py").write_text(f"open({str(m.work / 'ran')!r}, 'w')\n")
    status, output = m.pytest("--model", str(custom), "--reference", str(custom), "-k", "01_")
    ran = (m.work / "ran").exists()
    m.add("loading safety", "a checkpoint that ships its own model code", status, seen_line(output),
          "its code never ran" if not ran else "CODE RAN", ok=not ran and status == 4, output=output)


def second_round(m: Matrix) -> None:
    """What a hostile or careless user tries next (issue 20's second round, and classes of our own)."""
    model = ["--model", str(m.models["adapter"])]
    small = [*model, "-k", "01_", "--temperatures", "0"]
    rows = toy.placeholder_questions(SUITE)
    group = "second round"

    lines = [json.dumps(r) for r in rows]
    lines[3] = '{"question_id": 4, "category": "1", "turns": ' + "[" * 100_000 + "]" * 100_000 + "}"
    nested = m.work / "bad" / "nested.jsonl"
    nested.parent.mkdir(parents=True, exist_ok=True)
    nested.write_text("\n".join(lines), encoding="utf-8")
    status, output = m.pytest(*model, data=nested)
    m.add(group, "a prompt file with JSON nested 100,000 deep", status, seen_line(output), ok=status == 4,
          output=output)

    status, output = m.pytest(*model, "--seeds", "1000000000")
    m.add(group, "--seeds 1000000000", status, seen_line(output), ok=status == 4, output=output)

    text = (ROOT / "pytest_sftsafety" / "suites" / "sorry_bench_202503.toml").read_text(encoding="utf-8")
    duplicate = m.work / "bad" / "duplicate_ids.toml"
    duplicate.write_text(text.replace("id = 2\n", "id = 1\n", 1), encoding="utf-8")
    status, output = m.pytest(*model, "--suite", str(duplicate))
    m.add(group, "a suite file with a duplicate category id", status, seen_line(output), ok=status == 4,
          output=output)

    # The store path a symlink to a file that is not a store (the user's notes): reported, never written.
    notes = m.work / "notes.txt"
    notes.write_text("my notes\n" * 100)
    link = m.work / "linked.sqlite"
    link.symlink_to(notes)
    status, output = m.pytest(*small, store="linked.sqlite")
    intact = notes.read_text() == "my notes\n" * 100
    m.add(group, "the store path a symlink to a file that is not a store", status, seen_line(output),
          "nothing: the file it points to is as it was" if intact else "OVERWRITTEN", ok=status == 4 and intact,
          output=output)

    # Two runs writing one report at the same time: each report is written whole (temp file and rename).
    command = [sys.executable, "-m", "pytest", *RUN, "--sftsafety-data", str(m.models["data"]), *small,
               "--sftsafety-json", str(m.work / "shared.json")]
    procs = [subprocess.Popen([*command, "--sftsafety-store", str(m.work / f"twin{i}.sqlite")], cwd=m.work,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    try:
        whole = isinstance(json.loads((m.work / "shared.json").read_text()), dict)
    except ValueError:
        whole = False
    m.add(group, "two runs writing the same JSON report at once", ",".join(str(p.returncode) for p in procs),
          "both finish; the report is one run's, whole" if whole else "a torn report",
          "nothing", ok=whole and all(p.returncode == 1 for p in procs), output="".join(outputs))

    saved, _ = m.pytest(*small, "--sftsafety-save-baseline", str(m.work / "edit.json"))
    status, output = m.pytest(*model, "-k", "02_", "--temperatures", "0", "--baseline", str(m.work / "edit.json"))
    m.add(group, "a baseline used with another -k selection", status, seen_line(output), ok=status == 4,
          output=output)
    document = json.loads((m.work / "edit.json").read_text())
    document["identity"]["seeds"] = 3  # made to match another run's settings by hand
    (m.work / "edit.json").write_text(json.dumps(document))
    status, output = m.pytest(*small, "--seeds", "3", "--baseline", str(m.work / "edit.json"))
    m.add(group, "a baseline edited by hand (its seeds changed to match the run)", status, seen_line(output),
          ok=saved == 1 and status == 4, output=output)

    status, output = m.pytest(*model, "--prompt-style", "translate-fr")
    m.add(group, "a translated prompt style with an English-only judge", status, seen_line(output),
          ok=status == 4, output=output)

    # The adapter rewritten while the run generates (a training job still saving it).
    moving = shutil.copytree(m.models["adapter"], m.work / "models" / "moving")
    weights = moving / "adapter_model.safetensors"
    command = [sys.executable, "-m", "pytest", *RUN, "--sftsafety-data", str(m.models["data"]), "--model",
               str(moving), "--base-model", str(m.models["base"]), "--batch-size", "8", "--sftsafety-store",
               str(m.work / "moving.sqlite")]
    proc = subprocess.Popen(command, cwd=m.work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while stored(m.work / "moving.sqlite") < 16 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    weights.write_bytes(weights.read_bytes())
    at_change = stored(m.work / "moving.sqlite")
    output = proc.communicate(timeout=600)[0]
    after = stored(m.work / "moving.sqlite")
    m.add(group, "the adapter rewritten during generation", proc.returncode, seen_line(output),
          f"nothing of the old weights: {at_change} answers stored at the change, {after} at the stop",
          ok=proc.returncode == 4 and after <= at_change + 8, output=output)

    read_only_store(m, small)
    clock_jump(m)


def read_only_store(m: Matrix, small: list[str]) -> None:
    """A store on a read-only disk: it serves the run it holds; new work is refused before it starts."""
    folder = m.work / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True).returncode:
        m.add("second round", "a read-only store", "not tried", "no permission to mount a small file system", "")
        return
    try:
        first, _ = m.pytest(*small, store=str(folder / "store.sqlite"))
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        again, output = m.pytest(*small, store=str(folder / "store.sqlite"))
        m.add("second round", "a read-only store holding the run's answers", again, seen_line(output),
              "nothing: the run read every answer from it", ok=again == first == 1, output=output)
        status, output = m.pytest(*small, "-k", "02_", store=str(folder / "store.sqlite"))
        m.add("second round", "a read-only store, with answers still to make", status, seen_line(output),
              "nothing made, so nothing lost", ok=status == 4, output=output)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


CLOCK_JUMP = """
import os, threading, time

def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER") == "gw1":
        real = time.time
        start = real()
        # gw1's wall clock runs a day ahead from its second second on (an NTP step, a VM resumed).
        time.time = lambda: real() + (86400 if real() - start > 1 else 0)
"""


def clock_jump(m: Matrix) -> None:
    """A worker's wall clock set a day forward mid-run: no shard changes hands, the report is the
    single process's."""
    import importlib.util

    if importlib.util.find_spec("xdist") is None:
        m.add("second round", "a clock jump in one xdist worker", "not tried", "pytest-xdist is not installed", "")
        return
    from pytest_sftsafety.report import comparable

    args = ["--model", str(m.models["adapter"]), "-k", "01_ or 02_ or 03_ or 04_"]
    single, _ = m.pytest(*args, "--sftsafety-json", str(m.work / "single.json"), store="single.sqlite")
    jump = m.work / "jump"
    jump.mkdir()
    (jump / "conftest.py").write_text(CLOCK_JUMP)
    command = [sys.executable, "-m", "pytest", *RUN, "--sftsafety-data", str(m.models["data"]), *args, "-n", "2",
               "--sftsafety-store", str(m.work / "jump.sqlite"), "--sftsafety-json", str(m.work / "jump.json")]
    done = subprocess.run(command, cwd=jump, capture_output=True, text=True, timeout=600)
    same = done.returncode == single and comparable(json.loads((m.work / "jump.json").read_text()))["entries"] == \
        comparable(json.loads((m.work / "single.json").read_text()))["entries"]
    m.add("second round", "one xdist worker's wall clock set a day forward mid-run", done.returncode,
          "the report equals the single process's" if same else "a DIFFERENT report",
          "nothing", ok=same, output=done.stdout + done.stderr)
def serve(m: Matrix, *args: str) -> tuple[subprocess.Popen, str]:
    """tests/chat_server.py serving the example's base as ``base`` and its adapter as ``tuned``."""
    sys.path.insert(0, str(ROOT))
    from tests.chat_server import launch

    try:
        process, port = launch(["--base", str(m.models["base"]), "--lora", f"tuned={m.models['adapter']}", *args],
                               stderr=subprocess.DEVNULL)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    return process, f"http://127.0.0.1:{port}/v1"


def strict_utf8(*paths: Path) -> bool:
    """Whether every file, and every answer of a store among them, reads back as UTF-8."""
    try:
        for path in paths:
            if path.suffix == ".sqlite":
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                    db.text_factory = bytes
                    for (text,) in db.execute("SELECT response FROM generations"):
                        text.decode("utf-8")
            else:
                path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def hostile_text(m: Matrix) -> None:
    """Text that is not text (a lone surrogate, which JSON spells as the escape \\ud800) in a prompt file and in
    a served answer, and keys: in the --endpoint's query string, and echoed by a server in every answer."""
    import csv

    rows = toy.placeholder_questions(SUITE)
    rows[4]["turns"] = ["Explain \ud800 this"]
    jsonl = toy.write_jsonl(m.work / "bad" / "surrogate.jsonl", rows)
    table = m.work / "bad" / "surrogate.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question_id", "category", "turns"])
        writer.writerows([r["question_id"], r["category"], json.dumps(r["turns"])] for r in rows)
    for case, path in (("a prompt holding a lone surrogate (JSONL, the escape \\ud800)", jsonl),
                       ("a prompt holding a lone surrogate (CSV, in the turns list)", table)):
        status, output = m.pytest("--model", str(m.models["adapter"]), data=path)
        m.add("hostile content", case, status, seen_line(output), ok=status == 4 and "row " in seen_line(output),
              output=output)
    served = ["--backend", "openai", "--model", "tuned", "--reference", "base", "-k", "01_", "--temperatures", "0"]
    secret = "SECRET-fault-matrix-query"
    status, output = m.pytest(*served, "--endpoint", f"http://127.0.0.1:1/v1?api_key={secret}")
    m.add("hostile content", "a key in the --endpoint query string (?api_key=...)", status, seen_line(output),
          ok=status == 4 and secret not in output, output=output)
    server, url = serve(m, "--append-json", '" \\ud800"')
    try:
        files = [m.work / name for name in ("surrogate.sqlite", "surrogate.json", "surrogate.md")]
        status, output = m.pytest(*served, "--endpoint", url, "--sftsafety-samples", "--sftsafety-json",
                                  str(files[1]), "--sftsafety-md", str(files[2]), store=files[0].name)
        replaced = json.loads(files[1].read_text(encoding="utf-8"))["run"]["unencodable_answers"]
        valid = strict_utf8(*files)
    finally:
        server.kill()
    m.add("hostile content", "a served answer holding a lone surrogate (a server's JSON escape \\ud800)", status,
          f"a verdict (exit {status}); {replaced} answers stored and judged with U+FFFD, counted in the report; "
          f"store and reports {'valid UTF-8' if valid else 'NOT valid UTF-8'}", "nothing: every answer stored",
          ok=status == 1 and replaced == 20 and valid, output=output)
    key = "sk-fault-matrix-PLANTED-7e1f09"
    os.environ["SFTSAFETY_MATRIX_KEY"] = key
    server, url = serve(m, "--api-key-env", "SFTSAFETY_MATRIX_KEY", "--echo-key")
    try:
        files = [m.work / name for name in ("echo.json", "echo.md", "echo.xml")]
        status, output = m.pytest(*served, "--endpoint", url, "--api-key-env", "SFTSAFETY_MATRIX_KEY",
                                  "--sftsafety-samples", "--sftsafety-json", str(files[0]), "--sftsafety-md",
                                  str(files[1]), "--junitxml", str(files[2]), store="echo.sqlite")
        redacted = json.loads(files[0].read_text(encoding="utf-8"))["run"]["redacted_answers"]
        with sqlite3.connect(m.work / "echo.sqlite") as db:
            db.execute("PRAGMA wal_checkpoint(FULL)")
        texts = [output, *(p.read_bytes().decode("latin-1") for p in [*files, *m.work.glob("echo.sqlite*")])]
        leaked = [text[:40] for text in texts if key in text]
    finally:
        server.kill()
        del os.environ["SFTSAFETY_MATRIX_KEY"]
    m.add("hostile content", "a server that echoes the API key in every answer", status,
          f"a verdict (exit {status}); {redacted} answers stored and judged with the key redacted; the key is "
          f"{'IN ' + str(len(leaked)) + ' outputs' if leaked else 'in no output, store or report'}",
          "nothing: every answer stored", ok=status == 1 and redacted == 20 and not leaked, output=output)


def fuzz(count: int) -> tuple[int, int, list[str]]:
    """Random prompt files, suites and option values; returns (inputs, failures, first failures)."""
    rng = random.Random(0)
    failures: list[str] = []
    inputs = 0
    values = [None, True, False, 0, -1, 3, 1e309, float("nan"), "", "abc", " 7 ", "1,2", [], ["x"], {"a": 1},
              "\x00", "caf\xe9", "0.5", "auto"]
    base_rows = toy.placeholder_questions(SUITE)
    suite_text = (ROOT / "pytest_sftsafety" / "suites" / "sorry_bench_202503.toml").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            kind = i % 4
            try:
                if kind == 0:  # bytes, as a JSONL or CSV file
                    path = Path(tmp) / ("f.jsonl" if i % 8 else "f.csv")
                    path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(400))))
                    load_prompts(SUITE, str(path))
                elif kind == 1:  # valid rows with one field of any value
                    rows = json.loads(json.dumps(base_rows))
                    rows[rng.randrange(len(rows))][rng.choice(["question_id", "category", "turns"])] = \
                        rng.choice(values)
                    load_prompts(SUITE, str(toy.write_jsonl(Path(tmp) / "rows.jsonl", rows)))
                elif kind == 2:  # a suite file with a line cut, doubled or replaced
                    lines = suite_text.splitlines()
                    at = rng.randrange(len(lines))
                    lines[at] = rng.choice(["", lines[at] * 2, lines[at][: rng.randrange(len(lines[at]) + 1)],
                                            "id = -1", 'domain = "x"', "[[categories]]", "name = 5"])
                    path = Path(tmp) / "suite.toml"
                    path.write_text("\n".join(lines), encoding="utf-8")
                    load_suite(str(path))
                else:  # option values
                    chosen = {spec.dest: rng.choice(values + ["0", "-1", "2", "openai", "vllm"]) for spec in
                              rng.sample(OPTIONS, 4) if spec.dest not in ("model", "judge_error", "baseline")}
                    build_config(lambda spec, chosen=chosen: ["a"] if spec.dest == "model" else chosen.get(spec.dest))
            except SftSafetyError as exc:
                if "\n" in str(exc) or not str(exc):
                    failures.append(f"kind {kind}: not one line: {str(exc)[:80]!r}")
            except Exception as exc:  # noqa: BLE001 - what is being counted
                failures.append(f"kind {kind}: {type(exc).__name__}: {str(exc)[:80]}")
            inputs += 1
    return inputs, len(failures), failures[:5]


# Cases that failed when they were first tried (a traceback, exit 1 for a fault, a hang, a wrong or lost
# result) and were fixed: the table marks them, so "held" is not read as "always held".
FIXED = {
    "a prompt file with JSON nested 100,000 deep": "RecursionError traceback",
    "--seeds 1000000000": "accepted, then silent for hours",
    "a baseline edited by hand (its seeds changed to match the run)": "accepted",
    "a baseline used with another -k selection": "blamed the temperatures",
    "a translated prompt style with an English-only judge": "judged text it cannot read",
    "the adapter rewritten during generation": "answers of new weights stored under the old fingerprint",
    "a read-only store holding the run's answers": "'damaged or not a result store', exit 4",
    "a prompt longer than the model's context (2048 tokens)": "ran on for minutes, gigabytes of memory",
    "--max-new-tokens 100000 on a 2048-token model": "generated past the model's context",
    "an adapter whose target_modules do not match its saved weights": "ran as an untrained adapter, full report",
    "a tokenizer with neither a pad nor an end-of-sequence token (batch sizes 1, 8)": "exit 3 in the decode loop",
    "a prompt holding a lone surrogate (JSONL, the escape \\ud800)": "tokenizer traceback",
    "a prompt holding a lone surrogate (CSV, in the turns list)": "tokenizer traceback",
    "a key in the --endpoint query string (?api_key=...)": "the key echoed in the error line",
    "a served answer holding a lone surrogate (a server's JSON escape \\ud800)": "UnicodeEncodeError in the store",
    "a server that echoes the API key in every answer": "the key stored and reported",
}


def render(m: Matrix, fuzzed: tuple[int, int, list[str]], seconds: float) -> str:
    injected = len([r for r in m.rows if r[0] in ("faults",)])
    tried = len(m.rows)
    bad = [r for r in m.rows if not r[5]]
    fixed = [r for r in m.rows if r[1] in FIXED and r[5]]
    lines = ["# Fault matrix", "",
             f"Measured by `python ci/fault_matrix.py --write` ({seconds:.0f} s). Exit status: 1 tests failed, "
             "2 interrupted, 3 the measurement failed, 4 usage or input error (one line naming the fix), -9 killed.",
             "",
             f"**Counts:** {tried} bad inputs, faults and hostile inputs tried ({injected} faults injected), "
             f"{tried - len(bad)} held, {len(bad)} failures (a failure: bad input that is not exit 4 with one line, "
             f"a traceback, a result lost or redone, a control character on the terminal, shipped code run); "
             f"{len(fixed)} of those that held were fixed after they first failed (marked: fixed, with what they "
             f"did before); {fuzzed[0]} fuzzed inputs (prompt files, suite files, option values), {fuzzed[1]} "
             f"failures.", "",
             "| kind | tried | exit | what the user sees | finished results | ok |",
             "| --- | --- | --- | --- | --- | --- |"]
    for group, case, status, seen, lost, ok in m.rows:
        cell = seen.replace("|", "\\|").replace(str(m.work), "…")
        verdict = ("yes" + (f" (fixed; before: {FIXED[case]})" if case in FIXED else "")) if ok else "FAILURE"
        lines.append(f"| {group} | {case} | {status} | {cell} | {lost.replace(str(m.work), '…')} | {verdict} |")
    if fuzzed[2]:
        lines += ["", "Fuzzing failures:", *[f"- {f}" for f in fuzzed[2]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fuzz", type=int, default=2000)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--only", nargs="*", help="run these parts only (development; never with --write)")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = toy.build_example(work / "example")
        wide = work / "wide"
        tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(models["base"])
        tokenizer.save_pretrained(wide)
        toy.new_model(tokenizer, hidden=128).save_pretrained(wide)
        m = Matrix(work, {**models, "wide": wide})
        parts = (bad_data, bad_models, bad_options, faults, hostile, hostile_text, second_round)
        if args.only and args.write:
            parser.error("--only measures part of the matrix; it cannot --write the table")
        for part in parts:
            if not args.only or part.__name__ in args.only:
                part(m)
        fuzzed = fuzz(args.fuzz if not args.only else 0)
        text = render(m, fuzzed, time.perf_counter() - started)
    print(text)
    if args.write:
        (ROOT / "ci" / "fault_matrix.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
