"""Perplexity with the GPTQ papers' protocol (chapter 0).

The text is tokenized once and cut into non-overlapping windows of ``seqlen`` tokens (the
remainder dropped). Each window is scored independently; the perplexity is
``exp(mean token negative log-likelihood)`` over all predicted tokens (IST-DASLab/gptq
``llama_eval``; the AWQ and SmoothQuant repositories do the same). With ``stride`` set, the
sliding-window variant of the Hugging Face perplexity guide is used instead: windows of
``seqlen`` start every ``stride`` tokens and only their last ``stride`` tokens are scored, so
each scored token sees up to ``seqlen - stride`` tokens of context (report it as such).

Every window scores the same number of tokens, so the perplexity is also ``exp`` of the mean of
the windows' own mean NLLs (``PerplexityResult.window_nll``). Resampling the windows gives the
run's uncertainty: :func:`bootstrap_ppl` (a percentile bootstrap interval of the perplexity,
Efron and Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13) and
:func:`bootstrap_ppl_ratio` (the paired interval of one model's perplexity over another's on the
same windows). :func:`bootstrap_mean` and :func:`bootstrap_mean_diff` are the same intervals for
any other per-window mean, such as a KL divergence, without the ``exp``. The windows are treated
as independent samples of the text; neighbouring windows
of one article are not quite that, so read the intervals as a lower bound on the uncertainty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import QtutorError
from ..quant.base import dequantize_once


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    scored_tokens: int  # tokens whose probability entered the mean
    eval_tokens: int  # tokens fed to the model (windows * seqlen for the standard protocol)
    seqlen: int
    stride: Optional[int]
    window_nll: list = field(default_factory=list)  # each window's mean NLL per scored token (nats), in order

    def __str__(self):
        how = f"stride {self.stride}" if self.stride else "non-overlapping"
        return f"perplexity {self.ppl:.3f} (seqlen {self.seqlen}, {how}, {self.eval_tokens} tokens)"


#: logits held at once by the chunked loss (elements): bounds the float32 copy of the logits
LOGIT_CHUNK_ELEMENTS = 2**27

#: families whose logits are exactly ``lm_head(last_hidden_state)`` (no scaling or soft-capping)
_PLAIN_HEAD_FAMILIES = ("qwen2", "llama", "mistral")


def _plain_head(model):
    """The output projection if ``model``'s logits are ``head(model.model(ids).last_hidden_state)``."""
    if getattr(getattr(model, "config", None), "model_type", None) not in _PLAIN_HEAD_FAMILIES:
        return None
    if not hasattr(model, "model") or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    return head if isinstance(getattr(head, "out_features", None), int) else None


@torch.no_grad()
def _window_nll(model, windows: torch.Tensor, n_scored: int) -> torch.Tensor:
    """Sum of NLLs of the last ``n_scored`` next-token predictions of each window: (batch,).

    For the Qwen2/Llama family the logits are computed from the final hidden states a chunk of
    rows at a time (at most ``LOGIT_CHUNK_ELEMENTS`` logits, in float32 for the loss), so a batch
    of 2048-token windows never materialises its (batch, 2048, 151936) logits at once; the
    numbers are the same as from the full logits.
    """
    targets = windows[:, -n_scored:]
    head = _plain_head(model)
    if head is None:
        logits = model(windows).logits[:, -n_scored - 1 : -1, :].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return nll.view(windows.shape[0], -1).sum(dim=1)
    hidden = model.model(windows, use_cache=False).last_hidden_state[:, -n_scored - 1 : -1, :]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    rows = max(1, LOGIT_CHUNK_ELEMENTS // head.out_features)
    nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with dequantize_once(head):  # a quantized head: dequantized once per batch, not once per chunk
        for i in range(0, hidden.shape[0], rows):
            logits = head(hidden[i : i + rows]).float()
            nll[i : i + rows] = F.cross_entropy(logits, targets[i : i + rows], reduction="none")
    return nll.view(windows.shape[0], -1).sum(dim=1)


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    seqlen: int,
    max_tokens: Optional[int] = None,
    batch_size: int = 1,
    stride: Optional[int] = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on the 1-D token tensor ``ids``.

    ``max_tokens`` caps the evaluated tokens (a whole number of windows); ``batch_size``
    windows run per forward pass (results do not depend on it).
    """
    from ..data import eval_windows

    device = next(model.parameters()).device
    if stride is None:
        windows = eval_windows(ids, seqlen, max_tokens)
        n_scored = seqlen - 1  # the first token of a window has no prediction
        batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        eval_tokens = windows.numel()
    else:
        if not 0 < stride <= seqlen:
            raise QtutorError(f"stride {stride} must be between 1 and seqlen {seqlen}")
        limit = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
        starts = range(0, limit - seqlen + 1, stride)
        if len(starts) == 0:
            raise QtutorError(f"the text has {limit} tokens, fewer than one window of {seqlen}")
        n_scored = stride
        windows = torch.stack([ids[s : s + seqlen] for s in starts])
        batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        eval_tokens = starts[-1] + seqlen
    total, count, per_window = 0.0, 0, []
    for batch in _progress(batches, progress, "perplexity"):
        sums = _window_nll(model, batch.to(device), n_scored)  # (batch,) summed NLL of each window
        total += float(sums.sum())
        count += batch.shape[0] * n_scored
        per_window += [s / n_scored for s in sums.tolist()]
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, eval_tokens, seqlen, stride, per_window)


#: resamples and coverage of the bootstrap intervals the benchmark records
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_LEVEL = 0.95


def _bootstrap_means(values: Sequence[float], n_boot: int, seed: int):
    """(n_boot,) means of ``values`` resampled with replacement, the resamples drawn with ``seed``."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise QtutorError(f"the bootstrap needs a non-empty list of per-window values, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise QtutorError("the bootstrap needs finite per-window values; a window's loss is NaN or infinite")
    if n_boot < 1:
        raise QtutorError(f"n_boot {n_boot} must be at least 1")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    return x[idx].mean(axis=1)


def _interval(means, level: float) -> tuple[float, float]:
    import numpy as np

    if not 0 < level < 1:
        raise QtutorError(f"level {level} must be between 0 and 1, e.g. 0.95")
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_mean(
    values: Sequence[float], n_boot: int = BOOTSTRAP_SAMPLES, level: float = BOOTSTRAP_LEVEL, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of the mean of per-window ``values``.

    ``values``: (n_windows,) one figure per evaluation window, every window weighing the same
    (each window's mean NLL, or its mean KL divergence from a reference model). Each of
    ``n_boot`` resamples draws ``n_windows`` windows with replacement and takes their mean; the
    interval holds the central ``level`` of those means. Deterministic for a given ``seed``.
    """
    return _interval(_bootstrap_means(values, n_boot, seed), level)


def bootstrap_mean_diff(
    values_a: Sequence[float],
    values_b: Sequence[float],
    n_boot: int = BOOTSTRAP_SAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired percentile bootstrap interval of ``mean(values_a) - mean(values_b)``, two models'
    per-window figures on the same windows.

    The windows are resampled together (the same indices for both models), so what the two
    share, such as a hard passage, cancels: the interval is :func:`bootstrap_mean` of the
    per-window differences.
    """
    if len(values_a) != len(values_b):
        raise QtutorError(
            f"paired windows: {len(values_a)} and {len(values_b)} windows; compare two evaluations of the same windows"
        )
    return bootstrap_mean([a - b for a, b in zip(values_a, values_b)], n_boot, level, seed)


def bootstrap_ppl(
    window_nll: Sequence[float], n_boot: int = BOOTSTRAP_SAMPLES, level: float = BOOTSTRAP_LEVEL, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of the perplexity over evaluation windows.

    ``window_nll``: (n_windows,) mean NLL per scored token of each window
    (``PerplexityResult.window_nll``; all windows score the same number of tokens). Each of
    ``n_boot`` resamples draws ``n_windows`` windows with replacement and takes ``exp`` of their
    mean; the interval holds the central ``level`` of those perplexities. Deterministic for a
    given ``seed``.
    """
    low, high = bootstrap_mean(window_nll, n_boot, level, seed)
    return math.exp(low), math.exp(high)


def bootstrap_ppl_ratio(
    window_nll_a: Sequence[float],
    window_nll_b: Sequence[float],
    n_boot: int = BOOTSTRAP_SAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired percentile bootstrap interval of ``ppl_a / ppl_b``, two models on the same windows.

    The windows are resampled together (the same indices for both models), so what the two
    share, such as a hard passage, cancels: ``ppl_a / ppl_b = exp(mean(nll_a - nll_b))``, and
    the interval is ``exp`` of :func:`bootstrap_mean_diff`'s.
    """
    low, high = bootstrap_mean_diff(window_nll_a, window_nll_b, n_boot, level, seed)
    return math.exp(low), math.exp(high)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)
