"""quantkit: post-training quantization of diffusion models and Mixture-of-Experts language models."""
from __future__ import annotations

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


def _refuse_hidden_kernels_package() -> None:
    """transformers (>= 5.25) imports Hugging Face's `kernels` package; run from the repository root
    (`python -m ...` puts it first on sys.path) this project's kernels/ folder hides it, and transformers
    fails with an ImportError that names neither. Say what is wrong instead."""
    import importlib.metadata
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("kernels")
    ours = Path(__file__).resolve().parents[1] / "kernels"
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != ours:
        return
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # nothing to hide
    raise ImportError(f"the folder {ours.parent} is on sys.path (python -m run from it?), where quantkit's kernels/ "
                      "folder hides the `kernels` package transformers imports; run from another folder or set "
                      "PYTHONSAFEPATH=1")


_refuse_hidden_kernels_package()

# from_pretrained on quantkit checkpoints (quant_method "quantkit"); imports neither library by itself.
from quantkit.registration import install as _install_registration  # noqa: E402

_install_registration()
