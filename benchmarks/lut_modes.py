"""Experiments: the other ways a LUT GEMV can read a palette entry (chapter 7, benchmarks/README.md).

``qtutor`` keeps two ways for its 4-bit LUT GEMV (:mod:`qtutor.runtime.triton_gemv`): ``prmt``
(each row's 16 fp16 entries in 8 registers, eight indices looked up per 32-bit word with byte
permutes, no memory access per weight) and ``load`` (an indexed load from the L1-resident LUT,
the fallback where ``prmt`` does not apply). The modes tried on the way there live here, runnable,
with what they measured kept in ``benchmarks/README.md`` (``gemv_speed_*.csv``,
``decode_speed*.csv``):

* ``gather``: the program's LUT rows loaded once into registers, ``tl.gather`` per weight;
* ``load-f32``: the indexed load from a stored float32 copy of the LUTs (counted in the bytes);
* ``pairs``: one load per packed byte from a stored 256-entry table of weight pairs per LUT
  (FLUTE's vectorized lookup, Guo et al., 2024; counted in the bytes).

:func:`use_mode` gives every palettized layer of a model one of them, for ``gemv_speed.py`` and
``decode_speed.py``; ``tests/test_lut_experiments.py`` checks each against the reference forward
in Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtutor.errors import QtutorError
from qtutor.runtime import kernels
from qtutor.runtime.triton_gemv import _LUT_CONFIGS, DEFAULT_LUT, _autotune, _finish_rows, _launch, lut_load_args

# --------------------------------------------------------------------------- 4-bit LUT
# How a weight's table entry is read (the MODE constexpr):
GATHER = tl.constexpr(0)  # the program's LUT rows are loaded once into registers; tl.gather per weight
LOAD = tl.constexpr(1)  # an indexed load per weight from the (L1-resident) LUT, fp16 or fp32
PAIRS = tl.constexpr(2)  # an indexed load per BYTE from a 256-entry table of weight pairs: entry b
# holds the fp16 bits of LUT[b & 15] (low half) and LUT[b >> 4] (high
# half), the "vectorized lookup" of FLUTE (Guo et al., 2024): half the loads


def _lut_gemv_kernel(
    x_ptr,
    w_ptr,
    lut_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    stride_w,
    ROWS_PER_LUT,
    HAS_SCALES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[n] = scale[n] * sum_k LUT[n // R][idx[n,k]] x[k] (+ b[n]).

    ``lut_ptr``: the (n_luts, 16) LUT in fp16 or fp32 (GATHER, LOAD), or the (n_luts, 256) int32
    pair table (PAIRS)."""
    HALF: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    lrow = rows // ROWS_PER_LUT
    if MODE == GATHER:
        c = tl.arange(0, 16)
        lut = tl.load(lut_ptr + lrow[:, None] * 16 + c[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    hk = tl.arange(0, HALF)
    kc = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    KB = K // 2
    for k0 in range(0, KB, HALF):
        kk = k0 + hk  # byte column
        km = kk < KB
        m2 = rmask[:, None] & km[None, :]
        b = tl.load(w_ptr + rows[:, None] * stride_w + kk[None, :], mask=m2, other=0).to(tl.int32)
        if MODE == PAIRS:  # one load gives both weights of the byte (low nibble = even column)
            v = tl.load(lut_ptr + lrow[:, None] * 256 + b, mask=m2, other=0)
            wl = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            wh = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        elif MODE == GATHER:  # the LUT rows sit in registers
            wl = tl.gather(lut, b & 0xF, axis=1)
            wh = tl.gather(lut, (b >> 4) & 0xF, axis=1)
        else:  # LOAD: indexed load from the (L1-resident) LUT
            wl = tl.load(lut_ptr + lrow[:, None] * 16 + (b & 0xF), mask=m2, other=0.0).to(tl.float32)
            wh = tl.load(lut_ptr + lrow[:, None] * 16 + ((b >> 4) & 0xF), mask=m2, other=0.0).to(tl.float32)
        w = tl.reshape(tl.join(wl, wh), (BLOCK_N, BLOCK_K))  # columns in order
        xk = 2 * k0 + kc
        x = tl.load(x_ptr + xk, mask=xk < K, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    _finish_rows(tl.sum(acc, axis=1), rows, rmask, s_ptr, b_ptr, y_ptr, HAS_SCALES, HAS_BIAS)


def lut_pair_table(lut: torch.Tensor) -> torch.Tensor:
    """(n_luts, 16) fp16 LUT -> (n_luts, 256) int32 table of weight pairs for ``mode="pairs"``:
    entry ``b`` holds the fp16 bits of ``lut[:, b & 15]`` in its low half and of
    ``lut[:, b >> 4]`` in its high half (a packed byte's two weights, low nibble first)."""
    bits = lut.to(torch.float16).contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    b = torch.arange(256, device=lut.device)
    pairs = bits[:, b & 15] | (bits[:, b >> 4] << 16)  # in [0, 2^32)
    return torch.where(pairs >= 2**31, pairs - 2**32, pairs).to(torch.int32).contiguous()


# tl.gather compiles (Triton 3.6, sm_90) only with at least two rows per warp: with fewer,
# the TritonGPUOptimizeThreadLocality pass fails ("PassManager::run failed"); its configs keep to
# BLOCK_N >= 2 * num_warps (checked by compiling each for sm_90, which needs no GPU).
_LUT_GATHER_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
    for bn, bk, w in [
        (8, 256, 4),
        (8, 512, 4),
        (8, 1024, 4),
        (16, 128, 4),
        (16, 256, 4),
        (16, 512, 8),
        (16, 1024, 8),
        (32, 128, 4),
        (32, 256, 8),
        (32, 512, 8),
        (64, 128, 8),
    ]
]
_lut_jit = triton.jit(_lut_gemv_kernel)
_lut_tuned = _autotune(_LUT_CONFIGS, ["N", "K", "MODE", "HAS_SCALES"])(_lut_jit)
_lut_gather_tuned = _autotune(_LUT_GATHER_CONFIGS, ["N", "K", "HAS_SCALES"])(_lut_jit)
DEFAULT_LUT_GATHER = {"BLOCK_N": 8, "BLOCK_K": 64}

#: the experimental modes -> the kernel's MODE, and the buffer each reads instead of the LUT
MODES = {"gather": GATHER.value, "load-f32": LOAD.value, "pairs": PAIRS.value}
TABLES = {"load-f32": "lut_f32", "pairs": "lut_pairs"}


def lut_gemv_mode(x, qweight, table, scales, bias, rows_per_lut: int, mode: str, config: dict = None):
    """``W x + b`` for one row ``x`` (in,) with packed 4-bit indices, reading the palette entries
    the ``mode`` way -> (out,) in x's dtype. ``table``: the (n_luts, 16) LUT (gather), its float32
    copy (load-f32) or :func:`lut_pair_table` (pairs)."""
    if mode not in MODES:
        raise QtutorError(f"unknown experimental LUT mode {mode!r}; choose from {', '.join(MODES)}")
    width = 256 if mode == "pairs" else 16
    if table.dim() != 2 or table.shape[1] != width or (mode == "pairs") != (table.dtype == torch.int32):
        raise QtutorError(f"LUT mode {mode!r} needs a (n_luts, {width}) table, got {tuple(table.shape)} {table.dtype}")
    y, args, kwargs = lut_load_args(x, qweight, table, scales, bias, rows_per_lut)
    kwargs["MODE"] = MODES[mode]
    tuned = _lut_gather_tuned if mode == "gather" else _lut_tuned
    default = DEFAULT_LUT_GATHER if mode == "gather" else DEFAULT_LUT
    _launch(_lut_gemv_kernel, _lut_jit, tuned, default, config, y.numel(), args, kwargs)
    return y


class _ExperimentLUT:
    """The Triton LUT layer's one-row path, through :func:`lut_gemv_mode` in ``experiment_mode``."""

    experiment_mode: str = "gather"
    kernel_buffers = ("lut_f32", "lut_pairs")  # dropped again by qtutor.runtime.kernels.restore

    def _gemv(self, x):
        table = getattr(self, TABLES[self.experiment_mode]) if self.experiment_mode in TABLES else self.lut
        return lut_gemv_mode(
            x, self.qweight, table, self.scales, self.bias, self.rows_per_lut, self.experiment_mode, self.triton_config
        )


_CLASSES: dict = {}


def _experiment_class(cls):
    if cls not in _CLASSES:
        new = type("Experiment" + cls.__name__, (_ExperimentLUT, cls), {"__module__": __name__})
        # the stored tables hold one slice per output row: q/k/v and gate/up still stack
        kernels.ROW_DIMS[new] = {**kernels.row_dims(cls), "lut_f32": 0, "lut_pairs": 0}
        _CLASSES[cls] = new
    return _CLASSES[cls]


def use_mode(model: torch.nn.Module, mode: str, kernel_on_cpu: bool = False) -> dict:
    """Give every 4-bit LUT layer of ``model`` the experimental ``mode``, in place -> {name: what
    it runs}. The layers first get :func:`qtutor.runtime.kernels.accelerate`'s Triton path (so
    every other layer keeps its own); the float32 copy or the pair table is stored as a buffer,
    so the layer's bytes (and bits per weight) count it."""
    if mode not in MODES:
        raise QtutorError(f"unknown experimental LUT mode {mode!r}; choose from {', '.join(MODES)}")
    kernels.accelerate(model, "triton", lut_mode="load", kernel_on_cpu=kernel_on_cpu)
    converted = {}
    for name, m in model.named_modules():
        if isinstance(m, kernels._TritonLUT):
            m.__class__ = _experiment_class(type(m))
            m.experiment_mode = mode
            if mode == "load-f32":
                m.register_buffer("lut_f32", m.lut.float().contiguous())
            elif mode == "pairs":
                m.register_buffer("lut_pairs", lut_pair_table(m.lut))
            converted[name] = f"triton lut_gemv ({mode})"
    return converted
