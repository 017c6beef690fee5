"""The store in whole runs: a warm run loads no model, a killed run resumes to the same report."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from .conftest import ctrl_c_works

ARGS = ["--max-new-tokens", "24", "--seeds", "2", "-p", "no:cacheprovider", "-q"]
HEAVY_MODULES = """
import sys

def pytest_sessionfinish(session):
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
    open("heavy_modules.txt", "w").write("\\n".join(heavy))
"""


def entries(path):
    return [{k: e[k] for k in ("id", "reference", "candidates", "verdict")}
            for e in json.loads(path.read_text())["entries"]]


def pytest_cmd(toy_models, *extra):
    return [sys.executable, "-m", "pytest", "--model", str(toy_models.answer_all), "--sftsafety-data",
            str(toy_models.data_202503), *ARGS, *extra]


def test_warm_run_loads_no_model_and_imports_no_torch(pytester, toy_models):
    store = str(pytester.path / "store.sqlite")
    cold = pytester.runpytest("--model", str(toy_models.answer_all), "--sftsafety-data", str(toy_models.data_202503),
                              *ARGS, "--sftsafety-store", store, "--sftsafety-json", "cold.json")
    assert cold.ret == pytest.ExitCode.TESTS_FAILED
    pytester.makeconftest(HEAVY_MODULES)
    warm = subprocess.run(pytest_cmd(toy_models, "--sftsafety-store", store, "--sftsafety-json", "warm.json"),
                          cwd=pytester.path, capture_output=True, text=True, timeout=300)
    assert warm.returncode == 1, warm.stderr
    assert (pytester.path / "heavy_modules.txt").read_text() == ""
    run = json.loads((pytester.path / "warm.json").read_text())["run"]
    assert (run["generated"], run["judged"], run["model_loads"]) == (0, 0, 0)
    assert run["from_store"] == run["generations"] == 440 * 3 * 2
    assert entries(pytester.path / "warm.json") == entries(pytester.path / "cold.json")

    fresh = pytester.runpytest("--model", str(toy_models.answer_all), "--sftsafety-data",
                               str(toy_models.data_202503), *ARGS, "--sftsafety-store", store, "--sftsafety-fresh",
                               "--sftsafety-json", "fresh.json")
    assert fresh.ret == pytest.ExitCode.TESTS_FAILED
    assert json.loads((pytester.path / "fresh.json").read_text())["run"]["generated"] == 440 * 3 * 2


def stored_generations(path) -> int:
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow  # a real run killed mid-generation, then the whole run again: half a minute on 2 cores
def test_killed_run_resumes_from_the_store_to_the_same_report(pytester, toy_models):
    store = pytester.path / "store.sqlite"
    proc = subprocess.Popen(pytest_cmd(toy_models, "--sftsafety-store", str(store), "--batch-size", "8"),
                            cwd=pytester.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while stored_generations(store) < 400 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    kept = stored_generations(store)
    assert 400 <= kept < 440 * 3 * 2 * 2, "the run was not killed mid-generation"

    resumed = pytester.runpytest("--model", str(toy_models.answer_all), "--sftsafety-data",
                                 str(toy_models.data_202503), *ARGS, "--sftsafety-store", str(store),
                                 "--sftsafety-json", "resumed.json")
    assert resumed.ret == pytest.ExitCode.TESTS_FAILED
    run = json.loads((pytester.path / "resumed.json").read_text())["run"]
    assert run["from_store"] >= kept and run["generated"] == run["generations"] - run["from_store"]

    whole = pytester.runpytest("--model", str(toy_models.answer_all), "--sftsafety-data",
                               str(toy_models.data_202503), *ARGS, "--sftsafety-store",
                               str(pytester.path / "other.sqlite"), "--sftsafety-json", "whole.json")
    assert whole.ret == pytest.ExitCode.TESTS_FAILED
    assert entries(pytester.path / "resumed.json") == entries(pytester.path / "whole.json")


@pytest.mark.slow  # two real runs interrupted mid-generation, each resumed: a minute on 2 cores
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_stops_cleanly_with_every_finished_batch_stored(pytester, toy_models, sig):
    """Ctrl-C and SIGTERM (a cancelled CI job) mid-generation: exit status 2 within seconds, a message that
    says what happened, the committed batches in the store, and a re-run that generates only the rest."""
    store = pytester.path / "store.sqlite"
    proc = subprocess.Popen(pytest_cmd(toy_models, "--sftsafety-store", str(store), "--batch-size", "8"),
                            cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=ctrl_c_works)
    deadline = time.monotonic() + 240
    while stored_generations(store) < 200 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    signalled = time.monotonic()
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED and time.monotonic() - signalled < 20
    assert "KeyboardInterrupt" in output or "Terminated" in output
    if sig == signal.SIGTERM:
        assert "stopped by SIGTERM; the finished batches are in the result store" in output
    kept = stored_generations(store)
    assert 200 <= kept < 440 * 3 * 2, "the run was not stopped mid-generation"
    resumed = pytester.runpytest("--model", str(toy_models.answer_all), "--sftsafety-data",
                                 str(toy_models.data_202503), *ARGS, "--sftsafety-store", str(store),
                                 "--sftsafety-json", "resumed.json")
    run = json.loads((pytester.path / "resumed.json").read_text())["run"]
    assert resumed.ret == pytest.ExitCode.TESTS_FAILED and run["from_store"] == kept


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder that can be made read-only: by permissions for a normal user; root ignores those, so for root a
    small file system remounted read-only."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        def freeze():
            for path in folder.iterdir():
                path.chmod(0o444)
            folder.chmod(0o555)
        yield folder, freeze
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("root without permission to mount a small file system: no read-only folder can be made")
    try:
        yield folder, lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_store_serves_a_run_it_holds_and_refuses_new_work_before_doing_any(pytester, toy_models,
                                                                                        read_only_folder):
    folder, freeze = read_only_folder
    store = str(folder / "store.sqlite")
    args = ["--model", str(toy_models.answer_all), "--sftsafety-data", str(toy_models.data_202503), *ARGS,
            "-k", "01_ or 02_", "--sftsafety-store", store]
    cold = pytester.runpytest(*args, "--sftsafety-json", "cold.json")
    freeze()
    warm = pytester.runpytest(*args, "--sftsafety-json", "warm.json")
    assert warm.ret == cold.ret == pytest.ExitCode.TESTS_FAILED
    assert entries(pytester.path / "warm.json") == entries(pytester.path / "cold.json")
    assert json.loads((pytester.path / "warm.json").read_text())["run"]["generated"] == 0
    more = pytester.runpytest(*args[:-4], "-k", "01_ or 03_", "--sftsafety-store", store)
    assert more.ret == pytest.ExitCode.USAGE_ERROR
    more.stdout.fnmatch_lines([f"*result store {store} is read-only and this run has 60 answers to make and keep; "
                               "make it writable, or pass --sftsafety-store NEW_PATH*"])
    assert "generating" not in more.stdout.str() and "Traceback" not in more.stdout.str()


@pytest.mark.slow  # a real run stopped mid-generation, as the killed and interrupted ones
def test_an_adapter_written_to_during_the_run_stops_it_before_its_answers_are_stored(pytester, toy_models):
    """Answers are stored under the sha256 of the weights: when the adapter file changes mid-run (a training
    job still saving), the run stops with one line and no batch made after the change is stored."""
    import shutil

    adapter = shutil.copytree(toy_models.answer_all, pytester.path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    store = pytester.path / "store.sqlite"
    command = [sys.executable, "-m", "pytest", "--model", str(adapter), "--base-model", str(toy_models.base),
               "--sftsafety-data", str(toy_models.data_202503), *ARGS, "--sftsafety-store", str(store),
               "--batch-size", "8"]
    proc = subprocess.Popen(command, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while stored_generations(store) < 16 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    weights.write_bytes(weights.read_bytes())  # the same bytes, written again: a new modification time
    kept = stored_generations(store)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, output[-2000:]
    assert f"{weights} changed during the run (after its sha256 identified the answers); nothing generated " \
           f"since was stored" in output
    assert "Traceback" not in output
    assert kept <= stored_generations(store) <= kept + 8  # at most the batch being stored at that instant
