#!/usr/bin/env python
"""Tokens per second of batched perplexity evaluation (issue 7, "Real speed").

Runs ``qtutor.eval.perplexity`` (the GPTQ protocol: non-overlapping windows of ``--seqlen``)
on random token ids with Qwen2-0.5B-shaped random weights, for each dtype and batch size, and
reports evaluated tokens per second (windows x seqlen / wall time, after one warm-up batch),
the peak GPU memory, and the perplexity itself (a sanity check: with random weights it is
about the vocabulary size). ``full-logits`` rows time the loss computed from the whole
(batch, seqlen, vocab) logits tensor in float32, as before the chunked loss
(``qtutor.eval.ppl.LOGIT_CHUNK_ELEMENTS``); ``chunked`` rows use the current code.

    python benchmarks/ppl_throughput.py                        # CUDA if available, Qwen2-0.5B
    python benchmarks/ppl_throughput.py --device cpu --config tiny
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import torch

from _common import ROOT, build_model, environment, pick_device, print_env, table, write_csv


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--config",
        default=None,
        choices=("qwen2-0.5b", "tiny"),
        help="model shape (default: qwen2-0.5b on CUDA, tiny on CPU)",
    )
    p.add_argument("--dtypes", default=None, help="comma-separated (default: bfloat16,float16 on CUDA; float32 on CPU)")
    p.add_argument("--seqlen", type=int, default=None, help="window length (default 2048; 256 on CPU)")
    p.add_argument("--batch-sizes", default=None, help="windows per forward pass (default 8,16; 4 on CPU)")
    p.add_argument("--windows", type=int, default=None, help="windows per measurement (default 64; 8 on CPU)")
    p.add_argument(
        "--full-logits",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the unchunked loss (float32 copy of all logits) for comparison",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default 1 on CPU: steadier on a shared machine; try 2+ on your own)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "ppl_throughput.csv"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from qtutor.eval import perplexity
    from qtutor.eval import ppl as ppl_mod

    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    config = args.config or ("qwen2-0.5b" if cuda else "tiny")
    dtypes = (args.dtypes or ("bfloat16,float16" if cuda else "float32")).split(",")
    seqlen = args.seqlen or (2048 if cuda else 256)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("8,16" if cuda else "4")).split(",")]
    n_windows = args.windows or (64 if cuda else 8)
    env = environment(device)
    print_env(env)
    print(
        f"model: {config} (random weights), seqlen {seqlen}, {n_windows} windows "
        f"({n_windows * seqlen} tokens) per measurement, after one warm-up batch"
    )
    t_start = time.perf_counter()
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name.strip())
        model = build_model(config, dtype, device)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (n_windows * seqlen,), generator=torch.Generator().manual_seed(0))
        for loss in ["chunked", "full-logits"] if args.full_logits else ["chunked"]:
            for bs in batch_sizes:
                row = {
                    "dtype": dtype_name,
                    "loss": loss,
                    "batch_size": bs,
                    "seqlen": seqlen,
                    "tokens": n_windows * seqlen,
                    "config": config,
                }
                saved = ppl_mod._plain_head
                if loss == "full-logits":
                    ppl_mod._plain_head = lambda model: None  # the old path: model(ids).logits.float()
                try:
                    perplexity(model, ids, seqlen, max_tokens=bs * seqlen, batch_size=bs)  # warm-up
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    r = perplexity(model, ids, seqlen, batch_size=bs)
                    if cuda:
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    row.update(seconds=dt, tokens_per_s=r.eval_tokens / dt, ppl=r.ppl, status="ok")
                    if cuda:
                        row["peak_mem_GB"] = torch.cuda.max_memory_allocated() / 1e9
                except torch.cuda.OutOfMemoryError as err:
                    row["status"] = f"out of memory: {str(err).splitlines()[0][:100]}"
                except Exception as err:
                    row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                    traceback.print_exc()
                finally:
                    ppl_mod._plain_head = saved
                    if cuda:
                        torch.cuda.empty_cache()
                row.update({f"env_{k}": v for k, v in env.items()})
                rows.append(row)
                print(
                    f"  {dtype_name:9s} {loss:12s} batch {bs:3d}: "
                    f"{row.get('tokens_per_s', float('nan')):12,.0f} tokens/s  ({row['status']})",
                    flush=True,
                )
        del model
        if cuda:
            torch.cuda.empty_cache()
    print()
    print(
        table(
            rows,
            [
                ("dtype", "dtype", ""),
                ("loss", "loss", ""),
                ("batch_size", "batch", "d"),
                ("seqlen", "seqlen", "d"),
                ("tokens", "tokens", "d"),
                ("seconds", "s", ".2f"),
                ("tokens_per_s", "tokens/s", ",.0f"),
                ("peak_mem_GB", "peak GB", ".1f"),
                ("ppl", "ppl", ".1f"),
                ("status", "status", ""),
            ],
        )
    )
    out = Path(args.out)
    write_csv(rows, out)
    print(f"\nwrote {out} ({time.perf_counter() - t_start:.0f} s in all)")


if __name__ == "__main__":
    main()
