#!/usr/bin/env python
"""Batch-1 decode speed of 4-bit weights against FP16 (issue 7, "Real speed").

Builds Qwen2-0.5B with random weights (timing does not depend on weight values), then times
greedy decoding with the fast harness (``qtutor.runtime.decode``: static KV cache, CUDA graph
of the one-token step) for the 16-bit baselines and each 4-bit variant with its fast kernel
(``qtutor.runtime.kernels``). Each row prints both sides of its ratio: the method's ms/token, its
baseline's ms/token (same activation dtype: fp16 rows against fp16, bf16 rows against bf16)
and method / baseline (< 1 is faster). ``kernel_check`` is the largest relative difference
between a converted layer's fast forward and its reference forward on one random input row
(it checks the GPU kernels where they run).

    python benchmarks/decode_speed.py                         # CUDA if available, Qwen2-0.5B
    python benchmarks/decode_speed.py --device cpu --config tiny
    python benchmarks/decode_speed.py --device cpu --model qtutor-tiny   # the embedded model

Rows (``--methods``; default all that apply to the device):
  fp16 / bf16                  nn.Linear (cuBLAS); on CPU the "fp16" row runs in fp32
  hf-loop                      the Hugging Face forward with DynamicCache, no graph (context)
  rtn_int4-reference           RTN int4 g128, reference forward (dequantize + matmul per call)
  rtn_int4-triton              RTN int4 g128, Triton int4 GEMV on the packed codes (CUDA)
  rtn_int4-tinygemm            RTN int4 g128 re-packed for aten._weight_int4pack_mm (bf16)
  rtn_int4-cpu                 the same re-packing in a float32 model (CPU): the layer casts its
                               one row to bf16 for the kernel and back (accelerate's "cpu" backend)
  rtn_int8-reference           RTN int8 per channel (rtn_int8), reference forward
  rtn_int8-triton              the same, Triton weight-only int8 GEMV on the layer's codes (CUDA)
  rtn_int8-cpu                 the same, aten._weight_int8pack_mm with bf16 activations (CPU)
  palettized4-reference        4-bit LUT per 16 rows + per-row scale, reference forward
                               (dequantize + matmul per call; the CPU's only path)
  palettized4-prmt             4-bit LUT per 16 rows + per-row scale, Triton LUT GEMV (CUDA) with
                               the LUT in registers, looked up by byte permutes (the default)
  palettized4-gather / -load   the same kernel family: tl.gather from registers / indexed load
  palettized4-load-f32         the same, reading a stored float32 copy of the LUTs (counted)
  palettized4-pairs            the same, one load per packed byte from a stored 256-entry table
                               of weight pairs per LUT (FLUTE's vectorized lookup; counted)
  palettized4-cpu              the same layers, the book's C kernel (qtutor.runtime.cpu_lut; CPU)
  nf4-reference                QLoRA NF4 (qlora_nf4: blocks of 64, double quantization), reference
  nf4-triton                   the same, Triton register-LUT GEMV, absmax rebuilt in the kernel (CUDA)
  nf4-cpu                      the same, the book's C kernel (CPU)
  smoothquant_w8a8             W8A8Linear as registered: torch._int_mm (int8 x int8 -> int32;
                               on CUDA a batch-1 step is zero-padded to 32 rows, as it needs > 16)
  smoothquant_w8a8-triton      the same layers, Triton W8A8 GEMV (CUDA): the row is quantized per
                               token inside the kernel, int8 x int8 products summed in int32
  + with --compile, "-compile" variants of the fp16/bf16 baselines, rtn_int4-triton/-tinygemm,
    palettized4-load(-f32) and smoothquant_w8a8: the step goes through torch.compile before the
    CUDA graph is captured; their ratios are taken against the compiled baseline of the same
    dtype (with the fused glue below, compiling is slower than the eager graph)

The harness stacks q/k/v and gate/up into one matmul each for every row alike (``--no-fuse``:
seven matmuls per layer) and, on CUDA, runs the glue between the matmuls as fused Triton
kernels (``--no-glue``: PyTorch ops), see ``qtutor.runtime.decode``. ``--profile`` (CUDA)
adds, per row, the kernels one decode step launches, the sum of their device times
(``gpu_us``) and the part in matrix products (``matmul_us``): ms/token minus gpu_us is launch
and gap time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
import traceback
from pathlib import Path

import torch

import lut_modes
from _common import CONFIGS, ROOT, build_model, environment, pick_device, print_env, table, write_csv

ALL = [
    "fp16",
    "bf16",
    "hf-loop",
    "rtn_int4-reference",
    "rtn_int4-triton",
    "rtn_int4-tinygemm",
    "rtn_int4-cpu",
    "rtn_int8-reference",
    "rtn_int8-triton",
    "rtn_int8-cpu",
    "palettized4-reference",
    "palettized4-prmt",
    "palettized4-gather",
    "palettized4-load",
    "palettized4-load-f32",
    "palettized4-pairs",
    "palettized4-cpu",
    "nf4-reference",
    "nf4-triton",
    "nf4-cpu",
    "smoothquant_w8a8",
    "smoothquant_w8a8-triton",
]
CUDA_ONLY = {
    "rtn_int4-triton",
    "palettized4-prmt",
    "palettized4-gather",
    "palettized4-load",
    "palettized4-load-f32",
    "palettized4-pairs",
    "smoothquant_w8a8-triton",
    "rtn_int8-triton",
    "nf4-triton",
}
CPU_ONLY = {"rtn_int4-cpu", "rtn_int8-cpu", "palettized4-cpu", "nf4-cpu"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--config", default=None, choices=sorted(CONFIGS), help="model shape (default: qwen2-0.5b on CUDA, tiny on CPU)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float16", "float32"),
        help="activation dtype of the main baseline (auto: float16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--methods", default="all", help=f"comma-separated from: {', '.join(ALL)}")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per run (default 50; 16 on CPU)")
    p.add_argument("--runs", type=int, default=None, help="timed runs (default 5; 3 on CPU)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument(
        "--palettize-fit",
        choices=("quantile", "kmeans"),
        default="quantile",
        help="LUTs for the palettized rows: quantiles (fast; timing only) or the registered "
        "palettization_4bit method (exact k-means; slow on Qwen2-0.5B)",
    )
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    p.add_argument("--no-fuse", action="store_true", help="do not stack q/k/v and gate/up projections")
    p.add_argument(
        "--no-glue",
        action="store_true",
        help="run the step's glue (norms, rotary, attention, SiLU) as PyTorch ops, not fused Triton kernels",
    )
    p.add_argument("--profile", action="store_true", help="profile one decode step per row (CUDA)")
    p.add_argument(
        "--model",
        default=None,
        help="time a real model instead of a random-weight config, e.g. qtutor-tiny (the embedded model) or a folder",
    )
    p.add_argument(
        "--triton-on-cpu",
        action="store_true",
        help="on CPU, run the Triton rows in Triton's interpreter (a correctness check: about "
        "10 minutes for the tiny config with --tokens 3 --runs 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default 1 on CPU: batch-1 ops are tiny and extra threads only "
        "add synchronisation, badly so on a shared machine)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time every row this many times, round-robin (the models are kept in memory); a row's "
        "ms/token is the median over rounds and its ratio the median of the per-round ratios to its "
        "baseline of the same round: on a shared machine whose load drifts, ratios of rows timed "
        "minutes apart mean little",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "decode_speed.csv"))
    return p.parse_args(argv)


def quick_palettize(model, rows_per_lut: int = 16):
    """4-bit LUTs from per-group quantiles of the row-normalised weights (no k-means): the same
    storage as ``PalettizedLinear`` with a cheap fit. For timing; the registered method fits
    the LUTs by exact k-means."""
    from qtutor.models import layout_for
    from qtutor.quant.palettize import LUTWeight, PalettizedLinear

    layout = layout_for(model)
    for layer in layout.layers(model):
        for name, lin in layout.linears(layer).items():
            W = lin.weight.detach().float()
            out, inp = W.shape
            s = W.abs().amax(1).clamp(min=1e-8)
            G = (W / s[:, None]).reshape(out // rows_per_lut, rows_per_lut * inp)
            levels = (torch.arange(16, device=W.device, dtype=torch.float32) + 0.5) / 16
            lut = _quantiles(G, levels).half()
            mids = (lut[:, :-1].float() + lut[:, 1:].float()) / 2
            idx = torch.searchsorted(mids.contiguous(), G.contiguous()).clamp(max=15)
            q = LUTWeight(idx.reshape(out, inp).to(torch.uint8), lut, s.half(), 4)
            layer.set_submodule(name, PalettizedLinear(q, lin.bias).to(W.device))


def _quantiles(G: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Row-wise quantiles of G (groups, n) at ``levels`` -> (groups, 16), via a sort."""
    srt = G.sort(dim=1).values
    pos = (levels * (G.shape[1] - 1)).round().long()
    return srt[:, pos]


def kernel_check(model, reference_of) -> float:
    """Max over up to 8 converted layers of |fast(x) - reference(x)| / |reference(x)|, one row x."""
    worst, n = 0.0, 0
    for m in model.modules():
        ref = reference_of(m)
        if ref is None:
            continue
        x = torch.randn(
            1, 1, m.in_features, device=next(iter(m.buffers())).device, dtype=model.get_input_embeddings().weight.dtype
        )
        with torch.no_grad():
            a, b = m(x).float(), ref(x).float()
        worst = max(worst, float((a - b).norm() / b.norm().clamp(min=1e-12)))
        n += 1
        if n == 8:
            break
    return worst


def main(argv=None):
    args = parse_args(argv)
    import qtutor
    from qtutor.runtime import kernels
    from qtutor.runtime.decode import fast_decode_latency
    from qtutor.eval.latency import decode_latency

    device = pick_device(args.device)
    cuda = device.type == "cuda"
    config = args.config or ("qwen2-0.5b" if cuda else "tiny")
    args.tokens = args.tokens or (50 if cuda else 16)
    args.runs = args.runs or (5 if cuda else 3)
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    main_dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.float16 if cuda else torch.float32)
    main_name = {torch.float16: "fp16", torch.float32: "fp32"}[main_dtype]
    wanted = ALL if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in ALL]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {ALL}")
    # every ratio needs its baseline row: fp16 always, bf16 for the tinygemm row
    wanted = list(dict.fromkeys(["fp16"] + wanted + (["bf16"] if "rtn_int4-tinygemm" in wanted else [])))
    env = environment(device)
    print_env(env)
    if args.model:
        config = args.model
    print(
        f"model: {config}{'' if args.model else ' (random weights)'}, batch 1, prompt {args.prompt} tokens, "
        f"{args.tokens} new tokens, median of {args.runs} runs after 1 warm-up"
    )
    t_start = time.perf_counter()

    if args.model:
        from qtutor.models import load_model

        base, _ = load_model(args.model, dtype=main_dtype, device=str(device))
    else:
        base = build_model(config, main_dtype, device)
    vocab = base.config.vocab_size
    prompt = torch.randint(0, vocab, (args.prompt,), generator=torch.Generator().manual_seed(0))
    base_bf16 = None
    rows, baselines = [], {}
    kept = []  # (row, model, timing function) for --rounds > 1

    def record(name, act, make, baseline, harness="fast", compile=False, check=None):
        key = name.replace("-compile", "")
        key = "fp16" if key == main_name else key
        if key not in wanted:
            return
        if not cuda and key in CUDA_ONLY and not args.triton_on_cpu:
            rows.append(
                {"method": name, "status": "skipped: Triton kernels need CUDA (--triton-on-cpu runs the interpreter)"}
            )
            return
        if cuda and key in CPU_ONLY:
            rows.append({"method": name, "status": "skipped: a CPU kernel"})
            return
        row = {"method": name, "act_dtype": act, "baseline": baseline}
        t0 = time.perf_counter()
        model = None
        try:
            model, info = make()

            def timed(model=model, profile=args.profile and cuda):
                if harness != "fast":
                    return decode_latency(model, prompt, args.tokens, runs=args.runs)
                return fast_decode_latency(
                    model,
                    prompt,
                    args.tokens,
                    runs=args.runs,
                    compile=compile,
                    fuse=not args.no_fuse,
                    glue=False if args.no_glue else None,
                    profile=profile,
                )

            lat = timed()
            if harness == "fast":
                row["harness"] = lat.method
                if lat.profile:
                    row.update(
                        kernels_per_step=lat.profile["kernels"],
                        gpu_us=lat.profile["gpu_us"],
                        matmul_us=lat.profile["matmul_us"],
                    )
                    print(
                        f"  profile {name}: {lat.profile['kernels']} kernels, {lat.profile['gpu_us']:.0f} us on "
                        f"the GPU ({lat.profile['matmul_us']:.0f} in matmuls); top: {lat.profile['top']}"
                    )
            else:
                row["harness"] = "hf-dynamic-cache"
            row["ms_per_token"] = lat.ms_per_token
            row["prefill_ms"] = lat.prefill_ms
            row["kernels"] = ";".join(f"{k}={v}" for k, v in sorted(getattr(lat, "kernels", {}).items())) or "torch"
            row["bits_per_weight"] = info.get("bits")
            row["linear_MB"] = info.get("linear_mb")
            if check is not None:
                row["kernel_check"] = kernel_check(model, check)
            row["status"] = "ok"
            if name in (main_name, "bf16", f"{main_name}-compile", "bf16-compile"):
                baselines[name] = lat.ms_per_token
            row["ms_rounds"] = [lat.ms_per_token]
            if args.rounds > 1:
                kept.append((row, model, timed))
        except Exception as err:  # report and go on: one failing kernel must not hide the others
            row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            traceback.print_exc()
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(
            f"  {name:24s} {row.get('ms_per_token', float('nan')):8.3f} ms/token  "
            f"({row['status']}, {row['seconds']:.0f} s)",
            flush=True,
        )
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def linear_stats(model):
        from qtutor.quant.base import QuantizedLinear

        mods = [m for m in model.model.layers.modules() if isinstance(m, (torch.nn.Linear, QuantizedLinear))]
        nbytes = sum(
            (m.weight_nbytes if isinstance(m, QuantizedLinear) else m.weight.numel() * m.weight.element_size())
            for m in mods
        )
        numel = sum(m.in_features * m.out_features for m in mods)
        return {"bits": 8.0 * nbytes / numel, "linear_mb": nbytes / 1e6}

    def plain(model):
        return lambda: (model, linear_stats(model))

    def bf16_model():
        nonlocal base_bf16
        if base_bf16 is None:
            base_bf16 = copy.deepcopy(base).to(torch.bfloat16)
        return base_bf16

    def accelerated(model, backend, **kw):
        if kw.get("lut_mode") in lut_modes.MODES:  # the experiments of benchmarks/lut_modes.py
            res = {
                "converted": lut_modes.use_mode(model, kw["lut_mode"], kernel_on_cpu=args.triton_on_cpu),
                "skipped": {},
            }
        else:
            res = kernels.accelerate(model, backend, kernel_on_cpu=args.triton_on_cpu, **kw)
        if not res["converted"]:
            raise RuntimeError(f"no layer converted: {sorted(set(res['skipped'].values()))}")

    def rtn(src, backend=None, bits=4):
        def make():
            model = copy.deepcopy(src)
            cfg = qtutor.RTNConfig(4, args.group_size, False) if bits == 4 else None  # rtn_int8: per channel
            qtutor.quantize(model, f"rtn_int{bits}", cfg)
            if backend is not None:
                accelerated(model, backend)
            return model, linear_stats(model)

        return make

    def palettized(mode):
        def make():
            model = copy.deepcopy(base)
            if args.palettize_fit == "kmeans":
                qtutor.quantize(model, "palettization_4bit")
            else:
                quick_palettize(model)
            if mode == "cpu":
                accelerated(model, "cpu")
            elif mode is not None:
                accelerated(model, "triton", lut_mode=mode)
            return model, linear_stats(model)

        return make

    def nf4(backend=None):
        def make():
            model = copy.deepcopy(base)
            qtutor.quantize(model, "qlora_nf4")
            if backend is not None:
                accelerated(model, backend)
            return model, linear_stats(model)

        return make

    def w8a8(backend=None):
        def make():
            model = copy.deepcopy(base)
            g = torch.Generator().manual_seed(1)
            calib = torch.randint(0, vocab, (8, 256), generator=g)
            qtutor.quantize(model, "smoothquant_w8a8", calib=calib)
            if backend is not None:
                accelerated(model, backend)
            return model, linear_stats(model)

        return make

    def ref_of_triton(m):
        return m.forward_reference if isinstance(m, kernels._TritonGemvMixin) else None

    def ref_of_tinygemm(m):
        # the tinygemm layer's reference: its own weight read back, then an ordinary matmul
        return m.forward_reference if isinstance(m, kernels.Int4TinyGemmLinear) else None

    def ref_of_cpu(m):  # the CPU backend's layers: re-stored (tinygemm, int8) or swapped (C kernels)
        fast = (kernels.Int4TinyGemmLinear, kernels.Int8WeightOnlyLinear, kernels._CpuGemvMixin)
        return m.forward_reference if isinstance(m, fast) else None

    # --- the rows ---------------------------------------------------------------------------
    record(main_name, main_name, plain(base), main_name)
    if "bf16" in wanted or "rtn_int4-tinygemm" in wanted:
        record("bf16", "bf16", lambda: (bf16_model(), linear_stats(bf16_model())), "bf16")
    record("hf-loop", main_name, plain(base), main_name, harness="hf")
    record("rtn_int4-reference", main_name, rtn(base), main_name)
    record("rtn_int4-triton", main_name, rtn(base, "triton"), main_name, check=ref_of_triton)
    record(
        "rtn_int4-tinygemm",
        "bf16",
        rtn(bf16_model(), "tinygemm") if "rtn_int4-tinygemm" in wanted else None,
        "bf16",
        check=ref_of_tinygemm,
    )
    record("rtn_int4-cpu", main_name, rtn(base, "cpu"), main_name, check=ref_of_cpu)
    record("rtn_int8-reference", main_name, rtn(base, bits=8), main_name)
    record("rtn_int8-triton", main_name, rtn(base, "triton", bits=8), main_name, check=ref_of_triton)
    record("rtn_int8-cpu", main_name, rtn(base, "cpu", bits=8), main_name, check=ref_of_cpu)
    record("palettized4-reference", main_name, palettized(None), main_name)
    record("palettized4-prmt", main_name, palettized("prmt"), main_name, check=ref_of_triton)
    record("palettized4-gather", main_name, palettized("gather"), main_name, check=ref_of_triton)
    record("palettized4-load", main_name, palettized("load"), main_name, check=ref_of_triton)
    record("palettized4-load-f32", main_name, palettized("load-f32"), main_name, check=ref_of_triton)
    record("palettized4-pairs", main_name, palettized("pairs"), main_name, check=ref_of_triton)
    record("palettized4-cpu", main_name, palettized("cpu"), main_name, check=ref_of_cpu)
    record("nf4-reference", main_name, nf4(), main_name)
    record("nf4-triton", main_name, nf4("triton"), main_name, check=ref_of_triton)
    record("nf4-cpu", main_name, nf4("cpu"), main_name, check=ref_of_cpu)
    record("smoothquant_w8a8", main_name, w8a8(), main_name)
    record("smoothquant_w8a8-triton", main_name, w8a8("triton"), main_name, check=ref_of_triton)
    if args.compile:  # the same rows with the step through torch.compile, against compiled baselines
        mc = f"{main_name}-compile"
        record(mc, main_name, plain(base), mc, compile=True)
        record("rtn_int4-triton-compile", main_name, rtn(base, "triton"), mc, compile=True, check=ref_of_triton)
        record("palettized4-prmt-compile", main_name, palettized("prmt"), mc, compile=True, check=ref_of_triton)
        record("palettized4-load-compile", main_name, palettized("load"), mc, compile=True, check=ref_of_triton)
        record("palettized4-load-f32-compile", main_name, palettized("load-f32"), mc, compile=True, check=ref_of_triton)
        record("smoothquant_w8a8-compile", main_name, w8a8(), mc, compile=True)
        if "rtn_int4-tinygemm" in wanted:
            record(
                "bf16-compile", "bf16", lambda: (bf16_model(), linear_stats(bf16_model())), "bf16-compile", compile=True
            )
            record(
                "rtn_int4-tinygemm-compile",
                "bf16",
                rtn(bf16_model(), "tinygemm"),
                "bf16-compile",
                compile=True,
                check=ref_of_tinygemm,
            )

    for i in range(1, args.rounds):  # the other rounds, round-robin over the kept models
        for row, _, timed in kept:
            row["ms_rounds"].append(timed(profile=False).ms_per_token)
        print(
            f"  round {i + 1}: " + ", ".join(f"{r['method']} {r['ms_rounds'][-1]:.2f}" for r, _, _ in kept), flush=True
        )
    kept.clear()
    by_name = {r["method"]: r for r in rows}
    for r in rows:
        if len(r.get("ms_rounds", [])) > 1:
            r["ms_per_token"] = statistics.median(r["ms_rounds"])
            if r["method"] in baselines:
                baselines[r["method"]] = r["ms_per_token"]
    for r in rows:
        b = baselines.get(r.get("baseline"))
        if b is not None and r.get("ms_per_token") is not None:
            r["baseline_ms_per_token"] = b
            base_rounds = by_name[r["baseline"]]["ms_rounds"]
            r["ratio"] = statistics.median(m / bm for m, bm in zip(r["ms_rounds"], base_rounds))
    for r in rows:
        if "ms_rounds" in r:
            r["ms_rounds"] = " ".join(f"{m:.3f}" for m in r["ms_rounds"])
        r.update({f"env_{k}": v for k, v in env.items()})
        r["config"] = config
    print()
    print(
        table(
            rows,
            [
                ("method", "method", ""),
                ("act_dtype", "act", ""),
                ("ms_per_token", "ms/token", ".3f"),
                ("baseline", "baseline", ""),
                ("baseline_ms_per_token", "base ms/token", ".3f"),
                ("ratio", "ratio", ".3f"),
                ("ms_rounds", "rounds", ""),
                ("bits_per_weight", "bits/w", ".2f"),
                ("linear_MB", "linears MB", ".1f"),
                ("kernel_check", "kernel chk", ".1e"),
                ("kernels_per_step", "kernels", ""),
                ("gpu_us", "GPU us", ".0f"),
                ("matmul_us", "matmul us", ".0f"),
                ("kernels", "kernels", ""),
                ("harness", "harness", ""),
                ("status", "status", ""),
            ],
        )
    )
    out = Path(args.out)
    write_csv(rows, out)
    print(
        f"\nratio = method ms/token / baseline ms/token (< 1: faster; with --rounds, the median of the "
        f"per-round ratios). wrote {out} "
        f"({time.perf_counter() - t_start:.0f} s in all)"
    )


if __name__ == "__main__":
    main()
