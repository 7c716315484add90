"""GPTQ's column order on a whole model: natural order against act-order with static groups.

For one model, one text and the same calibration windows, the perplexity of RTN and of GPTQ in
three column orders, at every layout asked for (``--group-sizes``, 0 = one grid per output
row; symmetric and asymmetric grids):

* ``natural``: columns left to right (the 2022 reference's default);
* ``act-order, static groups``: columns by decreasing ``diag(H)``, each group's scale and zero
  fixed up front from the original contiguous columns (reference ``--act-order
  --static-groups``; llm-compressor's default): no ``g_idx`` is stored;
* ``act-order, dynamic groups``: the same order, groups formed along it (a ``g_idx`` per input
  column, as AutoGPTQ stores it); only with groups.

One perplexity function (``qtutor.eval.perplexity``) scores every row on the same tokens. Writes
``OUT.csv`` (one row per layout and method, with the environment) and prints a table.

    python benchmarks/gptq_order.py --model PATH/stories260K-qwen2-hf --data-dir PATH/hf-wikitext \\
        --seqlen 512 --group-sizes 0,64 --out benchmarks/gptq_order_stories260k
    python benchmarks/gptq_order.py --model qtutor-tiny --out benchmarks/gptq_order_qtutor-tiny
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_quality_args, layout_name, quality_setup, write_csv  # noqa: E402

import qtutor  # noqa: E402

ORDERS = {
    "natural": dict(act_order=False, static_groups=False),
    "act-order, static groups": dict(act_order=True, static_groups=True),
    "act-order, dynamic groups": dict(act_order=True, static_groups=False),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    p.add_argument("--group-sizes", default="0,64", help="comma-separated; 0 = one grid per output row")
    args = p.parse_args(argv)
    model, dataset, calib, env, score = quality_setup(args)

    base = score(model)
    rows = [dict(layout="float", method="fp32", ppl=base.ppl, eval_tokens=base.eval_tokens, seconds=0.0)]
    print(f"float: {base}")
    for g in (int(x) for x in args.group_sizes.split(",")):
        for sym in (False, True):
            layout = layout_name(args.bits, g, sym)
            runs = [("RTN", "rtn_int4", qtutor.RTNConfig(bits=args.bits, group_size=g, sym=sym))]
            for name, flags in ORDERS.items():
                if g == 0 and name == "act-order, dynamic groups":
                    continue  # without groups the two act-order variants are the same algorithm
                cfg = qtutor.GPTQConfig(bits=args.bits, group_size=g, sym=sym, **flags)
                runs.append((f"GPTQ, {name}", "gptq_int4", cfg))
            for label, method, cfg in runs:
                m = copy.deepcopy(model)
                t0 = time.perf_counter()
                qtutor.quantize(m, method, cfg, calib=calib if method == "gptq_int4" else None)
                seconds = time.perf_counter() - t0
                r = score(m)
                rows.append(dict(layout=layout, method=label, ppl=r.ppl, eval_tokens=r.eval_tokens, seconds=seconds))
                print(f"{layout:28s} {label:30s} ppl {r.ppl:10.3f}  ({seconds:.1f} s)", flush=True)
    header = dict(
        model=args.model,
        dataset=dataset,
        seqlen=args.seqlen,
        calib=f"{args.calib_samples} x {args.calib_seqlen}",
        **{f"env_{k}": v for k, v in env.items()},
    )
    path = Path(args.out).with_suffix(".csv")
    write_csv([{**header, **r} for r in rows], path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
