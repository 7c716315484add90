"""Equivalence transforms shared by SmoothQuant and AWQ (chapters 2 and 4).

A linear layer computes ``Y = X W^T`` with ``X`` (tokens, in) and ``W`` (out, in). For any
positive vector ``s`` (in,),

    X W^T = (X diag(s)^-1) (W diag(s))^T,

so dividing input channel ``j`` of the activations by ``s_j`` and multiplying input column
``j`` of the weight by ``s_j`` changes nothing in exact arithmetic. The division is free when
``X`` is produced by an operation that is linear per channel: it is folded into that
operation's parameters, offline, once.

* ``scale_norm_to_linears``: ``X`` is the output of a norm (RMSNorm ``w * x / rms(x)`` or
  LayerNorm ``w * (x - mu) / sigma + b``): divide the norm's weight (and bias) by ``s``.
* ``scale_linear_to_linears``: ``X`` is the output of another linear ``prev`` (v_proj -> o_proj,
  up_proj -> down_proj; for up -> down the gate multiplies elementwise, which commutes with a
  per-channel scale): divide ``prev``'s output rows and bias by ``s``.

Both are the ``scale_ln_fcs`` / ``scale_fc_fc`` of mit-han-lab/llm-awq
(``awq/quantize/auto_scale.py``) and casper-hansen/AutoAWQ (``awq/quantize/scale.py``), and the
``ln.weight.div_(scales)`` / ``fc.weight.mul_(scales)`` of mit-han-lab/smoothquant
(``smoothquant/smooth.py``). Unlike the references, which multiply in place in the weights'
dtype (fp16 there), the arithmetic is done in float32 and the result cast back to each
parameter's dtype.

Norms of the form ``(1 + w) * x / rms(x)`` (Gemma) would need ``w <- (1 + w) / s - 1``; the
families qtutor supports (Qwen2, Llama, Mistral) use plain ``w``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from ..errors import QtutorError


def _as_list(linears) -> list[nn.Module]:
    return [linears] if isinstance(linears, nn.Module) else list(linears)


def _check_inputs(linears: Sequence[nn.Module], s: torch.Tensor) -> None:
    for fc in linears:
        if fc.weight.shape[1] != s.numel():
            raise QtutorError(
                f"cannot scale the input columns of a linear with {fc.weight.shape[1]} "
                f"inputs by a vector of {s.numel()} scales"
            )


@torch.no_grad()
def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write the float32 ``value`` into ``param`` in ``param``'s dtype."""
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def _scale_input_columns(linears: Iterable[nn.Module], s: torch.Tensor) -> None:
    """``W[:, j] *= s_j`` for every linear: ``W`` (out, in), ``s`` (in,)."""
    for fc in linears:
        _set(fc.weight, fc.weight.float() * s.to(fc.weight.device).view(1, -1))


@torch.no_grad()
def scale_norm_to_linears(norm: nn.Module, linears, s: torch.Tensor) -> None:
    """Fold ``diag(s)^-1`` into a norm and ``diag(s)`` into the linears it feeds, in place.

    norm: a module with ``weight`` (in,) (and optionally ``bias`` (in,)), e.g. RMSNorm;
    linears: one or several modules with ``weight`` (out_k, in) reading the norm's output;
    s: (in,) positive scales.

    After the call ``norm.weight = w / s`` (``norm.bias = b / s``) and each
    ``linear.weight = W diag(s)``, so every linear's output is unchanged (up to rounding).
    llm-awq ``scale_ln_fcs``; smoothquant ``smooth_ln_fcs`` / ``smooth_ln_fcs_llama_like``.
    """
    linears = _as_list(linears)
    s = s.detach().float().reshape(-1)
    if norm.weight.numel() != s.numel():
        raise QtutorError(f"norm has {norm.weight.numel()} channels but {s.numel()} scales were given")
    _check_inputs(linears, s)
    if not bool(torch.all(s > 0)) or not bool(torch.isfinite(s).all()):
        raise QtutorError("equivalence scales must be positive and finite")
    s_norm = s.to(norm.weight.device)
    _set(norm.weight, norm.weight.float() / s_norm)
    if getattr(norm, "bias", None) is not None:
        _set(norm.bias, norm.bias.float() / s_norm)
    _scale_input_columns(linears, s)


@torch.no_grad()
def scale_linear_to_linears(prev: nn.Module, linears, s: torch.Tensor) -> None:
    """Fold ``diag(s)^-1`` into the output rows of ``prev`` and ``diag(s)`` into the linears
    that read ``prev``'s output, in place.

    prev: linear with ``weight`` (mid, in_prev) and optional ``bias`` (mid,);
    linears: modules with ``weight`` (out_k, mid); s: (mid,) positive scales.

    After the call ``prev.weight[j, :] /= s_j``, ``prev.bias[j] /= s_j`` and
    ``linear.weight[:, j] *= s_j``. Exact whenever what sits between ``prev`` and the linears is
    per-channel linear in ``prev``'s output: attention's ``softmax(QK^T) V`` mixes tokens, not
    channels, of V (v_proj -> o_proj, when each V channel is read once: no grouped-query
    sharing); SwiGLU's ``act(gate) * up`` (up_proj -> down_proj).

    Raises :class:`QtutorError` when ``prev``'s output width differs from ``s`` (e.g. v_proj ->
    o_proj under grouped-query attention: the reference llm-awq slices
    ``fc1.weight[-scales.size(0):]`` for fused qkv; separate q/k/v projections never need it).
    llm-awq / AutoAWQ ``scale_fc_fc``.
    """
    linears = _as_list(linears)
    s = s.detach().float().reshape(-1)
    if prev.weight.shape[0] != s.numel():
        raise QtutorError(
            f"cannot scale the {prev.weight.shape[0]} output rows of a linear by "
            f"{s.numel()} scales: its output is not the next linears' input"
        )
    _check_inputs(linears, s)
    if not bool(torch.all(s > 0)) or not bool(torch.isfinite(s).all()):
        raise QtutorError("equivalence scales must be positive and finite")
    s_prev = s.to(prev.weight.device)
    _set(prev.weight, prev.weight.float() / s_prev.view(-1, 1))
    if getattr(prev, "bias", None) is not None:
        _set(prev.bias, prev.bias.float() / s_prev)
    _scale_input_columns(linears, s)
