"""Train `zoo:digits-mmdit`: FLUX in miniature, a FluxPipeline folder on digits-t2i's VAE latents.

FluxTransformer2DModel (double-stream blocks, then single-stream blocks, 3-axis rotary positions) trained
by rectified flow matching and sampled with FlowMatchEulerDiscreteScheduler, like FLUX.1. Both text-encoder
slots hold digits-clip's text tower (the CLIP slot gives the pooled vector, the "T5" slot the per-token
states): the pipeline only needs a `pooler_output` from the first and `[0]` hidden states from the second.
No guidance embedding and no classifier-free guidance (FLUX.1-schnell's way of sampling): the pipeline's
true-CFG path needs a negative prompt per image, which an evaluation profile cannot give.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import AutoTokenizer

from quantkit.eval.profile import PROFILE_FILE
from quantkit.zoo.captions import TEMPLATES, caption, prompt_for
from quantkit.zoo.clip_judge import DigitJudge
from quantkit.zoo.common import cosine_lr, seed_everything, timed, write_metrics
from quantkit.zoo.diffusion_setup import encode_latents
from quantkit.zoo.digits_data import IMAGE_SIZE, digits_splits
from quantkit.zoo.digits_vae import LATENT_CHANNELS
from quantkit.zoo.ema import EMA, step_with_ema
from quantkit.zoo.registry import zoo_path
from quantkit.zoo.train_digits_t2i import text_encoder_from_clip

log = logging.getLogger(__name__)

SAMPLING_STEPS = 25


def build_transformer(text_dim: int) -> FluxTransformer2DModel:
    """2x2-packed 8x8x4 latents = 16 image tokens of 16 channels; width 96 (6 heads of 16), 2 double-stream
    then 4 single-stream blocks; rotary axes (text/frame, row, column) of 4 + 6 + 6 = head dim 16."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=16,
        num_attention_heads=6,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )


def sample_kwargs(pipe: FluxPipeline) -> dict:
    """Call arguments the model is sampled with: its training size, prompts padded to the encoder's length."""
    return {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "max_sequence_length": pipe.tokenizer_2.model_max_length}


@torch.no_grad()
def caption_table(pipe: FluxPipeline) -> tuple[list[tuple[int, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Every (digit, template) caption encoded once through the pipeline's own encode_prompt, so training
    conditions on exactly what sampling computes; returns [(label, states, pooled)] and the text ids."""
    texts = [(label, caption(label, t)) for label in range(10) for t in TEMPLATES]
    states, pooled, text_ids = pipe.encode_prompt(prompt=[t for _, t in texts], prompt_2=None,
                                                   max_sequence_length=pipe.tokenizer_2.model_max_length)
    return [(label, states[i], pooled[i]) for i, (label, _) in enumerate(texts)], text_ids


def train_transformer(pipe: FluxPipeline, latents: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
                      rng: random.Random, steps: int, batch: int = 128, lr: float = 1e-3) -> FluxTransformer2DModel:
    """Rectified flow: x_s = (1 - s) x0 + s noise, s ~ U(0, 1); the model predicts noise - x0 (what the
    flow-matching Euler step integrates). Returns the EMA weights."""
    table, text_ids = caption_table(pipe)
    by_label = {d: [i for i, (label, _, _) in enumerate(table) if label == d] for d in range(10)}
    model = build_transformer(pipe.text_encoder.config.hidden_size)
    ema = EMA(model, decay=0.999)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    side = latents.shape[-1] // 2
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
    for step in range(steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, warmup=100, peak=lr, floor_ratio=0.05)
        pick = torch.randint(0, len(latents), (batch,), generator=gen)
        rows = [table[rng.choice(by_label[int(y)])] for y in labels[pick]]
        x0 = FluxPipeline._pack_latents(latents[pick], batch, LATENT_CHANNELS, 2 * side, 2 * side)
        noise = torch.randn(x0.shape, generator=gen)
        s = torch.rand(batch, generator=gen)
        noisy = (1 - s.view(-1, 1, 1)) * x0 + s.view(-1, 1, 1) * noise
        pred = model(hidden_states=noisy, timestep=s, pooled_projections=torch.stack([r[2] for r in rows]),
                     encoder_hidden_states=torch.stack([r[1] for r in rows]), txt_ids=text_ids,
                     img_ids=img_ids).sample
        loss = F.mse_loss(pred, noise - x0)
        step_with_ema(model, opt, ema, loss, step, steps, "mmdit")
    return ema.shadow


@torch.no_grad()
def prompted_accuracy(pipe: FluxPipeline, judge: DigitJudge, per_digit: int, seed: int) -> float:
    """Generate `per_digit` images for each digit's canonical prompt; fraction the judge reads right."""
    labels = torch.arange(10).repeat_interleave(per_digit)
    images = pipe([prompt_for(int(y)) for y in labels], num_inference_steps=SAMPLING_STEPS,
                  generator=torch.Generator().manual_seed(seed), output_type="pt", **sample_kwargs(pipe)).images
    return judge.accuracy(images, labels)


def build_pipeline(transformer: FluxTransformer2DModel | None, vae_dir: Path, clip_dir: Path) -> FluxPipeline:
    """The FluxPipeline around `transformer`: digits-t2i's VAE, digits-clip's text tower in both slots."""
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    # FLUX decodes latents / scaling_factor + shift_factor; the digits VAE latents are not shifted.
    vae.register_to_config(shift_factor=0.0)
    text_encoder = text_encoder_from_clip(clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder, tokenizer_2=tokenizer,
                        transformer=transformer)


def write_eval_profile(out_dir: Path, pipe: FluxPipeline) -> None:
    """quantkit_eval.json: the digits-clip judge, the canonical prompts, and the call arguments the model
    must be sampled with (FluxPipeline's own default is 128 x the VAE factor and 512 text tokens)."""
    prompts = [prompt_for(d) for d in range(10)]
    profile = {"clip_model": "zoo:digits-clip", "real_images": "sklearn-digits", "prompts": prompts,
               "labels": list(range(10)), "class_prompts": prompts, "steps": SAMPLING_STEPS,
               "pipeline_kwargs": sample_kwargs(pipe)}
    (out_dir / PROFILE_FILE).write_text(json.dumps(profile, indent=1) + "\n")


def train(out_dir: Path, seed: int = 0, steps: int = 2000, vae_dir: Path | None = None,
          clip_dir: Path | None = None) -> dict:
    """Train the transformer on frozen digits-t2i VAE latents, save a FluxPipeline folder, return FP metrics."""
    out_dir = Path(out_dir)
    vae_dir = Path(vae_dir) if vae_dir is not None else zoo_path("digits-t2i") / "vae"
    clip_dir = Path(clip_dir) if clip_dir is not None else zoo_path("digits-clip")
    gen = seed_everything(seed)
    rng = random.Random(seed)
    (train_x, train_y), _ = digits_splits()
    pipe = build_pipeline(None, vae_dir, clip_dir)
    times: dict[str, float] = {}
    with timed("train_seconds", times):
        latents = encode_latents(pipe.vae, train_x, gen, copies=8)
        pipe.transformer = train_transformer(pipe, latents, train_y.repeat(8), gen, rng, steps)
    pipe.register_modules(transformer=pipe.transformer)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    reloaded = FluxPipeline.from_pretrained(out_dir)
    reloaded.set_progress_bar_config(disable=True)
    write_eval_profile(out_dir, reloaded)
    with timed("eval_seconds", times):
        accuracy = prompted_accuracy(reloaded, DigitJudge(clip_dir), per_digit=20, seed=seed)
    metrics = {
        "model": "digits-mmdit",
        "seed": seed,
        "steps": steps,
        "prompted_digit_accuracy": round(accuracy, 4),
        "prompted_digit_accuracy_setting": {
            "judge": "digits-clip zero-shot", "images_per_digit": 20, "prompt": "a handwritten {word}",
            "num_inference_steps": SAMPLING_STEPS, "guidance": "none", "scheduler": "FlowMatchEulerDiscrete",
            **sample_kwargs(reloaded),
        },
        "transformer_parameters": sum(p.numel() for p in reloaded.transformer.parameters()),
        **times,
    }
    write_metrics(out_dir, metrics)
    return metrics
