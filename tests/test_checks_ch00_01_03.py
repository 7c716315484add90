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
