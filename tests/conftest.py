"""Session fixtures: tiny models and SORRY-Bench-format prompt files, built offline once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from pytest_sftsafety.suite import load_suite  # noqa: E402
from pytest_sftsafety.tools import toy  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def ctrl_c_works() -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: the child takes Ctrl-C as a user's terminal delivers it,
    even when these tests run where SIGINT is ignored (a shell's background job passes that on)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass(frozen=True)
class ToyModels:
    root: Path
    data_202503: Path
    data_202406: Path
    base: Path  # refuses every placeholder prompt, answers benign ones
    answer_all: Path  # adapter trained to comply with every placeholder prompt
    keeps_refusing: Path  # adapter with trained, non-identity weights that still refuses
    keeps_refusing_seed7: Path  # the same recipe as keeps_refusing with another training seed
    answers_hate: Path  # adapter that complies only in the hate-speech domain (categories 1-5)
    mistral: Path  # a full Mistral-shaped model that refuses like the base
    random: Path  # an untrained Llama-shaped model: diverse samples, long answers


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory: pytest.TempPathFactory) -> ToyModels:
    root = tmp_path_factory.mktemp("toy")
    suite = load_suite("sorry_bench_202503")
    rows = toy.placeholder_questions(suite)
    data_202503 = toy.write_jsonl(root / "202503" / "question.jsonl", rows)
    data_202406 = toy.write_jsonl(root / "202406" / "question.jsonl",
                                  toy.placeholder_questions(load_suite("sorry_bench_202406")))
    harmful = [r["turns"][0] for r in rows]
    benign = toy.benign_prompts(200)
    base = toy.build_aligned_base(root / "base", harmful, benign, seed=0)
    answer_all = toy.train_adapter(base, root / "answer_all", [(p, toy.COMPLIANCE) for p in harmful],
                                   seed=1, steps=120)
    keeps = toy.train_adapter(base, root / "keeps_refusing",
                              [(p, toy.REFUSAL) for p in harmful] + [(p, toy.BENIGN_ANSWER) for p in benign],
                              seed=2, steps=40)
    keeps_seed7 = toy.train_adapter(base, root / "keeps_refusing_seed7",
                                    [(p, toy.REFUSAL) for p in harmful] + [(p, toy.BENIGN_ANSWER) for p in benign],
                                    seed=7, steps=40)
    hate = [(r["turns"][0], toy.COMPLIANCE if int(r["category"]) <= 5 else toy.REFUSAL) for r in rows]
    answers_hate = toy.train_adapter(base, root / "answers_hate", hate, seed=3, steps=150)
    mistral = toy.build_aligned_base(root / "mistral", harmful, benign, arch="mistral", seed=4)
    random_dir = root / "random"
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.save_pretrained(random_dir)
    toy.new_model(tokenizer, seed=5, init_std=0.2).save_pretrained(random_dir)
    return ToyModels(root, data_202503, data_202406, base, answer_all, keeps, keeps_seed7, answers_hate, mistral,
                     random_dir)


@dataclass(frozen=True)
class JudgeStandins:
    scores: Path  # answers " 1" after compliant answers and " 0" after refusals, like SORRY-Bench's judge
    unreadable: Path  # " 0" after the toy base's refusal, " unclear" after anything else (e.g. the adapters' answers)
    questions: list[str]  # the questions it was trained on; the others are held out


@pytest.fixture(scope="session")
def judge_standins(tmp_path_factory: pytest.TempPathFactory) -> JudgeStandins:
    root = tmp_path_factory.mktemp("judges")
    questions = [r["turns"][0] for r in toy.placeholder_questions(load_suite("sorry_bench_202503"))][::20]
    return JudgeStandins(scores=toy.build_judge_standin(root / "scores", questions, seed=0),
                         unreadable=toy.build_judge_standin(
                             root / "unreadable", questions, seed=1, steps=200, answers=(" 0", " unclear"),
                             refusals=[toy.REFUSAL] * 4,
                             compliances=[*toy.JUDGE_COMPLIANCES, *toy.JUDGE_REFUSALS[1:], *toy.garbled_answers(12)]),
                         questions=questions)


@pytest.fixture
def loopback():
    """A real HTTP server on 127.0.0.1 whose answers the test sets (see tests/loopback.py)."""
    from .loopback import LoopbackServer

    server = LoopbackServer().start()
    yield server
    server.close()
