"""The ``qtutor`` command: ``qtutor bench ...`` (see ``qtutor bench --help``) and ``qtutor grade
NOTEBOOK... --out scores.json`` (see ``qtutor grade --help``; the logic is :mod:`qtutor.grade`).

Argument parsing lives here; the benchmark itself is :func:`qtutor.bench.run_bench`, which takes
a :class:`qtutor.bench.BenchConfig` (one field per option, the same defaults) and prints nothing.
The choices offered come from the registries: method names from :mod:`qtutor.quant`, datasets
from :mod:`qtutor.data`, kernel backends from :mod:`qtutor.runtime.kernels`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .errors import QtutorError

BENCH_DOC = "quantize a model with every method and measure it (chapter 7)"


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one-line :class:`QtutorError` instead of usage + exit."""

    def error(self, message):
        raise QtutorError(f"{message}; see qtutor bench --help")


def build_parser() -> argparse.ArgumentParser:
    from .bench import BenchConfig
    from .data import DATASETS
    from .quant import implemented_methods
    from .runtime.kernels import BACKENDS

    d = BenchConfig()  # the library's defaults are the command's
    p = _Parser(prog="qtutor bench", description=BENCH_DOC)
    p.add_argument(
        "--model",
        default=d.model,
        help="embedded 'qtutor-tiny' (default), a local folder, or a Hub id such as Qwen/Qwen2-0.5B",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights with --model's architecture ('qwen2-0.5b' works offline): "
        "for timing and memory only, its perplexity is meaningless",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=[d.methods],
        metavar="METHOD",
        help="method names separated by spaces or commas, or 'all' (every implemented method: "
        f"{' '.join(implemented_methods())})",
    )
    p.add_argument(
        "--quantize-head",
        action="store_true",
        default=d.quantize_head,
        help="also run each method with its lm_head quantized in its own format, as a row of its own "
        "named METHOD+head (a tied embedding reads its rows from the packed head, stored once); "
        "fp16_baseline has no such row. METHOD+head names may also be given to --methods",
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=d.dataset,
        help="evaluation text: the embedded model's held-out text (default for the embedded "
        "model) or WikiText-2 test (default otherwise)",
    )
    p.add_argument(
        "--data-dir", default=d.data_dir, help="local WikiText-2 in the Hugging Face layout (also $QTUTOR_WIKITEXT)"
    )
    p.add_argument("--seqlen", type=int, default=d.seqlen, help="evaluation window (default 512; 2048 for Qwen2)")
    p.add_argument(
        "--max-eval-tokens",
        type=int,
        default=d.max_eval_tokens,
        help="cap on evaluated tokens (default: all on CUDA, 32768 on CPU)",
    )
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument(
        "--calib-samples",
        type=int,
        default=d.calib_samples,
        help="calibration windows (default 128 on CUDA, 16 on CPU)",
    )
    p.add_argument(
        "--calib-seqlen", type=int, default=d.calib_seqlen, help="calibration window length (default seqlen)"
    )
    p.add_argument("--bits", type=int, default=d.bits, help="override the bit width of the 4-bit methods")
    p.add_argument(
        "--group-size",
        type=int,
        default=d.group_size,
        help="input columns per scale for RTN/GPTQ/AWQ (0 = per output channel)",
    )
    p.add_argument(
        "--sym",
        action=argparse.BooleanOptionalAction,
        default=d.sym,
        help="symmetric (--sym) or asymmetric (--no-sym) grid for RTN/GPTQ/AWQ",
    )
    p.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=d.act_order,
        help="GPTQ: quantize columns by decreasing diag(H) (the reference's --act-order)",
    )
    p.add_argument(
        "--static-groups",
        action=argparse.BooleanOptionalAction,
        default=d.static_groups,
        help="GPTQ: fix every group's scale from the original weights before the column loop "
        "(the reference's --static-groups; no g_idx is stored)",
    )
    p.add_argument("--device", default=d.device, help="cpu, cuda or auto (cuda if available)")
    p.add_argument(
        "--dtype",
        default=d.dtype,
        choices=("auto", "float16", "bfloat16", "float32"),
        help="compute dtype (auto: float16 on CUDA, float32 on CPU where fp16 matmul is slow)",
    )
    p.add_argument(
        "--fast-decode",
        action=argparse.BooleanOptionalAction,
        default=d.fast_decode,
        help="time decoding with a static KV cache and CUDA graphs (qtutor.runtime.decode; "
        "default: on CUDA) instead of the Hugging Face loop",
    )
    p.add_argument(
        "--kernels",
        choices=BACKENDS,
        default=d.kernels,
        help="fast matmul for the packed layers while timing decoding (qtutor.runtime.kernels.accelerate; "
        "auto: Triton on CUDA; on a CPU torch's int8/int4 weight-only ops and the C LUT kernel); "
        "perplexity always uses the reference forward",
    )
    p.add_argument(
        "--hf-generate",
        action=argparse.BooleanOptionalAction,
        default=d.hf_generate,
        help="also time the float model with Hugging Face generate, a static KV cache and torch.compile: "
        "what a user would run instead (default: on CUDA; on a CPU the compilation takes a minute or more)",
    )
    p.add_argument(
        "--hf-compile",
        action=argparse.BooleanOptionalAction,
        default=d.hf_compile,
        help="with --hf-generate, also the torch.compile'd generate row (default on; --no-hf-compile skips "
        "its compilation, about 1.5 minutes on an H200 and longer on a smaller host)",
    )
    p.add_argument("--latency-tokens", type=int, default=d.latency_tokens)
    p.add_argument("--latency-runs", type=int, default=d.latency_runs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT: keep its finished methods, compute the others "
        "(refused if a setting that changes a number differs)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an OUT that holds results; the old results.json is kept as results.previous-N.json",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def bench_config(argv: Optional[list[str]] = None):
    """The :class:`~qtutor.bench.BenchConfig` that ``qtutor bench ARGV`` runs."""
    from .bench import BenchConfig

    options = vars(build_parser().parse_args(argv))
    options["progress"] = not options.pop("no_progress")
    return BenchConfig(**options)


def bench_main(argv: Optional[list[str]] = None, keep: Optional[dict] = None) -> int:
    """``qtutor bench``: 0 when done, 2 with a one-line error for bad input, 130 if interrupted.
    ``keep``: as in :func:`qtutor.bench.run_bench`."""
    from .bench import RESULTS, run_bench

    config = None
    try:
        config = bench_config(argv)
        run_bench(config, keep=keep, log=print)
    except QtutorError as err:
        print(f"qtutor bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = Path(config.out if config is not None else "--out")
        print(
            f"\nqtutor bench: interrupted; finished methods are kept in {out / RESULTS} (continue with --resume)",
            file=sys.stderr,
        )
        return 130
    return 0


GRADE_DOC = "execute students' notebooks and score every exercise with its checker into a JSON file"


class _GradeParser(argparse.ArgumentParser):
    def error(self, message):
        raise QtutorError(f"{message}; see qtutor grade --help")


def grade_parser() -> argparse.ArgumentParser:
    p = _GradeParser(prog="qtutor grade", description=GRADE_DOC)
    p.add_argument("paths", nargs="+", metavar="NOTEBOOK_OR_FOLDER", help="notebooks, or folders of them")
    p.add_argument("--out", required=True, help="the JSON file to write (rewritten after each notebook)")
    p.add_argument("--timeout", type=int, default=600, help="seconds a cell may run before it is interrupted")
    p.add_argument("--fast", action="store_true", help="run the chapters in fast mode (QTUTOR_FAST=1)")
    p.add_argument("--kernel", default=None, help="Jupyter kernel (default: the notebook's, else python3)")
    return p


def grade_main(argv: Optional[list[str]] = None) -> int:
    """``qtutor grade``: 0 when every notebook was executed and graded (whatever the scores), 1
    when one could not be executed (its error is in the JSON, the others were graded), 2 with a
    one-line error for bad input, 130 if interrupted."""
    from .grade import grade

    try:
        args = grade_parser().parse_args(argv)
        if args.timeout <= 0:
            raise QtutorError(f"--timeout must be a positive number of seconds, got {args.timeout}")
        scores = grade(args.paths, Path(args.out), timeout=args.timeout, kernel=args.kernel, fast=args.fast)
    except QtutorError as err:
        print(f"qtutor grade: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nqtutor grade: interrupted; the notebooks graded so far are in --out", file=sys.stderr)
        return 130
    return 1 if any(r["status"] == "error" for r in scores["notebooks"].values()) else 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: qtutor bench [options]   (qtutor bench --help for the options)")
        print("       qtutor grade NOTEBOOK_OR_FOLDER... --out scores.json   (qtutor grade --help)")
        return 0 if argv else 2
    if argv[0] == "bench":
        return bench_main(argv[1:])
    if argv[0] == "grade":
        return grade_main(argv[1:])
    print(
        f"qtutor: error: unknown command {argv[0]!r}; the commands are 'qtutor bench' and 'qtutor grade'",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
