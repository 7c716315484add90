"""Memory actually held by a model: bytes of its parameters and buffers (chapter 0).

Tied tensors (an lm_head sharing the embedding matrix) are counted once, and so is a
quantized lm_head that also serves the embedding lookup (``qtutor.quantize(..., head=True)``:
one module, reached from both). The split is ``embeddings`` (token embeddings and the lm_head,
tied or not, float or quantized), ``linears`` (every linear of the decoder layers, quantized or
not) and ``other`` (norms, rotary tables, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass
class MemoryReport:
    total_bytes: int
    embeddings_bytes: int
    linears_bytes: int
    other_bytes: int

    @property
    def total_mb(self) -> float:
        return self.total_bytes / 1e6


def _is_embedding(module: nn.Module) -> bool:
    from ..quant.base import QuantizedEmbedding

    return isinstance(module, (nn.Embedding, QuantizedEmbedding))


def _is_linear(module: nn.Module) -> bool:
    from ..quant.base import QuantizedLinear

    return isinstance(module, (nn.Linear, QuantizedLinear))


def memory_report(model: nn.Module) -> MemoryReport:
    """Bytes held by ``model``'s parameters and buffers, split by part."""
    seen, parts = set(), {"embeddings": 0, "linears": 0, "other": 0}
    from ..quant.base import QuantizedEmbedding

    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # what a quantized embedding reads its rows from: the lm_head, or a copy of it that a kernel
    # layout without row reads left behind (qtutor.runtime.kernels.accelerate)
    tables = {id(m.head) for m in model.modules() if isinstance(m, QuantizedEmbedding)}
    for mod_name, module in model.named_modules():
        if _is_embedding(module) or module is lm_head or id(module) in tables:
            part = "embeddings"
        elif _is_linear(module):
            part = "linears"
        else:
            part = "other"
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t is None or (t.data_ptr() in seen and t.numel()):  # shared (tied) storage counts once
                continue
            seen.add(t.data_ptr())
            parts[part] += t.numel() * t.element_size()
    return MemoryReport(sum(parts.values()), parts["embeddings"], parts["linears"], parts["other"])
