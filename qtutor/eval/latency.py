"""Decode latency in milliseconds per generated token (chapter 0).

Batch 1, a fixed prompt, greedy decoding of ``new_tokens`` tokens with the model's KV cache.
The prompt's prefill is timed separately and not included; one warm-up run precedes the timed
runs, and the median over ``runs`` is reported together with the device and dtype.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class LatencyResult:
    ms_per_token: float  # median over runs of (decode time / new tokens)
    runs_ms_per_token: list
    prefill_ms: float  # median prefill time of the prompt
    prompt_tokens: int
    new_tokens: int
    device: str
    dtype: str


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


@torch.no_grad()
def greedy_decode(model, prompt_ids: torch.Tensor, new_tokens: int):
    """Greedy decode with a KV cache -> (generated ids (new_tokens,), prefill s, decode s)."""
    device = next(model.parameters()).device
    ids = prompt_ids.view(1, -1).to(device)
    _sync(device)
    t0 = time.perf_counter()
    kw = _cache_kwarg(model)
    out = model(ids, use_cache=True)
    cache = _cache_of(out)
    next_id = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t1 = time.perf_counter()
    generated = [next_id]
    for _ in range(new_tokens - 1):
        out = model(next_id, use_cache=True, **{kw: cache})
        cache = _cache_of(out)
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(next_id)
    _sync(device)
    t2 = time.perf_counter()
    return torch.cat(generated, dim=1)[0], t1 - t0, t2 - t1


def decode_latency(
    model, prompt_ids: torch.Tensor, new_tokens: int = 50, runs: int = 5, warmup: int = 1
) -> LatencyResult:
    """Median ms per decoded token over ``runs`` greedy decodes of ``new_tokens`` tokens.

    The first token comes from the prefill; the decode phase produces the other
    ``new_tokens - 1`` one step each, and its time is divided by that count.
    """
    for _ in range(warmup):
        greedy_decode(model, prompt_ids, new_tokens)
    per_token, prefill = [], []
    for _ in range(runs):
        _, t_prefill, t_decode = greedy_decode(model, prompt_ids, new_tokens)
        per_token.append(1000 * t_decode / max(new_tokens - 1, 1))
        prefill.append(1000 * t_prefill)
    p = next(model.parameters())
    return LatencyResult(
        statistics.median(per_token),
        per_token,
        statistics.median(prefill),
        int(prompt_ids.numel()),
        new_tokens,
        str(p.device),
        str(p.dtype).replace("torch.", ""),
    )
