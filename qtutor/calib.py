"""Run a model one decoder layer at a time on calibration windows (chapters 2-4).

As in the GPTQ reference code: the embeddings of all calibration windows enter layer 0; each
layer is quantized from the inputs it sees, then run again (quantized) to produce the inputs of
the next layer, so errors of earlier layers are visible to later ones. Every calibrated method
here uses this driver; the AWQ and SmoothQuant references instead calibrate each layer on the
float model's activations (their modules say so). Only one layer at a time needs to sit on the
compute device.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.nn as nn


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0 to record the keyword arguments the model passes to its layers."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.kwargs = None

    def forward(self, hidden_states, *args, **kwargs):
        self.kwargs = kwargs
        raise _Stop


@torch.no_grad()
def layer_inputs(model, layout, windows: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
    """Inputs of decoder layer 0 for ``windows`` (n, seqlen): (X (n, seqlen, hidden), kwargs).

    ``kwargs`` (rotary cos/sin, position ids, mask) are captured for a batch of one window and
    broadcast over any batch of windows of the same length.
    """
    layers = layout.layers(model)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        model(windows[:1].to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        layers[0] = catcher.layer
    kwargs = {k: v for k, v in catcher.kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
    kwargs["use_cache"] = False
    X = layout.embed(model)(windows.to(device))
    return X, kwargs


@torch.no_grad()
def run_layer(layer: nn.Module, X: torch.Tensor, kwargs: dict, batch_size: int = 8) -> torch.Tensor:
    """Outputs of one decoder layer for inputs ``X`` (n, seqlen, hidden), in batches (its already
    quantized linears dequantize once for all batches)."""
    from .quant.base import dequantize_once

    outs = []
    with dequantize_once(layer):
        for i in range(0, X.shape[0], batch_size):
            out = layer(X[i : i + batch_size], **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


@torch.no_grad()
def collect_inputs(
    layer: nn.Module,
    X: torch.Tensor,
    kwargs: dict,
    modules: dict[str, nn.Module],
    fn: Callable[[str, torch.Tensor], None],
    batch_size: int = 8,
) -> None:
    """Call ``fn(name, x)`` with the input ``x`` (..., in_features) each of ``modules`` receives
    when ``layer`` runs on ``X`` (n, seqlen, hidden), in batches; each batch's forward stops as
    soon as every module has had its input, since the rest of the layer is not needed (GPTQ's
    true-sequential passes: the q/k/v pass runs only the first norm)."""
    from .quant.base import dequantize_once

    seen: set = set()

    def hook(name, x):
        fn(name, x)
        seen.add(name)
        if len(seen) == len(modules):
            raise _Stop

    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: hook(name, args[0])) for name, m in modules.items()
    ]
    try:
        with dequantize_once(layer):
            for i in range(0, X.shape[0], batch_size):
                seen.clear()
                try:
                    layer(X[i : i + batch_size], **kwargs)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_inputs(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    """Call ``fn(name, x)`` with the input ``x`` (..., in_features) of every forward of each module."""
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: fn(name, args[0])) for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def sequential(
    model,
    layout,
    windows: torch.Tensor,
    quantize_layer: Callable,
    device: Optional[torch.device] = None,
    progress: bool = False,
    on_output: Optional[Callable[[torch.Tensor], None]] = None,
) -> list:
    """Quantize the decoder layers of ``model`` one after another.

    ``quantize_layer(layer, X, kwargs)`` quantizes ``layer`` in place from its inputs ``X``
    (n, seqlen, hidden) and returns per-layer statistics (collected in the returned list).
    ``on_output(X)``, if given, receives the last (quantized) layer's outputs (n, seqlen,
    hidden) on the calibration device: what the final norm and the lm_head read.
    """
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    layers = layout.layers(model)
    embed = layout.embed(model)
    embed.to(device)
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:
        rotary.to(device)
    X, kwargs = layer_inputs(model, layout, windows, device)
    stats = []
    iterator = range(len(layers))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="layers", leave=False)
    for i in iterator:
        layer = layers[i].to(device)
        stats.append(quantize_layer(layer, X, kwargs))
        X = run_layer(layer, X, kwargs)
        layers[i] = layer.to(home)
    if on_output is not None:
        on_output(X)
    embed.to(home)
    if rotary is not None:
        rotary.to(home)
    return stats
