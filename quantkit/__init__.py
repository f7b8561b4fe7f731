"""quantkit: post-training quantization of diffusion models and Mixture-of-Experts language models."""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, device: str = "cpu", dtype="auto"):
    """Load a quantkit checkpoint folder; returns the same class the model was (a pipeline for a pipeline).
    dtype: 'auto' (as stored) or bfloat16/float16/float32 for the parts that run in full precision."""
    from quantkit.io import load as _load

    return _load(path, device, dtype)


__all__ = ["load", "__version__"]
