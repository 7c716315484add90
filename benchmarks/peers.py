"""qtutor beside the reference libraries: the same model, windows and perplexity function.

Every method is run by qtutor and by its reference library on the same model copy, the
calibrated ones on the same calibration windows, and every copy is scored by
``qtutor.eval.perplexity`` on the same tokens. The layouts:

* the uniform 4-bit grid (RTN, GPTQ, AWQ): one grid per output row or groups of
  ``--group-size``, symmetric and asymmetric;
* W8A8 (INT8 weights per output row, INT8 activations per token), without and with SmoothQuant;
* NF4, blocks of 64 with double quantization (QLoRA);
* 4-bit palettization, one LUT per 16 rows with per-row scales (coremltools' layout).

The peers, where installed (a missing one is reported and its rows are left out):

* llm-compressor (``oneshot``), ``lm_head`` left in float as qtutor does: RTN =
  ``QuantizationModifier`` (min-max observer); GPTQ = ``GPTQModifier`` (its defaults: act-order
  with static groups, damping 0.01, blocks of 128); AWQ = ``AWQModifier`` (its defaults: 20 grid
  points, duo scaling) then ``QuantizationModifier``; W8A8 = ``QuantizationModifier(scheme="W8A8")``
  with, for SmoothQuant, ``SmoothQuantModifier(smoothing_strength=alpha)`` before it. Its AWQ
  pins host memory, which a CPU-only torch cannot do: that one call is skipped here
  (``IntermediatesCache.pin_memory``, an optimisation for host-to-GPU copies);
* bitsandbytes: ``quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)``
  and back with ``dequantize_4bit``, for each linear;
* coremltools: ``PostTrainingPalettizer`` (``n_bits=4``, ``per_grouped_channel``, group size 16,
  ``enable_per_channel_scale``), for each linear. coremltools 9 leaves a linear whose output
  width is not a multiple of 16 uncompressed, with a warning (stories260K's gate_proj and
  up_proj, 172 rows); qtutor gives its last LUT fewer rows, so on such a model the two rows
  do not compress the same linears (``peers_explain.py``'s ``palettization-skip`` compares
  like with like).

Writes ``OUT.csv`` (one row per layout, method and implementation: perplexity with its 95%
bootstrap interval over the evaluation windows, ``ppl_lo``/``ppl_hi``, seconds, the versions) and
prints a table; rows are written as they are measured. With ``--kl``, each row is also scored
against the float model on the same tokens: ``kl_to_float``, the mean KL(p_float || p_quantized)
of the next-token distributions in nats, with its interval ``kl_lo``/``kl_hi``, and
``top1_agree``, the fraction of predictions whose most likely token is the float model's
(``_common.kl_to_reference``; it costs two more forward passes over the text per row).

Beside it, ``OUT_pairs.csv``: for each layout and method that both qtutor and the reference
measured, qtutor's figure against the reference's with the PAIRED bootstrap interval over the
same resampled windows (``qtutor.eval.ppl``, 2000 resamples, seed 0): the perplexity ratio
``ppl_ratio`` (qtutor / reference, ``bootstrap_ppl_ratio``) and, with ``--kl``, the difference
``kl_diff`` (qtutor - reference, ``bootstrap_mean_diff``). An interval that does not contain 1
(ratio) or 0 (difference) ranks the two on this text beyond the windows' noise. And
``OUT_windows.csv``: each row's per-window figures (mean NLL and, with ``--kl``, mean KL per
window, one line per window in order), from which every interval can be computed again.

``--eval-text calib-heldout`` scores a second text: the windows of the calibration split
(WikiText-2 validation) that no calibration window touches.

    python benchmarks/peers.py --model PATH/stories260K-qwen2-hf --data-dir PATH/hf-wikitext \\
        --group-size 64,4 --out benchmarks/peers_stories260k
    python benchmarks/peers.py --model qtutor-tiny --group-size 64 --out benchmarks/peers_qtutor-tiny
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_quality_args, kl_to_reference, layout_name, quality_setup, write_csv  # noqa: E402

import qtutor  # noqa: E402
from qtutor.eval.ppl import (  # noqa: E402
    BOOTSTRAP_LEVEL,
    BOOTSTRAP_SAMPLES,
    bootstrap_mean,
    bootstrap_mean_diff,
    bootstrap_ppl,
    bootstrap_ppl_ratio,
)
from qtutor.models import layout_for  # noqa: E402


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def decoder_linears(model):
    """(name, nn.Linear) of every linear in the decoder layers: what every method quantizes."""
    layout = layout_for(model)
    for i, layer in enumerate(layout.layers(model)):
        for name, lin in layout.linears(layer).items():
            yield f"layers.{i}.{name}", lin


# --------------------------------------------------------------------------- qtutor
UNIFORM = {"rtn": ("rtn_int4", qtutor.RTNConfig), "gptq": ("gptq_int4", qtutor.GPTQConfig)}
UNIFORM["awq"] = ("awq_int4", qtutor.AWQConfig)


def qtutor_run(method: str, model, calib, layout: dict, **overrides):
    """qtutor at its registered defaults (or with ``overrides`` of its config), on the layout."""
    if method in UNIFORM:
        name, cfg_class = UNIFORM[method]
        cfg = cfg_class(bits=layout["bits"], group_size=layout["group"], sym=layout["sym"], **overrides)
        qtutor.quantize(model, name, cfg, calib=calib if method != "rtn" else None)
    elif method in ("w8a8", "smoothquant"):
        cfg = qtutor.SmoothQuantConfig(alpha=layout["alpha"], smooth=method == "smoothquant", **overrides)
        qtutor.quantize(model, "smoothquant_w8a8", cfg, calib=calib)
    elif method == "nf4":
        qtutor.quantize(model, "qlora_nf4", qtutor.NF4Config(**{"compute_dtype": "float32", **overrides}))
    elif method == "palettization":
        qtutor.quantize(model, "palettization_4bit", qtutor.PalettizeConfig(**overrides))
    else:
        raise ValueError(method)


def parse_variants(text: str) -> dict:
    """``"awq:duo_scaling=true,awq:clip=false"`` -> {"awq": [{"duo_scaling": True}, {"clip": False}]}:
    extra qtutor rows, one per override, to show what a default is worth."""
    out: dict = {}
    for item in filter(None, text.split(",")):
        try:
            method, assignment = item.split(":", 1)
            key, value = assignment.split("=", 1)
        except ValueError:
            raise SystemExit(f"--variants {item!r}: write METHOD:FIELD=VALUE, e.g. awq:duo_scaling=true") from None
        if method not in PEERS:
            raise SystemExit(f"--variants {item!r}: unknown method {method!r}; choose from {', '.join(PEERS)}")
        parsed = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(parsed, str):
            try:
                parsed = float(value) if "." in value else int(value)
            except ValueError:
                pass
        out.setdefault(method, []).append({key: parsed})
    return out


# --------------------------------------------------------------------------- llm-compressor
def _llmc_oneshot(model, recipe, calib=None):
    from llmcompressor import oneshot

    if calib is None:
        oneshot(model=model, recipe=recipe)
        return
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * calib.shape[0]})
    oneshot(
        model=model, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1]
    )


def llmcompressor_run(method: str, model, calib, layout: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if method in ("w8a8", "smoothquant"):
        recipe = [QuantizationModifier(targets=["Linear"], scheme="W8A8", ignore=["lm_head"])]
        if method == "smoothquant":
            from llmcompressor.modifiers.transform import SmoothQuantModifier

            recipe.insert(0, SmoothQuantModifier(smoothing_strength=layout["alpha"]))
        _llmc_oneshot(model, recipe, calib)
        return
    group = layout["group"]
    args = QuantizationArgs(
        num_bits=layout["bits"],
        type="int",
        symmetric=layout["sym"],
        strategy="group" if group else "channel",
        group_size=group or None,
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}
    # a last, shorter group where the width is not a multiple of the group size (qtutor does the same)
    quant = dict(config_groups=groups, ignore=["lm_head"], bypass_divisibility_checks=True)
    if method == "rtn":
        _llmc_oneshot(model, QuantizationModifier(**quant))
    elif method == "gptq":
        recipe = GPTQModifier(**quant, dampening_frac=0.01, block_size=128)
        _llmc_oneshot(model, recipe, calib)
    elif method == "awq":
        from llmcompressor.modifiers.transform import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        if not torch.cuda.is_available():  # pinned host memory needs a CUDA build of torch
            IntermediatesCache.pin_memory = lambda self, *a, **k: None
        recipe = [AWQModifier(), QuantizationModifier(**quant)]
        _llmc_oneshot(model, recipe, calib)
    else:
        raise ValueError(method)


# --------------------------------------------------------------------------- bitsandbytes, coremltools
@torch.no_grad()
def bitsandbytes_run(method: str, model, calib, layout: dict):
    import bitsandbytes.functional as bnbf

    for _, lin in decoder_linears(model):
        W = lin.weight.data
        packed, state = bnbf.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
        lin.weight.data = bnbf.dequantize_4bit(packed, state).to(W.dtype)


@torch.no_grad()
def coremltools_run(method: str, model, calib, layout: dict):
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

    logging.getLogger("coremltools").setLevel(logging.WARNING)
    cfg = {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 16, "enable_per_channel_scale": True}
    config = PostTrainingPalettizerConfig.from_dict({"global_config": cfg})
    for _, lin in decoder_linears(model):
        one = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
        one.weight.data = lin.weight.data.float().clone()
        out = PostTrainingPalettizer(torch.nn.Sequential(one), config).compress()[0]
        lin.weight.data = out.weight.data.to(lin.weight.dtype)


#: method -> its reference implementation and the package that provides it
PEERS = {
    "rtn": (llmcompressor_run, "llm-compressor", "llmcompressor"),
    "gptq": (llmcompressor_run, "llm-compressor", "llmcompressor"),
    "awq": (llmcompressor_run, "llm-compressor", "llmcompressor"),
    "w8a8": (llmcompressor_run, "llm-compressor", "llmcompressor"),
    "smoothquant": (llmcompressor_run, "llm-compressor", "llmcompressor"),
    "nf4": (bitsandbytes_run, "bitsandbytes", "bitsandbytes"),
    "palettization": (coremltools_run, "coremltools", "coremltools"),
}


# --------------------------------------------------------------------------- intervals
def intervals(samples: dict) -> dict:
    """A row's 95% bootstrap intervals over the windows from its per-window figures
    (``{"nll": [...], "kl": [...]}``, "kl" with ``--kl``): ppl_lo, ppl_hi, kl_lo, kl_hi."""
    out = dict(zip(("ppl_lo", "ppl_hi"), bootstrap_ppl(samples["nll"])))
    if "kl" in samples:
        out.update(zip(("kl_lo", "kl_hi"), bootstrap_mean(samples["kl"])))
    return out


def scored(m, reference, score, args, kl: bool) -> tuple[dict, dict]:
    """``m`` scored on ``score``'s tokens -> (figures, per-window figures): ``ppl`` and, with
    ``kl``, ``kl_to_float`` and ``top1_agree`` against ``reference`` (``_common.kl_to_reference``);
    ``{"nll": [...], "kl": [...]}`` for :func:`intervals` and :func:`compare`."""
    r = score(m)
    figures, sample = {"ppl": r.ppl}, {"nll": r.window_nll}
    if kl:
        found = kl_to_reference(m, reference, score.eval_ids, args.seqlen, args.max_eval_tokens)
        sample["kl"] = found.pop("window_kl")
        figures.update(found)
    return figures, sample


def pairs(rows: list[dict], samples: dict) -> list[dict]:
    """qtutor against the reference of the same layout and method, for every such pair in
    ``rows`` (``samples``: (layout, method, implementation) -> that row's per-window figures):
    the perplexity ratio and, where both rows have per-window KLs, the KL difference, each with
    its paired 95% bootstrap interval (the same resampled windows for both rows)."""
    measured = {(r["layout"], r["method"], r["implementation"]): r for r in rows if r.get("ppl") is not None}
    out = []
    for (layout, method, impl), mine in measured.items():
        reference = PEERS[method][1] if impl == "qtutor" and method in PEERS else None
        theirs = measured.get((layout, method, reference))
        if theirs is None:
            continue
        pair = dict(layout=layout, method=method, reference=reference)
        out.append({**pair, **compare(mine, theirs, samples[layout, method, impl], samples[layout, method, reference])})
    return out


def compare(mine: dict, theirs: dict, a: dict, b: dict, names=("qtutor", "reference")) -> dict:
    """Row ``mine`` against row ``theirs`` (each with ``ppl`` and, with ``--kl``, ``kl_to_float``)
    over the same windows, ``a`` and ``b`` their per-window figures (``{"nll": [...], "kl": [...]}``):
    ``ppl_ratio`` (mine / theirs) and, where both have per-window KLs, ``kl_diff`` (mine - theirs),
    each with its paired 95% bootstrap interval (the same resampled windows for both rows); the
    two rows' own figures in ``ppl_NAME``/``kl_NAME`` for the two ``names``."""
    if len(a["nll"]) != len(b["nll"]):
        raise ValueError(f"paired rows need the same windows: {len(a['nll'])} against {len(b['nll'])}")
    x, y = names
    pair = dict(windows=len(a["nll"]))
    pair.update({f"ppl_{x}": mine["ppl"], f"ppl_{y}": theirs["ppl"], "ppl_ratio": mine["ppl"] / theirs["ppl"]})
    pair.update(zip(("ppl_ratio_lo", "ppl_ratio_hi"), bootstrap_ppl_ratio(a["nll"], b["nll"])))
    if "kl" in a and "kl" in b:
        kl_a, kl_b = mine["kl_to_float"], theirs["kl_to_float"]
        pair.update({f"kl_{x}": kl_a, f"kl_{y}": kl_b, "kl_diff": kl_a - kl_b})
        pair.update(zip(("kl_diff_lo", "kl_diff_hi"), bootstrap_mean_diff(a["kl"], b["kl"])))
    return {**pair, "n_boot": BOOTSTRAP_SAMPLES, "level": BOOTSTRAP_LEVEL, "seed": 0}


def write_windows(samples: dict, path: Path) -> None:
    """Every row's per-window figures, one line per window: columns ``window`` and
    ``IMPLEMENTATION | LAYOUT | METHOD | nll`` (and ``| kl``)."""
    columns = {
        f"{impl} | {layout} | {method} | {k}": v for (layout, method, impl), s in samples.items() for k, v in s.items()
    }
    n = max(len(v) for v in columns.values())
    write_csv([{"window": i, **{c: format(v[i], ".10g") for c, v in columns.items()}} for i in range(n)], path)


def plan(methods: list[str], bits: int, group_sizes: list[int], alpha: float, per_row: bool = True):
    """(layout name, layout, method) in the order they run."""
    for group in (0, *group_sizes) if per_row else group_sizes:
        for sym in (True, False):
            lay = dict(bits=bits, group=group, sym=sym)
            for m in methods:
                if m in UNIFORM:
                    yield layout_name(bits, group, sym), lay, m
    for m in ("w8a8", "smoothquant"):
        if m in methods:
            yield f"W8A8 (alpha {alpha})" if m == "smoothquant" else "W8A8", dict(alpha=alpha), m
    if "nf4" in methods:
        yield "NF4 blocks of 64, double quant", {}, "nf4"
    if "palettization" in methods:
        yield "LUT4 per 16 rows, row scales", {}, "palettization"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_args(p)
    p.add_argument(
        "--group-size",
        default="64",
        help="the group-wise layouts' group sizes, comma-separated (0 is per row: with --no-per-row, only those)",
    )
    p.add_argument(
        "--no-per-row",
        action="store_true",
        help="only the group-wise layouts of the uniform methods (to add rows for another group size)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant's migration strength (both libraries)")
    p.add_argument("--methods", default=",".join(PEERS), help=f"comma-separated, from {', '.join(PEERS)}")
    p.add_argument(
        "--variants",
        default="",
        help="extra qtutor rows with one config field changed, e.g. awq:duo_scaling=true,awq:clip=false",
    )
    p.add_argument(
        "--kl",
        action="store_true",
        help="also score each row by its mean KL divergence from the float model's next-token "
        "distributions and its top-1 agreement with it, on the same tokens (columns kl_to_float, top1_agree)",
    )
    args = p.parse_args(argv)
    variants = parse_variants(args.variants)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in PEERS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(PEERS)}")
    try:
        group_sizes = [int(g) for g in args.group_size.split(",")]
    except ValueError:
        p.error(f"--group-size {args.group_size!r}: give whole numbers separated by commas, e.g. 64,4")
    model, dataset, calib, env, score = quality_setup(args)
    versions = {pkg: version(pkg) for pkg in ("qtutor", "llmcompressor", "compressed-tensors", "bitsandbytes")}
    versions["coremltools"] = version("coremltools")
    for _, name, package in set(PEERS[m] for m in methods):
        if not versions.get(package, version(package)):
            print(f"{name} is not installed (pip install {package}): its rows are left out")

    header = dict(
        model=Path(args.model).name if Path(args.model).is_dir() else args.model,
        dataset=dataset,
        seqlen=args.seqlen,
        calib=f"{args.calib_samples} x {args.calib_seqlen}",
        **{f"v_{k}": v for k, v in versions.items()},
        **{f"env_{k}": v for k, v in env.items()},
    )
    path = Path(args.out).with_suffix(".csv")
    pairs_path, windows_path = (path.with_name(f"{path.stem}_{kind}.csv") for kind in ("pairs", "windows"))
    samples: dict = {}  # (layout, method, implementation) -> {"nll": per-window NLLs, "kl": per-window KLs}

    def measure(m, row: dict) -> str:
        """Score ``m`` into ``row`` (and ``samples``); -> the KL part of the printed line."""
        figures, sample = scored(m, model, score, args, args.kl)
        samples[row["layout"], row["method"], row["implementation"]] = sample
        row.update(figures, **intervals(sample))
        if not args.kl:
            return ""
        return f"  KL {row['kl_to_float']:.5f} [{row['kl_lo']:.5f}, {row['kl_hi']:.5f}]  top-1 {row['top1_agree']:.4f}"

    def write() -> None:  # nothing measured is lost
        write_csv([{**header, **r} for r in rows], path)
        write_windows(samples, windows_path)
        if found := pairs(rows, samples):
            write_csv([{**header, **p} for p in found], pairs_path)

    rows = [dict(layout="float", method="float", implementation="-", ppl=None, seconds=0.0)]
    measure(model, rows[0])
    header["eval_tokens"] = len(samples["float", "float", "-"]["nll"]) * args.seqlen
    print(f"float: perplexity {rows[0]['ppl']:.3f} [{rows[0]['ppl_lo']:.3f}, {rows[0]['ppl_hi']:.3f}]")
    for layout, lay, method in plan(methods, args.bits, group_sizes, args.alpha, per_row=not args.no_per_row):
        peer_run, peer_name, package = PEERS[method]
        impls = [("qtutor", qtutor_run)] + ([(peer_name, peer_run)] if version(package) else [])
        for change in variants.get(method, []):
            label = ", ".join(f"{k}={v}" for k, v in change.items())
            impls.append((f"qtutor ({label})", lambda *a, change=change: qtutor_run(*a, **change)))
        for impl, run in impls:
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            try:
                run(method, m, calib, lay)
            except Exception as err:  # noqa: BLE001 - a peer that refuses a layout is a result
                msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
                rows.append(dict(layout=layout, method=method, implementation=impl, ppl=None, error=msg))
                print(f"{layout:30s} {method:13s} {impl:15s} failed: {msg}", flush=True)
                continue
            seconds = time.perf_counter() - t0
            rows.append(dict(layout=layout, method=method, implementation=impl, ppl=None, seconds=seconds))
            kl = measure(m, rows[-1])
            print(
                f"{layout:30s} {method:13s} {impl:15s} ppl {rows[-1]['ppl']:10.3f}{kl}  ({seconds:.1f} s)", flush=True
            )
            write()
    write()
    found = pairs(rows, samples)
    for p in found:
        kl = f"; KL diff {p['kl_diff']:+.5f} [{p['kl_diff_lo']:+.5f}, {p['kl_diff_hi']:+.5f}]" if "kl_diff" in p else ""
        ratio = f"ppl ratio {p['ppl_ratio']:.4f} [{p['ppl_ratio_lo']:.4f}, {p['ppl_ratio_hi']:.4f}]"
        print(f"{p['layout']:30s} {p['method']:13s} qtutor / {p['reference']}: {ratio}{kl}")
    print(f"wrote {path}, {windows_path}" + (f", {pairs_path}" if found else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
