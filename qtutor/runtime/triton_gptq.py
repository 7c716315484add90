"""GPTQ's column loop over one lazy-batch block in ONE Triton launch (chapter 3; issue 13).

:func:`qtutor.quant.gptq.gptq` quantizes a block of (at most) 128 columns one column at a
time: quantize column ``i``, then spread its error over the columns right of it,

    c_i = clamp(round(w_i / s_i) + z_i, 0, 2^b - 1),   err_i = (w_i - s_i (c_i - z_i)) / Hinv1[i, i],
    w_j -= Hinv1[i, j] err_i   for j >= i,

about ten tiny kernels per column in PyTorch: on a GPU their launches, not their arithmetic,
set the time (a CUDA-graph replay of the block still pays ~1,300 kernel starts). The rows are
independent (every row shares ``Hinv1``), so here each program holds ``BLOCK_R`` rows of the
block in registers and runs the whole column loop itself: one launch per block.

The arithmetic is the PyTorch loop's, operation for operation: IEEE division, round half to
even, and no fused multiply-adds (compiled with ``enable_fp_fusion=False``). Whether the
PyTorch kernels fuse ``w - h err`` is theirs to decide, so a value can still differ in its last
bit, and a code that sits exactly on a rounding boundary may then flip: the tests compare the
two on the same inputs (codes, loss), and the PyTorch loop stays the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import QtutorError
from ._interpret import _interpreted, _interpreting
from .triton_gemv import ROUND_MAGIC


def _gptq_block_kernel(
    w_ptr, h_ptr, s_ptr, z_ptr, c_ptr, e_ptr, R, C, MAXQ, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Rows ``pid * BLOCK_R ...`` of a block held transposed: ``w_ptr`` (C, R) float32 (the
    block's columns, each a contiguous row of R values), ``h_ptr`` (C, C) the block of the upper
    Cholesky factor of H^-1, ``s_ptr``/``z_ptr`` (C, R) each column's scale and zero per row;
    writes codes (as float32) and errors to ``c_ptr``/``e_ptr`` (C, R)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    tile = tl.load(w_ptr + cols[:, None] * R + r[None, :], mask=cm[:, None] & rm[None, :], other=0.0)
    for i in range(0, C):
        here = (cols == i)[:, None]
        w = tl.sum(tl.where(here, tile, 0.0), axis=0)  # column i, (BLOCK_R,)
        s = tl.load(s_ptr + i * R + r, mask=rm, other=1.0)
        z = tl.load(z_ptr + i * R + r, mask=rm, other=0.0)
        code = (tl.math.div_rn(w, s) + ROUND_MAGIC) - ROUND_MAGIC + z  # round(w / s) + z
        code = tl.minimum(tl.maximum(code, 0.0), MAXQ)
        d = tl.load(h_ptr + i * C + i)
        err = tl.math.div_rn(w - s * (code - z), d)
        h = tl.load(h_ptr + i * C + cols, mask=cm & (cols >= i), other=0.0)  # Hinv1[i, j], j >= i
        tile = tile - h[:, None] * err[None, :]
        tl.store(c_ptr + i * R + r, code, mask=rm)
        tl.store(e_ptr + i * R + r, err, mask=rm)


_gptq_block_jit = triton.jit(_gptq_block_kernel)


def gptq_block(W1t: torch.Tensor, Hinv1: torch.Tensor, S1t: torch.Tensor, Z1t: torch.Tensor, bits: int):
    """One block of GPTQ's column loop -> (codes1t, Err1t), shaped like ``W1t`` (C, R): the
    transposed block as :func:`qtutor.quant.gptq._block_loop` takes it. Compiled on CUDA, in
    Triton's interpreter on CPU tensors (tests)."""
    C, R = W1t.shape
    if C > 256 or Hinv1.shape != (C, C) or S1t.shape != (C, R) or Z1t.shape != (C, R):
        raise QtutorError(
            f"gptq_block takes a block of at most 256 columns with matching Hinv1, scales and zeros, "
            f"got W1t {tuple(W1t.shape)}: use a smaller GPTQ block_size or gptq.BLOCK_LOOP='cuda-graph'"
        )
    W1t, Hinv1, S1t, Z1t = (t.float().contiguous() for t in (W1t, Hinv1, S1t, Z1t))
    codes, err = torch.empty_like(W1t), torch.empty_like(W1t)
    block_c = triton.next_power_of_2(C)
    block_r = 16 if block_c > 128 else 32  # the block's rows in registers: BLOCK_C x BLOCK_R floats
    args = (W1t, Hinv1, S1t, Z1t, codes, err, R, C, float(2**bits - 1))
    grid = (triton.cdiv(R, block_r),)
    if W1t.device.type == "cpu":
        with _interpreting():
            _interpreted(_gptq_block_kernel)[grid](*args, BLOCK_R=block_r, BLOCK_C=block_c)
    else:
        _gptq_block_jit[grid](*args, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4, enable_fp_fusion=False)
    return codes, err
