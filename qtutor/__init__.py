"""qtutor: LLM weight quantization from first principles, the package behind the book."""
from .api import QuantReport, quantize
from .errors import QtutorError
from .models import load_model, random_model
from .quant import METHOD_NAMES, get_method, implemented_methods
from .quant.gptq import GPTQConfig
from .quant.rtn import RTNConfig
from .quant.awq import AWQConfig
from .quant.smoothquant import SmoothQuantConfig

__version__ = "0.1.0"
__all__ = ["quantize", "QuantReport", "load_model", "random_model", "QtutorError", "METHOD_NAMES",
           "get_method", "implemented_methods", "RTNConfig", "GPTQConfig"]
__all__ += ["AWQConfig", "SmoothQuantConfig"]
from .quant.nf4 import NF4Config  # noqa: E402
from .quant.palettize import PalettizeConfig  # noqa: E402
__all__ += ["NF4Config", "PalettizeConfig"]
