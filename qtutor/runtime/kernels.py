"""Fast matmul paths for the 4-bit layers (chapter 7, "Real speed").

The reference forward of every ``QuantizedLinear`` dequantizes the whole weight and then runs an
ordinary matmul: correct, easy to read, and slower than FP16, because it writes and reads a
full-precision copy of the weight on every call. A 4-bit weight is faster only if the matmul
reads the packed bytes directly. Two ways are provided, both checked against the reference
forward by ``tests/test_kernels.py``:

* **tinygemm** (PyTorch's ``torch.ops.aten._weight_int4pack_mm``, CUDA, sm80+; CPU twin
  ``_weight_int4pack_mm_for_cpu``): group-wise asymmetric int4 with the weight re-packed into
  the kernel's tensor-core tile layout (``_convert_weight_to_int4pack``) and one
  (scale, float zero) pair per group in bf16, shape (n_groups, out, 2). tinygemm dequantizes
  ``w = (q - 8) * scale + zero``, so our integer zero point becomes a float one:
  ``s (q - z) = s (q - 8) + s (8 - z)``, i.e. ``zero = s (8 - z)``. The CUDA kernel takes bf16
  activations only (other dtypes are cast on the way in and out). :class:`Int4TinyGemmLinear`
  holds ONLY the kernel's layout, so memory accounting stays honest: 4 bits per weight plus
  32 bits per group (4.25 bits per weight at group size 128, against 4.16 for ``UniformLinear``'s
  fp16 scale + 4-bit zero), and ``dequantize()`` reads the weight back through the kernel.
* **Triton** GEMV kernels (:mod:`qtutor.runtime.triton_gemv`) that read the layers' own packed
  storage, nothing re-packed: ``int4_gemv`` for ``UniformLinear`` (4-bit, groups of a power of
  two), ``int8_gemv`` for 8-bit ``UniformLinear`` with one scale per row (``rtn_int8``,
  weight-only: the row stays fp16), ``lut_gemv`` for 4-bit palettized layers (16-entry LUT per
  group of output rows, per-row scale; by default the LUT sits in registers and is read with
  byte permutes), ``nf4_gemv`` for ``NF4Linear`` (the same register lookups with the 16 NF4
  levels as the table; each block's absmax rebuilt from the double quantization in the kernel)
  and ``w8a8_gemv`` for SmoothQuant's ``W8A8Linear`` (the row quantized per token once by a
  one-program kernel, int8 x int8 products summed in int32, equal to its ``torch._int_mm``
  forward bit for bit).
  They serve one input row (batch-1 decoding); other shapes use the reference forward.
* **CPU** (``backend="cpu"``, what ``"auto"`` picks for a model on the CPU): 4-bit
  ``UniformLinear`` through tinygemm's CPU twin (above); 8-bit per-channel ``UniformLinear``
  (``rtn_int8``) re-stored for PyTorch's weight-only int8 kernel
  ``aten._weight_int8pack_mm`` (:class:`Int8WeightOnlyLinear`); palettized and NF4 layers
  through the book's own C kernel (:mod:`qtutor.runtime.cpu_lut`: the 16-entry table in one
  AVX-512 register, on the layers' own storage). Both PyTorch kernels are fast on the CPU with
  bfloat16 activations only (float32 activations take a scalar path, 3-25 times slower than
  the float32 matmul), so they cast the row to bfloat16 and the result back: the fast forward
  differs from the float32 reference by bfloat16 rounding (about 3e-3 relative). The C kernel
  computes in float32. ``W8A8Linear`` needs nothing: its forward is ``torch._int_mm``.

:func:`accelerate` converts every eligible layer of a model in place and says what it did; each
converted layer's ``last_kernel`` names the kernel that ran its last call, which the decode
harness and ``qtutor bench`` record.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from ..errors import QtutorError
from ..quant.base import FloatLinear, QuantizedEmbedding, QuantizedLinear, unpack_codes
from ..quant.nf4 import NF4Linear
from ..quant.palettize import PalettizedLinear
from ..quant.rtn import UniformLinear, group_layout
from ..quant.smoothquant import W8A8Linear

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
BACKENDS = ("auto", "triton", "tinygemm", "cpu", "none")
#: how the LUT GEMV reads a table entry: from registers with byte permutes (``prmt``: eight
#: indices per 32-bit word looked up in the 8 registers that hold an fp16 LUT, no memory access
#: per weight; the default), or by an indexed load from the layer's LUT (``load``: the fallback
#: for a LUT that is not fp16, rows of indices not a multiple of 8, or an AMD GPU). The modes
#: tried on the way (``tl.gather``, a float32 copy, FLUTE's pair table) are experiments in
#: ``benchmarks/lut_modes.py``.
LUT_MODES = ("prmt", "load")


# --------------------------------------------------------------------------- availability
def triton_available() -> bool:
    """Whether the Triton kernels can be used (``triton`` importable)."""
    try:
        from . import triton_gemv  # noqa: F401

        return True
    except Exception:  # ImportError, or a triton build that fails on import
        return False


def tinygemm_available(device) -> bool:
    """Whether this torch has the int4 ``_weight_int4pack_mm`` kernel for ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return (
            hasattr(torch.ops.aten, "_weight_int4pack_mm")
            and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] >= 8
        )
    if device.type == "cpu":
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    return False


def int4_gemv(x, qweight, scales, qzeros, bias, group_size, config=None):
    """Triton GEMV for packed asymmetric int4 (see :mod:`qtutor.runtime.triton_gemv`)."""
    from . import triton_gemv as tk

    return tk.int4_gemv(x, qweight, scales, qzeros, bias, group_size, config)


def lut_gemv(x, qweight, lut, scales, bias, rows_per_lut, mode="prmt", config=None):
    """Triton GEMV for packed 4-bit LUT indices (see :mod:`qtutor.runtime.triton_gemv`)."""
    from . import triton_gemv as tk

    return tk.lut_gemv(x, qweight, lut, scales, bias, rows_per_lut, mode, config)


def w8a8_gemv(x, qweight, weight_scales, bias, config=None):
    """Triton W8A8 GEMV: quantizes the row per token (once) and sums int8 x int8 products in int32."""
    from . import triton_gemv as tk

    return tk.w8a8_gemv(x, qweight, weight_scales, bias, config)


def int8_gemv(x, qweight, scales, qzeros, bias, config=None):
    """Triton weight-only int8 GEMV, one scale (and zero) per row (see :mod:`qtutor.runtime.triton_gemv`)."""
    from . import triton_gemv as tk

    return tk.int8_gemv(x, qweight, scales, qzeros, bias, config)


def nf4_gemv(x, qweight, absmax, absmax2, offset, dyn, block_size, dq_block, bias, n, config=None):
    """Triton register-LUT GEMV for NF4, absmax rebuilt in the kernel (see :mod:`qtutor.runtime.triton_gemv`)."""
    from . import triton_gemv as tk

    return tk.nf4_gemv(x, qweight, absmax, absmax2, offset, dyn, block_size, dq_block, bias, n, config)


# --------------------------------------------------------------------------- tinygemm
def _inner_k_tiles(in_features: int) -> Optional[int]:
    for t in (8, 4, 2):
        if in_features % (16 * t) == 0:
            return t
    return None


def _int4_groups_reason(layer: nn.Module, kernel: str) -> Optional[str]:
    """Why ``layer`` is not a 4-bit ``UniformLinear`` with contiguous groups, as both int4
    kernels need (None if it is)."""
    if not isinstance(layer, UniformLinear):
        return "not a UniformLinear"
    if layer.bits != 4:
        return f"{layer.bits}-bit codes ({kernel} is 4-bit)"
    if layer.g_idx is not None:
        return "act-order g_idx (groups are not contiguous)"
    return None


def tinygemm_reason(layer: nn.Module, device) -> Optional[str]:
    """Why ``layer`` cannot use tinygemm on ``device`` (None if it can)."""
    device = torch.device(device)
    reason = _int4_groups_reason(layer, "tinygemm")
    if reason is not None:
        return reason
    gs, _ = group_layout(layer.in_features, layer.group_size)
    if gs not in TINYGEMM_GROUP_SIZES or layer.in_features % gs:
        return f"group size {gs} (tinygemm takes {TINYGEMM_GROUP_SIZES}, dividing in_features)"
    if _inner_k_tiles(layer.in_features) is None:
        return f"in_features {layer.in_features} is not a multiple of 32"
    n_mult = 8 if device.type == "cuda" else 16
    if layer.out_features % n_mult:
        return f"out_features {layer.out_features} is not a multiple of {n_mult}"
    if not tinygemm_available(device):
        return f"no _weight_int4pack_mm kernel for {device} in this torch"
    return None


class Int4TinyGemmLinear(QuantizedLinear):
    """A 4-bit group-wise linear stored in tinygemm's layout (see the module docstring).

    Buffers: ``weight_int4pack`` (CUDA: int32 (out/8, in/(16 t), 32, t/2) tensor-core tiles with
    t = inner k-tiles; CPU: uint8 (out, in/2)), ``scales_and_zeros`` (n_groups, out, 2) bf16,
    and ``bias``. The layout is device-specific: convert on the device you will run on.
    """

    def __init__(
        self, in_features, out_features, bias, weight_int4pack, scales_and_zeros, group_size: int, packed_for: str
    ):
        super().__init__(in_features, out_features, bias)
        self.bits, self.group_size = 4, group_size
        self.n_groups = in_features // group_size
        self.packed_for = packed_for
        self.register_buffer("weight_int4pack", weight_int4pack)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.last_kernel: Optional[str] = None

    @property
    def row_unit(self) -> int:
        return 8 if self.packed_for == "cuda" else 64

    @classmethod
    def from_uniform(cls, layer: UniformLinear, verify: bool = True) -> "Int4TinyGemmLinear":
        """Re-pack ``layer`` for tinygemm on the device it lives on. With ``verify``, the weight
        read back through the kernel must equal the layer's (to bf16 rounding)."""
        device = layer.qweight.device
        reason = tinygemm_reason(layer, device)
        if reason is not None:
            raise QtutorError(f"cannot use tinygemm for this layer: {reason}")
        N, K = layer.out_features, layer.in_features
        gs, G = group_layout(K, layer.group_size)
        inner = _inner_k_tiles(K)
        s = layer.scales.float()  # (N, G)
        z = torch.full_like(s, 8.0) if layer.qzeros is None else unpack_codes(layer.qzeros, 4, G).float()
        sz = torch.stack([s, s * (8.0 - z)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        if device.type == "cuda":
            # tinygemm's uint8 input has the EVEN column in the HIGH nibble; ours has it low
            swapped = ((layer.qweight & 0x0F) << 4) | (layer.qweight >> 4)
            packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), inner)
        else:
            codes = unpack_codes(layer.qweight, 4, K).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), inner)
        new = cls(K, N, layer.bias, packed, sz, gs, device.type)
        if verify:
            ref = layer.dequantize().float()
            err = (new.dequantize().float() - ref).norm() / ref.norm().clamp(min=1e-12)
            if not err < 1e-2:  # bf16 rounding gives ~3e-3 at most; a layout error gives ~1
                raise QtutorError(
                    f"tinygemm re-packing check failed (relative error {float(err):.3g}); "
                    f"this torch's int4 layout differs from what qtutor expects"
                )
        new._rows_checked = new._rows_readable(layer)  # private: rows stacked by fuse_rows keep it
        return new

    @property
    def gathers_rows(self) -> bool:
        """Whether :meth:`dequantize_rows` reads rows from the packed layout: the CPU layout in
        whole blocks of 64 rows, checked by :meth:`from_uniform` on this torch."""
        return self.packed_for == "cpu" and self.out_features % 64 == 0 and getattr(self, "_rows_checked", False)

    def _cpu_row_codes(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, in) int codes of ``rows`` from the CPU layout: blocks of 64 output rows, each stored as
        (in, 32) bytes whose low nibble is row ``j`` of the block and high nibble row ``j + 32``."""
        blocks = self.weight_int4pack.view(self.out_features // 64, self.in_features, 32)
        j = rows % 64
        b = blocks[rows // 64, :, j % 32]  # (n, in)
        return torch.where((j >= 32)[:, None], b >> 4, b & 0x0F)

    def _rows_readable(self, layer: UniformLinear) -> bool:
        """Whether this layout's rows can be read directly: the CPU layout, whole blocks of 64 rows,
        and rows read that way equal ``layer``'s to the bfloat16 rounding of the scales (checked on
        rows of the first, a middle and the last block: a torch whose layout differs says no)."""
        if self.packed_for != "cpu" or self.out_features % 64:
            return False
        n = self.out_features
        rows = torch.tensor(sorted({0, 31, 32, 63, n // 2, n - 33, n - 1}), device=self.weight_int4pack.device)
        ref = layer.dequantize_rows(rows)
        err = (self._rows_from_layout(rows) - ref).norm() / ref.norm().clamp(min=1e-12)
        return bool(err < 1e-2)

    def _rows_from_layout(self, rows: torch.Tensor) -> torch.Tensor:
        q = self._cpu_row_codes(rows).float()  # (n, in)
        sz = self.scales_and_zeros[:, rows].float()  # (n_groups, n, 2): w = (q - 8) s + zero
        s = sz[..., 0].t().repeat_interleave(self.group_size, dim=1)
        z = sz[..., 1].t().repeat_interleave(self.group_size, dim=1)
        return (q - 8.0) * s + z

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, in) float32 rows, read from the packed CPU layout (:attr:`gathers_rows`); other
        layouts (CUDA's tensor-core tiles) only through the whole weight."""
        if self.gathers_rows:
            return self._rows_from_layout(rows)
        return super().dequantize_rows(rows)

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device.type != self.packed_for:
            raise QtutorError(
                f"this layer was packed for {self.packed_for}, not {x2.device.type}; "
                f"run qtutor.runtime.kernels.accelerate after moving the model"
            )
        xb = x2.to(torch.bfloat16).contiguous()
        if self.packed_for == "cuda":
            return torch.ops.aten._weight_int4pack_mm(xb, self.weight_int4pack, self.group_size, self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            xb, self.weight_int4pack, self.group_size, self.scales_and_zeros
        )

    def dequantize(self) -> torch.Tensor:
        """(out, in) weight, read back through the kernel: ``I @ W^T`` for the identity ``I``."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.weight_int4pack.device)
        return self._mm(eye).t().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._mm(x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        self.last_kernel = "aten._weight_int4pack_mm" + ("" if self.packed_for == "cuda" else "_for_cpu")
        return y.reshape(*x.shape[:-1], self.out_features)

    forward_reference = QuantizedLinear.forward

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, tinygemm ({self.packed_for})"


# --------------------------------------------------------------------------- Triton, same storage
class _SwappedGemvMixin:
    """Mixed into a layer's own class by :func:`accelerate`: a kernel serves a single input row
    where :meth:`_kernel_runs` says so, everything else goes to the reference forward. The stored
    buffers are untouched."""

    prefix = ""  # of the swapped class's name
    kernel_name = ""
    last_kernel: Optional[str] = None

    def _kernel_runs(self, x: torch.Tensor) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and self._kernel_runs(x):
            y = self._gemv(x.reshape(-1))
            self.last_kernel = self.kernel_name
            return y.view(*x.shape[:-1], self.out_features)
        self.last_kernel = "reference"
        return self.reference_class.forward(self, x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference_class.forward(self, x)


class _TritonGemvMixin(_SwappedGemvMixin):
    """The Triton GEMVs: on CUDA, and on CPU only when ``kernel_on_cpu`` (Triton's interpreter)."""

    prefix = "Triton"
    kernel_on_cpu: bool = False

    def _kernel_runs(self, x: torch.Tensor) -> bool:
        return x.is_cuda or self.kernel_on_cpu


class _TritonInt4(_TritonGemvMixin):
    kernel_name = "triton int4_gemv"
    triton_config: Optional[dict] = None

    def _gemv(self, x):
        gs, _ = group_layout(self.in_features, self.group_size)
        return int4_gemv(x, self.qweight, self.scales, self.qzeros, self.bias, gs, self.triton_config)


class _TritonLUT(_TritonGemvMixin):
    kernel_name = "triton lut_gemv"
    lut_mode: str = "prmt"
    triton_config: Optional[dict] = None

    def _gemv(self, x):
        return lut_gemv(
            x, self.qweight, self.lut, self.scales, self.bias, self.rows_per_lut, self.lut_mode, self.triton_config
        )


class _TritonW8A8(_TritonGemvMixin):
    kernel_name = "triton w8a8_gemv"
    triton_config: Optional[dict] = None

    def _gemv(self, x):
        return w8a8_gemv(x, self.qweight, self.weight_scales, self.bias, self.triton_config)

    def takes_codes(self, device: Optional[torch.device] = None) -> bool:
        """Whether :meth:`forward_codes` runs for one input row on ``device`` (None: the layer's):
        the decode step's glue then quantizes the row in the kernel that produces it, instead of
        a launch of its own."""
        device = self.qweight.device if device is None else torch.device(device)
        return device.type == "cuda" or self.kernel_on_cpu

    def forward_codes(self, x: torch.Tensor, q_x: torch.Tensor, s_x: torch.Tensor) -> torch.Tensor:
        """The layer on the row ``x`` given its per-token int8 codes ``q_x`` and step ``s_x``
        (what :func:`qtutor.runtime.triton_gemv.quantize_row` would compute from x): the GEMV alone."""
        from . import triton_gemv as tk

        y = tk.w8a8_gemv_codes(
            q_x.reshape(-1), s_x, self.qweight, self.weight_scales, self.bias, x.dtype, self.triton_config
        )
        self.last_kernel = self.kernel_name
        return y.view(*x.shape[:-1], self.out_features)


class _TritonInt8(_TritonGemvMixin):
    kernel_name = "triton int8_gemv"
    triton_config: Optional[dict] = None

    def _gemv(self, x):
        return int8_gemv(x, self.qweight, self.scales, self.qzeros, self.bias, self.triton_config)


class _TritonNF4(_TritonGemvMixin):
    kernel_name = "triton nf4_gemv (prmt)"
    triton_config: Optional[dict] = None

    def _gemv(self, x):
        from ..quant.nf4 import _table

        dyn = _table("dynamic", self.absmax.device) if self.absmax2 is not None else None
        return nf4_gemv(
            x,
            self.qweight,
            self.absmax,
            self.absmax2,
            self.offset,
            dyn,
            self.block_size,
            self.double_quant_block_size,
            self.bias,
            self.out_features,
            self.triton_config,
        )


_SWAPPED: dict = {}


def _swapped_class(cls, mixin):
    """``<prefix><cls>`` (``TritonUniformLinear``, ``CpuNF4Linear``): ``cls`` with ``mixin``'s
    forward (module-level, so it pickles)."""
    key = (cls, mixin)
    if key not in _SWAPPED:
        name = mixin.prefix + cls.__name__
        new = type(name, (mixin, cls), {"__module__": __name__, "reference_class": cls})
        new.__qualname__ = name
        globals()[name] = new
        _SWAPPED[key] = new
    return _SWAPPED[key]


def _is_pow2(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


def triton_int4_reason(layer) -> Optional[str]:
    """Why ``layer`` cannot use the Triton int4 GEMV (None if it can)."""
    reason = _int4_groups_reason(layer, "int4_gemv")
    if reason is not None:
        return reason
    gs, _ = group_layout(layer.in_features, layer.group_size)
    if not _is_pow2(gs) or layer.in_features % gs:
        return f"group size {gs} is not a power of two dividing in_features"
    return None


def triton_int8_reason(layer) -> Optional[str]:
    """Why ``layer`` cannot use the Triton int8 GEMV (None if it can): 8-bit, one scale per row."""
    if not isinstance(layer, UniformLinear):
        return "not a UniformLinear"
    if layer.bits != 8:
        return f"{layer.bits}-bit codes (int8_gemv is 8-bit)"
    if layer.g_idx is not None or layer.n_groups != 1:
        return "group-wise scales (int8_gemv takes one scale per output channel)"
    return None


def triton_nf4_reason(layer) -> Optional[str]:
    """Why an ``NF4Linear`` cannot use the Triton NF4 GEMV (None if it can)."""
    from .triton_gemv import NF4_BLOCK_SIZES

    if not isinstance(layer, NF4Linear):
        return "not an NF4Linear"
    if layer.block_size not in NF4_BLOCK_SIZES or layer.in_features % layer.block_size:
        return f"blocks of {layer.block_size} (nf4_gemv takes {NF4_BLOCK_SIZES}, dividing in_features)"
    if layer.absmax.dtype not in (torch.uint8, torch.float32):
        return f"absmax stored as {layer.absmax.dtype}"
    if layer.qweight.is_cuda and torch.version.hip:
        return "an AMD GPU (nf4_gemv runs NVIDIA PTX)"
    return None


def triton_lut_reason(layer) -> Optional[str]:
    """Duck-typed: a 4-bit layer with ``qweight`` (out, in/2), ``lut`` (n_luts, 16), ``scales``
    (out,) or None and ``rows_per_lut`` (e.g. ``PalettizedLinear``)."""
    if not isinstance(layer, QuantizedLinear) or not hasattr(layer, "lut") or not hasattr(layer, "rows_per_lut"):
        return "not a LUT layer"
    if getattr(layer, "bits", None) != 4 or layer.lut.shape[-1] != 16:
        return "not 4-bit"
    if layer.in_features % 2 or layer.qweight.shape[-1] != layer.in_features // 2:
        return "unexpected index layout"
    return None


def _prmt_fits(layer) -> bool:
    """The ``prmt`` LUT kernel reads eight indices per 32-bit word from an fp16 LUT, in NVIDIA PTX."""
    return (
        layer.in_features % 8 == 0
        and layer.lut.dtype == torch.float16
        and not (layer.lut.is_cuda and torch.version.hip)
    )


def triton_w8a8_reason(layer) -> Optional[str]:
    if not isinstance(layer, W8A8Linear):
        return "not a W8A8Linear"
    if layer.act_quant != "per_token":
        return f"activation quantization {layer.act_quant!r} (the kernel quantizes per token)"
    if not layer.use_int_mm:
        return "use_int_mm is off (the layer simulates the integer matmul)"
    return None


# --------------------------------------------------------------------------- CPU
def int8_weight_only_reason(layer: nn.Module, device) -> Optional[str]:
    """Why ``layer`` cannot use ``aten._weight_int8pack_mm`` on ``device`` (None if it can)."""
    if not isinstance(layer, UniformLinear):
        return "not a UniformLinear"
    if layer.bits != 8:
        return f"{layer.bits}-bit codes (the int8 kernel is 8-bit)"
    if layer.g_idx is not None or layer.n_groups != 1:
        return "group-wise scales (aten._weight_int8pack_mm takes one scale per output channel)"
    if torch.device(device).type != "cpu":
        return "aten._weight_int8pack_mm is used on the CPU only here"
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return "no aten._weight_int8pack_mm in this torch"
    return None


class Int8WeightOnlyLinear(QuantizedLinear):
    """An 8-bit per-output-channel linear stored for PyTorch's weight-only int8 kernel
    ``aten._weight_int8pack_mm(x, W_int8, s)`` = ``x (s W_int8)^T`` (CPU, bfloat16 activations).

    ``UniformLinear`` stores codes ``q`` in [0, 255] with ``w = s (q - z)`` (``z = 128`` when
    symmetric). Here ``weight_int8 = q - 128`` (int8, (out, in): the same bytes), ``scales`` (out,)
    in bfloat16 (the kernel's dtype; the same bytes as the fp16 scale, rounded to 8 bits of
    mantissa), and for an asymmetric grid ``zero_term = s (128 - z)`` (out,) float32, since
    ``s (q - z) = s (q - 128) + s (128 - z)``: the forward adds ``zero_term * sum(x)``. Only this
    layout is held, so the memory the layer reports is what the kernel reads.
    """

    def __init__(self, in_features, out_features, bias, weight_int8, scales, zero_term):
        super().__init__(in_features, out_features, bias)
        self.bits = 8
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_term", zero_term)
        self.last_kernel: Optional[str] = None

    @classmethod
    def from_uniform(cls, layer: UniformLinear, verify: bool = True) -> "Int8WeightOnlyLinear":
        """Re-store ``layer`` (8-bit, one scale per row). With ``verify``, the weight this layer
        represents must equal the layer's to the bfloat16 rounding of the scales."""
        reason = int8_weight_only_reason(layer, layer.qweight.device)
        if reason is not None:
            raise QtutorError(f"cannot use aten._weight_int8pack_mm for this layer: {reason}")
        s = layer.scales.float().reshape(-1)  # (out,)
        weight_int8 = (layer.qweight.to(torch.int16) - 128).to(torch.int8).contiguous()
        zero_term = None
        if layer.qzeros is not None:
            z = unpack_codes(layer.qzeros, 8, 1).float().reshape(-1)
            zero_term = (s * (128.0 - z)).contiguous()
        new = cls(layer.in_features, layer.out_features, layer.bias, weight_int8, s.to(torch.bfloat16), zero_term)
        if verify:
            ref = layer.dequantize().float()
            err = (new.dequantize() - ref).norm() / ref.norm().clamp(min=1e-12)
            if not err < 1e-2:  # bf16 scales: 2^-9 relative at most
                raise QtutorError(f"int8 re-storing check failed (relative error {float(err):.3g})")
        return new

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32 weight ``s (q - 128) (+ s (128 - z))``."""
        return self.dequantize_rows(None)

    def dequantize_rows(self, rows: Optional[torch.Tensor]) -> torch.Tensor:
        def take(t):
            return t if rows is None else t[rows]

        W = take(self.weight_int8).float() * take(self.scales).float()[:, None]
        return W if self.zero_term is None else W + take(self.zero_term)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight_int8, self.scales).to(x.dtype)
        if self.zero_term is not None:
            y = y + x2.sum(-1, keepdim=True) * self.zero_term.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        self.last_kernel = "aten._weight_int8pack_mm"
        return y.reshape(*x.shape[:-1], self.out_features)

    forward_reference = QuantizedLinear.forward

    def extra_repr(self) -> str:
        return super().extra_repr() + f", int8 weight-only (aten), symmetric={self.zero_term is None}"


class _CpuGemvMixin(_SwappedGemvMixin):
    """The book's C kernels (:mod:`qtutor.runtime.cpu_lut`) for one row on the CPU, in float32."""

    prefix = "Cpu"

    def _kernel_runs(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu"


class _CpuPalette(_CpuGemvMixin):
    kernel_name = "cpu palette_gemv (C)"

    def _gemv(self, x):
        from . import cpu_lut

        y = cpu_lut.palette_gemv(x.float(), self.qweight, self.lut, self.scales, self.bias, self.rows_per_lut)
        return y.to(x.dtype)


class _CpuNF4(_CpuGemvMixin):
    kernel_name = "cpu nf4_gemv (C)"

    def _gemv(self, x):
        from . import cpu_lut
        from ..quant.nf4 import _table

        y = cpu_lut.nf4_gemv(
            x.float(),
            self.qweight,
            _table("nf4", "cpu"),
            self.block_size,
            self.absmax,
            self.absmax2,
            self.offset,
            _table("dynamic", "cpu"),
            self.double_quant_block_size,
            self.bias,
            self.out_features,
        )
        return y.to(x.dtype)


def cpu_lut_reason(layer) -> Optional[str]:
    """Why a LUT layer cannot use the CPU LUT kernel (None if it can)."""
    reason = triton_lut_reason(layer)
    if reason is not None:
        return reason
    if layer.lut.dtype != torch.float16 or (layer.scales is not None and layer.scales.dtype != torch.float16):
        return f"a {layer.lut.dtype} LUT (the CPU kernel reads fp16 LUTs and scales)"
    from . import cpu_lut

    return cpu_lut.available()


def cpu_nf4_reason(layer) -> Optional[str]:
    """Why an ``NF4Linear`` cannot use the CPU NF4 kernel (None if it can)."""
    if not isinstance(layer, NF4Linear):
        return "not an NF4Linear"
    if layer.in_features % layer.block_size or layer.block_size % 2:
        return f"blocks of {layer.block_size} do not divide the rows of {layer.in_features}"
    if layer.absmax.dtype not in (torch.uint8, torch.float32):
        return f"absmax stored as {layer.absmax.dtype}"
    from . import cpu_lut

    return cpu_lut.available()


def _modules_once(model: nn.Module) -> list:
    """(name, module) for every module of ``model`` once, a module reached by several paths (a
    quantized lm_head that also serves the tied embedding, ``qtutor.quantize(..., head=True)``)
    under its last name (``lm_head``, not ``model.embed_tokens.head``); modules that only serve a
    tied embedding's lookups (its head after :func:`_replace` gave the lm_head another layout)
    are left out."""
    named = {}
    for name, module in model.named_modules(remove_duplicate=False):
        named[id(module)] = (name, module)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lookup_only = {id(m.head) for m in model.modules() if isinstance(m, QuantizedEmbedding) and m.head is not head}
    return [v for k, v in named.items() if k not in lookup_only]


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` sits in ``model`` (a tied quantized lm_head sits in two
    places). A tied embedding keeps ``old`` for its row lookups if ``new``'s layout cannot serve
    them (``gathers_rows`` False: tinygemm's CUDA tiles); both are then held, and named."""
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is old and not (isinstance(parent, QuantizedEmbedding) and not getattr(new, "gathers_rows", True)):
                parent._modules[key] = new


def _accelerate_cpu(model: nn.Module, verify: bool) -> tuple[dict, dict]:
    """:func:`accelerate`'s ``"cpu"`` backend -> (converted, skipped)."""
    converted, skipped = {}, {}
    for name, module in _modules_once(model):
        if isinstance(module, (_SwappedGemvMixin, Int4TinyGemmLinear, Int8WeightOnlyLinear)):
            continue
        reason = None
        if isinstance(module, UniformLinear) and module.bits == 8:
            reason = int8_weight_only_reason(module, module.qweight.device)
            if reason is None:
                _replace(model, module, Int8WeightOnlyLinear.from_uniform(module, verify=verify))
                converted[name] = "aten._weight_int8pack_mm"
        elif isinstance(module, UniformLinear):
            reason = tinygemm_reason(module, module.qweight.device)
            if reason is None:
                _replace(model, module, Int4TinyGemmLinear.from_uniform(module, verify=verify))
                converted[name] = "aten._weight_int4pack_mm_for_cpu"
        elif isinstance(module, NF4Linear):
            reason = cpu_nf4_reason(module)
            if reason is None:
                module.__class__ = _swapped_class(type(module), _CpuNF4)
                converted[name] = _CpuNF4.kernel_name
        elif hasattr(module, "lut") and isinstance(module, QuantizedLinear):
            reason = cpu_lut_reason(module)
            if reason is None:
                module.__class__ = _swapped_class(type(module), _CpuPalette)
                converted[name] = _CpuPalette.kernel_name
        elif isinstance(module, W8A8Linear):
            reason = "its own forward is already a CPU integer kernel (torch._int_mm)"
        if reason is not None:
            skipped[name] = reason
    return converted, skipped


# --------------------------------------------------------------------------- whole model
def accelerate(
    model: nn.Module, backend: str = "auto", verify: bool = True, lut_mode: str = "prmt", kernel_on_cpu: bool = False
) -> dict:
    """Give every eligible quantized layer of ``model`` a fast matmul, in place.

    ``backend``: ``"triton"`` (Triton GEMVs on the layers' own storage: 4-bit and 8-bit
    per-channel ``UniformLinear``, 4-bit LUT layers, ``NF4Linear`` and ``W8A8Linear``),
    ``"tinygemm"`` (4-bit ``UniformLinear`` re-packed into :class:`Int4TinyGemmLinear`; the
    other layers still get Triton when available), ``"cpu"``
    (the CPU kernels of the module docstring: tinygemm's CPU twin for 4-bit ``UniformLinear``,
    :class:`Int8WeightOnlyLinear` for 8-bit per-channel ones, the C LUT kernel for palettized
    and NF4 layers), ``"auto"`` (on CUDA: Triton if importable, else tinygemm; on the CPU:
    ``"cpu"``), or ``"none"``. On CPU the Triton kernels run in Triton's interpreter (for
    tests) only with ``kernel_on_cpu=True``.
    ``lut_mode``: one of :data:`LUT_MODES`; with ``"prmt"``, a LUT layer whose ``in_features``
    is not a multiple of 8, whose LUT is not fp16, or on an AMD GPU gets ``"load"`` (the
    ``converted`` entry says which).

    A quantized lm_head tied to the embedding (``qtutor.quantize(..., head=True)``: one module at
    ``lm_head`` and in the :class:`~qtutor.quant.base.QuantizedEmbedding`) is converted once,
    named ``lm_head``, and a re-stored layer takes both places; where its layout cannot serve the
    embedding's row lookups (tinygemm's CUDA tiles), the embedding keeps the packed layer.

    Returns ``{"backend": backend used, "converted": {name: kernel}, "skipped": {name: reason}}``.
    """
    if backend not in BACKENDS:
        raise QtutorError(f"unknown kernel backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if lut_mode not in LUT_MODES:
        raise QtutorError(f"unknown LUT mode {lut_mode!r}; choose from {', '.join(LUT_MODES)}")
    params = list(model.parameters()) + list(model.buffers())
    device = params[0].device if params else torch.device("cpu")
    has_triton = triton_available()
    if backend == "auto":
        backend = ("triton" if has_triton else "tinygemm") if device.type == "cuda" else "cpu"
    if backend == "triton" and not has_triton:
        raise QtutorError("backend 'triton' needs the triton package (pip install triton)")
    if backend == "cpu" and device.type != "cpu":
        raise QtutorError(f"backend 'cpu' converts a model on the CPU, this one is on {device}; use 'auto'")
    converted, skipped = {}, {}
    if backend == "none":
        return {"backend": backend, "converted": converted, "skipped": skipped}
    if backend == "cpu":
        converted, skipped = _accelerate_cpu(model, verify)
        return {"backend": backend, "converted": converted, "skipped": skipped}

    def swap(name, module, reason, mixin, kernel, **attrs) -> None:
        """Give ``module`` the Triton kernel ``mixin`` in place, or record why not."""
        if reason is not None:
            skipped[name] = reason
            return
        module.__class__ = _swapped_class(type(module), mixin)
        module.kernel_on_cpu = kernel_on_cpu
        for k, v in attrs.items():
            setattr(module, k, v)
        converted[name] = kernel

    no_triton = "triton is not installed"
    for name, module in _modules_once(model):
        if isinstance(module, (_SwappedGemvMixin, Int4TinyGemmLinear, Int8WeightOnlyLinear)):
            continue
        if isinstance(module, UniformLinear) and module.bits == 8:
            reason = triton_int8_reason(module) if has_triton else no_triton
            swap(name, module, reason, _TritonInt8, _TritonInt8.kernel_name)
        elif isinstance(module, NF4Linear):
            reason = triton_nf4_reason(module) if has_triton else no_triton
            swap(name, module, reason, _TritonNF4, _TritonNF4.kernel_name)
        elif isinstance(module, UniformLinear):
            if backend != "tinygemm":
                swap(name, module, triton_int4_reason(module), _TritonInt4, "triton int4_gemv")
                continue
            reason = tinygemm_reason(module, module.qweight.device)
            if reason is None:
                _replace(model, module, Int4TinyGemmLinear.from_uniform(module, verify=verify))
                converted[name] = "tinygemm"
            else:
                skipped[name] = reason
        elif hasattr(module, "lut") and isinstance(module, QuantizedLinear):
            mode = lut_mode
            if mode == "prmt" and not _prmt_fits(module):  # whole 32-bit words, NVIDIA PTX
                mode = "load"
            reason = triton_lut_reason(module) if has_triton else no_triton
            swap(name, module, reason, _TritonLUT, f"triton lut_gemv ({mode})", lut_mode=mode)
        elif isinstance(module, W8A8Linear):
            reason = triton_w8a8_reason(module) if has_triton else no_triton
            swap(name, module, reason, _TritonW8A8, "triton w8a8_gemv")
    return {"backend": backend, "converted": converted, "skipped": skipped}


# --------------------------------------------------------------------------- stacked rows
_NOT_STATE = ("out_features", "last_kernel", "training")

#: for each layer class whose rows can be stacked into one layer: buffer name -> the dimension
#: along which it holds one slice per output row (the buffers the kernels add included), as
#: the layer's ``row_buffers()`` gives them where it has one (NF4: its one second-level offset
#: repeated per second-level block, so that each stacked part keeps its own). A class not
#: listed is not stacked.
ROW_DIMS = {
    NF4Linear: {"qweight": 0, "absmax": 0, "absmax2": 0, "offset": 0, "bias": 0},
    FloatLinear: {"weight": 0, "bias": 0},
    UniformLinear: {"qweight": 0, "scales": 0, "qzeros": 0, "bias": 0},
    W8A8Linear: {"qweight": 0, "weight_scales": 0, "bias": 0},
    PalettizedLinear: {"qweight": 0, "lut": 0, "scales": 0, "bias": 0},
    # the CUDA layout tiles 8 output rows at a time, the CPU one 64: whole tiles stack
    Int4TinyGemmLinear: {"weight_int4pack": 0, "scales_and_zeros": 1, "bias": 0},
    Int8WeightOnlyLinear: {"weight_int8": 0, "scales": 0, "zero_term": 0, "bias": 0},
}


def row_dims(layer: nn.Module) -> dict:
    """:data:`ROW_DIMS` of ``layer``'s class or of the nearest base listed ({} if none)."""
    return next((ROW_DIMS[c] for c in type(layer).__mro__ if c in ROW_DIMS), {})


def fuse_rows(layers, verify: bool = True, dtype: torch.dtype = torch.float32) -> Optional[nn.Module]:
    """One layer computing ``torch.cat([layer(x) for layer in layers], -1)`` with ONE matmul.

    Projections that read the same input (q, k and v; gate and up) are stacked along the output
    dimension, as inference engines do: a decode step then launches one kernel instead of three
    (or two) and reads one larger weight. Works for ``nn.Linear`` and for every layer that says
    which buffers hold its rows (:data:`ROW_DIMS`): their row slices are concatenated,
    everything else (group size, bit width, kernel settings, act-order ``g_idx``) must be equal.
    Returns None where the layers cannot be stacked: different classes or inputs, a layer with
    no entry in :data:`ROW_DIMS`, or a part that ends inside a block of rows (a LUT shared by
    rows of two layers; an NF4 block or second-level block of flat codes). ``verify`` checks the
    stacked layer against the separate ones on a random input row of ``dtype`` (a layout error
    raises).
    """
    layers = list(layers)
    first = layers[0]
    cls = type(first)
    if len(layers) < 2 or any(type(m) is not cls or m.in_features != first.in_features for m in layers):
        return None
    sizes = [m.out_features for m in layers]
    if cls is nn.Linear:
        w = first.weight
        fused = nn.Linear(
            first.in_features, sum(sizes), bias=any(m.bias is not None for m in layers), device=w.device, dtype=w.dtype
        )
        fused.weight.data.copy_(torch.cat([m.weight.data for m in layers]))
        if fused.bias is not None:
            fused.bias.data.copy_(
                torch.cat([w.new_zeros(m.out_features) if m.bias is None else m.bias.data for m in layers])
            )
        fused.requires_grad_(False)
    else:
        spec = row_dims(first)
        if not spec or any(n % first.row_unit for n in sizes[:-1]):
            return None
        state = {k: v for k, v in vars(first).items() if not k.startswith("_") and k not in _NOT_STATE}
        for m in layers[1:]:
            if {k: v for k, v in vars(m).items() if not k.startswith("_") and k not in _NOT_STATE} != state:
                return None
            for name, b in m._buffers.items():
                b0 = first._buffers.get(name)
                if name not in spec and not (
                    (b is None and b0 is None) or (b is not None and b0 is not None and torch.equal(b, b0))
                ):
                    return None
        fused = copy.copy(first)  # same class and settings (a Triton swap included) ...
        for k, v in vars(first).items():  # ... with its own buffer, parameter and hook tables
            if isinstance(v, dict):
                setattr(fused, k, copy.copy(v))
        rows = [m.row_buffers() if hasattr(m, "row_buffers") else m._buffers for m in layers]
        for name, dim in spec.items():
            parts = [r.get(name) for r in rows]
            if all(p is None for p in parts):
                continue
            if any(p is None for p in parts):
                if name != "bias":
                    return None
                ref = next(p for p in parts if p is not None)
                parts = [ref.new_zeros(m.out_features) if p is None else p for p, m in zip(parts, layers)]
            try:
                fused._buffers[name] = torch.cat(parts, dim)
            except RuntimeError as err:
                raise QtutorError(
                    f"cannot stack {cls.__name__} buffer {name!r} along dim {dim} ({err}): "
                    f"ROW_DIMS does not describe its layout"
                ) from None
        fused.out_features = sum(sizes)
    if verify:
        _check_fused(fused, layers, dtype)
    return fused


@torch.no_grad()
def _check_fused(fused, layers, dtype) -> None:
    if isinstance(fused, nn.Linear):
        t = fused.weight
        dtype = t.dtype
    else:
        t = next(iter(fused.buffers()))
    x = torch.randn(1, fused.in_features, generator=torch.Generator().manual_seed(0)).to(t.device, dtype)
    ref = torch.cat([m(x) for m in layers], -1).float()
    err = float((fused(x).float() - ref).norm() / ref.norm().clamp(min=1e-12))
    if not err < 1e-2:
        raise QtutorError(
            f"stacking {type(fused).__name__} rows changed the output (relative error "
            f"{err:.3g}): ROW_DIMS does not describe its layout"
        )


def restore(model: nn.Module) -> int:
    """Undo the class swaps of :func:`accelerate` (Triton and C kernels; the re-stored tinygemm
    and int8 layers stay), dropping any buffer a kernel added (named in the class's
    ``kernel_buffers``); -> layers restored."""
    n = 0
    for module in model.modules():
        if isinstance(module, _SwappedGemvMixin):
            for extra in getattr(module, "kernel_buffers", ()):
                module._buffers.pop(extra, None)
            module.__class__ = type(module).reference_class
            n += 1
    return n
