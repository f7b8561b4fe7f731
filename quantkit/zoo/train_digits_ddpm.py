"""Train `zoo:digits-ddpm`: an unconditional pixel-space UNet2DModel, saved as a DDIMPipeline folder."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from quantkit.zoo.clip_judge import DigitJudge
from quantkit.zoo.common import cosine_lr, seed_everything, timed, write_metrics
from quantkit.zoo.diffusion_setup import add_noise
from quantkit.zoo.digits_data import augment, digits_splits
from quantkit.zoo.ema import EMA, step_with_ema
from quantkit.zoo.registry import zoo_path

log = logging.getLogger(__name__)

# 16x16 pixels: the digits are 8x8 at heart, and pixel-space convolutions at 32x32 would cost 4x
# the CPU time for no extra detail. Samples are upsampled to 32x32 only to be judged.
PIXEL_SIZE = 16
SAMPLING_STEPS = 50


def build_scheduler() -> DDIMScheduler:
    """DDPM's original linear schedule (pixel space), sampled with DDIM."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=True, prediction_type="epsilon")


def build_unet() -> UNet2DModel:
    """Three levels 16 -> 8 -> 4 with self-attention at 8x8, as in DDPM's CIFAR model, shrunk."""
    return UNet2DModel(
        sample_size=PIXEL_SIZE,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=16,
    )


def train_unet(images: torch.Tensor, scheduler: DDIMScheduler, gen: torch.Generator, steps: int,
               batch: int = 64, lr: float = 1e-3) -> UNet2DModel:
    """Epsilon-prediction on augmented pixels; returns the EMA weights."""
    unet = build_unet()
    ema = EMA(unet, decay=0.999)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        unet.train()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, warmup=100, peak=lr, floor_ratio=0.05)
        x0 = augment(images[torch.randint(0, len(images), (batch,), generator=gen)], gen)
        noisy, t, noise = add_noise(x0, scheduler, gen)
        loss = F.mse_loss(unet(noisy, t).sample, noise)
        step_with_ema(unet, opt, ema, loss, step, steps, "ddpm")
    return ema.shadow


@torch.no_grad()
def sample_statistics(pipe: DDIMPipeline, judge: DigitJudge, n: int, seed: int) -> dict:
    """What digits-clip reads in `n` unconditional samples: per-digit counts and their normalized entropy
    (1.0 = all ten digits equally often, 0 = mode collapse onto one digit)."""
    images = pipe(batch_size=n, num_inference_steps=SAMPLING_STEPS, generator=torch.Generator().manual_seed(seed),
                  output_type="np").images
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    predicted = judge.predict(F.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False))
    counts = torch.bincount(predicted, minlength=10).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item() / math.log(10)
    return {"judged_digit_counts": counts.long().tolist(), "judged_digit_entropy": round(entropy, 4)}


def train(out_dir: Path, seed: int = 0, steps: int = 2500, clip_dir: Path | None = None) -> dict:
    """Train, save a DDIMPipeline folder (unet + scheduler) in `out_dir`, return FP metrics."""
    out_dir = Path(out_dir)
    clip_dir = Path(clip_dir) if clip_dir is not None else zoo_path("digits-clip")
    gen = seed_everything(seed)
    (train_x, _), (test_x, _) = digits_splits(PIXEL_SIZE)
    scheduler = build_scheduler()
    times: dict[str, float] = {}
    with timed("train_seconds", times):
        unet = train_unet(train_x, scheduler, gen, steps)
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)
    reloaded = DDIMPipeline.from_pretrained(out_dir)
    reloaded.set_progress_bar_config(disable=True)
    with timed("eval_seconds", times):
        stats = sample_statistics(reloaded, DigitJudge(clip_dir), n=200, seed=seed)
    metrics = {
        "model": "digits-ddpm",
        "seed": seed,
        "steps": steps,
        "pixel_size": PIXEL_SIZE,
        **stats,
        "sample_setting": {"n": 200, "num_inference_steps": SAMPLING_STEPS, "scheduler": "DDIM", "eta": 0.0,
                           "judge": "digits-clip zero-shot on samples upsampled to 32x32"},
        "unet_parameters": sum(p.numel() for p in reloaded.unet.parameters()),
        **times,
    }
    write_metrics(out_dir, metrics)
    return metrics
