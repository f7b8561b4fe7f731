"""Train `zoo:digits-t2i`: Stable Diffusion in miniature, saved as a StableDiffusionPipeline folder."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPModel, CLIPTextModel

from quantkit.zoo.captions import prompt_for, random_caption
from quantkit.zoo.clip_judge import DigitJudge
from quantkit.zoo.common import cosine_lr, seed_everything, timed, write_metrics
from quantkit.zoo.diffusion_setup import add_noise, build_scheduler, encode_latents
from quantkit.zoo.digits_data import digits_splits
from quantkit.zoo.digits_vae import LATENT_CHANNELS, LATENT_SIZE, reconstruction_mse, set_scaling_factor, train_vae
from quantkit.zoo.ema import EMA, step_with_ema
from quantkit.zoo.registry import zoo_path
from quantkit.zoo.train_digits_clip import tokenize

log = logging.getLogger(__name__)

CAPTION_DROPOUT = 0.1  # empty-prompt training is what makes classifier-free guidance possible
GUIDANCE_SCALE = 4.0
SAMPLING_STEPS = 25


def build_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    """Two levels on 8x8x4 latents, cross-attention to the text encoder's hidden states in every block."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def text_encoder_from_clip(clip_dir: Path) -> CLIPTextModel:
    """digits-clip's text tower as a standalone CLIPTextModel (what SD's text_encoder folder holds)."""
    clip = CLIPModel.from_pretrained(clip_dir)
    text = CLIPTextModel(clip.config.text_config)
    # transformers v5 flattened CLIPTextModel (no `.text_model` wrapper); v4 still has one.
    target = getattr(text, "text_model", text)
    target.load_state_dict(clip.text_model.state_dict())
    return text.eval().requires_grad_(False)


def train_unet(latents: torch.Tensor, labels: torch.Tensor, text_encoder: CLIPTextModel, tokenizer,
               scheduler: DDIMScheduler, gen: torch.Generator, rng: random.Random, steps: int,
               batch: int = 64, lr: float = 1e-3) -> UNet2DConditionModel:
    """Epsilon-prediction training with caption dropout; returns the EMA weights."""
    unet = build_unet(text_encoder.config.hidden_size)
    ema = EMA(unet, decay=0.999)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        unet.train()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, warmup=100, peak=lr, floor_ratio=0.05)
        pick = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[pick]
        texts = ["" if rng.random() < CAPTION_DROPOUT else random_caption(int(y), rng) for y in labels[pick]]
        with torch.no_grad():
            cond = text_encoder(input_ids=tokenize(tokenizer, texts)).last_hidden_state
        noisy, t, noise = add_noise(x0, scheduler, gen)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
        step_with_ema(unet, opt, ema, loss, step, steps, "unet")
    return ema.shadow


@torch.no_grad()
def prompted_accuracy(pipe: StableDiffusionPipeline, judge: DigitJudge, per_digit: int, seed: int) -> float:
    """Generate `per_digit` images for each digit's canonical prompt; fraction the judge reads right."""
    labels = torch.arange(10).repeat_interleave(per_digit)
    prompts = [prompt_for(int(y)) for y in labels]
    images = pipe(prompts, num_inference_steps=SAMPLING_STEPS, guidance_scale=GUIDANCE_SCALE,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return judge.accuracy(images, labels)


def train(out_dir: Path, seed: int = 0, clip_dir: Path | None = None, vae_steps: int = 800,
          unet_steps: int = 2000) -> dict:
    """Train VAE then UNet, save a StableDiffusionPipeline folder in `out_dir`, return FP metrics."""
    out_dir = Path(out_dir)
    clip_dir = Path(clip_dir) if clip_dir is not None else zoo_path("digits-clip")
    gen = seed_everything(seed)
    rng = random.Random(seed)
    (train_x, train_y), (test_x, _) = digits_splits()
    times: dict[str, float] = {}
    with timed("vae_train_seconds", times):
        vae = train_vae(train_x, gen, steps=vae_steps)
        scaling = set_scaling_factor(vae, train_x)
    text_encoder = text_encoder_from_clip(clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    scheduler = build_scheduler()
    with timed("unet_train_seconds", times):
        latents = encode_latents(vae, train_x, gen, copies=8)
        unet = train_unet(latents, train_y.repeat(8), text_encoder, tokenizer, scheduler, gen, rng, unet_steps)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    reloaded = StableDiffusionPipeline.from_pretrained(out_dir)
    reloaded.set_progress_bar_config(disable=True)
    judge = DigitJudge(clip_dir)
    with timed("eval_seconds", times):
        accuracy = prompted_accuracy(reloaded, judge, per_digit=20, seed=seed)
        real_accuracy = judge.accuracy((test_x + 1) / 2, digits_splits()[1][1])
    metrics = {
        "model": "digits-t2i",
        "seed": seed,
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "vae_scaling_factor": scaling,
        "vae_heldout_reconstruction_mse": round(reconstruction_mse(reloaded.vae, test_x), 5),
        "prompted_digit_accuracy": round(accuracy, 4),
        "prompted_digit_accuracy_setting": {
            "judge": "digits-clip zero-shot", "images_per_digit": 20, "prompt": "a handwritten {word}",
            "num_inference_steps": SAMPLING_STEPS, "guidance_scale": GUIDANCE_SCALE, "scheduler": "DDIM",
        },
        "judge_accuracy_on_real_heldout_digits": round(real_accuracy, 4),
        "unet_parameters": sum(p.numel() for p in reloaded.unet.parameters()),
        "vae_parameters": sum(p.numel() for p in reloaded.vae.parameters()),
        "train_seconds": round(times["vae_train_seconds"] + times["unet_train_seconds"], 1),
        **times,
    }
    write_metrics(out_dir, metrics)
    return metrics
