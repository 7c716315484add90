"""Is 4-bit faster here? Decode speed measured on the reader's own machine (chapter 7).

:func:`compare_decode_speed` times batch-1 greedy decoding of a model and of 4-bit copies of it
with the fast harness (:func:`qtutor.runtime.decode.fast_decode_latency`: static KV cache,
stacked q/k/v and gate/up projections; on a GPU also a CUDA graph and fused glue kernels), the
same harness and the same rows as ``benchmarks/decode_speed.py``, at a small cost (a few
tokens, a few runs, the model at hand). Each quantized copy is timed with its reference forward
(dequantize the weight, then an ordinary matmul) and, where one exists on this device, with the
kernel that reads the packed weights directly (:func:`qtutor.runtime.kernels.accelerate`):

* on a GPU (float16): the baseline; RTN int4 (g128) with its reference forward and with the
  Triton int4 GEMV (tinygemm where Triton is missing); 4-bit palettization with its reference
  forward and with the Triton LUT GEMV (LUT in registers, ``prmt`` lookups);
* on a CPU (float32): the baseline; RTN int4 with its reference forward and with the CPU kernel
  of ``accelerate``'s ``"cpu"`` backend (tinygemm's ``aten._weight_int4pack_mm_for_cpu``, the
  row cast to bfloat16 for it); palettization with its reference forward and with the book's C
  LUT kernel (:mod:`qtutor.runtime.cpu_lut`); then, in bfloat16, the baseline and RTN int4
  through tinygemm in a bfloat16 model.

Each row is compared with the baseline of its activation dtype. The protocol is
``decode_latency``'s: a fixed prompt, ``new_tokens`` tokens of which the first comes from the
prefill, one warm-up, the median over ``runs``.
"""

from __future__ import annotations

import copy
import gc
import time
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..quant.base import QuantizedLinear


def linear_bits(model: nn.Module) -> float:
    """Bits stored per weight in the decoder layers' linears (``model.model.layers``)."""
    nbytes = numel = 0
    for m in model.model.layers.modules():
        if isinstance(m, QuantizedLinear):
            nbytes += m.weight_nbytes
        elif isinstance(m, nn.Linear):
            nbytes += m.weight.numel() * m.weight.element_size()
        else:
            continue
        numel += m.in_features * m.out_features
    return 8.0 * nbytes / numel


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compare_decode_speed(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    new_tokens: int = 16,
    runs: int = 2,
    palettized: Optional[nn.Module] = None,
    rtn_method: str = "rtn_int4",
    lut_method: str = "palettization_4bit",
) -> list:
    """Rows of ms per decoded token on ``model``'s device, as described in the module docstring.

    model: the float model (float16 on a GPU, float32 on a CPU, as ``qtutor.book.load_model``
    gives); it is not modified. prompt_ids: (P,) token ids. palettized: a copy already quantized
    with ``lut_method`` (saves the k-means; copied, not modified). Returns one dict per row:
    ``row``, ``method``, ``act_dtype``, ``kernel`` (what the quantized layers' decode step ran),
    ``ms_per_token``, ``prefill_ms``, ``baseline`` (the row it is compared with),
    ``vs_baseline`` (ms_per_token / the baseline's; < 1 is faster), ``bits_per_weight`` (decoder
    linears), ``harness``, ``seconds`` (to build and time the row) and ``status`` ("ok", or why
    the row failed: a failing kernel does not hide the other rows).
    """
    import qtutor
    from .kernels import accelerate
    from .decode import fast_decode_latency

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    base = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}.get(
        next(model.parameters()).dtype, "float"
    )
    rows: list = []
    baselines: dict = {}

    def quantized(method: str, src: nn.Module) -> nn.Module:
        q = copy.deepcopy(src)
        qtutor.quantize(q, method)
        return q

    def palettized_copy() -> nn.Module:
        return copy.deepcopy(palettized) if palettized is not None else quantized(lut_method, model)

    def row(name: str, method: str, make: Callable[[], nn.Module], backend: str, baseline: str):
        r = {"row": name, "method": method, "baseline": baseline}
        t0 = time.perf_counter()
        m = None
        try:
            m = make()
            if backend != "none":
                accelerate(m, backend)
            lat = fast_decode_latency(m, prompt_ids, new_tokens, runs=runs)
            kernels = sorted(set(lat.kernels.values()))
            quant = any(isinstance(x, QuantizedLinear) for x in m.modules())
            r.update(
                act_dtype=lat.dtype,
                ms_per_token=lat.ms_per_token,
                prefill_ms=lat.prefill_ms,
                kernel=", ".join(kernels) if kernels else ("reference forward" if quant else "torch matmul"),
                bits_per_weight=linear_bits(m),
                harness=lat.method,
                status="ok",
            )
            if name == baseline:
                baselines[name] = lat.ms_per_token
        except Exception as err:  # report and go on, as benchmarks/decode_speed.py does
            r["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        r["seconds"] = time.perf_counter() - t0
        rows.append(r)
        del m
        _free(device)

    row(base, "fp16_baseline", lambda: model, "none", base)
    rtn = quantized(rtn_method, model)
    row(f"{rtn_method}, reference", rtn_method, lambda m=rtn: m, "none", base)
    row(f"{rtn_method}, {'GPU' if cuda else 'CPU'} kernel", rtn_method, lambda m=rtn: copy.deepcopy(m), "auto", base)
    del rtn
    _free(device)
    row(f"{lut_method}, reference", lut_method, palettized_copy, "none", base)
    row(f"{lut_method}, {'GPU' if cuda else 'CPU'} kernel", lut_method, palettized_copy, "auto", base)
    if not cuda:
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        row("bf16", "fp16_baseline", lambda: bf16, "none", "bf16")
        row(f"{rtn_method} (bf16), tinygemm", rtn_method, lambda: quantized(rtn_method, bf16), "tinygemm", "bf16")
        del bf16
        _free(device)
    for r in rows:
        b = baselines.get(r["baseline"])
        r["vs_baseline"] = r["ms_per_token"] / b if b and "ms_per_token" in r else float("nan")
    return rows
