"""The fast decode harness (static KV cache; CUDA graphs on CUDA) and the chunked perplexity loss."""

import pytest
import torch

import qtutor
from conftest import tiny_model
from qtutor.runtime.decode import StaticDecoder, fast_decode_latency
from qtutor.eval.latency import greedy_decode
from qtutor.quant.nf4 import NF4Config


def varied_model(family):
    """Larger random weights than the default init, so that greedy decoding does not just repeat
    one token and a wrong cache position or mask would change the output."""
    return tiny_model(family, initializer_range=0.3)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_static_decoder_equals_plain_greedy(family):
    model = varied_model(family)
    prompt = torch.randint(0, 128, (7,), generator=torch.Generator().manual_seed(0))
    ref, _, _ = greedy_decode(model, prompt, 24)
    assert len(set(ref.tolist())) > 8  # the test has teeth
    dec = StaticDecoder(model, max_len=40)
    out, _, _ = dec.generate(prompt, 24)
    assert torch.equal(out, ref)
    out2, _, _ = dec.generate(prompt[:3], 24)  # the stale cache of a longer run must not leak in
    assert torch.equal(out2, greedy_decode(model, prompt[:3], 24)[0])


def test_static_decoder_with_quantized_layers():
    model = varied_model("qwen2")
    qtutor.quantize(model, "rtn_int4", qtutor.RTNConfig(4, 32))
    prompt = torch.randint(0, 128, (5,), generator=torch.Generator().manual_seed(1))
    out, _, _ = StaticDecoder(model, 30).generate(prompt, 16)
    assert torch.equal(out, greedy_decode(model, prompt, 16)[0])
    r = fast_decode_latency(model, prompt, new_tokens=3, runs=1)
    assert r.kernels == {}  # the reference forward records no kernel


@pytest.mark.skipif(
    not __import__("qtutor.runtime.kernels").runtime.kernels.tinygemm_available("cpu"),
    reason="no _weight_int4pack_mm_for_cpu",
)
def test_fast_decode_reports_the_decode_step_kernels():
    from qtutor.runtime import kernels

    model = varied_model("llama")
    qtutor.quantize(model, "rtn_int4", qtutor.RTNConfig(4, 32))
    kernels.accelerate(model, "tinygemm")
    prompt = torch.randint(0, 128, (5,), generator=torch.Generator().manual_seed(1))
    r = fast_decode_latency(model, prompt, new_tokens=6, runs=1)
    assert r.kernels == {"Int4TinyGemmLinear": "aten._weight_int4pack_mm_for_cpu"}
    out, _, _ = StaticDecoder(model, 30).generate(prompt, 16)
    assert torch.equal(out, greedy_decode(model, prompt, 16)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_the_module(dtype):
    from qtutor.runtime.decode import _rms_norm

    norm = tiny_model("qwen2").to(dtype).model.norm
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 64, dtype=dtype) * 3
    torch.testing.assert_close(_rms_norm(norm, x), norm(x))


def test_fast_decode_latency_fields():
    model = tiny_model("llama")
    r = fast_decode_latency(model, torch.arange(6), new_tokens=4, runs=2)
    assert r.ms_per_token > 0 and len(r.runs_ms_per_token) == 2 and r.new_tokens == 4
    assert (r.device, r.dtype, r.method, r.cuda_graph) == ("cpu", "float32", "static-cache+fused", False)
    r = fast_decode_latency(model, torch.arange(6), new_tokens=4, runs=1, fuse=False)
    assert r.method == "static-cache"


@pytest.mark.parametrize("method", ["fp16_baseline", "rtn_int4", "qlora_nf4"])
def test_stacked_projections_decode_the_same_tokens(method):
    """q/k/v and gate/up stacked into one layer each (where the format allows) change nothing."""
    model = varied_model("qwen2")
    if method != "fp16_baseline":
        # NF4 stacks in rows that end on a second-level block: 4 blocks of 64 here (256 at 0.5B)
        cfg = qtutor.RTNConfig(4, 32) if method == "rtn_int4" else NF4Config(double_quant_block_size=4)
        qtutor.quantize(model, method, cfg)
    prompt = torch.randint(0, 128, (5,), generator=torch.Generator().manual_seed(3))
    fused, apart = StaticDecoder(model, 30), StaticDecoder(model, 30, fuse=False)
    n_layers = len(model.model.layers)
    assert len(fused.fused) == 2 * n_layers and len(apart.fused) == 0
    if __import__("qtutor.runtime.kernels").runtime.kernels.triton_available():  # so the fused glue can run
        assert fused._glue_reason() is None and apart._glue_reason() is None  # apart: gate, up, then cat
    out = fused.generate(prompt, 16)[0]
    assert torch.equal(out, apart.generate(prompt, 16)[0])
    assert torch.equal(out, greedy_decode(model, prompt, 16)[0])


def test_fast_decode_errors():
    model = tiny_model("qwen2")
    with pytest.raises(qtutor.QtutorError, match="CUDA graphs need"):
        StaticDecoder(model, 16, cuda_graph=True)
    with pytest.raises(qtutor.QtutorError, match="exceed the cache"):
        StaticDecoder(model, 8).generate(torch.arange(6), 4)


def test_bench_fast_decode_option():
    from qtutor.bench import _latency
    from qtutor.cli import build_parser

    args = build_parser().parse_args(["--fast-decode", "--latency-tokens", "3", "--latency-runs", "1"])
    assert args.fast_decode is True and args.kernels == "auto"
    assert build_parser().parse_args([]).fast_decode is None  # default: on CUDA only
    r = _latency(tiny_model("qwen2"), torch.arange(5), args, torch.device("cpu"))
    assert r.method == "static-cache+fused"


def test_chunked_loss_equals_full_logits(monkeypatch):
    from qtutor.eval import ppl

    model = tiny_model("qwen2")
    windows = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(ppl, "LOGIT_CHUNK_ELEMENTS", 128 * 7)  # 7 rows per chunk, a ragged last one
    chunked = ppl._window_nll(model, windows, 31)
    monkeypatch.setattr(ppl, "_plain_head", lambda m: None)
    full = ppl._window_nll(model, windows, 31)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["none", "triton", "tinygemm"])
def test_cuda_graph_decode_equals_eager(backend):
    """The captured graph replays exactly the eager step (same kernels, same inputs)."""
    from qtutor.runtime import kernels

    model = varied_model("qwen2").cuda()
    if backend != "none":
        if backend == "triton" and not kernels.triton_available():
            pytest.skip("triton is not installed")
        if backend == "tinygemm":  # tinygemm's CUDA kernel takes bf16 activations
            model = model.to(torch.bfloat16)
        qtutor.quantize(model, "rtn_int4", qtutor.RTNConfig(4, 32))
        assert kernels.accelerate(model, backend)["converted"]
    prompt = torch.randint(0, 128, (7,), generator=torch.Generator().manual_seed(0))
    eager, _, _ = StaticDecoder(model, 40, cuda_graph=False).generate(prompt, 24)
    graph, _, _ = StaticDecoder(model, 40, cuda_graph=True).generate(prompt, 24)
    assert torch.equal(eager, graph)
    if backend == "none":  # fp32 on the GPU: also the Hugging Face loop's tokens
        assert torch.equal(graph.cpu(), greedy_decode(model, prompt, 24)[0].cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["smoothquant_w8a8", "qlora_nf4"])
def test_cuda_glue_decode_with_codes_and_stacked_nf4(method):
    """On the GPU, compiled: W8A8 fed its codes by the glue, and NF4 stacked with one offset per
    second-level block, captured in a CUDA graph, decode the tokens of the plain eager step."""
    from qtutor.runtime import kernels

    if not kernels.triton_available():
        pytest.skip("triton is not installed")
    model = tiny_model("qwen2", initializer_range=0.3, head_dim=16).cuda()
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    cfg = NF4Config(double_quant_block_size=4) if method == "qlora_nf4" else None
    qtutor.quantize(model, method, cfg, calib=calib if method == "smoothquant_w8a8" else None)
    assert kernels.accelerate(model, "triton")["converted"]
    prompt = torch.randint(0, 128, (7,), generator=torch.Generator().manual_seed(0))
    fast = StaticDecoder(model, 40, glue=True, cuda_graph=True)
    assert fast.glue and len(fast.fused) == 2 * len(model.model.layers)
    plain = StaticDecoder(model, 40, glue=False, cuda_graph=False)
    assert torch.equal(fast.generate(prompt, 24)[0], plain.generate(prompt, 24)[0])


# --------------------------------------------------------------------------- fused glue (Triton)
# On CPU the glue kernels run in Triton's interpreter (same source as on the GPU); skipped where
# triton is missing, and on CUDA machines, where the interpreter would break later compilation.
needs_interpreter = pytest.mark.skipif(
    not __import__("qtutor.runtime.kernels").runtime.kernels.triton_available() or torch.cuda.is_available(),
    reason="Triton interpreter tests run on CPU-only machines",
)
# Triton's interpreter trips numpy's deprecation of array-to-scalar conversion; not ours
interp_warning = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


_COMPILE_GLUE_SM90 = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qtutor.runtime import triton_glue as tg

def build(fn, sig, const, warps=4):
    names = list(sig) + list(const)
    sig = {**sig, **{k: "constexpr" for k in const}}
    src = ASTSource(fn=tg._GLUE_JIT[fn], signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    except Exception as e:
        sys.exit(f"{fn.__name__} {const}: {str(e).splitlines()[-1]}")

ptrs = lambda *n: {k: t for k, t in zip(n[::2], n[1::2])}
for quant in (False, True):
    build(tg._add_rms_norm_kernel,
          {**ptrs("h_ptr", "*fp16", "r_ptr", "*fp16", "w_ptr", "*fp16", "x_ptr", "*fp16", "q_ptr", "*i8",
                  "s_ptr", "*fp32"), "D": "i32", "eps": "fp32"},
          {"HAS_RES": True, "QUANT": quant, "BLOCK_D": 1024})
build(tg._silu_mul_kernel, {"gu_ptr": "*fp16", "y_ptr": "*fp16", "I": "i32"}, {"BLOCK": 1024})
build(tg._silu_mul_quant_kernel,
      {"gu_ptr": "*fp16", "y_ptr": "*fp16", "q_ptr": "*i8", "s_ptr": "*fp32", "I": "i32"},
      {"BLOCK": tg.SILU_QUANT_BLOCK}, warps=8)
build(tg._rope_cache_kernel,
      {**ptrs("qkv_ptr", "*fp16", "cos_ptr", "*fp32", "sin_ptr", "*fp32", "pos_ptr", "*i64", "q_ptr", "*fp16",
              "kc_ptr", "*fp16", "vc_ptr", "*fp16"), "NH": "i32", "NKV": "i32", "SLOTS": "i32"}, {"HD": 64})
build(tg._decode_attention_kernel,
      {**ptrs("q_ptr", "*fp16", "kc_ptr", "*fp16", "vc_ptr", "*fp16", "pos_ptr", "*i64", "o_ptr", "*fp16"),
       "SLOTS": "i32", "scale": "fp32", "G": "i32"}, {"HD": 64, "BLOCK_G": 16, "BLOCK_L": 64})
build(tg._rope_attention_kernel,
      {**ptrs("qkv_ptr", "*fp16", "cos_ptr", "*fp32", "sin_ptr", "*fp32", "pos_ptr", "*i64", "kc_ptr", "*fp16",
              "vc_ptr", "*fp16", "o_ptr", "*fp16"), "NH": "i32", "NKV": "i32", "SLOTS": "i32", "scale": "fp32",
       "G": "i32"}, {"HD": 64, "BLOCK_G": 16, "BLOCK_L": 64})
print("compiled glue")
"""


@needs_interpreter
def test_glue_kernels_compile_for_sm90(tmp_path):
    """Every glue kernel, the W8A8-quantizing variants included, compiles for an H100 (sm_90)
    with the ptxas Triton ships, in a fresh process (the interpreter tests patch triton.language)."""
    from conftest import run_fresh_python

    assert "compiled glue" in run_fresh_python(_COMPILE_GLUE_SM90, tmp_path)


@needs_interpreter
@interp_warning
def test_glue_kernels_equal_their_torch_definitions():
    from qtutor.runtime import triton_glue as tk

    g = torch.Generator().manual_seed(0)
    h, r, w = (torch.randn(3, 40, generator=g) for _ in range(3))
    want_h = h + r
    want_x = torch.nn.functional.rms_norm(want_h, (40,), w[0], eps=1e-6)
    x = tk.add_rms_norm(h, r, w[0], 1e-6)  # h is updated in place
    torch.testing.assert_close(h, want_h)
    torch.testing.assert_close(x, want_x)
    gu = torch.randn(1, 2 * 50, generator=g)
    torch.testing.assert_close(tk.silu_mul(gu), torch.nn.functional.silu(gu[:, :50]) * gu[:, 50:])

    # the W8A8 variants: the same output, plus the codes and step quantize_row computes from it
    from qtutor.runtime.triton_gemv import quantize_row

    for I in (50, 200):  # one block of 64 on the CPU, and several (the row read back)
        gu = torch.randn(1, 2 * I, generator=g) * 4
        y, q, s = tk.silu_mul(gu, quantize=True)
        assert torch.equal(y, tk.silu_mul(gu)) and q.dtype == torch.int8
        q_ref, s_ref = quantize_row(y)
        assert torch.equal(q.reshape(-1), q_ref) and torch.equal(s, s_ref)
    h2 = torch.randn(1, 1, 40, generator=g)
    x2, q, s = tk.add_rms_norm(h2.clone(), r[:1], w[0], 1e-6, quantize=True)
    assert torch.equal(x2, tk.add_rms_norm(h2.clone(), r[:1], w[0], 1e-6))
    q_ref, s_ref = quantize_row(x2)
    assert torch.equal(q.reshape(-1), q_ref) and torch.equal(s, s_ref)

    nh, nkv, hd, slots, pos = 4, 2, 16, 24, 9
    qkv = torch.randn(1, 1, (nh + 2 * nkv) * hd, generator=g)
    ang = torch.randn(slots, hd // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    kc, vc = torch.randn(nkv, slots, hd, generator=g), torch.randn(nkv, slots, hd, generator=g)
    kc0, vc0 = kc.clone(), vc.clone()
    p = torch.tensor([pos])
    q = tk.rope_cache(qkv, cos, sin, p, kc, vc, nh, nkv)
    heads = qkv.view(nh + 2 * nkv, hd)
    rot = (
        heads[: nh + nkv] * cos[pos]
        + torch.cat([-heads[: nh + nkv, hd // 2 :], heads[: nh + nkv, : hd // 2]], -1) * sin[pos]
    )
    torch.testing.assert_close(q, rot[:nh])
    torch.testing.assert_close(kc[:, pos], rot[nh:])
    torch.testing.assert_close(vc[:, pos], heads[nh + nkv :])
    others = torch.arange(slots) != pos
    assert torch.equal(kc[:, others], kc0[:, others]) and torch.equal(vc[:, others], vc0[:, others])

    o = tk.decode_attention(q, kc, vc, p, 0.25)  # slots 0..pos only
    qg = q.view(nkv, nh // nkv, hd)
    att = torch.softmax(0.25 * qg @ kc[:, : pos + 1].transpose(1, 2), -1) @ vc[:, : pos + 1]
    torch.testing.assert_close(o, att.reshape(-1), rtol=1e-5, atol=1e-5)
    # both in one launch (what the decode step runs): the same numbers, the same cache rows
    kc2, vc2 = kc0.clone(), vc0.clone()
    assert torch.equal(tk.rope_attention(qkv, cos, sin, p, kc2, vc2, nh, 0.25), o)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)


@needs_interpreter
@interp_warning
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_fused_glue_decodes_the_same_tokens(family):
    model = tiny_model(family, initializer_range=0.3, head_dim=16)
    prompt = torch.randint(0, 128, (5,), generator=torch.Generator().manual_seed(4))
    dec = StaticDecoder(model, 80, glue=True)  # 80 slots: attention loops over two blocks of 64
    assert dec.glue
    out = dec.generate(prompt, 70)[0]
    assert torch.equal(out, greedy_decode(model, prompt, 70)[0])
    assert not StaticDecoder(model, 30).glue  # on CPU the default is off
    apart = StaticDecoder(model, 30, glue=True, fuse=False)  # projections apart, gate and up concatenated
    assert apart.glue and torch.equal(apart.generate(prompt, 12)[0], out[:12])


@needs_interpreter
@interp_warning
@pytest.mark.parametrize("fuse", [True, False])
def test_fused_glue_feeds_w8a8_its_codes(fuse, monkeypatch):
    """With W8A8 layers on the Triton GEMV, the norms and SiLU quantize their outputs per token
    in the same kernel and the GEMVs read those codes; o_proj (after attention) quantizes its
    own input. The tokens are those of the step without the glue."""
    from qtutor.runtime import kernels
    from qtutor.runtime.kernels import _TritonW8A8

    model = tiny_model("qwen2", initializer_range=0.3, head_dim=16)
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    qtutor.quantize(model, "smoothquant_w8a8", calib=calib)
    kernels.accelerate(model, "triton", kernel_on_cpu=True)
    seen = []
    codes = _TritonW8A8.forward_codes
    monkeypatch.setattr(
        _TritonW8A8, "forward_codes", lambda self, *a: seen.append(self.out_features) or codes(self, *a)
    )
    prompt = torch.randint(0, 128, (5,), generator=torch.Generator().manual_seed(4))
    glue = StaticDecoder(model, 20, glue=True, fuse=fuse)
    out = glue.generate(prompt, 4)[0]
    assert torch.equal(out, StaticDecoder(model, 20, glue=False, fuse=fuse).generate(prompt, 4)[0])
    c = model.config
    kv = c.num_key_value_heads * 16
    qkv = [c.hidden_size + 2 * kv] if fuse else [c.hidden_size, kv, kv]
    gate_up = [2 * c.intermediate_size] if fuse else [c.intermediate_size] * 2
    per_layer = qkv + gate_up + [c.hidden_size]  # all but o_proj
    assert sorted(seen) == sorted(per_layer * c.num_hidden_layers * 3)  # 3 one-token steps


def test_fused_glue_refuses_what_it_does_not_implement():
    model = tiny_model("qwen2", hidden_act="gelu")
    with pytest.raises(qtutor.QtutorError, match="fused decode glue unavailable"):
        StaticDecoder(model, 16, glue=True)
