"""transformers + peft backend: one model in memory serves the adapters and the reference.

Sampling is done by ``SeededSampler``: temperature and min-p as transformers defines them, then
Gumbel-max noise drawn from each row's own seed, so a sample does not depend on its batch.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import LogitsProcessor

from ..config import RunConfig
from ..errors import ModelLoadError
from ..seeding import step_seed
from . import GenRow
from .checkpoints import Checkpoint, ModelPlan

PLAIN_FORMAT = "User: {prompt}\nAssistant:"


def pick_device(device: str) -> str:
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device}: CUDA is not available here; use --device cpu")
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


class SeededSampler(LogitsProcessor):
    """Turns greedy decoding into per-row seeded sampling (Gumbel-max trick).

    For a row with temperature T > 0: scores / T, then min-p filtering (keep tokens whose probability
    is at least min_p times the top token's, as transformers' ``MinPLogitsWarper``), then Gumbel noise
    from ``step_seed(row seed, step)``. The argmax of the result is a draw from the filtered softmax
    (Gumbel 1954; Maddison et al. 2014). Rows with T = 0 are left untouched, so they stay greedy.
    """

    def __init__(self, rows: Sequence[GenRow], min_p: float, prompt_length: int) -> None:
        self.temperatures = [r.temperature for r in rows]
        self.seeds = [r.seed for r in rows]
        self.min_p = min_p
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        out = scores.clone()
        for row, (temp, seed) in enumerate(zip(self.temperatures, self.seeds, strict=True)):
            if temp == 0:
                continue
            logits = scores[row].float() / temp
            if self.min_p > 0:
                probs = torch.softmax(logits, dim=-1)
                logits = logits.masked_fill(probs < self.min_p * probs.max(), float("-inf"))
            generator = torch.Generator(device="cpu").manual_seed(step_seed(seed, step))
            uniform = torch.rand(logits.shape[-1], generator=generator, dtype=torch.float64)
            gumbel = -torch.log(-torch.log(uniform.clamp(1e-300, 1.0 - 1e-16)))
            out[row] = (logits.double() + gumbel.to(logits.device)).to(out.dtype)
        return out


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


class HFBackend:
    """Loads the plan's models lazily and generates for the variants ``candidate:I`` and ``reference``."""

    def __init__(self, cfg: RunConfig, plan: ModelPlan) -> None:
        self.cfg = cfg
        self.plan = plan
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self._model = None
        self._tokenizer = None
        self._loaded: str | None = None  # "adapters" or a checkpoint spec
        self.loads = 0
        self.warned_plain_format = False

    # -- loading -------------------------------------------------------------------------------
    def _load_kwargs(self, pickle_weights: bool) -> dict:
        kwargs: dict = {"dtype": self.dtype, "trust_remote_code": self.cfg.trust_remote_code}
        if not pickle_weights:
            kwargs["use_safetensors"] = True
        if self.cfg.load_in_4bit:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ModelLoadError("--load-in-4bit needs bitsandbytes: pip install 'pytest-sftsafety[quant]'") \
                    from None
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.dtype)
            kwargs["device_map"] = {"": self.device}
        return kwargs

    def _load_full(self, source: str, label: str, pickle_weights: bool):
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(source, **self._load_kwargs(pickle_weights))
        except Exception as exc:
            raise ModelLoadError(f"{label} {source}: weights failed to load ({_short(exc)}); check that the "
                                 f"checkpoint is complete and matches its config.json") from None
        if not self.cfg.load_in_4bit:
            model.to(self.device)
        model.eval()
        self.loads += 1
        return model

    def _load_tokenizer(self, sources: Sequence[str]):
        from transformers import AutoTokenizer

        last: BaseException | None = None
        for source in sources:
            try:
                tok = AutoTokenizer.from_pretrained(source, trust_remote_code=self.cfg.trust_remote_code)
                break
            except Exception as exc:  # no tokenizer files here: try the next source
                last = exc
        else:
            raise ModelLoadError(f"no tokenizer found in {', '.join(sources)} ({_short(last)}); save the "
                                 f"tokenizer with the adapter or the base model") from None
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    def _unload(self) -> None:
        self._model = None
        self._tokenizer = None
        self._loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _ensure_adapters(self) -> None:
        if self._loaded == "adapters":
            return
        self._unload()
        from peft import PeftModel

        base = self._load_full(self.plan.base, "base model", False)
        model = None
        for index, ckpt in enumerate(self.plan.candidates):
            try:
                if model is None:
                    model = PeftModel.from_pretrained(base, ckpt.path, adapter_name=f"candidate:{index}",
                                                      is_trainable=False)
                else:
                    model.load_adapter(ckpt.path, adapter_name=f"candidate:{index}", is_trainable=False)
            except Exception as exc:
                raise ModelLoadError(f"--model {ckpt.spec}: the adapter does not fit base {self.plan.base} "
                                     f"({_short(exc)}); pass the right --base-model") from None
        model.eval()
        self._model = model
        self._tokenizer = self._load_tokenizer([c.path for c in self.plan.candidates[:1]] + [self.plan.base])
        self._loaded = "adapters"

    def _ensure_checkpoint(self, ckpt: Checkpoint, label: str) -> None:
        if self._loaded == ckpt.spec:
            return
        self._unload()
        if ckpt.kind == "adapter":
            from peft import PeftModel

            base = self._load_full(ckpt.base, "base model", False)
            try:
                self._model = PeftModel.from_pretrained(base, ckpt.path, is_trainable=False)
            except Exception as exc:
                raise ModelLoadError(f"{label} {ckpt.spec}: the adapter does not fit base {ckpt.base} "
                                     f"({_short(exc)}); pass the right --base-model") from None
            self._tokenizer = self._load_tokenizer([ckpt.path, ckpt.base])
        else:
            self._model = self._load_full(ckpt.path, label, ckpt.pickle_weights)
            self._tokenizer = self._load_tokenizer([ckpt.path])
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
            self._ensure_checkpoint(self.plan.reference, "--reference")
        else:
            index = int(variant.split(":")[1])
            self._ensure_checkpoint(self.plan.candidates[index], "--model")
        yield

    # -- generation ----------------------------------------------------------------------------
    def _encode(self, prompt: str) -> list[int]:
        tok = self._tokenizer
        if tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        if not self.warned_plain_format:
            warnings.warn("the tokenizer has no chat template; prompts are sent as 'User: ...\\nAssistant:'",
                          stacklevel=2)
            self.warned_plain_format = True
        return tok(PLAIN_FORMAT.format(prompt=prompt))["input_ids"]

    def _generate_batch(self, encoded: list[list[int]], rows: list[GenRow]) -> list[str]:
        from transformers import GenerationConfig, LogitsProcessorList

        tok = self._tokenizer
        width = max(len(ids) for ids in encoded)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=self.device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded],
                                 device=self.device)
        gen_cfg = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, do_sample=False, num_beams=1,
                                   pad_token_id=pad, eos_token_id=tok.eos_token_id)
        sampler = SeededSampler(rows, self.cfg.min_p, width)
        with torch.inference_mode():
            output = self._model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_cfg,
                                          logits_processor=LogitsProcessorList([sampler]))
        return tok.batch_decode(output[:, width:], skip_special_tokens=True)

    def generate(self, variant: str, rows: Sequence[GenRow]) -> list[str]:
        """Answers for ``rows`` in order, generated in batches of similar prompt length."""
        if not rows:
            return []
        results: list[str | None] = [None] * len(rows)
        with self._variant(variant):
            encoded = [self._encode(r.prompt) for r in rows]
            order = sorted(range(len(rows)), key=lambda i: -len(encoded[i]))
            size = self.cfg.batch_size
            for start in range(0, len(order), size):
                chunk = order[start:start + size]
                texts = self._generate_batch([encoded[i] for i in chunk], [rows[i] for i in chunk])
                for i, text in zip(chunk, texts, strict=True):
                    results[i] = text
        return [r if r is not None else "" for r in results]

    def close(self) -> None:
        self._unload()

