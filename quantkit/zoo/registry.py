"""The zoo's catalogue: name -> what the model is, where its weights live, how to retrain it."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from quantkit.errors import QuantkitError
from quantkit.zoo.common import METRICS_FILE

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
PREFIX = "zoo:"

Kind = Literal["diffusion-pipeline", "transformers-lm", "clip"]


@dataclass(frozen=True)
class ZooEntry:
    """One shipped model. `trainer` is "module:function" so listing the zoo imports no trainer."""

    name: str
    kind: Kind
    description: str
    trainer: str
    loader: str  # the standard class that loads the folder, e.g. "transformers.MixtralForCausalLM"
    depends_on: tuple[str, ...] = ()  # zoo models the trainer reads (digits-t2i reuses digits-clip)


_ENTRIES = (
    ZooEntry(
        name="shakespeare-moe",
        kind="transformers-lm",
        description="byte-level MixtralForCausalLM, 4 layers, 8 fused 3-D experts top-2, tinyshakespeare",
        trainer="quantkit.zoo.train_shakespeare_moe:train",
        loader="transformers.MixtralForCausalLM",
    ),
    ZooEntry(
        name="digits-clip",
        kind="clip",
        description="CLIPModel (ViT 32x32 + word-level text tower) trained contrastively on sklearn digits",
        trainer="quantkit.zoo.train_digits_clip:train",
        loader="transformers.CLIPModel",
    ),
    ZooEntry(
        name="digits-t2i",
        kind="diffusion-pipeline",
        description="StableDiffusionPipeline in miniature: digits-clip text encoder, AutoencoderKL, "
        "cross-attention UNet2DConditionModel, DDIM, classifier-free guidance",
        trainer="quantkit.zoo.train_digits_t2i:train",
        loader="diffusers.StableDiffusionPipeline",
        depends_on=("digits-clip",),
    ),
    ZooEntry(
        name="digits-ddpm",
        kind="diffusion-pipeline",
        description="unconditional pixel-space UNet2DModel (16x16) with a DDIM scheduler, DDIMPipeline folder",
        trainer="quantkit.zoo.train_digits_ddpm:train",
        loader="diffusers.DDIMPipeline",
        depends_on=("digits-clip",),
    ),
    ZooEntry(
        name="digits-dit",
        kind="diffusion-pipeline",
        description="class-conditional DiTPipeline: DiTTransformer2DModel on digits-t2i's VAE latents, "
        "ten digit classes, classifier-free guidance",
        trainer="quantkit.zoo.train_digits_dit:train",
        loader="diffusers.DiTPipeline",
        depends_on=("digits-t2i", "digits-clip"),
    ),
    ZooEntry(
        name="digits-mmdit",
        kind="diffusion-pipeline",
        description="FLUX in miniature: FluxPipeline with a FluxTransformer2DModel (2 double- then 4 "
        "single-stream blocks, rotary positions) trained by flow matching on digits-t2i's VAE latents, "
        "digits-clip's text tower in both encoder slots, FlowMatchEulerDiscreteScheduler, no guidance",
        trainer="quantkit.zoo.train_digits_mmdit:train",
        loader="diffusers.FluxPipeline",
        depends_on=("digits-t2i", "digits-clip"),
    ),
    ZooEntry(
        name="shakespeare-deepseek",
        kind="transformers-lm",
        description="byte-level DeepseekV3ForCausalLM: MLA, 1 shared + 16 routed experts, grouped top-4 "
        "(4 groups, top-2 groups), sigmoid routing with aux-loss-free bias balancing, tinyshakespeare",
        trainer="quantkit.zoo.train_shakespeare_deepseek:train",
        loader="transformers.DeepseekV3ForCausalLM",
    ),
)
ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}


def _entry(name: str) -> ZooEntry:
    key = name.removeprefix(PREFIX)
    if key not in ZOO:
        known = ", ".join(sorted(ZOO))
        raise QuantkitError(f"unknown zoo model {name!r}; known models: {known}")
    return ZOO[key]


def zoo_path(name: str) -> Path:
    """Folder of a shipped model's weights ("NAME" or "zoo:NAME"); loadable with its standard class."""
    entry = _entry(name)
    path = WEIGHTS_DIR / entry.name
    # The metrics file is written last, so its presence marks a finished training run.
    if not (path / METRICS_FILE).is_file():
        raise QuantkitError(
            f"zoo model {entry.name!r} has no weights at {path}; train them with `quantkit zoo train {entry.name}`"
        )
    return path


def train_model(name: str, out_dir: Path | None = None, seed: int = 0) -> dict:
    """Run a model's trainer into `out_dir` (default: its shipped weights folder); return its FP metrics."""
    entry = _entry(name)
    for dependency in entry.depends_on:
        zoo_path(dependency)  # fail before training, not after, when a dependency is missing
    module_name, function_name = entry.trainer.split(":")
    trainer = getattr(importlib.import_module(module_name), function_name)
    target = Path(out_dir) if out_dir is not None else WEIGHTS_DIR / entry.name
    log.info("training zoo model %s into %s (seed %d)", entry.name, target, seed)
    return trainer(target, seed=seed)
