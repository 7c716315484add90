"""Palettization: exact 1-D k-means, LUT layout, the layer, parity with coremltools."""

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F

import qtutor
from qtutor import QtutorError
from qtutor.quant import palettize as P
from qtutor.quant.palettize import PalettizeConfig, PalettizedLinear


def sse(x, centroids, labels, w=None):
    w = torch.ones_like(x) if w is None else w
    return float((w * (x - centroids[labels]) ** 2).sum())


def brute_force_sse(x, k, w=None):
    """Best clustering of sorted x into k contiguous runs, by trying every set of cut points."""
    order = x.argsort()
    x = x[order].double()
    w = torch.ones_like(x) if w is None else w[order].double()
    n = x.numel()
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), min(k, n) - 1):
        total = 0.0
        for a, b in zip((0, *cuts), (*cuts, n)):
            xs, ws = x[a:b], w[a:b]
            mean = (ws * xs).sum() / ws.sum()
            total += float((ws * (xs - mean) ** 2).sum())
        best = min(best, total)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("programme", ["torch", "auto"])  # auto: the C layers where they build
def test_kmeans_1d_is_optimal(seed, k, programme, monkeypatch):
    monkeypatch.setattr(P, "KMEANS_PROGRAMME", programme)
    g = torch.Generator().manual_seed(seed)
    n = 9
    x = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64) if seed % 2 else None
    r = P.kmeans_1d(x, k, w)
    assert r.centroids.shape == (k,) and bool((r.centroids[1:] >= r.centroids[:-1]).all())
    best = brute_force_sse(x, k, w)
    assert sse(x, r.centroids, r.labels, w) == pytest.approx(best, rel=1e-9, abs=1e-12)


needs_c_programme = pytest.mark.skipif(
    __import__("qtutor.runtime.cpu_kmeans").runtime.cpu_kmeans.available() is not None,
    reason="the C k-means programme does not build here (no C compiler)",
)


@needs_c_programme
@pytest.mark.parametrize("k", [2, 3, 8, 16])
@pytest.mark.parametrize("weighted", [False, True])
def test_c_programme_equals_torch_programme(k, weighted, monkeypatch):
    """The C layers (qtutor.runtime.cpu_kmeans) return the PyTorch layers' minimizers bit for
    bit: random rows, fp16-rounded rows full of repeats, a row of few and one of a single value."""
    g = torch.Generator().manual_seed(k)
    X = torch.randn(9, 500, generator=g, dtype=torch.float64)
    X[1] = X[1].half().double()
    X[2] = X[2].round()  # few distinct values
    X[3, :] = 0.5  # one
    X[4, 250:] = X[4, :250]  # every value twice
    w = torch.rand(9, 500, generator=g, dtype=torch.float64) if weighted else None
    out = {}
    for programme in ("torch", "c"):
        monkeypatch.setattr(P, "KMEANS_PROGRAMME", programme)
        xu, wu, n = P._unique_rows(X, w)
        out[programme] = (P._kmeans_sorted(xu - xu.mean(1, keepdim=True), wu, n, k), P.kmeans_1d_groups(X, k, w))
    assert torch.equal(out["c"][0], out["torch"][0])  # the cluster boundaries
    assert torch.equal(out["c"][1], out["torch"][1])  # the centroids


def test_c_programme_missing(monkeypatch):
    """Without the C programme "auto" runs the PyTorch one (same result) and "c" says why not."""
    from qtutor.runtime import cbuild, cpu_kmeans

    X = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(P, "KMEANS_PROGRAMME", "torch")
    expected = P.kmeans_1d_groups(X, 4)
    broken = cbuild.CLibrary("kmeans_broken", "the C k-means programme", "#error no compiler here\n", lambda lib: None)
    monkeypatch.setattr(cpu_kmeans, "_LIBRARY", broken)
    monkeypatch.setattr(P, "KMEANS_PROGRAMME", "auto")
    assert torch.equal(P.kmeans_1d_groups(X, 4), expected)
    monkeypatch.setattr(P, "KMEANS_PROGRAMME", "c")
    with pytest.raises(QtutorError, match="could not build the C k-means programme"):
        P.kmeans_1d_groups(X, 4)
    monkeypatch.setattr(P, "KMEANS_PROGRAMME", "gpu")
    with pytest.raises(QtutorError, match="set it to 'auto', 'c' or 'torch'"):
        P.kmeans_1d_groups(X, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_c_programme_serves_cuda_groups(monkeypatch):
    """Groups on a GPU: prefix sums on the device, the C layers on the host, centroids back on the
    device, as the PyTorch programme on the device computes them (float64 roundings may differ
    on the GPU, so up to float64 rounding)."""
    X = torch.randn(40, 896, generator=torch.Generator().manual_seed(1)).half().float().cuda()
    out = {}
    for programme in ("torch", "c"):
        monkeypatch.setattr(P, "KMEANS_PROGRAMME", programme)
        out[programme] = P.kmeans_1d_groups(X, 16)
    assert out["c"].device == X.device
    torch.testing.assert_close(out["c"], out["torch"], rtol=1e-9, atol=1e-12)


def test_kmeans_1d_recovers_planted_centroids():
    g = torch.Generator().manual_seed(0)
    planted = torch.tensor([-3.0, 0.0, 1.0, 5.0])
    x = (planted[:, None] + 0.01 * torch.randn(4, 200, generator=g)).reshape(-1)
    r = P.kmeans_1d(x, 4)
    torch.testing.assert_close(r.centroids, planted, atol=0.005, rtol=0)
    assert torch.equal(r.labels, torch.arange(4).repeat_interleave(200))


def test_kmeans_1d_weights_equal_repetitions():
    x = torch.tensor([0.1, 0.5, 0.9, 2.0, 2.2, 7.0], dtype=torch.float64)
    w = torch.tensor([3.0, 1.0, 2.0, 5.0, 1.0, 2.0], dtype=torch.float64)
    rep = x.repeat_interleave(w.long())
    torch.testing.assert_close(P.kmeans_1d(x, 3, w).centroids, P.kmeans_1d(rep, 3).centroids)


def test_kmeans_1d_fewer_values_than_clusters():
    x = torch.tensor([1.0, 1.0, 2.0, 4.0, 2.0])
    r = P.kmeans_1d(x, 16)
    assert r.centroids.tolist() == [1.0, 2.0, 4.0]
    assert sse(x, r.centroids, r.labels) == 0


def test_kmeans_1d_groups_match_single_runs():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(5, 300, generator=g, dtype=torch.float64)
    X[2, :150] = X[2, 150:]  # a row with repeated values
    C = P.kmeans_1d_groups(X, 8)
    for b in range(5):
        torch.testing.assert_close(C[b], P.kmeans_1d(X[b], 8).centroids)


@pytest.mark.parametrize("threads", [1, 2])
def test_kmeans_1d_groups_do_not_depend_on_chunking(threads):
    g = torch.Generator().manual_seed(5)
    X = torch.randn(12, 200, generator=g).half().float()
    X[3] = X[3].round()  # few distinct values
    X[7, :] = 0.25  # one distinct value
    whole = P.kmeans_1d_groups(X, 8, max_elements=1 << 30)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for max_elements in (200, 600, 1000):  # 1, 3 and 5 rows per chunk, chunks run in threads
            assert torch.equal(P.kmeans_1d_groups(X, 8, max_elements=max_elements), whole)
    finally:
        torch.set_num_threads(before)


def test_kmeans_lut_many_equals_one_by_one():
    g = torch.Generator().manual_seed(6)
    Ws = [
        torch.randn(48, 32, generator=g),
        torch.randn(40, 32, generator=g),  # a shorter last group
        torch.randn(16, 64, generator=g),
        torch.zeros(16, 32),
    ]
    for cfg in (PalettizeConfig(bits=3, group_size=16), PalettizeConfig(bits=4, granularity="per_tensor")):
        for a, b in zip(P.kmeans_lut_many(Ws, cfg), (P.kmeans_lut(W, cfg) for W in Ws)):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.lut, b.lut)
            assert a.rows_per_lut == b.rows_per_lut
            assert (a.scales is None and b.scales is None) or torch.equal(a.scales, b.scales)


def test_quantize_batches_palettization_like_one_by_one(model):
    import copy

    cfg = PalettizeConfig(bits=4, group_size=16)
    batched = copy.deepcopy(model)
    qtutor.quantize(batched, "palettization_4bit", cfg)
    layout = qtutor.models.layout_for(model)
    for layer, qlayer in zip(layout.layers(model), layout.layers(batched)):
        for name, linear in layout.linears(layer).items():
            one = PalettizedLinear.from_float(linear, cfg)
            got = qlayer.get_submodule(name)
            for buf in ("qweight", "lut", "scales"):
                assert torch.equal(getattr(one, buf), getattr(got, buf)), (name, buf)


def test_kmeans_1d_matches_coremltools_kmeans1d():
    kmeans1d = pytest.importorskip("coremltools._deps.kmeans1d")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3000, generator=g, dtype=torch.float64)
    ref = kmeans1d.cluster(x.numpy(), 16)
    r = P.kmeans_1d(x, 16)
    ref_sse = sse(x, torch.tensor(ref.centroids), torch.tensor(ref.clusters))
    assert sse(x, r.centroids, r.labels) == pytest.approx(ref_sse, rel=1e-9)
    torch.testing.assert_close(r.centroids, torch.tensor(ref.centroids, dtype=torch.float64))


# --------------------------------------------------------------------------- LUTs and the layer
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_grouped_channel"])
@pytest.mark.parametrize("scale", [True, False])
def test_kmeans_lut_layout(bits, granularity, scale):
    torch.manual_seed(bits)
    W = torch.randn(32, 48) * 0.02
    cfg = PalettizeConfig(bits=bits, granularity=granularity, group_size=8, per_channel_scale=scale)
    q = P.kmeans_lut(W, cfg)
    n_luts = 1 if granularity == "per_tensor" else 4
    assert q.indices.shape == (32, 48) and q.indices.dtype == torch.uint8
    assert int(q.indices.max()) < 2**bits
    assert q.lut.shape == (n_luts, 2**bits) and q.lut.dtype == torch.float16
    assert (q.scales is not None) == scale
    if scale:
        assert q.scales.dtype == torch.float16 and q.scales.shape == (32,)
        torch.testing.assert_close(q.scales.float(), W.abs().amax(1), rtol=1e-3, atol=0)
    # dequantize is lut[group(row), index] * scale[row]
    rows = W.shape[0] // n_luts
    expect = torch.stack([q.lut[r // rows].float()[q.indices[r].long()] for r in range(32)])
    if scale:
        expect = expect * q.scales.float()[:, None]
    torch.testing.assert_close(q.dequantize(), expect, rtol=0, atol=0)
    # each weight uses its nearest LUT entry
    Ws = W / q.scales.float()[:, None] if scale else W
    lut_rows = q.lut.float().repeat_interleave(rows, 0)
    dist = (Ws[:, :, None] - lut_rows[:, None, :]).abs()
    chosen = dist.gather(2, q.indices.long()[:, :, None]).squeeze(2)
    assert bool((chosen <= dist.min(2).values + 1e-7).all())


def test_error_falls_with_bits():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    errs = [(P.kmeans_lut(W, PalettizeConfig(bits=b)).dequantize() - W).norm().item() for b in (2, 3, 4, 6)]
    assert errs == sorted(errs, reverse=True)


def test_kmeans_modes_agree_closely():
    torch.manual_seed(0)
    W = torch.randn(32, 64) * 0.02
    errs = {m: (P.kmeans_lut(W, PalettizeConfig(kmeans=m)).dequantize() - W).norm().item() for m in P.KMEANS_MODES}
    assert errs["exact"] <= errs["fp16"] * 1.001
    assert max(errs.values()) / min(errs.values()) < 1.01


def test_weights_with_few_values_are_exact():
    levels = torch.tensor([-1.0, -0.25, 0.5, 2.0])
    W = levels[torch.randint(0, 4, (16, 32))]
    q = P.kmeans_lut(W, PalettizeConfig(bits=2, granularity="per_tensor", per_channel_scale=False))
    assert torch.equal(q.dequantize(), W)


def test_palettized_linear_forward_and_bits():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    q = PalettizedLinear.from_float(lin)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize(), q.bias))
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (32, 32)
    # 4-bit indices + 2 LUTs of 16 fp16 + 32 fp16 scales
    assert q.weight_nbytes == 32 * 32 + 2 * 16 * 2 + 32 * 2
    assert q.bits_per_weight == pytest.approx(8 * q.weight_nbytes / (32 * 64))
    torch.testing.assert_close(q.dequantize(), P.kmeans_lut(lin.weight.data).dequantize())


def test_bad_config_raises():
    with pytest.raises(QtutorError, match="5-bit"):
        PalettizeConfig(bits=5)
    with pytest.raises(QtutorError):
        PalettizeConfig(granularity="per_channel")
    with pytest.raises(QtutorError):
        PalettizeConfig(group_size=0)
    with pytest.raises(QtutorError):
        PalettizeConfig(kmeans="lloyd")


# --------------------------------------------------------------------------- a shorter last group
def test_rows_per_lut_need_not_divide_out_features():
    assert PalettizeConfig(group_size=16).rows_per_lut(172) == 16
    assert PalettizeConfig(group_size=16).rows_per_lut(160) == 16
    assert PalettizeConfig(granularity="per_tensor").rows_per_lut(172) == 172


@pytest.mark.parametrize("out,inp", [(20, 8), (172, 64), (8, 24)])  # (8, 24): one short group
@pytest.mark.parametrize("scale", [True, False])
def test_group_size_not_dividing_out_features(out, inp, scale):
    torch.manual_seed(out)
    W = torch.randn(out, inp) * 0.02
    cfg = PalettizeConfig(group_size=16, per_channel_scale=scale, kmeans="exact")
    q = P.kmeans_lut(W, cfg)
    n_full, n_luts = out // 16, -(-out // 16)  # 172 = 10 x 16 + 12: 11 LUTs
    assert q.rows_per_lut == 16 and q.lut.shape == (n_luts, 16)
    Ws = W / q.scales.float()[:, None] if scale else W
    # the full groups in one batch, the last group fitted on its own out % 16 rows only
    luts = [P.kmeans_1d_groups(Ws[: 16 * n_full].reshape(n_full, -1), 16)] if n_full else []
    luts.append(P.kmeans_1d_groups(Ws[16 * n_full :].reshape(1, -1), 16))
    assert torch.equal(q.lut, torch.cat(luts).half())
    # row r uses LUT r // 16, its nearest entry
    expect = torch.stack([q.lut[r // 16].float()[q.indices[r].long()] for r in range(out)])
    assert torch.equal(q.row_luts(), q.lut[torch.arange(out) // 16])
    dist = (Ws[:, :, None] - q.row_luts().float()[:, None, :]).abs()
    chosen = dist.gather(2, q.indices.long()[:, :, None]).squeeze(2)
    assert bool((chosen <= dist.min(2).values + 1e-7).all())
    if scale:
        expect = expect * q.scales.float()[:, None]
    torch.testing.assert_close(q.dequantize(), expect, rtol=0, atol=0)
    # the layer: packed indices round trip, forward, bytes of ceil(out / 16) LUTs
    lin = torch.nn.Linear(inp, out)
    lin.weight.data = W.clone()
    layer = PalettizedLinear.from_float(lin, cfg)
    assert layer.rows_per_lut == 16 and "rows_per_lut=16" in repr(layer)
    u = layer.unpacked()
    assert u.rows_per_lut == 16 and torch.equal(u.indices, q.indices) and torch.equal(u.lut, q.lut)
    torch.testing.assert_close(layer.dequantize(), q.dequantize(), rtol=0, atol=0)
    x = torch.randn(3, inp)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T + layer.bias)
    assert layer.weight_nbytes == out * inp // 2 + n_luts * 16 * 2 + (2 * out if scale else 0)


def test_lut_weight_checks_rows_per_lut():
    idx = torch.randint(0, 16, (20, 8), dtype=torch.uint8)
    lut = torch.randn(2, 16).half()
    assert P.LUTWeight(idx, lut, None, 4).rows_per_lut == 10  # left out: equal groups
    # the same shapes, another layout: rows 0..15 and 16..19
    uneven = P.LUTWeight(idx, lut, None, 4, rows_per_lut=16)
    assert torch.equal(
        uneven.dequantize()[15:17], torch.stack([lut[0].float()[idx[15].long()], lut[1].float()[idx[16].long()]])
    )
    with pytest.raises(QtutorError, match="rows_per_lut"):
        P.LUTWeight(idx, torch.randn(3, 16).half(), None, 4)  # 20 rows in 3 LUTs: say how
    with pytest.raises(QtutorError, match="do not cover"):
        P.LUTWeight(idx, lut, None, 4, rows_per_lut=8)  # 8 rows per LUT needs 3 LUTs


def test_quantize_model_with_a_shorter_last_group():
    from conftest import tiny_model

    model = tiny_model("qwen2", num_hidden_layers=1, intermediate_size=44)  # 44 = 2 x 16 + 12
    report = qtutor.quantize(model, "palettization_4bit")
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, PalettizedLinear) and up.lut.shape == (3, 16) and up.rows_per_lut == 16
    assert len(report.layers) == 7


def test_quantize_model_with_palettization(model):
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = model(x).logits
    report = qtutor.quantize(model, "palettization_4bit")
    assert len(report.layers) == 14
    assert 4.0 < report.bits_per_weight < 4.8
    with torch.no_grad():
        out = model(x).logits
    assert (out - ref).norm() / ref.norm() < 0.2


# --------------------------------------------------------------------------- coremltools parity
def coremltools_palettize(W, bits=4, granularity="per_grouped_channel", group_size=16, scale=True):
    pal = pytest.importorskip("coremltools.optimize.torch.palettization")
    logging.getLogger("coremltools").setLevel(logging.WARNING)
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W.clone()
    cfg = {"n_bits": bits, "granularity": granularity, "enable_per_channel_scale": scale}
    if granularity == "per_grouped_channel":
        cfg["group_size"] = group_size
    config = pal.PostTrainingPalettizerConfig.from_dict({"global_config": cfg})
    out = pal.PostTrainingPalettizer(torch.nn.Sequential(lin), config).compress()[0]
    return out.weight.data, getattr(out, "_COREML_/weight/lut")


@pytest.fixture(scope="module")
def layer_weight():
    torch.manual_seed(0)
    W = torch.randn(128, 256) * 0.02
    W[3, 7] = 0.2  # an outlier, as real layers have
    return W


def rel_err(A, W):
    return ((A - W).norm() / W.norm()).item()


@pytest.mark.parametrize("granularity", ["per_grouped_channel", "per_tensor"])
def test_parity_error_with_coremltools(layer_weight, granularity):
    W = layer_weight
    theirs, _ = coremltools_palettize(W, granularity=granularity)
    ours = P.kmeans_lut(W, PalettizeConfig(granularity=granularity)).dequantize()
    assert rel_err(ours, W) <= rel_err(theirs, W) * 1.01


def test_parity_lut_with_coremltools_rounding_mode(layer_weight):
    # kmeans="coreml" clusters what coremltools clusters (fp16, 4 decimals): the same LUTs
    W = layer_weight
    theirs, lut = coremltools_palettize(W, scale=False)
    q = P.kmeans_lut(W, PalettizeConfig(per_channel_scale=False, kmeans="coreml"))
    assert torch.equal(lut.reshape(q.lut.shape).half(), q.lut)
    assert rel_err(q.dequantize(), W) <= rel_err(theirs, W) * 1.0001
