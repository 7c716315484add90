"""Why qtutor and a reference library differ, measured: each gap in ``peers.py``'s CSVs is
re-run with qtutor changed in the one way suspected, on the same model, windows and tokens.

* ``grid``: symmetric RTN and GPTQ with the symmetric scale of the GPTQ reference and of
  llm-compressor, ``s = 2 max|w| / (2^b - 1)`` with codes clamped to ``[-2^(b-1), 2^(b-1) - 1]``
  (so the largest positive weight is clipped by ``s / 2``), instead of qtutor's
  ``s = max|w| / (2^(b-1) - 1)`` (every weight inside the grid). If the two perplexities land on
  the reference library's, the grid is the whole difference.

* ``sequential``: GPTQ with the reference grid and without true-sequential calibration (one
  forward per layer collects every linear's ``H`` from the float layer, as llm-compressor does;
  qtutor by default calibrates o_proj, gate/up and down_proj on inputs from the layer's already
  quantized linears).
* ``awq``: qtutor's AWQ with llm-compressor's choices, one at a time and together: duo scaling
  (``s = x_mean^r / w_mean^(1-r)``, llm-compressor's and AutoAWQ's default; llm-awq has none)
  and no clipping search (llm-compressor has none; llm-awq and AutoAWQ clip), per row,
  symmetric and asymmetric.

Writes ``OUT.csv`` (one row per experiment) and prints them.

    python benchmarks/peers_explain.py --model PATH/stories260K-qwen2-hf --data-dir PATH/hf-wikitext \\
        --out benchmarks/peers_explain_stories260k
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_quality_args, layout_name, quality_setup, write_csv  # noqa: E402

import qtutor  # noqa: E402
from qtutor.quant import gptq as gptq_module  # noqa: E402
from qtutor.quant import rtn as rtn_module  # noqa: E402


def reference_sym_params(W: torch.Tensor, bits: int, sym: bool):
    """The GPTQ reference's / llm-compressor's grid: symmetric ``s = 2 max|w| / (2^b - 1)``."""
    if not sym:
        return ORIGINAL(W, bits, sym)
    absmax = torch.maximum(-W.min(dim=1).values.clamp(max=0), W.max(dim=1).values.clamp(min=0))
    scale = absmax / ((2**bits - 1) / 2)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return rtn_module.fp16_round_up(scale.clamp(min=1e-6)), torch.full_like(scale, 2 ** (bits - 1))


ORIGINAL = rtn_module.find_params


@contextmanager
def grid(find_params):
    """qtutor's RTN and GPTQ with another ``find_params`` for the duration."""
    rtn_module.find_params, gptq_module.find_params = find_params, find_params
    try:
        yield
    finally:
        rtn_module.find_params, gptq_module.find_params = ORIGINAL, ORIGINAL


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    p.add_argument("--experiments", default="grid,sequential,awq", help="comma-separated: grid, sequential, awq")
    args = p.parse_args(argv)
    chosen = args.experiments.split(",")
    if not set(chosen) <= {"grid", "sequential", "awq"}:
        p.error(f"--experiments {args.experiments!r}: choose from grid, sequential, awq")
    runs = []  # (method, registered name, config, experiment label, find_params)
    if "grid" in chosen:
        for method, name, cfg_class in (
            ("rtn", "rtn_int4", qtutor.RTNConfig),
            ("gptq", "gptq_int4", qtutor.GPTQConfig),
        ):
            cfg = cfg_class(bits=args.bits, group_size=0, sym=True)
            runs.append((method, name, cfg, "qtutor's grid", ORIGINAL))
            runs.append((method, name, cfg, "the reference grid", reference_sym_params))
    if "sequential" in chosen:
        cfg = qtutor.GPTQConfig(bits=args.bits, group_size=0, sym=True, true_sequential=False)
        runs.append(("gptq", "gptq_int4", cfg, "the reference grid, not true-sequential", reference_sym_params))
    if "awq" in chosen:
        for sym in (True, False):
            for label, change in (
                ("duo scaling", dict(duo_scaling=True)),
                ("no clipping", dict(clip=False)),
                ("duo scaling, no clipping (llm-compressor's choices)", dict(duo_scaling=True, clip=False)),
            ):
                cfg = qtutor.AWQConfig(bits=args.bits, group_size=0, sym=sym, **change)
                runs.append(("awq", "awq_int4", cfg, label, ORIGINAL))
    model, dataset, calib, env, score = quality_setup(args)
    rows = []
    for method, name, cfg, label, params in runs:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        with grid(params):
            qtutor.quantize(m, name, cfg, calib=calib if method != "rtn" else None)
        seconds = time.perf_counter() - t0
        r = score(m)
        layout = layout_name(args.bits, cfg.group_size, cfg.sym)
        rows.append(
            dict(
                model=Path(args.model).name if Path(args.model).is_dir() else args.model,
                dataset=dataset,
                eval_tokens=r.eval_tokens,
                calib=f"{args.calib_samples} x {args.calib_seqlen}",
                layout=layout,
                method=method,
                experiment=f"qtutor with {label}",
                ppl=r.ppl,
                seconds=seconds,
                **{f"env_{k}": v for k, v in env.items()},
            )
        )
        print(f"{layout:20s} {method:5s} {label:50s} ppl {r.ppl:10.3f}", flush=True)
        write_csv(rows, Path(args.out).with_suffix(".csv"))
    print(f"wrote {Path(args.out).with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
