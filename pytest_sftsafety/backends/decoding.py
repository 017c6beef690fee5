"""Batched decoding with per-row seeded sampling and one prefill shared by the samples of a prompt.

A row's token at step ``t`` is ``argmax(filtered_logits / T + Gumbel noise)``, where the noise for
(row seed, step, token) comes from a counter-based integer hash evaluated on the device. The
Gumbel-max trick (Gumbel 1954; Maddison, Tarlow and Minka 2014) makes that argmax an exact draw from
the filtered softmax, and since the noise depends only on (seed, step, token), a sample does not
depend on its batch, its batch neighbours, the batch order or the device. Temperature, top-p and
min-p are applied in transformers' order and with its definitions (``TemperatureLogitsWarper``,
``TopPLogitsWarper``, ``MinPLogitsWarper``, keeping at least one token). Temperature 0 is plain argmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # odd 27-bit multiplier: products of 32-bit values stay inside int64
_TOKEN_SALT = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (two multiply-xorshift rounds) on int64 tensors holding 32-bit values."""
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), shape (rows, vocab), a pure function of (seed, step, token index)."""
    seeds = seeds.to(torch.int64)
    row = _mix32(_mix32(_mix32(seeds & _MASK32) ^ ((seeds >> 32) & _MASK32)) ^ (step & _MASK32))
    tokens = _mix32(torch.arange(vocab, device=seeds.device, dtype=torch.int64) ^ _TOKEN_SALT)
    bits = _mix32(row[:, None] ^ tokens[None, :]) >> 8  # 24 random bits, as torch.rand uses for float32
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def filter_logits(logits: torch.Tensor, temperatures: torch.Tensor, top_p: float, min_p: float) -> torch.Tensor:
    """Temperature, then top-p, then min-p, as transformers applies them; removed tokens become -inf."""
    scores = logits / temperatures[:, None]
    if top_p < 1.0:
        sorted_scores, sorted_index = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False
        scores = scores.masked_fill(remove_sorted.scatter(1, sorted_index, remove_sorted), float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
        sorted_index = torch.argsort(scores, descending=True, dim=-1)
        remove_sorted = torch.gather(remove, -1, sorted_index)
        remove_sorted[..., :1] = False
        scores = scores.masked_fill(remove_sorted.scatter(1, sorted_index, remove_sorted), float("-inf"))
    return scores


def choose_tokens(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, step: int,
                  top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Next token per row: argmax where the temperature is 0, a seeded draw elsewhere."""
    chosen = logits.argmax(dim=-1)
    sampled = (temperatures > 0).nonzero().flatten()
    if sampled.numel():
        scores = filter_logits(logits[sampled].float(), temperatures[sampled].float(), top_p, min_p)
        gumbel = -torch.log(-torch.log(uniform_noise(seeds[sampled], step, logits.shape[-1])))
        chosen[sampled] = (scores + gumbel).argmax(dim=-1)
    return chosen


@torch.inference_mode()
def cache_argument(model) -> str:
    """The name under which the model's forward takes a KV cache: ``cache`` in newer transformers, which
    deprecate ``past_key_values`` (removed in 5.40); looked up on the base model under a peft wrapper."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def decode(model, prompts: Sequence[Sequence[int]], row_prompt: Sequence[int], temperatures: Sequence[float],
           seeds: Sequence[int], *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
           top_p: float = 1.0, min_p: float = 0.0) -> list[list[int]]:
    """Generate for ``rows``; row ``i`` continues prompt ``row_prompt[i]``. Returns new token ids per row.

    The prompts are prefilled once, left-padded, and their KV cache is copied to each of their rows.
    Finished rows leave the batch, so short answers do not pay for long ones.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    with_cache = {cache_argument(model): cache}
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **with_cache).logits[:, -1, :]
    select = torch.tensor(list(row_prompt), device=device)
    # Index the cache with CPU indices: under --gpus-per-worker its layers live on several GPUs.
    cache.batch_select_indices(select.cpu())
    logits, mask, last_position = logits[select], mask[select], positions[select, -1]
    temps = torch.tensor(list(temperatures), device=device, dtype=torch.float32)
    seed_tensor = torch.tensor([s & ((1 << 63) - 1) for s in seeds], device=device, dtype=torch.int64)
    eos = torch.tensor(list(eos_ids), device=device, dtype=torch.long)  # long even when empty: no end token
    active = torch.arange(len(row_prompt), device=device)
    outputs: list[list[int]] = [[] for _ in row_prompt]
    for step in range(max_new_tokens):
        tokens = choose_tokens(logits, temps, seed_tensor, step, top_p, min_p)
        done = torch.isin(tokens, eos)
        for row, token, finished in zip(active.tolist(), tokens.tolist(), done.tolist(), strict=True):
            if not finished:
                outputs[row].append(token)
        if step == max_new_tokens - 1:
            break
        if done.any():
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep.cpu())
            active, tokens, mask = active[keep], tokens[keep], mask[keep]
            last_position, temps, seed_tensor = last_position[keep], temps[keep], seed_tensor[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        last_position = last_position + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last_position[:, None],
                       use_cache=True, **with_cache).logits[:, -1, :]
    return outputs
