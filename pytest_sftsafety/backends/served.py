"""Generation on an OpenAI-compatible chat-completions server: vLLM's ``vllm serve``, SGLang, TGI, llama.cpp's
server or a hosted API. stdlib only: the models live on the server, so nothing heavy is imported here.

``--model`` and ``--reference`` name served models (vLLM serves each LoRA adapter under its own name). Each
sample is one request carrying the seed the transformers backend would use for it, so a sample's identity
is the same in every backend; whether the server honours seeds is checked once per process and reported.
Answers are handed to the store as they arrive, so an interrupted run keeps every answer it received. What a
server sends is outside text: the runner keeps each answer with its lone surrogates replaced by U+FFFD and any
key it echoes redacted (``runner.answer_text``), and the store and the judge both see that text.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence

from ..config import RunConfig
from ..errors import ConfigError, ModelLoadError
from .base import Backend, BatchCallback, GenRow
from .checkpoints import Checkpoint, ModelPlan
from .openai_api import ChatClient, ChatReply, EndpointError, next_result, resolve_endpoint, run_on_daemon_threads

FLUSH_ROWS = 32  # answers handed to the store at once ...
FLUSH_SECONDS = 2.0  # ... or after this long, whichever comes first
LIST_TIMEOUT_S = 30.0  # the model list at start: a hung server is a quick error, not --request-timeout x tries
# The seed check asks for an open-ended answer at temperature 1, where an honoured seed is visible: a
# refusal to a harmful prompt is often the same whatever the seed.
PROBE = GenRow("Write the opening lines of a short story about a lighthouse keeper.", 1.0, 0x5EED)
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


def make_client(cfg: RunConfig, max_retries: int | None = None, timeout_s: float | None = None) -> ChatClient:
    """The client of --endpoint. A key is sent only from the variable --api-key-env names (or OpenAI's own
    variable to OpenAI's host): a key meant for another service never goes to a server by default."""
    endpoint = resolve_endpoint(cfg.endpoint, cfg.api_key_env, option="--endpoint", key_option="--api-key-env",
                                default_key_env=None)
    return ChatClient(endpoint.base_url, model="", api_key=endpoint.api_key, concurrency=cfg.concurrency,
                      timeout_s=cfg.request_timeout if timeout_s is None else timeout_s,
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
    client = make_client(cfg, max_retries=min(2, cfg.request_retries),
                         timeout_s=min(LIST_TIMEOUT_S, cfg.request_timeout))
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




class OpenAIBackend(Backend):
    """Generates for ``candidate:I`` and ``reference`` by sending one chat request per sample. An answer the
    endpoint's content filter withheld is handed over as None: not an answer of the model, so not stored."""

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
            # Always sent: a server would otherwise fill it from the model's generation_config.json.
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

    def check_seeds(self, model: str) -> str:
        """Ask twice with one seed and once with another: the same seed must give the same answer. A pair
        that differs is asked once more before the server is called not reproducible (a busy server's
        batching can flip a token once)."""
        probe = self.request(model, PROBE, max_tokens=min(PROBE_TOKENS, self.cfg.max_new_tokens))
        probe.pop("min_p", None)  # the full distribution: where seeds show
        try:
            first = self._complete(probe).text
        except EndpointError as exc:
            if exc.status in (400, 422) and "seed" in exc.detail.lower():
                self._send_seed = False
                self.seed_check = SEEDS_REJECTED
                return self.seed_check
            raise
        same = any(self._complete(probe).text == first for _ in range(2))
        other = self._complete({**probe, "seed": PROBE.seed + 1}).text
        if not same:
            self.seed_check = SEEDS_NOT_REPRODUCIBLE
        elif other != first:
            self.seed_check = SEEDS_HONOURED
        else:
            self.seed_check = SEEDS_UNVERIFIED
        return self.seed_check

    def generate(self, variant: str, rows: Sequence[GenRow], on_batch: BatchCallback) -> None:
        """Send ``rows`` with at most --concurrency in flight; answers go to ``on_batch(indices, texts,
        new_tokens)`` as they arrive. On a failure or an interrupt, the answers already received are handed
        over before the error is raised, and requests still in flight are left to end on their own."""
        if not rows:
            return
        model = self.names[variant]
        if not self.seed_check and any(row.temperature > 0 for row in rows):
            self.check_seeds(model)
        abort = threading.Event()
        results = run_on_daemon_threads(self._complete, [self.request(model, row) for row in rows],
                                        self.client.concurrency, abort)
        ready: list[tuple[int, str | None, int]] = []
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal last_flush
            if ready:
                indices, texts, tokens = (list(column) for column in zip(*ready, strict=True))
                ready.clear()
                on_batch(indices, texts, tokens)
            last_flush = time.monotonic()

        def take(index: int, reply: ChatReply) -> None:
            filtered = reply.finish_reason == "content_filter" and not reply.text
            ready.append((index, None if filtered else reply.text, reply.completion_tokens or 0))

        received = 0
        try:
            while received < len(rows):
                got = next_result(results, FLUSH_SECONDS)
                if got is not None:
                    index, reply, error = got
                    if error is not None:
                        raise error
                    take(index, reply)
                    received += 1
                if len(ready) >= FLUSH_ROWS or time.monotonic() - last_flush >= FLUSH_SECONDS:
                    flush()
            flush()
        except BaseException:
            abort.set()
            while (got := next_result(results, 0)) is not None:  # answers that arrived meanwhile
                if got[2] is None:
                    take(got[0], got[1])
            flush()
            raise
        finally:
            abort.set()

    def close(self) -> None:
        pass
