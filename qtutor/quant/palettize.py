"""Palettization: weights as indices into small look-up tables of k-means centroids (chapter on
palettization, Core ML's weight compression).

A b-bit palettized weight stores, for each weight, a b-bit index into a look-up table (LUT) of
``2^b`` values, and the LUTs themselves. The LUT entries are free real numbers, so they can follow
the weight distribution: for a given b the best LUT is the solution of 1-D k-means with
``k = 2^b`` (minimise the squared error of replacing each weight by its nearest entry).

Layout, as coremltools' ``PostTrainingPalettizer`` (``coremltools.optimize.torch.palettization``)
and Core ML's ``constexpr_lut_to_dense`` op define it:

* ``granularity="per_tensor"``: one LUT for the whole matrix;
* ``granularity="per_grouped_channel"``: ``group_size`` consecutive OUTPUT channels (rows of
  ``W``) share one LUT (coremltools' ``group_size`` with ``channel_axis=0``: not RTN's group of
  input columns). When ``group_size`` does not divide ``out_features`` the last group is
  shorter: there are ``ceil(out / group_size)`` LUTs, row ``r`` uses LUT ``r // group_size``,
  and the last LUT is fitted to its remaining rows only (172 rows in groups of 16: ten LUTs of
  16 rows and one of 12). coremltools 9 instead skips such a layer with a warning (it stays
  uncompressed; ``sanitize_palettization_group_size`` in
  ``coremltools.optimize.torch._utils.validation_utils``); :mod:`qtutor.coreml` exports the
  shorter group exactly (see :func:`qtutor.coreml.coreml_lut`);
* ``per_channel_scale=True`` (coremltools' ``enable_per_channel_scale``): each row is first
  divided by its max ``|w|`` so that all rows of a group share the range [-1, 1]; the scale is
  stored in fp16 and multiplied back (Core ML's ``constexpr_blockwise_shift_scale``). Unlike
  coremltools, which clusters ``w / max|w|`` in fp32 and rounds the scale to fp16 only when
  converting, we divide by the fp16 scale that is stored, so the LUT is fitted to what the
  model will compute. An all-zero row gets scale 1 (as in coremltools).

The LUTs are stored in fp16, the indices packed ``b`` bits each. ``dequantize`` is
``LUT[row // group_size][index] * scale[row]``.

k-means in one dimension is solved EXACTLY by dynamic programming over the sorted values
(Wang & Song, *Ckmeans.1d.dp*, R Journal 2011; Gronlund et al., *Fast exact k-means, k-medians
and Bregman divergence clustering in 1D*, 2017): in sorted order the clusters of an optimal
solution are contiguous runs, so ``D[m][i]``, the least cost of ``m`` clusters for the first
``i`` values, obeys ``D[m][i] = min_j D[m-1][j] + cost(j, i)``, where ``cost(j, i)`` (the
squared error of values ``j..i-1`` around their mean) comes from prefix sums in O(1). The
minimizing ``j`` is non-decreasing in ``i`` (the cost matrix is Monge), which lets a
divide-and-conquer evaluate each layer in O(n log n), and it is no smaller than the previous
layer's (Ckmeans.1d.dp's second bound); coremltools' ``kmeans1d`` uses SMAWK (O(n)) in C++. Here
the divide-and-conquer runs level by level, vectorised in torch over all the rows of a level and
all LUT groups at once (:func:`kmeans_1d`, :func:`kmeans_1d_groups`), in float64, so it also
runs on a GPU.

Which values are clustered is ``PalettizeConfig.kmeans``:

* ``"fp16"`` (default): the values rounded to fp16, deduplicated and weighted by their counts,
  as coremltools does for fp16 weights. The LUT is stored in fp16 anyway, and rounding to fp16
  roughly halves the number of distinct values of a group (16 x 896 values: about 7,700 instead
  of 14,300), hence the time; the result is the exact optimum for the rounded values.
* ``"exact"``: the float32 values themselves (the exact optimum, about twice as slow).
* ``"coreml"``: fp16, then rounded to 4 decimals, as coremltools' ``PostTrainingPalettizer``
  does by default (``enable_fast_kmeans_mode=True``, ``rounding_precision=4``); for parity.

In every mode each weight finally gets the index of its nearest fp16 LUT entry.

Time on a 2-core machine, one thread, a Qwen2-0.5B MLP matrix (4864 x 896, 304 LUTs of 16 x 896
values, 4 bits, Gaussian), with the programme's layers in PyTorch: about 14 s in "fp16" mode,
31 s "exact", 12 s "coreml"; coremltools' ``PostTrainingPalettizer`` (C++ SMAWK) took about
6.5 s. The same layers in C (:mod:`qtutor.runtime.cpu_kmeans`, used when a C compiler is at
hand, the same result bit for bit): 1.6 s "fp16", 2.4 s "exact", 1.3 s "coreml", and the whole
of Qwen2-0.5B (19,008 LUTs) in 108 s on one thread. All reach the same relative error
(0.09685). A whole model's LUT groups go through a handful of calls (:func:`kmeans_lut_many`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from ..errors import QtutorError
from .base import Method, QuantConfig, QuantizedLinear, pack_codes, register, unpack_codes

SUPPORTED_BITS = (2, 3, 4, 6, 8)
GRANULARITIES = ("per_tensor", "per_grouped_channel")
KMEANS_MODES = ("fp16", "exact", "coreml")


@dataclass(frozen=True)
class PalettizeConfig(QuantConfig):
    """bits: index width (LUTs of 2^bits entries); granularity: "per_tensor" or
    "per_grouped_channel"; group_size: output channels per LUT (per_grouped_channel only);
    per_channel_scale: divide each row by its max |w| before clustering; kmeans: which values are
    clustered ("fp16", "exact" or "coreml", see the module docstring).

    The defaults are coremltools' recommended 4-bit setting for LLMs (a LUT per 16 output rows,
    per-row scales), with the exact k-means of the fp16 values; measured beside coremltools'
    ``PostTrainingPalettizer`` (``benchmarks/peers_stories260k.csv``: stories260K, the whole
    WikiText-2 test): 118.137 against 121.647 ("coreml" k-means 119.082, "exact" 119.195; float
    122.334). coremltools leaves stories260K's gate_proj and up_proj (172 rows, not a multiple of
    16) uncompressed; with those two left in float as well, 120.710 ("coreml" k-means 121.961;
    ``benchmarks/peers_explain_stories260k.csv``)."""

    bits: int = 4
    granularity: str = "per_grouped_channel"
    group_size: int = 16
    per_channel_scale: bool = True
    kmeans: str = "fp16"

    def __post_init__(self):
        super().__post_init__()
        if self.bits not in SUPPORTED_BITS:
            raise QtutorError(
                f"{self.bits}-bit palettization is not supported; choose bits from "
                f"{', '.join(map(str, SUPPORTED_BITS))}"
            )
        if self.granularity not in GRANULARITIES:
            raise QtutorError(
                f"unknown palettization granularity {self.granularity!r}; choose {' or '.join(GRANULARITIES)}"
            )
        if self.granularity == "per_grouped_channel" and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise QtutorError(
                f"palettization group_size must be a positive number of output channels, got {self.group_size!r}"
            )
        if self.kmeans not in KMEANS_MODES:
            raise QtutorError(f"unknown k-means mode {self.kmeans!r}; choose from {', '.join(KMEANS_MODES)}")

    @property
    def n_clusters(self) -> int:
        return 2**self.bits

    def rows_per_lut(self, out_features: int) -> int:
        """Output channels sharing one LUT: ``group_size`` (``out_features`` for per_tensor).
        When it does not divide ``out_features``, the last LUT serves the remaining, fewer rows."""
        if self.granularity == "per_tensor":
            return out_features
        return self.group_size


# --------------------------------------------------------------------------- exact 1-D k-means
class KMeans1D(NamedTuple):
    """centroids: (k',) ascending, k' = min(k, number of distinct values); labels: (n,) int64."""

    centroids: torch.Tensor
    labels: torch.Tensor


_TINY = 1e-300


def _dc_layer(D, P0, P1, P2, m: int, k: int, prev=None):
    """One DP layer: ``Dm[i] = min_j D[j] + cost(j, i)`` for ``i`` in ``[m, N-(k-m)]`` and all
    groups, by divide and conquer over ``i`` processed one recursion level at a time.

    D, P0, P1, P2: (B, N+1) float64 (previous layer, prefix sums of w, w*x, w*x^2); prev: the
    previous layer's minimizers, a lower bound for this layer's (the last of m clusters starts no
    earlier than the last of m-1: Ckmeans.1d.dp's ``J[q-1][i] <= J[q][i]``).
    Returns (Dm, opt) with opt[b, i] the (last) minimizing j, int32.
    """
    B, N1 = D.shape
    N = N1 - 1
    dev = D.device
    # cost(j, i) = P2[i] - P2[j] - (P1[i]-P1[j])^2 / (P0[i]-P0[j]); keep G[j] = D[j] - P2[j].
    P0f, P1f, P2f = P0.reshape(-1), P1.reshape(-1), P2.reshape(-1)
    Gf = (D - P2).reshape(-1)
    Dm = torch.full((B * N1,), float("inf"), dtype=D.dtype, device=dev)
    opt = torch.zeros(B * N1, dtype=torch.int32, device=dev)
    base = torch.arange(B, device=dev) * N1
    count = torch.arange(2 * B * N1, device=dev)  # T <= B * (N + number of segments)
    # segments of rows [lo, hi] (shared by all groups) with candidate j in [olo, ohi] (per group)
    lo = torch.tensor([m], device=dev)
    hi = torch.tensor([N - (k - m)], device=dev)
    olo = torch.full((B, 1), m - 1, device=dev)
    ohi = torch.full((B, 1), N - 1, device=dev)
    while lo.numel():
        S = lo.numel()
        mid = (lo + hi) // 2
        top = torch.minimum(ohi, mid - 1)
        first = olo if prev is None else torch.minimum(torch.maximum(olo, prev[:, mid]), top)
        L = (top - first + 1).reshape(-1)  # candidates per (group, row)
        T = int(L.sum())
        end = L.cumsum(0)
        # rowid[t]: the (group, row) that candidate t belongs to; jj[t]: its flat index j
        rowid = torch.repeat_interleave(torch.arange(B * S, device=dev), L, output_size=T)
        ii = (base[:, None] + mid[None, :]).reshape(-1)  # flat index of row i
        j0 = first.reshape(-1) + (base[:, None] - (end - L).reshape(B, S)).reshape(-1)
        jj = j0.index_select(0, rowid).add_(count[:T])
        dW = (P0f.index_select(0, ii).index_select(0, rowid) - P0f.index_select(0, jj)).clamp_(min=_TINY)
        dS = P1f.index_select(0, ii).index_select(0, rowid) - P1f.index_select(0, jj)
        val = torch.addcmul(Gf.index_select(0, jj), dS, dS / dW, value=-1.0)
        best = torch.segment_reduce(val, "min", lengths=L)
        # a minimizer per segment: the last j where val == best (any minimizer will do, the
        # minimizers of a Monge array's rows are monotone either way)
        hit = torch.where(val == best.index_select(0, rowid), jj, -1)
        arg = torch.full((B * S,), -1, dtype=jj.dtype, device=dev).scatter_reduce_(0, rowid, hit, "amax")
        oj = (arg - base.repeat_interleave(S)).reshape(B, S)
        Dm[ii] = best + P2f.index_select(0, ii)
        opt[ii] = oj.reshape(-1).to(torch.int32)
        left, right = mid - 1 >= lo, mid + 1 <= hi
        lo, hi = torch.cat([lo[left], mid[right] + 1]), torch.cat([mid[left] - 1, hi[right]])
        olo, ohi = (torch.cat([olo[:, left], oj[:, right]], 1), torch.cat([oj[:, left], ohi[:, right]], 1))
    return Dm.reshape(B, N1), opt.reshape(B, N1)


#: where the programme's layers run: "auto" (the C programme when it builds here, else PyTorch),
#: "c" or "torch"; the result is the same (tests/test_palettize.py)
KMEANS_PROGRAMME = "auto"


def _use_c_programme() -> bool:
    if KMEANS_PROGRAMME not in ("auto", "c", "torch"):
        raise QtutorError(f"KMEANS_PROGRAMME is {KMEANS_PROGRAMME!r}; set it to 'auto', 'c' or 'torch'")
    if KMEANS_PROGRAMME == "torch":
        return False
    from ..runtime import cpu_kmeans

    reason = cpu_kmeans.available()
    if reason is not None and KMEANS_PROGRAMME == "c":
        raise QtutorError(reason)
    return reason is None


def _kmeans_sorted(x: torch.Tensor, w: torch.Tensor, n: torch.Tensor, k: int) -> torch.Tensor:
    """Exact weighted k-means of each row of ``x`` (B, N), sorted ascending, weights ``w`` >= 0,
    the first ``n[b]`` entries real (the rest zero-weight padding); ``N >= k``.

    Returns the cluster boundaries (B, k+1) int64: cluster c is ``x[b, bounds[c]:bounds[c+1]]``.
    """
    B, N = x.shape
    z = x.new_zeros(B, 1)
    P0 = torch.cat([z, w.cumsum(1)], 1)
    P1 = torch.cat([z, (w * x).cumsum(1)], 1)
    P2 = torch.cat([z, (w * x * x).cumsum(1)], 1)
    D = P2 - P1 * P1 / P0.clamp(min=_TINY)  # one cluster
    if _use_c_programme():  # the same layers as the loop below, in C (qtutor.runtime.cpu_kmeans)
        from ..runtime import cpu_kmeans

        D, opts = cpu_kmeans.dp_layers(P0, P1, P2, D, k)
        D, opts = D.to(x.device), [opt.to(x.device) for opt in opts]
    else:
        opts = []
        for m in range(2, k):
            D, opt = _dc_layer(D, P0, P1, P2, m, k, opts[-1] if opts else None)
            opts.append(opt)
    end = torch.maximum(n, torch.full_like(n, k))  # fewer distinct values than k: pad clusters
    if k == 1:
        last = torch.zeros(B, dtype=torch.long, device=x.device)
    else:
        j = torch.arange(N + 1, device=x.device)
        e = end[:, None]
        dW = (P0.gather(1, e) - P0).clamp(min=_TINY)
        dS = P1.gather(1, e) - P1
        val = D + P2.gather(1, e) - P2 - dS * dS / dW
        val = val.masked_fill((j < k - 1) | (j >= e), float("inf"))
        last = val.argmin(1)
    bounds = [end, last]
    for opt in reversed(opts):
        bounds.append(opt.gather(1, bounds[-1][:, None]).squeeze(1).long())
    if k > 1:
        bounds.append(torch.zeros_like(last))
    return torch.stack(bounds[::-1], 1)


def _unique_rows(X: torch.Tensor, weights: Optional[torch.Tensor] = None):
    """Per row of X (B, M): sorted distinct values padded to a common width N with the row's max,
    their total weights (0 on padding) and the count n of distinct values."""
    B = X.shape[0]
    xs, order = X.sort(1)
    new = torch.ones_like(xs, dtype=torch.bool)
    new[:, 1:] = xs[:, 1:] != xs[:, :-1]
    uid = new.long().cumsum(1) - 1
    n = uid[:, -1] + 1
    N = int(n.max())
    xu = xs[:, -1:].expand(B, N).clone().scatter_(1, uid, xs)
    ws = torch.ones_like(xs) if weights is None else weights.gather(1, order).to(xs.dtype)
    wu = torch.zeros_like(xu).scatter_add_(1, uid, ws)
    return xu, wu, n


def _kmeans_chunk(X: torch.Tensor, k: int, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`kmeans_1d_groups` on one chunk of rows: (B, M) -> centroids (B, k) float64."""
    X = X.detach().double()
    xu, wu, n = _unique_rows(X, None if weights is None else weights.detach().double())
    B = X.shape[0]
    if xu.shape[1] < k:  # pad with zero-weight copies of the max so that N >= k
        xu = torch.cat([xu, xu[:, -1:].expand(B, k - xu.shape[1])], 1)
        wu = torch.cat([wu, wu.new_zeros(B, k - wu.shape[1])], 1)
    N = xu.shape[1]
    # centre each row: smaller prefix sums, less cancellation in P2 - P1^2 / P0
    mean = (wu * xu).sum(1, keepdim=True) / wu.sum(1, keepdim=True).clamp(min=_TINY)
    x = xu - mean
    bounds = _kmeans_sorted(x, wu, n, k)
    z = x.new_zeros(B, 1)
    P0 = torch.cat([z, wu.cumsum(1)], 1).gather(1, bounds)
    P1 = torch.cat([z, (wu * x).cumsum(1)], 1).gather(1, bounds)
    cw, cs = P0[:, 1:] - P0[:, :-1], P1[:, 1:] - P1[:, :-1]
    first = x.gather(1, bounds[:, :-1].clamp(max=N - 1))  # for weightless clusters
    return torch.where(cw > 0, cs / cw.clamp(min=_TINY), first) + mean


def kmeans_1d_groups(
    X: torch.Tensor, k: int, weights: Optional[torch.Tensor] = None, max_elements: Optional[int] = None
) -> torch.Tensor:
    """Exact k-means of each row of ``X`` (B, M) separately -> centroids (B, k) float64, ascending.

    A row with fewer than ``k`` distinct values gets each of them once, then copies of its
    largest value. Rows are processed in chunks of about ``max_elements`` values (default 2^22
    with the C programme, 2^20 without; 2^24 on a GPU, where bigger chunks mean fewer, fuller
    kernel launches), each chunk on its own, so memory stays bounded however many rows come.
    The programme's layers run in C on the host's cores when it builds (``KMEANS_PROGRAMME``,
    :mod:`qtutor.runtime.cpu_kmeans`: its threads share out the groups of a chunk), else in
    PyTorch on ``X``'s device (on a CPU, chunks then run in a few threads at once: the
    divide-and-conquer's gathers and scans use one core each); the result does not depend on
    either choice.
    """
    if k < 1:
        raise QtutorError(f"k-means needs k >= 1 clusters, got {k}")
    B, M = X.shape
    in_c = _use_c_programme()  # parallel over the groups inside C: one chunk at a time
    if max_elements is None:
        max_elements = 1 << (24 if X.is_cuda else 22 if in_c else 20)
    per_chunk = max(1, max_elements // max(M, 1) // max(1, k // 16))
    chunks = [slice(s, s + per_chunk) for s in range(0, B, per_chunk)]

    def run(sl):
        return _kmeans_chunk(X[sl], k, None if weights is None else weights[sl])

    workers = min(len(chunks), torch.get_num_threads(), 4) if not (X.is_cuda or in_c) else 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            return torch.cat(list(pool.map(run, chunks)))
    return torch.cat([run(sl) for sl in chunks])


def kmeans_1d(x: torch.Tensor, k: int, weights: Optional[torch.Tensor] = None) -> KMeans1D:
    """The exact optimal 1-D k-means of the values ``x`` (optionally weighted): centroids in
    ascending order and each value's cluster.

    Minimises ``sum_i weights_i (x_i - centroid(x_i))^2`` over all clusterings into at most ``k``
    clusters, by dynamic programming over the sorted distinct values (weighted by their counts),
    as Ckmeans.1d.dp and coremltools' ``kmeans1d`` do.
    """
    x = x.detach().reshape(-1)
    if x.numel() == 0:
        raise QtutorError("k-means of an empty tensor: give at least one value")
    if weights is not None:
        weights = weights.detach().reshape(1, -1)
        if weights.shape[1] != x.numel() or bool((weights < 0).any()):
            raise QtutorError("k-means weights must be non-negative, one per value")
    c = kmeans_1d_groups(x[None], k, weights)[0]
    n_distinct = int(torch.unique(x).numel())
    c = c[: min(k, n_distinct)]
    labels = torch.bucketize(x.double(), (c[:-1] + c[1:]) / 2)
    return KMeans1D(c.to(x.dtype if x.is_floating_point() else torch.float64), labels)


# --------------------------------------------------------------------------- the LUT representation
@dataclass
class LUTWeight:
    """A palettized weight before packing: what :func:`kmeans_lut` returns.

    indices: (out, in) uint8 in [0, 2^bits); lut: (n_luts, 2^bits) fp16, LUT ``g`` serving rows
    ``g*rows_per_lut .. min((g+1)*rows_per_lut, out) - 1``, so ``n_luts = ceil(out /
    rows_per_lut)`` and the last LUT may serve fewer rows; scales: (out,) fp16 or None.

    ``rows_per_lut`` is stored: with a shorter last group it cannot be derived from the shapes
    (``out // n_luts`` is wrong, and ``ceil(out / n_luts)`` is ambiguous: 172 rows in 11 LUTs
    may be groups of 16 or of 17). Left out, it is ``out // n_luts`` and must divide ``out``
    (equal groups).
    """

    indices: torch.Tensor
    lut: torch.Tensor
    scales: Optional[torch.Tensor]
    bits: int
    rows_per_lut: Optional[int] = None

    def __post_init__(self):
        out, n_luts = self.indices.shape[0], self.lut.shape[0]
        if self.rows_per_lut is None:
            if n_luts == 0 or out % n_luts:
                raise QtutorError(
                    f"{n_luts} LUTs for {out} rows: give rows_per_lut (the rows each "
                    f"LUT serves, the last LUT possibly fewer)"
                )
            self.rows_per_lut = out // n_luts
        self.rows_per_lut = int(self.rows_per_lut)
        if self.rows_per_lut < 1 or n_luts != -(-out // self.rows_per_lut):
            raise QtutorError(
                f"{n_luts} LUTs of {self.rows_per_lut} rows do not cover {out} rows: "
                f"expected ceil({out} / rows_per_lut) LUTs"
            )

    def row_luts(self) -> torch.Tensor:
        """(out, 2^bits): the LUT each row uses, ``lut[row // rows_per_lut]``."""
        return self.lut.repeat_interleave(self.rows_per_lut, dim=0)[: self.indices.shape[0]]

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32: ``lut[row // rows_per_lut, index] * scale[row]``."""
        W = self.row_luts().float().gather(1, self.indices.long())
        return W if self.scales is None else W * self.scales.float()[:, None]


def _values_to_cluster(G: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "exact":
        return G
    G16 = G.half().float()
    if mode == "fp16":
        return G16
    return torch.round(G16 * 1e4) / 1e4  # coremltools: np.round(x.astype(float32) * 10**4) / 10**4


def kmeans_lut(W: torch.Tensor, cfg: PalettizeConfig = PalettizeConfig()) -> LUTWeight:
    """Palettize ``W`` (out, in): per-channel scales, one exact k-means per LUT group, fp16 LUTs,
    and each weight's index of its nearest LUT entry.

    The full groups of ``rows_per_lut`` rows are clustered in one batched
    :func:`kmeans_1d_groups` call; a shorter last group (``out % group_size`` rows) separately,
    on its own rows only."""
    return kmeans_lut_many([W], cfg)[0]


def kmeans_lut_many(Ws: list[torch.Tensor], cfg: PalettizeConfig = PalettizeConfig()) -> list[LUTWeight]:
    """:func:`kmeans_lut` of several matrices at once, the same result for each: the LUT groups
    of all of them that have the same number of values go through one :func:`kmeans_1d_groups`
    call (a whole model's linears in a handful of calls instead of one or two per linear: on a
    GPU, fewer kernel launches; on a CPU, more chunks to run side by side)."""
    prepared, jobs = [], {}  # jobs: (values per group, device) -> [(matrix, part, groups)]
    for n, W in enumerate(Ws):
        W = W.detach().float()
        out_features, in_features = W.shape
        rows = cfg.rows_per_lut(out_features)
        scales = None
        if cfg.per_channel_scale:
            s = W.abs().amax(1)
            scales = torch.where(s > 0, s, torch.ones_like(s)).half()  # all-zero rows: scale 1
            W = W / scales.float()[:, None]
        V = _values_to_cluster(W, cfg.kmeans)
        split = out_features // rows * rows
        parts = [V[:split].reshape(split // rows, rows * in_features)] if split else []
        if split < out_features:  # the shorter last group, on its own rows only
            parts.append(V[split:].reshape(1, -1))
        for part, groups in enumerate(parts):
            jobs.setdefault((groups.shape[1], groups.device), []).append((n, part, groups))
        prepared.append((W, scales, rows))
    luts = [{} for _ in Ws]
    for items in jobs.values():
        C = kmeans_1d_groups(torch.cat([g for _, _, g in items]), cfg.n_clusters)
        for (n, part, _), c in zip(items, C.split([g.shape[0] for _, _, g in items])):
            luts[n][part] = c
    result = []
    for (W, scales, rows), parts in zip(prepared, luts):
        lut = torch.cat([parts[p] for p in sorted(parts)]).half()
        row_lut = lut.repeat_interleave(rows, dim=0)[: W.shape[0]].float()
        mids = (row_lut[:, :-1] + row_lut[:, 1:]) / 2
        idx = torch.searchsorted(mids.contiguous(), W.contiguous())
        result.append(LUTWeight(idx.to(torch.uint8), lut, scales, cfg.bits, rows))
    return result


class PalettizedLinear(QuantizedLinear):
    """A linear layer stored as packed ``bits``-bit indices (``qweight``), fp16 LUTs (``lut``) and
    optional fp16 per-row scales (``scales``): what Core ML's ``constexpr_lut_to_dense`` (+
    ``constexpr_blockwise_shift_scale``) holds. ``rows_per_lut`` (a plain int) is the number of
    rows each LUT serves, the last LUT possibly fewer: row ``r`` uses ``lut[r // rows_per_lut]``."""

    @property
    def row_unit(self) -> int:
        return self.rows_per_lut

    def __init__(self, q: LUTWeight, bias: Optional[torch.Tensor] = None):
        out_features, in_features = q.indices.shape
        super().__init__(in_features, out_features, bias)
        self.bits = q.bits
        self.rows_per_lut = int(q.rows_per_lut)
        self.register_buffer("qweight", pack_codes(q.indices, q.bits))
        self.register_buffer("lut", q.lut.half().contiguous())
        self.register_buffer("scales", None if q.scales is None else q.scales.half().contiguous())

    @classmethod
    def from_float(cls, linear: nn.Linear, cfg: PalettizeConfig = PalettizeConfig()) -> "PalettizedLinear":
        return cls(kmeans_lut(linear.weight.data, cfg), linear.bias)

    @classmethod
    def from_float_many(
        cls, linears: list[nn.Linear], cfg: PalettizeConfig = PalettizeConfig()
    ) -> list["PalettizedLinear"]:
        """:meth:`from_float` of each linear, their k-means batched (:func:`kmeans_lut_many`)."""
        qs = kmeans_lut_many([lin.weight.data for lin in linears], cfg)
        return [cls(q, lin.bias) for q, lin in zip(qs, linears)]

    def unpacked(self) -> LUTWeight:
        return LUTWeight(
            unpack_codes(self.qweight, self.bits, self.in_features), self.lut, self.scales, self.bits, self.rows_per_lut
        )

    def dequantize(self) -> torch.Tensor:
        return self.unpacked().dequantize()

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, in) float32: rows ``rows`` of :meth:`dequantize`, from their indices, LUTs and scales."""
        idx = unpack_codes(self.qweight[rows], self.bits, self.in_features).long()
        W = self.lut[rows // self.rows_per_lut].float().gather(1, idx)
        return W if self.scales is None else W * self.scales[rows].float()[:, None]

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", luts={self.lut.shape[0]}x{self.lut.shape[1]}, "
            f"rows_per_lut={self.rows_per_lut}, per_channel_scale={self.scales is not None}"
        )


register(
    Method(
        "palettization_4bit",
        PalettizeConfig(bits=4, granularity="per_grouped_channel", group_size=16, per_channel_scale=True),
        "4-bit palettization: exact k-means LUT per 16 output channels, per-channel scales",
        from_float=PalettizedLinear.from_float,
        from_float_many=PalettizedLinear.from_float_many,
        overrides=("bits",),
    )
)
