"""Exercise checkers for the book's chapters: ``from qtutor.checks import ch01`` then
``ch01.check_<exercise>(your_function)``.

Each checker runs the student's answer on fresh inputs, compares it with the package's own
implementation, prints one line saying what passed or what was wrong, and returns a bool
(so a grader can ``assert`` it). One module per chapter: ``ch00`` ... ``ch07``.
"""

from __future__ import annotations

import torch


def report(ok: bool, what: str, hint: str = "") -> bool:
    """Print a one-line verdict and return ``ok``."""
    print(f"{'correct' if ok else 'not yet'}: {what}" + ("" if ok or not hint else f" -- {hint}"))
    return ok


def close(a, b, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """``a`` and ``b`` are tensors (or numbers) of the same shape and close in value."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol)
