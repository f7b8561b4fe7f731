"""The model zoo, addressed as zoo:NAME: trained reference models shipped with the package
(quantkit/zoo/registry.py) and tiny random-weight models built on the spot (quantkit/tiny_models.py)."""
from __future__ import annotations

from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.outlier_variants import DOWN_SUFFIX, MASSIVE_SUFFIX, PIXEL_SUFFIX, SUFFIX, outlier_variant_path
from quantkit.tiny_models import TINY, tiny_model_path


def _trained() -> dict:
    try:
        from quantkit.zoo.registry import ZOO
    except ImportError:
        return {}
    return ZOO


def zoo_names() -> dict[str, str]:
    """name -> one-line description: trained models and their outlier variants, then tiny ones."""
    out = {}
    for name, e in _trained().items():
        out[name] = getattr(e, "description", "")
        out[name + SUFFIX] = f"{name} with planted activation outliers (function-preserving)"
        if getattr(e, "kind", None) == "transformers-lm":
            out[name + DOWN_SUFFIX] = f"{name} with norm-gain and down-projection-input outliers (function-preserving)"
            out[name + MASSIVE_SUFFIX] = f"{name} with norm-gain outliers and massive-token down-projection inputs (function-preserving)"
        if getattr(e, "kind", None) == "diffusion-pipeline":
            out[name + PIXEL_SUFFIX] = f"{name} with token-wise (pixel) outliers in its GEGLU projections (function-preserving)"
    out.update({name: desc for name, (desc, _) in TINY.items()})
    return out


def resolve(name: str) -> Path:
    """Local folder of zoo model `name` (without the 'zoo:' prefix)."""
    if name in TINY:
        return tiny_model_path(name)
    for suffix in (MASSIVE_SUFFIX, PIXEL_SUFFIX):
        if name.endswith(suffix) and name[: -len(suffix)] in {**_trained(), **TINY}:
            return outlier_variant_path(name[: -len(suffix)], suffix)
    if name.endswith(DOWN_SUFFIX) and name[: -len(DOWN_SUFFIX)] in {**_trained(), **TINY}:
        return outlier_variant_path(name[: -len(DOWN_SUFFIX)], DOWN_SUFFIX)
    if name.endswith(SUFFIX) and name[: -len(SUFFIX)] in {**_trained(), **TINY}:
        return outlier_variant_path(name[: -len(SUFFIX)])
    trained = _trained()
    if name in trained:
        from quantkit.zoo.registry import zoo_path

        return zoo_path(name)
    raise QuantkitError(f"unknown zoo model {name!r}; available: {', '.join(zoo_names())}")
