"""Exercise checkers for the book's chapters: ``from qtutor.checks import ch01`` then
``ch01.check_<exercise>(your_function)``.

Each checker runs the student's answer on fresh inputs, tests the properties the exercise asks
for (and cases whose answers it knows), prints one line saying what passed or what was wrong,
and returns a bool (so a grader can ``assert`` it; ``qtutor grade`` scores whole notebooks).
One module per chapter: ``ch00`` ... ``ch07``.

The checkers hold no copy of the answers: where the truth is what a ``qtutor`` layer stores or
computes, they measure the layer; elsewhere they build inputs whose answer is known by
construction, or compare with answers written down as numbers. The answer runs under a guard
(:func:`call`): an exercise asks for code written with torch, so a call into ``qtutor`` (other
than the functions the exercise names) or into a function that answers it (``torch.nextafter``
for the fp16 spacing, say) fails the check.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Iterable, Optional

import torch


def report(ok: bool, what: str, hint: str = "") -> bool:
    """Print a one-line verdict and return ``ok``."""
    print(f"{'correct' if ok else 'not yet'}: {what}" + ("" if ok or not hint else f" -- {hint}"))
    return ok


def close(a, b, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """``a`` and ``b`` are tensors (or numbers) of the same shape and close in value."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol)


def _name(obj) -> str:
    """``module.qualname`` of a function, or of a frame's code."""
    code = getattr(obj, "f_code", None)
    if code is not None:  # a frame
        return f"{obj.f_globals.get('__name__', '?')}.{getattr(code, 'co_qualname', code.co_name)}"
    return f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


class _Guard:
    """Watches a call (``sys.setprofile``) for entries into ``qtutor`` other than the ``allow``ed
    functions (or module names), and for calls of the ``forbid``den builtins (by name, e.g.
    ``"nextafter"`` for ``torch.nextafter`` and ``Tensor.nextafter``). Calls made from inside an
    allowed function are its own business and are not watched."""

    def __init__(self, allow: Iterable = (), forbid: Iterable[str] = ()):
        self.allow_codes, self.allow_modules = set(), set()
        for a in allow:
            if isinstance(a, str):
                self.allow_modules.add(a)
            else:
                f = inspect.unwrap(getattr(a, "__func__", a))
                self.allow_codes.add(f.__code__)
        self.forbid = set(forbid)
        self.used: list[str] = []
        self._inside: set = set()  # frames of allowed qtutor functions now running
        self._base = None

    @staticmethod
    def _is_qtutor(frame) -> bool:
        name = frame.f_globals.get("__name__", "") if frame is not None else ""
        return name == "qtutor" or name.startswith("qtutor.")

    def _use(self, name: str) -> None:
        if name not in self.used:
            self.used.append(name)

    def _profile(self, frame, event, arg):
        if event == "return":
            self._inside.discard(frame)
            return
        if self._inside:
            return
        if event == "c_call":
            name = getattr(arg, "__name__", "")
            if name in self.forbid:
                owner = getattr(arg, "__self__", None)
                where = "Tensor" if isinstance(owner, torch.Tensor) else getattr(arg, "__module__", None) or "?"
                if where.startswith("torch._C._"):  # torch.linalg.cholesky is torch._C._linalg.linalg_cholesky
                    sub = where[len("torch._C._") :]
                    where, name = f"torch.{sub}", name.removeprefix(f"{sub}_")
                self._use(f"{where}.{name}")
            return
        if event != "call" or not self._is_qtutor(frame):
            return
        caller = frame.f_back
        if caller is not self._base and self._is_qtutor(caller):
            return  # qtutor calling itself, inside a call already judged
        if frame.f_code in self.allow_codes or frame.f_globals.get("__name__") in self.allow_modules:
            self._inside.add(frame)
            return
        self._use(_name(frame))

    def run(self, fn: Callable, args: tuple):
        previous = sys.getprofile()
        self._base = sys._getframe()
        sys.setprofile(self._profile)
        try:
            return fn(*args)
        finally:
            sys.setprofile(previous)


def call(
    fn: Callable, *args, allow: Iterable = (), forbid: Iterable[str] = (), none_ok: bool = False
) -> tuple[Any, Optional[str]]:
    """Run the student's ``fn(*args)``: ``(result, None)``, or ``(None, a one-line reason)`` when
    it raised, returned None (the exercise's stub; unless ``none_ok``: an answer that works in
    place), or called into ``qtutor`` other than the
    ``allow``ed functions (or module names), or called one of the ``forbid``den builtins.
    Never raises: a checker reports, it does not crash the notebook."""
    if not callable(fn):
        return None, f"expected a function, got {type(fn).__name__}"
    guard = _Guard(allow, forbid)
    result, error = None, None
    try:
        result = guard.run(fn, args)
    except Exception as err:  # the student's code: report, never crash the notebook
        error = f"raised {type(err).__name__}: {err}".strip()
    if guard.used:
        allowed = [a if isinstance(a, str) else _name(inspect.unwrap(getattr(a, "__func__", a))) for a in allow]
        also = f"; here you may call {', '.join(allowed)}" if allowed else ""
        return None, f"calls {', '.join(guard.used)}, which does what the exercise asks you to write yourself{also}"
    if error:
        return None, error
    if result is None and not none_ok:
        return None, "returned None: fill in the function (the stub's `...` returns nothing)"
    return result, None


def noise(shape: tuple, salt: float) -> torch.Tensor:
    """Uniform values in [-1, 1) of ``shape`` (float32) from a fixed formula, the same on every
    machine and torch version, for cases whose answers a checker writes down as numbers."""
    n = 1
    for d in shape:
        n *= d
    i = torch.arange(n, dtype=torch.float64)
    u = torch.frac(torch.sin(i * 12.9898 + salt).abs() * 43758.5453)
    return (2 * u - 1).float().reshape(shape)
