"""Numeric formats, pure torch: int, MXFP4, FP8 E4M3, log2; bit packing; QuantizedWeight."""
from quantkit.formats.packing import pack, packed_len, unpack
from quantkit.formats.qweight import QuantizedWeight
from quantkit.formats.spec import FormatSpec

__all__ = ["FormatSpec", "QuantizedWeight", "pack", "unpack", "packed_len"]
