"""The book's own CPU kernel for 4-bit LUT weights: palettization and NF4 at batch 1 (chapter 7).

PyTorch has CPU kernels for integer weights (``aten._weight_int8pack_mm``, the int4
``aten._weight_int4pack_mm_for_cpu``), which :mod:`qtutor.runtime.kernels` uses, but none for a
4-bit index into a table of 16 arbitrary values. The reference forward of such a layer
dequantizes the whole weight on every call (several passes over ``out x in`` elements in
PyTorch ops) and is several times slower than the float model. This kernel does what the GPU's
register-LUT GEMV does, for one input row ``x`` (in,) in float32:

* the 16 table entries sit in ONE 512-bit register (AVX-512) and ``vpermps`` looks up 16 weights
  in one instruction from 16 four-bit indices (``_mm512_permutexvar_ps`` uses the low 4 bits of
  each 32-bit lane, so the packed byte needs no masking); with AVX2, two 8-entry lookups and a
  blend on index bit 3; elsewhere a plain C loop the compiler may vectorize;
* each packed byte is read once (0.5 bytes per weight plus the scales), nothing is written but
  ``y``;
* rows are split over ``torch.get_num_threads()`` OpenMP threads (one thread for small
  matrices, where starting the others costs more than they save).

Two entry points, on the layers' own storage (nothing re-packed, see the layer docstrings):

* ``palette_gemv``: ``PalettizedLinear``: ``y[n] = scale[n] sum_k LUT[n // R][q[n,k]] x[k] + b[n]``
  with packed indices (out, in/2), the first index of a byte in the LOW nibble, fp16 LUTs
  (n_luts, 16) and optional fp16 per-row scales.
* ``nf4_gemv``: ``NF4Linear``: ``y[n] = sum_blocks absmax_b sum_{k in b} level[q[n,k]] x[k] + b[n]``
  with bitsandbytes' flat packing (the first code of a byte in the HIGH nibble), blocks of
  ``block`` weights that do not cross rows (``in % block == 0``), and the block absmax rebuilt
  from the double quantization inside the kernel: ``dyn[code_b] * absmax2[b // dq_block] + offset``
  (QLoRA section 3), or read as fp32 when not double-quantized.

The C source below is compiled once per machine with the system's C compiler (``cc -O3
-march=native -fopenmp``) into a cache folder and loaded with :mod:`ctypes`
(:mod:`qtutor.runtime.cbuild`); without a compiler :func:`available` says why and the layers
keep their reference forward. Accumulation is in
float32, so the result equals the reference forward to float32 rounding (tests/test_kernels.py).
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from ..errors import QtutorError
from .cbuild import CLibrary

C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* IEEE half -> float (the LUTs and per-row scales are stored in fp16). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);                  /* inf, nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);          /* normal */
    } else if (man == 0) {
        bits = sign;                                              /* +-0 */
    } else {                                                      /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* sum_j T[code_j] x[j] over the 2 * nbytes codes packed in q, two per byte; high_first: the
   first code of a byte is in its high nibble (bitsandbytes), else in its low nibble. */
static float dot_lut(const uint8_t *q, const float *x, const float *T, int64_t nbytes, int high_first) {
    int64_t i = 0;
    float acc = 0.0f;
#if defined(__AVX512F__)
    __m512 table = _mm512_loadu_ps(T), a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 16 <= nbytes; i += 16) {                    /* 32 weights a step */
        __m128i b = _mm_loadu_si128((const __m128i *)(q + i));
        __m128i hi = _mm_srli_epi16(b, 4);                 /* high nibble in each byte's low 4 bits */
        __m128i first = high_first ? hi : b, second = high_first ? b : hi;
        __m128i c0 = _mm_unpacklo_epi8(first, second);     /* codes 0..15 in order (low 4 bits) */
        __m128i c1 = _mm_unpackhi_epi8(first, second);     /* codes 16..31 */
        __m512 w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c0), table);
        __m512 w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c1), table);
        a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + 2 * i), a0);
        a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 2 * i + 16), a1);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__)
    __m256 t_lo = _mm256_loadu_ps(T), t_hi = _mm256_loadu_ps(T + 8), a0 = _mm256_setzero_ps();
    for (; i + 4 <= nbytes; i += 4) {                      /* 8 weights a step */
        int32_t word;
        memcpy(&word, q + i, 4);
        __m128i b = _mm_cvtsi32_si128(word), hi = _mm_srli_epi16(b, 4);
        __m128i c = high_first ? _mm_unpacklo_epi8(hi, b) : _mm_unpacklo_epi8(b, hi);
        __m256i idx = _mm256_and_si256(_mm256_cvtepu8_epi32(c), _mm256_set1_epi32(15));
        __m256 lo8 = _mm256_permutevar8x32_ps(t_lo, idx), hi8 = _mm256_permutevar8x32_ps(t_hi, idx);
        __m256 w = _mm256_blendv_ps(lo8, hi8, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 2 * i), a0);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    acc = _mm_cvtss_f32(s);
#endif
    for (; i < nbytes; i++) {                              /* the tail, and other processors */
        int first = high_first ? q[i] >> 4 : q[i] & 15, second = high_first ? q[i] & 15 : q[i] >> 4;
        acc += T[first] * x[2 * i] + T[second] * x[2 * i + 1];
    }
    return acc;
}

/* PalettizedLinear: row n uses lut16[(n / rows_per_lut) * 16 ...]; scale16 (N,) or NULL. */
void palette_gemv(const float *x, const uint8_t *q, int64_t N, int64_t K, const uint16_t *lut16,
                  int64_t rows_per_lut, const uint16_t *scale16, const float *bias, float *y, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float T[16];
        const uint16_t *lut = lut16 + (n / rows_per_lut) * 16;
        for (int j = 0; j < 16; j++) T[j] = half_to_float(lut[j]);
        float v = dot_lut(q + n * (K / 2), x, T, K / 2, 0);
        if (scale16) v *= half_to_float(scale16[n]);
        y[n] = bias ? v + bias[n] : v;
    }
}

/* NF4Linear: blocks of `block` codes along each row (K % block == 0). The block absmax is
   absmax32[b] (no double quantization, absmax_code NULL) or dyn[absmax_code[b]] *
   absmax2[b / dq_block] + offset[(b / dq_block) * offset_step]: offset_step 0 for the one
   offset of a matrix, 1 for a stacked layer's one per second-level block. */
void nf4_gemv(const float *x, const uint8_t *q, int64_t N, int64_t K, const float *levels, int64_t block,
              const float *absmax32, const uint8_t *absmax_code, const float *dyn, const float *absmax2,
              int64_t dq_block, const float *offset, int64_t offset_step, const float *bias, float *y,
              int threads) {
    int64_t blocks_per_row = K / block;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float v = 0.0f;
        for (int64_t j = 0; j < blocks_per_row; j++) {
            int64_t b = n * blocks_per_row + j;
            float a = absmax_code ? dyn[absmax_code[b]] * absmax2[b / dq_block] + offset[(b / dq_block) * offset_step]
                                  : absmax32[b];
            v += a * dot_lut(q + (b * block) / 2, x + j * block, levels, block / 2, 1);
        }
        y[n] = bias ? v + bias[n] : v;
    }
}
"""

#: below this many weights one thread does the whole matrix (starting others costs more)
PARALLEL_MIN_WEIGHTS = 1 << 19


def _bind(lib) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.palette_gemv.argtypes = [p, p, i64, i64, p, i64, p, p, p, i32]
    lib.palette_gemv.restype = None
    lib.nf4_gemv.argtypes = [p, p, i64, i64, p, i64, p, p, p, p, i64, p, i64, p, p, i32]
    lib.nf4_gemv.restype = None


_LIBRARY = CLibrary("lut", "the CPU LUT kernel", C_SOURCE, _bind)


def _load():
    """The compiled library (built on first use), or None (:func:`available` says why)."""
    return _LIBRARY.load()


def available() -> Optional[str]:
    """None if the CPU LUT kernel can run here, else why not (built on the first call)."""
    _load()
    return _LIBRARY.reason


def _threads(n: int, k: int) -> int:
    return 1 if n * k < PARALLEL_MIN_WEIGHTS else max(1, torch.get_num_threads())


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _row(x: torch.Tensor, k: int) -> torch.Tensor:
    x = x.reshape(-1)
    if x.numel() != k or x.dtype != torch.float32 or x.device.type != "cpu":
        raise QtutorError(f"the CPU LUT kernel takes one float32 CPU row of {k} values, got {tuple(x.shape)} {x.dtype}")
    return x.contiguous()


def _bias(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if bias is None else bias.float().contiguous()


def palette_gemv(x, qweight, lut, scales, bias, rows_per_lut: int) -> torch.Tensor:
    """``W x + b`` for one float32 row ``x`` (in,) of a 4-bit ``PalettizedLinear`` -> (out,) float32.

    qweight (out, in/2) uint8, low nibble first; lut (n_luts, 16) fp16; scales (out,) fp16 or None."""
    lib = _load()
    if lib is None:
        raise QtutorError(_LIBRARY.reason)
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    x = _row(x, K)
    if lut.dtype != torch.float16 or (scales is not None and scales.dtype != torch.float16):
        raise QtutorError(f"the CPU LUT kernel reads fp16 LUTs and scales, got {lut.dtype}")
    q, lut, scales, bias = qweight.contiguous(), lut.contiguous(), scales, _bias(bias)
    scales = None if scales is None else scales.contiguous()
    y = torch.empty(N, dtype=torch.float32)
    lib.palette_gemv(
        _ptr(x), _ptr(q), N, K, _ptr(lut), int(rows_per_lut), _ptr(scales), _ptr(bias), _ptr(y), _threads(N, K)
    )
    return y


def nf4_gemv(x, qweight, levels, block: int, absmax, absmax2, offset, dyn, dq_block: int, bias, n: int) -> torch.Tensor:
    """``W x + b`` for one float32 row ``x`` (in,) of an ``NF4Linear`` with ``n`` output rows -> (n,).

    levels: the 16 NF4 levels (float32); absmax: fp32 (n_blocks,) or uint8 codes into ``dyn``
    (256 float32) with fp32 ``absmax2`` per ``dq_block`` blocks and fp32 ``offset`` (() or, for a
    stacked layer, one per second-level block)."""
    lib = _load()
    if lib is None:
        raise QtutorError(_LIBRARY.reason)
    K = x.numel()
    x = _row(x, K)
    if K % block or block % 2:
        raise QtutorError(f"the CPU NF4 kernel needs blocks ({block}) that divide the rows ({K})")
    double = absmax.dtype == torch.uint8
    b = _bias(bias)  # held until the call returns
    off = offset.float().contiguous() if double else None
    y = torch.empty(n, dtype=torch.float32)
    lib.nf4_gemv(
        _ptr(x),
        _ptr(qweight),
        n,
        K,
        _ptr(levels),
        int(block),
        None if double else _ptr(absmax),
        _ptr(absmax) if double else None,
        _ptr(dyn) if double else None,
        _ptr(absmax2) if double else None,
        int(dq_block),
        _ptr(off),
        int(double and off.dim() > 0),
        _ptr(b),
        _ptr(y),
        _threads(n, K),
    )
    return y
