"""Figures and tables shared by ``qtutor bench`` and the book (chapters 7 and 8).

The figures are drawn with seaborn (its ``whitegrid`` style and colour-blind palette; each
method keeps one colour in every figure) on matplotlib ``Figure`` objects, without pyplot, so a
notebook's backend is left alone. The perplexity-vs-bits figure shows, where the results hold
them, each method's 95% bootstrap interval over the evaluation windows as an error bar
(``qtutor.eval.ppl.bootstrap_ppl``), the Pareto front (:func:`pareto_front`), and labels placed
by :func:`place_labels` so that no two of them overlap.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Sequence

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
#: the CSV's columns after :data:`COLUMNS`: the perplexity's 95% bootstrap interval (empty if not measured)
CI_COLUMNS = ("ppl_low", "ppl_high")

#: pixels per inch of the saved figures (the label placement is computed at this resolution)
DPI = 120


def write_csv(results: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("method",) + COLUMNS + CI_COLUMNS)
        for name, r in results["methods"].items():
            w.writerow([name] + [r[c] for c in COLUMNS] + list(r.get("ppl_ci") or ("", "")))


def name_width(names) -> int:
    """The width of the method column: 20, or the longest name (``palettization_4bit+head``)."""
    return max([20, *(len(n) for n in names)])


def results_table(results: dict) -> str:
    """A plain-text table of the results, one method a row."""
    w = name_width(results["methods"])
    head = f"{'method':{w}s} {'ppl':>9s} {'bits/w':>7s} {'MB':>8s} {'ratio':>6s} {'ms/tok':>7s} {'quant s':>8s}"
    rows = [
        f"# {results['model']} | {results['dataset']} (seqlen {results['seqlen']}) | "
        f"{results['device']} | {results['dtype']}",
        head,
        "-" * len(head),
    ]
    for name, r in results["methods"].items():
        rows.append(
            f"{name:{w}s} {format_number(r['ppl'], 9, 3)} {format_number(r['bits_per_weight'], 7, 3)} "
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


# --------------------------------------------------------------------------- Pareto front
def pareto_front(points: Sequence[Optional[tuple]]) -> list[int]:
    """Indices of the points no other point beats: ``points[i] = (bits, ppl)``, both smaller-is-better.

    A point is on the front unless another has bits and perplexity both at most its own and one
    of them smaller. ``None`` (or a point with a ``None`` or non-finite coordinate) is left out.
    Returned in order of increasing bits (then perplexity, then index): the order to draw the
    front in. Equal points are all kept.
    """
    valid = [
        (float(p[0]), float(p[1]), i)
        for i, p in enumerate(points)
        if p is not None and all(v is not None and math.isfinite(v) for v in p[:2])
    ]
    front = [
        (x, y, i) for x, y, i in valid if not any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for x2, y2, _ in valid)
    ]
    return [i for _, _, i in sorted(front)]


# --------------------------------------------------------------------------- labels
#: directions from a point to its label, tried in this order (right-up first, as labels usually sit)
DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
#: distances (points) from a point to the nearest corner or edge of its label, tried in this order
RADII = (5, 10, 16, 24, 34, 46, 60, 78, 100, 126, 156, 190, 230, 280, 340, 410)
#: a label farther than this (points) from its point gets a leader line
LEADER_FROM = RADII[1]
_ALIGN = {1: ("left", "bottom"), -1: ("right", "top"), 0: ("center", "center")}


def _renderer(fig):
    """A renderer that measures text as the saved PNG draws it (an Agg canvas if the figure has none)."""
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    return fig.canvas.get_renderer()


def _box(anchor, size, direction, r):
    """The label box (x0, y0, x1, y1) in pixels at distance ``r`` from ``anchor`` in ``direction``."""
    (x, y), (w, h), (dx, dy) = anchor, size, direction
    diag = 1 / math.sqrt(2) if dx and dy else 1.0
    ox, oy = x + dx * r * diag, y + dy * r * diag
    x0 = ox if dx > 0 else ox - w if dx < 0 else ox - w / 2
    y0 = oy if dy > 0 else oy - h if dy < 0 else oy - h / 2
    return (x0, y0, x0 + w, y0 + h), (ox, oy)


def _overlap(a, b, pad: float = 0.0) -> float:
    """Area shared by boxes ``a`` and ``b`` (x0, y0, x1, y1), ``b`` grown by ``pad`` on every side."""
    w = min(a[2], b[2] + pad) - max(a[0], b[0] - pad)
    h = min(a[3], b[3] + pad) - max(a[1], b[1] - pad)
    return w * h if w > 0 and h > 0 else 0.0


def _inside(box, region, pad: float) -> bool:
    return (
        box[0] >= region[0] + pad
        and box[1] >= region[1] + pad
        and box[2] <= region[2] - pad
        and box[3] <= region[3] - pad
    )


def boxes_overlap(boxes: Sequence[tuple]) -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, ``i < j``, of boxes (x0, y0, x1, y1) that share some area."""
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if _overlap(boxes[i], boxes[j])]


def place_labels(
    ax,
    xy: Sequence[tuple],
    labels: Sequence[str],
    fontsize: float = 8,
    marker_radius: float = 4.0,
    obstacles: Sequence[tuple] = (),
    pad: float = 1.5,
    colors: Optional[Sequence] = None,
    segments: Sequence[tuple] = (),
):
    """Label the points ``xy`` (data coordinates) of ``ax`` with ``labels`` so that no two labels overlap.

    Deterministic and greedy: the labels are placed one at a time, from left to right, each at
    the first free spot among the eight directions of :data:`DIRECTIONS` at the distances of
    :data:`RADII` (points), first inside the axes, then anywhere in the figure. A spot is free
    if its box, grown by ``pad`` points, touches no label placed before it, no point's marker
    (a square of ``marker_radius`` points around each point), none of ``obstacles`` (boxes in
    pixels, e.g. error bars) and, outside the axes, none of the axes' title, axis labels and
    tick labels. A label set away from its point gets a thin leader line. Call it once the
    figure's layout and axis limits are final (a later ``tight_layout`` moves the points but
    not the offsets), and save the figure at its own dpi. ``colors``: one per label, for its
    leader line (grey if not given). ``segments``: lines ((x0, y0), (x1, y1)) in pixels that
    no label may cross, such as the Pareto front. Returns the annotations, in the order of ``labels``.

    Only if a figure has no free spot left for a label (dozens of labels in a small figure)
    does a label go to the spot it overlaps least.
    """
    fig = ax.figure
    renderer = _renderer(fig)
    px = fig.dpi / 72  # pixels per point
    pad_px = pad * px
    anchors = [tuple(ax.transData.transform((float(x), float(y)))) for x, y in xy]
    sizes = []
    for label in labels:  # each label's size in pixels, measured as it will be drawn
        probe = ax.text(0, 0, str(label), fontsize=fontsize)
        bb = probe.get_window_extent(renderer)
        sizes.append((bb.width, bb.height))
        probe.remove()
    m = marker_radius * px
    markers = [(x - m, y - m, x + m, y + m) for x, y in anchors]
    axes_box = tuple(ax.get_window_extent(renderer).extents)
    figure_box = tuple(fig.bbox.extents)
    decorations = [
        tuple(t.get_window_extent(renderer).extents)
        for t in [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels()]
        if t.get_visible() and t.get_text()
    ]
    placed: dict = {}  # label index -> (box, text position, direction, radius)
    lines: list = [tuple(map(tuple, seg)) for seg in segments]  # segments no label may cross, leader lines added
    for i in sorted(range(len(labels)), key=lambda i: (anchors[i][0], -anchors[i][1], i)):
        boxes = [spot[0] for spot in placed.values()]
        blocked = boxes + markers + [tuple(o) for o in obstacles]
        spot = _free_spot(
            anchors[i],
            sizes[i],
            px,
            pad_px,
            [(axes_box, blocked), (figure_box, blocked + decorations)],
            lines=lines,
            line_blockers=boxes,
        )
        placed[i] = spot
        if spot[3] > LEADER_FROM:
            lines.append((anchors[i], spot[1]))
    texts = []
    for i, ((x, y), label) in enumerate(zip(xy, labels)):
        box, (ox, oy), (dx, dy), r = placed[i]
        leader = {
            "arrowstyle": "-",
            "color": "0.55" if colors is None else colors[i],
            "lw": 0.8,
            "shrinkA": 0,
            "shrinkB": marker_radius,
            "relpos": ((1 - dx) / 2, (1 - dy) / 2),  # from the label's corner (or edge) nearest the point
        }
        texts.append(
            ax.annotate(
                str(label),
                xy=(float(x), float(y)),
                xytext=((ox - anchors[i][0]) / px, (oy - anchors[i][1]) / px),
                textcoords="offset points",
                ha=_ALIGN[dx][0],
                va=_ALIGN[dy][1] if dy else "center",
                fontsize=fontsize,
                annotation_clip=False,
                zorder=5,
                arrowprops=leader if r > LEADER_FROM else None,  # set away from its point: a leader line
            )
        )
    return texts


def _crosses(segment, box) -> bool:
    """Whether the segment ((x0, y0), (x1, y1)) passes through the box (x0, y0, x1, y1) (Liang-Barsky clipping)."""
    (x0, y0), (x1, y1) = segment
    dx, dy = x1 - x0, y1 - y0
    t0, t1 = 0.0, 1.0
    for p, q in ((-dx, x0 - box[0]), (dx, box[2] - x0), (-dy, y0 - box[1]), (dy, box[3] - y0)):
        if p == 0:
            if q < 0:
                return False
            continue
        t = q / p
        if p < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 >= t1:
            return False
    return True


def _free_spot(anchor, size, px: float, pad_px: float, regions, lines=(), line_blockers=()):
    """The first spot (box, text position, direction, radius) for a label of ``size`` near ``anchor``
    that lies in a region and touches none of its blocked boxes: ``regions`` is [(region, blocked)]
    tried in order. Preferred: a spot whose box also stays clear of the segments ``lines`` and
    whose own leader line (beyond :data:`LEADER_FROM`) crosses none of the labels
    ``line_blockers``; else the first spot that only crosses lines; else (no room left) the one
    with the least overlap, or the first one."""
    crossing = least = None
    for region, blocked in regions:
        for r in RADII:
            for d in DIRECTIONS:
                box, offset = _box(anchor, size, d, r * px)
                if not _inside(box, region, pad_px):
                    continue
                area = sum(_overlap(box, o, pad_px) for o in blocked)
                if area > 0:
                    if least is None or area < least[0]:
                        least = (area, (box, offset, d, r))
                    continue
                grown = (box[0] - pad_px, box[1] - pad_px, box[2] + pad_px, box[3] + pad_px)
                if any(_crosses(line, grown) for line in lines) or (
                    r > LEADER_FROM and any(_crosses((anchor, offset), b) for b in line_blockers)
                ):
                    crossing = crossing or (box, offset, d, r)
                    continue
                return box, offset, d, r
    if crossing is not None:
        return crossing
    if least is not None:
        return least[1]
    return (*_box(anchor, size, DIRECTIONS[0], RADII[0] * px), DIRECTIONS[0], RADII[0])


# --------------------------------------------------------------------------- figures
def method_colors(names: Sequence[str]) -> dict:
    """One seaborn colour-blind colour per method, the same in every figure and every run
    (the registry's order, then any other name in the order given)."""
    import seaborn as sns

    from .quant import implemented_methods

    order = list(implemented_methods()) + [n for n in names if n not in implemented_methods()]
    palette = sns.color_palette("colorblind", max(len(order), 1))
    return {n: palette[order.index(n) % len(palette)] for n in names}


def _style():
    """The figures' style: seaborn's whitegrid at a size that suits a book page."""
    import contextlib

    import seaborn as sns

    stack = contextlib.ExitStack()
    stack.enter_context(sns.axes_style("whitegrid", {"grid.color": ".9"}))
    stack.enter_context(sns.plotting_context("notebook", font_scale=0.8))
    return stack


def _legend_corner(ax, xy) -> str:
    """The corner of the axes with the fewest points near it (the legend goes there)."""
    inv = ax.transAxes.inverted()
    pts = [inv.transform(ax.transData.transform(p)) for p in xy]
    corners = {"upper right": (1, 1), "upper left": (0, 1), "lower right": (1, 0), "lower left": (0, 0)}
    return min(
        corners, key=lambda c: sum(abs(px - corners[c][0]) < 0.45 and abs(py - corners[c][1]) < 0.3 for px, py in pts)
    )


def ppl_vs_bits_figure(results: dict):
    """Perplexity against bits per weight, one point per method -> a matplotlib ``Figure``.

    Error bars: each method's 95% bootstrap interval over the evaluation windows (``ppl_ci``),
    where the results hold one. The dashed staircase is the Pareto front (:func:`pareto_front`):
    the methods no other method beats on both storage and perplexity. Labels by
    :func:`place_labels`. The figure's layout is final: save it without ``tight_layout``.
    """
    import seaborn as sns
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    methods = results["methods"]
    names = [n for n in methods if methods[n]["ppl"] is not None and methods[n]["bits_per_weight"] is not None]
    colors = method_colors(list(methods))
    with _style():
        fig = Figure(figsize=(6.5, 4.4), dpi=DPI)
        _renderer(fig)
        ax = fig.subplots()
        bits = [methods[n]["bits_per_weight"] for n in names]
        ppl = [methods[n]["ppl"] for n in names]
        if names:
            sns.scatterplot(x=bits, y=ppl, hue=names, palette=colors, s=45, ax=ax, legend=False, zorder=4)
        with_ci = [n for n in names if methods[n].get("ppl_ci")]
        handles = []
        for n in with_ci:
            low, high = methods[n]["ppl_ci"]
            p = methods[n]["ppl"]
            bar = ax.errorbar(
                methods[n]["bits_per_weight"],
                p,
                yerr=[[max(p - low, 0.0)], [max(high - p, 0.0)]],
                fmt="none",
                ecolor=colors[n],
                elinewidth=1.0,
                alpha=0.55,
                capsize=3,
                zorder=3,
            )
        if with_ci:
            windows = len(methods[with_ci[0]].get("window_nll") or [])
            bar.set_label(f"95% bootstrap interval ({windows} windows)" if windows else "95% bootstrap interval")
            handles.append(bar)
        front = pareto_front(list(zip(bits, ppl)))
        if len(front) > 1:
            (line,) = ax.plot(
                [bits[i] for i in front],
                [ppl[i] for i in front],
                drawstyle="steps-post",
                ls="--",
                lw=1,
                color="0.35",
                zorder=2,
                label="Pareto front",
            )
            handles.append(line)
        ax.margins(x=0.1, y=0.14)
        ax.set_xlabel("bits per weight (stored, decoder linears)")
        ax.set_ylabel(f"perplexity (seqlen {results['seqlen']})")
        ax.set_title(f"Perplexity vs bits per weight\n{_subtitle(results)}", fontsize=9)
        fig.tight_layout()
        obstacles = []
        if handles:
            legend = ax.legend(handles=handles, loc=_legend_corner(ax, list(zip(bits, ppl))), fontsize=7, frameon=True)
            obstacles.append(tuple(legend.get_window_extent(_renderer(fig)).extents))
        for n in with_ci:  # the error bars, as thin boxes
            low, high = methods[n]["ppl_ci"]
            (x0, y0), (x1, y1) = ax.transData.transform(
                [(methods[n]["bits_per_weight"], low), (methods[n]["bits_per_weight"], high)]
            )
            obstacles.append((x0 - 4, min(y0, y1), x0 + 4, max(y0, y1)))
        steps = []  # the Pareto staircase as pixel segments
        for a, b in zip(front, front[1:]):
            corner = (bits[b], ppl[a])
            steps += [((bits[a], ppl[a]), corner), (corner, (bits[b], ppl[b]))]
        segments = [tuple(map(tuple, ax.transData.transform(seg))) for seg in steps]
        place_labels(
            ax,
            list(zip(bits, ppl)),
            names,
            fontsize=8,
            obstacles=obstacles,
            colors=[colors[n] for n in names],
            segments=segments,
        )
    return fig


def _subtitle(results: dict) -> str:
    return f"{results['model']} · {results['dataset']} · {results['device']}"


def plot_results(results: dict, out: Path) -> list[Path]:
    """Perplexity vs bits per weight, memory, and latency bar charts as PNG files in ``out``."""
    import seaborn as sns
    from matplotlib.figure import Figure

    methods = results["methods"]
    if not methods:
        return []
    names = list(methods)
    colors = method_colors(names)
    paths = [_save(ppl_vs_bits_figure(results), out / "ppl_vs_bits.png", layout=False)]
    for key, label, fname in (
        ("memory_mb", "model memory (MB, parameters + buffers)", "memory.png"),
        ("latency_ms_per_token", "decode latency (ms/token, batch 1)", "latency.png"),
    ):
        with _style():
            fig = Figure(figsize=(6.5, 3.8), dpi=DPI)
            ax = fig.subplots()
            vals = [methods[n][key] or 0.0 for n in names]  # null (not finite) shows as 0
            sns.barplot(x=vals, y=names, hue=names, palette=colors, orient="h", ax=ax, legend=False)
            for i, v in enumerate(vals):
                ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
            if key == "latency_ms_per_token":  # what a user would run instead, on the float model
                alts = [
                    (n, a["latency_ms_per_token"])
                    for n, a in (results.get("alternatives") or {}).items()
                    if a.get("latency_ms_per_token")
                ]
                for (alt, ms), ls in zip(alts, ("--", ":")):
                    ax.axvline(ms, ls=ls, lw=1, color="0.3", label=f"float model, {alt}: {ms:.2f}")
                    vals = vals + [ms]
                if alts:
                    ax.legend(fontsize=7, loc="best")
            ax.set_xlim(0, max(vals + [1e-9]) * 1.18)
            ax.set_xlabel(label)
            ax.set_ylabel("")
            ax.set_title(_subtitle(results), fontsize=9)
            paths.append(_save(fig, out / fname))
    return paths


def _save(fig, path: Path, layout: bool = True) -> Path:
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path
