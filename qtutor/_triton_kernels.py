"""Triton matrix-vector kernels for batch-1 decoding with packed 4-bit weights (chapter 7).

Imported lazily by :mod:`qtutor.kernels` (this module needs ``triton``). Each kernel is
compiled by Triton for CUDA tensors and run by Triton's interpreter for CPU tensors, so the
tests check the very same kernel source on a machine without a GPU.

Both kernels compute ``y = W x + b`` for ONE input row ``x`` (in_features,) and read the
packed weight straight from the layer's own storage (no re-packed copy):

* :func:`int4_gemv`: uniform asymmetric int4, ``w = s_g (q - z_g)`` with ``qweight`` (out, in/2)
  uint8 (two codes per byte, the first in the low nibble, as ``qtutor.quant.base.pack_codes``),
  fp16 ``scales`` (out, n_groups) and packed 4-bit ``qzeros`` (out, ceil(n_groups/2)) or none
  (symmetric: z = 8). Groups of ``group_size`` consecutive input columns.
* :func:`lut_gemv`: palettized 4-bit, ``w = LUT[row // rows_per_lut][idx] * scale[row]`` with
  packed indices (out, in/2) uint8 (low nibble first), ``lut`` (n_luts, 16) fp16 and optional
  fp16 per-row ``scales`` (out,). The 16-entry LUT rows of a block of output rows are loaded
  once into registers and each weight is looked up with ``tl.gather`` (``mode="gather"``), or
  read through the L1 cache with an indexed load (``mode="load"``).

A program handles ``BLOCK_N`` output rows and walks the input dimension; accumulation is in
float32 and the result is written in ``x``'s dtype. On CUDA the block sizes are autotuned per
(out, in) shape on the first call (do that before capturing a CUDA graph).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

try:  # triton >= 3.4
    from triton import knobs

    def _interpret_mode() -> bool:
        return bool(knobs.runtime.interpret)
except ImportError:  # pragma: no cover - older triton
    import os

    def _interpret_mode() -> bool:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------- int4, scale + zero
# 2^23 as float32 has a zero mantissa: OR-ing a 4-bit code q into the mantissa's low bits and
# reading the word back as a float gives 2^23 + q exactly, without an int->float conversion
# instruction (a quarter-rate instruction on NVIDIA GPUs, one per weight). Subtracting 2^23 + z
# then gives (q - z) exactly. This is the usual trick of fast int4 kernels (FasterTransformer,
# Marlin), here in 32-bit form.
MAGIC_BITS = tl.constexpr(0x4B000000)   # the bits of 8388608.0 = 2^23
MAGIC = tl.constexpr(8388608.0)


def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, G, stride_w, stride_s, stride_z,
                      GS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, GPI: tl.constexpr):
    """y[n] = sum_g s[n,g] * sum_{k in g} (q[n,k] - z[n,g]) x[k] (+ b[n]); GPI groups per step."""
    HALF: tl.constexpr = GS // 2
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)                    # (BN,)
    rmask = rows < N
    gi = tl.arange(0, GPI)                                          # (GPI,)
    hh = tl.arange(0, HALF)                                         # (HALF,) byte in a group
    kk = tl.arange(0, GS)                                           # (GS,) column in a group
    acc = tl.zeros((BLOCK_N, GPI), dtype=tl.float32)
    for g0 in range(0, G, GPI):
        g = g0 + gi
        gmask = g < G
        m2 = rmask[:, None] & gmask[None, :]                        # (BN, GPI)
        s = tl.load(s_ptr + rows[:, None] * stride_s + g[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zb = tl.load(z_ptr + rows[:, None] * stride_z + g[None, :] // 2, mask=m2, other=0).to(tl.int32)
            z = ((zb >> ((g[None, :] % 2) * 4)) & 0xF).to(tl.float32)
        else:
            z = tl.full((BLOCK_N, GPI), 8.0, dtype=tl.float32)
        col = g[:, None] * HALF + hh[None, :]                       # (GPI, HALF) byte column
        b = tl.load(w_ptr + rows[:, None, None] * stride_w + col[None, :, :],
                    mask=m2[:, :, None], other=0).to(tl.int32)      # (BN, GPI, HALF)
        lo = ((b & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True)          # 2^23 + even code
        hi = (((b >> 4) & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True)   # 2^23 + odd code
        q = tl.reshape(tl.join(lo, hi), (BLOCK_N, GPI, GS))         # columns in order
        w = q - (z + MAGIC)[:, :, None]                             # q - z, exact
        x = tl.load(x_ptr + g[:, None] * GS + kk[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        acc += s * tl.sum(w * x[None, :, :], axis=2)                # scale once per group
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


# --------------------------------------------------------------------------- 4-bit LUT
def _lut_gemv_kernel(x_ptr, w_ptr, lut_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_w, ROWS_PER_LUT,
                     HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n] = scale[n] * sum_k LUT[n // R][idx[n,k]] x[k] (+ b[n]). The LUT may be fp16 or fp32."""
    HALF: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    lrow = rows // ROWS_PER_LUT
    c = tl.arange(0, 16)
    if GATHER:
        lut = tl.load(lut_ptr + lrow[:, None] * 16 + c[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    hk = tl.arange(0, HALF)
    kc = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    KB = K // 2
    for k0 in range(0, KB, HALF):
        kk = k0 + hk                                                # byte column
        km = kk < KB
        m2 = rmask[:, None] & km[None, :]
        b = tl.load(w_ptr + rows[:, None] * stride_w + kk[None, :], mask=m2, other=0).to(tl.int32)
        lo = b & 0xF
        hi = (b >> 4) & 0xF
        if GATHER:  # the LUT rows sit in registers
            wl = tl.gather(lut, lo, axis=1)
            wh = tl.gather(lut, hi, axis=1)
        else:       # indexed load from the (L1-resident) LUT
            wl = tl.load(lut_ptr + lrow[:, None] * 16 + lo, mask=m2, other=0.0).to(tl.float32)
            wh = tl.load(lut_ptr + lrow[:, None] * 16 + hi, mask=m2, other=0.0).to(tl.float32)
        w = tl.reshape(tl.join(wl, wh), (BLOCK_N, BLOCK_K))         # columns in order
        xk = 2 * k0 + kc
        x = tl.load(x_ptr + xk, mask=xk < K, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_SCALES:
        y *= tl.load(s_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


# --------------------------------------------------------------------------- compiled variants
_int4_jit = triton.jit(_int4_gemv_kernel)
_lut_jit = triton.jit(_lut_gemv_kernel)
_INTERPRETED: dict = {}

# Batch-1 GEMVs are latency-bound at these sizes: configs range from many row blocks with a few
# groups per step to few rows with (almost) the whole input dimension in one step, so that
# each program issues all its loads at once instead of looping. Autotuning picks per shape.
_INT4_CONFIGS = [triton.Config({"BLOCK_N": bn, "GPI": gpi}, num_warps=w)
                 for bn, gpi, w in [(2, 16, 4), (2, 32, 8), (4, 8, 4), (4, 16, 8), (8, 4, 4), (8, 8, 8),
                                    (16, 4, 8)]]
_LUT_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
                for bn, bk, w in [(2, 2048, 4), (2, 4096, 8), (4, 1024, 4), (8, 512, 4), (8, 1024, 8),
                                  (16, 256, 4)]]
_int4_tuned = triton.autotune(configs=_INT4_CONFIGS, key=["N", "G", "GS"])(_int4_jit)
_lut_tuned = triton.autotune(configs=_LUT_CONFIGS, key=["N", "K", "GATHER", "HAS_SCALES"])(_lut_jit)

#: block sizes used where nothing is tuned (the interpreter, or an explicit ``config=``)
DEFAULT_INT4 = {"BLOCK_N": 4, "GPI": 2}
DEFAULT_LUT = {"BLOCK_N": 4, "BLOCK_K": 64}


def _interpreted(fn):
    if fn not in _INTERPRETED:
        _INTERPRETED[fn] = InterpretedFunction(fn)
    return _INTERPRETED[fn]


@contextmanager
def _interpreting():
    """Let the interpreter call triton.language's own jit'd helpers (``tl.sum``, ``tl.zeros``).

    With ``TRITON_INTERPRET=1`` set before ``import triton`` those helpers are interpreted
    functions; without it they are ``JITFunction`` objects that refuse to be called from Python.
    For the duration of a CPU launch, a call to one runs its Python source in the interpreter.
    """
    if _interpret_mode():
        yield
        return
    original = JITFunction.__call__
    JITFunction.__call__ = lambda self, *args, **kwargs: _interpreted(self.fn)(*args, **kwargs)
    try:
        yield
    finally:
        JITFunction.__call__ = original


def _launch(fn, jit, tuned, default, config, grid_n, args, kwargs):
    if args[0].device.type == "cpu":  # Triton's interpreter: same kernel source, run in numpy
        meta = {**default, **(config or {})}
        with _interpreting():
            _interpreted(fn)[(triton.cdiv(grid_n, meta["BLOCK_N"]),)](*args, **kwargs, **meta)
    elif config is not None:
        meta = dict(config)
        num_warps = meta.pop("num_warps", 4)
        jit[(triton.cdiv(grid_n, meta["BLOCK_N"]),)](*args, **kwargs, **meta, num_warps=num_warps)
    else:
        tuned[lambda meta: (triton.cdiv(grid_n, meta["BLOCK_N"]),)](*args, **kwargs)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros, bias,
              group_size: int, config: dict = None) -> torch.Tensor:
    """``W x + b`` for one row ``x`` (in,) with a packed asymmetric int4 weight -> (out,) in x's dtype.

    ``group_size`` must be a power of two >= 2 that divides ``in_features``.
    """
    N, K = qweight.shape[0], x.numel()
    G = scales.shape[1]
    x = x.reshape(-1).contiguous()
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    dummy = scales
    args = (x, qweight, scales, dummy if qzeros is None else qzeros, dummy if bias is None else bias, y,
            N, G, qweight.stride(0), scales.stride(0), 0 if qzeros is None else qzeros.stride(0))
    kwargs = dict(GS=group_size, HAS_ZEROS=qzeros is not None, HAS_BIAS=bias is not None)
    assert G * group_size == K, "group_size must divide in_features"
    _launch(_int4_gemv_kernel, _int4_jit, _int4_tuned, DEFAULT_INT4, config, N, args, kwargs)
    return y


def lut_gemv(x: torch.Tensor, qweight: torch.Tensor, lut: torch.Tensor, scales, bias, rows_per_lut: int,
             mode: str = "gather", config: dict = None) -> torch.Tensor:
    """``W x + b`` for one row ``x`` (in,) with packed 4-bit LUT indices -> (out,) in x's dtype."""
    N, K = qweight.shape[0], x.numel()
    x = x.reshape(-1).contiguous()
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    dummy = lut
    args = (x, qweight, lut, dummy if scales is None else scales, dummy if bias is None else bias, y,
            N, K, qweight.stride(0), rows_per_lut)
    kwargs = dict(HAS_SCALES=scales is not None, HAS_BIAS=bias is not None, GATHER=mode == "gather")
    _launch(_lut_gemv_kernel, _lut_jit, _lut_tuned, DEFAULT_LUT, config, N, args, kwargs)
    return y
