"""AWQ (qtutor.quant.awq): scaling is an equivalence, the search never loses to RTN on its own
loss, the v -> o pair follows the shapes, and the end result beats RTN where outliers exist."""

import copy

import pytest
import torch

import qtutor
from conftest import OUTLIERS, eval_windows, logits, planted_model, tiny_model  # noqa: F401
from qtutor import AWQConfig, RTNConfig
from qtutor.calib import layer_inputs, run_layer, sequential
from qtutor.models import layout_for
from qtutor.quant import awq as A
from qtutor.quant import rtn
from qtutor.quant.rtn import UniformLinear


def first_layer(model, calib_windows):
    layout = layout_for(model)
    X, kwargs = layer_inputs(model, layout, calib_windows, "cpu")
    return model.model.layers[0], layout, X, kwargs


def test_scaling_alone_leaves_logits_unchanged(family, calib_windows, eval_windows):
    model = planted_model(family)
    reference = logits(model, eval_windows)
    layout, cfg = layout_for(model), AWQConfig(group_size=32)
    groups = sequential(model, layout, calib_windows, lambda layer, X, kw: A.scale_layer(layer, layout, X, kw, cfg)[0])
    ratios = [g.result["ratio"] for per_layer in groups for g in per_layer if not g.skipped]
    assert max(ratios) > 0  # the search did move something
    torch.testing.assert_close(logits(model, eval_windows), reference, rtol=1e-4, atol=1e-4)


def rtn_block_loss(layer, group, X, kwargs, layout, cfg):
    """The block loss of plain RTN, computed independently of the search."""
    layer = copy.deepcopy(layer)
    captured = {}

    def hook(module, args, output):
        captured["x"] = args[0]  # returns None: the output is kept

    handle = layer.get_submodule(group.linears[0]).register_forward_hook(hook)
    run_layer(layer, X, kwargs)
    handle.remove()
    block = layer.get_submodule(group.inspect)
    kw = kwargs if group.inspect == layout.attention else {}

    def out():
        o = block(captured["x"], **kw)
        return o[0] if isinstance(o, tuple) else o

    with torch.no_grad():
        ref = out()
        for n in group.linears:
            fc = layer.get_submodule(n)
            fc.weight.copy_(UniformLinear.from_float(fc, cfg.rtn()).dequantize())
        return float((out() - ref).pow(2).mean())


def test_search_never_worse_than_rtn(model, calib_windows):
    """Ratio 0 (s = 1) is on the grid and is RTN, so the best loss is at most RTN's."""
    layer, layout, X, kwargs = first_layer(model, calib_windows)
    cfg = AWQConfig(group_size=32)
    groups = A.scale_groups(layer, layout)
    expected = {g.linears[0]: rtn_block_loss(layer, g, X, kwargs, layout, cfg) for g in groups if not g.skipped}
    stats = A.quantize_layer(layer, layout, X, kwargs, cfg)
    searched = [g for g in groups if not g.skipped]
    assert len(searched) == 3  # q/k/v, gate/up, down (v -> o is skipped: GQA)
    for g in searched:
        s = stats[g.linears[0]]
        assert s["loss_awq"] <= s["loss_rtn"]
        assert s["loss_history"][0] == s["loss_rtn"]
        assert s["loss_awq"] == min(s["loss_history"])
        assert s["loss_rtn"] == pytest.approx(expected[g.linears[0]], rel=1e-4)
        assert len(s["loss_history"]) == cfg.n_grid
    assert all(isinstance(m, UniformLinear) for m in layout.linears(layer).values())


def test_v_to_o_skipped_under_gqa(model, calib_windows):
    layer, layout, X, kwargs = first_layer(model, calib_windows)
    stats = A.quantize_layer(layer, layout, X, kwargs, AWQConfig(group_size=32, clip=False))
    o = stats["self_attn.o_proj"]
    assert o["scale_prev"] is None and "grouped-query" in o["scale_skipped"]
    assert "best_ratio" not in o
    assert stats["mlp.down_proj"]["scale_prev"] == "mlp.up_proj"
    assert stats["self_attn.v_proj"]["scale_prev"] == "input_layernorm"


def test_v_to_o_used_without_gqa(family, calib_windows):
    model = tiny_model(family, num_key_value_heads=4)
    layer, layout, X, kwargs = first_layer(model, calib_windows)
    stats = A.quantize_layer(layer, layout, X, kwargs, AWQConfig(group_size=32, clip=False))
    o = stats["self_attn.o_proj"]
    assert o["scale_prev"] == "self_attn.v_proj" and "scale_skipped" not in o
    assert o["loss_awq"] <= o["loss_rtn"]


@pytest.mark.parametrize("bits, group_size, sym", [(4, 32, False), (4, 40, False), (3, 0, True), (8, 16, True)])
def test_fake_quantize_is_what_uniform_linear_stores(bits, group_size, sym):
    W = torch.randn(24, 96, generator=torch.Generator().manual_seed(0))
    cfg = AWQConfig(bits=bits, group_size=group_size, sym=sym)
    lin = torch.nn.Linear(96, 24, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    assert torch.equal(rtn.fake_quantize(W, cfg), UniformLinear.from_float(lin, cfg.rtn()).dequantize())


def test_candidate_scales():
    x_mean = torch.tensor([0.01, 1.0, 4.0, 100.0])
    torch.testing.assert_close(A.candidate_scales(x_mean, 0.0), torch.ones(4))
    s = A.candidate_scales(x_mean, 0.5)  # [0.1, 1, 2, 10] / sqrt(10 * 0.1)
    torch.testing.assert_close(s, torch.tensor([0.1, 1.0, 2.0, 10.0]))
    assert float(s.max() * s.min()) == pytest.approx(1.0)
    tiny = A.candidate_scales(torch.tensor([0.0, 1.0]), 1.0)  # clamp(min=1e-4) before normalising
    torch.testing.assert_close(tiny, torch.tensor([1e-4, 1.0]) / 1e-2)


def test_single_matrix_awq_protects_salient_channels():
    """One linear whose inputs have a few large channels: AWQ's output error is at most RTN's
    (ratio 0 is RTN), and here much smaller; the returned weight is W diag(s) quantized."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 64, generator=g)
    X = torch.randn(512, 64, generator=g)
    X[:, list(OUTLIERS)] *= 30
    cfg = AWQConfig(group_size=32, clip=False)
    r = A.quantize_weight(W, X, cfg)
    q, s, info = r.q, r.s, r.info
    torch.testing.assert_close(r.dequantize(), q.dequantize() / s)
    ref = X @ W.T
    err_awq = float(((X / s) @ q.dequantize().T - ref).pow(2).mean())
    err_rtn = float((X @ rtn.fake_quantize(W, cfg).T - ref).pow(2).mean())
    assert err_awq == pytest.approx(info["loss"], rel=1e-4)
    assert err_rtn == pytest.approx(info["loss_rtn"], rel=1e-4)
    assert info["ratio"] > 0 and err_awq < 0.7 * err_rtn
    assert torch.all(s[list(OUTLIERS)] > s.max() / 10)  # the salient channels get the large scales
    clipped = A.quantize_weight(W, X, AWQConfig(group_size=32))
    s_clip, info_clip = clipped.s, clipped.info
    torch.testing.assert_close(s_clip, s)
    assert float(info_clip["clip"]["err_after"].sum()) <= float(info_clip["clip"]["err_before"].sum())


def test_clip_search_on_a_planted_outlier():
    """One huge weight per group: shrinking its range costs one weight's error but makes every
    other weight's step finer; the search must find that, and never do worse than no clipping."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 64, generator=g) * 0.02
    W[:, ::32] = 0.5  # the first column of each group of 32
    X = torch.randn(256, 64, generator=g)
    X[:, ::32] *= 0.01  # the outlier weight meets a tiny activation
    cfg = AWQConfig(group_size=32, n_clip_tokens=128)
    c = A.search_clip(W, X, cfg)
    assert c["max_val"].shape == (8, 2) and c["group_size"] == 32
    assert torch.all(c["err_after"] <= c["err_before"])
    assert torch.all(c["max_val"] < c["org_max"])  # clipped
    assert torch.all(c["max_val"] >= c["org_max"] * (1 - 9 / 20) - 1e-7)  # within the grid
    lin = torch.nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    A.apply_clip(lin, c["max_val"], 32)
    assert torch.all(lin.weight.abs().reshape(8, 2, 32).amax(-1) <= c["max_val"] + 1e-7)


def test_search_subset_and_configs(model, calib_windows):
    assert A._search_subset(8, 32, None).tolist() == list(range(8))
    assert A._search_subset(8, 32, 96).tolist() == [0, 4, 7]
    assert A._search_subset(8, 32, 10).tolist() == [0]
    layer, layout, X, kwargs = first_layer(model, calib_windows)
    cfg = AWQConfig(group_size=40, max_search_tokens=64, duo_scaling=True)  # 40 does not divide 64
    stats = A.quantize_layer(layer, layout, X, kwargs, cfg)
    for name, s in stats.items():
        assert s["weight_rel_error"] < 0.2, name
    assert all(torch.isfinite(torch.tensor(s["loss_history"])).all() for s in stats.values() if "loss_history" in s)
    with pytest.raises(qtutor.QtutorError):
        AWQConfig(max_shrink=1.0)


def test_ratio_grid_llm_compressor(model, calib_windows):
    """``ratio_grid="llm-compressor"`` tries AWQModifier's (ratio, duo) points; the default is llm-awq's."""
    assert AWQConfig(n_grid=4).grid_points() == [(0.0, False), (0.25, False), (0.5, False), (0.75, False)]
    assert AWQConfig(n_grid=4, ratio_grid="llm-compressor").grid_points() == [(i / 3, False) for i in range(4)]
    duo = AWQConfig(n_grid=4, duo_scaling=True, ratio_grid="llm-compressor").grid_points()
    assert duo == [(0.0, False), (0.0, True), (0.5, True), (1.0, True)]  # the identity, then ratio 0..1
    with pytest.raises(qtutor.QtutorError):
        AWQConfig(ratio_grid="autoawq")
    layer, layout, X, kwargs = first_layer(model, calib_windows)
    cfg = AWQConfig(group_size=32, n_grid=4, duo_scaling=True, ratio_grid="llm-compressor", clip=False)
    stats = A.quantize_layer(layer, layout, X, kwargs, cfg)
    q = stats["self_attn.q_proj"]
    assert len(q["loss_history"]) == 4 and q["loss_rtn"] == q["loss_history"][0]  # the identity is RTN
    assert q["loss_awq"] == min(q["loss_history"]) and q["best_ratio"] in (0.0, 0.5, 1.0)


def test_end_to_end_beats_rtn_with_outliers(family, calib_windows, eval_windows):
    reference = logits(planted_model(family), eval_windows)
    errors, bits = {}, {}
    for method, cfg in [
        ("awq_int4", AWQConfig(group_size=32)),
        ("rtn_int4", RTNConfig(bits=4, group_size=32, sym=False)),
    ]:
        model = planted_model(family)
        report = qtutor.quantize(model, method, cfg, calib=calib_windows)
        layout = layout_for(model)
        assert all(
            isinstance(m, UniformLinear) for layer in layout.layers(model) for m in layout.linears(layer).values()
        )
        out = logits(model, eval_windows)
        assert torch.isfinite(out).all()
        errors[method] = float((out - reference).pow(2).mean())
        bits[method] = report.bits_per_weight
    assert bits["awq_int4"] == bits["rtn_int4"]  # same storage: AWQ's scales are folded away
    assert errors["awq_int4"] < 0.7 * errors["rtn_int4"], errors  # measured 0.26-0.51


def test_end_to_end_default_model(model, calib_windows):
    """On the plain conftest model too: every linear replaced, finite logits, stats reported."""
    report = qtutor.quantize(model, "awq_int4", AWQConfig(group_size=32), calib=calib_windows)
    assert torch.isfinite(logits(model, calib_windows)).all()
    assert len(report.layers) == 14
    q = report.layers["layers.1.self_attn.q_proj"]
    assert q["loss_awq"] <= q["loss_rtn"]
    assert "clip_ratio" in report.layers["layers.0.mlp.down_proj"]
    assert "clip_ratio" not in report.layers["layers.0.self_attn.k_proj"]  # q/k never clipped
