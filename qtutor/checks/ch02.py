"""Checkers for the exercises of chapter 2 (SmoothQuant).

    from qtutor.checks import ch02
    ch02.check_per_token_quant(quantize_per_token)
    ch02.check_smooth_up_down(smooth_up_down)
    ch02.check_alpha_search(alpha_search)

Each runs your function on small inputs, compares it with :mod:`qtutor.quant.smoothquant` /
:mod:`qtutor.quant.transforms` or with answers written down for those inputs, prints one line
and returns whether it was right. Your function may call only the ``qtutor`` functions the
exercise names.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..quant import smoothquant as sq
from ..quant.transforms import scale_linear_to_linears
from . import call, close, noise, report  # noqa: F401 (noise: tests rebuild the inputs)


def _outlier_inputs(gen: torch.Generator, tokens: int = 24, width: int = 16) -> torch.Tensor:
    """Activations (tokens, width) with two outlier channels, as in a real model."""
    x = torch.randn(tokens, width, generator=gen)
    x[:, [3, 11]] *= 40.0
    return x


def check_per_token_quant(fn) -> bool:
    """``fn(x)`` -> ``(q, scale)``: symmetric dynamic INT8 codes of ``x`` (tokens, in), one
    scale per token, ``scale_t = max_j |x_tj| / 127``, ``q = round(x / scale)``."""
    what = "per-token symmetric INT8 quantization of activations"
    gen = torch.Generator().manual_seed(3)
    x = _outlier_inputs(gen)
    x[5] *= 0.01  # rows of very different size: a per-tensor scale would show
    q_ref, s_ref = sq.quantize_activation_absmax(x, "per_token")
    got, err = call(fn, x.clone())  # no qtutor function: quantize_activation_absmax is the answer
    if err:
        return report(False, what, err)
    try:
        q, s = got
        q, s = torch.as_tensor(q), torch.as_tensor(s).float()
    except Exception:
        return report(False, what, f"returned {type(got).__name__}: return a pair (codes, scales)")
    if q.shape != x.shape:
        return report(False, what, f"codes have shape {tuple(q.shape)}, expected {tuple(x.shape)}")
    if s.numel() == 1:
        return report(
            False,
            what,
            "one scale for the whole tensor: use one per token (row), x.abs().amax(dim=-1, keepdim=True) / 127",
        )
    if s.numel() != x.shape[0]:
        return report(False, what, f"{s.numel()} scales for {x.shape[0]} tokens: one scale per row")
    s = s.reshape(-1, 1)
    if q.is_floating_point() and not torch.equal(q, q.round()):
        return report(False, what, "codes must be integers: round x / scale")
    if int(q.abs().max()) > 127:
        return report(False, what, "codes must lie in [-127, 127]")
    if not close(s, s_ref, atol=1e-7, rtol=1e-5):
        ratio = float((s / s_ref).median())
        hint = (
            "the scale is max|x_t| / 127 (symmetric INT8 uses [-127, 127])"
            if abs(ratio - 1) > 1e-3
            else "scales differ"
        )
        return report(False, what, hint)
    if not torch.equal(q.to(torch.int64), q_ref.to(torch.int64)):
        n = int((q.to(torch.int64) != q_ref.to(torch.int64)).sum())
        return report(False, what, f"{n} codes differ from round(x / scale)")
    if q.dtype != torch.int8:
        return report(True, what + f" (tip: store the codes as torch.int8, not {q.dtype})")
    return report(True, what)


class _MLP(nn.Module):
    """A SwiGLU MLP laid out as Qwen2's and Llama's: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int, gen: torch.Generator):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()
        with torch.no_grad():
            for fc in (self.gate_proj, self.up_proj, self.down_proj):
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) / fc.in_features**0.5)
            self.up_proj.weight[[2, 9]] *= 30.0  # outliers in down_proj's input

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def check_smooth_up_down(fn) -> bool:
    """``fn(mlp, x_max, alpha)`` smooths down_proj's input in place: ``s`` from
    :func:`qtutor.quant.smoothquant.smooth_scales` (``x_max`` (intermediate,) the per-channel
    max of down_proj's input, ``[down_proj.weight]``, ``alpha``), ``1/s`` folded into up_proj's
    output rows, ``s`` into down_proj's input columns; the MLP computes the same function."""
    what = "smoothing down_proj's input through up_proj"
    gen = torch.Generator().manual_seed(8)
    mlp = _MLP(12, 20, gen)
    x = torch.randn(30, 12, generator=gen)
    with torch.no_grad():
        before = mlp(x)
        x_max = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs().amax(dim=0)
    original = {n: getattr(mlp, n).weight.detach().clone() for n in ("gate_proj", "up_proj", "down_proj")}
    ref = copy.deepcopy(mlp)
    scale_linear_to_linears(ref.up_proj, [ref.down_proj], sq.smooth_scales(x_max, [ref.down_proj.weight], 0.5))
    with torch.no_grad():
        _, err = call(fn, mlp, x_max.clone(), 0.5, allow=(sq.smooth_scales,), none_ok=True)
    if err:
        return report(False, what, err)
    with torch.no_grad():
        after = mlp(x)
    same_weights = all(
        close(getattr(mlp, n).weight, getattr(ref, n).weight) for n in ("gate_proj", "up_proj", "down_proj")
    )
    unchanged = close(after, before, atol=1e-4, rtol=1e-4)
    if unchanged and same_weights:
        return report(True, what)
    if all(close(getattr(mlp, n).weight, original[n]) for n in original):
        return report(False, what, "nothing changed: rescale up_proj's rows and down_proj's columns in place")
    if not close(mlp.gate_proj.weight, ref.gate_proj.weight):
        return report(
            False,
            what,
            "leave gate_proj alone: SiLU(gate) is not linear, so a scale on "
            "gate_proj's output does not pass through it; up_proj's output is "
            "multiplied elementwise, so the scale passes through the product",
        )
    if not unchanged:
        return report(
            False,
            what,
            "the MLP's output changed: divide row j of up_proj.weight "
            "(output channel j) by s_j and multiply column j of down_proj.weight by s_j",
        )
    return report(
        False, what, "the output is unchanged but the scales are not smooth_scales(x_max, [down_proj.weight], alpha)"
    )


# the W8A8 output errors of check_alpha_search's inputs for alphas 0, 0.25, 0.5, 0.75, 1, worked
# out once: with x / s (right) and with x left unsmoothed (a typical slip)
_ALPHA_ERRORS = (1.257966e-04, 2.635697e-05, 1.340355e-05, 2.396765e-05, 1.202766e-04)
_ALPHA_ERRORS_X_NOT_DIVIDED = (4.218640e00, 2.291532e01, 9.991318e01, 3.959921e02, 1.497568e03)


def _proportional(a: torch.Tensor, b) -> bool:
    ratio = a.double() / torch.as_tensor(b, dtype=torch.float64)
    return bool(torch.all(ratio > 0)) and float(ratio.max() / ratio.min()) < 1.001


def check_alpha_search(fn) -> bool:
    """``fn(x, weights, alphas)`` -> ``(best_alpha, errors)``: for each alpha, smooth ``x``
    (tokens, in) and the ``weights`` (each (out_k, in)) that read it with
    ``smooth_scales(max|x_j|, weights, alpha)``, run W8A8 (per-token INT8 activations,
    per-channel INT8 weights) and measure ``sum_k ||x W_k^T - Y_k||^2 / sum_k ||x W_k^T||^2``;
    ``errors`` lists it per alpha (any positive multiple is accepted), ``best_alpha`` is the
    alpha with the smallest error."""
    what = "per-layer search of SmoothQuant's alpha"
    x = noise((48, 32), 1.0)
    x[:, [3, 11]] *= 40.0  # two outlier channels, as in a real model
    weights = [noise((24, 32), 2.0) / 3, noise((16, 32), 3.0) / 3]
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    best = alphas[min(range(len(alphas)), key=_ALPHA_ERRORS.__getitem__)]
    allow = (sq.smooth_scales, sq.quantize_activation_absmax, sq.quantize_weight_absmax)
    result, err = call(fn, x.clone(), [w.clone() for w in weights], list(alphas), allow=allow)
    if err:
        return report(False, what, err)
    try:
        got_best, got = result
        got = torch.as_tensor(got, dtype=torch.float64).reshape(-1)
        got_best = float(got_best)
    except Exception:
        return report(False, what, f"returned {type(result).__name__}: return a pair (best_alpha, errors)")
    if got.numel() != len(alphas):
        return report(False, what, f"{got.numel()} errors for {len(alphas)} alphas: one per alpha")
    proportional = _proportional(got, _ALPHA_ERRORS)
    if proportional and abs(got_best - best) < 1e-9:
        return report(True, what)
    if _proportional(got, _ALPHA_ERRORS_X_NOT_DIVIDED):
        return report(False, what, "divide the activations by s as well: the linear computes (x / s) (W diag(s))^T")
    if proportional:
        return report(
            False, what, f"the errors are right but best_alpha should be {best}, the alpha with the smallest error"
        )
    return report(False, what, "the errors differ from the W8A8 output error defined in the exercise")


# --------------------------------------------------------------------------- predictions and experiments
def check_planted_prediction(predicted, measured) -> bool:
    """ex-ch02-predict-planted: SmoothQuant's perplexity on the model with planted outliers,
    written down before it is measured; a good prediction is within 1%."""
    from .ch00 import compare_prediction

    return compare_prediction(predicted, measured, "SmoothQuant W8A8 with planted outliers", 0.01)


def check_alpha_sweep(result, model, calib, ids, seqlen, max_tokens) -> bool:
    """ex-ch02-alpha-sweep: ``result`` maps migration strengths alpha to the perplexity of
    ``model`` quantized with ``smoothquant_w8a8`` at that alpha (calibrated on ``calib``).
    Checks its form and measures the smallest alpha again on a fresh copy."""
    import copy

    from ..api import quantize
    from ..eval import perplexity
    from ..quant.smoothquant import SmoothQuantConfig
    from .ch00 import remeasured, sweep_table

    table, hint = sweep_table(result, "alpha sweep")
    if table is None:
        return report(False, "alpha sweep", hint)
    if not all(isinstance(k, (int, float)) and 0 <= k <= 1 for k in table):
        return report(False, "alpha sweep: the keys must be migration strengths in [0, 1]", "{alpha: perplexity}")
    a = min(table)
    m = copy.deepcopy(model)
    quantize(m, "smoothquant_w8a8", SmoothQuantConfig(alpha=float(a)), calib=calib)
    truth = perplexity(m, ids, seqlen, max_tokens, batch_size=8).ppl
    return remeasured("alpha sweep", a, table[a], truth)
