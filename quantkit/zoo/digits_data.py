"""sklearn's 8x8 handwritten digits as 32x32 RGB tensors in [-1, 1], with a fixed held-out split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

IMAGE_SIZE = 32
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The split never depends on the training seed, so every model's held-out metric uses the same images.
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2


def _to_images(flat: torch.Tensor, size: int) -> torch.Tensor:
    """[N, 64] pixel values 0..16 -> [N, 3, size, size] in [-1, 1]; gray copied into 3 channels
    so the standard RGB code paths (CLIP processor, SD VAE, image grids) apply unchanged."""
    small = flat.view(-1, 1, 8, 8) / 16.0
    big = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    return (big.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous()


def digits_splits(size: int = IMAGE_SIZE) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Return ((train_images, train_labels), (held_out_images, held_out_labels)) at `size` x `size`."""
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED, stratify=y.numpy()
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return (_to_images(x[idx_train], size), y[idx_train]), (_to_images(x[idx_test], size), y[idx_test])


def augment(images: torch.Tensor, gen: torch.Generator, max_shift: float = 0.1, max_scale: float = 0.1) -> torch.Tensor:
    """Random small shifts, scalings and rotations (digits stay legible) applied per image."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=gen) - 0.5) * 0.4  # +-0.2 rad
    scale = 1 + (torch.rand(n, generator=gen) - 0.5) * 2 * max_scale
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 2 * max_shift
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Background is -1 (black); pad with it rather than zeros (mid-gray).
    return F.grid_sample(images + 1, grid, align_corners=False, padding_mode="zeros") - 1
