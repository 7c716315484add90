"""qtutor.claims: each claim's verdict on synthetic results made to make it true and false, the
run's noise, claims a run cannot check, and the benchmark carrying what the claims need."""

import dataclasses
import math

import pytest

from qtutor import claims
from qtutor.claims import Condition

PPL = {
    "fp16_baseline": 14.80,
    "rtn_int8": 14.80,
    "rtn_int4": 15.20,
    "smoothquant_w8a8": 14.81,
    "gptq_int4": 15.10,
    "awq_int4": 15.12,
    "palettization_4bit": 15.12,
    "qlora_nf4": 15.13,
}
BITS = {
    "fp16_baseline": 16.0,
    "rtn_int8": 8.05,
    "rtn_int4": 4.156,
    "smoothquant_w8a8": 8.10,
    "gptq_int4": 4.156,
    "awq_int4": 4.156,
    "palettization_4bit": 4.104,
    "qlora_nf4": 4.127,
}
SECONDS = {m: 1.0 for m in PPL} | {"gptq_int4": 20.0, "awq_int4": 100.0}
LINEARS = {"layers.0.q": 4096, "layers.0.mlp": 8192}


def results(ppl=None, bits=None, seconds=None, errors=None, windows=None, drop=()):
    """Benchmark results as ``run_bench`` returns them: ``ppl``, ``bits``, ``seconds`` update the
    defaults above; ``errors``: {method: relative weight error of every linear}; ``windows``:
    {method: per-window NLLs} (default: 8 equal windows at log(ppl), an interval of one point)."""
    ppl, bits, seconds = PPL | (ppl or {}), BITS | (bits or {}), SECONDS | (seconds or {})
    errors = {"rtn_int4": 0.10, "palettization_4bit": 0.09} | (errors or {})
    methods = {}
    for m in PPL:
        if m in drop:
            continue
        w = (windows or {}).get(m, [math.log(ppl[m])] * 8 if ppl[m] is not None else [])
        methods[m] = {
            "ppl": ppl[m],
            "window_nll": w,
            "bits_per_weight": bits[m],
            "quant_seconds": seconds[m],
            "linears": {k: {"numel": n, "weight_rel_error": errors.get(m, 0.05)} for k, n in LINEARS.items()},
        }
    return {"calib_samples": 8, "settings": {"seed": 0}, "methods": methods}


def verdict(key, res, gaussian=None):
    return claims.get_claim(key).check(res, gaussian)


# --------------------------------------------------------------------------- each claim, true and false
@pytest.mark.parametrize(
    "key, true_case, false_case",
    [
        # comparable: at most 2% above GPTQ and AWQ (better counts too)
        ("palettization_comparable", {"ppl": {"palettization_4bit": 15.35}}, {"ppl": {"palettization_4bit": 15.45}}),
        ("palettization_comparable", {"ppl": {"palettization_4bit": 14.9}}, {"ppl": {"awq_int4": 14.7}}),
        # better: strictly lower perplexity (equal is not better)
        ("smoothquant_better", {"ppl": {"smoothquant_w8a8": 14.79}}, {"ppl": {"smoothquant_w8a8": 14.80}}),
        # best among the methods below 5 bits per weight (an 8-bit method with a lower one does not count)
        ("gptq_best", {}, {"ppl": {"qlora_nf4": 15.0}}),
        ("gptq_best", {"ppl": {"rtn_int8": 14.0}}, {"bits": {"rtn_int8": 4.9}, "ppl": {"rtn_int8": 14.0}}),
        # nearly as good (<= 2% above) and much faster (<= half the time)
        (
            "awq_nearly_as_good",
            {"seconds": {"awq_int4": 10.0}},
            {"seconds": {"awq_int4": 10.0}, "ppl": {"awq_int4": 15.5}},
        ),
        ("awq_nearly_as_good", {"seconds": {"awq_int4": 10.0}}, {"seconds": {"awq_int4": 10.01}}),
        # about 4.127: within 0.01 bits
        ("nf4_bits", {"bits": {"qlora_nf4": 4.1289}}, {"bits": {"qlora_nf4": 4.25}}),
        ("nf4_bits", {"bits": {"qlora_nf4": 4.120}}, {"bits": {"qlora_nf4": 4.0}}),
        # lower weight MSE, pooled over the model's linears
        ("palettization_lower_mse", {}, {"errors": {"palettization_4bit": 0.11}}),
    ],
)
def test_each_claim_true_and_false(key, true_case, false_case):
    yes, no = verdict(key, results(**true_case)), verdict(key, results(**false_case))
    assert yes.holds is True and yes.verdict == "holds", yes.numbers
    assert no.holds is False and no.verdict == "does not hold", no.numbers


def test_the_defaults_give_the_expected_verdicts():
    """The default synthetic run: palettization comparable, SmoothQuant not better (14.81 > 14.80),
    GPTQ best, AWQ nearly as good but 5 times slower, NF4 at 4.127, palettization lower MSE."""
    got = {k.claim.key: k.holds for k in claims.check_all(results())}
    assert got == {
        "palettization_comparable": True,
        "smoothquant_better": False,
        "gptq_best": True,
        "awq_nearly_as_good": False,
        "nf4_bits": True,
        "palettization_lower_mse": True,
    }


def test_palettization_that_calibrates_is_not_comparable_without_calibration(monkeypatch):
    from qtutor.quant import base

    pal = base.REGISTRY["palettization_4bit"]
    monkeypatch.setitem(
        base.REGISTRY, "palettization_4bit", dataclasses.replace(pal, from_float=None, quantize_layer=lambda *a: {})
    )
    check = verdict("palettization_comparable", results())
    assert check.holds is False and "calibration windows palettization_4bit uses = 8" in check.numbers


def test_mse_claim_on_gaussian_weights_too():
    res = results()
    assert verdict("palettization_lower_mse", res, {"palettization_4bit": 0.009, "rtn_int4": 0.010}).holds is True
    check = verdict("palettization_lower_mse", res, {"palettization_4bit": 0.011, "rtn_int4": 0.010})
    assert check.holds is False and "Gaussian" in check.numbers
    # the pooled error weights each linear by its size: the large linear decides
    errors = {"rtn_int4": 0.10, "palettization_4bit": 0.09}
    res = results(errors=errors)
    res["methods"]["palettization_4bit"]["linears"]["layers.0.q"]["weight_rel_error"] = 0.105  # worse on the small one
    assert verdict("palettization_lower_mse", res).holds is True  # 4096 * 0.105^2 + 8192 * 0.09^2 < 12288 * 0.1^2
    res["methods"]["palettization_4bit"]["linears"]["layers.0.q"]["weight_rel_error"] = 0.13
    assert verdict("palettization_lower_mse", res).holds is False


# --------------------------------------------------------------------------- the run's noise
def test_a_verdict_inside_the_noise_says_so():
    """Windows that disagree (palettization better on half, worse on the other): the paired
    interval of the ratio straddles the threshold, so the run cannot decide."""
    base = [2.7] * 8
    noisy = [2.7 + 0.2, 2.7 - 0.19] * 4  # mean 2.7 + 0.0025: ratio just above 1
    res = results(
        ppl={"smoothquant_w8a8": 14.8 * math.exp(0.0025)}, windows={"rtn_int8": base, "smoothquant_w8a8": noisy}
    )
    check = verdict("smoothquant_better", res)
    assert check.holds is False and check.decided is False
    assert check.verdict == "does not hold (within the run's noise)"
    # the same shift on every window: the interval is one point, and decides
    shifted = [v + 0.0025 for v in base]
    res = results(
        ppl={"smoothquant_w8a8": 14.8 * math.exp(0.0025)}, windows={"rtn_int8": base, "smoothquant_w8a8": shifted}
    )
    check = verdict("smoothquant_better", res)
    assert check.verdict == "does not hold" and check.decided is True


def test_condition_decided():
    assert Condition("r", 0.99, 1.0, strict=True, interval=(0.98, 0.995)).decided
    assert not Condition("r", 0.99, 1.0, strict=True, interval=(0.98, 1.0)).decided  # 1.0 is not below 1
    assert Condition("r", 1.03, 1.02, interval=(1.021, 1.05)).decided
    assert not Condition("r", 1.03, 1.02, interval=(1.02, 1.05)).decided  # 1.02 would hold
    assert Condition("r", 1.03, 1.02).decided  # no interval: an exact number
    assert not Condition("r", 1.0, 1.0, strict=True).holds and Condition("r", 1.0, 1.0).holds


def test_a_claim_that_fails_is_decided_by_one_failing_condition():
    res = results(seconds={"awq_int4": 100.0}, ppl={"awq_int4": 15.12})
    res["methods"]["awq_int4"]["window_nll"] = [2.6, 2.9] * 4  # the ppl ratio undecided ...
    check = verdict("awq_nearly_as_good", res)
    assert check.holds is False and check.decided is True  # ... the time alone decides


# --------------------------------------------------------------------------- what a run cannot check
def test_claims_a_run_cannot_check():
    res = results(drop=("awq_int4",))
    check = verdict("awq_nearly_as_good", res)
    assert check.holds is None and check.verdict == "not checked" and "awq_int4" in check.numbers
    assert verdict("gptq_best", results(drop=("rtn_int4", "awq_int4", "palettization_4bit", "qlora_nf4"))).holds is None
    older = results()
    for entry in older["methods"].values():  # a results file written before the linears were recorded
        del entry["linears"], entry["window_nll"]
    assert verdict("palettization_lower_mse", older).holds is None
    assert verdict("smoothquant_better", older).conditions[0].interval is None  # no windows: no interval
    assert verdict("gptq_best", results(ppl={"qlora_nf4": None})).holds is None  # not finite


def test_bad_results_one_line():
    with pytest.raises(claims.QtutorError, match="results"):
        claims.check_all({"model": "x"})
    with pytest.raises(claims.QtutorError, match="no claim"):
        claims.get_claim("nope")


# --------------------------------------------------------------------------- tables and the sentence
def test_tables_and_summary_follow_the_verdicts():
    checks = claims.check_all(results(drop=("qlora_nf4",)))
    table = claims.markdown_table(checks)
    assert table.count("\n") == len(claims.CLAIMS) + 1 and "**not checked**" in table
    assert claims.summary(checks) == (
        "Of the 6 claims, 3 (1, 3, 6) hold on this run and 2 (2, 4) do not; 1 (5) could not be checked. "
        "The run's noise changes none of these verdicts."
    )
    rows = claims.records(checks)
    assert [r["holds"] for r in rows] == [True, False, True, False, None, True]
    assert [r["claim"] for r in claims.criteria_records()] == [c.statement for c in claims.CLAIMS]
    criteria = claims.criteria_table()
    assert "2%" in criteria and "4.127" in criteria and criteria.count("\n") == len(claims.CLAIMS) + 1
    nf4 = claims.markdown_table(claims.check_all(results()))
    assert "\\|bits per weight of qlora_nf4" in nf4  # a pipe inside a cell is escaped


def test_summary_counts():
    checks = claims.check_all(results(drop=("qlora_nf4",)))
    held = [i for i, k in enumerate(checks, 1) if k.holds]
    assert claims.summary(checks).startswith(f"Of the 6 claims, {len(held)} ({', '.join(map(str, held))}) hold")
    assert "could not be checked" in claims.summary(checks)  # NF4's claim


# --------------------------------------------------------------------------- measured numbers
def test_gaussian_weight_errors_are_seeded_and_palettization_wins():
    res = results()
    res["methods"]["rtn_int4"]["config"] = {"bits": 4, "group_size": 128, "sym": False}
    a = claims.gaussian_weight_errors(res, shape=(32, 256))
    assert a == claims.gaussian_weight_errors(res, shape=(32, 256))
    assert set(a) == {"palettization_4bit", "rtn_int4"}
    assert 0 < a["palettization_4bit"] < a["rtn_int4"] < 0.05  # 4-bit errors on N(0, 1) weights: about 1%
    coarse = claims.gaussian_weight_errors(res | {"methods": {"rtn_int4": res["methods"]["rtn_int4"]}}, shape=(32, 256))
    assert set(coarse) == {"rtn_int4"}  # a method the run lacks is left out


def test_the_benchmark_carries_what_the_claims_need(tmp_path):
    """run_bench records the windows' losses, the bootstrap interval and every linear's weight
    error, so that claim 6 and the noise of the others can be checked from its results."""
    from conftest import tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import qtutor.bench

    text = "The quick brown fox jumps over the lazy dog. A small model reads a small text. " * 40
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=128, special_tokens=["<|endoftext|>"]))
    model_dir = tmp_path / "m"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(model_dir)
    tiny_model("qwen2", vocab_size=tok.get_vocab_size()).save_pretrained(model_dir)
    res = qtutor.bench.run_bench(
        qtutor.bench.BenchConfig(
            model=str(model_dir),
            dataset="embedded",
            methods="rtn_int4,palettization_4bit",
            seqlen=32,
            max_eval_tokens=256,
            latency_tokens=2,
            latency_runs=1,
            group_size=32,
            out=str(tmp_path / "run"),
        )
    )
    for entry in res["methods"].values():
        assert len(entry["window_nll"]) == 256 // 32
        low, high = entry["ppl_ci"]
        assert low <= entry["ppl"] <= high
        assert len(entry["linears"]) == 2 * 7 and all(v["weight_rel_error"] > 0 for v in entry["linears"].values())
    check = verdict("palettization_lower_mse", res)
    assert check.holds is not None and "model's linears" in check.numbers
