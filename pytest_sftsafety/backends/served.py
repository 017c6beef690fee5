"""Generation on an OpenAI-compatible chat-completions server: vLLM's ``vllm serve``, SGLang, TGI, llama.cpp's
server or a hosted API. stdlib only: the models live on the server, so nothing heavy is imported here.

``--model`` and ``--reference`` name served models (vLLM serves each LoRA adapter under its own name). Each
sample is one request carrying the seed the transformers backend would use for it, so a sample's identity
is the same in every backend; whether the server honours seeds is checked once per process and reported.
Answers are handed to the store as they arrive, so an interrupted run keeps every answer it received.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from ..config import RunConfig
from ..errors import ConfigError, ModelLoadError
from ..openai_api import ChatClient, EndpointError, resolve_endpoint
from . import GenRow
from .checkpoints import Checkpoint, ModelPlan

FLUSH_ROWS = 32  # answers handed to the store at once ...
FLUSH_SECONDS = 2.0  # ... or after this long, whichever comes first
PROBE_TOKENS = 32

# What the seed check found (reports show it): the worst of several processes' findings wins.
SEEDS_HONOURED = "honoured"  # the same seed gave the same answer, another seed another answer
SEEDS_UNVERIFIED = "unverified"  # the probe's answers did not depend on the seed either way
SEEDS_NOT_REPRODUCIBLE = "not reproducible"  # the same seed gave different answers: ignored, or not deterministic
SEEDS_REJECTED = "rejected"  # the server refused the seed parameter; requests go without it
SEED_CHECK_ORDER = ("", SEEDS_HONOURED, SEEDS_UNVERIFIED, SEEDS_NOT_REPRODUCIBLE, SEEDS_REJECTED)


def worse_seed_check(a: str, b: str) -> str:
    """The more worrying of two seed-check findings ("" is no check: greedy only, or nothing generated)."""
    return max(a, b, key=lambda v: SEED_CHECK_ORDER.index(v) if v in SEED_CHECK_ORDER else 0)


def make_client(cfg: RunConfig, max_retries: int | None = None) -> ChatClient:
    endpoint = resolve_endpoint(cfg.endpoint, cfg.api_key_env, option="--endpoint", key_option="--api-key-env")
    return ChatClient(endpoint.base_url, model="", api_key=endpoint.api_key, concurrency=cfg.concurrency,
                      timeout_s=cfg.request_timeout,
                      max_retries=cfg.request_retries if max_retries is None else max_retries, name="--endpoint",
                      hint="start the server or pass the right --endpoint URL")


def plan_served(cfg: RunConfig, need_reference: bool = True) -> ModelPlan:
    """The served models of a run, checked against the server's model list when it has one (an unknown
    name fails now, not after the first batch). A model's identity is the endpoint, its name, what the
    list says about it (vLLM: the weights' path and the base of an adapter) and --served-revision."""
    if not cfg.models:
        raise ModelLoadError("no --model given; with --backend openai pass --model NAME, a model the server serves")
    if cfg.reference is None and need_reference:
        raise ModelLoadError("--backend openai needs --reference NAME, the served model before fine-tuning (e.g. the "
                             "base model's name), or --baseline FILE")
    client = make_client(cfg, max_retries=min(2, cfg.request_retries))
    listing = client.models()
    entries = {entry["id"]: entry for entry in listing or []}
    names = [*cfg.models, *([cfg.reference] if cfg.reference else [])]
    if listing is not None:
        for flag, name in [*(("--model", m) for m in cfg.models), ("--reference", cfg.reference)]:
            if name is not None and name not in entries:
                served = ", ".join(sorted(entries)[:10]) or "none"
                raise ModelLoadError(f"{flag} {name}: {client.base_url} serves no model of that name (it serves: "
                                     f"{served}); pass a served name (vLLM serves an adapter under the name given "
                                     f"in --lora-modules NAME=PATH)")
    if len(set(names)) < len(names):
        raise ConfigError("--model and --reference name the same served model twice; name each model once")

    def served(name: str) -> Checkpoint:
        entry = entries.get(name, {})
        identity = json.dumps({"endpoint": client.host_path, "model": name, "root": entry.get("root"),
                               "parent": entry.get("parent"), "revision": cfg.served_revision}, sort_keys=True)
        return Checkpoint(spec=name, kind="served", path=name, identity=identity)

    return ModelPlan(candidates=tuple(served(m) for m in cfg.models),
                     reference=served(cfg.reference) if cfg.reference else None, base=None)


BatchCallback = Callable[[list[int], list[str], list[int]], None]


class OpenAIBackend:
    """Generates for ``candidate:I`` and ``reference`` by sending one chat request per sample."""

    def __init__(self, cfg: RunConfig, plan: ModelPlan) -> None:
        self.cfg = cfg
        self.client = make_client(cfg)
        self.names = {f"candidate:{i}": c.path for i, c in enumerate(plan.candidates)}
        if plan.reference is not None:
            self.names["reference"] = plan.reference.path
        self.loads = 0  # nothing is loaded here; the runner reads these counters of every backend
        self.oom_backoffs = 0
        self.requests = 0
        self.seed_check = ""
        self._send_seed = True
        self._count = threading.Lock()

    def request(self, model: str, row: GenRow, seed: int | None = None, max_tokens: int | None = None) -> dict:
        """The chat request of one sample: its prompt as the only user turn (as the transformers backend
        sends it), the sampling settings, and at a temperature above 0 its seed."""
        body: dict = {"model": model, "messages": [{"role": "user", "content": row.prompt}],
                      "max_tokens": max_tokens or self.cfg.max_new_tokens, "temperature": row.temperature}
        if row.temperature > 0:
            if self.cfg.top_p < 1:
                body["top_p"] = self.cfg.top_p
            if self.cfg.min_p > 0:
                body["min_p"] = self.cfg.min_p
            if self._send_seed:
                body["seed"] = row.seed if seed is None else seed
        return body

    def _complete(self, body: dict, abort: threading.Event | None = None):
        with self._count:
            self.requests += 1
        try:
            return self.client.complete(body, abort)
        except EndpointError as exc:
            if exc.status == 400:
                for name, flag in (("min_p", "--min-p 0"), ("top_p", "--top-p 1")):
                    if name in body and name.replace("_", "") in exc.detail.lower().replace("_", "").replace("-", ""):
                        raise ConfigError(f"--endpoint {self.client.base_url} does not accept {name} ({exc.detail}); "
                                          f"pass {flag} to sample without it") from None
            raise

    def check_seeds(self, model: str, row: GenRow) -> str:
        """Ask twice with the row's seed and once with another: the same seed must give the same answer."""
        first = self.request(model, row, max_tokens=min(PROBE_TOKENS, self.cfg.max_new_tokens))
        try:
            same = [self._complete(first).text for _ in range(2)]
        except EndpointError as exc:
            if exc.status in (400, 422) and "seed" in exc.detail.lower():
                self._send_seed = False
                self.seed_check = SEEDS_REJECTED
                return self.seed_check
            raise
        other = self._complete({**first, "seed": (row.seed ^ 0x5DEECE66D) & ((1 << 63) - 1)}).text
        if same[0] != same[1]:
            self.seed_check = SEEDS_NOT_REPRODUCIBLE
        elif other != same[0]:
            self.seed_check = SEEDS_HONOURED
        else:
            self.seed_check = SEEDS_UNVERIFIED
        return self.seed_check

    def generate(self, variant: str, rows: Sequence[GenRow], on_batch: BatchCallback) -> None:
        """Send ``rows`` with at most --concurrency in flight; answers go to ``on_batch(indices, texts,
        new_tokens)`` as they arrive. On a failure or an interrupt, the answers already received are handed
        over before the error is raised."""
        if not rows:
            return
        model = self.names[variant]
        sampled = next((row for row in rows if row.temperature > 0), None)
        if sampled is not None and not self.seed_check:
            self.check_seeds(model, sampled)
        abort = threading.Event()
        pool = ThreadPoolExecutor(max_workers=min(self.client.concurrency, len(rows)),
                                  thread_name_prefix="sftsafety-gen")
        futures: dict[Future, int] = {}
        ready: list[tuple[int, str, int]] = []
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal last_flush
            if ready:
                indices, texts, tokens = (list(column) for column in zip(*ready, strict=True))
                ready.clear()
                on_batch(indices, texts, tokens)
            last_flush = time.monotonic()

        def take(future: Future) -> None:
            reply = future.result()
            ready.append((futures.pop(future), reply.text, reply.completion_tokens or 0))

        try:
            # Submitted in order; at most twice the concurrency waiting, so an abort leaves little queued.
            pending = iter(range(len(rows)))
            for index in pending:
                futures[pool.submit(self._complete, self.request(model, rows[index]), abort)] = index
                if len(futures) >= 2 * self.client.concurrency:
                    break
            while futures:
                done, _ = wait(list(futures), timeout=FLUSH_SECONDS, return_when=FIRST_COMPLETED)
                for future in done:
                    take(future)
                    index = next(pending, None)
                    if index is not None:
                        futures[pool.submit(self._complete, self.request(model, rows[index]), abort)] = index
                if len(ready) >= FLUSH_ROWS or time.monotonic() - last_flush >= FLUSH_SECONDS:
                    flush()
            flush()
        except BaseException:
            abort.set()
            for future in list(futures):
                if future.done() and not future.cancelled() and future.exception() is None:
                    take(future)
                else:
                    future.cancel()
            flush()
            raise
        finally:
            # A request in flight ends within its timeout; an interrupt does not wait for it.
            pool.shutdown(wait=not abort.is_set(), cancel_futures=True)

    def close(self) -> None:
        pass
