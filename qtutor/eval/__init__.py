"""Metrics: perplexity, decode latency, memory and compression (ARCHITECTURE.md section 4)."""

from .latency import decode_latency
from .memory import memory_report
from .ppl import PerplexityResult, perplexity

__all__ = ["perplexity", "PerplexityResult", "decode_latency", "memory_report"]
