"""Checkers for the exercises of chapter 0, "Setting the stage".

``from qtutor.checks import ch00`` then e.g. ``ch00.check_perplexity_from_logits(my_fn)``.
Each checker prints one line and returns True when the answer is right.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import report


def _call(fn, *args):
    """(result, None) or (None, a one-line description of the exception ``fn`` raised)."""
    try:
        return fn(*args), None
    except Exception as err:  # the student's code: report, never crash the notebook
        return None, f"raised {type(err).__name__}: {err}"


def _as_float(x):
    try:
        return float(torch.as_tensor(x).reshape(()))
    except Exception:
        return None


# --------------------------------------------------------------------------- number formats
def _fp16_spacing(x: float) -> float:
    """Reference: distance from the fp16 number at ``|x|`` to the next one up (normal numbers
    have 10 fraction bits, so the spacing is ``2^(e - 10)`` in the binade ``[2^e, 2^(e+1))``;
    below ``2^-14`` the subnormals are evenly spaced by ``2^-24``)."""
    a = abs(float(x))
    if a < 2.0**-14:
        return 2.0**-24
    return 2.0 ** (math.floor(math.log2(a)) - 10)


def check_fp16_spacing(fn) -> bool:
    """``fn(x) -> float``: the gap between neighbouring fp16 numbers around ``x``."""
    xs = [1.0, 1.5, 0.1, 3.0, -0.02, 700.0, 40000.0, 0.3, 1e-6]
    for x in xs:
        got, err = _call(fn, x)
        if err:
            return report(False, f"fp16_spacing({x})", err)
        got = _as_float(got)
        h = torch.tensor(abs(x), dtype=torch.float16)
        truth = float(torch.nextafter(h, torch.tensor(math.inf, dtype=torch.float16)) - h)
        if got is None or not math.isclose(got, truth, rel_tol=1e-6):
            hint = "fp16 has 10 fraction bits: within [2^e, 2^(e+1)) neighbours are 2^(e-10) apart"
            if x == 1e-6:
                hint = "below 2^-14 fp16 numbers are subnormal, evenly spaced by 2^-24"
            return report(False, f"fp16_spacing({x}) = {got}, expected {truth:g}", hint)
    return report(True, f"fp16 spacing at {len(xs)} points, subnormals included")


# --------------------------------------------------------------------------- perplexity
def _perplexity_from_logits(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Reference: windows (B, T) with logits (B, T, V); position t predicts token t+1; the first
    token of each window is never predicted."""
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1), reduction="mean"
    )
    return math.exp(float(nll))


def check_perplexity_from_logits(fn) -> bool:
    """``fn(logits (B, T, V), ids (B, T)) -> float``: perplexity over all windows."""
    g = torch.Generator().manual_seed(0)
    cases = [(3, 17, 11), (1, 40, 7), (4, 9, 50)]
    for B, T, V in cases:
        logits = 3 * torch.randn(B, T, V, generator=g)
        ids = torch.randint(0, V, (B, T), generator=g)
        got, err = _call(fn, logits.clone(), ids.clone())
        if err:
            return report(False, "perplexity_from_logits", err)
        got, truth = _as_float(got), _perplexity_from_logits(logits, ids)
        if got is None or not math.isclose(got, truth, rel_tol=1e-4):
            shifted = math.exp(float(F.cross_entropy(logits.reshape(-1, V), ids.reshape(-1))))
            hint = "the logits at position t predict the token at t+1"
            if got is not None and math.isclose(got, shifted, rel_tol=1e-4):
                hint = "the logits at position t are a prediction of token t+1, not of token t"
            elif got is not None and math.isclose(got, math.log(truth), rel_tol=1e-4):
                hint = "that is the mean NLL; the perplexity is its exponential"
            return report(False, f"perplexity {got} for B={B}, T={T}, V={V}, expected {truth:.6g}", hint)
    V = 37
    got, err = _call(fn, torch.zeros(2, 10, V), torch.randint(0, V, (2, 10), generator=g))
    if err or not math.isclose(_as_float(got) or 0.0, V, rel_tol=1e-4):
        return report(False, f"uniform logits over {V} tokens gave {got}", err or f"expected {V}")
    return report(True, "perplexity from logits (random logits, and uniform logits give the vocabulary size)")


# --------------------------------------------------------------------------- protocol
def _scored_tokens(n_tokens: int, seqlen: int) -> tuple[int, int]:
    """Reference: (windows, scored tokens) of the non-overlapping protocol."""
    n = n_tokens // seqlen
    return n, n * (seqlen - 1)


def check_scored_tokens(fn) -> bool:
    """``fn(n_tokens, seqlen) -> (windows, scored tokens)``."""
    for n_tokens, seqlen in [(10_000, 512), (2048, 2048), (299_078, 2048), (1000, 7)]:
        got, err = _call(fn, n_tokens, seqlen)
        if err:
            return report(False, f"scored_tokens({n_tokens}, {seqlen})", err)
        truth = _scored_tokens(n_tokens, seqlen)
        try:
            got = tuple(int(v) for v in got)
        except Exception:
            return report(
                False, f"scored_tokens({n_tokens}, {seqlen}) returned {got!r}", "return a pair (windows, scored tokens)"
            )
        if got != truth:
            hint = "the remainder after the last full window is dropped"
            if got[0] == truth[0] and got[1] == truth[0] * seqlen:
                hint = "the first token of each window has nothing to condition on and is not scored"
            return report(False, f"scored_tokens({n_tokens}, {seqlen}) = {got}, expected {truth}", hint)
    return report(True, "windows and scored tokens")


# --------------------------------------------------------------------------- memory
def _model_bytes(n_linear: int, n_other: int, bits: int, group_size: int) -> float:
    """Reference: ``n_linear`` weights at ``bits`` with a 16-bit scale and a ``bits``-bit zero
    point per group of ``group_size``, plus ``n_other`` parameters in fp16."""
    return n_linear * (bits + (16 + bits) / group_size) / 8 + 2 * n_other


def check_model_bytes(fn) -> bool:
    """``fn(n_linear, n_other, bits, group_size) -> bytes``."""
    cases = [
        (1_000_000, 0, 4, 128),
        (1_000_000, 0, 4, 32),
        (357_826_560, 136_134_656, 4, 128),
        (4_718_592, 1_049_856, 8, 64),
        (2_000_000, 500_000, 3, 128),
    ]
    for args in cases:
        got, err = _call(fn, *args)
        if err:
            return report(False, f"model_bytes{args}", err)
        got, truth = _as_float(got), _model_bytes(*args)
        if got is None or not math.isclose(got, truth, rel_tol=1e-6):
            n_linear, n_other, bits, gs = args
            hint = "count the codes, one fp16 scale and one zero point per group, and fp16 for the rest"
            if got is not None and math.isclose(got, n_linear * bits / 8 + 2 * n_other, rel_tol=1e-6):
                hint = "each group of weights also stores a 16-bit scale and a b-bit zero point"
            elif got is not None and math.isclose(got * 8, truth, rel_tol=1e-6):
                hint = "that is in bits; divide by 8 for bytes"
            return report(False, f"model_bytes{args} = {got}, expected {truth:.6g}", hint)
    return report(True, "bytes of a quantized model, side information included")


# --------------------------------------------------------------------------- predictions and experiments
# Predict-then-measure exercises: the reader writes a number down *before* a cell measures it;
# the comparison is computed here. Whole-model experiments: the reader measures a whole
# model at several values of one knob; the checker re-measures one point independently.
def _number(x):
    """``x`` as a finite float, or None (a stub's ``...`` or None, text, NaN)."""
    if x is None or x is Ellipsis or isinstance(x, (str, bytes)):
        return None
    v = _as_float(x)
    return v if v is not None and math.isfinite(v) else None


def compare_prediction(predicted, measured, what: str, tol: float, reference=None) -> bool:
    """Compare a number written down before a run with what the run measured, and print both.

    Without ``reference`` the error is ``(predicted - measured) / |measured|``. With it the
    prediction is of the change from ``reference`` (e.g. the float model's perplexity) and the
    error is relative to the measured change: predicting "no change" is 100% off. The
    prediction passes when ``|error| <= tol``.
    """
    p, m = _number(predicted), _number(measured)
    if m is None:
        return report(False, f"{what}: the measurement {measured!r} is not a number", "run the measuring cell first")
    if p is None:
        return report(
            False,
            f"{what}: no prediction (got {predicted!r})",
            "write your prediction down as a number before running the measurement",
        )
    if reference is None:
        err, of = (p - m) / abs(m), "value"
    else:
        r = _number(reference)
        if r is None:
            return report(False, f"{what}: the reference {reference!r} is not a number", "pass the baseline measured")
        dp, dm = p - r, m - r
        err = (dp - dm) / abs(dm) if dm != 0 else (0.0 if dp == 0 else math.inf)
        of = f"change from {r:.4g}"
    ok = abs(err) <= tol
    return report(
        ok,
        f"{what}: predicted {p:.4g}, measured {m:.4g}, off by {err:+.1%} of the measured {of} "
        f"(a good prediction is within {tol:.0%})",
        "compare your reasoning with the solution: which assumption did the run contradict?",
    )


def sweep_table(result, what: str, min_points: int = 3):
    """``(dict, None)`` when ``result`` maps at least ``min_points`` knob values to finite positive
    perplexities, else ``(None, a hint)``."""
    if not isinstance(result, dict):
        return None, f"{what}: return a dict {{knob value: perplexity}}, got {type(result).__name__}"
    if len(result) < min_points:
        return None, f"{what}: measure at least {min_points} values of the knob, got {len(result)}"
    table = {}
    for k, v in result.items():
        v = _number(getattr(v, "ppl", v))
        if v is None or v <= 0:
            return None, f"{what}: the value for {k!r} is not a positive perplexity"
        table[k] = v
    return table, None


def remeasured(what: str, knob, got: float, truth: float, rtol: float = 2e-3) -> bool:
    """Verdict on one point of a reader's sweep that the checker measured again."""
    ok = math.isclose(got, truth, rel_tol=rtol)
    return report(
        ok,
        f"{what}: at {knob!r} you measured {got:.4f}, an independent run gives {truth:.4f}",
        "use the chapter's protocol: qtutor.eval.perplexity on the evaluation ids with the same "
        "window length and token budget, on a fresh copy of the model",
    )


def check_memory_prediction(predicted, measured) -> bool:
    """ex-ch00-predict-memory: how many times smaller than fp16 the whole model gets with its
    decoder linears in RTN INT4, written down before it is measured; a good prediction is within
    3%."""
    return compare_prediction(predicted, measured, "compression of the whole model", 0.03)


def check_window_sweep(result, model, ids, max_tokens) -> bool:
    """ex-ch00-window-sweep: ``result`` maps window lengths ``L`` to the perplexity of ``model``
    on ``ids`` in non-overlapping windows of ``L`` tokens, at most ``max_tokens`` tokens each.
    Checks its form and measures the shortest window again."""
    from ..eval import perplexity

    table, hint = sweep_table(result, "window sweep")
    if table is None:
        return report(False, "window sweep", hint)
    if not all(isinstance(k, int) and k >= 2 for k in table):
        return report(False, "window sweep: the keys must be window lengths (ints >= 2)", "{L: perplexity}")
    L = min(table)
    truth = perplexity(model, ids, L, max_tokens, batch_size=8).ppl
    return remeasured("window sweep", L, table[L], truth)
