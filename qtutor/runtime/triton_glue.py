"""Triton kernels for the glue of a batch-1 decoding step (chapter 7): residual add + RMSNorm,
rotary embedding + KV-cache write + attention over the cache (one kernel, :func:`rope_attention`;
the two halves also apart), SiLU(gate) * up.

Imported lazily by :mod:`qtutor.runtime.decode` (this module needs ``triton``); compiled on
CUDA, run by Triton's interpreter on CPU tensors (the tests check the same source).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._interpret import _interpreted, _interpreting
from .triton_gemv import _int8_codes, _token_scale


# --------------------------------------------------------------------------- decode-step glue
# At batch 1 every kernel launch costs microseconds whatever it computes, so the one-token step
# of ``qtutor.runtime.decode`` fuses its glue: residual add + RMSNorm, rotary + KV-cache write +
# attention over the cache, SiLU(gate) * up. The same kernels serve every weight format (they
# touch activations only), so FP16 and the quantized models are timed with the same glue.
def _add_rms_norm_kernel(
    h_ptr, r_ptr, w_ptr, x_ptr, q_ptr, s_ptr, D, eps, HAS_RES: tl.constexpr, QUANT: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Row ``pid``: ``h += r`` (in place, rounded to h's dtype as PyTorch's add), then
    ``x = w * h / sqrt(mean(h^2) + eps)`` in float32, rounded once to x's dtype. With ``QUANT``
    also x quantized per token for a W8A8 layer (SmoothQuant): int8 codes to ``q_ptr``, the
    step to ``s_ptr[row]``, from the rounded x, as :func:`~qtutor.runtime.triton_gemv.quantize_row`."""
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    m = d < D
    h = tl.load(h_ptr + row * D + d, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * D + d, mask=m, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * D + d, h, mask=m)
    hf = h.to(tl.float32)
    rstd = (1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / D + eps)).to(tl.float32)
    w = tl.load(w_ptr + d, mask=m, other=0.0).to(tl.float32)
    x = (hf * rstd * w).to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + row * D + d, x, mask=m)
    if QUANT:
        xf = x.to(tl.float32)  # zero past D
        s_x = _token_scale(tl.max(tl.abs(xf), axis=0))
        tl.store(s_ptr + row, s_x)
        tl.store(q_ptr + row * D + d, _int8_codes(xf, s_x), mask=m)


def _silu_mul_kernel(gu_ptr, y_ptr, I, BLOCK: tl.constexpr):
    """``y = silu(g) * u`` for one row ``gu = [g | u]`` (2I,), in float32, rounded once."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < I
    g = tl.load(gu_ptr + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + I + i, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, (g / (1.0 + tl.exp(-g)) * u).to(y_ptr.dtype.element_ty), mask=m)


def _silu_mul_quant_kernel(gu_ptr, y_ptr, q_ptr, s_ptr, I, BLOCK: tl.constexpr):
    """:func:`_silu_mul_kernel` in ONE program that also quantizes ``y`` per token for a W8A8
    down projection (codes to ``q_ptr``, step to ``s_ptr``): the row's max |y| needs all of it,
    so a row longer than ``BLOCK`` is written, then read back for its codes."""
    i = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    y = tl.zeros((BLOCK,), dtype=y_ptr.dtype.element_ty)
    for i0 in range(0, I, BLOCK):
        m = i0 + i < I
        g = tl.load(gu_ptr + i0 + i, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + I + i0 + i, mask=m, other=0.0).to(tl.float32)
        y = (g / (1.0 + tl.exp(-g)) * u).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + i0 + i, y, mask=m)
        amax = tl.maximum(amax, tl.abs(y.to(tl.float32)))
    s_x = _token_scale(tl.max(amax, axis=0))
    tl.store(s_ptr, s_x)
    if I <= BLOCK:  # still in registers
        tl.store(q_ptr + i, _int8_codes(y.to(tl.float32), s_x), mask=i < I)
    else:
        tl.debug_barrier()  # the program's own stores, visible to all its threads
        for i0 in range(0, I, BLOCK):
            m = i0 + i < I
            yf = tl.load(y_ptr + i0 + i, mask=m, other=0.0).to(tl.float32)
            tl.store(q_ptr + i0 + i, _int8_codes(yf, s_x), mask=m)


def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, NH, NKV, SLOTS, HD: tl.constexpr):
    """Head ``pid`` of one token's stacked [q | k | v] (heads of HD): q and k heads are rotated,
    ``x cos + rotate_half(x) sin`` at position ``pos``; q goes to ``q_ptr``, k and v into the
    cache row ``pos`` of their kv head (cache (NKV, SLOTS, HD))."""
    HALF: tl.constexpr = HD // 2
    head = tl.program_id(0)
    i = tl.arange(0, HALF)
    pos = tl.load(pos_ptr)
    x1 = tl.load(qkv_ptr + head * HD + i).to(tl.float32)
    x2 = tl.load(qkv_ptr + head * HD + HALF + i).to(tl.float32)
    if head < NH + NKV:  # rotate_half(x) = [-x2, x1]
        c1 = tl.load(cos_ptr + pos * HD + i)
        c2 = tl.load(cos_ptr + pos * HD + HALF + i)
        s1 = tl.load(sin_ptr + pos * HD + i)
        s2 = tl.load(sin_ptr + pos * HD + HALF + i)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    else:
        y1 = x1
        y2 = x2
    if head < NH:
        dst = q_ptr + head * HD
    elif head < NH + NKV:
        dst = kc_ptr + ((head - NH) * SLOTS + pos) * HD
    else:
        dst = vc_ptr + ((head - NH - NKV) * SLOTS + pos) * HD
    tl.store(dst + i, y1.to(kc_ptr.dtype.element_ty))
    tl.store(dst + HALF + i, y2.to(kc_ptr.dtype.element_ty))


@triton.jit
def _attend_cache(q, kc_ptr, vc_ptr, o_ptr, kvh, pos, SLOTS, scale, G, HD: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_L: tl.constexpr):  # fmt: skip
    """softmax(scale q K^T) V of kv head ``kvh``'s query heads ``q`` (BLOCK_G, HD) over cache
    slots 0..pos, with an online softmax over blocks of BLOCK_L slots (float32 scores, products
    in the cache's dtype); the G rows go to ``o_ptr``."""
    r = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HD)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, HD), dtype=tl.float32)
    for l0 in range(0, pos + 1, BLOCK_L):
        sl = l0 + tl.arange(0, BLOCK_L)
        lm = sl <= pos
        k = tl.load(kc_ptr + (kvh * SLOTS + sl)[:, None] * HD + d[None, :], mask=lm[:, None], other=0.0)
        s = (tl.dot(q, tl.trans(k), input_precision="ieee") * scale).to(tl.float32)  # (BG, BL)
        s = tl.where(lm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + (kvh * SLOTS + sl)[:, None] * HD + d[None, :], mask=lm[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(o_ptr + (kvh * G + r)[:, None] * HD + d[None, :], o.to(o_ptr.dtype.element_ty), mask=(r < G)[:, None])


def _decode_attention_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    pos_ptr,
    o_ptr,
    SLOTS,
    scale,
    G,
    HD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """kv head ``pid`` and its G query heads (already rotated, ``q_ptr``): :func:`_attend_cache`.
    One program per kv head walks the whole cache: right for the short caches of these
    benchmarks; long ones would want the slots split over programs (flash-decoding)."""
    kvh = tl.program_id(0)
    pos = tl.load(pos_ptr)
    r = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HD)
    q = tl.load(q_ptr + (kvh * G + r)[:, None] * HD + d[None, :], mask=(r < G)[:, None], other=0.0)
    _attend_cache(q, kc_ptr, vc_ptr, o_ptr, kvh, pos, SLOTS, scale, G, HD, BLOCK_G, BLOCK_L)


def _rope_attention_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    kc_ptr,
    vc_ptr,
    o_ptr,
    NH,
    NKV,
    SLOTS,
    scale,
    G,
    HD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """:func:`_rope_cache_kernel` and :func:`_decode_attention_kernel` in ONE launch: program
    ``pid`` = kv head ``kvh`` rotates its k and writes it and its v into cache row ``pos``,
    rotates its G query heads in registers (rounded to the cache's dtype, as the rope kernel
    stores them), then attends. The same arithmetic: ``x cos + (-x2, x1) sin`` is the rope
    kernel's ``x1 c - x2 s`` / ``x2 c + x1 s`` term for term."""
    HALF: tl.constexpr = HD // 2
    kvh = tl.program_id(0)
    pos = tl.load(pos_ptr)
    d = tl.arange(0, HD)
    partner = (d + HALF) % HD  # rotate_half(x)[d] = sign[d] * x[partner[d]]
    sign = tl.where(d < HALF, -1.0, 1.0)
    c = tl.load(cos_ptr + pos * HD + d)
    s = tl.load(sin_ptr + pos * HD + d)
    kx = tl.load(qkv_ptr + (NH + kvh) * HD + d).to(tl.float32)
    kp = tl.load(qkv_ptr + (NH + kvh) * HD + partner).to(tl.float32)
    row = (kvh * SLOTS + pos) * HD + d
    tl.store(kc_ptr + row, (kx * c + (sign * kp) * s).to(kc_ptr.dtype.element_ty))
    v = tl.load(qkv_ptr + (NH + NKV + kvh) * HD + d).to(tl.float32)
    tl.store(vc_ptr + row, v.to(vc_ptr.dtype.element_ty))
    r = tl.arange(0, BLOCK_G)
    rm = (r < G)[:, None]
    heads = (kvh * G + r)[:, None] * HD
    qx = tl.load(qkv_ptr + heads + d[None, :], mask=rm, other=0.0).to(tl.float32)
    qp = tl.load(qkv_ptr + heads + partner[None, :], mask=rm, other=0.0).to(tl.float32)
    q = (qx * c[None, :] + (sign[None, :] * qp) * s[None, :]).to(kc_ptr.dtype.element_ty)
    tl.debug_barrier()  # this program's cache writes, visible to all its threads before they read row pos
    _attend_cache(q, kc_ptr, vc_ptr, o_ptr, kvh, pos, SLOTS, scale, G, HD, BLOCK_G, BLOCK_L)


_GLUE_JIT = {
    f: triton.jit(f)
    for f in (
        _add_rms_norm_kernel,
        _silu_mul_kernel,
        _silu_mul_quant_kernel,
        _rope_cache_kernel,
        _decode_attention_kernel,
        _rope_attention_kernel,
    )
}


def _run(fn, grid, *args, **meta):
    """Launch a glue kernel: compiled on CUDA, in Triton's interpreter on CPU tensors."""
    if args[0].device.type == "cpu":
        with _interpreting():
            _interpreted(fn)[grid](*args, **meta)
    else:
        _GLUE_JIT[fn][grid](*args, **meta)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def add_rms_norm(h: torch.Tensor, r, weight: torch.Tensor, eps: float, quantize: bool = False):
    """``h += r`` in place (skipped for ``r=None``), then RMSNorm(h) * weight -> new tensor ``x``;
    with ``quantize``, ``(x, q_x, s_x)``: also each row's int8 codes (same shape) and float32
    step (rows,), SmoothQuant's per-token quantization of x, for W8A8 layers that read it."""
    D = h.shape[-1]
    rows = h.numel() // D
    x = torch.empty_like(h)
    q = torch.empty(h.shape, dtype=torch.int8, device=h.device) if quantize else x
    s = torch.empty(rows, dtype=torch.float32, device=h.device) if quantize else x
    _run(
        _add_rms_norm_kernel,
        (rows,),
        h,
        h if r is None else r.contiguous(),
        weight,
        x,
        q,
        s,
        D,
        float(eps),
        HAS_RES=r is not None,
        QUANT=quantize,
        BLOCK_D=_pow2(D),
    )
    return (x, q, s) if quantize else x


#: :func:`silu_mul` with ``quantize``: one program walks the row in blocks of this many values
SILU_QUANT_BLOCK = 8192


def silu_mul(gu: torch.Tensor, quantize: bool = False):
    """One row ``[g | u]`` (..., 2I) -> ``silu(g) * u`` (..., I); with ``quantize``
    ``(y, q_y, s_y)``, y also quantized per token (int8 codes, (1,) float32 step) for a W8A8
    down projection."""
    I = gu.shape[-1] // 2
    y = torch.empty(*gu.shape[:-1], I, dtype=gu.dtype, device=gu.device)
    if not quantize:
        _run(_silu_mul_kernel, (triton.cdiv(I, 1024),), gu.contiguous(), y, I, BLOCK=1024)
        return y
    if gu.numel() != 2 * I:
        raise ValueError(f"silu_mul(quantize=True) takes one row, got {tuple(gu.shape)}")
    q = torch.empty(y.shape, dtype=torch.int8, device=gu.device)
    s = torch.empty(1, dtype=torch.float32, device=gu.device)
    block = 64 if gu.device.type == "cpu" else min(SILU_QUANT_BLOCK, _pow2(I))
    _run(_silu_mul_quant_kernel, (1,), gu.contiguous(), y, q, s, I, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return y, q, s


def rope_cache(qkv, cos, sin, pos, k_cache, v_cache, n_heads: int, n_kv: int) -> torch.Tensor:
    """One token's stacked q/k/v (n_heads + 2 n_kv heads) -> rotated q (n_heads, head_dim); the
    rotated k and the v are written into row ``pos`` of ``k_cache``/``v_cache`` (n_kv, slots, hd)."""
    hd = k_cache.shape[-1]
    q = torch.empty(n_heads, hd, dtype=k_cache.dtype, device=k_cache.device)
    _run(
        _rope_cache_kernel,
        (n_heads + 2 * n_kv,),
        qkv.contiguous(),
        cos,
        sin,
        pos,
        q,
        k_cache,
        v_cache,
        n_heads,
        n_kv,
        k_cache.shape[1],
        HD=hd,
    )
    return q


def _attention_blocks(hd: int, G: int) -> dict:
    """The attention kernels' tiles: the G query heads of a kv head padded to at least 16 rows
    (``tl.dot``'s smallest), the cache walked 64 slots at a time."""
    return dict(HD=hd, BLOCK_G=max(16, _pow2(G)), BLOCK_L=64)


def decode_attention(q, k_cache, v_cache, pos, scale: float) -> torch.Tensor:
    """q (n_heads, hd) of the token at ``pos`` against cache slots 0..pos -> (n_heads * hd,);
    query head ``j * G + r`` reads kv head ``j`` (G = n_heads / n_kv, Hugging Face's order)."""
    n_kv, slots, hd = k_cache.shape
    G = q.shape[0] // n_kv
    o = torch.empty(q.shape[0] * hd, dtype=q.dtype, device=q.device)
    _run(
        _decode_attention_kernel,
        (n_kv,),
        q,
        k_cache,
        v_cache,
        pos,
        o,
        slots,
        float(scale),
        G,
        **_attention_blocks(hd, G),
    )
    return o


def rope_attention(qkv, cos, sin, pos, k_cache, v_cache, n_heads: int, scale: float) -> torch.Tensor:
    """:func:`rope_cache` then :func:`decode_attention` in one launch: one token's stacked q/k/v
    (n_heads + 2 n_kv heads) -> attention output (n_heads * hd,), its rotated k and its v written
    into row ``pos`` of the caches (n_kv, slots, hd) on the way."""
    n_kv, slots, hd = k_cache.shape
    G = n_heads // n_kv
    o = torch.empty(n_heads * hd, dtype=k_cache.dtype, device=k_cache.device)
    _run(
        _rope_attention_kernel,
        (n_kv,),
        qkv.contiguous(),
        cos,
        sin,
        pos,
        k_cache,
        v_cache,
        o,
        n_heads,
        n_kv,
        slots,
        float(scale),
        G,
        **_attention_blocks(hd, G),
    )
    return o
