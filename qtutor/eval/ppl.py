"""Perplexity with the GPTQ papers' protocol (chapter 0).

The text is tokenized once and cut into non-overlapping windows of ``seqlen`` tokens (the
remainder dropped). Each window is scored independently; the perplexity is
``exp(mean token negative log-likelihood)`` over all predicted tokens (IST-DASLab/gptq
``llama_eval``; the AWQ and SmoothQuant repositories do the same). With ``stride`` set, the
sliding-window variant of the Hugging Face perplexity guide is used instead: windows of
``seqlen`` start every ``stride`` tokens and only their last ``stride`` tokens are scored, so
each scored token sees up to ``seqlen - stride`` tokens of context (report it as such).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import QtutorError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    scored_tokens: int  # tokens whose probability entered the mean
    eval_tokens: int  # tokens fed to the model (windows * seqlen for the standard protocol)
    seqlen: int
    stride: Optional[int]

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
    total, count = 0.0, 0
    for batch in _progress(batches, progress, "perplexity"):
        total += float(_window_nll(model, batch.to(device), n_scored).sum())
        count += batch.shape[0] * n_scored
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, eval_tokens, seqlen, stride)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)
