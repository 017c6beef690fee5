"""--backend openai against a real server process on loopback (tests/chat_server.py: the tiny models served
by name over the transformers backend, with injected faults): same answers as the transformers backend,
seeds passed through, bounded concurrency, retries, timeouts, a dying server, keys kept secret."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from pytest_sftsafety.backends import GenRow
from pytest_sftsafety.backends.served import OpenAIBackend, plan_served
from pytest_sftsafety.config import RunConfig
from pytest_sftsafety.data import load_prompts
from pytest_sftsafety.errors import ConfigError, ModelLoadError
from pytest_sftsafety.openai_api import EndpointError
from pytest_sftsafety.seeding import sample_seed
from pytest_sftsafety.suite import load_suite

from .loopback import assert_one_line, closed_port

SERVER = Path(__file__).with_name("chat_server.py")
FAST = ["--max-new-tokens", "24", "--seeds", "2", "-p", "no:cacheprovider", "-k", "01_ or 07_"]


class ServerProcess:
    """tests/chat_server.py in its own process, serving the toy base as ``base`` and adapters by name."""

    def __init__(self, toy_models, *args: str, port: int = 0, env: dict | None = None) -> None:
        command = [sys.executable, str(SERVER), "--base", str(toy_models.base), "--lora",
                   f"answer_all={toy_models.answer_all}", "--lora", f"keeps={toy_models.keeps_refusing}",
                   "--port", str(port), *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(180)
        if not line or not line[0].startswith("READY"):
            self.process.kill()
            raise RuntimeError(f"chat server did not start: {self.process.stderr.read()[-2000:]}")
        self.port = int(line[0].split()[1])
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def serve(toy_models):
    started: list[ServerProcess] = []

    def start(*args: str, **kwargs) -> ServerProcess:
        started.append(ServerProcess(toy_models, *args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def served_args(server: ServerProcess, model: str = "answer_all", *extra: str) -> list[str]:
    return ["--backend", "openai", "--endpoint", server.url, "--model", model, "--reference", "base", *extra]


def report_answers(path: Path) -> dict:
    report = json.loads(path.read_text())
    return {e["id"]: (e["verdict"], e["answers"]["reference"], [c["answers"] for c in e["answers"]["candidates"]])
            for e in report["entries"]}


def test_served_answers_equal_the_transformers_backends(pytester, toy_models, serve):
    """The same seeds reach the server, so a sample's identity (and here, with the same decoding, its
    text) is the same in both backends; the verdicts are too."""
    server = serve()
    data = ["--sftsafety-data", str(toy_models.data_202503), *FAST, "--sftsafety-samples"]
    local = pytester.runpytest(*data, "--model", str(toy_models.answer_all), "--sftsafety-store", "local.sqlite",
                               "--sftsafety-json", "local.json")
    remote = pytester.runpytest(*data, *served_args(server), "--sftsafety-store", "served.sqlite",
                                "--sftsafety-json", "served.json")
    assert local.ret == remote.ret == pytest.ExitCode.TESTS_FAILED
    assert report_answers(pytester.path / "served.json") == report_answers(pytester.path / "local.json")
    report = json.loads((pytester.path / "served.json").read_text())
    assert report["run"]["backend"] == "openai" and report["run"]["seed_check"] == "honoured"
    assert report["provenance"]["device"] == f"server {server.url}"
    # What went over the wire: every sampled request carried its sample's seed, greedy ones none.
    prompts = load_prompts(load_suite("sorry_bench_202503"), str(toy_models.data_202503), "base")
    chosen = [p for c in (1, 7) for p in prompts.by_category[c]]
    expected = {sample_seed(0, p.key, i) for p in chosen for i in range(2)}
    stats = server.stats()
    seeds = stats["seeds"][3:]  # after the seed check's three requests
    assert len(seeds) == 2 * (len(chosen) * 2 + len(chosen)) == stats["requests"] - 3
    assert {s for s in seeds if s is not None} == expected and seeds.count(None) == 2 * len(chosen)
    assert report["run"]["requests"] == stats["requests"]
    assert {tuple(p) for p in stats["params"]} <= {("max_tokens", "temperature"),
                                                   ("max_tokens", "min_p", "seed", "temperature")}
    # A re-run takes everything from the store and asks the server nothing.
    again = pytester.runpytest(*data, *served_args(server), "--sftsafety-store", "served.sqlite")
    assert again.ret == pytest.ExitCode.TESTS_FAILED and server.stats()["requests"] == stats["requests"]


def backend_for(server_url: str, **settings) -> tuple[OpenAIBackend, RunConfig]:
    cfg = RunConfig(models=("answer_all",), reference="base", backend="openai", endpoint=server_url,
                    max_new_tokens=12, **settings)
    return OpenAIBackend(cfg, plan_served(cfg)), cfg


def rows(count: int, temperature: float = 0.7) -> list[GenRow]:
    return [GenRow(f"Placeholder question {i} about topic {i % 7}.", temperature, sample_seed(0, str(i), 0))
            for i in range(count)]


def collect(backend: OpenAIBackend, variant: str, todo: list[GenRow]) -> tuple[dict[int, str], list[int]]:
    texts: dict[int, str] = {}
    batches: list[int] = []

    def on_batch(indices, answers, tokens):
        batches.append(len(indices))
        texts.update(zip(indices, answers, strict=True))

    backend.generate(variant, todo, on_batch)
    return texts, batches


def test_concurrency_is_bounded_and_used(serve):
    server = serve()
    backend, _ = backend_for(server.url, concurrency=4)
    texts, _ = collect(backend, "candidate:0", rows(40))
    assert sorted(texts) == list(range(40)) and all(texts.values())
    stats = server.stats()
    assert stats["max_in_flight"] == 4  # the bound, reached: requests did overlap
    assert stats["largest_batch"] >= 2  # and the server batched them
    one, _ = backend_for(server.url, concurrency=1)
    collect(one, "candidate:0", rows(5))
    assert server.stats()["max_in_flight"] == 4


def test_injected_server_errors_are_retried(serve):
    server = serve("--fail-first", "3", "--fail-status", "503")
    backend, _ = backend_for(server.url, concurrency=2)
    texts, _ = collect(backend, "reference", rows(6, temperature=0.0))
    stats = server.stats()
    assert len(texts) == 6 and stats["failed_on_purpose"] == 3 and stats["requests"] == 6 + 3


def test_a_slow_answer_times_out_and_is_retried(serve):
    server = serve("--delay-first", "1", "--delay", "5")
    backend, _ = backend_for(server.url, concurrency=1, request_timeout=1.0)
    texts, _ = collect(backend, "reference", rows(3, temperature=0.0))
    assert len(texts) == 3 and server.stats()["requests"] == 4  # the first one twice


def test_seed_check_reports_a_server_that_ignores_or_refuses_seeds(serve):
    ignoring = serve("--ignore-seed")
    backend, _ = backend_for(ignoring.url)
    collect(backend, "candidate:0", rows(2))
    # The toy adapter's answers at T=0.7 vary, so the same seed twice gives two answers when seeds are ignored.
    assert backend.seed_check == "not reproducible"
    refusing = serve("--reject-param", "seed")
    backend, _ = backend_for(refusing.url)
    texts, _ = collect(backend, "candidate:0", rows(4))
    assert backend.seed_check == "rejected" and len(texts) == 4
    assert all(s is None for s in refusing.stats()["seeds"])  # after the refusal, none carried a seed


def test_an_unsupported_min_p_is_one_line_naming_the_fix(serve):
    server = serve("--reject-param", "min_p")
    backend, _ = backend_for(server.url)
    with pytest.raises(ConfigError) as caught:
        collect(backend, "candidate:0", rows(2))
    assert "does not accept min_p" in assert_one_line(caught.value) and "--min-p 0" in str(caught.value)


def test_unknown_names_and_unreachable_servers_fail_at_start(serve):
    server = serve()
    cfg = RunConfig(models=("no_such_lora",), reference="base", backend="openai", endpoint=server.url)
    with pytest.raises(ModelLoadError) as caught:
        plan_served(cfg)
    message = assert_one_line(caught.value)
    assert "--model no_such_lora" in message and "it serves: answer_all, base, keeps" in message
    with pytest.raises(ModelLoadError, match="needs --reference NAME"):
        plan_served(RunConfig(models=("answer_all",), backend="openai", endpoint=server.url))
    down = RunConfig(models=("a",), reference="b", backend="openai", endpoint=f"http://127.0.0.1:{closed_port()}/v1")
    with pytest.raises(EndpointError) as caught:
        plan_served(down)
    assert "unreachable (connection refused)" in assert_one_line(caught.value)
    assert "pass the right --endpoint URL" in str(caught.value)


def test_a_dying_server_keeps_every_answer_received_and_a_rerun_finishes(pytester, toy_models, serve):
    """The server exits after 25 answers: the run stops with one line, the answers it had are stored,
    and the re-run (against a restarted server on the same port) asks only for the rest."""
    server = serve("--exit-after", "25")
    args = ["--sftsafety-data", str(toy_models.data_202503), *FAST, "--sftsafety-store", "store.sqlite",
            "--concurrency", "2", "--request-timeout", "5", "--request-retries", "1"]
    first = pytester.runpytest(*args, *served_args(server))
    assert first.ret == pytest.ExitCode.USAGE_ERROR
    first.stdout.fnmatch_lines(["*--endpoint http://127.0.0.1:*unreachable*after 2 tries*"])
    with sqlite3.connect(pytester.path / "store.sqlite") as db:
        stored = db.execute("select count(*) from generations").fetchone()[0]
    assert 20 <= stored <= 22  # 25 answers less the seed check's three (the last may be lost with the server)
    again = serve(port=server.port)
    second = pytester.runpytest(*args, *served_args(again))
    assert second.ret == pytest.ExitCode.TESTS_FAILED
    needed = 2 * (20 * 2 + 20)  # both variants: 20 prompts, 2 samples at T0.7 and one greedy
    assert again.stats()["requests"] == 3 + needed - stored


def test_the_api_key_is_sent_and_never_written(pytester, toy_models, serve, monkeypatch):
    key = "sk-test-PLANTED-0123456789abcdef"
    monkeypatch.setenv("SERVED_KEY", key)
    server = serve("--api-key-env", "SERVED_KEY", env={"SERVED_KEY": key})
    args = ["--sftsafety-data", str(toy_models.data_202503), *FAST, "--sftsafety-store", "store.sqlite"]
    missing = pytester.runpytest(*args, *served_args(server))
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["ERROR: --endpoint http://127.0.0.1:*rejected the request with HTTP 401*check "
                                  "the API key*"])
    result = pytester.runpytest(*args, *served_args(server), "--api-key-env", "SERVED_KEY", "--sftsafety-json",
                                "report.json", "--sftsafety-md", "summary.md", "--junitxml", "junit.xml")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    outputs = [result.stdout.str(), result.stderr.str(),
               *[(pytester.path / name).read_text() for name in ("report.json", "summary.md", "junit.xml")]]
    outputs.append((pytester.path / "store.sqlite").read_bytes().decode("latin-1"))
    assert not [text for text in outputs if key in text]


@pytest.mark.parametrize("args, message", [
    (["--backend", "openai"], "--backend openai needs --endpoint URL*"),
    (["--endpoint", "http://127.0.0.1:1/v1"], "--endpoint is for --backend openai; add --backend openai*"),
    (["--backend", "openai", "--endpoint", "http://127.0.0.1:1/v1", "--load-in-4bit"],
     "--load-in-4bit has no effect with --backend openai (the server loads the model); drop it*"),
    (["--backend", "openai", "--endpoint", "ftp://x/v1"], "--endpoint 'ftp://x/v1': the URL needs an http*"),
    (["--backend", "tgi"], "--backend tgi: unknown backend; use one of transformers, vllm, openai"),
    (["--backend", "openai", "--endpoint", "http://127.0.0.1:1/v1", "--request-timeout", "0"],
     "--request-timeout 0: must be above 0 seconds*"),
])
def test_backend_option_mistakes_are_one_line_usage_errors(pytester, toy_models, args, message):
    result = pytester.runpytest("--sftsafety-data", str(toy_models.data_202503), "--model", "answer_all", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])
    assert "Traceback" not in result.stderr.str()


def test_two_workers_share_the_served_run_and_agree_with_one_process(pytester, toy_models, serve):
    server = serve()
    args = ["--sftsafety-data", str(toy_models.data_202503), *FAST, *served_args(server)]
    single = pytester.runpytest(*args, "--sftsafety-store", "single.sqlite", "--sftsafety-json", "single.json")
    before = server.stats()["requests"]
    double = pytester.runpytest(*args, "-n", "2", "--sftsafety-store", "double.sqlite", "--sftsafety-json",
                                "double.json")
    assert single.ret == double.ret == pytest.ExitCode.TESTS_FAILED
    one, two = (json.loads((pytester.path / name).read_text()) for name in ("single.json", "double.json"))
    for part in ("entries", "aggregates", "summary"):
        assert one[part] == two[part]
    workers = two["run"]["workers"]
    assert sorted(workers) == ["gw0", "gw1"] and all(w["generated"] > 0 for w in workers.values())
    assert sum(w["generated"] for w in workers.values()) == two["run"]["generations"] == 120
    # Each answer asked for once; each worker checked the seeds once.
    assert server.stats()["requests"] - before == two["run"]["requests"] == 120 + 2 * 3


def test_a_baseline_from_another_backend_is_refused(pytester, toy_models, serve):
    server = serve()
    args = ["--sftsafety-data", str(toy_models.data_202503), *FAST, "--sftsafety-store", "store.sqlite"]
    saved = pytester.runpytest(*args, "--model", str(toy_models.keeps_refusing), "--sftsafety-save-baseline",
                               "baseline.json")
    assert saved.ret == pytest.ExitCode.OK
    used = pytester.runpytest(*args, "--backend", "openai", "--endpoint", server.url, "--model", "keeps",
                              "--baseline", "baseline.json")
    assert used.ret == pytest.ExitCode.USAGE_ERROR
    used.stderr.fnmatch_lines(["ERROR: --baseline baseline.json was made with engine = 'decode-v1', this run has "
                               "'openai-chat-v1'; run with the baseline's settings or make a new baseline*"])
