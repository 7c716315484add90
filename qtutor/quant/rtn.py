"""Round-to-nearest (RTN) uniform quantization, per output channel or group-wise (chapter 1).

A b-bit uniform quantizer maps a real weight ``w`` to an integer code
``q = clamp(round(w / s) + z, 0, 2^b - 1)`` and back to ``s * (q - z)``.

* asymmetric (``sym=False``, the GPTQ/AWQ default): the range ``[min(w, 0), max(w, 0)]`` of a
  group is spread over all ``2^b`` codes: ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``
  (IST-DASLab/gptq ``quant.Quantizer.find_params``);
* symmetric (``sym=True``): ``s = max|w| / (2^(b-1) - 1)`` and ``z = 2^(b-1)``, so zero is exact
  and no zero point is stored (the INT8 convention of LLM.int8() and SmoothQuant).

Every weight satisfies ``|w - s (q - z)| <= s / 2``. Scales are stored in fp16, rounded *up*
(:func:`fp16_round_up`), and the codes are computed with the stored scale, so the bound holds for
what is stored (rounding to nearest could shrink the scale and let the clamp cut extreme weights).
``group_size`` consecutive input columns share one (s, z); ``group_size=0`` means one pair per
output channel. When ``group_size`` does not divide the input width the last group is shorter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import QtutorError
from .base import FloatLinear, Method, QuantConfig, QuantizedLinear, pack_codes, register, unpack_codes

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class UniformGridConfig(QuantConfig):
    """A uniform b-bit grid, as RTN, GPTQ and AWQ use it (one validation for the three).

    bits: 2, 3, 4 or 8; group_size: input columns per scale (0 = per output channel);
    sym: a symmetric grid (no zero points)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_uniform_grid(self.bits, self.group_size)


@dataclass(frozen=True)
class RTNConfig(UniformGridConfig):
    """Round-to-nearest on a uniform grid (chapter 1): the fields of :class:`UniformGridConfig`."""


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QtutorError(
            f"{bits}-bit uniform quantization is not supported; choose bits from {', '.join(map(str, SUPPORTED_BITS))}"
        )


def check_uniform_grid(bits: int, group_size: int) -> None:
    """The checks RTN, GPTQ and AWQ share: supported bits, a group size of 0 or more."""
    check_bits(bits)
    if group_size < 0:
        raise QtutorError(
            f"group size {group_size} is negative; use 0 for one scale "
            f"per output channel or a positive number of input columns"
        )


def group_layout(in_features: int, group_size: int) -> tuple[int, int]:
    """(columns per group, number of groups); ``group_size=0`` is one group per row."""
    gs = in_features if group_size in (0, None) or group_size >= in_features else group_size
    return gs, -(-in_features // gs)


def find_params(W: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``W`` (rows, cols): two (rows,) float tensors.

    The scale is rounded to fp16 (what is stored); the zero point is an integer.
    """
    maxq = 2**bits - 1
    xmin = W.min(dim=1).values.clamp(max=0)
    xmax = W.max(dim=1).values.clamp(min=0)
    if sym:
        absmax = torch.maximum(-xmin, xmax)
        scale = absmax / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows
    scale = fp16_round_up(scale.clamp(min=1e-6))
    if not sym:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= ``x`` (as float32). A scale rounded *up* keeps every weight of
    the group inside the grid, so the stored scale still satisfies ``|w - w_hat| <= s / 2``;
    rounding to nearest could shrink it and let the clamp cut the extreme weights."""
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h).float()


def quantize_codes(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(W / s) + z, 0, 2^b - 1)``; ``scale``/``zero`` broadcast to ``W``."""
    return torch.clamp(torch.round(W / scale) + zero, 0, 2**bits - 1)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


@dataclass
class UniformWeight:
    """A quantized weight before packing: what RTN and GPTQ return.

    codes: (out, in) uint8; scales: (out, n_groups) fp16; zeros: (out, n_groups) uint8 or None
    when symmetric (the zero point is then ``2^(bits-1)``).
    g_idx: None (group ``j`` is input columns ``[j*gs, (j+1)*gs)``) or an (in,) integer tensor
    giving each input column's group, for groups that are not contiguous (GPTQ with act-order,
    as AutoGPTQ's ``g_idx``).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int
    g_idx: Optional[torch.Tensor] = None

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32 weight."""
        in_features = self.codes.shape[1]
        if self.g_idx is not None:

            def expand(t):
                return t.float()[:, self.g_idx.long()]
        else:
            gs, _ = group_layout(in_features, self.group_size)

            def expand(t):
                return t.float().repeat_interleave(gs, dim=1)[:, :in_features]

        s = expand(self.scales)
        if self.zeros is None:
            z = 2.0 ** (self.bits - 1)  # a Python number: no host-to-device copy
        else:
            z = expand(self.zeros)
        return dequantize_codes(self.codes.float(), s, z)


def _round_groups(W: torch.Tensor, cfg: UniformGridConfig):
    """``W`` (out, in) in float32, cut into groups of ``gs`` input columns (the last padded with
    zeros, which never widen ``[min(w, 0), max(w, 0)]``) and rounded to each group's grid ->
    (codes (out * n_groups, gs), scale (out * n_groups,), zero (out * n_groups,), n_groups)."""
    W = W.float()
    out_features, in_features = W.shape
    gs, n_groups = group_layout(in_features, cfg.group_size)
    Wg = torch.nn.functional.pad(W, (0, n_groups * gs - in_features)).reshape(out_features * n_groups, gs)
    scale, zero = find_params(Wg, cfg.bits, cfg.sym)
    return quantize_codes(Wg, scale[:, None], zero[:, None], cfg.bits), scale, zero, n_groups


def fake_quantize(W: torch.Tensor, cfg: UniformGridConfig) -> torch.Tensor:
    """``Q(W)``: ``W`` (out, in) rounded to its grid and dequantized, float32 (out, in), without
    packing: exactly ``quantize_weight(W, cfg).dequantize()``, what ``UniformLinear`` stores.
    AWQ's searches use it (the references' ``pseudo_quantize_tensor``)."""
    out_features, in_features = W.shape
    codes, scale, zero, n_groups = _round_groups(W, cfg)
    Wq = dequantize_codes(codes, scale[:, None], zero[:, None])
    return Wq.reshape(out_features, -1)[:, :in_features]


def quantize_weight(W: torch.Tensor, cfg: UniformGridConfig) -> UniformWeight:
    """Round-to-nearest quantization of ``W`` (out, in), group by group (chapter 1)."""
    out_features, in_features = W.shape
    codes, scale, zero, n_groups = _round_groups(W, cfg)
    codes = codes.reshape(out_features, -1)[:, :in_features]
    return UniformWeight(
        codes=codes.to(torch.uint8),
        scales=scale.reshape(out_features, n_groups).half(),
        zeros=None if cfg.sym else zero.reshape(out_features, n_groups).to(torch.uint8),
        bits=cfg.bits,
        group_size=cfg.group_size,
    )


class UniformLinear(QuantizedLinear):
    """A linear layer with b-bit uniform codes packed ``8/b`` per byte, fp16 scales and packed
    integer zero points (absent when symmetric), and GPTQ act-order's per-column group index
    ``g_idx`` when present (int16, or int32 past 32767 groups; counted in the bits per weight).
    Used by RTN, GPTQ and AWQ."""

    def __init__(self, q: UniformWeight, bias: Optional[torch.Tensor] = None):
        out_features, in_features = q.codes.shape
        super().__init__(in_features, out_features, bias)
        self.bits, self.group_size = q.bits, q.group_size
        self.n_groups = q.scales.shape[1]
        self.register_buffer("qweight", pack_codes(q.codes, q.bits))
        self.register_buffer("scales", q.scales.half().contiguous())
        self.register_buffer("qzeros", None if q.zeros is None else pack_codes(q.zeros, q.bits))
        g_dtype = torch.int16 if self.n_groups <= 2**15 else torch.int32
        self.register_buffer("g_idx", None if q.g_idx is None else q.g_idx.to(g_dtype).contiguous())

    @classmethod
    def from_float(cls, linear: nn.Linear, cfg: RTNConfig) -> "UniformLinear":
        return cls(quantize_weight(linear.weight.data, cfg), linear.bias)

    def unpacked(self, rows: Optional[torch.Tensor] = None) -> UniformWeight:
        """The weight before packing; with ``rows`` (n,) only those output rows."""

        def take(t):
            return t if rows is None else t[rows]

        zeros = None if self.qzeros is None else unpack_codes(take(self.qzeros), self.bits, self.n_groups)
        return UniformWeight(
            unpack_codes(take(self.qweight), self.bits, self.in_features),
            take(self.scales),
            zeros,
            self.bits,
            self.group_size,
            self.g_idx,
        )

    def dequantize(self) -> torch.Tensor:
        return self.unpacked().dequantize()

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.unpacked(rows).dequantize()


register(
    Method(
        "fp16_baseline",
        None,
        "weights stored in fp16, no quantization",
        from_float=FloatLinear.from_float,
        no_head="fp16_baseline is the unquantized reference: its embedding and lm_head keep the model's dtype",
    )
)
for _name, _cfg, _summary, _overrides in (
    ("rtn_int8", RTNConfig(bits=8, group_size=0, sym=True),
     "round-to-nearest INT8, symmetric, one scale per output channel", ("group_size", "sym")),
    ("rtn_int4", RTNConfig(bits=4, group_size=128, sym=False),
     "round-to-nearest INT4, asymmetric, groups of 128 input columns", ("bits", "group_size", "sym")),
):  # fmt: skip
    register(Method(_name, _cfg, _summary, from_float=UniformLinear.from_float, overrides=_overrides))
