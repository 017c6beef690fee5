"""transformers + peft backend: one model in memory serves the adapters and the reference.

Decoding (``decoding.decode``) samples each row from its own seed, so a sample does not depend on its batch.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..config import RunConfig, cuda_visible, resolved_device, resolved_dtype
from ..errors import ModelLoadError, first_line
from .base import Backend, BatchCallback, GenRow, check_rows_fit, prompt_ids
from .checkpoints import Checkpoint, ModelPlan, tokenizer_source
from .decoding import decode


def pick_device(device: str) -> str:
    """The device to load on. ``auto`` follows ``config.resolved_device`` (which keys the store), and
    torch must agree with it, or stored answers would be attributed to the wrong device and dtype."""
    chosen = resolved_device(device)
    if chosen.startswith("cuda") and not torch.cuda.is_available():
        flag = "auto" if device == "auto" else device
        if not cuda_visible():
            raise ModelLoadError(f"--device {flag}: this machine has no visible GPU (no NVIDIA device, or "
                                 f"CUDA_VISIBLE_DEVICES hides them all); pass --device cpu or run where a GPU is")
        why = "this torch build cannot use CUDA" if torch.version.cuda is None else \
            "torch cannot reach it (check the NVIDIA driver)"
        raise ModelLoadError(f"--device {flag}: a GPU is visible but {why}; install a CUDA build of torch or "
                             f"pass --device cpu")
    return chosen


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    return getattr(torch, resolved_dtype(dtype, device))


def nf4_config(compute_dtype: torch.dtype, missing: str):
    """4-bit nf4 quantization (bitsandbytes), as evaluation and fine-tuning load bases; ``missing`` is the
    error when bitsandbytes is not installed."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(missing) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No weight-loading bars: they would land in the captured output of every failed item."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def needs_remote_code(source: str) -> bool:
    """Whether a model folder's config.json maps its classes to code shipped with it (``auto_map``)."""
    import json
    from pathlib import Path

    try:
        return "auto_map" in json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, RecursionError):
        return False


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__


def load_adapter(model, base, path: str, name: str, label: str, base_path: str):
    """Load the adapter at ``path`` as ``name`` (onto ``base`` when ``model`` is None: the first one) and
    return the PeftModel. peft loads an adapter whose target_modules do not match its saved weights with
    only a warning: the modules it names get fresh, untrained LoRA weights (lora_B is zero, so they change
    nothing) and the weights of the modules it does not name are dropped. That is a ModelLoadError here,
    decided on peft's own load result (``load_adapter`` returns it; ``from_pretrained`` does not, so the
    first adapter's weights are loaded once more to get it: a second read of the adapter, not of the base)."""
    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*adapter keys")  # reported below as one line
            if model is None:
                model = PeftModel.from_pretrained(base, path, adapter_name=name, is_trainable=False)
            loaded = model.load_adapter(path, adapter_name=name, is_trainable=False)
    except Exception as exc:
        raise ModelLoadError(f"{label}: the adapter does not fit base {base_path} ({_short(exc)}); pass the right "
                             f"--base-model") from None
    missing = list(getattr(loaded, "missing_keys", None) or [])
    unexpected = list(getattr(loaded, "unexpected_keys", None) or [])
    if missing or unexpected:
        called_for = sum(1 for key in model.state_dict() if f".{name}." in key)
        raise ModelLoadError(adapter_mismatch(label, name, missing, unexpected, called_for))
    return model


def adapter_mismatch(label: str, name: str, missing: list[str], unexpected: list[str], called_for: int) -> str:
    """One line for an adapter whose adapter_config.json and saved weights disagree (see ``load_adapter``)."""

    def shown(key: str) -> str:  # as the module path reads in the model, without peft's prefix and our name
        return key.removeprefix("base_model.model.").replace(f".{name}.", ".")

    parts = []
    if missing:
        parts.append(f"{len(missing)} of the {max(called_for, len(missing))} LoRA weights its target_modules call "
                     f"for are not in the saved weights (first: {shown(missing[0])})")
    if unexpected:
        parts.append(f"{len(unexpected)} saved weights belong to no module it targets (first: "
                     f"{shown(unexpected[0])})")
    return (f"{label}: adapter_config.json's target_modules do not match the saved adapter weights: "
            f"{' and '.join(parts)}, so the adapter would not run as trained; re-save the adapter, or set "
            f"target_modules in adapter_config.json to the modules it was trained on")


class HFBackend(Backend):
    """Loads the plan's models lazily and generates for the variants ``candidate:I`` and ``reference``."""

    def __init__(self, cfg: RunConfig, plan: ModelPlan) -> None:
        self.cfg = cfg
        self.plan = plan
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.spread = self.device == "cuda" and cfg.gpus_per_worker > 1
        self._model = None
        self._tokenizer = None  # the tokenizer of the variant being (or last) generated
        self._tokenizers: dict[str, object] = {}  # by source: small, and needed before the weights are loaded
        self._loaded: str | None = None  # "adapters" or a checkpoint spec
        self.warned_no_eos = False
        self.loads = 0
        self.oom_backoffs = 0
        self.batch_size = cfg.batch_size  # None until the first generate sizes it from free memory
        self.warned_plain_format = False

    # -- loading -------------------------------------------------------------------------------
    def _load_kwargs(self, pickle_weights: bool) -> dict:
        """``pickle_weights``: pickle files are allowed (--allow-pickle); else safetensors are required."""
        kwargs: dict = {"dtype": self.dtype, "trust_remote_code": self.cfg.trust_remote_code}
        if not pickle_weights:
            kwargs["use_safetensors"] = True
        if self.spread:
            kwargs["device_map"] = "auto"  # over the GPUs this process may see (--gpus-per-worker)
        if self.cfg.load_in_4bit:
            kwargs["quantization_config"] = nf4_config(
                self.dtype, "--load-in-4bit needs bitsandbytes: pip install 'pytest-sftsafety[quant]'")
            kwargs.setdefault("device_map", {"": self.device})
        return kwargs

    def _load_full(self, source: str, label: str, pickle_weights: bool):
        from transformers import AutoModelForCausalLM

        kwargs = self._load_kwargs(pickle_weights)
        try:
            with quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except Exception as exc:
            if needs_remote_code(source) and not self.cfg.trust_remote_code and "trust_remote_code" in str(exc):
                raise ModelLoadError(f"{label} {source}: the checkpoint needs model code of its own (auto_map in "
                                     f"config.json), which is never run by default; pass --trust-remote-code if "
                                     f"you trust its author") from None
            raise ModelLoadError(f"{label} {source}: weights failed to load ({_short(exc)}); check that the "
                                 f"checkpoint is complete and matches its config.json") from None
        if "device_map" not in kwargs:
            model.to(self.device)
        model.eval()
        self.loads += 1
        return model

    def _load_tokenizer(self, source: str):
        """The tokenizer, padding on the left. Without a pad token it pads with the end-of-sequence token;
        without either it keeps none, and ``_pad_id`` picks one (padded positions are masked out)."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=self.cfg.trust_remote_code)
        except Exception as exc:
            if not self.cfg.trust_remote_code and "trust_remote_code" in str(exc):
                raise ModelLoadError(f"the tokenizer in {source} needs code of its own (auto_map), which is never "
                                     f"run by default; pass --trust-remote-code if you trust its author") from None
            raise ModelLoadError(f"no usable tokenizer in {source} ({_short(exc)}); save the tokenizer with the "
                                 f"adapter or the base model") from None
        tok.padding_side = "left"
        if tok.pad_token_id is None and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
        return tok

    def _tokenizer_for(self, variant: str):
        source = tokenizer_source(self.plan, variant)
        if source not in self._tokenizers:
            self._tokenizers[source] = self._load_tokenizer(source)
        return self._tokenizers[source]

    def _unload(self) -> None:
        self._model = None
        self._loaded = None
        self._free_memory()

    def _ensure_adapters(self) -> None:
        if self._loaded == "adapters":
            return
        self._unload()
        base = self._load_full(self.plan.base, "base model", self.cfg.allow_pickle)
        model = None
        for index, ckpt in enumerate(self.plan.candidates):
            model = load_adapter(model, base, ckpt.path, f"candidate:{index}", f"--model {ckpt.spec}",
                                 self.plan.base)
        model.eval()
        self._model = model
        self._tokenizer = self._tokenizer_for("candidate:0")
        self._loaded = "adapters"

    def _ensure_checkpoint(self, ckpt: Checkpoint, label: str, variant: str) -> None:
        if self._loaded == ckpt.spec:
            return
        self._unload()
        if ckpt.kind == "adapter":
            base = self._load_full(ckpt.base, "base model", self.cfg.allow_pickle)
            self._model = load_adapter(None, base, ckpt.path, "default", f"{label} {ckpt.spec}", ckpt.base)
        else:
            self._model = self._load_full(ckpt.path, label, ckpt.pickle_weights)
        self._tokenizer = self._tokenizer_for(variant)
        self._loaded = ckpt.spec

    @contextmanager
    def _variant(self, variant: str) -> Iterator[None]:
        """Make the loaded model act as ``variant`` for the duration of the block."""
        if self.plan.base is not None and (variant != "reference" or self.plan.reference is None):
            self._ensure_adapters()
            if variant == "reference":
                with self._model.disable_adapter():
                    yield
                return
            self._model.set_adapter(variant)
            yield
            return
        if variant == "reference":
            self._ensure_checkpoint(self.plan.reference, "--reference", variant)
        else:
            index = int(variant.split(":")[1])
            self._ensure_checkpoint(self.plan.candidates[index], "--model", variant)
        yield

    # -- generation ----------------------------------------------------------------------------
    def _encode(self, prompt: str) -> list[int]:
        if not self._tokenizer.chat_template and not self.warned_plain_format:
            warnings.warn("the tokenizer has no chat template; prompts are sent as 'User: ...\\nAssistant:'",
                          stacklevel=2)
            self.warned_plain_format = True
        return prompt_ids(self._tokenizer, prompt)

    def _eos_ids(self) -> list[int]:
        """The tokens that end an answer: the tokenizer's and the generation config's. With none, every answer
        runs to --max-new-tokens (a model with no end token has no other way to stop)."""
        ids = {self._tokenizer.eos_token_id}
        configured = getattr(getattr(self._model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        found = sorted(i for i in ids if i is not None)
        if not found and not self.warned_no_eos:
            warnings.warn("neither the tokenizer nor the model's generation config names an end-of-sequence "
                          "token; every answer runs to --max-new-tokens", stacklevel=2)
            self.warned_no_eos = True
        return found

    def _pad_id(self, eos_ids: Sequence[int]) -> int:
        """The id left padding fills in: the tokenizer's pad token, else an end token, else 0. Any id in the
        vocabulary is sound: padded positions are masked out of attention and never read back, so the answers
        do not depend on it (nor on how much padding a batch needs)."""
        pad = self._tokenizer.pad_token_id
        return pad if pad is not None else (eos_ids[0] if eos_ids else 0)

    def generate(self, variant: str, rows: Sequence[GenRow], on_batch: BatchCallback) -> None:
        """Generate ``rows`` and hand each finished batch to ``on_batch(indices, texts, new_tokens)``.

        The samples of one prompt share its prefill; prompts go longest first; a batch that runs out of
        memory is halved and retried, and batches already handed over are never redone.
        """
        if not rows:
            return
        self._tokenizer = self._tokenizer_for(variant)
        encoded: dict[str, list[int]] = {}
        groups: dict[str, list[int]] = {}
        for index, row in enumerate(rows):
            if row.prompt not in encoded:
                encoded[row.prompt] = self._encode(row.prompt)
            groups.setdefault(row.prompt, []).append(index)
        # Before the weights load: a prompt that cannot fit the context costs no load and no memory.
        check_rows_fit(self.plan, variant, encoded, rows, self.cfg.max_new_tokens,
                       getattr(self._tokenizer, "model_max_length", None))
        with self._variant(variant):
            pending = sorted(groups.items(), key=lambda item: -len(encoded[item[0]]))
            eos_ids = self._eos_ids()
            pad = self._pad_id(eos_ids)
            if self.batch_size is None:
                longest = max(len(ids) for ids in encoded.values()) + self.cfg.max_new_tokens
                weight_bytes = sum(p.numel() * p.element_size() for p in self._model.parameters())
                self.batch_size = auto_batch_size(self._model.config, self.dtype, longest, self.device,
                                                  self.cfg.load_in_4bit, weight_bytes)
            while pending:
                batch, pending = _take_batch(pending, self.batch_size)
                prompt_ids = [encoded[prompt] for prompt, _ in batch]
                row_prompt = [p for p, (_, indices) in enumerate(batch) for _ in indices]
                indices = [i for _, group in batch for i in group]
                try:
                    tokens = decode(self._model, prompt_ids, row_prompt, [rows[i].temperature for i in indices],
                                    [rows[i].seed for i in indices], max_new_tokens=self.cfg.max_new_tokens,
                                    eos_ids=eos_ids, pad_id=pad, top_p=self.cfg.top_p, min_p=self.cfg.min_p)
                except Exception as exc:
                    if not _is_out_of_memory(exc):
                        raise
                    self._free_memory()
                    if len(indices) == 1:
                        raise ModelLoadError(f"out of memory generating a single answer on {self.device}; use "
                                             f"--load-in-4bit, a smaller --max-new-tokens or another --device") \
                            from None
                    self.batch_size = max(1, len(indices) // 2)
                    self.oom_backoffs += 1
                    pending = batch + pending
                    continue
                texts = self._tokenizer.batch_decode(tokens, skip_special_tokens=True)
                on_batch(indices, texts, [len(t) for t in tokens])

    def _free_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        self._unload()
        self._tokenizer = None
        self._tokenizers.clear()




def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def auto_batch_size(model_config, dtype: torch.dtype, longest: int, device: str, four_bit: bool = False,
                    weight_bytes: int = 0) -> int:
    """Rows whose KV cache at full length (plus logits and prefill activations) fits a budget.

    CUDA: half of the memory free after loading, since throughput needs wide batches there. CPU: a tenth
    of the weights' size (at least 32 MiB, at most half of MemAvailable), because there the batch shares
    RAM with everything else and a small one already keeps the cores busy. Out-of-memory still halves it.
    """
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    layers = getattr(text_config, "num_hidden_layers", 32)
    heads = getattr(text_config, "num_attention_heads", 32)
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    element = 2 if four_bit else torch.finfo(dtype).bits // 8
    per_row = 2 * layers * kv_heads * head_dim * element * longest + 8 * text_config.vocab_size
    per_row += 4 * text_config.hidden_size * longest  # activations of the prefill
    if device.startswith("cuda"):
        ceiling, budget = 1024, _available_bytes(device) // 2
    else:
        ceiling, budget = 512, min(max(weight_bytes // 10, 32 << 20), _available_bytes(device) // 2)
    return int(max(1, min(ceiling, budget // max(per_row, 1))))


def _take_batch(pending: list[tuple[str, list[int]]], size: int):
    """Whole prompts (with all their rows) until ``size`` rows; a prompt with more rows is split."""
    batch: list[tuple[str, list[int]]] = []
    taken = 0
    rest = list(pending)
    while rest and taken < size:
        prompt, group = rest[0]
        room = size - taken
        if len(group) <= room:
            batch.append(rest.pop(0))
            taken += len(group)
        elif not batch:
            batch.append((prompt, group[:room]))
            rest[0] = (prompt, group[room:])
            taken = size
        else:
            break
    return batch, rest


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
