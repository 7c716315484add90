"""Fast paths for timing decoding (chapter 7; ARCHITECTURE.md section 2): matmuls that read the
quantized layers' packed storage, the static-cache decode harness and its glue kernels.

Nothing here changes a number the metrics report: every fast layer is checked against its
reference forward, and the memory a model reports is its stored bytes. ``triton`` is imported
only when a Triton kernel runs.
"""

from .decode import FastLatencyResult, StaticDecoder, fast_decode_latency
from .kernels import ROW_DIMS, Int4TinyGemmLinear, accelerate, fuse_rows, restore, tinygemm_available, triton_available
from .speed import compare_decode_speed, linear_bits

__all__ = [
    "accelerate",
    "fuse_rows",
    "restore",
    "ROW_DIMS",
    "Int4TinyGemmLinear",
    "triton_available",
    "tinygemm_available",
    "StaticDecoder",
    "fast_decode_latency",
    "FastLatencyResult",
    "compare_decode_speed",
    "linear_bits",
]
