"""Checkers for the exercises of chapter 4 (AWQ).

    from qtutor.checks import ch04
    ch04.check_duo_scales(duo_scales)
    ch04.check_clip_thresholds(clip_thresholds)
    ch04.check_gqa_scales(expand_kv_scales)

Each runs your function on small random inputs, compares it with :mod:`qtutor.quant.awq`
(or, for the grouped-query exercise, with attention computed by hand), prints one line and
returns whether it was right. Your function may call only the ``qtutor`` functions the exercise
names (RTN, for the clipping search).
"""

from __future__ import annotations

import torch

from ..quant import awq
from ..quant.rtn import RTNConfig, group_layout
from ..quant.rtn import quantize_weight as rtn_quantize_weight
from . import call, close, report


def check_duo_scales(fn) -> bool:
    """``fn(x_mean, weights, ratio, group_size)`` -> ``s`` (in,): AutoAWQ's duo scaling.
    ``w_mean_j``: every weight divided by the largest ``|w|`` of its quantization group (rows of
    ``group_size`` consecutive input columns), absolute values averaged over the output rows of
    all ``weights`` (each (out_k, in)); ``s = clamp(x_mean^ratio / (w_mean^(1-ratio) + 1e-4),
    min=1e-4)``, then divided by ``sqrt(max(s) * min(s))``."""
    what = "AutoAWQ's duo-scaling candidate scales"
    gen = torch.Generator().manual_seed(5)
    gs = 8
    x_mean = torch.rand(32, generator=gen) * 2
    x_mean[[4, 20]] = torch.tensor([30.0, 12.0])  # salient channels
    weights = [torch.randn(6, 32, generator=gen), torch.randn(10, 32, generator=gen) * 3]
    w_mean = awq.weight_mean(weights, gs)
    for ratio in (0.5, 0.25, 0.9, 0.0):
        expected = awq.candidate_scales(x_mean, ratio, w_mean)
        got, err = call(fn, x_mean.clone(), [w.clone() for w in weights], ratio, gs)
        if err:
            return report(False, what, err)
        try:
            got = torch.as_tensor(got).float()
        except Exception:
            return report(False, what, f"returned {type(got).__name__}: return a tensor")
        if got.shape != expected.shape:
            return report(
                False,
                what,
                f"s has shape {tuple(got.shape)}, expected {tuple(expected.shape)}: one scale per input channel",
            )
        if close(got, expected):
            continue
        raw = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        if close(got, raw):
            return report(False, what, "normalise: divide s by sqrt(max(s) * min(s))")
        per_row = awq.weight_mean(weights, 0)
        if close(got, awq.candidate_scales(x_mean, ratio, per_row)):
            return report(
                False,
                what,
                "normalise each weight by the max |w| of its group of group_size columns, not of its whole row",
            )
        if close(got, awq.candidate_scales(x_mean, ratio)):
            return report(False, what, "that is plain AWQ's x_mean^ratio: divide by w_mean^(1-ratio) + 1e-4")
        err = float((got - expected).abs().max())
        return report(False, what, f"ratio={ratio}: largest difference {err:.3g}")
    return report(True, what)


def _weight_mse_thresholds(W, gs, n_grid, max_shrink):
    """The wrong answer that minimises the weights' own error instead of the output's."""
    out_features, in_features = W.shape
    _, n_groups = group_layout(in_features, gs)
    Wg = W.reshape(out_features, n_groups, gs)
    org = Wg.abs().amax(-1, keepdim=True)
    best, best_err = org.clone(), torch.full_like(org, float("inf"))
    for i in range(max(1, int(max_shrink * n_grid))):
        m = org * (1 - i / n_grid)
        q = (
            rtn_quantize_weight(torch.clamp(Wg, -m, m).reshape(out_features, -1), RTNConfig(4, gs))
            .dequantize()
            .reshape(Wg.shape)
        )
        err = (q - Wg).pow(2).mean(-1, keepdim=True)
        better = err < best_err
        best_err[better], best[better] = err[better], m[better]
    return best.squeeze(-1)


def check_clip_thresholds(fn) -> bool:
    """``fn(W, X, group_size, n_grid, max_shrink)`` -> ``max_val`` (out, n_groups): for every
    row and group of ``group_size`` input columns, the threshold ``m (1 - i / n_grid)``
    (``m = max|w|`` of the group, ``i = 0 .. int(max_shrink * n_grid) - 1``) whose clipped,
    4-bit RTN-quantized group gives the smallest mean squared error of ``X_g w_g^T`` over the
    tokens (the first, i.e. the least clipping, on ties)."""
    what = "AWQ's clipping search"
    gen = torch.Generator().manual_seed(6)
    out_features, in_features, gs, n_grid, max_shrink = 12, 64, 16, 20, 0.5
    W = torch.randn(out_features, in_features, generator=gen)
    W[torch.rand(W.shape, generator=gen) < 0.03] *= 6  # a few large weights worth clipping
    X = torch.randn(96, in_features, generator=gen)
    X[:, [5, 40]] *= 8
    expected = awq.search_clip(W, X, awq.AWQConfig(group_size=gs, n_clip_grid=n_grid, max_shrink=max_shrink))["max_val"]
    # RTN is the exercise's tool (qtutor.quant.rtn and the layer base it builds on); awq is not
    got, err = call(fn, W.clone(), X.clone(), gs, n_grid, max_shrink, allow=("qtutor.quant.rtn", "qtutor.quant.base"))
    if err:
        return report(False, what, err)
    try:
        got = torch.as_tensor(got).float()
    except Exception:
        return report(False, what, f"returned {type(got).__name__}: return a tensor")
    if got.shape != expected.shape:
        return report(
            False, what, f"max_val has shape {tuple(got.shape)}, expected {tuple(expected.shape)} (rows, groups)"
        )
    if close(got, expected):
        return report(True, what)
    if close(got, _weight_mse_thresholds(W, gs, n_grid, max_shrink)):
        return report(
            False,
            what,
            "you minimised the error of the weights; minimise the error of the group's output X_g w_g^T instead",
        )
    agree = float((torch.isclose(got, expected, rtol=1e-4, atol=1e-6)).float().mean())
    return report(False, what, f"{agree:.0%} of the thresholds agree with the reference")


def _attention_input_of_o(V: torch.Tensor, P: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """o_proj's input for values V (tokens, kv_heads * head_dim) and attention probabilities
    P (heads, tokens, tokens): head h reads KV head h // n_rep (transformers' ``repeat_kv``)."""
    heads = P.shape[0]
    Vh = V.reshape(V.shape[0], -1, head_dim).transpose(0, 1)  # (kv_heads, tokens, head_dim)
    Vh = Vh.repeat_interleave(n_rep, dim=0)  # (heads, tokens, head_dim)
    out = torch.bmm(P, Vh)  # (heads, tokens, head_dim)
    return out.transpose(0, 1).reshape(V.shape[0], heads * head_dim)


def check_gqa_scales(fn) -> bool:
    """``fn(s_v, num_heads, num_kv_heads)`` -> ``s_o`` (num_heads * head_dim,): the scales to
    multiply o_proj's input columns by after v_proj's output rows were divided by ``s_v``
    (num_kv_heads * head_dim,), so that the attention block computes the same function."""
    what = "v_proj -> o_proj scales under grouped-query attention"
    gen = torch.Generator().manual_seed(7)
    for num_heads, num_kv_heads, head_dim in ((4, 2, 3), (6, 2, 2), (4, 4, 2), (8, 1, 2)):
        n_rep = num_heads // num_kv_heads
        s_v = 0.5 + torch.rand(num_kv_heads * head_dim, generator=gen) * 3
        s_o, err = call(fn, s_v.clone(), num_heads, num_kv_heads)
        if err:
            return report(False, what, err)
        try:
            s_o = torch.as_tensor(s_o).float().reshape(-1)
        except Exception:
            return report(False, what, f"returned {type(s_o).__name__}: return a tensor")
        if s_o.numel() != num_heads * head_dim:
            return report(
                False,
                what,
                f"{num_heads} heads x {head_dim}: o_proj reads "
                f"{num_heads * head_dim} channels, you gave {s_o.numel()} scales",
            )
        tokens = 5
        V = torch.randn(tokens, num_kv_heads * head_dim, generator=gen)
        P = torch.softmax(torch.randn(num_heads, tokens, tokens, generator=gen), dim=-1)
        ref = _attention_input_of_o(V, P, n_rep, head_dim)
        got = _attention_input_of_o(V / s_v, P, n_rep, head_dim) * s_o
        if close(got, ref, atol=1e-5, rtol=1e-4):
            continue
        if num_kv_heads > 1 and close(s_o, s_v.repeat(n_rep)):
            return report(
                False,
                what,
                "s_v.repeat(...) tiles the KV heads (0, 1, 0, 1, ...), but the "
                "query heads sharing a KV head are consecutive: head h reads KV "
                "head h // (num_heads // num_kv_heads)",
            )
        return report(False, what, f"{num_heads} heads / {num_kv_heads} KV heads: the attention output changed")
    return report(True, what)


# --------------------------------------------------------------------------- predict, then measure
def _judge_prediction(
    what: str, predicted, measured: float, rel_tol: float, fmt: str = "{:.3g}", hint: str = ""
) -> bool:
    """Compare a number the reader wrote down before running a cell with what the cell measured:
    within ``rel_tol`` of it (relative) counts. Shared by the prediction checkers of chapters 4-7;
    it prints one line and returns the verdict. ``None`` (the stub's value) means no prediction yet."""
    import math

    if predicted is None:
        return report(
            False,
            f"{what}: no prediction yet",
            "write your number down BEFORE you run the measuring cell, then run it again",
        )
    try:
        p = float(torch.as_tensor(predicted).reshape(()))
    except Exception:
        p = math.nan
    if not math.isfinite(p):
        return report(False, f"{what}: the prediction {predicted!r} is not a finite number", "write down one number")
    m = float(measured)
    off = abs(p - m) / max(abs(m), 1e-12)
    said = f"{what}: you predicted {fmt.format(p)}, the run measured {fmt.format(m)} ({off:.0%} off"
    return report(off <= rel_tol, said + f"; within {rel_tol:.0%} counts)", hint)


def check_scaling_prediction(predicted, measured: float) -> bool:
    """Predict-then-measure (chapter 4): ``predicted``, the factor by which scaling the salient
    channels by s = 2 divides their own output error, against the ``measured`` factor. Within 25%."""
    return _judge_prediction(
        "error on the salient channels, divided by",
        predicted,
        measured,
        0.25,
        "{:.2f}",
        "while the group's step Delta stays the same, Q(ws) x/s has the rounding error of Q(w) x divided by s",
    )


def check_low_bits_prediction(predicted, measured: float) -> bool:
    """Predict-then-measure on the whole model (chapter 4): ``predicted``, the perplexity change
    of AWQ at the lower bit width (0.05 for +5%), against the ``measured`` change. Within 50%: the
    quadratic model behind the estimate is rough."""
    return _judge_prediction(
        "perplexity change of AWQ with one bit fewer",
        predicted,
        measured,
        0.5,
        "{:+.2%}",
        "a small weight error raises the loss about quadratically, and one bit fewer stretches a min-max grid's "
        "step by (2^b - 1) / (2^(b-1) - 1)",
    )
