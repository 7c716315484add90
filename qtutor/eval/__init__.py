"""Metrics: perplexity, decode latency, memory and compression (ARCHITECTURE.md section 4)."""

from .latency import decode_latency, hf_generate_latency
from .memory import memory_report
from .ppl import PerplexityResult, bootstrap_mean, bootstrap_mean_diff, bootstrap_ppl, bootstrap_ppl_ratio, perplexity

__all__ = [
    "perplexity",
    "PerplexityResult",
    "bootstrap_mean",
    "bootstrap_mean_diff",
    "bootstrap_ppl",
    "bootstrap_ppl_ratio",
    "decode_latency",
    "hf_generate_latency",
    "memory_report",
]
