"""SmoothQuant: W8A8 with the activation outliers migrated into the weights (Xiao et al., 2023;
book chapter 2).

With INT8 weights *and* INT8 activations the matmul can run on integer units. Weights are easy
to quantize; activations are not: a few input channels are 10-100x larger than the rest, and
with one scale per token they eat the whole INT8 range. SmoothQuant divides input channel ``j``
of ``X`` by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and multiplies weight column ``j`` by ``s_j`` (:mod:`qtutor.quant.transforms`, folded into the
preceding norm), so both ``X diag(s)^-1`` and ``W diag(s)`` have moderate ranges; ``alpha``
sets how much of the difficulty moves to the weights (0.5 by default, which leaves
``max|X_j| / s_j = max|W_j| s_j``; 1 moves all of it: every channel of ``X diag(s)^-1`` has max 1;
0 moves none: every column of ``W diag(s)`` has max 1).

Follows mit-han-lab/smoothquant:

* ``smoothquant/calibration.py`` ``get_act_scales``: per-input-channel ``max |x|`` over all
  calibration tokens, for every linear's input (here: the first linear of each group that
  shares an input);
* ``smoothquant/smooth.py`` ``smooth_ln_fcs_llama_like`` and ``smooth_lm``'s
  ``LlamaDecoderLayer`` branch: ``input_layernorm -> q/k/v`` with the scales of q_proj's input,
  ``post_attention_layernorm -> gate/up`` with those of gate_proj's input;
  ``max|W_j|`` is the max over all linears of the group, clamped at 1e-5; ``s`` clamped at 1e-5.
  Upstream has no Qwen2 branch; Qwen2's decoder layer has the same norms and projections as
  Llama's (plus q/k/v biases, which sit after the matmul and are untouched by an input-column
  scaling), so the Llama branch applies as is;
* ``smoothquant/fake_quant.py`` ``W8A8Linear`` with ``quantize_llama_like``'s defaults:
  weights ``per_channel`` absmax INT8, activations ``per_token`` dynamic absmax INT8, the
  inputs of all seven linears quantized, outputs not (``quantize_bmm_input=False``).

Deliberate differences: the smoothing scales are computed in float32 (upstream: the weights'
dtype, fp16); ``W8A8Linear`` stores real ``int8`` weights with float32 per-channel scales and can
run the integer matmul (``torch._int_mm``) instead of fake-quantizing in fp16; and, as for every
calibrated method in ``qtutor.quantize``, layer ``i``'s statistics come from the outputs of the
already quantized layers ``0..i-1`` (upstream collects all of them from the float model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QtutorError
from .base import Method, QuantConfig, QuantizedLinear, register, replace_linears
from .transforms import scale_norm_to_linears

QMAX = 127  # 2^(8-1) - 1: symmetric INT8 uses [-127, 127]


@dataclass(frozen=True)
class SmoothQuantConfig(QuantConfig):
    """alpha: migration strength in ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``;
    weight_quant: "per_channel" (one INT8 scale per output row) or "per_tensor";
    act_quant: "per_token" (dynamic, one scale per token row) or "per_tensor" (dynamic);
    smooth: False skips the smoothing (plain W8A8, the baseline SmoothQuant improves on).

    The defaults are the paper's (alpha 0.5, per-channel weights, per-token activations, as
    ``quantize_llama_like``); chapter 2 sweeps alpha. Measured beside llm-compressor's
    ``SmoothQuantModifier`` + W8A8 (``benchmarks/peers_stories260k.csv``: stories260K, the whole
    WikiText-2 test): 122.146 against 122.304, plain W8A8 122.362 against 122.624 (float 122.334)."""

    alpha: float = 0.5
    weight_quant: str = "per_channel"
    act_quant: str = "per_token"
    smooth: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise QtutorError(f"alpha {self.alpha} must lie in [0, 1]")
        if self.weight_quant not in ("per_channel", "per_tensor"):
            raise QtutorError(f"weight_quant {self.weight_quant!r}: choose per_channel or per_tensor")
        if self.act_quant not in ("per_token", "per_tensor"):
            raise QtutorError(f"act_quant {self.act_quant!r}: choose per_token or per_tensor")


# --------------------------------------------------------------------------- pure functions
def act_scales(X: torch.Tensor) -> torch.Tensor:
    """``max_t |X_tj|``: (in,) float32 from ``X`` (..., in) (``get_act_scales``' ``stat_tensor``)."""
    return X.detach().reshape(-1, X.shape[-1]).abs().amax(dim=0).float()


def smooth_scales(act_scale: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's migration scales ``s`` (in,) (``smooth_ln_fcs_llama_like``).

    act_scale: (in,) ``max|X_j|``; weights: the (out_k, in) weights of every linear reading X.
    ``max|W_j| = max_k max_o |W^k_oj|`` (clamped at 1e-5), ``s = max|X_j|^alpha /
    max|W_j|^(1-alpha)`` clamped at 1e-5.
    """
    w_scale = torch.cat([W.detach().abs().float().amax(dim=0, keepdim=True) for W in weights], dim=0)
    w_scale = w_scale.amax(dim=0).clamp(min=1e-5)
    return (act_scale.float().pow(alpha) / w_scale.pow(1 - alpha)).clamp(min=1e-5)


def quantize_weight_absmax(W: torch.Tensor, per: str = "per_channel") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 weights: ``scale = max|W| / 127`` per output row (or for the whole
    tensor), ``q = round(W / scale)`` in [-127, 127]. Returns (codes (out, in) int8, scales (out,)
    float32, or (1,) per tensor). ``fake_quant.quantize_weight_per_channel_absmax`` (which keeps
    ``q * scale`` in fp16); the scale is clamped at 1e-5 / 127 as there."""
    W = W.detach().float()
    absmax = W.abs().amax(dim=1) if per == "per_channel" else W.abs().amax().reshape(1)
    scale = absmax.clamp(min=1e-5) / QMAX
    codes = torch.round(W / scale.view(-1, 1)).clamp(-QMAX, QMAX).to(torch.int8)
    return codes, scale


def quantize_activation_absmax(x: torch.Tensor, per: str = "per_token") -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric INT8 activations: ``scale = max|x| / 127`` per token row of ``x``
    (tokens, in) (or for the whole tensor), ``q = round(x / scale)``. Returns (codes int8 (tokens,
    in), scales float32 (tokens, 1) or (1, 1)). ``fake_quant.quantize_activation_per_token_absmax``
    (scale clamped at 1e-5 / 127)."""
    x = x.float()
    absmax = x.abs().amax(dim=-1, keepdim=True) if per == "per_token" else x.abs().amax().reshape(1, 1)
    scale = absmax.clamp(min=1e-5) / QMAX
    codes = torch.round(x / scale).clamp(-QMAX, QMAX).to(torch.int8)
    return codes, scale


#: on CUDA, inputs with fewer rows are zero-padded to this many for ``torch._int_mm``
INT_MM_MIN_ROWS = 32


def int_mm_supported(M: int, K: int, N: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` (int8 (M, K) x int8 (K, N) -> int32) can take these shapes.

    CUDA needs ``M > 16`` and ``K``, ``N`` multiples of 8. On CPU, torch 2.13 runs any shape
    (checked by ``tests/test_smoothquant.py``).
    """
    if not hasattr(torch, "_int_mm"):
        return False
    if device.type == "cuda":
        return M > 16 and K % 8 == 0 and N % 8 == 0
    return device.type == "cpu"


class W8A8Linear(QuantizedLinear):
    """INT8 weights (symmetric, per output channel) and INT8 activations (dynamic, per token).

    Stores ``qweight`` (out, in) int8 and ``weight_scales`` (out,) float32 (8 + 32/in bits per
    weight). Unlike the other ``QuantizedLinear`` layers, ``forward`` is *not*
    ``F.linear(x, self.dequantize(), bias)``: it also quantizes its input, token by token,

        y = (s_x q_x) (s_w q_w)^T + b = s_x s_w^T * (q_x q_w^T) + b,

    and computes ``q_x q_w^T`` as an int8 x int8 -> int32 matmul with ``torch._int_mm`` where it
    is available for the shapes (:func:`int_mm_supported`), otherwise in floating point with the
    same numbers (:meth:`forward_simulated`). On CUDA, where the int8 GEMM needs more than 16
    rows, an input of fewer than :data:`INT_MM_MIN_ROWS` (32) rows, such as one decoding step,
    is zero-padded to 32 rows first. ``last_kernel`` records which ran:
    ``"torch._int_mm"`` (with the padding, if any) or ``"simulated"``. Set ``use_int_mm = False``
    to force the simulation.
    ``dequantize()`` is the weight ``s_w q_w`` the layer represents.
    (mit-han-lab/smoothquant ``fake_quant.W8A8Linear``, ``quantize_output=False``.)
    """

    use_int_mm: bool = True

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        weight_quant: str = "per_channel",
        act_quant: str = "per_token",
    ):
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias)
        self.weight_quant, self.act_quant = weight_quant, act_quant
        self.register_buffer("qweight", codes.to(torch.int8).contiguous())
        self.register_buffer("weight_scales", scales.float().reshape(-1).contiguous())
        self.last_kernel: Optional[str] = None

    @classmethod
    def from_float(cls, linear: nn.Linear, cfg: Optional[SmoothQuantConfig] = None) -> "W8A8Linear":
        cfg = cfg or SmoothQuantConfig()
        codes, scales = quantize_weight_absmax(linear.weight, cfg.weight_quant)
        return cls(codes, scales, linear.bias, cfg.weight_quant, cfg.act_quant)

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32 weight ``s_w q_w``."""
        return self.qweight.float() * self.weight_scales.view(-1, 1)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        scales = self.weight_scales if self.weight_scales.numel() == 1 else self.weight_scales[rows]
        return self.qweight[rows].float() * scales.view(-1, 1)

    def _quantize_input(self, x: torch.Tensor):
        x2 = x.reshape(-1, self.in_features)
        return quantize_activation_absmax(x2, self.act_quant)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _matmul_simulated(self, q_x: torch.Tensor, s_x: torch.Tensor) -> torch.Tensor:
        """(M, N) float32: the W8A8 product with the quantized input and weight dequantized."""
        return F.linear(q_x.float() * s_x, self.dequantize())

    def forward_simulated(self, x: torch.Tensor) -> torch.Tensor:
        """The W8A8 math in float32: dequantize the quantized input and weight, then matmul."""
        q_x, s_x = self._quantize_input(x)
        return self._finish(self._matmul_simulated(q_x, s_x), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q_x, s_x = self._quantize_input(x)
        M, K, N = q_x.shape[0], self.in_features, self.out_features
        # CUDA's int8 GEMM (cuBLASLt) needs more than 16 rows: a decoding step (M = 1) is padded
        # with zero rows to INT_MM_MIN_ROWS (the weight is still read once)
        rows = INT_MM_MIN_ROWS if q_x.is_cuda and M < INT_MM_MIN_ROWS else M
        if self.use_int_mm and int_mm_supported(rows, K, N, q_x.device):
            a = q_x if rows == M else torch.cat([q_x, q_x.new_zeros(rows - M, K)])
            try:
                acc = torch._int_mm(a, self.qweight.t())[:M]  # (M, N) int32, exact
            except RuntimeError:  # a backend without this shape/layout: fall back, and say so
                acc = None
            if acc is not None:
                self.last_kernel = "torch._int_mm" + (f" (rows padded {M}->{rows})" if rows != M else "")
                y = acc.float() * s_x * self.weight_scales.view(1, -1)
                return self._finish(y, x)
        self.last_kernel = "simulated"
        return self._finish(self._matmul_simulated(q_x, s_x), x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_quant={self.weight_quant}, act_quant={self.act_quant}"


# --------------------------------------------------------------------------- one decoder layer
@torch.no_grad()
def collect_act_scales(layer: nn.Module, layout, X: torch.Tensor, kwargs: dict, batch_size: int = 8) -> dict:
    """Run the float ``layer`` on ``X`` (n, seqlen, hidden) and return, for the first linear of
    each group of ``layout.sequential`` (the linears of a group read the same input), the
    per-channel ``max |x|`` over all tokens ((in,) float32)."""
    from ..calib import record_inputs

    heads = [seq[0] for seq in layout.sequential]
    scales: dict = {}

    def hook(name, x):
        m = act_scales(x)
        scales[name] = m if name not in scales else torch.maximum(scales[name], m)

    with record_inputs({h: layer.get_submodule(h) for h in heads}, hook):
        for i in range(0, X.shape[0], batch_size):
            layer(X[i : i + batch_size], **kwargs)
    return scales


def _spread(m: torch.Tensor) -> float:
    """max / median of per-channel maxima: how far the largest channel sticks out."""
    return float(m.max() / m.median().clamp(min=1e-12))


@torch.no_grad()
def smooth_layer(layer: nn.Module, layout, X: torch.Tensor, kwargs: dict, cfg: SmoothQuantConfig) -> dict:
    """Collect activation maxima on the float ``layer`` and smooth every norm -> linears group
    in place (``smooth_lm``). The layer stays float and computes the same function.
    Returns per-linear statistics (see :func:`quantize_layer`)."""
    amax = collect_act_scales(layer, layout, X, kwargs)
    site = {name: seq[0] for seq in layout.sequential for name in seq}
    stats: dict = {}
    for name in layout.linear_names():
        m = amax[site[name]]
        stats[name] = {"act_absmax": float(m.max()), "act_spread": _spread(m)}
    if not cfg.smooth:
        return stats
    for norm_name, names in layout.norm_groups:
        linears = [layer.get_submodule(n) for n in names]
        m = amax[site[names[0]]]
        s = smooth_scales(m, [fc.weight for fc in linears], cfg.alpha)
        scale_norm_to_linears(layer.get_submodule(norm_name), linears, s)
        for n in names:
            stats[n].update(
                smooth_prev=norm_name,
                smooth_s_min=float(s.min()),
                smooth_s_max=float(s.max()),
                act_absmax_smoothed=float((m / s).max()),
                act_spread_smoothed=_spread(m / s),
            )
    return stats


@torch.no_grad()
def quantize_layer(layer: nn.Module, layout, X: torch.Tensor, kwargs: dict, cfg: SmoothQuantConfig) -> dict:
    """SmoothQuant on one decoder layer, in place: smooth, then every linear -> ``W8A8Linear``.

    Returns per-linear statistics: ``act_absmax`` and ``act_spread`` (max / median of the
    per-channel maxima of the linear's input) before smoothing, and for smoothed linears
    ``smooth_prev``, ``smooth_s_min``/``smooth_s_max``, ``act_absmax_smoothed``,
    ``act_spread_smoothed``; ``weight_rel_error`` of the INT8 weight relative to the (smoothed)
    float weight.
    """
    stats = smooth_layer(layer, layout, X, kwargs, cfg)
    return replace_linears(layer, layout, lambda linear: W8A8Linear.from_float(linear, cfg), stats)


def quantize_head(linear: nn.Module, X: torch.Tensor, cfg: SmoothQuantConfig) -> W8A8Linear:
    """SmoothQuant's format for an lm_head ``linear`` (vocab, hidden): INT8 weights per channel,
    INT8 activations per token, *without* smoothing (``X`` is not used). The smoothing scale would
    be folded into the final norm and ``W diag(s)`` stored; a tied embedding reading the same
    int8 rows would then be off by ``diag(s)``. The head's input, the final norm's output, is
    quantized per token like every other linear's."""
    return W8A8Linear.from_float(linear, cfg)


SUMMARY = "SmoothQuant W8A8: alpha=0.5 smoothing, INT8 weights per channel, INT8 activations per token (dynamic)"
register(
    Method("smoothquant_w8a8", SmoothQuantConfig(), SUMMARY, quantize_layer=quantize_layer, quantize_head=quantize_head)
)
