"""The exercise checkers of chapters 0, 1 and 3 accept the reference answers (the code of the
chapters' solutions) and reject typical wrong ones, with a hint."""

import math

import pytest
import torch
import torch.nn.functional as F

from qtutor.checks import ch00, ch01, ch03
from qtutor.quant.rtn import find_params


# --------------------------------------------------------------------------- chapter 0
def fp16_spacing(x):
    a = abs(x)
    if a < 2.0**-14:  # subnormal range: evenly spaced
        return 2.0**-24
    return 2.0 ** (math.floor(math.log2(a)) - 10)


def perplexity_from_logits(logits, ids):
    V = logits.shape[-1]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    return math.exp(nll.item())


def perplexity_no_shift(logits, ids):
    V = logits.shape[-1]
    return math.exp(F.cross_entropy(logits.reshape(-1, V), ids.reshape(-1)).item())


def model_bytes(n_linear, n_other, bits, group_size):
    return n_linear * (bits + (16 + bits) / group_size) / 8 + 2 * n_other


CH00 = [
    (
        ch00.check_fp16_spacing,
        fp16_spacing,
        lambda x: 2.0 ** (math.floor(math.log2(abs(x))) - 23),
    ),  # fp32's 23 fraction bits
    (
        ch00.check_fp16_spacing,
        fp16_spacing,
        lambda x: 2.0 ** (math.floor(math.log2(abs(x))) - 10),
    ),  # forgets subnormals
    (ch00.check_perplexity_from_logits, perplexity_from_logits, perplexity_no_shift),
    (
        ch00.check_perplexity_from_logits,
        perplexity_from_logits,
        lambda lg, ids: math.log(perplexity_from_logits(lg, ids)),
    ),  # the NLL, not its exp
    (ch00.check_scored_tokens, lambda n, L: (n // L, n // L * (L - 1)), lambda n, L: (n // L, n // L * L)),
    (ch00.check_model_bytes, model_bytes, lambda n_lin, n_oth, b, g: n_lin * b / 8 + 2 * n_oth),
]


# --------------------------------------------------------------------------- chapter 1
def scale_zero(w, bits):
    lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
    s = (hi - lo) / (2**bits - 1)
    return s, round(-lo / s)


def scale_zero_no_zero_in_range(w, bits):
    s = (w.max() - w.min()).item() / (2**bits - 1)
    return s, round(-w.min().item() / s)


def rtn_symmetric(W, bits):
    s = W.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
    return s * torch.round(W / s)


def bits_per_weight(bits, group_size, in_features, sym):
    g = in_features if group_size == 0 else group_size
    return bits + (16 + (0 if sym else bits)) / g


def pack4(codes):
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


CH01 = [
    (ch01.check_scale_zero, scale_zero, scale_zero_no_zero_in_range),
    (ch01.check_scale_zero, scale_zero, lambda w, b: (scale_zero(w, b)[0] * (2**b - 1) / 2**b, scale_zero(w, b)[1])),
    (
        ch01.check_rtn_symmetric,
        rtn_symmetric,
        lambda W, b: (s := W.abs().amax(1, keepdim=True) / 2 ** (b - 1)) * torch.round(W / s),
    ),
    (
        ch01.check_rtn_symmetric,
        rtn_symmetric,
        lambda W, b: (s := W.abs().amax(1, keepdim=True) / (2 ** (b - 1) - 1)) * torch.trunc(W / s),
    ),
    (
        ch01.check_bits_per_weight,
        bits_per_weight,
        lambda b, g, n, sym: b + 16 / (n if g == 0 else g),
    ),  # forgets the zero points
    (ch01.check_pack4, pack4, lambda c: (c[:, 1::2] | (c[:, 0::2] << 4)).to(torch.uint8)),
]


# --------------------------------------------------------------------------- chapter 3
def hessian(X):
    return 2 * X.T @ X / X.shape[0]


def obs_update(w, Hinv, i, q):
    return -(w[i] - q) / Hinv[i, i] * Hinv[:, i]


def cholesky_rows(Hinv):
    Hinv, R = Hinv.clone(), torch.zeros_like(Hinv)
    for i in range(Hinv.shape[0]):
        R[i, i:] = Hinv[i, i:] / Hinv[i, i].sqrt()
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return R


def gptq_columns(W, H, bits):
    W = W.clone()
    scale, zero = find_params(W, bits, sym=False)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        Q[:, i] = scale * (torch.clamp(torch.round(W[:, i] / scale) + zero, 0, 2**bits - 1) - zero)
        W[:, i:] -= torch.outer((W[:, i] - Q[:, i]) / U[i, i], U[i, i:])
    return Q


def rtn_columns(W, H, bits):
    scale, zero = find_params(W, bits, sym=False)
    s, z = scale[:, None], zero[:, None]
    return s * (torch.clamp(torch.round(W / s) + z, 0, 2**bits - 1) - z)


CH03 = [
    (ch03.check_hessian, hessian, lambda X: X.T @ X / X.shape[0]),
    (ch03.check_hessian, hessian, lambda X: 2 * X.T @ X),
    (ch03.check_obs_update, obs_update, lambda w, Hi, i, q: (w[i] - q) / Hi[i, i] * Hi[:, i]),
    (ch03.check_obs_update, obs_update, lambda w, Hi, i, q: -(w[i] - q) * Hi[:, i]),
    (ch03.check_cholesky_rows, cholesky_rows, lambda Hi: torch.triu(Hi / torch.diag(Hi).sqrt()[:, None])),
    (ch03.check_gptq, gptq_columns, rtn_columns),
]


def _cases():
    seen = {}
    for check, right, wrong in CH00 + CH01 + CH03:
        k = seen[check.__name__] = seen.get(check.__name__, 0) + 1
        yield pytest.param(check, right, wrong, id=f"{check.__name__}-wrong{k}")


@pytest.mark.parametrize("check,right,wrong", list(_cases()))
def test_checker_accepts_right_and_rejects_wrong(check, right, wrong, capsys):
    assert check(right) is True
    assert capsys.readouterr().out.startswith("correct: ")
    assert check(wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("not yet: ") and " -- " in out  # a verdict and a hint


@pytest.mark.parametrize(
    "check", sorted({c for c, _, _ in CH00 + CH01 + CH03}, key=lambda c: c.__name__), ids=lambda c: c.__name__
)
def test_checker_survives_unfinished_answers(check, capsys):
    """The student's stub returns None or raises: the checker says so instead of crashing."""

    def unfinished(*args):
        raise NotImplementedError("your code here")

    assert check(unfinished) is False
    assert check(lambda *args: None) is False
    assert "not yet" in capsys.readouterr().out


def test_float32_and_float64_answers_are_both_accepted(capsys):
    assert ch03.check_cholesky_rows(lambda Hi: cholesky_rows(Hi.float()))
    assert ch03.check_obs_update(lambda w, Hi, i, q: obs_update(w.float(), Hi.float(), i, q))
    assert ch01.check_rtn_symmetric(lambda W, b: rtn_symmetric(W.double(), b))


# --------------------------------------------------------------------------- predictions and experiments
def test_prediction_is_compared_not_typed(capsys):
    assert ch00.compare_prediction(10.4, 10.0, "x", 0.05) is True
    assert "predicted 10.4, measured 10, off by +4.0%" in capsys.readouterr().out
    assert ch00.compare_prediction(11.0, 10.0, "x", 0.05) is False
    # a prediction of a change: "no change" is 100% off
    assert ch00.compare_prediction(10.0, 12.0, "x", 0.4, reference=10.0) is False
    assert "-100.0%" in capsys.readouterr().out
    assert ch00.compare_prediction(12.5, 12.0, "x", 0.4, reference=10.0) is True
    # a stub's answer is a missing prediction, not a crash
    for stub in (None, ..., "20", float("nan")):
        assert ch00.compare_prediction(stub, 10.0, "x", 0.05) is False
    assert "no prediction" in capsys.readouterr().out


def test_chapter_prediction_checkers_use_their_tolerances(capsys):
    assert ch00.check_memory_prediction(2.55, 2.53) and not ch00.check_memory_prediction(3.85, 2.53)
    assert ch01.check_int3_prediction(16.7, 16.5, 14.8) and not ch01.check_int3_prediction(15.2, 16.5, 14.8)
    assert ch03.check_gptq3_prediction(15.95, 16.0, 14.8) and not ch03.check_gptq3_prediction(16.8, 16.0, 14.8)


@pytest.fixture(scope="module")
def small_lm():
    from conftest import tiny_model

    torch.manual_seed(0)
    return tiny_model(), torch.randint(0, 128, (4 * 64,))


def test_window_sweep_is_remeasured(small_lm, capsys):
    from qtutor.eval import perplexity

    model, ids = small_lm
    right = {L: perplexity(model, ids, L, 128).ppl for L in (8, 16, 32)}
    assert ch00.check_window_sweep(right, model, ids, 128) is True
    assert ch00.check_window_sweep({**right, 8: right[8] * 1.1}, model, ids, 128) is False
    assert ch00.check_window_sweep({8: right[8]}, model, ids, 128) is False  # one point is no sweep
    assert ch00.check_window_sweep(None, model, ids, 128) is False
    assert capsys.readouterr().out.count("not yet") == 3


def test_group_sweep_is_remeasured(small_lm, capsys):
    import copy

    import qtutor
    from qtutor.eval import perplexity

    model, ids = small_lm

    def ppl_at(g):
        m = copy.deepcopy(model)
        qtutor.quantize(m, "rtn_int4", qtutor.RTNConfig(bits=4, group_size=g))
        return perplexity(m, ids, 64, 128).ppl

    right = {g: ppl_at(g) for g in (16, 32, 0)}
    assert ch01.check_group_sweep(right, model, ids, 64, 128) is True
    assert ch01.check_group_sweep({**right, 0: right[0] * 1.05}, model, ids, 64, 128) is False
    assert ch01.check_group_sweep({"a": 1.0, "b": 2.0, "c": 3.0}, model, ids, 64, 128) is False


def test_layer_sensitivity_is_remeasured_and_leaves_the_model(small_lm, capsys):
    import copy

    import qtutor
    from qtutor.eval import perplexity

    model, ids = small_lm
    quantized = copy.deepcopy(model)
    qtutor.quantize(quantized, "rtn_int4", qtutor.RTNConfig(bits=2, group_size=16))
    before = perplexity(quantized, ids, 64, 128).ppl
    layers = quantized.model.layers
    right = {}
    for i in range(len(layers)):
        kept, layers[i] = layers[i], model.model.layers[i]
        right[i] = perplexity(quantized, ids, 64, 128).ppl
        layers[i] = kept
    assert ch03.check_layer_sensitivity(right, quantized, model, ids, 64, 128) is True
    assert perplexity(quantized, ids, 64, 128).ppl == before  # the quantized layer is back
    assert ch03.check_layer_sensitivity({0: right[0] * 1.05, 1: right[1]}, quantized, model, ids, 64, 128) is False
    assert ch03.check_layer_sensitivity({0: right[0], 7: 1.0}, quantized, model, ids, 64, 128) is False
