"""digits-clip as a judge: which digit does an image show? Used to score the generative zoo models."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPModel

from quantkit.zoo.train_digits_clip import zero_shot_predict


class DigitJudge:
    """Zero-shot digit classifier over images in [0, 1] (what pipelines return with output_type="pt")."""

    def __init__(self, clip_dir: Path) -> None:
        self.model = CLIPModel.from_pretrained(clip_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(clip_dir)

    @torch.no_grad()
    def predict(self, images01: torch.Tensor) -> torch.Tensor:
        """[N, 3, 32, 32] in [0, 1] -> [N] predicted digits."""
        return zero_shot_predict(self.model, self.tokenizer, images01 * 2 - 1)

    def accuracy(self, images01: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of images the judge reads as their intended digit."""
        return (self.predict(images01) == labels).float().mean().item()
