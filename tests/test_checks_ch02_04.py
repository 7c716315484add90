"""The exercise checkers of chapters 2 (SmoothQuant) and 4 (AWQ) accept the chapters'
solutions and reject typical wrong answers (tiny in-memory inputs, no model)."""

import pytest
import torch

from qtutor.checks import ch02, ch04
from qtutor.quant import smoothquant as sq
from qtutor.quant.rtn import RTNConfig, group_layout
from qtutor.quant.rtn import quantize_weight as rtn_quantize_weight


# --------------------------------------------------------------------------- chapter 2
def quantize_per_token(x):
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_per_tensor(x):
    scale = x.abs().amax().clamp(min=1e-5) / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_per_token_128(x):
    scale = x.abs().amax(dim=-1, keepdim=True) / 128
    return torch.round(x / scale).clamp(-128, 127).to(torch.int8), scale


def smooth_up_down(mlp, x_max, alpha=0.5):
    s = sq.smooth_scales(x_max, [mlp.down_proj.weight], alpha)
    mlp.up_proj.weight.div_(s.view(-1, 1))
    mlp.down_proj.weight.mul_(s.view(1, -1))


def smooth_up_down_with_gate(mlp, x_max, alpha=0.5):
    s = sq.smooth_scales(x_max, [mlp.down_proj.weight], alpha)
    mlp.gate_proj.weight.div_(s.view(-1, 1))
    mlp.up_proj.weight.div_(s.view(-1, 1))
    mlp.down_proj.weight.mul_(s.view(1, -1))


def smooth_up_down_columns(mlp, x_max, alpha=0.5):
    s = sq.smooth_scales(x_max, [mlp.down_proj.weight], alpha)
    mlp.up_proj.weight.div_(s.view(-1, 1))
    mlp.down_proj.weight.mul_(s.view(-1, 1)[: mlp.down_proj.weight.shape[0]])


def w8a8_error(x, W):
    qx, sx = quantize_per_token(x)
    qw, sw = sq.quantize_weight_absmax(W)
    return (qx.float() * sx) @ (qw.float() * sw.view(-1, 1)).T


def alpha_search(x, weights, alphas):
    x_max = x.abs().amax(dim=0)
    errors = []
    for alpha in alphas:
        s = sq.smooth_scales(x_max, weights, alpha)
        num = sum((w8a8_error(x / s, W * s) - x @ W.T).pow(2).sum() for W in weights)
        errors.append(float(num / sum((x @ W.T).pow(2).sum() for W in weights)))
    return alphas[errors.index(min(errors))], errors


def alpha_search_undivided(x, weights, alphas):
    x_max = x.abs().amax(dim=0)
    errors = []
    for alpha in alphas:
        s = sq.smooth_scales(x_max, weights, alpha)
        errors.append(float(sum((w8a8_error(x, W * s) - x @ W.T).pow(2).sum() for W in weights)))
    return alphas[errors.index(min(errors))], errors


def alpha_search_last(x, weights, alphas):
    _, errors = alpha_search(x, weights, alphas)
    return alphas[-1] if alphas[errors.index(min(errors))] != alphas[-1] else alphas[0], errors


@pytest.mark.parametrize(
    "checker, right, wrongs",
    [
        (ch02.check_per_token_quant, quantize_per_token, [quantize_per_tensor, quantize_per_token_128]),
        (ch02.check_smooth_up_down, smooth_up_down, [smooth_up_down_with_gate, smooth_up_down_columns]),
        (ch02.check_alpha_search, alpha_search, [alpha_search_undivided, alpha_search_last]),
    ],
)
def test_ch02_checkers(checker, right, wrongs, capsys):
    assert checker(right)
    assert capsys.readouterr().out.startswith("correct")
    for wrong in wrongs:
        assert not checker(wrong)
        assert capsys.readouterr().out.startswith("not yet")


# --------------------------------------------------------------------------- chapter 4
def duo_scales(x_mean, weights, ratio, group_size):
    W = torch.cat(weights).abs()
    Wg = W.reshape(W.shape[0], -1, group_size)
    w_mean = (Wg / (Wg.amax(dim=-1, keepdim=True) + 1e-6)).reshape(W.shape).mean(dim=0)
    s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def duo_scales_per_row(x_mean, weights, ratio, group_size):
    return duo_scales(x_mean, weights, ratio, weights[0].shape[1])


def plain_awq_scales(x_mean, weights, ratio, group_size):
    s = x_mean.pow(ratio).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def clip_thresholds(W, X, group_size, n_grid=20, max_shrink=0.5):
    out_features, in_features = W.shape
    gs, n_groups = group_layout(in_features, group_size)
    Wg = W.reshape(out_features, n_groups, gs)
    Xg = X.reshape(-1, n_groups, gs)
    org_max = Wg.abs().amax(dim=-1, keepdim=True)
    ref = torch.einsum("tgc,ogc->ogt", Xg, Wg)
    best, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(max(1, int(max_shrink * n_grid))):
        m = org_max * (1 - i / n_grid)
        q = (
            rtn_quantize_weight(torch.clamp(Wg, -m, m).reshape(out_features, -1), RTNConfig(bits=4, group_size=gs))
            .dequantize()
            .reshape(Wg.shape)
        )
        err = (torch.einsum("tgc,ogc->ogt", Xg, q) - ref).pow(2).mean(dim=-1, keepdim=True)
        better = err < best_err
        best_err[better], best[better] = err[better], m[better]
    return best.squeeze(-1)


def clip_thresholds_none(W, X, group_size, n_grid=20, max_shrink=0.5):
    gs, n_groups = group_layout(W.shape[1], group_size)
    return W.reshape(W.shape[0], n_groups, gs).abs().amax(dim=-1)


def clip_thresholds_weight_mse(W, X, group_size, n_grid=20, max_shrink=0.5):
    """Minimises the weights' own error: ignores the activations."""
    return clip_thresholds(W, torch.eye(W.shape[1]), group_size, n_grid, max_shrink)


def expand_kv_scales(s_v, num_heads, num_kv_heads):
    head_dim = s_v.numel() // num_kv_heads
    return s_v.view(num_kv_heads, head_dim).repeat_interleave(num_heads // num_kv_heads, dim=0).reshape(-1)


def expand_kv_scales_tiled(s_v, num_heads, num_kv_heads):
    return s_v.repeat(num_heads // num_kv_heads)


def expand_kv_scales_unchanged(s_v, num_heads, num_kv_heads):
    return s_v


@pytest.mark.parametrize(
    "checker, right, wrongs",
    [
        (ch04.check_duo_scales, duo_scales, [duo_scales_per_row, plain_awq_scales]),
        (ch04.check_clip_thresholds, clip_thresholds, [clip_thresholds_none, clip_thresholds_weight_mse]),
        (ch04.check_gqa_scales, expand_kv_scales, [expand_kv_scales_tiled, expand_kv_scales_unchanged]),
    ],
)
def test_ch04_checkers(checker, right, wrongs, capsys):
    assert checker(right)
    assert capsys.readouterr().out.startswith("correct")
    for wrong in wrongs:
        assert not checker(wrong)
        assert capsys.readouterr().out.startswith("not yet")


def test_hints_name_the_mistake(capsys):
    ch02.check_per_token_quant(quantize_per_tensor)
    assert "one per token" in capsys.readouterr().out
    ch02.check_smooth_up_down(smooth_up_down_with_gate)
    assert "leave gate_proj alone" in capsys.readouterr().out
    ch02.check_alpha_search(alpha_search_undivided)
    assert "divide the activations" in capsys.readouterr().out
    ch04.check_duo_scales(duo_scales_per_row)
    assert "of its group" in capsys.readouterr().out
    ch04.check_clip_thresholds(clip_thresholds_weight_mse)
    assert "error of the weights" in capsys.readouterr().out
    ch04.check_gqa_scales(expand_kv_scales_tiled)
    assert "h // (num_heads // num_kv_heads)" in capsys.readouterr().out


def test_checker_survives_a_raising_answer(capsys):
    def broken(*args):
        raise ValueError("oops")

    for checker in (
        ch02.check_per_token_quant,
        ch02.check_smooth_up_down,
        ch02.check_alpha_search,
        ch04.check_duo_scales,
        ch04.check_clip_thresholds,
        ch04.check_gqa_scales,
    ):
        assert not checker(broken)
        assert "raised ValueError" in capsys.readouterr().out


def test_checkers_reject_the_student_stubs(capsys):
    """The student edition's stubs (``...`` bodies, returning None) get a verdict, not a crash."""

    def stub(*args):
        return None

    for checker in (
        ch02.check_per_token_quant,
        ch02.check_smooth_up_down,
        ch02.check_alpha_search,
        ch04.check_duo_scales,
        ch04.check_clip_thresholds,
        ch04.check_gqa_scales,
    ):
        assert not checker(stub)
        assert capsys.readouterr().out.startswith("not yet")


# --------------------------------------------------------------------------- chapter 2: prediction and experiment
def test_ch02_planted_prediction(capsys):
    assert ch02.check_planted_prediction(15.01, 15.0) is True
    assert ch02.check_planted_prediction(16.0, 15.0) is False
    assert ch02.check_planted_prediction(..., 15.0) is False
    assert "no prediction" in capsys.readouterr().out


def test_ch02_alpha_sweep_is_remeasured(capsys):
    import copy

    from conftest import tiny_model

    import qtutor
    from qtutor.eval import perplexity

    torch.manual_seed(0)
    model, ids = tiny_model(), torch.randint(0, 128, (128,))
    calib = torch.randint(0, 128, (2, 32))

    def ppl_at(alpha):
        m = copy.deepcopy(model)
        qtutor.quantize(m, "smoothquant_w8a8", qtutor.SmoothQuantConfig(alpha=alpha), calib=calib)
        return perplexity(m, ids, 64, 128).ppl

    right = {a: ppl_at(a) for a in (0.25, 0.5, 0.75)}
    assert ch02.check_alpha_sweep(right, model, calib, ids, 64, 128) is True
    assert ch02.check_alpha_sweep({**right, 0.25: right[0.25] * 1.05}, model, calib, ids, 64, 128) is False
    assert ch02.check_alpha_sweep({2.0: 1.0, 3.0: 1.0, 4.0: 1.0}, model, calib, ids, 64, 128) is False


# --------------------------------------------------------------------------- chapter 4: predict, then measure
@pytest.mark.parametrize(
    "checker, measured, near, far",
    [(ch04.check_scaling_prediction, 1.9, 2.0, 4.0), (ch04.check_low_bits_prediction, 0.06, 0.08, 0.2)],
)
def test_ch04_prediction_checkers(checker, measured, near, far, capsys):
    assert checker(near, measured)
    assert "you predicted" in capsys.readouterr().out
    assert not checker(far, measured)
    assert not checker(None, measured)  # the stub: no prediction written down yet
    assert "no prediction yet" in capsys.readouterr().out
    assert not checker("two", measured)
    assert not checker(float("nan"), measured)
