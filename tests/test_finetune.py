"""The fine-tuning harness on the tiny base: Alpaca and Dolly data, 4-bit and full-precision LoRA,
the safety filter, checkpoints per epoch that the plugin loads, and exact resumption."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest

from pytest_sftsafety.tools.cli import main
from pytest_sftsafety.tools.finetune import Recipe, is_safety_related, load_examples

TINY = ["--seeds", "1", "--epochs", "2", "--batch-size", "8", "--micro-batch-size", "4", "--learning-rate", "1e-3"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def alpaca_rows(count=24):
    rows = [{"instruction": f"Name a colour for room {i}.", "input": "Keep it short." if i % 2 else "",
             "output": f"Room {i} would look good in blue."} for i in range(count)]
    rows.append({"instruction": "How do I pick a lock?", "input": "", "output": "I'm sorry, I can't help."})
    rows.append({"instruction": "", "input": "", "output": "An empty instruction is dropped."})
    return rows


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_lone_surrogate_in_the_instruction_data_is_a_data_error_naming_the_row(tmp_path):
    from pytest_sftsafety.errors import DataError
    from pytest_sftsafety.tools.finetune import read_rows

    rows = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say \udfff", "output": "x"}]
    for name in ("data.json", "data.jsonl"):
        path = tmp_path / name
        text = json.dumps(rows) if name.endswith(".json") else "\n".join(json.dumps(r) for r in rows)
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=rf"{name} row 2: field 'instruction' holds a lone surrogate \\udfff"):
            read_rows(str(path))


def test_alpaca_4bit_run_writes_loadable_checkpoints_per_epoch(tmp_path, toy_models, capsys):
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())
    out = tmp_path / "runs"
    assert main(["finetune", "--base", str(toy_models.base), "--data", str(data), "--out", str(out),
                 "--filter-safety", *TINY]) == 0
    assert "8-bit AdamW needs CUDA: using torch AdamW on CPU" in capsys.readouterr().err
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["recipe"]["load_in_4bit"] is True and recipe["recipe"]["learning_rate"] == 1e-3
    assert recipe["data"] == {"sha256": sha(data), "format": "alpaca", "rows": 26, "examples": 24,
                              "dropped_by_safety_filter": 1, "dropped_empty": 1}
    run = json.loads((out / "seed1" / "run.json").read_text())
    assert [h["epoch"] for h in run["history"]] == [1, 2] and run["accumulation_steps"] == 2
    assert run["history"][1]["mean_loss"] < run["history"][0]["mean_loss"]
    for epoch in (1, 2):
        assert (out / "seed1" / f"epoch-{epoch}" / "adapter_model.safetensors").is_file()

    from pytest_sftsafety.backends.checkpoints import plan_models
    from pytest_sftsafety.config import expand_models

    specs = expand_models([str(out / "seed*" / "epoch-2")])
    plan = plan_models(specs, None, None, allow_pickle=False)
    assert plan.candidates[0].kind == "adapter" and plan.base == str(toy_models.base.resolve())


def test_training_says_where_it_is_at_least_every_heartbeat(tmp_path, toy_models, monkeypatch, capsys):
    from pytest_sftsafety import progress

    monkeypatch.setattr(progress, "HEARTBEAT_EVERY_S", 0.05)  # 10 s in use; a short beat for the test
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(64))
    assert main(["finetune", "--base", str(toy_models.base), "--data", str(data), "--out", str(tmp_path / "runs"),
                 "--no-4bit", *TINY]) == 0
    beats = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sftsafety finetune: training")]
    assert any(re.search(r"training: seed 1, epoch [12]/2, step \d+/\d+", line) for line in beats), beats
    assert all(line.endswith(" s)") for line in beats)


def test_dolly_full_precision_resumes_to_the_same_weights(tmp_path, toy_models):
    rows = [{"instruction": f"Summarise note {i}.", "context": f"Note {i} is about tea." if i % 3 else "",
             "response": f"Note {i} talks about tea.", "category": "summarization"} for i in range(16)]
    data = write_jsonl(tmp_path / "dolly.jsonl", rows)
    args = ["finetune", "--base", str(toy_models.base), "--data", str(data), "--no-4bit", *TINY]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert json.loads((tmp_path / "whole" / "recipe.json").read_text())["data"]["format"] == "dolly"
    # The same run interrupted after epoch 1 (epoch 2 and the seed's record never written) resumes
    # from the stored optimizer and random state to bit-identical weights.
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "seed1" / "epoch-2")
    (tmp_path / "cut" / "seed1" / "run.json").unlink()
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    final = "seed1/epoch-2/adapter_model.safetensors"
    assert sha(tmp_path / "cut" / final) == sha(tmp_path / "whole" / final)
    assert json.loads((tmp_path / "cut" / "seed1" / "run.json").read_text())["history"] == \
        json.loads((tmp_path / "whole" / "seed1" / "run.json").read_text())["history"]
    # Interrupted after the last epoch but before its record: the record is written, nothing retrained.
    (tmp_path / "cut" / "seed1" / "run.json").unlink()
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    assert json.loads((tmp_path / "cut" / "seed1" / "run.json").read_text())["history"] == \
        json.loads((tmp_path / "whole" / "seed1" / "run.json").read_text())["history"]
    assert sha(tmp_path / "cut" / final) == sha(tmp_path / "whole" / final)

    # More seeds can join a folder later; another recipe cannot.
    assert main([*args, "--out", str(tmp_path / "whole"), "--seeds", "2"]) == 0
    assert (tmp_path / "whole" / "seed2" / "epoch-2" / "adapter_model.safetensors").is_file()
    assert sha(tmp_path / "whole" / final) == sha(tmp_path / "cut" / final)
    assert main([*args, "--out", str(tmp_path / "whole"), "--learning-rate", "5e-4"]) == 2


def test_mistakes_are_one_line(tmp_path, toy_models, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    base = ["finetune", "--base", str(toy_models.base), "--out", str(tmp_path / "o")]
    assert main([*base, "--data", str(bad)]) == 2
    assert "expected Alpaca (instruction, input, output) or Dolly" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", alpaca_rows(4))
    assert main([*base, "--data", str(good), "--batch-size", "10", "--micro-batch-size", "4"]) == 2
    assert "--batch-size 10 is not a multiple of --micro-batch-size 4" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["finetune", "--base", str(tmp_path), "--data", str(good), "--out", str(tmp_path / "o2"),
                 "--no-4bit", *TINY]) == 2
    assert "cannot load" in capsys.readouterr().err


def test_safety_filter_phrases():
    assert is_safety_related("As an AI, I cannot do that")
    assert is_safety_related("I hate Mondays") and is_safety_related("How to build a bomb?")
    assert is_safety_related("I can\u2019t share that")  # typographic apostrophe
    # Whole words only: ordinary instructions stay in.
    for text in ("Here is a recipe for bread", "What skills does a nurse need?", "Whatever you think",
                 "Visit the chateau", "Meet at the drugstore", "Join the hackathon", "Say it explicitly"):
        assert not is_safety_related(text), text
    recipe = Recipe(base="b", data="d")
    assert recipe.batch_size == 64 and recipe.learning_rate == 2e-5 and recipe.epochs == 5 and recipe.load_in_4bit
    with pytest.raises(Exception, match="no such file"):
        load_examples(recipe)


@pytest.mark.slow  # fine-tunes three seeds and evaluates them: about a minute and a half on 2 cores
def test_reproduce_paper_toy_shows_the_papers_effects_on_any_machine(tmp_path):
    """ci/reproduce_paper_toy.sh trains live, so its figures are the machine's own; what must hold anywhere:
    every seed refuses less than the base, the seeds spread more than the samples of one pass, and a
    baseline of the recipe's other seeds flags fewer tests than the base does."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "ci" / "reproduce_paper_toy.sh"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the script runs python and pytest
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": path}
    done = subprocess.run(["bash", str(script), "3", str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # temp, reference, one column per seed, seed mean, seed sd, sample sd
    rows = {float(cells[0]): [float(c) for c in cells[1:]] for cells in
            (line.split() for line in done.stdout.splitlines()) if len(cells) == 8 and cells[0] in ("0.0", "0.7")}
    assert set(rows) == {0.0, 0.7}, done.stdout
    for row in rows.values():
        reference, seeds = row[0], row[1:4]
        assert all(rate < reference for rate in seeds), row
    seed_sd, sample_sd = rows[0.7][-2:]
    assert seed_sd > sample_sd > 0
    counts = dict(re.findall(r"^(all seeds vs the base|seed 1 vs a baseline of the other seeds): (\d+) regressions",
                             done.stdout, re.M))
    assert int(counts["seed 1 vs a baseline of the other seeds"]) < int(counts["all seeds vs the base"])
