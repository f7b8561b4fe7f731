"""Diffusion metrics with torchmetrics: FID vs real images, FID vs the full-precision model's samples on
the same seeds and prompts, Inception Score, CLIP score, and prompt accuracy of a zero-shot CLIP judge."""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from quantkit.errors import QuantkitError
from quantkit.eval.clip_features import ClipImageFeatures, ClipZeroShotLogits, TensorFeaturesCLIP, load_clip
from quantkit.eval.real_images import load_real_images
from quantkit.progress import track

log = logging.getLogger(__name__)
DIFFUSION_METRICS = ("fid_real", "fid_fp", "is", "clip_score", "prompt_accuracy")


@dataclass
class SampleSet:
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    prompts: list[str]  # the text each image was made from ("" when unconditional)
    labels: list[int]  # intended class (-1 when unknown)


def sample_images(pipe: Any, n: int, seed: int, steps: int, prompts: list[str], labels: list[int],
                  class_prompts: list[str], guidance: float | None, batch: int = 50,
                  progress: Callable[[int], None] | None = None,
                  pipeline_kwargs: dict[str, Any] | None = None) -> SampleSet:
    """n images; batch b uses generator seed + b, so two models get the same noise and prompts.
    `pipeline_kwargs` (the profile's) go to every call; one the pipeline does not take is an error."""
    params = inspect.signature(pipe.__call__).parameters
    unknown = sorted(set(pipeline_kwargs or {}) - set(params))
    if unknown:
        raise QuantkitError(f"pipeline_kwargs {', '.join(unknown)} are not arguments of {type(pipe).__name__}; "
                            f"allowed: {', '.join(p for p in params if p not in ('self', 'kwargs'))}")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    out, used_prompts, used_labels = [], [], []
    for b, start in enumerate(range(0, n, batch)):
        size = min(batch, n - start)
        idx = list(range(start, start + size))
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed + b),
                                  **(pipeline_kwargs or {})}
        if "output_type" in params:
            kwargs["output_type"] = "pt" if "prompt" in params else "np"
        if guidance is not None and "guidance_scale" in params:
            kwargs["guidance_scale"] = guidance
        if "prompt" in params:
            if not prompts:
                raise QuantkitError("a text-to-image model needs prompts: give --prompts FILE")
            p = [prompts[i % len(prompts)] for i in idx]
            lab = [labels[i % len(prompts)] if labels else -1 for i in idx]
            kwargs["prompt"] = p
        elif "class_labels" in params:
            ncls = len(class_prompts) or 10
            lab = [(labels[i % len(labels)] if labels else i % ncls) for i in idx]
            p = [class_prompts[c] if class_prompts else "" for c in lab]
            kwargs["class_labels"] = lab
        else:
            p, lab = [""] * size, [-1] * size
            kwargs["batch_size"] = size
        with torch.no_grad():
            res = pipe(**kwargs)
        imgs = res.images if hasattr(res, "images") else res[0]
        imgs = torch.as_tensor(imgs)
        if imgs.dim() == 4 and imgs.shape[-1] in (1, 3) and imgs.shape[1] not in (1, 3):
            imgs = imgs.permute(0, 3, 1, 2)  # numpy output is NHWC
        if imgs.shape[1] == 1:
            imgs = imgs.expand(-1, 3, -1, -1)
        out.append(imgs.float().clamp(0, 1).cpu())
        used_prompts += p
        used_labels += lab
        if progress:
            progress(size)
    return SampleSet(torch.cat(out), used_prompts, used_labels)


def _fid(features: torch.nn.Module | int, a: torch.Tensor, b: torch.Tensor, weights: Path | None = None) -> float:
    """torchmetrics FID between image sets a and b ([N, 3, H, W] in [0, 1])."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    kwargs = {"feature_extractor_weights_path": str(weights)} if weights else {}
    try:
        fid = FrechetInceptionDistance(feature=features, normalize=isinstance(features, int), **kwargs)
    except ModuleNotFoundError as e:
        raise QuantkitError(f"Inception FID needs the torch-fidelity package ({e}); pip install torch-fidelity") from None
    chunks = [(c, True) for c in a.split(200)] + [(c, False) for c in b.split(200)]
    for chunk, real in track(chunks, "FID features"):
        fid.update(chunk, real=real)
    return float(fid.compute())


def feature_extractor(clip: tuple | None, inception_weights: Path | None) -> torch.nn.Module | int:
    """FID features: Inception (2048-d pool) when its weights are given, else the CLIP image embedding."""
    if inception_weights is not None:
        return 2048
    if clip is None:
        raise QuantkitError("FID needs a feature extractor: give --clip-model DIR or --inception-weights PATH")
    return ClipImageFeatures(*clip)


def diffusion_metrics(samples: SampleSet, reference: SampleSet | None, metrics: list[str], seed: int,
                      clip_dir: Path | None, real_source: str | None, class_prompts: list[str],
                      inception_weights: Path | None = None) -> dict[str, float]:
    """The requested metrics that the inputs allow; a metric that cannot be computed is left out and logged.

    Report keys name the features: `fid_clip_real` / `fid_clip_fp` on CLIP image embeddings (not comparable
    to published FID), `fid_inception_real` / `fid_inception_fp` on Inception pool features (the papers'
    FID), `is_clip` (Inception Score over the CLIP zero-shot class distribution)."""
    feat = "inception" if inception_weights is not None else "clip"
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.multimodal.clip_score import CLIPScore

    out: dict[str, float] = {}
    clip = load_clip(clip_dir) if clip_dir is not None else None
    if "fid_real" in metrics:
        if real_source is None:
            log.warning("fid_real skipped: no real images (--real-images DIR)")
        else:
            real = load_real_images(real_source, size=samples.images.shape[-1])
            out[f"fid_{feat}_real"] = _fid(feature_extractor(clip, inception_weights), real, samples.images, inception_weights)
    if "fid_fp" in metrics and reference is not None:
        out[f"fid_{feat}_fp"] = _fid(feature_extractor(clip, inception_weights), reference.images, samples.images,
                             inception_weights)
    if "is" in metrics:
        if clip and class_prompts:
            torch.manual_seed(seed)  # IS shuffles its splits with the global generator
            metric = InceptionScore(feature=ClipZeroShotLogits(*clip, class_prompts), splits=min(10, len(samples.images)))
            metric.update(samples.images)
            out["is_clip"] = float(metric.compute()[0])
        else:
            log.warning("is skipped: needs --clip-model with class prompts (quantkit_eval.json)")
    if "clip_score" in metrics and clip and any(samples.prompts):
        metric = CLIPScore(model_name_or_path=lambda: (TensorFeaturesCLIP(clip[0]), clip[1]))
        for i in track(range(0, len(samples.prompts), 100), "CLIP score"):
            imgs = (samples.images[i:i + 100] * 255).round().to(torch.uint8)
            metric.update(list(imgs), samples.prompts[i:i + 100])
        out["clip_score"] = float(metric.compute())
    if "prompt_accuracy" in metrics and clip and class_prompts and any(lab >= 0 for lab in samples.labels):
        judge = ClipZeroShotLogits(*clip, class_prompts)
        pred = torch.cat([judge(x).argmax(-1) for x in track(samples.images.split(200), "prompt accuracy")])
        lab = torch.tensor(samples.labels)
        keep = lab >= 0
        out["prompt_accuracy"] = float((pred[keep] == lab[keep]).float().mean())
    return out
