"""The model zoo, addressed as zoo:NAME: trained reference models shipped with the package
(quantkit/zoo/registry.py) and tiny random-weight models built on the spot (quantkit/tiny_models.py)."""
from __future__ import annotations

from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.tiny_models import TINY, tiny_model_path


def _trained() -> dict:
    try:
        from quantkit.zoo.registry import ZOO
    except ImportError:
        return {}
    return ZOO


def zoo_names() -> dict[str, str]:
    """name -> one-line description, trained models first."""
    out = {name: getattr(e, "description", "") for name, e in _trained().items()}
    out.update({name: desc for name, (desc, _) in TINY.items()})
    return out


def resolve(name: str) -> Path:
    """Local folder of zoo model `name` (without the 'zoo:' prefix)."""
    if name in TINY:
        return tiny_model_path(name)
    trained = _trained()
    if name in trained:
        from quantkit.zoo.registry import zoo_path

        return zoo_path(name)
    raise QuantkitError(f"unknown zoo model {name!r}; available: {', '.join(zoo_names())}")
