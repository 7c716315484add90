"""GPTQ: accurate post-training quantization from second-order information (chapter 3).

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023, arXiv:2210.17323; reference code IST-DASLab/gptq
(``gptq.py``: ``GPTQ.add_batch`` and ``GPTQ.fasterquant``), whose behaviour this module follows.

For one linear layer with weight ``W`` (out, in) and calibration inputs ``X`` (N tokens, in),
GPTQ looks for codes ``Q`` on the quantization grid minimising the layer-output error
``||X W^T - X Q^T||^2``. Every row of ``W`` shares the Hessian of that error,
``H = 2 X^T X / N``. Columns are quantized one at a time, left to right (Algorithm 1):

* quantize column ``i``: ``q = quant(w)``, then spread its error over the columns not yet
  quantized, ``W[:, i:] -= (w - q) / d * Hinv[i, i:]`` with ``d = Hinv[i, i]``; ``Hinv`` is the
  upper Cholesky factor of ``H^-1``, whose row ``i`` is exactly the OBS update of the columns
  left after ``i`` (section 3, "Cholesky reformulation");
* "lazy batch" updates: the update is applied inside a block of ``block_size`` columns at once,
  and to the columns right of the block in one matmul ``W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]``;
* damping: ``damp * mean(diag H)`` is added to the diagonal of ``H`` before inverting;
* act-order (``act_order``, the reference's ``--act-order``): columns are processed in order of
  decreasing ``diag(H)``, the columns with the largest input energy first.

Group-wise scales follow the reference: the scale/zero of a group is computed when the loop
reaches the group's first column, from ``W`` as updated so far. As in the reference, ``W`` holds
the updates of the earlier *blocks* at that moment; the updates of the current block's earlier
columns are still pending in ``W1`` (this matters only when a group starts inside a block,
i.e. when ``group_size`` is not a multiple of ``block_size``). With act-order the groups are runs
of ``group_size`` *permuted* positions, so a group's input columns are not contiguous; the
result then carries ``g_idx``, each input column's group (as AutoGPTQ stores it).
``static_groups=True`` instead fixes every group's scale/zero up front from the original
contiguous groups of ``W``, and no ``g_idx`` is needed.

Where this module deliberately differs from the reference:

* ``H`` is averaged over calibration *tokens*; the reference counts sequences
  (``inp.shape[0]``), so its ``H`` is ``seqlen`` times ours. The scale of ``H`` cancels in the
  updates and in the relative damping; it only rescales the reported loss, which here equals the
  mean squared output error per token, ``||X W^T - X Q^T||^2 / N`` (without damping).
* per-output-channel scales (``group_size=0``) are computed after dead columns are zeroed (the
  reference computes them before), so unused inputs do not widen the range.
* if ``H`` plus damping is not positive definite, the damping is raised tenfold until the
  Cholesky factorisations succeed, with a warning; past ``1e6 x mean(diag H)`` the layer falls
  back to round-to-nearest. The reference stops with an error instead.
* the grid is RTN's (:func:`qtutor.quant.rtn.find_params`): fp16 scales, and the symmetric scale
  is ``max|w| / (2^(b-1) - 1)`` where the reference uses ``2 max|w| / (2^b - 1)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..calib import collect_inputs
from ..errors import QtutorError
from .base import Method, register
from .cuda_graphs import replay
from .rtn import (
    UniformGridConfig,
    UniformLinear,
    UniformWeight,
    dequantize_codes,
    find_params,
    group_layout,
    quantize_codes,
)


@dataclass(frozen=True)
class GPTQConfig(UniformGridConfig):
    """GPTQ settings; the defaults are the paper's 4-bit, group-128 setting, in act-order with
    static groups.

    Act-order with static groups is today's practice (llm-compressor's default ordering): the
    columns with the largest ``diag(H)`` are quantized first, and every group keeps its
    contiguous columns and a scale fixed from the original weights, so the stored layer is
    chapter 1's format with no ``g_idx``. Measured with one perplexity function on the same
    tokens and calibration windows (``benchmarks/gptq_order/stories260k.csv``: stories260K, the
    whole WikiText-2 test split, 4 bits; RTN / natural order / act-order with static groups):
    per row asymmetric 132.375 / 133.176 / 129.879 (the natural order, the 2022 reference's
    default, loses to RTN), per row symmetric 149.778 / 137.325 / 130.777, groups of 64
    symmetric 149.672 / 133.366 / 132.400; in groups of 64 asymmetric the two orders tie
    (129.607 natural, 129.890 static groups) and act-order with dynamic groups, which needs a
    ``g_idx`` (``static_groups=False``), is lower still (125.722). On the embedded model the
    orders are within a few tenths of a percent of each other
    (``benchmarks/gptq_order/qtutor-tiny.csv``).

    bits: 2, 3, 4 or 8; group_size: input columns per scale (0 = per output channel);
    sym: symmetric grid; damp: damping as a fraction of mean(diag H) (reference ``--percdamp``);
    block_size: columns per lazy batch update; act_order: process columns by decreasing
    diag(H); static_groups: group scales fixed from the original W (reference
    ``--static-groups``); true_sequential: quantize q/k/v, then o, then gate/up, then down, each
    group calibrated on the outputs of the already-quantized ones (``--true-sequential``).
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True

    def __post_init__(self):
        super().__post_init__()  # the grid's checks
        if not self.damp >= 0:
            raise QtutorError(f"damp {self.damp} must be >= 0 (a fraction of mean(diag H), e.g. 0.01)")
        if self.block_size < 1:
            raise QtutorError(f"block size {self.block_size} must be a positive number of columns")


# --------------------------------------------------------------------------- the Hessian
class Hessian:
    """Running ``H = 2/N sum_t x_t x_t^T`` over the N calibration tokens seen so far.

    As the reference's ``add_batch``: ``H *= n / (n + m); n += m; H += (sqrt(2/n) X)^T (sqrt(2/n) X)``
    for a batch of ``m`` tokens, in float32 on ``device``.
    """

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self.n = 0

    @torch.no_grad()
    def add_batch(self, X: torch.Tensor) -> None:
        X = X.reshape(-1, X.shape[-1]).to(self.H.device, torch.float32)
        m = X.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        X = math.sqrt(2 / self.n) * X
        self.H += X.T @ X


# --------------------------------------------------------------------------- Cholesky
def inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """``Hinv = cholesky(cholesky_inverse(cholesky(H + lambda I)), upper=True)`` with
    ``lambda = damp * mean(diag H)``; returns (Hinv, the damp actually used).

    If a factorisation fails, ``damp`` is raised tenfold (starting from at least 1e-6) with a
    warning; past 1e6 the identity is used (no error feedback: round-to-nearest).

    The reference's calls on every device. (An earlier version solved against the identity on
    a CPU instead, timed as ten times faster on a busy machine; on a quiet 2-core one
    ``cholesky_inverse`` is the faster, 0.62 s against 1.48 s at 4864 columns, and only it
    gives chapter 3's from-scratch GPTQ the package's codes exactly: with the fused column
    update of :func:`_column_step`'s note, 5,381 of Qwen2-0.5B's 4,358,144 down_proj codes
    (0.12%) landed on a neighbouring grid point; that update alone, 1,647.)
    """
    n = H.shape[0]
    mean_diag = torch.diag(H).mean()
    if not (torch.isfinite(mean_diag) and mean_diag > 0):
        mean_diag = torch.diag(H).abs().mean()
        if not (torch.isfinite(mean_diag) and mean_diag > 0):
            mean_diag = torch.ones((), device=H.device)
    eye = torch.eye(n, device=H.device, dtype=H.dtype)
    rel = damp
    while rel <= 1e6:
        L, info = torch.linalg.cholesky_ex(H + rel * mean_diag * eye)
        if info == 0:
            Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(Hinv).all():
                if rel != damp:
                    warnings.warn(
                        f"GPTQ: H + {damp:g} * mean(diag H) * I is not positive definite; used damp={rel:g}",
                        stacklevel=3,
                    )
                return Hinv, rel
        rel = max(rel * 10, 1e-6)
    warnings.warn(
        "GPTQ: H is not positive definite even with damp=1e6; falling back to "
        "round-to-nearest for this layer (Hinv = I)",
        stacklevel=3,
    )
    return eye / mean_diag.sqrt(), math.inf


# --------------------------------------------------------------------------- Algorithm 1
@dataclass
class GPTQResult:
    """What :func:`gptq` computed: the packed-ready weight, the float ``Q`` it represents
    (``weight.dequantize()`` equals it exactly), the reference's ``Losses`` summed (in total and
    per output row), the damp used."""

    weight: UniformWeight
    Q: torch.Tensor
    loss: float
    damp: float
    row_loss: torch.Tensor


def _column_step(W1t, Hinv1, i, s, z, bits):
    """Quantize column ``i`` of a block and spread its error over the columns right of it, in
    place: returns (codes, err) of the column, ``err = (w - q) / Hinv1[i, i]``.

    The block is held transposed, ``W1t = W1^T`` (columns, rows), contiguous: each column is a
    contiguous row and the update ``W1[:, i:] -= err Hinv1[i, i:]`` sweeps contiguous memory
    (a 1024 x 128 block on the 2-core CI machine, busy: 35 ms against 306 ms for updating the
    column slices of ``W1``). Every element gets exactly the reference's arithmetic: each
    product ``err h`` rounded, then subtracted. (``addr_`` fuses the two into one multiply-add
    on a CPU, about 10% faster, and differs in the last bit, which at Qwen2-0.5B's 4864 columns
    moved 1,647 of down_proj's 4,358,144 codes (0.04%) a grid step from the reference's.)"""
    w = W1t[i]
    c = quantize_codes(w, s, z, bits)
    err = (w - dequantize_codes(c, s, z)) / Hinv1[i, i]
    W1t[i:] -= torch.outer(Hinv1[i, i:], err)
    return c, err


def _block_loop(W1t, Hinv1, S1t, Z1t, bits, codes1t, Err1t):
    """The column loop of one (transposed) block whose per-column scales/zeros are known."""
    for i in range(W1t.shape[0]):
        codes1t[i], Err1t[i] = _column_step(W1t, Hinv1, i, S1t[i], Z1t[i], bits)


def _run_block(W1, Hinv1, S1, Z1, bits):
    """:func:`_block_loop` on one block ``W1`` (rows, columns) -> (codes1, Err1), same shape.

    On a GPU about ten tiny kernels per column cost more to launch one by one than to run, so
    (:data:`BLOCK_LOOP`) the whole block runs as ONE Triton kernel that keeps its rows in
    registers (:mod:`qtutor.runtime.triton_gptq`; the same operations, fused multiply-adds
    off), or, without Triton or for a block of more than :data:`TRITON_MAX_COLUMNS` columns, is
    replayed from a CUDA graph (:mod:`qtutor.quant.cuda_graphs`, exactly the same kernels)."""
    W1t, S1t, Z1t = (t.T.contiguous() for t in (W1, S1, Z1))
    how = _block_loop_kind(W1)
    if how == "triton":
        from ..runtime.triton_gptq import gptq_block

        codes1t, Err1t = gptq_block(W1t, Hinv1, S1t, Z1t, bits)
    elif how == "cuda-graph":
        codes1t, Err1t = replay(_block_loop, (W1t, Hinv1, S1t, Z1t), (bits,), n_out=2)
    else:
        codes1t, Err1t = torch.zeros_like(W1t), torch.zeros_like(W1t)
        _block_loop(W1t, Hinv1, S1t, Z1t, bits, codes1t, Err1t)
    return codes1t.T, Err1t.T


#: how a block's column loop runs: "auto" (on a GPU the Triton kernel where triton is installed
#: and the block has at most TRITON_MAX_COLUMNS columns, else a CUDA-graph replay; on a CPU the
#: PyTorch loop), "triton" (also on a CPU, in Triton's interpreter: tests), "cuda-graph" or "eager"
BLOCK_LOOP = "auto"


def _block_loop_kind(W1: torch.Tensor) -> str:
    if BLOCK_LOOP not in ("auto", "triton", "cuda-graph", "eager"):
        raise QtutorError(f"GPTQ BLOCK_LOOP {BLOCK_LOOP!r}: choose auto, triton, cuda-graph or eager")
    if BLOCK_LOOP != "auto":
        return BLOCK_LOOP if W1.is_cuda or BLOCK_LOOP in ("triton", "eager") else "eager"
    if not W1.is_cuda:
        return "eager"
    from ..runtime.kernels import triton_available

    fits = W1.shape[1] <= TRITON_MAX_COLUMNS  # the kernel holds a block's columns in registers
    return "triton" if fits and triton_available() and not torch.version.hip else "cuda-graph"


#: the widest block the Triton kernel takes (``gptq_block``); wider ones (chapter 3 runs whole
#: rows as one block) replay the CUDA graph
TRITON_MAX_COLUMNS = 256


@torch.no_grad()
def gptq(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig) -> GPTQResult:
    """GPTQ (Algorithm 1 with lazy batches, Cholesky inverse, groups and act-order) on one
    weight ``W`` (out, in) with Hessian ``H`` (in, in); see the module docstring."""
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    rows, columns = W.shape
    if H.shape != (columns, columns):
        raise QtutorError(
            f"H has shape {tuple(H.shape)}; a weight with {columns} input columns needs ({columns}, {columns})"
        )
    gs, n_groups = group_layout(columns, cfg.group_size)
    grouped = n_groups > 1

    dead = torch.diag(H) == 0  # inputs that were always zero: the weight is irrelevant
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.zeros(rows, n_groups, device=W.device)
    zeros = torch.zeros(rows, n_groups, device=W.device)
    if not grouped:
        scales[:, 0], zeros[:, 0] = find_params(W, cfg.bits, cfg.sym)
    elif cfg.static_groups:  # every group's (s, z) from the original contiguous columns
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = find_params(W[:, g * gs : (g + 1) * gs], cfg.bits, cfg.sym)

    perm = torch.arange(columns, device=W.device)
    if cfg.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    # group of each (permuted) position: its own position for sequential groups, its
    # original column for static groups
    col_group = (perm if cfg.static_groups else torch.arange(columns, device=W.device)) // gs
    groups = col_group.tolist()  # one transfer, not one per column

    Hinv, damp = inverse_cholesky(H, cfg.damp)
    del H

    codes = torch.zeros_like(W)
    Losses = torch.zeros_like(W)
    # group parameters are known before each block when no group starts inside a block
    known = not grouped or cfg.static_groups or gs % cfg.block_size == 0
    for i1 in range(0, columns, cfg.block_size):
        i2 = min(i1 + cfg.block_size, columns)
        W1 = W[:, i1:i2]  # a view: the block loop works on a transposed copy, W keeps its values
        Hinv1 = Hinv[i1:i2, i1:i2]
        if known:
            if grouped and not cfg.static_groups and i1 % gs == 0:
                scales[:, i1 // gs], zeros[:, i1 // gs] = find_params(W[:, i1 : i1 + gs], cfg.bits, cfg.sym)
            cg = col_group[i1:i2]
            S1, Z1 = scales[:, cg], zeros[:, cg]
            codes1, Err1 = _run_block(W1, Hinv1, S1, Z1, cfg.bits)
            codes[:, i1:i2] = codes1
        else:
            W1t = W1.T.contiguous()
            Err1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                j = i1 + i
                if j % gs == 0:  # reference: find_params(W[:, j:j + groupsize]) at the group start
                    scales[:, j // gs], zeros[:, j // gs] = find_params(W[:, j : j + gs], cfg.bits, cfg.sym)
                codes[:, j], Err1[:, i] = _column_step(
                    W1t, Hinv1, i, scales[:, groups[j]], zeros[:, groups[j]], cfg.bits
                )

        Losses[:, i1:i2] = Err1**2 / 2  # (w - q)^2 / d^2 / 2, column by column
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    Q = dequantize_codes(codes, scales[:, col_group], zeros[:, col_group])
    g_idx = None
    if cfg.act_order:
        invperm = torch.argsort(perm)
        Q, codes = Q[:, invperm], codes[:, invperm]
        if grouped and not cfg.static_groups:
            g_idx = col_group[invperm]  # group of each original column
            if torch.equal(g_idx, torch.arange(columns, device=W.device) // gs):
                g_idx = None  # the groups happen to be contiguous: the plain format holds them
    weight = UniformWeight(
        codes=codes.to(torch.uint8),
        scales=scales.half(),
        zeros=None if cfg.sym else zeros.to(torch.uint8),
        bits=cfg.bits,
        group_size=cfg.group_size,
        g_idx=None if g_idx is None else g_idx.to(torch.int32),
    )
    return GPTQResult(weight, Q, float(Losses.sum()), damp, Losses.sum(dim=1))


def quantize_weight(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig) -> UniformWeight:
    """GPTQ-quantize ``W`` (out, in) given ``H = 2 X^T X / N`` (in, in) (chapter 3)."""
    return gptq(W, H, cfg).weight


# --------------------------------------------------------------------------- a decoder layer
@torch.no_grad()
def quantize_layer(layer: nn.Module, layout, X: torch.Tensor, kwargs: dict, cfg: GPTQConfig) -> dict:
    """GPTQ every linear of one decoder layer in place from its calibration inputs ``X``.

    With ``true_sequential`` the groups of ``layout.sequential`` are done one after another,
    each calibrated by running the layer with the earlier groups already quantized (reference
    ``--true-sequential``); otherwise one pass collects every linear's ``H``. ``H`` lives on the
    layer's device. Returns ``{linear name: {"gptq_loss", "damp"}}``.
    """
    stats = {}
    passes = layout.sequential if cfg.true_sequential else (layout.sequential,)
    for sets in passes:
        sets = (sets,) if cfg.true_sequential else sets
        # the linears of one set read the same input, so they share one H
        hessians = {names[0]: Hessian(layer.get_submodule(names[0]).in_features, X.device) for names in sets}
        modules = {n: layer.get_submodule(n) for n in hessians}
        collect_inputs(layer, X, kwargs, modules, lambda name, x: hessians[name].add_batch(x))
        for names in sets:
            stats.update(_quantize_set(layer, names, hessians.pop(names[0]).H, cfg))
    return stats


def _quantize_set(layer: nn.Module, names: tuple, H: torch.Tensor, cfg: GPTQConfig) -> dict:
    """GPTQ of linears sharing one input (q/k/v, gate/up): their rows are stacked into one ``W``,
    which is exact, since GPTQ treats every output row independently given ``H``."""
    linears = [layer.get_submodule(n) for n in names]
    res = gptq(torch.cat([lin.weight for lin in linears]), H, cfg)
    stats, row = {}, 0
    for name, lin in zip(names, linears):
        rows = slice(row, row + lin.out_features)
        row += lin.out_features
        q = res.weight
        part = UniformWeight(
            q.codes[rows], q.scales[rows], None if q.zeros is None else q.zeros[rows], q.bits, q.group_size, q.g_idx
        )
        layer.set_submodule(name, UniformLinear(part, lin.bias).to(lin.weight.device))
        stats[name] = {"gptq_loss": float(res.row_loss[rows].sum()), "damp": res.damp}
    return stats


@torch.no_grad()
def quantize_head(linear: nn.Module, X: torch.Tensor, cfg: GPTQConfig) -> UniformLinear:
    """GPTQ of an lm_head ``linear`` (vocab, hidden) from its calibration inputs ``X`` (n, seqlen,
    hidden), the final norm's outputs: ``H = 2 X^T X / N`` over the windows, then
    :func:`gptq` as for any linear, on ``X``'s device. The result is chapter 1's format; a tied
    embedding reads its rows (the GPTQ-updated weight, not the rounded float one)."""
    H = Hessian(linear.in_features, X.device)
    for x in X.split(8):
        H.add_batch(x)
    res = gptq(linear.weight.to(X.device), H.H, cfg)
    return UniformLinear(res.weight, linear.bias).to(linear.weight.device)


register(
    Method(
        "gptq_int4",
        GPTQConfig(),
        "GPTQ INT4, asymmetric, groups of 128 input columns, act-order with static groups, damp 0.01, true sequential",
        quantize_layer=quantize_layer,
        overrides=("bits", "group_size", "sym", "act_order", "static_groups"),
        quantize_head=quantize_head,
    )
)
