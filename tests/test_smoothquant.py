"""SmoothQuant (qtutor.quant.smoothquant): the migration formula on hand-checkable numbers,
smoothing as an equivalence, the W8A8 layer's integer path against its float simulation, and the
end result against RTN and unsmoothed W8A8 on a model with activation outliers."""

import pytest
import torch

import qtutor
from conftest import OUTLIERS, eval_windows, logits, planted_model, tiny_model  # noqa: F401
from qtutor import RTNConfig, SmoothQuantConfig
from qtutor.calib import sequential
from qtutor.models import layout_for
from qtutor.quant import smoothquant as S
from qtutor.quant.smoothquant import W8A8Linear


# --------------------------------------------------------------------------- the formula
ACT = torch.tensor([4.0, 1.0, 0.25])
W1 = torch.tensor([[1.0, -2.0, 0.5], [0.25, 1.0, -4.0]])
W2 = torch.tensor([[-4.0, 0.5, 1.0]])
# max|W_j| over both linears: [4, 2, 4]


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (0.5, [1.0, 2**-0.5, 0.25]),  # sqrt([4, 1, 0.25]) / sqrt([4, 2, 4])
        (1.0, [4.0, 1.0, 0.25]),  # all the difficulty to the weights: s = max|X|
        (0.0, [0.25, 0.5, 0.25]),  # all to the activations: s = 1 / max|W|
    ],
)
def test_smooth_scales_known_answer(alpha, expected):
    s = S.smooth_scales(ACT, [W1, W2], alpha)
    torch.testing.assert_close(s, torch.tensor(expected))


def test_alpha_half_balances_ranges():
    """At alpha = 0.5 every channel ends with max|X_j| / s_j == max|W_j| s_j."""
    s = S.smooth_scales(ACT, [W1, W2], 0.5)
    w_max = torch.cat([W1, W2]).abs().amax(0)
    torch.testing.assert_close(ACT / s, w_max * s)


def test_smooth_scales_clamps():
    s = S.smooth_scales(torch.tensor([0.0, 1.0]), [torch.tensor([[0.0, 1.0]])], 0.5)
    # act 0 -> s clamped at 1e-5; weight column 0 -> max|W| clamped at 1e-5 first
    torch.testing.assert_close(s, torch.tensor([1e-5, 1.0]))


def test_act_scales_is_channel_absmax():
    X = torch.tensor([[[1.0, -3.0], [-2.0, 0.5]], [[0.5, 1.0], [0.0, 2.0]]])
    torch.testing.assert_close(S.act_scales(X), torch.tensor([2.0, 3.0]))


# --------------------------------------------------------------------------- the layer
def random_linear(inp=96, out=40, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight[:, 5] *= 30  # an outlier column
    return lin


def outlier_inputs(shape=(3, 7, 96), seed=1):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[..., 11] *= 50
    return x


def test_int8_weight_error_at_most_half_a_step():
    lin = random_linear()
    q = W8A8Linear.from_float(lin)
    assert q.qweight.dtype == torch.int8 and q.weight_scales.shape == (40,)
    assert int(q.qweight.abs().max()) == 127
    assert torch.all(q.qweight.abs().amax(1) == 127)  # every row's max hits the end of the grid
    err = (q.dequantize() - lin.weight.detach()).abs()
    assert torch.all(err <= q.weight_scales.view(-1, 1) / 2 * (1 + 1e-5))
    assert q.bits_per_weight == pytest.approx(8 + 32 / 96)
    assert q.nbytes == 40 * 96 + 40 * 4 + 40 * 4  # codes, fp32 scales, fp32 bias


def test_per_token_activation_quantization():
    x = outlier_inputs().reshape(-1, 96)
    q, s = S.quantize_activation_absmax(x)
    assert q.dtype == torch.int8 and s.shape == (21, 1)
    assert torch.all(q.abs().amax(1) == 127)
    assert torch.all((q.float() * s - x).abs() <= s / 2 * (1 + 1e-5))


def test_int_mm_works_on_cpu():
    """torch._int_mm on CPU (torch 2.13): exact int8 x int8 -> int32 for any shape, even the
    ones CUDA refuses (M <= 16, K or N not a multiple of 8)."""
    if not hasattr(torch, "_int_mm"):
        pytest.skip("this torch has no _int_mm")
    g = torch.Generator().manual_seed(0)
    for M, K, N in [(1, 96, 40), (5, 7, 3), (33, 64, 96)]:
        a = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        c = torch._int_mm(a, b.t())
        assert c.dtype == torch.int32
        assert torch.equal(c.long(), a.long() @ b.long().t())
    assert S.int_mm_supported(1, 7, 3, torch.device("cpu"))
    assert not S.int_mm_supported(16, 64, 64, torch.device("cuda"))
    assert S.int_mm_supported(17, 64, 64, torch.device("cuda"))


@pytest.mark.parametrize("act_quant", ["per_token", "per_tensor"])
@pytest.mark.parametrize("bias", [True, False])
def test_int_path_equals_simulated(act_quant, bias):
    q = W8A8Linear.from_float(random_linear(bias=bias), SmoothQuantConfig(act_quant=act_quant))
    x = outlier_inputs()
    y = q(x)
    expected_kernel = "torch._int_mm" if hasattr(torch, "_int_mm") else "simulated"
    assert q.last_kernel == expected_kernel
    torch.testing.assert_close(y, q.forward_simulated(x), rtol=1e-5, atol=1e-5)
    q.use_int_mm = False
    torch.testing.assert_close(q(x), y, rtol=1e-5, atol=1e-5)
    assert q.last_kernel == "simulated"
    assert y.shape == (3, 7, 40)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the row padding is for CUDA's int8 GEMM")
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_cuda_int_path_pads_few_rows(tokens):
    q = W8A8Linear.from_float(random_linear(), SmoothQuantConfig()).cuda()
    x = outlier_inputs((tokens, q.in_features)).cuda().half()
    y = q(x)
    padded = tokens < S.INT_MM_MIN_ROWS
    assert q.last_kernel == "torch._int_mm" + (f" (rows padded {tokens}->32)" if padded else "")
    torch.testing.assert_close(y, q.forward_simulated(x), rtol=2e-3, atol=2e-3)


def test_forward_quantizes_the_input():
    """The W8A8 forward is not F.linear(x, dequantize()): the input is rounded to INT8 too."""
    lin = random_linear()
    q = W8A8Linear.from_float(lin)
    x = outlier_inputs()
    weight_only = torch.nn.functional.linear(x, q.dequantize(), q.bias)
    assert not torch.allclose(q(x), weight_only, atol=1e-4)
    xq, s = S.quantize_activation_absmax(x.reshape(-1, 96))
    manual = torch.nn.functional.linear((xq.float() * s).reshape(x.shape), q.dequantize(), q.bias)
    torch.testing.assert_close(q(x), manual, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the model
def test_smoothing_leaves_float_outputs_unchanged(family, calib_windows, eval_windows):
    model = planted_model(family)
    reference = logits(model, eval_windows)
    layout, cfg = layout_for(model), SmoothQuantConfig()
    stats = sequential(model, layout, calib_windows, lambda layer, X, kw: S.smooth_layer(layer, layout, X, kw, cfg))
    q = stats[0]["self_attn.q_proj"]
    assert q["smooth_prev"] == "input_layernorm"
    assert q["act_spread_smoothed"] < q["act_spread"] / 2  # the outliers were flattened
    assert "smooth_prev" not in stats[0]["self_attn.o_proj"]  # o/down: W8A8 without smoothing
    torch.testing.assert_close(logits(model, eval_windows), reference, rtol=1e-4, atol=1e-4)


def test_end_to_end_beats_rtn_and_unsmoothed(family, calib_windows, eval_windows):
    reference = logits(planted_model(family), eval_windows)
    errors = {}
    for label, method, cfg in [
        ("smoothquant", "smoothquant_w8a8", None),
        ("w8a8", "smoothquant_w8a8", SmoothQuantConfig(smooth=False)),
        ("rtn_int4", "rtn_int4", RTNConfig(bits=4, group_size=32)),
    ]:
        model = planted_model(family)
        report = qtutor.quantize(model, method, cfg, calib=calib_windows)
        out = logits(model, eval_windows)
        assert torch.isfinite(out).all()
        errors[label] = float((out - reference).pow(2).mean())
        if method == "smoothquant_w8a8":
            layout = layout_for(model)
            linears = [m for layer in layout.layers(model) for m in layout.linears(layer).values()]
            assert len(linears) == 14 and all(isinstance(m, W8A8Linear) for m in linears)
            assert all(m.last_kernel in ("torch._int_mm", "simulated") for m in linears)
            assert 8 < report.bits_per_weight < 8.6
    assert errors["smoothquant"] < 0.6 * errors["w8a8"], errors  # measured 0.41-0.46
    assert errors["smoothquant"] < 0.1 * errors["rtn_int4"], errors


def test_config_validation():
    with pytest.raises(qtutor.QtutorError):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(qtutor.QtutorError):
        SmoothQuantConfig(act_quant="per_channel")
    assert qtutor.get_method("smoothquant_w8a8").default_config == SmoothQuantConfig(alpha=0.5)
