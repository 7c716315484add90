"""Every exercise checker rejects the unanswered stub with a clear message, and rejects the
shortcut of wrapping a ``qtutor`` function (or a torch function) that answers the exercise;
no reference answer is left importable from ``qtutor.checks``."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from qtutor.checks import call, ch00, ch01, ch02, ch03, ch04, ch05, ch06, ch07
from qtutor.data import eval_windows
from qtutor.quant import awq, pack_codes
from qtutor.quant import gptq as qgptq
from qtutor.quant import nf4 as qnf4
from qtutor.quant import smoothquant as sq
from qtutor.quant.palettize import LUTWeight, PalettizeConfig, PalettizedLinear, kmeans_1d, kmeans_lut
from qtutor.quant.rtn import RTNConfig, UniformLinear, find_params, quantize_weight
from qtutor.quant.transforms import scale_linear_to_linears

# every checker the chapters call today (27 exercises)
CHECKERS = [
    ch00.check_fp16_spacing,
    ch00.check_perplexity_from_logits,
    ch00.check_scored_tokens,
    ch00.check_model_bytes,
    ch01.check_scale_zero,
    ch01.check_rtn_symmetric,
    ch01.check_bits_per_weight,
    ch01.check_pack4,
    ch02.check_per_token_quant,
    ch02.check_smooth_up_down,
    ch02.check_alpha_search,
    ch03.check_hessian,
    ch03.check_obs_update,
    ch03.check_cholesky_rows,
    ch03.check_gptq,
    ch04.check_duo_scales,
    ch04.check_clip_thresholds,
    ch04.check_gqa_scales,
    ch05.check_weighted_kmeans,
    ch05.check_palettize_grouped,
    ch05.check_palettized_bits,
    ch06.check_equal_mass_levels,
    ch06.check_double_quant,
    ch06.check_nf4_bits,
    ch07.check_pareto,
    ch07.check_decode_speedup,
    ch07.check_dequantize_entry,
]


def stub(*args): ...  # the student edition's stub: returns None


@pytest.mark.parametrize("check", CHECKERS, ids=lambda c: f"{c.__module__.rsplit('.', 1)[1]}.{c.__name__}")
def test_the_unanswered_stub_fails_with_a_clear_message(check, capsys):
    assert check(stub) is False
    out = capsys.readouterr().out.strip()
    assert out.startswith("not yet:") and "\n" not in out
    # smooth_up_down works in place (returns None by design): there the stub changes nothing
    assert ("returned None" in out) or ("nothing changed" in out), out


def _fp16_by_nextafter(x):
    h = torch.tensor(abs(x), dtype=torch.float16)
    return float(torch.nextafter(h, torch.tensor(math.inf, dtype=torch.float16)) - h)


def _fp16_by_tensor_method(x):
    h = torch.tensor(abs(x), dtype=torch.float16)
    return float(h.nextafter(torch.tensor(math.inf, dtype=torch.float16)) - h)


def _scored_by_eval_windows(n_tokens, seqlen):
    try:
        w = eval_windows(torch.zeros(n_tokens, dtype=torch.long), seqlen)
    except Exception:
        return 0, 0
    return w.shape[0], w.shape[0] * (w.shape[1] - 1)


def _bytes_by_layer(n_linear, n_other, bits, group_size):
    layer = UniformLinear.from_float(nn.Linear(2 * group_size, 8), RTNConfig(bits=bits, group_size=group_size))
    return n_linear * layer.bits_per_weight / 8 + 2 * n_other


def _clip_by_awq(W, X, gs, n_grid, max_shrink):
    cfg = awq.AWQConfig(group_size=gs, n_clip_grid=n_grid, max_shrink=max_shrink)
    return awq.search_clip(W, X, cfg)["max_val"]


def _palettized_bits_by_layer(out_f, in_f, bits, group, scale):
    gran = "per_tensor" if group == out_f else "per_grouped_channel"
    cfg = PalettizeConfig(bits=bits, granularity=gran, group_size=group, per_channel_scale=scale)
    return PalettizedLinear.from_float(nn.Linear(in_f, out_f, bias=False), cfg).bits_per_weight


def _double_quant_by_layer(absmax, dq_block):
    W = absmax[:, None] * torch.linspace(1.0, -0.5, 64)[None, :]
    cfg = qnf4.NF4Config(block_size=64, double_quant_block_size=dq_block)
    return qnf4.quantize_weight(W, cfg).block_absmax()


def _nf4_bits_by_layer(numel, block, dq_block, dq):
    cfg = qnf4.NF4Config(block_size=block, double_quant=dq, double_quant_block_size=dq_block)
    return qnf4.NF4Linear.from_float(nn.Linear(numel, 1, bias=False), cfg).bits_per_weight


def _entry_by_layer(e):
    idx = torch.as_tensor(e["indices"])
    lut = torch.as_tensor(e["lut"])
    scale = None if e["scale"] is None else torch.as_tensor(e["scale"])
    return PalettizedLinear(LUTWeight(idx, lut, scale, 4)).dequantize()


# (checker, an answer that wraps a function which does the exercise's work, what the message names)
SHORTCUTS = [
    (ch00.check_fp16_spacing, _fp16_by_nextafter, "torch.nextafter"),
    (ch00.check_fp16_spacing, _fp16_by_tensor_method, "Tensor.nextafter"),
    # a checker's own helpers are qtutor code too
    (ch00.check_perplexity_from_logits, lambda lg, ids: ch00._as_float(lg.shape[-1]), "qtutor.checks.ch00"),
    (ch00.check_scored_tokens, _scored_by_eval_windows, "qtutor.data.eval_windows"),
    (ch00.check_model_bytes, _bytes_by_layer, "qtutor.quant"),
    (ch01.check_scale_zero, lambda w, b: tuple(t.item() for t in find_params(w[None], b, sym=False)), "find_params"),
    (
        ch01.check_rtn_symmetric,
        lambda W, b: quantize_weight(W, RTNConfig(bits=b, group_size=0, sym=True)).dequantize(),
        "qtutor.quant.rtn",
    ),
    (
        ch01.check_bits_per_weight,
        lambda b, g, n, sym: (
            UniformLinear.from_float(nn.Linear(n, 8), RTNConfig(bits=b, group_size=g, sym=sym)).bits_per_weight
        ),
        "qtutor.quant",
    ),
    (ch01.check_pack4, lambda codes: pack_codes(codes, 4), "pack_codes"),
    (ch02.check_per_token_quant, lambda x: sq.quantize_activation_absmax(x, "per_token"), "quantize_activation_absmax"),
    (ch02.check_per_token_quant, lambda x: sq.quantize_weight_absmax(x, "per_channel"), "quantize_weight_absmax"),
    (
        ch02.check_smooth_up_down,
        lambda mlp, x_max, a: scale_linear_to_linears(
            mlp.up_proj, [mlp.down_proj], sq.smooth_scales(x_max, [mlp.down_proj.weight], a)
        ),
        "scale_linear_to_linears",
    ),
    (ch03.check_cholesky_rows, lambda Hinv: torch.linalg.cholesky(Hinv, upper=True), "torch.linalg.cholesky"),
    (
        ch03.check_gptq,
        lambda W, H, b: (
            qgptq.gptq(W, H, qgptq.GPTQConfig(bits=b, group_size=0, damp=0.0, block_size=W.shape[1], act_order=False)).Q
        ),
        "qtutor.quant.gptq",
    ),
    (
        ch04.check_duo_scales,
        lambda x_mean, weights, ratio, gs: awq.candidate_scales(x_mean, ratio, awq.weight_mean(weights, gs)),
        "qtutor.quant.awq",
    ),
    (ch04.check_clip_thresholds, _clip_by_awq, "qtutor.quant.awq"),
    (ch05.check_weighted_kmeans, lambda x, w, k: kmeans_1d(x, k, weights=w).centroids, "kmeans_1d"),
    (
        ch05.check_palettize_grouped,
        lambda W, b, g: kmeans_lut(
            W, PalettizeConfig(bits=b, group_size=g, per_channel_scale=False, kmeans="exact")
        ).dequantize(),
        "qtutor.quant.palettize",
    ),
    (ch05.check_palettized_bits, _palettized_bits_by_layer, "qtutor.quant"),
    (ch06.check_double_quant, _double_quant_by_layer, "qtutor.quant"),
    (ch06.check_nf4_bits, _nf4_bits_by_layer, "qtutor.quant"),
    (ch07.check_dequantize_entry, _entry_by_layer, "qtutor.quant.palettize"),
]


@pytest.mark.parametrize("check,shortcut,named", SHORTCUTS, ids=[f"{c.__name__}-{n}" for c, _, n in SHORTCUTS])
def test_wrapping_a_function_that_answers_the_exercise_fails(check, shortcut, named, capsys):
    assert check(shortcut) is False
    out = capsys.readouterr().out
    assert "calls " in out and named in out, out
    assert "write yourself" in out


def test_the_shortcuts_would_pass_without_the_guard(monkeypatch, capsys):
    """The shortcuts above are real answers: with the guard off, a few of them pass (so the
    guard, not a difference in the answer, is what rejects them)."""
    import qtutor.checks as checks

    monkeypatch.setattr(checks._Guard, "run", lambda self, fn, args: fn(*args))
    assert ch02.check_per_token_quant(lambda x: sq.quantize_activation_absmax(x, "per_token"))
    assert ch05.check_weighted_kmeans(lambda x, w, k: kmeans_1d(x, k, weights=w).centroids)
    assert ch03.check_cholesky_rows(lambda Hinv: torch.linalg.cholesky(Hinv, upper=True))
    assert ch00.check_fp16_spacing(_fp16_by_nextafter)


def test_the_functions_an_exercise_names_are_allowed_and_nested_calls_are_not_judged():
    x = torch.randn(6, 5)
    # allowed: kmeans_1d (which calls qtutor's own helpers inside)
    got, err = call(lambda v: kmeans_1d(v.reshape(-1), 3).centroids, x, allow=(kmeans_1d,))
    assert err is None and got.shape == (3,)
    # allowed by module: RTN's config and quantizer, as the clipping exercise uses them
    got, err = call(
        lambda W: quantize_weight(W, RTNConfig(bits=4, group_size=5)).dequantize(),
        x,
        allow=("qtutor.quant.rtn", "qtutor.quant.base"),
    )
    assert err is None and got.shape == x.shape
    # a qtutor function passed directly (no wrapper) is caught too
    _, err = call(sq.quantize_activation_absmax, x)
    assert err and "quantize_activation_absmax" in err
    # an exception and a non-function are one-line reasons, never a crash
    assert call(lambda v: 1 / 0, x)[1] == "raised ZeroDivisionError: division by zero"
    assert call(42, x)[1] == "expected a function, got int"
    assert call(lambda v: None, x, none_ok=True) == (None, None)


@pytest.mark.parametrize(
    "module,name",
    [
        (ch00, "_fp16_spacing"),
        (ch00, "_perplexity_from_logits"),
        (ch00, "_scored_tokens"),
        (ch00, "_model_bytes"),
        (ch01, "_scale_zero"),
        (ch01, "_stored_bits_per_weight"),
        (ch02, "_alpha_errors"),
        (ch02, "_w8a8"),
        (ch05, "_stored_bits_per_weight"),
        (ch06, "_equal_mass_levels"),
        (ch06, "_double_quant"),
        (ch06, "_stored_bits"),
        (ch07, "_pareto"),
        (ch07, "_speedup"),
    ],
)
def test_no_reference_answer_is_importable(module, name):
    assert not hasattr(module, name)


def test_hidden_cases_are_right():
    """The answers the checkers write down as numbers agree with a direct computation here."""
    for (n, L), (windows, scored) in ch00._SCORED.items():
        assert (windows, scored) == (n // L, n // L * (L - 1))
    for (_, lo, hi, bits, n), (s, z) in ch01._SCALE_ZERO.items():
        w = ch01._group(lo, hi, n)
        lo_, hi_ = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
        assert math.isclose(s, (hi_ - lo_) / (2**bits - 1), rel_tol=1e-6) and z == round(-lo_ / s)
    x = ch02.noise((48, 32), 1.0)
    x[:, [3, 11]] *= 40.0
    weights = [ch02.noise((24, 32), 2.0) / 3, ch02.noise((16, 32), 3.0) / 3]
    x_max = x.abs().amax(dim=0)
    for divide, expected in ((True, ch02._ALPHA_ERRORS), (False, ch02._ALPHA_ERRORS_X_NOT_DIVIDED)):
        for alpha, e in zip((0.0, 0.25, 0.5, 0.75, 1.0), expected):
            s = sq.smooth_scales(x_max, weights, alpha)
            qx, dx = sq.quantize_activation_absmax(x / s if divide else x)
            num = den = 0.0
            for W in weights:
                qw, dw = sq.quantize_weight_absmax(W * s)
                num += float(((qx.float() * dx) @ (qw.float() * dw.view(-1, 1)).T - x @ W.T).pow(2).sum())
                den += float((x @ W.T).pow(2).sum())
            assert math.isclose(num / den, e, rel_tol=1e-4)
    assert np.isclose(ch02.noise((3,), 0.5).numpy(), ch02.noise((3,), 0.5).numpy()).all()
