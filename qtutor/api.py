"""``qtutor.quantize``: apply a registered method to a model, in place (DESIGN.md section 3)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import QtutorError
from .models import layout_for
from .quant.base import QuantConfig, QuantizedLinear, get_method


@dataclass
class QuantReport:
    """What ``quantize`` did: per-linear bits per weight (and errors where measured), time."""

    method: str
    config: Optional[QuantConfig]
    seconds: float
    layers: dict = field(default_factory=dict)  # "layers.3.mlp.down_proj" -> {"bits_per_weight", ...}

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight over all quantized linears, weighted by their sizes."""
        n = sum(s["numel"] for s in self.layers.values())
        return sum(s["bits_per_weight"] * s["numel"] for s in self.layers.values()) / n

    def __str__(self):
        return (f"{self.method}: {len(self.layers)} linears, {self.bits_per_weight:.3f} bits/weight, "
                f"{self.seconds:.1f} s")


def quantize(model, method: str, config: Optional[QuantConfig] = None,
             calib: Optional[torch.Tensor] = None, device=None, progress: bool = False) -> QuantReport:
    """Quantize the linears of ``model``'s decoder layers with ``method``, in place.

    ``config`` defaults to the method's registered default; ``calib`` (n, seqlen) token windows
    are required by calibrated methods (GPTQ, AWQ, SmoothQuant). Embeddings and the (tied)
    lm_head keep the model's dtype.
    """
    m = get_method(method)
    cfg = m.default_config if config is None else config
    if m.default_config is not None and not isinstance(cfg, type(m.default_config)):
        raise QtutorError(f"{method} takes a {type(m.default_config).__name__}, "
                          f"not a {type(cfg).__name__}")
    layout = layout_for(model)
    layers = layout.layers(model)
    t0 = time.perf_counter()
    stats: dict = {}
    if m.needs_calib:
        if calib is None:
            raise QtutorError(f"{method} needs calibration windows: pass calib=(n, seqlen) token ids "
                              f"(see qtutor.data.calibration_windows)")
        from .calib import sequential
        per_layer = sequential(model, layout, calib,
                               lambda layer, X, kw: m.quantize_layer(layer, layout, X, kw, cfg),
                               device=device, progress=progress)
        for i, s in enumerate(per_layer):
            stats.update({f"layers.{i}.{k}": v for k, v in (s or {}).items()})
    else:
        for i, layer in enumerate(layers):
            for name, linear in layout.linears(layer).items():
                q = m.from_float(linear, cfg)
                W = linear.weight.detach().float()
                err = (q.dequantize().float() - W).norm() / W.norm().clamp(min=1e-12)
                stats[f"layers.{i}.{name}"] = {"weight_rel_error": float(err)}
                layer.set_submodule(name, q.to(linear.weight.device))
    for i, layer in enumerate(layers):
        for name, module in layout.linears(layer).items():
            entry = stats.setdefault(f"layers.{i}.{name}", {})
            entry["numel"] = module.in_features * module.out_features
            entry["bits_per_weight"] = (module.bits_per_weight if isinstance(module, QuantizedLinear)
                                        else 8.0 * module.weight.element_size())
    return QuantReport(method, cfg, time.perf_counter() - t0, stats)
