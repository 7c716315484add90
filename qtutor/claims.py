"""The claims of the benchmark this book grew from, checked against a run (chapter 8).

Each claim is data (:data:`CLAIMS`): the sentence as the benchmark stated it, the criterion that
decides it, written down before any number is seen (its thresholds are the constants below),
and a function that takes a run's results (what ``qtutor.bench.run_bench`` returns, or
``results.json``) and returns the comparisons it rests on (:class:`Condition`). A claim holds
when every one of its conditions does.

The run also says how sure it is. A perplexity ratio comes with its paired 95% bootstrap
interval over the evaluation windows (``qtutor.eval.ppl.bootstrap_ppl_ratio``): a condition is
*decided* by the run when the whole interval lies on one side of the threshold, and a verdict
whose deciding conditions are not is reported as "within the run's noise". Sizes and counts are
exact; timings are single measurements.

    res = qtutor.bench.run_bench(qtutor.bench.BenchConfig(methods="all"))
    checks = qtutor.claims.check_all(res, gaussian=qtutor.claims.gaussian_weight_errors(res))
    print(qtutor.claims.markdown_table(checks))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import QtutorError

#: "comparable", "nearly as good": a perplexity at most 2% above the other's
PPL_TOLERANCE = 0.02
#: "much faster to apply": at most half the other's quantization time
MUCH_FASTER = 0.5
#: "about 4.127 bits per weight" (QLoRA's 4 + 8/64 + 32/(64 * 256)): within 0.01 bits of it
NF4_BITS, BITS_TOLERANCE = 4.127, 0.01
#: the "4-bit" methods: those storing fewer than 5 bits per weight
FOUR_BIT_BELOW = 5.0
#: the bell-shaped weights of claim 6: a Gaussian matrix of this shape (out, in), seed 0
GAUSSIAN_SHAPE = (128, 512)


@dataclass(frozen=True)
class Condition:
    """One comparison a verdict rests on: ``value`` at most (``strict``: below) ``threshold``.

    ``interval``: the run's 95% bootstrap interval of ``value``, where it has one.
    """

    what: str
    value: float
    threshold: float
    strict: bool = False
    interval: Optional[tuple] = None

    @property
    def holds(self) -> bool:
        return self.value < self.threshold if self.strict else self.value <= self.threshold

    @property
    def decided(self) -> bool:
        """Whether the run's noise cannot change the outcome: the whole interval lies on the
        outcome's side of the threshold (always, for a value without an interval)."""
        if self.interval is None:
            return True
        low, high = self.interval
        if self.holds:
            return high < self.threshold if self.strict else high <= self.threshold
        return low >= self.threshold if self.strict else low > self.threshold

    def __str__(self):
        sign = "<" if self.strict else "≤"
        ci = "" if self.interval is None else f" [95%: {_num(self.interval[0])}, {_num(self.interval[1])}]"
        return f"{self.what} = {_num(self.value)}{ci} (criterion: {sign} {_num(self.threshold)})"


@dataclass
class Check:
    """A claim checked against a run: its conditions, or why it could not be checked."""

    claim: "Claim"
    conditions: list = field(default_factory=list)
    missing: str = ""  # why the run cannot decide it (a method not measured, a number not finite)

    @property
    def holds(self) -> Optional[bool]:
        """True or False; None when the run lacks what the claim needs."""
        if self.missing or not self.conditions:
            return None
        return all(c.holds for c in self.conditions)

    @property
    def decided(self) -> Optional[bool]:
        """Whether the run's noise cannot change the verdict: a claim that holds needs every
        condition decided; one that fails needs one failing condition decided."""
        if self.holds is None:
            return None
        if self.holds:
            return all(c.decided for c in self.conditions)
        return any(c.decided for c in self.conditions if not c.holds)

    @property
    def verdict(self) -> str:
        if self.holds is None:
            return "not checked"
        text = "holds" if self.holds else "does not hold"
        return text if self.decided else f"{text} (within the run's noise)"

    @property
    def numbers(self) -> str:
        return self.missing if self.holds is None else "; ".join(str(c) for c in self.conditions)


@dataclass(frozen=True)
class Claim:
    """A claim: as the benchmark stated it, the criterion fixed before the run, and its check."""

    key: str
    statement: str
    criterion: str
    methods: tuple  # the benchmark methods it needs
    conditions: Callable  # (results, gaussian) -> list[Condition]

    def check(self, results: dict, gaussian: Optional[dict] = None) -> Check:
        """The claim against ``results`` (``run_bench``'s return value or ``results.json``);
        ``gaussian``: :func:`gaussian_weight_errors` where measured (claim 6 uses it)."""
        methods = _methods(results)
        absent = [m for m in self.methods if m not in methods]
        if absent:
            return Check(self, missing=f"not in this run: {', '.join(absent)}")
        try:
            return Check(self, self.conditions(results, gaussian))
        except _Missing as why:
            return Check(self, missing=str(why))


class _Missing(Exception):
    """A number a claim needs is absent or not finite."""


# --------------------------------------------------------------------------- the numbers
def _methods(results: dict) -> dict:
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict):
        raise QtutorError(
            "claims need a benchmark's results: what qtutor.bench.run_bench returns or results.json holds"
        )
    return results["methods"]


def _num(v: float) -> str:
    return f"{v:.5g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


def _number(results: dict, method: str, key: str) -> float:
    v = _methods(results)[method].get(key)
    if v is None or isinstance(v, bool) or not math.isfinite(v):
        raise _Missing(f"{key} of {method} is not a finite number in this run")
    return float(v)


def _seed(results: dict) -> int:
    return int((results.get("settings") or {}).get("seed") or 0)


def ppl_ratio(results: dict, a: str, b: str, threshold: float, strict: bool = False) -> Condition:
    """``ppl(a) / ppl(b)`` with its paired 95% bootstrap interval over the evaluation windows
    (when both methods carry the same number of finite window losses, two or more)."""
    from .eval.ppl import bootstrap_ppl_ratio

    value = _number(results, a, "ppl") / _number(results, b, "ppl")
    wa, wb = (_methods(results)[m].get("window_nll") or [] for m in (a, b))
    interval = None
    if len(wa) == len(wb) >= 2 and all(v is not None and math.isfinite(v) for v in wa + wb):
        interval = bootstrap_ppl_ratio(wa, wb, seed=_seed(results))
    return Condition(f"ppl({a}) / ppl({b})", value, threshold, strict, interval)


def pooled_weight_error(entry: dict) -> float:
    """Squared relative weight error ``||W_hat - W||^2 / ||W||^2`` averaged over a method's decoder
    linears, each weighted by its number of weights (from the entry's ``linears``)."""
    linears = entry.get("linears") or {}
    errors = [(v["numel"], v.get("weight_rel_error")) for v in linears.values()]
    if not errors or any(e is None or not math.isfinite(e) for _, e in errors):
        raise _Missing("the run did not record every linear's weight error (a results file from an older qtutor)")
    return sum(n * e * e for n, e in errors) / sum(n for n, _ in errors)


def gaussian_weight_errors(
    results: dict, methods: tuple = ("palettization_4bit", "rtn_int4"), shape: tuple = GAUSSIAN_SHAPE, seed: int = 0
) -> dict:
    """Each method's squared relative weight error on bell-shaped weights: one Gaussian matrix
    ``W`` (out, in) ~ N(0, 0.02^2), drawn with ``seed``, quantized with the config each method
    had in ``results`` -> {method: ||W_hat - W||^2 / ||W||^2}. Methods that calibrate, or that
    the run lacks, are left out."""
    import torch

    from .quant import get_method

    entries = _methods(results)
    W = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    linear = torch.nn.Linear(shape[1], shape[0], bias=False)
    linear.weight.data = W.clone()
    out = {}
    for name in methods:
        m = get_method(name)
        if name not in entries or m.from_float is None:
            continue
        cfg = m.default_config
        if cfg is not None and entries[name].get("config"):
            cfg = cfg.replace(**entries[name]["config"])
        W_hat = m.from_float(linear, cfg).dequantize().float()
        out[name] = float((W_hat - W).pow(2).sum() / W.pow(2).sum())
    return out


# --------------------------------------------------------------------------- the claims
def _palettization_vs_calibrated(results, gaussian):
    from .quant import get_method

    uses = int(results.get("calib_samples") or 0) if get_method("palettization_4bit").needs_calib else 0
    return [
        Condition("calibration windows palettization_4bit uses", uses, 0),
        ppl_ratio(results, "palettization_4bit", "gptq_int4", 1 + PPL_TOLERANCE),
        ppl_ratio(results, "palettization_4bit", "awq_int4", 1 + PPL_TOLERANCE),
    ]


def _smoothquant_vs_rtn_int8(results, gaussian):
    return [ppl_ratio(results, "smoothquant_w8a8", "rtn_int8", 1.0, strict=True)]


def _gptq_best(results, gaussian):
    from .quant.base import split_head

    methods = _methods(results)
    others = [  # the claim is about the decoder's linears: rows with a quantized lm_head (+head) are left out
        m
        for m, r in methods.items()
        if m != "gptq_int4"
        and not split_head(m)[1]
        and r.get("bits_per_weight") is not None
        and r["bits_per_weight"] < FOUR_BIT_BELOW
    ]
    if not others:
        raise _Missing(f"no other method below {FOUR_BIT_BELOW:g} bits per weight in this run")
    return [ppl_ratio(results, "gptq_int4", m, 1.0, strict=True) for m in others]


def _awq_vs_gptq(results, gaussian):
    return [
        ppl_ratio(results, "awq_int4", "gptq_int4", 1 + PPL_TOLERANCE),
        Condition(
            "quantization time awq_int4 / gptq_int4",
            _number(results, "awq_int4", "quant_seconds") / _number(results, "gptq_int4", "quant_seconds"),
            MUCH_FASTER,
        ),
    ]


def _nf4_bits(results, gaussian):
    bits = _number(results, "qlora_nf4", "bits_per_weight")
    return [
        Condition(f"|bits per weight of qlora_nf4 ({bits:.4f}) - {NF4_BITS}|", abs(bits - NF4_BITS), BITS_TOLERANCE)
    ]


def _palettization_mse(results, gaussian):
    methods = _methods(results)
    conditions = []
    if gaussian and {"palettization_4bit", "rtn_int4"} <= set(gaussian):
        conditions.append(
            Condition(
                "weight MSE palettization_4bit / rtn_int4, Gaussian weights",
                gaussian["palettization_4bit"] / gaussian["rtn_int4"],
                1.0,
                strict=True,
            )
        )
    conditions.append(
        Condition(
            "weight MSE palettization_4bit / rtn_int4, the model's linears",
            pooled_weight_error(methods["palettization_4bit"]) / pooled_weight_error(methods["rtn_int4"]),
            1.0,
            strict=True,
        )
    )
    return conditions


_RATIO = "the ratio's paired 95% bootstrap interval says whether the run's noise could change that"

#: the claims, in the order the page shows them
CLAIMS = (
    Claim(
        "palettization_comparable",
        "Palettization is comparable to GPTQ/AWQ without calibration.",
        f"palettization_4bit uses no calibration windows, and its perplexity is at most "
        f"{PPL_TOLERANCE:.0%} above gptq_int4's and at most {PPL_TOLERANCE:.0%} above awq_int4's "
        f"(ratio ≤ {1 + PPL_TOLERANCE:g}); {_RATIO}.",
        ("palettization_4bit", "gptq_int4", "awq_int4"),
        _palettization_vs_calibrated,
    ),
    Claim(
        "smoothquant_better",
        "SmoothQuant is better than RTN INT8.",
        f"smoothquant_w8a8's perplexity is below rtn_int8's (ratio < 1); {_RATIO}.",
        ("smoothquant_w8a8", "rtn_int8"),
        _smoothquant_vs_rtn_int8,
    ),
    Claim(
        "gptq_best",
        "GPTQ gives the best perplexity.",
        f"among the methods storing fewer than {FOUR_BIT_BELOW:g} bits per weight, gptq_int4's "
        f"perplexity is below every other's (each ratio < 1); {_RATIO}.",
        ("gptq_int4",),
        _gptq_best,
    ),
    Claim(
        "awq_nearly_as_good",
        "AWQ is nearly as good as GPTQ and much faster to apply.",
        f"awq_int4's perplexity is at most {PPL_TOLERANCE:.0%} above gptq_int4's (ratio ≤ "
        f"{1 + PPL_TOLERANCE:g}), and quantizing with it takes at most {MUCH_FASTER:.0%} of "
        f"GPTQ's time (one timing each, on this machine); {_RATIO}.",
        ("awq_int4", "gptq_int4"),
        _awq_vs_gptq,
    ),
    Claim(
        "nf4_bits",
        "NF4 stores about 4.127 bits per weight.",
        f"qlora_nf4's stored bits per weight (codes, absmax and second-level constants, counted "
        f"from the bytes the layers hold) are within {BITS_TOLERANCE:g} of {NF4_BITS}.",
        ("qlora_nf4",),
        _nf4_bits,
    ),
    Claim(
        "palettization_lower_mse",
        "Palettization has lower weight MSE than INT4 on bell-shaped weights.",
        f"the squared relative weight error ||Ŵ − W||² / ||W||² of palettization_4bit is below "
        f"rtn_int4's (ratio < 1), each with the run's config, on a Gaussian matrix of "
        f"{GAUSSIAN_SHAPE[0]} × {GAUSSIAN_SHAPE[1]} (where measured) and pooled over the model's "
        f"decoder linears (weighted by size).",
        ("palettization_4bit", "rtn_int4"),
        _palettization_mse,
    ),
)


def get_claim(key: str) -> Claim:
    for c in CLAIMS:
        if c.key == key:
            return c
    raise QtutorError(f"no claim {key!r}; the claims are {', '.join(c.key for c in CLAIMS)}")


def check_all(results: dict, gaussian: Optional[dict] = None) -> list[Check]:
    """Every claim of :data:`CLAIMS` checked against ``results``."""
    _methods(results)
    return [c.check(results, gaussian) for c in CLAIMS]


# --------------------------------------------------------------------------- tables and sentences
def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def criteria_table() -> str:
    """The claims and their criteria as a Markdown table (no numbers: they come after)."""
    rows = ["| # | claim | criterion |", "|---|---|---|"]
    rows += [f"| {i} | {_cell(c.statement)} | {_cell(c.criterion)} |" for i, c in enumerate(CLAIMS, 1)]
    return "\n".join(rows)


def criteria_records() -> list[dict]:
    """The claims and their criteria as records, e.g. for ``pandas.DataFrame``."""
    return [{"claim": c.statement, "criterion": c.criterion} for c in CLAIMS]


def markdown_table(checks: list) -> str:
    """The checked claims as a Markdown table: claim, the run's numbers, verdict."""
    rows = ["| # | claim | the run's numbers | verdict |", "|---|---|---|---|"]
    rows += [
        f"| {i} | {_cell(k.claim.statement)} | {_cell(k.numbers)} | **{_cell(k.verdict)}** |"
        for i, k in enumerate(checks, 1)
    ]
    return "\n".join(rows)


def records(checks: list) -> list[dict]:
    """The checked claims as records (one dict per claim), e.g. for ``pandas.DataFrame``."""
    return [
        {
            "claim": k.claim.statement,
            "criterion": k.claim.criterion,
            "numbers": k.numbers,
            "holds": k.holds,
            "decided": k.decided,
            "verdict": k.verdict,
        }
        for k in checks
    ]


def summary(checks: list) -> str:
    """One sentence on the whole set, from the verdicts."""
    n = len(checks)
    held = [i for i, k in enumerate(checks, 1) if k.holds is True]
    failed = [i for i, k in enumerate(checks, 1) if k.holds is False]
    unchecked = [i for i, k in enumerate(checks, 1) if k.holds is None]
    noisy = [i for i, k in enumerate(checks, 1) if k.decided is False]

    def which(ids):
        return f"{len(ids)} ({', '.join(map(str, ids))})" if ids else "none"

    text = (
        f"Of the {n} claims, {which(held)} {'holds' if len(held) == 1 else 'hold'} on this run and "
        f"{which(failed)} {'does' if len(failed) == 1 else 'do'} not"
    )
    text += f"; {which(unchecked)} could not be checked" if unchecked else ""
    text += (
        f". The run's noise could change the verdict of {which(noisy)}: more evaluation windows would decide"
        if noisy
        else ". The run's noise changes none of these verdicts"
    )
    return text + "."
