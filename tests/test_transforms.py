"""Equivalence transforms (qtutor.quant.transforms): a float layer computes the same function
after any positive per-channel scaling, for norm -> linears and linear -> linear."""

import pytest
import torch
import torch.nn as nn

from conftest import tiny_model
from qtutor.calib import layer_inputs, run_layer
from qtutor.errors import QtutorError
from qtutor.models import layout_for
from qtutor.quant.transforms import scale_linear_to_linears, scale_norm_to_linears


def positive_scales(n, seed=0, spread=2.0):
    """exp(N(0, spread^2)): scales from ~0.01 to ~100, like real outlier ratios."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(spread * torch.randn(n, generator=g))


def layer_and_inputs(model, calib_windows):
    layout = layout_for(model)
    X, kwargs = layer_inputs(model, layout, calib_windows, "cpu")
    return model.model.layers[0], layout, X, kwargs


def assert_same_function(layer, X, kwargs, reference):
    out = run_layer(layer, X, kwargs)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_norm_to_linears_preserves_layer(model, calib_windows):
    layer, layout, X, kwargs = layer_and_inputs(model, calib_windows)
    reference = run_layer(layer, X, kwargs)
    for i, (norm, names) in enumerate(layout.norm_groups):
        s = positive_scales(layer.get_submodule(norm).weight.numel(), seed=i)
        scale_norm_to_linears(layer.get_submodule(norm), [layer.get_submodule(n) for n in names], s)
    assert not torch.allclose(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert_same_function(layer, X, kwargs, reference)


def test_norm_weight_divided_and_columns_multiplied(model):
    layer = model.model.layers[0]
    s = positive_scales(layer.input_layernorm.weight.numel())
    w0 = layer.input_layernorm.weight.detach().clone()
    q0 = layer.self_attn.q_proj.weight.detach().clone()
    scale_norm_to_linears(layer.input_layernorm, layer.self_attn.q_proj, s)  # a single linear works too
    torch.testing.assert_close(layer.input_layernorm.weight, w0 / s)
    torch.testing.assert_close(layer.self_attn.q_proj.weight, q0 * s.view(1, -1))


def test_up_to_down_preserves_layer(model, calib_windows):
    """SwiGLU: down(act(gate x) * up x): dividing up's rows by s commutes with the product."""
    layer, _, X, kwargs = layer_and_inputs(model, calib_windows)
    reference = run_layer(layer, X, kwargs)
    s = positive_scales(layer.mlp.up_proj.out_features, seed=3)
    scale_linear_to_linears(layer.mlp.up_proj, layer.mlp.down_proj, s)
    assert_same_function(layer, X, kwargs, reference)


def test_v_to_o_preserves_layer_without_gqa(family, calib_windows):
    """One KV head per query head: each V channel is read by one o_proj column. Qwen2's v_proj
    has a bias, which must be divided too."""
    model = tiny_model(family, num_key_value_heads=4)
    layer, _, X, kwargs = layer_and_inputs(model, calib_windows)
    reference = run_layer(layer, X, kwargs)
    v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
    assert v.out_features == o.in_features
    s = positive_scales(v.out_features, seed=4)
    b0 = None if v.bias is None else v.bias.detach().clone()
    scale_linear_to_linears(v, [o], s)
    if b0 is not None:
        torch.testing.assert_close(v.bias, b0 / s)
    assert_same_function(layer, X, kwargs, reference)


def test_v_to_o_refused_under_gqa(model):
    v, o = model.model.layers[0].self_attn.v_proj, model.model.layers[0].self_attn.o_proj
    assert v.out_features < o.in_features  # the conftest models use grouped-query attention
    with pytest.raises(QtutorError, match="output rows"):
        scale_linear_to_linears(v, [o], torch.ones(o.in_features))


def test_layernorm_bias_and_dtype():
    """A LayerNorm with bias (not in Qwen2/Llama, but handled); parameters keep their dtype."""
    torch.manual_seed(0)
    ln, fc = nn.LayerNorm(16), nn.Linear(16, 8)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(5, 16)
    ref = fc(ln(x))
    scale_norm_to_linears(ln, [fc], positive_scales(16))
    torch.testing.assert_close(fc(ln(x)), ref, rtol=1e-5, atol=1e-5)
    ln16, fc16 = nn.LayerNorm(16).to(torch.bfloat16), nn.Linear(16, 8).to(torch.bfloat16)
    scale_norm_to_linears(ln16, [fc16], positive_scales(16))
    assert ln16.weight.dtype == ln16.bias.dtype == fc16.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [torch.ones(15), -torch.ones(16), torch.full((16,), float("inf"))])
def test_bad_scales_raise(bad):
    ln, fc = nn.LayerNorm(16), nn.Linear(16, 8)
    with pytest.raises(QtutorError):
        scale_norm_to_linears(ln, [fc], bad)
