"""Checkers for the exercises of chapter 0, "Setting the stage".

``from qtutor.checks import ch00`` then e.g. ``ch00.check_perplexity_from_logits(my_fn)``.
Each checker prints one line and returns True when the answer is right.
"""

from __future__ import annotations

import math

import torch

from . import call, report


def _call(fn, *args, **guard):
    """(result, None) or (None, a one-line reason): ``fn`` raised, returned None, or called into
    ``qtutor`` (see :func:`qtutor.checks.call`; ``guard``: its ``allow``, ``forbid``, ``none_ok``)."""
    return call(fn, *args, **guard)


def _as_float(x):
    try:
        return float(torch.as_tensor(x).reshape(()))
    except Exception:
        return None


# --------------------------------------------------------------------------- number formats
def check_fp16_spacing(fn) -> bool:
    """``fn(x) -> float``: the gap between neighbouring fp16 numbers around ``x``."""
    xs = [1.0, 1.5, 0.1, 3.0, -0.02, 700.0, 40000.0, 0.3, 1e-6]
    for x in xs:
        got, err = _call(fn, x, forbid=("nextafter",))  # the exercise: the formula, not nextafter
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
def check_perplexity_from_logits(fn) -> bool:
    """``fn(logits (B, T, V), ids (B, T)) -> float``: perplexity over all windows.

    The logits are built from known next-token probabilities ``P`` (``logits = log P + c``, a
    shift ``c`` per position that a softmax ignores), so the answer is known by construction:
    ``exp(-mean log P[b, t, ids[b, t+1]])`` over the ``B (T - 1)`` predicted tokens."""
    g = torch.Generator().manual_seed(0)
    cases = [(3, 17, 11), (1, 40, 7), (4, 9, 50)]
    for B, T, V in cases:
        P = torch.softmax(3 * torch.randn(B, T, V, generator=g, dtype=torch.float64), dim=-1)
        logits = (P.log() + 5 * torch.randn(B, T, 1, generator=g, dtype=torch.float64)).float()
        ids = torch.randint(0, V, (B, T), generator=g)
        got, err = _call(fn, logits.clone(), ids.clone())
        if err:
            return report(False, "perplexity_from_logits", err)
        p_next = P[:, :-1].gather(-1, ids[:, 1:, None])  # probability given to the token that follows
        got, truth = _as_float(got), math.exp(-float(p_next.log().mean()))
        if got is None or not math.isclose(got, truth, rel_tol=1e-4):
            p_same = P.gather(-1, ids[..., None])  # the token at the same position: no shift
            hint = "the logits at position t predict the token at t+1"
            if got is not None and math.isclose(got, math.exp(-float(p_same.log().mean())), rel_tol=1e-4):
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
# (n_tokens, seqlen) -> (windows, scored tokens), worked out by hand
_SCORED = {
    (10_000, 512): (19, 9709),
    (2048, 2048): (1, 2047),
    (299_078, 2048): (146, 298_862),
    (1000, 7): (142, 852),
    (4095, 4096): (0, 0),
}


def check_scored_tokens(fn) -> bool:
    """``fn(n_tokens, seqlen) -> (windows, scored tokens)``."""
    for (n_tokens, seqlen), truth in _SCORED.items():
        got, err = _call(fn, n_tokens, seqlen)
        if err:
            return report(False, f"scored_tokens({n_tokens}, {seqlen})", err)
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
    return report(True, f"windows and scored tokens ({len(_SCORED)} cases, a text shorter than a window included)")


# --------------------------------------------------------------------------- memory
def check_model_bytes(fn) -> bool:
    """``fn(n_linear, n_other, bits, group_size) -> bytes``."""
    cases = {  # (n_linear, n_other, bits, group_size) -> bytes, worked out by hand
        (1_000_000, 0, 4, 128): 519_531.25,
        (1_000_000, 0, 4, 32): 578_125.0,
        (357_826_560, 136_134_656, 4, 128): 458_171_392.0,
        (4_718_592, 1_049_856, 8, 64): 7_039_488.0,
        (2_000_000, 500_000, 3, 128): 1_787_109.375,
    }
    for args, truth in cases.items():
        got, err = _call(fn, *args)
        if err:
            return report(False, f"model_bytes{args}", err)
        got = _as_float(got)
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
