"""Load a diffusers pipeline folder around an already built (quantized) denoiser.

`DiffusionPipeline.from_pretrained(folder, transformer=module)` ignores `module` when the pipeline lists the
component as optional (WanPipeline's `transformer`, next to Wan 2.2's `transformer_2`) and loads it from the
folder instead, which holds the quantized weights. Those are assembled here from their own components."""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from torch import nn


def load_pipeline_with(folder: Path, component: str, module: nn.Module, **kw: Any) -> Any:
    """The pipeline of `folder` with `module` as its `component`; `kw` goes to every from_pretrained
    (e.g. dtype)."""
    import diffusers
    from diffusers import DiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    expected, optional = cls._get_signature_keys(cls)
    if component in expected and component not in getattr(cls, "_optional_components", []):
        return DiffusionPipeline.from_pretrained(folder, local_files_only=True, **kw, **{component: module})
    parts: dict[str, Any] = {component: module}
    for name, value in index.items():
        if name.startswith("_") or name == component:
            continue
        if isinstance(value, list) and len(value) == 2:
            library, class_name = value
            if library is None:
                parts[name] = None
                continue
            owner = getattr(importlib.import_module(library), class_name)
            parts[name] = owner.from_pretrained(folder / name, local_files_only=True,
                                                  **(kw if issubclass(owner, nn.Module) else {}))  # not schedulers
        elif name in optional or name in expected:
            parts[name] = value  # plain config values (e.g. boundary_ratio)
    return cls(**parts)
