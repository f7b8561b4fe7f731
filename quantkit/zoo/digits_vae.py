"""The small AutoencoderKL that digits-t2i and digits-dit share: 32x32x3 pixels <-> 8x8x4 latents."""

from __future__ import annotations

import logging

import torch
from diffusers import AutoencoderKL

from quantkit.zoo.common import cosine_lr
from quantkit.zoo.digits_data import IMAGE_SIZE, augment

log = logging.getLogger(__name__)

LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // 4


def build_vae() -> AutoencoderKL:
    """SD's VAE layout shrunk: three levels (factor 4), 4 latent channels, attention in the middle."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def train_vae(images: torch.Tensor, gen: torch.Generator, steps: int, batch: int = 32, lr: float = 1e-3,
              kl_weight: float = 1e-4) -> AutoencoderKL:
    """Reconstruction (MSE) + a small KL keeps latents near N(0, I) without blurring the digits."""
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, warmup=50, peak=lr, floor_ratio=0.05)
        x = augment(images[torch.randint(0, len(images), (batch,), generator=gen)], gen)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon, x) + kl_weight * posterior.kl().mean() / z[0].numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log.info("vae step %d/%d loss %.5f", step, steps, loss.item())
    vae.eval()
    return vae


@torch.no_grad()
def set_scaling_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Set config.scaling_factor = 1 / std of latents (what SD's 0.18215 is for its VAE)."""
    std = vae.encode(images).latent_dist.mean.std().item()
    factor = round(1.0 / std, 5)
    vae.register_to_config(scaling_factor=factor)
    return factor


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean squared error of decode(mode(encode(x))) on images in [-1, 1]."""
    return torch.nn.functional.mse_loss(vae.decode(vae.encode(images).latent_dist.mode()).sample, images).item()
