"""Quantization methods, registered by name."""
from quantkit.methods import rtn  # noqa: F401  (registers)
from quantkit.methods import eda_dm, flexround  # noqa: F401  (register)
from quantkit.methods import dgq, duquant, eaquant, hadamard  # noqa: F401  (register)
from quantkit.methods.base import METHODS, BlockContext, Method, get_method, register

__all__ = ["METHODS", "BlockContext", "Method", "get_method", "register"]
