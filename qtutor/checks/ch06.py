"""Checkers for the exercises of chapter 6, "NF4".

``from qtutor.checks import ch06`` then e.g. ``ch06.check_equal_mass_levels(my_fn)``.
Each checker prints one line and returns True when the answer is right. Your function may call
only the ``qtutor`` functions the exercise names (``dynamic_map`` for the double quantization).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..quant.nf4 import NF4Config, NF4Linear, dynamic_map, quantize_weight
from . import close, report
from .ch00 import _as_float, _call


def _as_tensor(x):
    try:
        return torch.as_tensor(x).detach().double().cpu()
    except Exception:
        return None


# --------------------------------------------------------------------------- equal-mass levels
def check_equal_mass_levels(fn) -> bool:
    """``fn(bits) -> (2^bits,)``: ascending levels in [-1, 1], the quantiles of N(0, 1) at the
    centres of 2^bits bins of equal probability, scaled so that the largest is 1."""
    for bits in (2, 3, 4):
        n = 2**bits
        got, err = _call(fn, bits)
        if err:
            return report(False, f"equal_mass_levels({bits})", err)
        got = _as_tensor(got)
        if got is None or got.shape != (n,):
            return report(
                False,
                f"equal_mass_levels({bits}): shape {None if got is None else tuple(got.shape)}, expected ({n},)",
                "one level per code: 2^bits of them",
            )
        # the defining property: with c the N(0,1) quantile of the top bin's centre, the level
        # l_i sits at the centre of bin i in probability: Phi(c * l_i) = (i + 1/2) / n
        c = float(torch.special.ndtri(torch.tensor((n - 0.5) / n, dtype=torch.float64)))
        centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        mass = torch.special.ndtr(c * got)
        if not close(mass, centres, atol=1e-6, rtol=1e-5):
            hint = "level i is the N(0,1) quantile at probability (i + 1/2) / 2^bits, then divide by the largest"
            if close(torch.special.ndtr(got), centres, atol=1e-6, rtol=1e-5):
                hint = "scale the levels so that the largest is exactly 1 (the block's absmax maps to it)"
            elif close(got, torch.linspace(-1, 1, n, dtype=torch.float64), atol=1e-6):
                hint = "these are evenly spaced (an INT grid); equal probability means quantiles of N(0, 1)"
            elif close(torch.special.ndtr(c * got.sort().values), centres, atol=1e-6, rtol=1e-5):
                hint = "return the levels in ascending order"
            return report(
                False,
                f"equal_mass_levels({bits}): the probability below each level is off by up to "
                f"{float((mass - centres).abs().max()):.3g} from the bin centres (i + 1/2) / {n}",
                hint,
            )
    return report(True, "equal-probability quantile levels for 2, 3 and 4 bits")


# --------------------------------------------------------------------------- double quantization
def _read_back(absmax: torch.Tensor, dq_block: int) -> torch.Tensor:
    """The absmaxes as ``qtutor``'s NF4 layer reads them back after double quantization: a weight
    built so that its blocks of 64 have exactly these absmaxes, quantized, ``block_absmax()``."""
    blocks = absmax[:, None] * torch.linspace(1.0, -0.5, 64)[None, :]  # |max| of each row: absmax
    q = quantize_weight(blocks, NF4Config(block_size=64, double_quant=True, double_quant_block_size=dq_block))
    return q.block_absmax()


def check_double_quant(fn) -> bool:
    """``fn(absmax (n,) fp32, dq_block) -> (n,)``: the block absmaxes after double quantization,
    dequantized: centred by their mean, cut into blocks of ``dq_block``, each divided by its own
    largest magnitude, rounded to the nearest entry of ``qtutor.quant.nf4.dynamic_map()``, and
    mapped back (times the block's largest magnitude, plus the mean)."""
    g = torch.Generator().manual_seed(7)
    absmax = torch.rand(1000, generator=g) * 0.05 + 0.02
    absmax[500:] *= 3  # the second-level blocks have different ranges
    for dq_block in (256, 100):
        got, err = _call(fn, absmax.clone(), dq_block, allow=(dynamic_map,))
        if err:
            return report(False, f"double quantization in blocks of {dq_block}", err)
        got = _as_tensor(got)
        if got is None or got.shape != absmax.shape:
            return report(
                False,
                f"blocks of {dq_block}: shape {None if got is None else tuple(got.shape)}, "
                f"expected {tuple(absmax.shape)}",
                "one dequantized absmax per block",
            )
        ref = _read_back(absmax, dq_block).double()
        off = (got - ref).abs() > 1e-6 * float(ref.abs().max())
        # a value within float rounding of a midpoint between two codes may go either way
        if float(off.float().mean()) > 0.01:
            hint = (
                "offset = mean; per block of dq_block: a2 = max |absmax - offset|, code = nearest "
                "entry of dynamic_map() to (absmax - offset) / a2, back: code * a2 + offset"
            )
            code = dynamic_map().double()
            a = absmax.double()

            def variant(x, block, offset):
                out = torch.empty_like(x)
                for s in range(0, x.numel(), block):
                    b = x[s : s + block] - offset
                    a2 = b.abs().max()
                    out[s : s + block] = code[(b / a2 - code[:, None]).abs().argmin(0)] * a2 + offset
                return out

            if close(got, variant(a, dq_block, 0.0), atol=1e-7):
                hint = (
                    "subtract the mean of the absmaxes first: they are all positive, and centring them "
                    "uses both halves of the signed 8-bit map"
                )
            elif close(got, variant(a, a.numel(), a.mean()), atol=1e-7):
                hint = f"one second-level scale per block of {dq_block} absmaxes, not one for all"
            return report(
                False,
                f"blocks of {dq_block}: {float(off.float().mean()):.1%} of the absmaxes differ from the reference",
                hint,
            )
    return report(True, "double quantization of the absmaxes (blocks of 256 and 100)")


# --------------------------------------------------------------------------- bits per weight
def check_nf4_bits(fn) -> bool:
    """``fn(numel, block_size, dq_block_size, double_quant) -> float``: the bits per weight an
    ``NF4Linear`` of ``numel`` weights stores: 4-bit codes, the block absmaxes (fp32, or uint8
    codes plus fp32 second-level scales per ``dq_block_size`` blocks and one fp32 offset)."""
    shapes = [
        ((256, 256), 64, 256, True),
        ((64, 64), 64, 256, True),
        ((128, 96), 64, 256, True),
        ((256, 256), 64, 256, False),
        ((512, 512), 32, 128, True),
        ((96, 200), 64, 256, True),
    ]
    for (out_f, in_f), block, dq_block, dq in shapes:
        args = (out_f * in_f, block, dq_block, dq)
        got, err = _call(fn, *args)
        if err:
            return report(False, f"nf4_bits{args}", err)
        cfg = NF4Config(block_size=block, double_quant=dq, double_quant_block_size=dq_block)
        layer = NF4Linear.from_float(nn.Linear(in_f, out_f, bias=False), cfg)
        got, truth = _as_float(got), layer.bits_per_weight  # what the layer really stores
        if got is None or not math.isclose(got, truth, rel_tol=1e-5):
            n = out_f * in_f
            hint = "count every buffer: codes, absmax codes, second-level scales and the offset, in bits, / numel"
            if got is not None and dq and math.isclose(got, 4 + 32 / block, rel_tol=1e-5):
                hint = "with double quantization each absmax is an 8-bit code, not fp32"
            elif got is not None and dq and math.isclose(got, 4 + 8 / block, rel_tol=1e-4):
                hint = "the 8-bit codes need their fp32 second-level scales (one per dq block) and the fp32 offset"
            elif (
                got is not None
                and dq
                and math.isclose(
                    got,
                    4 + (8 * math.ceil(n / block) + 32 * math.ceil(math.ceil(n / block) / dq_block)) / n,
                    rel_tol=1e-6,
                )
            ):
                hint = "add the fp32 offset (the mean of the absmaxes), 32 bits per tensor"
            elif got is not None and dq and math.isclose(got, 4 + 8 / block + 32 / (block * dq_block), rel_tol=1e-5):
                hint = (
                    "that is the large-layer limit: count whole blocks (a last partial block still "
                    "stores its scale) and the one fp32 offset per tensor"
                )
            return report(False, f"nf4_bits{args} = {got}, stored: {truth:.6f}", hint)
    return report(True, "bits per weight of NF4 with and without double quantization, to the bit")


# --------------------------------------------------------------------------- predict, then measure
def check_saving_prediction(predicted, measured: float) -> bool:
    """Predict-then-measure (chapter 6): ``predicted``, the bits per weight double quantization
    saves on a layer, against the ``measured`` saving (from the stored buffers). Within 2%."""
    from .ch04 import _judge_prediction

    return _judge_prediction(
        "bits per weight saved by double quantization",
        predicted,
        measured,
        0.02,
        "{:.4f}",
        "without it: one fp32 absmax per block of 64; with it: one uint8 code per block, one fp32 scale per 256 "
        "blocks and one fp32 offset",
    )


def check_block_size_prediction(predicted, measured: float) -> bool:
    """Predict-then-measure on the whole model (chapter 6): ``predicted``, the perplexity change
    of NF4 with the largest block size of the sweep (0.05 for +5%), against the ``measured``
    change. Within 50%."""
    from .ch04 import _judge_prediction

    return _judge_prediction(
        "perplexity change of NF4 with the largest blocks",
        predicted,
        measured,
        0.5,
        "{:+.2%}",
        "scale the change with blocks of 64 by the square of the ratio of the weight errors, which one matrix gives",
    )
