"""Checkers for the exercises of chapter 3, "GPTQ".

``from qtutor.checks import ch03`` then e.g. ``ch03.check_hessian(my_fn)``.
Each checker prints one line and returns True when the answer is right.
"""

from __future__ import annotations

import torch

from ..quant.gptq import GPTQConfig, gptq
from ..quant.rtn import find_params
from . import close, report
from .ch00 import _call


def _tensor(x):
    try:
        return torch.as_tensor(x).double()
    except Exception:
        return None


def _correlated_inputs(n: int, d: int, rank: int, seed: int) -> torch.Tensor:
    """Tokens whose features are strongly correlated (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, rank, generator=g)
    return torch.randn(n, rank, generator=g) @ A.T + 0.1 * torch.randn(n, d, generator=g)


def _damped_hessian(X: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    H = 2 * X.T @ X / X.shape[0]
    return H + damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)


# --------------------------------------------------------------------------- the Hessian
def check_hessian(fn) -> bool:
    """``fn(X (n, d)) -> H (d, d)``: the Hessian of the mean squared layer-output error.

    Checked by its defining property: ``H`` is symmetric and ``mean_t (X delta^T)_t^2 =
    1/2 delta H delta^T`` for every row change ``delta`` (a symmetric matrix is determined by its
    quadratic form; 200 random ``delta`` pin it down)."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(200, 12, generator=g)
    got, err = _call(fn, X.clone())
    if err:
        return report(False, "hessian", err)
    got, d = _tensor(got), X.shape[1]
    if got is None or got.shape != (d, d):
        return report(
            False,
            f"hessian returned shape {None if got is None else tuple(got.shape)}",
            f"expected ({d}, {d}): one row and column per input feature",
        )
    delta = torch.randn(200, d, generator=g, dtype=torch.float64)
    error = (X.double() @ delta.T).pow(2).mean(0)  # mean squared output change, per delta
    form = 0.5 * torch.einsum("ki,ij,kj->k", delta, got, delta)
    ratio = form / error
    symmetric = close(got, got.T, atol=1e-6 * float(got.abs().max()), rtol=1e-5)
    if not symmetric or not close(ratio, torch.ones_like(ratio), atol=0, rtol=1e-5):
        hint = "H = 2 X^T X / n"
        r = float(ratio.median())
        if not symmetric:
            hint = "H is symmetric: H[i, j] and H[j, i] both come from sum_t x_ti x_tj"
        elif abs(r - 0.5) < 1e-4:
            hint = "the derivative of the square brings a factor 2"
        elif abs(r / X.shape[0] - 1) < 1e-4 or abs(r / X.shape[0] - 0.5) < 1e-4:
            hint = "the error is a mean over the n tokens: divide by n"
        return report(False, "1/2 delta H delta^T differs from the mean squared output change", hint)
    return report(True, "H = 2 X^T X / n")


# --------------------------------------------------------------------------- the OBS update
def check_obs_update(fn) -> bool:
    """``fn(w (d,), Hinv (d, d), i, q) -> delta (d,)``: the update of the whole row that sets
    weight ``i`` to the value ``q`` at least cost (Optimal Brain Surgeon)."""
    g = torch.Generator().manual_seed(5)
    X = _correlated_inputs(300, 10, 4, seed=6)
    Hinv = torch.linalg.inv(_damped_hessian(X.double()))
    Hinv = (Hinv + Hinv.T) / 2
    w = torch.randn(10, generator=g).double()
    H = torch.linalg.inv(Hinv)
    for i, q in [(0, 0.5), (3, -1.25), (9, 0.0)]:
        got, err = _call(fn, w.clone(), Hinv.clone(), i, q)
        if err:
            return report(False, f"obs_update(i={i})", err)
        got = _tensor(got)
        if got is None or got.shape != w.shape:
            return report(
                False,
                f"obs_update returned shape {None if got is None else tuple(got.shape)}",
                f"expected ({w.numel()},): a change of every weight of the row",
            )
        # the constrained minimum of delta H delta^T with (w + delta)_i = q, by its two properties:
        # weight i lands on q, and the gradient H delta is zero except along e_i (Lagrange)
        lands = abs(float(w[i] + got[i]) - q) <= 1e-5 * max(1.0, abs(q), float(w.abs().max()))
        g_ = H @ got
        others = torch.cat([g_[:i], g_[i + 1 :]])
        optimal = float(others.abs().max()) <= 1e-4 * float(g_.abs().max()) + 1e-12
        if not (lands and optimal):
            hint = "delta = -(w_i - q) / [H^-1]_ii * H^-1[:, i]"
            if abs(float(w[i] - got[i]) - q) <= 1e-5 * max(1.0, abs(q)):
                hint = "sign: after the update, weight i must equal q"
            elif not lands:
                hint = f"after the update weight {i} must equal q exactly; it is {float(w[i] + got[i]):.6g}"
            else:
                hint = "weight i lands on q, but the others do not compensate at least cost: use column i of H^-1"
            return report(False, f"obs_update(i={i}, q={q}) is not the least-cost update", hint)
    return report(True, "the OBS update: weight i lands on q, the others compensate")


# --------------------------------------------------------------------------- Cholesky rows
def check_cholesky_rows(fn) -> bool:
    """``fn(Hinv (d, d)) -> R (d, d)``, upper triangular: row ``i`` of ``R`` is row ``i`` of the
    inverse Hessian that remains after eliminating inputs ``0..i-1``, divided by the square root
    of its diagonal entry."""
    X = _correlated_inputs(300, 8, 3, seed=7)
    Hinv = torch.linalg.inv(_damped_hessian(X.double()))
    Hinv = (Hinv + Hinv.T) / 2
    # torch's Cholesky is the answer this exercise rebuilds by elimination: not allowed inside
    got, err = _call(fn, Hinv.clone(), forbid=("linalg_cholesky", "linalg_cholesky_ex", "cholesky"))
    if err:
        return report(False, "cholesky_rows", err)
    got = _tensor(got)
    truth = torch.linalg.cholesky(Hinv, upper=True)
    if got is None or got.shape != truth.shape:
        return report(False, f"cholesky_rows returned shape {None if got is None else tuple(got.shape)}")
    tol = dict(atol=1e-4 * float(truth.abs().max()), rtol=1e-4)  # float32 answers are fine
    if not close(got, truth, **tol):
        hint = (
            "after using row i, eliminate input i: Hinv <- Hinv - Hinv[:, i] Hinv[i, :] / Hinv[i, i]; "
            "keep only the entries right of the diagonal"
        )
        if close(got, torch.triu(Hinv / torch.diag(Hinv).sqrt()[:, None]), **tol):
            hint = "row i must come from the inverse *after* eliminating inputs 0..i-1, not from the original"
        return report(False, "rows differ from the upper Cholesky factor of H^-1", hint)
    return report(True, "the eliminated rows of H^-1 are the rows of its upper Cholesky factor")


# --------------------------------------------------------------------------- GPTQ
def check_gptq(fn) -> bool:
    """``fn(W (out, in), H (in, in), bits) -> Q``: GPTQ in the natural column order with one
    asymmetric grid per output row (``qtutor.quant.rtn.find_params(W, bits, sym=False)``),
    ``H`` already damped, no lazy batches."""
    g = torch.Generator().manual_seed(8)
    X = _correlated_inputs(512, 48, 6, seed=9)
    H = _damped_hessian(X)
    W = torch.randn(24, 48, generator=g)
    bits = 3
    got, err = _call(fn, W.clone(), H.clone(), bits, allow=(find_params,))
    if err:
        return report(False, "gptq", err)
    got = _tensor(got)
    if got is None or got.shape != W.shape:
        return report(
            False, f"gptq returned shape {None if got is None else tuple(got.shape)}", f"expected {tuple(W.shape)}"
        )
    got = got.float()
    ref = gptq(W, H, GPTQConfig(bits=bits, group_size=0, damp=0.0, block_size=W.shape[1], act_order=False)).Q
    scale, zero = find_params(W, bits, sym=False)
    codes = got / scale[:, None] + zero[:, None]
    if (
        float((codes - codes.round()).abs().max()) > 1e-3
        or float(codes.min()) < -1e-3
        or float(codes.max()) > 2**bits - 1 + 1e-3
    ):
        return report(
            False,
            "gptq: some returned weights are not on the row's grid",
            "quantize every column with the grid of find_params(W, bits, sym=False)",
        )

    def loss(Q):
        D = (W - Q).double()
        return float(torch.einsum("ri,ij,rj->", D, H.double(), D)) / 2

    same = float(((got - ref).abs() <= 1e-4 * scale[:, None]).float().mean())
    l_got, l_ref = loss(got), loss(ref)
    rtn = scale[:, None] * (
        torch.clamp(torch.round(W / scale[:, None]) + zero[:, None], 0, 2**bits - 1) - zero[:, None]
    )
    if same < 0.95 or l_got > 1.02 * l_ref:
        hint = "after quantizing column i, spread its error over columns i+1.. with row i of the Cholesky factor"
        if torch.allclose(got, rtn, atol=1e-5):
            hint = "that is round-to-nearest: the error of each column must be compensated by the later ones"
        return report(
            False,
            f"gptq: {same:.0%} of the weights match the reference, output error "
            f"{l_got:.4g} vs {l_ref:.4g} (RTN: {loss(rtn):.4g})",
            hint,
        )
    return report(True, f"GPTQ: output error {l_got:.4g}, round-to-nearest's is {loss(rtn):.4g}")


# --------------------------------------------------------------------------- predictions and experiments
def check_gptq3_prediction(predicted, measured, base) -> bool:
    """ex-ch03-predict-int3: the whole model's perplexity with GPTQ at 3 bits, written down before
    it is measured; a good prediction gets the increase over the float model ``base`` within
    35%."""
    from .ch00 import compare_prediction

    return compare_prediction(predicted, measured, "GPTQ INT3 perplexity", 0.35, reference=base)


def check_layer_sensitivity(result, quantized, model, ids, seqlen, max_tokens) -> bool:
    """ex-ch03-layers: ``result`` maps decoder-layer indices ``i`` to the perplexity of the
    ``quantized`` model with its layer ``i`` put back to ``model``'s float layer. Checks its form
    and measures the first layer of ``result`` again (``quantized`` is left as it was)."""
    from ..eval import perplexity
    from ..models import layout_for
    from .ch00 import remeasured, sweep_table

    layers_q, layers_f = layout_for(quantized).layers(quantized), layout_for(model).layers(model)
    table, hint = sweep_table(result, "layer sensitivity", min_points=min(3, len(layers_q)))
    if table is None:
        return report(False, "layer sensitivity", hint)
    if not all(isinstance(k, int) and 0 <= k < len(layers_q) for k in table):
        return report(
            False, f"layer sensitivity: the keys must be layer indices 0..{len(layers_q) - 1}", "{layer: perplexity}"
        )
    i = min(table)
    kept = layers_q[i]
    layers_q[i] = layers_f[i]
    try:
        truth = perplexity(quantized, ids, seqlen, max_tokens, batch_size=8).ppl
    finally:
        layers_q[i] = kept
    return remeasured("layer sensitivity", i, table[i], truth)
