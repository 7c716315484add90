"""``qtutor bench``: quantize a model with every method and measure it (chapter 7).

For each method: a fresh copy of the model is quantized, then perplexity (GPTQ protocol),
decode latency, memory and compression are measured. Every option is checked before any work
starts. ``OUT/results.json`` is replaced whole after every method, under a lock on the folder
(``qtutor.runfolder``): a finished method is never lost, whatever runs after it, fails, is
killed or runs at the same time. ``--resume`` continues a run with the same settings (every
setting that changes a number is compared); ``--overwrite`` starts afresh and keeps the old
file as ``results.previous-N.json``. At the end ``results.csv``, the figures and a table are written.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .errors import QtutorError
from .runfolder import (RESULTS, archive, check_out_path, finite_or_none, locked, os_error, read_results,
                        write_json)

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
    p = _Parser(prog="qtutor bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qtutor-tiny",
                   help="embedded 'qtutor-tiny' (default), a local folder, or a Hub id such as Qwen/Qwen2-0.5B")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights with --model's architecture ('qwen2-0.5b' works offline): "
                        "for timing and memory only, its perplexity is meaningless")
    p.add_argument("--methods", nargs="+", default=["all"], metavar="METHOD",
                   help="method names separated by spaces or commas, or 'all' (every implemented method)")
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
                   help="time decoding with a static KV cache and CUDA graphs (qtutor.runtime.decode; "
                        "default: on CUDA) instead of the Hugging Face loop")
    p.add_argument("--kernels", choices=("auto", "triton", "tinygemm", "none"), default="auto",
                   help="fast matmul for 4-bit layers while timing decoding (qtutor.runtime.kernels.accelerate; "
                        "auto: Triton on CUDA, the reference forward on CPU); perplexity always uses "
                        "the reference forward")
    p.add_argument("--latency-tokens", type=int, default=50)
    p.add_argument("--latency-runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT: keep its finished methods, compute the others "
                        "(refused if a setting that changes a number differs)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUT that holds results; the old results.json is kept "
                        "as results.previous-N.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one-line :class:`QtutorError` instead of usage + exit."""

    def error(self, message):
        raise QtutorError(f"{message}; see qtutor bench --help")


#: lower bounds of the integer options: flag -> (attribute, minimum, why)
MINIMUMS = {
    "--seqlen": ("seqlen", 2, "a window needs a token to predict and one to predict it from"),
    "--max-eval-tokens": ("max_eval_tokens", 1, "it counts evaluated tokens"),
    "--eval-batch-size": ("eval_batch_size", 1, "it counts windows per forward pass"),
    "--calib-samples": ("calib_samples", 1, "it counts calibration windows"),
    "--calib-seqlen": ("calib_seqlen", 1, "it counts tokens per calibration window"),
    "--latency-tokens": ("latency_tokens", 2, "the first token comes from the prefill, so decoding "
                                              "speed needs two"),
    "--latency-runs": ("latency_runs", 1, "it counts timed decodes"),
    "--seed": ("seed", 0, "seeds are non-negative"),
}
MAX_SEED = 2**63 - 1


def check_options(args) -> None:
    """The checks that need nothing but the options themselves."""
    for flag, (attr, low, why) in MINIMUMS.items():
        value = getattr(args, attr)
        if value is not None and value < low:
            default = " (or leave it out for the default)" if build_parser().get_default(attr) is None else ""
            raise QtutorError(f"{flag} {value} is too small ({why}); use {low} or more{default}")
    if args.seed > MAX_SEED:
        raise QtutorError(f"--seed {args.seed} is too large; use at most {MAX_SEED}")
    if args.resume and args.overwrite:
        raise QtutorError("--resume and --overwrite contradict each other; --resume continues the run "
                          "in --out, --overwrite starts afresh (keeping the old results file)")


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


def parse_methods(spec) -> list[str]:
    """``--methods``: names separated by spaces (``--methods rtn_int4 gptq_int4``, as the
    original benchmark takes them) or commas, or ``all``."""
    from .quant import get_method, implemented_methods
    names = ",".join([spec] if isinstance(spec, str) else spec).replace(" ", ",").split(",")
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return implemented_methods()
    if not names:
        raise QtutorError("--methods is empty; give method names separated by spaces or commas, or 'all'")
    for n in names:
        get_method(n)  # raises a one-line error for unknown or unimplemented names
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise QtutorError(f"--methods names {', '.join(twice)} more than once; give each method once")
    return names


def resolve_device(spec: str) -> torch.device:
    """``--device``: auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    from .api import parse_device
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return parse_device(spec)
    except QtutorError as err:
        raise QtutorError(f"--device: {err}; or 'auto'") from err


def load_results(path: Path) -> dict:
    """The results file of an earlier run, checked; a one-line error if it cannot be resumed."""
    try:
        return read_results(path)
    except ValueError as err:
        raise QtutorError(f"cannot resume from {path}: {err}; fix or delete the file, "
                          f"or run without --resume into another --out") from err


def versions() -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "qtutor": __import__("qtutor").__version__}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """Everything a run resolves from its options and the model's config, before any work."""

    names: list
    configs: dict
    device: torch.device
    dtype_name: str
    out: Path
    model_config: object
    dataset: str
    needs_calib: bool
    seqlen: int
    calib_seqlen: int
    n_calib: int
    max_eval: Optional[int]

    @property
    def results_path(self) -> Path:
        return self.out / RESULTS


def plan_run(args) -> Plan:
    """Check every option and resolve the sizes; nothing is read but the model's config."""
    from .models import EMBEDDED_MODEL
    from .quant import get_method
    check_options(args)
    names = parse_methods(args.methods)
    configs = method_configs(names, args)
    device = resolve_device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    out = Path(args.out)
    check_out_path(out)
    config = _model_config(args)
    max_positions = getattr(config, "max_position_embeddings", None) or 10**9
    seqlen = args.seqlen or min(2048 if config.hidden_size >= 512 else 512, max_positions)
    if max(seqlen, args.calib_seqlen or 0) > max_positions:
        raise QtutorError(f"--seqlen/--calib-seqlen {max(seqlen, args.calib_seqlen or 0)} exceeds the model's "
                          f"{max_positions} positions; use a value of at most {max_positions}")
    # on a CPU the default run evaluates a slice of the text, so that it stays within minutes
    max_eval = args.max_eval_tokens or (None if device.type == "cuda" else 64 * 512)
    if max_eval is not None and max_eval < seqlen:
        given = "--max-eval-tokens" if args.max_eval_tokens else "the CPU default of --max-eval-tokens"
        raise QtutorError(f"{given} {max_eval} is fewer than one window of {seqlen} tokens (--seqlen); "
                          f"use --max-eval-tokens {seqlen} or more, or a smaller --seqlen")
    dataset = "random-tokens" if args.random_weights else (
        args.dataset or ("embedded" if args.model == EMBEDDED_MODEL else "wikitext2"))
    return Plan(names, configs, device, dtype_name, out, config, dataset,
                needs_calib=any(get_method(n).needs_calib for n in names), seqlen=seqlen,
                calib_seqlen=args.calib_seqlen or seqlen,
                n_calib=args.calib_samples or (128 if device.type == "cuda" else 16), max_eval=max_eval)


def _model_config(args):
    """The model's transformers config (a one-line error if the model cannot be had)."""
    from .models import LAYOUTS, QWEN2_0_5B, load_config
    if args.random_weights and args.model.lower() in ("qwen2-0.5b", "qwen/qwen2-0.5b"):
        from transformers import Qwen2Config
        return Qwen2Config(**QWEN2_0_5B)
    config = load_config(args.model)
    if config.model_type not in LAYOUTS:
        raise QtutorError(f"model type {config.model_type!r} has no layout in qtutor; "
                          f"supported: {', '.join(sorted(LAYOUTS))}")
    return config


def model_revision(args, config) -> str:
    """What identifies the model's numbers: a fingerprint of a local folder's config and weight
    files, the Hub commit, or the built-in architecture."""
    from .models import resolve_model
    if args.random_weights and args.model.lower() in ("qwen2-0.5b", "qwen/qwen2-0.5b"):
        return "built-in qwen2-0.5b architecture"
    path = Path(resolve_model(args.model))
    if not path.is_dir():
        return getattr(config, "_commit_hash", None) or f"hub:{args.model} (revision unknown)"
    patterns = ("config.json",) if args.random_weights else (
        "config.json", "*.safetensors", "*.bin", "*.safetensors.index.json")
    h = hashlib.sha256()
    for f in sorted({f for pattern in patterns for f in path.glob(pattern)}):
        h.update(f"{f.name}:{f.stat().st_size}:".encode())
        _hash_file(h, f)
    return "sha256:" + h.hexdigest()[:16]


#: files up to this size are hashed whole; larger ones in evenly spaced samples
WHOLE_FILE_BYTES = 256 << 20
SAMPLES, SAMPLE_BYTES = 256, 64 << 10


def _hash_file(h, path: Path) -> None:
    """Whole files up to 256 MiB (a changed weight always shows); beyond that 256 evenly spaced
    64 KiB samples (16 MiB: a retrained or re-exported model shows, one edited weight may not)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return
        for i in range(SAMPLES):
            f.seek(i * (size - SAMPLE_BYTES) // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))


def _digest(t: torch.Tensor) -> str:
    return "sha256:" + hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """The pristine model (on the CPU), the evaluation ids and the calibration windows."""

    base: torch.nn.Module
    eval_ids: torch.Tensor
    eval_tokens: torch.Tensor  # the windows perplexity evaluates, (n, seqlen)
    calib: Optional[torch.Tensor]

    @property
    def prompt(self) -> torch.Tensor:
        return self.eval_ids[:32]


def read_texts(args, plan: Plan):
    """(evaluation text, calibration text or None); None for random weights."""
    from .data import dataset_text
    if args.random_weights:
        return None
    return (dataset_text(plan.dataset, "eval", args.data_dir),
            dataset_text(plan.dataset, "calib", args.data_dir) if plan.needs_calib else None)


def load_inputs(args, plan: Plan, texts) -> Inputs:
    """Load the model and tokenize; checks that the texts give the windows the run needs."""
    from .data import calibration_windows, eval_windows, tokenize
    from .models import load_model, random_model
    dtype = getattr(torch, plan.dtype_name)
    torch.manual_seed(args.seed)
    if args.random_weights:  # random token ids: the figures are timings, not quality
        base = random_model(args.model, dtype=dtype, seed=args.seed)
        g = torch.Generator().manual_seed(args.seed)
        vocab = base.config.vocab_size
        eval_ids = torch.randint(0, vocab, (plan.max_eval or 64 * plan.seqlen,), generator=g)
        calib_ids = torch.randint(0, vocab, (plan.n_calib * plan.calib_seqlen + 1,), generator=g)
    else:
        base, tokenizer = load_model(args.model, dtype=dtype, device="cpu")
        eval_ids = tokenize(tokenizer, texts[0])
        calib_ids = None if texts[1] is None else tokenize(tokenizer, texts[1])
    calib = (calibration_windows(calib_ids, plan.n_calib, plan.calib_seqlen, args.seed)
             if plan.needs_calib else None)
    return Inputs(base, eval_ids, eval_windows(eval_ids, plan.seqlen, plan.max_eval), calib)


# --------------------------------------------------------------------------- settings
#: every setting that changes a number, as --resume names it when it differs (in this order)
SETTINGS = {
    "model": "--model", "random_weights": "--random-weights",
    "model_revision": "the model's files (config and weights)", "dataset": "--dataset",
    "seqlen": "--seqlen", "eval_tokens": "the evaluated tokens (--max-eval-tokens)",
    "eval_text": "the evaluation text (--data-dir or the tokenizer)", "seed": "--seed",
    "dtype": "--dtype", "device_type": "--device", "bits": "--bits", "group_size": "--group-size",
    "sym": "--sym/--no-sym", "act_order": "--act-order", "latency_tokens": "--latency-tokens",
    "fast_decode": "--fast-decode", "kernels": "--kernels", "calib_samples": "--calib-samples",
    "calib_seqlen": "--calib-seqlen", "calib_windows": "the calibration text (--data-dir or the tokenizer)",
}
CALIB_SETTINGS = ("calib_samples", "calib_seqlen", "calib_windows")


def run_settings(args, plan: Plan, inputs: Inputs) -> dict:
    """The values of :data:`SETTINGS` for this run (calibration ones None if it calibrates nothing)."""
    calibrated = inputs.calib is not None
    fast = plan.device.type == "cuda" if args.fast_decode is None else args.fast_decode
    return {
        "model": args.model, "random_weights": args.random_weights,
        "model_revision": model_revision(args, plan.model_config), "dataset": plan.dataset,
        "seqlen": plan.seqlen, "eval_tokens": int(inputs.eval_tokens.numel()),
        "eval_text": _digest(inputs.eval_tokens), "seed": args.seed, "dtype": plan.dtype_name,
        "device_type": plan.device.type, "bits": args.bits, "group_size": args.group_size,
        "sym": args.sym, "act_order": args.act_order, "latency_tokens": args.latency_tokens,
        "fast_decode": fast, "kernels": args.kernels,
        "calib_samples": plan.n_calib if calibrated else None,
        "calib_seqlen": plan.calib_seqlen if calibrated else None,
        "calib_windows": _digest(inputs.calib) if calibrated else None,
    }


def check_resumable(path: Path, previous: dict, settings: dict, configs: dict) -> None:
    """Refuse to continue ``previous`` if a setting or a shared method's config differs."""
    how = "rerun with the same setting, or use another --out (or --overwrite, which keeps the old file)"
    before = previous.get("settings")
    if not isinstance(before, dict):
        raise QtutorError(f"cannot resume: {path} does not record its settings (an older qtutor wrote "
                          f"it), so they cannot be compared; use another --out, or --overwrite")
    both_calibrate = before.get("calib_windows") is not None and settings["calib_windows"] is not None
    for key, label in SETTINGS.items():
        if key in CALIB_SETTINGS and not both_calibrate:
            continue  # calibration changes only the numbers of the methods that calibrate
        if before.get(key) != settings[key]:
            raise QtutorError(f"cannot resume: {path} was made with {label} = {_shown(before.get(key))}, "
                              f"this run has {_shown(settings[key])}; {how}")
    for name, cfg in configs.items():
        entry = previous["methods"].get(name)
        now = None if cfg is None else _plain(cfg.__dict__)
        if entry is not None and entry["config"] != now:
            diff = sorted(k for k in set(now or {}) | set(entry["config"] or {})
                          if (now or {}).get(k) != (entry["config"] or {}).get(k))
            raise QtutorError(f"cannot resume: {name} in {path} was quantized with another config "
                              f"({', '.join(diff)} differ); {how}")


def _shown(value) -> str:
    return "unset" if value is None else repr(value)


def _plain(data):
    """``data`` as it reads back from JSON (tuples become lists, and so on)."""
    import json
    return json.loads(json.dumps(data))


# --------------------------------------------------------------------------- the results file
def existing_results(path: Path, args) -> Optional[dict]:
    """What is in ``path`` already: the run to continue (``--resume``), or None to start afresh;
    refuses to start afresh over finished methods without ``--overwrite``. Call under the lock."""
    if not path.exists():
        return None
    if args.resume:
        return load_results(path)
    if args.overwrite:
        return None
    try:
        held = read_results(path)["methods"]
    except ValueError as err:
        raise QtutorError(f"{path} is not a readable results file ({err}); move it away, use another "
                          f"--out, or --overwrite to keep it as results.previous-N.json") from err
    if held:
        raise QtutorError(f"{path} holds {len(held)} finished methods ({', '.join(held)}); continue with "
                          f"--resume, start afresh with --overwrite (the file is kept as "
                          f"results.previous-N.json), or use another --out")
    return None  # no finished method: nothing to lose


def start_results(path: Path, args, header: dict, previous: Optional[dict]) -> dict:
    """The results this run adds to, written to ``path`` before the first method."""
    if previous is None:
        if args.overwrite and path.exists():
            print(f"note: the earlier {path} was moved to {archive(path)}")
        results = {**header, "methods": {}}
    else:
        results = {**header, **previous}  # the header of the run being continued
        if previous["settings"].get("calib_windows") is None and header["settings"]["calib_windows"]:
            # the first run of this folder that calibrates: record its calibration
            results["settings"] = {**previous["settings"],
                                   **{k: header["settings"][k] for k in CALIB_SETTINGS}}
            results.update(calib_samples=header["calib_samples"], calib_seqlen=header["calib_seqlen"])
    write_json(path, results)
    return results


# --------------------------------------------------------------------------- the run
def run(args, keep: Optional[dict] = None) -> dict:
    """The benchmark; ``keep``: a dict whose keys name methods whose quantized model (and
    report) to hand back in it, ``keep[name] = (model, report)``, instead of freeing them."""
    t_start = time.perf_counter()
    plan = plan_run(args)
    _quiet_libraries()
    texts = read_texts(args, plan)  # a missing dataset fails before the folder is touched
    with locked(plan.out):
        previous = existing_results(plan.results_path, args)
        inputs = load_inputs(args, plan, texts)
        header = {"model": args.model + (" (random weights: timing only)" if args.random_weights else ""),
                  "dataset": plan.dataset, "device": device_name(plan.device), "dtype": plan.dtype_name,
                  "seqlen": plan.seqlen,
                  "calib_samples": 0 if inputs.calib is None else int(inputs.calib.shape[0]),
                  "calib_seqlen": plan.calib_seqlen, "versions": versions(),
                  "settings": run_settings(args, plan, inputs)}
        if previous is not None:
            check_resumable(plan.results_path, previous, header["settings"], plan.configs)
        results = start_results(plan.results_path, args, header, previous)
        run_methods(args, plan, inputs, results, keep)
        wall = time.perf_counter() - t_start
        # wall time of THIS invocation, from the start (model and text loading included)
        results["wall_seconds"] = wall if previous is None else None
        write_json(plan.results_path, results)
        _write_outputs(results, plan.out)
    done = [n for n in plan.names if n in results["methods"]]
    print(f"wall time {wall:.1f} s for this run ({len(done)} methods"
          + (", continuing an earlier run: not the time of the whole set)" if previous is not None else ")"))
    return results


def run_methods(args, plan: Plan, inputs: Inputs, results: dict, keep: Optional[dict] = None) -> None:
    """Measure each method not yet in ``results``; the file is rewritten after each one."""
    from .eval import memory_report
    from .plots import format_number
    fp16 = _quantized_copy(inputs.base, "fp16_baseline", None, None, plan.device)[0]
    fp16_bytes = memory_report(fp16).total_bytes
    del fp16
    print(f"model {results['model']} on {results['device']} ({plan.dtype_name}); "
          f"{plan.dataset}, seqlen {plan.seqlen}")
    for name in plan.names:
        if name in results["methods"]:
            print(f"{name:20s} skipped (already in {plan.results_path})")
            continue
        entry, warnings = finite_or_none(measure(args, plan, inputs, name, fp16_bytes, keep))
        for w in warnings:
            print(f"warning: {name}: {w} is not a finite number; results.json records null")
        results["methods"][name] = entry
        write_json(plan.results_path, results)
        print(f"{name:20s} ppl {format_number(entry['ppl'], 9, 3)}  {entry['bits_per_weight']:6.3f} bits/w  "
              f"{entry['memory_mb']:8.2f} MB  {format_number(entry['latency_ms_per_token'], 7, 2)} ms/tok  "
              f"({entry['seconds']:.1f} s)")


def measure(args, plan: Plan, inputs: Inputs, name: str, fp16_bytes: int, keep: Optional[dict] = None) -> dict:
    """Quantize a fresh copy with ``name``; its perplexity, latency, memory and compression."""
    from .eval import memory_report, perplexity
    t0 = time.perf_counter()
    progress = not args.no_progress
    model, report = _quantized_copy(inputs.base, name, plan.configs[name], inputs.calib, plan.device,
                                    progress=progress)
    ppl = perplexity(model, inputs.eval_ids, plan.seqlen, plan.max_eval, args.eval_batch_size,
                     progress=progress)
    mem = memory_report(model)  # before the decode timing, whose fast kernels may add or re-pack buffers
    if keep is not None and name in keep:  # hand back the model as quantize() made it: time a copy
        keep[name] = (model, report)
        model = copy.deepcopy(model)
    lat = _latency(model, inputs.prompt, args, plan.device)
    return {
        "ppl": ppl.ppl, "eval_tokens": ppl.eval_tokens, "seqlen": plan.seqlen,
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


def _latency(model, prompt, args, device):
    """Decode latency: the fast harness (static cache, CUDA graphs, fast kernels) or the HF loop."""
    from .eval import decode_latency
    fast = device.type == "cuda" if getattr(args, "fast_decode", None) is None else args.fast_decode
    if not fast:
        return decode_latency(model, prompt, args.latency_tokens, runs=args.latency_runs)
    from .runtime.decode import fast_decode_latency
    from .runtime.kernels import accelerate
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
    from .runtime.decode import _kernels as kernels_used
    return kernels_used(model)


def _write_outputs(results: dict, out: Path) -> None:
    """results.csv (replaced whole), the figures and the table; results.json is complete by now."""
    from .plots import plot_results, results_table, write_csv
    csv_path, tmp = out / "results.csv", out / "results.csv.tmp"
    try:
        write_csv(results, tmp)
        os.replace(tmp, csv_path)
        for path in plot_results(results, out):
            print(f"wrote {path}")
    except OSError as err:
        raise os_error(err, f"write results.csv and the figures in {out} (results.json is complete)") from err
    finally:
        tmp.unlink(missing_ok=True)
    print(results_table(results))
    print(f"results: {out / RESULTS}, {csv_path}")


def main(argv: Optional[list[str]] = None, keep: Optional[dict] = None) -> int:
    """``qtutor bench``: 0 when done, 2 with a one-line error for bad input, 130 if interrupted.
    ``keep``: as in :func:`run` (from Python: the chapters reuse a quantized model)."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        run(args, keep)
    except QtutorError as err:
        print(f"qtutor bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = Path(args.out if args is not None else "--out")
        print(f"\nqtutor bench: interrupted; finished methods are kept in {out / RESULTS} "
              f"(continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
