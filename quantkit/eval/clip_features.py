"""A local CLIP folder as the feature extractor of FID, the classifier of IS and the judge of CLIP score."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import QuantkitError


def load_clip(folder: Path) -> tuple[nn.Module, object]:
    """(CLIPModel, CLIPProcessor) from a local folder with a tokenizer and an image-processor config."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        processor = CLIPProcessor(image_processor=AutoImageProcessor.from_pretrained(folder, local_files_only=True),
                                  tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))
    except (OSError, ValueError) as e:
        raise QuantkitError(f"cannot load a CLIP model from {folder}: {str(e).splitlines()[0]}") from None
    return model, processor


def _pixel_inputs(processor: object, images01: torch.Tensor) -> torch.Tensor:
    """Resize and normalize [N, 3, H, W] images in [0, 1] the way the CLIP's processor says."""
    ip = processor.image_processor
    size = ip.crop_size["height"] if getattr(ip, "crop_size", None) else ip.size.get("shortest_edge", 224)
    x = images01.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(ip.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(ip.image_std).view(1, -1, 1, 1)
    return (x - mean) / std


def _as_tensor(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipImageFeatures(nn.Module):
    """[N, 3, H, W] floats in [0, 1] -> [N, D] image embeddings (FID features)."""

    def __init__(self, model: nn.Module, processor: object) -> None:
        super().__init__()
        self.model, self.processor = model, processor
        self.num_features = int(model.config.projection_dim)

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(pixel_values=_pixel_inputs(self.processor, images01)))


class ClipZeroShotLogits(nn.Module):
    """[N, 3, H, W] in [0, 1] -> [N, C] zero-shot logits over class prompts (the IS classifier)."""

    def __init__(self, model: nn.Module, processor: object, class_prompts: list[str]) -> None:
        super().__init__()
        self.model, self.processor = model, processor
        tok = processor.tokenizer(class_prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            text = _as_tensor(model.get_text_features(**tok))
        self.register_buffer("text", F.normalize(text, dim=-1))

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        img = _as_tensor(self.model.get_image_features(pixel_values=_pixel_inputs(self.processor, images01)))
        return self.model.logit_scale.exp() * F.normalize(img, dim=-1) @ self.text.T


class TensorFeaturesCLIP(nn.Module):
    """A CLIPModel whose get_*_features return tensors (transformers 5 returns output objects, which
    torchmetrics' CLIPScore does not expect)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_text_features(*args, **kwargs))
