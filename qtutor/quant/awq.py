"""AWQ: activation-aware weight quantization (Lin et al., 2024; book chapter 4).

The observation: a few input channels ``j`` carry activations much larger than the rest, and
the weight columns ``W[:, j]`` that read them matter most. Rounding error on ``W[:, j]`` is
multiplied by ``|X[:, j]|``. AWQ protects those columns without mixed precision: scale
``W[:, j]`` up by ``s_j > 1`` before quantizing (its relative rounding error shrinks, since the
group's step size is set by the group's largest weight), and divide ``X[:, j]`` by ``s_j``,
folding the division into the previous norm or linear (:mod:`qtutor.quant.transforms`):

    Q(W diag(s)) (diag(s)^-1 X^T)  ~=  W X^T.

``s = mean_tokens(|X|)^ratio``, one exponent per group of linears, found by grid search on the
block output's mean squared error. Then each weight group's clipping range is shrunk if that
lowers the linear's output error, and the weights are quantized with plain RTN.

Follows mit-han-lab/llm-awq ``awq/quantize/pre_quant.py`` (``run_awq``),
``auto_scale.py`` (``auto_scale_block``, ``_search_module_scale``, ``apply_scale``) and
``auto_clip.py`` (``auto_clip_layer``, ``apply_clip``), and casper-hansen/AutoAWQ
``awq/quantize/quantizer.py`` (``AwqQuantizer._search_best_scale``, ``_compute_best_scale``,
``_compute_best_clip``; ``duo_scaling``) and ``scale.py``. Per decoder layer, in ``run_awq``'s
order:

1. run the float layer once and capture the inputs of its linears;
2. for every group (norm -> q/k/v, v -> o, norm -> gate/up, up -> down), search the scale on the
   float layer's captured inputs (``auto_scale_block``: each search restores the weights);
3. apply all scales (``apply_scale``), dividing the captured inputs by ``s`` as well;
4. search and apply per-group clipping for every linear but q_proj/k_proj (``auto_clip_block``);
5. quantize every linear with RTN (asymmetric, groups of ``group_size``) into ``UniformLinear``.

Searching every group on the float layer and then applying the scales gives the same scales as
applying each before searching the next: the transforms leave every captured input unchanged
up to the division by ``s``, and no search touches a weight that an earlier group rescaled
(v -> o inspects only o_proj, up -> down only down_proj).

Deliberate differences from the references, all documented where they happen:

* the quantization grid is :mod:`qtutor.quant.rtn`'s (range ``[min(w, 0), max(w, 0)]``, fp16
  scale), the one ``UniformLinear`` stores, so the search optimizes what is kept; the
  references' ``pseudo_quantize_tensor`` uses ``[min(w), max(w)]`` in the weights' dtype;
* ``group_size`` need not divide the width (the last group is shorter, as in RTN);
* ``qtutor.quantize`` feeds layer ``i`` the outputs of the already *quantized* layers
  ``0..i-1`` (GPTQ's protocol, shared by every calibrated method here); ``run_awq`` feeds it
  the outputs of the float (scaled, clipped, unquantized) layers and quantizes at the end;
* the scale search runs on at most ``max_search_tokens`` calibration tokens (whole windows):
  by default 65536 = 128 x 512, the references' calibration budget (AutoAWQ
  ``max_calib_samples=128``, ``max_calib_seq_len=512``; llm-awq ``n_samples=128``,
  ``seqlen=512``); lower it on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..calib import run_layer
from ..errors import QtutorError
from .base import Method, register, replace_linears
from .rtn import RTNConfig, UniformGridConfig, UniformLinear, UniformWeight, fake_quantize, group_layout
from .rtn import quantize_weight as rtn_quantize_weight
from .transforms import scale_linear_to_linears, scale_norm_to_linears

#: linears never clipped: "due to qk bmm, it is hard to clip precisely" (llm-awq auto_clip.py,
#: which skips names containing "q_" or "k_")
NO_CLIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class AWQConfig(UniformGridConfig):
    """AWQ settings; defaults are the references' (llm-awq ``q_config`` with ``zero_point=True``,
    ``q_group_size=128``; AutoAWQ ``duo_scaling`` off as in llm-awq).

    The defaults, measured (``benchmarks/peers_stories260k.csv``, ``peers_explain_stories260k.csv``:
    stories260K, the whole WikiText-2 test, 4 bits per row, symmetric): the clipping search is worth
    much of AWQ's gain (131.669 with it, 144.547 without; RTN 149.778; llm-compressor's AWQ, which
    has no clipping search but duo scaling, 142.429; qtutor with both of those choices 132.994;
    with all five of its choices, the grid, float inputs and ``ratio_grid`` included, 137.967,
    asymmetric 137.835 against its 137.839; ``benchmarks/README.md`` tells the whole story).
    Duo scaling is not a clear win: 132.495 with it on
    stories260K (worse), 39.596 against 39.713 on the embedded model (better;
    ``peers_qtutor-tiny.csv``), so llm-awq's choice stays.

    bits, group_size, sym: the final RTN quantizer (and the one simulated during the searches).
    n_grid: ratios ``i / n_grid``, ``i = 0..n_grid-1`` for ``s = x_mean^ratio`` (ratio 0 is RTN).
    ratio_grid: ``"llm-awq"`` (the default: the ratios above, all with or all without duo
      scaling) or ``"llm-compressor"`` (``AWQModifier._get_grid_search_params``: without duo
      scaling ``i / (n_grid - 1)``, ``i = 0..n_grid-1``, so ratio 1 is tried; with it, the
      identity ``s = 1`` (plain RTN) and then ``i / (n_grid - 2)``, ``i = 0..n_grid-2``, with duo
      scaling). An experiment of ``benchmarks/peers_explain.py``; the default is unchanged.
    duo_scaling: AutoAWQ's ``s = x_mean^ratio / (w_mean^(1-ratio) + 1e-4)``.
    clip: run the clipping search (llm-awq ``mse_range``, AutoAWQ ``apply_clip``).
    max_shrink, n_clip_grid: clip thresholds ``max|w| * (1 - i / n_clip_grid)`` for
      ``i = 0..int(max_shrink * n_clip_grid)-1`` (so down to 55% of the max by default;
      ``i = 0``, no clipping, is always tried).
    n_clip_tokens: the clipping search uses every ``n_tokens // n_clip_tokens``-th token
      (``n_sample_token=512`` in ``auto_clip_layer``).
    max_search_tokens: at most this many calibration tokens (whole windows, evenly spaced: the
      attention block needs whole sequences) for the scale search's block forwards and the
      clipping search's inputs; ``None`` uses all. The default 65536 = 128 x 512 is the
      references' whole calibration set (AutoAWQ ``max_calib_samples`` x ``max_calib_seq_len``),
      so with qtutor's 128 x 2048 calibration windows the search sees as many tokens as the
      references'. The activation statistic ``x_mean`` always uses all tokens. Captured inputs
      take ``tokens x (3 hidden + intermediate)`` floats per layer (2 GB for Qwen2-0.5B at the
      default, float32); on 2 CPU cores 4096 is a reasonable cap for a 0.5B model.
    """

    n_grid: int = 20
    ratio_grid: str = "llm-awq"
    duo_scaling: bool = False
    clip: bool = True
    max_shrink: float = 0.5
    n_clip_grid: int = 20
    n_clip_tokens: int = 512
    max_search_tokens: Optional[int] = 128 * 512

    def __post_init__(self):
        super().__post_init__()  # the grid's checks
        if self.n_grid < 1 or self.n_clip_grid < 1 or self.n_clip_tokens < 1:
            raise QtutorError("n_grid, n_clip_grid and n_clip_tokens must be at least 1")
        if self.ratio_grid not in ("llm-awq", "llm-compressor"):
            raise QtutorError(f"ratio_grid {self.ratio_grid!r}: choose llm-awq or llm-compressor")
        if self.ratio_grid == "llm-compressor" and self.n_grid < 3:
            raise QtutorError("ratio_grid='llm-compressor' needs n_grid >= 3")
        if not 0.0 <= self.max_shrink < 1.0:
            raise QtutorError(f"max_shrink {self.max_shrink} must lie in [0, 1)")
        if self.max_search_tokens is not None and self.max_search_tokens < 1:
            raise QtutorError("max_search_tokens must be positive (or None for all tokens)")

    def grid_points(self) -> list[tuple[float, bool]]:
        """The (ratio, duo scaling) pairs the scale search tries, in order (see ``ratio_grid``)."""
        if self.ratio_grid == "llm-awq":
            return [(i / self.n_grid, self.duo_scaling) for i in range(self.n_grid)]
        if not self.duo_scaling:
            return [(i / (self.n_grid - 1), False) for i in range(self.n_grid)]
        return [(0.0, False)] + [(i / (self.n_grid - 2), True) for i in range(self.n_grid - 1)]

    def rtn(self) -> RTNConfig:
        """The RTN quantizer AWQ simulates during its searches and applies at the end."""
        return RTNConfig(bits=self.bits, group_size=self.group_size, sym=self.sym)


# --------------------------------------------------------------------------- pure functions
def activation_mean(X: torch.Tensor) -> torch.Tensor:
    """``x_mean_j = mean_tokens |X_tj|``: (in,) float32 from ``X`` (..., in).

    llm-awq ``get_act_scale``: ``x.abs().view(-1, x.shape[-1]).mean(0)``.
    """
    return X.detach().abs().reshape(-1, X.shape[-1]).float().mean(0)


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ's ``w_mean`` (duo scaling): each weight scaled to [0, 1] within its quantization
    group (``|w| / (max|w| + 1e-6)``), then averaged over the output rows of all ``weights``
    (each (out_k, in)). Returns (in,) float32."""
    W = torch.cat([w.detach().float() for w in weights], dim=0)
    out_features, in_features = W.shape
    gs, n_groups = group_layout(in_features, group_size)
    Wg = F.pad(W.abs(), (0, n_groups * gs - in_features)).reshape(out_features, n_groups, gs)
    w_scale = Wg / (Wg.amax(dim=-1, keepdim=True) + 1e-6)
    return w_scale.reshape(out_features, -1)[:, :in_features].mean(0)


def candidate_scales(x_mean: torch.Tensor, ratio: float, w_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The scale vector ``s`` (in,) for one grid point (llm-awq ``_search_module_scale``):

    ``s = clamp(x_mean^ratio, min=1e-4)``, then ``s / sqrt(max(s) min(s))`` so that the scales
    straddle 1 (a geometric centring; the loss does not depend on it up to rounding).
    With ``w_mean`` (duo scaling): ``s = clamp(x_mean^ratio / (w_mean^(1-ratio) + 1e-4), 1e-4)``.
    Non-finite entries become 1 (AutoAWQ).
    """
    if w_mean is None:
        s = x_mean.float().pow(ratio).clamp(min=1e-4)
    else:
        s = (x_mean.float().pow(ratio) / (w_mean.float().pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    s[~torch.isfinite(s)] = 1.0
    return s


@torch.no_grad()
def search_scale(
    block: nn.Module,
    linears: list[nn.Module],
    x: torch.Tensor,
    x_mean: torch.Tensor,
    cfg: AWQConfig,
    kwargs: Optional[dict] = None,
) -> dict:
    """Grid search of AWQ's scale for ``linears`` (which all read ``x``) on ``block``'s output.

    block: the module whose output is compared (the attention for q/k/v, the MLP for gate/up,
      the consumer linear itself for v -> o and up -> down), called as ``block(x, **kwargs)``;
    x: (n, seqlen, in) float inputs of ``linears``; x_mean: (in,) activation statistic.

    For each ratio of ``cfg.grid_points()`` (``i / n_grid`` by default): ``W <- Q(W diag(s)) diag(s)^-1`` for every linear, run the
    block, ``loss = mean((out - out_float)^2)``; the weights are restored after each try and the
    strictly smallest loss wins (ratio 0, plain RTN, on ties).
    Returns ``{"scales": s (in,), "ratio", "loss", "loss_rtn", "history"}``.
    """
    kwargs = kwargs or {}
    org_out = run_layer(block, x, kwargs)
    originals = [fc.weight.detach().clone() for fc in linears]
    w_mean = weight_mean(originals, cfg.group_size) if cfg.duo_scaling else None

    def loss_with(s: Optional[torch.Tensor]) -> float:
        for fc, W in zip(linears, originals):
            if s is None:
                Wq = fake_quantize(W, cfg)
            else:
                sv = s.to(W.device).view(1, -1)
                Wq = fake_quantize(W.float() * sv, cfg) / sv
            fc.weight.copy_(Wq.to(fc.weight.dtype))
        out = run_layer(block, x, kwargs)
        for fc, W in zip(linears, originals):
            fc.weight.copy_(W)
        return (org_out - out).float().pow(2).mean().item()  # float prevents overflow

    history, best = [], None
    for ratio, duo in cfg.grid_points():
        s = candidate_scales(x_mean, ratio, w_mean if duo else None)
        loss = loss_with(s)
        history.append(loss)
        if best is None or loss < best["loss"]:
            best = {"scales": s, "ratio": ratio, "loss": loss}
    if best is None or not torch.isfinite(best["scales"]).all():
        raise QtutorError(f"AWQ scale search failed (losses {history})")
    best["loss_rtn"] = history[0] if cfg.grid_points()[0] == (0.0, False) else loss_with(None)  # s = 1 first?
    best["history"] = history
    return best


@torch.no_grad()
def search_clip(W: torch.Tensor, X: torch.Tensor, cfg: AWQConfig, oc_batch_size: int = 256) -> dict:
    """AWQ's clipping search for one linear (llm-awq ``auto_clip_layer``).

    W: (out, in) weight (already scaled); X: (..., in) its inputs (already divided by ``s``).
    For each output row and each group of ``group_size`` input columns, try the symmetric
    clipping ranges ``[-m (1 - i/n), m (1 - i/n)]`` (``m`` the group's ``max|w|``,
    ``i < max_shrink * n``), quantize the clipped group, and keep the threshold with the
    smallest mean squared error of that group's partial output ``sum_k X_tk W_ok`` over the
    sampled tokens (every ``n_tokens // n_clip_tokens``-th token).
    Returns ``{"max_val": (out, n_groups) chosen thresholds, "org_max": (out, n_groups) the
    groups' ``max|w|``, "err_before": (out, n_groups) (no clipping), "err_after": (out, n_groups),
    "group_size": columns per group}``.
    """
    out_features, in_features = W.shape
    gs, n_groups = group_layout(in_features, cfg.group_size)
    pad = n_groups * gs - in_features  # zero columns: no output, never widen [min(w,0), max(w,0)]
    Wg = F.pad(W.detach().float(), (0, pad)).reshape(out_features, n_groups, gs)
    X = X.detach().reshape(-1, in_features)
    X = X[0 :: max(1, X.shape[0] // cfg.n_clip_tokens)]  # AutoAWQ's max(1, .): llm-awq divides by 0 below 512
    Xg = F.pad(X.float(), (0, pad)).reshape(-1, n_groups, gs).transpose(0, 1)  # (groups, tokens, gs)
    rtn_cfg = cfg.rtn().replace(group_size=gs)
    best_all, max_all, before_all, after_all = [], [], [], []
    for r0 in range(0, out_features, oc_batch_size):  # reference: oc_batch_size 256 "prevent OOM"
        w = Wg[r0 : r0 + oc_batch_size]  # (co, groups, gs)
        co = w.shape[0]
        org_max = w.abs().amax(dim=-1, keepdim=True)  # (co, groups, 1)
        org_out = torch.bmm(Xg, w.permute(1, 2, 0))  # (groups, tokens, co) = (input_feat * w).sum(-1)
        best = org_max.clone()
        min_err = torch.full((co, n_groups, 1), float("inf"), device=W.device)
        err0 = None
        for i_s in range(max(1, int(cfg.max_shrink * cfg.n_clip_grid))):  # i_s = 0: no clipping
            max_val = org_max * (1 - i_s / cfg.n_clip_grid)
            cur = torch.clamp(w, -max_val, max_val)
            q = fake_quantize(cur.reshape(co, -1), rtn_cfg).reshape(co, n_groups, gs)
            cur_out = torch.bmm(Xg, q.permute(1, 2, 0))
            err = (cur_out - org_out).pow(2).mean(dim=1).transpose(0, 1).unsqueeze(-1)  # (co, groups, 1)
            if err0 is None:
                err0 = err
            better = err < min_err
            min_err[better] = err[better]
            best[better] = max_val[better]
        best_all.append(best.squeeze(-1))
        max_all.append(org_max.squeeze(-1))
        before_all.append(err0.squeeze(-1))
        after_all.append(min_err.squeeze(-1))
    return {
        "max_val": torch.cat(best_all),
        "org_max": torch.cat(max_all),
        "err_before": torch.cat(before_all),
        "err_after": torch.cat(after_all),
        "group_size": gs,
    }


@torch.no_grad()
def apply_clip(linear: nn.Module, max_val: torch.Tensor, group_size: int) -> None:
    """Clamp each (row, group) of ``linear.weight`` (out, in) to ``[-max_val, max_val]``,
    ``max_val`` (out, n_groups) (llm-awq ``apply_clip``)."""
    W = linear.weight
    in_features = W.shape[1]
    gs, _ = group_layout(in_features, group_size)
    m = max_val.to(W.device).float().repeat_interleave(gs, dim=1)[:, :in_features]
    W.copy_(torch.clamp(W.float(), -m, m).to(W.dtype))


@dataclass
class AWQWeight:
    """AWQ's result on one matrix: ``q`` quantizes the scaled (and clipped) ``W diag(s)``, so the
    layer computes ``(X / s) @ q.dequantize().T``; in a model ``1 / s`` (in,) is folded into the
    previous norm or linear. ``info`` holds the scale search's result (``ratio``, ``loss``,
    ``loss_rtn``, ``history``) and, with ``cfg.clip``, the clipping search's."""

    q: UniformWeight
    s: torch.Tensor
    info: dict

    def dequantize(self) -> torch.Tensor:
        """The weight the layer effectively applies to ``X``: ``Q(W diag(s)) diag(s)^-1`` (out, in)."""
        return self.q.dequantize() / self.s.view(1, -1)


@torch.no_grad()
def quantize_weight(W: torch.Tensor, X: torch.Tensor, cfg: AWQConfig) -> AWQWeight:
    """AWQ on a single linear, the whole algorithm on one matrix (chapter 4).

    W: (out, in) weight; X: (tokens, in) its calibration inputs. The loss is the linear's own
    output error ``mean((X W^T - (X diag(s)^-1) Q(W diag(s))^T)^2)``.
    """
    W = W.detach().float()
    X = X.detach().float().reshape(1, -1, W.shape[1])  # one "window": _forward batches over windows
    linear = nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device)
    linear.weight.copy_(W)
    info = search_scale(linear, [linear], X, activation_mean(X), cfg)
    s = info["scales"]
    linear.weight.copy_(W * s.view(1, -1))
    if cfg.clip:
        info["clip"] = search_clip(linear.weight, X / s, cfg)
        apply_clip(linear, info["clip"]["max_val"], info["clip"]["group_size"])
    return AWQWeight(rtn_quantize_weight(linear.weight, cfg.rtn()), s, info)


# --------------------------------------------------------------------------- one decoder layer
@dataclass
class ScaleGroup:
    """One AWQ scaling: ``prev``'s output is divided by ``s``, the ``linears`` reading it are
    multiplied by ``s``; the loss is measured on ``inspect``'s output. ``skipped`` says why a
    pair of the layout was not scaled."""

    prev: str
    linears: tuple[str, ...]
    inspect: str
    prev_is_norm: bool
    skipped: Optional[str] = None
    result: dict = field(default_factory=dict)


def scale_groups(layer: nn.Module, layout) -> list[ScaleGroup]:
    """The groups of llm-awq ``auto_scale_block``'s ``LlamaDecoderLayer`` branch, in its order:
    input_layernorm -> q/k/v (loss on the attention output), v_proj -> o_proj (loss on o_proj's
    output), post_attention_layernorm -> gate/up (loss on the MLP output), up_proj -> down_proj.
    """
    groups = []
    norm_of = {names[0]: (norm, names) for norm, names in layout.norm_groups}
    pair_of = {nxt: prev for prev, nxt in layout.linear_pairs}
    for seq in layout.sequential:
        head = seq[0]
        if head in norm_of:
            norm, names = norm_of[head]
            parents = {n.rsplit(".", 1)[0] for n in names}
            if len(parents) != 1:
                raise QtutorError(f"linears {names} fed by {norm} do not share a parent module")
            groups.append(ScaleGroup(norm, tuple(names), parents.pop(), True))
        elif len(seq) == 1 and head in pair_of:
            prev = pair_of[head]
            g = ScaleGroup(prev, (head,), head, False)
            width_out = layer.get_submodule(prev).weight.shape[0]
            width_in = layer.get_submodule(head).weight.shape[1]
            # llm-awq: `if module.self_attn.v_proj.weight.shape == module.self_attn.o_proj.weight.shape`
            # (PR #67). With grouped-query attention each V channel feeds several heads, so o_proj
            # reads more channels than v_proj writes and there is no per-channel fold: skip.
            if width_out != width_in:
                g.skipped = (
                    f"{prev} writes {width_out} channels but {head} reads {width_in} "
                    f"(grouped-query attention): no equivalent scaling, skipped as in llm-awq"
                )
            groups.append(g)
    return groups


def _search_subset(n: int, seqlen: int, max_tokens: Optional[int]) -> torch.Tensor:
    """Indices of the windows the scale search runs on: all, or evenly spaced whole windows."""
    if max_tokens is None or max_tokens >= n * seqlen:
        return torch.arange(n)
    k = max(1, max_tokens // seqlen)
    return torch.linspace(0, n - 1, k).round().long().unique()


@torch.no_grad()
def capture_inputs(
    layer: nn.Module, layout, X: torch.Tensor, kwargs: dict, keep: torch.Tensor, batch_size: int = 8
) -> tuple[dict, dict]:
    """Run the float ``layer`` on ``X`` (n, seqlen, hidden); for the first linear of each group
    of ``layout.sequential`` (linears of one group read the same input) return its inputs on the
    windows ``keep`` ((k, seqlen, in)) and its ``x_mean`` over all windows ((in,)).
    (llm-awq ``run_awq``'s ``cache_input_hook``.)"""
    from ..calib import record_inputs

    heads = [seq[0] for seq in layout.sequential]
    feats: dict = {h: [] for h in heads}
    sums: dict = {}
    counts: dict = {}
    keep_mask = torch.zeros(X.shape[0], dtype=torch.bool)
    keep_mask[keep] = True
    state = {}

    def hook(name, x):
        x = x.detach()
        flat = x.reshape(-1, x.shape[-1])
        sums[name] = sums.get(name, 0) + flat.abs().float().sum(0)
        counts[name] = counts.get(name, 0) + flat.shape[0]
        sel = state["keep"].to(x.device)
        if bool(sel.any()):
            feats[name].append(x[sel])

    with record_inputs({h: layer.get_submodule(h) for h in heads}, hook):
        for i in range(0, X.shape[0], batch_size):
            state["keep"] = keep_mask[i : i + batch_size]
            layer(X[i : i + batch_size], **kwargs)
    inputs = {h: torch.cat(v) for h, v in feats.items()}
    x_means = {h: sums[h] / counts[h] for h in heads}
    return inputs, x_means


@torch.no_grad()
def scale_layer(
    layer: nn.Module, layout, X: torch.Tensor, kwargs: dict, cfg: AWQConfig
) -> tuple[list[ScaleGroup], dict]:
    """Steps 1-3 for one decoder layer: capture, search every group's scale on the float
    layer, apply them all (the layer stays float and computes the same function).

    Returns the groups (with ``result``) and the captured inputs of each sequential group,
    already divided by the scales (llm-awq ``apply_scale(..., input_feat_dict)``), keyed by
    the group's first linear.
    """
    keep = _search_subset(X.shape[0], X.shape[1], cfg.max_search_tokens)
    inputs, x_means = capture_inputs(layer, layout, X, kwargs, keep)
    site = {name: seq[0] for seq in layout.sequential for name in seq}
    groups = scale_groups(layer, layout)
    for g in groups:
        if g.skipped:
            continue
        block = layer.get_submodule(g.inspect)
        block_kwargs = kwargs if g.inspect == layout.attention else {}
        head = site[g.linears[0]]
        g.result = search_scale(
            block, [layer.get_submodule(n) for n in g.linears], inputs[head], x_means[head], cfg, block_kwargs
        )
    for g in groups:  # apply_scale
        if g.skipped:
            continue
        s = g.result["scales"]
        prev = layer.get_submodule(g.prev)
        linears = [layer.get_submodule(n) for n in g.linears]
        if g.prev_is_norm:
            scale_norm_to_linears(prev, linears, s)
        else:
            scale_linear_to_linears(prev, linears, s)
        head = site[g.linears[0]]
        inputs[head] = inputs[head] / s.to(inputs[head].device, inputs[head].dtype)
    return groups, inputs


@torch.no_grad()
def quantize_layer(layer: nn.Module, layout, X: torch.Tensor, kwargs: dict, cfg: AWQConfig) -> dict:
    """AWQ on one decoder layer, in place: scale, clip, quantize (``run_awq`` + real quantization).

    X: (n, seqlen, hidden) inputs of the layer; kwargs: how the model calls it.
    Returns per-linear statistics: ``scale_prev`` (what the scale was folded into),
    ``scale_group``, ``best_ratio``, ``loss_rtn`` (block loss of plain RTN, ratio 0) and
    ``loss_awq`` (best block loss), ``loss_history``; ``scale_skipped`` with the reason when a
    pair was skipped (v -> o under grouped-query attention); ``clip_err_before`` /
    ``clip_err_after`` (mean output error of the clipping search without / with clipping) and
    ``clip_ratio`` (mean kept fraction of ``max|w|``); ``weight_rel_error`` of the final RTN
    relative to the (scaled, clipped) float weight it quantizes.
    """
    groups, inputs = scale_layer(layer, layout, X, kwargs, cfg)
    site = {name: seq[0] for seq in layout.sequential for name in seq}
    stats: dict = {name: {} for name in layout.linear_names()}
    for g in groups:
        for name in g.linears:
            entry = stats[name]
            entry["scale_prev"] = None if g.skipped else g.prev
            if g.skipped:
                entry["scale_skipped"] = g.skipped
                continue
            r = g.result
            entry.update(
                scale_group=list(g.linears),
                scale_inspect=g.inspect,
                best_ratio=r["ratio"],
                loss_rtn=r["loss_rtn"],
                loss_awq=r["loss"],
                loss_history=list(r["history"]),
            )
    if cfg.clip:  # auto_clip_block + apply_clip
        for name in layout.linear_names():
            if name.rsplit(".", 1)[-1] in NO_CLIP:
                continue
            linear = layer.get_submodule(name)
            c = search_clip(linear.weight, inputs[site[name]], cfg)
            apply_clip(linear, c["max_val"], c["group_size"])
            nz = c["org_max"] > 0
            stats[name].update(
                clip_err_before=float(c["err_before"].mean()),
                clip_err_after=float(c["err_after"].mean()),
                clip_ratio=float((c["max_val"][nz] / c["org_max"][nz]).mean()),
            )
    del inputs
    rtn_cfg = cfg.rtn()
    return replace_linears(layer, layout, lambda linear: UniformLinear.from_float(linear, rtn_cfg), stats)


@torch.no_grad()
def quantize_head(linear: nn.Module, X: torch.Tensor, cfg: AWQConfig) -> UniformLinear:
    """AWQ's part that applies to an lm_head ``linear`` (vocab, hidden), from its inputs ``X``
    (n, seqlen, hidden): the clipping search (with ``cfg.clip``), then RTN. No activation-aware
    scale: ``s`` would have to be folded into the final norm and ``W diag(s)`` stored, and a tied
    embedding, which reads the same stored rows, cannot undo ``s`` (an untied head is treated the
    same way, for one rule). A tied embedding reads the clipped rows."""
    W = linear.weight.detach().float().clone()
    if cfg.clip:
        clipped = nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device)
        clipped.weight.data = W
        c = search_clip(W, X.to(W.device), cfg)
        apply_clip(clipped, c["max_val"], c["group_size"])  # clamps W in place
    return UniformLinear(rtn_quantize_weight(W, cfg.rtn()), linear.bias)


SUMMARY = "AWQ INT4: activation-aware per-channel scaling + clipping search, then RTN (asymmetric, groups of 128)"
register(
    Method(
        "awq_int4",
        AWQConfig(),
        SUMMARY,
        quantize_layer=quantize_layer,
        overrides=("bits", "group_size", "sym"),
        quantize_head=quantize_head,
    )
)
