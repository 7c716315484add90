"""Quantization methods. Importing this package registers every implemented method."""
from . import rtn  # noqa: F401  (registers fp16_baseline, rtn_int8, rtn_int4)
from . import awq, smoothquant  # noqa: F401  (register awq_int4, smoothquant_w8a8)
from . import gptq  # noqa: F401  (registers gptq_int4)
from .base import (METHOD_NAMES, REGISTRY, Method, QuantConfig, QuantizedLinear, get_method,
                   implemented_methods, pack_codes, unpack_codes)
from .gptq import GPTQConfig
from .rtn import FloatLinear, RTNConfig, UniformLinear

__all__ = ["METHOD_NAMES", "REGISTRY", "Method", "QuantConfig", "QuantizedLinear", "get_method",
           "implemented_methods", "pack_codes", "unpack_codes", "RTNConfig", "UniformLinear",
           "FloatLinear", "GPTQConfig"]

from .awq import AWQConfig  # noqa: E402
from .smoothquant import SmoothQuantConfig, W8A8Linear  # noqa: E402
__all__ += ["AWQConfig", "SmoothQuantConfig", "W8A8Linear"]
