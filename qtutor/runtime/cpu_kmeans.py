"""The exact 1-D k-means dynamic programme of :mod:`qtutor.quant.palettize` in C, for the CPU.

:func:`qtutor.quant.palettize._dc_layer` evaluates one layer of the programme, ``D_m[i] = min_j
D_{m-1}[j] + cost(j, i)``, by divide and conquer, one recursion level at a time, vectorised over
all LUT groups in PyTorch ops; that builds, at every level, arrays of all candidate ``j`` of all
groups (gathers, a segment minimum, a scatter), and their memory traffic is the whole cost:
about 37 ms per group of 16 x 896 values on one core. This file runs the very same recursion as
plain C loops, one group per OpenMP thread at a time, with the same float64 arithmetic
(``G[j] - dS * (dS / dW)``, no fused multiply-add) and the same choice among equal minima (the
last ``j``), so it returns the same minimizers bit for bit (tests/test_palettize.py), about ten
times faster per core, and in parallel over the groups.

On a GPU the prefix sums stay on the device; the programme runs here on the host's cores and
its result goes back (:func:`qtutor.quant.palettize.kmeans_1d_groups` decides where). Built with
:mod:`qtutor.runtime.cbuild`; without a C compiler :func:`available` says why and the PyTorch
programme runs instead.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from ..errors import QtutorError
from .cbuild import CLibrary

C_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TINY 1e-300

/* One layer of the programme for one group, rows lo..hi, candidates olo..ohi, recursively:
   the same segments, bounds and tie-breaking as palettize._dc_layer. G[j] = D_prev[j] - P2[j]. */
static void dc(const double *P0, const double *P1, const double *P2, const double *G, const int32_t *prev,
               double *Dm, int32_t *opt, int64_t lo, int64_t hi, int64_t olo, int64_t ohi) {
    while (lo <= hi) {
        int64_t mid = (lo + hi) / 2;
        int64_t top = ohi < mid - 1 ? ohi : mid - 1;
        int64_t first = olo;
        if (prev) {
            first = olo > prev[mid] ? olo : prev[mid];
            first = first < top ? first : top;
        }
        double best = INFINITY, p0 = P0[mid], p1 = P1[mid];
        int64_t arg = -1;
        for (int64_t j = first; j <= top; j++) {
            double dW = p0 - P0[j];
            if (dW < TINY) dW = TINY;
            double dS = p1 - P1[j];
            double q = dS / dW;
            double t = dS * q;
            double v = G[j] - t;
            if (v <= best) { best = v; arg = j; }
        }
        Dm[mid] = best + P2[mid];
        opt[mid] = (int32_t)arg;
        if (mid - 1 >= lo) dc(P0, P1, P2, G, prev, Dm, opt, lo, mid - 1, olo, arg);
        lo = mid + 1;  /* the right half: a loop instead of a second call */
        olo = arg;
    }
}

/* Layers m = 2 .. k-1 for B groups of N+1 prefix-sum entries. D (B, N+1): layer 1 on entry,
   layer k-1 on return. opts (k-2, B, N+1): each layer's minimizers. G: scratch, threads x (N+1). */
void kmeans_dp(const double *P0, const double *P1, const double *P2, double *D, int32_t *opts, double *G,
               int64_t B, int64_t N, int64_t k, int threads) {
    int64_t N1 = N + 1;
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; b++) {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        double *g = G + (int64_t)tid * N1, *d = D + b * N1;
        const double *p0 = P0 + b * N1, *p1 = P1 + b * N1, *p2 = P2 + b * N1;
        for (int64_t m = 2; m < k; m++) {
            int32_t *opt = opts + ((m - 2) * B + b) * N1;
            const int32_t *prev = m > 2 ? opts + ((m - 3) * B + b) * N1 : 0;
            for (int64_t j = 0; j < N1; j++) { g[j] = d[j] - p2[j]; d[j] = INFINITY; opt[j] = 0; }
            dc(p0, p1, p2, g, prev, d, opt, m, N - (k - m), m - 1, N - 1);
        }
    }
}
"""


def _bind(lib) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.kmeans_dp.argtypes = [p, p, p, p, p, p, i64, i64, i64, i32]
    lib.kmeans_dp.restype = None


# no fused multiply-add: the same roundings as the PyTorch programme
_LIBRARY = CLibrary("kmeans", "the C k-means programme", C_SOURCE, _bind, flags=("-ffp-contract=off",))


def available() -> Optional[str]:
    """None if the C programme can run here, else why not (built on the first call)."""
    _LIBRARY.load()
    return _LIBRARY.reason


def dp_layers(P0: torch.Tensor, P1: torch.Tensor, P2: torch.Tensor, D: torch.Tensor, k: int, threads: int = 0):
    """Layers ``2 .. k-1`` of the exact k-means programme for ``B`` groups.

    P0, P1, P2: (B, N+1) float64 prefix sums of ``w``, ``w x``, ``w x^2``; D: (B, N+1) the
    one-cluster costs. Returns ``(D_{k-1}, opts)``: (B, N+1) float64 and a list of ``k-2``
    (B, N+1) int32 minimizers, on the CPU, as :func:`qtutor.quant.palettize._kmeans_sorted`
    builds them. ``threads``: 0 for ``torch.get_num_threads()``."""
    lib = _LIBRARY.load()
    if lib is None:
        raise QtutorError(_LIBRARY.reason)
    B, N1 = D.shape
    threads = max(1, min(threads or torch.get_num_threads(), B))
    P0, P1, P2 = (t.detach().to("cpu", torch.float64).contiguous() for t in (P0, P1, P2))
    D = D.detach().to("cpu", torch.float64, copy=True).contiguous()
    opts = torch.empty(max(k - 2, 0), B, N1, dtype=torch.int32)
    G = torch.empty(threads, N1, dtype=torch.float64)
    if k > 2:
        lib.kmeans_dp(
            P0.data_ptr(),
            P1.data_ptr(),
            P2.data_ptr(),
            D.data_ptr(),
            opts.data_ptr(),
            G.data_ptr(),
            B,
            N1 - 1,
            k,
            threads,
        )
    return D, list(opts.unbind(0))
