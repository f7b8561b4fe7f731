"""Register quantkit's quantizer with transformers and diffusers on `import quantkit`, without importing them.

Importing transformers and diffusers costs seconds, so `import quantkit` (and every CLI call) must not do
it. If their quantizer registries are already imported, quantkit registers at once; otherwise a
meta-path hook registers right after `transformers.quantizers.auto` / `diffusers.quantizers.auto` are
first imported (which every from_pretrained does).
"""
from __future__ import annotations

import importlib.abc
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

_TARGETS = {"transformers.quantizers.auto": "register_transformers",
            "diffusers.quantizers.auto": "register_diffusers"}


def _register(name: str) -> None:
    from quantkit import hf_quantizers

    try:
        getattr(hf_quantizers, _TARGETS[name])()
    except Exception as e:  # a registry change in a new library version must not break its import
        log.warning("could not register quantkit's quantizer with %s (%s: %s); from_pretrained will refuse "
                    "quantkit checkpoints, quantkit.load still works", name.split(".")[0], type(e).__name__, e)


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _register(name)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now where the registries are loaded, later (on their import) where not."""
    pending = False
    for name in _TARGETS:
        if name in sys.modules:
            _register(name)
        else:
            pending = True
    if pending and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
