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

from . import nf4, palettize  # noqa: F401,E402  (register qlora_nf4, palettization_4bit)
from .nf4 import NF4Config, NF4Linear  # noqa: E402
from .palettize import PalettizeConfig, PalettizedLinear  # noqa: E402
__all__ += ["NF4Config", "NF4Linear", "PalettizeConfig", "PalettizedLinear"]
