"""What the chapters share, tested once (as d2l's book package does for its chapters).

* :func:`setup`: the first line after a chapter's imports (quiet libraries, seed, figure
  style) -> the device; :func:`eval_seqlen`: the evaluation window, as ``qtutor bench`` picks it.
* :func:`load_model`: the chapter's model on the reader's device, in float16 on a GPU (as
  ``qtutor bench`` runs it) and float32 on a CPU, after checking that it fits; it prints what
  the reader should know about the figures that follow (random weights, CPU budgets).
* :func:`budget`: evaluation and calibration sizes that finish on the reader's hardware. On a
  GPU, or with a small model, the chapter's own sizes stand; on a CPU with a model of
  Qwen2-0.5B's class, shorter windows, fewer evaluation tokens and calibration windows, said
  out loud by :func:`describe`.
* :func:`random_weights`: whether a model was written with random weights (time and memory
  only: its perplexities say nothing about quantization).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import QtutorError

#: hidden size from which a model counts as "large" for a CPU (Qwen2-0.5B has 896)
LARGE_HIDDEN = 512

#: on a CPU with a large model, a chapter evaluates windows of this many tokens ...
CPU_SEQLEN = 512
#: ... this many of them ...
CPU_EVAL_WINDOWS = 2
#: ... and calibrates with at most this many windows (of at most CPU_SEQLEN tokens)
CPU_CALIB_WINDOWS = 8


def pick_device() -> str:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def setup(seed: int = 0) -> str:
    """A chapter's first step after its imports -> its device (:func:`pick_device`).

    Quiets what would bury the chapter's own output (progress bars, which land on stderr;
    warnings; transformers' and datasets' info logs), seeds torch, and gives matplotlib the
    book's figure style.
    """
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:  # only WikiText-2 needs it
        pass
    torch.manual_seed(seed)
    import matplotlib.pyplot as plt

    plt.rcParams.update(FIGURE_STYLE)
    return pick_device()


#: the book's matplotlib settings
FIGURE_STYLE = {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3}


def eval_seqlen(config) -> int:
    """The evaluation window of the GPTQ protocol for ``config``, as ``qtutor bench`` picks it:
    2048 tokens for Qwen2-sized models (hidden size 512 or more), 512 for small ones, never past
    the model's positions."""
    max_positions = getattr(config, "max_position_embeddings", None) or 10**9
    return min(2048 if config.hidden_size >= LARGE_HIDDEN else 512, max_positions)


def random_weights(model) -> bool:
    """Whether ``model`` (or its config) was written with random weights (``qtutor_random_weights``)."""
    config = getattr(model, "config", model)
    return bool(getattr(config, "qtutor_random_weights", False))


def is_large(config) -> bool:
    return config.hidden_size >= LARGE_HIDDEN


def _bytes_needed(config, dtype: torch.dtype, copies: float) -> int:
    """Parameter bytes of ``copies`` models of ``config`` in ``dtype``: a lower bound on what a
    chapter holds (it keeps the model, quantized copies and activations)."""
    h, m, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * m
    emb = config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", True) else 2)
    return int(copies * (n * per_layer + emb) * torch.finfo(dtype).bits // 8)


def check_fits(config, device: str, dtype: torch.dtype, copies: float = 3.0) -> None:
    """Refuse, in one line, a model that cannot fit: a chapter holds about three copies of it."""
    need = _bytes_needed(config, dtype, copies)
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        have, where = free, "free GPU memory"
    else:
        try:
            import psutil

            have, where = psutil.virtual_memory().available, "available host memory"
        except ImportError:  # pragma: no cover - psutil is optional
            return
    if need > have:
        raise QtutorError(
            f"this chapter needs about {need / 2**30:.1f} GiB ({copies:g} copies of the model in "
            f"{str(dtype).replace('torch.', '')}) but there are {have / 2**30:.1f} GiB of {where}; "
            f"use a smaller MODEL, run on the CPU, or lower the chapter's sizes"
        )


def load_model(name: str, device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """(model, tokenizer) for a chapter, with a one-line note on what its numbers mean.

    float16 on a GPU (as ``qtutor bench``), float32 on a CPU, unless ``dtype`` is given or the
    environment sets ``QTUTOR_DTYPE`` (``float16`` on a CPU rehearses a GPU's numerics).
    """
    from .models import load_config
    from .models import load_model as _load

    device = device or pick_device()
    if dtype is None and os.environ.get("QTUTOR_DTYPE"):  # e.g. float16 on a CPU: a GPU's numerics
        dtype = getattr(torch, os.environ["QTUTOR_DTYPE"])
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    config = load_config(name)
    check_fits(config, device, dtype)
    model, tokenizer = _load(name, dtype=dtype, device=device)
    print(describe(model, device))
    return model, tokenizer


def describe(model, device: str) -> str:
    """What the reader should know about the figures this model will give."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    text = f"{n / 1e6:,.1f}M parameters, {c.num_hidden_layers} layers, in {dtype} on {device}."
    if random_weights(model):
        text += (
            " RANDOM WEIGHTS: this model has the architecture of a real one but was never "
            "trained, so its times and memory are real and its perplexities and errors are "
            "meaningless."
        )
    if device == "cpu" and is_large(c):
        text += (
            f" On a CPU this model is slow: the chapter evaluates {CPU_EVAL_WINDOWS} windows of "
            f"{CPU_SEQLEN} tokens and calibrates with at most {CPU_CALIB_WINDOWS} windows of at most "
            f"{CPU_SEQLEN} (a GPU runs the papers' protocol: windows of 2048, the whole test split)."
        )
    return text


@dataclass(frozen=True)
class Budget:
    """A chapter's sizes: evaluation window and tokens (None: the whole text), calibration
    windows and their length."""

    seqlen: int
    max_eval_tokens: Optional[int]
    calib_windows: int = 0
    calib_seqlen: int = 0


def budget(
    config, device: str, seqlen: int, max_eval_tokens: Optional[int], calib_windows: int = 0, calib_seqlen: int = 0
) -> Budget:
    """The chapter's sizes, lowered on a CPU for a model of Qwen2-0.5B's class (see :func:`describe`).

    >>> budget(type("C", (), {"hidden_size": 896})(), "cpu", 2048, None, 128, 2048)
    Budget(seqlen=512, max_eval_tokens=1024, calib_windows=8, calib_seqlen=512)
    >>> budget(type("C", (), {"hidden_size": 896})(), "cuda", 2048, None, 128, 2048)
    Budget(seqlen=2048, max_eval_tokens=None, calib_windows=128, calib_seqlen=2048)
    """
    b = Budget(seqlen, max_eval_tokens, calib_windows, calib_seqlen)
    if device != "cpu" or not is_large(config):
        return b
    seqlen = min(seqlen, CPU_SEQLEN)
    tokens = CPU_EVAL_WINDOWS * seqlen
    return Budget(
        seqlen,
        tokens if max_eval_tokens is None else min(max_eval_tokens, tokens),
        min(calib_windows, CPU_CALIB_WINDOWS),
        min(calib_seqlen, CPU_SEQLEN),
    )


def pick_group_size(width: int, preferred: int = 128) -> int:
    """``preferred`` when it divides ``width`` into several groups, else the largest smaller power
    of two that does (8 at the least)."""
    g = preferred
    while g > 8 and (width % g or g >= width):
        g //= 2
    return g


# --------------------------------------------------------------------------- how noisy a perplexity change is
def window_nll(model, ids: torch.Tensor, seqlen: int, max_tokens: Optional[int] = None, batch_size: int = 8):
    """The mean NLL (nats) of each evaluation window of :func:`qtutor.eval.perplexity` (its
    ``window_nll``: the same non-overlapping windows of ``seqlen`` tokens, at most ``max_tokens``
    in all, ``seqlen - 1`` scored tokens each) -> (windows,) float64 on the CPU. Their mean is the
    NLL of the perplexity (ARCHITECTURE.md section 4)."""
    from .eval import perplexity

    return torch.tensor(perplexity(model, ids, seqlen, max_tokens, batch_size).window_nll, dtype=torch.float64)


def ppl_change(nll_base: torch.Tensor, nll_other: torch.Tensor) -> tuple[float, float]:
    """(change, standard error) of a perplexity against a baseline, from the per-window NLLs of
    both on the same windows (:func:`window_nll`): ``exp(mean d) - 1`` with ``d`` the paired
    per-window differences, and its standard error by the delta method, ``exp(mean d) * std(d) /
    sqrt(windows)``. The windows are the sample: the error says how much the change would move on
    another stretch of text of the same length."""
    import math

    d = (torch.as_tensor(nll_other) - torch.as_tensor(nll_base)).double().flatten()
    if d.numel() < 2:
        raise QtutorError(
            f"a standard error needs at least 2 evaluation windows, got {d.numel()}; evaluate more tokens"
        )
    factor = math.exp(float(d.mean()))
    return factor - 1, factor * float(d.std()) / math.sqrt(d.numel())


def noise_note(nll_base: torch.Tensor, nll_other: torch.Tensor, what: str) -> str:
    """One sentence on the noise of a perplexity change, from the run: the change of ``what``
    against the baseline, its standard error over the evaluation windows, and the size below
    which a change cannot be told from zero on this sample (two standard errors)."""
    change, se = ppl_change(nll_base, nll_other)
    return (
        f"Window by window on the same {len(nll_base)} evaluation windows, the perplexity change of {what} is "
        f"{change:+.2%} with a standard error of {se:.2%}: on a sample of text of this length, changes and "
        f"differences smaller than about {2 * se:.2%} (two standard errors) are not resolved."
    )
