"""qtutor: LLM weight quantization from first principles, the package behind the book."""

from .api import QuantReport, quantize
from .errors import QtutorError
from .models import load_model, random_model
from .quant import (
    METHOD_NAMES,
    AWQConfig,
    GPTQConfig,
    NF4Config,
    PalettizeConfig,
    RTNConfig,
    SmoothQuantConfig,
    get_method,
    implemented_methods,
)

__version__ = "0.1.0"
__all__ = [
    "quantize",
    "QuantReport",
    "load_model",
    "random_model",
    "QtutorError",
    "METHOD_NAMES",
    "get_method",
    "implemented_methods",
    "RTNConfig",
    "GPTQConfig",
    "AWQConfig",
    "SmoothQuantConfig",
    "PalettizeConfig",
    "NF4Config",
]
