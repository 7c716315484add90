"""Quantization methods. Importing this package registers every implemented method
(each module registers its benchmark name with :func:`qtutor.quant.base.register`)."""

from .awq import AWQConfig
from .base import (
    METHOD_NAMES,
    REGISTRY,
    FloatLinear,
    Method,
    QuantConfig,
    QuantizedLinear,
    get_method,
    implemented_methods,
    pack_codes,
    replace_linear,
    unpack_codes,
)
from .gptq import GPTQConfig
from .nf4 import NF4Config, NF4Linear
from .palettize import PalettizeConfig, PalettizedLinear
from .rtn import RTNConfig, UniformGridConfig, UniformLinear
from .smoothquant import SmoothQuantConfig, W8A8Linear

__all__ = [
    "METHOD_NAMES",
    "REGISTRY",
    "Method",
    "QuantConfig",
    "QuantizedLinear",
    "get_method",
    "implemented_methods",
    "pack_codes",
    "unpack_codes",
    "replace_linear",
    "UniformGridConfig",
    "RTNConfig",
    "UniformLinear",
    "FloatLinear",
    "GPTQConfig",
    "AWQConfig",
    "SmoothQuantConfig",
    "W8A8Linear",
    "PalettizeConfig",
    "PalettizedLinear",
    "NF4Config",
    "NF4Linear",
]
