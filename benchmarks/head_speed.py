"""The quantized lm_head's decode speed (issue 16): METHOD against METHOD+head, round-robin.

For each method without calibration (RTN, palettization, NF4) the decoder is quantized once;
the ``+head`` row is a copy of it whose lm_head is then quantized as ``qtutor.quantize(...,
head=True)`` does (``qtutor.api.quantize_lm_head``: the same layers, the head in the method's
format, a tied embedding reading its rows). Both rows get the fast kernels of
``accelerate(model, "auto")`` (on a CPU: torch's int8/int4 weight-only ops, the C LUT kernel).
Then, for ``--rounds`` rounds, every row is timed in turn with the Hugging Face decode loop
(``qtutor.eval.decode_latency``: batch 1, a fixed prompt, the first token from the prefill, one
warm-up, ``--runs`` timed decodes): a machine whose load changes during the run slows every row
of a round alike, and ``ms_per_token`` is the median over rounds. ``head_ms`` times the lm_head
alone on one row (the median of 15 calls), ``head_kernel`` what ran; ``memory_MB`` and ``head_MB``
are what the model and its head store as quantized, ``head_kernel_MB`` what the head holds once
the kernel has re-stored it (tinygemm's bf16 scale and zero per group, int8's bf16 scales).

Random weights (``--config``, offline) give speed and memory only; ``--model qtutor-tiny`` times
the embedded model. ``--head-only`` quantizes and times the lm_head alone (no decoder, no decode
loop): one row per method and one for the float head, quick enough for palettization's k-means
at Qwen2-0.5B's size.

    OMP_NUM_THREADS=1 python benchmarks/head_speed.py --config qwen2-0.5b --dtype bfloat16 --out OUT.csv
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from _common import build_model, environment, print_env, table, write_csv

METHODS = ("rtn_int8", "rtn_int4", "palettization_4bit", "qlora_nf4")


def head_ms(head, dtype, calls: int = 15) -> float:
    """Median ms of ``head`` on one row (a (1, hidden) input of ``dtype``) over ``calls`` calls."""
    x = torch.randn(1, head.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        head(x), head(x)
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            head(x)
            ts.append(1000 * (time.perf_counter() - t0))
    return statistics.median(ts)


def head_bytes(model) -> int:
    return head_bytes_of(model.get_output_embeddings())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="qwen2-0.5b", help="random weights of this shape (see _common.CONFIGS)")
    p.add_argument("--model", default=None, help="a real model instead (e.g. qtutor-tiny)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {', '.join(METHODS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=16, help="new tokens per decode")
    p.add_argument("--runs", type=int, default=3, help="timed decodes per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--head-only", action="store_true", help="time the lm_head alone, for every method")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import qtutor
    from qtutor.api import quantize_lm_head
    from qtutor.eval import decode_latency, memory_report
    from qtutor.models import layout_for, load_model
    from qtutor.runtime.kernels import accelerate

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    env = environment(torch.device("cpu"))
    print_env(env)
    if args.model:
        base, _ = load_model(args.model, dtype=dtype)
    else:
        base = build_model(args.config, dtype, torch.device("cpu"))
    name = args.model or f"{args.config} (random weights)"
    prompt = torch.randint(0, base.config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0))

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.head_only:
        return head_only(base, name, methods, dtype, args, env)
    rows, models = [], []
    for method in methods:
        m = qtutor.get_method(method)
        if m.needs_calib:
            raise SystemExit(f"{method} needs calibration; this script times the uncalibrated methods")
        t0 = time.perf_counter()
        plain = copy.deepcopy(base)
        qtutor.quantize(plain, method)
        with_head = copy.deepcopy(plain)
        quantize_lm_head(with_head, layout_for(with_head), m, m.default_config)
        print(f"{method}: quantized in {time.perf_counter() - t0:.1f} s", flush=True)
        for row, model in ((method, plain), (method + "+head", with_head)):
            memory, stored = memory_report(model).total_bytes, head_bytes(model)  # before any re-storing
            done = accelerate(model, "auto")
            rows.append(
                {
                    "model": name,
                    "row": row,
                    "dtype": args.dtype,
                    "memory_MB": memory / 1e6,
                    "head_MB": stored / 1e6,
                    "head_kernel_MB": head_bytes(model) / 1e6,
                    "head_kernel": done["converted"].get("lm_head", "torch matmul" if row == method else "reference"),
                    "head_ms": head_ms(model.get_output_embeddings(), dtype),
                    "ms_rounds": [],
                }
            )
            models.append(model)
    for i in range(args.rounds):
        for r, model in zip(rows, models):
            r["ms_rounds"].append(decode_latency(model, prompt, args.tokens, runs=args.runs).ms_per_token)
        print(f"round {i + 1}: " + ", ".join(f"{r['row']} {r['ms_rounds'][-1]:.2f}" for r in rows), flush=True)
    for r in rows:
        r["ms_per_token"] = statistics.median(r["ms_rounds"])
        r["ms_rounds"] = " ".join(f"{v:.3f}" for v in r["ms_rounds"])
        r.update({f"env_{k}": v for k, v in env.items()})
        r.update(tokens=args.tokens, runs=args.runs, rounds=args.rounds, prompt=args.prompt)
    cols = [
        ("row", "row", ""),
        ("memory_MB", "MB", ".2f"),
        ("head_MB", "head MB", ".2f"),
        ("head_kernel_MB", "in kernel", ".2f"),
        ("head_ms", "head ms", ".2f"),
        ("head_kernel", "head kernel", ""),
        ("ms_per_token", "ms/token", ".2f"),
        ("ms_rounds", "rounds", ""),
    ]
    print(f"\n{name}, {args.dtype}, {env['device']}")
    print(table(rows, cols))
    write_csv(rows, Path(args.out))


def head_only(base, name, methods, dtype, args, env) -> None:
    """``--head-only``: each method's lm_head alone, quantized from the model's head and given the
    kernel of ``accelerate(..., "auto")``; one row per method after the float head's."""
    import qtutor
    from qtutor.runtime.kernels import accelerate

    float_head = base.get_output_embeddings()
    rows = [{"row": f"{args.dtype} head", "head_MB": head_bytes(base) / 1e6, "head_kernel": "torch matmul"}]
    rows[0]["head_ms"] = head_ms(float_head, dtype)
    for method in methods:
        m = qtutor.get_method(method)
        t0 = time.perf_counter()
        holder = torch.nn.Sequential(m.from_float(float_head, m.default_config))  # a parent for accelerate
        seconds = time.perf_counter() - t0
        stored = head_bytes_of(holder[0])
        done = accelerate(holder, "auto")
        rows.append(
            {
                "row": method,
                "head_MB": stored / 1e6,
                "head_kernel_MB": head_bytes_of(holder[0]) / 1e6,
                "head_kernel": done["converted"].get("0", "reference"),
                "head_ms": head_ms(holder[0], dtype),
                "quant_seconds": seconds,
            }
        )
        print(f"{method}: {rows[-1]['head_ms']:.2f} ms", flush=True)
    for r in rows:
        r.update(model=name, dtype=args.dtype, **{f"env_{k}": v for k, v in env.items()})
    cols = [
        ("row", "row", ""),
        ("head_MB", "head MB", ".2f"),
        ("head_kernel_MB", "in kernel", ".2f"),
        ("head_ms", "head ms", ".2f"),
        ("head_kernel", "head kernel", ""),
        ("quant_seconds", "quantized in s", ".1f"),
    ]
    print(f"\n{name}, lm_head alone, {args.dtype}, {env['device']}")
    print(table(rows, cols))
    write_csv(rows, Path(args.out))


def head_bytes_of(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if t is not None)


if __name__ == "__main__":
    main()
