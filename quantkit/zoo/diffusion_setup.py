"""Pieces the zoo's diffusion trainers share: SD's noise schedule, cached VAE latents, the noising step."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler

from quantkit.zoo.digits_data import augment


def build_scheduler() -> DDIMScheduler:
    """SD v1's noise schedule and DDIM settings."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, gen: torch.Generator, copies: int) -> torch.Tensor:
    """Scaled latent means of `copies` augmented views of each image, copy-major (view k of image i
    sits at k * len(images) + i): the UNet then never pays for the encoder during training."""
    out = []
    for _ in range(copies):
        views = augment(images, gen)
        out.append(torch.cat([vae.encode(views[i : i + 256]).latent_dist.mean for i in range(0, len(views), 256)]))
    return torch.cat(out) * vae.config.scaling_factor


def add_noise(x0: torch.Tensor, scheduler: DDIMScheduler, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Sample t and noise; return (noisy, t, noise) for the epsilon-prediction loss."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    alpha = scheduler.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise, t, noise
