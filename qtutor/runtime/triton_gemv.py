"""Triton matrix-vector kernels for batch-1 decoding with packed 4-bit weights (chapter 7).

Imported lazily by :mod:`qtutor.runtime.kernels` (this module needs ``triton``). Each kernel is
compiled by Triton for CUDA tensors and run by Triton's interpreter for CPU tensors, so the
tests check the very same kernel source on a machine without a GPU.

The GEMV kernels compute ``y = W x + b`` for ONE input row ``x`` (in_features,) and read the
packed weight straight from the layer's own storage (no re-packed copy):

* :func:`int4_gemv`: uniform asymmetric int4, ``w = s_g (q - z_g)`` with ``qweight`` (out, in/2)
  uint8 (two codes per byte, the first in the low nibble, as ``qtutor.quant.base.pack_codes``),
  fp16 ``scales`` (out, n_groups) and packed 4-bit ``qzeros`` (out, ceil(n_groups/2)) or none
  (symmetric: z = 8). Groups of ``group_size`` consecutive input columns.
* :func:`lut_gemv`: palettized 4-bit, ``w = LUT[row // rows_per_lut][idx] * scale[row]`` with
  packed indices (out, in/2) uint8 (low nibble first), ``lut`` (n_luts, 16) fp16 and optional
  fp16 per-row ``scales`` (out,). The LUT sits in 8 registers per row and eight indices at a
  time are looked up with byte permutes (``mode="prmt"``, no memory access per weight), or each
  weight is read through the L1 cache with an indexed load (``mode="load"``, the fallback).
  The other modes tried are experiments in ``benchmarks/lut_modes.py``.
* :func:`int8_gemv`: uniform 8-bit with one scale per output row (``rtn_int8``):
  ``w = s_n (q - z_n)`` with ``qweight`` (out, in) uint8 codes, fp16 ``scales`` (out, 1) and
  8-bit ``qzeros`` (out, 1) or none (symmetric: z = 128). Weight-only: the row ``x`` stays in
  its float dtype.
* :func:`nf4_gemv`: QLoRA's NF4 in bitsandbytes' layout (flat codes, the first of a byte in the
  HIGH nibble; blocks of 64 along the rows), through the same register-LUT lookups as ``prmt``
  with the 16 NF4 levels as the table; each block's absmax is rebuilt from the double
  quantization inside the kernel (``dyn[code] * absmax2[b // 256] + offset``).
* :func:`w8a8_gemv`: SmoothQuant's W8A8: the row is quantized per token ONCE by a one-program
  kernel (:func:`quantize_row`), then int8 x int8 products are summed in int32.

A program handles ``BLOCK_N`` output rows and walks the input dimension; accumulation is in
float32 and the result is written in ``x``'s dtype. On CUDA the block sizes are autotuned per
(out, in) shape on the first call (do that before capturing a CUDA graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

from ..errors import QtutorError
from ._interpret import _interpreted, _interpreting

# --------------------------------------------------------------------------- int4, scale + zero
# 2^23 as float32 has a zero mantissa: OR-ing a 4-bit code q into the mantissa's low bits and
# reading the word back as a float gives 2^23 + q exactly, without an int->float conversion
# instruction (a quarter-rate instruction on NVIDIA GPUs, one per weight). Subtracting 2^23 + z
# then gives (q - z) exactly. This is the usual trick of fast int4 kernels (FasterTransformer,
# Marlin), here in 32-bit form.
MAGIC_BITS = tl.constexpr(0x4B000000)  # the bits of 8388608.0 = 2^23
MAGIC = tl.constexpr(8388608.0)


@triton.jit
def _finish_rows(y, rows, rmask, s_ptr, b_ptr, y_ptr, HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Every GEMV's epilogue: ``y[n] *= s[n]``, ``y[n] += b[n]`` (float32), stored in y's dtype."""
    if HAS_SCALES:
        y *= tl.load(s_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


def _int4_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    N,
    G,
    stride_w,
    stride_s,
    stride_z,
    GS: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GPI: tl.constexpr,
):
    """y[n] = sum_g s[n,g] * sum_{k in g} (q[n,k] - z[n,g]) x[k] (+ b[n]); GPI groups per step."""
    HALF: tl.constexpr = GS // 2
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rmask = rows < N
    gi = tl.arange(0, GPI)  # (GPI,)
    hh = tl.arange(0, HALF)  # (HALF,) byte in a group
    kk = tl.arange(0, GS)  # (GS,) column in a group
    acc = tl.zeros((BLOCK_N, GPI), dtype=tl.float32)
    for g0 in range(0, G, GPI):
        g = g0 + gi
        gmask = g < G
        m2 = rmask[:, None] & gmask[None, :]  # (BN, GPI)
        s = tl.load(s_ptr + rows[:, None] * stride_s + g[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zb = tl.load(z_ptr + rows[:, None] * stride_z + g[None, :] // 2, mask=m2, other=0).to(tl.int32)
            z = ((zb >> ((g[None, :] % 2) * 4)) & 0xF).to(tl.float32)
        else:
            z = tl.full((BLOCK_N, GPI), 8.0, dtype=tl.float32)
        col = g[:, None] * HALF + hh[None, :]  # (GPI, HALF) byte column
        b = tl.load(w_ptr + rows[:, None, None] * stride_w + col[None, :, :], mask=m2[:, :, None], other=0).to(
            tl.int32
        )  # (BN, GPI, HALF)
        lo = ((b & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True)  # 2^23 + even code
        hi = (((b >> 4) & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True)  # 2^23 + odd code
        q = tl.reshape(tl.join(lo, hi), (BLOCK_N, GPI, GS))  # columns in order
        w = q - (z + MAGIC)[:, :, None]  # q - z, exact
        x = tl.load(x_ptr + g[:, None] * GS + kk[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        acc += s * tl.sum(w * x[None, :, :], axis=2)  # scale once per group
    _finish_rows(tl.sum(acc, axis=1), rows, rmask, b_ptr, b_ptr, y_ptr, False, HAS_BIAS)


# --------------------------------------------------------------------------- int8, one scale per row
def _int8_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    stride_w,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[n] = s[n] sum_k (q[n,k] - z[n]) x[k] (+ b[n]): weight-only int8, one scale per row
    (``z = 128`` when symmetric). ``q - z`` is exact in float32 through the 2^23 trick above."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    kc = tl.arange(0, BLOCK_K)
    if HAS_ZEROS:
        z = tl.load(z_ptr + rows, mask=rmask, other=0).to(tl.float32)
    else:
        z = tl.full((BLOCK_N,), 128.0, dtype=tl.float32)
    zm = (z + MAGIC)[:, None]  # 2^23 + z
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kc
        km = k < K
        q = tl.load(w_ptr + rows[:, None] * stride_w + k[None, :], mask=rmask[:, None] & km[None, :], other=0)
        w = (q.to(tl.int32) | MAGIC_BITS).to(tl.float32, bitcast=True) - zm  # q - z, exact
        x = tl.load(x_ptr + k, mask=km, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    _finish_rows(tl.sum(acc, axis=1), rows, rmask, s_ptr, b_ptr, y_ptr, True, HAS_BIAS)


# --------------------------------------------------------------------------- 4-bit LUT, indexed load
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[n] = scale[n] * sum_k LUT[n // R][idx[n,k]] x[k] (+ b[n]), each weight read from the
    (L1-resident) (n_luts, 16) LUT, fp16 or fp32, by an indexed load: the fallback where the
    ``prmt`` kernel does not apply (a LUT that is not fp16, rows of indices not a multiple of 8,
    an AMD GPU). Other ways of reading the entry were tried: ``benchmarks/lut_modes.py``."""
    HALF: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    lrow = rows // ROWS_PER_LUT
    hk = tl.arange(0, HALF)
    kc = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    KB = K // 2
    for k0 in range(0, KB, HALF):
        kk = k0 + hk  # byte column
        km = kk < KB
        m2 = rmask[:, None] & km[None, :]
        b = tl.load(w_ptr + rows[:, None] * stride_w + kk[None, :], mask=m2, other=0).to(tl.int32)
        wl = tl.load(lut_ptr + lrow[:, None] * 16 + (b & 0xF), mask=m2, other=0.0).to(tl.float32)
        wh = tl.load(lut_ptr + lrow[:, None] * 16 + ((b >> 4) & 0xF), mask=m2, other=0.0).to(tl.float32)
        w = tl.reshape(tl.join(wl, wh), (BLOCK_N, BLOCK_K))  # columns in order
        xk = 2 * k0 + kc
        x = tl.load(x_ptr + xk, mask=xk < K, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    _finish_rows(tl.sum(acc, axis=1), rows, rmask, s_ptr, b_ptr, y_ptr, HAS_SCALES, HAS_BIAS)


# --------------------------------------------------------------------------- 4-bit LUT in registers
# A 16-entry fp16 LUT is 32 bytes: 8 registers. The GPU's byte-permute instruction
# ``prmt.b32 d, a, b, sel`` builds d from four of the 8 bytes of {b, a}, chosen by the four low
# nibbles of sel; a selector nibble with bit 3 set gives instead 0x00 or 0xFF, the sign of the
# byte it names. So four 3-bit indices look up four bytes of an 8-byte table in one instruction.
# With the low bytes of the 16 entries in L0..L3 and the high bytes in H0..H3 (4 registers each),
# eight packed indices (one 32-bit word) become eight fp16 weights in about 20 integer
# instructions and no memory access: per half-word, 4 lookups (entries 0-7 and 8-15, low and
# high bytes), 2 merges by index bit 3, 2 permutes that interleave low and high bytes.
# (The register-LUT idea of LUT-GEMM and FLUTE; the permute form here is ours.)
@triton.jit
def _prmt(a, b, sel, ASM: tl.constexpr):
    """``prmt.b32`` on int32 tensors (broadcast): the PTX instruction on the GPU (``ASM``), and
    the same byte selection in plain integer ops for Triton's interpreter (no inline asm there)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        r = (a & 0) | (b & 0) | (sel & 0)  # zeros, broadcast shape
        for j in tl.static_range(4):
            s = (sel >> (4 * j)) & 0xF
            i = s & 7  # byte i of {b, a}
            byte = (tl.where(i < 4, a, b) >> ((i & 3) * 8)) & 0xFF
            byte = tl.where((s & 8) != 0, tl.where((byte & 0x80) != 0, 0xFF, 0), byte)
            r = r | (byte << (8 * j))
        return r


@triton.jit
def _lookup4(q, L0, L1, L2, L3, H0, H1, H2, H3, ASM: tl.constexpr):
    """The fp16 LUT entries of the four indices in the low 16 bits of ``q`` (nibble k = column k)
    -> two int32 words of fp16 pairs: (column 0, column 1) and (column 2, column 3)."""
    sel = q & 0x7777  # index bits 0-2
    m = _prmt(q, q << 4, q * 0 + 0x9D8C, ASM)  # byte k: 0xFF if bit 3 of index k
    lo = (_prmt(L0, L1, sel, ASM) & ~m) | (_prmt(L2, L3, sel, ASM) & m)  # low bytes of the 4 entries
    hi = (_prmt(H0, H1, sel, ASM) & ~m) | (_prmt(H2, H3, sel, ASM) & m)  # high bytes
    return _prmt(lo, hi, q * 0 + 0x5140, ASM), _prmt(lo, hi, q * 0 + 0x7362, ASM)


@triton.jit
def _fp16_pair(v):
    """An int32 word holding two fp16 values -> (low, high) as float32."""
    lo = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


def _lut_gemv_prmt_kernel(
    x_ptr,
    q_ptr,
    lut_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    N,
    KW,
    stride_q,
    ROWS_PER_LUT,
    HAS_SCALES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ASM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """y[n] = scale[n] * sum_k LUT[n // R][idx[n,k]] x[k] (+ b[n]) with the LUT in registers.

    ``q_ptr``: the packed indices read as int32 words (out, in/8), eight columns per word (column
    8w + k in nibble k); ``lut_ptr``: the fp16 LUT read as int32 words (n_luts, 8). ``PREFETCH``:
    each tile of indices is loaded one step ahead, the first before the LUT registers are built,
    so that the LUT's and the first tile's memory round trips overlap."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    lrow = rows // ROWS_PER_LUT
    cw = tl.arange(0, BLOCK_W)
    q_rows = q_ptr + rows[:, None] * stride_q
    if PREFETCH:
        q_next = tl.load(q_rows + cw[None, :], mask=rmask[:, None] & (cw < KW)[None, :], other=0)
    # the program's LUT rows, split into low-byte and high-byte tables (8 words -> 8 words)
    w0 = tl.load(lut_ptr + lrow * 8 + 0, mask=rmask, other=0)
    w1 = tl.load(lut_ptr + lrow * 8 + 1, mask=rmask, other=0)
    w2 = tl.load(lut_ptr + lrow * 8 + 2, mask=rmask, other=0)
    w3 = tl.load(lut_ptr + lrow * 8 + 3, mask=rmask, other=0)
    w4 = tl.load(lut_ptr + lrow * 8 + 4, mask=rmask, other=0)
    w5 = tl.load(lut_ptr + lrow * 8 + 5, mask=rmask, other=0)
    w6 = tl.load(lut_ptr + lrow * 8 + 6, mask=rmask, other=0)
    w7 = tl.load(lut_ptr + lrow * 8 + 7, mask=rmask, other=0)
    LO = w0 * 0 + 0x6420  # bytes 0, 2, 4, 6 of {b, a}
    HI = w0 * 0 + 0x7531  # bytes 1, 3, 5, 7
    L0, H0 = _prmt(w0, w1, LO, ASM)[:, None], _prmt(w0, w1, HI, ASM)[:, None]  # entries 0-3
    L1, H1 = _prmt(w2, w3, LO, ASM)[:, None], _prmt(w2, w3, HI, ASM)[:, None]  # entries 4-7
    L2, H2 = _prmt(w4, w5, LO, ASM)[:, None], _prmt(w4, w5, HI, ASM)[:, None]  # entries 8-11
    L3, H3 = _prmt(w6, w7, LO, ASM)[:, None], _prmt(w6, w7, HI, ASM)[:, None]  # entries 12-15
    c8 = tl.arange(0, 8)
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for w_0 in range(0, KW, BLOCK_W):
        wi = w_0 + cw  # word column
        wm = wi < KW
        if PREFETCH:
            q = q_next
            wn = wi + BLOCK_W  # the next tile (masked off at the end)
            q_next = tl.load(q_rows + wn[None, :], mask=rmask[:, None] & (wn < KW)[None, :], other=0)
        else:
            q = tl.load(q_rows + wi[None, :], mask=rmask[:, None] & wm[None, :], other=0)
        c01, c23 = _lookup4(q, L0, L1, L2, L3, H0, H1, H2, H3, ASM)  # columns 0-3 of each word
        c45, c67 = _lookup4(q >> 16, L0, L1, L2, L3, H0, H1, H2, H3, ASM)  # columns 4-7
        a0, a1 = _fp16_pair(c01)
        a2, a3 = _fp16_pair(c23)
        a4, a5 = _fp16_pair(c45)
        a6, a7 = _fp16_pair(c67)
        # tl.join adds a LAST axis, so the outermost join picks bit 0 of the column, the innermost bit 2
        w = tl.reshape(
            tl.join(tl.join(tl.join(a0, a4), tl.join(a2, a6)), tl.join(tl.join(a1, a5), tl.join(a3, a7))),
            (BLOCK_N, BLOCK_W, 8),
        )  # in order
        x = tl.load(x_ptr + 8 * wi[:, None] + c8[None, :], mask=wm[:, None], other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :, :], axis=2)
    _finish_rows(tl.sum(acc, axis=1), rows, rmask, s_ptr, b_ptr, y_ptr, HAS_SCALES, HAS_BIAS)


# --------------------------------------------------------------------------- NF4 in registers
def _nf4_gemv_prmt_kernel(
    x_ptr,
    q_ptr,
    lut_ptr,
    a_ptr,
    a2_ptr,
    dyn_ptr,
    off_ptr,
    b_ptr,
    y_ptr,
    N,
    KW,
    DQ,
    DOUBLE: tl.constexpr,
    OFFSETS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ASM: tl.constexpr,
    WPB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """y[n] = sum_b absmax_b sum_{k in b} level[q[n,k]] x[k] (+ b[n]) for QLoRA's NF4.

    ``q_ptr``: the flat codes as int32 words, ``KW`` = in/8 per row, eight codes per word with
    the FIRST code of each byte in its HIGH nibble (bitsandbytes), so nibble k of a word holds
    column ``k ^ 1``; ``lut_ptr``: the 16 NF4 levels in fp16 as 8 int32 words, looked up with
    the byte permutes of :func:`_lookup4` (the same table for every row). Blocks of ``8 WPB``
    codes along the rows (``BLOCK_W`` a multiple of ``WPB``); block ``b``'s absmax is rebuilt
    here: ``dyn[code_b] * absmax2[b // DQ] + offset`` (``DOUBLE``; ``offset[b // DQ]`` with
    ``OFFSETS``, a stacked layer's one per second-level block), or read as float32."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cw = tl.arange(0, BLOCK_W)
    q_rows = q_ptr + rows[:, None] * KW
    if PREFETCH:
        q_next = tl.load(q_rows + cw[None, :], mask=rmask[:, None] & (cw < KW)[None, :], other=0)
    zero = rows * 0  # the table is the same for every row: (BLOCK_N,) loads of one address
    w0 = tl.load(lut_ptr + zero + 0)
    w1 = tl.load(lut_ptr + zero + 1)
    w2 = tl.load(lut_ptr + zero + 2)
    w3 = tl.load(lut_ptr + zero + 3)
    w4 = tl.load(lut_ptr + zero + 4)
    w5 = tl.load(lut_ptr + zero + 5)
    w6 = tl.load(lut_ptr + zero + 6)
    w7 = tl.load(lut_ptr + zero + 7)
    LO = w0 * 0 + 0x6420
    HI = w0 * 0 + 0x7531
    L0, H0 = _prmt(w0, w1, LO, ASM)[:, None], _prmt(w0, w1, HI, ASM)[:, None]
    L1, H1 = _prmt(w2, w3, LO, ASM)[:, None], _prmt(w2, w3, HI, ASM)[:, None]
    L2, H2 = _prmt(w4, w5, LO, ASM)[:, None], _prmt(w4, w5, HI, ASM)[:, None]
    L3, H3 = _prmt(w6, w7, LO, ASM)[:, None], _prmt(w6, w7, HI, ASM)[:, None]
    NB: tl.constexpr = BLOCK_W // WPB  # absmax blocks per tile
    c8 = tl.arange(0, 8) ^ 1  # nibble k holds column k ^ 1
    cb = tl.arange(0, NB)
    if DOUBLE and not OFFSETS:
        offset = tl.load(off_ptr)
    acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    for w_0 in range(0, KW, BLOCK_W):
        wi = w_0 + cw
        wm = wi < KW
        if PREFETCH:
            q = q_next
            wn = wi + BLOCK_W
            q_next = tl.load(q_rows + wn[None, :], mask=rmask[:, None] & (wn < KW)[None, :], other=0)
        else:
            q = tl.load(q_rows + wi[None, :], mask=rmask[:, None] & wm[None, :], other=0)
        c01, c23 = _lookup4(q, L0, L1, L2, L3, H0, H1, H2, H3, ASM)
        c45, c67 = _lookup4(q >> 16, L0, L1, L2, L3, H0, H1, H2, H3, ASM)
        a0, a1 = _fp16_pair(c01)
        a2, a3 = _fp16_pair(c23)
        a4, a5 = _fp16_pair(c45)
        a6, a7 = _fp16_pair(c67)
        w = tl.reshape(
            tl.join(tl.join(tl.join(a0, a4), tl.join(a2, a6)), tl.join(tl.join(a1, a5), tl.join(a3, a7))),
            (BLOCK_N, BLOCK_W, 8),
        )  # nibble order
        x = tl.load(x_ptr + 8 * wi[:, None] + c8[None, :], mask=wm[:, None], other=0.0).to(tl.float32)
        part = tl.sum(tl.reshape(tl.sum(w * x[None, :, :], axis=2), (BLOCK_N, NB, WPB)), axis=2)  # per block
        blk = rows[:, None] * (KW // WPB) + (w_0 // WPB + cb)[None, :]  # global block index
        bm = rmask[:, None] & ((w_0 // WPB + cb) < KW // WPB)[None, :]
        if DOUBLE:
            code = tl.load(a_ptr + blk, mask=bm, other=0).to(tl.int32)
            absmax = tl.load(dyn_ptr + code, mask=bm, other=0.0) * tl.load(a2_ptr + blk // DQ, mask=bm, other=0.0)
            if OFFSETS:
                absmax += tl.load(off_ptr + blk // DQ, mask=bm, other=0.0)
            else:
                absmax += offset
        else:
            absmax = tl.load(a_ptr + blk, mask=bm, other=0.0)
        acc += part * absmax
    _finish_rows(tl.sum(acc, axis=1), rows, rmask, b_ptr, b_ptr, y_ptr, False, HAS_BIAS)


# --------------------------------------------------------------------------- W8A8 (SmoothQuant)
# 1.5 * 2^23: adding and subtracting it rounds a float32 |v| < 2^22 to the nearest integer, ties
# to even, exactly as torch.round (the float32 sum has no bits below 1 at that magnitude).
ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _token_scale(amax):
    """SmoothQuant's per-token step from the row's max |x|: ``max(amax, 1e-5) / 127`` (IEEE)."""
    return tl.math.div_rn(tl.maximum(amax, 1e-5), 127.0)


@triton.jit
def _int8_codes(x, s_x):
    """``clamp(round(x / s_x), -127, 127)`` as int8, with IEEE division and ties-to-even
    rounding, so that the codes are those of the PyTorch reference."""
    q = (tl.math.div_rn(x, s_x) + ROUND_MAGIC) - ROUND_MAGIC  # round(x / s_x)
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)


def _quantize_row_kernel(x_ptr, qx_ptr, sx_ptr, K, BLOCK_K: tl.constexpr):
    """One program: the row ``x`` (K,) quantized per token, as SmoothQuant's
    ``quantize_activation_per_token_absmax``: ``s_x = max(max|x|, 1e-5) / 127``,
    ``q_x = clamp(round(x / s_x), -127, 127)`` (int8). Run once per layer input, so that the
    GEMV's programs read ``q_x`` instead of each re-quantizing the row. A row of at most
    ``BLOCK_K`` values is read once (kept in registers); a longer one twice."""
    kc = tl.arange(0, BLOCK_K)
    if K <= BLOCK_K:
        x = tl.load(x_ptr + kc, mask=kc < K, other=0.0).to(tl.float32)
        s_x = _token_scale(tl.max(tl.abs(x), axis=0))
        tl.store(sx_ptr, s_x)
        tl.store(qx_ptr + kc, _int8_codes(x, s_x), mask=kc < K)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + k0 + kc, mask=k0 + kc < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        s_x = _token_scale(tl.max(amax, axis=0))
        tl.store(sx_ptr, s_x)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kc
            x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            tl.store(qx_ptr + k, _int8_codes(x, s_x), mask=k < K)


def _w8a8_gemv_kernel(
    qx_ptr,
    sx_ptr,
    w_ptr,
    sw_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[n] = s_x s_w[n] sum_k q_w[n,k] q_x[k] (+ b[n]): int8 x int8 products summed in int32,
    ``q_x`` and ``s_x`` from :func:`_quantize_row_kernel`."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    kc = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kc
        km = k < K
        q_x = tl.load(qx_ptr + k, mask=km, other=0).to(tl.int32)
        q_w = tl.load(w_ptr + rows[:, None] * stride_w + k[None, :], mask=rmask[:, None] & km[None, :], other=0).to(
            tl.int32
        )
        acc += q_w * q_x[None, :]  # exact in int32
    s_x = tl.load(sx_ptr)
    _finish_rows(tl.sum(acc, axis=1).to(tl.float32) * s_x, rows, rmask, sw_ptr, b_ptr, y_ptr, True, HAS_BIAS)


# --------------------------------------------------------------------------- compiled variants
_int4_jit = triton.jit(_int4_gemv_kernel)
_lut_jit = triton.jit(_lut_gemv_kernel)
_w8a8_jit = triton.jit(_w8a8_gemv_kernel)
_lut_prmt_jit = triton.jit(_lut_gemv_prmt_kernel)
_int8_jit = triton.jit(_int8_gemv_kernel)
_nf4_prmt_jit = triton.jit(_nf4_gemv_prmt_kernel)
_quantize_row_jit = triton.jit(_quantize_row_kernel)


def _bench_in_graph(kernel_call, quantiles):
    """How the autotuners time a config: back-to-back calls replayed from a CUDA graph, as the
    decode harness runs them. Triton's default times each call between events after flushing
    the L2 cache; for kernels of 2-5 microseconds that is mostly noise, and runs of the same
    benchmark picked configs up to 20% apart."""
    return triton.testing.do_bench_cudagraph(kernel_call, rep=5, quantiles=quantiles)


def _autotune(configs, key):
    return triton.autotune(configs=configs, key=key, do_bench=_bench_in_graph)


# Batch-1 GEMVs are latency-bound at these sizes: configs range from many row blocks with a few
# groups per step to few rows with (almost) the whole input dimension in one step, so that
# each program issues all its loads at once instead of looping. Autotuning picks per shape.
# Every config is one more compilation (0.2-0.5 s each, paid once per shape class on a fresh
# machine), so the tables keep only the configs that won or came within a few percent of the
# best on an H200 at Qwen2-0.5B's shapes (q/k/v, o, gate/up, down; a sweep of 10, 23 and 12
# configs), plus one wider-row config for the larger matrices of bigger models.
_INT4_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "GPI": gpi}, num_warps=w)
    for bn, gpi, w in [(4, 8, 4), (4, 16, 8), (8, 4, 4), (8, 8, 8), (16, 4, 8)]
]
_LUT_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
    for bn, bk, w in [
        (2, 2048, 4),
        (2, 4096, 8),
        (4, 1024, 4),
        (8, 512, 4),
        (8, 1024, 8),
        (16, 256, 4),
        (16, 512, 8),
        (32, 256, 8),
    ]
]
_int4_tuned = _autotune(_INT4_CONFIGS, ["N", "G", "GS"])(_int4_jit)
_lut_tuned = _autotune(_LUT_CONFIGS, ["N", "K", "HAS_SCALES"])(_lut_jit)

_LUT_PRMT_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_W": bw, "PREFETCH": pf}, num_warps=w)
    for bn, bw, w, pf in [(2, 128, 4, 1), (4, 128, 4, 1), (8, 32, 4, 1), (8, 64, 4, 1), (8, 128, 8, 1), (16, 32, 8, 1)]
]
_lut_prmt_tuned = _autotune(_LUT_PRMT_CONFIGS, ["N", "KW", "HAS_SCALES"])(_lut_prmt_jit)
_W8A8_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
    for bn, bk, w in [(2, 1024, 4), (4, 1024, 8), (16, 512, 8), (32, 256, 8), (64, 128, 8)]
]
_w8a8_tuned = _autotune(_W8A8_CONFIGS, ["N", "K", "HAS_BIAS"])(_w8a8_jit)
# not yet swept on a GPU: the W8A8 table (the same byte per weight) plus narrower row blocks
_INT8_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
    for bn, bk, w in [(1, 1024, 4), (2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4), (16, 512, 8), (32, 256, 8)]
]
_int8_tuned = _autotune(_INT8_CONFIGS, ["N", "K", "HAS_ZEROS"])(_int8_jit)
# the prmt table, restricted to tiles of whole 64-code blocks (8 words)
_NF4_CONFIGS = [c for c in _LUT_PRMT_CONFIGS if c.kwargs["BLOCK_W"] % 8 == 0]
_nf4_tuned = _autotune(_NF4_CONFIGS, ["N", "KW", "DOUBLE", "OFFSETS"])(_nf4_prmt_jit)

#: block sizes used where nothing is tuned (the interpreter, or an explicit ``config=``)
DEFAULT_INT4 = {"BLOCK_N": 4, "GPI": 2}
DEFAULT_LUT = {"BLOCK_N": 4, "BLOCK_K": 64}
DEFAULT_W8A8 = {"BLOCK_N": 4, "BLOCK_K": 64}
DEFAULT_LUT_PRMT = {"BLOCK_N": 4, "BLOCK_W": 8, "PREFETCH": 1}
DEFAULT_INT8 = {"BLOCK_N": 4, "BLOCK_K": 64}
DEFAULT_NF4 = {"BLOCK_N": 4, "BLOCK_W": 16, "PREFETCH": 1}
QUANTIZE_ROW_BLOCK = 8192  # rows up to this long are read once (Qwen2-0.5B's widest: 4864)


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


def int4_gemv(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros, bias, group_size: int, config: dict = None
) -> torch.Tensor:
    """``W x + b`` for one row ``x`` (in,) with a packed asymmetric int4 weight -> (out,) in x's dtype.

    ``group_size`` must be a power of two >= 2 that divides ``in_features``.
    """
    N, K = qweight.shape[0], x.numel()
    G = scales.shape[1]
    x = x.reshape(-1).contiguous()
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    dummy = scales
    args = (
        x,
        qweight,
        scales,
        dummy if qzeros is None else qzeros,
        dummy if bias is None else bias,
        y,
        N,
        G,
        qweight.stride(0),
        scales.stride(0),
        0 if qzeros is None else qzeros.stride(0),
    )
    kwargs = dict(GS=group_size, HAS_ZEROS=qzeros is not None, HAS_BIAS=bias is not None)
    if G * group_size != K:
        raise QtutorError(
            f"int4_gemv: {G} groups of {group_size} do not cover in_features {K}; "
            f"scales must have in_features / group_size columns"
        )
    _launch(_int4_gemv_kernel, _int4_jit, _int4_tuned, DEFAULT_INT4, config, N, args, kwargs)
    return y


#: how ``lut_gemv`` reads a palette entry: from registers with byte permutes, or by an indexed load
LUT_KERNEL_MODES = ("prmt", "load")


def lut_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    lut: torch.Tensor,
    scales,
    bias,
    rows_per_lut: int,
    mode: str = "prmt",
    config: dict = None,
) -> torch.Tensor:
    """``W x + b`` for one row ``x`` (in,) with packed 4-bit LUT indices -> (out,) in x's dtype.

    ``lut``: (n_luts, 16), fp16 for ``prmt``, fp16 or fp32 for ``load``."""
    if mode not in LUT_KERNEL_MODES:
        raise QtutorError(f"unknown lut_gemv mode {mode!r}; choose from {', '.join(LUT_KERNEL_MODES)}")
    if lut.dim() != 2 or lut.shape[1] != 16 or not lut.is_floating_point():
        raise QtutorError(f"lut_gemv mode {mode!r} needs a (n_luts, 16) float LUT, got {tuple(lut.shape)} {lut.dtype}")
    if mode == "prmt":
        return _lut_gemv_prmt(x, qweight, lut, scales, bias, rows_per_lut, config)
    y, args, kwargs = lut_load_args(x, qweight, lut, scales, bias, rows_per_lut)
    _launch(_lut_gemv_kernel, _lut_jit, _lut_tuned, DEFAULT_LUT, config, y.numel(), args, kwargs)
    return y


def lut_load_args(x, qweight, table, scales, bias, rows_per_lut: int):
    """(y, args, kwargs) of :func:`_lut_gemv_kernel` for one row ``x``: the output (out,) to
    fill and the launch arguments (``table`` also stands in for the absent scales and bias)."""
    N, K = qweight.shape[0], x.numel()
    x = x.reshape(-1).contiguous()
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    args = (
        x,
        qweight,
        table,
        table if scales is None else scales,
        table if bias is None else bias,
        y,
        N,
        K,
        qweight.stride(0),
        rows_per_lut,
    )
    return y, args, dict(HAS_SCALES=scales is not None, HAS_BIAS=bias is not None)


def _lut_gemv_prmt(x, qweight, lut, scales, bias, rows_per_lut, config):
    N, K = qweight.shape[0], x.numel()
    if lut.dtype != torch.float16 or K % 8 or qweight.stride(-1) != 1 or qweight.stride(0) % 4:
        raise QtutorError(
            f"lut_gemv mode 'prmt' needs an fp16 LUT and in_features divisible by 8 "
            f"(got {lut.dtype}, {K}): use mode 'load'"
        )
    if x.is_cuda and torch.version.hip:
        raise QtutorError("lut_gemv mode 'prmt' runs NVIDIA PTX (prmt.b32): on an AMD GPU use mode 'load'")
    x = x.reshape(-1).contiguous()
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    q32 = qweight.view(torch.int32)  # (out, in/8): 8 indices a word
    lut32 = lut.contiguous().view(torch.int32)  # (n_luts, 8): 2 entries a word
    args = (
        x,
        q32,
        lut32,
        lut if scales is None else scales,
        lut if bias is None else bias,
        y,
        N,
        K // 8,
        q32.stride(0),
        rows_per_lut,
    )
    kwargs = dict(HAS_SCALES=scales is not None, HAS_BIAS=bias is not None, ASM=x.is_cuda)
    _launch(_lut_gemv_prmt_kernel, _lut_prmt_jit, _lut_prmt_tuned, DEFAULT_LUT_PRMT, config, N, args, kwargs)
    return y


def quantize_row(x: torch.Tensor):
    """SmoothQuant's per-token quantization of one row ``x`` (in,) -> (q_x (in,) int8, s_x (1,) float32),
    by one program (:func:`_quantize_row_kernel`)."""
    x = x.reshape(-1).contiguous()
    K = x.numel()
    q_x = torch.empty(K, dtype=torch.int8, device=x.device)
    s_x = torch.empty(1, dtype=torch.float32, device=x.device)
    if x.device.type == "cpu":
        with _interpreting():
            _interpreted(_quantize_row_kernel)[(1,)](x, q_x, s_x, K, BLOCK_K=64)
    else:
        block = min(QUANTIZE_ROW_BLOCK, triton.next_power_of_2(K))
        _quantize_row_jit[(1,)](x, q_x, s_x, K, BLOCK_K=block, num_warps=8 if block >= 4096 else 4)
    return q_x, s_x


def w8a8_gemv(
    x: torch.Tensor, qweight: torch.Tensor, weight_scales: torch.Tensor, bias, config: dict = None
) -> torch.Tensor:
    """``y = s_x s_w q_w q_x + b`` for one row ``x`` (in,), quantized per token once
    (:func:`quantize_row`), with int8 ``qweight`` (out, in) and float32 ``weight_scales`` (out,)
    -> (out,) in x's dtype."""
    q_x, s_x = quantize_row(x)
    return w8a8_gemv_codes(q_x, s_x, qweight, weight_scales, bias, x.dtype, config)


def w8a8_gemv_codes(q_x, s_x, qweight, weight_scales, bias, dtype, config: dict = None) -> torch.Tensor:
    """:func:`w8a8_gemv` on a row already quantized per token: int8 codes ``q_x`` (in,) and
    float32 step ``s_x`` (1,), as :func:`quantize_row` or the decode step's fused glue
    (:func:`qtutor.runtime.triton_glue.add_rms_norm` with ``quantize=True``) writes them
    -> (out,) in ``dtype``."""
    N = qweight.shape[0]
    if q_x.dtype != torch.int8 or q_x.numel() != qweight.shape[1]:
        raise QtutorError(f"w8a8_gemv_codes takes {qweight.shape[1]} int8 codes, got {q_x.numel()} {q_x.dtype}")
    y = torch.empty(N, dtype=dtype, device=q_x.device)
    args = (
        q_x,
        s_x,
        qweight,
        weight_scales,
        weight_scales if bias is None else bias,
        y,
        N,
        q_x.numel(),
        qweight.stride(0),
    )
    _launch(_w8a8_gemv_kernel, _w8a8_jit, _w8a8_tuned, DEFAULT_W8A8, config, N, args, dict(HAS_BIAS=bias is not None))
    return y


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros, bias, config: dict = None):
    """``W x + b`` for one row ``x`` (in,) with uint8 codes ``qweight`` (out, in), ``w = s (q - z)``,
    one fp16 scale (and 8-bit zero, or z = 128) per row -> (out,) in x's dtype."""
    N, K = qweight.shape
    if scales.numel() != N or (qzeros is not None and qzeros.numel() != N) or x.numel() != K:
        raise QtutorError(
            f"int8_gemv takes one scale (and zero) per row of a ({N}, {K}) weight, got scales {tuple(scales.shape)}"
        )
    x = x.reshape(-1).contiguous()
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    s = scales.reshape(-1)
    args = (x, qweight, s, s if qzeros is None else qzeros.reshape(-1), s if bias is None else bias, y, N, K)
    args = args + (qweight.stride(0),)
    kwargs = dict(HAS_ZEROS=qzeros is not None, HAS_BIAS=bias is not None)
    _launch(_int8_gemv_kernel, _int8_jit, _int8_tuned, DEFAULT_INT8, config, N, args, kwargs)
    return y


#: NF4 block sizes the kernel takes: whole 32-bit words of codes, and a tile of 8 words (the
#: smallest ``BLOCK_W``) holding whole blocks
NF4_BLOCK_SIZES = (8, 16, 32, 64)
_NF4_LUT: dict = {}


def _nf4_lut_words(device) -> torch.Tensor:
    """The 16 NF4 levels in fp16 as 8 int32 words, built once per device (graph-safe)."""
    key = str(device)
    if key not in _NF4_LUT:
        from ..quant.nf4 import nf4_levels

        _NF4_LUT[key] = nf4_levels().half().view(torch.int32).to(device)
    return _NF4_LUT[key]


def nf4_gemv(
    x: torch.Tensor, qweight, absmax, absmax2, offset, dyn, block_size: int, dq_block: int, bias, n: int, config=None
) -> torch.Tensor:
    """``W x + b`` for one row ``x`` (in,) of an NF4 weight (n, in) in bitsandbytes' layout -> (n,).

    ``absmax``: (n_blocks,) uint8 codes into the 256-entry float32 map ``dyn``, with float32
    ``absmax2`` per ``dq_block`` blocks and float32 ``offset`` (double quantization), or float32
    absmaxes (``absmax2``, ``offset`` None); ``offset`` () or, for a stacked layer, one per
    second-level block. ``block_size`` one of :data:`NF4_BLOCK_SIZES`, dividing ``in``."""
    K = x.numel()
    if K % block_size or block_size not in NF4_BLOCK_SIZES or qweight.numel() * 2 != n * K:
        raise QtutorError(
            f"nf4_gemv needs blocks of {NF4_BLOCK_SIZES} codes that divide the rows ({block_size}, in={K}) "
            f"and {n * K // 2} bytes of codes, got {qweight.numel()}"
        )
    if x.is_cuda and torch.version.hip:
        raise QtutorError("nf4_gemv runs NVIDIA PTX (prmt.b32); not on an AMD GPU")
    x = x.reshape(-1).contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    double = absmax.dtype == torch.uint8
    q32 = qweight.view(torch.int32)
    f = absmax if not double else absmax2
    args = (
        x,
        q32,
        _nf4_lut_words(x.device),
        absmax,
        f if absmax2 is None else absmax2,
        f if dyn is None else dyn,
        f if offset is None else offset,
        x if bias is None else bias,
        y,
        n,
        K // 8,
        dq_block,
    )
    offsets = double and offset.dim() > 0
    kwargs = dict(DOUBLE=double, OFFSETS=offsets, HAS_BIAS=bias is not None, ASM=x.is_cuda, WPB=block_size // 8)
    _launch(_nf4_gemv_prmt_kernel, _nf4_prmt_jit, _nf4_tuned, DEFAULT_NF4, config, n, args, kwargs)
    return y
