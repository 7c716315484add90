"""Shared pieces of every quantization method (book chapter 0 and 1).

* ``QuantConfig``: the base of the frozen per-method configs.
* ``pack_codes`` / ``unpack_codes``: real packed storage of b-bit integer codes.
* ``QuantizedLinear``: the base layer. Subclasses store a packed weight and implement
  ``dequantize()``; the reference forward is ``F.linear(x, self.dequantize(), bias)``.
  ``weight_nbytes`` counts what is stored for the weight, so bits per weight are measured,
  not typed in.
* ``QuantizedEmbedding``: the token embedding of a model whose quantized lm_head is tied to it;
  a lookup gathers the requested rows from the head's packed storage
  (:meth:`QuantizedLinear.dequantize_rows`), so the packed bytes serve both and are stored once.
* The method registry: benchmark name -> (default config, how to apply it; how to quantize the
  lm_head with the method's own format, ``qtutor.quantize(..., head=True)``).

Notation as in the papers: ``W`` is (out_features, in_features), ``X`` is (tokens, in_features).
"""

from __future__ import annotations

from contextlib import contextmanager

import math
import numbers
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QtutorError


@dataclass(frozen=True)
class QuantConfig:
    """Base class of the method configs. Subclasses add their own fields.

    Every field is type-checked against its annotation when a config is made (``bits=4.0``,
    ``group_size=2.5`` or ``sym="no"`` are refused with a one-line :class:`QtutorError`);
    subclasses check their own ranges in ``__post_init__`` after calling this one.
    """

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = _typed_value(type(self).__name__, f, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)

    def replace(self, **overrides) -> "QuantConfig":
        """A copy with ``overrides`` applied (``None`` keeps a field as it is). A key the config
        does not have is a one-line :class:`QtutorError`: a typo must not do nothing."""
        names = [f.name for f in fields(self)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise QtutorError(
                f"{type(self).__name__} has no field {', '.join(map(repr, unknown))}; its fields are {', '.join(names)}"
            )
        kept = {k: v for k, v in overrides.items() if v is not None}
        return type(self)(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **kept})


#: the field types configs check: type -> (accepts(value), what to pass)
_FIELD_KINDS = {
    bool: (lambda v: isinstance(v, bool), "True or False"),
    int: (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _typed_value(cls: str, f, hint, value):
    """``value`` as the plain Python type of the field's annotation (bool, int, float or str,
    optionally ``None``), or a one-line :class:`QtutorError` naming the field and what to pass."""
    args = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    if value is None and type(None) in args:
        return None
    kind = next((a for a in args if a is not type(None)), hint)
    if kind not in _FIELD_KINDS:
        return value  # a type this check does not know: left to the method's own checks
    accepts, wanted = _FIELD_KINDS[kind]
    if accepts(value):
        return kind(value)  # numpy integers become ints, integers of float fields floats
    example = f.default if f.default is not MISSING and f.default is not None else None
    such_as = f", e.g. {f.name}={example!r}" if example is not None else ""
    raise QtutorError(f"{cls}({f.name}={value!r}): {f.name} must be {wanted}{such_as}")


# --------------------------------------------------------------------------- packing
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integer codes along the last dimension into bytes.

    Every 8 consecutive codes become ``bits`` bytes, little-endian: code ``i`` of a run of 8
    occupies bits ``[bits*i, bits*(i+1))``. For 4 bits this is the usual layout, two codes per
    byte with the first code in the low nibble. The last dimension is zero-padded to a
    multiple of 8 codes; ``unpack_codes`` needs the original length.

    codes: (..., n) integer tensor with values in [0, 2**bits). Returns (..., ceil(n*bits/8)) uint8.
    """
    if not 1 <= bits <= 8:
        raise QtutorError(f"cannot pack {bits}-bit codes: bits must be between 1 and 8")
    *lead, n = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise QtutorError(f"codes out of range for {bits} bits: values must lie in [0, {2**bits - 1}]")
    pad = (-n) % 8
    if pad:
        c = F.pad(c, (0, pad))
    if 8 % bits == 0:  # whole codes per byte (1, 2, 4, 8 bits): cheap uint8 arithmetic
        per_byte = 8 // bits
        c = c.to(torch.uint8).reshape(*lead, -1, per_byte)
        shifts = torch.arange(per_byte, device=c.device, dtype=torch.uint8) * bits
        packed = (c << shifts).sum(-1, dtype=torch.uint8)
        return packed[..., : math.ceil(n * bits / 8)].contiguous()
    c = c.reshape(*lead, -1, 8)
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # 8*bits <= 64 bits per run
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    packed = ((word >> byte_shifts) & 0xFF).to(torch.uint8)
    return packed.reshape(*lead, -1)[..., : math.ceil(n * bits / 8)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (..., ceil(n*bits/8)) uint8 -> (..., n) uint8 codes."""
    *lead, nbytes = packed.shape
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(*lead, -1)[..., :n]
    full = math.ceil(n / 8) * bits
    p = F.pad(packed.to(torch.int64), (0, full - nbytes)).reshape(*lead, -1, bits)
    byte_shifts = torch.arange(bits, device=p.device, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, device=p.device, dtype=torch.int64) * bits
    codes = ((word >> shifts) & (2**bits - 1)).to(torch.uint8)
    return codes.reshape(*lead, -1)[..., :n]


# --------------------------------------------------------------------------- layers
class QuantizedLinear(nn.Module):
    """Base of the quantized linear layers (``UniformLinear``, ``PalettizedLinear``, ...).

    Subclasses register their packed storage as buffers and implement :meth:`dequantize`,
    which returns the (out_features, in_features) weight the layer represents. Everything
    the layer stores is a buffer, so ``.to(device)`` moves it and memory accounting sees it.
    """

    #: buffer names that are not part of the weight (excluded from bits per weight)
    non_weight_buffers = ("bias",)

    @property
    def row_unit(self) -> int:
        """Rows stack only in whole multiples of this (e.g. the rows that share one LUT)."""
        return 1

    def __init__(self, in_features: int, out_features: int, bias: Optional[torch.Tensor]):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def dequantize(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (n,) int64 of the weight, (n, in_features) float32: ``dequantize()[rows]``.

        This default dequantizes the whole weight; the storage formats override it to read only
        the requested rows from their packed buffers (a tied embedding's lookup,
        :class:`QuantizedEmbedding`, reads one row per token), with the same arithmetic as
        :meth:`dequantize`, so the rows are bit-identical to ``dequantize()[rows]``."""
        return self.dequantize().float()[rows]

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`dequantize` in ``dtype``; inside :func:`dequantize_once` computed once per dtype."""
        cache = self.__dict__.get("_dequantized")
        if cache is None:
            return self.dequantize().to(dtype)
        if dtype not in cache:
            cache[dtype] = self.dequantize().to(dtype)
        return cache[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reference forward: dequantize, then an ordinary matmul in the input's dtype."""
        W = self.dequantized(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, W, b)

    @property
    def weight_nbytes(self) -> int:
        """Bytes stored for the weight: codes/indices plus scales, zeros, tables."""
        return sum(
            b.numel() * b.element_size()
            for name, b in self.named_buffers(recurse=False)
            if b is not None and name not in self.non_weight_buffers
        )

    @property
    def nbytes(self) -> int:
        """All bytes the layer holds, bias included."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False) if b is not None)

    @property
    def bits_per_weight(self) -> float:
        """8 * weight bytes / number of weights, from what is actually stored."""
        return 8.0 * self.weight_nbytes / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits_per_weight={self.bits_per_weight:.3f}"
        )


class FloatLinear(QuantizedLinear):
    """The FP16 baseline: the weight stored as fp16 (16 bits per weight, nothing else)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float16):
        super().__init__(
            linear.in_features, linear.out_features, None if linear.bias is None else linear.bias.to(dtype)
        )
        self.register_buffer("weight", linear.weight.detach().to(dtype).clone())

    @classmethod
    def from_float(cls, linear: nn.Linear, cfg=None) -> "FloatLinear":
        return cls(linear)

    def dequantize(self) -> torch.Tensor:
        return self.weight

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weight[rows].float()


class QuantizedEmbedding(nn.Module):
    """The token embedding of a model whose lm_head is a :class:`QuantizedLinear` tied to it.

    The embedding table and the head's weight are the same (vocab, hidden) matrix, so the packed
    head serves both: ``head`` is the very module that is the model's lm_head (registered here
    too, as transformers ties the two weights), and a lookup of ``ids`` (any shape) returns
    ``head.dequantize_rows(ids)`` (..., hidden) in ``dtype``, the float embedding's dtype. Only
    the requested rows are dequantized; the packed bytes are held, and counted, once.

    ``num_embeddings``, ``embedding_dim`` and ``padding_idx`` are the float embedding's. ``head``
    may also be a float ``nn.Linear`` (a dequantized copy, as Core ML export makes): its weight
    rows are then looked up as they are. The output dtype and the device follow the model
    (``model.half()``, ``model.to(device)``) through an empty buffer, which holds no bytes.
    """

    def __init__(self, head: nn.Module, dtype: torch.dtype, padding_idx: Optional[int] = None):
        super().__init__()
        self.head = head
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx = padding_idx
        device = next(iter([*head.buffers(), *head.parameters()])).device
        self.register_buffer("dtype_of_rows", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_of_rows.dtype

    @property
    def device(self) -> torch.device:
        return self.dtype_of_rows.device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if isinstance(self.head, QuantizedLinear):
            rows = self.head.dequantize_rows(flat)
        else:
            rows = F.embedding(flat, self.head.weight)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows read from the tied head ({type(self.head).__name__})"


@contextmanager
def dequantize_once(module: nn.Module):
    """Within the block, each :class:`QuantizedLinear` in ``module`` dequantizes its weight once
    (per dtype) instead of at every forward: calibration runs one decoder layer on many batches.
    The cache (a float copy of each weight) is dropped on exit."""
    layers = [m for m in module.modules() if isinstance(m, QuantizedLinear)]
    for m in layers:
        m.__dict__["_dequantized"] = {}
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop("_dequantized", None)


def replace_linear(layer: nn.Module, name: str, q: QuantizedLinear) -> float:
    """Put ``q`` in ``layer`` in place of its float linear ``name`` (on that linear's device) and
    return the weight's relative error ``||W_hat - W|| / ||W||`` against the float weight it
    replaces (for AWQ and SmoothQuant: the scaled weight, which the previous op compensates)."""
    linear = layer.get_submodule(name)
    W = linear.weight.detach().float()
    err = (q.dequantize().float().to(W.device) - W).norm() / W.norm().clamp(min=1e-12)
    layer.set_submodule(name, q.to(linear.weight.device))
    return float(err)


def replace_linears(layer: nn.Module, layout, make: Callable, stats: dict) -> dict:
    """:func:`replace_linear` for every linear of ``layer`` (``layout.linears``), each by
    ``make(linear)``; its weight error goes to ``stats[name]["weight_rel_error"]`` -> ``stats``."""
    for name, linear in layout.linears(layer).items():
        stats.setdefault(name, {})["weight_rel_error"] = replace_linear(layer, name, make(linear))
    return stats


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Method:
    """A benchmark method.

    Exactly one of ``from_float`` and ``quantize_layer`` is set:

    * ``from_float(linear, cfg) -> nn.Module`` replaces each linear independently (RTN, NF4,
      palettization); no calibration data. Such a method may add ``from_float_many(linears,
      cfg) -> list[nn.Module]``, the same result for several linears at once (palettization
      batches its k-means over them); :func:`qtutor.quantize` then hands it the linears of
      several layers at a time.
    * ``quantize_layer(layer, layout, X, layer_kwargs, cfg) -> dict`` quantizes one decoder
      layer in place from its calibration inputs ``X`` (n, seqlen, hidden) (GPTQ, AWQ,
      SmoothQuant), returning optional per-linear statistics; ``qtutor.calib`` runs the layers
      one after another, feeding each the previous quantized layer's outputs.

    ``overrides``: the fields of its config that ``qtutor bench`` may set from the command line
    (``--bits``, ``--group-size``, ``--sym``, ``--act-order``), where they make sense.

    The lm_head (``qtutor.quantize(..., head=True)``, ``qtutor bench --quantize-head``) gets the
    method's own format: ``from_float(head, cfg)`` for the methods without calibration, and
    ``quantize_head(head, X, cfg) -> QuantizedLinear`` for the calibrated ones, ``X`` (n, seqlen,
    hidden) being the head's calibration inputs (the final norm's outputs, after the quantized
    decoder layers). ``no_head``: why the method has no quantized head (None: it has one).
    """

    name: str
    default_config: Optional[QuantConfig]
    summary: str
    from_float: Optional[Callable] = None
    quantize_layer: Optional[Callable] = None
    from_float_many: Optional[Callable] = None
    overrides: tuple = ()
    quantize_head: Optional[Callable] = None
    no_head: Optional[str] = None

    @property
    def needs_calib(self) -> bool:
        return self.quantize_layer is not None

    @property
    def head_reason(self) -> Optional[str]:
        """Why this method cannot quantize the lm_head (None: it can)."""
        if self.no_head is not None:
            return self.no_head
        if self.needs_calib and self.quantize_head is None:
            return f"{self.name} has no quantize_head for the lm_head"
        return None


#: the benchmark's method names, in the order tables and figures show them
METHOD_NAMES = (
    "fp16_baseline",
    "rtn_int8",
    "rtn_int4",
    "smoothquant_w8a8",
    "gptq_int4",
    "awq_int4",
    "palettization_4bit",
    "qlora_nf4",
)

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name not in METHOD_NAMES:
        raise ValueError(f"unknown benchmark method {method.name!r}; add it to METHOD_NAMES")
    REGISTRY[method.name] = method
    return method


#: the suffix of a benchmark row whose lm_head is quantized too (``rtn_int4+head``)
HEAD_SUFFIX = "+head"


def split_head(name: str) -> tuple[str, bool]:
    """A benchmark row's name -> (method name, whether its lm_head is quantized):
    ``"rtn_int4+head"`` -> ``("rtn_int4", True)``, ``"rtn_int4"`` -> ``("rtn_int4", False)``."""
    if name.endswith(HEAD_SUFFIX):
        return name[: -len(HEAD_SUFFIX)], True
    return name, False


def get_method(name: str) -> Method:
    """The registered method ``name``, or a one-line :class:`QtutorError` saying why not."""
    if name in REGISTRY:
        return REGISTRY[name]
    raise QtutorError(f"unknown method {name!r}; choose from: {', '.join(implemented_methods())}")


def implemented_methods() -> list[str]:
    return [n for n in METHOD_NAMES if n in REGISTRY]
