"""Quantization methods. Importing this package registers every implemented method."""
from . import rtn  # noqa: F401  (registers fp16_baseline, rtn_int8, rtn_int4)
from .base import (METHOD_NAMES, REGISTRY, Method, QuantConfig, QuantizedLinear, get_method,
                   implemented_methods, pack_codes, unpack_codes)
from .rtn import FloatLinear, RTNConfig, UniformLinear

__all__ = ["METHOD_NAMES", "REGISTRY", "Method", "QuantConfig", "QuantizedLinear", "get_method",
           "implemented_methods", "pack_codes", "unpack_codes", "RTNConfig", "UniformLinear",
           "FloatLinear"]
