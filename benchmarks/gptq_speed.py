#!/usr/bin/env python
"""GPTQ on one weight matrix, by how its lazy-batch blocks run (chapter 3; issue 13).

``qtutor.quant.gptq.gptq`` on random weights and a Hessian from correlated random inputs at a
model's linear shapes (q/o, gate/up, down), once per block loop (``gptq.BLOCK_LOOP``): the
PyTorch loop (``eager``), its CUDA-graph replay (``cuda-graph``) and the one-launch Triton
kernel (``triton``), GPU only for the last two. Prints the seconds per matrix (median of
``--runs`` after a warm-up that also compiles or captures) and the share of codes equal to the
eager loop's: where the time of GPTQ goes at batch sizes that make it launch-bound.

    python benchmarks/gptq_speed.py --config qwen2-0.5b --out benchmarks/gptq_speed_h200.csv
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _common import CONFIGS, environment, print_env, table, write_csv


def shapes(config: str) -> dict:
    from qtutor.models import QWEN2_0_5B

    c = {**QWEN2_0_5B, **CONFIGS[config]}
    h, i = c["hidden_size"], c["intermediate_size"]
    return {"q/o": (h, h), "gate/up": (i, h), "down": (h, i)}


def problem(out_features: int, in_features: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g) * 0.02
    mix = torch.randn(in_features, in_features, generator=g) / in_features**0.5
    X = torch.randn(4 * in_features, in_features, generator=g) @ mix  # correlated inputs
    return W.to(device), (2 * X.T @ X / X.shape[0]).to(device)


def timed(fn, device, runs: int) -> tuple[float, object]:
    out = fn()  # warm-up: compiles the kernel or captures the graph
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    from qtutor.quant import gptq as G

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="qwen2-0.5b", choices=sorted(CONFIGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loops", default=None, help="comma-separated block loops (default: all that run here)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None, help="CSV to write")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    loops = (
        args.loops.split(",")
        if args.loops
        else (["eager", "cuda-graph", "triton"] if device.type == "cuda" else ["eager"])
    )
    env = environment(device)
    print_env(env)
    cfg = G.GPTQConfig(bits=4, group_size=128)  # the package's default: act-order, static groups
    rows = []
    for name, (n_out, n_in) in shapes(args.config).items():
        W, H = problem(n_out, n_in, device)
        ref = None
        for loop in loops:
            G.BLOCK_LOOP = loop
            seconds, res = timed(lambda: G.gptq(W, H, cfg), device, args.runs)
            ref = res if ref is None else ref
            same = float((res.weight.codes == ref.weight.codes).float().mean())
            rows.append(
                {"matrix": name, "out": n_out, "in": n_in, "block_loop": loop, "seconds": seconds,
                 "codes_equal_to_first": same, "loss": res.loss, **{f"env_{k}": v for k, v in env.items()}}
            )  # fmt: skip
            print(f"  {name:8s} {loop:10s} {seconds * 1000:9.1f} ms  codes equal {same:.4f}", flush=True)
    G.BLOCK_LOOP = "auto"
    print(table(rows, [("matrix", "matrix", ""), ("block_loop", "block loop", ""), ("seconds", "s", ".3f"),
                       ("codes_equal_to_first", "codes = first", ".4f")]))  # fmt: skip
    if args.out:
        write_csv(rows, Path(args.out))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
