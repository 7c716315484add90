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

import copy
import dataclasses
import hashlib
import math
import os
import platform
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .errors import QtutorError
from .runfolder import RESULTS, archive, check_out_path, finite_or_none, locked, os_error, read_results, write_json


@dataclass
class BenchConfig:
    """Every setting of a benchmark run: ``qtutor bench``'s options, one field each (``qtutor bench
    --help`` explains them). ``None`` is resolved by :func:`plan_run` from the model and the
    device: windows of 2048 tokens for Qwen2-sized models (512 for smaller ones), 128
    calibration windows on CUDA (16 on a CPU), every evaluation token on CUDA (32,768 on a CPU).
    """

    model: str = "qtutor-tiny"
    random_weights: bool = False
    methods: Union[str, Sequence[str]] = "all"
    quantize_head: bool = False
    dataset: Optional[str] = None
    data_dir: Optional[str] = None
    seqlen: Optional[int] = None
    max_eval_tokens: Optional[int] = None
    eval_batch_size: int = 4
    calib_samples: Optional[int] = None
    calib_seqlen: Optional[int] = None
    bits: Optional[int] = None
    group_size: Optional[int] = None
    sym: Optional[bool] = None
    act_order: Optional[bool] = None
    static_groups: Optional[bool] = None
    device: str = "auto"
    dtype: str = "auto"
    fast_decode: Optional[bool] = None
    kernels: str = "auto"
    hf_generate: Optional[bool] = None  # also time what a user would pick instead (None: on a GPU)
    hf_compile: bool = True  # with hf_generate: the torch.compile'd row too (its compilation takes minutes)
    latency_tokens: int = 50
    latency_runs: int = 3
    seed: int = 0
    out: str = "runs/bench"
    resume: bool = False
    overwrite: bool = False
    progress: bool = False

    def replace(self, **changes) -> "BenchConfig":
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise QtutorError(
                f"BenchConfig has no field {', '.join(unknown)}; fields: {', '.join(f.name for f in fields(self))}"
            )
        return dataclasses.replace(self, **changes)


#: the command line's names of the fields the methods may override (``Method.overrides``)
OVERRIDE_FLAGS = {
    "bits": "--bits",
    "group_size": "--group-size",
    "sym": "--sym",
    "act_order": "--act-order",
    "static_groups": "--static-groups",
}


#: lower bounds of the integer options: flag -> (attribute, minimum, why)
MINIMUMS = {
    "--seqlen": ("seqlen", 2, "a window needs a token to predict and one to predict it from"),
    "--max-eval-tokens": ("max_eval_tokens", 1, "it counts evaluated tokens"),
    "--eval-batch-size": ("eval_batch_size", 1, "it counts windows per forward pass"),
    "--calib-samples": ("calib_samples", 1, "it counts calibration windows"),
    "--calib-seqlen": ("calib_seqlen", 1, "it counts tokens per calibration window"),
    "--latency-tokens": ("latency_tokens", 2, "the first token comes from the prefill, so decoding speed needs two"),
    "--latency-runs": ("latency_runs", 1, "it counts timed decodes"),
    "--seed": ("seed", 0, "seeds are non-negative"),
}
MAX_SEED = 2**63 - 1
_DEFAULTS = {f.name: f.default for f in fields(BenchConfig)}


def check_options(options) -> None:
    """The checks that need nothing but the options themselves."""
    for flag, (attr, low, why) in MINIMUMS.items():
        value = getattr(options, attr)
        if value is not None and value < low:
            default = " (or leave it out for the default)" if _DEFAULTS[attr] is None else ""
            raise QtutorError(f"{flag} {value} is too small ({why}); use {low} or more{default}")
    if options.seed > MAX_SEED:
        raise QtutorError(f"--seed {options.seed} is too large; use at most {MAX_SEED}")
    if options.resume and options.overwrite:
        raise QtutorError(
            "--resume and --overwrite contradict each other; --resume continues the run "
            "in --out, --overwrite starts afresh (keeping the old results file)"
        )


def method_configs(names: list[str], options) -> dict:
    """Each method's config with the overrides it declares (``Method.overrides``) applied; a
    ``+head`` row has its method's."""
    from .quant import get_method
    from .quant.base import split_head

    configs = {}
    for name in names:
        m = get_method(split_head(name)[0])
        cfg = m.default_config
        if cfg is not None:
            cfg = cfg.replace(**{k: getattr(options, k) for k in m.overrides})
        configs[name] = cfg
    return configs


def parse_methods(spec, quantize_head: bool = False) -> list[str]:
    """``--methods``: names separated by spaces (``--methods rtn_int4 gptq_int4``, as the
    original benchmark takes them) or commas, or ``all``. A name may carry the suffix ``+head``
    (``rtn_int4+head``): that method with its lm_head quantized too, a row of its own.
    ``quantize_head`` (``--quantize-head``) adds, after each method that has a quantized head,
    its ``+head`` row; ``fp16_baseline``, which has none, keeps its one row."""
    from .quant import get_method, implemented_methods
    from .quant.base import HEAD_SUFFIX, split_head

    names = ",".join([spec] if isinstance(spec, str) else spec).replace(" ", ",").split(",")
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        names = implemented_methods()
    if not names:
        raise QtutorError("--methods is empty; give method names separated by spaces or commas, or 'all'")
    for n in names:
        method, head = split_head(n)
        m = get_method(method)  # raises a one-line error for unknown or unimplemented names
        if head and m.head_reason is not None:
            raise QtutorError(f"--methods {n}: {m.head_reason}; drop the {HEAD_SUFFIX} suffix")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise QtutorError(f"--methods names {', '.join(twice)} more than once; give each method once")
    if not quantize_head:
        return names
    rows = []
    for n in names:
        rows.append(n)
        method, head = split_head(n)
        with_head = method + HEAD_SUFFIX
        if not head and get_method(method).head_reason is None and with_head not in names:
            rows.append(with_head)
    if rows == names and not any(split_head(n)[1] for n in names):
        raise QtutorError(
            f"--quantize-head adds nothing: none of --methods {' '.join(names)} quantizes an lm_head "
            f"({get_method(split_head(names[0])[0]).head_reason}); add a quantization method"
        )
    return rows


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
        raise QtutorError(
            f"cannot resume from {path}: {err}; fix or delete the file, or run without --resume into another --out"
        ) from err


def versions() -> dict:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "qtutor": __import__("qtutor").__version__,
    }


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


def plan_run(options) -> Plan:
    """Check every option and resolve the sizes; nothing is read but the model's config."""
    from .book import eval_seqlen
    from .models import EMBEDDED_MODEL
    from .quant import get_method
    from .quant.base import split_head

    check_options(options)
    names = parse_methods(options.methods, options.quantize_head)
    configs = method_configs(names, options)
    device = resolve_device(options.device)
    dtype_name = options.dtype if options.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    out = Path(options.out)
    check_out_path(out)
    config = _model_config(options)
    max_positions = getattr(config, "max_position_embeddings", None) or 10**9
    seqlen = options.seqlen or eval_seqlen(config)
    if max(seqlen, options.calib_seqlen or 0) > max_positions:
        raise QtutorError(
            f"--seqlen/--calib-seqlen {max(seqlen, options.calib_seqlen or 0)} exceeds the model's "
            f"{max_positions} positions; use a value of at most {max_positions}"
        )
    # on a CPU the default run evaluates a slice of the text, so that it stays within minutes
    max_eval = options.max_eval_tokens or (None if device.type == "cuda" else 64 * 512)
    if max_eval is not None and max_eval < seqlen:
        given = "--max-eval-tokens" if options.max_eval_tokens else "the CPU default of --max-eval-tokens"
        raise QtutorError(
            f"{given} {max_eval} is fewer than one window of {seqlen} tokens (--seqlen); "
            f"use --max-eval-tokens {seqlen} or more, or a smaller --seqlen"
        )
    dataset = (
        "random-tokens"
        if options.random_weights
        else (options.dataset or ("embedded" if options.model == EMBEDDED_MODEL else "wikitext2"))
    )
    return Plan(
        names,
        configs,
        device,
        dtype_name,
        out,
        config,
        dataset,
        needs_calib=any(get_method(split_head(n)[0]).needs_calib for n in names),
        seqlen=seqlen,
        calib_seqlen=options.calib_seqlen or seqlen,
        n_calib=options.calib_samples or (128 if device.type == "cuda" else 16),
        max_eval=max_eval,
    )


def _model_config(options):
    """The model's transformers config (a one-line error if the model cannot be had)."""
    from .models import LAYOUTS, QWEN2_0_5B, load_config

    if options.random_weights and options.model.lower() in ("qwen2-0.5b", "qwen/qwen2-0.5b"):
        from transformers import Qwen2Config

        return Qwen2Config(**QWEN2_0_5B)
    config = load_config(options.model)
    if config.model_type not in LAYOUTS:
        raise QtutorError(
            f"model type {config.model_type!r} has no layout in qtutor; supported: {', '.join(sorted(LAYOUTS))}"
        )
    return config


def model_revision(options, config) -> str:
    """What identifies the model's numbers: a fingerprint of a local folder's config and weight
    files, the Hub commit, or the built-in architecture."""
    from .models import resolve_model

    if options.random_weights and options.model.lower() in ("qwen2-0.5b", "qwen/qwen2-0.5b"):
        return "built-in qwen2-0.5b architecture"
    path = Path(resolve_model(options.model))
    if not path.is_dir():
        return getattr(config, "_commit_hash", None) or f"hub:{options.model} (revision unknown)"
    patterns = (
        ("config.json",)
        if options.random_weights
        else ("config.json", "*.safetensors", "*.bin", "*.safetensors.index.json")
    )
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


def read_texts(options, plan: Plan):
    """(evaluation text, calibration text or None); None for random weights."""
    from .data import dataset_text

    if options.random_weights:
        return None
    return (
        dataset_text(plan.dataset, "eval", options.data_dir),
        dataset_text(plan.dataset, "calib", options.data_dir) if plan.needs_calib else None,
    )


def load_inputs(options, plan: Plan, texts) -> Inputs:
    """Load the model and tokenize; checks that the texts give the windows the run needs."""
    from .data import calibration_windows, eval_windows, tokenize
    from .models import load_model, random_model

    dtype = getattr(torch, plan.dtype_name)
    torch.manual_seed(options.seed)
    if options.random_weights:  # random token ids: the figures are timings, not quality
        base = random_model(options.model, dtype=dtype, seed=options.seed)
        g = torch.Generator().manual_seed(options.seed)
        vocab = base.config.vocab_size
        eval_ids = torch.randint(0, vocab, (plan.max_eval or 64 * plan.seqlen,), generator=g)
        calib_ids = torch.randint(0, vocab, (plan.n_calib * plan.calib_seqlen + 1,), generator=g)
    else:
        base, tokenizer = load_model(options.model, dtype=dtype, device="cpu")
        eval_ids = tokenize(tokenizer, texts[0])
        calib_ids = None if texts[1] is None else tokenize(tokenizer, texts[1])
    calib = calibration_windows(calib_ids, plan.n_calib, plan.calib_seqlen, options.seed) if plan.needs_calib else None
    return Inputs(base, eval_ids, eval_windows(eval_ids, plan.seqlen, plan.max_eval), calib)


# --------------------------------------------------------------------------- settings
#: every setting that changes a number, as --resume names it when it differs (in this order)
SETTINGS = {
    "model": "--model",
    "random_weights": "--random-weights",
    "model_revision": "the model's files (config and weights)",
    "dataset": "--dataset",
    "seqlen": "--seqlen",
    "eval_tokens": "the evaluated tokens (--max-eval-tokens)",
    "eval_text": "the evaluation text (--data-dir or the tokenizer)",
    "seed": "--seed",
    "dtype": "--dtype",
    "device_type": "--device",
    "bits": "--bits",
    "group_size": "--group-size",
    "sym": "--sym/--no-sym",
    "act_order": "--act-order",
    "static_groups": "--static-groups",
    "latency_tokens": "--latency-tokens",
    "fast_decode": "--fast-decode",
    "kernels": "--kernels",
    "calib_samples": "--calib-samples",
    "calib_seqlen": "--calib-seqlen",
    "calib_windows": "the calibration text (--data-dir or the tokenizer)",
}
CALIB_SETTINGS = ("calib_samples", "calib_seqlen", "calib_windows")


def run_settings(options, plan: Plan, inputs: Inputs) -> dict:
    """The values of :data:`SETTINGS` for this run (calibration ones None if it calibrates nothing)."""
    calibrated = inputs.calib is not None
    fast = plan.device.type == "cuda" if options.fast_decode is None else options.fast_decode
    return {
        "model": options.model,
        "random_weights": options.random_weights,
        "model_revision": model_revision(options, plan.model_config),
        "dataset": plan.dataset,
        "seqlen": plan.seqlen,
        "eval_tokens": int(inputs.eval_tokens.numel()),
        "eval_text": _digest(inputs.eval_tokens),
        "seed": options.seed,
        "dtype": plan.dtype_name,
        "device_type": plan.device.type,
        "bits": options.bits,
        "group_size": options.group_size,
        "sym": options.sym,
        "act_order": options.act_order,
        "static_groups": options.static_groups,
        "latency_tokens": options.latency_tokens,
        "fast_decode": fast,
        "kernels": options.kernels,
        "calib_samples": plan.n_calib if calibrated else None,
        "calib_seqlen": plan.calib_seqlen if calibrated else None,
        "calib_windows": _digest(inputs.calib) if calibrated else None,
    }


def check_resumable(path: Path, previous: dict, settings: dict, configs: dict) -> None:
    """Refuse to continue ``previous`` if a setting or a shared method's config differs."""
    how = "rerun with the same setting, or use another --out (or --overwrite, which keeps the old file)"
    before = previous.get("settings")
    if not isinstance(before, dict):
        raise QtutorError(
            f"cannot resume: {path} does not record its settings (an older qtutor wrote "
            f"it), so they cannot be compared; use another --out, or --overwrite"
        )
    both_calibrate = before.get("calib_windows") is not None and settings["calib_windows"] is not None
    for key, label in SETTINGS.items():
        if key in CALIB_SETTINGS and not both_calibrate:
            continue  # calibration changes only the numbers of the methods that calibrate
        if before.get(key) != settings[key]:
            raise QtutorError(
                f"cannot resume: {path} was made with {label} = {_shown(before.get(key))}, "
                f"this run has {_shown(settings[key])}; {how}"
            )
    for name, cfg in configs.items():
        entry = previous["methods"].get(name)
        now = None if cfg is None else _plain(cfg.__dict__)
        if entry is not None and entry["config"] != now:
            diff = sorted(
                k
                for k in set(now or {}) | set(entry["config"] or {})
                if (now or {}).get(k) != (entry["config"] or {}).get(k)
            )
            raise QtutorError(
                f"cannot resume: {name} in {path} was quantized with another config ({', '.join(diff)} differ); {how}"
            )


def _shown(value) -> str:
    return "unset" if value is None else repr(value)


def _plain(data):
    """``data`` as it reads back from JSON (tuples become lists, and so on)."""
    import json

    return json.loads(json.dumps(data))


# --------------------------------------------------------------------------- the results file
def existing_results(path: Path, options) -> Optional[dict]:
    """What is in ``path`` already: the run to continue (``--resume``), or None to start afresh;
    refuses to start afresh over finished methods without ``--overwrite``. Call under the lock."""
    if not path.exists():
        return None
    if options.resume:
        return load_results(path)
    if options.overwrite:
        return None
    try:
        held = read_results(path)["methods"]
    except ValueError as err:
        raise QtutorError(
            f"{path} is not a readable results file ({err}); move it away, use another "
            f"--out, or --overwrite to keep it as results.previous-N.json"
        ) from err
    if held:
        raise QtutorError(
            f"{path} holds {len(held)} finished methods ({', '.join(held)}); continue with "
            f"--resume, start afresh with --overwrite (the file is kept as "
            f"results.previous-N.json), or use another --out"
        )
    return None  # no finished method: nothing to lose


def start_results(path: Path, options, header: dict, previous: Optional[dict], log=print) -> dict:
    """The results this run adds to, written to ``path`` before the first method."""
    if previous is None:
        if options.overwrite and path.exists():
            log(f"note: the earlier {path} was moved to {archive(path)}")
        results = {**header, "methods": {}}
    else:
        results = {**header, **previous}  # the header of the run being continued
        if previous["settings"].get("calib_windows") is None and header["settings"]["calib_windows"]:
            # the first run of this folder that calibrates: record its calibration
            results["settings"] = {**previous["settings"], **{k: header["settings"][k] for k in CALIB_SETTINGS}}
            results.update(calib_samples=header["calib_samples"], calib_seqlen=header["calib_seqlen"])
    write_json(path, results)
    return results


# --------------------------------------------------------------------------- the run
def run_bench(
    config: BenchConfig,
    on_result: Optional[Callable[[str, dict], None]] = None,
    keep: Optional[dict] = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """The benchmark of ``config.methods`` -> the results (as ``OUT/results.json`` holds them).

    Writes ``OUT`` (results.json after every method, then results.csv and the figures) and
    prints nothing: ``on_result(name, entry)`` is called after each method, ``log(line)`` with
    the lines ``qtutor bench`` prints. ``keep``: a dict whose keys name methods whose quantized
    model (and report) to hand back in it, ``keep[name] = (model, report)``, instead of freeing
    them; the key ``"base"`` gets the float model the run loaded (on the CPU, in the run's dtype),
    of which each method quantized a copy. Bad settings raise a one-line :class:`QtutorError` before any work starts.
    """
    log = log or (lambda line: None)
    t_start = time.perf_counter()
    plan = plan_run(config)
    _quiet_libraries()
    texts = read_texts(config, plan)  # a missing dataset fails before the folder is touched
    with locked(plan.out):
        previous = existing_results(plan.results_path, config)
        inputs = load_inputs(config, plan, texts)
        header = {
            "model": config.model + (" (random weights: timing only)" if config.random_weights else ""),
            "dataset": plan.dataset,
            "device": device_name(plan.device),
            "dtype": plan.dtype_name,
            "seqlen": plan.seqlen,
            "calib_samples": 0 if inputs.calib is None else int(inputs.calib.shape[0]),
            "calib_seqlen": plan.calib_seqlen,
            "versions": versions(),
            "settings": run_settings(config, plan, inputs),
        }
        if previous is not None:
            check_resumable(plan.results_path, previous, header["settings"], plan.configs)
        results = start_results(plan.results_path, config, header, previous, log)
        run_methods(config, plan, inputs, results, keep, on_result, log)
        if (plan.device.type == "cuda" if config.hf_generate is None else config.hf_generate) and not results.get(
            "alternatives"
        ):
            results["alternatives"] = time_alternatives(inputs.base, inputs.prompt, config, log)
            write_json(plan.results_path, results)
        if keep is not None and "base" in keep:
            keep["base"] = inputs.base
        wall = time.perf_counter() - t_start
        # wall time of THIS invocation, from the start (model and text loading included)
        results["wall_seconds"] = wall if previous is None else None
        write_json(plan.results_path, results)
        _write_outputs(results, plan.out, log)
    done = [n for n in plan.names if n in results["methods"]]
    log(
        f"wall time {wall:.1f} s for this run ({len(done)} methods"
        + (", continuing an earlier run: not the time of the whole set)" if previous is not None else ")")
    )
    return results


def run_methods(
    options, plan: Plan, inputs: Inputs, results: dict, keep: Optional[dict] = None, on_result=None, log=print
) -> None:
    """Measure each method not yet in ``results``; the file is rewritten after each one."""
    from .eval import memory_report
    from .plots import format_number, name_width

    fp16 = _quantized_copy(inputs.base, "fp16_baseline", None, None, plan.device)[0]
    fp16_bytes = memory_report(fp16).total_bytes
    del fp16
    log(f"model {results['model']} on {results['device']} ({plan.dtype_name}); {plan.dataset}, seqlen {plan.seqlen}")
    width = name_width(plan.names)
    for name in plan.names:
        if name in results["methods"]:
            log(f"{name:{width}s} skipped (already in {plan.results_path})")
            continue
        entry, warnings = finite_or_none(measure(options, plan, inputs, name, fp16_bytes, keep))
        for w in warnings:
            log(f"warning: {name}: {w} is not a finite number; results.json records null")
        results["methods"][name] = entry
        write_json(plan.results_path, results)
        if on_result is not None:
            on_result(name, entry)
        log(
            f"{name:{width}s} ppl {format_number(entry['ppl'], 9, 3)}  {entry['bits_per_weight']:6.3f} bits/w  "
            f"{entry['memory_mb']:8.2f} MB  {format_number(entry['latency_ms_per_token'], 7, 2)} ms/tok  "
            f"({entry['seconds']:.1f} s)"
        )


def measure(options, plan: Plan, inputs: Inputs, name: str, fp16_bytes: int, keep: Optional[dict] = None) -> dict:
    """Quantize a fresh copy with ``name`` (a ``+head`` row: its lm_head too); its perplexity,
    latency, memory and compression."""
    from .eval import memory_report, perplexity
    from .quant.base import split_head

    t0 = time.perf_counter()
    progress = options.progress
    method, head = split_head(name)
    model, report = _quantized_copy(
        inputs.base, method, plan.configs[name], inputs.calib, plan.device, progress=progress, head=head
    )
    ppl = perplexity(model, inputs.eval_ids, plan.seqlen, plan.max_eval, options.eval_batch_size, progress=progress)
    mem = memory_report(model)  # before the decode timing, whose fast kernels may add or re-pack buffers
    if keep is not None and name in keep:  # hand back the model as quantize() made it: time a copy
        keep[name] = (model, report)
        model = copy.deepcopy(model)
    lat = _latency(model, inputs.prompt, options, plan.device)
    return {
        "ppl": ppl.ppl,
        "ppl_ci": _ppl_interval(ppl.window_nll, options.seed),
        "eval_tokens": ppl.eval_tokens,
        "seqlen": plan.seqlen,
        "bits_per_weight": report.bits_per_weight,
        "memory_mb": mem.total_mb,
        "compression_ratio": fp16_bytes / mem.total_bytes,
        "latency_ms_per_token": lat.ms_per_token,
        "latency_runs_ms_per_token": list(lat.runs_ms_per_token),  # each timed decode (the median is above)
        "quant_seconds": report.seconds,
        "latency_method": getattr(lat, "method", "hf-dynamic-cache"),
        "memory_split_bytes": {
            "embeddings": mem.embeddings_bytes,
            "linears": mem.linears_bytes,
            "other": mem.other_bytes,
        },
        "config": None if report.config is None else report.config.__dict__,
        "quantize_head": head,
        "kernel": getattr(lat, "kernels", None) or _kernels(model),
        # what the quantized lm_head ran in the last decode step (None: no head, or its reference forward)
        "head_kernel": getattr(model.get_output_embeddings(), "last_kernel", None) if head else None,
        "seconds": time.perf_counter() - t0,  # quantize + evaluate + time decoding
        "window_nll": ppl.window_nll,  # each evaluation window's mean NLL (the bootstrap's samples)
        "linears": {  # each decoder linear (and a quantized lm_head): its size, ||W_hat - W|| / ||W||
            k: {"numel": v["numel"], "weight_rel_error": v.get("weight_rel_error")} for k, v in report.layers.items()
        },
    }


#: what a user would pick instead of the book's decoding loop: name -> compile the forward?
ALTERNATIVES = {"hf-generate-static": False, "hf-generate-static-compile": True}


def time_alternatives(base, prompt, options, log=print) -> dict:
    """The float model ``base`` decoding with Hugging Face ``generate``, a static KV cache and,
    for the second entry (unless ``options.hf_compile`` is off), ``torch.compile``
    (:func:`qtutor.eval.latency.hf_generate_latency`):
    what a user would run instead of the benchmark's loop, timed in the same run. Returns
    ``{name: {"latency_ms_per_token", "latency_runs_ms_per_token", "prefill_ms", "seconds",
    "status"}}``; a failure is recorded in ``status`` and does not stop the other entry."""
    from .eval.latency import hf_generate_latency

    out = {}
    for name, compiled in ALTERNATIVES.items():
        if compiled and not getattr(options, "hf_compile", True):
            continue
        t0 = time.perf_counter()
        try:
            lat = hf_generate_latency(base, prompt, options.latency_tokens, options.latency_runs, compile=compiled)
            entry = {
                "latency_ms_per_token": lat.ms_per_token,
                "latency_runs_ms_per_token": list(lat.runs_ms_per_token),
                "prefill_ms": lat.prefill_ms,
                "status": "ok",
            }
        except Exception as err:  # report and go on: the methods' results are already written
            entry = {"status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"}
        entry["seconds"] = time.perf_counter() - t0  # compilation and warm-up included
        out[name] = entry
        ms = entry.get("latency_ms_per_token")
        log(f"{name:26s} {'' if ms is None else f'{ms:7.2f} ms/tok  '}({entry['seconds']:.1f} s) {entry['status']}")
    return out


def _ppl_interval(window_nll: list, seed: int) -> Optional[list]:
    """The 95% bootstrap interval of the perplexity over the evaluation windows
    (``qtutor.eval.ppl.bootstrap_ppl``); None with fewer than two windows or a non-finite loss."""
    from .eval.ppl import bootstrap_ppl

    if len(window_nll) < 2 or not all(math.isfinite(v) for v in window_nll):
        return None
    return list(bootstrap_ppl(window_nll, seed=seed))


def _latency(model, prompt, options, device):
    """Decode latency: the fast harness (static cache, CUDA graphs, fast kernels) or the HF loop."""
    from .eval import decode_latency
    from .runtime.kernels import accelerate

    # the packed kernels (Triton on CUDA, torch's weight-only ops and the C LUT kernel on a CPU)
    # decode in both harnesses; perplexity and memory were measured before, on the reference forward
    accelerate(model, getattr(options, "kernels", "auto"))
    fast = device.type == "cuda" if getattr(options, "fast_decode", None) is None else options.fast_decode
    if not fast:
        return decode_latency(model, prompt, options.latency_tokens, runs=options.latency_runs)
    from .runtime.decode import fast_decode_latency

    return fast_decode_latency(model, prompt, options.latency_tokens, runs=options.latency_runs)


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


def _quantized_copy(base, name, cfg, calib, device, progress=False, head=False):
    from .api import quantize

    model = copy.deepcopy(base).to(device)
    report = quantize(model, name, cfg, calib=calib, progress=progress, head=head)
    return model, report


def _kernels(model) -> dict:
    from .runtime.decode import _kernels as kernels_used

    return kernels_used(model)


def _write_outputs(results: dict, out: Path, log=print) -> None:
    """results.csv (replaced whole), the figures and the table; results.json is complete by now."""
    from .plots import plot_results, results_table, write_csv

    csv_path, tmp = out / "results.csv", out / "results.csv.tmp"
    try:
        write_csv(results, tmp)
        os.replace(tmp, csv_path)
        for path in plot_results(results, out):
            log(f"wrote {path}")
    except OSError as err:
        raise os_error(err, f"write results.csv and the figures in {out} (results.json is complete)") from err
    finally:
        tmp.unlink(missing_ok=True)
    log(results_table(results))
    log(f"results: {out / RESULTS}, {csv_path}")
