"""Weight and activation quantizers built on quantkit.formats."""
from quantkit.quantizers.activation import ActQuantizer, fake_quant

__all__ = ["ActQuantizer", "fake_quant"]
