"""``qtutor bench``: quantize a model with every method and measure it (chapter 7).

For each method: a fresh copy of the model is quantized, then perplexity (GPTQ protocol),
decode latency, memory and compression are measured. ``OUT/results.json`` is rewritten
atomically after every method, so an interrupted run loses no finished method and
``--resume`` skips them. At the end ``results.csv``, the figures and a table are written.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .errors import QtutorError

#: which command-line overrides apply to which method (where they make sense)
OVERRIDES = {
    "fp16_baseline": (),
    "rtn_int8": ("group_size", "sym"),
    "rtn_int4": ("bits", "group_size", "sym"),
    "smoothquant_w8a8": (),
    "gptq_int4": ("bits", "group_size", "sym", "act_order"),
    "awq_int4": ("bits", "group_size", "sym"),
    "palettization_4bit": ("bits",),
    "qlora_nf4": (),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtutor bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qtutor-tiny",
                   help="embedded 'qtutor-tiny' (default), a local folder, or a Hub id such as Qwen/Qwen2-0.5B")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights with --model's architecture ('qwen2-0.5b' works offline): "
                        "for timing and memory only, its perplexity is meaningless")
    p.add_argument("--methods", default="all",
                   help="comma-separated method names, or 'all' (every implemented method)")
    p.add_argument("--dataset", choices=("embedded", "wikitext2"), default=None,
                   help="evaluation text: the embedded model's held-out text (default for the embedded "
                        "model) or WikiText-2 test (default otherwise)")
    p.add_argument("--data-dir", default=None, help="local WikiText-2 in the Hugging Face layout "
                                                    "(also $QTUTOR_WIKITEXT)")
    p.add_argument("--seqlen", type=int, default=None, help="evaluation window (default 512; 2048 for Qwen2)")
    p.add_argument("--max-eval-tokens", type=int, default=None,
                   help="cap on evaluated tokens (default: all on CUDA, 32768 on CPU)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128 on CUDA, 16 on CPU)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="calibration window length (default seqlen)")
    p.add_argument("--bits", type=int, default=None, help="override the bit width of the 4-bit methods")
    p.add_argument("--group-size", type=int, default=None,
                   help="input columns per scale for RTN/GPTQ/AWQ (0 = per output channel)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric (--sym) or asymmetric (--no-sym) grid for RTN/GPTQ/AWQ")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize columns by decreasing diag(H) (the reference's --act-order)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                   help="compute dtype (auto: float16 on CUDA, float32 on CPU where fp16 matmul is slow)")
    p.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="time decoding with a static KV cache and CUDA graphs (qtutor.eval.fast_decode; "
                        "default: on CUDA) instead of the Hugging Face loop")
    p.add_argument("--kernels", choices=("auto", "triton", "tinygemm", "none"), default="auto",
                   help="fast matmul for 4-bit layers while timing decoding (qtutor.kernels.accelerate; "
                        "auto: Triton on CUDA, the reference forward on CPU); perplexity always uses "
                        "the reference forward")
    p.add_argument("--latency-tokens", type=int, default=50)
    p.add_argument("--latency-runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    p.add_argument("--resume", action="store_true", help="keep the finished methods of OUT/results.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def method_configs(names: list[str], args) -> dict:
    """Each method's config with the command-line overrides applied where they make sense."""
    from .quant import get_method
    overrides = {"bits": args.bits, "group_size": args.group_size, "sym": args.sym,
                 "act_order": args.act_order}
    configs = {}
    for name in names:
        m = get_method(name)
        cfg = m.default_config
        if cfg is not None:
            cfg = cfg.replace(**{k: overrides[k] for k in OVERRIDES[name]})
        configs[name] = cfg
    return configs


def parse_methods(spec: str) -> list[str]:
    from .quant import get_method, implemented_methods
    if spec == "all":
        return implemented_methods()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise QtutorError("--methods is empty; give method names separated by commas, or 'all'")
    for n in names:
        get_method(n)  # raises a one-line error for unknown or unimplemented names
    return names


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load_results(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("methods"), dict):
            raise ValueError("no 'methods' object")
        return data
    except (OSError, ValueError) as err:
        raise QtutorError(f"cannot resume from {path}: {err}; fix or delete the file, "
                          f"or run without --resume") from err


def versions() -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "qtutor": __import__("qtutor").__version__}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args) -> dict:
    from .data import calibration_windows, dataset_text, tokenize
    from .eval import memory_report, perplexity
    from .models import EMBEDDED_MODEL, load_config, load_model, random_model
    from .quant import get_method

    t_start = time.perf_counter()
    names = parse_methods(args.methods)
    configs = method_configs(names, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    previous = load_results(results_path) if args.resume and results_path.exists() else None

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QtutorError("--device cuda but no CUDA device is available; use --device cpu")
    dtype_name = args.dtype if args.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(args.seed)

    _quiet_libraries()
    if not args.random_weights:
        load_config(args.model)  # a missing model fails before any text is read
    is_embedded = args.model == EMBEDDED_MODEL
    dataset = args.dataset or ("embedded" if is_embedded else "wikitext2")
    needs_calib = any(get_method(n).needs_calib for n in names)
    texts = None  # read before the model loads, so a missing dataset fails fast
    if not args.random_weights:
        texts = (dataset_text(dataset, "eval", args.data_dir),
                 dataset_text(dataset, "calib", args.data_dir) if needs_calib else None)

    # the model, kept pristine on the CPU; each method quantizes its own copy
    if args.random_weights:
        base, tokenizer = random_model(args.model, dtype=dtype, seed=args.seed), None
    else:
        base, tokenizer = load_model(args.model, dtype=dtype, device="cpu")
    max_positions = getattr(base.config, "max_position_embeddings", None) or 10**9
    seqlen = args.seqlen or min(2048 if base.config.hidden_size >= 512 else 512, max_positions)
    if max(seqlen, args.calib_seqlen or 0) > max_positions:
        raise QtutorError(f"--seqlen/--calib-seqlen {max(seqlen, args.calib_seqlen or 0)} exceeds the model's "
                          f"{max_positions} positions; use a value of at most {max_positions}")
    calib_seqlen = args.calib_seqlen or seqlen
    n_calib = args.calib_samples or (128 if device.type == "cuda" else 16)
    # on a CPU the default run evaluates a slice of the text, so that it stays within minutes
    max_eval = args.max_eval_tokens or (None if device.type == "cuda" else 64 * 512)

    if args.random_weights:  # random token ids: the figures are timings, not quality
        g = torch.Generator().manual_seed(args.seed)
        eval_ids = torch.randint(0, base.config.vocab_size, (max_eval or 64 * seqlen,), generator=g)
        calib_ids = torch.randint(0, base.config.vocab_size, (n_calib * calib_seqlen + 1,), generator=g)
        dataset = "random-tokens"
    else:
        eval_ids = tokenize(tokenizer, texts[0])
        calib_ids = None if texts[1] is None else tokenize(tokenizer, texts[1])
    calib = None if not needs_calib else calibration_windows(calib_ids, n_calib, calib_seqlen, args.seed)
    prompt = eval_ids[:32]

    header = {"model": args.model + (" (random weights: timing only)" if args.random_weights else ""),
              "dataset": dataset, "device": device_name(device), "dtype": dtype_name,
              "seqlen": seqlen, "calib_samples": 0 if calib is None else int(calib.shape[0]),
              "calib_seqlen": calib_seqlen, "versions": versions()}
    results = {**header, "methods": {}}
    if previous is not None:
        for key in ("model", "dataset", "seqlen"):
            if previous.get(key) != header[key]:
                raise QtutorError(f"cannot resume: {results_path} has {key}={previous.get(key)!r} but this "
                                  f"run has {header[key]!r}; use the same settings or another --out")
        # keep the header of the run being continued (its calibration settings, say), adding
        # only keys it lacks: a resumed run that needs no calibration must not record 0 windows
        results = {**header, **previous}
    elif results_path.exists():
        backup = results_path.with_name("results.previous.json")
        os.replace(results_path, backup)
        print(f"note: the earlier {results_path} was moved to {backup} (use --resume to continue a run)")
    write_json_atomic(results_path, results)

    fp16_bytes = memory_report(_quantized_copy(base, "fp16_baseline", None, None, device)[0]).total_bytes
    print(f"model {header['model']} on {header['device']} ({dtype_name}); {dataset}, seqlen {seqlen}")
    for name in names:
        if name in results["methods"]:
            print(f"{name:20s} skipped (already in {results_path})")
            continue
        t0 = time.perf_counter()
        model, report = _quantized_copy(base, name, configs[name], calib, device, progress=not args.no_progress)
        ppl = perplexity(model, eval_ids, seqlen, max_eval, args.eval_batch_size,
                         progress=not args.no_progress)
        lat = _latency(model, prompt, args, device)
        mem = memory_report(model)
        results["methods"][name] = {
            "ppl": ppl.ppl, "eval_tokens": ppl.eval_tokens, "seqlen": seqlen,
            "bits_per_weight": report.bits_per_weight, "memory_mb": mem.total_mb,
            "compression_ratio": fp16_bytes / mem.total_bytes,
            "latency_ms_per_token": lat.ms_per_token, "quant_seconds": report.seconds,
            "latency_method": getattr(lat, "method", "hf-dynamic-cache"),
            "memory_split_bytes": {"embeddings": mem.embeddings_bytes, "linears": mem.linears_bytes,
                                   "other": mem.other_bytes},
            "config": None if report.config is None else report.config.__dict__,
            "kernel": getattr(lat, "kernels", None) or _kernels(model),
            "seconds": time.perf_counter() - t0,  # quantize + evaluate + time decoding
        }
        write_json_atomic(results_path, results)
        print(f"{name:20s} ppl {ppl.ppl:9.3f}  {report.bits_per_weight:6.3f} bits/w  "
              f"{mem.total_mb:8.2f} MB  {lat.ms_per_token:7.2f} ms/tok  ({time.perf_counter() - t0:.1f} s)")
        del model
    done = [n for n in names if n in results["methods"]]
    wall = time.perf_counter() - t_start
    # wall time of THIS invocation, from the start (model and text loading included)
    results["wall_seconds"] = wall if previous is None else None
    write_json_atomic(results_path, results)
    _write_outputs(results, out)
    print(f"wall time {wall:.1f} s for this run ({len(done)} methods"
          + (", continuing an earlier run: not the time of the whole set)" if previous is not None else ")"))
    return results


def _latency(model, prompt, args, device):
    """Decode latency: the fast harness (static cache, CUDA graphs, fast kernels) or the HF loop."""
    from .eval import decode_latency
    fast = device.type == "cuda" if getattr(args, "fast_decode", None) is None else args.fast_decode
    if not fast:
        return decode_latency(model, prompt, args.latency_tokens, runs=args.latency_runs)
    from .eval.fast_decode import fast_decode_latency
    from .kernels import accelerate
    accelerate(model, getattr(args, "kernels", "auto"))
    return fast_decode_latency(model, prompt, args.latency_tokens, runs=args.latency_runs)


def _quiet_libraries():
    """Our own progress bars only: silence transformers' and datasets' bars and info logs."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        import datasets
        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _quantized_copy(base, name, cfg, calib, device, progress=False):
    from .api import quantize
    model = copy.deepcopy(base).to(device)
    report = quantize(model, name, cfg, calib=calib, progress=progress)
    return model, report


def _kernels(model) -> dict:
    from .eval.fast_decode import _kernels as kernels_used
    return kernels_used(model)


def _write_outputs(results: dict, out: Path) -> None:
    from .plots import plot_results, results_table, write_csv
    write_csv(results, out / "results.csv")
    for path in plot_results(results, out):
        print(f"wrote {path}")
    print(results_table(results))
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except QtutorError as err:
        print(f"qtutor bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nqtutor bench: interrupted; finished methods are kept in {args.out}/results.json "
              f"(continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
