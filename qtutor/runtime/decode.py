"""Fast batch-1 greedy decoding: a static KV cache and CUDA graphs (chapter 7, "Real speed").

``decode_latency`` (latency.py) times the Hugging Face forward with a growing ``DynamicCache``:
at batch 1 every step launches hundreds of small kernels from Python, so the GPU idles between
them and the time per token says more about Python than about the weights. Quantized weights
only pay off once that overhead is gone. This module removes it in two steps:

1. **Static KV cache.** Keys and values live in preallocated (kv_heads, max_len, head_dim)
   buffers; step ``t`` writes position ``t`` in place and attends over all ``max_len`` slots
   with an additive mask that hides the future. Every decode step then has the same shapes
   and the same memory addresses, which is what a CUDA graph needs.
2. **CUDA graph.** One decode step (embedding -> layers -> norm -> lm_head -> argmax, plus
   "feed the token back in" and "position += 1") is captured once with
   ``torch.cuda.CUDAGraph`` and then replayed: one launch per token, no Python in the loop.

:class:`StaticDecoder` runs the model's OWN modules (embeddings, norms, MLPs, the q/k/v/o
projections, so any ``QuantizedLinear`` and any fast kernel in them is what is timed) and
re-implements only the attention glue of the Qwen2/Llama family, with as few kernels per layer
as it can, because at batch 1 every kernel costs a few microseconds whatever it computes:

* **Stacked projections** (``fuse=True``, the default): q, k and v read the same input, and so
  do gate and up; :func:`qtutor.runtime.kernels.fuse_rows` stacks each set into ONE layer of the same
  kind (fp16 ``nn.Linear``, packed int4, LUT, int8 ...), so a layer runs 4 matmuls instead of 7,
  for the FP16 baseline and the quantized models alike. Layers that cannot be stacked run apart.
  The stacked copies hold the projections' bytes a second time while the decoder lives.
* **Rotary position embedding as a rotation**: for position ``p`` the map
  ``q -> q cos + rotate_half(q) sin`` is a (head_dim x head_dim) matrix ``R_p`` (block rotations
  pairing dimension ``i`` with ``i + head_dim/2``), precomputed for every position, so rotating all
  heads of q and k is one batched matmul.
* **Attention** is one ``F.scaled_dot_product_attention`` call over the cache slots, with the
  grouped-query heads laid out as extra query rows of their key/value head and an additive mask
  hiding the slots after the current position.
* **Fused glue** (``glue=True``, the default on CUDA with Triton): the one-token step runs the
  activation-only work as three small Triton kernels (:mod:`qtutor.runtime.triton_glue`): residual add +
  RMSNorm; rotary, KV-cache write and attention over slots 0..pos in one; SiLU(gate) * up. A
  layer is then eight kernels: four matmuls and four of glue (about sixteen without). They
  round once where PyTorch rounds after every op, so fp16 logits can differ in the last bit.
  For W8A8 layers the norm and SiLU kernels also write their output's int8 codes, so those
  GEMVs need no quantization launch of their own.

The result is the model's own greedy output (``tests/test_fast_decode.py`` checks the tokens
against ``latency.greedy_decode``). Without CUDA (or with ``cuda_graph=False``) the same step
runs eagerly.

Protocol as ``decode_latency`` (ARCHITECTURE.md section 4): batch 1, fixed prompt, ``new_tokens``
tokens of which the first comes from the prefill; the decode phase is timed and divided by
``new_tokens - 1``; one warm-up, median over ``runs``; device, dtype and method recorded.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QtutorError
from ..eval.latency import LatencyResult, _sync


@dataclass
class FastLatencyResult(LatencyResult):
    method: str = "static-cache"  # "static-cache+cuda-graph" when graphs were used
    cuda_graph: bool = False
    compiled: bool = False
    kernels: dict = field(default_factory=dict)  # layer class -> matmul path of the decode step
    profile: dict = field(default_factory=dict)  # with profile=True: see profile_step


def _rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """P with ``x @ P == rotate_half(x) == cat(-x[h:], x[:h])`` (h = head_dim / 2)."""
    h = head_dim // 2
    P = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    idx = torch.arange(h)
    P[idx + h, idx] = -1.0
    P[idx, idx + h] = 1.0
    return P


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm ``w * (x / rms(x))`` as ONE ``F.rms_norm`` kernel (normalised in float32
    inside the kernel), instead of Qwen2/Llama's to-float, pow, mean, add, rsqrt, mul, to-dtype,
    mul. Qwen2/Llama round the normalised row to the model dtype before multiplying by ``w``;
    here the product is rounded once (equal in float32, within one rounding in fp16/bf16).
    Other norm modules are called as they are."""
    eps = getattr(norm, "variance_epsilon", None)
    weight = getattr(norm, "weight", None)
    if eps is None or weight is None or not hasattr(F, "rms_norm") or type(norm).__name__ not in _HF_RMS_NORMS:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)


#: RMSNorm classes whose forward is exactly ``weight * normalise(x.float()).to(x.dtype)``
_HF_RMS_NORMS = ("Qwen2RMSNorm", "LlamaRMSNorm", "MistralRMSNorm")


class StaticDecoder(nn.Module):
    """Greedy decoding of a Qwen2/Llama-family ``model`` with a static KV cache of ``max_len``
    positions, and (on CUDA, by default) a CUDA graph of the one-token step.

    ``generate(prompt_ids, new_tokens)`` returns the greedy continuation (new_tokens,) and the
    prefill and decode seconds. ``compile=True`` additionally runs the decode step through
    ``torch.compile`` (inductor, without its own CUDA graphs) before capturing it. ``fuse=False``
    runs q, k, v, gate and up as separate matmuls (the model's modules as they are).
    """

    def __init__(
        self,
        model,
        max_len: int,
        cuda_graph: Optional[bool] = None,
        compile: bool = False,
        fuse: bool = True,
        glue: Optional[bool] = None,
    ):
        super().__init__()
        from ..models import layout_for

        cfg = model.config
        layout_for(model)  # a one-line error for families without a layout
        base = model.model
        self.model = model
        self.embed, self.layers, self.norm = base.embed_tokens, base.layers, base.norm
        self.lm_head = model.get_output_embeddings()
        layer_types = getattr(cfg, "layer_types", None) or []
        window = getattr(cfg, "sliding_window", None)
        if any(t != "full_attention" for t in layer_types) and window is not None and window < max_len:
            raise QtutorError(
                f"the fast decoder does not implement sliding-window attention "
                f"(window {window} < {max_len} positions); use qtutor.eval.decode_latency"
            )
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.groups = self.n_heads // self.n_kv
        self.max_len = max_len
        slots = -(-max_len // 16) * 16  # cache rows: a multiple of 16 (aligned attention mask)
        # the model's dtype and device: the embedding table's, or a quantized tied embedding's
        # (qtutor.quantize(..., head=True): no table, its rows come from the packed lm_head)
        w = getattr(self.embed, "weight", None)
        self.device, self.dtype = (w.device, w.dtype) if w is not None else (self.embed.device, self.embed.dtype)
        dev, dt, hd = self.device, self.dtype, self.head_dim

        # rotary embedding as one rotation matrix per position (from the model's own cos/sin)
        pos = torch.arange(slots, device=dev)[None]
        cos, sin = base.rotary_emb(torch.zeros(1, dtype=torch.float32, device=dev), pos)
        cos, sin = cos[0].double().cpu(), sin[0].double().cpu()  # (slots, hd)
        R = torch.diag_embed(cos) + _rotate_half_matrix(hd)[None] * sin[:, None, :]
        self.scaling = getattr(self.layers[0].self_attn, "scaling", hd**-0.5)
        self.register_buffer("rot", R.to(device=dev, dtype=dt), persistent=False)
        self.register_buffer("cos", cos.to(device=dev, dtype=torch.float32).contiguous(), persistent=False)
        self.register_buffer("sin", sin.to(device=dev, dtype=torch.float32).contiguous(), persistent=False)
        causal = torch.full((slots, slots), torch.finfo(dt).min, dtype=dt).triu(1)
        self.register_buffer("mask", causal.to(dev), persistent=False)  # row p: slots <= p open
        shape = (len(self.layers), self.n_kv, slots, hd)
        self.register_buffer("k_cache", torch.zeros(shape, device=dev, dtype=dt), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, device=dev, dtype=dt), persistent=False)

        # the decode step's inputs and outputs live in fixed buffers (graph-safe)
        self.register_buffer("tok", torch.zeros(1, dtype=torch.long, device=dev), persistent=False)
        self.register_buffer("pos", torch.zeros(1, dtype=torch.long, device=dev), persistent=False)
        self.register_buffer("out_ids", torch.zeros(max_len + 1, dtype=torch.long, device=dev), persistent=False)
        self.use_graph = (dev.type == "cuda") if cuda_graph is None else cuda_graph
        if self.use_graph and dev.type != "cuda":
            raise QtutorError("CUDA graphs need the model on a CUDA device")
        self.compiled = compile
        self._step_fn = torch.compile(self._step, dynamic=False) if compile else self._step
        self.graph = None
        self.step_kernels: dict = {}  # layer class -> kernel of the one-token step (not the prefill)
        # stacked q/k/v and gate/up projections (None where a layer's cannot be stacked)
        from .kernels import fuse_rows

        self.qkv, self.gate_up = [], []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            self.qkv.append(fuse_rows([a.q_proj, a.k_proj, a.v_proj], dtype=dt) if fuse else None)
            mlp_ok = fuse and all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            self.gate_up.append(fuse_rows([m.gate_proj, m.up_proj], dtype=dt) if mlp_ok else None)
        self.fused = nn.ModuleList([f for f in self.qkv + self.gate_up if f is not None])
        self.glue = self._glue_reason() is None if glue is None else bool(glue)
        if glue is None and dev.type != "cuda":
            self.glue = False  # on CPU the kernels would run in Triton's interpreter: tests only
        if self.glue and self._glue_reason() is not None:
            raise QtutorError(f"fused decode glue unavailable: {self._glue_reason()}")

    def _glue_reason(self) -> Optional[str]:
        """Why the fused Triton glue cannot run this model's step (None: it can)."""
        from .kernels import triton_available

        if not triton_available():
            return "triton is not installed"
        norms = [l.input_layernorm for l in self.layers] + [l.post_attention_layernorm for l in self.layers]
        if any(type(n).__name__ not in _HF_RMS_NORMS for n in norms + [self.norm]):
            return "a norm that is not Qwen2/Llama RMSNorm"
        if any(
            not all(hasattr(l.mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            or type(l.mlp.act_fn).__name__ not in ("SiLUActivation", "SiLU")
            for l in self.layers
        ):
            return "an MLP that is not down(SiLU(gate) * up)"
        if self.head_dim & (self.head_dim - 1) or self.head_dim < 16:
            return f"head_dim {self.head_dim} is not a power of two >= 16"
        return None

    # ------------------------------------------------------------------ the model, T tokens
    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run tokens ``ids`` (T,) at ``positions`` (T,), filling the cache; -> greedy next id (1,)."""
        T = ids.shape[0]
        if T == 1 and self.glue:
            return self._forward_one(ids, positions)
        nh, nkv, hd, g = self.n_heads, self.n_kv, self.head_dim, self.groups
        h = self.embed(ids)[None]  # (1, T, hidden)
        rot = self.rot[positions]  # (T, hd, hd)
        # query row r*T + t of kv head j is token t of q head j*g + r (HF's repeat_kv order)
        mask = self.mask[positions].repeat(g, 1)  # (g*T, slots)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = _rms_norm(layer.input_layernorm, h)
            if self.qkv[i] is not None:
                qkv = self.qkv[i](x).view(T, nh + 2 * nkv, hd)
            else:
                qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1).view(T, nh + 2 * nkv, hd)
            qk = torch.bmm(qkv[:, : nh + nkv], rot)  # q and k heads, rotated
            q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :]
            kc, vc = self.k_cache[i], self.v_cache[i]  # (nkv, slots, hd)
            kc.index_copy_(1, positions, k.transpose(0, 1))
            vc.index_copy_(1, positions, v.transpose(0, 1))
            qg = q.transpose(0, 1).reshape(1, nkv, g * T, hd)
            o = F.scaled_dot_product_attention(qg, kc[None], vc[None], attn_mask=mask, scale=self.scaling)
            o = o.reshape(nh, T, hd).transpose(0, 1).reshape(1, T, nh * hd)
            h = h + attn.o_proj(o)
            x = _rms_norm(layer.post_attention_layernorm, h)
            if self.gate_up[i] is not None:
                mlp = layer.mlp
                gate, up = self.gate_up[i](x).split([mlp.gate_proj.out_features, mlp.up_proj.out_features], -1)
                h = h + mlp.down_proj(mlp.act_fn(gate) * up)
            else:
                h = h + layer.mlp(x)
        logits = self.lm_head(_rms_norm(self.norm, h[:, -1]))  # (1, vocab)
        return logits.argmax(dim=-1)

    def _forward_one(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for one token with the fused glue kernels (same math). Where the
        layers that read a norm's or SiLU's output are W8A8 with the Triton GEMV, that glue
        kernel also quantizes its output per token (SmoothQuant's activation codes), so the
        GEMVs start from the codes instead of each layer input costing a launch of its own."""
        from . import triton_glue as tk

        nh, L = self.n_heads, len(self.layers)
        h = self.embed(ids)[None]  # (1, 1, hidden)
        first = self.layers[0].input_layernorm
        x = tk.add_rms_norm(
            h, None, first.weight, first.variance_epsilon, quantize=_codes(self._qkv_parts(0), h.device)
        )
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _apply_all(self._qkv_parts(i), x)
            o = tk.rope_attention(qkv, self.cos, self.sin, pos, self.k_cache[i], self.v_cache[i], nh, self.scaling)
            post = layer.post_attention_layernorm
            gate_up = [self.gate_up[i]] if self.gate_up[i] is not None else [mlp.gate_proj, mlp.up_proj]
            x = tk.add_rms_norm(
                h, attn.o_proj(o.view(1, 1, -1)), post.weight, post.variance_epsilon, quantize=_codes(gate_up, h.device)
            )
            gu = _apply_all(gate_up, x)
            y = _apply(mlp.down_proj, tk.silu_mul(gu, quantize=_codes([mlp.down_proj])))
            nxt = self.layers[i + 1].input_layernorm if i + 1 < L else self.norm
            readers = self._qkv_parts(i + 1) if i + 1 < L else [self.lm_head]
            x = tk.add_rms_norm(h, y, nxt.weight, nxt.variance_epsilon, quantize=_codes(readers, h.device))
        return _apply(self.lm_head, x)[:, -1].argmax(dim=-1)

    def _qkv_parts(self, i: int) -> list:
        """The layers computing layer ``i``'s q, k and v: the stacked one, or the three."""
        if self.qkv[i] is not None:
            return [self.qkv[i]]
        a = self.layers[i].self_attn
        return [a.q_proj, a.k_proj, a.v_proj]

    def _step(self):
        """One decode step on the fixed buffers: token ``tok`` at position ``pos``."""
        nxt = self.forward(self.tok, self.pos)
        self.out_ids.index_copy_(0, self.pos + 1, nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)

    # ------------------------------------------------------------------ graph capture
    def capture(self, warmup_steps: int = 3) -> None:
        """Warm up (autotuning, cuBLAS handles, compilation) on a side stream, then capture."""
        if self.graph is not None or not self.use_graph:
            return
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(warmup_steps):
                self.pos.zero_()
                self._step_fn()
        torch.cuda.current_stream(self.device).wait_stream(s)
        self.pos.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_fn()
        self.graph = graph
        self.step_kernels = _kernels(self.model, self.fused)  # what the captured step runs

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, new_tokens: int):
        """Greedy continuation -> (ids (new_tokens,), prefill seconds, decode seconds)."""
        ids = prompt_ids.reshape(-1).to(self.device)
        P = ids.numel()
        if P + new_tokens > self.max_len:
            raise QtutorError(f"prompt {P} + {new_tokens} new tokens exceed the cache of {self.max_len}")
        if self.use_graph:
            self.capture()
        _sync(self.device)
        t0 = time.perf_counter()
        first = self.forward(ids, torch.arange(P, device=self.device))
        self.out_ids[P : P + 1].copy_(first)
        self.tok.copy_(first)
        self.pos.fill_(P)
        _sync(self.device)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step_fn()
        _sync(self.device)
        t2 = time.perf_counter()
        if self.graph is None and new_tokens > 1:
            self.step_kernels = _kernels(self.model, self.fused)
        return self.out_ids[P : P + new_tokens].clone(), t1 - t0, t2 - t1


def _codes(layers, device=None) -> bool:
    """Whether every layer reading a glue kernel's output takes int8 codes (a W8A8 layer whose
    Triton GEMV runs on ``device``; None: the layer's own): then the glue kernel quantizes that
    output per token."""
    return all(getattr(m, "takes_codes", None) is not None and m.takes_codes(device) for m in layers)


def _apply(layer, x):
    """``layer(x)``; ``x`` may be ``(x, q_x, s_x)`` from a quantizing glue kernel, which a W8A8
    layer reads through ``forward_codes`` (any other layer takes x)."""
    if isinstance(x, tuple):
        return layer.forward_codes(*x) if getattr(layer, "forward_codes", None) is not None else layer(x[0])
    return layer(x)


def _apply_all(layers, x):
    """The layers' outputs on the same input ``x``, concatenated (one layer: its output)."""
    return _apply(layers[0], x) if len(layers) == 1 else torch.cat([_apply(m, x) for m in layers], -1)


def _kernels(model, extra=()) -> dict:
    out = {}
    for m in list(model.modules()) + [m for e in extra for m in e.modules()]:
        k = getattr(m, "last_kernel", None)
        if k is not None:
            out[type(m).__name__] = k
    return out


#: kernel names of matrix products (cuBLAS/cuBLASLt, CUTLASS, tinygemm, our Triton GEMVs)
_MATMUL = ("gemm", "gemv", "xmma", "cutlass", "nvjet", "int4", "lut_gemv", "splitk", "matmul", "_mm_")


@torch.no_grad()
def profile_step(dec: StaticDecoder) -> dict:
    """Kernels of ONE decode step (run once more, outside the graph, under ``torch.profiler``):
    ``kernels`` launched, ``gpu_us`` the sum of their device times, ``matmul_us`` the part in
    matrix products (by kernel name), ``top`` the five largest as (name, calls, us). A step's
    time minus ``gpu_us`` is what launches and gaps between kernels cost."""
    from torch.profiler import ProfilerActivity, profile

    if dec.device.type != "cuda":
        return {}
    dec.pos.fill_(1)
    dec._step_fn()
    torch.cuda.synchronize(dec.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec._step_fn()
        torch.cuda.synchronize(dec.device)
    from torch.autograd import DeviceType

    agg: dict = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            calls, us = agg.get(e.name, (0, 0.0))
            agg[e.name] = (calls + 1, us + e.time_range.elapsed_us())
    rows = [(name, calls, us) for name, (calls, us) in agg.items()]
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    mm = sum(r[2] for r in rows if any(t in r[0].lower() for t in _MATMUL))
    return {
        "kernels": sum(r[1] for r in rows),
        "gpu_us": total,
        "matmul_us": mm,
        "top": [(n[:60], c, round(u, 1)) for n, c, u in rows[:5]],
    }


def fast_decode_latency(
    model,
    prompt_ids: torch.Tensor,
    new_tokens: int = 50,
    runs: int = 5,
    warmup: int = 1,
    cuda_graph: Optional[bool] = None,
    compile: bool = False,
    fuse: bool = True,
    glue: Optional[bool] = None,
    profile: bool = False,
) -> FastLatencyResult:
    """Median ms per decoded token with :class:`StaticDecoder` (static cache; CUDA graph on CUDA).

    Same protocol and fields as :func:`qtutor.eval.decode_latency`, plus ``method``,
    ``cuda_graph``, ``compiled`` and the ``kernels`` the quantized layers used; ``profile=True``
    adds :func:`profile_step`'s kernel count and device times of one step (CUDA).
    """
    prompt_ids = prompt_ids.reshape(-1)
    dec = StaticDecoder(
        model, prompt_ids.numel() + new_tokens, cuda_graph=cuda_graph, compile=compile, fuse=fuse, glue=glue
    )
    for _ in range(warmup):
        dec.generate(prompt_ids, new_tokens)
    per_token, prefill = [], []
    for _ in range(runs):
        _, t_prefill, t_decode = dec.generate(prompt_ids, new_tokens)
        per_token.append(1000 * t_decode / max(new_tokens - 1, 1))
        prefill.append(1000 * t_prefill)
    method = (
        "static-cache"
        + ("+fused" if len(dec.fused) else "")
        + ("+glue" if dec.glue else "")
        + ("+compile" if compile else "")
        + ("+cuda-graph" if dec.use_graph else "")
    )
    result = FastLatencyResult(
        statistics.median(per_token),
        per_token,
        statistics.median(prefill),
        int(prompt_ids.numel()),
        new_tokens,
        str(dec.device),
        str(dec.dtype).replace("torch.", ""),
        method=method,
        cuda_graph=dec.use_graph,
        compiled=compile,
        kernels=dict(dec.step_kernels),
        profile=profile_step(dec) if profile else {},
    )
    del dec  # frees the graph's memory pool and the cache
    return result
