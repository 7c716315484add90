"""QLoRA's 4-bit NormalFloat (NF4) with double quantization (chapter on NF4).

NF4 (Dettmers et al., *QLoRA*, 2023, section 3 and appendix E) is a 16-entry codebook, not an
integer grid: the levels are quantiles of a standard normal, rescaled to [-1, 1], so that a
normally distributed weight lands in each of the 16 bins with (roughly) equal probability.

Storage follows bitsandbytes' ``quantize_4bit(W, blocksize=64, quant_type="nf4",
compress_statistics=True)`` (the layout QLoRA fine-tuning and ``load_in_4bit`` use):

* the weight is flattened row-major and cut into blocks of ``block_size`` (64) consecutive
  values; each block stores its absmax ``a``;
* each value gets the code of the nearest level to ``w / a`` (computed, as bitsandbytes does, as
  ``clamp(w * (1/a), -1, 1)`` bucketed by the midpoints between levels; a value exactly on a
  midpoint takes the lower level);
* two codes per byte, the FIRST code of a pair in the HIGH nibble (bitsandbytes' order, the
  opposite of :func:`qtutor.quant.base.pack_codes`);
* double quantization (QLoRA section 3, "Double Quantization"): the fp32 absmaxes are centred by
  their mean ``offset`` and quantized with bitsandbytes' signed 8-bit *dynamic* map
  (:func:`dynamic_map`) in blocks of 256, each with an fp32 second-level absmax.

Bits per weight, from what is stored: 4 (codes) + 8/64 (uint8 absmax codes) + 32/(64*256) (fp32
second-level scales) = 4.127, plus one fp32 offset per tensor. Without double quantization the
absmaxes are fp32: 4 + 32/64 = 4.5.

The two codebooks are constants of the format (like the bit layout of fp16), so layers do not
store them. The 4-bit codes are chosen with the full-precision absmax; double quantization only
changes what the absmax dequantizes to (as in bitsandbytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional


import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QtutorError
from .base import Method, QuantConfig, QuantizedLinear, register

#: the offset of QLoRA appendix E: the mean of 1 - 1/(2*15) and 1 - 1/(2*16)
NF4_OFFSET = 0.9677083
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class NF4Config(QuantConfig):
    """block_size: consecutive weights per absmax (64); double_quant: quantize the absmaxes with
    the 8-bit dynamic map in blocks of ``double_quant_block_size`` (256).

    compute_dtype: the dtype the forward dequantizes to and multiplies in. ``None`` (the default)
    means bfloat16 when the layer runs on a GPU (QLoRA's setting) and float32 on CPU, where
    bfloat16 matmuls are slow on most processors and lose accuracy for nothing.

    The defaults are bitsandbytes' ``quantize_4bit(blocksize=64, compress_statistics=True)``, the
    layout QLoRA fine-tunes on; measured beside it (``benchmarks/peers_stories260k.csv``:
    stories260K, the whole WikiText-2 test): 136.602 against bitsandbytes' 136.601 (float 122.334).
    """

    block_size: int = 64
    double_quant: bool = True
    double_quant_block_size: int = 256
    compute_dtype: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("block_size", "double_quant_block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise QtutorError(f"NF4 {name} must be a positive number of weights, got {v!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise QtutorError(
                f"NF4 compute_dtype {self.compute_dtype!r} is not supported; choose "
                f"from {', '.join(COMPUTE_DTYPES)} or None (bfloat16 on GPU, "
                f"float32 on CPU)"
            )


# --------------------------------------------------------------------------- codebooks
@lru_cache(maxsize=None)
def _nf4_levels(offset: float, use_extra_value: bool) -> torch.Tensor:
    # bitsandbytes.functional.create_normal_map: quantile points from torch.linspace (float32),
    # the normal inverse CDF in float64, then float32 values sorted and divided by the largest.
    def ppf(n):
        return torch.special.ndtri(torch.linspace(offset, 0.5, n)[:-1].double())

    pos = ppf(9) if use_extra_value else ppf(8)  # 8 (or 7) positive levels
    neg = -ppf(8)  # 7 negative levels
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return v / v.max()


def nf4_levels(offset: float = NF4_OFFSET, use_extra_value: bool = True) -> torch.Tensor:
    """The 16 NormalFloat levels in [-1, 1], ascending, with an exact zero (QLoRA appendix E).

    The positive half is 8 quantiles of N(0, 1) at probabilities evenly spaced from ``offset``
    down to (not including) 0.5, the negative half 7 such quantiles, plus 0: asymmetric, so that
    zero is a level and both -1 and 1 are. ``offset`` (0.9677083) keeps the extreme quantile
    finite. Built the way bitsandbytes' ``create_normal_map`` does, in float32.
    """
    return _nf4_levels(float(offset), bool(use_extra_value)).clone()


@lru_cache(maxsize=None)
def _dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic quantization map (Dettmers, *8-bit approximations for
    parallelism in deep learning*, 2016), as ``create_dynamic_map`` builds it: 256 sorted values.

    A code is a sign, a unary exponent (the number of leading zeros ``e``) and a linear fraction in
    the remaining bits: value ``+-10^-e * fraction``, the fraction being the midpoints of an even
    split of [0.1, 1]. Small magnitudes get few fraction bits but many decades of range, which
    suits statistics spread over orders of magnitude. The signed map runs from -0.993 to 1.0 and
    contains 0.
    """
    return _dynamic_map(bool(signed), int(max_exponent_bits), int(total_bits)).clone()


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``code`` (ties go to the lower entry), as
    bitsandbytes' reference PyTorch kernels compute it: ``bucketize`` on the float32 midpoints."""
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x, bounds.to(x.device)).to(torch.uint8)


def _blockwise_absmax(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled values in [-1, 1], fp32 absmax per block) for a flat fp32 tensor; the last block may
    be shorter. ``scaled = clamp(x * (1 / absmax), -1, 1)`` (``x / absmax`` in a shorter last
    block): bitsandbytes' float arithmetic, to the last bit."""
    n = flat.numel()
    n_blocks = -(-n // block)
    padded = F.pad(flat, (0, n_blocks * block - n)).reshape(n_blocks, block)
    absmax = padded.abs().amax(1)
    scaled = torch.clamp(padded * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:n]
    full = n - n % block
    if full < n:
        scaled[full:] = torch.clamp(flat[full:] / absmax[-1].clamp(min=1e-38), -1, 1)
    return scaled, absmax


def _expand(per_block: torch.Tensor, block: int, n: int) -> torch.Tensor:
    return per_block.repeat_interleave(block)[:n]


# --------------------------------------------------------------------------- packing
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Flat 4-bit codes -> bytes, bitsandbytes' order: ``byte = code[2i] << 4 | code[2i+1]``
    (an odd count is padded with a zero code)."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = F.pad(c, (0, 1))
    return (c[0::2] << 4) | c[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``n`` codes, uint8."""
    out = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    return out[:n]


# --------------------------------------------------------------------------- the method
@dataclass
class NF4Weight:
    """A weight in bitsandbytes' NF4 layout.

    qweight: (ceil(n/2),) uint8, two codes per byte (first code in the high nibble);
    absmax: (n_blocks,) fp32 when not double-quantized, else uint8 codes of ``absmax - offset``
    in the dynamic map; absmax2: (ceil(n_blocks / dq_block),) fp32 second-level absmax, or None;
    offset: () fp32 mean of the absmaxes (bitsandbytes), or None. A stacked layer (q, k and v
    as one, :func:`qtutor.runtime.kernels.fuse_rows`) keeps each part's own mean: there
    ``offset`` holds one value per second-level block, shaped like ``absmax2``.
    """

    qweight: torch.Tensor
    absmax: torch.Tensor
    absmax2: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    shape: tuple
    block_size: int
    double_quant_block_size: int

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def codes(self) -> torch.Tensor:
        """(n,) uint8 4-bit codes in row-major order."""
        return unpack_nibbles(self.qweight, self.numel)

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of each 64-block, dequantized from the second level if needed."""
        if self.absmax2 is None:
            return self.absmax.float()
        code = _table("dynamic", self.absmax.device)
        n, dq = self.absmax.numel(), self.double_quant_block_size
        scale = _expand(self.absmax2.float(), dq, n)
        offset = self.offset.float()
        return code[self.absmax.long()] * scale + (offset if offset.dim() == 0 else _expand(offset, dq, n))

    def dequantize(self) -> torch.Tensor:
        """The weight in float32, shaped ``shape``: ``level[code] * absmax`` of its block."""
        levels = _table("nf4", self.qweight.device)
        values = levels.index_select(0, self.codes().int())
        absmax = self.block_absmax()
        if self.numel % self.block_size == 0:  # the usual case: scale whole blocks, no expansion
            return (values.view(-1, self.block_size) * absmax[:, None]).reshape(self.shape)
        return (values * _expand(absmax, self.block_size, self.numel)).reshape(self.shape)


@lru_cache(maxsize=None)
def _cached_table(name: str, device: str) -> torch.Tensor:
    return (nf4_levels() if name == "nf4" else dynamic_map()).to(device)


def _table(name: str, device) -> torch.Tensor:
    """The NF4 levels or the dynamic map on ``device``, built once per device (so that no
    host-to-device copy happens inside a captured CUDA graph)."""
    return _cached_table(name, str(torch.device(device)))


def quantize_weight(W: torch.Tensor, cfg: NF4Config = NF4Config()) -> NF4Weight:
    """NF4-quantize ``W`` (any shape; flattened row-major), as bitsandbytes' ``quantize_4bit``."""
    flat = W.detach().float().reshape(-1)
    scaled, absmax = _blockwise_absmax(flat, cfg.block_size)
    codes = _nearest_code(scaled, _table("nf4", flat.device))
    absmax2 = offset = None
    if cfg.double_quant:
        offset = absmax.mean()
        scaled2, absmax2 = _blockwise_absmax(absmax - offset, cfg.double_quant_block_size)
        absmax = _nearest_code(scaled2, _table("dynamic", flat.device))
    return NF4Weight(
        pack_nibbles(codes), absmax, absmax2, offset, tuple(W.shape), cfg.block_size, cfg.double_quant_block_size
    )


class NF4Linear(QuantizedLinear):
    """A linear layer stored as NF4 codes with (double-quantized) block absmaxes.

    Buffers: ``qweight`` (packed codes), ``absmax`` (uint8 codes, or fp32 without double
    quantization), ``absmax2`` (fp32 second-level scales) and ``offset`` (fp32), as bitsandbytes'
    ``Params4bit`` + ``QuantState`` hold them. The forward dequantizes to the compute dtype and
    multiplies there (QLoRA's "storage in NF4, compute in BF16").
    """

    def __init__(self, q: NF4Weight, bias: Optional[torch.Tensor] = None, compute_dtype: Optional[str] = None):
        out_features, in_features = q.shape
        super().__init__(in_features, out_features, bias)
        self.block_size = q.block_size
        self.double_quant_block_size = q.double_quant_block_size
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", q.qweight)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("absmax2", q.absmax2)
        offset = q.offset
        if offset is not None:
            offset = (offset.reshape(()) if offset.numel() == 1 else offset).float()
        self.register_buffer("offset", offset)

    @property
    def row_unit(self) -> int:
        """Rows stack (:func:`qtutor.runtime.kernels.fuse_rows`) in multiples that end on a whole
        block and, with double quantization, on a whole second-level block of the flat codes."""
        span = self.block_size * (self.double_quant_block_size if self.absmax2 is not None else 1)
        return span // math.gcd(self.in_features, span)

    def row_buffers(self) -> dict:
        """The buffers as they stack along rows: the scalar ``offset`` of double quantization
        repeated once per second-level block (each part of a stacked layer keeps its own)."""
        buffers = dict(self._buffers)
        if self.offset is not None and self.offset.dim() == 0:
            buffers["offset"] = self.offset.expand(self.absmax2.numel()).contiguous()
        return buffers

    @classmethod
    def from_float(cls, linear: nn.Linear, cfg: NF4Config = NF4Config()) -> "NF4Linear":
        return cls(quantize_weight(linear.weight.data, cfg), linear.bias, cfg.compute_dtype)

    def unpacked(self) -> NF4Weight:
        return NF4Weight(
            self.qweight,
            self.absmax,
            self.absmax2,
            self.offset,
            (self.out_features, self.in_features),
            self.block_size,
            self.double_quant_block_size,
        )

    def dequantize(self) -> torch.Tensor:
        return self.unpacked().dequantize()

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, in) float32: rows ``rows`` of :meth:`dequantize`, reading only their codes and the
        absmax of their blocks (blocks run over the flattened weight, row-major)."""
        pos = (rows.long()[:, None] * self.in_features + torch.arange(self.in_features, device=rows.device)).reshape(-1)
        byte = self.qweight[pos // 2]
        codes = torch.where(pos % 2 == 0, byte >> 4, byte & 0x0F)  # the first code of a byte is high
        values = _table("nf4", self.qweight.device).index_select(0, codes.int())
        blocks = pos // self.block_size
        if self.absmax2 is None:
            absmax = self.absmax.float()[blocks]
        else:
            code = _table("dynamic", self.absmax.device)
            second = blocks // self.double_quant_block_size
            absmax = code[self.absmax[blocks].long()] * self.absmax2.float()[second]
            offset = self.offset.float()
            absmax = absmax + (offset if offset.dim() == 0 else offset[second])
        return (values * absmax).reshape(-1, self.in_features)

    def resolved_compute_dtype(self, device: torch.device) -> torch.dtype:
        """The configured compute dtype, or bfloat16 on GPU / float32 on CPU."""
        if self.compute_dtype is not None:
            return COMPUTE_DTYPES[self.compute_dtype]
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.resolved_compute_dtype(x.device)
        b = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantize().to(dtype), b).to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block_size={self.block_size}, double_quant={self.absmax2 is not None}"


register(
    Method(
        "qlora_nf4",
        NF4Config(),
        "QLoRA NF4: normal-quantile 4-bit codebook, blocks of 64, double-quantized absmax",
        from_float=NF4Linear.from_float,
    )
)
