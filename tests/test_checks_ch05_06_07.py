"""The exercise checkers of chapters 5 (palettization), 6 (NF4) and 7 (benchmark, Core ML)
accept the chapters' solutions and reject typical wrong answers (tiny inputs, no model)."""

import math

import numpy as np
import pytest
import torch

from qtutor.checks import ch05, ch06, ch07
from qtutor.quant.nf4 import dynamic_map
from qtutor.quant.palettize import kmeans_1d


# --------------------------------------------------------------------------- chapter 5
def weighted_kmeans(x, w, k):
    order = x.argsort()
    x, w = x[order].double(), w[order].double()
    n = x.numel()
    zero = x.new_zeros(1)
    P0, P1, P2 = (torch.cat([zero, t.cumsum(0)]) for t in (w, w * x, w * x * x))

    def cost(j, i):
        s0, s1, s2 = P0[i] - P0[j - 1], P1[i] - P1[j - 1], P2[i] - P2[j - 1]
        return s2 - s1 * s1 / s0

    D = torch.full((k + 1, n + 1), math.inf, dtype=torch.float64)
    start = torch.zeros(k + 1, n + 1, dtype=torch.long)
    D[0, 0] = 0.0
    for q in range(1, k + 1):
        for i in range(q, n + 1):
            j = torch.arange(q, i + 1)
            total = D[q - 1, j - 1] + cost(j, i)
            D[q, i], start[q, i] = total.min(), j[total.argmin()]
    cents, i = [], n
    for q in range(k, 0, -1):
        j = int(start[q, i])
        cents.append((P1[i] - P1[j - 1]) / (P0[i] - P0[j - 1]))
        i = j - 1
    return torch.stack(cents[::-1])


def unweighted_kmeans(x, w, k):
    return kmeans_1d(x.double(), k).centroids


def palettize_grouped(W, bits, group_size):
    out = torch.empty_like(W)
    for r in range(0, W.shape[0], group_size):
        block = W[r : r + group_size]
        km = kmeans_1d(block.reshape(-1), 2**bits)
        out[r : r + group_size] = km.centroids[km.labels].reshape(block.shape)
    return out


def palettize_per_row(W, bits, group_size):
    return palettize_grouped(W, bits, 1)


def palettize_whole(W, bits, group_size):
    return palettize_grouped(W, bits, W.shape[0])


def palettized_bits(out_features, in_features, bits, group_size, per_channel_scale):
    lut = 16 * 2**bits / (group_size * in_features)
    return bits + lut + (16 / in_features if per_channel_scale else 0.0)


def palettized_bits_no_scale(out_features, in_features, bits, group_size, per_channel_scale):
    return bits + 16 * 2**bits / (group_size * in_features)


def test_ch05_weighted_kmeans():
    assert ch05.check_weighted_kmeans(weighted_kmeans)
    assert not ch05.check_weighted_kmeans(unweighted_kmeans)
    assert not ch05.check_weighted_kmeans(lambda x, w, k: torch.zeros(k + 1))


def test_ch05_palettize_grouped():
    assert ch05.check_palettize_grouped(palettize_grouped)
    assert not ch05.check_palettize_grouped(palettize_per_row)
    assert not ch05.check_palettize_grouped(palettize_whole)


def test_ch05_palettized_bits():
    assert ch05.check_palettized_bits(palettized_bits)
    assert not ch05.check_palettized_bits(palettized_bits_no_scale)
    assert not ch05.check_palettized_bits(lambda *a: a[2])


# --------------------------------------------------------------------------- chapter 6
def equal_mass_levels(bits):
    p = (torch.arange(2**bits, dtype=torch.float64) + 0.5) / 2**bits
    q = torch.special.ndtri(p)
    return q / q.max()


def double_quantize(absmax, dq_block):
    code = dynamic_map()
    offset = absmax.mean()
    out = torch.empty_like(absmax)
    for s in range(0, absmax.numel(), dq_block):
        x = absmax[s : s + dq_block] - offset
        a2 = x.abs().max()
        idx = (x / a2 - code[:, None]).abs().argmin(0)
        out[s : s + dq_block] = code[idx] * a2 + offset
    return out


def double_quantize_no_offset(absmax, dq_block):
    code = dynamic_map()
    out = torch.empty_like(absmax)
    for s in range(0, absmax.numel(), dq_block):
        x = absmax[s : s + dq_block]
        a2 = x.abs().max()
        out[s : s + dq_block] = code[(x / a2 - code[:, None]).abs().argmin(0)] * a2
    return out


def double_quantize_one_scale(absmax, dq_block):
    return double_quantize(absmax, absmax.numel())


def nf4_bits(numel, block, dq_block, double_quant):
    n_blocks = math.ceil(numel / block)
    bits = 8 * math.ceil(numel / 2)
    if double_quant:
        bits += 8 * n_blocks + 32 * math.ceil(n_blocks / dq_block) + 32
    else:
        bits += 32 * n_blocks
    return bits / numel


def test_ch06_equal_mass_levels():
    assert ch06.check_equal_mass_levels(equal_mass_levels)
    assert not ch06.check_equal_mass_levels(lambda b: torch.linspace(-1, 1, 2**b))
    assert not ch06.check_equal_mass_levels(
        lambda b: torch.special.ndtri((torch.arange(2**b, dtype=torch.float64) + 0.5) / 2**b)
    )


def test_ch06_double_quant():
    assert ch06.check_double_quant(double_quantize)
    assert not ch06.check_double_quant(double_quantize_no_offset)
    assert not ch06.check_double_quant(double_quantize_one_scale)


def test_ch06_nf4_bits():
    assert ch06.check_nf4_bits(nf4_bits)
    assert not ch06.check_nf4_bits(lambda n, b, d, dq: 4 + 8 / b if dq else 4 + 32 / b)
    assert not ch06.check_nf4_bits(lambda n, b, d, dq: 4 + 32 / b)


# --------------------------------------------------------------------------- chapter 7
def pareto(points):
    return [
        n
        for n, (b, p) in points.items()
        if not any(b2 <= b and p2 <= p and (b2, p2) != (b, p) for m, (b2, p2) in points.items() if m != n)
    ]


def decode_speedup(linear_bytes_fp16, other_bytes, bits_per_weight):
    return (linear_bytes_fp16 + other_bytes) / (linear_bytes_fp16 * bits_per_weight / 16 + other_bytes)


def dequantize_entry(entry):
    lut = torch.as_tensor(entry["lut"]).float()
    idx = torch.as_tensor(entry["indices"]).long()
    W = lut.repeat_interleave(idx.shape[0] // lut.shape[0], 0).gather(1, idx)
    if entry["scale"] is not None:
        W = W * torch.as_tensor(entry["scale"]).float()[:, None]
    return W


def dequantize_entry_no_scale(entry):
    lut = torch.as_tensor(entry["lut"]).float()
    idx = torch.as_tensor(entry["indices"]).long()
    return lut.repeat_interleave(idx.shape[0] // lut.shape[0], 0).gather(1, idx)


def test_ch07_pareto():
    assert ch07.check_pareto(pareto)
    assert not ch07.check_pareto(lambda pts: [min(pts, key=lambda n: pts[n][1])])
    assert not ch07.check_pareto(lambda pts: list(pts))


def test_ch07_decode_speedup():
    assert ch07.check_decode_speedup(decode_speedup)
    assert not ch07.check_decode_speedup(lambda lin, other, bits: 16 / bits)


def test_ch07_dequantize_entry():
    assert ch07.check_dequantize_entry(dequantize_entry)
    assert not ch07.check_dequantize_entry(dequantize_entry_no_scale)
    assert not ch07.check_dequantize_entry(lambda e: np.asarray(e["lut"], dtype=np.float64)[:, :1] * 0)


@pytest.mark.parametrize("checker", [ch05.check_weighted_kmeans, ch06.check_double_quant, ch07.check_dequantize_entry])
def test_checkers_survive_a_crashing_answer(checker, capsys):
    def boom(*args):
        raise ValueError("boom")

    assert not checker(boom)
    assert "ValueError" in capsys.readouterr().out


# --------------------------------------------------------------------------- predict, then measure
@pytest.mark.parametrize(
    "checker, measured, near, far",
    [
        (ch05.check_palette_bits_prediction, 0.08, 0.1, 0.2),
        (ch06.check_saving_prediction, 0.3731, 0.373, 0.5),
        (ch06.check_block_size_prediction, 0.03, 0.04, 0.1),
        (ch07.check_compression_prediction, 2.5, 2.45, 4.0),
        (ch07.check_noise_prediction, 0.002, 0.0025, 0.008),
    ],
)
def test_prediction_checkers(checker, measured, near, far, capsys):
    assert checker(near, measured)
    assert checker(torch.tensor(near), measured)  # a tensor counts as its number
    assert not checker(far, measured)
    assert not checker(None, measured)  # the stub: no prediction written down yet
    assert "no prediction yet" in capsys.readouterr().out
    assert not checker([1.0, 2.0], measured)


# --------------------------------------------------------------------------- qtutor.book: the noise of a change
def test_ppl_change_is_paired_and_its_error_shrinks_with_windows():
    from qtutor.book import noise_note, ppl_change
    from qtutor.errors import QtutorError

    g = torch.Generator().manual_seed(0)
    base = 3.0 + 0.3 * torch.randn(400, generator=g, dtype=torch.float64)
    other = base + 0.02 + 0.01 * torch.randn(400, generator=g, dtype=torch.float64)
    change, se = ppl_change(base, other)
    assert math.isclose(change, math.exp(float((other - base).mean())) - 1)
    assert 0.0003 < se < 0.0008  # 0.01 / sqrt(400) = 0.0005, times exp(0.02): the window spread cancels
    _, se_few = ppl_change(base[:25], other[:25])
    assert 2 < se_few / se < 6  # 16x fewer windows: about 4x the error
    assert "400 evaluation windows" in noise_note(base, other, "x")
    with pytest.raises(QtutorError):
        ppl_change(base[:1], other[:1])


def test_window_nll_is_the_perplexity_protocol_window_by_window():
    from conftest import tiny_model

    from qtutor.book import window_nll
    from qtutor.eval import perplexity

    model = tiny_model("qwen2")
    ids = torch.randint(0, 128, (5 * 32 + 7,), generator=torch.Generator().manual_seed(3))
    nll = window_nll(model, ids, 32, batch_size=2)  # 5 windows, the remainder dropped, batches of 2 and 1
    assert nll.shape == (5,) and nll.dtype == torch.float64
    assert math.isclose(float(nll.mean()), perplexity(model, ids, 32).nll, rel_tol=1e-6)
    assert window_nll(model, ids, 32, max_tokens=64).shape == (2,)
