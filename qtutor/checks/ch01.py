"""Checkers for the exercises of chapter 1, "Round-to-nearest".

``from qtutor.checks import ch01`` then e.g. ``ch01.check_scale_zero(my_fn)``.
Each checker prints one line and returns True when the answer is right.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..quant.base import pack_codes
from ..quant.rtn import RTNConfig, UniformLinear, quantize_weight
from . import report
from .ch00 import _as_float, _call


# --------------------------------------------------------------------------- scale and zero point
def _group(lo: float, hi: float, n: int) -> torch.Tensor:
    """``n`` weights spread over [lo, hi], both ends included (no random numbers: the answers
    below were worked out by hand for these groups)."""
    u = (torch.sin(torch.arange(n) * 2.3) + 1) / 2
    u[0], u[1] = 0.0, 1.0
    return lo + (hi - lo) * u


# (what, lo, hi, bits, n) -> (scale, zero point) of the asymmetric grid of _group(lo, hi, n)
_SCALE_ZERO = {
    ("a mixed-sign group", -0.113, 0.171, 4, 64): (0.284 / 15, 6),
    ("a mixed-sign group", -0.061, 0.058, 8, 128): (0.119 / 255, 131),
    ("a mixed-sign group", -2.9, 3.4, 3, 32): (0.9, 3),
    ("an all-positive group", 0.52, 1.49, 4, 64): (1.49 / 15, 0),
    ("an all-negative group", -1.47, -0.51, 4, 64): (1.47 / 15, 15),
}


def check_scale_zero(fn) -> bool:
    """``fn(w (n,), bits) -> (scale, zero)`` of the asymmetric b-bit grid of one group ``w``."""
    for (what, lo, hi, bits, n), (ts, tz) in _SCALE_ZERO.items():
        w = _group(lo, hi, n)
        got, err = _call(fn, w.clone(), bits)
        if err:
            return report(False, f"scale and zero point of {what}", err)
        try:
            s, z = (_as_float(v) for v in got)
        except Exception:
            return report(False, f"returned {got!r}", "return a pair (scale, zero point)")
        # an fp16 scale (relative error <= 2^-11) is accepted too
        if s is None or z is None or not math.isclose(s, ts, rel_tol=1e-3) or z != tz:
            hint = "s = (max - min) / (2^b - 1) and z = round(-min / s)"
            if (
                s is not None
                and math.isclose(s, (float(w.max()) - float(w.min())) / (2**bits - 1), rel_tol=1e-3)
                and not math.isclose(s, ts, rel_tol=1e-3)
            ):
                hint = "the range must contain 0 (take min(w, 0) and max(w, 0)), so that 0 is exact"
            elif s is not None and math.isclose(s, ts * (2**bits - 1) / 2**bits, rel_tol=1e-3):
                hint = "b bits give 2^b codes, hence 2^b - 1 steps between the first and the last"
            elif s is not None and math.isclose(s, ts, rel_tol=1e-3):
                hint = "the scale is right; the zero point is the code of 0.0: round(-min / s), an integer"
            return report(False, f"{bits}-bit grid of {what}: got ({s:.6g}, {z}), expected ({ts:.6g}, {tz:g})", hint)
    return report(True, "scale and zero point (mixed-sign, all-positive and all-negative groups)")


# --------------------------------------------------------------------------- symmetric RTN
def check_rtn_symmetric(fn) -> bool:
    """``fn(W (out, in), bits) -> W_hat``: symmetric round-to-nearest, one scale per output row."""
    g = torch.Generator().manual_seed(2)
    for bits in (8, 4):
        W = torch.randn(48, 96, generator=g) * 0.02
        W[3, 7] = 0.3  # an outlier that sets its row's scale
        got, err = _call(fn, W.clone(), bits)
        if err:
            return report(False, f"symmetric INT{bits}", err)
        ref = quantize_weight(W, RTNConfig(bits=bits, group_size=0, sym=True)).dequantize()
        try:
            got = torch.as_tensor(got).float()
        except Exception:
            return report(False, f"symmetric INT{bits} returned {type(got).__name__}", "return a tensor")
        if got.shape != W.shape:
            return report(False, f"symmetric INT{bits}: shape {tuple(got.shape)}, expected {tuple(W.shape)}")
        s = W.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        # fp32 or fp16 scales are both accepted: every value then moves by at most ~2^-11 of
        # itself, and a few weights may round to the neighbouring grid point
        diff = (got - ref).abs()
        off = diff > 1e-2 * s + 1e-3 * ref.abs()
        if float(off.float().mean()) > 0.05 or float((diff / s).max()) > 1.01:
            hint = "s = max|w| / (2^(b-1) - 1) per row, w_hat = s * round(w / s)"
            s_wrong = W.abs().amax(dim=1, keepdim=True) / 2 ** (bits - 1)
            if torch.allclose(got, s_wrong * torch.round(W / s_wrong), atol=1e-3 * float(s.min())):
                hint = "divide max|w| by 2^(b-1) - 1, so that max|w| itself is a grid point"
            elif float(((got - W).abs() / s).max()) > 0.51:
                hint = "every weight should end within s/2 of its value"
            return report(
                False,
                f"symmetric INT{bits}: {float(off.float().mean()):.1%} of the weights differ from the reference",
                hint,
            )
    return report(True, "symmetric per-channel RTN at 8 and 4 bits")


# --------------------------------------------------------------------------- bits per weight
def check_bits_per_weight(fn) -> bool:
    """``fn(bits, group_size, in_features, sym) -> float``: bits per weight that qtutor's
    ``UniformLinear`` stores (codes, fp16 scales, b-bit zero points unless symmetric)."""
    cases = [
        (4, 128, 256, False),
        (4, 32, 256, False),
        (8, 0, 256, True),
        (4, 0, 512, False),
        (3, 64, 256, False),
        (4, 128, 256, True),
        (2, 16, 128, False),
    ]
    for args in cases:
        got, err = _call(fn, *args)
        if err:
            return report(False, f"bits_per_weight{args}", err)
        bits, gs, n_in, sym = args
        layer = UniformLinear.from_float(nn.Linear(n_in, 8, bias=False), RTNConfig(bits=bits, group_size=gs, sym=sym))
        got, truth = _as_float(got), layer.bits_per_weight  # what the layer really stores
        if got is None or not math.isclose(got, truth, rel_tol=1e-2):
            g = n_in if gs == 0 else gs
            hint = "codes + (16-bit scale + b-bit zero point) per group, divided by the weights"
            if got is not None and math.isclose(got, bits + 16 / g, rel_tol=1e-3) and not sym:
                hint = "an asymmetric grid also stores a b-bit zero point per group"
            elif got is not None and math.isclose(got, bits, rel_tol=1e-3):
                hint = "the scales (16 bits per group) are stored too"
            elif gs == 0:
                hint = "group_size=0 means one group per output row: in_features weights"
            return report(False, f"bits_per_weight{args} = {got}, stored: {truth:.4f}", hint)
    return report(True, "bits per weight, within 1% of what UniformLinear stores")


# --------------------------------------------------------------------------- packing
def check_pack4(fn) -> bool:
    """``fn(codes (rows, n) uint8 in [0, 15], n even) -> (rows, n // 2) uint8``, the first code of
    each pair in the low nibble (as ``qtutor.quant.pack_codes(codes, 4)``)."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (5, 24), generator=g, dtype=torch.uint8)
    got, err = _call(fn, codes.clone())
    if err:
        return report(False, "pack4", err)
    ref = pack_codes(codes, 4)
    try:
        got = torch.as_tensor(got)
    except Exception:
        return report(False, f"pack4 returned {type(got).__name__}", "return a uint8 tensor")
    if got.shape != ref.shape:
        return report(
            False,
            f"pack4: shape {tuple(got.shape)}, expected {tuple(ref.shape)}",
            "two codes per byte along the last dimension",
        )
    if got.dtype != torch.uint8:
        return report(False, f"pack4: dtype {got.dtype}", "bytes: use torch.uint8")
    if not torch.equal(got, ref):
        swapped = (codes[:, 1::2] | (codes[:, 0::2] << 4)).to(torch.uint8)
        hint = "byte = code[2i] | (code[2i+1] << 4)"
        if torch.equal(got, swapped):
            hint = "the first code of a pair goes in the low nibble (bits 0-3)"
        return report(False, f"pack4: {int((got != ref).sum())} of {ref.numel()} bytes differ", hint)
    return report(True, "two 4-bit codes per byte, low nibble first")


# --------------------------------------------------------------------------- predictions and experiments
def check_int3_prediction(predicted, measured, base) -> bool:
    """ex-ch01-predict-int3: the whole model's perplexity with RTN INT3 in groups, written down
    before it is measured; a good prediction gets the increase over the float model ``base``
    within 40%."""
    from .ch00 import compare_prediction

    return compare_prediction(predicted, measured, "RTN INT3 perplexity", 0.4, reference=base)


def check_group_sweep(result, model, ids, seqlen, max_tokens, bits: int = 4) -> bool:
    """ex-ch01-group-sweep: ``result`` maps group sizes (0: one grid per row) to the perplexity of
    ``model`` with every decoder linear RTN-quantized to ``bits`` bits in those groups. Checks its
    form and measures the largest group size again on a fresh copy."""
    import copy

    from ..api import quantize
    from ..eval import perplexity
    from .ch00 import remeasured, sweep_table

    table, hint = sweep_table(result, "group-size sweep")
    if table is None:
        return report(False, "group-size sweep", hint)
    if not all(isinstance(k, int) and k >= 0 for k in table):
        return report(False, "group-size sweep: the keys must be group sizes (ints, 0 = per row)", "{g: perplexity}")
    g = max(table, key=lambda k: math.inf if k == 0 else k)
    m = copy.deepcopy(model)
    quantize(m, "rtn_int4", RTNConfig(bits=bits, group_size=g))
    truth = perplexity(m, ids, seqlen, max_tokens, batch_size=8).ppl
    return remeasured("group-size sweep", g, table[g], truth)
