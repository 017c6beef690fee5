"""Ctrl-C while answers are being judged by an API judge: the run stops at once with exit status 2, no new
judge request goes out."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from .conftest import ctrl_c_works


def completion(text: str) -> dict:
    return {"id": "c", "object": "chat.completion", "model": "judge-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


@pytest.mark.slow  # a real run interrupted mid-judging, as the other interrupted runs
def test_ctrl_c_while_the_api_judge_works_stops_the_run_and_its_requests(pytester, toy_models, loopback):
    loopback.respond = lambda index, call: (200, {}, completion("0"))
    loopback.delay = lambda index, call: 0.5
    store = pytester.path / "store.sqlite"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--model", str(toy_models.answer_all),
               "--sftsafety-data", str(toy_models.data_202503), "--max-new-tokens", "16", "--seeds", "2", "-k",
               "01_ or 02_ or 03_", "--judge", "api:judge-model", "--judge-endpoint", f"{loopback.url}/v1",
               "--judge-concurrency", "2", "--sftsafety-store", str(store)]
    proc = subprocess.Popen(command, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=ctrl_c_works)
    deadline = time.monotonic() + 240
    while len(loopback.calls) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    calls_then = len(loopback.calls)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output[-2000:]
    assert time.monotonic() - signalled < 20 and "KeyboardInterrupt" in output
    # At most the requests already in flight (the judge's concurrency) reached the server after Ctrl-C.
    assert len(loopback.calls) <= calls_then + 2
    time.sleep(1.5)
    assert len(loopback.calls) <= calls_then + 2
