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
import urllib.request
from pathlib import Path

import pytest

from pytest_sftsafety.backends import GenRow
from pytest_sftsafety.backends.openai_api import EndpointError
from pytest_sftsafety.backends.served import OpenAIBackend, plan_served
from pytest_sftsafety.config import RunConfig
from pytest_sftsafety.data import load_prompts
from pytest_sftsafety.errors import ConfigError, ModelLoadError
from pytest_sftsafety.seeding import sample_seed
from pytest_sftsafety.suite import load_suite

from .chat_server import launch
from .conftest import ctrl_c_works
from .loopback import assert_one_line, closed_port

FAST = ["--max-new-tokens", "24", "--seeds", "2", "-p", "no:cacheprovider", "-k", "01_ or 07_"]


class ServerProcess:
    """tests/chat_server.py in its own process, serving the toy base as ``base`` and adapters by name."""

    def __init__(self, toy_models, *args: str, port: int = 0, env: dict | None = None) -> None:
        self.process, self.port = launch(
            ["--base", str(toy_models.base), "--lora", f"answer_all={toy_models.answer_all}", "--lora",
             f"keeps={toy_models.keeps_refusing}", "--port", str(port), *args], timeout_s=180,
            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
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
    assert {tuple(p) for p in stats["params"][3:]} == {("max_tokens", "temperature"),
                                                       ("max_tokens", "min_p", "seed", "temperature", "top_p")}
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


@pytest.mark.slow  # two real runs against a served model: half a minute on 2 cores
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
    """Not even when the server echoes it in every answer, nor when the endpoint's path holds it (a gateway
    that takes the key in its URL): answers are stored, judged and reported with it redacted, and the
    endpoint the report records too."""
    key = "sk-test-PLANTED-0123456789abcdef"
    monkeypatch.setenv("SERVED_KEY", key)
    server = serve("--api-key-env", "SERVED_KEY", "--echo-key", env={"SERVED_KEY": key})
    args = ["--sftsafety-data", str(toy_models.data_202503), *FAST, "--sftsafety-store", "store.sqlite"]
    missing = pytester.runpytest(*args, *served_args(server))
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    missing.stderr.fnmatch_lines(["ERROR: --endpoint http://127.0.0.1:*rejected the request with HTTP 401*check "
                                  "the API key*"])
    gateway = f"http://127.0.0.1:{server.port}/{key}/v1"
    result = pytester.runpytest(*args, *served_args(server), "--endpoint", gateway, "--api-key-env", "SERVED_KEY",
                                "--sftsafety-samples", "--sftsafety-json", "report.json", "--sftsafety-md",
                                "summary.md", "--junitxml", "junit.xml")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    outputs = [result.stdout.str(), result.stderr.str(),
               *[(pytester.path / name).read_text() for name in ("report.json", "summary.md", "junit.xml")]]
    with sqlite3.connect(pytester.path / "store.sqlite") as db:
        db.execute("PRAGMA wal_checkpoint(FULL)")  # every answer in the file itself, none left in the WAL
        stored = [row[0] for row in db.execute("select response from generations")]
    outputs += [path.read_bytes().decode("latin-1") for path in pytester.path.glob("store.sqlite*")]
    assert not [text for text in outputs if key in text]
    # The echo really happened, and what the run kept says so.
    assert len(stored) == 120 and all(text.endswith("(your key: [redacted])") for text in stored)
    report = json.loads((pytester.path / "report.json").read_text())
    assert report["run"]["redacted_answers"] == 120 and report["run"]["unencodable_answers"] == 0
    assert report["provenance"]["device"] == f"server http://127.0.0.1:{server.port}/[redacted]/v1"
    answers = [a for e in report["entries"] for sample in e["answers"]["reference"] for a in sample]
    assert answers and all(a.endswith("(your key: [redacted])") for a in answers)
    result.stdout.fnmatch_lines(["*120 answers quoted a key or a credential in a URL*stored and judged with it "
                                 "redacted*"])
    assert "120 answers quoted a key" in (pytester.path / "summary.md").read_text()


@pytest.mark.parametrize("endpoint", ["/v1?api_key=SECRET-in-query-1", "/v1?key=SECRET-in-query-1",
                                      "/v1?model=x&token=SECRET-in-query-1"])
def test_a_key_in_the_endpoints_query_string_is_refused_without_echoing_it(pytester, toy_models, endpoint):
    url = f"http://127.0.0.1:{closed_port()}{endpoint}"
    result = pytester.runpytest("--sftsafety-data", str(toy_models.data_202503), "--backend", "openai",
                                "--endpoint", url, "--model", "a", "--reference", "b")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --endpoint 'http://127.0.0.1:*/v1?*=*': the URL must not have a query or "
                                 "fragment; give the base URL, e.g. http://127.0.0.1:8000/v1, and pass a key through "
                                 "the environment, never in the URL"])
    assert "SECRET-in-query-1" not in result.stdout.str() + result.stderr.str()


def test_a_lone_surrogate_in_served_answers_is_replaced_counted_and_the_run_completes(pytester, toy_models, serve):
    """A server may send half of a UTF-16 pair as the JSON escape \\ud800 (a cut emoji). It is the model's
    answer, not the user's input: stored and judged with U+FFFD in its place, counted and noted, and the
    gate gives the verdict the model deserves (once: an encoding error in the store, and exit 1)."""
    server = serve("--append-json", '" \\ud800"')
    args = ["--sftsafety-data", str(toy_models.data_202503), *FAST, "--sftsafety-store", "store.sqlite",
            *served_args(server, "keeps"), "--sftsafety-samples", "--sftsafety-json", "report.json",
            "--sftsafety-md", "summary.md", "--junitxml", "junit.xml"]
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-2000:]
    raw = (pytester.path / "report.json").read_bytes()
    report = json.loads(raw.decode("utf-8"))  # strict UTF-8
    assert "\\ud800" not in raw.decode("utf-8")
    assert {e["verdict"] for e in report["entries"]} <= {"PASS", "FLAKY"}
    assert report["run"]["unencodable_answers"] == report["run"]["generated"] == 120
    answers = [a for e in report["entries"] for sample in e["answers"]["candidates"][0]["answers"] for a in sample]
    assert answers and all(a.endswith(" \ufffd") for a in answers)
    with sqlite3.connect(pytester.path / "store.sqlite") as db:
        db.text_factory = bytes  # the bytes as stored, decoded strictly below
        stored = [row[0].decode("utf-8") for row in db.execute("select response from generations")]
    assert len(stored) == 120 and all(text.endswith(" \ufffd") for text in stored)
    result.stdout.fnmatch_lines(["*120 answers held lone surrogates*stored and judged with U+FFFD in their place*"])
    (pytester.path / "summary.md").read_text(encoding="utf-8")
    # A re-run takes the cleaned answers from the store and agrees.
    again = pytester.runpytest(*args[:-6], "--sftsafety-json", "again.json")
    assert again.ret == pytest.ExitCode.OK
    rerun = json.loads((pytester.path / "again.json").read_text())
    assert rerun["run"]["generated"] == 0 and rerun["entries"] == report["entries"]


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


def test_content_filtered_answers_are_counted_and_not_stored(pytester, toy_models, serve):
    """An endpoint's content filter is not the model: its withheld answers are judged as empty, counted
    and noted in every report, and asked for again next run."""
    server = serve("--filter-prompt", "Violent Crimes")
    args = ["--sftsafety-data", str(toy_models.data_202503), *FAST, "--sftsafety-store", "store.sqlite",
            *served_args(server)]
    result = pytester.runpytest(*args, "--sftsafety-json", "report.json", "--sftsafety-md", "summary.md")
    report = json.loads((pytester.path / "report.json").read_text())
    filtered = 2 * (10 * 2 + 10)  # category 7, both variants, both temperatures
    assert report["run"]["content_filtered"] == filtered
    result.stdout.fnmatch_lines([f"the endpoint's content filter withheld {filtered} answers*"])
    assert f"content filter withheld {filtered} answers" in (pytester.path / "summary.md").read_text()
    with sqlite3.connect(pytester.path / "store.sqlite") as db:
        assert db.execute("select count(*) from generations").fetchone()[0] == 120 - filtered
    before = server.stats()["requests"]
    pytester.runpytest(*args)
    assert server.stats()["requests"] - before == 3 + filtered  # the seed check, then only the withheld ones


def test_a_redirect_is_an_error_and_the_key_does_not_follow_it(loopback, monkeypatch):
    from .loopback import LoopbackServer

    elsewhere = LoopbackServer().start()
    try:
        loopback.respond = lambda index, call: (307, {"Location": f"{elsewhere.url}/v1/models"}, {})
        monkeypatch.setenv("SERVED_KEY", "sk-PLANTED-redirect-key")
        cfg = RunConfig(models=("a",), reference="b", backend="openai", endpoint=f"{loopback.url}/v1",
                        api_key_env="SERVED_KEY")
        with pytest.raises(EndpointError) as caught:
            plan_served(cfg)
        assert "HTTP 307" in assert_one_line(caught.value) and "redirects elsewhere" in str(caught.value)
        assert loopback.calls[0].headers["authorization"] == "Bearer sk-PLANTED-redirect-key"
        assert elsewhere.calls == []
    finally:
        elsewhere.close()


def test_no_key_is_sent_unless_a_variable_is_named(loopback, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-PLANTED-openai-key")
    loopback.respond = lambda index, call: (200, {}, {"data": [{"id": "a"}, {"id": "b"}]})
    plan_served(RunConfig(models=("a",), reference="b", backend="openai", endpoint=f"{loopback.url}/v1"))
    assert "authorization" not in loopback.calls[0].headers


INTERRUPTED = """
import sys, time
from pytest_sftsafety.backends import GenRow
from pytest_sftsafety.backends.served import OpenAIBackend, plan_served
from pytest_sftsafety.config import RunConfig
cfg = RunConfig(models=("a",), reference="b", backend="openai", endpoint=sys.argv[1], concurrency=2,
                request_timeout=60)
backend = OpenAIBackend(cfg, plan_served(cfg))
received = []
print("GENERATING", flush=True)
try:
    backend.generate("candidate:0", [GenRow(f"q{i}", 0.0, 0) for i in range(6)],
                     lambda indices, texts, tokens: received.extend(indices))
finally:
    print("RECEIVED", sorted(received), flush=True)
"""


@pytest.mark.parametrize("how", ["sigint", "failure"])
def test_an_interrupt_or_a_failure_does_not_wait_for_requests_in_flight(loopback, tmp_path, how):
    """Requests still in flight (here: answered after 60 s) must not hold the process: after Ctrl-C, or
    after another request failed, it exits at once, with the answers it had received handed over."""
    import time

    def respond(index, call):
        if call.path.endswith("/models"):
            return 200, {}, {"data": [{"id": "a"}, {"id": "b"}]}
        if call.body["messages"][0]["content"] == "q0":
            return 200, {}, {"choices": [{"message": {"content": "done"}, "finish_reason": "stop"}]}
        if how == "failure" and call.body["messages"][0]["content"] == "q1":
            return 400, {}, {"error": {"message": "bad request"}}
        return 200, {}, {"choices": [{"message": {"content": "late"}, "finish_reason": "stop"}]}

    def delay(index, call):
        text = (call.body or {}).get("messages", [{}])[0].get("content")
        if how == "failure" and text == "q1":
            return 2.0  # fails after q0's answer has arrived, so that answer must be handed over
        return 0.0 if text in (None, "q0") else 60.0

    loopback.respond, loopback.delay = respond, delay
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, str(script), f"{loopback.url}/v1"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
                               preexec_fn=ctrl_c_works)
    assert process.stdout.readline().strip() == "GENERATING"
    if how == "sigint":
        time.sleep(1.5)
        process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert time.monotonic() - started < 15, "waited for requests in flight"
    assert "RECEIVED [0]" in out
    assert ("KeyboardInterrupt" if how == "sigint" else "rejected the request with HTTP 400") in err


def test_a_backend_is_released_before_a_local_judge_model_loads(toy_models, judge_standins, tmp_path):
    """vLLM keeps most of the GPU: a backend that can free its model does so before a local judge model
    (which needs the device) scores, and keeps it for judges that need none."""
    from pytest_sftsafety.backends.checkpoints import plan_models
    from pytest_sftsafety.backends.hf import HFBackend
    from pytest_sftsafety.judges import make_judge
    from pytest_sftsafety.runner import run
    from pytest_sftsafety.store import Store

    events: list[str] = []

    class Releasing(HFBackend):
        def release(self) -> None:
            events.append("release")
            self._unload()

    cfg = RunConfig(models=(str(toy_models.keeps_refusing),), temperatures=(0.0,), max_new_tokens=8, device="cpu")
    prompts = load_prompts(load_suite("sorry_bench_202503"), str(toy_models.data_202503), "base")
    plan = plan_models(cfg.models, None, None, False)
    for name, released in ((f"sorry-bench:{judge_standins.scores}", True), ("learned", False)):
        events.clear()
        judge = make_judge(name, cfg)
        score = judge.score
        judge.score = lambda p, r, score=score: (events.append("judge"), score(p, r))[1]
        store = Store(tmp_path / f"{released}.sqlite")
        try:
            run(cfg, prompts, [(1, 0.0)], plan, lambda: Releasing(cfg, plan), judge, store)
        finally:
            store.close()
        assert events[0] == ("release" if released else "judge") and "judge" in events


def test_an_answer_whose_content_is_not_text_is_an_error_not_its_repr():
    """A chat answer's content is text or a list of text parts; a JSON object there would be judged as its
    Python repr, an answer the model never gave."""
    from pytest_sftsafety.backends.openai_api import _reply

    def document(content):
        return {"choices": [{"message": {"content": content}, "finish_reason": "stop"}]}

    assert _reply(document([{"type": "text", "text": "I can"}, {"type": "text", "text": "not."}, {"text": 7}]),
                  "the server").text == "I cannot."
    with pytest.raises(EndpointError, match=r"^the server answered with content that is a JSON dict, not text"):
        _reply(document({"refusal": "no"}), "the server")
