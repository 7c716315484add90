"""Checkers for the exercises of chapter 5, "Palettization".

``from qtutor.checks import ch05`` then e.g. ``ch05.check_weighted_kmeans(my_fn)``.
Each checker prints one line and returns True when the answer is right. Your function may call
only the ``qtutor`` functions the exercise names (``kmeans_1d`` for the grouped palettes; not
for the weighted k-means, which ``kmeans_1d(x, k, weights=w)`` answers).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..quant.palettize import PalettizeConfig, PalettizedLinear, kmeans_1d, kmeans_lut
from . import report
from .ch00 import _as_float, _call


def _as_tensor(x):
    try:
        return torch.as_tensor(x).detach().double().cpu()
    except Exception:
        return None


# --------------------------------------------------------------------------- weighted 1-D k-means
def _weighted_sse(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> float:
    """Weighted squared error of the values ``x`` replaced by their nearest entry of ``c``."""
    d = (x[:, None] - c[None, :]).pow(2).amin(1)
    return float((w * d).sum())


def check_weighted_kmeans(fn) -> bool:
    """``fn(x (n,), w (n,), k) -> centroids (k,)``: the exact k-means of the values ``x`` with
    non-negative weights ``w`` (a value of weight 3 counts as three copies of it)."""
    g = torch.Generator().manual_seed(5)
    cases = [
        (torch.randn(30, generator=g), torch.randint(1, 20, (30,), generator=g).double(), 3),
        (torch.rand(45, generator=g) * 2 - 1, torch.randint(1, 50, (45,), generator=g).double(), 5),
        (torch.randn(25, generator=g) * 0.02, torch.rand(25, generator=g) * 4 + 0.1, 4),
    ]
    for x, w, k in cases:
        x = x.double()
        got, err = _call(fn, x.clone(), w.clone(), k)  # no qtutor: kmeans_1d(x, k, weights=w) is the answer
        if err:
            return report(False, f"weighted k-means with k={k}", err)
        c = _as_tensor(got)
        if c is None or c.dim() != 1 or c.numel() != k:
            shape = None if c is None else tuple(c.shape)
            return report(
                False,
                f"weighted k-means with k={k} returned shape {shape}",
                f"return the {k} centroids as a 1-D tensor",
            )
        opt = kmeans_1d(x, k, weights=w).centroids.double()
        best, mine = _weighted_sse(x, w, opt), _weighted_sse(x, w, c)
        if not mine <= best * (1 + 1e-6) + 1e-12:
            hint = (
                "D[q][i] = min_j D[q-1][j-1] + cost(j, i), with cost(j, i) from prefix sums of "
                "w, w*x and w*x^2: S2 - S1^2 / S0"
            )
            plain = kmeans_1d(x, k).centroids.double()
            if _weighted_sse(x, w, plain) == mine or torch.allclose(c.sort().values, plain, atol=1e-9):
                hint = (
                    "this is the unweighted optimum: each value's squared error counts w times, "
                    "so the run's size becomes the sum of its weights and its mean a weighted mean"
                )
            return report(False, f"k={k}: weighted error {mine:.6g}, the optimum is {best:.6g}", hint)
    return report(True, "exact weighted 1-D k-means (the weighted error is optimal in 3 cases)")


# --------------------------------------------------------------------------- grouped palettes
def check_palettize_grouped(fn) -> bool:
    """``fn(W (out, in), bits, group_size) -> W_hat (out, in)``: one k-means palette of 2^bits
    entries per ``group_size`` consecutive output rows, no per-channel scale; each weight
    replaced by its nearest palette entry."""
    g = torch.Generator().manual_seed(6)
    # rows of very different ranges, so that sharing one palette over all rows costs accuracy
    W = torch.randn(32, 48, generator=g) * torch.exp(torch.randn(32, 1, generator=g)) * 0.02
    for bits, group in ((2, 8), (3, 4)):
        got, err = _call(fn, W.clone(), bits, group, allow=(kmeans_1d,))
        if err:
            return report(False, f"{bits}-bit palettes per {group} rows", err)
        got = _as_tensor(got)
        if got is None or got.shape != W.shape:
            return report(
                False,
                f"{bits}-bit palettes per {group} rows: shape "
                f"{None if got is None else tuple(got.shape)}, expected {tuple(W.shape)}",
            )
        k = 2**bits
        for start in range(0, W.shape[0], group):
            n_values = torch.unique(got[start : start + group].float()).numel()
            if n_values > k:
                return report(
                    False,
                    f"rows {start}..{start + group - 1} hold {n_values} distinct values, "
                    f"more than the {k} entries of one palette",
                    f"the {group} rows of a group share ONE palette: cluster all their "
                    f"weights together (not row by row, not by columns)",
                )
        ref = (
            kmeans_lut(W, PalettizeConfig(bits=bits, group_size=group, per_channel_scale=False, kmeans="exact"))
            .dequantize()
            .double()
        )
        e_ref = float((ref - W.double()).norm() / W.double().norm())
        e_got = float((got - W.double()).norm() / W.double().norm())
        if not e_got <= e_ref * 1.01 + 1e-9:
            hint = "k-means (qtutor.quant.palettize.kmeans_1d) of each group's weights, then the nearest entry"
            whole = kmeans_1d(W.reshape(-1), k).centroids
            if (
                abs(
                    e_got
                    - float(
                        (whole[kmeans_1d(W.reshape(-1), k).labels].reshape(W.shape).double() - W.double()).norm()
                        / W.double().norm()
                    )
                )
                < 1e-6
            ):
                hint = "one palette for the whole matrix: give each group of rows its own"
            return report(
                False, f"{bits}-bit palettes per {group} rows: relative error {e_got:.4f}, expected {e_ref:.4f}", hint
            )
    return report(True, "one optimal palette per group of output rows (2 and 3 bits)")


# --------------------------------------------------------------------------- bits per weight
def check_palettized_bits(fn) -> bool:
    """``fn(out_features, in_features, bits, group_size, per_channel_scale) -> float``: the bits
    per weight a ``PalettizedLinear`` stores (packed indices, fp16 palettes of 2^bits entries,
    one per ``group_size`` rows, fp16 per-row scales if asked)."""
    cases = [
        (64, 128, 4, 16, True),
        (32, 256, 4, 32, False),
        (48, 64, 3, 16, True),
        (16, 512, 2, 16, True),
        (64, 64, 6, 64, False),
        (96, 32, 4, 8, True),
    ]
    for args in cases:
        got, err = _call(fn, *args)
        if err:
            return report(False, f"palettized_bits{args}", err)
        out_f, in_f, bits, group, scale = args
        torch.manual_seed(0)
        cfg = PalettizeConfig(
            bits=bits,
            granularity="per_tensor" if group == out_f else "per_grouped_channel",
            group_size=group,
            per_channel_scale=scale,
        )
        layer = PalettizedLinear.from_float(nn.Linear(in_f, out_f, bias=False), cfg)
        got, truth = _as_float(got), layer.bits_per_weight  # what the layer really stores
        if got is None or not math.isclose(got, truth, rel_tol=1e-2):
            lut = 16 * 2**bits / (group * in_f)
            hint = "indices + (16-bit palette entries per group of rows) + 16-bit scales, per weight"
            if got is not None and math.isclose(got, bits, rel_tol=1e-3):
                hint = "the palettes (and the scales) are stored too"
            elif got is not None and scale and math.isclose(got, bits + lut, rel_tol=1e-3):
                hint = "per_channel_scale adds one fp16 scale per output row: 16 / in_features bits per weight"
            elif got is not None and math.isclose(
                got, bits + 16 * 2**bits / in_f + (16 / in_f if scale else 0), rel_tol=1e-3
            ):
                hint = (
                    "a palette is shared by group_size rows: its cost is spread over group_size * in_features weights"
                )
            return report(False, f"palettized_bits{args} = {got}, stored: {truth:.4f}", hint)
    return report(True, "bits per weight, within 1% of what PalettizedLinear stores")


# --------------------------------------------------------------------------- predict, then measure
def check_palette_bits_prediction(predicted, measured: float) -> bool:
    """Predict-then-measure on the whole model (chapter 5): ``predicted``, the perplexity change
    of 3-bit palettization (0.05 for +5%), against the ``measured`` change. Within 50%."""
    from .ch04 import _judge_prediction

    return _judge_prediction(
        "perplexity change with 3-bit palettes",
        predicted,
        measured,
        0.5,
        "{:+.2%}",
        "half as many entries are about twice as far apart, which doubles the weight error; the loss grows about "
        "as the square of a small weight error",
    )
