"""Fast matmul paths (qtutor.runtime.kernels): each equals the reference forward, and memory stays honest.

tinygemm runs through its CPU twin (``_weight_int4pack_mm_for_cpu``); the Triton kernels run in
Triton's interpreter on CPU tensors (skipped where triton is not installed).
"""

import pytest
import torch
import torch.nn as nn

import qtutor
from qtutor.runtime import kernels
from qtutor.runtime.speed import linear_bits
from qtutor.quant.rtn import RTNConfig, UniformLinear

# Triton's interpreter trips numpy's deprecation of array-to-scalar conversion; not ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")
needs_tinygemm = pytest.mark.skipif(
    not kernels.tinygemm_available("cpu"), reason="this torch has no _weight_int4pack_mm_for_cpu"
)


def uniform(n, k, gs, sym=False, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    if bias:
        nn.init.normal_(lin.bias, std=0.1)
    return UniformLinear.from_float(lin, RTNConfig(4, gs, sym))


@torch.no_grad()
def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# --------------------------------------------------------------------------- tinygemm (CPU twin)
@needs_tinygemm
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_tinygemm_forward_equals_reference(sym, gs):
    layer = uniform(48, 256, gs, sym)
    fast = kernels.Int4TinyGemmLinear.from_uniform(layer)
    x = torch.randn(3, 5, 256)
    # bf16 activations, bf16 scale and float zero: agreement to bf16 rounding
    assert rel(fast(x), layer(x)) < 1e-2
    assert rel(fast.dequantize(), layer.dequantize()) < 5e-3
    assert fast.last_kernel == "aten._weight_int4pack_mm_for_cpu"


@needs_tinygemm
def test_tinygemm_holds_only_its_layout():
    layer = uniform(32, 256, 128)
    fast = kernels.Int4TinyGemmLinear.from_uniform(layer)
    names = {n for n, b in fast.named_buffers() if b is not None}
    assert names == {"weight_int4pack", "scales_and_zeros", "bias"}
    # 4 bits per weight + (bf16 scale, bf16 zero) per group of 128
    assert fast.bits_per_weight == pytest.approx(4 + 32 / 128)
    assert fast.nbytes == 32 * 256 // 2 + 2 * 32 * 4 + 32 * 4  # codes + scales/zeros + fp32 bias


@needs_tinygemm
def test_accelerate_tinygemm_model_bytes_and_outputs():
    from conftest import tiny_model

    model = tiny_model("qwen2")
    qtutor.quantize(model, "rtn_int4", RTNConfig(4, 32))
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    res = kernels.accelerate(model, "tinygemm")
    assert len(res["converted"]) == 14 and not res["skipped"]
    assert all(
        isinstance(m, kernels.Int4TinyGemmLinear)
        for m in model.modules()
        if isinstance(m, qtutor.quant.QuantizedLinear)
    )
    assert not any(isinstance(m, UniformLinear) for m in model.modules())  # no second copy kept
    assert linear_bits(model) == pytest.approx(4 + 32 / 32)
    assert rel(model(ids).logits, ref) < 2e-2


def test_accelerate_skips_with_reasons_and_rejects_bad_backend():
    from conftest import tiny_model

    model = tiny_model("qwen2")
    qtutor.quantize(model, "rtn_int4", RTNConfig(3, 32))
    res = kernels.accelerate(model, "tinygemm")
    assert not res["converted"] and set(res["skipped"].values()) == {"3-bit codes (tinygemm is 4-bit)"}
    assert kernels.accelerate(model, "none") == {"backend": "none", "converted": {}, "skipped": {}}
    with pytest.raises(qtutor.QtutorError, match="unknown kernel backend"):
        kernels.accelerate(model, "cutlass")


# --------------------------------------------------------------------------- CPU kernels
needs_cpu_lut = pytest.mark.skipif(
    __import__("qtutor.runtime.cpu_lut").runtime.cpu_lut.available() is not None,
    reason="no C compiler for the CPU LUT kernel",
)


def palettized(n, k, rows, scaled=True, bias=True, seed=0):
    from qtutor.quant.palettize import LUTWeight, PalettizedLinear

    g = torch.Generator().manual_seed(seed)
    q = LUTWeight(
        torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
        torch.randn(-(-n // rows), 16, generator=g).half(),
        (torch.rand(n, generator=g) + 0.5).half() if scaled else None,
        4,
        rows,
    )
    return PalettizedLinear(q, torch.randn(n, generator=g) if bias else None)


# The C kernel multiplies the same float32 numbers as the reference forward (LUT entry x scale x
# input) and sums them in another order: equal to float32 rounding, ~1e-7 relative for these sizes.
@needs_cpu_lut
@pytest.mark.parametrize(
    "n,k,rows,scaled,bias",
    [(32, 256, 16, True, True), (40, 70, 16, False, True), (48, 96, 48, True, False), (16, 2, 16, True, True)],
)
def test_cpu_palette_gemv_equals_reference(n, k, rows, scaled, bias):
    """Widths with and without a tail of codes after the last 32 (the vector step), the last LUT
    serving fewer rows, with and without scales and bias."""
    from qtutor.runtime import cpu_lut

    layer = palettized(n, k, rows, scaled, bias)
    x = torch.randn(k)
    y = cpu_lut.palette_gemv(x, layer.qweight, layer.lut, layer.scales, layer.bias, layer.rows_per_lut)
    torch.testing.assert_close(y, layer(x[None])[0], rtol=1e-5, atol=1e-5)


@needs_cpu_lut
@pytest.mark.parametrize("double_quant,block,k", [(True, 64, 192), (False, 64, 128), (True, 32, 96), (True, 16, 48)])
def test_cpu_nf4_gemv_equals_reference(double_quant, block, k):
    """NF4 (high nibble first, blocks along the rows), the absmax rebuilt from the double
    quantization inside the kernel; 300 rows hold several second-level blocks of 256 absmaxes."""
    from qtutor.quant.nf4 import NF4Config, NF4Linear

    torch.manual_seed(0)
    layer = NF4Linear.from_float(nn.Linear(k, 300), NF4Config(block_size=block, double_quant=double_quant))
    if double_quant:
        assert layer.absmax2.numel() > 1
    else:
        assert layer.absmax2 is None
    res = kernels.accelerate(nn.Sequential(layer), "cpu")
    assert res["converted"] == {"0": "cpu nf4_gemv (C)"} and type(layer).__name__ == "CpuNF4Linear"
    x = torch.randn(1, k)
    torch.testing.assert_close(layer(x), layer.forward_reference(x), rtol=1e-5, atol=1e-5)
    assert layer.last_kernel == "cpu nf4_gemv (C)"
    layer(torch.randn(3, k))  # several rows: the reference forward
    assert layer.last_kernel == "reference"


@needs_cpu_lut
def test_cpu_lut_kernel_on_two_threads(monkeypatch):
    from qtutor.runtime import cpu_lut

    monkeypatch.setattr(cpu_lut, "PARALLEL_MIN_WEIGHTS", 0)
    layer = palettized(64, 128, 16)
    x = torch.randn(128)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = cpu_lut.palette_gemv(x, layer.qweight, layer.lut, layer.scales, layer.bias, layer.rows_per_lut)
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(y, layer(x[None])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sym", [True, False])
def test_int8_weight_only_equals_reference(sym):
    """``aten._weight_int8pack_mm`` with bfloat16 activations, scales and output: the result
    differs from the float32 reference by bfloat16 rounding (2^-9 relative per rounding; the
    product of a 256-long row averages it to ~3e-3)."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 48)
    layer = UniformLinear.from_float(lin, RTNConfig(8, 0, sym))
    fast = kernels.Int8WeightOnlyLinear.from_uniform(layer)
    x = torch.randn(2, 3, 256)
    assert rel(fast(x), layer(x)) < 1e-2 and fast.last_kernel == "aten._weight_int8pack_mm"
    assert rel(fast.dequantize(), layer.dequantize()) < 4e-3  # bf16 scales
    assert rel(fast(x), fast.forward_reference(x)) < 1e-2
    names = {n for n, b in fast.named_buffers() if b is not None}
    assert names == {"weight_int8", "scales", "bias"} | (set() if sym else {"zero_term"})
    assert fast.bits_per_weight == pytest.approx(8 + (16 if sym else 48) / 256)  # + bf16 scale (+ fp32 zero term)
    grouped = UniformLinear.from_float(lin, RTNConfig(8, 64, True))
    with pytest.raises(qtutor.QtutorError, match="one scale per output channel"):
        kernels.Int8WeightOnlyLinear.from_uniform(grouped)


CPU_KERNELS = {
    "rtn_int8": ("Int8WeightOnlyLinear", "aten._weight_int8pack_mm", 2e-2),
    "rtn_int4": ("Int4TinyGemmLinear", "aten._weight_int4pack_mm_for_cpu", 2e-2),
    "palettization_4bit": ("CpuPalettizedLinear", "cpu palette_gemv (C)", 1e-5),
    "qlora_nf4": ("CpuNF4Linear", "cpu nf4_gemv (C)", 1e-5),
}


@needs_cpu_lut
@needs_tinygemm
@pytest.mark.parametrize("method", list(CPU_KERNELS))
def test_accelerate_cpu_converts_every_format(method):
    """``accelerate(model, "auto")`` on the CPU: every linear of the model gets its CPU kernel;
    one decoding step equals the reference forward (to bfloat16 rounding for the PyTorch int
    kernels, which take bfloat16 activations, to float32 rounding for the C kernels)."""
    from conftest import tiny_model
    from qtutor.runtime.decode import _kernels

    model = tiny_model("qwen2", hidden_size=128, intermediate_size=256)
    qtutor.quantize(model, method, RTNConfig(4, 64) if method == "rtn_int4" else None)
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    res = kernels.accelerate(model, "auto")
    cls, kernel, tol = CPU_KERNELS[method]
    assert res["backend"] == "cpu" and len(res["converted"]) == 14 and not res["skipped"]
    assert set(res["converted"].values()) == {kernel}
    assert rel(model(ids).logits, ref) < tol
    assert _kernels(model) == {cls: kernel}  # what the bench records
    assert kernels.accelerate(model, "auto")["converted"] == {}  # converted once


def test_accelerate_cpu_skips_with_reasons():
    from qtutor.quant.nf4 import NF4Config, NF4Linear
    from conftest import tiny_model

    torch.manual_seed(0)
    model = nn.Sequential(
        NF4Linear.from_float(nn.Linear(96, 8), NF4Config(block_size=64)),  # blocks cross rows
        UniformLinear.from_float(nn.Linear(64, 8), RTNConfig(3, 32)),
        UniformLinear.from_float(nn.Linear(64, 8), RTNConfig(8, 32)),
    )
    skipped = kernels.accelerate(model, "cpu")["skipped"]
    assert "do not divide the rows" in skipped["0"] and "3-bit" in skipped["1"] and "one scale per" in skipped["2"]
    w8a8 = tiny_model("qwen2")
    qtutor.quantize(w8a8, "smoothquant_w8a8", calib=torch.randint(0, 128, (2, 16)))
    assert set(kernels.accelerate(w8a8, "auto")["skipped"].values()) == {
        "its own forward is already a CPU integer kernel (torch._int_mm)"
    }


# --------------------------------------------------------------------------- Triton (interpreter)
# Triton's interpreter patches triton.language for the rest of the process, after which real
# GPU compilation fails: on a machine with CUDA the compiled kernels are tested below instead.
needs_interpreter = pytest.mark.skipif(
    not kernels.triton_available() or torch.cuda.is_available(),
    reason="Triton interpreter tests run on CPU-only machines",
)


@needs_interpreter
@pytest.mark.parametrize("sym,bias,gs,k", [(False, True, 32, 224), (True, False, 64, 256), (False, False, 16, 80)])
def test_triton_int4_gemv_equals_reference(sym, bias, gs, k):
    layer = uniform(24, k, gs, sym, bias)
    x = torch.randn(k)
    y = kernels.int4_gemv(x, layer.qweight, layer.scales, layer.qzeros, layer.bias, gs)
    torch.testing.assert_close(y, layer(x[None])[0], rtol=1e-4, atol=1e-4)
    # a block/step configuration whose groups-per-step do not divide the group count (tail mask)
    y = kernels.int4_gemv(
        x, layer.qweight, layer.scales, layer.qzeros, layer.bias, gs, config={"BLOCK_N": 16, "GPI": 4}
    )
    torch.testing.assert_close(y, layer(x[None])[0], rtol=1e-4, atol=1e-4)


def lut_reference(idx, lut, scales, bias, rows):
    W = lut.float().repeat_interleave(rows, 0)[: idx.shape[0]].gather(1, idx.long())
    if scales is not None:
        W = W * scales.float()[:, None]
    return lambda x: W @ x + (0 if bias is None else bias)


@needs_interpreter
@pytest.mark.parametrize("mode", ["prmt", "load"])
@pytest.mark.parametrize("n,k,rows,scaled", [(32, 96, 16, True), (48, 200, 48, False), (40, 64, 16, True)])
def test_triton_lut_gemv_equals_reference(mode, n, k, rows, scaled):
    """Generic layout: indices (out, in/2) low nibble first, LUT (n_luts, 16), row r -> LUT r // rows."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    lut = torch.randn(-(-n // rows), 16, generator=g).half()  # (40, 16): the last LUT serves 8 rows
    scales = (torch.rand(n, generator=g) + 0.5).half() if scaled else None
    bias = torch.randn(n, generator=g)
    x = torch.randn(k, generator=g)
    y = kernels.lut_gemv(x, qtutor.quant.pack_codes(idx, 4), lut, scales, bias, rows, mode)
    torch.testing.assert_close(y, lut_reference(idx, lut, scales, bias, rows)(x), rtol=1e-4, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("prefetch", [0, 1])
def test_prmt_lut_gemv_over_several_tiles(prefetch):
    """Rows longer than one tile (40 words of 16), with and without loading a tile ahead."""
    g = torch.Generator().manual_seed(3)
    n, k, rows = 24, 8 * 40, 16
    idx = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    lut = torch.randn(2, 16, generator=g).half()
    x = torch.randn(k, generator=g)
    y = kernels.lut_gemv(
        x,
        qtutor.quant.pack_codes(idx, 4),
        lut,
        None,
        None,
        rows,
        "prmt",
        config={"BLOCK_N": 4, "BLOCK_W": 16, "PREFETCH": prefetch},
    )
    torch.testing.assert_close(y, lut_reference(idx, lut, None, None, rows)(x), rtol=1e-4, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize(
    "mode,table", [("pairs", "lut"), ("load", "pairs"), ("nearest", "lut"), ("prmt", "f32"), ("prmt", "odd")]
)
def test_lut_gemv_refuses_a_table_of_the_wrong_kind(mode, table):
    k = 12 if table == "odd" else 16  # prmt reads eight indices per 32-bit word
    idx = torch.zeros(16, k, dtype=torch.uint8)
    lut = torch.zeros(1, 16).half()
    lut = {"pairs": torch.zeros(1, 256, dtype=torch.int32), "f32": lut.float()}.get(table, lut)
    with pytest.raises(qtutor.QtutorError, match="lut_gemv mode"):
        kernels.lut_gemv(torch.zeros(k), qtutor.quant.pack_codes(idx, 4), lut, None, None, 16, mode)


@needs_interpreter
@pytest.mark.parametrize(
    "k,lut_dtype,mode", [(12, torch.float16, "load"), (16, torch.float32, "load"), (16, torch.float16, "prmt")]
)
def test_accelerate_prmt_falls_back_to_load(k, lut_dtype, mode):
    """prmt reads eight indices per 32-bit word from an fp16 LUT: a row of 12 indices, or a LUT
    turned float32 (``model.float()`` converts buffers), gets the 'load' kernel."""
    palettize = pytest.importorskip("qtutor.quant.palettize")
    g = torch.Generator().manual_seed(0)
    q = palettize.LUTWeight(
        torch.randint(0, 16, (16, k), generator=g, dtype=torch.uint8), torch.randn(1, 16, generator=g).half(), None, 4
    )
    layer = palettize.PalettizedLinear(q)
    layer.lut = layer.lut.to(lut_dtype)
    res = kernels.accelerate(nn.Sequential(layer), "triton", lut_mode="prmt", kernel_on_cpu=True)
    assert res["converted"] == {"0": f"triton lut_gemv ({mode})"} and layer.lut_mode == mode
    x = torch.randn(1, k)
    torch.testing.assert_close(layer(x), layer.forward_reference(x), rtol=1e-3, atol=1e-3)


_COMPILE_SM90 = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import qtutor.runtime.triton_gemv as tk
sig = {"x_ptr": "*fp16", "w_ptr": "*u8", "lut_ptr": "*fp16", "s_ptr": "*fp16", "b_ptr": "*fp16",
       "y_ptr": "*fp16", "N": "i32", "K": "i32", "stride_w": "i32", "ROWS_PER_LUT": "i32",
       "HAS_SCALES": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
names = list(sig)
for cfg in tk._LUT_CONFIGS:  # the indexed-load fallback
    const = {"HAS_SCALES": True, "HAS_BIAS": False, **cfg.kwargs}
    src = ASTSource(fn=tk._lut_jit, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    except Exception as e:
        sys.exit(f"{cfg}: {str(e).splitlines()[-1]}")
sig = {"x_ptr": "*fp16", "q_ptr": "*i32", "lut_ptr": "*i32", "s_ptr": "*fp16", "b_ptr": "*fp16",
       "y_ptr": "*fp16", "N": "i32", "KW": "i32", "stride_q": "i32", "ROWS_PER_LUT": "i32",
       "HAS_SCALES": "constexpr", "HAS_BIAS": "constexpr", "ASM": "constexpr",
       "BLOCK_N": "constexpr", "BLOCK_W": "constexpr", "PREFETCH": "constexpr"}
names = list(sig)
for cfg in tk._LUT_PRMT_CONFIGS:  # the prmt inline assembly goes through ptxas too
    const = {"HAS_SCALES": True, "HAS_BIAS": False, "ASM": True, **cfg.kwargs}
    src = ASTSource(fn=tk._lut_prmt_jit, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    except Exception as e:
        sys.exit(f"{cfg}: {str(e).splitlines()[-1]}")
    assert "prmt.b32" in k.asm["ptx"]
sig = {"x_ptr": "*fp16", "q_ptr": "*i32", "lut_ptr": "*i32", "a_ptr": "*u8", "a2_ptr": "*fp32", "dyn_ptr": "*fp32",
       "off_ptr": "*fp32", "b_ptr": "*fp16", "y_ptr": "*fp16", "N": "i32", "KW": "i32", "DQ": "i32",
       "DOUBLE": "constexpr", "OFFSETS": "constexpr", "HAS_BIAS": "constexpr", "ASM": "constexpr",
       "WPB": "constexpr", "BLOCK_N": "constexpr", "BLOCK_W": "constexpr", "PREFETCH": "constexpr"}
names = list(sig)
for cfg in tk._NF4_CONFIGS:
  for offsets in (False, True):  # one offset per matrix, or a stacked layer's one per second-level block
    const = {"DOUBLE": True, "OFFSETS": offsets, "HAS_BIAS": False, "ASM": True, "WPB": 8, **cfg.kwargs}
    src = ASTSource(fn=tk._nf4_prmt_jit, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    except Exception as e:
        sys.exit(f"nf4 {cfg}: {str(e).splitlines()[-1]}")
    assert "prmt.b32" in k.asm["ptx"]
sig = {"qx_ptr": "*i8", "sx_ptr": "*fp32", "w_ptr": "*i8", "sw_ptr": "*fp32", "b_ptr": "*fp16", "y_ptr": "*fp16",
       "N": "i32", "K": "i32", "stride_w": "i32", "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr",
       "BLOCK_K": "constexpr"}
names = list(sig)
for cfg in tk._W8A8_CONFIGS:
    const = {"HAS_BIAS": True, **cfg.kwargs}
    src = ASTSource(fn=tk._w8a8_jit, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    except Exception as e:
        sys.exit(f"w8a8 {cfg}: {str(e).splitlines()[-1]}")
sig = {"x_ptr": "*fp16", "qx_ptr": "*i8", "sx_ptr": "*fp32", "K": "i32", "BLOCK_K": "constexpr"}
for block in (1024, tk.QUANTIZE_ROW_BLOCK):
    src = ASTSource(fn=tk._quantize_row_jit, signature=sig, constexprs={(4,): block})
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    except Exception as e:
        sys.exit(f"quantize_row {block}: {str(e).splitlines()[-1]}")
sig = {"x_ptr": "*fp16", "w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*fp16", "y_ptr": "*fp16",
       "N": "i32", "K": "i32", "stride_w": "i32", "HAS_ZEROS": "constexpr", "HAS_BIAS": "constexpr",
       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
names = list(sig)
for cfg in tk._INT8_CONFIGS:
    const = {"HAS_ZEROS": False, "HAS_BIAS": True, **cfg.kwargs}
    src = ASTSource(fn=tk._int8_jit, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    except Exception as e:
        sys.exit(f"int8 {cfg}: {str(e).splitlines()[-1]}")
print("compiled", len(tk._LUT_CONFIGS), len(tk._LUT_PRMT_CONFIGS))
"""


@needs_interpreter
def test_lut_configs_compile_for_sm90(tmp_path):
    """Every autotuning config of the LUT kernels, the prmt one with its inline assembly (which
    the interpreter replaces) and the indexed-load fallback, must compile for an H100 (sm_90):
    Triton compiles for a target without a GPU, with the ptxas it ships. In a fresh process: the
    interpreter of the other tests leaves triton.language patched."""
    from conftest import run_fresh_python

    stdout = run_fresh_python(_COMPILE_SM90, tmp_path)
    import qtutor.runtime.triton_gemv as tk

    assert f"compiled {len(tk._LUT_CONFIGS)} {len(tk._LUT_PRMT_CONFIGS)}" in stdout


@needs_interpreter
def test_accelerate_triton_swaps_forward_keeps_storage():
    from conftest import tiny_model

    model = tiny_model("llama")
    qtutor.quantize(model, "rtn_int4", RTNConfig(4, 32))
    layer = model.model.layers[0].mlp.down_proj
    before = {n: b.data_ptr() for n, b in layer.named_buffers()}
    nbytes, bpw = layer.nbytes, linear_bits(model)
    res = kernels.accelerate(model, "triton", kernel_on_cpu=True)
    assert len(res["converted"]) == 14
    assert isinstance(layer, UniformLinear) and type(layer).__name__ == "TritonUniformLinear"
    assert {n: b.data_ptr() for n, b in layer.named_buffers()} == before  # same bytes, nothing added
    assert layer.nbytes == nbytes and linear_bits(model) == bpw
    x = torch.randn(1, 1, layer.in_features)
    torch.testing.assert_close(layer(x), layer.forward_reference(x), rtol=1e-4, atol=1e-4)
    assert layer.last_kernel == "triton int4_gemv"
    layer(torch.randn(2, 3, layer.in_features))  # several rows: the reference forward
    assert layer.last_kernel == "reference"
    assert kernels.restore(model) == 14 and type(layer) is UniformLinear


@needs_interpreter
@pytest.mark.parametrize("mode", ["prmt", "load"])
def test_accelerate_triton_palettized_layer(mode):
    palettize = pytest.importorskip("qtutor.quant.palettize")
    g = torch.Generator().manual_seed(0)
    q = palettize.LUTWeight(
        torch.randint(0, 16, (32, 64), generator=g, dtype=torch.uint8),
        torch.randn(2, 16, generator=g).half(),
        torch.rand(32, generator=g).half(),
        4,
    )
    layer = palettize.PalettizedLinear(q, torch.randn(32, generator=g))
    model = nn.Sequential(layer)
    nbytes = layer.weight_nbytes
    res = kernels.accelerate(model, "triton", lut_mode=mode, kernel_on_cpu=True)
    assert list(res["converted"].values()) == [f"triton lut_gemv ({mode})"]
    assert layer.weight_nbytes == nbytes  # the kernel reads the layer's own storage
    x = torch.randn(1, 64)
    torch.testing.assert_close(layer(x), layer.forward_reference(x), rtol=1e-3, atol=1e-3)
    assert layer.last_kernel == "triton lut_gemv"
    assert kernels.restore(model) == 1 and layer.weight_nbytes == nbytes


# --------------------------------------------------------------------------- int8 and NF4 GEMVs (interpreter)
@needs_interpreter
@pytest.mark.parametrize("sym,bias,k", [(True, True, 200), (False, False, 64)])
def test_triton_int8_gemv_equals_reference(sym, bias, k):
    """Weight-only int8 (rtn_int8: one scale per row); ``q - z`` is exact and the sum is float32,
    so the kernel equals the float32 reference to summation order."""
    torch.manual_seed(0)
    layer = UniformLinear.from_float(nn.Linear(k, 24, bias=bias), RTNConfig(8, 0, sym))
    res = kernels.accelerate(nn.Sequential(layer), "triton", kernel_on_cpu=True)
    assert res["converted"] == {"0": "triton int8_gemv"} and type(layer).__name__ == "TritonUniformLinear"
    x = torch.randn(1, k)
    torch.testing.assert_close(layer(x), layer.forward_reference(x), rtol=1e-5, atol=1e-5)
    assert layer.last_kernel == "triton int8_gemv"
    y = kernels.int8_gemv(
        x[0], layer.qweight, layer.scales, layer.qzeros, layer.bias, config={"BLOCK_N": 16, "BLOCK_K": 128}
    )
    torch.testing.assert_close(y, layer.forward_reference(x)[0], rtol=1e-5, atol=1e-5)  # tails of rows and columns
    grouped = UniformLinear.from_float(nn.Linear(64, 8), RTNConfig(8, 32, True))
    assert "one scale per output channel" in kernels.accelerate(nn.Sequential(grouped), "triton")["skipped"]["0"]


@needs_interpreter
@pytest.mark.parametrize("double_quant,block,k,n", [(True, 64, 192, 300), (False, 64, 128, 40), (True, 32, 96, 37)])
def test_triton_nf4_gemv_equals_reference(double_quant, block, k, n):
    """NF4 through the register-LUT lookups (fp16 levels) with the absmax rebuilt from the double
    quantization in the kernel. The reference dequantizes with the float32 levels: the fp16 levels
    differ by at most 2^-11 relative, so the outputs agree to ~2e-4."""
    from qtutor.quant.nf4 import NF4Config, NF4Linear

    torch.manual_seed(0)
    layer = NF4Linear.from_float(nn.Linear(k, n), NF4Config(block_size=block, double_quant=double_quant))
    res = kernels.accelerate(nn.Sequential(layer), "triton", kernel_on_cpu=True)
    assert res["converted"] == {"0": "triton nf4_gemv (prmt)"} and type(layer).__name__ == "TritonNF4Linear"
    x = torch.randn(1, k)
    assert rel(layer(x), layer.forward_reference(x)) < 1e-3
    assert layer.last_kernel == "triton nf4_gemv (prmt)"
    cfg = {"BLOCK_N": 8, "BLOCK_W": 16, "PREFETCH": 0}  # a tile past the end of the rows
    y = kernels.nf4_gemv(
        x[0], layer.qweight, layer.absmax, layer.absmax2, layer.offset,
        __import__("qtutor.quant.nf4").quant.nf4._table("dynamic", "cpu") if double_quant else None,
        block, layer.double_quant_block_size, layer.bias, n, cfg,
    )  # fmt: skip
    assert rel(y, layer.forward_reference(x)[0]) < 1e-3
    odd = NF4Linear.from_float(nn.Linear(96, 8), NF4Config(block_size=64))
    assert "dividing in_features" in kernels.accelerate(nn.Sequential(odd), "triton")["skipped"]["0"]


# --------------------------------------------------------------------------- W8A8 GEMV
def w8a8_layer(n, k, bias=True, seed=0):
    from qtutor.quant.smoothquant import W8A8Linear

    torch.manual_seed(seed)
    return W8A8Linear.from_float(nn.Linear(k, n, bias=bias))


@needs_interpreter
@pytest.mark.parametrize("n,k,bias", [(48, 200, True), (24, 64, False)])
@pytest.mark.parametrize("scale", [1.0, 1e-7, 300.0])
def test_triton_w8a8_gemv_equals_int_mm_bitwise(n, k, bias, scale):
    """The kernel quantizes the row as the reference does (same codes, same scale) and sums the
    int8 products exactly, so it equals W8A8Linear's torch._int_mm forward bit for bit."""
    layer = w8a8_layer(n, k, bias)
    x = torch.randn(k, generator=torch.Generator().manual_seed(1)) * scale
    y = kernels.w8a8_gemv(x, layer.qweight, layer.weight_scales, layer.bias)
    ref = layer(x[None])[0]
    assert layer.last_kernel == "torch._int_mm"
    assert torch.equal(y, ref)


@needs_interpreter
def test_triton_w8a8_rounds_ties_to_even():
    """max|x| = 127 gives s_x = 1, so x itself holds the codes' ties: round(0.5) = 0,
    round(1.5) = round(2.5) = 2, round(-2.5) = -2 (torch.round); a weight of ones sums them."""
    from qtutor.quant.smoothquant import W8A8Linear

    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, 0.0])
    ones = torch.zeros(2, 8, dtype=torch.int8)
    ones[0, 1:] = 1  # row 0: the ties only
    ones[1, 0] = 1  # row 1: the 127
    layer = W8A8Linear(ones, torch.ones(2))
    y = kernels.w8a8_gemv(x, layer.qweight, layer.weight_scales, None)
    assert y.tolist() == [0 + 2 + 2 - 2 - 0 + 4 + 0, 127.0]


@needs_interpreter
def test_accelerate_converts_w8a8_layers():
    from conftest import tiny_model

    model = tiny_model("qwen2")
    g = torch.Generator().manual_seed(0)
    qtutor.quantize(model, "smoothquant_w8a8", calib=torch.randint(0, model.config.vocab_size, (2, 16), generator=g))
    layer = model.model.layers[0].mlp.down_proj
    before = {n: b.data_ptr() for n, b in layer.named_buffers()}
    res = kernels.accelerate(model, "triton", kernel_on_cpu=True)
    assert set(res["converted"].values()) == {"triton w8a8_gemv"} and len(res["converted"]) == 14
    assert type(layer).__name__ == "TritonW8A8Linear"
    assert {n: b.data_ptr() for n, b in layer.named_buffers()} == before
    x = torch.randn(1, 1, layer.in_features)
    y = layer(x)
    assert layer.last_kernel == "triton w8a8_gemv" and torch.equal(y, layer.forward_reference(x))
    a = model.model.layers[0].self_attn
    fused = kernels.fuse_rows([a.q_proj, a.k_proj, a.v_proj])
    assert type(fused).__name__ == "TritonW8A8Linear"
    x = torch.randn(1, 1, a.q_proj.in_features)
    torch.testing.assert_close(fused(x), torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1))
    assert kernels.restore(model) == 14 and type(layer).__name__ == "W8A8Linear"


def test_accelerate_skips_w8a8_with_per_tensor_activations():
    layer = w8a8_layer(16, 32)
    layer.act_quant = "per_tensor"
    res = kernels.accelerate(nn.Sequential(layer), "triton" if kernels.triton_available() else "none")
    assert not res["converted"]
    if kernels.triton_available():
        assert "per token" in res["skipped"]["0"]


# --------------------------------------------------------------------------- stacked rows (fuse_rows)
def _stack_case(kind, n_parts=(24, 8, 8), k=64):
    from qtutor.quant import nf4, palettize, smoothquant
    from qtutor.quant.base import FloatLinear

    torch.manual_seed(0)
    lins = [nn.Linear(k, n) for n in n_parts]
    make = {
        "linear": lambda m: m,
        "float": FloatLinear,
        "rtn_asym": lambda m: UniformLinear.from_float(m, RTNConfig(4, 32, False)),
        "rtn_sym": lambda m: UniformLinear.from_float(m, RTNConfig(4, 32, True)),
        "palettized": lambda m: palettize.PalettizedLinear.from_float(m, palettize.PalettizeConfig(group_size=8)),
        "w8a8": smoothquant.W8A8Linear.from_float,
        # double quantization in second-level blocks of 4 blocks of 64 codes (4 rows of 64)
        "nf4": lambda m: nf4.NF4Linear.from_float(m, nf4.NF4Config(double_quant_block_size=4)),
        "nf4_single": lambda m: nf4.NF4Linear.from_float(m, nf4.NF4Config(double_quant=False)),
    }[kind]
    return [make(m) for m in lins]


@pytest.mark.parametrize("kind", ["linear", "float", "rtn_asym", "rtn_sym", "palettized", "w8a8", "nf4", "nf4_single"])
def test_fuse_rows_equals_the_concatenated_outputs(kind):
    parts = _stack_case(kind)
    fused = kernels.fuse_rows(parts)
    assert fused is not None and type(fused) is type(parts[0]) and fused.out_features == 40
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], -1), rtol=1e-5, atol=1e-5)
    if kind.startswith("nf4"):  # the same bytes, plus one float32 offset per second-level block
        extra = 4 * (fused.absmax2.numel() - len(parts)) if kind == "nf4" else 0
        assert fused.weight_nbytes == sum(p.weight_nbytes for p in parts) + extra
    elif kind not in ("linear", "float"):  # the stacked layer stores exactly the parts' bytes
        assert fused.weight_nbytes == sum(p.weight_nbytes for p in parts)
    assert parts[0].out_features == 24  # the parts are untouched


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_stacked_nf4_runs_on_the_kernels(backend):
    """A stacked NF4 layer (one offset per second-level block) through the C kernel and the
    Triton NF4 GEMV (interpreter) equals the parts' reference forwards side by side."""
    if backend == "triton" and (not kernels.triton_available() or torch.cuda.is_available()):
        pytest.skip("the Triton interpreter test runs on CPU-only machines with triton")
    if backend == "cpu" and kernels.cpu_nf4_reason(_stack_case("nf4")[0]) is not None:
        pytest.skip("no C compiler for the CPU NF4 kernel")
    parts = _stack_case("nf4")
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = torch.cat([p(x) for p in parts], -1)
        res = kernels.accelerate(nn.Sequential(*parts), backend, kernel_on_cpu=True)
        assert len(res["converted"]) == 3
        fused = kernels.fuse_rows(parts)
        assert fused.offset.shape == fused.absmax2.shape and len(set(fused.offset.tolist())) == 3
        y = fused(x)
    assert fused.last_kernel == res["converted"]["0"]
    assert rel(y, ref) < 1e-3  # the Triton kernel looks up fp16 levels (see the NF4 GEMV test)


def test_fuse_rows_refuses_what_cannot_stack():
    nf4 = _stack_case("nf4", (22, 8, 8))  # 22 rows end inside a second-level block (4 rows)
    assert nf4[0].row_unit == 4 and kernels.fuse_rows(nf4) is None
    lut = _stack_case("palettized", (20, 8, 8))  # a LUT would span two layers
    assert lut[0].rows_per_lut == 8 and kernels.fuse_rows(lut) is None
    mixed = _stack_case("rtn_asym")[:2] + _stack_case("rtn_sym")[2:]  # zero points vs none
    assert kernels.fuse_rows(mixed) is None
    assert kernels.fuse_rows(_stack_case("rtn_asym")[:1]) is None  # nothing to stack
    a = _stack_case("rtn_asym")
    b = [UniformLinear.from_float(nn.Linear(64, 8), RTNConfig(4, 64, False))]
    assert kernels.fuse_rows(a[:2] + b) is None  # another group size


def test_fuse_rows_checks_the_layout(monkeypatch):
    from qtutor.quant.smoothquant import W8A8Linear

    parts = _stack_case("w8a8")
    monkeypatch.setitem(kernels.ROW_DIMS, W8A8Linear, {"qweight": 1, "weight_scales": 0, "bias": 0})
    with pytest.raises(qtutor.QtutorError, match="ROW_DIMS does not describe"):
        kernels.fuse_rows(parts)


@needs_tinygemm
def test_fuse_rows_tinygemm_cpu_tiles():
    """The CPU layout tiles 64 rows: parts of 64 stack, smaller ones are refused (not mis-stacked)."""
    torch.manual_seed(0)

    def tg(n):
        return kernels.Int4TinyGemmLinear.from_uniform(uniform(n, 128, 32))

    parts = [tg(64), tg(128), tg(32)]
    fused = kernels.fuse_rows(parts, dtype=torch.bfloat16)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], -1))
    assert kernels.fuse_rows([tg(32), tg(32)]) is None


@needs_interpreter
def test_fuse_rows_keeps_the_triton_kernel():
    from conftest import tiny_model

    model = tiny_model("qwen2")
    qtutor.quantize(model, "rtn_int4", RTNConfig(4, 32))
    kernels.accelerate(model, "triton", kernel_on_cpu=True)
    a = model.model.layers[0].self_attn
    fused = kernels.fuse_rows([a.q_proj, a.k_proj, a.v_proj])
    assert type(fused).__name__ == "TritonUniformLinear" and fused.kernel_on_cpu
    x = torch.randn(1, 1, a.q_proj.in_features)
    torch.testing.assert_close(fused(x), torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1), rtol=1e-4, atol=1e-4)
    assert fused.last_kernel == "triton int4_gemv"


# --------------------------------------------------------------------------- on a GPU (skipped here)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@needs_triton
@pytest.mark.parametrize("sym", [False, True])
def test_triton_int4_gemv_on_cuda(sym):
    layer = uniform(896, 4864, 128, sym).cuda()
    x = torch.randn(1, 4864, device="cuda", dtype=torch.float16)
    y = kernels.int4_gemv(x, layer.qweight, layer.scales, layer.qzeros, layer.bias, 128)  # autotuned
    assert rel(y[None], layer(x)) < 2e-3


@needs_cuda
@needs_triton
@pytest.mark.parametrize("mode", ["prmt", "load"])
def test_triton_lut_gemv_on_cuda(mode):
    g = torch.Generator().manual_seed(0)
    n, k, rows = 4864, 896, 16
    idx = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    lut = torch.randn(n // rows, 16, generator=g).half()
    scales = (torch.rand(n, generator=g) + 0.5).half()
    x = torch.randn(k, generator=g)
    ref = lut_reference(idx, lut, scales, None, rows)(x)
    y = kernels.lut_gemv(
        x.half().cuda(), qtutor.quant.pack_codes(idx, 4).cuda(), lut.cuda(), scales.cuda(), None, rows, mode
    )
    assert rel(y.cpu(), ref) < 2e-3


@needs_cuda
@needs_triton
def test_triton_w8a8_gemv_on_cuda():
    layer = w8a8_layer(4864, 896).cuda()
    x = torch.randn(1, 896, device="cuda", dtype=torch.float16)
    y = kernels.w8a8_gemv(x, layer.qweight, layer.weight_scales, layer.bias)  # autotuned
    ref = layer(x)  # torch._int_mm, the row padded to 32
    assert layer.last_kernel.startswith("torch._int_mm")
    assert rel(y[None], ref) < 1e-3


@needs_cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or not kernels.tinygemm_available("cuda"), reason="needs tinygemm on CUDA (sm80+)"
)
@pytest.mark.parametrize("sym", [False, True])
def test_tinygemm_on_cuda(sym):
    layer = uniform(896, 4864, 128, sym).cuda()
    fast = kernels.Int4TinyGemmLinear.from_uniform(layer)  # verifies the re-packed weight
    x = torch.randn(1, 1, 4864, device="cuda", dtype=torch.bfloat16)
    assert rel(fast(x), layer(x)) < 1e-2
    x = torch.randn(3, 4864, device="cuda", dtype=torch.float16)
    assert rel(fast(x), layer(x)) < 1e-2 and fast(x).dtype == torch.float16


@needs_cuda
@needs_triton
@pytest.mark.parametrize("sym", [True, False])
def test_triton_int8_gemv_on_cuda(sym):
    torch.manual_seed(0)
    layer = UniformLinear.from_float(nn.Linear(896, 4864), RTNConfig(8, 0, sym)).cuda()
    x = torch.randn(896, device="cuda", dtype=torch.float16)
    y = kernels.int8_gemv(x, layer.qweight, layer.scales, layer.qzeros, layer.bias)  # autotuned
    assert rel(y, layer(x[None].float())[0]) < 2e-3  # against the layer's own (reference) forward; fp16 output


@needs_cuda
@needs_triton
def test_triton_nf4_gemv_on_cuda():
    from qtutor.quant.nf4 import NF4Linear

    torch.manual_seed(0)
    layer = NF4Linear.from_float(nn.Linear(4864, 896)).cuda()
    kernels.accelerate(nn.Sequential(layer), "triton")
    x = torch.randn(1, 4864, device="cuda", dtype=torch.float16)
    y = layer(x)  # the PTX prmt kernel, autotuned
    assert layer.last_kernel == "triton nf4_gemv (prmt)"
    assert rel(y.float(), layer.forward_reference(x.float())) < 3e-3
