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


def _result(model, per_token: list, prefill: list, prompt_ids: torch.Tensor, new_tokens: int) -> LatencyResult:
    """The medians of the timed runs (ms per decoded token, prefill ms), with the model's device and dtype."""
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
    return _result(model, per_token, prefill, prompt_ids, new_tokens)


def _compile_config(device: torch.device):
    """transformers' defaults for compiling ``generate``'s forward (CUDA graphs on a GPU), and
    on a CPU too (transformers compiles on accelerators only unless told)."""
    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
    config._compile_all_devices = True  # a class attribute, not an argument
    return config


@torch.no_grad()
def hf_generate(model, prompt_ids: torch.Tensor, new_tokens: int, compile_config=None) -> torch.Tensor:
    """Greedy ``model.generate`` with a static KV cache -> the generated ids (new_tokens,).

    compile_config: a transformers ``CompileConfig`` to compile the forward with (one object
    reused across calls, so the compiled forward is reused too), or None: no compilation.
    """
    from transformers import GenerationConfig

    ids = prompt_ids.view(1, -1).to(next(model.parameters()).device)
    gen = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        cache_implementation="static",
        disable_compile=compile_config is None,
        compile_config=compile_config,
        pad_token_id=0,
    )
    return model.generate(ids, generation_config=gen)[0, ids.shape[1] :]


@torch.no_grad()
def hf_generate_latency(
    model, prompt_ids: torch.Tensor, new_tokens: int = 50, runs: int = 5, compile: bool = True
) -> LatencyResult:
    """What a Hugging Face user would run instead: :func:`hf_generate` (``model.generate``,
    greedy, static KV cache) with, when ``compile``, the forward compiled by ``torch.compile``
    (transformers' own auto-compilation), timed like :func:`decode_latency`.

    ``generate`` does not report its prefill, so each run generates ``new_tokens`` tokens and
    then one token; the difference over ``new_tokens - 1`` is the time per decoded token, the
    one-token run's time the prefill. One warm-up run of each comes first, which also compiles:
    compilation time is not counted, as a server compiles once. prompt_ids: (P,) token ids.
    """
    device = next(model.parameters()).device
    config = _compile_config(device) if compile else None

    def timed(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        hf_generate(model, prompt_ids, n, config)
        _sync(device)
        return time.perf_counter() - t0

    timed(new_tokens), timed(1)  # warm-up (and compilation)
    per_token, prefill = [], []
    for _ in range(runs):
        t_all, t_one = timed(new_tokens), timed(1)
        per_token.append(1000 * max(t_all - t_one, 0.0) / max(new_tokens - 1, 1))
        prefill.append(1000 * t_one)
    return _result(model, per_token, prefill, prompt_ids, new_tokens)
