"""--backend vllm. Without vLLM: one line naming the install. With it (a CUDA machine, or vllm-cpu in its own
environment: ci/vllm_cpu_tests.sh): the same greedy answers as the transformers backend for the base and a
LoRA adapter served from one engine, per-request seeds that make samples independent of their batch, and
answers kept in the store."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from pytest_sftsafety.backends import GenRow
from pytest_sftsafety.backends.checkpoints import plan_models
from pytest_sftsafety.config import RunConfig
from pytest_sftsafety.seeding import sample_seed
from pytest_sftsafety.suite import load_suite
from pytest_sftsafety.tools import toy

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
# ci/vllm_cpu_tests.sh sets SFTSAFETY_REQUIRE_VLLM=1: there a missing vLLM fails these tests instead of skipping them.
needs_vllm = pytest.mark.skipif(not HAVE_VLLM and not os.environ.get("SFTSAFETY_REQUIRE_VLLM"),
                                reason="needs vLLM (ci/vllm_cpu_tests.sh runs these with vllm-cpu)")
FAST = ["--max-new-tokens", "24", "--seeds", "2", "-p", "no:cacheprovider", "-k", "01_ or 07_"]


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_backend_is_one_line_naming_the_install(pytester, toy_models):
    result = pytester.runpytest("--sftsafety-data", str(toy_models.data_202503), "--model",
                                str(toy_models.answer_all), "--backend", "vllm")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --backend vllm needs vLLM: pip install 'pytest-sftsafety[[]vllm]'*"])
    assert "Traceback" not in result.stderr.str()


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """The toy base and its answer-everything adapter, 32 values per attention head (vLLM's CPU minimum)."""
    root = tmp_path_factory.mktemp("wide")
    rows = toy.placeholder_questions(load_suite("sorry_bench_202503"))
    data = toy.write_jsonl(root / "question.jsonl", rows)
    harmful = [r["turns"][0] for r in rows]
    base = toy.build_aligned_base(root / "base", harmful, toy.benign_prompts(200), seed=0, hidden=128)
    adapter = toy.train_adapter(base, root / "answer_all", [(p, toy.COMPLIANCE) for p in harmful], seed=1,
                                steps=120)
    return data, base, adapter, harmful


@pytest.fixture(scope="module")
def engine(wide_models):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from pytest_sftsafety.backends.vllm_engine import VLLMBackend

    adapter = wide_models[2]
    cfg = RunConfig(models=(str(adapter),), backend="vllm", max_new_tokens=24)
    backend = VLLMBackend(cfg, plan_models(cfg.models, None, None, False))
    yield backend
    backend.close()


def generate(backend, variant: str, rows: list[GenRow]) -> list[str]:
    texts = [""] * len(rows)

    def on_batch(indices, answers, tokens):
        for index, text in zip(indices, answers, strict=True):
            texts[index] = text

    backend.generate(variant, rows, on_batch)
    return texts


@needs_vllm
def test_vllm_greedy_answers_equal_the_transformers_backends(pytester, wide_models):
    data, _, adapter, _ = wide_models
    args = ["--sftsafety-data", str(data), *FAST, "--temperatures", "0", "--sftsafety-samples", "--model",
            str(adapter)]
    local = pytester.runpytest_subprocess(*args, "--sftsafety-store", "local.sqlite", "--sftsafety-json",
                                          "local.json")
    engine = pytester.runpytest_subprocess(*args, "--backend", "vllm", "--sftsafety-store", "vllm.sqlite",
                                           "--sftsafety-json", "vllm.json")
    assert local.ret == engine.ret == pytest.ExitCode.TESTS_FAILED
    one, two = (json.loads((pytester.path / name).read_text()) for name in ("local.json", "vllm.json"))
    assert [e["answers"] for e in one["entries"]] == [e["answers"] for e in two["entries"]]
    assert [e["verdict"] for e in one["entries"]] == [e["verdict"] for e in two["entries"]]
    assert two["run"]["backend"] == "vllm" and two["run"]["model_loads"] == 1  # base and adapter in one engine
    # The answers are in the store: the same run again generates nothing.
    again = pytester.runpytest_subprocess(*args, "--backend", "vllm", "--sftsafety-store", "vllm.sqlite",
                                          "--sftsafety-json", "again.json")
    assert again.ret == pytest.ExitCode.TESTS_FAILED
    assert json.loads((pytester.path / "again.json").read_text())["run"]["generated"] == 0


@needs_vllm
def test_vllm_samples_depend_on_their_seed_only(engine, wide_models):
    prompts = wide_models[3][::40]
    rows = [GenRow(p, 1.0, sample_seed(0, str(i), s)) for i, p in enumerate(prompts) for s in range(3)]
    together = generate(engine, "candidate:0", rows)
    reversed_order = generate(engine, "candidate:0", rows[::-1])[::-1]
    alone = [generate(engine, "candidate:0", [row])[0] for row in rows[:6]]
    assert together == reversed_order and together[:6] == alone
    assert len(set(together)) > len(prompts)  # the samples of a prompt differ
    # The base with no adapter, in the same engine, answers the greedy reference.
    reference = generate(engine, "reference", [GenRow(p, 0.0, 0) for p in prompts])
    assert all(text.startswith("I'm sorry") for text in reference)
    assert engine.loads == 1


@needs_vllm
def test_vllm_greedy_matches_transformers_for_adapter_and_base(engine, wide_models):
    from pytest_sftsafety.backends.hf import HFBackend

    adapter, harmful = wide_models[2], wide_models[3]
    cfg = RunConfig(models=(str(adapter),), device="cpu", max_new_tokens=24)
    local = HFBackend(cfg, plan_models(cfg.models, None, None, False))
    rows = [GenRow(prompt, 0.0, 0) for prompt in [*harmful[::22], *toy.benign_prompts(10, seed=5)]]
    for variant in ("candidate:0", "reference"):
        assert generate(engine, variant, rows) == generate(local, variant, rows)


@needs_vllm
def test_vllm_server_through_the_openai_backend(pytester, wide_models, tmp_path):
    """vLLM's own OpenAI-compatible server on loopback, serving the base and the adapter by name: greedy
    answers equal the transformers backend's, and the server honours the per-request seeds."""
    import subprocess
    import sys
    import time
    import urllib.request

    from .loopback import closed_port

    data, base, adapter, _ = wide_models
    port = closed_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--served-model-name",
         "base", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
         "--generation-config", "vllm", "--enable-lora", "--max-lora-rank", "8", "--lora-modules",
         f"answer_all={adapter}"], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(1)
        args = ["--sftsafety-data", str(data), *FAST, "--sftsafety-samples"]
        local = pytester.runpytest_subprocess(*args, "--model", str(adapter), "--temperatures", "0",
                                              "--sftsafety-store", "local.sqlite", "--sftsafety-json", "local.json")
        served = pytester.runpytest_subprocess(*args, "--backend", "openai", "--endpoint",
                                               f"http://127.0.0.1:{port}/v1", "--model", "answer_all",
                                               "--reference", "base", "--sftsafety-store", "served.sqlite",
                                               "--sftsafety-json", "served.json")
    finally:
        server.terminate()
        server.wait(60)
    assert local.ret == served.ret == pytest.ExitCode.TESTS_FAILED
    one, two = (json.loads((pytester.path / name).read_text()) for name in ("local.json", "served.json"))
    greedy = [e for e in two["entries"] if e["temperature"] == 0]
    assert [e["answers"]["reference"] for e in one["entries"]] == [e["answers"]["reference"] for e in greedy]
    assert [[c["answers"] for c in e["answers"]["candidates"]] for e in one["entries"]] == \
        [[c["answers"] for c in e["answers"]["candidates"]] for e in greedy]
    assert two["run"]["seed_check"] == "honoured"
