"""Round-to-nearest: error bound, exact grid points, storage accounting, model swap."""

import pytest
import torch

import qtutor
from qtutor.quant.rtn import RTNConfig, UniformLinear, group_layout, quantize_weight

CONFIGS = [RTNConfig(bits=b, group_size=g, sym=s) for b in (2, 3, 4, 8) for g in (0, 16, 24) for s in (False, True)]


def _W(out=12, inp=48, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_error_at_most_half_a_step(cfg):
    W = _W()
    q = quantize_weight(W, cfg)
    gs, _ = group_layout(W.shape[1], cfg.group_size)
    step = q.scales.float().repeat_interleave(gs, dim=1)[:, : W.shape[1]]
    err = (q.dequantize() - W).abs()
    assert (err <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_weights_on_the_grid_come_back_exactly(cfg):
    """W = s (q - z) with an fp16 scale, an integer zero and both extreme codes in every group."""
    g = torch.Generator().manual_seed(cfg.bits)
    out, inp = 6, 48
    gs, n_groups = group_layout(inp, cfg.group_size)
    maxq = 2**cfg.bits - 1
    lo, hi = (1, maxq) if cfg.sym else (0, maxq)  # symmetric grids leave code 0 (-2^(b-1)) unused
    codes = torch.randint(lo, hi + 1, (out, inp), generator=g)
    for j in range(n_groups):
        codes[:, j * gs], codes[:, min(j * gs + 1, inp - 1)] = lo, hi
    scale = (torch.rand(out, n_groups, generator=g) + 0.5).half().float()
    zero = (
        torch.full_like(scale, 2 ** (cfg.bits - 1))
        if cfg.sym
        else torch.randint(1, maxq, (out, n_groups), generator=g).float()
    )
    s = scale.repeat_interleave(gs, 1)[:, :inp]
    z = zero.repeat_interleave(gs, 1)[:, :inp]
    W = s * (codes - z)
    q = quantize_weight(W, cfg)
    assert torch.equal(q.codes.long(), codes)
    assert torch.equal(q.dequantize(), W)


def test_known_answer_int4_asym():
    W = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    q = quantize_weight(W, RTNConfig(bits=4, group_size=0, sym=False))
    # range [-1, 2] over 15 steps: s = 0.2, rounded up to fp16 0.2002; z = round(1 / s) = 5,
    # and 0.5 / s = 2.4976 rounds to 2: code 7
    assert q.scales.float().item() == pytest.approx(0.2, rel=1e-3)
    assert q.zeros.tolist() == [[5]]
    assert q.codes.tolist() == [[0, 5, 7, 15]]


def test_known_answer_int8_sym():
    W = torch.tensor([[-127.0, 1.0, 63.4]])
    q = quantize_weight(W, RTNConfig(bits=8, group_size=0, sym=True))
    assert q.scales.float().item() == 1.0 and q.zeros is None
    assert (q.codes.int() - 128).tolist() == [[-127, 1, 63]]


def test_group_size_not_dividing_gives_shorter_last_group():
    W = _W(inp=40)
    q = quantize_weight(W, RTNConfig(bits=4, group_size=16))
    assert q.scales.shape == (12, 3)  # 16 + 16 + 8
    # the last group's scale only depends on its own 8 columns
    q_tail = quantize_weight(W[:, 32:], RTNConfig(bits=4, group_size=0))
    assert torch.equal(q.scales[:, 2], q_tail.scales[:, 0])


def test_group_wise_beats_per_channel_on_outliers():
    W = _W(out=16, inp=256)
    W[:, 3] *= 30  # one outlier input column
    per_channel = (quantize_weight(W, RTNConfig(4, 0)).dequantize() - W).norm()
    grouped = (quantize_weight(W, RTNConfig(4, 32)).dequantize() - W).norm()
    assert grouped < 0.7 * per_channel


@pytest.mark.parametrize(
    "bits,group_size,sym,expected",
    [
        (4, 128, False, 4 + 16 / 128 + 4 / 128),  # codes + fp16 scale + 4-bit zero per group
        (4, 128, True, 4 + 16 / 128),
        (8, 0, True, 8 + 16 / 256),  # one fp16 scale per row of 256
        (2, 64, False, 2 + 16 / 64 + 2 / 64),
    ],
)
def test_bits_per_weight_from_storage(bits, group_size, sym, expected):
    lin = torch.nn.Linear(256, 32)
    q = UniformLinear.from_float(lin, RTNConfig(bits, group_size, sym))
    assert q.bits_per_weight == pytest.approx(expected)
    assert q.qweight.dtype == torch.uint8 and q.qweight.numel() == 32 * 256 * bits // 8


def test_uniform_linear_forward_is_reference():
    lin = torch.nn.Linear(64, 24)
    q = UniformLinear.from_float(lin, RTNConfig(4, 32))
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantize(), lin.bias))


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_unsupported_bits_error(bits):
    with pytest.raises(qtutor.QtutorError, match="not supported"):
        RTNConfig(bits=bits)


def test_quantize_model_swaps_decoder_linears(model):
    before = model(torch.arange(16)[None]).logits
    report = qtutor.quantize(model, "rtn_int8")
    after = model(torch.arange(16)[None]).logits
    assert len(report.layers) == 2 * 7
    assert all(
        isinstance(m, UniformLinear)
        for layer in model.model.layers
        for m in [layer.self_attn.q_proj, layer.mlp.down_proj]
    )
    assert isinstance(model.lm_head, torch.nn.Linear)  # the tied head stays in float
    assert report.bits_per_weight == pytest.approx(8 + 16 / 64, rel=0.02)
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_int4_per_channel_worse_than_int8(model):
    import copy

    ids = torch.arange(32)[None]
    ref = model(ids).logits
    errs = {}
    for name in ("rtn_int8", "rtn_int4"):
        m = copy.deepcopy(model)
        qtutor.quantize(m, name, RTNConfig(bits=8 if name == "rtn_int8" else 4, group_size=0, sym=True))
        errs[name] = (m(ids).logits - ref).norm()
    assert errs["rtn_int8"] < errs["rtn_int4"] / 4


@pytest.mark.parametrize("bits,group_size", [(8, 16), (8, 0), (4, 16), (3, 24)])
def test_bound_holds_for_the_stored_fp16_scale_on_many_rows(bits, group_size):
    """With the scale rounded to nearest fp16, about one group in a few hundred clipped its extreme
    weight past s/2 at 8 bits; rounding up keeps every weight inside the grid."""
    W = torch.randn(2000, 48, generator=torch.Generator().manual_seed(7)) * 0.02
    q = quantize_weight(W, RTNConfig(bits, group_size))
    gs, _ = group_layout(48, group_size)
    s = q.scales.float().repeat_interleave(gs, dim=1)[:, :48]
    assert ((q.dequantize() - W).abs() <= s / 2).all()
