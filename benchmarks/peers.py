"""qtutor beside the reference libraries: the same model, windows and perplexity function.

For each layout (4 bits; one grid per output row or groups of ``--group-size``; symmetric and
asymmetric) the model is quantized with qtutor and with the reference library, and every copy
is scored by ``qtutor.eval.perplexity`` on the same tokens; the calibrated methods see the same
calibration windows. The peers, where installed:

* llm-compressor (``oneshot``): RTN as ``QuantizationModifier`` (weight-only, min-max observer)
  and ``GPTQModifier`` (its defaults: act-order with static groups, damping 0.01, blocks of
  128), both with ``lm_head`` left in float, as qtutor does.

Writes ``OUT.csv`` (one row per layout, method and implementation: perplexity, seconds, the
versions) and prints a table. A missing library is reported and its rows are left out.

    python benchmarks/peers.py --model PATH/stories260K-qwen2-hf --data-dir PATH/hf-wikitext \\
        --group-size 64 --out benchmarks/peers/stories260k
    python benchmarks/peers.py --model qtutor-tiny --group-size 64 --out benchmarks/peers/qtutor-tiny
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_quality_args, layout_name, quality_setup, write_csv  # noqa: E402

import qtutor  # noqa: E402


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def qtutor_run(method: str, model, calib, bits: int, group: int, sym: bool):
    """qtutor's own: RTN or GPTQ at its registered defaults, on the given grid."""
    cfg_class = qtutor.RTNConfig if method == "rtn" else qtutor.GPTQConfig
    cfg = cfg_class(bits=bits, group_size=group, sym=sym)
    qtutor.quantize(
        model, "rtn_int4" if method == "rtn" else "gptq_int4", cfg, calib=calib if method == "gptq" else None
    )


def llmcompressor_run(method: str, model, calib, bits: int, group: int, sym: bool):
    """llm-compressor's ``oneshot``: QuantizationModifier (RTN) or GPTQModifier, lm_head ignored."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    args = QuantizationArgs(
        num_bits=bits, type="int", symmetric=sym, strategy="group" if group else "channel", group_size=group or None
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}
    if method == "rtn":
        oneshot(model=model, recipe=QuantizationModifier(config_groups=groups, ignore=["lm_head"]))
        return
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * calib.shape[0]})
    recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01, block_size=128)
    oneshot(
        model=model, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1]
    )


IMPLEMENTATIONS = {"qtutor": (qtutor_run, "qtutor"), "llm-compressor": (llmcompressor_run, "llmcompressor")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    p.add_argument("--group-size", type=int, default=64, help="the group-wise layout's group size")
    p.add_argument("--methods", default="rtn,gptq")
    args = p.parse_args(argv)
    model, dataset, calib, env, score = quality_setup(args)
    available = {}
    for name, (run, package) in IMPLEMENTATIONS.items():
        if name == "qtutor" or version(package):
            available[name] = run
        else:
            print(f"{name} is not installed (pip install {package}): its rows are left out")

    base = score(model)
    print(f"float: {base}")
    rows = [dict(layout="float", method="float", implementation="-", ppl=base.ppl, seconds=0.0)]
    for group in (0, args.group_size):
        for sym in (True, False):
            layout = layout_name(args.bits, group, sym)
            for method in args.methods.split(","):
                for impl, run in available.items():
                    m = copy.deepcopy(model)
                    t0 = time.perf_counter()
                    try:
                        run(method, m, calib, args.bits, group, sym)
                    except Exception as err:  # noqa: BLE001 - a peer that refuses a layout is a result
                        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
                        rows.append(dict(layout=layout, method=method, implementation=impl, ppl=None, error=msg))
                        print(f"{layout:26s} {method:5s} {impl:15s} failed: {msg}", flush=True)
                        continue
                    seconds = time.perf_counter() - t0
                    r = score(m)
                    rows.append(dict(layout=layout, method=method, implementation=impl, ppl=r.ppl, seconds=seconds))
                    print(f"{layout:26s} {method:5s} {impl:15s} ppl {r.ppl:10.3f}  ({seconds:.1f} s)", flush=True)
    header = dict(
        model=args.model,
        dataset=dataset,
        seqlen=args.seqlen,
        eval_tokens=base.eval_tokens,
        calib=f"{args.calib_samples} x {args.calib_seqlen}",
        qtutor_version=version("qtutor"),
        llmcompressor=version("llmcompressor"),
        compressed_tensors=version("compressed-tensors"),
        **{f"env_{k}": v for k, v in env.items()},
    )
    path = Path(args.out).with_suffix(".csv")
    write_csv([{**header, **r} for r in rows], path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
