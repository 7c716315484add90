"""Why qtutor and a reference library differ, measured: each gap in ``peers.py``'s CSVs is
re-run with qtutor changed in the one way suspected, on the same model, windows and tokens.

* ``grid``: symmetric RTN and GPTQ with the symmetric scale of the GPTQ reference and of
  llm-compressor, ``s = 2 max|w| / (2^b - 1)`` with codes clamped to ``[-2^(b-1), 2^(b-1) - 1]``
  (so the largest positive weight is clipped by ``s / 2``), instead of qtutor's
  ``s = max|w| / (2^(b-1) - 1)`` (every weight inside the grid). If the two perplexities land on
  the reference library's, the grid is the whole difference. ``--group-size`` runs them (and
  ``sequential``) on groups of input columns instead of per row.
* ``sequential``: GPTQ with the reference grid and without true-sequential calibration (one
  forward per layer collects every linear's ``H`` from the float layer, as llm-compressor does;
  qtutor by default calibrates o_proj, gate/up and down_proj on inputs from the layer's already
  quantized linears).
* ``awq``: qtutor's AWQ with llm-compressor's choices, one at a time and together: duo scaling
  (``s = x_mean^r / w_mean^(1-r)``, llm-compressor's and AutoAWQ's default; llm-awq has none)
  and no clipping search (llm-compressor has none; llm-awq and AutoAWQ clip), per row,
  symmetric and asymmetric.
* ``awq-grid``, ``awq-inputs``, ``awq-llmc``: qtutor's AWQ with llm-compressor's two choices
  above and, added one at a time, its remaining ones (read from ``AWQModifier``, llm-compressor
  0.14): the reference grid (``2 max|w| / 15``, in the search and in the final quantization;
  ``awq-grid``); the float model's outputs as each layer's inputs (``awq-inputs``: its sequential
  pipeline runs under ``DisableQuantization``, so layer ``i`` is calibrated on the outputs of the
  smoothed but unquantized layers ``0..i-1``; qtutor feeds it the quantized layers' outputs);
  and all of them with llm-compressor's ratio grid (``awq-llmc``: the identity, then duo
  scaling at ``i / 18``, ``i = 0..18``, ratio 1 included; ``AWQConfig(ratio_grid="llm-compressor")``),
  per row symmetric and asymmetric. Without clipping, the float model's outputs are exactly the
  smoothed float layers' outputs (smoothing is an equivalence), which is what llm-compressor
  propagates.
* ``fp32-scale``, ``awq-llmc-fp32``: RTN (at ``--group-size``) and ``awq-llmc``'s AWQ (per row)
  in llm-compressor's arithmetic: its grid with the scale left in float32 when the codes are
  computed, as compressed-tensors does for a float32 model (qtutor rounds the scale up to the
  fp16 it stores; the search's fake quantization then uses the float32 scale too), symmetric
  and asymmetric.
* ``awq-llmc-jitter``: ``awq-llmc-fp32`` with each channel's ``x_mean`` moved by a relative
  ``--jitter`` (default 1e-6; signs from a fixed seed), the size of a float32 sum's last bits:
  how much one AWQ figure moves when nothing but rounding changes.
* ``llmc-awq-sym``, ``llmc-awq-asym``: llm-compressor's own AWQ (per row, as ``peers.py`` runs
  it), first in its process, or after the llm-compressor methods of ``--llmc-before`` (run on
  copies of the model, as ``peers.py`` runs RTN and GPTQ before AWQ): its result depends on
  them.
* ``palettization-skip``: qtutor's palettization with the linears that coremltools leaves
  uncompressed left in float as well: coremltools 9 skips a layer whose output width is not a
  multiple of the LUT group (16), with a warning; qtutor gives the last LUT fewer rows. On
  stories260K that is gate_proj and up_proj (172 rows), about half of the decoder's weights.
  With the fp16 k-means (qtutor's default) and with coremltools' (``kmeans="coreml"``).

Writes ``OUT.csv`` (one row per experiment) and prints them. With ``--kl``, as ``peers.py --kl``
does: each row is also scored against the float model on the same tokens (``kl_to_float``,
``top1_agree``, ``_common.kl_to_reference``), with 95% bootstrap intervals over the windows
(``ppl_lo``/``ppl_hi``, ``kl_lo``/``kl_hi``), and ``OUT_windows.csv`` holds each row's per-window
figures. ``--against REF`` (the ``--out`` of a ``peers.py --kl`` run on the same model, text and
``--seqlen``; its float model's per-window NLLs must be this run's) adds ``OUT_pairs.csv``: every
experiment against each row of ``REF.csv`` with the same layout and method (llm-compressor's and
qtutor's at its defaults), the perplexity ratio and the KL difference (experiment / - reference)
with their paired 95% bootstrap intervals (``peers.compare``).

    python benchmarks/peers_explain.py --model PATH/stories260K-qwen2-hf --data-dir PATH/hf-wikitext \\
        --out benchmarks/peers_explain_stories260k
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_quality_args, layout_name, quality_setup, write_csv  # noqa: E402
from peers import compare, intervals, llmcompressor_run, scored, write_windows  # noqa: E402

import qtutor  # noqa: E402
from qtutor import calib as calib_module  # noqa: E402
from qtutor.models import layout_for  # noqa: E402
from qtutor.quant import awq as awq_module  # noqa: E402
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


def reference_params_fp32(W: torch.Tensor, bits: int, sym: bool):
    """llm-compressor's grid in its arithmetic: the reference grid when symmetric, qtutor's (the
    same as compressed-tensors') when asymmetric, and the scale left in float32 (compressed-tensors
    keeps the weights' dtype) instead of rounded up to the fp16 that qtutor stores. The codes are
    computed with the float32 scale; a ``UniformLinear`` then stores it rounded to fp16."""
    xmin, xmax = W.min(dim=1).values.clamp(max=0), W.max(dim=1).values.clamp(min=0)
    if sym:
        scale = torch.maximum(-xmin, xmax) / ((2**bits - 1) / 2)
    else:
        scale = (xmax - xmin) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if sym:
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    return scale, torch.round(-xmin / scale).clamp(0, 2**bits - 1)


ORIGINAL = rtn_module.find_params


@contextmanager
def grid(find_params):
    """qtutor's RTN and GPTQ with another ``find_params`` for the duration."""
    rtn_module.find_params, gptq_module.find_params = find_params, find_params
    try:
        yield
    finally:
        rtn_module.find_params, gptq_module.find_params = ORIGINAL, ORIGINAL


@contextmanager
def float_inputs(model, on: bool = True):
    """qtutor's layer-by-layer driver (``qtutor.calib.sequential``) with each layer's inputs taken
    from the float model (a copy of the layers made before quantizing) instead of the outputs of
    the already quantized layers: llm-compressor's AWQ protocol."""
    if not on:
        yield
        return
    float_layers = {id(layer): copy.deepcopy(layer) for layer in layout_for(model).layers(model)}
    run_layer = calib_module.run_layer

    def run_float(layer, X, kwargs, batch_size=8):
        return run_layer(float_layers[id(layer)], X, kwargs, batch_size)

    calib_module.run_layer = run_float
    try:
        yield
    finally:
        calib_module.run_layer = run_layer


FLOAT_INPUTS = dict(float_inputs=True)


@contextmanager
def jitter_x_mean(rel: float = 0.0):
    """AWQ's scale search with each channel's ``x_mean`` moved by ``+-rel`` (relative; signs from
    a fixed seed): about the last bits of a float32 sum, as a different order of the calibration
    batches would move it."""
    if not rel:
        yield
        return
    candidate_scales = awq_module.candidate_scales

    def jittered(x_mean, ratio, w_mean=None):
        g = torch.Generator().manual_seed(x_mean.numel())
        sign = torch.randint(0, 2, x_mean.shape, generator=g).float() * 2 - 1
        return candidate_scales(x_mean * (1 + rel * sign), ratio, w_mean)

    awq_module.candidate_scales = jittered
    try:
        yield
    finally:
        awq_module.candidate_scales = candidate_scales


def keep_coreml_skips(quantized, original, group_size: int) -> list[str]:
    """Put back the float linears of ``original`` wherever coremltools 9's ``PostTrainingPalettizer``
    (``per_grouped_channel``) leaves a layer uncompressed: its output width is not a multiple of
    ``group_size`` (``sanitize_palettization_group_size``; stories260K's gate_proj and up_proj, 172
    rows, with groups of 16). Returns the kinds of linear put back."""
    layout = layout_for(original)
    kept = set()
    for q_layer, f_layer in zip(layout.layers(quantized), layout.layers(original)):
        for name, lin in layout.linears(f_layer).items():
            if lin.out_features % group_size:
                parent, child = name.rsplit(".", 1)
                setattr(q_layer.get_submodule(parent), child, copy.deepcopy(lin))
                kept.add(name)
    return sorted(kept)


def read_reference(stem: str) -> tuple[dict, dict]:
    """A ``peers.py --kl`` run read back: ``(rows, samples)``, both keyed by (layout, method,
    implementation): ``STEM.csv``'s rows (``ppl``, ``kl_to_float`` as floats) and
    ``STEM_windows.csv``'s per-window figures (``{"nll": [...], "kl": [...]}``)."""
    path = Path(stem).with_suffix(".csv")
    rows = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("ppl"):
                key = (r["layout"], r["method"], r["implementation"])
                rows[key] = dict(ppl=float(r["ppl"]), kl_to_float=float(r["kl_to_float"] or "nan"))
    samples: dict = {}
    with open(path.with_name(f"{path.stem}_windows.csv"), newline="") as f:
        for r in csv.DictReader(f):
            for column, value in r.items():
                if column != "window" and value:
                    impl, layout, method, kind = column.split(" | ")
                    samples.setdefault((layout, method, impl), {}).setdefault(kind, []).append(float(value))
    return rows, samples


EXPERIMENTS = (
    "grid",
    "sequential",
    "awq",
    "awq-grid",
    "awq-inputs",
    "awq-llmc",
    "awq-llmc-fp32",
    "awq-llmc-jitter",
    "fp32-scale",
    "llmc-awq-sym",
    "llmc-awq-asym",
    "palettization-skip",
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    p.add_argument("--experiments", default=",".join(EXPERIMENTS), help=f"comma-separated: {', '.join(EXPERIMENTS)}")
    p.add_argument(
        "--group-size", type=int, default=0, help="the layout of the grid and sequential experiments (0: per row)"
    )
    p.add_argument(
        "--llmc-before",
        default="",
        help="llmc-awq-*: llm-compressor methods run (on copies, unscored) before its AWQ in the same process",
    )
    p.add_argument("--jitter", type=float, default=1e-6, help="awq-llmc-jitter: the relative change of x_mean")
    p.add_argument(
        "--kl",
        action="store_true",
        help="also score each row by its mean KL divergence from the float model (as peers.py --kl), "
        "with bootstrap intervals; writes OUT_windows.csv",
    )
    p.add_argument(
        "--against",
        default=None,
        help="with --kl: the --out of a peers.py --kl run on the same model, text and seqlen; "
        "writes OUT_pairs.csv, each experiment against that run's rows of the same layout and method",
    )
    args = p.parse_args(argv)
    if args.against and not args.kl:
        p.error("--against needs --kl")
    chosen = args.experiments.split(",")
    if not set(chosen) <= set(EXPERIMENTS):
        p.error(f"--experiments {args.experiments!r}: choose from {', '.join(EXPERIMENTS)}")
    runs = []  # (method, registered name, config, experiment label, find_params[, float inputs])
    if "grid" in chosen:
        for method, name, cfg_class in (
            ("rtn", "rtn_int4", qtutor.RTNConfig),
            ("gptq", "gptq_int4", qtutor.GPTQConfig),
        ):
            cfg = cfg_class(bits=args.bits, group_size=args.group_size, sym=True)
            runs.append((method, name, cfg, "qtutor's grid", ORIGINAL))
            runs.append((method, name, cfg, "the reference grid", reference_sym_params))
    if "sequential" in chosen:
        cfg = qtutor.GPTQConfig(bits=args.bits, group_size=args.group_size, sym=True, true_sequential=False)
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
    llmc = dict(duo_scaling=True, clip=False)  # llm-compressor's two choices measured by "awq"
    if "awq-grid" in chosen:
        cfg = qtutor.AWQConfig(bits=args.bits, group_size=0, sym=True, **llmc)
        runs.append(("awq", "awq_int4", cfg, "duo scaling, no clipping, the reference grid", reference_sym_params))
    if "awq-inputs" in chosen:
        cfg = qtutor.AWQConfig(bits=args.bits, group_size=0, sym=True, **llmc)
        runs.append(("awq", "awq_int4", cfg, "duo scaling, no clipping, float inputs", ORIGINAL, FLOAT_INPUTS))
        label = "duo scaling, no clipping, the reference grid, float inputs"
        runs.append(("awq", "awq_int4", cfg, label, reference_sym_params, FLOAT_INPUTS))
    if "awq-llmc" in chosen:
        for sym in (True, False):
            cfg = qtutor.AWQConfig(bits=args.bits, group_size=0, sym=sym, ratio_grid="llm-compressor", **llmc)
            label = "all of llm-compressor's choices (+ its ratio grid)"
            runs.append(("awq", "awq_int4", cfg, label, reference_sym_params, FLOAT_INPUTS))
    if "fp32-scale" in chosen:
        for sym in (True, False):
            cfg = qtutor.RTNConfig(bits=args.bits, group_size=args.group_size, sym=sym)
            runs.append(("rtn", "rtn_int4", cfg, "llm-compressor's grid, float32 scale", reference_params_fp32))
    for experiment, jitter in (("awq-llmc-fp32", 0.0), ("awq-llmc-jitter", args.jitter)):
        if experiment in chosen:
            for sym in (True, False):
                cfg = qtutor.AWQConfig(bits=args.bits, group_size=0, sym=sym, ratio_grid="llm-compressor", **llmc)
                label = "all of llm-compressor's choices, float32 scale"
                label += f", x_mean moved by +-{jitter:g}" if jitter else ""
                runs.append(("awq", "awq_int4", cfg, label, reference_params_fp32, dict(FLOAT_INPUTS, jitter=jitter)))
    before = [b for b in args.llmc_before.split(",") if b]
    for sym in (True, False):
        if f"llmc-awq-{'sym' if sym else 'asym'}" in chosen:
            label = "alone in its process" if not before else f"after {', '.join(before)} in its process"
            runs.append(("awq", "llm-compressor", dict(bits=args.bits, group=0, sym=sym), label, ORIGINAL))
    if "palettization-skip" in chosen:
        for kmeans in ("fp16", "coreml"):
            cfg = qtutor.PalettizeConfig(bits=args.bits, kmeans=kmeans)
            label = f"kmeans={kmeans}, the linears coremltools skips left in float"
            runs.append(("palettization", "palettization_4bit", cfg, label, ORIGINAL, dict(coreml_skips=True)))
    model, dataset, calib, env, score = quality_setup(args)
    out = Path(args.out).with_suffix(".csv")
    windows_path, pairs_path = (out.with_name(f"{out.stem}_{kind}.csv") for kind in ("windows", "pairs"))
    samples: dict = {}  # (layout, method, experiment) -> {"nll": per-window NLLs, "kl": per-window KLs}
    if args.kl:
        nll = score(model).window_nll
        samples["float", "float", "-"] = {"nll": nll, "kl": [0.0] * len(nll)}
    ref_rows, ref_samples = read_reference(args.against) if args.against else ({}, {})
    if ref_samples:
        mine, theirs = samples["float", "float", "-"]["nll"], ref_samples["float", "float", "-"]["nll"]
        if len(mine) != len(theirs) or max(abs(x - y) for x, y in zip(mine, theirs)) > 1e-6:
            p.error(f"--against {args.against}: its float model's windows are not this run's")
    rows, found = [], []
    names = ("experiment", "reference")
    for method, name, cfg, label, params, *extra in runs:
        opts = extra[0] if extra else {}
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        if name == "llm-compressor":  # the reference itself, after the llm-compressor runs of --llmc-before
            for other in before:
                llmcompressor_run(other, copy.deepcopy(model), calib, cfg)
            t0 = time.perf_counter()
            llmcompressor_run(method, m, calib, cfg)
            cfg = SimpleNamespace(group_size=cfg["group"], sym=cfg["sym"])
        else:
            with grid(params), float_inputs(m, opts.get("float_inputs", False)), jitter_x_mean(opts.get("jitter", 0.0)):
                qtutor.quantize(m, name, cfg, calib=calib if method in ("gptq", "awq") else None)
        if opts.get("coreml_skips"):
            kept = keep_coreml_skips(m, model, cfg.group_size)
            print(f"left in float as coremltools does: {', '.join(kept)}")
        seconds = time.perf_counter() - t0
        if method == "palettization":
            layout = f"LUT{cfg.bits} per {cfg.group_size} rows, row scales"  # peers.py's name
        else:
            layout = layout_name(args.bits, cfg.group_size, cfg.sym)
        scores, sample = scored(m, model, score, args, args.kl)
        key = (layout, method, label)
        if args.kl:
            samples[key] = sample
            scores.update(intervals(sample))
        rows.append(
            dict(
                model=Path(args.model).name if Path(args.model).is_dir() else args.model,
                dataset=dataset,
                eval_tokens=len(sample["nll"]) * args.seqlen,
                calib=f"{args.calib_samples} x {args.calib_seqlen}",
                layout=layout,
                method=method,
                experiment=f"llm-compressor {label}" if name == "llm-compressor" else f"qtutor with {label}",
                **scores,
                seconds=seconds,
                **{f"env_{k}": v for k, v in env.items()},
            )
        )
        kl = f"  KL {scores['kl_to_float']:.5f} [{scores['kl_lo']:.5f}, {scores['kl_hi']:.5f}]" if args.kl else ""
        print(f"{layout:20s} {method:5s} {label:50s} ppl {scores['ppl']:10.3f}{kl}", flush=True)
        for (ref_layout, ref_method, impl), theirs in ref_rows.items():
            if args.kl and (ref_layout, ref_method) == (layout, method):
                pair = dict(layout=layout, method=method, experiment=rows[-1]["experiment"], reference=impl)
                pair.update(compare(rows[-1], theirs, samples[key], ref_samples[ref_layout, ref_method, impl], names))
                found.append(pair)
                print(
                    f"    against {impl}: ppl ratio {pair['ppl_ratio']:.4f} "
                    f"[{pair['ppl_ratio_lo']:.4f}, {pair['ppl_ratio_hi']:.4f}]; KL diff {pair['kl_diff']:+.5f} "
                    f"[{pair['kl_diff_lo']:+.5f}, {pair['kl_diff_hi']:+.5f}]",
                    flush=True,
                )
        write_csv(rows, out)
        if args.kl:
            write_windows(samples, windows_path)
        if found:
            write_csv(
                [{**{k: rows[-1][k] for k in ("model", "dataset", "eval_tokens", "calib")}, **f} for f in found],
                pairs_path,
            )
    print(f"wrote {out}" + (f", {windows_path}" if args.kl else "") + (f", {pairs_path}" if found else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
