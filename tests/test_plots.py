"""qtutor.plots: the Pareto front, labels that never overlap, error bars, the files the benchmark writes."""

import csv
import math

import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.text import Annotation, Text

from qtutor import plots


def results(points, ci=True):
    """A results dict as ``run_bench`` returns it, for ``points``: {name: (bits, ppl)}."""
    methods = {}
    for k, (name, (bits, ppl)) in enumerate(points.items()):
        methods[name] = {
            "ppl": ppl,
            "ppl_ci": [ppl * 0.995, ppl * 1.006] if ci and ppl is not None else None,
            "window_nll": [math.log(ppl)] * 8 if ppl is not None else [],
            "eval_tokens": 4096,
            "seqlen": 512,
            "bits_per_weight": bits,
            "memory_mb": 10.0 - k,
            "compression_ratio": 1.0,
            "latency_ms_per_token": 1.0 + k,
            "quant_seconds": 0.5,
        }
    return {"model": "m", "dataset": "d", "device": "cpu", "dtype": "float32", "seqlen": 512, "methods": methods}


#: twelve methods within a hair of each other, and two far away: labels at a fixed offset overlap
CROWDED = {
    **{f"method_with_a_long_name_{i}": (4.10 + 0.005 * (i % 4), 15.10 + 0.004 * (i // 4)) for i in range(12)},
    "fp16_baseline": (16.0, 14.80),
    "rtn_int8": (8.05, 14.80),
}


def label_boxes(fig):
    """The drawn label texts' boxes (x0, y0, x1, y1) in pixels, without their leader lines."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    return {
        t.get_text(): tuple(Text.get_window_extent(t, renderer).extents) for t in ax.texts if isinstance(t, Annotation)
    }


# --------------------------------------------------------------------------- Pareto front
def test_pareto_front_known_answer():
    pts = [(16, 14.8), (8.05, 14.8), (4.156, 15.2), (4.156, 15.098), (4.104, 15.117), (4.127, 15.127), (8.1, 14.9)]
    # (8.05, 14.8) beats fp16 (fewer bits, same ppl); (4.104, 15.117) beats nf4; (4.156, 15.098) beats (4.156, 15.2)
    assert plots.pareto_front(pts) == [4, 3, 1]


def test_pareto_front_keeps_ties_and_skips_missing():
    pts = [(4, 10), None, (4, 10), (8, float("nan")), (8, None), (2, 12)]
    assert plots.pareto_front(pts) == [5, 0, 2]
    assert plots.pareto_front([]) == [] and plots.pareto_front([None]) == []


# --------------------------------------------------------------------------- labels
def test_fixed_offsets_would_overlap_on_the_crowded_input():
    """The input really is crowded: the old placement (every label 4 points up and right) overlaps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.4), dpi=plots.DPI)
    ax = fig.subplots()
    for name, (x, y) in CROWDED.items():
        ax.scatter(x, y)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    assert plots.boxes_overlap(list(label_boxes(fig).values()))


def test_labels_never_overlap_on_a_crowded_figure(tmp_path):
    fig = plots.ppl_vs_bits_figure(results(CROWDED))
    boxes = label_boxes(fig)
    assert set(boxes) == set(CROWDED)
    assert plots.boxes_overlap(list(boxes.values())) == []
    x0, y0, x1, y1 = fig.bbox.extents
    for b in boxes.values():  # every label inside the figure
        assert x0 <= b[0] and b[2] <= x1 and y0 <= b[1] and b[3] <= y1
    # and still so in the saved file: the placement is not undone by saving
    fig.savefig(tmp_path / "f.png", dpi=plots.DPI)
    assert plots.boxes_overlap(list(label_boxes(fig).values())) == []


def test_label_placement_is_deterministic():
    a = label_boxes(plots.ppl_vs_bits_figure(results(CROWDED)))
    b = label_boxes(plots.ppl_vs_bits_figure(results(CROWDED)))
    assert a == b


def test_place_labels_keeps_clear_of_the_points():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3), dpi=plots.DPI)
    ax = fig.subplots()
    xy = [(0.5 + 0.01 * i, 0.5) for i in range(6)]
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    texts = plots.place_labels(ax, xy, [f"label {i}" for i in range(6)], marker_radius=4)
    boxes = label_boxes(fig)
    px = fig.dpi / 72
    for x, y in (ax.transData.transform(p) for p in xy):
        marker = (x - 4 * px, y - 4 * px, x + 4 * px, y + 4 * px)
        assert not any(plots._overlap(b, marker) for b in boxes.values())
    assert [t.get_text() for t in texts] == [f"label {i}" for i in range(6)]


def test_boxes_overlap():
    assert plots.boxes_overlap([(0, 0, 2, 2), (1, 1, 3, 3), (2, 0, 4, 1.5)]) == [(0, 1), (1, 2)]
    assert plots.boxes_overlap([(0, 0, 1, 1), (1, 0, 2, 1)]) == []  # touching edges share no area


# --------------------------------------------------------------------------- error bars and files
def test_error_bars_where_the_results_hold_intervals():
    (ax,) = plots.ppl_vs_bits_figure(results(CROWDED)).axes
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == len(CROWDED)
    (ax,) = plots.ppl_vs_bits_figure(results(CROWDED, ci=False)).axes
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_plot_results_writes_three_figures_and_the_csv_holds_the_interval(tmp_path):
    res = results({"fp16_baseline": (16.0, 14.8), "rtn_int4": (4.156, 15.2), "qlora_nf4": (4.127, None)}, ci=True)
    paths = plots.plot_results(res, tmp_path)
    assert [p.name for p in paths] == ["ppl_vs_bits.png", "memory.png", "latency.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    plots.write_csv(res, tmp_path / "r.csv")
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "r.csv"))}
    assert float(rows["rtn_int4"]["ppl_low"]) == pytest.approx(15.2 * 0.995)
    assert rows["qlora_nf4"]["ppl_low"] == ""  # not measured
    assert plots.plot_results({**res, "methods": {}}, tmp_path) == []
