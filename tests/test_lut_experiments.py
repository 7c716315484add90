"""The LUT GEMV modes kept as experiments (benchmarks/lut_modes.py): each still computes the
palettized layer's product, counts the table it stores, and compiles for an H100."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import qtutor
from qtutor.runtime import kernels

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")
sys.path.insert(0, str(ROOT / "benchmarks"))
lut_modes = pytest.importorskip("lut_modes")

needs_interpreter = pytest.mark.skipif(
    not kernels.triton_available() or torch.cuda.is_available(),
    reason="Triton interpreter tests run on CPU-only machines",
)


def lut_reference(idx, lut, scales, bias, rows):
    W = lut.float().repeat_interleave(rows, 0)[: idx.shape[0]].gather(1, idx.long())
    if scales is not None:
        W = W * scales.float()[:, None]
    return lambda x: W @ x + (0 if bias is None else bias)


def table(lut, mode):
    return {"pairs": lambda: lut_modes.lut_pair_table(lut), "load-f32": lut.float}.get(mode, lambda: lut)()


@needs_interpreter
@pytest.mark.parametrize("mode", ["gather", "load-f32", "pairs"])
@pytest.mark.parametrize("n,k,rows,scaled", [(32, 96, 16, True), (48, 200, 48, False), (40, 64, 16, True)])
def test_experimental_lut_gemv_equals_reference(mode, n, k, rows, scaled):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    lut = torch.randn(-(-n // rows), 16, generator=g).half()
    scales = (torch.rand(n, generator=g) + 0.5).half() if scaled else None
    bias = torch.randn(n, generator=g)
    x = torch.randn(k, generator=g)
    y = lut_modes.lut_gemv_mode(x, qtutor.quant.pack_codes(idx, 4), table(lut, mode), scales, bias, rows, mode)
    torch.testing.assert_close(y, lut_reference(idx, lut, scales, bias, rows)(x), rtol=1e-4, atol=1e-4)


@needs_interpreter
def test_lut_pair_table_known_entries():
    """Entry b holds LUT[b & 15] in its low 16 bits and LUT[b >> 4] in its high 16 bits (fp16 bits),
    negative values included (the int32 word is then negative)."""
    lut = torch.tensor([[-2.0 + 0.25 * i for i in range(16)]]).half()
    t = lut_modes.lut_pair_table(lut)
    assert t.shape == (1, 256) and t.dtype == torch.int32
    bits = lut.view(torch.int16)[0].tolist()
    for b in (0, 0x0F, 0xF0, 0x3A, 0xFF):
        word = int(t[0, b]) & 0xFFFFFFFF
        assert word & 0xFFFF == bits[b & 15] & 0xFFFF and word >> 16 == bits[b >> 4] & 0xFFFF
    assert int(t[0, 0x00]) < 0 and int(t[0, 0xFF]) > 0  # LUT[0] = -2 (sign bit set), LUT[15] = 1.75


@needs_interpreter
@pytest.mark.parametrize("mode", ["gather", "load-f32", "pairs"])
def test_use_mode_counts_its_table_and_restore_drops_it(mode):
    from qtutor.quant.palettize import LUTWeight, PalettizedLinear

    g = torch.Generator().manual_seed(0)
    q = LUTWeight(
        torch.randint(0, 16, (32, 64), generator=g, dtype=torch.uint8),
        torch.randn(2, 16, generator=g).half(),
        torch.rand(32, generator=g).half(),
        4,
    )
    layer = PalettizedLinear(q, torch.randn(32, generator=g))
    model = nn.Sequential(layer)
    nbytes = layer.weight_nbytes
    assert lut_modes.use_mode(model, mode, kernel_on_cpu=True) == {"0": f"triton lut_gemv ({mode})"}
    # the float32 copy and the pair table are stored, so they are counted: 2 LUTs x 16 x 4 bytes, 2 x 256 x 4
    assert layer.weight_nbytes == nbytes + {"load-f32": 2 * 16 * 4, "pairs": 2 * 256 * 4}.get(mode, 0)
    x = torch.randn(1, 64)
    torch.testing.assert_close(layer(x), layer.forward_reference(x), rtol=1e-3, atol=1e-3)
    assert layer.last_kernel == "triton lut_gemv"
    assert kernels.restore(model) == 1 and type(layer) is PalettizedLinear and layer.weight_nbytes == nbytes


def test_unknown_experimental_mode_is_refused():
    with pytest.raises(qtutor.QtutorError, match="choose from gather, load-f32, pairs"):
        lut_modes.use_mode(nn.Sequential(), "prmt")


_COMPILE_GATHER_SM90 = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, "benchmarks")
import lut_modes as tk
sig = {"x_ptr": "*fp16", "w_ptr": "*u8", "lut_ptr": "*fp16", "s_ptr": "*fp16", "b_ptr": "*fp16",
       "y_ptr": "*fp16", "N": "i32", "K": "i32", "stride_w": "i32", "ROWS_PER_LUT": "i32",
       "HAS_SCALES": "constexpr", "HAS_BIAS": "constexpr", "MODE": "constexpr",
       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
names = list(sig)
for cfg in tk._LUT_GATHER_CONFIGS:
    const = {"HAS_SCALES": True, "HAS_BIAS": False, "MODE": tk.MODES["gather"], **cfg.kwargs}
    src = ASTSource(fn=tk._lut_jit, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    except Exception as e:
        sys.exit(f"{cfg}: {str(e).splitlines()[-1]}")
print("compiled", len(tk._LUT_GATHER_CONFIGS))
"""


@needs_interpreter
def test_gather_configs_compile_for_sm90(tmp_path):
    """tl.gather fails to compile for some block shapes on Triton 3.6 (PassManager, fewer than two
    rows per warp): every autotuning config of the gather mode must compile for sm_90 (Triton
    compiles for a target without a GPU). In a fresh process: the interpreter of the other
    tests leaves triton.language patched."""
    from conftest import run_fresh_python

    assert f"compiled {len(lut_modes._LUT_GATHER_CONFIGS)}" in run_fresh_python(_COMPILE_GATHER_SM90, tmp_path)
