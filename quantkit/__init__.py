"""quantkit: post-training quantization of diffusion models and Mixture-of-Experts language models."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path, device: str = "cpu", dtype="auto"):
    """Load a quantkit checkpoint folder; returns the same class the model was (a pipeline for a pipeline).
    dtype: 'auto' (as stored) or bfloat16/float16/float32 for the parts that run in full precision."""
    from quantkit.io import load as _load

    return _load(path, device, dtype)


def quantize(model, recipe="rtn-w8a8", calib=None, **kwargs):
    """Quantize an in-memory transformers / diffusers model or pipeline in place; see quantkit.api.quantize."""
    from quantkit.api import quantize as _quantize

    return _quantize(model, recipe, calib, **kwargs)


def save(model, out, **kwargs):
    """Write a model returned by quantkit.quantize as a checkpoint folder; see quantkit.api.save."""
    from quantkit.api import save as _save

    return _save(model, out, **kwargs)


__all__ = ["load", "quantize", "save", "__version__"]

# from_pretrained on quantkit checkpoints (quant_method "quantkit"); imports neither library by itself.
from quantkit.registration import install as _install_registration  # noqa: E402

_install_registration()
