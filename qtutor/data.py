"""Text for evaluation and calibration (ARCHITECTURE.md section 4).

* WikiText-2 (Merity et al. 2016) through ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1")``,
  or a local copy in the Hub layout given by ``data_dir`` or ``$QTUTOR_WIKITEXT``; the test split
  is joined with ``"\\n\\n"`` as the GPTQ, AWQ and SmoothQuant repositories do.
* The embedded model's held-out text (``heldout.txt``) and calibration text (``calib.txt``,
  drawn from its training documents only).
* Token windows: non-overlapping evaluation windows and seeded random calibration windows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from .errors import QtutorError
from .models import embedded_model_dir

DATASETS = ("embedded", "wikitext2")


def wikitext2_text(split: str = "test", data_dir: Optional[str] = None) -> str:
    """WikiText-2 raw ``split`` joined with ``"\\n\\n"`` (the GPTQ papers' protocol)."""
    data_dir = data_dir or os.environ.get("QTUTOR_WIKITEXT")
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise QtutorError("WikiText-2 needs the `datasets` package: pip install datasets") from err
    if data_dir is not None and not Path(data_dir).is_dir():
        raise QtutorError(
            f"WikiText-2 folder {data_dir!r} not found; pass --data-dir with a copy "
            f"in the Hugging Face layout (or unset QTUTOR_WIKITEXT)"
        )
    source = data_dir or "wikitext"
    try:
        rows = datasets.load_dataset(source, "wikitext-2-raw-v1", split=split)
    except Exception as err:  # datasets raises many types for "offline" and "missing"
        where = f"folder {data_dir!r}" if data_dir else "the Hugging Face Hub"
        raise QtutorError(
            f"cannot load WikiText-2 {split!r} from {where} "
            f"({type(err).__name__}); pass --data-dir DIR with a local copy in the Hub "
            f"layout, or use --dataset embedded"
        ) from err
    return "\n\n".join(rows["text"])


def embedded_text(part: str = "heldout") -> str:
    """The embedded model's ``heldout`` (evaluation) or ``calib`` (calibration) text."""
    path = embedded_model_dir() / f"{part}.txt"
    if not path.exists():
        raise QtutorError(f"embedded text {path} is missing; reinstall qtutor")
    return path.read_text(encoding="utf-8")


def dataset_text(dataset: str, split: str, data_dir: Optional[str] = None) -> str:
    """Evaluation (``split="eval"``) or calibration (``split="calib"``) text of a dataset."""
    if dataset == "embedded":
        return embedded_text("heldout" if split == "eval" else "calib")
    if dataset == "wikitext2":
        return wikitext2_text("test" if split == "eval" else "validation", data_dir)
    raise QtutorError(f"unknown dataset {dataset!r}; choose from: {', '.join(DATASETS)}")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize the whole text once -> 1-D LongTensor of ids."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids[0]


def eval_windows(ids: torch.Tensor, seqlen: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows (n, seqlen); the remainder is dropped. ``max_tokens`` caps n*seqlen."""
    n = ids.numel() // seqlen
    if max_tokens is not None:
        n = min(n, max_tokens // seqlen)
    if n == 0:
        raise QtutorError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seqlen} "
            f"(or --max-eval-tokens is below --seqlen); use a smaller --seqlen"
        )
    return ids[: n * seqlen].reshape(n, seqlen)


def calibration_starts(n_tokens: int, n: int, seqlen: int, seed: int = 0) -> list[int]:
    """Where :func:`calibration_windows` cuts its ``n`` windows of ``seqlen`` from a text of
    ``n_tokens`` tokens with ``seed`` (so that a caller can keep other windows apart from them)."""
    if n_tokens <= seqlen:
        raise QtutorError(
            f"calibration text has {n_tokens} tokens, not more than one window of "
            f"{seqlen}; use a smaller --calib-seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seqlen, (n,), generator=g).tolist()


def calibration_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n`` random windows (n, seqlen) with a fixed seed, as GPTQ's ``get_wikitext2`` samples them."""
    return torch.stack([ids[s : s + seqlen] for s in calibration_starts(ids.numel(), n, seqlen, seed)])
