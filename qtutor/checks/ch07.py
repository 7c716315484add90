"""Checkers for the exercises of chapter 7, "The benchmark and Core ML".

``from qtutor.checks import ch07`` then e.g. ``ch07.check_pareto(my_fn)``.
Each checker prints one line and returns True when the answer is right.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..quant.palettize import LUTWeight, PalettizedLinear
from . import close, report
from .ch00 import _as_float, _call


# --------------------------------------------------------------------------- Pareto front
def check_pareto(fn) -> bool:
    """``fn({name: (bits_per_weight, ppl)}) -> names``: the methods on the Pareto front, those
    for which no other method has at most the bits AND at most the perplexity, one of them
    strictly less."""
    cases = [  # (points, the front worked out by hand)
        (
            {
                "fp16": (16.0, 10.0),
                "int8": (8.05, 10.01),
                "int4": (4.16, 10.9),
                "gptq": (4.16, 10.4),
                "nf4": (4.13, 10.5),
                "pal4": (4.10, 10.6),
                "w8a8": (8.1, 10.02),
            },
            {"fp16", "int8", "gptq", "nf4", "pal4"},
        ),
        ({"a": (4.0, 12.0), "b": (4.0, 11.0), "c": (3.0, 13.0), "d": (5.0, 11.0), "e": (2.0, 20.0)}, {"b", "c", "e"}),
        ({"only": (4.0, 9.0)}, {"only"}),
    ]
    for pts, truth in cases:
        got, err = _call(fn, dict(pts))
        if err:
            return report(False, "pareto", err)
        try:
            got = set(got)
        except TypeError:
            return report(False, f"pareto returned {type(got).__name__}", "return the names (a list or a set)")
        if got != truth:
            hint = "keep a method unless another one has bits <= AND ppl <= with at least one strictly smaller"
            if got == {min(pts, key=lambda n: pts[n][1])}:
                hint = "the front is every trade-off no one beats, not only the lowest perplexity"
            elif got > truth:
                hint = f"{sorted(got - truth)} are dominated: another method is no worse in both and better in one"
            elif got < truth:
                hint = f"{sorted(truth - got)} are not beaten in both coordinates by any other method"
            return report(False, f"front {sorted(got)}, expected {sorted(truth)}", hint)
    return report(True, "the Pareto front of bits per weight against perplexity")


# --------------------------------------------------------------------------- memory-bound speed-up
def check_decode_speedup(fn) -> bool:
    """``fn(linear_bytes_fp16, other_bytes, bits_per_weight) -> float``: the speed-up of
    memory-bound decoding when the linears go from 16 bits to ``bits_per_weight`` and the other
    bytes read per token (embedding row, lm_head, norms) stay: the ratio of bytes read."""
    cases = {  # (linear bytes in fp16, other bytes, bits per weight) -> speed-up, worked out by hand
        (1e9, 2.7e8, 4.156): 2.397357244,
        (7.2e6, 2.1e6, 4.104): 2.356339313,
        (5e8, 0.0, 8.0): 2.0,
        (1e6, 1e6, 16.0): 1.0,
    }
    for args, truth in cases.items():
        got, err = _call(fn, *args)
        if err:
            return report(False, f"decode_speedup{args}", err)
        got = _as_float(got)
        if got is None or not math.isclose(got, truth, rel_tol=1e-6):
            lin, other, bits = args
            hint = "time ~ bytes read per token: (L + O) / (L * bits / 16 + O)"
            if got is not None and math.isclose(got, 16 / bits, rel_tol=1e-6):
                hint = "the bytes that stay 16-bit (lm_head, embeddings) are read every token too (Amdahl)"
            elif got is not None and math.isclose(got, 1 / truth, rel_tol=1e-6):
                hint = "a speed-up is old time / new time: above 1 when fewer bytes are read"
            return report(False, f"decode_speedup{args} = {got}, expected {truth:.4f}", hint)
    return report(True, "memory-bound decode speed-up, embeddings and lm_head included")


# --------------------------------------------------------------------------- a LUT read back
def _entries(seed: int = 9):
    """Two palettized weights, as ``qtutor.coreml.read_luts`` returns them: with per-row scales
    (the palette folded per output row) and without (one palette per group of rows)."""
    g = torch.Generator().manual_seed(seed)
    out, inp, group = 32, 24, 8
    idx = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    lut = torch.randn(out // group, 16, generator=g).sort(1).values.half()
    scale = (torch.rand(out, generator=g) + 0.5).half()
    cases = []
    for with_scale in (True, False):
        q = LUTWeight(idx, lut, scale if with_scale else None, 4)
        truth = PalettizedLinear(q).dequantize().double()
        table = lut.repeat_interleave(group, 0) if with_scale else lut
        entry = {
            "lut": table.numpy().astype(np.float16),
            "indices": idx.numpy().copy(),
            "scale": scale.numpy().astype(np.float16) if with_scale else None,
        }
        cases.append((with_scale, entry, truth))
    return cases


def check_dequantize_entry(fn) -> bool:
    """``fn(entry) -> W (out, in)``: the weight stored in one entry of ``qtutor.coreml.read_luts``:
    ``entry["lut"]`` (n, 2^b) with n = out (one row per output channel) or n dividing out (one
    palette per group of out / n rows: ``qtutor.coreml.coreml_lut`` exports equal groups even when
    the layer's last group is shorter), ``entry["indices"]`` (out, in), ``entry["scale"]`` (out,)
    or None."""
    for with_scale, entry, truth in _entries():
        what = "an entry with per-row scales" if with_scale else "an entry without scales (grouped palettes)"
        got, err = _call(fn, {k: (None if v is None else v.copy()) for k, v in entry.items()})
        if err:
            return report(False, what, err)
        try:
            got = torch.as_tensor(np.asarray(got, dtype=np.float64))
        except Exception:
            return report(False, f"{what}: returned {type(got).__name__}", "return an array or a tensor")
        if got.shape != truth.shape:
            return report(False, f"{what}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}")
        if not close(got, truth, atol=1e-6, rtol=1e-3):
            hint = "W[r, c] = lut[row of r][indices[r, c]] * scale[r]"
            lut = torch.as_tensor(entry["lut"].astype(np.float64))
            if with_scale and close(got, lut.gather(1, torch.as_tensor(entry["indices"]).long()), atol=1e-6):
                hint = "multiply each row by its scale"
            elif not with_scale:
                hint = (
                    "the table has fewer rows than the weight: output row r uses palette "
                    "r // (out / n), n the number of palettes"
                )
            return report(False, f"{what}: largest difference {float((got - truth).abs().max()):.3g}", hint)
    return report(True, "weights rebuilt from a Core ML palette entry, with and without scales")


# --------------------------------------------------------------------------- predict, then measure
def check_compression_prediction(predicted, measured: float) -> bool:
    """Predict-then-measure (chapter 7): ``predicted``, how many times smaller than the benchmark's
    ``fp16_baseline`` the whole palettized model is, against the ``measured`` compression ratio.
    Within 5%."""
    from .ch04 import _judge_prediction

    return _judge_prediction(
        "compression ratio of the palettized model",
        predicted,
        measured,
        0.05,
        "{:.2f}",
        "only the decoder linears shrink, to bits_per_weight / 16 of their fp16 bytes; the embedding table stays in "
        "the model's dtype in both models (fp32 on a CPU)",
    )


def check_noise_prediction(predicted, measured: float) -> bool:
    """Predict-then-measure on the whole model (chapter 7): ``predicted``, the standard error of
    a perplexity change with all the windows of the sweep, against the ``measured`` one. Within 50%."""
    from .ch04 import _judge_prediction

    return _judge_prediction(
        "standard error of the perplexity change with all windows",
        predicted,
        measured,
        0.5,
        "{:.3%}",
        "the standard error of a mean of independent windows falls as 1 / sqrt(number of windows)",
    )
