"""pytest-xdist runs: one report equal to a single-process run, one model load per worker, a killed
worker's work taken over, GPU groups handed to workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from pytest_sftsafety.distributed import (
    Worker,
    auto_workers,
    check_gpu_workers,
    claimable,
    pin_gpus,
    pin_worker_specs,
    process_alive,
    run_shards,
    shard_cells,
    visible_gpus,
)
from pytest_sftsafety.errors import ConfigError
from pytest_sftsafety.report import comparable
from pytest_sftsafety.store import Claim, Store

ARGS = ["--max-new-tokens", "24", "--seeds", "2", "--temperatures", "0,0.7", "-p", "no:cacheprovider", "-q"]
# Runs of several pytest processes (each importing torch) take a minute each on 2 cores: `pytest -m slow`
# (CI runs them after the default run).
SEVERAL_PROCESSES = pytest.mark.slow

# Loaded into every process of the run: worker gw0 kills itself (SIGKILL, no clean-up) right after
# committing its second batch, as an out-of-memory kill or a lost node would.
KILL_GW0 = """
import os, signal
from pytest_sftsafety import store as store_module

original = store_module.Store.put_generations
committed = []

def put_generations(self, rows):
    original(self, rows)
    if os.environ.get("PYTEST_XDIST_WORKER") == "gw0":
        committed.append(len(rows))
        if len(committed) == 2:
            open("gw0_committed.txt", "w").write(str(sum(committed)))
            os.kill(os.getpid(), signal.SIGKILL)

store_module.Store.put_generations = put_generations
"""

# Worker gw0's second batch fails the way an out-of-memory error at batch size 1 does.
FAIL_GW0 = """
import os
from pytest_sftsafety.backends import hf
from pytest_sftsafety.errors import ModelLoadError

original = hf.decode
calls = []

def decode(*args, **kwargs):
    if os.environ.get("PYTEST_XDIST_WORKER") == "gw0":
        calls.append(1)
        if len(calls) == 2:
            raise ModelLoadError("out of memory generating a single answer on cuda:0; use --load-in-4bit")
    return original(*args, **kwargs)

hf.decode = decode
"""

HEAVY_MODULES = """
import os, sys

def pytest_sessionfinish(session):
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    open(f"heavy_{worker}.txt", "w").write("\\n".join(heavy))
"""

RECORD_GPUS = """
import os

def pytest_sessionstart(session):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    open(f"gpus_{worker}.txt", "w").write(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
"""


def run(pytester, toy_models, *args):
    return pytester.runpytest("--model", str(toy_models.answer_all), "--sftsafety-data",
                              str(toy_models.data_202503), *ARGS, *args)


@SEVERAL_PROCESSES
def test_two_workers_give_the_single_process_report_and_load_the_model_once_each(pytester, toy_models,
                                                                                   monkeypatch):
    import pytest_sftsafety.progress as progress

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.2)
    single = run(pytester, toy_models, "--sftsafety-store", "single.sqlite", "--sftsafety-json", "single.json")
    # --dist loadscope sends every item to one worker: both must still generate a share.
    double = run(pytester, toy_models, "-n", "2", "--dist", "loadscope", "--sftsafety-store", "double.sqlite",
                 "--sftsafety-json", "double.json", "-v")  # -v undoes ARGS' -q, which silences progress lines
    assert single.ret == double.ret == pytest.ExitCode.TESTS_FAILED
    assert single.parseoutcomes() == double.parseoutcomes()
    one = json.loads((pytester.path / "single.json").read_text())
    two = json.loads((pytester.path / "double.json").read_text())
    assert comparable(one) == comparable(two)
    workers = two["run"]["workers"]
    assert sorted(workers) == ["gw0", "gw1"]
    assert all(w["model_loads"] == 1 for w in workers.values())
    assert all(w["generated"] > 0 for w in workers.values())  # both did a share, nothing twice:
    assert sum(w["generated"] for w in workers.values()) == two["run"]["generations"] == 440 * 3 * 2
    # While the workers generate, the controller says how far they are.
    double.stdout.fnmatch_lines(["sftsafety: the workers have stored * new answers (*/s)", "*sftsafety*",
                                 "SORRY-Bench 2025-03: 98 tests, * regressions*"])
    assert "Loading weights" not in double.stdout.str()  # no loading bars in the captured output
    assert "JSON report:" in double.stdout.str()

    # The same run again over the two workers' store: nothing to generate, same report, and no process
    # (controller or worker) imports torch.
    pytester.makeconftest(HEAVY_MODULES)
    warm = pytester.runpytest_subprocess("--model", str(toy_models.answer_all), "--sftsafety-data",
                                         str(toy_models.data_202503), *ARGS, "-n", "2", "--sftsafety-store",
                                         "double.sqlite", "--sftsafety-json", "warm.json", "--testrunuid", "same")
    assert warm.ret == pytest.ExitCode.TESTS_FAILED
    again = json.loads((pytester.path / "warm.json").read_text())
    assert again["run"]["generated"] == 0 and comparable(again)["entries"] == comparable(two)["entries"]
    for process in ("main", "gw0", "gw1"):
        assert (pytester.path / f"heavy_{process}.txt").read_text() == "", process
    # xdist's run id can be fixed across runs; --sftsafety-fresh must still regenerate everything.
    pytester.makeconftest("")
    fresh = run(pytester, toy_models, "-n", "2", "--sftsafety-store", "double.sqlite", "--sftsafety-json",
                "fresh.json", "--testrunuid", "same", "--sftsafety-fresh")
    assert fresh.ret == pytest.ExitCode.TESTS_FAILED
    assert json.loads((pytester.path / "fresh.json").read_text())["run"]["generated"] == 440 * 3 * 2


@SEVERAL_PROCESSES
def test_adaptive_seeding_over_workers_matches_one_process(pytester, toy_models):
    # At a strict alpha the complete drops in 10 prompts are FLAKY at first, and get more samples.
    extra = ["--seeds", "1", "--max-seeds", "4", "--temperatures", "0.7", "--alpha", "0.0001",
             "-k", "01_ or 02_ or 03_ or 04_"]
    single = run(pytester, toy_models, *extra, "--sftsafety-store", "a.sqlite", "--sftsafety-json", "single.json")
    double = run(pytester, toy_models, *extra, "-n", "2", "--sftsafety-store", "b.sqlite", "--sftsafety-json",
                 "double.json")
    assert single.ret == double.ret
    one = json.loads((pytester.path / "single.json").read_text())
    two = json.loads((pytester.path / "double.json").read_text())
    assert one["run"]["adaptive"]["retested"] > 0
    assert comparable(one) == comparable(two)


@SEVERAL_PROCESSES
def test_a_killed_worker_loses_only_its_item_in_flight_and_the_rerun_comes_from_the_store(pytester, toy_models):
    pytester.makeconftest(KILL_GW0)
    crashed = run(pytester, toy_models, "-n", "2", "--batch-size", "8", "--sftsafety-store", "store.sqlite",
                  "--sftsafety-json", "crashed.json")
    output = crashed.stdout.str()
    assert "worker 'gw0' crashed while running" in output
    assert crashed.ret == pytest.ExitCode.INTERNAL_ERROR  # a crashed worker is the run's fault, not the model's
    committed = int((pytester.path / "gw0_committed.txt").read_text())
    assert 0 < committed <= 16  # two batches of at most 8 made it to the store before the kill
    report = json.loads((pytester.path / "crashed.json").read_text())
    workers = report["run"]["workers"]
    assert report["run"]["incomplete"] is True and len(report["run"]["faults"]) == 1  # the item in flight
    assert "gw0" not in workers and "gw1" in workers  # gw1 (and gw0's replacement) finished the run
    # Nothing generated twice: what survived of gw0 was taken over, not redone.
    assert sum(w["generated"] for w in workers.values()) == 440 * 3 * 2 - committed

    pytester.makeconftest("")
    rerun = run(pytester, toy_models, "--sftsafety-store", "store.sqlite", "--sftsafety-json", "rerun.json")
    again = json.loads((pytester.path / "rerun.json").read_text())
    assert again["run"]["generated"] == 0 and again["run"]["model_loads"] == 0
    assert comparable(again)["entries"] == comparable(report)["entries"]
    assert rerun.ret == pytest.ExitCode.TESTS_FAILED


@SEVERAL_PROCESSES
def test_a_worker_whose_generation_fails_fails_one_item_and_the_others_finish_its_shard(pytester, toy_models):
    single = run(pytester, toy_models, "--sftsafety-store", "single.sqlite", "--sftsafety-json", "single.json")
    pytester.makeconftest(FAIL_GW0)
    result = run(pytester, toy_models, "-n", "2", "--sftsafety-store", "store.sqlite", "--sftsafety-json", "r.json")
    result.stdout.fnmatch_lines(["*sftsafety: generation failed in worker gw0 (ModelLoadError: out of memory "
                                 "generating a single answer on cuda:0*); another worker finished its shard*"])
    assert "crashed" not in result.stdout.str()
    expected = single.parseoutcomes()
    got = result.parseoutcomes()
    # One test that passed alone now fails with the cause; every other outcome is the same.
    assert sum(got.values()) == sum(expected.values()) and got.get("failed", 0) - expected["failed"] <= 1
    report = json.loads((pytester.path / "r.json").read_text())
    assert comparable(report)["entries"] == comparable(json.loads((pytester.path / "single.json").read_text()))[
        "entries"]
    assert set(report["run"]["workers"]) == {"gw0", "gw1"}
    # gw0's batch before the failure counts, and nothing was generated twice.
    assert report["run"]["workers"]["gw0"]["generated"] > 0
    assert sum(w["generated"] for w in report["run"]["workers"].values()) == 440 * 3 * 2


@SEVERAL_PROCESSES
def test_workers_are_pinned_to_their_gpu_group(pytester, toy_models, monkeypatch):
    pytester.makeconftest(RECORD_GPUS)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    # -n auto: one worker per GPU (-v undoes ARGS' -q, which hides xdist's worker count).
    auto = run(pytester, toy_models, "-n", "auto", "--device", "cuda", "-k", "overall", "-v")
    auto.stdout.fnmatch_lines(["created: 3/3 workers"])
    assert [(pytester.path / f"gpus_gw{i}.txt").read_text() for i in range(3)] == ["3", "5", "7"]
    assert (pytester.path / "gpus_main.txt").read_text() == "3,5,7"  # the controller's mask is untouched
    # No GPU here (either no NVIDIA device, or one that this CPU build of torch cannot use): the items fail
    # with the cause, no worker crashes, and since every worker failed to load, the run ends as a single
    # process would: a usage error.
    auto.stdout.re_match_lines([r".*--device cuda: (this machine has no visible GPU|a GPU is visible but).*"])
    assert "crashed" not in auto.stdout.str()
    assert auto.ret == pytest.ExitCode.USAGE_ERROR
    paired = run(pytester, toy_models, "-n", "auto", "--gpus-per-worker", "2", "--device", "cuda", "-k",
                 "overall and T0.7", "-v")
    paired.stdout.fnmatch_lines(["created: 1/1 worker"])
    assert (pytester.path / "gpus_gw0.txt").read_text() == "3,5"

    too_many = run(pytester, toy_models, "-n", "2", "--gpus-per-worker", "2", "--device", "cuda")
    assert too_many.ret == pytest.ExitCode.USAGE_ERROR
    too_many.stderr.fnmatch_lines(["*2 worker(s) x --gpus-per-worker 2 need 4 GPUs, but the visible devices are "
                                   "3,5,7; use -n 1 (or -n auto), or --device cpu*"])
    named = run(pytester, toy_models, "-n", "2", "--device", "cuda:1")
    assert named.ret == pytest.ExitCode.USAGE_ERROR
    named.stderr.fnmatch_lines(["*--device cuda:1 names one GPU, but with -n each worker gets its own*"])


# -- units -----------------------------------------------------------------------------------------
def test_visible_gpus_follow_the_mask_and_stop_where_cuda_stops(tmp_path):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5,7"}, tmp_path) == ["3", "5", "7"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,4"}, tmp_path) == ["2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, tmp_path) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1a2b, GPU-3c4d"}, tmp_path) == ["GPU-1a2b", "GPU-3c4d"]
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert visible_gpus({}, tmp_path) == ["0", "1"]


def test_gpus_per_worker_on_the_cpu_is_a_usage_error_not_ignored():
    with pytest.raises(ConfigError, match=r"^--gpus-per-worker 2: this run does not place models on GPUs \(--device "
                                          r"cpu\); drop the option, or run with --device cuda where GPUs are visible$"):
        pin_gpus("cpu", "transformers", 2, 0, [])
    assert pin_gpus("cpu", "transformers", 1, 2, ["popen", "popen"]) is None  # the default: nothing to pin


def test_gpu_groups_index_into_the_mask_and_never_past_it():
    groups = check_gpu_workers(["3", "5", "7"], 1, 2)
    assert pin_worker_specs(["popen", "popen"], groups) == ["popen//env:CUDA_VISIBLE_DEVICES=3",
                                                            "popen//env:CUDA_VISIBLE_DEVICES=5"]
    assert check_gpu_workers(["3", "5", "7", "9"], 2, 2) == [("3", "5"), ("7", "9")]
    assert pin_worker_specs(["popen", "popen"], [("3", "5"), ("7", "9")])[1] == "popen//env:CUDA_VISIBLE_DEVICES=7,9"
    assert pin_worker_specs(["ssh=gpu-box", "popen"], [("3",), ("5",)]) == ["ssh=gpu-box",
                                                                            "popen//env:CUDA_VISIBLE_DEVICES=3"]
    with pytest.raises(ConfigError, match=r"need 4 GPUs, but the visible devices are 3,5,7; use -n 1"):
        check_gpu_workers(["3", "5", "7"], 2, 2)
    with pytest.raises(ConfigError, match=r"visible devices are \(none\); use --gpus-per-worker 1, or --device cpu"):
        check_gpu_workers([], 1, 1)


def test_auto_workers_one_per_gpu_group_else_one_per_two_cores():
    assert auto_workers(8, 64) == 8
    assert auto_workers(0, 2) == 1 and auto_workers(0, 16) == 8 and auto_workers(0, 1) == 1


def test_shards_are_whole_categories_of_balanced_cost():
    cells = [(c, t) for c in range(1, 8) for t in (0.0, 0.7)]
    cost = {1: 50, 2: 10, 3: 10, 4: 10, 5: 10, 6: 5, 7: 5}
    shards = shard_cells(cells, lambda cell: cost[cell[0]], 2)
    assert sorted(c for shard in shards for c in shard) == sorted(cells)
    assert [{c for c, _ in shard} for shard in shards] == [{1}, {2, 3, 4, 5, 6, 7}]
    assert shard_cells(cells[:2], lambda cell: 1, 4) == [cells[:2]]  # never more shards than categories


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_claims_of_dead_or_failed_owners_are_taken_over(tmp_path):
    host = "here"
    now = time.time()
    assert claimable(None, host, now)
    assert not claimable(Claim("gw0", host, os.getpid(), now, "running"), host, now)
    assert claimable(Claim("gw0", host, dead_pid(), now, "running"), host, now)
    assert claimable(Claim("gw0", "elsewhere", 1, now - 500, "running"), host, now, stale_after_s=120)
    assert not claimable(Claim("gw0", "elsewhere", 1, now - 5, "running"), host, now, stale_after_s=120)
    assert claimable(Claim("gw0", host, os.getpid(), now, "failed"), host, now)
    assert not claimable(Claim("gw0", host, dead_pid(), now, "done"), host, now)
    assert process_alive(os.getpid()) and not process_alive(dead_pid())
    # The clock set an hour forward: a live worker on this host keeps its shard (one elsewhere cannot be told).
    assert not claimable(Claim("gw0", host, os.getpid(), now, "running"), host, now + 3600, stale_after_s=120)


def test_a_failed_worker_gives_up_on_time_when_the_clock_jumps_back(tmp_path, monkeypatch):
    import pytest_sftsafety.distributed as distributed

    real = time.time
    calls = iter(range(10**6))
    # Every reading of the wall clock an hour further back than the last: a wait timed by it never ends.
    monkeypatch.setattr(distributed.time, "time", lambda: real() - 3600 * next(calls))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="out of memory"):
        run_shards(Store(tmp_path / "store.sqlite"), "jump", 1, Worker("gw0", 0, 1, "run"), boom, poll_s=0.05,
                   takeover_wait_s=0.3)
    assert time.monotonic() - started < 10


def test_run_shards_takes_over_a_dead_owner_and_waits_for_a_live_one(tmp_path):
    path = tmp_path / "store.sqlite"
    store, other = Store(path), Store(path)
    import socket

    host = socket.gethostname()
    # Shard 1 belongs to a process that died mid-shard; shard 2 to a live worker that finishes soon.
    assert other.try_claim("stage", 1, "gw1", host, dead_pid(), None)
    assert other.try_claim("stage", 2, "gw2", host, os.getpid(), None)
    finisher = threading.Timer(0.5, lambda: Store(path).finish_claim("stage", 2, "gw2", "done"))
    finisher.start()
    done: list[int] = []
    started = time.monotonic()
    outcome = run_shards(store, "stage", 3, Worker("gw0", 0, 3, "run"), lambda shard: done.append(shard) or shard,
                         poll_s=0.05)
    finisher.join()
    assert done == [0, 1] and outcome.results == [0, 1] and outcome.failure is None
    assert time.monotonic() - started >= 0.5  # it waited for the live owner instead of redoing its shard
    assert {s: c.state for s, c in store.claims("stage").items()} == {0: "done", 1: "done", 2: "done"}


def boom(shard: int) -> None:
    raise RuntimeError("out of memory")


def test_a_failed_shard_is_taken_over_and_its_worker_waits_for_the_run(tmp_path):
    path = tmp_path / "store.sqlite"
    store = Store(path)
    # Alone, a worker whose shard failed gives up once nobody takes it over, with its own error; every
    # shard was claimed, so it does not wait for a worker that may still be starting (give_up_s).
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="out of memory"):
        run_shards(store, "alone", 1, Worker("gw0", 0, 1, "run"), boom, poll_s=0.05, give_up_s=60,
                   takeover_wait_s=0.3)
    assert time.monotonic() - started < 10
    failed = store.claims("alone")[0]
    assert (failed.state, failed.message) == ("failed", "RuntimeError: out of memory")
    assert run_shards(store, "alone", 1, Worker("gw1", 1, 1, "run"), lambda shard: "redone").results == ["redone"]

    # With a healthy worker beside it, the failed worker's shard is finished by that worker, and the
    # failed one returns (naming its failure) once the stage is complete.
    healthy: list[int] = []

    def second_worker() -> None:
        time.sleep(0.3)  # starts late: the failed shard is waiting for it
        run_shards(Store(path), "pair", 2, Worker("gw1", 1, 2, "run"), lambda s: healthy.append(s), poll_s=0.05)

    thread = threading.Thread(target=second_worker)
    thread.start()
    outcome = run_shards(store, "pair", 2, Worker("gw0", 0, 2, "run"), boom, poll_s=0.05, give_up_s=5)
    thread.join()
    assert outcome.results == [] and outcome.failure == "RuntimeError: out of memory"
    assert sorted(healthy) == [0, 1]

    # In a later stage the failed worker claims nothing: it waits for the others, or gives up.
    thread = threading.Thread(target=lambda: run_shards(Store(path), "stage2", 2, Worker("gw1", 1, 2, "run"),
                                                        lambda s: healthy.append(s), poll_s=0.05))
    thread.start()
    later = run_shards(store, "stage2", 2, Worker("gw0", 0, 2, "run"), boom, poll_s=0.05,
                       failed_before="RuntimeError: out of memory")
    thread.join()
    assert later.results == [] and later.failure is None and sorted(healthy) == [0, 0, 1, 1]
