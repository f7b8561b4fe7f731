"""Quantization methods, registered by name."""
from quantkit.methods import rtn  # noqa: F401  (registers)
from quantkit.methods.base import METHODS, BlockContext, Method, get_method, register

__all__ = ["METHODS", "BlockContext", "Method", "get_method", "register"]
