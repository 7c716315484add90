"""Core ML export: a Qwen2/Llama causal LM as an ML Program ``.mlpackage`` whose palettized
linears carry qtutor's own LUTs and indices (chapter 7), whole or with a stateful KV cache.

How it works (coremltools 9):

1. :func:`prepare_for_export` makes a CPU copy of the model for tracing: every
   :class:`~qtutor.quant.palettize.PalettizedLinear` becomes an ``nn.Linear`` whose weight is its
   dequantized value, plus the compression metadata that coremltools' ``PostTrainingPalettizer``
   would have registered (buffers ``_COREML_/weight/lut`` (n_luts, 1, 2^b, 1),
   ``_COREML_/weight/palettization_scale`` (out, 1) and ``_COREML_/weight/compression_type`` =
   [2], palettization), filled with OUR LUTs and scales. The LUT buffer's shape says how many
   blocks each weight axis is cut into, so coremltools needs groups of equal size; a layer whose
   last group is shorter (``group_size`` not dividing ``out_features``) is exported with an
   exactly equivalent table of equal groups (:func:`coreml_lut`). Other quantized linears are
   exported as plain (dequantized) linears. The copy is float32 except the embedding table and
   the lm_head, which stay in float16 (:class:`HalfPrecisionHead`): the package stores them in
   float16 anyway, and a float32 table of Qwen2-0.5B's size makes coremltools' fp16 overflow
   check allocate about 30 bytes per entry (4 GiB).
2. A wrapper gives the model a shape coremltools can convert: :class:`CausalLMForCoreML` takes
   ``input_ids`` (1, seqlen) and calls the model with a FIXED additive causal mask (0 on and
   below the diagonal, -1e4 above; a 4-D float mask, which transformers passes through
   untouched), fixed position ids and ``use_cache=False``, with eager attention: transformers'
   own mask construction does not convert. :class:`StatefulCausalLMForCoreML` instead runs the
   decoder layers itself with a key/value cache held in two registered buffers, which Core ML
   keeps as *states* between predictions (iOS 18 / macOS 15): prompt first, then one token per
   prediction (Apple's "On Device Llama 3.1 with Core ML" recipe).
3. ``torch.jit.trace`` and ``ct.convert(..., convert_to="mlprogram",
   minimum_deployment_target=ct.target.iOS18)``. The torch frontend turns each annotated weight
   into ``constexpr_lut_to_dense(indices, lut)`` followed by ``constexpr_blockwise_shift_scale``
   (the per-channel scale). It would search ``weight / scale`` for the nearest entries of the
   LUT; we hand it our own indices instead (:func:`known_indices`, each checked to decode to the
   weight it converts, else searched for), so the package holds exactly our palettes and indices.
   coremltools' optimisation passes then fold the scale into the table: the saved program holds
   ``constexpr_lut_to_dense(indices, constexpr_blockwise_shift_scale(lut rows, scale))`` with
   our LUT repeated for each output channel of its group (see :func:`read_luts`).

:func:`read_luts` reads the LUTs back from a saved package and :func:`check_package` compares
every palettized layer of a model with it (any platform); :func:`states_of` and :func:`op_types`
read a package's states and operations. :func:`predict` and :func:`generate` run a package and
need macOS (Core ML runs only there). :class:`PeakHostMemory` measures what an export costs;
:func:`export_in_background` runs the exports in child processes, beside other work.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import QtutorError
from .quant.base import QuantizedLinear
from .quant.palettize import PalettizedLinear

MASK_VALUE = -1e4  # finite, so that fp16 arithmetic never meets inf - inf
PALETTIZATION = 2  # coremltools' CompressionType.PALETTIZATION


def _coremltools():
    try:
        import coremltools as ct
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise QtutorError("Core ML export needs coremltools: pip install 'qtutor[coreml]'") from err
    return ct


# ---------------------------------------------------------------------------- measuring an export
def _rss_bytes() -> Optional[int]:
    """This process's resident set size now (psutil, else /proc/self/statm), or None."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):  # pragma: no cover - not Linux, no psutil
        return None


def _maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss``, the process's peak resident size so far, in bytes
    (the kernel reports KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakHostMemory:
    """Measure the peak resident host memory of this process while a ``with`` block runs.

    Two measurements, both of the real process: a background thread reads the resident set size
    every ``interval`` seconds (``psutil``, or ``/proc/self/statm``), and the kernel's own peak,
    ``getrusage(RUSAGE_SELF).ru_maxrss``, is read before and after. When the block sets a new
    peak for the process, ``ru_maxrss`` is that peak exactly; otherwise (an earlier cell went
    higher) the sampled maximum stands, which can miss a spike shorter than ``interval``.

    After the block: ``seconds`` (wall time), ``start`` and ``peak`` (bytes resident at the start
    and at the highest point), ``extra = peak - start`` (what the block added at its peak) and
    ``source`` (which measurement gave ``peak``).
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start = self.peak = self.extra = 0
        self.seconds = 0.0
        self.source = ""

    def __enter__(self):
        self._stop = threading.Event()
        self._maxrss0 = _maxrss_bytes()
        self.start = _rss_bytes() or self._maxrss0  # no RSS reading: the peak so far stands in
        self._sampled = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None:
                self._sampled = max(self._sampled, rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        maxrss = _maxrss_bytes()
        if maxrss > self._maxrss0:  # a new process record: the kernel's exact peak
            self.peak, self.source = max(maxrss, self._sampled), "getrusage ru_maxrss"
        else:
            self.peak, self.source = self._sampled, f"RSS sampled every {self.interval * 1000:.0f} ms"
        self.extra = self.peak - self.start
        return False

    FIELDS = ("seconds", "start", "peak", "extra", "source")

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "PeakHostMemory":
        """A measurement taken elsewhere (:meth:`as_dict`; another process)."""
        m = cls()
        for k in cls.FIELDS:
            setattr(m, k, d[k])
        return m

    def __str__(self) -> str:
        return (
            f"{self.seconds:.1f} s, peak host memory {self.peak / 2**30:.2f} GiB "
            f"(+{self.extra / 2**30:.2f} GiB over the {self.start / 2**30:.2f} GiB before; "
            f"{self.source})"
        )


# ---------------------------------------------------------------------------- the copy to trace
class HalfPrecisionHead(nn.Module):
    """The lm_head with a float16 weight (vocab, hidden) in a float32 model: ``x`` (..., hidden)
    is rounded to float16, multiplied, and the logits (..., vocab) returned in float32. With a
    tied embedding the weight is the embedding table itself (one constant in the package)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).float()


def coreml_lut(q: PalettizedLinear) -> torch.Tensor:
    """``q``'s LUTs as equal groups of rows, as coremltools' ``_COREML_/weight/lut`` needs them:
    (out // g, 2^b) with ``g = gcd(rows_per_lut, out)`` rows per table.

    With ``rows_per_lut`` dividing ``out`` this is ``q.lut`` itself. Otherwise (172 rows, LUTs of
    16 rows, the last of 12) each LUT is repeated ``rows_per_lut // g`` times and the list cut to
    ``out // g`` tables (g = 4: 43 tables): row ``r`` uses table ``r // g``, which is LUT
    ``r // rows_per_lut`` since ``g`` divides ``rows_per_lut``. The indices and the decoded
    weights are unchanged; the package stores ``rows_per_lut // g`` copies of each LUT.
    """
    g = math.gcd(q.rows_per_lut, q.out_features)
    return q.lut.repeat_interleave(q.rows_per_lut // g, dim=0)[: q.out_features // g]


def annotated_linear(q: QuantizedLinear, palettized: bool = True) -> nn.Linear:
    """A float32 CPU ``nn.Linear`` holding ``q``'s dequantized weight (out, in); for a
    :class:`PalettizedLinear` (and ``palettized``), also coremltools' palettization metadata
    holding our LUTs (n_luts, 1, 2^b, 1) and scales (out, 1), whatever device ``q`` is on."""
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    annotate = palettized and isinstance(q, PalettizedLinear)
    unpacked = q.unpacked() if annotate else None  # unpacked once: the weight and the indices
    with torch.no_grad():
        lin.weight.copy_((q if unpacked is None else unpacked).dequantize().float().cpu())
        if q.bias is not None:
            lin.bias.copy_(q.bias.float().cpu())
    lin.requires_grad_(False)
    if annotate:
        lut = coreml_lut(q).float().cpu()
        lin.register_buffer("_COREML_/weight/lut", lut[:, None, :, None].contiguous())
        if q.scales is not None:
            lin.register_buffer("_COREML_/weight/palettization_scale", q.scales.float().cpu()[:, None].clone())
        lin.register_buffer("_COREML_/weight/compression_type", torch.tensor([PALETTIZATION]))
        lin.qtutor_indices = unpacked.indices.cpu()  # a plain attribute: not traced (known_indices)
    return lin


def prepare_for_export(
    model: nn.Module, palettized: bool = True, table_dtype: torch.dtype = torch.float16
) -> nn.Module:
    """A CPU copy of ``model`` for tracing, whatever its device and dtype (an fp16 model on a
    GPU too): eager attention, every quantized linear replaced by :func:`annotated_linear`,
    the other parameters in float32 except the input embedding table and the lm_head weight,
    kept in ``table_dtype`` (the lm_head becomes a :class:`HalfPrecisionHead`; a tied head keeps
    sharing the table). A quantized lm_head (``qtutor.quantize(..., head=True)``) is exported as the
    other quantized linears are, and its tied :class:`~qtutor.quant.base.QuantizedEmbedding` reads
    the rows of that linear's weight. Buffers (rotary frequencies) keep their dtype. ``model`` is unchanged.

    The copy is built with ``copy.deepcopy`` and a pre-filled memo (Python's documented hook:
    an object found in the memo is taken as its own copy), so the quantized layers and the
    parameters are converted once, straight to the CPU, instead of being copied and then
    converted: at Qwen2-0.5B this holds one model's worth of float32 weights, not two.
    """
    import copy

    memo: dict = {}
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    replaced = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for m in replaced:
        memo[id(m)] = annotated_linear(m, palettized)
    skip = {id(t) for m in replaced for t in [*m.parameters(), *m.buffers()]}  # not copied
    convert_head = head is not None and not isinstance(head, QuantizedLinear)
    # a quantized tied head (qtutor.quantize(..., head=True)) has no float table: its embedding
    # reads the rows of the head's annotated linear (float32, and palettized if the head is)
    emb_table = getattr(emb, "weight", None)
    tables = ({id(emb_table)} if emb_table is not None else set()) | ({id(head.weight)} if convert_head else set())
    for p in model.parameters():
        if id(p) not in skip and id(p) not in memo:
            dtype = table_dtype if id(p) in tables else torch.float32
            memo[id(p)] = nn.Parameter(p.detach().to("cpu", dtype), requires_grad=False)
    for b in model.buffers():
        if id(b) not in skip and id(b) not in memo:
            memo[id(b)] = b.detach().to("cpu", copy=True)
    if convert_head:
        bias = getattr(head, "bias", None)
        memo[id(head)] = HalfPrecisionHead(memo[id(head.weight)], None if bias is None else memo[id(bias)])
    copied = copy.deepcopy(model, memo).eval()
    if hasattr(copied, "set_attn_implementation"):
        copied.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        copied.config._attn_implementation = "eager"
    return copied


class CausalLMForCoreML(nn.Module):
    """``input_ids`` (1, seqlen) -> logits (1, seqlen, vocab) float32, with a fixed causal mask.

    ``model`` is a copy from :func:`prepare_for_export`: the embedding is looked up here and cast
    to float32 (the table may be float16), then passed to the model as ``inputs_embeds``.
    """

    def __init__(self, model: nn.Module, seqlen: int):
        super().__init__()
        self.model = model
        mask = torch.full((seqlen, seqlen), MASK_VALUE).triu(1)
        self.register_buffer("causal_mask", mask[None, None])
        self.register_buffer("position_ids", torch.arange(seqlen)[None])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(input_ids).float()
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=self.causal_mask,
            position_ids=self.position_ids,
            use_cache=False,
            return_dict=True,
        )
        return out.logits.float()


def _precision(ct, compute_precision: str):
    if compute_precision not in ("float16", "float32"):
        raise QtutorError(f"compute_precision must be 'float16' or 'float32', not {compute_precision!r}")
    return ct.precision.FLOAT16 if compute_precision == "float16" else ct.precision.FLOAT32


def _check_path(path) -> Path:
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise QtutorError(f"Core ML ML Programs are saved as a .mlpackage folder, not {path.name!r}")
    return path


def _start_export(model: nn.Module, path, palettized: bool, compute_precision: str):
    """What both exports begin with -> (coremltools, the checked path, the precision, the CPU
    copy to trace (:func:`prepare_for_export`), its :func:`known_indices`)."""
    ct = _coremltools()
    path = _check_path(path)
    precision = _precision(ct, compute_precision)
    table = torch.float16 if compute_precision == "float16" else torch.float32
    prepared = prepare_for_export(model, palettized, table)
    return ct, path, precision, prepared, known_indices(prepared)


def export_mlpackage(
    model: nn.Module,
    path: Union[str, Path],
    seqlen: int = 32,
    palettized: bool = True,
    compute_precision: str = "float16",
):
    """Convert a Qwen2/Llama causal LM (all its layers) to an ML Program at ``path``
    (``.mlpackage``) and return the ``coremltools.models.MLModel``.

    Input ``input_ids`` (1, seqlen) int32, output ``logits`` (1, seqlen, vocab) float32.
    palettized: keep the LUTs of :class:`PalettizedLinear` layers as ``constexpr_lut_to_dense``
    weights (``False`` stores every weight densely). ``model`` may be on any device and in any
    dtype: the trace runs on a CPU copy (:func:`prepare_for_export`), freed before returning.
    Runs on Linux too (the package is not loaded for prediction there).
    """
    ct, path, precision, prepared, known = _start_export(model, path, palettized, compute_precision)
    wrapper = CausalLMForCoreML(prepared, seqlen).eval()
    del prepared
    example = torch.zeros(1, seqlen, dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    del wrapper
    inputs = [ct.TensorType(name="input_ids", shape=(1, seqlen), dtype=np.int32)]
    return _convert_and_save(traced, path, precision, inputs, known=known)


def nearest_lut_indices(data: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """For each weight of ``data`` (out, in) float32, the index of the nearest entry of its LUT
    ``lut`` (n_luts, 1, 2^b, 1) float32, LUT ``g`` serving rows ``g * out // n_luts`` onwards:
    the first of equally near entries, as ``np.argmin`` picks. (out, in) uint8.

    The same answer as coremltools' ``find_indices_for_lut`` for these shapes, computed one LUT
    entry at a time instead of through an (out, in, 2^b) array of distances: the same float32
    ``|w - lut[k]|`` compared with a strict ``<``, so ties go to the lower index.
    """
    n_luts, K = lut.shape[0], lut.shape[-2]
    x = torch.from_numpy(np.ascontiguousarray(data)).reshape(n_luts, -1)
    L = torch.from_numpy(np.ascontiguousarray(lut).reshape(n_luts, K))
    best = (x - L[:, :1]).abs_()
    index = torch.zeros(x.shape, dtype=torch.uint8)
    for k in range(1, K):
        d = (x - L[:, k : k + 1]).abs_()
        closer = d < best
        best = torch.where(closer, d, best)
        index.masked_fill_(closer, k)
    return index.reshape(data.shape).numpy()


def _lut_key(lut: np.ndarray, shape: tuple) -> tuple:
    """What identifies a palettized weight during a conversion: its weight's shape and the bytes
    of its float32 LUT buffer (n_luts, 1, 2^b, 1)."""
    return tuple(shape), np.ascontiguousarray(lut, dtype=np.float32).tobytes()


def known_indices(prepared: nn.Module) -> dict:
    """{:func:`_lut_key`: (out, in) uint8 indices} of the linears :func:`annotated_linear` made
    from :class:`PalettizedLinear` layers in a :func:`prepare_for_export` copy: the indices the
    package should hold, handed to the converter instead of being searched for again."""
    known = {}
    for m in prepared.modules():
        idx = getattr(m, "qtutor_indices", None)
        if idx is not None:
            known[_lut_key(getattr(m, "_COREML_/weight/lut").numpy(), m.weight.shape)] = idx
    return known


def _indices_fit(data: np.ndarray, lut: np.ndarray, idx: torch.Tensor) -> bool:
    """Whether ``idx`` picks, for every weight of ``data`` (out, in), an entry of its LUT within
    float32 rounding of the weight: ``data`` is ``lut[idx] * scale / scale`` computed in float32."""
    n_luts = lut.shape[0]
    L = torch.from_numpy(np.ascontiguousarray(lut).reshape(n_luts, -1))
    x = torch.from_numpy(np.ascontiguousarray(data)).reshape(n_luts, -1)
    picked = L.gather(1, idx.reshape(n_luts, -1).long())
    tol = 1e-5 * L.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return bool(((x - picked).abs() <= tol).all())


@contextlib.contextmanager
def _fast_lut_indices(known: Optional[dict] = None):
    """While converting, coremltools' torch frontend gets each palettized weight's indices from
    ``known`` (:func:`known_indices`: ours, checked to decode to the weight it converts), else
    from :func:`nearest_lut_indices` when the shapes are ours (a 2-D float32 weight, scalar LUTs
    blocked along the output axis), and from its own ``find_indices_for_lut`` otherwise. Its own
    builds an (out, in, 2^b) array of distances per weight: about half of a Qwen2-0.5B export's
    time (25 s of 64 s on 2 cores); the nearest-entry search takes 15 s, the known indices under
    a second. The three give the same indices (tested)."""
    from coremltools.optimize import _utils

    original = _utils.find_indices_for_lut
    known = known or {}

    def find_indices_for_lut(data, lut, vector_axis=None):
        ours = (
            data.ndim == 2
            and lut.ndim == 4
            and lut.shape[1] == 1
            and lut.shape[-1] == 1
            and data.shape[0] % lut.shape[0] == 0
            and 2 <= lut.shape[-2] <= 256
            and data.dtype == np.float32
            and lut.dtype == np.float32
        )
        if not ours:
            return original(data, lut, vector_axis)
        dtype = _utils.types.nptype_from_builtin(_utils.types.string_to_builtin(f"uint{int(math.log2(lut.shape[-2]))}"))
        idx = known.get(_lut_key(lut, data.shape))
        if idx is not None and _indices_fit(data, lut, idx):
            return idx.numpy().astype(dtype)
        return nearest_lut_indices(data, lut).astype(dtype)

    _utils.find_indices_for_lut = find_indices_for_lut
    try:
        yield
    finally:
        _utils.find_indices_for_lut = original


def _convert_and_save(traced, path, precision, inputs, states=None, known=None):
    """``ct.convert`` a traced module to an iOS 18 ML program with a float32 ``logits`` output,
    save it at ``path`` and return it (loaded for prediction on macOS only)."""
    import coremltools as ct

    with _fast_lut_indices(known):
        mlmodel = ct.convert(
            traced,
            inputs=inputs,
            outputs=[ct.TensorType(name="logits", dtype=np.float32)],
            states=states,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=precision,
            skip_model_load=sys.platform != "darwin",
        )
    del traced
    mlmodel.save(str(path))
    return mlmodel


# ---------------------------------------------------------------------------- stateful KV cache
def causal_mask(past: int, new: int) -> np.ndarray:
    """The additive mask (1, 1, new, past + new) float16 for ``new`` tokens after ``past`` cached
    ones: token ``t`` (position ``past + t``) sees positions ``0 .. past + t``; the others get
    :data:`MASK_VALUE`. Its width tells :class:`StatefulCausalLMForCoreML` where to write."""
    mask = np.triu(np.full((new, past + new), MASK_VALUE, dtype=np.float32), k=past + 1)
    return mask[None, None].astype(np.float16)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class StatefulCausalLMForCoreML(nn.Module):
    """A Qwen2/Llama decoder with its key/value cache in two buffers, for Core ML states.

    forward(``input_ids`` (1, T), ``causal_mask`` (1, 1, T, P + T)) -> logits (1, 1, vocab)
    float32 of the LAST input token, where P tokens are already cached: the mask's width gives
    P, the keys and values of the T new tokens are written to cache positions P .. P + T - 1 and
    attention reads positions 0 .. P + T - 1. A prompt is one call (P = 0, T = its length), then
    one call per generated token (T = 1); :func:`causal_mask` builds the masks. Positions come
    from shapes only (``mask.shape[-1] - input_ids.shape[-1]``), which ``torch.jit.trace``
    records as computations, so the converted model accepts any T and P with P + T <= max_len
    (Apple, "On Device Llama 3.1 with Core ML", 2024: same cache layout and mask input).

    Buffers ``k_cache`` and ``v_cache``: (layers, 1, kv_heads, max_len, head_dim) in
    ``cache_dtype`` (float16: Core ML states are float16), updated in place by slice
    assignment, which the converter turns into state reads and writes. The layers are the
    model's own modules (norms, projections, MLP); only attention is re-implemented, as
    transformers' eager attention computes it (rotary embedding from the model's ``rotary_emb``,
    grouped-query heads repeated as ``repeat_kv`` does). ``model`` comes from
    :func:`prepare_for_export`.
    """

    def __init__(self, model: nn.Module, max_len: int, cache_dtype: torch.dtype = torch.float16):
        super().__init__()
        cfg = model.config
        if not hasattr(model, "model") or not hasattr(model.model, "layers"):
            raise QtutorError(
                "the stateful export supports Qwen2/Llama-style models (model.model.layers with self_attn and mlp)"
            )
        self.model = model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_len = max_len
        n_layers = len(model.model.layers)
        shape = (n_layers, 1, self.n_kv, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=cache_dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=cache_dtype))
        with torch.no_grad():  # cos/sin of every position, as the model's rotary embedding gives
            cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.arange(max_len)[None])
        self.register_buffer("cos", cos[0].float())  # (max_len, head_dim)
        self.register_buffer("sin", sin[0].float())

    def reset(self) -> None:
        """Empty the cache (torch side; on a Mac, a new ``make_state()``)."""
        self.k_cache.zero_()
        self.v_cache.zero_()

    def _attention(
        self, i: int, attn: nn.Module, x: torch.Tensor, mask: torch.Tensor, past: int, end: int
    ) -> torch.Tensor:
        T, nh, nkv, hd = x.shape[1], self.n_heads, self.n_kv, self.head_dim
        q = attn.q_proj(x).view(1, T, nh, hd).transpose(1, 2)  # (1, nh, T, hd)
        k = attn.k_proj(x).view(1, T, nkv, hd).transpose(1, 2)  # (1, nkv, T, hd)
        v = attn.v_proj(x).view(1, T, nkv, hd).transpose(1, 2)
        cos, sin = self.cos[past:end], self.sin[past:end]  # (T, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.k_cache[i, :, :, past:end] = k.to(self.k_cache.dtype)  # the state write
        self.v_cache[i, :, :, past:end] = v.to(self.v_cache.dtype)
        K = self.k_cache[i, :, :, :end].to(q.dtype)  # (1, nkv, end, hd)
        V = self.v_cache[i, :, :, :end].to(q.dtype)
        g = nh // nkv  # repeat_kv: head j*g + r uses kv head j
        K = K[:, :, None].expand(1, nkv, g, end, hd).reshape(1, nh, end, hd)
        V = V[:, :, None].expand(1, nkv, g, end, hd).reshape(1, nh, end, hd)
        scaling = getattr(attn, "scaling", hd**-0.5)
        scores = torch.matmul(q, K.transpose(2, 3)) * scaling + mask  # (1, nh, T, end)
        o = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), V)
        return attn.o_proj(o.transpose(1, 2).reshape(1, T, nh * hd))

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        T, end = input_ids.shape[-1], causal_mask.shape[-1]
        past = end - T
        mask = causal_mask.float()
        base = self.model.model
        h = base.embed_tokens(input_ids).float()  # (1, T, hidden)
        for i, layer in enumerate(base.layers):
            h = h + self._attention(i, layer.self_attn, layer.input_layernorm(h), mask, past, end)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = base.norm(h[:, -1:])  # the last token only
        return self.model.get_output_embeddings()(h).float()  # (1, 1, vocab)


def export_stateful_mlpackage(
    model: nn.Module,
    path: Union[str, Path],
    max_len: int = 256,
    palettized: bool = True,
    compute_precision: str = "float16",
):
    """Convert a Qwen2/Llama causal LM to an ML Program with a KV cache in Core ML states
    (:class:`StatefulCausalLMForCoreML`), save it at ``path`` and return the ``MLModel``.

    Inputs ``input_ids`` (1, T) int32 and ``causal_mask`` (1, 1, T, P + T) float16, with T and
    P + T flexible in 1 .. ``max_len``; states ``k_cache`` and ``v_cache`` (layers, 1, kv_heads,
    max_len, head_dim) float16; output ``logits`` (1, 1, vocab) float32 for the last token.
    Needs ``minimum_deployment_target`` iOS 18 (states), as every export here uses. On a Mac,
    :func:`generate` decodes with it token by token.
    """
    ct, path, precision, prepared, known = _start_export(model, path, palettized, compute_precision)
    wrapper = StatefulCausalLMForCoreML(prepared, max_len).eval()
    del prepared
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (ids, torch.from_numpy(causal_mask(0, 2))), check_trace=False)
    cache_shape = tuple(wrapper.k_cache.shape)
    del wrapper
    new = ct.RangeDim(lower_bound=1, upper_bound=max_len, default=1)
    total = ct.RangeDim(lower_bound=1, upper_bound=max_len, default=1)
    inputs = [
        ct.TensorType(name="input_ids", shape=(1, new), dtype=np.int32),
        ct.TensorType(name="causal_mask", shape=(1, 1, new, total), dtype=np.float16),
    ]
    states = [
        ct.StateType(wrapped_type=ct.TensorType(shape=cache_shape, dtype=np.float16), name=name)
        for name in ("k_cache", "v_cache")
    ]
    return _convert_and_save(traced, path, precision, inputs, states, known)


# ---------------------------------------------------------------------------- reading a package
def _mlmodel(path_or_model, load: bool = False):
    ct = _coremltools()
    if isinstance(path_or_model, ct.models.MLModel):
        return path_or_model
    return ct.models.MLModel(str(path_or_model), skip_model_load=not load)


def _load_program(path_or_model):
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.models.utils import _convert_model_spec_to_pymil_prog

    mlmodel = _mlmodel(path_or_model)
    return _convert_model_spec_to_pymil_prog(mlmodel, mlmodel.get_spec().specificationVersion, milproto_load)


def _operations(block):
    for op in block.operations:
        yield op
        for b in op.blocks:
            yield from _operations(b)


def coremltools_palettize(linear: nn.Module, cfg=None) -> tuple[torch.Tensor, torch.Tensor]:
    """coremltools' own post-training palettizer (``PostTrainingPalettizer``) on a CPU float32
    copy of ``linear``'s weight (out, in), with the settings of ``cfg`` (a ``PalettizeConfig``;
    default: ``palettization_4bit``'s) -> (its dequantized weight (out, in) float32, its
    palettes (n_luts, 2^b)). ``linear`` is unchanged. Chapters 5 and 7 compare it with ours.
    """
    _coremltools()
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

    from .quant.palettize import PalettizeConfig

    cfg = cfg or PalettizeConfig()
    lin = nn.Linear(linear.in_features, linear.out_features, bias=False)
    lin.weight.data = linear.weight.detach().float().cpu().clone()
    settings = {"n_bits": cfg.bits, "granularity": cfg.granularity, "enable_per_channel_scale": cfg.per_channel_scale}
    if cfg.granularity == "per_grouped_channel":
        settings["group_size"] = cfg.group_size
    ct_cfg = PostTrainingPalettizerConfig.from_dict({"global_config": settings})
    out = PostTrainingPalettizer(nn.Sequential(lin), ct_cfg).compress()[0]
    lut = getattr(out, "_COREML_/weight/lut")
    return out.weight.detach().float(), lut.reshape(lut.shape[0], -1).float()


def read_luts(path_or_model) -> dict:
    """The palettized weights stored in an ML Program (a saved ``.mlpackage`` path or an
    ``MLModel``), read from its MIL program without loading it for prediction (any platform).

    Returns {op name: {"lut": (n, 2^b) array, "indices": (out, in) uint8 array, "scale": (out,)
    array or None}}. The op name embeds the torch parameter name with dots as underscores
    (``model_model_layers_0_self_attn_q_proj_weight...``, see :func:`find_lut`).

    coremltools folds a per-channel scale into the table: the stored program computes
    ``constexpr_lut_to_dense(indices, lut=constexpr_blockwise_shift_scale(data, scale))`` with one
    table row per output channel (each group's LUT repeated for its rows) and ``scale`` per row;
    "lut" is then ``data`` and "scale" is ``scale``. Without scales "lut" is the stored table,
    ``n`` equal groups of ``out // n`` rows (see :func:`coreml_lut`): row ``r`` uses
    ``lut[r // (out // n)]`` in either case.
    """
    return _read_program(path_or_model)[0]


def _read_program(path_or_model) -> tuple[dict, collections.Counter]:
    """(:func:`read_luts`, :func:`op_types`) from one load of the program."""
    prog = _load_program(path_or_model)
    found: dict = {}
    ops: collections.Counter = collections.Counter()
    for f in prog.functions.values():
        for op in _operations(f):
            ops[op.op_type] += 1
            if op.op_type != "constexpr_lut_to_dense":
                continue
            lut_op, scale = op.lut.op, None
            if lut_op.op_type == "constexpr_blockwise_shift_scale":
                lut, scale = lut_op.data.val, lut_op.scale.val
            else:
                lut = op.lut.val
            found[op.name] = {
                "lut": np.asarray(lut).reshape(np.asarray(lut).shape[0], -1),
                "indices": np.asarray(op.indices.val),
                "scale": None if scale is None else np.asarray(scale).reshape(-1),
            }
    return found, ops


def find_lut(luts: dict, module_name: str) -> dict:
    """The entry of :func:`read_luts` for the torch linear ``module_name`` of the exported model
    (e.g. ``"model.layers.0.self_attn.q_proj"``)."""
    key = "model_" + module_name.replace(".", "_") + "_weight"
    hits = [v for name, v in luts.items() if name.startswith(key)]
    if len(hits) != 1:
        raise QtutorError(f"{len(hits)} palettized weights in the package match {module_name!r}")
    return hits[0]


@dataclass
class PackageCheck:
    """What :func:`check_package` found: ``layers`` palettized layers in the model, ``stored``
    palettized weights in the package, and for each of "palettes", "scales" and "indices" the
    names of the layers where the package does NOT hold exactly ours (empty lists: all equal)."""

    layers: int
    stored: int
    mismatches: dict = field(default_factory=dict)
    ops: collections.Counter = field(default_factory=collections.Counter)  # the program's op_types

    @property
    def ok(self) -> bool:
        return self.layers == self.stored and not any(self.mismatches.values())

    def __str__(self) -> str:
        lines = [f"{self.stored} palettized weights in the package, {self.layers} PalettizedLinear layers in the model"]
        for what, bad in self.mismatches.items():
            lines.append(
                f"  {what:8s} identical in {self.layers - len(bad)} of {self.layers} layers"
                + (f" (differ: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})" if bad else "")
            )
        return "\n".join(lines)


def check_package(path_or_model, model: nn.Module) -> PackageCheck:
    """Compare EVERY :class:`PalettizedLinear` of ``model`` with the weight the package holds
    for it (:func:`read_luts`): the table each row uses (``lut[r // rows_per_lut]``, (out, 2^b)),
    the per-row scales (out,) and the indices (out, in) must be identical, bit for bit, in float16
    and as integers. The package must hold one palettized weight per layer. ``model`` is the
    model that was exported (any device). The check also counts the program's operations
    (``ops``, as :func:`op_types`), from the same read of the package."""
    luts, ops = _read_program(path_or_model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PalettizedLinear)]
    bad: dict = {"palettes": [], "scales": [], "indices": []}
    for name, m in layers:
        entry = find_lut(luts, name)
        q = m.unpacked()
        stored = torch.from_numpy(np.asarray(entry["lut"], dtype=np.float16))
        if m.out_features % stored.shape[0] or not torch.equal(
            stored.repeat_interleave(m.out_features // stored.shape[0], dim=0), q.row_luts().cpu()
        ):
            bad["palettes"].append(name)
        if m.scales is None:
            same_scales = entry["scale"] is None
        else:
            same_scales = entry["scale"] is not None and torch.equal(
                torch.from_numpy(np.asarray(entry["scale"], dtype=np.float16)), m.scales.cpu()
            )
        if not same_scales:
            bad["scales"].append(name)
        if not torch.equal(torch.from_numpy(entry["indices"].astype(np.int64)), q.indices.cpu().long()):
            bad["indices"].append(name)
    return PackageCheck(len(layers), len(luts), bad, ops)


def states_of(path_or_model) -> dict:
    """{state name: shape} of a package's Core ML states (empty for a stateless model)."""
    spec = _mlmodel(path_or_model).get_spec()
    return {s.name: tuple(s.type.stateType.arrayType.shape) for s in spec.description.state}


def op_types(path_or_model) -> collections.Counter:
    """How many operations of each type the package's MIL program holds (e.g.
    ``constexpr_lut_to_dense``, ``read_state``, ``coreml_update_state``)."""
    return _read_program(path_or_model)[1]


# ---------------------------------------------------------------------------- running (macOS)
def _needs_macos():
    if sys.platform != "darwin":
        raise QtutorError(
            f"Core ML prediction runs only on macOS (this is {sys.platform}); "
            f"the .mlpackage itself was built and can be copied to a Mac"
        )


def _ids(input_ids) -> np.ndarray:
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.cpu()
    return np.asarray(input_ids, dtype=np.int32).reshape(1, -1)


def predict(path_or_model, input_ids) -> np.ndarray:
    """Logits (1, seqlen, vocab) of a :func:`export_mlpackage` model for ``input_ids``
    (1, seqlen). macOS only."""
    _needs_macos()
    mlmodel = _mlmodel(path_or_model, load=True)
    return mlmodel.predict({"input_ids": _ids(input_ids)})["logits"]


def generate(path_or_model, input_ids, new_tokens: int) -> list:
    """Greedy continuation (``new_tokens`` ids) of ``input_ids`` (1, P) with a
    :func:`export_stateful_mlpackage` model: one prediction for the prompt, then one per token,
    the KV cache living in a fresh Core ML state. macOS 15+ only."""
    _needs_macos()
    mlmodel = _mlmodel(path_or_model, load=True)
    state = mlmodel.make_state()
    ids = _ids(input_ids)
    past, out = 0, []
    for _ in range(new_tokens):
        logits = mlmodel.predict({"input_ids": ids, "causal_mask": causal_mask(past, ids.shape[1])}, state=state)[
            "logits"
        ]
        past += ids.shape[1]
        nxt = int(np.argmax(logits.reshape(-1)))
        out.append(nxt)
        ids = np.array([[nxt]], dtype=np.int32)
    return out


# ---------------------------------------------------------------------------- exporting beside other work
class ExportJob:
    """Core ML exports running in child processes, started by :func:`export_in_background`.

    ``result()`` waits for every child and returns ``{kind: cost}`` for each export ("plain":
    :func:`export_mlpackage`, "stateful": :func:`export_stateful_mlpackage`), each cost a
    :class:`PeakHostMemory` measured in its child (its wall time and the child's peak resident
    memory), or raises a one-line :class:`QtutorError` with a child's error.
    """

    def __init__(self, children: list, model_file: Path):
        self.children, self.model_file = children, model_file  # children: [(process, report, log)]
        self._costs: Optional[dict] = None

    def done(self) -> bool:
        return all(process.poll() is not None for process, _, _ in self.children)

    def result(self, timeout: Optional[float] = None) -> dict:
        if self._costs is None:
            codes = [process.wait(timeout) for process, _, _ in self.children]
            self.model_file.unlink(missing_ok=True)
            costs = {}
            for code, (_, report, log) in zip(codes, self.children):
                try:
                    found = json.loads(report.read_text())
                except (OSError, ValueError):
                    found = {"error": f"the export process exited with code {code} without a report"}
                if "error" in found:
                    raise QtutorError(f"Core ML export failed: {found['error']} (its log: {log})")
                costs.update({kind: PeakHostMemory.from_dict(cost) for kind, cost in found["costs"].items()})
            self._costs = costs
        return self._costs


def _side_by_side() -> bool:
    """Room for one export process per package: at least 4 cores and 16 GiB of memory available
    (each child peaks at about 5 GiB for Qwen2-0.5B); a Colab CPU runtime (2 cores) has neither."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(next(line for line in meminfo.splitlines() if line.startswith("MemAvailable")).split()[1])
    except (OSError, StopIteration, ValueError):
        return False
    return (os.cpu_count() or 1) >= 4 and available * 1024 >= 16 * 2**30


def export_in_background(
    model: nn.Module,
    plain: Union[str, Path, None] = None,
    stateful: Union[str, Path, None] = None,
    seqlen: int = 32,
    max_len: int = 256,
    threads: Optional[int] = None,
    side_by_side: Optional[bool] = None,
) -> ExportJob:
    """Start :func:`export_mlpackage` (to ``plain``) and :func:`export_stateful_mlpackage` (to
    ``stateful``) of ``model`` in child Python processes, and return at once.

    A conversion is CPU work (tracing and coremltools' passes, mostly single-threaded Python), so
    on a machine whose GPU is busy with something else the two can overlap. The model is saved
    with ``torch.save`` to a temporary folder (which also holds the children's logs) and loaded
    by each child on the CPU; ``threads`` caps each child's CPU threads (None: torch's default).
    ``side_by_side``: one child per package, running at the same time (None: when the machine
    has at least 4 cores and 16 GiB available), else one child exporting them one after the
    other. Bad paths fail here, before a child starts.
    """
    import subprocess
    import tempfile

    _coremltools()
    targets = {kind: _check_path(p) for kind, p in (("plain", plain), ("stateful", stateful)) if p is not None}
    if not targets:
        raise QtutorError("nothing to export: give plain=PATH and/or stateful=PATH (.mlpackage)")
    folder = Path(tempfile.mkdtemp(prefix="qtutor-export-"))
    model_file = folder / "model.pt"
    torch.save(model, model_file)
    env = dict(os.environ, TQDM_DISABLE="1", COREMLTOOLS_OPTIMIZE_TORCH_LOG_LEVEL="error")
    if threads:
        env.update({v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    side_by_side = _side_by_side() if side_by_side is None else side_by_side
    batches = [[kind] for kind in targets] if side_by_side else [list(targets)]
    children = []
    for kinds in batches:
        tag = "-".join(kinds)
        report, log = folder / f"report-{tag}.json", folder / f"export-{tag}.log"
        args = [sys.executable, "-m", "qtutor.coreml", str(model_file), str(report), str(seqlen), str(max_len)]
        args += [f"{kind}={targets[kind]}" for kind in kinds]
        with open(log, "w") as out:
            children.append((subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env), report, log))
    return ExportJob(children, model_file)


def _export_child(argv: list) -> int:
    """``python -m qtutor.coreml MODEL.pt REPORT.json SEQLEN MAX_LEN kind=PATH ...``: the child
    of :func:`export_in_background`. Writes ``{"costs": {kind: cost}}`` or ``{"error": line}``."""
    import logging

    model_file, report = Path(argv[0]), Path(argv[1])
    seqlen, max_len = int(argv[2]), int(argv[3])
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    costs = {}
    try:
        model = torch.load(model_file, map_location="cpu", weights_only=False)  # the parent deletes the file
        for item in argv[4:]:
            kind, path = item.split("=", 1)
            with PeakHostMemory() as cost:
                if kind == "plain":
                    export_mlpackage(model, path, seqlen=seqlen)
                else:
                    export_stateful_mlpackage(model, path, max_len=max_len)
            costs[kind] = cost.as_dict()
        report.write_text(json.dumps({"costs": costs}))
        return 0
    except Exception as err:  # noqa: BLE001 - reported to the parent as one line
        report.write_text(
            json.dumps({"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})
        )
        raise


if __name__ == "__main__":
    sys.exit(_export_child(sys.argv[1:]))
