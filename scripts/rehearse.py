#!/usr/bin/env python
"""Rehearse the book as a reader runs it: every chapter top to bottom, on a given model and device.

    # Qwen2-0.5B's exact architecture with random weights, offline (time and memory only)
    python scripts/rehearse.py --make-model runs/qwen2-0.5b-random --data-dir DIR
    # every chapter in full mode on the GPU, capped at a Colab T4's 15 GiB
    python scripts/rehearse.py --model runs/qwen2-0.5b-random --dataset wikitext2 \\
        --data-dir DIR --device cuda --out benchmarks/rehearsal_qwen2-0.5b_h200
    # the same on a CPU (fast mode allowed: the chapters also pick CPU budgets themselves)
    python scripts/rehearse.py --model runs/qwen2-0.5b-random --device cpu --fast --out ...

Each chapter runs in a fresh Jupyter kernel with ``QTUTOR_MODEL``, ``QTUTOR_DATASET`` and
``QTUTOR_WIKITEXT`` set (and ``QTUTOR_FAST=1`` only with ``--fast``). A first cell, injected
before the chapter's own, caps the GPU memory with
``torch.cuda.set_per_process_memory_fraction`` (``--gpu-mem-gib``, 15 by default: a Colab T4);
a last one, run in the same kernel even after an error, reads the peak GPU memory
(``torch.cuda.max_memory_reserved``, what the cap limits, and ``max_memory_allocated``) and the
kernel's peak resident host memory. Writes ``OUT.csv`` (one row per chapter: status, wall
seconds, peaks, first error, slowest cells) and ``OUT.md`` (a short table with the run's
header), and keeps the executed notebooks in ``--notebooks DIR`` if given.
Exit code 0 when every chapter ran, 1 when one failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _nbio  # noqa: E402

MARK = "QTUTOR_REHEARSAL_STATS "

CAP_CELL = """\
import os, torch
os.environ.setdefault("TQDM_DISABLE", "1")
if torch.cuda.is_available() and {cap_gib} > 0:
    _total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, {cap_gib} * 2**30 / _total))
"""

STATS_CELL = """\
import json, resource, torch
_s = {"host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
if torch.cuda.is_available():
    _s.update(gpu_reserved_peak_gib=torch.cuda.max_memory_reserved() / 2**30,
              gpu_allocated_peak_gib=torch.cuda.max_memory_allocated() / 2**30,
              gpu=torch.cuda.get_device_name(0))
print("QTUTOR_REHEARSAL_STATS " + json.dumps(_s))
"""

FIELDS = [
    "chapter",
    "run",
    "status",
    "wall_s",
    "gpu_reserved_peak_gib",
    "gpu_allocated_peak_gib",
    "host_peak_gib",
    "slowest_cells",
    "error",
]


def make_model(folder: Path, data_dir: str | None = None, seed: int = 0, tokenizer_from: str | None = None) -> None:
    """Write Qwen2-0.5B's exact architecture (random weights) with a tokenizer.

    With ``data_dir`` (WikiText-2 in the Hugging Face layout), a byte-level BPE tokenizer of
    32,000 entries trained on the validation split, so that the test split's token count (and
    so every evaluation's cost) is close to Qwen2's own tokenizer's; else the embedded model's.
    ``tokenizer_from``: a folder written earlier by this function, whose tokenizer is copied
    instead of trained again (the training takes most of a minute).
    """
    import torch

    from qtutor.models import embedded_model_dir, random_model

    model = random_model("qwen2-0.5b", dtype=torch.float16, seed=seed)
    model.config.qtutor_random_weights = True  # read by qtutor.book: chapters say so
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer_from:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tokenizer_from) / name, folder / name)
        how = f"the tokenizer of {tokenizer_from}"
    elif data_dir:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        from qtutor.data import tokenize, wikitext2_text

        text = wikitext2_text("validation", data_dir)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(
            (text[i : i + 10_000] for i in range(0, len(text), 10_000)),
            trainers.BpeTrainer(
                vocab_size=32_000,
                special_tokens=["<|endoftext|>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
        fast.save_pretrained(folder)
        n_test = tokenize(fast, wikitext2_text("test", data_dir)).numel()
        how = f"a byte-level BPE of {tok.get_vocab_size():,} entries trained on WikiText-2 validation ({n_test:,} test tokens)"
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(embedded_model_dir() / name, folder / name)
        how = "the embedded model's tokenizer (4,096 entries)"
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {folder}: Qwen2-0.5B architecture, {n:,} parameters, random weights (seed {seed}), {how}")


def _code(src: str, cell_id: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "id": cell_id, "metadata": {}, "outputs": [], "source": src}


def _first_error(cell: dict) -> str:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename')}: {out.get('evalue')}"[:400]
    return ""


def run_chapter(path: Path, env: dict, cap_gib: float, timeout: int, keep: Path | None) -> dict:
    """Execute one chapter in a fresh kernel; return its CSV row."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError
    import nbformat

    nb = nbformat.reads(json.dumps(_nbio.read(path)), as_version=4)
    nb.cells.insert(0, nbformat.from_dict(_code(CAP_CELL.format(cap_gib=cap_gib), "rehearsal-cap")))
    stats_cell = nbformat.from_dict(_code(STATS_CELL, "rehearsal-stats"))
    old_env = os.environ.copy()
    os.environ.update(env)
    if "QTUTOR_FAST" not in env:
        os.environ.pop("QTUTOR_FAST", None)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    row = {"chapter": path.stem, "status": "ok", "error": ""}
    times = []
    t0 = time.perf_counter()
    try:
        with client.setup_kernel():
            for i, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                c0 = time.perf_counter()
                try:
                    client.execute_cell(cell, i)
                except (CellExecutionError, CellTimeoutError) as err:
                    row["status"] = "timeout" if isinstance(err, CellTimeoutError) else "error"
                    row["error"] = f"cell {i - 1}: " + (_first_error(cell) or str(err).strip().splitlines()[-1])[:400]
                    break
                finally:
                    times.append((time.perf_counter() - c0, i))
                    print(f"  {path.stem} cell {i - 1}: {times[-1][0]:.1f} s", flush=True)
                    if keep is not None:  # kept as it goes: a rehearsal killed mid-chapter keeps its timings
                        keep.mkdir(parents=True, exist_ok=True)
                        nbformat.write(nb, keep / path.name)
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            nb.cells.append(stats_cell)
            client.execute_cell(stats_cell, len(nb.cells) - 1)
    except Exception as err:  # the kernel died (out of host memory, say)
        row.update(status="error", error=row["error"] or f"{type(err).__name__}: {err}"[:400])
        row.setdefault("wall_s", round(time.perf_counter() - t0, 1))
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    for out in stats_cell.get("outputs", []):
        for line in out.get("text", "").splitlines():
            if line.startswith(MARK):
                row.update(
                    {k: (round(v, 2) if isinstance(v, float) else v) for k, v in json.loads(line[len(MARK) :]).items()}
                )
    row["slowest_cells"] = "; ".join(f"{i - 1}:{s:.0f}s" for s, i in sorted(times, reverse=True)[:3])
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, keep / path.name)
    return row


def write_report(rows: list[dict], header: dict, out: Path) -> None:
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Rehearsal: {header['model']} on {header['device']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [
        "",
        "| chapter | run | status | wall s | GPU peak GiB (reserved) | host peak GiB | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['chapter']} | {r.get('run', '')} | {r['status']} | {r.get('wall_s', '')} | "
            f"{r.get('gpu_reserved_peak_gib', '-')} | {r.get('host_peak_gib', '')} | "
            f"{r['error'].replace('|', '/')[:160]} |"
        )
    total = sum(r.get("wall_s") or 0 for r in rows)
    lines += ["", f"All chapters: {total:.0f} s; {sum(r['status'] == 'ok' for r in rows)} of {len(rows)} ok."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


#: memory bandwidth of an H200 (4.8 TB/s) over a T4's (0.32 TB/s); their fp16 tensor-core peaks
#: (989 and 65 TFLOP/s) stand in about the same ratio
T4_SLOWDOWN = 4.8 / 0.32


def t4_table(csv_path: Path) -> str:
    """Markdown: each chapter's H200 wall time and the T4 estimate (wall time x ``T4_SLOWDOWN``)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    lines = [
        "| chapter | H200, measured (s) | T4-class GPU, estimated (min) | peak GPU memory (GiB) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['chapter']} | {r['status']} | - | - |")
            continue
        wall = float(r["wall_s"])
        lines.append(
            f"| {r['chapter']} | {wall:.0f} | {wall * T4_SLOWDOWN / 60:.0f} | {float(r['gpu_reserved_peak_gib']):.1f} |"
        )
    return "\n".join(lines)


def cpu_table(csv_path: Path) -> str:
    """Markdown: each chapter's status, wall minutes and peak host memory in a CPU rehearsal."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    lines = ["| chapter | status | measured (min) | peak host memory (GiB) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['chapter']} | {r['status']} | {float(r['wall_s']) / 60:.1f} | {float(r['host_peak_gib']):.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--make-model", metavar="DIR", help="write Qwen2-0.5B's architecture with random weights to DIR and exit"
    )
    p.add_argument(
        "--tokenizer-from",
        metavar="DIR",
        help="with --make-model: copy the tokenizer of an earlier --make-model folder instead of training one",
    )
    p.add_argument("--model", default="qtutor-tiny", help="model name, folder or Hub id (QTUTOR_MODEL)")
    p.add_argument("--dataset", default=None, help="embedded or wikitext2 (default: the chapters' choice)")
    p.add_argument("--data-dir", default=None, help="WikiText-2 in the Hugging Face layout (QTUTOR_WIKITEXT)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--gpu-mem-gib", type=float, default=15.0, help="GPU memory cap (a Colab T4: 15); 0: none")
    p.add_argument("--fast", action="store_true", help="QTUTOR_FAST=1 (default: full mode)")
    p.add_argument("--chapters", nargs="*", default=None, help="chapter numbers or stems (default: all)")
    p.add_argument("--chapters-dir", default=str(ROOT / "chapters"), help=argparse.SUPPRESS)
    p.add_argument("--estimate-t4", metavar="CSV", help="print the T4 estimate table of a GPU rehearsal CSV and exit")
    p.add_argument("--cpu-table", metavar="CSV", help="print the table of a CPU rehearsal CSV and exit")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    p.add_argument("--out", required=False, default="runs/rehearsal", help="writes OUT.csv and OUT.md")
    p.add_argument("--label", default="", help="a label for this run's rows (e.g. the commit)")
    p.add_argument("--append", action="store_true", help="keep OUT.csv's rows of chapters this run does not execute")
    p.add_argument("--notebooks", default=None, metavar="DIR", help="keep the executed notebooks in DIR")
    args = p.parse_args(argv)

    if args.make_model:
        make_model(Path(args.make_model), args.data_dir, tokenizer_from=args.tokenizer_from)
        return 0
    if args.gpu_mem_gib < 0 or args.timeout <= 0:
        p.error("--gpu-mem-gib must be >= 0 and --timeout > 0")
    if args.data_dir and not Path(args.data_dir).is_dir():
        p.error(f"--data-dir {args.data_dir!r} is not a folder; pass WikiText-2 in the Hugging Face layout")
    if args.estimate_t4 or args.cpu_table:
        print(t4_table(Path(args.estimate_t4)) if args.estimate_t4 else cpu_table(Path(args.cpu_table)))
        return 0
    chapters = sorted(Path(args.chapters_dir).glob("*.ipynb"))
    if args.chapters:
        wanted = set(args.chapters)
        chapters = [c for c in chapters if c.stem in wanted or c.stem.split("_")[0] in wanted]
        if not chapters:
            p.error(f"no chapter matches {args.chapters}; use numbers such as 00 03 or file stems")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device; use --device cpu")

    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model  # chapters run in chapters/
    env = {
        "QTUTOR_MODEL": model,
        "TQDM_DISABLE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "MPLBACKEND": "Agg",
    }
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if args.dataset:
        env["QTUTOR_DATASET"] = args.dataset
    if args.data_dir:
        env["QTUTOR_WIKITEXT"] = str(Path(args.data_dir).resolve())
    if args.fast:
        env["QTUTOR_FAST"] = "1"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    header = {
        "model": args.model,
        "dataset": args.dataset or "(chapter default)",
        "device": f"{args.device} ({gpu}, {os.cpu_count()} cores)",
        "gpu cap GiB": args.gpu_mem_gib if args.device == "cuda" else "-",
        "mode": "fast (QTUTOR_FAST=1)" if args.fast else "full",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    import transformers

    header["transformers"] = transformers.__version__
    rows = []
    if args.append and out.with_suffix(".csv").exists():
        names = {c.stem for c in chapters}
        with open(out.with_suffix(".csv"), newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["chapter"] not in names]
        for r in rows:
            r["wall_s"] = float(r["wall_s"]) if r.get("wall_s") else None
    keep = Path(args.notebooks) if args.notebooks else None
    for path in chapters:
        row = run_chapter(path, env, args.gpu_mem_gib if args.device == "cuda" else 0, args.timeout, keep)
        row["run"] = args.label
        rows.append(row)
        rows.sort(key=lambda r: r["chapter"])
        print(
            f"{row['chapter']:28s} {row['status']:7s} {row.get('wall_s', 0):7.1f} s  GPU "
            f"{row.get('gpu_reserved_peak_gib', '-')} GiB  host {row.get('host_peak_gib', '')} GiB  "
            f"{row['slowest_cells']}  {row['error']}",
            flush=True,
        )
        write_report(rows, header, out)  # after each chapter: a killed rehearsal keeps what ran
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
