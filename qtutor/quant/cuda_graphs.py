"""Replaying a loop of small kernels as a CUDA graph (GPTQ's column loop, chapter 3).

A function ``fn(*inputs, *consts, *outputs)`` that writes its results into ``outputs`` is
captured once per (function, input shapes, constants, device) and replayed afterwards: the
inputs are copied into the graph's own tensors, the graph runs, and copies of its outputs are
returned. The arithmetic is the captured function's, kernel for kernel; only the launches go.
"""

from __future__ import annotations

import torch

_GRAPHS: dict = {}


class _Captured:
    """``fn`` captured as a CUDA graph on static tensors shaped like ``example`` (its inputs);
    ``n_out`` outputs shaped like the first input."""

    def __init__(self, fn, example: tuple, consts: tuple, n_out: int):
        self.inputs = [torch.zeros_like(t) for t in example]
        for static, value in zip(self.inputs, example):
            static.copy_(value)  # realistic values for the warm-up (e.g. a non-singular matrix)
        self.outputs = [torch.zeros_like(example[0]) for _ in range(n_out)]
        args = (*self.inputs, *consts, *self.outputs)
        device = example[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
            fn(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            fn(*args)

    def __call__(self, inputs: tuple) -> tuple:
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return tuple(t.clone() for t in self.outputs)


def replay(fn, inputs: tuple, consts: tuple = (), n_out: int = 1) -> tuple:
    """``fn(*inputs, *consts, *outputs)`` run by replaying its CUDA graph (captured on the first
    call for these shapes) -> the ``n_out`` outputs, each shaped like ``inputs[0]``."""
    key = (fn, tuple(t.shape for t in inputs), consts, n_out, str(inputs[0].device))
    if key not in _GRAPHS:
        _GRAPHS[key] = _Captured(fn, inputs, consts, n_out)
    return _GRAPHS[key](inputs)
