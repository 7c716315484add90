#!/usr/bin/env python
"""Per-matrix batch-1 matmul time: FP16 cuBLAS against the packed kernels (issue 7).

For each linear shape of a model config, one input row, the time of ONE call measured inside a
CUDA graph of ``--calls`` back-to-back calls (so launch gaps are as in the decode harness), for:
fp16 ``nn.Linear`` (cuBLAS), RTN int4 g128 through the Triton GEMV and through tinygemm (bf16),
RTN int8 per channel through the Triton int8 GEMV, QLoRA's NF4 (double quantization) through the
register-LUT GEMV, the palettized 4-bit LUT GEMV in each LUT mode, and W8A8 through ``torch._int_mm`` (with its
per-token quantization as PyTorch ops) and through the Triton W8A8 GEMV.
Also the bytes each reads and the bandwidth that implies. It shows where a decode step's time
goes: small matrices take a few microseconds whatever their format (latency-bound), and only the
large ones gain from reading 4 bits instead of 16.

    python benchmarks/gemv_speed.py --config qwen2-0.5b --out benchmarks/gemv_speed.csv
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import lut_modes
from _common import CONFIGS, ROOT, environment, print_env, table, write_csv


def shapes(config: str) -> dict:
    from qtutor.models import QWEN2_0_5B

    c = {**QWEN2_0_5B, **CONFIGS[config]}
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    return {
        "q/o": (h, h),
        "k/v": (kv, h),
        "gate/up": (i, h),
        "down": (h, i),
        "qkv": (h + 2 * kv, h),
        "gate_up": (2 * i, h),  # stacked, as the decode harness runs them
        "lm_head": (c["vocab_size"], h),
    }


def per_call_us(fn, x, calls: int) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn(x)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="qwen2-0.5b", choices=sorted(CONFIGS))
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "gemv_speed.csv"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemv_speed.py times CUDA kernels: it needs a GPU")
    from qtutor.runtime import kernels
    from qtutor.quant.nf4 import NF4Linear
    from qtutor.quant.palettize import PalettizeConfig, PalettizedLinear
    from qtutor.quant.rtn import RTNConfig, UniformLinear
    from qtutor.quant.smoothquant import W8A8Linear

    def fast(layer, backend, lut_mode="prmt"):  # accelerate() converts the layers inside a model
        model = torch.nn.Sequential(layer)
        if lut_mode in lut_modes.MODES:  # the experiments of benchmarks/lut_modes.py
            converted = lut_modes.use_mode(model, lut_mode)
        else:
            converted = kernels.accelerate(model, backend, lut_mode=lut_mode)["converted"]
        return (model, model[0].weight_nbytes) if converted else None

    dev = torch.device("cuda")
    env = environment(dev)
    print_env(env)
    rows = []
    for name, (n, k) in shapes(args.config).items():
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.float16)
        x = torch.randn(1, k, device=dev, dtype=torch.float16)
        variants = {"fp16": (lin, 2.0 * n * k)}
        W = copy.deepcopy(lin).float()  # (nn.Module.float() would convert lin itself)
        q = UniformLinear.from_float(W, RTNConfig(4, 128, False)).to(dev)
        variants["int4-triton"] = fast(copy.deepcopy(q), "triton")
        variants["int4-tinygemm"] = fast(copy.deepcopy(q), "tinygemm")  # bf16 inside
        variants["int8-triton"] = fast(
            UniformLinear.from_float(W, RTNConfig(bits=8, group_size=0, sym=True)).to(dev), "triton"
        )
        variants["nf4-triton"] = fast(NF4Linear.from_float(W).to(dev), "triton")
        if n * k < 2e7:  # exact k-means of the LM head's 9,496 LUTs would dominate the run
            pal = PalettizedLinear.from_float(W, PalettizeConfig()).to(dev)
            variants["lut4-triton-prmt"] = fast(copy.deepcopy(pal), "triton", "prmt")
            variants["lut4-triton-load"] = fast(copy.deepcopy(pal), "triton", "load")
            variants["lut4-triton-f32"] = fast(copy.deepcopy(pal), "triton", "load-f32")
            variants["lut4-triton-gather"] = fast(copy.deepcopy(pal), "triton", "gather")
            variants["lut4-triton-pairs"] = fast(pal, "triton", "pairs")
        w8 = torch.nn.Sequential(W8A8Linear.from_float(W).to(dev))
        variants["w8a8-int_mm"] = (w8, w8[0].weight_nbytes)
        variants["w8a8-triton"] = fast(copy.deepcopy(w8[0]), "triton")
        base = None
        for vname, v in variants.items():
            if v is None:
                print(f"  {name:8s} {vname:14s} not converted")
                continue
            mod, nbytes = v
            xx = x.bfloat16() if vname == "int4-tinygemm" else x
            with torch.no_grad():
                us = per_call_us(mod, xx, args.calls)
            base = us if vname == "fp16" else base
            rows.append(
                {
                    "matrix": name,
                    "out": n,
                    "in": k,
                    "kernel": vname,
                    "us_per_call": us,
                    "MB_read": nbytes / 1e6,
                    "GB_per_s": nbytes / us / 1e3,
                    "vs_fp16": us / base,
                    "layer_kernel": getattr(mod[0] if vname != "fp16" else mod, "last_kernel", None) or "cuBLAS",
                }
            )
            print(f"  {name:8s} {vname:14s} {us:8.2f} us  {nbytes / us / 1e3:7.0f} GB/s", flush=True)
    for r in rows:
        r.update({f"env_{k}": v for k, v in env.items()})
        r["config"] = args.config
    print()
    print(
        table(
            rows,
            [
                ("matrix", "matrix", ""),
                ("out", "out", "d"),
                ("in", "in", "d"),
                ("kernel", "kernel", ""),
                ("us_per_call", "us/call", ".2f"),
                ("MB_read", "MB read", ".2f"),
                ("GB_per_s", "GB/s", ".0f"),
                ("vs_fp16", "vs fp16", ".2f"),
                ("layer_kernel", "ran", ""),
            ],
        )
    )
    write_csv(rows, Path(args.out))
    from qtutor.runtime import triton_gemv as tk

    tuners = (tk._int4_tuned, tk._int8_tuned, tk._nf4_tuned, tk._lut_tuned, tk._lut_prmt_tuned, tk._w8a8_tuned)
    for tuned in tuners + (lut_modes._lut_tuned, lut_modes._lut_gather_tuned):  # block sizes chosen per shape
        for key, cfg in tuned.cache.items():
            print(f"  {tuned.fn.__name__}: {key} -> {cfg}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
