"""Train `zoo:digits-dit`: a class-conditional DiTPipeline (DiTTransformer2DModel) on digits-t2i's VAE latents."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from quantkit.zoo.clip_judge import DigitJudge
from quantkit.zoo.common import cosine_lr, seed_everything, timed, write_metrics
from quantkit.zoo.diffusion_setup import add_noise, build_scheduler, encode_latents
from quantkit.zoo.digits_data import NUMBER_WORDS, digits_splits
from quantkit.zoo.digits_vae import LATENT_CHANNELS, LATENT_SIZE
from quantkit.zoo.ema import EMA, step_with_ema
from quantkit.zoo.registry import zoo_path

log = logging.getLogger(__name__)

# DiTPipeline hard-codes class id 1000 as the "no class" label for classifier-free guidance, so the
# label table keeps ImageNet's 1000 (+1 null) rows; only ids 0-9 (the digits) are ever trained.
NUM_EMBEDS = 1000
GUIDANCE_SCALE = 3.0
SAMPLING_STEPS = 25


def build_transformer() -> DiTTransformer2DModel:
    """DiT-S in miniature: 2x2 patches of 8x8x4 latents = 16 tokens, adaLN-zero, 6 blocks of width 96."""
    return DiTTransformer2DModel(
        num_attention_heads=6,
        attention_head_dim=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,  # epsilon only: no learned sigma at this size
        num_layers=6,
        sample_size=LATENT_SIZE,
        patch_size=2,
        num_embeds_ada_norm=NUM_EMBEDS,
        norm_type="ada_norm_zero",
    )


def train_transformer(latents: torch.Tensor, labels: torch.Tensor, scheduler: DDIMScheduler,
                      gen: torch.Generator, steps: int, batch: int = 128, lr: float = 1e-3) -> DiTTransformer2DModel:
    """Epsilon-prediction training; the model's own label dropout (10%) trains the null class."""
    model = build_transformer()
    ema = EMA(model, decay=0.999)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, warmup=100, peak=lr, floor_ratio=0.05)
        pick = torch.randint(0, len(latents), (batch,), generator=gen)
        noisy, t, noise = add_noise(latents[pick], scheduler, gen)
        loss = F.mse_loss(model(noisy, timestep=t, class_labels=labels[pick]).sample, noise)
        step_with_ema(model, opt, ema, loss, step, steps, "dit")
    return ema.shadow


@torch.no_grad()
def class_accuracy(pipe: DiTPipeline, judge: DigitJudge, per_digit: int, seed: int) -> float:
    """Sample `per_digit` images per class label; fraction digits-clip reads as that digit."""
    labels = torch.arange(10).repeat_interleave(per_digit)
    images = pipe(labels.tolist(), guidance_scale=GUIDANCE_SCALE, num_inference_steps=SAMPLING_STEPS,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return judge.accuracy(images, labels)


def train(out_dir: Path, seed: int = 0, steps: int = 2000, vae_dir: Path | None = None,
          clip_dir: Path | None = None) -> dict:
    """Train the transformer on frozen digits-t2i VAE latents, save a DiTPipeline folder, return FP metrics."""
    out_dir = Path(out_dir)
    vae_dir = Path(vae_dir) if vae_dir is not None else zoo_path("digits-t2i") / "vae"
    clip_dir = Path(clip_dir) if clip_dir is not None else zoo_path("digits-clip")
    gen = seed_everything(seed)
    (train_x, train_y), _ = digits_splits()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    scheduler = build_scheduler()
    times: dict[str, float] = {}
    with timed("train_seconds", times):
        latents = encode_latents(vae, train_x, gen, copies=8)
        model = train_transformer(latents, train_y.repeat(8), scheduler, gen, steps)
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=scheduler)
    # DiTPipeline.get_label_ids reads id2label; the hub DiT folders keep it in model_index.json.
    pipe.register_to_config(id2label={i: word for i, word in enumerate(NUMBER_WORDS)})
    pipe.save_pretrained(out_dir, safe_serialization=True)
    reloaded = DiTPipeline.from_pretrained(out_dir)
    reloaded.set_progress_bar_config(disable=True)
    with timed("eval_seconds", times):
        accuracy = class_accuracy(reloaded, DigitJudge(clip_dir), per_digit=20, seed=seed)
    metrics = {
        "model": "digits-dit",
        "seed": seed,
        "steps": steps,
        "class_digit_accuracy": round(accuracy, 4),
        "class_digit_accuracy_setting": {
            "judge": "digits-clip zero-shot", "images_per_digit": 20, "num_inference_steps": SAMPLING_STEPS,
            "guidance_scale": GUIDANCE_SCALE, "scheduler": "DDIM",
        },
        "transformer_parameters": sum(p.numel() for p in reloaded.transformer.parameters()),
        **times,
    }
    write_metrics(out_dir, metrics)
    return metrics
