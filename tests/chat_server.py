"""An OpenAI-compatible chat server over the project's transformers backend, for tests and benchmarks of
``--backend openai`` where vLLM cannot run.

It serves a base model and LoRA adapters by name, as ``vllm serve BASE --lora-modules NAME=PATH`` does, and
lists them at ``GET /v1/models`` with vLLM's ``root``/``parent`` fields. Concurrent requests are batched
(what makes a real server's throughput grow with concurrency), and each request is sampled from its own
``seed`` with the transformers backend's decoding, so its answers equal that backend's. Fault injection for
the client's retry and timeout handling: failing or slow first requests, an exit after N answers, ignored
seeds, rejected parameters, a required API key, a content filter; hostile answers: text appended to each
(``--append-json``, a JSON string, so it may be a lone surrogate) or the request's own key echoed (``--echo-key``).
``GET /stats`` says what the server received.

    python tests/chat_server.py --base BASE [--lora NAME=PATH ...] [--port 0]   # prints "READY <port>"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_sftsafety.backends import GenRow  # noqa: E402
from pytest_sftsafety.backends.checkpoints import ModelPlan, resolve  # noqa: E402
from pytest_sftsafety.config import RunConfig  # noqa: E402


@dataclass
class Pending:
    variant: str
    row: GenRow
    settings: tuple[int, float, float]  # max_tokens, top_p, min_p: rows of one batch share them
    done: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    tokens: int = 0
    error: str | None = None


class ChatServer:
    """The model side: a queue of requests that one thread answers in batches."""

    def __init__(self, args: argparse.Namespace) -> None:
        from pytest_sftsafety.backends.hf import HFBackend

        loras = [spec.split("=", 1) for spec in args.lora]
        self.names: dict[str, str] = {}
        self.listing: list[dict] = []
        if loras:
            candidates = tuple(resolve(path, "--lora", args.base, False) for _, path in loras)
            plan = ModelPlan(candidates=candidates, reference=None, base=str(Path(args.base).resolve()))
            self.names[args.base_name] = "reference"
            self.listing.append({"id": args.base_name, "object": "model", "root": args.base, "parent": None})
            for index, (name, path) in enumerate(loras):
                self.names[name] = f"candidate:{index}"
                self.listing.append({"id": name, "object": "model", "root": path, "parent": args.base_name})
        else:
            plan = ModelPlan(candidates=(resolve(args.base, "--base", None, False),), reference=None, base=None)
            self.names[args.base_name] = "candidate:0"
            self.listing.append({"id": args.base_name, "object": "model", "root": args.base, "parent": None})
        self.cfg = RunConfig(models=(), device="cpu", dtype="float32", batch_size=args.max_batch)
        self.backend = HFBackend(self.cfg, plan)
        self.args = args
        self.queue: list[Pending] = []
        self.wake = threading.Condition()
        self.lock = threading.Lock()
        self.stats = {"requests": 0, "answered": 0, "failed_on_purpose": 0, "in_flight": 0, "max_in_flight": 0,
                      "seeds": [], "models": [], "batches": 0, "largest_batch": 0, "params": []}
        self.rng = random.Random()
        self.backend.cfg = dataclasses.replace(self.cfg, max_new_tokens=1)
        for variant in self.names.values():  # load the models before saying READY
            self.backend.generate(variant, [GenRow("hello", 0.0, 0)], lambda *_: None)
        threading.Thread(target=self._serve_batches, daemon=True).start()

    def submit(self, pending: Pending) -> Pending:
        with self.wake:
            self.queue.append(pending)
            self.wake.notify()
        pending.done.wait()
        return pending

    def _serve_batches(self) -> None:
        while True:
            with self.wake:
                while not self.queue:
                    self.wake.wait()
            time.sleep(self.args.batch_window)  # let concurrent requests join the batch
            with self.wake:
                taken, self.queue = self.queue[: self.args.max_batch], self.queue[self.args.max_batch:]
            groups: dict[tuple, list[Pending]] = {}
            for pending in taken:
                groups.setdefault((pending.variant, pending.settings), []).append(pending)
            for (variant, (max_tokens, top_p, min_p)), members in groups.items():
                self.backend.cfg = dataclasses.replace(self.cfg, max_new_tokens=max_tokens, top_p=top_p, min_p=min_p)

                def on_batch(indices, texts, tokens, members=members):
                    for index, text, count in zip(indices, texts, tokens, strict=True):
                        members[index].text, members[index].tokens = text, count

                try:
                    self.backend.generate(variant, [m.row for m in members], on_batch)
                except Exception as exc:  # noqa: BLE001 - answered as a 500
                    for member in members:
                        member.error = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.stats["batches"] += 1
                    self.stats["largest_batch"] = max(self.stats["largest_batch"], len(members))
                for member in members:
                    member.done.set()


class Handler(BaseHTTPRequestHandler):
    server_version = "chat-server"

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def _send(self, status: int, document: dict) -> None:
        data = json.dumps(document).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client gave up

    def _authorised(self, state: ChatServer) -> bool:
        if not state.args.api_key_env:
            return True
        if self.headers.get("Authorization") == f"Bearer {os.environ[state.args.api_key_env]}":
            return True
        self._send(401, {"error": {"message": "invalid API key", "type": "authentication_error"}})
        return False

    @property
    def route(self) -> str:
        """The path from ``/v1/`` on: a gateway may put more in front of it (even the key: ``/KEY/v1``)."""
        at = self.path.find("/v1/")
        return self.path[at:] if at >= 0 else self.path

    def do_GET(self) -> None:  # noqa: N802
        state: ChatServer = self.server.state  # type: ignore[attr-defined]
        if self.path == "/stats":
            with state.lock:
                self._send(200, dict(state.stats))
        elif self.route == "/v1/models":
            if self._authorised(state):
                self._send(200, {"object": "list", "data": state.listing})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802
        state: ChatServer = self.server.state  # type: ignore[attr-defined]
        args = state.args
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        with state.lock:
            index = state.stats["requests"]
            state.stats["requests"] += 1
            state.stats["in_flight"] += 1
            state.stats["max_in_flight"] = max(state.stats["max_in_flight"], state.stats["in_flight"])
        try:
            status, document = self._answer(state, args, body, index)
        finally:
            with state.lock:
                state.stats["in_flight"] -= 1
        self._send(status, document)
        if args.exit_after and status == 200:
            with state.lock:
                state.stats["answered"] += 1
                last = state.stats["answered"] >= args.exit_after
            if last:
                os._exit(0)  # a server that dies mid-run

    def _answer(self, state: ChatServer, args: argparse.Namespace, body: dict, index: int) -> tuple[int, dict]:
        if self.route != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {self.path}"}}
        if not self._authorised(state):
            return 401, {"error": {"message": "invalid API key"}}
        if index < args.fail_first:
            with state.lock:
                state.stats["failed_on_purpose"] += 1
            return args.fail_status, {"error": {"message": f"injected failure {index}", "type": "server_error"}}
        if index < args.delay_first:
            time.sleep(args.delay)
        for name in args.reject_param:
            if name in body:
                return 400, {"error": {"message": f"Unrecognized request argument supplied: {name}",
                                       "type": "invalid_request_error", "param": name}}
        messages = body.get("messages") or []
        if args.filter_prompt and any(args.filter_prompt in str(m.get("content")) for m in messages):
            return 400, {"error": {"code": "content_filter", "message": "The response was filtered due to the "
                                   "prompt triggering the content management policy."}}
        if len(messages) != 1 or messages[0].get("role") != "user" or not isinstance(messages[0].get("content"), str):
            return 400, {"error": {"message": "this server takes exactly one user message"}}
        model = body.get("model")
        if model not in state.names:
            return 404, {"error": {"message": f"The model `{model}` does not exist."}}
        temperature = float(body.get("temperature", 1.0))
        seed = body.get("seed")
        with state.lock:
            state.stats["seeds"].append(seed)
            state.stats["models"].append(model)
            state.stats["params"].append(sorted(k for k in body if k not in ("messages", "model")))
        if temperature > 0 and (seed is None or args.ignore_seed):
            seed = state.rng.getrandbits(63)
        row = GenRow(messages[0]["content"], temperature, int(seed) if temperature > 0 else 0)
        settings = (int(body.get("max_tokens") or 256), float(body.get("top_p", 1.0)), float(body.get("min_p", 0.0)))
        pending = state.submit(Pending(state.names[model], row, settings))
        if pending.error:
            return 500, {"error": {"message": pending.error}}
        text = pending.text + args.append
        if args.echo_key:
            text += f" (your key: {(self.headers.get('Authorization') or '').removeprefix('Bearer ')})"
        return 200, {"id": f"chatcmpl-{index}", "object": "chat.completion", "model": model,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "length" if pending.tokens >= settings[0] else "stop"}],
                     "usage": {"prompt_tokens": 0, "completion_tokens": pending.tokens,
                               "total_tokens": pending.tokens}}


def launch(args: list[str], timeout_s: float = 300, **popen) -> tuple[subprocess.Popen, int]:
    """This server in a process of its own with ``args``; returns the process and its port once it says READY
    (its models loaded). RuntimeError, with the end of its stderr when that is piped, if it does not."""
    process = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, **popen)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not line or not line[0].startswith("READY"):
        process.kill()
        said = process.stderr.read()[-2000:] if process.stderr else ""
        raise RuntimeError(f"the chat server did not start{': ' + said if said else ''}")
    return process, int(line[0].split()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base model folder (or a full model served alone)")
    parser.add_argument("--base-name", default="base", help="name the base is served under")
    parser.add_argument("--lora", action="append", default=[], help="NAME=PATH of an adapter to serve")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--batch-window", type=float, default=0.005, help="seconds to gather a batch")
    parser.add_argument("--fail-first", type=int, default=0, help="answer the first N chat requests with an error")
    parser.add_argument("--fail-status", type=int, default=500)
    parser.add_argument("--delay-first", type=int, default=0, help="delay the first N chat requests ...")
    parser.add_argument("--delay", type=float, default=0.0, help="... by this many seconds")
    parser.add_argument("--exit-after", type=int, default=0, help="exit after answering N chat requests")
    parser.add_argument("--ignore-seed", action="store_true", help="sample from random seeds")
    parser.add_argument("--reject-param", action="append", default=[], help="answer 400 when the request has it")
    parser.add_argument("--api-key-env", default="", help="require the key held by this environment variable")
    parser.add_argument("--filter-prompt", default="", help="answer as a content filter when a prompt has this")
    parser.add_argument("--append-json", default='""',
                        help='a JSON string appended to every answer, e.g. \'"\\ud800"\' (a lone surrogate)')
    parser.add_argument("--echo-key", action="store_true", help="append the request's API key to every answer")
    args = parser.parse_args(argv)
    args.append = json.loads(args.append_json)
    state = ChatServer(args)
    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    httpd.daemon_threads = True
    httpd.state = state  # type: ignore[attr-defined]
    print(f"READY {httpd.server_address[1]}", flush=True)
    httpd.serve_forever(poll_interval=0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
