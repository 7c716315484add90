"""Figures and tables shared by ``qtutor bench`` and the book (chapter 7)."""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = (
    "ppl",
    "eval_tokens",
    "seqlen",
    "bits_per_weight",
    "memory_mb",
    "compression_ratio",
    "latency_ms_per_token",
    "quant_seconds",
)


def write_csv(results: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("method",) + COLUMNS)
        for name, r in results["methods"].items():
            w.writerow([name] + [r[c] for c in COLUMNS])


def results_table(results: dict) -> str:
    """A plain-text table of the results, one method a row."""
    head = f"{'method':20s} {'ppl':>9s} {'bits/w':>7s} {'MB':>8s} {'ratio':>6s} {'ms/tok':>7s} {'quant s':>8s}"
    rows = [
        f"# {results['model']} | {results['dataset']} (seqlen {results['seqlen']}) | "
        f"{results['device']} | {results['dtype']}",
        head,
        "-" * len(head),
    ]
    for name, r in results["methods"].items():
        rows.append(
            f"{name:20s} {format_number(r['ppl'], 9, 3)} {format_number(r['bits_per_weight'], 7, 3)} "
            f"{format_number(r['memory_mb'], 8, 2)} {format_number(r['compression_ratio'], 6, 2)} "
            f"{format_number(r['latency_ms_per_token'], 7, 2)} {format_number(r['quant_seconds'], 8, 1)}"
        )
    first = next(iter(results["methods"].values()), None)
    if first is not None:
        rows.append(f"perplexity over {first['eval_tokens']} tokens in windows of {first['seqlen']}")
    return "\n".join(rows)


def format_number(value, width: int, decimals: int) -> str:
    """A number for the table; ``None`` (a value that was not finite) shows as n/a."""
    return f"{'n/a':>{width}s}" if value is None else f"{value:{width}.{decimals}f}"


def plot_results(results: dict, out: Path) -> list[Path]:
    """Perplexity vs bits per weight, memory, and latency bar charts as PNG files in ``out``."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    methods = results["methods"]
    if not methods:
        return []
    names = list(methods)
    subtitle = f"{results['model']} · {results['dataset']} · {results['device']}"
    paths = []

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for n in (n for n in names if methods[n]["ppl"] is not None):  # null: not finite
        ax.scatter(methods[n]["bits_per_weight"], methods[n]["ppl"], s=40)
        ax.annotate(
            n, (methods[n]["bits_per_weight"], methods[n]["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.set_xlabel("bits per weight (stored, decoder linears)")
    ax.set_ylabel(f"perplexity (seqlen {results['seqlen']})")
    ax.set_title(f"Perplexity vs bits per weight\n{subtitle}", fontsize=9)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "ppl_vs_bits.png"))

    for key, label, fname in (
        ("memory_mb", "model memory (MB, parameters + buffers)", "memory.png"),
        ("latency_ms_per_token", "decode latency (ms/token, batch 1)", "latency.png"),
    ):
        fig = Figure(figsize=(6.5, 3.8))
        ax = fig.subplots()
        vals = [methods[n][key] or 0.0 for n in names]  # null (not finite) shows as 0
        ax.barh(names, vals, color="tab:blue")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.set_title(subtitle, fontsize=9)
        paths.append(_save(fig, out / fname))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
