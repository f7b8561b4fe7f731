"""Evaluation defaults a model folder can carry (quantkit_eval.json), so that `quantkit eval` needs no
flags for it. Any folder may have one; the zoo's digit models do.

{"clip_model": "zoo:digits-clip" | "path", "real_images": "sklearn-digits" | "path",
 "prompts": [...], "labels": [...], "class_prompts": [...], "steps": 20, "guidance_scale": 4.0,
 "pipeline_kwargs": {"height": 32, "width": 32}}

`pipeline_kwargs` are call arguments the model must be sampled with (the size it was trained at, say, where
the pipeline class hard-codes another default): evaluation passes them, and so does calibration sampling.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

PROFILE_FILE = "quantkit_eval.json"


@dataclass
class EvalProfile:
    clip_model: str | None = None
    real_images: str | None = None
    prompts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # intended class of each prompt (or the class label itself)
    class_prompts: list[str] = field(default_factory=list)  # one text per class, for IS and accuracy
    steps: int = 20
    guidance_scale: float | None = None
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path | None) -> "EvalProfile":
        if folder is None or not (folder / PROFILE_FILE).is_file():
            return cls()
        try:
            data: dict[str, Any] = json.loads((folder / PROFILE_FILE).read_text())
        except json.JSONDecodeError as e:
            raise QuantkitError(f"{folder / PROFILE_FILE} is not valid JSON: {e}") from None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def folder_pipeline_kwargs(pipe: Any) -> dict[str, Any]:
    """The `pipeline_kwargs` of the folder a diffusers pipeline was loaded from ({} when it has none)."""
    src = getattr(pipe, "name_or_path", None)
    if not isinstance(src, (str, Path)) or not Path(src).is_dir():
        return {}
    return dict(EvalProfile.read(Path(src)).pipeline_kwargs)
