"""NF4 (QLoRA): the codebook, the storage layout, double quantization, parity with bitsandbytes."""

import math

import pytest
import torch
import torch.nn.functional as F

import qtutor
from qtutor import QtutorError
from qtutor.quant import nf4
from qtutor.quant.nf4 import NF4Config, NF4Linear

# QLoRA appendix E / bitsandbytes.functional.get_4bit_type("nf4"): the published 16 NF4 levels
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_levels_equal_the_published_values():
    levels = nf4.nf4_levels()
    assert levels.dtype == torch.float32 and levels.shape == (16,)
    torch.testing.assert_close(levels, torch.tensor(PUBLISHED_NF4), rtol=0, atol=0)


def test_levels_are_normal_quantiles():
    # level 15 - k (k = 1..7) is the normal quantile at linspace(offset, 0.5, 9)[k] over the top one
    p = torch.linspace(nf4.NF4_OFFSET, 0.5, 9, dtype=torch.float64)
    q = torch.special.ndtri(p)
    levels = nf4.nf4_levels().double()
    torch.testing.assert_close(levels[8:].flip(0), q[:8] / q[0], rtol=1e-6, atol=1e-7)
    assert levels[7] == 0 and levels[0] == -1 and levels[15] == 1


def test_dynamic_map_known_values():
    d = nf4.dynamic_map()
    assert d.shape == (256,) and bool((d[1:] >= d[:-1]).all())
    assert d[-1] == 1.0 and int((d == 0).sum()) == 1
    # largest fraction: mean of the last two points of linspace(0.1, 1, 65) = 1 - 0.9/128
    assert math.isclose(d[-2].item(), 1 - 0.9 / 128, rel_tol=1e-6)
    assert math.isclose(d[0].item(), -(1 - 0.9 / 128), rel_tol=1e-6)
    # smallest magnitude: 10^-6 * mean(0.1, 1) = 5.5e-7, on both sides of 0
    assert math.isclose(d[128].item(), 5.5e-7, rel_tol=1e-6)
    assert math.isclose(d[126].item(), -5.5e-7, rel_tol=1e-6)


def test_nibble_order_is_bitsandbytes():
    assert nf4.pack_nibbles(torch.tensor([1, 2, 15, 0])).tolist() == [0x12, 0xF0]
    codes = torch.randint(0, 16, (101,))
    assert torch.equal(nf4.unpack_nibbles(nf4.pack_nibbles(codes), 101), codes.to(torch.uint8))


def brute_force_codes(W, block=64):
    flat = W.reshape(-1).float()
    n = flat.numel()
    absmax = F.pad(flat, (0, -n % block)).reshape(-1, block).abs().amax(1)
    scaled = flat * (1.0 / absmax).repeat_interleave(block)[:n]
    dist = (scaled[:, None] - nf4.nf4_levels()[None]).abs()
    return dist.argmin(1)  # first (lower) level on ties


@pytest.mark.parametrize("shape", [(32, 64), (7, 50), (3, 1000)])
def test_codes_are_nearest_levels(shape):
    W = torch.randn(shape)
    q = nf4.quantize_weight(W, NF4Config(double_quant=False))
    assert torch.equal(q.codes().long(), brute_force_codes(W))


def test_weights_on_the_grid_come_back_exactly():
    levels = nf4.nf4_levels()
    absmax = torch.tensor([0.5, 2.0, 0.125, 1.0])
    codes = torch.randint(0, 16, (4, 64))
    codes[:, 0] = 15  # each block reaches its absmax
    W = (levels[codes] * absmax[:, None]).reshape(2, 128)
    q = nf4.quantize_weight(W, NF4Config(double_quant=False))
    assert torch.equal(q.dequantize(), W)
    assert torch.equal(q.codes().long(), codes.reshape(-1))


@pytest.mark.parametrize("out_f, in_f", [(64, 256), (96, 64), (5, 70)])
def test_bits_per_weight_from_storage(out_f, in_f):
    lin = torch.nn.Linear(in_f, out_f)
    q = NF4Linear.from_float(lin)
    n = out_f * in_f
    n_blocks = -(-n // 64)
    expect = 8 * (math.ceil(n / 2) + n_blocks + 4 * math.ceil(n_blocks / 256) + 4) / n
    assert q.bits_per_weight == pytest.approx(expect)
    assert q.qweight.dtype == torch.uint8 and q.absmax.dtype == torch.uint8
    assert q.absmax2.dtype == torch.float32 and q.offset.dtype == torch.float32
    q1 = NF4Linear.from_float(lin, NF4Config(double_quant=False))
    assert q1.absmax.dtype == torch.float32 and q1.absmax2 is None and q1.offset is None
    assert q1.bits_per_weight == pytest.approx(8 * (math.ceil(n / 2) + 4 * n_blocks) / n)


def test_bits_per_weight_is_4_127_for_a_large_layer():
    q = nf4.quantize_weight(torch.randn(512, 2048))
    lin = NF4Linear(q)
    assert lin.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)


def test_double_quant_error_is_small():
    W = torch.randn(128, 512) * 0.02
    exact = nf4.quantize_weight(W, NF4Config(double_quant=False)).dequantize()
    dq = nf4.quantize_weight(W).dequantize()
    # the absmax is off by at most half a step of the 8-bit dynamic map
    assert (dq - exact).norm() / (exact - W).norm() < 0.05


def test_forward_matches_reference_and_compute_dtype():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    q = NF4Linear.from_float(lin)
    x = torch.randn(3, 5, 64)
    assert q.resolved_compute_dtype(x.device) == torch.float32
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize(), q.bias))
    qb = NF4Linear.from_float(lin, NF4Config(compute_dtype="bfloat16"))
    y = qb(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, q.dequantize(), q.bias), rtol=0.05, atol=0.05)


def test_bad_config_raises():
    with pytest.raises(QtutorError):
        NF4Config(block_size=0)
    with pytest.raises(QtutorError):
        NF4Config(compute_dtype="float64")


def test_quantize_model_with_qlora_nf4(model):
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = model(x).logits
    report = qtutor.quantize(model, "qlora_nf4")
    assert len(report.layers) == 14
    assert 4.1 < report.bits_per_weight < 4.6  # tiny layers: the offset and a partial 256-block
    assert all(s["weight_rel_error"] < 0.15 for s in report.layers.values())
    with torch.no_grad():
        out = model(x).logits
    assert torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.2


# --------------------------------------------------------------------------- bitsandbytes parity
@pytest.fixture(scope="module")
def bnb_functional():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    return bnbf


def test_codebooks_match_bitsandbytes(bnb_functional):
    assert torch.equal(nf4.nf4_levels(), bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(), bnb_functional.create_dynamic_map(signed=True))


def test_levels_match_bitsandbytes_create_normal_map(bnb_functional):
    pytest.importorskip("scipy")  # create_normal_map uses scipy.stats.norm.ppf
    full = bnb_functional.create_normal_map(offset=0.9677083, use_extra_value=True)
    nonzero = full[full != 0]
    assert torch.equal(nf4.nf4_levels(), torch.cat([nonzero[:7], torch.zeros(1), nonzero[7:]]))


@pytest.mark.parametrize("shape", [(256, 512), (96, 64), (151, 70)])
def test_parity_without_double_quant(bnb_functional, shape):
    torch.manual_seed(1)
    W = torch.randn(shape) * 0.02
    packed, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = nf4.quantize_weight(W, NF4Config(double_quant=False))
    assert torch.equal(packed.reshape(-1), ours.qweight)
    assert torch.equal(state.absmax, ours.absmax)
    assert torch.equal(bnb_functional.dequantize_4bit(packed, state), ours.dequantize())


@pytest.mark.parametrize("shape", [(512, 1024), (96, 64), (151, 70)])
def test_parity_with_double_quant(bnb_functional, shape):
    torch.manual_seed(2)
    W = torch.randn(shape) * 0.02
    W[0, :5] = 0.3  # a few outliers spread the absmaxes
    packed, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = nf4.quantize_weight(W)
    # 4-bit codes: identical (they are chosen with the full-precision absmax)
    assert torch.equal(packed.reshape(-1), ours.qweight)
    assert torch.equal(state.offset, ours.offset)
    assert torch.equal(state.state2.absmax, ours.absmax2)
    # 8-bit absmax codes: ours is the nearest entry of the dynamic map; bitsandbytes' CPU kernel
    # looks codes up in a 65536-bin table and is sometimes one entry off. Where the codes differ,
    # ours must be at least as near.
    same = state.absmax == ours.absmax
    assert same.float().mean() >= 0.98
    flat = W.reshape(-1)
    _, absmax = nf4._blockwise_absmax(flat, 64)
    target = (absmax - ours.offset) / nf4._expand(ours.absmax2, 256, absmax.numel())
    code = nf4.dynamic_map()
    d_ours = (code[ours.absmax.long()] - target).abs()
    d_bnb = (code[state.absmax.long()] - target).abs()
    assert bool((d_ours <= d_bnb + 1e-7).all())
    # dequantized weights: equal where the absmax codes agree, close everywhere
    ref = bnb_functional.dequantize_4bit(packed, state)
    mine = ours.dequantize()
    agree = nf4._expand(same, 64, flat.numel()).reshape(W.shape)
    torch.testing.assert_close(mine[agree], ref[agree], rtol=2**-11, atol=0)
    assert (mine - ref).norm() / ref.norm() < 2e-3
