"""GPTQ (qtutor.quant.gptq): known answers, error bounds against RTN, and the model driver."""

import copy

import pytest
import torch

import qtutor
from qtutor.errors import QtutorError
from qtutor.quant import gptq as G
from qtutor.quant.rtn import RTNConfig, UniformLinear
from qtutor.quant.rtn import quantize_weight as rtn_quantize_weight


def correlated_inputs(n=512, width=96, rank=8, seed=0):
    """Tokens with a strong low-rank correlation between input features, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(width, rank, generator=g)
    return torch.randn(n, rank, generator=g) @ A.T + 0.1 * torch.randn(n, width, generator=g)


def weight(out=48, width=96, seed=1):
    return torch.randn(out, width, generator=torch.Generator().manual_seed(seed))


def output_error(X, W, Q):
    return float(((X @ (W - Q).T) ** 2).sum())


def test_hessian_running_average_equals_one_shot():
    X = correlated_inputs(n=300)
    h = G.Hessian(X.shape[1])
    for part in X.split([100, 7, 193]):  # uneven batches, 2-D and 3-D
        h.add_batch(part.reshape(1, -1, X.shape[1]) if len(part) == 7 else part)
    torch.testing.assert_close(h.H, 2 * X.T @ X / len(X), rtol=1e-4, atol=1e-4)
    assert h.n == 300
    two = G.Hessian(X.shape[1])
    two.add_batch(X[:100]), two.add_batch(X[100:])
    torch.testing.assert_close(two.H, h.H, rtol=1e-5, atol=1e-5)
    assert two.n == 300


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [0, 16, 40])  # 40 does not divide 96: a shorter last group
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("static_groups", [False, True])
def test_identity_hessian_equals_rtn(bits, group_size, sym, static_groups):
    """With H = I and no damping there is no error to feed back: GPTQ is round-to-nearest."""
    W = weight()
    cfg = G.GPTQConfig(
        bits=bits, group_size=group_size, sym=sym, damp=0.0, block_size=32, act_order=False, static_groups=static_groups
    )
    q = G.quantize_weight(W, torch.eye(W.shape[1]), cfg)
    r = rtn_quantize_weight(W, RTNConfig(bits=bits, group_size=group_size, sym=sym))
    assert torch.equal(q.codes, r.codes)
    assert torch.equal(q.scales, r.scales)
    assert (q.zeros is None) == (r.zeros is None)
    if q.zeros is not None:
        assert torch.equal(q.zeros, r.zeros)
    assert q.g_idx is None


CONFIGS = [  # every column order spelled out (the default is act-order with static groups)
    dict(group_size=0, act_order=False, static_groups=False),
    dict(group_size=0, act_order=True, static_groups=False),
    dict(group_size=16, act_order=False, static_groups=False),
    dict(group_size=16, act_order=True, static_groups=False),
    dict(group_size=16, act_order=False, static_groups=True),
    dict(group_size=16, act_order=True, static_groups=True),
    dict(group_size=40, act_order=True, static_groups=False),
    dict(group_size=16, sym=True, act_order=True, static_groups=False, bits=3),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_gptq_beats_rtn_on_correlated_inputs(kw):
    X, W = correlated_inputs(), weight()
    cfg = G.GPTQConfig(block_size=32, **kw)
    res = G.gptq(W, 2 * X.T @ X / len(X), cfg)
    rtn = rtn_quantize_weight(W, RTNConfig(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym))
    assert output_error(X, W, res.Q) < 0.5 * output_error(X, W, rtn.dequantize())
    # what is stored reproduces the Q the algorithm computed, exactly, also after packing
    assert torch.equal(res.weight.dequantize(), res.Q)
    assert torch.equal(UniformLinear(res.weight).dequantize(), res.Q)
    assert res.damp == cfg.damp


@pytest.mark.parametrize("kw", CONFIGS[:4], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_loss_is_the_mean_output_error_per_token(kw):
    """Without damping the reference's summed ``Losses`` equal ||X W^T - X Q^T||^2 / N."""
    X, W = correlated_inputs(), weight()
    res = G.gptq(W, 2 * X.T @ X / len(X), G.GPTQConfig(damp=0.0, block_size=32, **kw))
    assert res.loss == pytest.approx(output_error(X, W, res.Q) / len(X), rel=1e-2)


def test_act_order_groups_carry_g_idx():
    X, W = correlated_inputs(), weight()
    res = G.gptq(W, 2 * X.T @ X / len(X), G.GPTQConfig(group_size=16, act_order=True, static_groups=False))
    g_idx = res.weight.g_idx
    assert g_idx is not None and g_idx.shape == (96,)
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((6,), 16))  # 6 groups of 16 columns
    # columns with the largest diag(H) form group 0
    perm = torch.argsort(torch.diag(2 * X.T @ X), descending=True)
    assert set(perm[:16].tolist()) == set(torch.nonzero(g_idx == 0).flatten().tolist())
    layer = UniformLinear(res.weight)
    torch.testing.assert_close(layer(X), X @ res.Q.T)
    plain = UniformLinear(G.quantize_weight(W, 2 * X.T @ X / len(X), G.GPTQConfig(group_size=16)))
    assert plain.g_idx is None
    assert layer.g_idx.dtype == torch.int16
    assert layer.weight_nbytes == plain.weight_nbytes + 2 * 96  # the index is paid for


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns(act_order):
    X = correlated_inputs()
    X[:, [3, 50]] = 0  # inputs that never fire
    W = weight()
    res = G.gptq(W, 2 * X.T @ X / len(X), G.GPTQConfig(group_size=16, act_order=act_order))
    assert torch.isfinite(res.Q).all() and res.loss == res.loss
    assert (res.Q[:, [3, 50]] == 0).all()
    assert torch.equal(res.weight.dequantize(), res.Q)


def test_damping_escalates_on_a_non_positive_definite_hessian():
    v = torch.nn.functional.normalize(torch.randn(96, generator=torch.Generator().manual_seed(2)), dim=0)
    H = torch.eye(96) - 2 * torch.outer(v, v)  # eigenvalue -1
    with pytest.warns(UserWarning, match="used damp=10"):
        res = G.gptq(weight(), H, G.GPTQConfig(group_size=16))
    assert res.damp == pytest.approx(10.0)
    assert torch.isfinite(res.Q).all() and torch.equal(res.weight.dequantize(), res.Q)
    X = correlated_inputs(n=3)  # fewer tokens than inputs: H is singular, any damping helps
    with pytest.warns(UserWarning, match="used damp=1e-0"):
        res = G.gptq(weight(), 2 * X.T @ X / 3, G.GPTQConfig(damp=0.0))
    assert 0 < res.damp <= 1e-3 and torch.isfinite(res.Q).all()


def test_hopeless_hessian_falls_back_to_rtn():
    W = weight()
    with pytest.warns(UserWarning, match="round-to-nearest"):
        res = G.gptq(W, torch.full((96, 96), float("nan")), G.GPTQConfig(group_size=16))
    assert torch.equal(res.weight.codes, rtn_quantize_weight(W, RTNConfig(group_size=16)).codes)


def test_bad_config_and_shapes_raise():
    with pytest.raises(QtutorError, match="bits"):
        G.GPTQConfig(bits=5)
    with pytest.raises(QtutorError, match="damp"):
        G.GPTQConfig(damp=-0.1)
    with pytest.raises(QtutorError, match="block size"):
        G.GPTQConfig(block_size=0)
    with pytest.raises(QtutorError, match="needs \\(96, 96\\)"):
        G.quantize_weight(weight(), torch.eye(64), G.GPTQConfig())


# --------------------------------------------------------------------------- whole models
def held_windows():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(123))


def test_quantize_model_beats_rtn(model, calib_windows):
    held = held_windows()
    with torch.no_grad():
        ref = model(held).logits
    rtn = copy.deepcopy(model)
    qtutor.quantize(rtn, "rtn_int4", RTNConfig(group_size=32))
    report = qtutor.quantize(model, "gptq_int4", qtutor.GPTQConfig(group_size=32), calib=calib_windows)
    for layer in model.model.layers:
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            assert isinstance(layer.get_submodule(name), UniformLinear)
    assert len(report.layers) == 14
    assert all(s["gptq_loss"] >= 0 and s["damp"] == 0.01 for s in report.layers.values())
    with torch.no_grad():
        out, out_rtn = model(held).logits, rtn(held).logits
    assert torch.isfinite(out).all()
    assert (out - ref).pow(2).mean() < (out_rtn - ref).pow(2).mean()


@pytest.mark.parametrize(
    "cfg",
    [
        qtutor.GPTQConfig(group_size=48),  # 64 = 48 + 16, 96 = 48 + 48; act-order, static groups
        qtutor.GPTQConfig(group_size=16, act_order=True, static_groups=False, true_sequential=False),
        qtutor.GPTQConfig(group_size=0, bits=3, sym=True, static_groups=True),
    ],
    ids=["group48", "act_order-one_pass", "per_channel-3bit-sym"],
)
def test_quantize_model_variants(cfg, calib_windows):
    from conftest import tiny_model

    model = tiny_model("qwen2")
    report = qtutor.quantize(model, "gptq_int4", cfg, calib=calib_windows)
    with torch.no_grad():
        assert torch.isfinite(model(held_windows()).logits).all()
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, UniformLinear) and q.bits == cfg.bits
    assert (q.g_idx is not None) == (cfg.act_order and not cfg.static_groups and cfg.group_size > 0)
    if cfg.group_size == 48:
        assert q.n_groups == 2 and model.model.layers[0].mlp.down_proj.n_groups == 2
    assert report.bits_per_weight > cfg.bits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph block loop needs a GPU")
@pytest.mark.parametrize(
    "cfg",
    [
        G.GPTQConfig(group_size=128),
        G.GPTQConfig(group_size=0, sym=True),
        G.GPTQConfig(group_size=128, act_order=True, static_groups=True),
    ],
)
def test_cuda_graph_path_equals_eager_path(cfg, monkeypatch):
    """The replayed CUDA graph does exactly the arithmetic of the eager loop (run on a GPU)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 384, generator=g).cuda()
    X = (torch.randn(2048, 384, generator=g) @ torch.randn(384, 384, generator=g) * 0.1).cuda()
    H = 2 * X.T @ X / X.shape[0]
    monkeypatch.setattr(G, "BLOCK_LOOP", "cuda-graph")
    graphed = G.gptq(W, H, cfg)
    monkeypatch.setattr(G, "BLOCK_LOOP", "eager")
    eager = G.gptq(W, H, cfg)
    assert torch.equal(graphed.weight.codes, eager.weight.codes)
    assert torch.equal(graphed.Q, eager.Q)
    if __import__("qtutor.runtime.kernels").runtime.kernels.triton_available():  # the default on a GPU
        monkeypatch.setattr(G, "BLOCK_LOOP", "auto")
        fused = G.gptq(W, H, cfg)
        assert (fused.weight.codes == eager.weight.codes).float().mean() > 0.999
        assert fused.loss == pytest.approx(eager.loss, rel=1e-4)


needs_interpreter = pytest.mark.skipif(
    not __import__("qtutor.runtime.kernels").runtime.kernels.triton_available() or torch.cuda.is_available(),
    reason="Triton interpreter tests run on CPU-only machines with triton",
)


@needs_interpreter
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
@pytest.mark.parametrize(
    "cfg",
    [
        G.GPTQConfig(group_size=32, block_size=32),
        G.GPTQConfig(group_size=0, sym=True, block_size=48, act_order=False),
        G.GPTQConfig(bits=3, group_size=16, block_size=64, static_groups=True),
    ],
)
def test_triton_block_loop_equals_the_pytorch_loop(cfg, monkeypatch):
    """The one-launch Triton block (Triton's interpreter here; a GPU runs it compiled) does the
    PyTorch loop's arithmetic: the same codes and loss, the blocks' tails and a partial row
    tile included (37 rows, 80 columns)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(37, 80, generator=g)
    X = torch.randn(512, 80, generator=g) @ torch.randn(80, 80, generator=g) * 0.1
    H = 2 * X.T @ X / X.shape[0]
    monkeypatch.setattr(G, "BLOCK_LOOP", "eager")
    eager = G.gptq(W, H, cfg)
    monkeypatch.setattr(G, "BLOCK_LOOP", "triton")
    fused = G.gptq(W, H, cfg)
    assert (fused.weight.codes == eager.weight.codes).float().mean() > 0.999
    assert fused.loss == pytest.approx(eager.loss, rel=1e-4)
    torch.testing.assert_close(fused.Q, eager.Q, rtol=0, atol=1e-6 + float(eager.weight.scales.max()))


_COMPILE_GPTQ_SM90 = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qtutor.runtime import triton_gptq as tg
sig = {"w_ptr": "*fp32", "h_ptr": "*fp32", "s_ptr": "*fp32", "z_ptr": "*fp32", "c_ptr": "*fp32", "e_ptr": "*fp32",
       "R": "i32", "C": "i32", "MAXQ": "fp32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
for block_r, block_c in ((32, 128), (16, 256)):
    src = ASTSource(fn=tg._gptq_block_jit, signature=sig, constexprs={(9,): block_r, (10,): block_c})
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    except Exception as e:
        sys.exit(f"gptq_block {block_r} {block_c}: {str(e).splitlines()[-1]}")
print("compiled gptq_block")
"""


@needs_interpreter
def test_triton_block_loop_compiles_for_sm90(tmp_path):
    from conftest import run_fresh_python

    assert "compiled gptq_block" in run_fresh_python(_COMPILE_GPTQ_SM90, tmp_path)


def test_block_loop_setting_is_checked(monkeypatch):
    monkeypatch.setattr(G, "BLOCK_LOOP", "fast")
    with pytest.raises(qtutor.QtutorError, match="BLOCK_LOOP 'fast'"):
        G.gptq(torch.randn(4, 8), torch.eye(8), G.GPTQConfig(group_size=0))


def reference_fasterquant(W, H, bits, groupsize, actorder, blocksize=128, percdamp=0.01):
    """A line-by-line transcription of IST-DASLab/gptq ``GPTQ.fasterquant`` (asymmetric grid),
    with the reference's ``Quantizer.find_params`` swapped for qtutor's (fp16 scales, the one
    deliberate difference), to pin our loop to the reference's arithmetic."""
    from qtutor.quant.rtn import dequantize_codes, find_params, quantize_codes

    def params(w):
        s, z = find_params(w, bits, False)
        return s[:, None], z[:, None]

    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    scale, zero = params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    H[torch.arange(columns), torch.arange(columns)] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Q1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2])
        Err1, Hinv1 = torch.zeros_like(W1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize > 0 and (i1 + i) % groupsize == 0:
                scale, zero = params(W[:, i1 + i : i1 + i + groupsize])
            q = dequantize_codes(quantize_codes(w[:, None], scale, zero, bits), scale, zero).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if actorder:
        Q = Q[:, torch.argsort(perm)]
    return Q


@pytest.mark.parametrize("group_size,act_order", [(0, False), (0, True), (32, False), (32, True)])
def test_equals_the_reference_fasterquant(group_size, act_order):
    X, W = correlated_inputs(), weight()
    X[:, 5] = 0  # a dead input column
    H = 2 * X.T @ X / len(X)
    cfg = G.GPTQConfig(
        bits=4, group_size=group_size, sym=False, act_order=act_order, static_groups=False, block_size=64
    )
    ours = G.gptq(W, H, cfg).Q
    ref = reference_fasterquant(W, H, 4, group_size, act_order, blocksize=64)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_the_default_is_act_order_with_static_groups_and_stores_no_g_idx(calib_windows):
    """GPTQConfig() quantizes in act-order with contiguous groups fixed up front: chapter 1's
    storage format (no g_idx), and the layer's output error below RTN's."""
    cfg = G.GPTQConfig()
    assert cfg.act_order and cfg.static_groups
    X, W = correlated_inputs(), weight()
    res = G.gptq(W, 2 * X.T @ X / len(X), cfg.replace(group_size=16))
    assert res.weight.g_idx is None
    rtn = rtn_quantize_weight(W, RTNConfig(bits=4, group_size=16))
    assert output_error(X, W, res.Q) < output_error(X, W, rtn.dequantize())
    assert UniformLinear(res.weight).n_groups == 6  # six contiguous groups of 16 columns


def test_gptq_speed_script_runs(tmp_path, monkeypatch):
    """benchmarks/gptq_speed.py (the block loops timed side by side) on the tiny config on CPU:
    one eager row per matrix, all codes equal to themselves, a CSV written."""
    import csv
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sys.modules.pop("gptq_speed", None)
    import gptq_speed

    out = tmp_path / "g.csv"
    assert gptq_speed.main(["--config", "tiny", "--device", "cpu", "--runs", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["matrix"] for r in rows] == ["q/o", "gate/up", "down"] and all(r["block_loop"] == "eager" for r in rows)
    assert all(float(r["codes_equal_to_first"]) == 1.0 and float(r["seconds"]) > 0 for r in rows)
    assert G.BLOCK_LOOP == "auto"  # the script puts the setting back


def test_inverse_cholesky_is_the_references_formula_bit_for_bit():
    """Chapter 3 derives Hinv as cholesky(cholesky_inverse(cholesky(H + lambda I)), upper=True) and
    asserts its GPTQ equal to the package's: the package must compute the very same matrix (any
    other route rounds differently, and at 4864 columns 0.1% of the codes moved a grid step)."""
    X = torch.randn(3000, 640, generator=torch.Generator().manual_seed(0)) @ torch.randn(
        640, 640, generator=torch.Generator().manual_seed(1)
    )
    H = 2 * X.T @ X / X.shape[0]
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(640)
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    got, damp = G.inverse_cholesky(H, 0.01)
    assert damp == 0.01 and torch.equal(got, want)


def test_column_step_is_the_references_arithmetic_bit_for_bit():
    """One column step on a transposed block: the codes and errors of the reference's lines, and
    each later column updated by ``w - err h`` with the product rounded first (a fused
    multiply-add, as ``addr_`` does on a CPU, changes last bits and so, over thousands of
    columns, codes)."""
    from qtutor.quant.rtn import dequantize_codes, find_params, quantize_codes

    g = torch.Generator().manual_seed(0)
    W1 = torch.randn(2048, 64, generator=g)
    Hinv1 = torch.linalg.cholesky(torch.eye(64) + 0.1 * torch.ones(64, 64), upper=True)
    s, z = find_params(W1, 4, False)
    W1t = W1.T.contiguous()
    c, err = G._column_step(W1t, Hinv1, 3, s, z, 4)
    w = W1[:, 3]
    q = quantize_codes(w, s, z, 4)
    e = (w - dequantize_codes(q, s, z)) / Hinv1[3, 3]
    want = W1.clone()
    want[:, 3:] -= e.unsqueeze(1).matmul(Hinv1[3, 3:].unsqueeze(0))  # the reference's update
    assert torch.equal(c, q) and torch.equal(err, e) and torch.equal(W1t.T, want)


def test_wide_blocks_on_a_gpu_replay_the_graph(monkeypatch):
    """The Triton block keeps a block's columns in registers (at most 256): on a GPU a wider block
    (chapter 3 runs whole rows of 896 or 4864 columns as one) goes to the CUDA-graph replay, and
    asking the kernel for one directly is a one-line error."""
    from types import SimpleNamespace

    from qtutor.runtime import kernels

    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(G, "BLOCK_LOOP", "auto")
    on_gpu = lambda cols: SimpleNamespace(is_cuda=True, shape=(64, cols))  # noqa: E731
    if torch.version.hip is None:
        assert G._block_loop_kind(on_gpu(128)) == "triton"
    assert G._block_loop_kind(on_gpu(4864)) == "cuda-graph"
    assert G._block_loop_kind(torch.zeros(4, 8)) == "eager"
    pytest.importorskip("triton")
    from qtutor.runtime.triton_gptq import gptq_block

    with pytest.raises(qtutor.QtutorError, match="at most 256 columns"):
        gptq_block(torch.zeros(300, 4), torch.eye(300), torch.ones(300, 4), torch.zeros(300, 4), 4)
