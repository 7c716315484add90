"""``qtutor.quantize``: apply a registered method to a model, in place (ARCHITECTURE.md section 3)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .errors import QtutorError
from .models import layout_for
from .quant.base import Method, QuantConfig, QuantizedEmbedding, QuantizedLinear, get_method, replace_linear


@dataclass
class QuantReport:
    """What ``quantize`` did: per-linear bits per weight (and errors where measured), time.

    ``layers`` holds every decoder linear and, when the lm_head was quantized (``head=True``),
    ``"lm_head"`` (with ``"tied"``: whether it also serves the embedding lookup)."""

    method: str
    config: Optional[QuantConfig]
    seconds: float
    layers: dict = field(default_factory=dict)  # "layers.3.mlp.down_proj" -> {"bits_per_weight", ...}

    @property
    def head(self) -> bool:
        """Whether the lm_head was quantized."""
        return "lm_head" in self.layers

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight over all quantized linears (the lm_head included when quantized),
        weighted by their sizes."""
        n = sum(s["numel"] for s in self.layers.values())
        return sum(s["bits_per_weight"] * s["numel"] for s in self.layers.values()) / n

    def __str__(self):
        return (
            f"{self.method}: {len(self.layers)} linears, {self.bits_per_weight:.3f} bits/weight, {self.seconds:.1f} s"
        )


def quantize(
    model,
    method: str,
    config: Optional[QuantConfig] = None,
    calib: Optional[torch.Tensor] = None,
    device=None,
    progress: bool = False,
    head: bool = False,
) -> QuantReport:
    """Quantize the linears of ``model``'s decoder layers with ``method``, in place.

    ``config`` defaults to the method's registered default; ``calib`` (n, seqlen) token windows
    are required by calibrated methods (GPTQ, AWQ, SmoothQuant). Without ``head``, embeddings and
    the (tied) lm_head keep the model's dtype.

    ``head=True`` also quantizes the lm_head (vocab, hidden) with the method's own format
    (:func:`quantize_lm_head`): RTN's codes, palettized LUTs, NF4 as they are; GPTQ, AWQ (its
    clipping search only) and SmoothQuant (W8A8 without smoothing) from the final norm's outputs
    on ``calib``, after the quantized decoder layers. A tied head (Qwen2's, whose lm_head is the
    token embedding) is stored once: the embedding becomes a
    :class:`~qtutor.quant.base.QuantizedEmbedding` that reads its rows from the packed head.
    ``fp16_baseline`` has no quantized head (a one-line error).
    """
    m = get_method(method)
    cfg = m.default_config if config is None else config
    if m.default_config is not None and not isinstance(cfg, type(m.default_config)):
        raise QtutorError(f"{method} takes a {type(m.default_config).__name__}, not a {type(cfg).__name__}")
    if not isinstance(head, bool):
        raise QtutorError(f"head must be True or False, got {head!r}")
    if head and m.head_reason is not None:
        raise QtutorError(f"head=True: {m.head_reason}; quantize {method} without head=True")
    layout = check_model(model, head=head)
    device = None if device is None else parse_device(device)
    if calib is not None:
        check_calib(calib, model)
    layers = layout.layers(model)
    t0 = time.perf_counter()
    stats: dict = {}
    outputs: list = []  # the last decoder layer's outputs, for a calibrated head
    if m.needs_calib:
        if calib is None:
            raise QtutorError(
                f"{method} needs calibration windows: pass calib=(n, seqlen) token ids "
                f"(see qtutor.data.calibration_windows)"
            )
        from .calib import sequential

        per_layer = sequential(
            model,
            layout,
            calib,
            lambda layer, X, kw: m.quantize_layer(layer, layout, X, kw, cfg),
            device=device,
            progress=progress,
            on_output=outputs.append if head else None,
        )
        for i, s in enumerate(per_layer):
            stats.update({f"layers.{i}.{k}": v for k, v in (s or {}).items()})
    else:
        todo = [
            (i, layer, name, linear) for i, layer in enumerate(layers) for name, linear in layout.linears(layer).items()
        ]
        while todo:  # one linear at a time, or about 2^26 weights at a time with from_float_many
            take = 1
            if m.from_float_many is not None:
                size = todo[0][3].weight.numel()
                while take < len(todo) and size + todo[take][3].weight.numel() <= 1 << 26:
                    size += todo[take][3].weight.numel()
                    take += 1
            batch, todo = todo[:take], todo[take:]
            linears = [linear for _, _, _, linear in batch]
            qs = [m.from_float(linears[0], cfg)] if take == 1 else m.from_float_many(linears, cfg)
            for (i, layer, name, _), q in zip(batch, qs):
                stats[f"layers.{i}.{name}"] = {"weight_rel_error": replace_linear(layer, name, q)}
    modules = {
        f"layers.{i}.{n}": linear for i, layer in enumerate(layers) for n, linear in layout.linears(layer).items()
    }
    if head:
        stats["lm_head"] = quantize_lm_head(model, layout, m, cfg, outputs[0] if outputs else None)
        modules["lm_head"] = model.get_output_embeddings()
    for key, module in modules.items():
        entry = stats.setdefault(key, {})
        entry["numel"] = module.in_features * module.out_features
        entry["bits_per_weight"] = (
            module.bits_per_weight if isinstance(module, QuantizedLinear) else 8.0 * module.weight.element_size()
        )
    return QuantReport(method, cfg, time.perf_counter() - t0, stats)


@torch.no_grad()
def quantize_lm_head(model, layout, method: Method, cfg, X: Optional[torch.Tensor] = None) -> dict:
    """Put ``method``'s quantized layer in place of ``model``'s float lm_head -> its statistics
    ``{"weight_rel_error", "tied"}``.

    Methods without calibration quantize the head as any linear (``method.from_float``); the
    calibrated ones call ``method.quantize_head(head, final_norm(X), cfg)``, ``X`` (n, seqlen,
    hidden) being the last decoder layer's outputs. If the head is tied to the token embedding
    (one weight), the embedding becomes a :class:`QuantizedEmbedding` that gathers its rows from
    the packed head: the packed bytes are stored, and counted by ``qtutor.eval.memory_report``,
    once. An untied embedding keeps its dtype.
    """
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    tied = getattr(emb, "weight", None) is head.weight
    if method.needs_calib:
        if X is None:
            raise QtutorError(f"{method.name}'s head needs the final norm's calibration inputs; pass calib windows")
        norm = layout.final_norm(model)
        home = next(norm.parameters()).device
        inputs = norm.to(X.device)(X)
        norm.to(home)
        q = method.quantize_head(head, inputs, cfg)
        del inputs
    else:
        q = method.from_float(head, cfg)
    W = head.weight.detach()
    err = (q.dequantize().float().to(W.device) - W.float()).norm() / W.float().norm().clamp(min=1e-12)
    q = q.to(W.device)
    model.set_output_embeddings(q)
    if tied:
        model.set_input_embeddings(QuantizedEmbedding(q, W.dtype, emb.padding_idx))
    return {"weight_rel_error": float(err), "tied": tied}


def parse_device(spec) -> torch.device:
    """``spec`` ('cpu', 'cuda', 'cuda:N' or a ``torch.device``) as a device that exists here,
    or a one-line :class:`QtutorError` saying which to use instead."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise QtutorError(f"unknown device {spec!r}; use 'cpu' or 'cuda' (or 'cuda:N')") from err
    if device.type not in ("cpu", "cuda"):
        raise QtutorError(f"device {spec!r} is not supported by qtutor; use 'cpu' or 'cuda'")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise QtutorError(f"device {spec!r} but no CUDA device is available; use 'cpu'")
        if device.index is not None and device.index >= count:
            raise QtutorError(f"device {spec!r} but there are {count} CUDA devices; use 'cuda:0' to 'cuda:{count - 1}'")
    return device


def check_model(model, head: bool = False):
    """The layout of ``model``, after checking that it is a float causal LM that ``quantize`` can
    work on: a supported family, its decoder linears (and with ``head`` its lm_head) not yet
    quantized, their weights finite."""
    if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
        raise QtutorError(f"quantize needs a causal LM such as qtutor.load_model returns, got {type(model).__name__}")
    layout = layout_for(model)
    linears = [
        (f"layers.{i}.{name}", linear)
        for i, layer in enumerate(layout.layers(model))
        for name, linear in layout.linears(layer).items()
    ]
    if head:
        linears.append(("lm_head", model.get_output_embeddings()))
    for where, linear in linears:
        if isinstance(linear, QuantizedLinear):
            raise QtutorError(
                f"the model is already quantized ({where} is a "
                f"{type(linear).__name__}); quantize a fresh float copy "
                f"(load the model again, or copy.deepcopy it before quantizing)"
            )
        if not isinstance(linear, nn.Linear):
            raise QtutorError(
                f"{where} is a {type(linear).__name__}, not an nn.Linear; "
                f"quantize a float model as transformers builds it"
            )
        bad = int((~torch.isfinite(linear.weight.detach())).sum())
        if bad:
            raise QtutorError(
                f"{where}.weight holds {bad} NaN/Inf values; quantization would "
                f"hide them: repair or re-download the model weights"
            )
    return layout


def check_calib(calib, model) -> None:
    """``calib`` must be (n, seqlen) integer token ids within the model's vocabulary."""
    how = "pass (n, seqlen) token ids, e.g. qtutor.data.calibration_windows(ids, n, seqlen)"
    if not isinstance(calib, torch.Tensor):
        raise QtutorError(f"calib is a {type(calib).__name__}, not a tensor; {how}")
    if calib.dtype == torch.bool or calib.is_floating_point() or calib.is_complex():
        raise QtutorError(f"calib holds {str(calib.dtype).replace('torch.', '')} values, not integer token ids; {how}")
    if calib.dim() != 2 or calib.numel() == 0:
        raise QtutorError(f"calib has shape {tuple(calib.shape)}, not (n, seqlen) with n, seqlen >= 1; {how}")
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(calib.min()), int(calib.max())
    if low < 0 or high >= vocab:
        raise QtutorError(
            f"calib holds token ids from {low} to {high}, outside the model's vocabulary "
            f"of {vocab}; tokenize with the model's own tokenizer"
        )
