"""Running a Triton kernel on CPU tensors: Triton's interpreter, for the tests and for machines
without a GPU (the same kernel source as on CUDA)."""

from __future__ import annotations

from contextlib import contextmanager

from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

try:  # triton >= 3.4
    from triton import knobs

    def _interpret_mode() -> bool:
        return bool(knobs.runtime.interpret)
except ImportError:  # pragma: no cover - older triton
    import os

    def _interpret_mode() -> bool:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETED: dict = {}


def _interpreted(fn):
    if fn not in _INTERPRETED:
        _INTERPRETED[fn] = InterpretedFunction(fn)
    return _INTERPRETED[fn]


@contextmanager
def _interpreting():
    """Let the interpreter call triton.language's own jit'd helpers (``tl.sum``, ``tl.zeros``).

    With ``TRITON_INTERPRET=1`` set before ``import triton`` those helpers are interpreted
    functions; without it they are ``JITFunction`` objects that refuse to be called from Python.
    For the duration of a CPU launch, a call to one runs its Python source in the interpreter.
    """
    if _interpret_mode():
        yield
        return
    original = JITFunction.__call__
    JITFunction.__call__ = lambda self, *args, **kwargs: _interpreted(self.fn)(*args, **kwargs)
    try:
        yield
    finally:
        JITFunction.__call__ = original
