"""Time the calibrated methods end to end at Qwen2-0.5B scale (issue: GPTQ < 25 s, AWQ < 90 s,
peak GPU memory < 4 GB on one H100).

The Qwen2-0.5B architecture with random weights (time and memory do not depend on the values)
and random calibration tokens, 128 windows x 2048 tokens by default. Prints one row a method
and writes them to --out (CSV) with the device and versions.

    python benchmarks/calib_speed.py --device cuda --out benchmarks/calib_speed.csv
    python benchmarks/calib_speed.py --device cpu --config tiny --samples 8 --seqlen 128
"""

from __future__ import annotations

import argparse
import csv
import platform
import time

import torch
import transformers
from _common import CONFIGS, build_model

import qtutor


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--config",
        default="qwen2-0.5b",
        choices=list(CONFIGS),
        help="a model shape of benchmarks/_common.py (tiny: 4 layers of width 256)",
    )
    p.add_argument("--methods", default="gptq_int4,awq_int4,smoothquant_w8a8")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device {name}; torch {torch.__version__}; transformers {transformers.__version__}; "
        f"{args.config} random weights, {dtype}; calibration {args.samples} x {args.seqlen} tokens"
    )
    rows = []
    for method in args.methods.split(","):
        model = build_model(args.config, dtype, device)
        calib = torch.randint(0, model.config.vocab_size, (args.samples, args.seqlen), generator=g)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        report = qtutor.quantize(model, method, calib=calib)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() / 1e9) if device.type == "cuda" else float("nan")
        model_gb = (base / 1e9) if device.type == "cuda" else float("nan")
        rows.append(
            {
                "method": method,
                "seconds": round(seconds, 2),
                "peak_gpu_gb": round(peak, 3),
                "model_gb_before": round(model_gb, 3),
                "bits_per_weight": round(report.bits_per_weight, 3),
                "device": name,
                "torch": torch.__version__,
                "calib_tokens": args.samples * args.seqlen,
            }
        )
        print(
            f"{method:18s} {seconds:8.2f} s   peak GPU memory {peak:6.3f} GB (model alone {model_gb:.3f} GB)"
            f"   {report.bits_per_weight:.3f} bits/w"
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
